"""One elastic checkpoint holding every budget (docs/METHOD.md §10).

    CKPT/
      config.json, model*.safetensors   the importance-sorted parent, a stock Hugging Face
                                        checkpoint (transformers loads it as the full model): one
                                        model.safetensors, or shards and model.safetensors.index.json
      router.safetensors                the budget router's weights
      importance.safetensors            the importance scores the parent was sorted by, in the sorted
                                        order (unit j of every axis is the parent's unit j); optional
      parent_order.safetensors          the order the parent was sorted in: per axis, the parent's unit at
                                        each sorted position (`sorted_parent` sorts the parent's own
                                        checkpoint the same way); optional
      full_delta.safetensors            with `elastify --full-delta-rank`: the full budget's own low-rank
                                        delta (delta.py). The weights above are then the full budget
                                        merged (W + B A), and every smaller budget is a prefix of W =
                                        weights - B A, which loading and the streaming slicer compute;
                                        with `--full-keeps-held` the weights hold the full budget's own
                                        embeddings / norms and this file the smaller budgets' (.shared)
      manifest.json                     every trained budget by name: its resolved architecture
                                        (spec + per-layer sizes), total / active parameters and
                                        memory; the router's settings; a sha256 and the size in bytes
                                        of every .safetensors file
      tokenizer files

Damage is caught in two tiers (the checks live in manifest.py, below hf.py; re-exported here). Cheap
checks run on every load (`check_cheap`, called from `hf.load`):
the manifest is well formed, every file it lists is there with its recorded size, every weight file
that will be read is listed, the budgets fit the config; `hf.read_safetensors` checks each file's
length against its header. The full sha256 of every file runs on request (`verify_files`, used by
`load_elastic(verify=True)` and `star-elastic validate`).

Storage is the parent's, not the sum of the budgets': each budget is a prefix of the parent (of W, with
a full delta: then plus r(in + out) parameters a linear layer).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .. import parallel
from ..errors import StarElasticError
from ..hf import SHARD_BYTES, load, load_tokenizer, read_config, safetensors_header, save_pretrained, staging
from ..model import Model
from .cost import Arch, Budget, CostModel, MemorySettings, parse_budget
from .delta import FullDelta, save_delta
from .importance import save_scores
from .manifest import (DELTA_FILE, FORMAT, INDEX_FILE, ROUTER_FILE, VERSION, check_budgets, check_cheap,  # noqa: F401 (re-exported)
                       check_files, has_manifest, read_manifest, sha256, verify_files)
from .router import Router, RouterConfig, interpolate_budget
from .spec import ElasticSpec

IMPORTANCE_FILE = "importance.safetensors"
PARENT_ORDER_FILE = "parent_order.safetensors"


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
                 memory: MemorySettings | None = None, extra: dict | None = None,
                 scores: dict | None = None, specs: list[ElasticSpec] | None = None,
                 projections: list | None = None, max_shard_bytes: int = SHARD_BYTES,
                 record: dict | None = None, dtype: torch.dtype | None = None,
                 delta: FullDelta | None = None, order: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the elastic checkpoint of a trained (sorted) parent and router, atomically. `scores`:
    the importance scores in the parent's (sorted) unit order, kept for `star-elastic inspect`; `order`: the
    permutations the parent was sorted by (`sort_model`'s), kept so that the parent's own checkpoint can be
    sorted the same way (`sorted_parent`: what training moved, weight by weight).
    `specs`: each budget's architecture (default: the router's argmax); `projections`: how each was
    fixed after training (`router.Projection`), recorded per budget. `max_shard_bytes`: the largest
    weight file (larger parents are written in shards, with their index).

    A parent sharded by FSDP2 is never whole on any rank: every rank calls this, the weights are
    gathered tensor by tensor and rank 0 alone writes the files (`hf.save_pretrained`). `record`: a
    dict (e.g. one inside `extra`) that is given, before the manifest is written, how the weights
    were written and the most bytes of them held at once. `dtype`: the floating-point dtype to write
    the weights in (`hf.save_pretrained`; None: as the model holds them). `delta`: the full budget's
    own (delta.py): the weights are written merged (W + B A) and A, B beside them (`DELTA_FILE`)."""
    sharded = parallel.is_sharded(model)
    if not sharded:
        return _write_elastic(model, router, budgets, Path(out), tokenizer, memory, extra, scores, specs,
                              projections, max_shard_bytes, record, dtype=dtype, delta=delta, order=order)
    error, written = None, {}
    try:
        # the smaller budgets' values of what the full budget keeps its own of: gathered by every rank, before
        # rank 0 writes them (a gather is a collective); each rank merges B A into its own shards
        parallel.reshard(model)  # the root as shards again (gathered after a forward, freed by a later gather)
        shared = delta.shared_tensors(model) if delta is not None and delta.rest else None
        if dist.get_rank() == 0:
            _write_elastic(model, router, budgets, Path(out), tokenizer, memory, extra, scores, specs,
                           projections, max_shard_bytes, record, written, dtype=dtype, delta=delta, shared=shared,
                           order=order)
        else:  # take part in the gathers; rank 0 writes
            with delta.merged(model) if delta is not None else nullcontext():
                save_pretrained(model, out, max_shard_bytes=max_shard_bytes, dtype=dtype)
    except Exception as e:
        error = e
        if dist.get_rank() == 0 and not written.get("told_ranks"):  # failed before the weights' writer
            parallel.all_ok(False, next(model.parameters()))  # began: the others wait to hear it
    # rank 0 may fail after the gathers (router, manifest): then no rank returns as if it were written
    ok = parallel.all_ok(error is None, next(model.parameters()))
    if error is not None:
        raise error
    if not ok:
        raise StarElasticError(f"{out}: the elastic checkpoint was not written: rank 0 failed (see its error)")
    return Path(out)


