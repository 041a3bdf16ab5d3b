"""Mamba-2's one-token decode update as one Triton kernel of our own, visible to torch.compile.

    h <- exp(dt A) h + dt x B^T   (the fp32 state, in place)      y = h C   (fp32)

`model.recurrence_step` computes the same in PyTorch. Compiled by inductor at batch 32 and Nano's widths
(64 heads x 64 x state 128: a 67 MB fp32 state a layer) it read and wrote the state about five times a step:
the update into a new buffer, the copy back into the cache, a batched GEMV for the read-out (docs/RESULTS.md,
"The batch-32 step kernel by kernel"). Here each program loads a block of one head's state once, updates it,
stores it in place and reduces it against C: the state crosses the memory bus twice, the least possible.

`mamba_ssm`'s `selective_state_update` makes the same single pass, but as a Python call that torch.compile
must break its graph around (kernels.triton_state_update). This one is a custom operator (`torch.library.custom_op`,
the state declared as mutated, its output's shape given by a fake implementation): torch.compile keeps it as one
opaque node of the graph, no break, inductor fusing the operators on either side as it would without it, and the
decode step's CUDA graph captures it like any other kernel. (A `triton_op`, which inductor could see into, cannot
be traced under Triton's CPU interpreter, where this one's compiled path is tested.)

Triton comes with PyTorch's CUDA wheels; this module imports it, so import it only where CUDA is (kernels.py
does, lazily). Heads read B and C per group, head h reading group h // (heads / groups), as the scans do;
`groups == heads` is one B and C per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _state_update_kernel(state, x, dt, A, B, C, y,
                         s_b, s_h, s_p, x_b, x_h, x_p, dt_b, dt_h, B_b, B_g, B_n, C_b, C_g, C_n, y_b, y_h,
                         heads_per_group, P, N,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_p, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = h // heads_per_group
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    in_p, in_n = p < P, n < N
    mask = in_p[:, None] & in_n[None, :]
    at = state + b * s_b + h * s_h + p[:, None] * s_p + n[None, :]  # the state's last dim is contiguous
    s = tl.load(at, mask=mask, other=0.0)
    xv = tl.load(x + b * x_b + h * x_h + p * x_p, mask=in_p, other=0.0).to(tl.float32)
    d = tl.load(dt + b * dt_b + h * dt_h).to(tl.float32)
    a = tl.load(A + h).to(tl.float32)
    Bv = tl.load(B + b * B_b + g * B_g + n * B_n, mask=in_n, other=0.0).to(tl.float32)
    Cv = tl.load(C + b * C_b + g * C_g + n * C_n, mask=in_n, other=0.0).to(tl.float32)
    s = s * tl.exp(d * a) + (d * xv)[:, None] * Bv[None, :]
    tl.store(at, s, mask=mask)
    tl.store(y + b * y_b + h * y_h + p, tl.sum(s * Cv[None, :], axis=1), mask=in_p)


def block_sizes(head_dim: int, state: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N): the whole state row (a power of two), and head-dim rows so a program holds ~2K fp32
    values (8 KB: enough in flight per program, and 4 programs a head at Nano's 64 x 128 to fill the card)."""
    block_n = triton.next_power_of_2(state)
    return max(1, min(triton.next_power_of_2(head_dim), 2048 // block_n)), block_n


@torch.library.custom_op("star_elastic::mamba_state_update", mutates_args={"state"})
def state_update(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 state: torch.Tensor) -> torch.Tensor:
    """x (b, h, p), dt (b, h) (already softplus'ed and clamped), A (h,), B and C (b, g, n), state (b, h, p, n)
    fp32 with its last dim contiguous, updated in place. Returns y (b, h, p) fp32, without the D skip."""
    b, h, p = x.shape
    n = state.shape[-1]
    y = torch.empty((b, h, p), dtype=torch.float32, device=x.device)
    block_p, block_n = block_sizes(p, n)
    _state_update_kernel[(triton.cdiv(p, block_p), h, b)](
        state, x, dt, A, B, C, y,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), x.stride(2),
        dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        y.stride(0), y.stride(1), h // B.shape[1], p, n, BLOCK_P=block_p, BLOCK_N=block_n)
    return y


@state_update.register_fake
def _(x, dt, A, B, C, state):
    return x.new_empty(x.shape, dtype=torch.float32)
