"""Optional fast paths on CUDA for Mamba-2: the chunked scan on `mamba_ssm`'s Triton kernel and the one-token state
update on our own Triton kernel or `mamba_ssm`'s (on by default), training's conv, scan and skip as one function on
the scan's Triton forward and backward (on by default), the causal conv on `causal_conv1d`'s CUDA kernel (on by
default where it imports). Each falls back to the model's PyTorch code, which stays the CPU path and the tests'
reference.

`chunk_scan` is what `model.Mamba2` calls instead of the einsum scan (`model.ssd_scan`), with the
same arguments and the same result: y without the D skip, and the final state. It runs
`mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined` when

- the input is a CUDA tensor in bf16 or fp16 (what autocast gives the scan: training and bf16
  serving). fp32 inputs keep the einsum scan: the kernel's matmuls would round them to TF32 (about
  1e-3 relative), and fp32 runs are the ones held to fp32 tolerances (validate's 1e-4),
- that kernel imports (it is pure Triton, with einops: `pip install mamba-ssm`, or, with no CUDA
  build, the package's source with `mamba_ssm/__init__.py` cut to its version line, since the
  original imports compiled CUDA modules; benchmarks/bench_kernels.py says how), and
- it is not switched off: `STAR_ELASTIC_NO_TRITON=1` forces the einsum scan (read at each call, so it
  can be switched within a process; under `torch.compile` it is read once, when the graph is traced).
  The kernel is on by default since benchmarks/bench_kernels.py's `check` part ran on an H200
  (2026-12-01, docs/RESULTS.md §12): the model's bf16 logits and gradients through it are as close to
  fp32 as through the einsum scan, and the scan is 5-7x faster at Nano's Mamba shapes,

and the einsum `ssd_scan` (passed in as `fallback`) otherwise: on the CPU, without the package,
or disabled. The einsum scan stays the reference the tests check against.

What the kernel receives is what `ssd_scan` receives: dt already through softplus(dt + dt_bias) and
the clamp (so the kernel's own dt_bias / softplus / dt_limit are off), A = -exp(A_log), no D, no z,
heads group-major (head h reads group h // (heads / groups), as both scans assume), `chunk_size`,
and the cache's SSM state as the initial state at prefill. Masks are applied by the model outside
the scan (head and channel masks on its outputs, hidden masks before and after the mixer), so
they work the same on either path. The kernel returns y in x's dtype; it is cast to at least fp32,
as `ssd_scan` returns it; the final state is fp32 from both.

`state_step` is the one-token decode update (`model.Mamba2.step`) on our own Triton kernel (below; the default) or
`mamba_ssm`'s Triton `selective_state_update` under the scan's conditions (a CUDA tensor in bf16 / fp16, importable, not
switched off): one kernel updates the fp32 state in place and returns C h, where the PyTorch
recurrence (`model.recurrence_step`, the fallback and the reference) runs about ten. Both take B and C
per group (b, groups, n), head h reading group h // (heads / groups), in any dtype: `model.Mamba2.step`
passes them so where the heads are group-major (no per-head fp32 copies, four kernels a layer a decode
token, thirty-eighth session), and per head (b, heads, n) in fp32 in the serving order's rank-major heads
(serve/order.py, `state_groups`), which neither maps; dt and A broadcast over the head's
channels and state with stride-0 views, as mamba_ssm's own Mamba2 step does; D and dt_bias are zeros
(the model adds D itself; dt is already biased), no z.
Written for issue 12 (decode speed); checked on an H200 (benchmarks/bench_decode_step.py, tenth session,
docs/RESULTS.md "Serving at Nano width on a GPU": y within 1.4e-7 of the recurrence, the state within 6.1e-8,
greedy decode the same tokens, the update 1.1x faster at batch 1 and 1.5x / 2.2x at batch 32 / 64, inside
generate's CUDA graph and under torch.compile), so on by default since the thirty-second session:
`STAR_ELASTIC_TRITON_STEP=0` switches it off alone, `STAR_ELASTIC_NO_TRITON=1` with the scan.

Our own Triton decode update (decode_kernel.py, `own_state_update`) makes the same single pass over the state as
a custom operator, which torch.compile keeps in its graph without a break; it needs only the Triton that comes
with PyTorch's CUDA wheels, so a GPU install without `mamba_ssm` need not run inductor's fusion of the recurrence
(which read and wrote the fp32 state about five times a step at batch 32). Which update runs on CUDA:
`STAR_ELASTIC_STEP_KERNEL` (own, mamba_ssm or torch) where set, else the first of `STEP_ORDER` that imports (ours
first since its model-level CUDA tests passed on an H100 in the fifty-eighth session, its own kernel test on CUDA in
the fifty-ninth, then `mamba_ssm`'s). At batch 32 on an H100 ours and `mamba_ssm`'s took the same time, 1.24x /
1.38x faster steps (full / 0.5 budget) than inductor's fusion of the recurrence (fifty-seventh session,
docs/RESULTS.md "Mamba's decode update in one pass").

`causal_conv` is Mamba's depthwise causal conv and its SiLU at training and prefill without a cache
(`model.Mamba2.forward`, and inside `conv_scan`, forward and backward) on `causal_conv1d`'s CUDA kernel
(`causal_conv1d_fn`, a CUDA build: benchmarks/device says how), under the scan's conditions. On by default
since its CUDA test (output and gradients on the model's layout) passed on an H100 (thirty-ninth session; the
training step's PyTorch depthwise conv and its backward took 12.2 ms of 136 at 539M, transformers' on this kernel
1.7 ms: docs/RESULTS.md §2; inside `conv_scan` its CUDA test against autograd passed on an H100 in the fortieth
session, beside the stand-in test on the CPU);
`STAR_ELASTIC_CAUSAL_CONV=0` switches it off alone. The weight and bias are cast to the input's dtype, as
autocast casts them for `F.conv1d`; the inputs before the first are zeros, as there.

`conv_scan` is training's conv + SiLU, scan and D skip as one autograd function (`ConvScan`) on the scan's
Triton forward and backward (`_mamba_chunk_scan_combined_fwd` / `_bwd`, the functions `mamba_ssm`'s own wrappers
call): it keeps in_proj's output (kept anyway, for z) where autograd kept the conv's output for the scan and the
skip, and its backward recomputes the conv, as `mamba_ssm`'s fused Mamba layer does (12 KB a token a layer less
at Nano's widths; benchmarks/bench_saved.py --conv-scan). On by default since it was checked on an H100
(thirty-sixth session: tests/test_kernels.py's CUDA test against autograd, eager and compiled; the Nano-width
step no slower, `bench_kernels --conv-scan-apart` beside); `STAR_ELASTIC_CONV_SCAN=0` switches it off alone,
`STAR_ELASTIC_NO_TRITON=1` with the scan.

The kernel calls are excluded from `torch.compile` graphs (`torch.compiler.disable`): a compiled model breaks its
graph around each of them instead of tracing into them.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

ENV_DISABLE = "STAR_ELASTIC_NO_TRITON"
ENV_ENABLE = "STAR_ELASTIC_TRITON"
ENV_STEP = "STAR_ELASTIC_TRITON_STEP"  # "0": the decode state update stays on the recurrence
ENV_STEP_KERNEL = "STAR_ELASTIC_STEP_KERNEL"  # the decode update's kernel: own, mamba_ssm or torch (unset: STEP_ORDER)
STEP_KERNELS = ("own", "mamba_ssm", "torch")
ENV_CONV = "STAR_ELASTIC_CAUSAL_CONV"  # "0": Mamba's conv stays on PyTorch's conv1d
ENV_CONV_SCAN = "STAR_ELASTIC_CONV_SCAN"  # "0": conv, scan and D skip apart (autograd keeps the conv's output)
ON_BY_DEFAULT = True  # checked on an H200 (bench_kernels.py check); STAR_ELASTIC_TRITON=0 also switches it off
_DTYPES = (torch.bfloat16, torch.float16)  # fp32: the einsum scan (see above)


@functools.lru_cache(maxsize=None)
def _import(module: str, name: str):
    """(module.name, None) when it imports, else (None, why not). Imported once."""
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as e:  # ImportError, or a triton / mamba_ssm that fails while importing
        return None, f"{type(e).__name__}: {e}"


def _load():
    """(mamba_chunk_scan_combined, None), or (None, why not)."""
    return _import("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def _load_update():
    """(selective_state_update, None), or (None, why not)."""
    return _import("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")


def kernel():
    """`mamba_ssm`'s `mamba_chunk_scan_combined`, or None when it cannot be imported."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the Triton kernel cannot be used here (None when it imports)."""
    return _load()[1]


