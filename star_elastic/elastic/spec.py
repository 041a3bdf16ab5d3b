"""An elastic sub-architecture of a parent model: how many units of each axis to keep (docs/METHOD.md §2).

Every size is a count of importance-sorted units kept as a prefix, so a spec plus the sorted parent
fully defines the submodel. Grouped axes keep a prefix *inside each group*: attention query heads
within each kept KV group (KV groups themselves a prefix), Mamba heads within each of the n_groups
groups, routed experts within each of the router's n_group groups.

Per-axis values are `None` (the parent's size), one int for every layer, or a list with one entry
per parent layer (`None` on layers the axis does not apply to or keeps whole). Axis names are
`ModelConfig`'s field names, so `spec.config(parent)` is the sliced model's config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace

import torch

from star_elastic.errors import StarElasticError
from star_elastic.elastic.masking import masked  # noqa: F401  (re-exported for code written against the older home, e.g. benchmarks/bench_masks.py run on an older tree)
from star_elastic.model import PER_LAYER_SIZES, ModelConfig

Q, KV = "num_attention_heads", "num_key_value_heads"
BLOCK_NAMES = {"M": "Mamba", "*": "attention", "-": "MLP", "E": "MoE"}


def applies(cfg: ModelConfig, kind: str, axis: str) -> bool:
    """Whether a layer of block type `kind` has units of `axis` (a Llama '*' layer also has an MLP)."""
    if axis in (Q, KV):
        return kind == "*"
    if axis in ("mamba_num_heads", "mamba_head_dim"):
        return kind == "M"
    if axis == "intermediate_size":
        return kind == "-" or cfg.family == "llama"
    return kind == "E"  # n_routed_experts, moe_intermediate_size, moe_shared_expert_intermediate_size


def grouped_prefix(total: int, groups: int, keep_groups: int, per_group: int) -> torch.Tensor:
    """Indices of the first `per_group` units in each of the first `keep_groups` of `groups`
    contiguous groups of `total` units."""
    size = total // groups
    return (torch.arange(keep_groups)[:, None] * size + torch.arange(per_group)[None, :]).flatten()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- aligned sizes

ALIGNMENTS = (64, 32, 16, 8)  # multiples a kept width prefers, largest first
MIN_ALIGNED_SIZES = 8  # an alignment must leave the axis this many sizes, the parent's included
MIN_ALIGNED_WIDTH = 128  # narrower axes (test-sized models) keep every size: nothing to align there
GROUPED_GEMM_BYTES = 16  # torch's grouped GEMM (transformers' MoE experts): strides of 16 bytes


def stock_multiple(parent: ModelConfig, field: str) -> int:
    """The multiple that stock transformers needs a kept `field` to be to run the export at all.

    NemotronH MoE experts run through `torch.nn.functional.grouped_mm` (transformers' default
    `experts_implementation`, on CPUs and GPUs alike), whose operands need strides of 16 bytes: the
    expert input width (`hidden_size`, or `moe_latent_size` when there is a latent projection, which
    is not elastic) and `moe_intermediate_size`. 16 bytes are 8 values in bf16 / fp16 (the dtypes
    checkpoints are served in) and 4 in fp32. So 8 where the parent's own size is a multiple of 8,
    else 4 where it is a multiple of 4 (the parent then runs in fp32 only, as its slices do), else 1
    (the parent itself does not run on that path). Every other field: 1."""
    if field not in ("hidden_size", "moe_intermediate_size") or "E" not in parent.layer_types:
        return 1
    if field == "hidden_size" and parent.moe_latent_size is not None:
        return 1
    n = getattr(parent, field)
    return next((m for m in (GROUPED_GEMM_BYTES // 2, GROUPED_GEMM_BYTES // 4) if n % m == 0), 1)


def aligned_multiple(n: int, unit: int = 1, *, multiple: int | None = None, base: int = 1, required: int = 1,
                     width: int | None = None) -> int:
    """The multiple (in channels) that every kept width of an axis is, below the parent's own:
    lcm(m, base, required), m the alignment.

    The axis has n units of `unit` channels each (attention / Mamba heads: unit = head_dim; plain
    widths: unit 1), so keeping c units is a width of c x unit channels; the parent's n x unit is
    always allowed. `base` and `required` are always honoured: `base` is what the config class needs
    (Llama: the hidden size a multiple of every query-head count), `required` what stock tools need
    to run it (`stock_multiple`). `width`: the channels the axis makes up in its layer, when more
    than n x unit (a Mamba head_dim is repeated in every head: heads x head_dim); it only decides
    whether the axis is test-sized (below).

    `multiple` None (the default everywhere) picks it: the largest m in ALIGNMENTS (64, 32, 16, 8)
    that divides the parent's width n x unit and still leaves the axis at least MIN_ALIGNED_SIZES (8)
    sizes, the parent's included (counting widths that are multiples of lcm(m, base, required)),
    i.e. steps of at most 1/8 of the parent: 64 from widths of 512 up (SmolLM2's FFN 1536, Nemotron
    Nano's 2688 hidden and 1856 expert FFN), 32 for 256, 16 for 128; SmolLM2's hidden 576, a
    multiple of its 3 / 6 / 9 query heads too (base 18), gets m = 8 (steps of 72). m = 1 when even 8
    leaves fewer sizes, and on widths under MIN_ALIGNED_WIDTH (128 channels): test-sized models keep
    every size, as before alignment. An int `multiple` (`--multiple N`) is used as given."""
    if multiple is not None:
        if not _is_int(multiple) or multiple < 1:
            raise StarElasticError(f"--multiple must be a positive integer, got {multiple!r}")
        return math.lcm(multiple, base, required)
    own = n * unit
    for m in ALIGNMENTS if max(own, width or 0) >= MIN_ALIGNED_WIDTH else ():
        step = math.lcm(m, base, required)
        if own % m == 0 and n // (step // math.gcd(step, unit)) >= MIN_ALIGNED_SIZES:
            return step
    return math.lcm(base, required)


def _error(msg: str) -> StarElasticError:
    return StarElasticError(f"elastic spec: {msg}")


@dataclass
class ElasticSpec:
    """Sizes kept per axis. None everywhere is the parent itself."""

    hidden_size: int | None = None  # embedding channels, one value for the whole model
    layers: list[int] | None = None  # kept parent layers (run in the parent's order); dropped = identity
    num_attention_heads: int | list | None = None  # query heads; None: every head of the kept KV groups
    num_key_value_heads: int | list | None = None  # KV groups kept
    mamba_num_heads: int | list | None = None  # a multiple of n_groups (same count in every group)
    mamba_head_dim: int | list | None = None  # channels per Mamba head
    intermediate_size: int | list | None = None  # dense FFN neurons
    n_routed_experts: int | list | None = None
    moe_intermediate_size: int | list | None = None  # expert FFN width (the same for every expert)
    moe_shared_expert_intermediate_size: int | list | None = None

    # ------------------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "ElasticSpec":
        if not isinstance(d, dict):
            raise StarElasticError(f"an elastic spec is a JSON object of axis sizes, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise _error(f"unknown axis {unknown[0]!r} (known: {', '.join(known)})")
        for k, v in d.items():
            ok = v is None or _is_int(v) or (isinstance(v, list) and all(x is None or _is_int(x) for x in v))
            if k == "hidden_size" and not (v is None or _is_int(v)):
                raise _error(f"hidden_size must be an integer, got {v!r}")
            if not ok:
                raise _error(f"{k} must be an integer or a list of integers, got {v!r}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ElasticSpec":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise StarElasticError(f"elastic spec is not valid JSON ({e})") from None
        return cls.from_dict(d)

    # ------------------------------------------------------------------------- resolution

    def kept_layers(self, parent: ModelConfig) -> list[int]:
        return list(range(parent.num_layers)) if self.layers is None else sorted(self.layers)

    def keeps_parent(self, parent: ModelConfig) -> bool:
        """Whether this spec keeps the whole parent (then the parent itself runs, no copy)."""
        return not self.indices(parent) and self.kept_layers(parent) == list(range(parent.num_layers))

    def _value(self, axis: str, i: int):
        v = getattr(self, axis)
        return v[i] if isinstance(v, list) else v

    def validate(self, parent: ModelConfig) -> None:
        """Raise StarElasticError (one line) unless this spec is a valid sub-architecture of `parent`."""
        L, D, err = parent.num_layers, parent.hidden_size, _error
        if self.hidden_size is not None:
            if not _is_int(self.hidden_size) or self.hidden_size < 1:
                raise err(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
            if self.hidden_size > D:
                raise err(f"hidden_size={self.hidden_size} is larger than the parent's {D}")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not all(_is_int(i) for i in self.layers):
                raise err(f"layers must be a list of layer indices, got {self.layers!r}")
            bad = [i for i in self.layers if not 0 <= i < L]
            if bad:
                raise err(f"unknown layer index {bad[0]} (the parent has layers 0..{L - 1})")
            if len(set(self.layers)) != len(self.layers):
                raise err(f"layers lists a layer twice: {self.layers}")
            if not self.layers:
                raise err("layers is empty: a model needs at least one layer")
        for axis in PER_LAYER_SIZES:
            v = getattr(self, axis)
            if v is None:
                continue
            has = [i for i, k in enumerate(parent.layer_types) if applies(parent, k, axis)]
            if isinstance(v, list):
                if len(v) != L:
                    raise err(f"{axis} has {len(v)} entries, the parent has {L} layers")
                for i, x in enumerate(v):
                    if x is not None and i not in has:
                        raise err(f"{axis}[{i}]={x}, but layer {i} is a "
                                  f"{BLOCK_NAMES[parent.layer_types[i]]} block without that axis")
            elif not has:
                raise err(f"{axis} is set but the parent has no layer with that axis")
        for i, kind in enumerate(parent.layer_types):
            self._validate_layer(parent, i, kind)

    def _validate_layer(self, parent: ModelConfig, i: int, kind: str) -> None:
        p, err = parent.layer(i), _error
        where = f"layer {i}: "
        for axis in PER_LAYER_SIZES:
            v = self._value(axis, i)
            if v is None or not applies(parent, kind, axis):
                continue
            if not _is_int(v) or v < 1:
                raise err(f"{where}{axis} must be at least 1, got {v!r}")
            if v > getattr(p, axis):
                raise err(f"{where}{axis}={v} is larger than the parent's {getattr(p, axis)}")
        if kind == "*":
            q, kv = self._attention(p, i)
            per = p.num_attention_heads // p.num_key_value_heads
            if q % kv:
                raise err(f"{where}num_attention_heads={q} is not a multiple of num_key_value_heads={kv} "
                          "(every KV group keeps the same number of query heads)")
            if q // kv > per:
                raise err(f"{where}num_attention_heads={q} over {kv} KV groups is {q // kv} per group, "
                          f"the parent has {per}")
        if kind == "M":
            m = self._value("mamba_num_heads", i)
            if m is not None and m % p.n_groups:
                raise err(f"{where}mamba_num_heads={m} is not divisible by n_groups={p.n_groups} "
                          "(every group keeps the same number of heads)")
        if kind == "E":
            e = self._value("n_routed_experts", i)
            if e is None:
                return
            if e < p.num_experts_per_tok:
                raise err(f"{where}n_routed_experts={e} is fewer than num_experts_per_tok={p.num_experts_per_tok}")
            if e % p.n_group:
                raise err(f"{where}n_routed_experts={e} is not a multiple of n_group={p.n_group} "
                          "(every router group keeps the same number of experts)")
            per, parent_per = e // p.n_group, p.n_routed_experts // p.n_group
            # routers rank groups by their two best experts (transformers does so even with one group)
            if per < min(2, parent_per):
                raise err(f"{where}n_routed_experts={e} leaves {per} expert per router group, at least 2 are needed")
            if per * p.topk_group < p.num_experts_per_tok:
                raise err(f"{where}n_routed_experts={e}: the topk_group={p.topk_group} best groups hold "
                          f"{per * p.topk_group} experts, fewer than num_experts_per_tok={p.num_experts_per_tok}")

    def validate_stock(self, parent: ModelConfig) -> None:
        """`validate`, then raise StarElasticError (one line, saying why) for a kept size that stock
        transformers cannot run: see `stock_multiple` (the MoE experts' grouped-GEMM widths)."""
        self.validate(parent)
        sizes = self.sizes(parent)
        checks = [("", "hidden_size", self.hidden_size, parent)]
        checks += [(f"layer {i}: ", "moe_intermediate_size", sizes[i]["moe_intermediate_size"], parent.layer(i))
                   for i in self.kept_layers(parent) if "moe_intermediate_size" in sizes[i]]
        for where, name, v, p in checks:
            m = stock_multiple(p, name)
            if v is None or v % m == 0 or v == getattr(p, name):
                continue
            lo, hi = v // m * m, v // m * m + m
            near = " or ".join(str(s) for s in (lo, hi) if 0 < s <= getattr(p, name))
            raise _error(f"{where}{name}={v} is not a multiple of {m}, so stock transformers cannot run the "
                         "export: its NemotronH MoE experts use torch's grouped GEMM, which needs strides of "
                         f"{GROUPED_GEMM_BYTES} bytes ({m} values in {'bf16' if m == 8 else 'fp32'}); use {near}")

    def _attention(self, p: ModelConfig, i: int) -> tuple[int, int]:
        """(query heads, KV groups) kept in attention layer i, whose parent config is p."""
        kv = self._value(KV, i) or p.num_key_value_heads
        q = self._value(Q, i) or kv * (p.num_attention_heads // p.num_key_value_heads)
        return q, kv

    def sizes(self, parent: ModelConfig) -> list[dict]:
        """Per parent layer, the kept size of every axis it has (dropped layers included)."""
        self.validate(parent)
        out = []
        for i, kind in enumerate(parent.layer_types):
            p = parent.layer(i)
            s = {a: self._value(a, i) or getattr(p, a) for a in PER_LAYER_SIZES if applies(parent, kind, a)}
            if kind == "*":
                s[Q], s[KV] = self._attention(p, i)
            out.append(s)
        return out

    def config(self, parent: ModelConfig) -> ModelConfig:
        """The sliced model's config: sizes equal over the kept layers become plain fields, the rest
        go into `layer_sizes`; dropped layers leave `layer_types`."""
        sizes, kept = self.sizes(parent), self.kept_layers(parent)
        values = {a: [sizes[i][a] for i in kept if a in sizes[i]] for a in PER_LAYER_SIZES}
        hetero = {a for a, v in values.items() if len(set(v)) > 1}
        if hetero & {Q, KV}:  # per layer together, so that the plain pair is one valid layer's
            hetero |= {Q, KV}
        plain = {a: v[0] if v else getattr(parent, a) for a, v in values.items()}
        layer_sizes = [{a: sizes[i][a] for a in PER_LAYER_SIZES if a in hetero and a in sizes[i]} for i in kept]
        return replace(parent, hidden_size=self.hidden_size or parent.hidden_size,
                       layer_types="".join(parent.layer_types[i] for i in kept),
                       layer_sizes=layer_sizes if hetero else None, **plain)

    def num_parameters(self, parent: ModelConfig) -> int:
        """Parameters of the sliced model, counted from the config alone."""
        return count_parameters(self.config(parent))

    def is_homogeneous(self, parent: ModelConfig) -> bool:
        """Whether the sliced model is a stock Hugging Face architecture (one size per axis)."""
        return self.config(parent).layer_sizes is None

    # ------------------------------------------------------------------------- units kept

    def indices(self, parent: ModelConfig) -> dict[str, torch.Tensor]:
        """Kept unit indices (into the parent's units), for every axis that loses units, keyed as
        importance scores are: "hidden", "layers.{i}.attn_heads" (+ ".kv_heads"), ".mamba_heads",
        ".mamba_channels", ".ffn", ".experts", ".expert_ffn", ".shared_ffn". Kept layers only."""
        sizes = self.sizes(parent)
        out = {}
        if self.hidden_size is not None and self.hidden_size < parent.hidden_size:
            out["hidden"] = torch.arange(self.hidden_size)
        for i in self.kept_layers(parent):
            p, s, key = parent.layer(i), sizes[i], f"layers.{i}."
            if Q in s and s[Q] < p.num_attention_heads:
                q, kv = s[Q], s[KV]
                out[key + "attn_heads"] = grouped_prefix(p.num_attention_heads, p.num_key_value_heads, kv, q // kv)
                if kv < p.num_key_value_heads:
                    out[key + "kv_heads"] = torch.arange(kv)
            if "mamba_num_heads" in s and s["mamba_num_heads"] < p.mamba_num_heads:
                out[key + "mamba_heads"] = grouped_prefix(p.mamba_num_heads, p.n_groups, p.n_groups,
                                                          s["mamba_num_heads"] // p.n_groups)
            if "n_routed_experts" in s and s["n_routed_experts"] < p.n_routed_experts:
                out[key + "experts"] = grouped_prefix(p.n_routed_experts, p.n_group, p.n_group,
                                                      s["n_routed_experts"] // p.n_group)
            for axis, name in (("mamba_head_dim", "mamba_channels"), ("intermediate_size", "ffn"),
                               ("moe_intermediate_size", "expert_ffn"),
                               ("moe_shared_expert_intermediate_size", "shared_ffn")):
                if axis in s and s[axis] < getattr(p, axis):
                    out[key + name] = torch.arange(s[axis])
        return out

    def within(self, other: "ElasticSpec", parent: ModelConfig) -> bool:
        """True when every layer and unit this spec keeps, `other` keeps too: the nesting of a smaller
        budget in a larger one (its weights a subset of the larger's)."""
        return self.outside(other, parent) is None

    def outside(self, other: "ElasticSpec", parent: ModelConfig) -> str | None:
        """None when this spec is `within` `other`; else the first thing it keeps that `other` drops,
        as "keeps layers [...]" or "<mask key>: keeps units" (validate's nesting check says which)."""
        extra = set(self.kept_layers(parent)) - set(other.kept_layers(parent))
        if extra:
            return f"keeps layers {sorted(extra)}"
        mine, theirs = self.masks(parent), other.masks(parent)
        for key in sorted(set(mine) | set(theirs)):
            m, t = mine.get(key), theirs.get(key)  # a missing mask keeps every unit
            if t is None or t.dim() == 0 or (m is not None and m.dim() == 0):
                continue  # layers are compared above
            if bool(((torch.ones_like(t) if m is None else m) > t).any()):
                return f"{key}: keeps units"
        return None

    def masks(self, parent: ModelConfig, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """Hard 0/1 masks that run this spec inside the full-size parent (`masking.masked`). Built on the
        host and copied to `device` in one transfer: on a GPU each copy from the host waits for its queue."""
        counts = unit_counts(parent)
        out = {}
        for key, idx in self.indices(parent).items():
            if key.endswith(".kv_heads"):
                continue  # a dropped KV group is dropped through its query heads
            m = torch.zeros(counts[key], dtype=dtype)
            m[idx] = 1
            out[key] = m
        kept = set(self.kept_layers(parent))
        for i in range(parent.num_layers):
            if i not in kept:
                out[f"layers.{i}"] = torch.zeros((), dtype=dtype)
        if device is None or torch.device(device).type == "cpu" or not out:
            return out
        flat = torch.cat([m.reshape(-1) for m in out.values()]).to(device)
        return {k: v.view(m.shape) for (k, m), v in zip(out.items(), flat.split([m.numel() for m in out.values()]))}


def unit_counts(cfg: ModelConfig) -> dict[str, int]:
    """Number of units per axis key ("hidden", "layers.{i}.{axis}") of a model with config `cfg`."""
    counts = {"hidden": cfg.hidden_size}
    for i, kind in enumerate(cfg.layer_types):
        c, key = cfg.layer(i), f"layers.{i}."
        if kind == "*":
            counts[key + "attn_heads"], counts[key + "kv_heads"] = c.num_attention_heads, c.num_key_value_heads
        if kind == "-" or cfg.family == "llama":
            counts[key + "ffn"] = c.intermediate_size
        if kind == "M":
            counts[key + "mamba_heads"], counts[key + "mamba_channels"] = c.mamba_num_heads, c.mamba_head_dim
        if kind == "E":
            counts[key + "experts"] = c.n_routed_experts
            counts[key + "expert_ffn"] = c.moe_intermediate_size
            counts[key + "shared_ffn"] = c.moe_shared_expert_intermediate_size
    return counts


# ----------------------------------------------------------------------------- counting

def _linear(i, o, bias: bool):
    return i * o + (o if bias else 0)


def _mlp(D, width, bias: bool, gated: bool):
    return _linear(D, width, bias) * (2 if gated else 1) + _linear(width, D, bias)


def _attention(c: ModelConfig, D, s: dict):
    q, kv = s["num_attention_heads"] * c.head_dim, s["num_key_value_heads"] * c.head_dim
    return _linear(D, q, c.attention_bias) + 2 * _linear(D, kv, c.attention_bias) + _linear(q, D, c.attention_bias)


def mamba_dims(c: ModelConfig, s: dict):
    """(heads, d_inner, conv channels) of a Mamba layer with sizes s."""
    h = s["mamba_num_heads"]
    inner = h * s["mamba_head_dim"]
    return h, inner, inner + 2 * c.n_groups * c.ssm_state_size


def layer_params(parent: ModelConfig, i: int, D, s: dict, active: bool) -> tuple[object, object]:
    """(parameters of layer i of `parent`, of which fp32 router weights) with the kept sizes s (ints,
    or tensors of expected sizes: the cost model differentiates through them); `active` counts only
    top-k routed experts. The one parameter formula: `count_parameters` and the cost model use it."""
    c, kind = parent.layer(i), parent.layer_types[i]
    if parent.family == "llama":
        return 2 * D + _attention(c, D, s) + _mlp(D, s["intermediate_size"], c.mlp_bias, c.mlp_gated), 0
    n = D  # the block's norm
    if kind == "*":
        return n + _attention(c, D, s), 0
    if kind == "-":
        return n + _mlp(D, s["intermediate_size"], c.mlp_bias, c.mlp_gated), 0
    if kind == "M":
        h, inner, conv = mamba_dims(c, s)
        n = n + _linear(D, inner + conv + h, c.mamba_bias) + conv * c.conv_kernel + (conv if c.use_conv_bias else 0)
        return n + 3 * h + inner + _linear(inner, D, c.mamba_bias), 0  # dt_bias, A_log, D; gated norm; out_proj
    # MoE: router, routed experts (in the latent space if any), shared expert, latent projections
    d = c.moe_latent_size or D
    experts = c.num_experts_per_tok if active else s["n_routed_experts"]
    router = s["n_routed_experts"] * D
    n = n + router + 2 * experts * s["moe_intermediate_size"] * d
    n = n + _mlp(D, s["moe_shared_expert_intermediate_size"], c.mlp_bias, False)
    if c.moe_latent_size is not None:
        n = n + _linear(D, d, c.mlp_bias) + _linear(d, D, c.mlp_bias)
    return n, router


def embedding_params(cfg: ModelConfig, D):
    """Embeddings, lm_head (once when tied) and the final norm at hidden size D."""
    return cfg.vocab_size * D * (1 if cfg.tied else 2) + D


def count_parameters(cfg: ModelConfig) -> int:
    """Unique parameters of `Model(cfg)` (as transformers counts them), computed from the config."""
    return embedding_params(cfg, cfg.hidden_size) + sum(
        layer_params(cfg, i, cfg.hidden_size, s, active=False)[0] for i, s in enumerate(ElasticSpec().sizes(cfg)))
