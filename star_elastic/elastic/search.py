"""Pick a sub-architecture for a parameter budget: zero-shot, Minitron-style (docs/METHOD.md §12).

`choose_spec` returns a homogeneous spec (one size per axis for all layers, so the slice is a stock
Hugging Face checkpoint). Every axis offers a chain of valid sizes, smallest first: hidden channels,
query heads (evenly inside the KV groups, then whole KV groups), Mamba heads (the same count in every
group), FFN neurons, routed experts (enough for top-k, a multiple of the router groups), depth (drop
the least important layers first). Kept widths are aligned for GPUs (64 where the parent allows,
else 32, 16 or 8, every size on tiny models: `spec.aligned_multiple`; `multiple` sets it) and never
what stock transformers cannot run (`spec.stock_multiple`). The search shrinks the chosen axes by
one common keep ratio, the largest whose model fits the budget, then grows axes one step at a time
while the model still fits.
`search_spec` runs `choose_spec` on every combination of the axes and keeps the candidate with the
lowest calibration perplexity of the importance-sorted parent masked to it (Minitron's search).

Parameter counts are `count_parameters` of the sliced config: what transformers' `num_parameters()`
reports for the exported checkpoint (tied embeddings once).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re

import torch
from tqdm.auto import tqdm

from star_elastic.errors import StarElasticError
from star_elastic.model import ModelConfig

from .axes import AXES as REGISTRY
from .axes import DEFAULT_AXES  # noqa: F401  (re-exported)
from .masking import masked
from .spec import ElasticSpec, aligned_multiple, count_parameters, stock_multiple

AXES = {name: a.cuts for name, a in REGISTRY.items()}  # what each axis cuts, for help texts
MIN_FRACTION = 0.85  # the chosen model has at least this share of the target

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_NUMBER = re.compile(r"(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?)\s*(?P<suffix>[kmbgt%]?)", re.IGNORECASE)


def format_params(n: int) -> str:
    """134515008 -> '134.52M'."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def parse_params(text, parent_total: int) -> int:
    """A parameter budget as a count. Accepts a fraction of the parent's total (`0.5`, `1.0`), a
    percentage (`50%`), or an absolute count: `70M`, `1.2B`, `500K`, `123456` (a plain integer is a
    count, so `1` means one parameter; write `1.0` for the whole model)."""
    s = str(text).strip().replace("_", "").replace(",", "")
    m = _NUMBER.fullmatch(s)
    if m is None:
        raise StarElasticError(f"parameter target {str(text)!r} is not a number: give a fraction of the parent "
                               "(0.5), a percentage (50%) or a count (70M, 1.2B, 500K, 123456)")
    num, suffix = m["num"], m["suffix"].lower()
    value = float(num)
    if not math.isfinite(value) or value <= 0:
        raise StarElasticError(f"parameter target {str(text)!r} must be positive")
    if suffix == "%" or (not suffix and not re.fullmatch(r"[-+]?\d+", num)):
        fraction = value / 100 if suffix == "%" else value
        if fraction > 1:
            raise StarElasticError(f"parameter target {str(text)!r} is more than the whole parent "
                                   f"({format_params(parent_total)} parameters); a fraction is at most 1.0")
        count = int(fraction * parent_total)  # floor: the target is an upper bound; 1.0 gives the total exactly
    else:
        count = int(round(value * _SUFFIX.get(suffix, 1)))
    if count <= 0:
        raise StarElasticError(f"parameter target {str(text)!r} is less than one parameter")
    if count > parent_total:
        raise StarElasticError(f"parameter target {str(text)!r} = {count:,} is more than the parent's "
                               f"{parent_total:,} parameters")
    return count


# ----------------------------------------------------------------------------- per-axis chains

def applicable_axes(cfg: ModelConfig) -> list[str]:
    """The axes of AXES that `cfg` has units of (depth whenever there are two layers or more)."""
    kinds = set(cfg.layer_types)
    has = {"hidden": True, "attention": "*" in kinds, "mamba": "M" in kinds, "mamba_channels": "M" in kinds,
           "ffn": "-" in kinds or cfg.family == "llama", "experts": "E" in kinds, "expert_ffn": "E" in kinds,
           "shared_ffn": "E" in kinds, "depth": cfg.num_layers > 1}
    return [a for a in AXES if has[a]]