def _set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _off(name: str) -> bool:
    """An on-by-default path switched off alone (`name=0`)."""
    return os.environ.get(name, "") == "0"


def disabled() -> bool:
    """`STAR_ELASTIC_NO_TRITON` is set (to anything but empty or 0), or `STAR_ELASTIC_TRITON` is set to 0,
    or the kernel is off by default and `STAR_ELASTIC_TRITON` is not set."""
    enable = os.environ.get(ENV_ENABLE, "")
    return _set(ENV_DISABLE) or enable == "0" or not (ON_BY_DEFAULT or _set(ENV_ENABLE))


@torch.compiler.assume_constant_result
def triton_enabled() -> bool:
    """The Triton scan may run: it imports and the environment does not disable it."""
    return not disabled() and kernel() is not None


def uses_triton(x: torch.Tensor) -> bool:
    """Whether `chunk_scan` runs the Triton kernel for input `x`."""
    return x.is_cuda and x.dtype in _DTYPES and triton_enabled()


def chunk_scan(x, dt, A, B, C, chunk_size: int, initial_state=None, *, fallback):
    """Mamba-2's chunked scan: the Triton kernel where it applies (`uses_triton`), else
    `fallback` (the einsum `model.ssd_scan`), called with the same arguments.

    x: (b, t, h, p)   dt: (b, t, h), already softplus'ed and clamped   A: (h,), negative
    B, C: (b, t, g, n)   initial_state: (b, h, p, n) or None
    Returns y (b, t, h, p) without the D skip, in x's dtype from the kernel (fp32 from the einsum), and the
    final state (b, h, p, n) in fp32.
    """
    if uses_triton(x):
        return triton_scan(x, dt, A, B, C, chunk_size, initial_state)
    return fallback(x, dt, A, B, C, chunk_size, initial_state)


