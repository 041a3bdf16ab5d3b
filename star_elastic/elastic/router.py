"""The budget router: which sub-architecture each budget runs (docs/METHOD.md §7, §10).

Per elastic axis, a small MLP maps the budget (a one-hot over the trained budgets; a budget between
two trained ones blends their one-hots) to logits over that axis' discrete choices: one set for the
whole model (homogeneous) or one per layer (heterogeneous). Choice c keeps the prefix of the top-c
units of the importance-sorted parent (per group for attention and Mamba heads and routed experts),
so every choice is a mask `masking.masked` takes and a size `ElasticSpec` can hold.

Training draws a choice per slot from p = softmax(logits x scale), the scale ramped 1 -> 10 over
training progress (Gumbel-max; soft mode keeps the Gumbel-softmax relaxation, temperature annealed
1.0 -> 0.05). Hard masks forward the exact 0/1 prefix of the choice; the distillation loss reaches
the router by a score-function term (the drawn choice's loss against the argmax's on the same batch,
times log p of the choice; `Router.forward` says why not straight-through). The budget loss
(train.py) judges the drawn and the argmax architectures with the gradient of the expected cost
under p; an entropy floor keeps p from saturating. In eval mode there is no noise and no schedule:
the argmax choice (`spec`), whose hard masks are exact 0/1 and run the same function as the sliced
model. After training, `project_budgets` puts every budget in its band, nested, by construction.

Axes (names as in search.py): hidden, attention (query heads per KV group; KV groups stay whole),
mamba (heads per group), mamba_channels, ffn, experts (per router group, enough for top-k),
expert_ffn, shared_ffn, depth (layers kept, least important dropped first; one choice for the model).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from star_elastic.model import ModelConfig

from star_elastic.errors import StarElasticError

from .axes import AXES as REGISTRY
from .axes import DEFAULT_AXES
from .cost import BAND, Arch, Budget, CostModel
from .spec import ElasticSpec, aligned_multiple, applies, grouped_prefix, stock_multiple

ESTIMATORS = ("score", "straight-through")  # how the task loss reaches hard choices (Router.forward)

# axis -> (ElasticSpec / ModelConfig field, mask key suffix), from the registry
AXES = {name: (a.field, "hidden" if name == "hidden" else a.key) for name, a in REGISTRY.items()}


@dataclass
class RouterConfig:
    axes: tuple = DEFAULT_AXES  # elastic axes; those the parent lacks are skipped
    heterogeneous: bool = False  # per-layer choices (else one size per axis); hidden and depth are always one
    hidden_dim: int = 256  # width of every axis' MLP
    width_choices: int = 16  # widths (hidden, FFN, ...) in steps of about 1/width_choices of the parent's
    # "auto": widths aligned for GPUs (spec.aligned_multiple: 64 where the parent allows, else 32 / 16 / 8,
    # every size on tiny models; heads x head_dim too), in steps of the largest multiple of that alignment
    # that is at most 1/width_choices of the parent's (or the alignment itself; unaligned axes as None);
    # an int N (`--multiple N`): every multiple of N; None (checkpoints written before alignment, rebuilt
    # as trained): steps of ceil(n / width_choices).
    # "auto" and N also honour what stock transformers needs to run the export (spec.stock_multiple).
    width_multiple: int | str | None = "auto"
    min_layers: int = 1  # depth: fewest layers a choice keeps
    tau: tuple = (1.0, 0.05)  # Gumbel-softmax temperature at progress 0 and 1 (geometric in between)
    scale: tuple = (1.0, 10.0)  # logit scale at progress 0 and 1 (linear in between)


def width_choices(n: int, steps: int, multiple: int | None = None) -> list[int]:
    """Kept widths of an axis of n units: multiples of `multiple`, or of ceil(n / steps), then n."""
    step = multiple or max(1, math.ceil(n / steps))
    return list(range(step, n, step)) + [n]


def _width_step(c: ModelConfig, field_name: str, n: int, cfg: RouterConfig, base: int = 1) -> int:
    """The step of the kept widths of `field_name` (n units) in a layer of config c (see RouterConfig)."""
    before = math.lcm(max(1, math.ceil(n / cfg.width_choices)), base)  # the steps before alignment
    if cfg.width_multiple is None:  # checkpoints written before alignment load as they were trained
        return before
    if cfg.width_multiple == "auto":
        heads = c.mamba_num_heads if field_name == "mamba_head_dim" else 1  # a head_dim is in every head
        step = aligned_multiple(n, base=base, required=stock_multiple(c, field_name), width=n * heads)
        if step == base:  # nothing to align (test-sized axes): as before
            return before
        return step * max(1, n // (cfg.width_choices * step))
    if isinstance(cfg.width_multiple, str):
        raise ValueError(f"router width_multiple is 'auto', an integer or None, got {cfg.width_multiple!r}")
    return aligned_multiple(n, multiple=cfg.width_multiple, base=base, required=stock_multiple(c, field_name))


def _head_multiple(n: int, unit: int, cfg: RouterConfig) -> int:
    """Kept heads x head_dim (`unit`) of an axis of n heads are multiples of this (1 before alignment)."""
    if cfg.width_multiple is None:
        return 1
    return aligned_multiple(n, unit, multiple=None if cfg.width_multiple == "auto" else cfg.width_multiple)


@dataclass
class _Slot:
    """One softmax: the choices of an axis for the layers in `layers` (all of them share it). Its
    (choices, units) 0/1 prefix masks are the router buffer `slot_prefix(name)`."""

    axis: str
    layers: list[int]  # parent layers it sets; [] for hidden and depth
    sizes: list[int]  # kept units per choice, ascending (the last is the parent's size)


@dataclass
class RouterOutput:
    """One router decision. `masks` for `masking.masked`; `arch` expected sizes for the cost model;
    per slot (an axis, or an axis of one layer): `probs` (the choice distribution), `sample` (the
    Gumbel-softmax relaxation the masks are built from) and the `choice` taken."""

    masks: dict[str, torch.Tensor]
    arch: Arch
    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    sample: dict[str, torch.Tensor] = field(default_factory=dict)
    choice: dict[str, int] = field(default_factory=dict)
    chosen_arch: Arch | None = None  # the sizes of the choices taken: the architecture the masks run
    log_prob: torch.Tensor | None = None  # sum over slots of log p(choice): the score-function path
    trained: dict[str, int] | None = None  # the choice the model trains (the trainer's train_on: drawn or argmax)


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
        # a host copy of it: the schedule is read many times a step, and on a GPU each read of the
        # buffer would wait for the device (a host sync); refreshed whenever a state dict is loaded
        self._progress = 0.0
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_progress())
        self._full = Arch.full(parent)
        # device copies of host values read every step (`blend`, `expected_arch`): on a GPU each copy from
        # the host is a sync. Plain dicts, not buffers: the state dict keeps its keys
        self._blends: dict = {}
        self._sizes: dict = {}

    def _read_progress(self) -> None:
        self._progress = float(self.progress)

    # ------------------------------------------------------------------------- choices

    def _slots(self, axis: str) -> dict[str, tuple[_Slot, torch.Tensor]]:
        p, cfg = self.parent, self.config
        field_name = AXES[axis][0]
        if axis == "hidden":
            base = 1
            if p.family == "llama":  # transformers' LlamaConfig wants hidden_size % num_attention_heads == 0
                base = math.lcm(*self._query_head_counts())
            step = _width_step(p, "hidden_size", p.hidden_size, cfg, base)
            sizes = width_choices(p.hidden_size, cfg.width_choices, step)
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
        # rounded as the buffer stores it, so that a loaded state dict gives the same schedule
        self._progress = torch.tensor(min(max(float(p), 0.0), 1.0), dtype=self.progress.dtype).item()
        self.progress.fill_(self._progress)

    @property
    def training_progress(self) -> float:
        """The progress last set (`set_progress` or a loaded state dict), read without a device sync."""
        return self._progress

    @property
    def tau(self) -> float:
        (t0, t1), p = self.config.tau, self._progress
        return t0 * (t1 / t0) ** p  # geometric: as much time at 1 -> 0.2 as at 0.2 -> 0.05

    @property
    def scale(self) -> float:
        (s0, s1), p = self.config.scale, self._progress
        return s0 + (s1 - s0) * p

    # ------------------------------------------------------------------------- budgets

    def blend(self, budget) -> torch.Tensor:
        """The router input for `budget`: an int index (one-hot), a float index (1.5 = half budget 1,
        half budget 2), a Budget (trained: its one-hot; else the two trained budgets of its kind around
        its target, blended linearly in the target), or a weight vector as it is. Not a vector: a tensor
        kept for the next call with the same weights (not to be changed in place)."""
        device = self.progress.device
        if torch.is_tensor(budget):
            if budget.shape != (self.n_budgets,):
                raise ValueError(f"a budget vector has shape ({self.n_budgets},), got {tuple(budget.shape)}")
            return budget.to(device=device, dtype=torch.float32)
        w = self._host_blend(budget)
        # kept per value: the same budgets come back every step, and each copy from the host is a sync
        key = (tuple(w.tolist()), w.dtype, device)
        if key not in self._blends:
            if len(self._blends) >= 256:  # blends of arbitrary budgets (interpolation) must not pile up
                self._blends.clear()
            with torch.inference_mode(False):  # usable by autograd later, whatever mode built it
                self._blends[key] = w.to(device, copy=True)
        return self._blends[key]

    def _host_blend(self, budget) -> torch.Tensor:
        """`blend` of an index or a Budget, built on the host (a CPU tensor: the same rounding)."""
        if isinstance(budget, Budget):
            return self._blend_budget(budget)
        x = float(budget)
        if not 0 <= x <= self.n_budgets - 1:
            raise ValueError(f"budget index {budget} is outside 0..{self.n_budgets - 1}")
        lo = min(int(x), self.n_budgets - 2) if self.n_budgets > 1 else 0
        w = torch.zeros(self.n_budgets, device="cpu")
        w[lo] = 1 - (x - lo)
        if x > lo:
            w[lo + 1] = x - lo
        return w

    def _blend_budget(self, b: Budget) -> torch.Tensor:
        w = torch.zeros(self.n_budgets, device="cpu")
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

    def probs(self, budget) -> dict[str, torch.Tensor]:
        """Per slot, the choice distribution softmax(logits x scale) at the current training progress."""
        return {name: F.softmax(logit * self.scale, dim=-1) for name, logit in self.logits(budget).items()}

    def forward(self, budget, mode: str = "hard", generator: torch.Generator | None = None,
                estimator: str = "score", accept=None, tries: int = 32, fallback=None) -> RouterOutput:
        """Sample an architecture for `budget`.

        Training, per slot with logits r: the choice distribution is p = softmax(r x scale), the
        scale ramping 1 -> 10 with training progress (explore early, commit late; the warm-up runs
        at the starting scale, so the router does not begin one-hot); the choice k is a Gumbel-max
        draw from p. Hard mode forwards the exact 0/1 prefix of k; how the task loss reaches the
        router is the `estimator`:
        - "score" (default): the masks carry no gradient; `log_prob` (sum of log p_k over slots) is
          returned for a score-function (REINFORCE) term, (loss - baseline) x log_prob, which
          ranks choices by the loss they reach (`losses.score_function_loss`).
        - "straight-through": backward that of prefix_k x p_k (METHOD's "argmax prefix times its
          probability"). Its gradient on p_k is the value of scaling the kept units up, not how good
          the choice is: it reinforces whichever choice ran in proportion to how much its kept units
          want to be larger, which favours deep cuts (on SmolLM2, H200, 2026-11-30, it cut attention
          9 -> 3 heads at both budgets, +124% perplexity against the search's FFN cuts).
        Neither passes the gradient of sum_c p_c prefix_c: masks multiply activations, so a dropped
        unit's gradient is the value of adding it back, always negative, and on SmolLM2 that pull
        outweighed the budget loss and drove the 0.75 and 0.5 budgets' argmax to the whole parent.
        Soft mode: the Gumbel-softmax relaxation
        y = softmax((r x scale + g) / tau), masks sum_c y_c prefix_c. `arch` holds the p-weighted sizes (the gradient path of the budget
        loss), `chosen_arch` the sizes of the choices taken. `accept` (hard mode): a test of the drawn
        choice (a slot -> index dict; `arch_of` gives its sizes), e.g. its cost in the budget's band and
        its nesting in the larger budget's architecture; up to `tries` draws are made and the
        first it takes is used; when none is, `fallback(choice) -> choice` (e.g. the nearest in-band
        architecture) replaces the last draw, or without one the last draw is used. So training spends
        no step on an architecture that could never be exported. Eval (inference), whatever the mode:
        the argmax of r, exact 0/1 masks, no noise."""
        if mode not in ("hard", "soft"):
            raise ValueError(f"router mode is 'hard' or 'soft', got {mode!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"router estimator is one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        score = self.training and mode == "hard" and estimator == "score"
        probs, samples, choice, weights, log_prob = {}, {}, {}, {}, []
        full = not self.training and self._is_full(budget)  # inference of b = 1: the parent (see `spec`)
        logits = self.logits(budget)
        if self.training:  # Gumbel-max draws from p, redrawn (hard mode) until `accept` takes one
            tries = 1 if accept is None or mode == "soft" else max(1, tries)
            for attempt in range(tries):
                noise = self._gumbel(logits, generator)
                # every slot's argmax in one transfer: one host sync a try, not one a slot
                drawn = dict(zip(logits, torch.stack([(logit.detach() * self.scale + noise[name]).argmax()
                                                      for name, logit in logits.items()]).tolist()))
                if accept is not None and accept(drawn):
                    break
            else:
                if accept is not None and tries > 1 and fallback is not None:
                    drawn = fallback(drawn)  # a router far outside the band draws nothing in it
        for name, logit in logits.items():
            prefix = self.slot_prefix(name)
            if self.training:
                p = F.softmax(logit * self.scale, dim=-1)
                y = F.softmax((logit * self.scale + noise[name]) / self.tau, dim=-1)
                k = drawn[name]  # = argmax(r x scale + g)
                if mode == "soft":
                    weights[name] = y @ prefix
                elif score:  # the exact prefix, no gradient; the task loss comes in through log p_k
                    weights[name] = prefix[k]
                    log_prob.append(F.log_softmax(logit * self.scale, dim=-1)[k])
                else:  # straight-through "prefix x p_k": forward the exact prefix, backward that of prefix x p_k
                    weights[name] = prefix[k] + prefix[k] * (p[k] - p[k].detach())
            else:
                p = y = F.softmax(logit, dim=-1)
                k = len(y) - 1 if full else int(y.argmax())
                weights[name] = prefix[k]
            probs[name], samples[name], choice[name] = p, y, k
        chosen = self.arch_of(choice)
        arch = self.expected_arch(probs) if self.training else chosen
        return RouterOutput(self._masks(weights), arch, probs, samples, choice, chosen,
                            torch.stack(log_prob).sum() if log_prob else None)

    @staticmethod
    def _gumbel(logits: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Gumbel noise shaped as every slot's logits, drawn at once: a (CPU) generator's noise comes
        to the device in one copy, not one a slot, from pinned memory so that the host does not wait
        for it (a GPU run counted 3 such waits a router step, docs/RESULTS.md §12). A CPU generator's
        stream is the same as drawing slot by slot."""
        if not logits:
            return {}
        device = next(iter(logits.values())).device
        sizes = [logit.numel() for logit in logits.values()]
        u = torch.rand(sum(sizes), generator=generator, device=device if generator is None else "cpu")
        if u.device != device and device.type == "cuda":  # from pinned memory the copy is queued, not waited for
            u = u.pin_memory().to(device, non_blocking=True)
        g = -torch.log(-torch.log(u.to(device).clamp(1e-10, 1 - 1e-7)))
        return {name: part.view(logit.shape) for (name, logit), part in zip(logits.items(), g.split(sizes))}

    def hard_masks(self, choice: dict[str, int]) -> dict[str, torch.Tensor]:
        """The exact 0/1 masks of one choice index per slot (e.g. the argmax, as a baseline draw)."""
        return self._masks({name: self.slot_prefix(name)[k] for name, k in choice.items()})

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

    def expected_arch(self, probs: dict[str, torch.Tensor]) -> Arch:
        """Expected sizes: the parent's, overridden by the `probs`-weighted choices of every slot (tensors:
        the budget loss differentiates the cost through them)."""
        return self._sized({name: y @ (self.slot_prefix(name) if self.slots[name].axis == "depth" else
                                       self._sizes_on(name, y.dtype, y.device))
                            for name, y in probs.items()})

    def _sizes_on(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Slot `name`'s sizes as a tensor, copied to `device` once (each copy from the host is a sync)."""
        key = (name, dtype, device)
        if key not in self._sizes:
            with torch.inference_mode(False):  # usable by autograd later, whatever mode built it
                self._sizes[key] = torch.tensor(self.slots[name].sizes, dtype=dtype, device=device)
        return self._sizes[key]

    def arch_of(self, choice: dict[str, int]) -> Arch:
        """The integer sizes of one choice index per slot (slots not named keep the parent's)."""
        return self._sized({name: [int(v) for v in self.slot_prefix(name)[k].tolist()]
                            if self.slots[name].axis == "depth" else self.slots[name].sizes[k]
                            for name, k in choice.items()})

    @staticmethod
    def argmax_choice(probs: dict[str, torch.Tensor]) -> dict[str, int]:
        """Every slot's most likely choice index."""
        if not probs:
            return {}
        return dict(zip(probs, torch.stack([p.argmax() for p in probs.values()]).tolist()))  # one host sync

    def argmax_arch(self, probs: dict[str, torch.Tensor]) -> Arch:
        """The sizes of every slot's most likely choice."""
        return self.arch_of(self.argmax_choice(probs))

    def _sized(self, values: dict) -> Arch:
        """The parent's sizes with each named slot's value put in: a size, or for depth the weight
        of every layer."""
        arch = Arch(self._full.hidden, [dict(s) for s in self._full.layers])
        for name, value in values.items():
            slot = self.slots[name]
            if slot.axis == "hidden":
                arch.hidden = value
            elif slot.axis == "depth":
                for i, s in enumerate(arch.layers):
                    s["keep"] = value[i]
            else:
                for i in slot.layers:
                    arch.layers[i][AXES[slot.axis][0]] = value
        return arch

    def choice_of(self, spec: ElasticSpec) -> dict[str, int]:
        """The choices closest to `spec` from below: per slot, the largest size not above the spec's
        (the smallest where all are above). Sizes the router cannot express (whole KV groups
        dropped, say) map to the nearest it can."""
        arch = Arch.from_spec(spec, self.parent)
        out = {}
        for name, slot in self.slots.items():
            if slot.axis == "hidden":
                want = arch.hidden
            elif slot.axis == "depth":
                want = sum(int(s["keep"]) for s in arch.layers)
            else:
                want = arch.layers[slot.layers[0]][AXES[slot.axis][0]]
            below = [k for k, size in enumerate(slot.sizes) if size <= want]
            out[name] = below[-1] if below else 0
        return out

    def full_choice(self) -> dict[str, int]:
        """Every slot's largest choice: the parent."""
        return {name: len(slot.sizes) - 1 for name, slot in self.slots.items()}

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
        w = self.blend(budget) if torch.is_tensor(budget) else self._host_blend(budget)  # host: no device read
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
    if axis == "attention":  # query heads evenly inside every KV group; heads x head_dim aligned
        kv, per, Q = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.num_attention_heads
        m = _head_multiple(Q, c.head_dim, cfg)
        sizes = [kv * k for k in range(1, per + 1) if kv * k * c.head_dim % m == 0 or kv * k == Q]
        return sizes, _prefixes(c.num_attention_heads, sizes, kv)
    if axis == "mamba":  # the same number of heads in every group; heads x mamba_head_dim aligned
        g, H = c.n_groups, c.mamba_num_heads
        m = _head_multiple(H, c.mamba_head_dim, cfg)
        sizes = [g * k for k in range(1, H // g + 1) if g * k * c.mamba_head_dim % m == 0 or g * k == H]
        return sizes, _prefixes(c.mamba_num_heads, sizes, g)
    if axis == "experts":  # per router group: at least 2 (groups rank by their best two) and enough for top-k
        g, per = c.n_group, c.n_routed_experts // c.n_group
        lo = max(min(2, per), math.ceil(c.num_experts_per_tok / c.topk_group))
        sizes = [g * k for k in range(lo, per + 1)]
        return sizes, _prefixes(c.n_routed_experts, sizes, g)
    n = getattr(c, AXES[axis][0])
    sizes = width_choices(n, cfg.width_choices, _width_step(c, AXES[axis][0], n, cfg))
    return sizes, _prefixes(n, sizes)


# ----------------------------------------------------------------------------- entropy

def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of a choice distribution, normalised by log(choices) to [0, 1] (0 for one choice)."""
    n = probs.shape[-1]
    if n < 2:
        return probs.new_zeros(())
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(n)


def entropy_floor_loss(probs: dict[str, torch.Tensor], floor: float) -> torch.Tensor:
    """sum over slots of max(0, floor - H(p)) (normalised entropy): keeps every choice distribution
    from collapsing to one-hot, where softmax gradients vanish, even at the final logit scale. With a
    small floor the draws still concentrate on the argmax."""
    terms = [F.relu(floor - entropy(p)) for p in probs.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


# ----------------------------------------------------------------------------- after training

@dataclass
class Projection:
    """How a budget's architecture was fixed after training: the router's argmax, or the nearest
    in-band architecture nested in the next larger budget's."""

    choice: dict[str, int]
    target: float  # absolute (parameters or bytes)
    cost: float  # of `choice`
    argmax_cost: float  # of the router's argmax before any projection
    projected: bool
    log_prob_loss: float = 0.0  # sum over slots of log p(argmax) - log p(choice) at inference, nats (0: the argmax)

    @property
    def ratio(self) -> float:
        return self.cost / self.target

    def to_dict(self) -> dict:
        return {"target": self.target, "cost": self.cost, "ratio": round(self.ratio, 6),
                "argmax_ratio": round(self.argmax_cost / self.target, 6), "projected": self.projected,
                "log_prob_loss": round(self.log_prob_loss, 4)}


def project_budgets(router: Router, budgets: list[Budget], costs: CostModel | None = None, band: float = BAND,
                    max_states: int = 50_000, start: list[dict | None] | None = None) -> list[Projection]:
    """Each trained budget's architecture, in its band and nested by construction.

    Budgets are visited largest first (`budgets` is in the router's order). The full budget is the
    parent. Any other budget starts at the router's argmax, clamped slot by slot to the next larger
    budget's choice (so its masks are contained in the larger's); if its cost is then outside
    `band` of the target, a best-first search over single-slot moves (one choice up or down, never
    above the larger budget's) returns the in-band architecture that costs the router the least
    log-probability, steered toward the band. `start`: per budget, choices to start from instead of
    the argmax (None: the argmax). Raises StarElasticError when none is reachable."""
    costs = costs or CostModel(router.parent)
    out: list[Projection | None] = [None] * len(budgets)
    upper = router.full_choice()
    with torch.no_grad():
        for i in _largest_first(budgets):
            out[i] = _project(router, budgets, i, start[i] if start is not None else None, upper, costs, band,
                              max_states)
            upper = out[i].choice
    return out


def larger_choice(router: Router, budgets: list[Budget], i: int, costs: CostModel | None = None, band: float = BAND,
                  max_states: int = 50_000) -> dict[str, int]:
    """The choice budget i must nest in: the next larger budget's architecture as `project_budgets`
    would export it now (the parent's for the largest). Training holds its draws to it, so that what
    a budget trains is what it exports."""
    costs = costs or CostModel(router.parent)
    upper = router.full_choice()
    with torch.no_grad():
        for j in _largest_first(budgets):
            if j == i:
                break
            upper = _project(router, budgets, j, None, upper, costs, band, max_states).choice
    return upper


def _largest_first(budgets: list[Budget]) -> list[int]:
    return sorted(range(len(budgets)), key=lambda i: -budgets[i].fraction)


def _project(router, budgets, i, start, upper, costs, band, max_states) -> Projection:
    if budgets[i].is_full:
        return full_projection(router, budgets[i], costs)
    return nested_in_band(router, budgets, i, start, upper, costs, band, max_states)


def full_projection(router: Router, budget: Budget, costs: CostModel) -> Projection:
    """The full budget's architecture: the parent, unprojected."""
    c = router.full_choice()
    cost = costs.cost(budget.kind, router.arch_of(c))
    return Projection(c, budget.target, cost, cost, False)


def nested_in_band(router: Router, budgets: list[Budget], i: int, start: dict | None, upper: dict[str, int],
                   costs: CostModel, band: float = BAND, max_states: int = 50_000) -> Projection:
    """Budget i's architecture from `start` (None: the router's argmax), clamped slot by slot to
    `upper` (the next larger budget's choice) and, if outside the band, moved to the nearest in-band
    architecture the router prefers (see `project_budgets`)."""
    with torch.no_grad():
        logq, argmax = _inference_choices(router, i)
    first = start if start is not None else argmax
    return _best_in_band(router, costs, budgets[i], logq, argmax, {n: min(k, upper[n]) for n, k in first.items()},
                         upper, band, max_states)


def interpolate_budget(router: Router, budget: Budget, trained: list[tuple[Budget, ElasticSpec]],
                       costs: CostModel | None = None, band: float = BAND, max_states: int = 50_000) -> Projection:
    """The architecture of a budget between two trained ones (METHOD §10): the router's argmax for
    the blended input, clamped slot by slot between the neighbours' exported architectures (so it
    nests between them), and projected into its band as after training. `trained`: every trained
    budget with its exported spec. A budget outside the trained range of its kind is refused."""
    costs = costs or CostModel(router.parent)
    same = sorted(((b.target, b, s) for b, s in trained if b.kind == budget.kind), key=lambda t: t[0])
    name = budget.name or f"{budget.fraction:g}"
    names = ", ".join(b.name or f"{b.fraction:g}" for _, b, _ in same) or "none"
    below = [(b, s) for t, b, s in same if t < budget.target]
    above = [(b, s) for t, b, s in same if t > budget.target]
    if not below or not above:
        raise StarElasticError(f"budget {name} is outside the trained {budget.kind} budgets ({names}): only budgets "
                               "between two trained ones can be interpolated")
    lower, upper = router.choice_of(below[-1][1]), router.choice_of(above[0][1])
    with torch.no_grad():
        logq, argmax = _inference_choices(router, budget)
    start = {n: min(max(k, lower[n]), upper[n]) for n, k in argmax.items()}
    return _best_in_band(router, costs, budget, logq, argmax, start, upper, band, max_states, lower=lower,
                         where=f"between the trained {below[-1][0].name or below[-1][0].fraction} and "
                               f"{above[0][0].name or above[0][0].fraction} on the router's grid")


def _inference_choices(router: Router, budget) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per slot, the log-probabilities of the choices at inference (scale 1) for `budget` (a router
    input, see `Router.blend`), and the argmax choice."""
    logits = router.logits(budget)
    flat = torch.cat([F.log_softmax(v.float(), -1) for v in logits.values()]).tolist() if logits else []  # one sync
    logq, at = {}, 0
    for n, v in logits.items():
        logq[n], at = flat[at:at + len(v)], at + len(v)
    return logq, {n: max(range(len(v)), key=v.__getitem__) for n, v in logq.items()}


def _best_in_band(router, costs, b: Budget, logq, argmax, start, upper, band, max_states, lower=None,
                  where: str = "nested in the larger budgets'") -> Projection:
    names = list(start)
    lower = lower or {n: 0 for n in names}
    best = sum(logq[n][argmax[n]] for n in names)
    argmax_cost = costs.cost(b.kind, router.arch_of(argmax))

    def evaluate(ks):
        choice = dict(zip(names, ks))
        cost = costs.cost(b.kind, router.arch_of(choice))
        dev = abs(cost / b.target - 1)
        loss = best - sum(logq[n][k] for n, k in choice.items())
        return cost, dev, loss

    ks0 = tuple(start[n] for n in names)
    cost, dev, loss = evaluate(ks0)
    if dev <= band:
        return Projection(dict(zip(names, ks0)), b.target, cost, argmax_cost, ks0 != tuple(argmax[n] for n in names),
                          loss)
    steer = 50.0  # nats per unit of relative cost outside the band: reach the band first, then prefer the router
    heap, seen = [(loss + steer * (dev - band), ks0, cost, dev, loss)], {ks0}
    while heap and len(seen) < max_states:
        _, ks, cost, dev, loss = heapq.heappop(heap)
        if dev <= band:
            return Projection(dict(zip(names, ks)), b.target, cost, argmax_cost, True, loss)
        for j, n in enumerate(names):
            for k in (ks[j] - 1, ks[j] + 1):
                if lower[n] <= k <= upper[n]:
                    nxt = ks[:j] + (k,) + ks[j + 1:]
                    if nxt not in seen:
                        seen.add(nxt)
                        c2, d2, l2 = evaluate(nxt)
                        heapq.heappush(heap, (l2 + steer * max(0.0, d2 - band), nxt, c2, d2, l2))
    name = b.name or f"{b.fraction:g}"
    raise StarElasticError(f"budget {name}: no architecture within {band:.0%} of its target {where} was found "
                           f"(the router's argmax costs {argmax_cost / b.target:.3f}x the target)")
