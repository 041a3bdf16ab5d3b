"""Training losses of the elastic model (docs/METHOD.md §8).

- `kd_loss`: forward KL(p_teacher || p_student) of next-token distributions at temperature 1,
  averaged over tokens; the teacher is the frozen parent. Computed a chunk of tokens at a time; fed
  `HeadInput`s (`head_input(model, x)`: final hidden states + LM head weight) instead of logits, it
  applies the head per chunk too, so no (tokens, vocab) tensor of the whole batch is ever made.
- `budget_loss`: |C / (b * C_full) - 1|, zero while the cost is within 5% of the target; `drawn_cost`
  gives C the value of the architecture that ran and the gradient of the expected cost.
- `advantage`, `score_function_loss`: the router's quality term, advantage x log p(choice).
- `full_choice_loss`: for the full budget (b = 1), an MSE pulling every router choice to the full size.
- `next_token_ce`: optional cross-entropy on the data ("trainable teacher" / full-budget path).
- `task_loss`: the model's terms of one step, weighted: total = kd * KD + ce * CE.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cost import BAND, Budget


# ----------------------------------------------------------------------------- distillation

# fp32 elements of one chunk of (tokens, vocab) logits when no chunk size is given: 2^27 (512 MiB), so
# 1024 tokens of a 131k vocabulary at a time; a small vocabulary runs in one chunk.
CHUNK_ELEMENTS = 2 ** 27
# ... and under `compiled_kd`, whose compiled chunk keeps no fp32 (chunk, vocab) tensor (its softmaxes fused
# into passes over the logits), only the bf16 logits of both sides and the gradient: 2^29 elements, 4096
# tokens of a 131k vocabulary a chunk (1 GiB each in bf16). Fewer chunks, fewer passes of the head's fp32
# gradient accumulator (1.4 GB at Nano's head, read and written once a chunk: 22 GB a step at 1024-token chunks)
FUSED_CHUNK_ELEMENTS = 2 ** 29


@dataclass(frozen=True)
class HeadInput:
    """Logits not yet computed: the LM head's input and weight, `logits = hidden @ weight.T`.

    `kd_loss`, `next_token_ce` and `task_loss` take one wherever they take logits, and apply the
    head a chunk of tokens at a time, so no (tokens, vocab) tensor of the whole batch ever exists
    (in any dtype). `head_input(model, input_ids)` makes one. `dtype`: the matmul's dtype, as the
    LM head would have run it (autocast's where the model ran under autocast); None: weight's."""

    hidden: torch.Tensor  # (..., D)
    weight: torch.Tensor  # (V, D)
    dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype or self.weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def rows(self) -> torch.Tensor:
        """hidden as (tokens, D)."""
        return self.hidden.reshape(-1, self.hidden.shape[-1])

    def logits(self, hidden: torch.Tensor | None = None, fp32: bool = True) -> torch.Tensor:
        """Logits of `hidden` (default: all of it) through the head, the matmul in the compute dtype
        whatever autocast is on around the call; in fp32, or (`fp32=False`) in the compute dtype."""
        h = self.hidden if hidden is None else hidden
        cd = self.compute_dtype
        with torch.autocast(h.device.type, enabled=False):
            z = F.linear(h.to(cd), self.weight.to(cd))
        return z.float() if fp32 else z

    def detach(self) -> "HeadInput":
        return HeadInput(self.hidden.detach(), self.weight.detach(), self.dtype)


Logits = torch.Tensor | HeadInput  # what the losses take for logits


def head_input(model, input_ids: torch.Tensor, **kwargs) -> HeadInput:
    """Run `model` (a star_elastic `Model`, masks and all) up to its LM head: its final hidden
    states and the head's weight, for `kd_loss` to apply chunk by chunk. Call it where the model's
    forward would be called (under the same autocast and grad mode): the head's compute dtype is
    recorded from there. For the call the head's forward is the identity (the module stays in place,
    as masking.py's dropped layers do); its weight is read after the forward. Sharded with FSDP2
    (parallel.py), the root must keep its parameters unsharded after the forward, until the backward
    (`model.set_reshard_after_forward(False, recurse=False)`), else this raises: the loss then uses
    the whole weight, and its gradient is reduce-scattered with the rest."""
    head = model.lm_head
    own = vars(head).get("forward")
    vars(head)["forward"] = _identity
    try:
        hidden = model(input_ids, **kwargs)  # Model.forward returns lm_head(final_norm(x)).float()
    finally:
        if own is None:
            vars(head).pop("forward", None)
        else:
            vars(head)["forward"] = own
    if type(head.weight).__name__ == "DTensor":
        raise RuntimeError("head_input: the LM head's weight is sharded again after the forward (FSDP2); keep the "
                           "root unsharded until the backward: model.set_reshard_after_forward(False, recurse=False)")
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    # the matrix the head runs: a head whose class is swapped to run another (the full budget's own, delta.py)
    # says which; reading `.weight` there scored the full budget with the shared head (twenty-third session)
    own = getattr(head, "head_weight", None)
    return HeadInput(hidden, own() if own is not None else head.weight, dtype)


def _identity(x):
    return x


def first_rows(x: Logits, k: int) -> Logits:
    """The first k sequences of a batch's logits (batch, seq, vocab) or HeadInput (its hidden states')."""
    return HeadInput(x.hidden[:k], x.weight, x.dtype) if isinstance(x, HeadInput) else x[:k]


def _rows(x: Logits) -> torch.Tensor:
    """(tokens, vocab) logits, or (tokens, D) hidden states of a HeadInput."""
    return x.rows() if isinstance(x, HeadInput) else x.reshape(-1, x.shape[-1])


def _vocab(x: Logits) -> int:
    return x.vocab_size if isinstance(x, HeadInput) else x.shape[-1]


def _chunk_size(chunk_tokens: int | None, vocab: int) -> int:
    return chunk_tokens or max(1, CHUNK_ELEMENTS // vocab)


def _logits_of(x: Logits, rows: torch.Tensor) -> torch.Tensor:
    """fp32 logits of some rows of `x` (rows of its `_rows`)."""
    return x.logits(rows) if isinstance(x, HeadInput) else rows.float()


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row of (rows, vocab) logits, in fp32 via log_softmax (stable for
    any logit scale; exactly 0 where the rows are equal)."""
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)


