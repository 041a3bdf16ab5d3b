"""The budget router: which sub-architecture each budget runs (METHOD.md §6).

Per elastic axis, a small MLP maps the budget (a one-hot over the trained budgets; a budget between
two trained ones blends their one-hots) to logits over that axis' discrete choices: one set for the
whole model (homogeneous) or one per layer (heterogeneous). Choice c keeps the prefix of the top-c
units of the importance-sorted parent (per group for attention and Mamba heads and routed experts),
so every choice is a mask `Model.set_masks` takes and a size `ElasticSpec` can hold.

Training samples with Gumbel-softmax (temperature annealed 1.0 -> 0.05, logits scaled 1 -> 10 over
training progress). Hard mode runs the sampled choice's prefix mask "times its probability" as
a straight-through estimator: the forward value is the exact 0/1 prefix, the gradient that of
prefix x probability, so the task loss reaches the router without shrinking the kept units; soft
mode runs the probability-weighted sum of prefix masks.
The budget loss sees the expected sizes under the choice distribution softmax(logits x scale).
In eval mode there is no noise and no schedule: the argmax choice (`spec`), whose hard masks are
exact 0/1 and run the same function as the sliced model.

Axes (names as in search.py): hidden, attention (query heads per KV group; KV groups stay whole),
mamba (heads per group), mamba_channels, ffn, experts (per router group, enough for top-k),
expert_ffn, shared_ffn, depth (layers kept, least important dropped first; one choice for the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from star_elastic.model import ModelConfig

from .cost import Arch, Budget
from .spec import ElasticSpec, applies, grouped_prefix

# axis -> (ElasticSpec / ModelConfig field, mask key suffix)
AXES = {
    "hidden": ("hidden_size", "hidden"),
    "attention": ("num_attention_heads", "attn_heads"),
    "mamba": ("mamba_num_heads", "mamba_heads"),
    "mamba_channels": ("mamba_head_dim", "mamba_channels"),
    "ffn": ("intermediate_size", "ffn"),
    "experts": ("n_routed_experts", "experts"),
    "expert_ffn": ("moe_intermediate_size", "expert_ffn"),
    "shared_ffn": ("moe_shared_expert_intermediate_size", "shared_ffn"),
    "depth": ("layers", None),
}
DEFAULT_AXES = ("hidden", "attention", "mamba", "ffn", "experts")


@dataclass
class RouterConfig:
    axes: tuple = DEFAULT_AXES  # elastic axes; those the parent lacks are skipped
    heterogeneous: bool = False  # per-layer choices (else one size per axis); hidden and depth are always one
    hidden_dim: int = 256  # width of every axis' MLP
    width_choices: int = 16  # widths (hidden, FFN, ...) in steps of 1/width_choices of the parent's
    width_multiple: int | None = None  # or in steps of this many units (e.g. 64 on GPUs)
    min_layers: int = 1  # depth: fewest layers a choice keeps
    tau: tuple = (1.0, 0.05)  # Gumbel-softmax temperature at progress 0 and 1 (geometric in between)
    scale: tuple = (1.0, 10.0)  # logit scale at progress 0 and 1 (linear in between)


def width_choices(n: int, steps: int, multiple: int | None = None) -> list[int]:
    """Kept widths of an axis of n units: multiples of `multiple`, or of ceil(n / steps), then n."""
    step = multiple or max(1, math.ceil(n / steps))
    return list(range(step, n, step)) + [n]


@dataclass
class _Slot:
    """One softmax: the choices of an axis for the layers in `layers` (all of them share it). Its
    (choices, units) 0/1 prefix masks are the router buffer `slot_prefix(name)`."""

    axis: str
    layers: list[int]  # parent layers it sets; [] for hidden and depth
    sizes: list[int]  # kept units per choice, ascending (the last is the parent's size)


@dataclass
class RouterOutput:
    """One router decision. `masks` for `Model.set_masks`; `arch` expected sizes for the cost model;
    per slot (an axis, or an axis of one layer): `probs` (the choice distribution), `sample` (the
    Gumbel-softmax relaxation the masks are built from) and the `choice` taken."""

    masks: dict[str, torch.Tensor]
    arch: Arch
    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    sample: dict[str, torch.Tensor] = field(default_factory=dict)
    choice: dict[str, int] = field(default_factory=dict)
    chosen_arch: Arch | None = None  # the sizes of the choices taken: the architecture the masks run


class Router(nn.Module):
    """Budget -> per-axis choices of the importance-sorted `parent`.

    `budgets`: the trained budgets (their count sets the one-hot size; their targets let `blend`
    interpolate a budget in between). `layer_order` (least important first, as depth importance
    gives it) is needed for the depth axis."""

    def __init__(self, parent: ModelConfig, budgets: list[Budget] | int, config: RouterConfig | None = None,
                 layer_order=None):
        super().__init__()
        self.parent, self.config = parent, config or RouterConfig()
        self.budgets = list(budgets) if not isinstance(budgets, int) else []
        self.n_budgets = budgets if isinstance(budgets, int) else len(self.budgets)
        if self.n_budgets < 1:
            raise ValueError("a router needs at least one budget")
        unknown = set(self.config.axes) - set(AXES)
        if unknown:
            raise ValueError(f"unknown router axis {sorted(unknown)[0]!r} (known: {', '.join(AXES)})")
        self.layer_order = None if layer_order is None else [int(i) for i in layer_order]
        self.slots: dict[str, _Slot] = {}
        for axis in self.config.axes:
            for name, (slot, prefix) in self._slots(axis).items():
                self.slots[name] = slot  # derived from the parent: rebuilt, not saved
                self.register_buffer(f"prefix_{name.replace('.', '_')}", prefix, persistent=False)
        axes = sorted({s.axis for s in self.slots.values()}, key=list(AXES).index)
        H = self.config.hidden_dim
        self.mlps = nn.ModuleDict({
            a: nn.Sequential(nn.Linear(self.n_budgets, H), nn.LeakyReLU(),
                             nn.Linear(H, sum(len(s.sizes) for s in self.slots.values() if s.axis == a)))
            for a in axes})
        self.register_buffer("progress", torch.zeros(()))  # in the state dict: a resumed run resumes the schedule
        self._full = Arch.full(parent)

    # ------------------------------------------------------------------------- choices

    def _slots(self, axis: str) -> dict[str, tuple[_Slot, torch.Tensor]]:
        p, cfg = self.parent, self.config
        field_name = AXES[axis][0]
        if axis == "hidden":
            multiple = cfg.width_multiple or max(1, math.ceil(p.hidden_size / cfg.width_choices))
            if p.family == "llama":  # transformers' LlamaConfig wants hidden_size % num_attention_heads == 0
                multiple = math.lcm(multiple, *self._query_head_counts())
            sizes = width_choices(p.hidden_size, cfg.width_choices, multiple)
            return {"hidden": (_Slot(axis, [], sizes), _prefixes(p.hidden_size, sizes))}
        if axis == "depth":
            if p.num_layers < 2:
                return {}
            if self.layer_order is None or sorted(self.layer_order) != list(range(p.num_layers)):
                raise ValueError("the depth axis needs layer_order: every layer index, least important first")
            sizes = list(range(max(1, cfg.min_layers), p.num_layers + 1))
            rank = torch.empty(p.num_layers, dtype=torch.long)  # 0 = most important
            rank[torch.tensor(self.layer_order[::-1])] = torch.arange(p.num_layers)
            prefix = (rank[None, :] < torch.tensor(sizes)[:, None]).float()
            return {"depth": (_Slot(axis, [], sizes), prefix)}
        per_layer = {}
        for i, kind in enumerate(p.layer_types):
            if applies(p, kind, field_name):
                per_layer[i] = _layer_choices(p.layer(i), axis, cfg)
        if not per_layer:
            return {}
        if cfg.heterogeneous:
            return {f"{axis}.{i}": (_Slot(axis, [i], s), m) for i, (s, m) in per_layer.items()}
        first = next(iter(per_layer.values()))
        if any(s != first[0] or not torch.equal(m, first[1]) for s, m in per_layer.values()):
            raise ValueError(f"the parent's layers differ in {field_name}: one {axis} size for every layer "
                             "cannot fit them (use a heterogeneous router)")
        return {axis: (_Slot(axis, list(per_layer), first[0]), first[1])}

    def _query_head_counts(self) -> set[int]:
        """Every query-head count an attention layer can keep (the parent's only, when attention
        is not elastic)."""
        p = self.parent
        if "attention" not in self.config.axes:
            return {p.layer(i).num_attention_heads for i, k in enumerate(p.layer_types) if k == "*"} or {1}
        return {q for i, k in enumerate(p.layer_types) if k == "*" for q in _layer_choices(p.layer(i), "attention",
                                                                                              self.config)[0]}

    def slot_prefix(self, name: str) -> torch.Tensor:
        return getattr(self, f"prefix_{name.replace('.', '_')}")

    # ------------------------------------------------------------------------- schedule

    def set_progress(self, p: float) -> None:
        """Training progress in [0, 1]: sets the Gumbel temperature and the logit scale."""
        self.progress.fill_(min(max(float(p), 0.0), 1.0))

    @property
    def tau(self) -> float:
        (t0, t1), p = self.config.tau, float(self.progress)
        return t0 * (t1 / t0) ** p  # geometric: as much time at 1 -> 0.2 as at 0.2 -> 0.05

    @property
    def scale(self) -> float:
        (s0, s1), p = self.config.scale, float(self.progress)
        return s0 + (s1 - s0) * p

    # ------------------------------------------------------------------------- budgets

    def blend(self, budget) -> torch.Tensor:
        """The router input for `budget`: an int index (one-hot), a float index (1.5 = half budget 1,
        half budget 2), a Budget (trained: its one-hot; else the two trained budgets of its kind around
        its target, blended linearly in the target), or a weight vector as it is."""
        device = self.progress.device
        if torch.is_tensor(budget):
            if budget.shape != (self.n_budgets,):
                raise ValueError(f"a budget vector has shape ({self.n_budgets},), got {tuple(budget.shape)}")
            return budget.to(device=device, dtype=torch.float32)
        if isinstance(budget, Budget):
            return self._blend_budget(budget)
        x = float(budget)
        if not 0 <= x <= self.n_budgets - 1:
            raise ValueError(f"budget index {budget} is outside 0..{self.n_budgets - 1}")
        lo = min(int(x), self.n_budgets - 2) if self.n_budgets > 1 else 0
        w = torch.zeros(self.n_budgets, device=device)
        w[lo] = 1 - (x - lo)
        if x > lo:
            w[lo + 1] = x - lo
        return w

    def _blend_budget(self, b: Budget) -> torch.Tensor:
        w = torch.zeros(self.n_budgets, device=self.progress.device)
        same = sorted((t.target, i) for i, t in enumerate(self.budgets) if t.kind == b.kind)
        for target, i in same:
            if target == b.target:
                w[i] = 1
                return w
        for (t0, i0), (t1, i1) in zip(same, same[1:]):
            if t0 < b.target < t1:
                a = (b.target - t0) / (t1 - t0)
                w[i0], w[i1] = 1 - a, a
                return w
        trained = ", ".join(t.name or f"{t.target:g}" for t in self.budgets if t.kind == b.kind) or "none"
        raise ValueError(f"budget {b.name or b.target} ({b.kind}) is not between two trained {b.kind} budgets "
                         f"(trained: {trained})")

    # ------------------------------------------------------------------------- decisions

    def logits(self, budget) -> dict[str, torch.Tensor]:
        """Raw logits per slot for `budget` (see `blend`)."""
        x = self.blend(budget)
        out = {}
        for axis, mlp in self.mlps.items():
            flat = mlp(x)
            names = [n for n, s in self.slots.items() if s.axis == axis]
            for name, part in zip(names, flat.split([len(self.slots[n].sizes) for n in names])):
                out[name] = part
        return out

    def forward(self, budget, mode: str = "hard", generator: torch.Generator | None = None) -> RouterOutput:
        """Sample an architecture for `budget`.

        Training: probs p = softmax(logits x scale), the distribution a choice is drawn from; sample
        y = Gumbel-softmax(logits x scale, tau), whose argmax is a draw from p (Gumbel-max). Hard mode
        masks = the prefix of y's argmax, straight-through (forward 0/1, gradient of prefix x y_k);
        soft mode = sum_c y_c prefix_c. `arch` = the
        p-weighted sizes, so the cost model gives the expected cost of the drawn architecture (exact:
        the costs are linear in each axis), without the noise of a single sample and without
        vanishing as tau -> 0. Eval (inference), whatever the mode: the argmax of the logits (scale 1,
        no noise), exact 0/1 masks and `arch` = its sizes."""
        if mode not in ("hard", "soft"):
            raise ValueError(f"router mode is 'hard' or 'soft', got {mode!r}")
        probs, samples, choice, weights, size_weights = {}, {}, {}, {}, {}
        full = not self.training and self._is_full(budget)  # inference of b = 1: the parent (see `spec`)
        for name, logit in self.logits(budget).items():
            prefix = self.slot_prefix(name)
            if self.training:
                u = torch.rand(logit.shape, generator=generator, device=logit.device if generator is None else "cpu")
                gumbel = -torch.log(-torch.log(u.to(logit.device).clamp(1e-10, 1 - 1e-7)))
                p = F.softmax(logit * self.scale, dim=-1)
                y = F.softmax((logit * self.scale + gumbel) / self.tau, dim=-1)
                k = int(y.argmax())
                # hard: straight-through. The forward runs the exact 0/1 prefix (multiplying by y_k
                # itself would shrink every kept unit to a few % while choices are many and y flat);
                # the backward is that of prefix * y_k, so the task loss still reaches the router.
                weights[name] = y @ prefix if mode == "soft" else prefix[k] + prefix[k] * (y[k] - y[k].detach())
                size_weights[name] = p
            else:
                p = y = F.softmax(logit, dim=-1)
                k = len(y) - 1 if full else int(y.argmax())
                weights[name] = prefix[k]
                size_weights[name] = F.one_hot(torch.tensor(k, device=y.device), len(y)).to(y.dtype)
            probs[name], samples[name], choice[name] = p, y, k
        arch = self._arch(size_weights)
        chosen = arch  # at inference `arch` already is the sizes of the choices taken
        if self.training:
            chosen = self._arch({n: F.one_hot(torch.tensor(k), len(probs[n])).to(probs[n]) for n, k in choice.items()})
        return RouterOutput(self._masks(weights), arch, probs, samples, choice, chosen)

    def _masks(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masks = {}
        for name, w in weights.items():
            slot = self.slots[name]
            if slot.axis == "hidden":
                masks["hidden"] = w
            elif slot.axis == "depth":
                masks.update({f"layers.{i}": w[i] for i in range(self.parent.num_layers)})
            else:
                masks.update({f"layers.{i}.{AXES[slot.axis][1]}": w for i in slot.layers})
        return masks

    def _arch(self, probs: dict[str, torch.Tensor]) -> Arch:
        """Expected sizes: the parent's, overridden by the `probs`-weighted choices of every slot."""
        arch = Arch(self._full.hidden, [dict(s) for s in self._full.layers])
        for name, y in probs.items():
            slot = self.slots[name]
            expected = y @ torch.tensor(slot.sizes, dtype=y.dtype, device=y.device)
            if slot.axis == "hidden":
                arch.hidden = expected
            elif slot.axis == "depth":
                keep = y @ self.slot_prefix(name)
                for i, s in enumerate(arch.layers):
                    s["keep"] = keep[i]
            else:
                for i in slot.layers:
                    arch.layers[i][AXES[slot.axis][0]] = expected
        return arch

    @torch.no_grad()
    def spec(self, budget) -> ElasticSpec:
        """The inference architecture for `budget`: every slot's argmax (scale 1, no noise), validated
        against the parent. Deterministic: it depends on the router weights and the budget only.
        A trained full budget (b = 1) is the whole parent by definition: the anchor loss pulls its
        choices there, and this makes it exact however far training got."""
        if self._is_full(budget):
            return ElasticSpec()
        choice = {name: int(logit.argmax()) for name, logit in self.logits(budget).items()}
        return self.spec_of(choice)

    def _is_full(self, budget) -> bool:
        """`budget` is exactly a trained full budget (b = 1)."""
        w = self.blend(budget)
        return any(b.is_full and float(w[i]) == 1.0 for i, b in enumerate(self.budgets))

    def spec_of(self, choice: dict[str, int]) -> ElasticSpec:
        """The ElasticSpec of one choice index per slot (as `RouterOutput.choice`)."""
        p, kw = self.parent, {}
        for name, k in choice.items():
            slot = self.slots[name]
            size, full = slot.sizes[k], slot.sizes[-1]
            field_name = AXES[slot.axis][0]
            if slot.axis == "depth":
                if size < p.num_layers:
                    kw["layers"] = sorted(self.layer_order[p.num_layers - size:])
            elif slot.axis == "hidden" or not self.config.heterogeneous:
                if size < full:
                    kw[field_name] = size
            elif size < full:
                kw.setdefault(field_name, [None] * p.num_layers)[slot.layers[0]] = size
        spec = ElasticSpec(**kw)
        spec.validate(p)
        return spec


