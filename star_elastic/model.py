"""The hybrid decoder: Mamba-2 (M), grouped-query attention (*), MLP (-) and MoE (E) blocks.

One file of plain PyTorch. Parameter names are those of Hugging Face's `NemotronHForCausalLM`
and `LlamaForCausalLM`, so a checkpoint's state dict loads with `load_state_dict` as it is.

A Nemotron-H layer is one block `x = x + mixer(norm(x))`. A Llama layer is two such blocks
(attention, then gated MLP) under Llama's names. Every size that elastic slicing can change
(heads, widths, experts) may differ per layer: `ModelConfig.layer_sizes` overrides them.

Nothing here knows about elastic training or serving; both change how the model computes from
outside, with module swaps and hooks: training's sub-networks from star_elastic/elastic/
(docs/METHOD.md §5), serving's budget views and head order from star_elastic/serve/ (§13). The small
methods the forwards call (`mean_square`, `norm_weight`, `channel_scale`, `select`, `weigh`, `neuron_scale`,
`split_in_proj`, `split_conv`, `scan`, `state_groups`, `attend`) are what those swaps override.

Training keeps little for backward: the cheap parts (Mamba's conv and gated norm, the MoE router's scores,
the experts' activation) are recomputed in backward rather than their outputs kept (`recomputed`,
`norm_and_out_proj`); benchmarks/bench_saved.py counts what each kind of layer keeps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import kernels

LAYER_CHARS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}

# Sizes that may differ per layer (elastic slicing writes them into `layer_sizes`).
PER_LAYER_SIZES = (
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "mamba_num_heads",
    "mamba_head_dim",
    "n_routed_experts",
    "moe_intermediate_size",
    "moe_shared_expert_intermediate_size",
)


@dataclass
class ModelConfig:
    family: str = "nemotron_h"  # "nemotron_h" or "llama": the Hugging Face class of the weights
    vocab_size: int = 256
    hidden_size: int = 64
    layer_types: str = "M*-E"  # one character per block: M mamba, * attention, - mlp, E moe
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # attention
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    attention_bias: bool = False
    rope_theta: float | None = None  # None: no positional embedding (Nemotron-H)
    rope_scaling: dict | None = None  # {"rope_type": "llama3", ...} or None
    max_position_embeddings: int = 4096
    # dense MLP: Nemotron-H act(up(x)) with relu^2; Llama down(act(gate(x)) * up(x)) with SiLU
    intermediate_size: int = 128
    mlp_gated: bool = False
    mlp_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    ssm_state_size: int = 16
    n_groups: int = 2
    conv_kernel: int = 4
    chunk_size: int = 128
    time_step_min: float = 0.0  # lower clamp of softplus(dt + dt_bias)
    use_conv_bias: bool = True
    mamba_bias: bool = False
    # mixture of experts
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    moe_shared_expert_intermediate_size: int = 64
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    moe_latent_size: int | None = None
    # per-layer overrides of PER_LAYER_SIZES; None means every layer uses the values above
    layer_sizes: list[dict] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        bad = set(self.layer_types) - set(LAYER_CHARS)
        if bad:
            raise ValueError(f"unknown block type(s) {sorted(bad)} in layer_types {self.layer_types!r}")
        if self.layer_sizes is not None and len(self.layer_sizes) != len(self.layer_types):
            raise ValueError(f"layer_sizes has {len(self.layer_sizes)} entries for {len(self.layer_types)} layers")

    @property
    def tied(self) -> bool:
        """lm_head shares the embedding matrix. transformers ties Llama on this flag but never
        NemotronH (its NemotronH keeps a separate lm_head whatever the flag says): so do we."""
        return self.tie_word_embeddings and self.family == "llama"

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def layer(self, i: int) -> "ModelConfig":
        """The config that layer i is built from: the global sizes with its overrides applied."""
        if not self.layer_sizes or not self.layer_sizes[i]:
            return self
        unknown = set(self.layer_sizes[i]) - set(PER_LAYER_SIZES)
        if unknown:
            raise ValueError(f"layer {i}: {sorted(unknown)} cannot vary per layer")
        return replace(self, layer_sizes=None, **self.layer_sizes[i])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- norms

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.scaled(x, self.norm_weight())

    def norm_weight(self):
        """The scale the norm runs with: its weight, or a full budget's own (elastic/delta.py swaps that in)."""
        return self.weight

    def scaled(self, x, weight):
        """The norm with `weight` as its scale (a full budget's own, elastic/delta.py, or the module's)."""
        xf = x.float()
        ms = self.mean_square(xf)
        if ms is None:
            # torch's own: one fused kernel on CUDA, forward and backward (4 fewer a norm in an eager decode
            # step), the written-out operations on the CPU
            xf = F.rms_norm(xf, xf.shape[-1:], eps=self.eps)
        else:  # a mask's mean of squares over its kept channels (elastic/masking.py)
            xf = xf * torch.rsqrt(ms + self.eps)
        return weight * xf.to(x.dtype)

    def mean_square(self, xf):
        """(..., dim) in float32 -> the mean of squares to normalise by, (..., 1), or None: over every channel
        (torch's rms_norm takes it). Masks give theirs over the kept channels (elastic/masking.py)."""
        return None


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: x * silu(z), then RMS-normalised within each of `groups` groups."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups = groups
        self.eps = eps

    def forward(self, x, z):
        """x, z: (..., dim), the heads' channels group-major (group g: the g-th dim / groups of them)."""
        return self.scaled(x, z, self.norm_weight())

    def norm_weight(self):
        """The scale the norm runs with: its weight, or a full budget's own (elastic/delta.py swaps that in)."""
        return self.weight

    def scaled(self, x, z, weight):
        """The norm with `weight` as its scale (a full budget's own, elastic/delta.py, or the module's)."""
        return gated_rms_norm(x, z, weight, self.groups, self.eps, self.channel_scale())

    def channel_scale(self):
        """Each channel's share in its group (dim,), or None: all of it. Masks give theirs (elastic/masking.py)."""
        return None