@torch.compiler.disable
def triton_scan(x, dt, A, B, C, chunk_size: int, initial_state=None, scan=None):
    """`mamba_chunk_scan_combined` with `ssd_scan`'s arguments and results. `scan`: the kernel
    (default: the imported one; tests pass a stand-in)."""
    scan = scan or kernel()
    if scan is None:
        raise RuntimeError(f"the Triton scan is not available: {unavailable_reason()}")
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    y, final = scan(x, dt.float(), A.float(), B, C, chunk_size, D=None, z=None, dt_bias=None,
                    initial_states=initial_state, dt_softplus=False, return_final_states=True)
    # y as the kernel wrote it: widened here, outside any compiled graph, the fp32 copy would be a graph input
    # that a compiled layer keeps for its backward (8 KB a token a layer at Nano's heads); Mamba2 widens it
    return y, final.float()


def _load_own_update():
    """(decode_kernel.state_update, None), or (None, why not): our Triton decode update (Triton comes with
    PyTorch's CUDA wheels; a CPU install has none)."""
    return _import("star_elastic.decode_kernel", "state_update")


def step_kernel_choice() -> str | None:
    """`STAR_ELASTIC_STEP_KERNEL` (own, mamba_ssm or torch), "torch" where the Triton paths are switched off
    (`STAR_ELASTIC_TRITON_STEP=0`, or with the scan), else None: the first of STEP_ORDER that imports."""
    choice = os.environ.get(ENV_STEP_KERNEL, "")
    if choice and choice not in STEP_KERNELS:
        raise ValueError(f"{ENV_STEP_KERNEL}={choice!r}: expected one of {', '.join(STEP_KERNELS)}")
    return "torch" if _off(ENV_STEP) or disabled() else choice or None


