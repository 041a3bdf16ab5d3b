"""One elastic checkpoint holding every budget (METHOD.md §8).

    CKPT/
      config.json, model*.safetensors   the importance-sorted parent, a stock Hugging Face
                                        checkpoint (transformers loads it as the full model)
      router.safetensors                the budget router's weights
      importance.safetensors            the importance scores the parent was sorted by, in the sorted
                                        order (unit j of every axis is the parent's unit j); optional
      manifest.json                     every trained budget by name: its resolved architecture
                                        (spec + per-layer sizes), total / active parameters and
                                        memory; the router's settings; a sha256 and the size in bytes
                                        of every .safetensors file
      tokenizer files

Damage is caught in two tiers. Cheap checks run on every load (`check_cheap`, called from `hf.load`):
the manifest is well formed, every file it lists is there with its recorded size, every weight file
that will be read is listed, the budgets fit the config; `hf.read_safetensors` checks each file's
length against its header. The full sha256 of every file runs on request (`verify_files`, used by
`load_elastic(verify=True)` and `star-elastic validate`).

Storage is the parent's, not the sum of the budgets': each budget is a prefix of the parent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..errors import StarElasticError
from ..hf import (PICKLE_SUFFIXES, _weight_files, load, load_tokenizer, read_json, safetensors_header, save_pretrained,
                  staging)
from ..model import Model, ModelConfig
from .cost import Arch, Budget, CostModel, MemorySettings
from .importance import save_scores
from .router import Router, RouterConfig
from .spec import ElasticSpec, count_parameters

FORMAT = "star-elastic-checkpoint"
VERSION = 1
IMPORTANCE_FILE = "importance.safetensors"
ROUTER_FILE = "router.safetensors"


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_elastic_checkpoint(path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def has_manifest(path) -> bool:
    """Whether `path` holds a manifest.json of ours, damaged ones included (a foreign, valid JSON
    manifest.json beside a plain HF checkpoint is not our business)."""
    f = Path(path) / "manifest.json"
    if not f.is_file():
        return False
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return True  # unreadable: read_manifest says so, naming the file
    return not isinstance(d, dict) or d.get("format") == FORMAT


def budget_entry(budget: Budget, spec: ElasticSpec, parent_cfg, cost: CostModel) -> dict:
    """What the manifest records of one budget."""
    arch = Arch.from_spec(spec, parent_cfg)
    return {"name": budget.name, "kind": budget.kind, "target": budget.target, "fraction": budget.fraction,
            "spec": spec.to_dict(), "layers": [{"keep": bool(s["keep"]), **{k: v for k, v in s.items() if k != "keep"}}
                                               for s in arch.layers],
            "hidden_size": int(arch.hidden), "params": int(cost.cost("params", arch)),
            "active_params": int(cost.cost("active", arch)), "memory_bytes": int(cost.cost("memory", arch))}


def save_elastic(model: Model, router: Router, budgets: list[Budget], out, tokenizer=None,
                 memory: MemorySettings | None = None, extra: dict | None = None,
                 scores: dict | None = None) -> Path:
    """Write the elastic checkpoint of a trained (sorted) parent and router, atomically. `scores`:
    the importance scores in the parent's (sorted) unit order, kept for `star-elastic inspect`."""
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
                  str(tmp / ROUTER_FILE), metadata={"format": FORMAT})
        if scores is not None:
            save_scores(scores, tmp / IMPORTANCE_FILE)
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
            "sizes": {name: (tmp / name).stat().st_size for name in weights},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out


def read_manifest(path) -> dict:
    path = Path(path)
    f = path / "manifest.json"
    if not f.is_file():
        raise StarElasticError(f"{path}: not a star-elastic checkpoint (no manifest.json)")
    manifest = read_json(f)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StarElasticError(f"{f}: not a star-elastic manifest")
    if manifest.get("version", 0) > VERSION:
        raise StarElasticError(f"{f}: written by a newer star-elastic (format version {manifest['version']})")
    _check_structure(manifest, f)
    return manifest