def _write_elastic(model, router, budgets, out: Path, tokenizer, memory, extra, scores, specs, projections,
                   max_shard_bytes, record, written: dict | None = None, dtype: torch.dtype | None = None,
                   delta: FullDelta | None = None, shared: dict | None = None,
                   order: dict[str, torch.Tensor] | None = None) -> Path:
    router.eval()
    cost = CostModel(model.config, memory)
    specs = specs if specs is not None else [router.spec(i) for i in range(len(budgets))]
    entries = [budget_entry(b, s, model.config, cost) for b, s in zip(budgets, specs)]
    for entry, proj in zip(entries, projections or []):
        entry["projection"] = proj.to_dict()
    written = {} if written is None else written
    with staging(out) as tmp:
        with delta.merged(model) if delta is not None else nullcontext():  # the full budget as transformers loads it
            save_pretrained(model, tmp / "parent", tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
                            stats=written, dtype=dtype)
        if delta is not None:
            save_delta(delta, tmp / DELTA_FILE, dtype=dtype, model=model, shared=shared)  # outside `merged`
        for f in (tmp / "parent").iterdir():  # flatten: the checkpoint directory is the HF directory
            f.rename(tmp / f.name)
        (tmp / "parent").rmdir()
        if record is not None:
            record["checkpoint_write"] = ("gathered tensor by tensor on rank 0" if parallel.is_sharded(model)
                                          else "from the whole model")
            record["checkpoint_write_peak_bytes"] = written["peak_bytes"]
        save_file({k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()},
                  str(tmp / ROUTER_FILE), metadata={"format": FORMAT})
        if scores is not None:
            save_scores(scores, tmp / IMPORTANCE_FILE)
        if order is not None:
            save_file({k: torch.as_tensor(v).long().contiguous().cpu() for k, v in order.items()},
                      str(tmp / PARENT_ORDER_FILE), metadata={"format": "pt", "star_elastic": "parent-order"})
        # every .safetensors file (each shard of a sharded parent) and the shards' index, by sha256 and size
        weights = sorted(p.name for p in tmp.glob("*.safetensors")) + \
            ([INDEX_FILE] if (tmp / INDEX_FILE).exists() else [])
        manifest = {
            "format": FORMAT, "version": VERSION, "family": model.config.family,
            "parent": {"params": model.num_parameters(), "active_params": int(cost.full("active")),
                       "memory_bytes": int(cost.full("memory"))},
            "memory_settings": asdict(cost.memory_settings),
            "budgets": entries,
            **({"full_delta": {"file": DELTA_FILE, "rank": delta.rank,
                               # a restore that gave the rank's parameters out layer by layer: each layer's own
                               **({"ranks": delta.ranks()} if len(set(delta.ranks().values())) > 1 else {}),
                               "linear_layers": len(delta.names),
                               "expert_tensors": len(delta.experts),
                               "params": sum(p.numel() for p in delta.parameters()),
                               # the rest past rank r rounded (--full-delta-bits): codes packed, a scale a group
                               **({"bits": delta.bits, "rounded_layers": len(list(delta.rounded_codes.buffers())),
                                   "rounded_bytes": delta.rounded_bytes(dtype)} if delta.bits else {}),
                               "weights": f"the full budget merged: W + B A{' + R' if delta.bits else ''}; smaller "
                                          "budgets: prefixes of W",
                               **({"own": sorted(delta.rest), "own_params": sum(t.numel() for t in delta.rest.values()),
                                   "own_weights": "the full budget's values here; the smaller budgets' in the "
                                                  "delta file as <parameter>.shared"} if delta.rest else {})}}
               if delta is not None else {}),
            "router": {"config": asdict(router.config), "budgets": [asdict(b) for b in budgets],
                       "layer_order": router.layer_order},
            "files": {name: sha256(tmp / name) for name in weights},
            "sizes": {name: (tmp / name).stat().st_size for name in weights},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out


def budget_names(manifest: dict) -> list[str]:
    return [b["name"] for b in manifest["budgets"]]


def budget_spec(manifest: dict, name: str, router: Router | None = None) -> ElasticSpec:
    """The architecture of the budget called `name` (as given on the command line): a trained one,
    or, given the checkpoint's `router`, a budget between two trained ones (`interpolated_budget`)."""
    for b in manifest["budgets"]:
        if b["name"] == str(name):
            return ElasticSpec.from_dict(b["spec"])
    if router is not None:
        return interpolated_budget(manifest, router, name)[0]
    raise StarElasticError(f"budget {name!r} is not in this checkpoint (trained budgets: "
                           f"{', '.join(budget_names(manifest))})")


def resolve_budget(path, manifest: dict, name: str) -> tuple[ElasticSpec, dict | None]:
    """The spec of budget `name` of the checkpoint at `path`: a trained one (and None), or one
    between two trained ones with its record (`interpolated_budget`; only then is the router read)."""
    if str(name) in budget_names(manifest):
        return budget_spec(manifest, name), None
    spec, info = interpolated_budget(manifest, load_router(path, manifest), name)
    return spec, info if info["interpolated"] else None


def interpolated_budget(manifest: dict, router: Router, name: str) -> tuple[ElasticSpec, dict]:
    """A budget that was not trained, between two that were (e.g. 0.6 between 0.75 and 0.5): the
    router's architecture for it, nested between its trained neighbours and in its band
    (`router.interpolate_budget`; inference logits, whatever the router's mode). Returns the spec and
    a record that labels it as interpolated (a trained budget spelled otherwise, "75%" for "0.75", is
    that budget)."""
    memory = MemorySettings(**manifest["memory_settings"]) if manifest.get("memory_settings") else None
    budget = replace(parse_budget(name, router.parent, memory), name=str(name))
    trained = [(Budget(**b), ElasticSpec.from_dict(e["spec"]))
               for b, e in zip(manifest["router"]["budgets"], manifest["budgets"])]
    for (b, spec), entry in zip(trained, manifest["budgets"]):
        if b.kind == budget.kind and abs(b.target - budget.target) <= 1e-9 * b.target:
            return spec, {"name": entry["name"], "interpolated": False}
    proj = interpolate_budget(router, budget, trained, CostModel(router.parent, memory))
    spec = router.spec_of(proj.choice)
    return spec, {"name": str(name), "interpolated": True, "kind": budget.kind, "target": budget.target,
                  "projection": proj.to_dict(), "spec": spec.to_dict()}


@dataclass
class ElasticCheckpoint:
    """`model`: the sorted parent, every budget's prefix source. With a full budget's delta (`delta`, the
    checkpoint's `DELTA_FILE`) that is W, the shared weights, and the full budget is W + B A: `full_model`."""
    model: Model
    router: Router
    manifest: dict
    tokenizer: object = None
    delta: FullDelta | None = None

    def spec(self, name: str) -> ElasticSpec:
        """A trained budget's architecture, or an interpolated one's (between two trained)."""
        return budget_spec(self.manifest, name, self.router)

    def full_model(self) -> Model:
        """The full budget: `model` itself, or with a delta a copy of it with B A merged (made once)."""
        if self.delta is None:
            return self.model
        if getattr(self, "_full", None) is None:
            if self.delta.is_applied(self.model):  # a copy would carry the delta and merge it: B A twice
                raise StarElasticError("the full model is not copied from a parent that runs its delta (a server's)")
            self._full = self.delta.merge_into(copy.deepcopy(self.model))
        return self._full


def load_elastic(path, dtype=None, device=None, verify: bool = False) -> ElasticCheckpoint:
    """The sorted parent, its router and the manifest. `verify` checks every weight file's sha256."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    model = load(path, dtype=dtype, device=device)  # runs check_cheap before reading tensors
    router = load_router(path, manifest, model.config)
    delta = None
    if manifest.get("full_delta"):  # the weights are the full budget merged: W + B A; keep W
        delta = FullDelta.read(model, path / DELTA_FILE)
        delta.subtract_from(model)
    return ElasticCheckpoint(model, router.to(model.lm_head.weight.device).eval(), manifest, load_tokenizer(path),
                             delta)


def read_parent_order(path) -> dict[str, torch.Tensor]:
    """The permutations the elastic checkpoint at `path`'s parent was sorted by (`save_elastic`'s `order`)."""
    f = Path(path) / PARENT_ORDER_FILE
    if not f.is_file():
        raise StarElasticError(f"{path}: no {PARENT_ORDER_FILE} (written by elastify since the forty-first session): "
                               "the order its parent was sorted in is not recorded")
    safetensors_header(f)
    return load_file(str(f))


def sorted_parent(path, parent, dtype=None, device=None) -> Model:
    """The parent checkpoint `parent` (a directory or .gguf), sorted as the elastic checkpoint at `path` sorted it
    (`read_parent_order`): the teacher its budgets were trained from, unit for unit, so that what training moved
    is a difference of weights (the full budget's drift, benchmarks/bench_delta_forms.py). One line naming the
    problem when `parent` is not that checkpoint's parent."""
    from .sort import apply_permutations

    order = read_parent_order(path)
    ours = read_config(Path(path))[1]
    model = load(parent, dtype=dtype, device=device)
    # every field of the architecture (the full budget is the parent's exact one); the special tokens' ids
    # alone may be read otherwise from a .gguf than from the checkpoint's config.json
    fields = [f.name for f in dataclasses.fields(ours) if not f.name.endswith("_token_id")]
    differ = [f for f in fields if getattr(model.config, f) != getattr(ours, f)]
    if differ:
        raise StarElasticError(f"{parent}: not the parent of {path} (its {differ[0]} is "
                               f"{getattr(model.config, differ[0])!r}, the checkpoint's "
                               f"{getattr(ours, differ[0])!r})")
    return apply_permutations(model, order)


def load_router(path, manifest: dict | None = None, parent_cfg=None) -> Router:
    """The checkpoint's router alone (kilobytes), in eval mode on the CPU, without the model's weights:
    enough to resolve an interpolated budget before streaming its slice from disk."""
    path = Path(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    if parent_cfg is None:
        parent_cfg = read_config(path)[1]
    r, router_file = manifest["router"], path / ROUTER_FILE
    try:
        config = RouterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["config"].items()})
        router = Router(parent_cfg, [Budget(**b) for b in r["budgets"]], config, layer_order=r["layer_order"])
    except (TypeError, ValueError, KeyError) as e:
        raise StarElasticError(f"{path / 'manifest.json'}: malformed router settings ({e})") from None
    safetensors_header(router_file)
    try:
        router.load_state_dict(load_file(str(router_file)))
    except Exception as e:
        raise StarElasticError(f"{router_file}: cannot load router ({str(e).splitlines()[0]})") from None
    return router.eval()
