"""One elastic checkpoint holding every budget (METHOD.md §8).

    CKPT/
      config.json, model*.safetensors   the importance-sorted parent, a stock Hugging Face
                                        checkpoint (transformers loads it as the full model)
      router.safetensors                the budget router's weights
      manifest.json                     every trained budget by name: its resolved architecture
                                        (spec + per-layer sizes), total / active parameters and
                                        memory; the router's settings; a sha256 of every weight file
      tokenizer files

Storage is the parent's, not the sum of the budgets': each budget is a prefix of the parent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import StarElasticError
from ..hf import load, load_tokenizer, save_pretrained, staging
from ..model import Model
from .cost import Arch, Budget, CostModel, MemorySettings
from .router import Router, RouterConfig
from .spec import ElasticSpec

FORMAT = "star-elastic-checkpoint"
VERSION = 1


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_elastic_checkpoint(path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def budget_entry(budget: Budget, spec: ElasticSpec, parent_cfg, cost: CostModel) -> dict:
    """What the manifest records of one budget."""
    arch = Arch.from_spec(spec, parent_cfg)
    return {"name": budget.name, "kind": budget.kind, "target": budget.target, "fraction": budget.fraction,
            "spec": spec.to_dict(), "layers": [{"keep": bool(s["keep"]), **{k: v for k, v in s.items() if k != "keep"}}
                                               for s in arch.layers],
            "hidden_size": int(arch.hidden), "params": int(cost.cost("params", arch)),
            "active_params": int(cost.cost("active", arch)), "memory_bytes": int(cost.cost("memory", arch))}


def save_elastic(model: Model, router: Router, budgets: list[Budget], out, tokenizer=None,
                 memory: MemorySettings | None = None, extra: dict | None = None) -> Path:
    """Write the elastic checkpoint of a trained (sorted) parent and router, atomically."""
    out = Path(out)
    router.eval()
    cost = CostModel(model.config, memory)
    entries = [budget_entry(b, router.spec(i), model.config, cost) for i, b in enumerate(budgets)]
    with staging(out) as tmp:
        save_pretrained(model, tmp / "parent", tokenizer=tokenizer)
        for f in (tmp / "parent").iterdir():  # flatten: the checkpoint directory is the HF directory
            f.rename(tmp / f.name)
        (tmp / "parent").rmdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()},
                  str(tmp / "router.safetensors"), metadata={"format": FORMAT})
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        manifest = {
            "format": FORMAT, "version": VERSION, "family": model.config.family,
            "parent": {"params": model.num_parameters(), "active_params": int(cost.full("active")),
                       "memory_bytes": int(cost.full("memory"))},
            "memory_settings": asdict(cost.memory_settings),
            "budgets": entries,
            "router": {"config": asdict(router.config), "budgets": [asdict(b) for b in budgets],
                       "layer_order": router.layer_order},
            "files": {name: sha256(tmp / name) for name in weights},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out


def read_manifest(path) -> dict:
    path = Path(path)
    f = path / "manifest.json"
    if not f.is_file():
        raise StarElasticError(f"{path}: not a star-elastic checkpoint (no manifest.json)")
    try:
        manifest = json.loads(f.read_text())
    except ValueError as e:
        raise StarElasticError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StarElasticError(f"{f}: not a star-elastic manifest")
    if manifest.get("version", 0) > VERSION:
        raise StarElasticError(f"{f}: written by a newer star-elastic (format version {manifest['version']})")
    return manifest


def budget_names(manifest: dict) -> list[str]:
    return [b["name"] for b in manifest["budgets"]]


def budget_spec(manifest: dict, name: str) -> ElasticSpec:
    """The architecture of the budget called `name` (as given on the command line)."""
    for b in manifest["budgets"]:
        if b["name"] == str(name):
            return ElasticSpec.from_dict(b["spec"])
    raise StarElasticError(f"budget {name!r} is not in this checkpoint (trained budgets: "
                           f"{', '.join(budget_names(manifest))})")


@dataclass
class ElasticCheckpoint:
    model: Model
    router: Router
    manifest: dict
    tokenizer: object = None

    def spec(self, name: str) -> ElasticSpec:
        return budget_spec(self.manifest, name)


def load_elastic(path, dtype=None, device=None, verify: bool = False) -> ElasticCheckpoint:
    """The sorted parent, its router and the manifest. `verify` checks every weight file's sha256."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        for name, digest in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise StarElasticError(f"{f}: weight file listed in the manifest is missing")
            if sha256(f) != digest:
                raise StarElasticError(f"{f}: checksum does not match the manifest (damaged or replaced)")
    model = load(path, dtype=dtype, device=device)
    r = manifest["router"]
    config = RouterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["config"].items()})
    router = Router(model.config, [Budget(**b) for b in r["budgets"]], config, layer_order=r["layer_order"])
    try:
        router.load_state_dict(load_file(str(path / "router.safetensors")))
    except Exception as e:
        raise StarElasticError(f"{path / 'router.safetensors'}: cannot load router ({str(e).splitlines()[0]})") from None
    return ElasticCheckpoint(model, router.to(model.lm_head.weight.device).eval(), manifest, load_tokenizer(path))
