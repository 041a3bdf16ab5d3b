"""The elastic trainer's resumable state: what `ElasticTrainer.save_state` writes and `load_state`
reads, so that a run stopped anywhere goes on exactly where it was (the same batches, budgets and
router noise).

Unsharded runs write weights and AdamW moments as safetensors from rank 0; sharded (FSDP2) runs write
the student's through torch.distributed.checkpoint, every rank its own shards, and the small
replicated pieces (router, its moments, counters, RNG states, config) as safetensors and JSON from
rank 0. Either format loads under either sharding and any number of ranks. Everything is written into
a temporary directory and renamed into place when complete. Every function takes the trainer, `t`
(train.py's `ElasticTrainer`, which calls them: no import back from here).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import parallel
from .elastic.delta import Restored
from .errors import StarElasticError

# The full anchor's own text, saved with the state: text sampled from the parent on CUDA differs from
# process to process (docs/RESULTS.md §9), so a resumed run reads the interrupted one's rows, not a new sample
ANCHOR_FILE = "anchor_rows.safetensors"


def save(t):
    """Write `t.state_path()` (every rank calls it: sharded, each writes its own shards)."""
    if t.shard == "fsdp":
        _save_sharded(t)
    else:
        _save_gathered(t)
    if t.world > 1:  # no rank reads the state before it is complete
        dist.barrier()


def _save_gathered(t):
    keep = t.rank == 0

    def whole(v):  # every rank gathers a shard (a collective); rank 0 keeps it on the host
        v = parallel.full_tensor(v.detach())
        return v.contiguous().cpu() if keep else None

    weights = parallel.full_state_dict(t.model)  # rank 0 keeps them, on the host; the others get {}
    if t.model.config.tied:
        weights.pop("lm_head.weight", None)
    opt_tensors, opt_meta = {}, {"groups": [], "state": {}}
    state = t.opt.state_dict()
    for idx, s in state["state"].items():
        opt_meta["state"][str(idx)] = {}
        for k, v in s.items():
            if torch.is_tensor(v):
                opt_tensors[f"{idx}.{k}"] = whole(v)
            else:
                opt_meta["state"][str(idx)][k] = v
    opt_meta["groups"] = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    if keep:
        _write_state(t, weights, opt_tensors, opt_meta)


def _meta(t, optimizer: dict) -> dict:
    anchor = {} if t.anchor_batches is None else {"anchor_data": t.anchor_batches.state_dict()}
    return {"step": t.step, "optimizer": optimizer, "data": t.batches.state_dict(), **anchor,
            "sampler": t.sampler.get_state().tolist(), "gumbel": t.gumbel.get_state().tolist(),
            "config": _jsonable(asdict(t.cfg)), "budgets": [b.name for b in t.budgets],
            "restored": None if t.restored is None else asdict(t.restored),
            "arch_steps": [[[list(map(list, arch)), steps] for arch, steps in per_budget.items()]
                           for per_budget in t.arch_steps]}


def _write_state(t, weights: dict, opt_tensors: dict, opt_meta: dict):
    from .hf import staging

    with staging(t.state_path()) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        if t.router is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in t.router.state_dict().items()},
                      str(tmp / "router.safetensors"))
        if t.delta is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in t.delta.state_dict().items()},
                      str(tmp / "full_delta.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_anchor(t, tmp)
        (tmp / "state.json").write_text(json.dumps(_meta(t, opt_meta)))


def _write_anchor(t, tmp: Path):
    if t.anchor_batches is not None:
        save_file({"rows": t.anchor_batches.rows.contiguous().cpu()}, str(tmp / ANCHOR_FILE))


def saved_anchor_rows(out_dir) -> torch.Tensor | None:
    """The anchor text that a resumable state in `out_dir` (the trainer's) trained on, or None: a run that
    will resume passes these rows instead of sampling again (minutes at Nano, and other text)."""
    path = Path(out_dir) / "train_state"
    if not ((path / "state.json").exists() and (path / ANCHOR_FILE).exists()):
        return None
    return load_file(str(path / ANCHOR_FILE))["rows"]


def _trained(t) -> torch.nn.Module:
    """The student, the router and the full budget's delta as one module: DCP's state-dict helpers name the
    optimiser's parameters after a module that holds them all, the router's and the delta's groups included."""
    modules = {"model": t.model, "router": t.router, "delta": t.delta}
    return torch.nn.ModuleDict({k: m for k, m in modules.items() if m is not None})


def _save_sharded(t):
    from contextlib import nullcontext

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .hf import staging

    fresh = not t.opt.state  # before the first step: get_state_dict would fill it by a zero-lr step
    weights, optim = get_state_dict(_trained(t), t.opt)  # this rank's shards, keyed by name
    if fresh:  # keep it empty (AdamW's first step counts from 0), and save no moments
        t.opt.state.clear()
        optim["state"] = {}
    model_w, router_w, delta_w = _by_owner(weights)
    model_s, router_s, delta_s = _by_owner(optim["state"])
    # every rank writes into rank 0's temporary directory; rank 0 renames it once all have written
    with staging(t.state_path()) if t.rank == 0 else nullcontext() as tmp:
        name = [str(tmp) if tmp else None]
        dist.broadcast_object_list(name, src=0)
        # returns on every rank only once all shards are written (and, on failure, raises on every rank)
        dcp.save({"model": model_w, "optimizer": model_s}, checkpoint_id=Path(name[0]) / "dcp")
        if t.rank == 0:
            if t.router is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in router_w.items()},
                          str(tmp / "router.safetensors"))
            # the replicated pieces' moments (the router's; the delta's, whole on every rank too) from rank 0
            scalars, delta_scalars = _write_moments(router_s, tmp / "router_optimizer.safetensors"), {}
            if t.delta is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in delta_w.items()},
                          str(tmp / "full_delta.safetensors"))
                delta_scalars = _write_moments(delta_s, tmp / "full_delta_optimizer.safetensors")
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]
            meta = _meta(t, {"groups": groups, "state": scalars, "delta_state": delta_scalars})
            _write_anchor(t, tmp)
            meta.update(format="dcp", ranks=t.world)
            (tmp / "state.json").write_text(json.dumps(meta))