# the decode update's kernels tried in turn where none is chosen, before torch's. Ours first: as fast as mamba_ssm's
# at batch 32 on an H100 (fifty-seventh session), one node of torch.compile's graph, and it needs only the Triton
# that comes with PyTorch; its model-level CUDA tests (a hybrid's decode logits through it, compiled, both head orders)
# passed on an H100 in the fifty-eighth session, its own kernel test on CUDA (eager, compiled, in a CUDA graph) in the
# fifty-ninth
STEP_ORDER = ("own", "mamba_ssm")


def active_step_kernel() -> str:
    """The decode update `state_step` runs on CUDA: the chosen kernel (`step_kernel_choice`), else the first of
    STEP_ORDER that imports; "torch" (the recurrence) where none does."""
    loaders = {"own": _load_own_update, "mamba_ssm": _load_update}
    choice = step_kernel_choice()
    for name in [choice] if choice else STEP_ORDER:
        if name == "torch" or loaders[name]()[0] is not None:
            return name
    return "torch"


@torch.compiler.assume_constant_result
def own_step_enabled() -> bool:
    """Our Triton decode update (decode_kernel.py) runs on CUDA (`active_step_kernel`)."""
    return active_step_kernel() == "own"


@torch.compiler.assume_constant_result
def triton_step_enabled() -> bool:
    """`mamba_ssm`'s Triton state update runs on CUDA (`active_step_kernel`): not switched off
    (`STAR_ELASTIC_TRITON_STEP=0`), not disabled with the scan, and it imports."""
    return active_step_kernel() == "mamba_ssm"


def uses_own_step(x: torch.Tensor) -> bool:
    """Whether `state_step` runs our Triton decode update (decode_kernel.py) for input `x`: any float dtype."""
    return x.is_cuda and own_step_enabled()


def uses_triton_step(x: torch.Tensor) -> bool:
    """Whether `state_step` runs `mamba_ssm`'s Triton state update for input `x`."""
    return x.is_cuda and x.dtype in _DTYPES and triton_step_enabled()


def state_step(x, dt, A, B, C, state, *, fallback):
    """One token of Mamba-2's recurrence, h = exp(dt A) h + dt B x (in place), y = C h: our Triton kernel or
    `mamba_ssm`'s where they apply (`uses_own_step`, `uses_triton_step`), else `fallback`
    (`model.recurrence_step`).

    x: (b, h, p)   dt: (b, h), already softplus'ed and clamped   A: (h,), negative
    B, C: (b, g, n) per group (head h reads group h // (h / g)) or per head (g = h), any dtype
    state: (b, h, p, n) float32, updated in place
    Returns y (b, h, p) in float32, without the D skip."""
    if uses_own_step(x):
        return own_state_update(x, dt, A, B, C, state)
    if uses_triton_step(x):
        return triton_state_update(x, dt, A, B, C, state)
    return fallback(x, dt, A, B, C, state)


@torch.compiler.assume_constant_result
def own_step_available() -> bool:
    """decode_kernel imports (and so has registered its operator), whatever the environment chooses. A constant
    to torch.compile: run once while tracing, never traced into (the import inside cannot be)."""
    return _load_own_update()[0] is not None


def _own_op():
    """decode_kernel's operator as torch.compile sees it: a registered op, called by name (tests swap this)."""
    return torch.ops.star_elastic.mamba_state_update