def gated_rms_norm(x, z, weight, groups: int, eps: float, unit=None):
    """x * silu(z), RMS-normalised within each of `groups` groups of the last dimension, scaled by `weight`.
    `unit` (dim,) or None: x's channels scaled by it first, each group's mean of squares taken over its sum
    (the kept channels, under a mask) rather than the group's size."""
    dtype = x.dtype
    if unit is None:
        xg = (x.float() * F.silu(z.float())).unflatten(-1, (groups, -1))
        xg = F.rms_norm(xg, xg.shape[-1:], eps=eps)  # one fused kernel on CUDA (RMSNorm.scaled)
    else:
        xg = ((x * unit.to(dtype)).float() * F.silu(z.float())).unflatten(-1, (groups, -1))
        kept = unit.float().view(groups, -1).sum(-1, keepdim=True)
        xg = xg * torch.rsqrt(xg.pow(2).sum(-1, keepdim=True) / kept + eps)
    # the weight as (groups, dim / groups): a budget view's weight is a per-group prefix of its parent's
    return (weight.view(groups, -1) * xg.to(dtype)).flatten(-2)


def activation(name: str):
    if name == "relu2":
        return lambda x: F.relu(x).square()
    if name == "silu":
        return F.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh" if name.endswith("tanh") else "none")
    raise ValueError(f"unsupported activation {name!r}")


# ----------------------------------------------------------------------------- Mamba-2

