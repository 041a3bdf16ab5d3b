"""The whole pipeline of `star-elastic slice`: importance -> spec (chosen for a parameter target,
or given) -> sort the axes that lose units -> slice -> export one checkpoint, no training.

`zero_shot_slice(model, tokenizer, out, SliceConfig(params="0.5", data="wiki"))` cuts a loaded
parent; commands.py's `cmd_slice` checks the flags, loads the parent and calls it. A trained budget of
an elastic checkpoint needs none of this (its weights are sorted already): `slice_budget(ckpt,
"0.5", out)` (`slice CKPT --budget`) streams the budget's prefix of every tensor from disk with
`elastic.stream.stream_slice`, never loading the parent, and writes what `zero_shot_slice` would.
The helpers (`calibration_scores`, `slice_scores`, `parse_axes`, `read_spec`, `check_exportable`,
`check_multiple`, `check_budget`) are the steps, usable on their own. Errors are one-line `StarElasticError`s
naming the command-line flag that sets the value.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .data import TokenBatches, load_corpus_tokens, pack
from .elastic import ElasticSpec, export, slice_model, sort_model
from .elastic.importance import (check_scores, estimate_importance, load_scores, random_importance,
                                 weight_magnitude_importance)
from .elastic.search import (AXES, DEFAULT_AXES, applicable_axes, choose_spec, describe, format_params,
                             parse_params)
from .errors import StarElasticError
from .hf import staging

METHODS = ("activation", "magnitude", "random")


@dataclass
class SliceConfig:
    # what to cut: exactly one of a parameter target and an explicit spec
    params: str | None = None  # "0.5" (a fraction of the parent), "50%", "70M", "123456" (a count)
    spec: ElasticSpec | None = None  # slice exactly this (e.g. `read_spec(path)`)
    budget: str | None = None  # `spec` is this trained budget of an elastic checkpoint: the weights are sorted
    axes: str | tuple[str, ...] | None = None  # axes to shrink for `params` ("ffn,depth"; None: DEFAULT_AXES it has)
    multiple: int | None = None  # kept widths are multiples of it, for `params` (None: spec.aligned_multiple)
    # importance: given (a dict or a file from `save_scores`) or estimated with `method`
    scores: dict | str | Path | None = None
    method: str | None = None  # activation (the default; needs `data`), magnitude or random; not with `scores`
    data: str | None = None  # calibration text (only its train split is read)
    batches: int = 16  # calibration batches
    batch_size: int = 4
    seq_len: int = 512
    seed: int = 0  # held-out split, batch order, random importance


def check_multiple(multiple) -> None:
    """--multiple N: a positive integer (checked before anything is loaded)."""
    if multiple is not None and multiple < 1:
        raise StarElasticError(f"--multiple must be a positive integer, got {multiple}")


def read_spec(path) -> ElasticSpec:
    """An explicit spec from a JSON file (`--spec`)."""
    path = Path(path)
    if not path.is_file():
        raise StarElasticError(f"--spec {path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise StarElasticError(f"--spec {path}: cannot read it ({e})") from None
    try:
        return ElasticSpec.from_json(text)
    except StarElasticError as e:
        raise StarElasticError(f"--spec {path}: {e}") from None


def parse_axes(axes, cfg) -> list[str]:
    """The axes to shrink, comma-separated text ("ffn,depth") or names, checked against the model."""
    names = [a.strip() for a in (axes.split(",") if isinstance(axes, str) else axes) if a.strip()]
    if not names:
        raise StarElasticError("--axes is empty")
    usable = applicable_axes(cfg)
    for a in names:
        if a not in AXES:
            raise StarElasticError(f"--axes: unknown axis {a!r} (known: {', '.join(AXES)})")
        if a not in usable:
            raise StarElasticError(f"--axes: this model has no {a!r} axis (layer types {cfg.layer_types!r}; "
                                   f"it has {', '.join(usable)})")
    return names


def check_exportable(spec, cfg) -> None:
    """Validate an explicit spec, including what transformers' own config classes insist on and
    what stock transformers cannot run (`ElasticSpec.validate_stock`)."""
    spec.validate_stock(cfg)
    sub = spec.config(cfg)
    if cfg.family == "llama":
        heads = sorted({sub.layer(i).num_attention_heads for i in range(sub.num_layers)})
        bad = [q for q in heads if sub.hidden_size % q]
        if bad:
            raise StarElasticError(f"hidden_size={sub.hidden_size} is not a multiple of num_attention_heads={bad[0]}, "
                                   "which transformers' LlamaConfig requires")


def calibration_scores(model, tokenizer, data, *, batches: int = 16, batch_size: int = 4, seq_len: int = 512,
                       seed: int = 0, depth: bool = False, log=print) -> dict:
    """Activation importance over packed windows of the train split of `data` (held-out documents
    are never seen), in seeded random order."""
    train, _ = load_corpus_tokens(data, tokenizer, seed=seed)
    windows = TokenBatches(pack(train, seq_len), batch_size, seed=seed)
    n = batches
    if n > len(windows):  # a second pass over the same windows adds no information
        print(f"note: the train split of {data} has {len(windows)} batches of {batch_size} x "
              f"{seq_len} tokens; using those instead of {n}", file=sys.stderr)
        n = len(windows)
    log(f"importance: activations over {n} batches of {batch_size} x {seq_len} tokens "
        f"(train split of {data}){', with depth' if depth else ''}")
    return estimate_importance(model, windows, depth=depth, num_batches=n)


def slice_scores(model, tokenizer, cfg: SliceConfig, depth: bool, log=print) -> dict:
    """Importance estimated with `cfg.method` (a scores file is read by `zero_shot_slice` up front)."""
    method = cfg.method or "activation"
    if method == "magnitude":
        log("importance: weight magnitude")
        return weight_magnitude_importance(model)
    if method == "random":
        log(f"importance: random order (seed {cfg.seed})")
        return random_importance(model, seed=cfg.seed)
    if not cfg.data:
        raise StarElasticError("activation importance needs calibration text: give --data TEXT "
                               "(or --scores FILE, or --method magnitude)")
    return calibration_scores(model, tokenizer, cfg.data, batches=cfg.batches, batch_size=cfg.batch_size,
                              seq_len=cfg.seq_len, seed=cfg.seed, depth=depth, log=log)


def check_budget(checkpoint, budget: str, *, verify: bool = False) -> tuple[ElasticSpec, dict]:
    """`slice CKPT --budget NAME`'s checks before anything is written: the elastic checkpoint's
    manifest, the spec of the budget called `budget` (trained, or between two trained ones: the
    router's architecture for it; any other name is a one-line error) and, with `verify`, every
    file's sha256 against the manifest. Returns (spec, manifest): the spec for
    `SliceConfig(spec=..., budget=...)` and `check_config`, the manifest for `slice_budget`."""
    from .elastic.checkpoint import read_manifest, resolve_budget, verify_files

    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    spec = resolve_budget(checkpoint, manifest, budget)[0]
    if verify:
        verify_files(checkpoint, manifest, progress=True)
    return spec, manifest


def check_config(cfg: SliceConfig) -> None:
    """What can be checked before the parent is loaded: `cmd_slice` calls this on the flags first
    (with a placeholder for a --spec file not yet read), `zero_shot_slice` again on what it gets."""
    if cfg.budget is not None and cfg.params is not None:
        raise StarElasticError("--budget slices an elastic checkpoint's trained budget: no --params or --spec")
    if cfg.budget is not None and (cfg.scores is not None or cfg.method or cfg.data):
        raise StarElasticError("--budget cuts a trained budget out of weights sorted already: no importance "
                               "(--scores, --method, --data)")
    if (cfg.params is None) == (cfg.spec is None):
        raise StarElasticError("give exactly one of --params TARGET, --spec FILE or --budget NAME")
    if cfg.spec is not None and cfg.budget is None and cfg.axes:  # (a trained budget ignores them)
        raise StarElasticError("--axes chooses a spec for --params; an explicit --spec needs none")
    if cfg.multiple is not None and cfg.params is None:
        raise StarElasticError("--multiple aligns the sizes chosen for --params; an explicit --spec or a trained "
                               "--budget has its own")
    check_multiple(cfg.multiple)
    if cfg.scores is not None and cfg.method:
        raise StarElasticError("--scores and --method exclude each other (the scores file has its own method)")
    if cfg.method not in (None, *METHODS):
        raise StarElasticError(f"--method is one of {', '.join(METHODS)}, got {cfg.method!r}")


def zero_shot_slice(model, tokenizer, out, cfg: SliceConfig, log=print, parent: str | None = None) -> dict:
    """Cut `cfg.spec`, or the spec chosen for `cfg.params`, out of the loaded parent `model` (sorted
    in place by importance on the axes that lose units) and write it to `out` with `tokenizer`: a
    stock Hugging Face checkpoint (our per-layer format for per-layer sizes) and
    star_elastic_slice.json, the record this returns. `out` is written through a temporary sibling
    and renamed into place (an existing `out` is replaced: the command line refuses that without
    --force). `parent`: where the model came from, for the record."""
    check_config(cfg)
    out = Path(out)
    mcfg, total = model.config, model.num_parameters()
    log(_parent_line(mcfg, total))

    scores = None
    if cfg.scores is not None:  # checked against the model before anything else is computed
        scores = cfg.scores if isinstance(cfg.scores, dict) else load_scores(cfg.scores)
        check_scores(scores, model)
    if cfg.spec is not None:
        spec = cfg.spec
        check_exportable(spec, mcfg)
        target = None
    else:
        target = parse_params(str(cfg.params), total)
        axes = parse_axes(cfg.axes, mcfg) if cfg.axes else [a for a in DEFAULT_AXES if a in applicable_axes(mcfg)]
        if "depth" in axes:  # the choice depends on the layer order: importance first
            if scores is None:
                scores = slice_scores(model, tokenizer, cfg, depth=True, log=log)
            if "layer_order" not in scores:
                raise StarElasticError("the depth axis needs a layer order: " + (
                    "these scores have none (estimate them with `star-elastic importance --depth`)"
                    if cfg.scores is not None else "weight-magnitude importance ranks no layers"))
        spec = choose_spec(mcfg, target, axes, layer_order=None if scores is None else scores.get("layer_order"),
                           multiple=cfg.multiple)

    cut = spec.indices(mcfg)  # the units kept on every axis that loses some
    if cfg.budget is not None:
        log(f"budget {cfg.budget} of the elastic checkpoint (trained, sorted): slicing its prefix")
    elif cut:
        if scores is None:
            scores = slice_scores(model, tokenizer, cfg, depth=False, log=log)
        # Sort only the axes that lose units: the others keep the parent's exact weights and order.
        sort_model(model, {k: v for k, v in scores.items() if k in cut})
    elif spec.kept_layers(mcfg) == list(range(mcfg.num_layers)):
        log("the spec keeps the whole parent: weights copied unchanged (no importance, no sort)")
    small = slice_model(model, spec)
    n = small.num_parameters()
    _log_result(spec, mcfg, n, total, target, log)

    info = {"parent": None if parent is None else str(parent), "parent_parameters": total, "target": target,
            "parameters": n, "spec": spec.to_dict(),
            "importance": None if scores is None else {k: v for k, v in scores.get("meta", {}).items()}}
    _write_with_record(out, info, lambda d: export(small.cpu(), d, tokenizer))
    log(_wrote_line(out, small.config, tokenizer is not None))
    return info


def slice_budget(checkpoint, budget: str, out, *, dtype=None, log=print, progress: bool = True,
                 manifest: dict | None = None) -> dict:
    """Cut the trained budget called `budget` (e.g. "0.5") out of the elastic checkpoint directory
    `checkpoint` into `out`, streaming it from disk (`elastic.stream.stream_slice`): the parent is
    never loaded, memory stays about one tensor. Its weights are importance-sorted already, so the
    budget is the first units of every axis; the full budget streams the whole parent.

    Writes what `zero_shot_slice(load(checkpoint, dtype), tokenizer, out, SliceConfig(spec=<the
    budget's spec>, budget=budget))` writes: the same config.json, tensor names, values and dtypes
    (`dtype`: floating-point tensors cast as they are written, the MoE gate kept in float32 with its
    stored values; None: as stored), the checkpoint's tokenizer files (copied,
    not re-saved), and star_elastic_slice.json, the record this returns, with `"streamed": true`.
    Every check `load` runs comes first (the manifest's cheap checks, tensor names and shapes from
    the headers), so errors are the same one-line `StarElasticError`s. `out` is written through a
    temporary sibling and renamed into place (an existing `out` is replaced: the command line
    refuses that without --force); on any error nothing is left. `manifest`: the checkpoint's, if
    read already. `progress`: a bar over the tensors written (stderr). `dtype=torch.float8_e4m3fn`
    (`--dtype fp8`): linear weights in FP8 with one scale per row over the parent's whole row, so that
    the budget is exactly its slice of the FP8 elastic checkpoint (fp8.py; zero-shot slices of a loaded
    parent, whose scales are their own rows', differ there); an FP8 checkpoint slices as stored."""
    from .elastic.checkpoint import read_manifest, resolve_budget
    from .elastic.spec import count_parameters
    from .elastic.stream import stream_slice
    from .hf import check_checkpoint, require_tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    manifest = manifest if manifest is not None else read_manifest(checkpoint)
    # a trained budget, or one between two (the router's architecture for it); else a one-line error
    spec, interpolated = resolve_budget(checkpoint, manifest, budget)
    _, mcfg = check_checkpoint(checkpoint)  # what `load` checks, from config.json and the headers alone
    require_tokenizer(checkpoint)  # as the loading path: an exported slice comes with its tokenizer
    check_exportable(spec, mcfg)
    src, dst = checkpoint.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise StarElasticError(f"{out}: the output would replace the elastic checkpoint {checkpoint}")
    total, n = count_parameters(mcfg), spec.num_parameters(mcfg)
    log(_parent_line(mcfg, total))
    how = ("interpolated between trained budgets, not trained itself" if interpolated
           else "trained, sorted")
    log(f"budget {budget} of the elastic checkpoint ({how}): streaming its prefix from disk "
        "(the parent is not loaded)")
    _log_result(spec, mcfg, n, total, None, log)

    info = {"parent": str(checkpoint), "parent_parameters": total, "target": None, "parameters": n,
            "spec": spec.to_dict(), "importance": None, "streamed": True}
    if interpolated:
        info["interpolated"] = interpolated
    _write_with_record(out, info, lambda d: stream_slice(checkpoint, spec, d, dtype=dtype, progress=progress))
    log(_wrote_line(out, spec.config(mcfg), True))
    return info


def _parent_line(mcfg, total: int) -> str:
    return (f"parent: {format_params(total)} parameters ({total:,}), {mcfg.family}, {mcfg.num_layers} layers "
            f"{mcfg.layer_types if mcfg.family != 'llama' else ''}".rstrip())


def _log_result(spec, mcfg, n: int, total: int, target: int | None, log) -> None:
    log(f"architecture: {describe(spec, mcfg)}")
    log(f"spec: {json.dumps(spec.to_dict())}")
    line = f"parameters: {format_params(n)} ({n:,}) = {n / total:.1%} of the parent"
    if target is not None:
        line += f"; target {format_params(target)} ({target:,}), achieved {n / target:.1%} of it"
    log(line)


def _write_with_record(out: Path, info: dict, write) -> None:
    """`write(directory)` (an atomic writer of its own: export, stream_slice) inside one staging
    directory, so that the slice record lands together with the weights: `out` appears complete
    or not at all."""
    with staging(out) as tmp:
        write(tmp / "model")
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        (tmp / "star_elastic_slice.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def _wrote_line(out: Path, sub, tokenizer: bool) -> str:
    from .fp8 import is_fp8_config
    from .hf_files import read_json

    stock = not (sub.layer_sizes and any(sub.layer_sizes))
    quant = ", FP8 weights with per-row scales" if is_fp8_config(read_json(out / "config.json")) else ""
    return (f"wrote {out} ({'a stock Hugging Face checkpoint' if stock else 'star-elastic per-layer format'}"
            f"{quant}{', with the tokenizer' if tokenizer else ''})")