def own_state_update(x, dt, A, B, C, state, update=None):
    """decode_kernel.state_update (one opaque node of a compiled graph, no graph break) with `recurrence_step`'s
    arguments and result. `update`: the kernel (default: the registered one; tests pass a stand-in)."""
    if update is None:
        if not own_step_available():
            raise RuntimeError(f"our Triton decode update is not available: {_load_own_update()[1]}")
        update = _own_op()
    if state.dtype != torch.float32 or state.stride(-1) != 1:
        raise ValueError(f"the decode update needs an fp32 state with a contiguous last dim (got {state.dtype}, "
                         f"strides {tuple(state.stride())})")
    return update(x, dt.float(), A.float(), B, C, state)


@torch.compiler.disable
def triton_state_update(x, dt, A, B, C, state, update=None):
    """`selective_state_update` with `recurrence_step`'s arguments and result. `update`: the kernel (default: the
    imported one; tests pass a stand-in)."""
    update = update or _load_update()[0]
    if update is None:
        raise RuntimeError(f"the Triton state update is not available: {_load_update()[1]}")
    b, h, p = x.shape
    n = state.shape[-1]
    # D and dt_bias as stride-0 zeros, not None: the kernel's launcher reads their strides (None fails
    # there, mamba_ssm 2.3.2), and all-zero strides on dt, A and dt_bias take its tied-head-dim path
    zero = torch.zeros((), device=x.device, dtype=torch.float32).expand(h, p)
    return update(state, x.float(), dt.float()[..., None].expand(b, h, p), A.float()[:, None, None].expand(h, p, n),
                  B, C, D=zero, z=None, dt_bias=zero, dt_softplus=False)


def _load_conv():
    """(causal_conv1d_fn, None), or (None, why not)."""
    return _import("causal_conv1d", "causal_conv1d_fn")


@torch.compiler.assume_constant_result
def causal_conv_enabled() -> bool:
    """The causal conv kernel may run: not switched off (`STAR_ELASTIC_CAUSAL_CONV=0`), not disabled with the
    scan, and it imports."""
    return not _off(ENV_CONV) and not disabled() and _load_conv()[0] is not None


def uses_causal_conv(x: torch.Tensor) -> bool:
    """Whether `model.Mamba2` runs its conv (no cache) on `causal_conv` for input `x` (b, channels, t)."""
    return x.is_cuda and x.dtype in _DTYPES and causal_conv_enabled()


def channels_last_fits(x: torch.Tensor) -> bool:
    """Whether causal_conv1d's kernel reads x (b, channels, t) where it lies: channels-first (time stride 1), or
    channels-last with channels, batch and time strides multiples of 8 (its checks) and 16-byte aligned (its
    vector loads). A view of in_proj's output whose row width or offset is not (a masked or odd-sized layer)
    is copied instead."""
    if x.stride(2) == 1:
        return True
    return (x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0
            and x.data_ptr() % 16 == 0)


@torch.compiler.disable
def causal_conv(x, weight, bias, conv=None):
    """silu of the depthwise causal conv of x (b, channels, t) with weight (channels, k) and bias (channels,) or
    None, zeros before the first input: `causal_conv1d_fn`. `conv`: the kernel (default: the imported one; tests
    pass a stand-in). Returns (b, channels, t) in x's dtype."""
    conv = conv or _load_conv()[0]
    if conv is None:
        raise RuntimeError(f"the causal conv kernel is not available: {_load_conv()[1]}")
    if not channels_last_fits(x):  # a copy the kernel reads channels-first, rather than its refusal or misreads
        x = x.contiguous()
    return conv(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation="silu")


# ----------------------------------------------------------------------------- conv, scan and skip in one

def _load_conv_scan():
    """((the scan's forward, its backward), None): `mamba_ssm`'s `_mamba_chunk_scan_combined_fwd` / `_bwd`, the
    functions its own autograd wrappers call; or (None, why not)."""
    fwd, why = _import("mamba_ssm.ops.triton.ssd_combined", "_mamba_chunk_scan_combined_fwd")
    bwd, why_bwd = _import("mamba_ssm.ops.triton.ssd_combined", "_mamba_chunk_scan_combined_bwd")
    return ((fwd, bwd), None) if fwd is not None and bwd is not None else (None, why or why_bwd)