def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., l, s] = a[..., s+1] + ... + a[..., l] for s <= l, -inf above the diagonal.

    Summed directly rather than as cumsum[l] - cumsum[s], which loses precision to cancellation.
    """
    n = a.shape[-1]
    a = a[..., None].expand(*a.shape, n)  # a[..., i, j] = a_i
    strict = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device), diagonal=-1)
    a = torch.cumsum(a.masked_fill(~strict, 0), dim=-2)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device))
    return a.masked_fill(~causal, -torch.inf)


def ssd_scan(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """Chunked state-space-duality scan of Mamba-2 (the quadratic form inside chunks, the
    recurrence across them). All in at least float32.

    x: (b, t, h, p)   dt: (b, t, h), already softplus'ed   A: (h,), negative
    B, C: (b, t, g, n) shared by the h/g heads of each group    initial_state: (b, h, p, n)
    Returns y: (b, t, h, p) without the D skip, and the final state (b, h, p, n).
    """
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    j = h // g  # heads per group
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (v.to(dtype) for v in (x, dt, A, B, C))
    L = min(chunk_size, t)
    pad = (-t) % L
    if pad:  # zero dt: no decay and no input, so padding changes neither outputs nor state
        x, dt, B, C = (F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)) for v in (x, dt, B, C))
    c = (t + pad) // L
    xdt = (x * dt[..., None]).view(b, c, L, g, j, p)
    a = (dt * A).view(b, c, L, h).permute(0, 3, 1, 2)  # (b, h, c, L) log-decay per step
    a_cum = torch.cumsum(a, dim=-1)
    B = B.view(b, c, L, g, n)
    C = C.view(b, c, L, g, n)

    # 1. within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) xdt_s
    decay = torch.exp(segsum(a)).view(b, g, j, c, L, L).permute(0, 3, 1, 2, 4, 5)  # (b,c,g,j,l,s)
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)
    y = torch.einsum("bcgjls,bcsgjp->bclgjp", CB[:, :, :, None] * decay, xdt)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum).view(b, g, j, c, L).permute(0, 3, 4, 1, 2)  # (b,c,L,g,j)
    states = torch.einsum("bclgn,bclgjp->bcgjpn", B, xdt * to_end[..., None])

    # 3. the recurrence across chunks: state entering chunk k from all earlier chunks
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=dtype, device=x.device)
    states = torch.cat([initial_state.to(dtype).view(b, 1, g, j, p, n), states], dim=1)  # (b,c+1,...)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    chunk_decay = chunk_decay.view(b, g, j, c + 1, c + 1)
    states = torch.einsum("bgjzc,bcgjpn->bzgjpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. the entering state's contribution to every position of the chunk
    from_start = torch.exp(a_cum).view(b, g, j, c, L).permute(0, 3, 4, 1, 2)  # (b,c,L,g,j)
    y = y + torch.einsum("bclgn,bcgjpn->bclgjp", C, states) * from_start[..., None]
    y = y.reshape(b, c * L, h, p)[:, :t]
    return y, final_state.reshape(b, h, p, n)


def mamba_in_proj_rows(num_heads: int, head_dim: int, n_groups: int, state_size: int) -> dict[str, slice]:
    """The rows of Mamba's in_proj weight, as the checkpoint stores them: [z | x | B | C | dt]
    (z gates the output, x is the input the heads scan, B and C per group, one dt per head). The
    one description of this layout: the forward, slicing, importance and the serving views read it."""
    d, bc = num_heads * head_dim, n_groups * state_size
    sizes = {"z": d, "x": d, "B": bc, "C": bc, "dt": num_heads}
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = slice(start, start + n)
        start += n
    return out


def recomputed(fn, *args):
    """fn(*args); while autograd records, recomputed in backward rather than its intermediates kept
    (torch.utils.checkpoint): the cheap parts of training's forward (Mamba's conv and gated norm, the MoE
    router's scores). `fn` is a function of `args` alone, read now: a class swapped in from outside (masks, a
    full budget's own values) may be gone by the time backward recomputes it. No random numbers in these, so no
    RNG state is stashed."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.n_groups, self.state_size = cfg.n_groups, cfg.ssm_state_size
        if self.num_heads % self.n_groups:
            raise ValueError(f"mamba_num_heads={self.num_heads} is not divisible by n_groups={self.n_groups}")
        self.d_inner = self.num_heads * self.head_dim
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.state_size
        self.chunk_size, self.dt_min = cfg.chunk_size, cfg.time_step_min
        self.rows = mamba_in_proj_rows(self.num_heads, self.head_dim, self.n_groups, self.state_size)
        self.in_proj = nn.Linear(cfg.hidden_size, self.rows["dt"].stop, bias=cfg.mamba_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
                                bias=cfg.use_conv_bias)  # causal: forward prepends the k-1 previous inputs
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.mamba_bias)

    def forward(self, u, cache: "MambaCache | None" = None):
        b, t, _ = u.shape
        proj = self.in_proj(u)
        z, xBC, dt = self.split_in_proj(proj)  # once: views here, a copy of the conv's input in serving order
        # per-head vectors flattened: in a grouped budget view they are (n_groups, kept heads per group)
        dt = F.softplus(dt.float() + self.dt_bias.float().flatten()).clamp(min=self.dt_min)
        A = -torch.exp(self.A_log.float()).flatten()
        # training on CUDA: conv, scan and skip as one function that keeps less for backward; it splits
        # and scans as this class does, so not where a swap from outside (serving order) overrides those
        if cache is None and type(self.conv1d) is nn.Conv1d and torch.is_grad_enabled() and kernels.uses_conv_scan(
                proj) and (type(self).split_in_proj, type(self).split_conv, type(self).scan) == (
                Mamba2.split_in_proj, Mamba2.split_conv, Mamba2.scan):
            # in_proj's whole output goes in, z is cut from it after: views of it passed across the graph break a
            # compiled layer has here made torch.compile (2.13, CPU) rebuild them with garbage shapes
            y = kernels.conv_scan(proj, self.conv1d.weight, self.conv1d.bias, dt, A, self.D.flatten(),
                                  self.chunk_size, conv_split=self.conv_and_views)
            z, x = self.split_in_proj(proj)[0], None  # y has the skip
        else:
            x, B, C = self.xbc(self.conv(xBC.transpose(1, 2), cache))  # the conv over (b, conv_dim, t)
            if cache is not None and t == 1:
                y = self.step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], cache.ssm)[:, None]
            else:
                y, final = self.scan(x, dt, A, B, C, None if cache is None else cache.ssm)
                if cache is not None:
                    cache.ssm.copy_(final)
        norm, out = self.norm, self.out_proj
        # the norm as this class computes it (masks give only their channel scale, a full budget's own norm its
        # weight), so it can be recomputed
        plain_norm = (type(norm).forward, type(norm).scaled) == (GatedRMSNorm.forward, GatedRMSNorm.scaled)
        if plain_norm and type(out) is nn.Linear and torch.is_grad_enabled() \
                and not (out._forward_hooks or out._forward_pre_hooks):
            # the norm's output is not kept for out_proj's weight gradient: recomputed in backward with the norm
            # (8 KB a token a layer at Nano's widths); out_proj's hooks would not see it, so none may be set
            return norm_and_out_proj(y, x, self.D, z, norm.norm_weight(), norm.groups, norm.eps, out.weight,
                                     out.bias, u.dtype, norm.channel_scale())
        if plain_norm:
            # recomputed in backward (elementwise work): its fp32 intermediates are about 80 KB a token at Nano's
            # widths (eager), and y, x and z are kept anyway
            y = recomputed(skip_and_gated_norm, y, x, self.D, z, norm.norm_weight(), norm.groups, norm.eps,
                           norm.channel_scale())
        else:  # a norm class swapped in from outside that computes otherwise (serving order) runs as it is
            y = norm(with_skip(y, x, self.D).flatten(-2), z)
        return out(y.to(u.dtype))

    def conv(self, xBC, cache: "MambaCache | None"):
        """silu of the causal conv of xBC (b, conv_dim, t), continuing from the cache's last inputs if given."""
        if cache is None and type(self.conv1d) is nn.Conv1d and kernels.uses_causal_conv(xBC):
            return kernels.causal_conv(xBC, self.conv1d.weight[:, 0], self.conv1d.bias)  # CUDA
        if cache is None and type(self.conv1d) is nn.Conv1d:
            # recomputed in backward, so that only xBC (a view of in_proj's output, kept anyway) is kept for it:
            # autograd would keep the zero-padded copy and the conv's output, 24 KB a token a layer at Nano's
            # widths (benchmarks/bench_saved.py)
            return recomputed(causal_conv_silu, xBC, self.conv1d.weight, self.conv1d.bias)
        # a cache to continue from, or a conv class swapped in from outside
        k = self.conv1d.kernel_size[0]
        # the k-1 inputs before these: zeros at the start of a sequence, else the cached last ones
        before = xBC.new_zeros(xBC.shape[0], xBC.shape[1], k - 1) if cache is None else cache.conv.to(xBC.dtype)
        xBC = torch.cat([before, xBC], dim=-1)
        if cache is not None:
            cache.conv.copy_(xBC[..., -(k - 1):])
        if xBC.shape[-1] == k and type(self.conv1d) is nn.Conv1d:  # one token (decoding)
            return F.silu(window_conv(xBC, self.conv1d.weight, self.conv1d.bias))
        return F.silu(self.conv1d(xBC))

    def conv_and_views(self, proj, weight, bias):
        """silu of the causal conv of in_proj's x B C rows (zeros before the first input) with `weight` and
        `bias` in proj's dtype, and x, B and C viewed from it (`xbc`): what kernels.conv_scan runs, and recomputes
        in backward from the tensors it kept."""
        xBC = self.split_in_proj(proj)[1].transpose(1, 2)
        if kernels.uses_causal_conv(xBC):  # CUDA: PyTorch's depthwise conv + backward took 12 ms of a 136 ms step
            out = kernels.causal_conv(xBC, weight[:, 0], bias)
        else:
            out = causal_conv_silu(xBC, weight.to(xBC.dtype), None if bias is None else bias.to(xBC.dtype))
        return (out, *self.xbc(out))

    def xbc(self, conv_out):
        """The conv's output (b, conv_dim, t) -> x (b, t, heads, head_dim), B and C (b, t, n_groups, state)."""
        b, _, t = conv_out.shape
        x, B, C = self.split_conv(conv_out.transpose(1, 2))
        return (x.view(b, t, self.num_heads, self.head_dim), B.view(b, t, self.n_groups, self.state_size),
                C.view(b, t, self.n_groups, self.state_size))

    def split_in_proj(self, proj):
        """in_proj's output -> z (b, t, d_inner), the conv's input xBC (b, t, conv_dim), dt (b, t, heads)."""
        rows = self.rows  # x, B and C are contiguous: the conv's input
        return proj[..., rows["z"]], proj[..., rows["x"].start:rows["C"].stop], proj[..., rows["dt"]]

    def split_conv(self, xBC):
        """The conv's output (b, t, conv_dim) -> x (b, t, d_inner), B and C (b, t, n_groups * state_size)."""
        bc = self.n_groups * self.state_size
        return xBC.split([self.d_inner, bc, bc], dim=-1)

    def scan(self, x, dt, A, B, C, state):
        """The SSD scan over a sequence (ssd_scan): y (b, t, heads, head_dim) and the final state."""
        return kernels.chunk_scan(x, dt, A, B, C, self.chunk_size, state, fallback=ssd_scan)  # Triton on CUDA

    def step(self, x, dt, A, B, C, state):
        """One token of the recurrence h = exp(dt A) h + dt B x, y = C h (state updated in place):
        `recurrence_step`, or the Triton state update on CUDA (kernels.state_step), given B and C as
        `state_groups` gives them."""
        return kernels.state_step(x, dt, A, self.state_groups(B), self.state_groups(C), state,
                                  fallback=recurrence_step)

    def state_groups(self, v):
        """B or C (b, n_groups, n) as the state update reads them: per group as they are, head h reading group
        h // (heads / groups), the mapping both the Triton kernel and `recurrence_step` make (the kernel casts
        them itself: no per-head fp32 copies, four kernels a Mamba layer a decode token on CUDA)."""
        return v