def _check_structure(manifest: dict, f: Path) -> None:
    """The fields every reader relies on, with the right types: one line naming the first bad one."""
    def bad(what):
        return StarElasticError(f"{f}: malformed manifest ({what})")

    budgets, files = manifest.get("budgets"), manifest.get("files")
    if not isinstance(budgets, list) or not budgets:
        raise bad("'budgets' must be a non-empty list")
    for i, b in enumerate(budgets):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not isinstance(b.get("spec"), dict):
            raise bad(f"budget {i} needs a 'name' and a 'spec'")
        for key in ("params", "active_params", "memory_bytes"):
            if not isinstance(b.get(key), int):
                raise bad(f"budget {b['name']!r}: '{key}' must be an integer")
    names = [b["name"] for b in budgets]
    if len(set(names)) != len(names):
        raise bad(f"budget names repeat: {names}")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise bad("'files' must map every weight file to its sha256")
    for name in files:
        if Path(name).name != name or Path(name).suffix in PICKLE_SUFFIXES or not name.endswith(".safetensors"):
            raise bad(f"lists {name!r}: only safetensors files in the checkpoint directory are read, "
                      "never pickles")
    sizes = manifest.get("sizes", {})
    if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
        raise bad("'sizes' must map files to byte counts")
    router = manifest.get("router")
    if not isinstance(router, dict) or not all(k in router for k in ("config", "budgets", "layer_order")):
        raise bad("'router' needs 'config', 'budgets' and 'layer_order'")
    if not isinstance(manifest.get("parent"), dict) or not isinstance(manifest["parent"].get("params"), int):
        raise bad("'parent' needs 'params'")


def check_files(path, manifest: dict, full: bool = False, progress: bool = False) -> None:
    """Every file the manifest lists is there with its recorded size (and, `full`, its sha256), and
    every weight file a load would read is listed (else it could be swapped unnoticed)."""
    path = Path(path)
    files, sizes = manifest["files"], manifest.get("sizes", {})
    for name in files:
        f = path / name
        if not f.is_file():
            raise StarElasticError(f"{f}: listed in the manifest but missing")
        if name in sizes and f.stat().st_size != sizes[name]:
            raise StarElasticError(f"{f}: {f.stat().st_size:,} bytes, the manifest records {sizes[name]:,} "
                                   "(truncated or replaced)")
    for f in _weight_files(path) + [path / ROUTER_FILE]:
        if f.name not in files:
            raise StarElasticError(f"{f}: not listed in the manifest (its checksum is unknown)")
    if full:
        verify_files(path, manifest, progress)


def verify_files(path, manifest: dict, progress: bool = False) -> list[str]:
    """The full sha256 of every listed file against the manifest; the names checked."""
    from tqdm.auto import tqdm

    path = Path(path)
    for name in tqdm(list(manifest["files"]), desc="sha256", unit="file", disable=not progress):
        f = path / name
        if not f.is_file():
            raise StarElasticError(f"{f}: listed in the manifest but missing")
        if sha256(f) != manifest["files"][name]:
            raise StarElasticError(f"{f}: checksum does not match the manifest (damaged or replaced)")
    return list(manifest["files"])


def check_budgets(manifest: dict, cfg: ModelConfig, source) -> None:
    """The manifest describes this config: family, parameter count, and every budget's spec is a
    valid sub-architecture of it with the parameter count recorded."""
    if manifest.get("family") not in (None, cfg.family):
        raise StarElasticError(f"{source}: manifest is for a {manifest['family']} model, config.json "
                               f"describes {cfg.family}")
    params = count_parameters(cfg)
    if manifest["parent"]["params"] != params:
        raise StarElasticError(f"{source}: manifest records {manifest['parent']['params']:,} parent parameters, "
                               f"config.json describes {params:,} (manifest and weights do not match)")
    for b in manifest["budgets"]:
        try:
            spec = ElasticSpec.from_dict(b["spec"])
            n = spec.num_parameters(cfg)  # validates the spec against the config
        except StarElasticError as e:
            raise StarElasticError(f"{source}: budget {b['name']!r} does not fit config.json ({e})") from None
        if n != b["params"]:
            raise StarElasticError(f"{source}: budget {b['name']!r} records {b['params']:,} parameters, its spec "
                                   f"has {n:,} on this config (manifest and weights do not match)")


def check_cheap(path, manifest: dict, cfg: ModelConfig) -> None:
    """The checks every load runs: files (sizes, listing) and budgets against the config."""
    path = Path(path)
    check_files(path, manifest)
    check_budgets(manifest, cfg, path / "manifest.json")


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
    if not path.is_dir():
        raise StarElasticError(f"{path}: not a star-elastic checkpoint (not a directory)")
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    model = load(path, dtype=dtype, device=device)  # runs check_cheap before reading tensors
    r, router_file = manifest["router"], path / ROUTER_FILE
    try:
        config = RouterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["config"].items()})
        router = Router(model.config, [Budget(**b) for b in r["budgets"]], config, layer_order=r["layer_order"])
    except (TypeError, ValueError, KeyError) as e:
        raise StarElasticError(f"{path / 'manifest.json'}: malformed router settings ({e})") from None
    safetensors_header(router_file)
    try:
        router.load_state_dict(load_file(str(router_file)))
    except Exception as e:
        raise StarElasticError(f"{router_file}: cannot load router ({str(e).splitlines()[0]})") from None
    return ElasticCheckpoint(model, router.to(model.lm_head.weight.device).eval(), manifest, load_tokenizer(path))