def _prefixes(units: int, sizes: list[int], groups: int = 1) -> torch.Tensor:
    """(choices, units): row c keeps the first sizes[c] / groups units of each of `groups` contiguous groups."""
    out = torch.zeros(len(sizes), units)
    for c, n in enumerate(sizes):
        out[c, grouped_prefix(units, groups, groups, n // groups)] = 1
    return out


def _layer_choices(c: ModelConfig, axis: str, cfg: RouterConfig) -> tuple[list[int], torch.Tensor]:
    """(sizes, prefix masks) of `axis` in a layer whose own config is c."""
    if axis == "attention":  # query heads evenly inside every KV group
        kv, per = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        sizes = [kv * k for k in range(1, per + 1)]
        return sizes, _prefixes(c.num_attention_heads, sizes, kv)
    if axis == "mamba":  # the same number of heads in every group
        g = c.n_groups
        sizes = [g * k for k in range(1, c.mamba_num_heads // g + 1)]
        return sizes, _prefixes(c.mamba_num_heads, sizes, g)
    if axis == "experts":  # per router group: at least 2 (groups rank by their best two) and enough for top-k
        g, per = c.n_group, c.n_routed_experts // c.n_group
        lo = max(min(2, per), math.ceil(c.num_experts_per_tok / c.topk_group))
        sizes = [g * k for k in range(lo, per + 1)]
        return sizes, _prefixes(c.n_routed_experts, sizes, g)
    n = getattr(c, AXES[axis][0])
    sizes = width_choices(n, cfg.width_choices, cfg.width_multiple)
    return sizes, _prefixes(n, sizes)