def _attention_pairs(cfg: ModelConfig, multiple: int | None = None) -> list[tuple[int, int]]:
    """(query heads, KV heads) choices, smallest first. Query heads leave every KV group evenly,
    keeping the KV heads (and the KV cache); below one query head per group, whole groups go.
    Aligned: the query (and, where groups go, KV) widths, heads x head_dim, are multiples of
    `aligned_multiple` of the parent's. Llama: transformers' LlamaConfig requires hidden_size %
    num_attention_heads == 0, so only head counts that divide the hidden size."""
    Q, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    m = aligned_multiple(Q, hd, multiple=multiple)
    pairs = [(k, k) for k in range(1, KV)] + [(KV * p, KV) for p in range(1, Q // KV + 1)]
    return [(q, kv) for q, kv in pairs
            if (cfg.family != "llama" or cfg.hidden_size % q == 0)
            and ((q, kv) == (Q, KV) or (q * hd % m == 0 and (kv == KV or kv * hd % m == 0)))]


def _chain(cfg: ModelConfig, axis: str, layer_order, multiple: int | None,
           hidden_base: int = 1) -> list[tuple[float, dict]]:
    """(keep fraction, spec fields) of every valid size of `axis`, smallest first; the last entry is
    the parent's size with no fields (so an axis left whole stays out of the spec). Widths are
    multiples of `aligned_multiple` (`multiple`: None picks it per axis, an int is used as given),
    and of what stock transformers needs to run them (`stock_multiple`)."""

    def widths(field, n, base=1, heads=1):
        step = aligned_multiple(n, multiple=multiple, base=base, required=stock_multiple(cfg, field), width=n * heads)
        return [(w / n, {field: w}) for w in range(step, n, step)] + [(1.0, {})]

    if axis == "hidden":
        return widths("hidden_size", cfg.hidden_size, hidden_base)
    if axis == "ffn":
        return widths("intermediate_size", cfg.intermediate_size)
    if axis == "expert_ffn":
        return widths("moe_intermediate_size", cfg.moe_intermediate_size)
    if axis == "shared_ffn":
        return widths("moe_shared_expert_intermediate_size", cfg.moe_shared_expert_intermediate_size)
    if axis == "mamba_channels":
        return widths("mamba_head_dim", cfg.mamba_head_dim, heads=cfg.mamba_num_heads)  # in every head
    if axis == "attention":  # the fraction counts q + kv heads: their share of the attention weights
        Q, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        return [((q + kv) / (Q + KV), {"num_attention_heads": q} if kv == KV else
                 {"num_attention_heads": q, "num_key_value_heads": kv})
                for q, kv in _attention_pairs(cfg, multiple)[:-1]] + [(1.0, {})]
    if axis == "mamba":  # aligned: the inner width, heads x mamba_head_dim
        H, g, d = cfg.mamba_num_heads, cfg.n_groups, cfg.mamba_head_dim
        m = aligned_multiple(H, d, multiple=multiple)
        return [(g * k / H, {"mamba_num_heads": g * k}) for k in range(1, H // g) if g * k * d % m == 0] + [(1.0, {})]
    if axis == "experts":
        # as ElasticSpec.validate: a multiple of the router groups, at least 2 per group (routers rank
        # groups by their two best experts), enough in the top groups for top-k
        E, groups, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        per = E // groups
        lo = max(min(2, per), -(-k // cfg.topk_group), -(-k // groups))
        return [(groups * p / E, {"n_routed_experts": groups * p}) for p in range(lo, per)] + [(1.0, {})]
    if axis == "depth":
        if layer_order is None:
            raise StarElasticError("the depth axis needs a layer order (importance estimated with depth)")
        order = [int(i) for i in layer_order]
        L = cfg.num_layers
        if sorted(order) != list(range(L)):
            raise StarElasticError(f"layer order {order} is not a permutation of the parent's {L} layers")
        # keep n layers: drop the L - n least important (the first of the order)
        return [(n / L, {"layers": sorted(order[L - n:])}) for n in range(1, L)] + [(1.0, {})]
    raise StarElasticError(f"unknown axis {axis!r} (known: {', '.join(AXES)})")


# ----------------------------------------------------------------------------- search

def smallest_reachable(parent_cfg: ModelConfig, axes=DEFAULT_AXES, *, layer_order=None,
                       multiple: int | None = None) -> int:
    """Parameters of the smallest homogeneous model that shrinking `axes` (those the parent has) reaches."""
    names = [a for a in dict.fromkeys(axes) if a in applicable_axes(parent_cfg)]
    fields, base = {}, _hidden_base(parent_cfg, names, multiple)
    for a in names:
        fields.update(_chain(parent_cfg, a, layer_order, multiple, base)[0][1])
    return ElasticSpec(**fields).num_parameters(parent_cfg)


def _hidden_base(cfg: ModelConfig, names, multiple: int | None = None) -> int:
    """Llama hidden sizes must divide by every query-head count in play (transformers' LlamaConfig)."""
    if cfg.family != "llama":
        return 1
    heads = [q for q, _ in _attention_pairs(cfg, multiple)] if "attention" in names else [cfg.num_attention_heads]
    return math.lcm(*heads)


def _check_parent_and_axes(parent_cfg: ModelConfig, axes) -> None:
    if parent_cfg.layer_sizes and any(parent_cfg.layer_sizes):
        raise StarElasticError("choose_spec needs a parent with one size per axis for all layers "
                               "(this one has per-layer sizes)")
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise StarElasticError(f"unknown axis {unknown[0]!r} (known: {', '.join(AXES)})")


def choose_spec(parent_cfg: ModelConfig, target: int, axes=DEFAULT_AXES, *, layer_order=None,
                min_fraction: float = MIN_FRACTION, multiple: int | None = None,
                floor: ElasticSpec | None = None, ceiling: ElasticSpec | None = None) -> ElasticSpec:
    """The homogeneous spec with the most parameters <= `target` (and >= min_fraction * target)
    found by shrinking `axes` (names of AXES; those the parent lacks are skipped) by a common keep
    ratio and then growing them one step at a time. `target` equal to the parent's total gives the
    full spec ElasticSpec(). `layer_order` (least important first) is needed for "depth".
    `multiple`: every kept width (hidden, attention and Mamba heads x head_dim, Mamba head_dim, FFN,
    expert and shared-expert FFN) is a multiple of it; None (the default) picks 64 where the parent
    allows, else 32, 16 or 8, else 1 on tiny models (`spec.aligned_multiple` has the rule); always
    also what stock transformers needs to run the export (`spec.stock_multiple`). `floor`: a spec the
    result must contain (every unit it keeps kept too: a smaller budget nested in this one); `ceiling`:
    a spec that must contain the result (a larger budget this one nests in: on the axes that the
    ceiling cuts, only sizes within it, and the result is refused unless it fits in it whole).
    StarElasticError, naming the reachable bound, when the target cannot be met."""
    _check_parent_and_axes(parent_cfg, axes)
    total, target = count_parameters(parent_cfg), int(target)
    if target > total:
        raise StarElasticError(f"target {format_params(target)} is more than the parent's {format_params(total)} "
                               f"parameters ({total:,}), the largest model reachable")
    if target == total:
        return ElasticSpec()
    usable = applicable_axes(parent_cfg)
    names = [a for a in dict.fromkeys(axes) if a in usable]
    if not names:
        raise StarElasticError(f"none of the axes {', '.join(axes)} applies to this model "
                               f"(layer types {parent_cfg.layer_types!r}; it has {', '.join(usable)})")
    hidden_base = _hidden_base(parent_cfg, names, multiple)
    chains = {a: _chain(parent_cfg, a, layer_order, multiple, hidden_base) for a in names}
    if floor is not None:  # only sizes that keep what the floor keeps on that axis (the full size always does)
        chains = {a: _at_least(parent_cfg, c, floor) for a, c in chains.items()}
    if ceiling is not None:  # only sizes the ceiling keeps on that axis
        chains = {a: _at_most(parent_cfg, c, ceiling) for a, c in chains.items()}
        empty = [a for a, c in chains.items() if not c]
        if empty:
            raise StarElasticError(f"no {empty[0]} size fits inside {describe(ceiling, parent_cfg)}")
    counts: dict[tuple, int] = {}

    def spec_at(idx: dict) -> ElasticSpec:
        fields = {}
        for a, i in idx.items():
            fields.update(chains[a][i][1])
        return ElasticSpec(**fields)

    def count(idx: dict) -> int:
        key = tuple(idx[a] for a in names)
        if key not in counts:
            counts[key] = spec_at(idx).num_parameters(parent_cfg)
        return counts[key]

    def at_ratio(r: float) -> dict:  # every axis at its largest size with keep fraction <= r
        return {a: max([i for i, (f, _) in enumerate(c) if f <= r], default=0) for a, c in chains.items()}

    where = f"shrinking {', '.join(names)}"
    smallest = count({a: 0 for a in names})  # = smallest_reachable(...)
    if smallest > target:
        raise StarElasticError(f"target {format_params(target)} is below the smallest model reachable by {where}: "
                               f"{format_params(smallest)} parameters ({smallest:,}, {smallest / total:.1%} of the "
                               "parent); raise the target or add axes")

    # 1. The largest common keep ratio that fits (count(at_ratio(r)) grows with r: bisection).
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if count(at_ratio(mid)) <= target:
            lo = mid
        else:
            hi = mid

    # 2. Grow one step at a time while the model fits, the most-shrunk axis first, so the axes
    # stay as even as the budget allows.
    def grow(idx: dict) -> dict:
        while True:
            fits = [a for a in names if idx[a] + 1 < len(chains[a]) and count({**idx, a: idx[a] + 1}) <= target]
            if not fits:
                return idx
            a = min(fits, key=lambda a: chains[a][idx[a]][0])
            idx = {**idx, a: idx[a] + 1}

    idx = grow(at_ratio(lo))

    # 3. Still short (an axis as coarse as whole layers sits one step below full): trade, i.e. grow
    # one axis a step and shrink another as little as needed, while that adds parameters. Only
    # here, as trades give up the even shrink for a few more parameters.
    def largest_fit(idx: dict, b: str) -> dict | None:  # b as large as fits (count grows with idx[b])
        lo_, hi_ = 0, idx[b]
        if count({**idx, b: 0}) > target:
            return None
        while lo_ < hi_:
            mid = (lo_ + hi_ + 1) // 2
            lo_, hi_ = (mid, hi_) if count({**idx, b: mid}) <= target else (lo_, mid - 1)
        return {**idx, b: lo_}

    while count(idx) < min_fraction * target:
        trades = [t for a in names if idx[a] + 1 < len(chains[a]) for b in names if b != a
                  if (t := largest_fit({**idx, a: idx[a] + 1}, b)) is not None]
        best = max(trades, key=count, default=None)
        if best is None or count(best) <= count(idx):
            break
        idx = grow(best)
    n = count(idx)
    if n < min_fraction * target:
        raise StarElasticError(f"no model reachable by {where} has between {min_fraction:.0%} of the target "
                               f"{format_params(target)} and the target: the closest below has "
                               f"{format_params(n)} ({n / target:.1%}); the sizes are too coarse, add axes")
    spec = spec_at(idx)
    if ceiling is not None and (outside := spec.outside(ceiling, parent_cfg)):  # an axis it left whole
        raise StarElasticError(f"shrinking {', '.join(names)} does not fit inside {describe(ceiling, parent_cfg)} "
                               f"({outside})")
    return spec


def _at_most(cfg: ModelConfig, chain: list[tuple[float, dict]], ceiling: ElasticSpec) -> list[tuple[float, dict]]:
    """The entries of one axis's chain that `ceiling`, restricted to that axis, contains."""
    keys = {k for _, fields in chain for k in fields}
    high = ElasticSpec(**{k: getattr(ceiling, k) for k in keys if getattr(ceiling, k) is not None})
    return [(f, fields) for f, fields in chain if ElasticSpec(**fields).within(high, cfg)]


def _at_least(cfg: ModelConfig, chain: list[tuple[float, dict]], floor: ElasticSpec) -> list[tuple[float, dict]]:
    """The entries of one axis's chain whose spec contains `floor` restricted to that axis."""
    keys = {k for _, fields in chain for k in fields}
    low = ElasticSpec(**{k: getattr(floor, k) for k in keys if getattr(floor, k) is not None})
    return [(f, fields) for f, fields in chain if low.within(ElasticSpec(**fields), cfg)]


# ----------------------------------------------------------------------------- best of the axis combinations

def calibration_perplexity(model, spec: ElasticSpec, batches, device=None) -> float:
    """Perplexity of `model` masked to `spec` (`masking.masked`, the full model again afterwards
    whatever happens) on `batches`: (b, t) token-id LongTensors, every token but each row's first predicted
    from the row before it (`evaluate.perplexity` on each batch's rows as windows). bf16 autocast on
    CUDA. inf when the loss overflows."""
    from star_elastic.evaluate import perplexity

    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll, tokens = 0.0, 0
    with masked(model, spec.masks(model.config, device=device)), torch.no_grad(), \
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for ids in batches:
            if ids.dim() != 2 or ids.shape[1] < 2:
                raise StarElasticError(f"calibration batches must be (batch, tokens) with at least 2 tokens "
                                       f"per row, got shape {tuple(ids.shape)}")
            try:
                r = perplexity(model, ids.reshape(-1), seq_len=ids.shape[1], batch_size=ids.shape[0],
                               progress=False, device=device)
            except OverflowError:  # exp of a mean loss above ~709 nats
                return math.inf
            nll += r["nll"] * r["tokens"]
            tokens += r["tokens"]
    if not tokens:
        raise StarElasticError("no calibration batches to score the candidate architectures on")
    mean = nll / tokens
    return math.exp(mean) if mean < 709.0 else math.inf  # NaN too: it ranks last


def search_spec(model, target: int, axes, batches, *, layer_order=None, min_axes: int = 1, progress: bool = False,
                device=None, min_fraction: float = MIN_FRACTION, multiple: int | None = None,
                floor: ElasticSpec | None = None,
                ceiling: ElasticSpec | None = None) -> tuple[ElasticSpec, list[dict]]:
    """The best homogeneous spec for `target` parameters over combinations of `axes`, scored by
    calibration perplexity as Minitron's search does. `model`: the importance-sorted parent (ours,
    `Model`); every combination of at least `min_axes` of the applicable `axes` ("depth" only with a
    `layer_order`, least important first) gets `choose_spec`'s spec (combinations that cannot
    reach the target are skipped), identical specs are scored once, by `calibration_perplexity` of
    the parent masked to them on `batches` ((b, t) LongTensors; keep them few, one forward each per
    candidate). Returns (lowest-perplexity spec, one record per candidate, best first: "axes" (the
    smallest combination giving it), "combinations" (all of them), "spec" (to_dict), "params",
    "architecture", "perplexity"). `floor`: every candidate contains it; `ceiling`: every candidate fits
    in it (`choose_spec`). StarElasticError,
    one line, when no combination reaches the target."""
    cfg = model.config
    axes = list(dict.fromkeys(axes))
    _check_parent_and_axes(cfg, axes)
    batches = list(batches)
    if not batches:
        raise StarElasticError("search_spec needs calibration batches to score the candidate architectures")
    usable = applicable_axes(cfg)
    names = [a for a in axes if a in usable and (a != "depth" or layer_order is not None)]
    if not names:
        raise StarElasticError(f"none of the axes {', '.join(axes) or '(none)'} applies to this model "
                               f"(it has {', '.join(a for a in usable if a != 'depth' or layer_order is not None)})")
    if not 1 <= min_axes <= len(names):
        raise StarElasticError(f"min_axes={min_axes}: the search has {len(names)} applicable axes "
                               f"({', '.join(names)}); give 1 to {len(names)}")

    candidates: dict[str, dict] = {}  # canonical spec JSON -> record
    last_error = None
    for k in range(min_axes, len(names) + 1):
        for combo in itertools.combinations(names, k):
            try:
                spec = choose_spec(cfg, target, combo, layer_order=layer_order, min_fraction=min_fraction,
                                   multiple=multiple, floor=floor, ceiling=ceiling)
            except StarElasticError as e:
                last_error = e  # the last is the combination of every axis: the widest reach
                continue
            key = json.dumps(spec.to_dict(), sort_keys=True)
            if key in candidates:
                candidates[key]["combinations"].append(list(combo))
            else:
                candidates[key] = {"axes": list(combo), "combinations": [list(combo)], "spec": spec.to_dict(),
                                   "params": spec.num_parameters(cfg), "architecture": describe(spec, cfg),
                                   "_spec": spec}
    if not candidates:
        raise StarElasticError(f"no combination of the axes {', '.join(names)} reaches the target: {last_error}")

    bar = tqdm(list(candidates.values()), desc="search", unit="spec",
               disable=not progress or bool(os.environ.get("STAR_ELASTIC_QUIET")))
    best = math.inf
    for rec in bar:
        rec["perplexity"] = calibration_perplexity(model, rec["_spec"], batches, device=device)
        best = min(best, rec["perplexity"])
        bar.set_postfix(best=f"{best:.3f}")
    records = sorted(candidates.values(), key=lambda r: (r["perplexity"], -r["params"]))
    spec = records[0]["_spec"]
    for rec in records:
        del rec["_spec"]
    return spec, records


def nested_choice(parent_cfg: ModelConfig, searched: list[list[dict]]) -> tuple[list[ElasticSpec], bool]:
    """One architecture per budget from each budget's search records (`search_spec`'s second value,
    best first; budgets largest first) such that each is nested in the larger ones. The smallest
    budget is settled first, at its best candidate for which every larger budget has a candidate
    containing it; each larger budget takes its best such candidate. Returns (specs, True), or each
    budget's own best and False when no candidates nest.

    Why: the search ranks each budget alone, and its choices need not nest (SmolLM2: 0.75 = FFN 832,
    0.5 = hidden 360 + FFN 960). A router started from and pulled toward both trained the 0.5 on FFN
    960, and the export cut it to fit the 0.75 (H200, 2026-12-01: +57% against separate distillation).
    Why smallest first, not the lowest total calibration perplexity: the total prefers a deep single
    cut of the smallest budget (FFN 192 under FFN 832), and deep FFN cuts of SmolLM2's 0.5 budget are
    the ones that trained worst (FFN 256-512: +58% to +83%, docs/RESULTS.md §9); the smallest budget
    has the least room, so its architecture decides most."""
    specs = [[ElasticSpec.from_dict(r["spec"]) for r in recs] for recs in searched]
    if not specs:
        return [], True
    for smallest in specs[-1]:
        chosen = [smallest]
        for candidates in reversed(specs[:-1]):  # the next larger budget first
            fit = next((c for c in candidates if chosen[0].within(c, parent_cfg)), None)
            if fit is None:
                break
            chosen.insert(0, fit)
        else:
            return chosen, True
    return [s[0] for s in specs], False


def nested_search(model, targets: list[int], searched: list[list[dict]], axes, batches, *, layer_order=None,
                  multiple: int | None = None, plans: list | None = None) -> tuple[list[ElasticSpec], bool]:
    """Nested zero-shot architectures for budgets of `targets` parameters (largest first), given each
    budget's own search records (`search_spec`'s second value). Two plans, each searched again on
    `batches` as the search is:
    - smallest first: the smallest budget keeps its best; each larger one keeps its own best if that
      contains the next smaller, else the best spec for its target that does (`search_spec`, floor);
    - largest first: the largest keeps its best; each smaller one keeps its own best if the next
      larger contains it, else the best spec that fits inside it (`search_spec`, ceiling).
    The plan that loses least against the budgets' own bests wins: the sum over budgets of
    log(calibration perplexity / the budget's own best). Where neither plan exists: `nested_choice`
    over the records. Returns (specs, nested); `plans`, a list, receives one record per plan built:
    "order", "specs" (to_dict), "perplexities", "loss", "chosen".

    Why both: on SmolLM2 the 0.75's best is FFN 1536 -> 832 (calibration perplexity 90) and the
    0.5's hidden 360 + FFN 960 (4526). Smallest first moved the 0.75 to hidden 432 (570, 6.3x its
    best); trained, that 0.75 finished 12-13% behind a 0.75 distilled alone on FFN 832 (H200,
    2026-12-01, docs/RESULTS.md §9). Largest first keeps FFN 832 and fits the 0.5 inside it."""
    cfg = model.config
    own = [ElasticSpec.from_dict(recs[0]["spec"]) for recs in searched]
    best = [recs[0]["perplexity"] for recs in searched]
    kw = dict(layer_order=layer_order, multiple=multiple)
    built = {}
    for order in ("smallest first", "largest first"):
        try:
            built[order] = _nested_plan(model, targets, own, best, axes, batches, order, kw)
        except StarElasticError:
            continue
    if not built:
        return nested_choice(cfg, searched)
    chosen = min(built, key=lambda order: built[order][2])
    if plans is not None:
        plans.extend({"order": order, "specs": [x.to_dict() for x in specs], "perplexities": ppl, "loss": loss,
                      "chosen": order == chosen} for order, (specs, ppl, loss) in built.items())
    return built[chosen][0], True


def _nested_plan(model, targets, own, best, axes, batches, order: str, kw) -> tuple[list[ElasticSpec], list, float]:
    """One plan of `nested_search`: its specs, their calibration perplexities and its loss, the sum of
    log(perplexity / own best) over budgets."""
    cfg, n = model.config, len(targets)
    specs, ppl = list(own), list(best)
    for i in (range(n - 2, -1, -1) if order == "smallest first" else range(1, n)):
        if order == "smallest first":
            if specs[i + 1].within(own[i], cfg):
                continue
            specs[i], records = search_spec(model, targets[i], axes, batches, floor=specs[i + 1], **kw)
        else:
            if own[i].within(specs[i - 1], cfg):
                continue
            specs[i], records = search_spec(model, targets[i], axes, batches, ceiling=specs[i - 1], **kw)
        ppl[i] = records[0]["perplexity"]
    return specs, ppl, sum(_log_ratio(p, b) for p, b in zip(ppl, best))


def _log_ratio(p: float, best: float) -> float:
    return math.log(max(p, 1e-12) / max(best, 1e-12)) if math.isfinite(p) else math.inf


_NAMES = {"hidden_size": "hidden", "num_attention_heads": "attention heads", "num_key_value_heads": "KV heads",
          "mamba_num_heads": "Mamba heads", "mamba_head_dim": "Mamba head dim", "intermediate_size": "FFN",
          "n_routed_experts": "experts", "moe_intermediate_size": "expert FFN",
          "moe_shared_expert_intermediate_size": "shared-expert FFN"}


def describe(spec: ElasticSpec, parent_cfg: ModelConfig) -> str:
    """One line: every size the spec changes, as 'hidden 576 -> 432, FFN 1536 -> 1152, layers 30 -> 22'
    (per-layer sizes as their distinct values)."""
    sizes = spec.sizes(parent_cfg)
    kept = spec.kept_layers(parent_cfg)
    parts = []
    if spec.hidden_size is not None and spec.hidden_size != parent_cfg.hidden_size:
        parts.append(f"hidden {parent_cfg.hidden_size} -> {spec.hidden_size}")
    for field, name in _NAMES.items():
        if field == "hidden_size":
            continue
        old = sorted({getattr(parent_cfg.layer(i), field) for i in kept if field in sizes[i]})
        new = sorted({sizes[i][field] for i in kept if field in sizes[i]})
        if new and new != old:
            show = lambda v: "/".join(map(str, v))  # noqa: E731
            parts.append(f"{name} {show(old)} -> {show(new)}")
    if len(kept) != parent_cfg.num_layers:
        parts.append(f"layers {parent_cfg.num_layers} -> {len(kept)}")
    return ", ".join(parts) or "the parent's architecture (nothing removed)"
