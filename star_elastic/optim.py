"""The optimisers of elastic training: AdamW in its fused form (the default), AdamW with one set of
moments and one rate per budget (`TrainConfig.budget_lrs`), and the projection of the full anchor's
gradient off the smaller budgets' where the two conflict (`TrainConfig.anchor_projection`)."""

from __future__ import annotations

import math

import torch

from . import parallel


def adamw(groups, fused: bool = True, **kw) -> torch.optim.AdamW:
    """AdamW (betas 0.9 / 0.95) in its fused form: one kernel over every parameter instead of a dozen
    elementwise passes. The foreach form took a quarter of the GPU time of a Nano-shaped MoE training
    step, where every expert's weights and moments are updated each step; fused, 15% and the step 1.15x
    faster (docs/RESULTS.md §12)."""
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused, **kw)


@torch.no_grad()
def take_grads(params, add_to: list | None = None) -> list:
    """The gradients of `params` (None where one has none), taken off them; added to `add_to`'s when
    given (accumulation over micro-batches)."""
    params = list(params)
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    if add_to is None:
        return grads
    return [a if g is None else g if a is None else a.add_(g) for a, g in zip(add_to, grads)]


@torch.no_grad()
def put_grads(params, grads: list, add: bool = False):
    """Put `grads` back on `params` (`add`: onto the gradients they hold); None leaves a parameter as it is."""
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = p.grad.add_(g) if add and p.grad is not None else g


@torch.no_grad()
def project_conflict(grads: list, against: list, reduce=None) -> torch.Tensor:
    """PCGrad's projection (Yu et al., 2020), over the whole model: where `grads` and `against` (gradients,
    one per parameter, None where absent) conflict, a negative inner product, `grads` loses its component
    along `against`, in place, so that their sum no longer undoes `against`'s step to first order. NASViT
    (Gong et al., 2022) resolves a supernet's conflicts with its sub-networks this way. Shards (DTensors)
    are dotted locally and `reduce` (an all-reduce) sums the three numbers over the ranks. Returns the
    cosine between the two before the projection, a tensor: no host sync."""
    pairs = [(parallel.local(g), parallel.local(o)) for g, o in zip(grads, against) if g is not None and o is not None]
    if not pairs:
        return torch.zeros(())
    # a tensor at a time, with no temporary of its size (an embedding of a 131k vocabulary is 350M numbers)
    flat = [(g.reshape(-1), o.reshape(-1)) for g, o in pairs]
    stats = torch.stack([torch.stack([torch.dot(g, o), torch.dot(o, o), torch.dot(g, g)]).double()
                         for g, o in flat]).sum(0)
    if reduce is not None:
        reduce(stats)
    dot, oo, gg = stats
    coef = (dot / oo.clamp_min(1e-300)).clamp(max=0.0)  # 0 where they agree: nothing removed
    for g, o in pairs:
        g.addcmul_(o, -coef.to(g.dtype))
    return dot / (oo * gg).sqrt().clamp_min(1e-300)


class BudgetAdamW(torch.optim.Optimizer):
    """AdamW with one set of moments per budget, and a rate per budget (TrainConfig.budget_lrs).

    A joint step sums several budgets' gradients on shared weights, and one AdamW then normalises each
    budget's gradient by the moments of the sum, at one rate for all. Here each budget's gradient is
    kept apart (`stash`, after its backward), updates its own moments at its own rate (`step(key)`),
    and the step applies the sum of those updates: for each budget, the update that distilling it alone
    would make. A group's `scales` maps each key (a budget, named without dots: the names end the
    moments' names in a saved state) to its rate over the group's scheduled `lr`; those keys' moments
    exist from the start, so a state dict always lists them all (torch.distributed.checkpoint loads
    into that structure). A group with `per_budget` False (the router) is left out of all that: its
    gradient accumulates over the budgets as usual and `step()` with no key applies it, with one set of
    moments. Step counts are CPU tensors, as torch's AdamW keeps them: read without a device sync."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scales={},
                                      per_budget=True))
        self.stashed: dict[str, list] = {}  # key -> a gradient (or None) per per-budget parameter
        for group in self.param_groups:
            for key in group["scales"] if group["per_budget"] else ():
                for p in group["params"]:
                    self._moments(p, key)

    def _moments(self, p, name: str) -> dict:
        s = self.state[p]
        if f"step_{name}" not in s:
            s[f"step_{name}"] = torch.zeros((), dtype=torch.float32)
            s[f"exp_avg_{name}"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s[f"exp_avg_sq_{name}"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return s

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for s in self.state.values():  # torch moves every tensor but "step" to its parameter's device
            for k, v in s.items():
                if k.startswith("step_"):
                    s[k] = v.detach().to("cpu", torch.float32)

    def _per_budget(self) -> list:
        return [p for g in self.param_groups if g["per_budget"] for p in g["params"]]

    def stash(self, key: str):
        """Move the per-budget parameters' gradients to `key` (added to what it holds: accumulation)."""
        self.stashed[key] = take_grads(self._per_budget(), add_to=self.stashed.get(key))

    def unstash(self, key: str):
        """Put `key`'s gradients back on the per-budget parameters (to be clipped, then `step(key)`); they
        hold none, every step having cleared them after the previous key's."""
        put_grads(self._per_budget(), self.stashed.pop(key))

    @torch.no_grad()
    def step(self, key: str | None = None, closure=None):
        """`key`'s AdamW update of the per-budget groups, or (no key) the other groups' (torch.optim.AdamW's
        arithmetic), from the gradients on the parameters. (`closure`: torch's optimiser interface; unused.)"""
        for group in self.param_groups:
            if group["per_budget"] != (key is not None):
                continue
            name = "shared" if key is None else key
            (b1, b2), lr = group["betas"], group["lr"] * group["scales"].get(name, 1.0)
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            states = [self._moments(p, name) for p in ps]
            for s in states:
                s[f"step_{name}"] += 1
            grads = [p.grad for p in ps]
            m = [s[f"exp_avg_{name}"] for s in states]
            v = [s[f"exp_avg_sq_{name}"] for s in states]
            t = [float(s[f"step_{name}"]) for s in states]
            if group["weight_decay"]:
                torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
            torch._foreach_lerp_(m, grads, 1 - b1)  # a few kernels over every parameter, not a dozen each
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1 - b2 ** n) for n in t])
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(ps, m, denom, [-lr / (1 - b1 ** n) for n in t])
