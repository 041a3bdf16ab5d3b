"""`star-elastic inspect CKPT`: what every budget of an elastic checkpoint keeps, and what one
checkpoint saves over separate models.

It reads the manifest, config.json and the safetensors headers (every cheap check `load` runs,
names and shapes included) but no tensor data, except the importance scores for their map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


# Per-layer axes shown, in order: (key in ElasticSpec.sizes, label)
AXES = [("num_attention_heads", "attention heads"), ("num_key_value_heads", "KV heads"),
        ("mamba_num_heads", "Mamba heads"), ("mamba_head_dim", "Mamba head dim"),
        ("n_routed_experts", "experts"), ("moe_intermediate_size", "expert FFN width"),
        ("moe_shared_expert_intermediate_size", "shared-expert FFN width"), ("intermediate_size", "FFN width")]
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def budget_layers(spec, cfg) -> list[dict]:
    """Per parent layer: index, type, kept or not, and every size it has with its fraction of the parent's."""
    sizes, kept = spec.sizes(cfg), set(spec.kept_layers(cfg))
    out = []
    for i, s in enumerate(sizes):
        p = cfg.layer(i)
        out.append({"layer": i, "type": cfg.layer_types[i], "keep": i in kept,
                    **{k: v for k, v in s.items()},
                    "fractions": {k: (v / getattr(p, k) if i in kept else 0.0) for k, v in s.items()}})
    return out


def describe_layer(entry: dict, cfg) -> str:
    """One line of a layer's kept sizes against the parent's."""
    if not entry["keep"]:
        return "dropped"
    p, parts = cfg.layer(entry["layer"]), []
    if "num_attention_heads" in entry:
        parts.append(f"attention {entry['num_attention_heads']}/{p.num_attention_heads} heads "
                     f"({entry['num_key_value_heads']}/{p.num_key_value_heads} KV)")
    if "mamba_num_heads" in entry:
        parts.append(f"Mamba {entry['mamba_num_heads']}/{p.mamba_num_heads} heads "
                     f"({entry['mamba_num_heads'] // p.n_groups}/{p.mamba_num_heads // p.n_groups} per group x "
                     f"{p.n_groups}), head dim {entry['mamba_head_dim']}/{p.mamba_head_dim}")
    if "n_routed_experts" in entry:
        parts.append(f"MoE {entry['n_routed_experts']}/{p.n_routed_experts} experts, expert FFN "
                     f"{entry['moe_intermediate_size']}/{p.moe_intermediate_size}, shared "
                     f"{entry['moe_shared_expert_intermediate_size']}/{p.moe_shared_expert_intermediate_size}")
    if "intermediate_size" in entry:
        parts.append(f"FFN {entry['intermediate_size']}/{p.intermediate_size}")
    return "; ".join(parts)


def layer_runs(layers: list[dict], cfg) -> list[tuple[int, int, str, str]]:
    """Consecutive layers with the same type and sizes, collapsed: (first, last, types, description)."""
    runs = []
    for e in layers:
        text = describe_layer(e, cfg)
        if runs and runs[-1][3] == text and (cfg.family == "llama" or runs[-1][2][-1] == e["type"]):
            first, _, types, _ = runs[-1]
            runs[-1] = (first, e["layer"], types + e["type"], text)
        else:
            runs.append((e["layer"], e["layer"], e["type"], text))
    return runs


def storage(path: Path, manifest: dict) -> dict:
    """Bytes of this checkpoint's files against the sum of every budget saved as its own model in the
    parent's stored dtype (what separate checkpoints would take)."""
    from .hf import safetensors_header

    sizes = {name: (path / name).stat().st_size for name in manifest["files"]}
    counts: dict[str, int] = {}
    for name in manifest["files"]:
        if name.startswith("model"):
            for v in safetensors_header(path / name).values():
                counts[v["dtype"]] = counts.get(v["dtype"], 0) + int(np.prod(v["shape"], dtype=np.int64))
    dtype = max(counts, key=counts.get) if counts else "F32"
    per_param = DTYPE_BYTES.get(dtype, 4)
    separate = {b["name"]: b["params"] * per_param for b in manifest["budgets"]}
    total = sum(sizes.values())
    return {"files": sizes, "checkpoint_bytes": total, "stored_dtype": dtype,
            "separate_models_bytes": separate, "separate_total_bytes": sum(separate.values()),
            "saved_bytes": sum(separate.values()) - total,
            "saved_fraction": 1 - total / sum(separate.values()) if separate else 0.0}


