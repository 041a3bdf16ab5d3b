"""Serving head order: the parent's heads stored rank-major, so that every budget's heads are a plain
prefix and its views (views.py) run one matrix product each (docs/METHOD.md §13).

Heads kept per group are no 2-D view of a group-major parent, and the bmm over grouped views is 2-3x
slower than one matrix product. Every budget keeps the same count k of heads in every group (a
prefix within the group), so once the parent's heads are stored rank-major (head j of group g at
j * groups + g, permuted in place at load) every budget's heads are the plain prefix of the first
k * groups: q_proj rows and o_proj columns, Mamba's in_proj rows (B and C first, then each head's z,
x and dt rows), conv channels ([B | C | x]) and out_proj columns become 2-D views, as in the sliced
model; Mamba's dt_bias, A_log, D and gated-norm weight are rank-major too, so plain prefixes.
Valid only while every budget keeps every KV group and cuts no Mamba channels (`serving_order_fits`).

Applied at load as module swaps, the way gpt-fast swaps in quantised modules: `use_serving_order`
permutes the weights in place and replaces the class of each Attention and Mamba2 module (and of
Mamba's gated norm) by the subclass below that computes in that order, overriding the plain model's
small methods: Mamba's decode step runs with no reordering (its SSM state is cached rank-major);
prefill's scan and attention's SDPA reorder at their boundaries. What the order still costs a decode token
is one copy a Mamba layer (its conv input, gathered from rank-major rows) and two an attention layer (its
queries to SDPA's order, its output back), on an H100 about 7% of a Nano-width view's decode before the
thirty-eighth session took the other copies out (docs/RESULTS.md, "Views against slices, eager and compiled").
`use_serving_order(model, False)`
puts weights and classes back. While on, the state dict refuses (it would be silently wrong) and so
do masks (elastic/masking.py): both index heads group-major.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..elastic.masking import is_masked
from ..elastic.spec import ElasticSpec
from ..errors import StarElasticError
from ..generate import forget_decode_steps
from ..model import Attention, GatedRMSNorm, Mamba2, Model


def group_major(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., heads, size): the heads from rank-major to group-major order (a copy)."""
    return t.unflatten(-2, (-1, groups)).transpose(-3, -2).reshape(t.shape)