@torch.compiler.assume_constant_result
def conv_scan_enabled() -> bool:
    """Conv, scan and skip may run as one function: not switched off (`STAR_ELASTIC_CONV_SCAN=0`), not disabled
    with the scan, and the scan's forward and backward import."""
    return not _off(ENV_CONV_SCAN) and not disabled() and _load_conv_scan()[0] is not None


def uses_conv_scan(x: torch.Tensor) -> bool:
    """Whether `model.Mamba2` runs its conv (no cache), scan and D skip as `conv_scan` for input `x`."""
    return x.is_cuda and x.dtype in _DTYPES and conv_scan_enabled()


class ConvScan(torch.autograd.Function):
    """silu(causal conv(x B C rows of in_proj's output)) split into x, B and C, the chunked scan, and the D skip:
    y + D x (b, t, heads, head_dim) in in_proj's dtype. What it keeps for backward is in_proj's output (which the
    layer keeps anyway, for z), dt, A and D; backward recomputes the conv (a depthwise conv of width 4), then
    runs the scan's backward. Autograd around the conv and the scan kept the conv's output instead, for the
    scan (x, B and C) and for the skip (x): 12 KB a token a layer at Nano's widths (benchmarks/bench_saved.py).
    `mamba_ssm`'s fused Mamba layer recomputes the conv so too. `ops`: the scan's (forward, backward) with
    mamba_ssm's signatures; `conv_split`: (proj, weight, bias) -> the conv's output (b, channels, t) and x, B
    and C viewed from it (the layer's own, `model.Mamba2.conv_and_views`, which knows in_proj's rows)."""

    @staticmethod
    def forward(ctx, proj, weight, bias, dt, A, D, chunk_size, ops, conv_split):
        with torch.no_grad():
            x, B, C = conv_split(proj, weight, bias)[1:]
            out = ops[0](x, dt, A, B, C, chunk_size, D=D)[0]
        ctx.save_for_backward(proj, weight, bias, dt, A, D)
        ctx.chunk_size, ctx.ops, ctx.conv_split = chunk_size, ops, conv_split
        return out

    @staticmethod
    def backward(ctx, dout):
        proj, weight, bias, dt, A, D = ctx.saved_tensors
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip((proj, weight, bias), ctx.needs_input_grad)]
        with torch.enable_grad():
            conv_out, x, B, C = ctx.conv_split(*leaves)
        dx, ddt, dA, dB, dC, dD = ctx.ops[1](dout.contiguous(), x.detach(), dt, A, B.detach(), C.detach(),
                                             x.detach(), ctx.chunk_size, D=D)[:6]  # out: unread without z
        d_conv = torch.cat([dx.flatten(2), dB.flatten(2), dC.flatten(2)], dim=-1).transpose(1, 2)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(conv_out, wanted, d_conv) if wanted else ())
        d_leaves = [next(got) if t is not None and t.requires_grad else None for t in leaves]
        return (*d_leaves, ddt, dA, dD, None, None, None)


@torch.compiler.disable
def conv_scan(proj, weight, bias, dt, A, D, chunk_size: int, *, conv_split, ops=None):
    """`ConvScan` on the scan's Triton forward and backward (`ops`: default the imported ones; tests pass
    stand-ins). proj: in_proj's whole output, the conv's input its x B C rows (not a view of them: see
    model.Mamba2.forward); weight (channels, 1, k); bias (channels,) or None; dt (b, t, heads) already
    softplus'ed and clamped; A, D (heads,); conv_split: see `ConvScan`.
    Returns y + D x (b, t, heads, head_dim) in proj's dtype."""
    ops = ops or _load_conv_scan()[0]
    if ops is None:
        raise RuntimeError(f"the Triton scan's forward and backward are not available: {_load_conv_scan()[1]}")
    return ConvScan.apply(proj, weight, bias, dt, A.float(), D.float(), chunk_size, ops, conv_split)