def _kl_chunk(z: torch.Tensor, z_t: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of `_head_kl`, written plainly for torch.compile to fuse (`compiled_kd`): from the
    student's logits z and the teacher's z_t (rows, vocab), in any dtype, and row weights w, the
    weighted KL sum (fp32) and its gradient for z, in z's dtype."""
    log_s = F.log_softmax(z.float(), dim=-1)
    log_t = F.log_softmax(z_t.float(), dim=-1)
    p_t = log_t.exp()
    total = ((p_t * (log_t - log_s)).sum(-1) * w).sum()
    return total, ((log_s.exp() - p_t) * w[:, None]).to(z.dtype)


def _kl_chunk_value(z: torch.Tensor, z_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`_kl_chunk`'s weighted KL sum alone, where no gradient is wanted (the router's score-function baseline:
    a forward without gradient on the same batch)."""
    log_s = F.log_softmax(z.float(), dim=-1)
    log_t = F.log_softmax(z_t.float(), dim=-1)
    return ((log_t.exp() * (log_t - log_s)).sum(-1) * w).sum()


# `_kl_chunk` and `_kl_chunk_value` compiled, while `compiled_kd` is on
_FUSED_CHUNK = None
_FUSED_VALUE = None


def _fused(grads: bool):
    """The compiled chunk `compiled_kd` has on for a KD with gradients (`grads`) or without; None: eager."""
    return _FUSED_CHUNK if grads else _FUSED_VALUE


@functools.lru_cache(maxsize=None)
def _compiled_chunk(backend: str, fn=_kl_chunk):
    return torch.compile(fn, backend=backend, dynamic=False)


@contextmanager
def compiled_kd(backend: str | None):
    """Within the block, the fused distillation loss (a student `HeadInput`) runs each chunk's softmaxes,
    KL and gradient (or, without gradients, the KL alone) as one torch.compile'd function (`backend`, e.g.
    "inductor"), which fuses the casts and elementwise passes over the (chunk, vocab) logits that the eager code
    makes one kernel at a time (on an H200 at Nano width: 512 MiB passes, about 28 ms of a
    254 ms training step, docs/RESULTS.md §12). None: eager. The trainer turns it on with
    `TrainConfig.compile`."""
    global _FUSED_CHUNK, _FUSED_VALUE
    outer = _FUSED_CHUNK, _FUSED_VALUE
    _FUSED_CHUNK, _FUSED_VALUE = ((_compiled_chunk(backend), _compiled_chunk(backend, _kl_chunk_value)) if backend
                                  else (None, None))
    try:
        yield
    finally:
        _FUSED_CHUNK, _FUSED_VALUE = outer


@functools.lru_cache(maxsize=None)
def _accumulating_gemm(device: torch.device, dtype: torch.dtype, beta: int = 1) -> bool:
    """Whether `torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)` adds a product of `dtype`
    matrices into an fp32 `acc` in one GEMM on `device` (CUDA builds of recent torch; no CPU kernel), or with
    beta 0 writes the product alone without reading acc: tried once on a small case against the
    product-then-add, so that a torch without it, or one that gets it wrong, takes the plain path."""
    if dtype == torch.float32:
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(n, 64, device=device, dtype=dtype, generator=g) for n in (48, 40))
        acc = torch.randn(48, 40, device=device, dtype=torch.float32, generator=g)
        if beta == 0:
            acc.fill_(float("nan"))  # never read
        want = (a @ b.t()).float() + (acc if beta else 0)
        torch.addmm(acc, a, b.t(), beta=beta, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, want, rtol=1e-2, atol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False):
    """acc += a @ b for an fp32 `acc` and `a`, `b` in the compute dtype (`first`: acc = a @ b, acc's values
    not read, so it may be uninitialised): one GEMM accumulating in fp32 where the device has it
    (`_accumulating_gemm`), else the product in the compute dtype, then the add. At Nano's head
    (131,072 x 2,688) the separate add read and wrote 1.4 GB of fp32 a chunk, about 10 ms of a 254 ms
    training step on an H200 (docs/RESULTS.md §12, the step's profile)."""
    if a.dtype != acc.dtype and _accumulating_gemm(acc.device, a.dtype):
        if first and not _accumulating_gemm(acc.device, a.dtype, 0):  # no beta-0 GEMM: into zeros
            acc.zero_()
            first = False
        torch.addmm(acc, a, b, beta=0 if first else 1, out_dtype=acc.dtype, out=acc)  # beta 0: acc not read
    elif first:
        acc.copy_(a @ b)
    else:
        acc.add_(a @ b)


def _head_kl(hidden, weight, cd, teacher: Logits, t_rows, row_w, chunk: int, need_h: bool, need_w: bool):
    """sum_r row_w[r] * KL(teacher_r || student_r) over the rows of `hidden` (tokens, D), the
    student's logits `hidden @ weight.T` made in `cd` a chunk at a time; with the gradients of that
    sum for hidden / weight (computed in the same pass: d KL_r / d logits_r = p_student - p_teacher).
    Each chunk holds a few (chunk, vocab) fp32 tensors; nothing of the whole batch's logits exists.
    Under `compiled_kd`, a chunk's softmax math is one compiled function (same result, fewer passes); without
    gradients too (the router's baseline forward: its eager passes were ~15 ms a step of the compiled step's
    profile at Nano width, averaged over a full and a 0.5 step, H100, docs/RESULTS.md §12)."""
    grads = need_h or need_w
    fused = _fused(grads)
    with torch.autocast(hidden.device.type, enabled=False):
        W = weight.to(cd)
        gh = torch.empty_like(hidden) if need_h else None
        # the first chunk's product is written into gw, not added (`_add_product`'s first): no zero fill
        gw = (torch.empty if hidden.shape[0] else torch.zeros)(weight.shape, dtype=torch.float32,
                                                                 device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].to(cd)
            w = row_w[i:i + chunk]
            if fused is not None:
                rows = t_rows[i:i + chunk]  # the teacher's logits in its matmul dtype: the upcast is fused
                z_t = teacher.logits(rows, fp32=False) if isinstance(teacher, HeadInput) else rows
                if not grads:
                    total += fused(F.linear(h, W), z_t, w)
                    continue
                part, g = fused(F.linear(h, W), z_t, w)
                total += part
            else:
                log_s = F.log_softmax(F.linear(h, W).float(), dim=-1)
                log_t = F.log_softmax(_logits_of(teacher, t_rows[i:i + chunk]), dim=-1)
                p_t = log_t.exp()
                total += (log_t.sub_(log_s).mul_(p_t).sum(-1) * w).sum()  # kl_div's exp(t) * (t - s)
                del log_t
                if not grads:
                    continue
                g = log_s.exp_().sub_(p_t).mul_(w[:, None]).to(cd)  # d total / d logits of these rows
                del log_s, p_t
            if need_h:
                gh[i:i + chunk] = g @ W
            if need_w:
                _add_product(gw, g.t(), h, first=i == 0)
    return total, gh, gw


class _HeadKD(torch.autograd.Function):
    """`_head_kl` as an autograd function: the gradients are made in the forward pass, chunk by
    chunk, and the backward only scales them (the loss is a scalar; no logits are kept)."""

    @staticmethod
    def forward(ctx, hidden, weight, row_w, teacher, t_rows, cd, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, gh, gw = _head_kl(hidden, weight, cd, teacher, t_rows, row_w, chunk, need_h, need_w)
        ctx.save_for_backward(gh, gw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        gh, gw = ctx.saved_tensors
        return (None if gh is None else gh * grad.to(gh.dtype),
                None if gw is None else (gw * grad).to(ctx.weight_dtype), None, None, None, None, None)


def kd_loss(student_logits: Logits, teacher_logits: Logits, token_mask: torch.Tensor | None = None,
            chunk_tokens: int | None = None) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) at temperature 1, the mean over tokens.

    Each side is logits (..., vocab), in any dtype, or a `HeadInput` (the LM head's input and
    weight: `head_input(model, x)`); the teacher's is not differentiated. `token_mask` (...,)
    bool/0-1: tokens that count (e.g. not padding). The KL is computed `chunk_tokens` tokens at a
    time (default: about `CHUNK_ELEMENTS` logits a chunk, `FUSED_CHUNK_ELEMENTS` for a student `HeadInput`
    under `compiled_kd`), so the fp32 softmaxes of a large
    vocabulary never exist for the whole batch: logits chunks are recomputed in the backward
    (activation checkpointing); a student `HeadInput` is fused, its logits made chunk by chunk
    and its gradients in the same pass, so that no (tokens, vocab) tensor of the batch exists."""
    V = _vocab(student_logits)
    if _vocab(teacher_logits) != V:
        raise ValueError(f"student vocabulary {V} != teacher vocabulary {_vocab(teacher_logits)}")
    teacher = teacher_logits.detach()
    s, t = _rows(student_logits), _rows(teacher)
    n = s.shape[0]
    chunk = _chunk_size(chunk_tokens, V)
    w = None if token_mask is None else token_mask.reshape(-1).to(device=s.device, dtype=torch.float32)
    if isinstance(student_logits, HeadInput):  # fused: a weighted sum with the weights normalised
        row_w = torch.full((n,), 1.0 / n, device=s.device) if w is None else w / w.sum().clamp(min=1)
        W, cd = student_logits.weight, student_logits.compute_dtype
        grads = torch.is_grad_enabled() and (s.requires_grad or W.requires_grad)
        if chunk_tokens is None and _fused(grads) is not None:
            chunk = max(1, FUSED_CHUNK_ELEMENTS // V)
        if grads:
            return _HeadKD.apply(s, W, row_w, teacher, t, cd, chunk)
        return _head_kl(s, W, cd, teacher, t, row_w, chunk, False, False)[0]

    def kl(a, b):
        return _kl_rows(a, _logits_of(teacher, b))

    if chunk >= n:
        kl_rows = kl(s, t)
    else:  # split (not slices): the backward gathers the chunks' gradients into one tensor, once
        grad = torch.is_grad_enabled() and s.requires_grad
        kl_rows = torch.cat([checkpoint(kl, a, b, use_reentrant=False) if grad else kl(a, b)
                             for a, b in zip(s.split(chunk), t.split(chunk))])
    if w is None:
        return kl_rows.mean()
    return (kl_rows * w).sum() / w.sum().clamp(min=1)


def next_token_ce(logits: Logits, input_ids: torch.Tensor, ignore_index: int = -100,
                  chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting input_ids[:, 1:] from logits[:, :-1] (as evaluate.perplexity).
    `logits` may be a `HeadInput`: then the head is applied `chunk_tokens` tokens at a time
    (default: about `CHUNK_ELEMENTS` logits a chunk), each chunk recomputed in the backward."""
    targets = input_ids[:, 1:].reshape(-1)
    if not isinstance(logits, HeadInput):
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets, ignore_index=ignore_index)
    h = logits.hidden[:, :-1].reshape(-1, logits.hidden.shape[-1])
    chunk = _chunk_size(chunk_tokens, logits.vocab_size)

    def ce(rows, weight, tgt):
        return F.cross_entropy(HeadInput(rows, weight, logits.dtype).logits(), tgt, ignore_index=ignore_index,
                               reduction="sum")

    grad = torch.is_grad_enabled() and (h.requires_grad or logits.weight.requires_grad)
    total = sum(checkpoint(ce, a, logits.weight, b, use_reentrant=False) if grad else ce(a, logits.weight, b)
                for a, b in zip(h.split(chunk), targets.split(chunk)))
    return total / (targets != ignore_index).sum()


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
    if torch.is_tensor(drawn) and drawn.device.type != "cpu":
        drawn = drawn.detach().to(device=expected.device, dtype=expected.dtype)
    else:  # a host value joins as a scalar operand: no copy to the device (on a GPU a copy from the host syncs)
        drawn = float(drawn)
    return expected - expected.detach() + drawn  # the value is drawn's exactly (e - e = 0), the gradient e's


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


def task_loss(student_logits: Logits, teacher_logits: Logits | None, input_ids: torch.Tensor | None = None,
              weights: LossWeights | None = None, token_mask: torch.Tensor | None = None,
              chunk_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """The model's loss of one step: `total` = kd * KD + ce * CE (terms of weight 0 skipped). The
    router's terms (budget, anchor, entropy floor, quality) are the trainer's (`ElasticTrainer._router_loss`).
    Logits may be `HeadInput`s (chunked, see `kd_loss`)."""
    w = weights or LossWeights()
    out = {}
    total = _rows(student_logits).new_zeros((), dtype=torch.float32)
    if w.kd:
        out["kd"] = kd_loss(student_logits, teacher_logits, token_mask, chunk_tokens)
        total = total + w.kd * out["kd"]
    if w.ce:
        if input_ids is None:
            raise ValueError("the CE term needs input_ids")
        out["ce"] = next_token_ce(student_logits, input_ids, chunk_tokens=chunk_tokens)
        total = total + w.ce * out["ce"]
    out["total"] = total
    return out
