"""The full budget's own low-rank delta (`TrainConfig.full_delta_rank`): the full anchor trains it alone.

Why: the full anchor holds the full model near its parent by pulling on the weights that every budget
shares, and that pull is the 0.75 budget's whole gap to distilling it alone (docs/RESULTS.md §9, twelfth
session): trained beside the 0.5 with no anchor the 0.75 equals separate distillation in domain and the
0.5 beats it by 5-8%, but the full model drifts 12-29% from its parent. Here the full model gets
parameters of its own instead: every linear layer of the decoder adds a low-rank term, W x + B A x, in
the full budget's passes only, and the anchor's backward accumulates into A and B alone (`inputs=`,
train.py). The anchor's gradient then reaches nothing the smaller budgets use; they train the shared
weights as if the full model were not there, and the delta follows them to keep the full model on its
parent. B starts at zero, so training starts from the parent exactly. The delta is applied as masks are
(masking.py), by swapping each linear layer's class, which compiled layers see.

Export merges it: the full budget is W + B A, the parent's architecture with other weights (`merge_into`).
The smaller budgets are prefixes of W, untouched by it. Training-side only so far: `bench_elastic.py
--full-delta-rank` measures it; elastify does not write it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from star_elastic.elastic.masking import ClassSwaps


class _WithDelta:
    """Mixed into a linear layer's class while the full budget runs: W x + B A x."""

    delta_down: torch.Tensor
    delta_up: torch.Tensor

    def forward(self, x):
        return super().forward(x) + F.linear(F.linear(x, self.delta_down), self.delta_up)


class FullDelta(nn.Module):
    """A, B (rank r) for every nn.Linear of `model` but its LM head: `up` (out, r) starts at zero,
    `down` (r, in) small and random. Parameter keys are the linear layers' names, dots as '/'."""

    def __init__(self, model: nn.Module, rank: int, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"full delta rank {rank}: give a positive rank")
        g = torch.Generator().manual_seed(seed)
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        for name in self.names:
            w = model.get_submodule(name).weight
            out_f, in_f = w.shape
            key = name.replace(".", "/")
            down = torch.randn(rank, in_f, generator=g).div_(in_f ** 0.5)
            self.down[key] = nn.Parameter(down.to(w.device, w.dtype))  # the weights' dtype: the trainer's master
            self.up[key] = nn.Parameter(torch.zeros(out_f, rank, device=w.device, dtype=w.dtype))

    def delta(self, name: str) -> torch.Tensor:
        """B A of linear layer `name`, (out, in)."""
        key = name.replace(".", "/")
        return self.up[key] @ self.down[key]

    @contextmanager
    def applied(self, model: nn.Module):
        """Inside: `model` is the full budget with its delta, each linear layer's class swapped in place
        as masks are (masking.py: torch.compile guards on classes, so compiled layers run it too). What
        trains the delta alone is the backward's `inputs=` (the trainer's anchor pass), which leaves the
        model's own parameters without gradient. Not for sharded (FSDP2) models."""
        swaps = ClassSwaps()
        try:
            for name in self.names:
                key = name.replace(".", "/")
                swaps.mix(model.get_submodule(name), _WithDelta, delta_down=self.down[key], delta_up=self.up[key])
            yield model
        finally:
            swaps.undo()

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> nn.Module:
        """Add B A to the weights of `model`, a copy of the full budget with the same layer names: the
        standalone full model."""
        for name in self.names:
            w = model.get_submodule(name).weight
            w.add_(self.delta(name).to(w.dtype))
        return model