def with_skip(y, x, D):
    """The scan's y (b, t, heads, head_dim; fp32 or x's dtype) plus Mamba's D skip, in fp32; x None: y has it
    (kernels.conv_scan adds it)."""
    if x is None:
        return y.float()
    return y.float() + x.float() * D.float().flatten()[:, None]


def skip_and_gated_norm(y, x, D, z, weight, groups: int, eps: float, unit=None):
    """`with_skip`, then the gated norm (`gated_rms_norm`): Mamba2's output before out_proj."""
    return gated_rms_norm(with_skip(y, x, D).flatten(-2), z, weight, groups, eps, unit)


def norm_and_out_proj(y, x, D, z, weight, groups: int, eps: float, out_weight, out_bias, dtype, unit=None):
    """out_proj(skip_and_gated_norm(...).to(dtype)) as `_NormOutProj`: the same values, autocast's cast of the
    product included, with the norm recomputed in backward instead of its output kept."""
    device = y.device.type
    mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
    return _NormOutProj.apply(y, x, D, z, weight, unit, groups, eps, out_weight, out_bias, dtype, mm)


def norm_then_out_proj(y, x, D, z, weight, groups: int, eps: float, out_weight, out_bias, dtype, unit=None):
    """What `norm_and_out_proj` computes, by autograd (keeping the norm's output): its tests' reference."""
    return F.linear(skip_and_gated_norm(y, x, D, z, weight, groups, eps, unit).to(dtype), out_weight, out_bias)


