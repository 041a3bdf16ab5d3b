"""The rest of the full budget's drift past its rank-r part, rounded to a few bits a weight
(`TrainConfig.full_delta_bits`, `FullDelta.restore`): GPTQ under each layer's input covariance, the codes and
their scales, packed for the delta file and made dense for the full budget's forward."""

from __future__ import annotations

import math

import torch


def damped(cov: torch.Tensor, damping: float) -> torch.Tensor:
    """A linear layer's input covariance plus `damping` x its mean diagonal on the diagonal: the weight the restore
    factors and rounds under (delta.py), and measures what it missed by."""
    return cov + damping * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(cov.shape[0], device=cov.device,
                                                                              dtype=cov.dtype)


# The rest of the drift past the rank-r part, rounded to a few bits a weight (TrainConfig.full_delta_bits): a scale
# per REST_GROUP weights along the input. On SmolLM2's own drift (docs/RESULTS.md §9, forty-first session) the
# dense drift at 4 bits covered 99.96% of it where rank 64 covered 98.4% and rank 128 99.4%: a training drift is
# not low-rank enough for a rank to hold its tail, and a few bits a weight hold it at a like size.
REST_GROUP = 64
REST_BITS = (1, 2, 4, 8)


def rest_group(cols: int) -> int:
    """Weights sharing one scale along an input of `cols` columns."""
    return math.gcd(cols, REST_GROUP)


def _rest_scale(g: torch.Tensor, bits: int) -> torch.Tensor:
    """The scale of each group (along the last dim) of `g`: its mean magnitude (1 bit: sign times it, BitDelta's
    form), its RMS (2 bits: four levels (k + 1/2) s, near Lloyd-Max for a Gaussian), else its largest magnitude
    over the top level."""
    s = g.abs().mean(-1) if bits == 1 else g.pow(2).mean(-1).sqrt() if bits == 2 else \
        g.abs().amax(-1) / (2 ** (bits - 1) - 1)
    return s.clamp_min(1e-12)


def rest_codes(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """`x`'s nearest level at scale `s` as a code in [0, 2^bits) (rest_values inverts it)."""
    if bits == 1:
        return (x >= 0).to(torch.uint8)
    if bits == 2:
        return ((x / s - 0.5).round().clamp(-2, 1) + 2).to(torch.uint8)
    half = 2 ** (bits - 1)
    return ((x / s).round().clamp(-half, half - 1) + half).to(torch.uint8)


def rest_values(codes: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """The levels `codes` stand for at scale `s` (same shape as codes, s broadcast)."""
    c = codes.to(s.dtype)
    return (2 * c - 1) * s if bits == 1 else (c - 1.5) * s if bits == 2 else (c - 2 ** (bits - 1)) * s


def round_rest(gap: torch.Tensor, cov: torch.Tensor | None, bits: int, damping: float = 1e-2):
    """(codes uint8 (out, in), scales (out, in / group)) of `gap` (out, in) rounded to `bits` a weight by GPTQ
    (Frantar et al. 2022) under the input covariance `cov` (None: plain rounding): each column rounded in turn,
    its error spread over the columns not yet rounded, so that the error the layer's inputs see stays small; a
    group's scale set where the group begins."""
    w = gap.clone()
    out_f, n = w.shape
    size = rest_group(n)
    codes = torch.empty(out_f, n, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_f, n // size, dtype=w.dtype, device=w.device)
    if cov is None:
        g = w.reshape(out_f, n // size, size)
        scales.copy_(_rest_scale(g, bits))
        return rest_codes(g, scales[..., None], bits).reshape(out_f, n), scales
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped(cov, damping))), upper=True)
    for i in range(n):
        if i % size == 0:
            scales[:, i // size] = _rest_scale(w[:, i:i + size], bits)
        s = scales[:, i // size]
        codes[:, i] = rest_codes(w[:, i], s, bits)
        err = (w[:, i] - rest_values(codes[:, i], s, bits)) / upper[i, i]
        w[:, i:] -= err[:, None] * upper[i, i:][None, :]
    return codes, scales


def rest_dense(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The rounded rest as a dense (out, in) tensor in the scales' dtype."""
    out_f, n = codes.shape
    size = n // scales.shape[-1]
    return rest_values(codes.reshape(out_f, -1, size), scales[..., None], bits).reshape(out_f, n)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (out, in) of `bits` each, 8 / bits to a byte (out, in * bits / 8), the first in the low bits."""
    per = 8 // bits
    c = codes.reshape(codes.shape[0], -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_codes undone: (out, in * bits / 8) bytes -> (out, in) codes."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    return ((packed.to(torch.int32)[..., None] >> shifts) & (2 ** bits - 1)).reshape(packed.shape[0], -1).to(
        torch.uint8)