def rank_major(t: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `group_major`."""
    return t.unflatten(-2, (groups, -1)).transpose(-3, -2).reshape(t.shape)


# ----------------------------------------------------------------------------- modules in serving order


class ServingOrderAttention(Attention):
    """Query heads rank-major in q_proj's rows and o_proj's columns: head h is in KV group h % kv_heads."""

    def attend(self, q, k, v, cache=None, pos=None):
        # q: (b, heads, t, d). SDPA's GQA takes query head h from KV group h // (heads / kv_heads): the queries
        # group-major at its boundary, (b, per, kv, ...) -> (b, kv, per, ...); its output stays group-major
        kv = self.num_kv_heads
        return super().attend(q.unflatten(1, (-1, kv)).transpose(1, 2).flatten(1, 2), k, v, cache, pos)

    def merge_heads(self, out):
        # SDPA's group-major output (b, kv, per, t, d) to o_proj's rank-major columns (b, t, per, kv, d): the
        # reorder and the heads' merge in one copy (two before, one each)
        b, _, t, _ = out.shape
        return out.unflatten(1, (self.num_kv_heads, -1)).permute(0, 3, 2, 1, 4).reshape(b, t, -1)


class ServingOrderMamba2(Mamba2):
    """Heads rank-major: in_proj rows [B | C | each head's z, x, dt], conv channels [B | C | x],
    out_proj columns, dt_bias, A_log, D, the gated norm's weight (`RankMajorGatedRMSNorm`) and the
    cached SSM state. Head h reads group h % n_groups."""

    def split_in_proj(self, proj):
        H, P, bc = self.num_heads, self.head_dim, 2 * self.n_groups * self.state_size
        BC, heads = proj.split([bc, H * (2 * P + 1)], dim=-1)
        z, x, dt = heads.unflatten(-1, (H, 2 * P + 1)).split([P, P, 1], dim=-1)
        # the conv's input [B | C | x] in one copy: x's heads are strided rows, so B and C go in as rows of P
        # where they divide into them (flattening x first would copy it once more)
        xBC = (torch.cat([BC.unflatten(-1, (-1, P)), x], dim=-2).flatten(-2) if bc % P == 0
               else torch.cat([BC, x.flatten(-2)], dim=-1))
        return z, xBC, dt.flatten(-2)  # z (b, t, heads, head_dim), a view

    def split_conv(self, xBC):
        BC, x = xBC.split([2 * self.n_groups * self.state_size, self.d_inner], dim=-1)
        B, C = BC.chunk(2, dim=-1)
        return x, B, C

    def scan(self, x, dt, A, B, C, state):
        # the scan takes heads group-major: reorder at its boundary, once per prefill
        G = self.n_groups
        if state is not None:
            state = group_major(state.flatten(-2), G).view_as(state)
        y, final = super().scan(group_major(x, G), group_major(dt[..., None], G)[..., 0],
                                group_major(A[:, None], G)[:, 0], B, C, state)
        return rank_major(y, G), rank_major(final.flatten(-2), G).view_as(final)

    def state_groups(self, v):
        # rank-major head h reads group h % groups, a mapping the state update does not make: per head, in fp32
        return v.float().repeat(1, self.num_heads // self.n_groups, 1)  # decode: no reordering


class RankMajorGatedRMSNorm(GatedRMSNorm):
    """Mamba's gated norm over rank-major heads: group g is the heads h with h % groups == g,
    normalised over their channels together. x (..., heads * head_dim); z (..., heads, head_dim), as
    `ServingOrderMamba2.split_in_proj` leaves it (a view of in_proj's output, not copied)."""

    def forward(self, x, z):
        # out= has no autograd, a compiled graph fuses the written-out form anyway, and on the CPU torch's rms_norm
        # is written out too
        written_out = torch.is_grad_enabled() or torch.compiler.is_compiling() or not z.is_cuda
        return (rank_major_gated_norm if written_out else rank_major_gated_norm_fused)(x, z, self.weight, self.groups,
                                                                                       self.eps)


def rank_major_gated_norm(x, z, weight, groups: int, eps: float):
    """x * silu(z), RMS-normalised over each rank-major group's heads and channels, times `weight`: x (..., heads *
    head_dim), z (..., heads, head_dim) -> (..., heads * head_dim), in the written-out operations."""
    dtype = x.dtype
    x = x.view(z.shape).float() * F.silu(z.float())
    xg = x.unflatten(-2, (-1, groups))  # (..., heads per group, groups, head_dim)
    xg = xg * torch.rsqrt(xg.pow(2).mean((-3, -1), keepdim=True) + eps)
    return (weight.view(xg.shape[-3:]) * xg.to(dtype)).flatten(-3)


def rank_major_gated_norm_fused(x, z, weight, groups: int, eps: float):
    """`rank_major_gated_norm` with torch's rms_norm (one fused kernel on CUDA, as the plain order's norm runs):
    x * silu(z) written group-major, so that the norm takes each group's heads and channels together, and the
    weight's product written back rank-major. As many kernels as the plain order's norm, four fewer than the
    written-out form; no autograd (out=)."""
    per, P = z.shape[-2] // groups, z.shape[-1]

    def group_major(v):  # (..., heads, head_dim) rank-major -> (..., groups, per, head_dim), a view
        return v.unflatten(-2, (per, groups)).transpose(-3, -2)

    g = torch.empty(*z.shape[:-2], groups, per, P, dtype=torch.float32, device=z.device)
    torch.mul(group_major(x.view(z.shape).float()), group_major(F.silu(z.float())), out=g)
    g = F.rms_norm(g, (per, P), eps=eps).to(x.dtype)
    out = torch.empty(z.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=z.device)
    torch.mul(group_major(weight.view(-1, P)), g, out=group_major(out))
    return out.flatten(-2)


def in_serving_order(module) -> bool:
    """Whether `module` (an Attention or Mamba2) computes in serving order."""
    return isinstance(module, (ServingOrderAttention, ServingOrderMamba2))


def order_module(m: Attention | Mamba2, on: bool = True):
    """Swap one module's class (and a Mamba's gated norm's) to compute in serving order, or back. Its
    weights are not touched: `use_serving_order` permutes them; a budget view's are prefixes already."""
    if isinstance(m, Attention):
        m.__class__ = ServingOrderAttention if on else Attention
        return
    m.__class__ = ServingOrderMamba2 if on else Mamba2
    m.norm.__class__ = RankMajorGatedRMSNorm if on else GatedRMSNorm


# ----------------------------------------------------------------------------- the parent's weights


def serving_order_fits(cfg, specs: list[ElasticSpec]) -> bool:
    """Whether every budget of `specs` has views over a parent in serving order: all KV groups kept
    (heads stay a prefix within every group) and no Mamba channels cut (that layout is copied through
    the group-major `take`)."""
    for spec in specs:
        sizes = spec.sizes(cfg)
        for i in spec.kept_layers(cfg):
            p, s = cfg.layer(i), sizes[i]
            if s.get("num_key_value_heads", p.num_key_value_heads) < p.num_key_value_heads:
                return False
            if s.get("mamba_head_dim", p.mamba_head_dim) < p.mamba_head_dim:
                return False
    return True


def _refuse_state_dict(*_):
    raise StarElasticError("this model stores its heads in serving order (rank-major): its state dict would "
                           "be silently wrong; undo it with use_serving_order(model, False) before saving or slicing")


def _rank_major_units(heads: int, groups: int, size: int) -> torch.Tensor:
    """(heads, size) indices of each head's `size` entries, heads in rank-major order."""
    order = torch.arange(heads).view(groups, -1).T.flatten()  # head j of group g at j * groups + g
    return order[:, None] * size + torch.arange(size)


def _mamba_order(m: Mamba2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In serving order, as indices into the loaded order: in_proj rows [B | C | each head's z, x, dt]
    (loaded [z | x | B | C | dt]), conv channels [B | C | x] (loaded [x | B | C]), out_proj columns."""
    bc, inner = 2 * m.n_groups * m.state_size, m.d_inner
    z = _rank_major_units(m.num_heads, m.n_groups, m.head_dim)  # (heads, head_dim)
    dt = inner + m.conv_dim + _rank_major_units(m.num_heads, m.n_groups, 1)
    rows = torch.cat([torch.arange(2 * inner, 2 * inner + bc), torch.cat([z, inner + z, dt], 1).flatten()])
    return rows, torch.cat([torch.arange(inner, inner + bc), z.flatten()]), z.flatten()


@torch.no_grad()
def use_serving_order(model: Model, on: bool = True) -> Model:
    """Permute `model`'s heads in place to serving order (rank-major, see the module doc) or back, and
    swap the modules' classes to match. Build views after it: views built before would see other
    heads. While on, `state_dict` (so saving, exporting, `slice_model`) refuses and masks too: both
    index heads group-major. Attention and Mamba layers with one group, or one head per group, stay
    as they are."""
    if is_masked(model):
        raise StarElasticError("a model running under masks cannot be put in serving order")

    def permute(t: torch.Tensor | None, dim: int, idx: torch.Tensor):  # entry i of `dim` <- loaded entry idx[i]
        if t is not None and on:
            t.copy_(t.index_select(dim, idx.to(t.device)))
        elif t is not None:
            t.index_copy_(dim, idx.to(t.device), t.clone())

    for m in model.modules():
        if isinstance(m, Attention) and 1 < m.num_kv_heads < m.num_heads and in_serving_order(m) != on:
            heads = _rank_major_units(m.num_heads, m.num_kv_heads, m.head_dim).flatten()
            permute(m.q_proj.weight, 0, heads), permute(m.q_proj.bias, 0, heads), permute(m.o_proj.weight, 1, heads)
            order_module(m, on)
        elif isinstance(m, Mamba2) and 1 < m.n_groups < m.num_heads and in_serving_order(m) != on:
            rows, channels, cols = _mamba_order(m)
            permute(m.in_proj.weight, 0, rows), permute(m.in_proj.bias, 0, rows)
            permute(m.conv1d.weight, 0, channels), permute(m.conv1d.bias, 0, channels)
            permute(m.out_proj.weight, 1, cols), permute(m.norm.weight, 0, cols)
            heads = _rank_major_units(m.num_heads, m.n_groups, 1).flatten()
            permute(m.dt_bias, 0, heads), permute(m.A_log, 0, heads), permute(m.D, 0, heads)
            order_module(m, on)
    handle = getattr(model, "_serving_order_hook", None)
    if on and handle is None:
        model._serving_order_hook = model.register_state_dict_pre_hook(_refuse_state_dict)
    elif not on and handle is not None:
        handle.remove()
        model._serving_order_hook = None
    forget_decode_steps(model)
    return model