class _NormOutProj(torch.autograd.Function):
    """Mamba2's last steps, the D skip, gated norm and out_proj, keeping for backward only their inputs (y, x,
    z: kept anyway, for the scan or as views of in_proj's output) and no tensor of their own: autograd kept the
    norm's output for out_proj's weight gradient, and under masks (`unit`, the channels' shares) the norm's
    fp32 intermediates too. Backward recomputes the norm (elementwise, one reduction per group) and writes its
    gradient out, the mask's included (the router learns through it), in plain tensor operations that
    torch.compile traces and fuses; `mamba_ssm`'s fused Mamba layer does the same, unmasked. x None: y has the
    skip (kernels.conv_scan). The product runs in `mm` (the autocast dtype, as F.linear would under autocast),
    the norm's output cast to `dtype` first, as `out_proj(y.to(u.dtype))` does.

    The norm per token and group of channels c: a = s unit (s = y + D x), g = a silu(z), k = sum unit (the
    group's size without a mask), r = (sum g^2 / k + eps)^-1/2, n = weight g r. So with g^ = g r and dg^ the
    gradient reaching g^: dg = r (dg^ - g^ sum(dg^ g^) / k) and dk = sum(dg^ g^) sum(g^^2) / (2 k^2)."""

    @staticmethod
    def forward(ctx, y, x, D, z, weight, unit, groups, eps, out_weight, out_bias, dtype, mm):
        with torch.no_grad():
            n = skip_and_gated_norm(y, x, D, z, weight, groups, eps, unit).to(dtype).to(mm)
            out = F.linear(n, out_weight.to(mm), None if out_bias is None else out_bias.to(mm))
        ctx.save_for_backward(y, x, D, z, weight, unit, out_weight, out_bias)
        ctx.groups, ctx.eps, ctx.dtype, ctx.mm = groups, eps, dtype, mm
        return out

    @staticmethod
    def backward(ctx, d_out):
        y, x, D, z, weight, unit, out_weight, out_bias = ctx.saved_tensors
        G = ctx.groups
        s = with_skip(y, x, D)  # (b, t, heads, head_dim), fp32
        a = s.flatten(-2) if unit is None else s.flatten(-2) * unit.float()
        zf = z.float()
        sig = torch.sigmoid(zf)
        silu = zf * sig
        g = (a * silu).unflatten(-1, (G, -1))
        k = g.shape[-1] if unit is None else unit.float().view(G, -1).sum(-1, keepdim=True)
        r = torch.rsqrt(g.pow(2).sum(-1, keepdim=True) / k + ctx.eps)
        g_hat = g * r
        n = (weight.view(G, -1) * g_hat).flatten(-2).to(ctx.dtype).to(ctx.mm)  # the forward's product input
        d2 = d_out.flatten(0, -2)
        d_out_weight = (d2.t() @ n.flatten(0, -2)).to(out_weight.dtype)
        d_out_bias = None if out_bias is None else d2.sum(0).to(out_bias.dtype)
        d_n = (d_out @ out_weight.to(ctx.mm)).float().unflatten(-1, (G, -1))
        d_weight = (d_n * g_hat).flatten(0, -3).sum(0).flatten().to(weight.dtype).view_as(weight)
        d_g_hat = d_n * weight.view(G, -1).float()
        along = (d_g_hat * g_hat).sum(-1, keepdim=True)
        d_g = (r * (d_g_hat - g_hat * along / k)).flatten(-2)
        d_a = d_g * silu
        d_z = (d_g * a * sig * (1 + zf * (1 - sig))).to(z.dtype)
        d_s, d_unit = d_a, None
        if unit is not None:
            d_s = d_a * unit.float()
            d_k = (along * g_hat.pow(2).sum(-1, keepdim=True) / (2 * k * k)).flatten(0, -3).sum(0)  # (G, 1)
            d_unit = ((d_a * s.flatten(-2)).flatten(0, -2).sum(0) + d_k.expand(G, g.shape[-1]).flatten())
            d_unit = d_unit.to(unit.dtype)
        d_s = d_s.view_as(s)
        d_x = d_D = None
        if x is not None:
            d_x = (d_s * D.float().flatten()[:, None]).to(x.dtype)
            d_D = (d_s * x.float()).flatten(0, -3).sum(0).sum(-1).to(D.dtype).view_as(D)
        return (d_s.to(y.dtype), d_x, d_D, d_z, d_weight, d_unit, None, None, d_out_weight, d_out_bias, None,
                None)


def causal_conv_silu(x, weight, bias):
    """silu of the depthwise causal conv of x (b, channels, t) by weight (channels, 1, k): zeros before the
    first input, as Mamba2.forward's concatenation puts them."""
    k = weight.shape[-1]
    return F.silu(F.conv1d(F.pad(x, (k - 1, 0)), weight, bias, groups=x.shape[1]))


def window_conv(window, weight, bias):
    """The depthwise conv of one window (b, channels, k) by weight (channels, 1, k): (b, channels, 1), its k products
    summed in fp32 as a conv accumulates. Decoding's conv: as products and a sum torch.compile fuses it with the
    cache's shift and the SiLU, where a conv runs as a kernel of its own (PyTorch's, ~4 us on an H100) each Mamba
    layer each decode step."""
    y = (window.float() * weight[:, 0].float()).sum(-1, keepdim=True)
    return (y if bias is None else y + bias.float()[:, None]).to(window.dtype)


def recurrence_step(x, dt, A, B, C, state):
    """One token of Mamba-2's recurrence in PyTorch: x (b, h, p), dt (b, h), A (h,), B and C (b, g, n) per group
    (head h reading group h // (h / g)) or per head (g = h), state (b, h, p, n) float32 updated in place; returns
    y = C h (b, h, p)."""
    x = x.float()
    per = x.shape[1] // B.shape[1]
    B, C = (v.float() if per == 1 else v.float().repeat_interleave(per, dim=1) for v in (B, C))
    new = state * torch.exp(dt * A)[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None]
    state.copy_(new)
    return torch.einsum("bhpn,bhn->bhp", new, C)