def load_sorted_scores(path: Path, cfg) -> tuple[dict | None, str]:
    """(scores, note): the checkpoint's importance scores, or None with the reason."""
    from .elastic.checkpoint import IMPORTANCE_FILE
    from .elastic.importance import check_scores, load_scores
    from .hf import safetensors_header
    from .model import Model

    f = path / IMPORTANCE_FILE
    if not f.is_file():
        return None, (f"no {IMPORTANCE_FILE} (a checkpoint from before star-elastic stored its scores): "
                      "importance map skipped")
    safetensors_header(f)
    scores = load_scores(f)
    with torch.device("meta"):
        check_scores(scores, Model(cfg))
    return scores, f"importance scores from {IMPORTANCE_FILE} ({scores.get('meta', {}).get('method', 'activation')})"


def inspect_checkpoint(path, verify: bool = False) -> dict:
    """Everything `inspect` reports, as a dict (also what inspect.json holds)."""
    from .elastic.checkpoint import read_manifest, verify_files
    from .elastic.cost import CostModel, MemorySettings
    from .elastic.spec import ElasticSpec
    from .hf import check_checkpoint

    path = Path(path)
    manifest = read_manifest(path)
    _, cfg = check_checkpoint(path)  # config, manifest and tensor headers agree; no data read
    if verify:
        verify_files(path, manifest, progress=True)
    settings = manifest.get("memory_settings")
    cost = CostModel(cfg, MemorySettings(**settings) if settings else None)
    budgets = {}
    for b in manifest["budgets"]:
        spec = ElasticSpec.from_dict(b["spec"])
        budgets[b["name"]] = {"kind": b.get("kind"), "target": b.get("target"), "params": b["params"],
                              "active_params": b["active_params"], "memory_bytes": b["memory_bytes"],
                              "fraction_of_parent": {"params": b["params"] / cost.full("params"),
                                                     "active_params": b["active_params"] / cost.full("active"),
                                                     "memory_bytes": b["memory_bytes"] / cost.full("memory")},
                              "hidden_size": spec.hidden_size or cfg.hidden_size,
                              "layers_kept": len(spec.kept_layers(cfg)), "layers": budget_layers(spec, cfg)}
    scores, note = load_sorted_scores(path, cfg)
    return {"checkpoint": str(path), "family": cfg.family, "layer_types": cfg.layer_types,
            "parent": {"params": int(cost.full("params")), "active_params": int(cost.full("active")),
                       "memory_bytes": int(cost.full("memory")), "hidden_size": cfg.hidden_size,
                       "layers": cfg.num_layers},
            "memory_settings": settings, "budgets": budgets, "storage": storage(path, manifest),
            "importance": note, "_scores": scores, "_cfg": cfg, "_manifest": manifest}


def _mib(n) -> str:
    return f"{n / 2**20:,.2f} MiB"


