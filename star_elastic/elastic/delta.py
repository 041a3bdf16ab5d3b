"""The full budget's own low-rank delta (`TrainConfig.full_delta_rank`): the full anchor trains it alone.

Why: the full anchor holds the full model near its parent by pulling on the weights that every budget shares,
and that pull is the 0.75 budget's whole gap to distilling it alone (docs/RESULTS.md §9, twelfth session):
trained beside the 0.5 with no anchor the 0.75 equals separate distillation in domain and the 0.5 beats it by
5-8%, but the full model drifts 12-29% from its parent. Here the full model gets parameters of its own
instead: every linear layer of the decoder adds a low-rank term, W x + B A x, and every routed expert of a MoE
one of its own (the stacked (E, out, in) tensors get A (E, r, in) and B (E, out, r): each expert runs W_e x +
B_e A_e x; decoding gathers the chosen experts' W, A and B and never forms W_e + B_e A_e), in the full
budget's passes only, and the anchor's backward accumulates into A and B alone (`inputs=`, train.py). The
anchor's gradient then reaches nothing the smaller budgets use; they train the shared weights as if the full
model were not there, and the delta follows them to keep the full model on its parent. B starts at zero, so
training starts from the parent exactly. The delta is applied as masks are (masking.py), by swapping each
linear layer's class, which compiled layers see.

In the elastic checkpoint (`elastify --full-delta-rank`) the main tensors hold the full budget merged,
W + B A, so that transformers loads the full model as it loads any checkpoint, and `full_delta.safetensors`
beside them holds A and B (`save_delta`). Loading subtracts B A again (`FullDelta.read`, `subtract_from`):
the loaded model holds W, the tensors every smaller budget is a prefix of, and the full budget runs W with
its delta applied (or merged into a copy). The streaming slicer subtracts the kept rows of B times the kept
columns of A, tensor by tensor (stream.py).

Its own embeddings and norms (`keep`, `elastify --full-keeps-held`): the delta covers the linear layers and experts,
and the embeddings (the LM head when tied) and norms that the smaller budgets train carry the full model's
drift out of domain (docs/RESULTS.md §9, seventeenth and eighteenth sessions). Held near the parent's while
training (TrainConfig.hold with a rate and a pull), they can be put back for the full budget alone: the
full budget then keeps the parent's values as tensors of its own (`rest`), run by swapping those modules'
classes as the linear layers' are. The checkpoint's main tensors hold the full budget's values, so that
transformers loads the full model; `full_delta.safetensors` adds the values every smaller budget reads,
under `<parameter>.shared` (loading puts them in the model, the streaming slicer reads them from there).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from star_elastic import parallel
from star_elastic.elastic.masking import ClassSwaps
from star_elastic.elastic.rounding import (REST_BITS, damped, pack_codes, rest_dense, rest_group, round_rest,
                                           unpack_codes)
from star_elastic.errors import StarElasticError
from star_elastic.model import scaled_activation

# Above this many rows and columns a layer's rank-r part comes from a randomized SVD (`top_singular`), not a full
# one: a full float64 SVD of one of Nemotron 3 Nano's experts (1856 x 2688) took 5 s on one CPU thread (0.57 s
# randomized), and the restore has ~5,900 of them (docs/RESULTS.md §9). SmolLM2's layers (576 wide) and the
# tests' stay on the exact path.
EXACT_SVD_MAX = 1024


def _key(name: str) -> str:
    """A target's key in the delta's ParameterDicts, whose keys may not hold dots."""
    return name.replace(".", "/")


def top_singular(a: torch.Tensor, k: int, oversample: int = 16, iters: int = 4, seed: int = 0):
    """The top `k` singular triplets (u, s, vh) of `a` (..., m, n), batched over leading dimensions: exact up to
    EXACT_SVD_MAX rows or columns, else a randomized range finder with `iters` power iterations (Halko, Martinsson
    and Tropp 2011, Algorithm 4.4) on its own generator, so the result is the same run to run and the global RNG
    is left alone."""
    m, n = a.shape[-2:]
    if min(m, n) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    q = min(k + oversample, m, n)
    g = torch.Generator(device=a.device).manual_seed(seed)
    basis = torch.linalg.qr(a @ torch.randn(*a.shape[:-2], n, q, generator=g, device=a.device, dtype=a.dtype)).Q
    for _ in range(iters):  # each QR keeps the basis orthonormal, so small singular values are not lost to rounding
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)  # (q, n): small
    return (basis @ u)[..., :k], s[..., :k], vh[..., :k, :]


# A restore that gives its rank out layer by layer finds, above EXACT_SVD_MAX, each layer's top this-many-times-r
# singular values (randomized SVD): no layer gets more, and the report's sizes go that far
ALLOCATE_SPAN = 4

# Routed experts restored this many at a time (FullDelta.restore): bounds the float64 copies at Nano's shapes
EXPERT_CHUNK = 16


def _rank_part(gap: torch.Tensor, r: int, cov: torch.Tensor | None, diagonal: bool, damping: float,
               spectrum_k: int = 0):
    """FullDelta.restore's factors of one weight's float64 `gap` (out, in), or of a stack of experts' (E, out, in):
    (up (..., out, r), down (..., r, in), caught, total, squares), the rank-r part of the gap weighted by `cov` (a
    linear layer's E[x x^T], whitened by its Cholesky factor; `diagonal`: experts' E[x^2] per input channel (E, in),
    a scale per channel), both factors with the root of the singular values; columns past the matrix's rank zero.
    `squares`: every squared singular value of the weighted gap (..., min(out, in)) where the SVD was exact; above
    EXACT_SVD_MAX the top `spectrum_k` of them (the randomized SVD run that far), or None when `spectrum_k` is 0
    (restore_report and allocate_ranks read them)."""
    lower = scale = None
    if cov is None:
        target = gap
    elif diagonal:
        scale = (cov + damping * cov.mean(-1, keepdim=True).clamp_min(1e-12)).sqrt()[:, None, :]
        target = gap * scale
    else:
        cov = damped(cov, damping)
        lower = torch.linalg.cholesky(cov)
        target = gap @ lower
    k, full = min(r, *target.shape[-2:]), min(target.shape[-2:])
    # as many singular values as the report reads: all of them where the SVD is exact (it finds them anyway)
    found = full if full <= EXACT_SVD_MAX else min(max(k, spectrum_k), full)
    u, spectrum, vh = top_singular(target, found)  # batched over the experts
    u, s, vh = u[..., :k], spectrum[..., :k], vh[..., :k, :]
    root = s.sqrt()
    down = root[..., :, None] * vh  # (k, in), in the whitened basis
    if lower is not None:  # back: down L^-1
        down = torch.linalg.solve_triangular(lower.T, down.T, upper=True).T
    if scale is not None:  # back: down S^-1
        down = down / scale
    *stack, out_f, in_f = gap.shape
    up_r = gap.new_zeros(*stack, out_f, r)
    down_r = gap.new_zeros(*stack, r, in_f)
    up_r[..., :k], down_r[..., :k, :] = u * root[..., None, :], down
    squares = spectrum ** 2 if full <= EXACT_SVD_MAX or spectrum_k else None
    return up_r, down_r, float((s ** 2).sum()), float((target ** 2).sum()), squares


def _weighted_square(e: torch.Tensor, cov: torch.Tensor | None, diagonal: bool) -> float:
    """||e L||^2 with L L^T = `cov` (None: the plain squared norm; `diagonal`: experts' (E, in), a weight per input
    channel of each expert's (E, out, in))."""
    if cov is None:
        return float((e ** 2).sum())
    if diagonal:
        return float(((e ** 2) * cov[:, None, :]).sum())
    return float(torch.einsum("oi,ij,oj->", e, cov, e))


def _units(spectra: dict) -> dict[str, tuple[torch.Tensor, float]]:
    """{target: (value of its i-th singular pair, cost of one pair in parameters)}: a weight's squared singular
    values, a stack of experts' summed over the experts (its A and B are (E, r, in) and (E, out, r): one rank for
    all of them, so its i-th pair is every expert's i-th), from `spectra` {target: (squares (..., k), out + in)}."""
    units = {}
    for name, (sq, pair, _) in spectra.items():
        rows = sq.reshape(-1, sq.shape[-1]).double().cpu()
        units[name] = rows.sum(0), float(pair * rows.shape[0])
    return units


def allocate_ranks(spectra: dict, rank: int) -> dict[str, int]:
    """{target: rank} that spend what a uniform `rank` spends in parameters where the drift is: every target at
    least 1, then each further singular pair, across all targets, in order of its squared singular value per
    parameter, while the total stays within the uniform rank's (a weight's own pairs come in order: its values
    fall; a target whose spectrum is its top values alone goes no further). `spectra`: {target: (the squared
    singular values of its weighted gap (..., k), out + in, min(out, in))}."""
    units = _units(spectra)
    budget = sum(min(rank, v.numel()) * cost for v, cost in units.values())
    ranks = {name: 1 for name in units}
    budget -= sum(cost for _, cost in units.values())
    names = [name for name, (v, _) in units.items() for _ in range(v.numel() - 1)]
    values = torch.cat([v[1:] for v, _ in units.values()])
    costs = torch.cat([torch.full((v.numel() - 1,), cost, dtype=torch.float64) for v, cost in units.values()])
    order = torch.argsort(values / costs, descending=True, stable=True)
    for i in order[torch.cumsum(costs[order], 0) <= budget].tolist():
        ranks[names[i]] += 1
    return ranks


def restore_report(spectra: dict, total: float, rank: int) -> dict | None:
    """What a restore's delta would cover of the (weighted) drift at other sizes, from the squared singular values
    of each target's weighted gap (`spectra`: {target: (squares (..., k), out + in, min(out, in))}, an expert's rows
    apart; k below min(out, in) where only the top values were found, and a size past them is then left out) and
    `total`, the drift's squared norm: {"rank R": share} at half, one, two and four times `rank` (the one at `rank`
    is what a uniform restore covers), and "allocated": the share that the same number of parameters covers given
    out layer by layer (`allocate_ranks`). Why: whether the full budget's remaining drift wants a larger delta, or
    the same one spent unevenly (docs/RESULTS.md §9, fortieth session). None where a layer's spectrum was not found
    (above EXACT_SVD_MAX without a restore that gives its rank out)."""
    if not spectra or total <= 0 or any(sq is None for sq, _, _ in spectra.values()):
        return None
    units = _units(spectra)
    report = {f"rank {rho}": sum(float(v[:rho].sum()) for v, _ in units.values()) / total
              for rho in sorted({max(1, rank // 2), rank, 2 * rank, 4 * rank})
              if all(sq.shape[-1] >= min(rho, full) for sq, _, full in spectra.values())}
    ranks = allocate_ranks(spectra, rank)
    report["allocated"] = sum(float(v[:ranks[name]].sum()) for name, (v, _) in units.items()) / total
    return report


class _WithDelta:
    """Mixed into a linear layer's class while the full budget runs: W x + B A x (+ R x, the rounded rest of the
    drift, dense, when the delta has one)."""

    delta_down: torch.Tensor
    delta_up: torch.Tensor
    delta_rest: torch.Tensor | None

    def forward(self, x):
        y = super().forward(x) + F.linear(F.linear(x, self.delta_down), self.delta_up)
        return y if self.delta_rest is None else y + F.linear(x, self.delta_rest)


class _MergedLinear:
    """Mixed into a linear layer of a server's full budget whose delta has a rounded rest: its own W + B A + R,
    one product where W x + B A x + R x would be three, in the memory a dense R takes (FullDelta.apply)."""

    own_weight: torch.Tensor

    def forward(self, x):
        return F.linear(x, self.own_weight, self.bias)


class _ExpertsWithDelta:
    """Mixed into routed experts while the full budget runs: each expert's W + B A (`weights`, where the loop
    over experts reads them), W x + B (A x) as grouped GEMMs (`grouped`) and, decoding, on the chosen experts'
    gathered factors (`gathered`)."""

    delta_pairs: dict  # {"up_proj" / "down_proj": (A (E, r, in), B (E, out, r))}

    def weights(self, which, idx=None):
        w = super().weights(which, idx)
        down, up = self.delta_pairs[which]
        if idx is not None:
            down, up = down[idx], up[idx]
        return w + (up @ down).to(w.dtype)

    def gathered(self, x, idx, weights):
        # decoding: W x + B (A x) on the chosen experts' gathered W, A and B. Forming their W + B A (`weights`)
        # wrote and read again as many bytes as W itself: the full budget decoded at 0.83x its parent at Nano
        # width (docs/RESULTS.md §9, forty-third session)
        (a_up, b_up), (a_down, b_down) = (tuple(t[idx] for t in self.delta_pairs[w]) for w in EXPERT_TENSORS)
        up, down = super().weights("up_proj", idx), super().weights("down_proj", idx)
        pre = torch.einsum("td,tkid->tki", x, up) + torch.einsum(
            "tkir,tkr->tki", b_up.to(up.dtype), torch.einsum("tkrd,td->tkr", a_up.to(up.dtype), x))
        h = scaled_activation(pre, self.hidden, copies=weights[..., None])
        out = torch.einsum("tki,tkdi->tkd", h, down) + torch.einsum(
            "tkdr,tkr->tkd", b_down.to(h.dtype), torch.einsum("tkri,tki->tkr", a_down.to(h.dtype), h))
        return out.sum(1).to(h.dtype)

    def grouped(self, which, xs, offs, dt):
        # W x + B (A x) as three grouped GEMMs: forming every expert's W + B A would cost 2 E out in r FLOPs a
        # forward (~80 GFLOP a tensor at Nano's shapes, rank 64), more than a batched decode step itself. The
        # grouped GEMM wants 16-byte rows: a rank whose rows are not falls back to the merged weights.
        down, up = self.delta_pairs[which]
        if down.shape[-2] * dt.itemsize % 16:
            return super().grouped(which, xs, offs, dt)
        x = xs.to(dt)
        plain = torch._grouped_mm(x, super().weights(which).to(dt).transpose(1, 2), offs=offs)
        low = torch._grouped_mm(x, down.to(dt).transpose(1, 2), offs=offs)
        return plain + torch._grouped_mm(low, up.to(dt).transpose(1, 2), offs=offs)


class _OwnEmbedding:
    """Mixed into an nn.Embedding while the full budget runs: the full budget's own table."""

    own_weight: torch.Tensor

    def forward(self, x):
        return F.embedding(x, self.own_weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class _OwnLinear:
    """Mixed into the LM head while the full budget runs: the full budget's own matrix (tied: its embeddings)."""

    own_weight: torch.Tensor

    def forward(self, x):
        return F.linear(x, self.own_weight, self.bias)

    def head_weight(self) -> torch.Tensor:
        """The matrix the head runs, for losses that apply it themselves (losses.head_input)."""
        return self.own_weight


class _OwnNorm:
    """Mixed into an RMSNorm or GatedRMSNorm while the full budget runs: the full budget's own scale (the norm's
    forward reads it, and so does a Mamba layer that recomputes its norm in backward)."""

    own_weight: torch.Tensor

    def norm_weight(self):
        return self.own_weight


class _OwnValues:
    """Mixed into any other module whose parameters the full budget keeps its own of (Mamba's A_log, D, dt_bias
    and causal conv, a MoE's gate): each such attribute read as the full budget's value (`_own_values`' class
    properties shadow the module's parameters, which stay the smaller budgets')."""

    own_values: dict


def shared_value(module: nn.Module, name: str):
    """`module`'s parameter `name` as the smaller budgets share it, also where the full budget's own value
    shadows the attribute (`_OwnValues`, a server's parent running the full budget for good): what views read."""
    return module._parameters[name] if name in module._parameters else getattr(module, name)


@functools.cache
def _own_values(names: tuple[str, ...]) -> type:
    """The `_OwnValues` mixin for parameters `names`, one class per set (torch.compile guards on classes)."""
    return type("_OwnValues", (_OwnValues,), {n: property(lambda self, n=n: self.own_values[n]) for n in names})


def _own_mixin(module: nn.Module) -> type:
    from ..model import GatedRMSNorm, RMSNorm

    if isinstance(module, nn.Embedding):
        return _OwnEmbedding
    if isinstance(module, nn.Linear):
        return _OwnLinear
    if isinstance(module, (RMSNorm, GatedRMSNorm)):
        return _OwnNorm
    raise StarElasticError(f"a full budget's own weight for a {type(module).__name__} is not built")


@dataclass(frozen=True)
class Restored:
    """What FullDelta.restore covered of the shared weights' drift W_p - W."""
    share: float  # of the drift, under the damped covariance the delta was fitted in (1: the parent exactly)
    # under the inputs' covariance undamped: the damping counts directions the inputs barely reach, where GPTQ puts
    # a few bits' error (docs/RESULTS.md §9, forty-second session: rank 32 + a 1-bit rest 96.38% damped, 97.05% as
    # they are)
    undamped: float | None
    # what it leaves against the parent's layers' own output, E||(W_p - W - D) x||^2 / E||W_p x||^2 summed over the
    # layers. A share alone does not tell a small drift from a large one: at lr 3e-3 rank 64 covered 99.4% and the
    # full model read 4-7% worse, at 1e-3 98.7% and within 1% (RESULTS §9, forty-second session)
    residual: float | None
    report: dict | None = None  # restore_report: what other ranks, or this one given out by layer, would cover

    @classmethod
    def from_state(cls, meta: dict) -> "Restored | None":
        """From a trainer's saved state (`asdict`); an older state kept the share alone, as a float, beside its
        report (and the undamped share and residual from the forty-second session)."""
        got = meta.get("restored")
        if isinstance(got, (int, float)):
            return cls(float(got), meta.get("restored_undamped"), meta.get("restore_residual"),
                       meta.get("restore_report"))
        return None if got is None else cls(**got)


class FullDelta(nn.Module):
    """A, B (rank r) for every nn.Linear of `model` but its LM head, and for each expert of a MoE's routed
    experts (their stacked (E, out, in) tensors: A (E, r, in), B (E, out, r)): `up` starts at zero, `down`
    small and random. Parameter keys are the layers' names (the experts' parameters' names), dots as '/'."""

    def __init__(self, model: nn.Module, rank: int, seed: int = 0, bits: int = 0):
        """`rank` on every target; a restore that gives its parameters out layer by layer (`resize`) keeps it as
        the delta's nominal size. `bits` > 0: the restore also rounds the rest of each linear layer's drift past
        the rank-r part to that many bits a weight (`round_rest`), a fixed term the finish trains A and B beside."""
        from ..model import Experts

        super().__init__()
        if rank < 1:
            raise ValueError(f"full delta rank {rank}: give a positive rank")
        if bits and bits not in REST_BITS:
            raise StarElasticError(f"full delta bits {bits}: give one of {', '.join(map(str, REST_BITS))}")
        self.nominal_rank, self.bits = rank, bits
        odd = [n for n, m in model.named_modules() if bits and isinstance(m, nn.Linear) and n != "lm_head"
               and m.in_features * bits % 8]
        if odd:
            raise StarElasticError(f"full delta bits {bits}: {odd[0]}'s {model.get_submodule(odd[0]).in_features} "
                                   f"inputs do not pack {8 // bits} codes to a byte")
        g = torch.Generator().manual_seed(seed)
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
        self.experts = [f"{n}.{which}" for n, m in model.named_modules() if isinstance(m, Experts)
                        for which in EXPERT_TENSORS]
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        for name in self.targets:
            w = self.weight_of(model, name)
            *stack, out_f, in_f = w.shape
            key = _key(name)
            down = torch.randn(*stack, rank, in_f, generator=g).div_(in_f ** 0.5)
            self.down[key] = nn.Parameter(down.to(w.device, w.dtype))  # the weights' dtype: the trainer's master
            self.up[key] = nn.Parameter(torch.zeros(*stack, out_f, rank, device=w.device, dtype=w.dtype))
        # the full budget's own values of parameters outside the linear layers (`keep`), by parameter name;
        # `shared`: the smaller budgets' values read from a checkpoint, until `subtract_from` puts them in
        self.rest: dict[str, torch.Tensor] = {}
        self.shared: dict[str, torch.Tensor] = {}
        # the rounded rest (bits > 0), set by the restore: per linear layer its codes (out, in) and scales (out, in /
        # group) as buffers, so that a trainer's saved state holds them and no optimiser sees them
        self.rounded_codes, self.rounded_scales = nn.Module(), nn.Module()
        # each layer's rest made dense in the weights' dtype, kept while its codes and scales are unchanged: a
        # training run enters `applied` every full-budget step
        self._dense_rests: dict[str, tuple] = {}

    def keep(self, model: nn.Module, values: dict[str, torch.Tensor]) -> "FullDelta":
        """The full budget keeps `values` ({parameter name: tensor}, e.g. the parent's from `held_values`) as
        tensors of its own; `model`'s own values of those parameters stay the smaller budgets'."""
        params = dict(model.named_parameters())
        for name, v in values.items():
            if name not in params or params[name].shape != v.shape:
                raise StarElasticError(f"the full budget's own {name} {tuple(v.shape)} is not one of the model's "
                                       "parameters")
            # whole on every rank under FSDP2 (a collective: every rank keeps them): the full budget's forward
            # reads them in place of a gathered parameter
            self.rest[name] = parallel.full_tensor(v.detach()).to(params[name].device, params[name].dtype).clone()
        return self

    def _own_modules(self, model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
        """(module, the full budget's own weight) for every embedding, linear layer or norm whose weight is one
        of `rest` (a tied LM head too: its weight is the embeddings')."""
        if not self.rest:
            return []
        by_id = {id(p): self.rest[name] for name, p in model.named_parameters() if name in self.rest}
        return [(m, by_id[id(m.weight)]) for m in model.modules()
                if _has_own_mixin(m) and isinstance(getattr(m, "weight", None), nn.Parameter)
                and id(m.weight) in by_id]

    def _own_params(self, model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
        """(module, {attribute: the full budget's own value}) for every other module with parameters in `rest`
        (Mamba's own, a MoE's gate: HELD_PARTS "mamba", "gates")."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, own in self.rest.items():
            owner, _, attr = name.rpartition(".")
            if not _has_own_mixin(model.get_submodule(owner)):
                groups.setdefault(owner, {})[attr] = own
        return [(model.get_submodule(owner), values) for owner, values in groups.items()]

    def without_experts(self) -> "FullDelta":
        """This delta on the linear layers alone (as one written before the experts had one reads)."""
        for name in self.experts:
            key = _key(name)
            del self.down[key], self.up[key]
        self.experts = []
        return self

    @property
    def targets(self) -> list[str]:
        """What the delta covers: the linear layers' names, then the routed experts' tensors' names."""
        return self.names + self.experts

    def weight_of(self, model: nn.Module, name: str) -> torch.Tensor:
        """The weight target `name` adds to in `model`: a linear layer's, or an experts' tensor (E, out, in)."""
        return model.get_parameter(name) if name in self.experts else model.get_submodule(name).weight

    @property
    def rank(self) -> int:
        """The nominal rank: every target's, unless the restore gave its parameters out layer by layer."""
        return self.nominal_rank

    def ranks(self) -> dict[str, int]:
        """Each target's own rank."""
        return {name: self.down[_key(name)].shape[-2] for name in self.targets}

    def resize(self, ranks: dict[str, int]) -> "FullDelta":
        """Targets at other ranks (`ranks`: {target: rank}), their A and B new zero tensors of that shape (the
        restore fills them; a resumed run loads them): new parameters, so an optimiser holding the old ones must
        be given these (the trainer's `restore_delta` and resume do)."""
        for name, r in ranks.items():
            key = _key(name)
            down, up = self.down[key], self.up[key]
            if down.shape[-2] != r:
                self.down[key] = nn.Parameter(down.new_zeros(*down.shape[:-2], r, down.shape[-1]),
                                              requires_grad=down.requires_grad)
                self.up[key] = nn.Parameter(up.new_zeros(*up.shape[:-1], r), requires_grad=up.requires_grad)
        return self

    def resize_like(self, shapes: dict[str, list[int]]) -> "FullDelta":
        """`resize` to the ranks of a saved state dict's tensors ({state-dict key: shape}, as a trainer's saved
        state holds them), with room for the rounded rest where the state holds one."""
        for name in self.names:
            key = _key(name)
            if f"rounded_codes.{key}" in shapes:
                device = self.down[key].device
                self.set_rounded(name, torch.zeros(shapes[f"rounded_codes.{key}"], dtype=torch.uint8, device=device),
                                 torch.zeros(shapes[f"rounded_scales.{key}"], device=device))
        return self.resize({name: shapes[f"down.{_key(name)}"][-2] for name in self.targets
                            if f"down.{_key(name)}" in shapes})

    def set_rounded(self, name: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Linear layer `name`'s rounded rest: codes (out, in) and scales (out, in / group), kept as buffers."""
        key = _key(name)
        self._dense_rests.pop(key, None)
        self.rounded_codes.register_buffer(key, codes.to(torch.uint8))
        self.rounded_scales.register_buffer(key, scales.float())

    def rounded(self, name: str) -> torch.Tensor | None:
        """Linear layer `name`'s rounded rest, dense (out, in) in float32, or None (none set)."""
        key = _key(name)
        codes = getattr(self.rounded_codes, key, None)
        return None if codes is None else rest_dense(codes, getattr(self.rounded_scales, key), self.bits)

    def _dense_rest(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """`rounded(name)` in `dtype`, made once and reused while the codes and scales stay as they were (same
        tensors, devices and in-place versions: a resumed state loads into them in place)."""
        key = _key(name)
        codes, scales = getattr(self.rounded_codes, key, None), getattr(self.rounded_scales, key, None)
        if codes is None:
            return None
        stamp = (codes._version, scales._version, dtype)
        held = self._dense_rests.get(key)  # (codes, scales, stamp, dense): the tensors themselves, not their ids
        if held is None or held[0] is not codes or held[1] is not scales or held[2] != stamp:
            held = self._dense_rests[key] = (codes, scales, stamp, self.rounded(name).to(dtype))
        return held[3]

    def rounded_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the rounded rest takes in a delta file: codes packed 8 / bits to a byte, scales in `dtype` (None:
        as held)."""
        return sum(c.numel() * self.bits // 8 + sc.numel() * torch.finfo(dtype or sc.dtype).bits // 8
                   for c, sc in zip(self.rounded_codes.buffers(), self.rounded_scales.buffers()))

    def delta(self, name: str) -> torch.Tensor:
        """B A of target `name`, (out, in) (experts: (E, out, in)), in float32."""
        key = _key(name)
        ba = self.up[key].float() @ self.down[key].float()
        rest = self.rounded(name) if name in self.names else None
        return ba if rest is None else ba + rest

    def tensors(self) -> dict[str, torch.Tensor]:
        """A and B as the checkpoint stores them: `<layer>.delta_down` (r, in), `<layer>.delta_up` (out, r),
        under the layers' names in the model (`model.layers.0.self_attn.q_proj`); the experts' under their
        tensors' names (`model.layers.1.mixer.experts.up_proj.delta_down`, (E, r, in))."""
        out = {}
        for name in self.targets:
            key = _key(name)
            down, up = _stored_keys(name)
            out[down], out[up] = self.down[key], self.up[key]
            codes = getattr(self.rounded_codes, key, None)
            if codes is not None:  # the rounded rest: its codes packed 8 / bits to a byte, a scale a group
                out[name + ROUNDED], out[name + ROUNDED_SCALE] = pack_codes(codes, self.bits), \
                    getattr(self.rounded_scales, key)
        return out

    @classmethod
    def read(cls, model: nn.Module, path) -> "FullDelta":
        """The delta stored at `path` (`tensors`' keys) for `model`, in its weights' dtype and device: one
        line naming the problem when the file does not fit the model's linear layers."""
        path = Path(path)
        stored, rank, bits = read_delta_file(path)
        stored_ranks = {k.removesuffix(".delta_down"): t.shape[-2] for k, t in stored.items()
                        if k.endswith(".delta_down")}
        if not stored_ranks:
            raise StarElasticError(f"{path}: no delta_down tensors (not a full budget's delta)")
        if min(stored_ranks.values()) < 1:
            raise StarElasticError(f"{path}: a delta of rank {min(stored_ranks.values())}")
        # the layers and shapes (the nominal rank: a delta given out layer by layer has its own per layer); its
        # starting values are replaced below
        delta = cls(model, rank or max(stored_ranks.values()), bits=bits)
        for key in [k for k in stored if k.endswith(ROUNDED)]:
            name, packed = key.removesuffix(ROUNDED), stored.pop(key)
            scales = stored.pop(name + ROUNDED_SCALE, None)
            w = model.get_submodule(name).weight if name in delta.names else None
            if not bits or w is None or scales is None or packed.dtype != torch.uint8 or \
                    packed.shape != (w.shape[0], w.shape[1] * bits // 8) or \
                    scales.shape != (w.shape[0], w.shape[1] // rest_group(w.shape[1])):
                raise StarElasticError(f"{path}: {key} does not fit the model's layer {name} at {bits} bits a weight")
            delta.set_rounded(name, unpack_codes(packed, bits).to(w.device), scales.to(w.device))
        params = dict(model.named_parameters())
        for key in [k for k in stored if k.endswith(SHARED)]:
            name, t = key.removesuffix(SHARED), stored.pop(key)
            if name not in params or params[name].shape != t.shape:
                raise StarElasticError(f"{path}: {key} {tuple(t.shape)} is not one of the model's parameters")
            delta.shared[name] = t.to(params[name].device, params[name].dtype)
        if not any(_stored_keys(name)[0] in stored for name in delta.experts):  # written before the experts had one
            delta.without_experts()
        want = {k for name in delta.targets for k in _stored_keys(name)}
        if set(stored) != want:
            odd = sorted(set(stored) ^ want)
            raise StarElasticError(f"{path}: its tensors do not match the model's linear layers and experts "
                                   f"({len(odd)} differ, e.g. {odd[0]})")
        for name, (down, up) in stored_pairs(stored).items():
            w = delta.weight_of(model, name)
            *stack, out_f, in_f = w.shape
            r = down.shape[-2]
            if down.shape != (*stack, r, in_f) or up.shape != (*stack, out_f, r):
                raise StarElasticError(f"{path}: {name}'s delta is {tuple(up.shape)} x {tuple(down.shape)}, the layer "
                                       f"is {tuple(w.shape)} (rank {r})")
            key = _key(name)
            delta.down[key] = nn.Parameter(down.to(w.device, w.dtype), requires_grad=False)
            delta.up[key] = nn.Parameter(up.to(w.device, w.dtype), requires_grad=False)
        return delta

    @contextmanager
    def applied(self, model: nn.Module):
        """Inside: `model` is the full budget with its delta, each linear layer's class swapped in place
        as masks are (masking.py: torch.compile guards on classes, so compiled layers run it too). What
        trains the delta alone is the backward's `inputs=` (the trainer's anchor pass), which leaves the
        model's own parameters without gradient. Sharded (FSDP2) models too: a layer's forward reads its weight
        gathered, and A, B are whole on every rank (their gradient all-reduced by the trainer)."""
        swaps = self.apply(model)
        try:
            yield model
        finally:
            swaps.undo()

    def apply(self, model: nn.Module, merge_rest: bool = False) -> ClassSwaps:
        """`applied` until the returned swaps are undone (a server's full budget runs with it for good).
        `merge_rest`: each linear layer with a rounded rest runs its own W + B A + R, made now, in place of W x +
        B A x + R x: a dense R is as large as W, so the merged copy costs no more memory and saves two products a
        layer, and it is the exported full model's weight to the rounding. For weights that no longer change
        (a server): trained afterwards, the copy would not follow."""
        swaps = ClassSwaps()
        try:
            for name in self.names:
                key = _key(name)
                module = model.get_submodule(name)
                if merge_rest and getattr(self.rounded_codes, key, None) is not None:
                    w = module.weight
                    with torch.no_grad():
                        own = (w.float() + self.delta(name).to(w.device)).to(w.dtype)
                    swaps.mix(module, _MergedLinear, own_weight=own)
                    continue
                swaps.mix(module, _WithDelta, delta_down=self.down[key], delta_up=self.up[key],
                          delta_rest=self._dense_rest(name, self.down[key].dtype))
            for module in dict.fromkeys(name.rpartition(".")[0] for name in self.experts):
                pairs = {which: (self.down[_key(f"{module}.{which}")],
                                 self.up[_key(f"{module}.{which}")]) for which in EXPERT_TENSORS}
                swaps.mix(model.get_submodule(module), _ExpertsWithDelta, delta_pairs=pairs)
            for module, own in self._own_modules(model):
                swaps.mix(module, _own_mixin(module), own_weight=own)
            for module, values in self._own_params(model):
                swaps.mix(module, _own_values(tuple(sorted(values))), own_values=values)
        except BaseException:
            swaps.undo()
            raise
        return swaps

    def is_applied(self, model: nn.Module) -> bool:
        """Whether `model` runs this delta now, its linear layers or its own embeddings / norms (inside
        `applied`, or after `apply`)."""
        experts = (model.get_submodule(name.rpartition(".")[0]) for name in self.experts)
        return any(isinstance(model.get_submodule(name), (_WithDelta, _MergedLinear)) for name in self.names) or \
            any(isinstance(m, _ExpertsWithDelta) for m in experts) or \
            any(isinstance(m, (_OwnEmbedding, _OwnLinear, _OwnNorm)) for m, _ in self._own_modules(model)) or \
            any(isinstance(m, _OwnValues) for m, _ in self._own_params(model))

    def merge_into(self, model: nn.Module) -> nn.Module:
        """Add B A to the weights of `model`, a copy of the full budget with the same layer names, and put in
        its own embeddings and norms (`rest`): the standalone full model."""
        self._add(model, 1.0)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, own in self.rest.items():
                params[name].copy_(parallel.shard_like(own, params[name]))
        return model

    def subtract_from(self, model: nn.Module) -> nn.Module:
        """Take B A from the weights of `model`, the full budget merged (as a checkpoint stores it), and put in
        the smaller budgets' embeddings and norms (`shared`, read with the delta), keeping the full budget's
        as its own: the shared weights W that every smaller budget is a prefix of."""
        self._add(model, -1.0)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, theirs in self.shared.items():
                self.rest[name] = params[name].detach().clone()
                params[name].copy_(theirs)
        self.shared = {}
        return model

    def shared_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint stores beside A and B: `model`'s values (the smaller budgets') of what the full
        budget keeps its own of, under `<parameter>.shared`."""
        params = dict(model.named_parameters())
        return {name + SHARED: parallel.full_tensor(params[name].detach()) for name in self.rest}  # sharded: gathered

    @torch.no_grad()
    def _add(self, model: nn.Module, sign: float) -> nn.Module:
        for name in self.targets:  # in float32, back in the weights' dtype; sharded: each rank its own rows
            w = self.weight_of(model, name)
            w.copy_((w.float() + sign * parallel.shard_like(self.delta(name), w)).to(w.dtype))
        return model

    @torch.no_grad()
    def restore(self, model: nn.Module, parent: nn.Module, covariances: dict[str, torch.Tensor] | None = None,
                damping: float = 1e-2, allocate: bool = False) -> Restored:
        """Set B A, layer by layer, to the rank-r part of what the shared weights lost: the parent's weight less
        `model`'s, W_p - W. With `covariances` ({layer: E[x x^T] of its inputs in the parent}, `input_covariances`)
        the nearest in ||(W_p - W - B A) L||, where L L^T is the covariance (damped by `damping` x its mean
        diagonal; for an expert, L the root of its diagonal, E[x^2] per input channel): the error weighted by the
        inputs the layer sees, so directions that no input takes cost nothing (ASVD / SVD-LLM's whitening); without,
        the plain nearest in weights. Both factors get the root of the singular values, so that training on from
        here (the finish) moves them at one pace. Returns what it covered (`Restored`): the share of the (weighted)
        loss that the rank-r part covers, over all layers (1 restores the parent exactly, and what is missing is
        the full model's drift that a rank-r delta cannot hold), the same undamped, what it leaves against the
        parent's output, and what other ranks, or this one spent unevenly, would cover (restore_report).
        `allocate`: rank r's parameters given out layer by layer where the drift is (`allocate_ranks`; the targets
        resized, so an optimiser must be given the new parameters), from a first pass over the layers' spectra (above
        EXACT_SVD_MAX each layer's top ALLOCATE_SPAN x r values, so none gets more than that). Why: the trained delta
        follows the shared weights from behind (docs/RESULTS.md §9); this one starts where they are. With `bits` (the
        delta's), each linear layer's rest past its rank-r part is rounded to that many bits a weight under the same
        covariance (`round_rest`), and the share returned is what both cover (the report's sizes stay the rank's
        alone)."""
        spectra = self._spectra(model, parent, covariances, damping) if allocate else None
        if allocate:
            self.resize(allocate_ranks(spectra, self.rank))
        caught = total = 0.0
        # what both missed, the drift and the parent's weights, under the covariance undamped (the inputs as they are)
        seen = [0.0, 0.0, 0.0]
        ranks = parallel.world()[1]
        mine = {}  # target: [(squared singular values, out + in, min(out, in)) of each part] of this rank's layers
        for name, owner, gaps in self._gaps(model, parent, covariances):
            key, experts = _key(name), name in self.experts
            for part, gap, cov, parent_part in gaps:
                up, down, c, t, squares = _rank_part(gap, self.down[key].shape[-2], cov, experts, damping)
                mine.setdefault(name, []).append((squares, sum(gap.shape[-2:]), min(gap.shape[-2:])))
                self.up[key][part].copy_(up.to(self.up[key].dtype))
                self.down[key][part].copy_(down.to(self.down[key].dtype))
                err = gap - up @ down
                if self.bits and name in self.names:  # the rest past the rank-r part, rounded
                    codes, scales = round_rest(err, cov, self.bits, damping)
                    self.set_rounded(name, codes, scales)
                    err = err - rest_dense(codes, scales, self.bits)
                    # what both missed, under the weight the rank-r part's total is taken in
                    c = t - _weighted_square(err, None if cov is None else damped(cov, damping), False)
                caught, total = caught + c, total + t
                seen = [a + _weighted_square(x, cov, experts) for a, x in zip(seen, (err, gap, parent_part.double()))]
            if ranks > 1:  # the owner factored it (and rounded its rest): the others receive B A (and R)
                for t in (self.up[key], self.down[key]):
                    dist.broadcast(t.data, src=owner)
                if self.bits and name in self.names:
                    self._receive_rounded(name, owner)
        if ranks > 1:  # each rank summed its own layers'
            device = next((t.device for t in self.up.values()), torch.device("cpu"))
            sums = torch.tensor([caught, total, *seen], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            caught, total, *seen = sums.tolist()
        if spectra is None:  # not allocated: the spectra of the factoring pass
            spectra = self._gather_spectra(mine)
        return Restored(share=caught / total if total else 1.0, undamped=1 - seen[0] / seen[1] if seen[1] else 1.0,
                        residual=seen[0] / seen[2] if seen[2] else 0.0, report=restore_report(spectra, total, self.rank))

    def _receive_rounded(self, name: str, owner: int) -> None:
        """Under FSDP2: linear layer `name`'s rounded rest, codes and scales, from the rank that rounded it, so that
        every rank holds it whole, as it holds B and A (its shapes from theirs: (out, in), (out, in / group))."""
        key = _key(name)
        if parallel.world()[0] != owner:
            out_f, n = self.up[key].shape[-2], self.down[key].shape[-1]
            device = self.down[key].device
            self.set_rounded(name, torch.zeros(out_f, n, dtype=torch.uint8, device=device),
                             torch.zeros(out_f, n // rest_group(n), device=device))
        for t in (getattr(self.rounded_codes, key), getattr(self.rounded_scales, key)):
            dist.broadcast(t, src=owner)
        self._dense_rests.pop(key, None)  # made again from what arrived

    def _gather_spectra(self, mine: dict) -> dict:
        """{target: (squares of all its parts (..., k) or None, out + in, min(out, in))} from each rank's own
        targets' parts."""
        ranks = parallel.world()[1]
        if ranks > 1:
            gathered = [None] * ranks
            dist.all_gather_object(gathered, {name: [(None if sq is None else sq.cpu(), pair, full)
                                                     for sq, pair, full in parts] for name, parts in mine.items()})
            mine = {name: parts for got in gathered for name, parts in got.items()}
        return {name: (None if any(sq is None for sq, _, _ in parts) else torch.cat([sq.cpu() for sq, _, _ in parts]),
                       parts[0][1], parts[0][2]) for name, parts in mine.items()}

    def _gaps(self, model: nn.Module, parent: nn.Module, covariances):
        """Per target, in order: (name, the rank that owns it, [(part, float64 gap W_p - W of the part, its
        covariance or None, the parent's weight of the part)], empty on the other ranks). Layers are dealt out
        across ranks, each factoring its own; every rank gathers every whole weight (sharded: a collective). The
        experts go EXPERT_CHUNK at a time: in float64 Nano's 128 (1856 x 2688) are 5 GB a copy."""
        rank, ranks = parallel.world()
        for i, name in enumerate(self.targets):
            w = parallel.full_tensor(self.weight_of(model, name).detach())
            parent_w = parallel.full_tensor(self.weight_of(parent, name).detach()).to(w.device)
            owner = i % ranks
            if rank != owner:
                yield name, owner, []
                continue
            cov = None if covariances is None or name not in covariances else covariances[name].to(w.device).double()
            experts = name in self.experts
            parts = [slice(e, e + EXPERT_CHUNK) for e in range(0, w.shape[0], EXPERT_CHUNK)] if experts else \
                [slice(None)]
            yield name, owner, ((part, parent_w[part].double() - w[part].double(),  # (out, in); experts (E, out, in)
                                 cov[part] if experts and cov is not None else cov, parent_w[part]) for part in parts)

    def _spectra(self, model: nn.Module, parent: nn.Module, covariances, damping: float) -> dict:
        """Every target's squared singular values of its weighted gap (restore's first pass when it allocates):
        each rank its own targets', then gathered."""
        mine = {}
        for name, _, gaps in self._gaps(model, parent, covariances):
            for _, gap, cov, _ in gaps:
                squares = _rank_part(gap, 1, cov, name in self.experts, damping,
                                     spectrum_k=ALLOCATE_SPAN * self.rank)[4]
                mine.setdefault(name, []).append((squares, sum(gap.shape[-2:]), min(gap.shape[-2:])))
        return self._gather_spectra(mine)

    @contextmanager
    def merged(self, model: nn.Module):
        """Inside: `model`'s linear weights are W + B A (for writing the checkpoint); after, exactly W again
        (restored from copies, not by subtracting)."""
        parallel.reshard(model)  # sharded: the parameters held below are the ones a gather leaves registered
        saved = {name: self.weight_of(model, name).detach().clone() for name in self.targets}
        params = dict(model.named_parameters())
        saved_rest = {name: params[name].detach().clone() for name in self.rest}
        try:
            yield self.merge_into(model)
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    self.weight_of(model, name).copy_(w)
                for name, w in saved_rest.items():
                    params[name].copy_(w)


@torch.no_grad()
def input_covariances(model: nn.Module, names: list[str], run, batches, experts=()) -> dict[str, torch.Tensor]:
    """E[x x^T] (float32, (in, in)) of the inputs of `model`'s linear layers `names` over `batches`, each run
    by `run(x)` (the caller's forward, under its autocast): what `FullDelta.restore` weights the error by. For
    the routed experts' tensors `experts` (FullDelta.experts), each expert's E[x^2] per input channel over the
    tokens routed to it, (E, in): a diagonal weight, as ASVD scales a weight (the full (E, in, in) would be
    125 GB at Nano's shapes); an expert no token reached gets ones (the plain restore)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    squares: dict[str, torch.Tensor] = {}
    routed: dict[str, torch.Tensor] = {}

    def expert_hook(module_name):
        def post(module, args, output):
            x, idx = args[0].detach().float(), args[1]
            with torch.autocast(x.device.type, enabled=False):
                for e in range(module.up_proj.shape[0]):
                    xe = x[(idx == e).any(-1)]
                    if not xe.shape[0]:
                        continue
                    he = module.hidden(xe @ module.up_proj[e].float().T)
                    for which, v in (("up_proj", xe), ("down_proj", he)):
                        key = f"{module_name}.{which}"
                        if key not in squares:
                            w = getattr(module, which)
                            squares[key] = torch.zeros(w.shape[0], w.shape[2], device=x.device)
                            routed[key] = torch.zeros(w.shape[0], device=x.device)
                        squares[key][e] += (v * v).sum(0)
                        routed[key][e] += v.shape[0]
        return post

    def hook(name):
        def pre(module, args):
            flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            with torch.autocast(flat.device.type, enabled=False):  # in float32 under the caller's autocast too
                sums[name] = sums[name].addmm_(flat.T, flat) if name in sums else flat.T @ flat
            counts[name] += flat.shape[0]
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    handles += [model.get_submodule(m).register_forward_hook(expert_hook(m))
                for m in dict.fromkeys(n.rpartition(".")[0] for n in experts)]
    try:
        for x in batches:
            run(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if not counts[n]]
    if missing:
        raise StarElasticError(f"input_covariances: {len(missing)} layers saw no input (e.g. {missing[0]})")
    out = {n: sums[n] / counts[n] for n in names}
    for n in experts:
        w = model.get_parameter(n)
        if n not in squares:  # no token reached the layer's experts
            out[n] = torch.ones(w.shape[0], w.shape[2], device=w.device)
            continue
        seen = routed[n] > 0
        out[n] = torch.where(seen[:, None], squares[n] / routed[n].clamp_min(1)[:, None], torch.ones_like(squares[n]))
    return out


EXPERT_TENSORS = ("up_proj", "down_proj")  # a MoE's routed experts' stacked tensors, (E, out, in) each
ROUNDED, ROUNDED_SCALE = ".delta_rest", ".delta_rest_scale"  # a linear layer's rounded rest in the delta file
SHARED = ".shared"  # the suffix of the smaller budgets' values in the delta file (`FullDelta.keep`)
HELD_PARTS = ("embeddings", "norms", "mamba", "gates")  # what TrainConfig.hold can keep at the parent's


def _has_own_mixin(module: nn.Module) -> bool:
    """Whether the full budget's own weight of `module` runs by `_own_mixin` (else by `_OwnValues`)."""
    from ..model import GatedRMSNorm, RMSNorm

    return isinstance(module, (nn.Embedding, nn.Linear, RMSNorm, GatedRMSNorm))


def embeddings_and_norms(model: nn.Module, parts=HELD_PARTS) -> list[nn.Parameter]:
    """Parameters the delta does not cover, which a freeze can keep at the parent's (TrainConfig.hold):
    "embeddings", the token embeddings and the LM head (the embeddings themselves when tied); "norms", every
    norm's scale; "mamba", each Mamba mixer's own (A_log, D, dt_bias, the causal conv's weight and bias);
    "gates", each MoE's router weight (the choice of experts)."""
    from ..model import GatedRMSNorm, Mamba2, RMSNorm, TopkRouter

    kinds = (nn.Embedding,) * ("embeddings" in parts) + (RMSNorm, GatedRMSNorm) * ("norms" in parts) + \
        (TopkRouter,) * ("gates" in parts)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, kinds) or (name == "lm_head" and "embeddings" in parts):
            for p in m.parameters(recurse=False):
                out[id(p)] = p
        if isinstance(m, Mamba2) and "mamba" in parts:
            for p in [*m.parameters(recurse=False), *m.conv1d.parameters()]:
                out[id(p)] = p
    return list(out.values())


def held_values(model: nn.Module, parts) -> dict[str, torch.Tensor]:
    """Copies of `model`'s values of what `parts` names (`embeddings_and_norms`), by parameter name: taken from
    the parent before training, what `FullDelta.keep` gives the full budget."""
    own = {id(p) for p in embeddings_and_norms(model, parts)}
    return {name: p.detach().clone() for name, p in model.named_parameters() if id(p) in own}


def _stored_keys(name: str) -> tuple[str, str]:
    """A's and B's keys in the checkpoint's delta file for linear layer `name`."""
    return f"{name}.delta_down", f"{name}.delta_up"


def stored_pairs(stored: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{linear layer's name: (A, B)} of a delta file's tensors (`FullDelta.tensors`' keys)."""
    names = [k.removesuffix(".delta_down") for k in stored if k.endswith(".delta_down")]
    return {name: tuple(stored[k] for k in _stored_keys(name)) for name in names}


def read_delta_file(path) -> tuple[dict[str, torch.Tensor], int | None, int]:
    """A delta file's tensors (`FullDelta.tensors`' keys, as stored), its nominal rank (None where the file does
    not say: a delta given out layer by layer has its own per layer) and the rounded rest's bits a weight (0: none)."""
    from ..hf import read_safetensors

    stored = read_safetensors([Path(path)])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        rank, bits = (int(meta["rank"]) if "rank" in meta else None), int(meta.get("bits", 0))
    except ValueError:
        raise StarElasticError(f"{path}: its metadata's rank / bits are not whole numbers ({meta})") from None
    if bits not in (0, *REST_BITS):
        raise StarElasticError(f"{path}: a rounded rest of {bits} bits a weight (known: {REST_BITS})")
    return stored, rank, bits


def save_delta(delta: FullDelta, path, dtype: torch.dtype | None = None, model: nn.Module | None = None,
               shared: dict | None = None) -> None:
    """Write A and B of every linear layer (`FullDelta.tensors`), in `dtype` (None: as held), and, when the full
    budget keeps embeddings or norms of its own, `model`'s values of them (the smaller budgets'; `shared`: those
    as `FullDelta.shared_tensors` gave them, gathered beforehand from a sharded model by every rank)."""
    from safetensors.torch import save_file

    if delta.rest and model is None and shared is None:
        raise ValueError("save_delta: the smaller budgets' embeddings and norms come from the model: pass it")
    if delta.rest and shared is None:
        shared = delta.shared_tensors(model)
    tensors = {**delta.tensors(), **(shared or {})}
    save_file({k: v.detach().to(dtype or v.dtype if v.is_floating_point() else v.dtype).contiguous().cpu()
               for k, v in tensors.items()}, str(path),
              metadata={"format": "star-elastic-full-delta", "rank": str(delta.rank), "bits": str(delta.bits)})
