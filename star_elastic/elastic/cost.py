"""Analytic, differentiable cost of a sub-architecture, and budgets (docs/METHOD.md §6).

A sub-architecture is given as an `Arch`: the hidden size plus, per parent layer, how many units of
each axis it keeps and `keep`, the weight of the layer itself (1 kept, 0 dropped). The sizes are
ints for a concrete spec (`Arch.from_spec`) or tensors of expected sizes from the router; the same
formulas serve both, so with ints the costs are exact integers and with tensors gradients flow back
to the router. Three costs:

- params: unique parameters, equal to `count_parameters(spec.config(parent))` and to
  `Model(...).num_parameters()` for a spec.
- active: parameters one token runs through: everything but the routed experts, of which only the
  top-k count (the router and the shared expert count in full, embeddings and lm_head too).
- memory: bytes of the model's weights (the state dict; MoE routers stay fp32 as in `model.py`)
  plus its generation caches (`Model.make_cache`): per attention layer K and V,
  2 x kv_heads x head_dim x seq_len x batch in the model dtype; per Mamba layer the conv state
  (batch x conv_dim x (kernel - 1), model dtype) and the SSM state (batch x heads x head_dim x
  state, fp32). Activations are not counted: they depend on the serving engine.

The costs are multilinear in the sizes of different axes (hidden x FFN width, depth x anything,
Mamba heads x head_dim), and the router samples axes independently, so the cost of the expected
sizes is the expected cost: no approximation is hidden in feeding expected sizes in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from star_elastic.errors import StarElasticError
from star_elastic.model import ModelConfig

from .spec import ElasticSpec, embedding_params, layer_params, mamba_dims

COST_KINDS = ("params", "active", "memory")
BAND = 0.05  # a budget is met within this relative distance of its target: the budget loss' dead band,
#              the projection after training and `validate` all use it


# ----------------------------------------------------------------------------- architectures

@dataclass
class Arch:
    """Sizes of a sub-architecture of `parent`: ints, floats or 0-dim tensors.

    `layers[i]` holds, for parent layer i, "keep" and every axis of PER_LAYER_SIZES the layer has
    (as `ElasticSpec.sizes` names them)."""

    hidden: object
    layers: list[dict] = field(default_factory=list)

    @classmethod
    def full(cls, parent: ModelConfig) -> "Arch":
        return cls.from_spec(ElasticSpec(), parent)

    @classmethod
    def from_spec(cls, spec: ElasticSpec, parent: ModelConfig) -> "Arch":
        """The exact (integer) sizes of `spec`; dropped layers have keep 0."""
        sizes, kept = spec.sizes(parent), set(spec.kept_layers(parent))
        layers = [{"keep": int(i in kept), **s} for i, s in enumerate(sizes)]
        return cls(spec.hidden_size or parent.hidden_size, layers)


# ----------------------------------------------------------------------------- counting

def _params(parent: ModelConfig, arch: Arch, active: bool) -> tuple[object, object]:
    """(parameters, of which fp32 MoE router weights) of `arch`."""
    D = arch.hidden
    total = embedding_params(parent, D)
    routers = 0
    for i, s in enumerate(arch.layers):
        n, r = layer_params(parent, i, D, s, active)
        total = total + s["keep"] * n
        routers = routers + s["keep"] * r
    return total, routers


def count_params(parent: ModelConfig, arch: Arch):
    """Unique parameters of `arch` (an int for integer sizes)."""
    return _params(parent, arch, active=False)[0]


def count_active(parent: ModelConfig, arch: Arch):
    """Parameters active per token: routed experts count top-k (num_experts_per_tok) per MoE layer."""
    return _params(parent, arch, active=True)[0]


# ----------------------------------------------------------------------------- memory

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype) -> torch.dtype:
    """A torch dtype from itself or a name ("bf16", "bfloat16", "torch.bfloat16", "fp32", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise StarElasticError(f"unknown dtype {dtype!r} (known: {', '.join(sorted(_DTYPES))})")
    return _DTYPES[name]


@dataclass
class MemorySettings:
    """What a memory cost is measured at. Defaults: a 4096-token context, batch 1, bf16 weights and
    caches (what a GPU serves); the SSM state is fp32 whatever the dtype, as in `Model.make_cache`.
    `dtype` is kept as its name ("bfloat16"), so that the settings are plain JSON."""

    seq_len: int = 4096
    batch: int = 1
    dtype: str = "bfloat16"

    def __post_init__(self):
        self.dtype = str(resolve_dtype(self.dtype)).removeprefix("torch.")
        for name in ("seq_len", "batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StarElasticError(f"memory cost: {name} must be a positive integer, got {v!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)


def memory_bytes(parent: ModelConfig, arch: Arch, settings: MemorySettings | None = None):
    """Weights (the state dict, MoE routers and their correction bias in fp32) plus the KV cache and
    Mamba conv/SSM states for `settings.batch` sequences of `settings.seq_len` tokens."""
    st = settings or MemorySettings()
    size, fp32 = st.torch_dtype.itemsize, 4
    params, routers = _params(parent, arch, active=False)
    total = (params - routers) * size + routers * fp32
    for i, s in enumerate(arch.layers):
        c, kind, cache = parent.layer(i), parent.layer_types[i], 0
        if kind == "*":
            cache = 2 * st.batch * s["num_key_value_heads"] * st.seq_len * c.head_dim * size
        elif kind == "M":
            h, _, conv = mamba_dims(c, s)
            cache = st.batch * conv * (c.conv_kernel - 1) * size
            cache = cache + st.batch * h * s["mamba_head_dim"] * c.ssm_state_size * fp32
        elif kind == "E":
            cache = s["n_routed_experts"] * fp32  # e_score_correction_bias, a buffer of the state dict
        total = total + s["keep"] * cache
    return total


# ----------------------------------------------------------------------------- one entry point

class CostModel:
    """The three costs of architectures of one parent; `cost(kind, arch)` picks one."""

    def __init__(self, parent: ModelConfig, memory: MemorySettings | None = None):
        self.parent = parent
        self.memory_settings = memory or MemorySettings()
        self._full = {}

    def cost(self, kind: str, arch: Arch):
        if kind == "params":
            return count_params(self.parent, arch)
        if kind == "active":
            return count_active(self.parent, arch)
        if kind == "memory":
            return memory_bytes(self.parent, arch, self.memory_settings)
        raise ValueError(f"unknown cost kind {kind!r} (known: {', '.join(COST_KINDS)})")

    def full(self, kind: str) -> int:
        """The parent's own cost."""
        if kind not in self._full:
            self._full[kind] = self.cost(kind, Arch.full(self.parent))
        return self._full[kind]

    def spec_cost(self, kind: str, spec: ElasticSpec) -> int:
        return self.cost(kind, Arch.from_spec(spec, self.parent))


# ----------------------------------------------------------------------------- budgets

@dataclass(frozen=True)
class Budget:
    """A target cost. `target` is absolute (parameters or bytes); `full` the parent's cost of the
    same kind, so `fraction = target / full` is the `b` of docs/METHOD.md §6. `name` is the text given."""

    kind: str
    target: float
    full: float
    name: str = ""

    @property
    def fraction(self) -> float:
        return self.target / self.full

    @property
    def is_full(self) -> bool:
        """The whole parent (b = 1), which gets the extra pull toward the full choice."""
        return self.target >= self.full


_COUNT = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_VALUE = re.compile(r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?)\s*(?P<unit>[a-z%]*)", re.IGNORECASE)
_KIND = {"params": "params", "total": "params", "active": "active", "mem": "memory", "memory": "memory"}
_HELP = "e.g. 0.5, 50%, 70M, 1.2B, active=0.6, active=500M, mem=2GB, mem=0.5"


def parse_budget(text, parent: ModelConfig, memory: MemorySettings | None = None) -> Budget:
    """A budget from its command-line form.

    `0.5` / `50%`: that fraction of the parent's total parameters (`1.0` is the parent);
    `70M`, `1.2B`, `500K`, `123456`: an absolute parameter count (a plain integer is a count);
    `params=...`: the same, spelled out; `active=0.6` / `active=500M`: of active parameters;
    `mem=2GB` / `mem=1.5GiB` / `mem=0.5`: bytes (weights + caches at `memory`'s sequence length,
    batch and dtype; default 4096 tokens, batch 1, bf16), a number without unit being a fraction.
    """
    s = str(text).strip().replace("_", "")
    key, _, value = s.rpartition("=")
    kind = _KIND.get(key.strip().lower()) if key else "params"
    if kind is None:
        raise StarElasticError(f"budget {str(text)!r}: unknown cost {key.strip()!r} "
                               f"(known: params=, active=, mem=; {_HELP})")
    m = _VALUE.fullmatch(value.strip())
    if m is None:
        raise StarElasticError(f"budget {str(text)!r} is not a number ({_HELP})")
    num, unit = float(m["num"]), m["unit"].lower()
    fraction = unit == "%" or (unit == "" and (kind == "memory" or not re.fullmatch(r"\d+", m["num"])))
    units = _BYTES if kind == "memory" else _COUNT
    if not fraction and unit not in units:
        raise StarElasticError(f"budget {str(text)!r}: unknown unit {m['unit']!r} "
                               f"(known: {', '.join(u.upper().replace('IB', 'iB') for u in units if u)})")
    if not math.isfinite(num) or num <= 0:
        raise StarElasticError(f"budget {str(text)!r} must be positive")
    if fraction and num / (100 if unit == "%" else 1) > 1:
        raise StarElasticError(f"budget {str(text)!r} is more than the whole parent: a fraction is at most 1.0 "
                               f"({_HELP})")
    full = CostModel(parent, memory).full(kind)
    target = num / (100 if unit == "%" else 1) * full if fraction else num * units[unit]
    if kind != "memory":
        target = int(target) if fraction else int(round(target))  # fractions floor: a budget is an upper bound
    what = {"params": "parameters", "active": "active parameters", "memory": "bytes"}[kind]
    if target > full:
        raise StarElasticError(f"budget {str(text)!r} is {target:,.0f}, more than the parent's {full:,} {what}")
    if target < 1:
        raise StarElasticError(f"budget {str(text)!r} is less than one {'byte' if kind == 'memory' else 'parameter'}")
    return Budget(kind, target, full, str(text).strip())
