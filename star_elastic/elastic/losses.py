"""Training losses of the elastic model (docs/METHOD.md §8).

- `kd_loss`: forward KL(p_teacher || p_student) of next-token distributions at temperature 1,
  averaged over tokens; the teacher is the frozen parent.
- `budget_loss`: |C / (b * C_full) - 1|, zero while the cost is within 5% of the target; `drawn_cost`
  gives C the value of the architecture that ran and the gradient of the expected cost.
- `advantage`, `score_function_loss`: the router's quality term, advantage x log p(choice).
- `full_choice_loss`: for the full budget (b = 1), an MSE pulling every router choice to the full size.
- `next_token_ce`: optional cross-entropy on the data ("trainable teacher" / full-budget path).
- `task_loss`: the model's terms of one step, weighted: total = kd * KD + ce * CE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cost import BAND, Budget


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row of (rows, vocab) logits, in fp32 via log_softmax (stable for
    any logit scale; exactly 0 where the rows are equal)."""
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_mask: torch.Tensor | None = None,
            chunk_tokens: int | None = None) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) at temperature 1, the mean over tokens.

    logits: (..., vocab), the teacher's are not differentiated. `token_mask` (...,) bool/0-1: tokens
    that count (e.g. not padding). `chunk_tokens`: compute that many tokens at a time and recompute
    them in backward (activation checkpointing), so the fp32 softmaxes of a large vocabulary never
    exist for every token at once."""
    V = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V)
    if chunk_tokens is None or chunk_tokens >= s.shape[0]:
        kl = _kl_rows(s, t)
    else:
        parts = []
        for i in range(0, s.shape[0], chunk_tokens):
            a, b = s[i:i + chunk_tokens], t[i:i + chunk_tokens]
            parts.append(checkpoint(_kl_rows, a, b, use_reentrant=False) if torch.is_grad_enabled() else _kl_rows(a, b))
        kl = torch.cat(parts)
    if token_mask is None:
        return kl.mean()
    w = token_mask.reshape(-1).to(kl.dtype)
    return (kl * w).sum() / w.sum().clamp(min=1)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of predicting input_ids[:, 1:] from logits[:, :-1] (as evaluate.perplexity)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), ignore_index=ignore_index)


def budget_loss(cost, budget: Budget, band: float = BAND) -> torch.Tensor:
    """|C / (b * C_full) - 1| (b * C_full is the budget's absolute target), 0 inside the dead band:
    any architecture within `band` of its target is as good as any other, so the router is free to
    trade axes there for the task loss."""
    cost = torch.as_tensor(cost, dtype=torch.float32) if not torch.is_tensor(cost) else cost
    dev = (cost / budget.target - 1).abs()
    return torch.where(dev > band, dev, torch.zeros_like(dev))


def drawn_cost(drawn, expected) -> torch.Tensor:
    """The value of the drawn architecture's cost with the gradient of the expected cost: the budget
    loss judges what ran (what argmax picks once the noise anneals), while its gradient says how the
    choice distribution moves the cost. On the expected cost alone, a distribution split between a
    large and a small choice sits inside the band while every draw, and the argmax, is outside."""
    expected = torch.as_tensor(expected)
    return torch.as_tensor(drawn, dtype=expected.dtype, device=expected.device).detach() + expected - expected.detach()


def advantage(loss, baseline) -> torch.Tensor:
    """How much worse a draw did than the baseline, relative to their mean: (L - B) / ((L + B) / 2),
    in [-2, 2], not differentiated. Relative, so its size does not shrink as training lowers the
    loss; bounded, so a baseline near zero (an argmax that is almost the teacher) cannot blow it up."""
    loss = torch.as_tensor(loss, dtype=torch.float32).detach()
    baseline = torch.as_tensor(baseline, dtype=torch.float32).detach().to(loss.device)
    return (loss - baseline) / ((loss + baseline) / 2).abs().clamp(min=1e-8)


def score_function_loss(log_prob: torch.Tensor, advantage) -> torch.Tensor:
    """The router's quality term (REINFORCE): advantage x log p(choice), the advantage not
    differentiated. Its gradient is an unbiased estimate of how the expected objective moves with the
    choice distribution (a baseline that does not depend on the draw adds no bias): a choice that does
    worse than the baseline on the same batch loses probability, a better one gains it."""
    return torch.as_tensor(advantage, dtype=torch.float32).detach().to(log_prob.device) * log_prob


def full_choice_loss(probs: dict[str, torch.Tensor]) -> torch.Tensor:
    """MSE between every slot's choice probabilities and the one-hot of its full size (the last
    choice): the anchor that keeps the b = 1 budget the whole parent."""
    losses = []
    for y in probs.values():
        target = torch.zeros_like(y)
        target[..., -1] = 1
        losses.append(F.mse_loss(y, target))
    return torch.stack(losses).mean()


@dataclass
class LossWeights:
    kd: float = 1.0
    budget: float = 1.0  # lambda of docs/METHOD.md §8
    anchor: float = 1.0  # the b = 1 pull toward the full choice, inside the budget term
    ce: float = 0.0  # optional next-token cross-entropy (0: off)
    band: float = BAND  # the budget loss's dead band


def task_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, input_ids: torch.Tensor | None = None,
              weights: LossWeights | None = None, token_mask: torch.Tensor | None = None,
              chunk_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """The model's loss of one step: `total` = kd * KD + ce * CE (terms of weight 0 skipped). The
    router's terms (budget, anchor, entropy floor, quality) are the trainer's (`ElasticTrainer._router_loss`)."""
    w = weights or LossWeights()
    out = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if w.kd:
        out["kd"] = kd_loss(student_logits, teacher_logits, token_mask, chunk_tokens)
        total = total + w.kd * out["kd"]
    if w.ce:
        if input_ids is None:
            raise ValueError("the CE term needs input_ids")
        out["ce"] = next_token_ce(student_logits, input_ids)
        total = total + w.ce * out["ce"]
    out["total"] = total
    return out