def load(t) -> bool:
    """Resume from `out_dir/train_state` if it exists; True when resumed. Either format loads
    under either sharding: a sharded (`dcp/`) state is resharded by DCP to this run's ranks, a
    gathered one (unsharded runs, and sharded ones before DCP) is copied whole into the shards."""
    path = t.state_path()
    if not (path / "state.json").exists():
        return False
    meta = json.loads((path / "state.json").read_text())
    if meta["budgets"] != [b.name for b in t.budgets]:
        raise StarElasticError(f"{path}: checkpoint was trained for budgets {meta['budgets']}, "
                               f"not {[b.name for b in t.budgets]}")
    delta = (path / "full_delta.safetensors").exists()
    if (t.delta is None) == delta:  # either format: a sharded run ignoring a delta would resume without it
        raise StarElasticError(f"{path}: the state was written by a run {'with' if delta else 'without'} a full delta "
                               "of its own, and this run differs (full_delta_rank)")
    if delta:  # the delta's ranks as saved (a restore may have given them out layer by layer), before any loading
        with safe_open(str(path / "full_delta.safetensors"), "pt") as f:
            t.delta.resize_like({k: f.get_slice(k).get_shape() for k in f.keys()})
        t.delta_to_optimizer()
    if meta.get("format") == "dcp":
        _load_sharded(t, path, meta)
    else:
        _load_gathered(t, path, meta)
    t.batches.load_state_dict(meta["data"])
    if (t.anchor_batches is None) != ("anchor_data" not in meta):
        had = "with" if "anchor_data" in meta else "without"
        raise StarElasticError(f"{path}: the state was written by a run {had} anchor text of its own, and this run "
                               "differs (--anchor-data)")
    if t.anchor_batches is not None:
        rows = saved_anchor_rows(t.out)  # None: a state from before it was saved resumes on this run's rows
        if rows is not None:
            if rows.shape != t.anchor_batches.rows.shape:
                raise StarElasticError(f"{path}: the state's anchor text is {tuple(rows.shape)} rows x tokens, this "
                                       f"run's {tuple(t.anchor_batches.rows.shape)} (--anchor-data, --seq-len)")
            t.anchor_batches.rows = rows
        t.anchor_batches.load_state_dict(meta["anchor_data"])
    t.sampler.set_state(torch.tensor(meta["sampler"], dtype=torch.uint8))
    t.gumbel.set_state(torch.tensor(meta["gumbel"], dtype=torch.uint8))
    t.step = meta["step"]
    t.restored = Restored.from_state(meta)  # what the restore covered (TrainConfig.full_delta_restore), if it ran
    t.arch_steps = [{tuple((n, int(k)) for n, k in arch): steps for arch, steps in per_budget}
                       for per_budget in meta.get("arch_steps", [[] for _ in t.budgets])]
    return True


def _load_gathered(t, path: Path, meta: dict):
    weights = load_file(str(path / "model.safetensors"))
    if t.model.config.tied:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    parallel.load_full_state_dict(t.model, weights)  # sharded: each rank copies in its own shards
    if t.router is not None:
        t.router.load_state_dict(load_file(str(path / "router.safetensors")))
    if t.delta is not None:  # load() checked that the state has one
        t.delta.load_state_dict(load_file(str(path / "full_delta.safetensors")))
    tensors = load_file(str(path / "optimizer.safetensors"))
    params = [p for g in t.opt.param_groups for p in g["params"]]  # the state's indices
    state = {}
    for idx, scalars in meta["optimizer"]["state"].items():
        s = dict(scalars)
        for k, v in tensors.items():
            i, _, name = k.partition(".")
            if i == idx:  # moments placed like their parameter (this rank's shard when sharded)
                s[name] = parallel.shard_like(v, params[int(idx)]) if v.dim() > 0 else v  # steps: 0-d
        state[int(idx)] = s
    t.opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["groups"]})