def format_report(info: dict) -> str:
    cfg, p = info["_cfg"], info["parent"]
    lines = [f"{info['checkpoint']}: {cfg.family}, {p['layers']} layers {cfg.layer_types if cfg.family != 'llama' else ''}"
             .rstrip() + f", hidden {p['hidden_size']}; parent {p['params']:,} parameters, {p['active_params']:,} "
             f"active, {_mib(p['memory_bytes'])} memory ({info['memory_settings']})"]
    for name, b in info["budgets"].items():
        fr = b["fraction_of_parent"]
        lines.append(f"\nbudget {name}: {b['params']:,} parameters ({fr['params']:.1%}), {b['active_params']:,} active "
                     f"({fr['active_params']:.1%}), memory {_mib(b['memory_bytes'])} ({fr['memory_bytes']:.1%}); "
                     f"hidden {b['hidden_size']}/{p['hidden_size']}, {b['layers_kept']}/{p['layers']} layers kept")
        for first, last, types, text in layer_runs(b["layers"], cfg):
            where = f"layer {first}" if first == last else f"layers {first}-{last}"
            lines.append(f"  {where:>13} {types if len(types) <= 12 else types[:11] + '…':<12} {text}")
    st = info["storage"]
    lines.append(f"\nstorage: this checkpoint {_mib(st['checkpoint_bytes'])} (all {len(st['files'])} weight files) vs "
                 f"{_mib(st['separate_total_bytes'])} for {len(st['separate_models_bytes'])} separate models in "
                 f"{st['stored_dtype']} ({' + '.join(_mib(v) for v in st['separate_models_bytes'].values())}): "
                 f"{_mib(st['saved_bytes'])} saved ({st['saved_fraction']:.1%})")
    lines.append(f"importance: {info['importance']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- maps

def architecture_grids(info: dict) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """(row labels, column labels, axis label -> budgets x layers kept fraction) for plots.architecture_map."""
    cfg = info["_cfg"]
    names = list(info["budgets"])
    rows = [f"{n} (hidden {info['budgets'][n]['hidden_size']})" for n in names]
    columns = [f"{i}{t}" for i, t in enumerate(cfg.layer_types)]
    grids = {"layer kept": np.array([[1.0 if e["keep"] else 0.0 for e in info["budgets"][n]["layers"]] for n in names])}
    hidden = np.array([[info["budgets"][n]["hidden_size"] / cfg.hidden_size] * cfg.num_layers for n in names])
    if (hidden < 1).any():  # one size for the whole model, drawn per layer like the other axes
        grids["hidden channels (whole model)"] = hidden * grids["layer kept"]
    for key, label in AXES:
        grid = np.full((len(names), cfg.num_layers), np.nan)
        for r, n in enumerate(names):
            for e in info["budgets"][n]["layers"]:
                if key in e["fractions"]:
                    grid[r, e["layer"]] = e["fractions"][key]
        if np.isfinite(grid).any() and not (grid[np.isfinite(grid)] == 1).all():  # axes no budget cuts: left out
            grids[label] = grid
    if (grids["layer kept"] == 1).all() and len(grids) > 1:
        del grids["layer kept"]
    return rows, columns, grids


SCORE_PANELS = [("hidden", "hidden channels"), ("attn_heads", "attention heads"), ("mamba_heads", "Mamba heads"),
                ("mamba_channels", "Mamba head channels"), ("ffn", "FFN neurons"), ("experts", "experts (REAP)"),
                ("expert_ffn", "expert FFN neurons (mean over experts)"), ("shared_ffn", "shared-expert FFN neurons")]


def importance_panels(info: dict) -> dict:
    """axis label -> (row labels, scores (rows, units), {budget: kept mask (rows, units)})."""
    scores, cfg, manifest = info["_scores"], info["_cfg"], info["_manifest"]
    from .elastic.spec import ElasticSpec

    masks = {b["name"]: (ElasticSpec.from_dict(b["spec"]), ElasticSpec.from_dict(b["spec"]).masks(cfg))
             for b in manifest["budgets"]}
    panels = {}
    for axis, label in SCORE_PANELS:
        keys = ["hidden"] if axis == "hidden" else [f"layers.{i}.{axis}" for i in range(cfg.num_layers)
                                                    if f"layers.{i}.{axis}" in scores]
        if not keys:
            continue
        rows = [s.float().mean(0) if s.dim() == 2 else s.float() for s in (scores[k] for k in keys)]
        width = max(len(r) for r in rows)
        grid = np.full((len(rows), width), np.nan)
        for r, s in enumerate(rows):
            grid[r, : len(s)] = s.numpy()
        kept = {}
        for name, (spec, m) in masks.items():
            mask = np.zeros((len(rows), width), dtype=bool)
            dropped = set(range(cfg.num_layers)) - set(spec.kept_layers(cfg))
            for r, k in enumerate(keys):
                layer = None if k == "hidden" else int(k.split(".")[1])
                if layer in dropped:
                    continue
                mask[r, : len(rows[r])] = m[k].bool().numpy() if k in m else True
            kept[name] = mask
        labels = ["all"] if axis == "hidden" else [f"{k.split('.')[1]}{cfg.layer_types[int(k.split('.')[1])]}"
                                                    for k in keys]
        panels[label] = (labels, grid, kept)
    return panels


def write_inspection(info: dict, out) -> list[str]:
    """`inspect CKPT --out DIR`'s files for `inspect_checkpoint`'s `info`: architecture.png (the
    fraction of the parent's units each budget keeps, per layer), importance.png when the checkpoint
    holds scores, and inspect.json (the report). `out` is written through a temporary sibling and
    renamed into place: it appears complete or not at all (an existing `out` is replaced: the
    command line refuses that without --force). Returns the names written."""
    from .hf import staging
    from .plots import architecture_map, importance_map

    name = Path(info["checkpoint"]).resolve().name
    with staging(Path(out)) as tmp:
        rows, columns, grids = architecture_grids(info)
        architecture_map(rows, columns, grids, tmp / "architecture.png",
                         title=f"{name}: fraction of the parent's units each budget keeps, per layer")
        written = ["architecture.png"]
        if info["_scores"] is not None:
            importance_map(importance_panels(info), tmp / "importance.png",
                           title=f"{name}: importance scores in the checkpoint's (sorted) order")
            written.append("importance.png")
        public = {k: v for k, v in info.items() if not k.startswith("_")}
        (tmp / "inspect.json").write_text(json.dumps(public, indent=2) + "\n")
        written.append("inspect.json")
    return written