# ----------------------------------------------------------------------------- attention

def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":  # Llama 3.1: stretch low frequencies, keep high ones, blend in between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor,
                               torch.where(wavelen < old_len / hi, inv_freq, blended))
    elif kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r} (supported: default, llama3)")
    return inv_freq


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
    def forward(self, x, rope=None, cache: "KVCache | None" = None, pos=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o_proj(self.merge_heads(self.attend(q, k, v, cache, pos)))

    def merge_heads(self, out):
        """The heads' outputs (b, heads, t, d) side by side, (b, t, heads * d): o_proj's input."""
        return out.transpose(1, 2).flatten(2)

    def attend(self, q, k, v, cache: "KVCache | None" = None, pos=None):
        """q (b, heads, t, d), k and v (b, kv_heads, t, d) -> (b, heads, t, d). Query head h reads KV
        head h // (heads / kv_heads) (SDPA's GQA). Causal; with `cache`, k and v are written at `pos`
        and each query attends to every filled slot up to its position."""
        gqa = q.shape[1] != k.shape[1]
        if cache is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        k, v = cache.update(pos, k, v)
        mask = torch.arange(k.shape[2], device=q.device) <= pos[..., None]  # (t, L), or (b, t, L) per row
        if mask.dim() == 3:
            mask = mask[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# ----------------------------------------------------------------------------- MLP and MoE

class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int | None = None, gated: bool | None = None):
        super().__init__()
        width = cfg.intermediate_size if width is None else width
        self.gated = cfg.mlp_gated if gated is None else gated
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.mlp_act)

    def forward(self, x):
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)


def router_scores(x, weight):
    """x: (tokens, hidden) -> each expert's sigmoid score, (tokens, experts), in fp32."""
    return F.linear(x.float(), weight.float()).sigmoid()


class TopkRouter(nn.Module):
    """Sigmoid scores; the correction bias steers which experts are chosen but not their weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def _apply(self, fn, recurse=True):
        # Routing is decided by small score differences: like transformers, keep it in fp32 whatever
        # dtype the rest of the model is cast to.
        before = {"weight": self.weight.data, "e_score_correction_bias": self.e_score_correction_bias.data}
        super()._apply(fn, recurse)
        for name, old in before.items():
            t = getattr(self, name)
            if t.dtype != torch.float32 and old.dtype == torch.float32 and not old.is_meta:
                t.data = old.to(t.device)  # a cast to a lower precision: keep the fp32 values, not their rounding
            else:
                t.data = t.data.float()
        return self

    def forward(self, x):
        """x: (tokens, hidden) -> chosen expert ids and their weights, both (tokens, top_k)."""
        # recomputed in backward (a product 128 experts wide at Nano) rather than keep its fp32 copy of x
        scores = recomputed(router_scores, x, self.weight)
        idx = self.select(scores + self.e_score_correction_bias.float())
        return idx, self.weigh(scores, idx) * self.scale

    def select(self, choice):
        """Selection scores (tokens, experts) -> the top_k experts of each token, (tokens, top_k)."""
        if self.n_group > 1:  # keep the topk_group groups whose two best experts score highest
            grouped = choice.view(choice.shape[0], self.n_group, -1)
            best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            choice = torch.where(keep[..., None], grouped, -torch.inf).view_as(choice)
        return choice.topk(self.top_k, dim=-1).indices

    def weigh(self, scores, idx):
        """The chosen experts' weights (tokens, top_k): their sigmoid scores, normalised if norm_topk_prob."""
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights


class Experts(nn.Module):
    """Routed experts, stored as transformers stores them: up (E, I, D), down (E, D, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.moe_latent_size or cfg.hidden_size
        self.up_proj = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.moe_intermediate_size, d))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_routed_experts, d, cfg.moe_intermediate_size))
        nn.init.normal_(self.up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        self.act = activation(cfg.mlp_act)

    def hidden(self, h):
        """The activation between the up and down projections, (..., moe_intermediate_size), times
        `neuron_scale()` where there is one."""
        return scaled_activation(h, self.act, self.neuron_scale())

    def neuron_scale(self):
        """A factor per expert FFN neuron after the activation, (moe_intermediate_size,): none here (masks give
        one from outside)."""
        return None

    def grouped(self, which: str, xs, offs, dt):
        """xs (token copies grouped by expert, `offs` the groups' ends) through each one's tensor `which`, as
        one grouped GEMM in `dt`."""
        return torch._grouped_mm(xs.to(dt), self.weights(which).to(dt).transpose(1, 2), offs=offs)

    def weights(self, which: str, idx=None):
        """Tensor `which` ("up_proj" or "down_proj"): every expert's, or the experts `idx` (T, k) chooses,
        gathered. Where the forward reads them (through `grouped`, `gathered` and `loop`): the full budget's delta adds
        its own in each (delta.py)."""
        w = getattr(self, which)
        return w if idx is None else gather_experts(w, idx)

    def forward(self, x, idx, weights):
        """x: (T, D); idx, weights: (T, k). Each expert sees only the tokens routed to it."""
        T, k = idx.shape
        # grouped GEMM in bf16 (what it supports); it is not autocast-aware, so cast by hand
        dt = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
        grouped = uses_grouped_mm(x, dt)
        # decoding: gather the few chosen experts' weights. From 2 tokens the grouped GEMM is faster on an
        # H200, even than the gather from a contiguous copy (4 tokens x top-6 at Nano shapes: 1.34-1.58x); at 1
        # token the gather ties or wins (0.74-1.00x the other way; docs/RESULTS.md, "the views' expert gather")
        # Each copy's routing weight scales its activation before the down projection (transformers scales
        # the down projection's output: the same sum, rounded in another order). So backward needs no copy of
        # the down projection's output for the weights' gradient: at Nano's widths 6 x 2688 values a token
        # that a MoE layer no longer keeps (docs/RESULTS.md, "what a training step keeps").
        if T * k <= self.up_proj.shape[0] // 2 and (T == 1 or not grouped):
            return self.gathered(x, idx, weights)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // k
        xs = x[token]  # token copies grouped by expert
        scale = weights.flatten()[order, None]
        counts = expert_counts(flat, self.up_proj.shape[0])
        if grouped:
            offs = counts.cumsum(0).to(torch.int32)
            h = recomputed(scaled_activation, self.grouped("up_proj", xs, offs, dt), self.act, self.neuron_scale(),
                           scale)
            out = self.grouped("down_proj", h, offs, dt)
        else:
            out = self.loop(xs, scale, counts)
        return back_to_tokens(out, order, k)

    def gathered(self, x, idx, weights):
        """A few tokens x (T, D) on the experts idx (T, k) chooses, their tensors gathered (decoding); a full
        budget's delta adds its low-rank part here (delta.py)."""
        return gathered_experts(self.hidden, x, self.weights("up_proj", idx), self.weights("down_proj", idx), weights)

    @torch.compiler.disable  # sizes read from the data: under torch.compile, a graph per routing pattern
    def loop(self, xs, scale, counts):
        """One matmul pair per expert over its tokens (xs grouped by expert, `counts` per expert, each copy's
        activation times its `scale`)."""
        rows, outs, neurons = counts.tolist(), [], self.neuron_scale()
        for xe, se, up, down in zip(xs.split(rows), scale.split(rows), self.weights("up_proj"),
                                    self.weights("down_proj")):
            outs.append(recomputed(scaled_activation, xe @ up.T, self.act, neurons, se) @ down.T)
        return torch.cat(outs)


def scaled_activation(h, act, neurons=None, copies=None):
    """act(h) times a factor per neuron (`neurons`, (I,)) and one per row (`copies`, (rows, 1): the routing
    weights) where given. In training the experts recompute it in backward (`recomputed`): then only its input
    and the down projection's input are kept, not the activation's output besides (eager; a compiled graph
    recomputes such elementwise work itself)."""
    h = act(h)
    if neurons is not None:
        h = h * neurons.to(h.dtype)
    return h if copies is None else h * copies.to(h.dtype)


def gathered_experts(act, x, up, down, weights):
    """The experts for a few tokens on their chosen experts' gathered tensors, up (T, k, I, D) and down (T, k, D, I):
    each copy's activation times its routing weight, then a product per copy and the sum over the k (one
    contraction over k and I together would copy the gathered weights)."""
    h = scaled_activation(torch.einsum("td,tkid->tki", x, up), act, copies=weights[..., None])
    return torch.einsum("tki,tkdi->tkd", h, down).sum(1).to(h.dtype)


def expert_counts(flat: torch.Tensor, experts: int) -> torch.Tensor:
    """How many of the routed copies `flat` (expert indices) go to each of `experts`: a count of fixed shape
    (bincount's depends on the data, which breaks a torch.compile graph), as a comparison summed, which inductor
    fuses into one kernel; an int64 `index_add_` is one it cannot lower (no int64 atomic add), and on CUDA ran
    as a sorting scatter with a bounds check, about eight small kernels a MoE layer a decode step."""
    return (flat[:, None] == torch.arange(experts, device=flat.device)).sum(0)


def back_to_tokens(out, order, k: int):
    """The routed copies' outputs `out`, grouped by expert (`order` the argsort that grouped them), back in
    token order and summed over each token's k copies: a gather keeps only its indices for backward
    (`index_add_` keeps its whole source), and the sum's order is fixed (`index_add_` adds atomically on a GPU)."""
    where = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    return out[where].view(-1, k, out.shape[-1]).sum(1).to(out.dtype)  # (autocast would widen the sum to fp32)


def uses_grouped_mm(x: torch.Tensor, dt: torch.dtype) -> bool:
    """Whether `Experts` runs its experts as one grouped GEMM (`torch._grouped_mm`, bf16 on CUDA) for input x
    computed in `dt`; else a matmul pair per expert."""
    return x.is_cuda and dt == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def gather_experts(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """w[idx]: the chosen experts' weights, contiguous. Where no gradient is wanted and the layout allows,
    the bytes are moved as 16-byte words (else 8-byte ones), an eighth of the bf16 elements for the index
    kernel to place: a budget's view of the parent, (E, I, D)[:e, :i, :d], is strided, and gathered element
    by element it ran at 0.31-0.37x of the gather from a contiguous copy on an H200; in 8-byte words at
    0.82-0.84x, in 16-byte ones at 0.93-1.00x (docs/RESULTS.md, "the views' expert gather"). The same
    bytes either way."""
    wide = (w.stride(-1) == 1 and not torch.compiler.is_compiling()
            and not (w.requires_grad and torch.is_grad_enabled()))
    for word in (torch.complex128, torch.int64) if wide else ():
        if w.element_size() < word.itemsize:
            try:
                return w.view(word)[idx].view(w.dtype)
            except RuntimeError:  # sizes, strides or offset not in whole words
                pass
    return w[idx]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = TopkRouter(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg, cfg.moe_shared_expert_intermediate_size, gated=False)
        if cfg.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(cfg.hidden_size, cfg.moe_latent_size, bias=cfg.mlp_bias)
            self.fc2_latent_proj = nn.Linear(cfg.moe_latent_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.latent = cfg.moe_latent_size is not None

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        idx, weights = self.gate(flat)
        h = self.fc1_latent_proj(flat) if self.latent else flat
        h = self.experts(h, idx, weights)
        h = self.fc2_latent_proj(h) if self.latent else h
        return h.view_as(x).to(x.dtype) + self.shared_experts(x)


# ----------------------------------------------------------------------------- blocks

MIXERS = {"M": Mamba2, "*": Attention, "-": MLP, "E": MoE}


class Block(nn.Module):
    """Nemotron-H layer: x + mixer(norm(x))."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = MIXERS[kind](cfg)

    def forward(self, x, rope=None, cache=None, pos=None):
        h = self.norm(x)
        if self.kind == "*":
            h = self.mixer(h, rope, cache, pos)
        elif self.kind == "M":
            h = self.mixer(h, cache)
        else:
            h = self.mixer(h)
        return x + h


class LlamaLayer(nn.Module):
    """Llama layer: x + attn(norm(x)), then x + mlp(norm(x)); `layer_types` holds '*' for it."""

    kind = "*"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None, pos=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- caches

class KVCache(nn.Module):
    def __init__(self, batch, kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device))

    def update(self, pos, k, v):
        """Write k, v (b, kv, t, d) at positions `pos`: (t,) shared by every row, or (b, t) per row
        (batched serving: each sequence at its own length)."""
        if pos.dim() == 2:
            idx = pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            self.k.scatter_(2, idx, k.to(self.k.dtype))
            self.v.scatter_(2, idx, v.to(self.v.dtype))
            return self.k, self.v
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


class MambaCache(nn.Module):
    def __init__(self, batch, mixer: Mamba2, kernel: int, dtype, device):
        super().__init__()
        self.register_buffer("conv", torch.zeros(batch, mixer.conv_dim, kernel - 1, dtype=dtype, device=device))
        self.register_buffer("ssm", torch.zeros(batch, mixer.num_heads, mixer.head_dim, mixer.state_size,
                                                dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------- model

class Decoder(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        llama = cfg.family == "llama"
        self.embed_name, self.norm_name = ("embed_tokens", "norm") if llama else ("embeddings", "norm_f")
        self.add_module(self.embed_name, nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(
            LlamaLayer(cfg.layer(i)) if llama else Block(cfg.layer(i), kind) for i, kind in enumerate(cfg.layer_types)
        )
        self.add_module(self.norm_name, RMSNorm(cfg.hidden_size, cfg.norm_eps))


class Model(nn.Module):
    """Causal LM. `model(input_ids)` -> logits (batch, seq, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family not in ("nemotron_h", "llama"):
            raise ValueError(f"unknown model family {cfg.family!r}")
        if cfg.family == "llama" and set(cfg.layer_types) != {"*"}:
            raise ValueError("a llama model has only attention+MLP layers ('*')")
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.embed.weight
        if cfg.rope_theta is not None:
            self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        else:
            self.inv_freq = None

    @property
    def embed(self) -> nn.Embedding:
        return getattr(self.model, self.model.embed_name)

    @property
    def final_norm(self) -> RMSNorm:
        return getattr(self.model, self.model.norm_name)

    def rope(self, pos, dtype):
        if self.inv_freq is None:
            return None
        freqs = pos.float()[..., None] * self.inv_freq  # pos (t,), or (b, t): a position per row
        emb = torch.cat([freqs, freqs], dim=-1)
        if emb.dim() == 3:
            emb = emb[:, None]  # (b, 1, t, d): broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, cache: list | None = None, pos: torch.Tensor | None = None,
                last_only: bool = False):
        """input_ids: (b, t). With `cache` (from `make_cache`), `pos` holds the t positions written:
        (t,) for every row, or (b, t), each row at its own positions (batched serving, serve/batching.py)."""
        x = self.embed(input_ids)
        if pos is None:
            if cache is not None:
                raise ValueError("pos is required with a cache")
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        rope = self.rope(pos, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, None if cache is None else cache[i], pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_norm(x)).float()

    @torch.no_grad()
    def make_cache(self, batch: int, max_len: int, dtype=None, device=None) -> nn.ModuleList:
        """Static caches for generation: a KV cache per attention layer, conv + SSM state per Mamba layer."""
        p = self.lm_head.weight
        dtype, device = dtype or p.dtype, device or p.device
        caches = []
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer, LlamaLayer) or layer.kind == "*":
                attn = layer.self_attn if isinstance(layer, LlamaLayer) else layer.mixer
                caches.append(KVCache(batch, attn.num_kv_heads, max_len, attn.head_dim, dtype, device))
            elif layer.kind == "M":
                caches.append(MambaCache(batch, layer.mixer, self.config.conv_kernel, dtype, device))
            else:
                caches.append(nn.Identity())  # stateless block
        return nn.ModuleList(caches)

    def num_parameters(self) -> int:
        """Unique parameters, as transformers' `num_parameters()` counts them (tied weights once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