def _load_sharded(t, path: Path, meta: dict):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    trained = _trained(t)
    weights, optim = get_state_dict(trained, t.opt)  # placed as this run holds them: DCP reshards into it
    if len(optim["param_groups"]) != len(meta["optimizer"]["groups"]):
        raise StarElasticError(f"{path}: the state has {len(meta['optimizer']['groups'])} optimiser groups, "
                               f"this run {len(optim['param_groups'])} (a router in one run, not the other)")
    saved = dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
    model_w = _by_owner(weights)[0]
    for k, v in model_w.items():
        have = saved.get(f"model.{k}")
        if have is None or tuple(have.size) != tuple(v.shape):
            there = "absent" if have is None else tuple(have.size)
            raise StarElasticError(f"{path}: the state was written for another model "
                                   f"({k}: {there} there, {tuple(v.shape)} here)")
    # moments only of the parameters that had them (one never given a gradient has none, as unsaved)
    with_state = {k[len("optimizer."):].rpartition(".")[0] for k in saved if k.startswith("optimizer.")}
    model_s = {k: s for k, s in _by_owner(optim["state"])[0].items() if k in with_state}
    with warnings.catch_warnings():  # in one process DCP warns that it reads without torch.distributed: meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_w, "optimizer": model_s}, checkpoint_id=path / "dcp")
    if t.router is not None:  # strict, as unsharded
        t.router.load_state_dict(load_file(str(path / "router.safetensors")))
    if t.delta is not None:  # load() checked that the state has one
        t.delta.load_state_dict(load_file(str(path / "full_delta.safetensors")))
    state = {f"model.{k}": s for k, s in model_s.items()}
    state.update(_read_moments("router", meta["optimizer"]["state"], path / "router_optimizer.safetensors"))
    if t.delta is not None and meta["optimizer"].get("delta_state"):
        state.update(_read_moments("delta", meta["optimizer"]["delta_state"], path / "full_delta_optimizer.safetensors"))
    for group, hyper in zip(optim["param_groups"], meta["optimizer"]["groups"]):
        group.update(hyper)  # the saved hyperparameters; "params" stays this run's names
    # not strict: the router is loaded above, and a parameter without saved moments starts
    # without any, as it would have run on
    set_state_dict(trained, t.opt, model_state_dict={f"model.{k}": v for k, v in model_w.items()},
                   optim_state_dict={"state": state, "param_groups": optim["param_groups"]},
                   options=StateDictOptions(strict=False))


def size(t) -> int:
    """About what `save_state` writes, all ranks together: the student's and the router's weights
    and their optimiser moments. Sharded, each rank writes its own shards; replicated, rank 0
    writes what every rank holds."""
    tensors = [p.detach() for p in t.model.parameters()]
    tensors += [p.detach() for p in t.router.parameters()] if t.router is not None else []
    tensors += [v for s in t.opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    local = sum(parallel.local(t).numel() * t.element_size() for t in tensors)
    if t.shard == "fsdp" and t.world > 1:
        total = torch.tensor([local], dtype=torch.float64, device=t.device)
        dist.all_reduce(total)
        return int(total.item())
    return local


def room_for(t) -> bool:
    """Whether the disk under `out` holds the final resumable state, on every rank. A 10B parent's is
    120 GB (fp32 weights and two AdamW moments), more than the disk of a 2-GPU machine left over
    (first 2-GPU run, 2026-12-01): then the state is skipped with a warning, and the run goes on to
    evaluate and write its checkpoint; a crash after this point means training again."""
    need = size(t)
    where = t.out
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    ok = free >= need * 1.05 + 2 ** 30
    if t.world > 1:
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=t.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok and t.rank == 0:
        print(f"star_elastic: not saving the resumable training state: it needs {need / 1e9:.1f} GB and "
              f"{where} has {free / 1e9:.1f} GB free; a crash from here on means training again",
              file=sys.stderr, flush=True)
    return ok


def _by_owner(d: dict) -> tuple[dict, dict, dict]:
    """A state dict of `_trained()` split into the student's, the router's and the delta's, without the prefixes."""
    return tuple({k[len(owner) + 1:]: v for k, v in d.items() if k.startswith(owner + ".")}
                 for owner in ("model", "router", "delta"))


def _write_moments(state: dict, path: Path) -> dict:
    """A replicated piece's optimiser state ({fqn: {moment: value}}): its tensors into `path` as safetensors
    (`<fqn>.<moment>`), its scalars returned for state.json."""
    tensors, scalars = {}, {}
    for fqn, s in state.items():
        scalars[fqn] = {k: v for k, v in s.items() if not torch.is_tensor(v)}
        tensors.update({f"{fqn}.{k}": v.detach().contiguous().cpu() for k, v in s.items() if torch.is_tensor(v)})
    save_file(tensors, str(path))
    return scalars


def _read_moments(owner: str, scalars: dict, path: Path) -> dict:
    """`_write_moments`' state back, keyed as `_trained()` names it (`<owner>.<fqn>`)."""
    state = {f"{owner}.{fqn}": dict(s) for fqn, s in scalars.items()}
    for k, v in load_file(str(path)).items():
        fqn, _, name = k.rpartition(".")
        state[f"{owner}.{fqn}"][name] = v
    return state


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
