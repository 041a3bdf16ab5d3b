"""The trainer's fused distillation (issue 16): train.py hands the losses `head_input`s (final hidden
states + LM head weight) instead of logits, so no (tokens, vocab) tensor of a training batch exists.
It must train exactly as the logits path did: the same losses, weights, router and frozen-architecture
selection, to fp32 rounding."""

import pytest
import torch

from star_elastic import train
from star_elastic.elastic.losses import HeadInput, LossWeights, head_input
from star_elastic.errors import StarElasticError

from test_train import CFG, trainer

RTOL = 1e-5
CASES = {
    # every path of a step: all budgets with their router baselines, CE beside KD, two micro-batches,
    # the stage-2 rows, and the freeze with its selection by measured KD (at step 8)
    "router": dict(steps=12, grad_accum=2, loss=LossWeights(ce=0.5), router_freeze_fraction=0.3, freeze_select=4,
                   freeze_select_batches=2),
    "anchor": dict(steps=8, full_anchor=1.0, budget_order="random"),  # the sandwich rule's full-model forward (the
    #                                                                   random order draws a non-argmax in 8 steps)
}


def _run(tmp_path, monkeypatch, name, fused: bool, **kw):
    """Train a tiny trainer; `fused=False` is the reference: train.py's `head_input` replaced by the
    model's plain forward, the whole logits, which every loss takes too (the old path)."""
    made, head_widths = [], []

    def spy(model, x, **kwargs):
        out = head_input(model, x, **kwargs) if fused else model(x, **kwargs)
        made.append(out)
        return out

    monkeypatch.setattr(train, "head_input", spy)
    t = trainer(tmp_path, name, **kw)
    with torch.no_grad():  # a student away from its teacher: KD > 0, and candidates that differ
        g = torch.Generator().manual_seed(7)
        for p in t.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for m in (t.model, t.teacher):  # the last dim of whatever the LM head module puts out
        m.lm_head.register_forward_hook(lambda mod, args, out: head_widths.append(out.shape[-1]))
    logs = t.run(progress=False)
    return t, logs, made, head_widths


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_training_equals_the_logits_path(tmp_path, monkeypatch, case):
    """The same run on head inputs and on logits: every logged loss, the final weights and router,
    and the frozen architectures agree to fp32 rounding."""
    kw = CASES[case]
    t, logs, made, widths = _run(tmp_path, monkeypatch, "fused", True, **kw)
    r, ref_logs, ref_made, ref_widths = _run(tmp_path, monkeypatch, "logits", False, **kw)
    # the new path ran: every forward of student and teacher stopped at the head, none made logits
    assert made and all(isinstance(h, HeadInput) for h in made)
    assert widths and set(widths) == {CFG.hidden_size} and set(ref_widths) == {CFG.vocab_size}
    assert len(made) == len(ref_made)  # the same forwards
    assert [l["budget"] for l in logs] == [l["budget"] for l in ref_logs]
    assert len({l["budget"] for l in logs}) >= 2
    keys = {k for l in ref_logs for k, v in l.items() if isinstance(v, float)} - {"tokens_per_s"}
    assert {"kd", "total", "grad_norm"} <= keys
    assert ("ce" in keys) == (case == "router") and ("full_kd" in keys) == (case == "anchor")
    assert "kd_argmax" in keys  # the score-function baseline ran
    for got, want in zip(logs, ref_logs):
        assert got.keys() == want.keys()
        for k in keys & want.keys():  # abs: the advantage, a relative difference of two close KDs
            assert got[k] == pytest.approx(want[k], rel=RTOL, abs=1e-6), (got["step"], k)
    assert min(l["kd"] for l in ref_logs) > 1e-3  # KD that is not trivially 0
    for k, v in r.model.state_dict().items():
        assert _rel(t.model.state_dict()[k], v) < RTOL, k
    assert any(_rel(v, r.teacher.state_dict()[k]) > 1e-3 for k, v in r.model.state_dict().items())  # it trained
    for k, v in r.router.state_dict().items():
        assert _rel(t.router.state_dict()[k], v) < RTOL, k
    if case == "router":  # the freeze chose the same architectures, from the same KD measurements
        assert len(t.selection) == len(r.selection) == 2
        for got, want in zip(t.selection, r.selection):  # "kd": recorded to 5 decimals
            assert got["chosen"] == want["chosen"] and got["kd"] == pytest.approx(want["kd"], abs=1.5e-5)
        assert t._frozen_specs() == r._frozen_specs()


def test_selection_ranks_candidates_as_the_logits_path(tmp_path, monkeypatch):
    """`select_architectures` on the same weights and router: each KD it measures (a candidate on a
    batch) equals the logits path's, and it ranks the candidates and chooses the same (there are
    several, with distinct scores)."""
    sel = {}
    for fused in (True, False):
        t, _, made, _ = _run(tmp_path, monkeypatch, f"sel{fused}", fused, steps=4, freeze_select=6,
                             freeze_select_batches=2)
        made.clear()
        measured, kd = [], train.kd_loss

        def recorded(*args, **kwargs):  # every KD the selection measures, unrounded
            out = kd(*args, **kwargs)
            measured.append(float(out))
            return out

        monkeypatch.setattr(train, "kd_loss", recorded)
        chosen = t.select_architectures()
        monkeypatch.setattr(train, "kd_loss", kd)
        assert made and all(isinstance(h, HeadInput) == fused for h in made)
        sel[fused] = t.selection, [p.choice for p in chosen], measured
    (fused, fused_choice, fused_kd), (ref, ref_choice, ref_kd) = sel[True], sel[False]
    assert fused_choice == ref_choice and [s["chosen"] for s in fused] == [s["chosen"] for s in ref]
    assert len(ref_kd) > 6 and fused_kd == pytest.approx(ref_kd, rel=RTOL)
    fused_scores, ref_scores = _scores(fused_kd, fused), _scores(ref_kd, ref)
    assert any(len(s) > 2 for s in ref_scores)
    for got, want in zip(fused_scores, ref_scores):
        assert sorted(range(len(got)), key=got.__getitem__) == sorted(range(len(want)), key=want.__getitem__)
        best = sorted(want)
        assert len(best) == 1 or best[1] - best[0] > 10 * RTOL * best[0]  # ranked by more than rounding


def _scores(measured: list[float], selection: list[dict], batches: int = 2) -> list[list[float]]:
    """Per budget, each candidate's score: the sum of its KD over the selection's batches (measured
    in that order), unrounded."""
    it = iter(measured)
    return [[sum(next(it) for _ in range(batches)) for _ in s["kd"]] for s in selection]


def test_sharded_roots_keep_their_head_whole(monkeypatch):
    """Under FSDP2 the trainer keeps each sharded root (embeddings, final norm, LM head) unsharded after
    its forward, as head_input needs; a torch without the setting is refused with a clear error."""

    class Root:
        def __init__(self):
            self.calls = []

        def set_reshard_after_forward(self, *args, **kwargs):
            self.calls.append((args, kwargs))

    monkeypatch.setattr(train.parallel, "is_sharded", lambda m: True)
    root = Root()
    train._keep_root_unsharded(root)
    assert root.calls == [((False,), {"recurse": False})]
    with pytest.raises(StarElasticError, match="set_reshard_after_forward"):
        train._keep_root_unsharded(object())
    monkeypatch.setattr(train.parallel, "is_sharded", lambda m: False)
    root = Root()
    train._keep_root_unsharded(root)  # not sharded: left alone
    assert root.calls == []
