"""Budget views: every budget of one loaded elastic checkpoint, sharing the parent's weights.

A budget is a prefix of the importance-sorted parent on every axis (docs/METHOD.md §13), so its weights
are slices of the parent's tensors: `budget_view` builds the budget's `Model` on the meta device
from `spec.config(parent)` and points each parameter at a view (no copy). The view runs the
smaller matrix products, exactly as the sliced standalone model (`slice_model`) does.

Most kept parts are plain strided views: a row prefix is contiguous, a column prefix is a matrix
with a leading-dimension stride (BLAS and cuBLAS take it as it is), experts are (E, I, d)[:e, :i, :h].
Heads kept per group are not one 2-D view: attention keeps the first query heads of each kept KV
group, Mamba the first heads of each of its n_groups groups. Their rows (or columns) are then a
(groups, rows per group, in) view with one stride per group, and `GroupedLinear` runs it as one
batched matrix product. Mamba's in_proj rows [z | x | B | C | dt] become four such parts side by
side, its depthwise conv channels [x | B | C] two (`PartsConv1d`).

Two layouts no strided view expresses are copied instead, once, when the view is built, and named
in `view.copied`: Mamba channels (mamba_head_dim) cut together with heads per group, and routed
experts cut inside several router groups (n_group > 1).

Compact views (`compact=True`, the default): the grouped bmm runs at 0.36-0.49x a contiguous GEMM
(an H200 at Nano shapes, docs/RESULTS.md), so wherever a part would run as a `GroupedLinear` or
`PartsConv1d` (attention's q_proj rows and o_proj columns with query heads kept per KV group; Mamba's
in_proj rows, conv channels and out_proj columns with heads kept per group, outside the serving head
order) the view holds a copy of exactly the sliced model's tensor (`take`), made once when the view
is built, and the layer runs plain nn.Linear / conv as the sliced model does; so are Mamba's per-head
vectors (dt_bias, A_log, D: a few floats, which as strided views the layer copied at every token). Copies
are listed in `view.copied` and `copied_bytes(view)` gives their size; parts that are plain strided views
(k/v_proj, o_proj's bias, Mamba's norm weight) stay views. `compact=False` keeps the grouped modules (no
copy; for comparison).

Serving head order (order.py): where every budget keeps every KV group and all Mamba channels, the
engine stores the parent's heads rank-major at load, and every budget's heads become plain prefixes,
so views of such a parent are plain 2-D views with the serving-order modules of order.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..elastic.delta import shared_value
from ..elastic.slicing import take
from ..elastic.spec import ElasticSpec
from ..errors import StarElasticError
from ..model import Attention, LlamaLayer, Mamba2, Model, MLP, MoE
from .order import in_serving_order, order_module

# ----------------------------------------------------------------------------- grouped views


def grouped(t: torch.Tensor, dim: int, groups: int, keep_groups: int, per_group: int) -> torch.Tensor:
    """The first `per_group` entries of each of the first `keep_groups` of `groups` equal groups
    along `dim`, as a view: `dim` becomes (keep_groups, per_group). Merged back into one dimension
    (still a view) when the kept entries are contiguous along it."""
    size = t.shape[dim] // groups
    v = t.unflatten(dim, (groups, size)).narrow(dim, 0, keep_groups).narrow(dim + 1, 0, per_group)
    return v.flatten(dim, dim + 1) if keep_groups == 1 or per_group == size else v


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


def linear_parts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) for a 2-D weight or a grouped one, (groups, out, in) with bias
    (groups, out): the groups' outputs side by side, from one batched matrix product over views."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    g, out, inp = weight.shape
    flat = x.reshape(-1, inp)
    # bmm, not matmul: matmul would fold the groups into one 2-D matrix, copying the weight each call
    y = torch.bmm(flat.expand(g, *flat.shape), weight.transpose(1, 2))  # (groups, tokens, out)
    if bias is not None:
        y = y + bias[:, None, :]
    return y.transpose(0, 1).reshape(*x.shape[:-1], g * out)


class GroupedLinear(nn.Module):
    """A linear layer over views of a parent's weight that no single 2-D matrix expresses.

    Row parts (`weights`, each (out, in) or grouped (groups, out, in)): outputs side by side, as
    Mamba's in_proj [z | x | B | C | dt] or attention's q_proj with query heads kept per KV group.
    Grouped input (`in_groups`: one weight (out, groups, in per group)): the input's groups go through
    their own columns and are summed, as o_proj / out_proj over heads kept per group.
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None,
                 in_groups: bool = False):
        super().__init__()
        if in_groups and len(weights) != 1:
            raise ValueError("a grouped input takes one (out, groups, in) weight")
        self.weights = nn.ParameterList([_param(w) for w in weights])
        self.biases = [_param(b) for b in (biases or [None] * len(weights))]
        for i, b in enumerate(self.biases):
            if b is not None:
                self.register_parameter(f"bias_{i}", b)
        self.in_groups = in_groups

    def forward(self, x):
        if self.in_groups:
            w = self.weights[0]
            out, g, inp = w.shape
            xg = x.reshape(-1, g, inp).transpose(0, 1)  # (groups, tokens, in per group)
            y = torch.bmm(xg, w.permute(1, 2, 0)).sum(0)  # each group through its columns, then summed
            if self.biases[0] is not None:
                y = y + self.biases[0]
            return y.view(*x.shape[:-1], out)
        parts = [linear_parts(x, w, b) for w, b in zip(self.weights, self.biases)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class PartsConv1d(nn.Module):
    """Mamba's depthwise conv over channel parts, each (channels, k) or grouped (groups, channels, k)
    (a view of the parent's conv weight); input (b, channels, t + k - 1) -> (b, channels, t), no padding."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
        super().__init__()
        self.weights = nn.ParameterList([_param(w) for w in weights])
        self.biases = [_param(b) for b in biases]
        for i, b in enumerate(self.biases):
            if b is not None:
                self.register_parameter(f"bias_{i}", b)
        self.kernel_size = (weights[0].shape[-1],)

    def forward(self, x):
        sizes = [w.shape[:-1].numel() for w in self.weights]
        outs = []
        for xp, w, b in zip(x.split(sizes, dim=1), self.weights, self.biases):
            xp = xp.reshape(x.shape[0], *w.shape[:-1], x.shape[-1])
            # the k taps of every channel at once: windows (.., t, k) times the channel's weights (.., 1, k)
            y = (xp.unfold(-1, w.shape[-1], 1) * w[..., None, :].to(xp.dtype)).sum(-1)
            if b is not None:
                y = y + b[..., None].to(y.dtype)
            outs.append(y.reshape(x.shape[0], -1, y.shape[-1]))
        return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------- building a view


def _set(module: nn.Module, name: str, t: torch.Tensor | None):
    if t is not None:
        setattr(module, name, _param(t))


def _attention(dst: Attention, src: Attention, h: int, copy=None):
    hd, kv, per = src.head_dim, dst.num_kv_heads, dst.num_heads // dst.num_kv_heads
    for name in ("k_proj", "v_proj"):
        s, d = getattr(src, name), getattr(dst, name)
        _set(d, "weight", s.weight[: kv * hd, :h])
        _set(d, "bias", None if s.bias is None else s.bias[: kv * hd])
    if in_serving_order(src):  # rank-major heads, every KV group kept: the first `per` ranks are a prefix
        if kv != src.num_kv_heads:
            raise StarElasticError("a budget that drops KV groups has no view of a parent in serving order")
        q = dst.num_heads * hd
        _set(dst.q_proj, "weight", src.q_proj.weight[:q, :h])
        _set(dst.q_proj, "bias", None if src.q_proj.bias is None else src.q_proj.bias[:q])
        _set(dst.o_proj, "weight", src.o_proj.weight[:h, :q])
        _set(dst.o_proj, "bias", None if src.o_proj.bias is None else src.o_proj.bias[:h])
        order_module(dst)
        return
    # the first `per` query heads of each of the first `kv` KV groups
    qw = grouped(src.q_proj.weight[:, :h], 0, src.num_kv_heads, kv, per * hd)
    qb = None if src.q_proj.bias is None else grouped(src.q_proj.bias, 0, src.num_kv_heads, kv, per * hd)
    ow = grouped(src.o_proj.weight[:h], 1, src.num_kv_heads, kv, per * hd)
    ob = None if src.o_proj.bias is None else src.o_proj.bias[:h]
    if qw.dim() == 2:  # whole KV groups (or a single one): a plain prefix of rows and of columns
        _set(dst.q_proj, "weight", qw), _set(dst.q_proj, "bias", qb)
        _set(dst.o_proj, "weight", ow), _set(dst.o_proj, "bias", ob)
    elif copy is not None:  # compact: the sliced model's q_proj and o_proj weights, one matrix each
        _set(dst.q_proj, "weight", copy("q_proj.weight"))
        _set(dst.q_proj, "bias", None if qb is None else copy("q_proj.bias"))
        _set(dst.o_proj, "weight", copy("o_proj.weight")), _set(dst.o_proj, "bias", ob)
    else:
        dst.q_proj = GroupedLinear([qw], [qb])
        dst.o_proj = GroupedLinear([ow], [ob], in_groups=True)


def _mlp(dst: MLP, src: MLP, h: int):
    width = dst.down_proj.in_features
    for name in ("gate_proj", "up_proj") if dst.gated else ("up_proj",):
        _set(getattr(dst, name), "weight", getattr(src, name).weight[:width, :h])
        _set(getattr(dst, name), "bias", None if getattr(src, name).bias is None else getattr(src, name).bias[:width])
    _set(dst.down_proj, "weight", src.down_proj.weight[:h, :width])
    _set(dst.down_proj, "bias", None if src.down_proj.bias is None else src.down_proj.bias[:h])


def _mamba(dst: Mamba2, src: Mamba2, h: int, copy=None):
    G, P, d_inner, bc = src.n_groups, src.head_dim, src.d_inner, 2 * src.n_groups * src.state_size
    per = dst.num_heads // G

    def heads(t, dim, channels=P):  # the first `per` heads of every group, `channels` entries per head
        return grouped(t, dim, G, G, per * channels)

    ob = None if src.out_proj.bias is None else src.out_proj.bias[:h]
    rank_major = in_serving_order(src)
    if rank_major:
        order_module(dst)
    if dst.num_heads == src.num_heads:  # every head kept: plain column / row prefixes
        _set(dst.in_proj, "weight", src.in_proj.weight[:, :h])
        _set(dst.in_proj, "bias", src.in_proj.bias)
        _set(dst.conv1d, "weight", shared_value(src.conv1d, "weight"))
        _set(dst.conv1d, "bias", shared_value(src.conv1d, "bias"))
    elif rank_major:  # in_proj rows [B | C | z, x, dt of each head], conv [B | C | x]: row prefixes
        rows, channels = bc + dst.num_heads * (2 * P + 1), bc + dst.d_inner
        _set(dst.in_proj, "weight", src.in_proj.weight[:rows, :h])
        _set(dst.in_proj, "bias", None if src.in_proj.bias is None else src.in_proj.bias[:rows])
        cw, cb = shared_value(src.conv1d, "weight"), shared_value(src.conv1d, "bias")
        _set(dst.conv1d, "weight", cw[:channels])
        _set(dst.conv1d, "bias", None if cb is None else cb[:channels])
    elif copy is not None:  # compact: the sliced model's in_proj rows and conv channels, one tensor each
        for name in ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias"):
            mod, leaf = name.split(".")
            _set(getattr(dst, mod), leaf, None if getattr(getattr(src, mod), leaf) is None else copy(name))
    else:  # in_proj rows [z | x | B | C | dt] and conv channels [x | B | C]: the heads' parts side by side
        r = src.rows  # model.mamba_in_proj_rows
        BC = slice(r["B"].start, r["C"].stop)
        w, b = src.in_proj.weight[:, :h], src.in_proj.bias
        z, x, BC, dt = w[r["z"]], w[r["x"]], w[BC], w[r["dt"]]
        biases = None if b is None else [heads(b[r["z"]], 0), heads(b[r["x"]], 0), b[r["B"].start:r["C"].stop],
                                         heads(b[r["dt"]], 0, 1)]
        dst.in_proj = GroupedLinear([heads(z, 0), heads(x, 0), BC, heads(dt, 0, 1)], biases)
        w, b = shared_value(src.conv1d, "weight")[:, 0], shared_value(src.conv1d, "bias")  # (channels, k)
        dst.conv1d = PartsConv1d([heads(w[:d_inner], 0), w[d_inner:]],
                                 [None if b is None else heads(b[:d_inner], 0), None if b is None else b[d_inner:]])
    if rank_major:  # per-head vectors and the norm weight are rank-major too: prefixes
        for name in ("dt_bias", "A_log", "D"):
            _set(dst, name, shared_value(src, name)[:dst.num_heads])
        _set(dst.norm, "weight", src.norm.weight[:dst.d_inner])
    else:
        for name in ("dt_bias", "A_log", "D"):  # (groups, heads per group) where the heads are cut per group
            v = heads(shared_value(src, name), 0, 1)
            # compact: the sliced model's vectors (a few floats), not a strided view that the layer's flatten
            # copied at every token (two kernels a Mamba layer a decode token, benchmarks/common.py decode_ops)
            _set(dst, name, copy(name) if copy is not None and v.dim() > 1 else v)
        _set(dst.norm, "weight", heads(src.norm.weight, 0))  # the gated norm views it as (groups, -1) anyway
    ow = src.out_proj.weight[:h, :dst.d_inner] if rank_major else heads(src.out_proj.weight[:h], 1)
    if ow.dim() == 2:
        _set(dst.out_proj, "weight", ow), _set(dst.out_proj, "bias", ob)
    elif copy is not None:  # compact: the sliced model's out_proj columns
        _set(dst.out_proj, "weight", copy("out_proj.weight")), _set(dst.out_proj, "bias", ob)
    else:
        dst.out_proj = GroupedLinear([ow], [ob], in_groups=True)


def _moe(dst: MoE, src: MoE, h: int):
    e, i = dst.experts.up_proj.shape[:2]
    d = dst.experts.up_proj.shape[2]  # hidden, or the latent size
    latent = src.latent
    _set(dst.gate, "weight", shared_value(src.gate, "weight")[:e, :h])
    dst.gate.e_score_correction_bias = src.gate.e_score_correction_bias[:e]
    _set(dst.experts, "up_proj", src.experts.up_proj[:e, :i, :d])
    _set(dst.experts, "down_proj", src.experts.down_proj[:e, :d, :i])
    _mlp(dst.shared_experts, src.shared_experts, h)
    if latent:
        _set(dst.fc1_latent_proj, "weight", src.fc1_latent_proj.weight[:, :h])
        _set(dst.fc1_latent_proj, "bias", src.fc1_latent_proj.bias)
        _set(dst.fc2_latent_proj, "weight", src.fc2_latent_proj.weight[:h])
        _set(dst.fc2_latent_proj, "bias", None if src.fc2_latent_proj.bias is None else src.fc2_latent_proj.bias[:h])


def _copied(parent: Model, spec: ElasticSpec, old: int, prefix: str) -> dict[str, torch.Tensor]:
    """The sliced (copied) tensors of parent layer `old`, by their names under `prefix`."""
    idx = spec.indices(parent.config)
    out = {}
    for name, t in parent.model.layers[old].state_dict(prefix=f"model.layers.{old}.").items():
        out[prefix + name[len(f"model.layers.{old}."):]] = take(name, t, parent.config, idx)
    return out


def _copier(view: Model, parent: Model, idx: dict, old: int, new: int, module: str):
    """copy(name): the sliced model's tensor `name` of parent layer `old`'s `module` (as `slice_model`
    takes it: `take`, a copy), listed in `view.copied` under the view's layer `new`."""
    def copy(name: str) -> torch.Tensor:
        full = f"model.layers.{old}.{module}.{name}"
        owner, _, leaf = full.rpartition(".")
        t = shared_value(parent.get_submodule(owner), leaf)
        part = take(full, t, parent.config, idx)
        view.copied.append(f"model.layers.{new}.{module}.{name}")
        return part.clone() if part.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else part
    return copy


def copied_bytes(view: Model) -> int:
    """Bytes of the tensors a view holds as copies (`view.copied`), beyond the parent's storage."""
    copied = set(getattr(view, "copied", []))
    return sum(t.numel() * t.element_size() for n, t in list(view.named_parameters()) + list(view.named_buffers())
               if n in copied)


@torch.no_grad()
def budget_view(parent: Model, spec: ElasticSpec, compact: bool = True) -> Model:
    """The submodel of `spec` over the parent's own tensors (views; see the module doc).
    Computes what `slice_model(parent, spec)` computes. The parent must stay as it is while views of
    it are in use (sorting or re-loading it in place would change every view).

    compact: parts that would run as a grouped bmm (heads kept per group outside the serving head
    order) are copied once into the sliced model's contiguous tensors, listed in `view.copied`
    (`copied_bytes`); False keeps them as grouped views (`GroupedLinear`, `PartsConv1d`), no copies."""
    pcfg = parent.config
    cfg = spec.config(pcfg)
    sizes = spec.sizes(pcfg)
    idx = spec.indices(pcfg) if compact else None
    with torch.device("meta"):
        view = Model(cfg)
    view.copied = []  # names of tensors that are copies (layouts no view expresses)
    h = cfg.hidden_size
    _set(view.embed, "weight", parent.embed.weight[:, :h])
    if cfg.tied:
        view.lm_head.weight = view.embed.weight
    else:
        _set(view.lm_head, "weight", parent.lm_head.weight[:, :h])
    _set(view.final_norm, "weight", parent.final_norm.weight[:h])
    for new, old in enumerate(spec.kept_layers(pcfg)):
        src, dst, p = parent.model.layers[old], view.model.layers[new], pcfg.layer(old)
        if isinstance(src, LlamaLayer):
            _set(dst.input_layernorm, "weight", src.input_layernorm.weight[:h])
            _set(dst.post_attention_layernorm, "weight", src.post_attention_layernorm.weight[:h])
            _attention(dst.self_attn, src.self_attn, h,
                       _copier(view, parent, idx, old, new, "self_attn") if compact else None)
            _mlp(dst.mlp, src.mlp, h)
            continue
        _set(dst.norm, "weight", src.norm.weight[:h])
        kind = src.kind
        channels_cut = kind == "M" and sizes[old]["mamba_head_dim"] < p.mamba_head_dim
        experts_cut = kind == "E" and p.n_group > 1 and sizes[old]["n_routed_experts"] < p.n_routed_experts
        if channels_cut and in_serving_order(src.mixer):
            raise StarElasticError("Mamba channels cut: no view of a parent in serving order (serving_order_fits)")
        if channels_cut or experts_cut:  # no strided view: copy this layer's slices (listed in view.copied)
            for name, t in _copied(parent, spec, old, "").items():
                if not name.startswith("mixer."):
                    continue
                mod_name, leaf = name.rsplit(".", 1)
                mod = dst.get_submodule(mod_name)
                if leaf in mod._buffers:
                    mod._buffers[leaf] = t.clone()
                else:
                    setattr(mod, leaf, _param(t.clone()))
                view.copied.append(f"model.layers.{new}.{name}")
        elif kind == "*":
            _attention(dst.mixer, src.mixer, h, _copier(view, parent, idx, old, new, "mixer") if compact else None)
        elif kind == "M":
            _mamba(dst.mixer, src.mixer, h, _copier(view, parent, idx, old, new, "mixer") if compact else None)
        elif kind == "-":
            _mlp(dst.mixer, src.mixer, h)
        else:
            _moe(dst.mixer, src.mixer, h)
    if parent.inv_freq is not None:
        view.inv_freq = parent.inv_freq  # the same rotary frequencies (head_dim is never cut)
    if hasattr(parent, "hf_config"):
        view.hf_config = parent.hf_config
    leftover = [n for n, t in list(view.named_parameters()) + list(view.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"budget view left {leftover[:3]} unset")
    return view.eval().requires_grad_(False)


def shares_storage(view: Model, parent: Model) -> bool:
    """Whether every parameter and buffer of `view` outside `view.copied` lies in a parent tensor's storage."""
    ptrs = {t.untyped_storage().data_ptr() for t in list(parent.parameters()) + list(parent.buffers())}
    copied = set(getattr(view, "copied", []))
    return all(t.untyped_storage().data_ptr() in ptrs for n, t in
               list(view.named_parameters()) + list(view.named_buffers()) if n not in copied)
