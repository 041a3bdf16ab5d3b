"""The full budget's own low-rank delta (TrainConfig.full_delta_rank, elastic/delta.py).

On a GPU the full anchor's pull on the shared weights was the 0.75 budget's whole gap to distilling it
alone (docs/RESULTS.md §9): with a delta of its own the anchor trains the delta and nothing the smaller
budgets use."""

import copy
import dataclasses

import pytest
import torch

from star_elastic.elastic.delta import FullDelta
from star_elastic.elastic.losses import kd_loss
from star_elastic.errors import StarElasticError
from star_elastic.model import Model
from star_elastic.train import ElasticTrainer

from test_train import CFG, make

# stage 2 from the start, never drawing the full budget: with the anchor or without, the same draws
SMALLER_ONLY = dict(stage1_fraction=0.0, stage2_weights=[0.0, 1.0, 1.0], clip=1e9, steps=5)


def _trainer(tmp_path, name, **kw):
    model, teacher, router, budgets, rows, cfg, _ = make(**{**SMALLER_ONLY, **kw})
    for p in model.parameters():  # a student away from its teacher, so that the anchor has work to do
        p.data.add_(torch.randn_like(p) * 0.02)
    return ElasticTrainer(model, teacher, router, budgets, rows, cfg, tmp_path / name)


def test_the_anchor_trains_the_delta_and_leaves_the_shared_weights_to_the_smaller_budgets(tmp_path):
    """Even where the gradient is clipped: the delta's is clipped on its own (clipped as one norm with the
    model's, the anchor scaled the smaller budgets' step whenever the clip bound)."""
    alone = _trainer(tmp_path, "alone", full_anchor=0.0, clip=0.02)  # the smaller budgets only
    assert all(lg["grad_norm"] > 0.02 for lg in alone.run(progress=False))  # the clip binds on every step
    delta = _trainer(tmp_path, "delta", full_anchor=1.0, full_delta_rank=4, clip=0.02)
    logs = delta.run(progress=False)
    assert all("full_kd" in lg and lg["delta_grad_norm"] > 0 for lg in logs)  # the anchor ran on every step
    # the model and the router trained exactly as without the anchor: its gradient reached neither
    for a, b in zip(alone.model.parameters(), delta.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(alone.router.parameters(), delta.router.parameters()):
        assert torch.equal(a, b)
    assert max(float(p.detach().abs().max()) for p in delta.delta.up.values()) > 0  # and the delta learnt
    # without a delta the anchor pulls on the shared weights (what the delta is there to stop)
    plain = _trainer(tmp_path, "plain", full_anchor=1.0, clip=0.02)
    plain.run(progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(alone.model.parameters(), plain.model.parameters()))


def test_the_delta_starts_at_the_parent_and_merges_into_a_plain_full_model(tmp_path):
    t = _trainer(tmp_path, "t", full_anchor=1.0, full_delta_rank=3)
    x = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        before = t.model(x)
        with t.delta.applied(t.model):
            assert torch.equal(t.model(x), before)  # B starts at zero: the parent exactly
    t.run(progress=False)
    with torch.no_grad():
        with t.delta.applied(t.model):
            full = t.model(x)
        merged = t.delta.merge_into(copy.deepcopy(t.model))(x)
        assert not torch.allclose(full, t.model(x), atol=1e-4)  # the delta changed the full model
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)
    # the context put the model's own parameters back: they train again
    assert all(p.requires_grad and p.grad_fn is None for p in t.model.parameters())
    with torch.no_grad():
        assert torch.equal(t.model(x), t.model(x))


def test_a_run_with_a_delta_resumes_exactly_and_only_into_a_run_with_one(tmp_path):
    straight = _trainer(tmp_path, "straight", full_anchor=1.0, full_delta_rank=2)
    want = straight.run(progress=False)
    first = _trainer(tmp_path, "resumed", full_anchor=1.0, full_delta_rank=2)
    first.run(progress=False, stop_after=2)
    second = _trainer(tmp_path, "resumed", full_anchor=1.0, full_delta_rank=2)
    assert second.load_state() and second.step == 2
    rest = second.run(progress=False)
    assert [lg["total"] for lg in rest] == pytest.approx([lg["total"] for lg in want[2:]], rel=1e-6, abs=1e-7)
    for key in straight.delta.up:
        torch.testing.assert_close(second.delta.up[key], straight.delta.up[key], rtol=1e-6, atol=1e-7)
    with pytest.raises(StarElasticError, match="full delta"):
        _trainer(tmp_path, "resumed", full_anchor=1.0).load_state()


@pytest.mark.parametrize("kept", [False, True])
def test_compiled_layers_train_the_delta_as_eager_ones(tmp_path, kept):
    """The delta is a class swap of each linear layer and experts module, as masks are (torch.compile guards
    on classes, not on hooks): compiled layers (dynamo's aot_eager on the CPU) run it and train what eager ones
    do; so do the full budget's own values of every held part (kept: embeddings, norms, Mamba's own and the
    gates, read through class properties)."""
    from torch._dynamo.utils import counters

    kw = dict(full_anchor=1.0, full_delta_rank=2)
    if kept:
        kw.update(hold=["embeddings", "norms", "mamba", "gates"], hold_rate=1.0, full_keeps_held=True)
    torch._dynamo.reset()
    counters.clear()
    try:
        eager = _trainer(tmp_path, "eager", **kw)
        compiled = _trainer(tmp_path, "compiled", compile="aot_eager", **kw)
        want, got = eager.run(progress=False), compiled.run(progress=False)
        assert counters["stats"]["unique_graphs"] > 0
    finally:
        torch._dynamo.reset()
    assert [lg["full_kd"] for lg in got] == pytest.approx([lg["full_kd"] for lg in want], rel=1e-4, abs=1e-6)
    assert max(float(p.detach().abs().max()) for p in compiled.delta.up.values()) > 0
    for key in eager.delta.up:
        torch.testing.assert_close(compiled.delta.up[key], eager.delta.up[key], rtol=1e-4, atol=1e-5)


def test_a_delta_is_refused_where_it_cannot_serve(tmp_path):
    with pytest.raises(StarElasticError, match="full_delta_rank 2: the full anchor trains it: it needs full_anchor > 0"):
        _trainer(tmp_path, "a", full_anchor=0.0, full_delta_rank=2)
    with pytest.raises(StarElasticError, match="full_delta_rank -1: give a positive rank"):
        _trainer(tmp_path, "a", full_anchor=1.0, full_delta_rank=-1)
    with pytest.raises(ValueError, match="positive rank"):
        FullDelta(Model(CFG), 0)


# --keep-full's parts on the CPU's scale: the delta restored from the drift where training ends, then a finish of its
# own, the embeddings and norms held at half the rate (a group of the optimiser's of their own)
KEPT = dict(full_anchor=1.0, full_delta_rank=2, full_delta_restore="activations", full_delta_finish=3,
            hold=["embeddings", "norms"], hold_rate=0.5, full_keeps_held=True)


def test_per_budget_moments_run_beside_the_delta_and_the_held_parts(tmp_path):
    """`budget_lrs` with --keep-full's delta and hold (refused before the fiftieth session): with one smaller budget
    training, its own moments are the one AdamW's, so the model, the held parts and the delta end as without
    budget_lrs; with two, each budget's gradient moves the held parts through moments of its own, while the delta
    (the anchor alone trains it) keeps one set."""
    one = dict(KEPT, stage2_weights=[0.0, 1.0, 0.0])
    shared, own = _trainer(tmp_path, "shared", **one), _trainer(tmp_path, "own", **one, budget_lrs=[3e-3] * 3)
    shared.run(progress=False)
    own.run(progress=False)
    assert own.restored is not None and own.step == shared.step == 5 + 3  # restored, then the finish ran
    for (name, a), b in zip(shared.model.named_parameters(), own.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for key in shared.delta.up:
        # restored by an SVD of the drift, then trained: rounding of ~1e-6 in single elements
        torch.testing.assert_close(own.delta.up[key], shared.delta.up[key], rtol=1e-4, atol=1e-5)
    moved = _trainer(tmp_path, "moved", **one)  # and the run moved them: the check above can fail
    assert any(not torch.equal(a, b) for a, b in zip(moved.model.parameters(), own.model.parameters()))

    two = _trainer(tmp_path, "two", **KEPT, budget_lrs=[3e-3, 3e-3, 6e-3])
    two.run(progress=False)
    state = two.opt.state[two.model.embed.weight]
    assert state["exp_avg_b1"].abs().max() > 0 and state["exp_avg_b2"].abs().max() > 0  # a held part, per budget
    assert not torch.equal(state["exp_avg_b1"], state["exp_avg_b2"])
    for p in two.delta.parameters():
        assert set(two.opt.state[p]) <= {"step_shared", "exp_avg_shared", "exp_avg_sq_shared"}, set(two.opt.state[p])
    assert any(two.opt.state[p] for p in two.delta.parameters())  # the finish trained it


def test_per_budget_moments_beside_a_delta_trained_every_step(tmp_path):
    """Without the restore the anchor trains the delta on every step: the smaller budgets' weights train as with one
    AdamW's moments each (the anchor's gradient reaches only the delta), the delta learns, and no gradient norm is
    logged for the full budget, whose weights it never touches."""
    kw = dict(full_anchor=1.0, full_delta_rank=2, budget_lrs=[3e-3] * 3)
    one = _trainer(tmp_path, "one", **kw, stage2_weights=[0.0, 1.0, 0.0])
    logs = one.run(progress=False)
    assert all("grad_norm@1.0" not in lg and lg["delta_grad_norm"] > 0 for lg in logs)
    assert max(float(p.detach().abs().max()) for p in one.delta.up.values()) > 0
    shared = _trainer(tmp_path, "shared", full_anchor=1.0, full_delta_rank=2, stage2_weights=[0.0, 1.0, 0.0])
    shared.run(progress=False)
    start = _trainer(tmp_path, "start", **kw, stage2_weights=[0.0, 1.0, 0.0]).model  # and the run moved them
    assert max((a - b).abs().max().item() for a, b in zip(start.parameters(), one.model.parameters())) > 1e-3
    for a, b in zip(shared.model.parameters(), one.model.parameters()):
        # fp32 rounding carried through the steps: up to 1.4e-6 in single elements on some CPUs (sixty-first session)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert set(one.opt.state[next(iter(one.delta.parameters()))]) == {"step_shared", "exp_avg_shared", "exp_avg_sq_shared"}


def test_the_bench_trains_and_scores_the_full_budget_with_its_delta(tmp_path):
    """bench_elastic.py --full-delta-rank (--full-delta-allocate, --full-delta-bits): the anchored run records its
    rank and scores the full budget
    merged with its delta, and records the shared weights' own full model beside it."""
    import json
    import subprocess

    from test_bench_resume import BENCH

    out = tmp_path / "b.json"
    argv = [a if a != "elastic" else "elastic_anchor" for a in BENCH]
    r = subprocess.run(argv + ["--full-anchor", "1", "--full-delta-rank", "2", "--full-delta-lr", "3e-3",
                               "--full-delta-finish", "3", "--full-delta-restore", "activations",
                               "--full-delta-allocate", "--full-delta-bits", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    part = json.loads(out.read_text())["B"]
    assert part["methods"]["elastic_anchor"]["full_delta_rank"] == 2
    assert part["methods"]["elastic_anchor"]["full_delta_lr"] == 3e-3
    assert part["methods"]["elastic_anchor"]["full_delta_finish"] == 3  # and ran: three steps of it in the log
    assert 0 < part["methods"]["elastic_anchor"]["full_delta_restored"] <= 1  # restored before the finish
    # at the ranks its restore gave out (--full-delta-allocate), the rest rounded to 4 bits (--full-delta-bits):
    # it covered more than its report says those ranks alone would
    assert part["methods"]["elastic_anchor"]["full_delta_allocate"] is True
    assert part["methods"]["elastic_anchor"]["full_delta_bits"] == 4
    assert part["methods"]["elastic_anchor"]["full_delta_restored"] > \
        part["methods"]["elastic_anchor"]["full_delta_restore_report"]["allocated"]
    log = part["methods"]["elastic_anchor"]["log"]
    assert sum(lg.get("phase") == "full_delta_finish" for lg in log) == 3
    full_row = next(row for row in part["rows"] if row["method"] == "elastic_anchor" and row["budget"] == "1.0")
    assert full_row["final_kd"] == pytest.approx(log[-1]["full_kd"])  # the finish's last fifth: its last step
    kl = part["methods"]["elastic_anchor"]["full_kl_from_parent"]  # how far the full model moved, per source
    assert list(kl) == list(part["heldout"]) and all(v > 0 for v in kl.values())
    full = {row["method"]: row["perplexity"] for row in part["rows"] if row["budget"] == "1.0"}
    # scored merged: the shared weights alone (recorded beside it) are another model
    assert full["elastic_anchor"] != part["methods"]["elastic_anchor"]["full_without_delta"]


def test_the_bench_diagnostic_puts_back_the_parents_weights_outside_the_delta(tmp_path):
    """bench_elastic's `full_with_parents_rest`: the merged full model with the parent's embeddings, norms and
    every other weight the delta does not cover, its linear layers as trained."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_elastic import parents_rest, with_values

    t = _trainer(tmp_path, "t", full_anchor=1.0, full_delta_rank=2)
    t.run(progress=False)
    full = t.delta.merge_into(copy.deepcopy(t.model))
    mixed = with_values(full, parents_rest(t.teacher, t.delta))
    covered = {f"{n}.weight" for n in t.delta.names} | set(t.delta.experts)
    parent, merged = dict(t.teacher.named_parameters()), dict(full.named_parameters())
    assert covered and any(n not in covered for n in merged)
    for name, p in mixed.named_parameters():
        assert torch.equal(p, merged[name] if name in covered else parent[name].to(p.dtype)), name
    assert not all(torch.equal(merged[n], parent[n]) for n in merged if n not in covered)  # they had drifted


@pytest.mark.parametrize("held, delta", [(["embeddings", "norms"], 2), (["norms"], 2), (["embeddings"], 0),
                                         (["mamba", "gates"], 2)])
def test_frozen_embeddings_or_norms_stay_the_parents_and_the_rest_trains(tmp_path, held, delta):
    """TrainConfig.hold at rate 0: what it names keeps the parent's values in every budget, everything else
    trains. With the delta and both frozen the full model differs from its parent only where its delta is."""
    t = _trainer(tmp_path, "t", full_anchor=1.0, full_delta_rank=delta, hold=held)
    start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.run(progress=False)

    def frozen(n):  # by name: "norm" is in every norm's (layers.i.norm, mixer.norm, norm_f), the LM head untied here
        leaf = n.rpartition(".")[2]
        return ("norm" in n and "norms" in held) or (("embed" in n or n == "lm_head.weight") and "embeddings" in held) \
            or ((leaf in ("A_log", "D", "dt_bias") or ".conv1d." in n) and "mamba" in held) \
            or (".gate." in n and "gates" in held)

    names = [n for n, _ in t.model.named_parameters()]
    assert any("embed" in n for n in names) and any("norm" in n for n in names)
    for n, p in t.model.named_parameters():
        assert torch.equal(p, start[n]) == frozen(n), n  # frozen ones unchanged, every other one trained
    with pytest.raises(StarElasticError, match="'heads' is not one of embeddings, norms"):
        _trainer(tmp_path, "u", full_anchor=1.0, hold=["heads"])


def test_a_hold_at_a_rate_moves_what_it_names_that_much_slower(tmp_path):
    """TrainConfig.hold_rate: the named parts train at that fraction of the rate. Adam's first step is the
    rate times m / sqrt(v), the same for both runs from the same start: a tenth of the rate, a tenth of the
    step on the norms, and every other parameter the same step exactly."""
    plain = _trainer(tmp_path, "plain", full_anchor=1.0, steps=1)
    slow = _trainer(tmp_path, "slow", full_anchor=1.0, steps=1, hold=["norms"], hold_rate=0.1)
    start = {n: p.detach().clone() for n, p in slow.model.named_parameters()}
    plain.run(progress=False)
    slow.run(progress=False)
    ref = dict(plain.model.named_parameters())
    for n, p in slow.model.named_parameters():
        step, want = p.detach() - start[n], ref[n].detach() - start[n]
        if "norm" in n:
            assert want.abs().max() > 0, n
            torch.testing.assert_close(step, 0.1 * want, rtol=1e-3, atol=1e-9, msg=n)
        else:
            torch.testing.assert_close(step, want, rtol=0, atol=0, msg=n)
    # its group is saved and resumed with the rest: a stopped run goes on exactly
    _resumes_exactly(tmp_path, full_anchor=1.0, steps=4, hold=["norms"], hold_rate=0.1)
    for bad, message in (({"hold_rate": 1.5}, r"the rate 1.5 is not in \[0, 1\]"), ({"hold_rate": -0.1}, "is not in"),
                         ({"hold_pull": 5.0}, "a pull needs a rate > 0"), ({"hold_rate": 1.0, "hold_pull": -1.0}, "negative")):
        with pytest.raises(StarElasticError, match=message):
            _trainer(tmp_path, "u", full_anchor=1.0, hold=["norms"], **bad)
    with pytest.raises(StarElasticError, match="name them"):
        _trainer(tmp_path, "u", full_anchor=1.0, hold_rate=0.5)


def test_a_pull_takes_the_held_parts_back_toward_the_parent_each_step(tmp_path):
    """TrainConfig.hold_pull (L2-SP, decoupled): after Adam's step the held parts move back toward the parent's
    values by pull x the rate, so one step from the parent is (1 - pull x rate) of the plain step on them, the
    same step exactly elsewhere; a resumed run pulls toward the parent, not toward where it resumed."""
    plain = _trainer(tmp_path, "plain", full_anchor=1.0, steps=1)
    pulled = _trainer(tmp_path, "pulled", full_anchor=1.0, steps=1, hold=["embeddings"], hold_rate=1.0, hold_pull=50.0)
    start = {n: p.detach().clone() for n, p in pulled.model.named_parameters()}
    plain.run(progress=False)
    logs = pulled.run(progress=False)
    keep = 1 - logs[0]["lr"] * 50.0
    assert 0 < keep < 0.99
    ref = dict(plain.model.named_parameters())
    for n, p in pulled.model.named_parameters():
        step, want = p.detach() - start[n], ref[n].detach() - start[n]
        if "embed" in n or n == "lm_head.weight":
            assert want.abs().max() > 0, n
            torch.testing.assert_close(step, keep * want, rtol=1e-4, atol=1e-8, msg=n)
        else:
            torch.testing.assert_close(step, want, rtol=0, atol=0, msg=n)
    _resumes_exactly(tmp_path, full_anchor=1.0, steps=4, hold=["norms"], hold_rate=1.0, hold_pull=20.0)


def test_kept_from_the_first_step_the_anchor_runs_the_parents_held_values(tmp_path):
    """TrainConfig.full_keeps_held: every anchor pass runs the parent's embeddings and norms (FullDelta.keep
    before the first step), so the delta learns beside the values it is exported with. The held parts still
    train, and are pulled, for the smaller budgets alone: those train exactly as when the parent's values are
    put back only after training (elastify --full-keeps-held after), and the delta learns something else."""
    kw = dict(full_anchor=1.0, full_delta_rank=4, hold=["embeddings", "norms"], hold_rate=1.0, hold_pull=5.0,
              clip=0.02)  # the clip binding: the delta's own (a shared norm would tie the two modes' steps)
    kept, after = _trainer(tmp_path, "kept", full_keeps_held=True, **kw), _trainer(tmp_path, "after", **kw)
    parent = {n: p.detach().clone() for n, p in kept.model.named_parameters() if n in kept.delta.rest}
    assert parent and all(torch.equal(kept.delta.rest[n], parent[n]) for n in parent) and not after.delta.rest
    logs_kept, logs_after = kept.run(progress=False), after.run(progress=False)
    for (n, a), b in zip(kept.model.named_parameters(), after.model.parameters()):
        assert torch.equal(a, b), n  # the shared weights, held parts included: the anchor reaches neither
    assert any(not torch.equal(dict(kept.model.named_parameters())[n], v) for n, v in parent.items())  # they moved
    assert all(torch.equal(kept.delta.rest[n], v) for n, v in parent.items())  # the full budget's did not
    # the first anchor sees the same values either way; once the held parts have moved, the anchors differ
    assert logs_kept[0]["full_kd"] == pytest.approx(logs_after[0]["full_kd"], rel=1e-6)
    assert logs_kept[-1]["full_kd"] != pytest.approx(logs_after[-1]["full_kd"], rel=1e-4)
    assert any(not torch.allclose(kept.delta.up[k], after.delta.up[k]) for k in kept.delta.up)
    x = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        with kept._as_full():  # where the anchor runs: the delta and the parent's held values
            full = kept.model(x)
        plain = copy.deepcopy(kept.model)
        for n, v in parent.items():
            plain.get_parameter(n).copy_(v)
        for name in kept.delta.targets:  # the linear layers and the routed experts
            kept.delta.weight_of(plain, name).add_(kept.delta.delta(name))
        torch.testing.assert_close(full, plain(x), rtol=1e-5, atol=1e-5)
    _resumes_exactly(tmp_path, full_keeps_held=True, **{**kw, "steps": 4})
    for bad in ({"hold_rate": 0.0, "hold_pull": 0.0}, {"full_delta_rank": 0}):
        with pytest.raises(StarElasticError, match="full_keeps_held keeps the parent's values"):
            _trainer(tmp_path, "u", full_keeps_held=True, **{**kw, **bad})


def _resumes_exactly(tmp_path, stop_after: int = 2, **kw):
    """A run stopped after `stop_after` steps and resumed logs what one straight run logs (tmp_path's runs
    "straight", "resumed")."""
    want = _trainer(tmp_path, "straight", **kw).run(progress=False)
    _trainer(tmp_path, "resumed", **kw).run(progress=False, stop_after=stop_after)
    second = _trainer(tmp_path, "resumed", **kw)
    assert second.load_state() and second.step == stop_after
    rest = second.run(progress=False)
    assert [lg["total"] for lg in rest] == pytest.approx([lg["total"] for lg in want[stop_after:]], rel=1e-6, abs=1e-7)
    return second


def test_the_delta_moves_at_its_own_rate_and_the_shared_weights_do_not_notice(tmp_path):
    """TrainConfig.full_delta_lr: Adam's first step moves every entry of B (zero at the start) by the rate
    itself, so at ten times the rate B's largest entry is ten times as large; the smaller budgets' weights
    train exactly as before."""
    runs = {}
    for name, lr in (("same", 0.0), ("ten", 10.0)):
        t = _trainer(tmp_path, name, full_anchor=1.0, full_delta_rank=4, steps=1, lr=1e-3, full_delta_lr=lr * 1e-3)
        t.run(progress=False)
        runs[name] = t
    size = {k: max(float(p.detach().abs().max()) for p in t.delta.up.values()) for k, t in runs.items()}
    assert size["same"] > 0 and size["ten"] / size["same"] == pytest.approx(10, rel=1e-3)
    for a, b in zip(runs["same"].model.parameters(), runs["ten"].model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(StarElasticError, match="there is no delta"):
        _trainer(tmp_path, "c", full_anchor=1.0, full_delta_lr=1e-3)
    with pytest.raises(StarElasticError, match="a rate is positive"):
        _trainer(tmp_path, "d", full_anchor=1.0, full_delta_rank=2, full_delta_lr=-1.0)


def test_the_anchors_loss_reads_the_full_budgets_own_lm_head(tmp_path):
    """The anchor's KD takes the LM head's input and weight (head_input, so that no batch of logits exists);
    the full budget keeping the parent's embeddings (tied: the LM head) must be scored with its own head
    there, as its forward and its export are. It was not (twenty-third session): the loss read the shared head,
    which the smaller budgets train, so the delta learnt to make up for a head the full model does not run,
    and the faster the delta learnt, the further the exported full model moved from its parent."""
    from star_elastic.elastic.losses import head_input, kd_loss

    kw = dict(full_anchor=1.0, full_delta_rank=4, hold=["embeddings", "norms"], hold_rate=1.0, hold_pull=5.0)
    t = _trainer(tmp_path, "kept", full_keeps_held=True, **kw)
    t.run(progress=False)  # the shared head (with the embeddings when tied) moves away from the full budget's own
    own = [v for n, v in t.delta.rest.items() if t.model.get_parameter(n) is t.model.lm_head.weight]
    assert len(own) == 1 and not torch.equal(t.model.lm_head.weight, own[0])
    x = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad(), t._as_full():
        logits = t.model(x)
        h = head_input(t.model, x)
        teacher = t.teacher(x)
    torch.testing.assert_close(h.hidden.float() @ h.weight.float().T, logits.float(), rtol=1e-5, atol=1e-5)
    assert kd_loss(h, teacher) == pytest.approx(float(kd_loss(logits, teacher)), rel=1e-5)
    with torch.no_grad():  # outside the full budget: the shared head, as before
        h = head_input(t.model, x)
        torch.testing.assert_close(h.hidden.float() @ h.weight.float().T, t.model(x).float(), rtol=1e-5, atol=1e-5)


def test_the_deltas_finish_trains_the_delta_alone_and_brings_the_full_budget_closer(tmp_path):
    """TrainConfig.full_delta_finish: after the training's steps, steps that train the delta alone. The shared
    weights and the router end exactly as a run without the finish leaves them (so the smaller budgets lose
    nothing), the full budget's KD on a fixed batch falls, and a run stopped inside the finish resumes exactly."""
    kw = dict(full_anchor=1.0, full_delta_rank=4, lr=3e-3)
    plain = _trainer(tmp_path, "plain", **kw)
    plain.run(progress=False)
    done = _trainer(tmp_path, "done", full_delta_finish=12, **kw)
    logs = done.run(progress=False)
    assert done.step == done.end == 5 + 12 and len(logs) == 17
    finish = logs[5:]
    assert all(lg["phase"] == "full_delta_finish" and lg["budget"] == "1.0" and lg["delta_grad_norm"] > 0
               for lg in finish) and not any("phase" in lg for lg in logs[:5])
    assert finish[0]["lr"] == pytest.approx(3e-3) and finish[-1]["lr"] < finish[0]["lr"]  # its own cosine
    for a, b in zip(plain.model.parameters(), done.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain.router.parameters(), done.router.parameters()):
        assert torch.equal(a, b)
    x = torch.arange(64).repeat(2).view(4, 32)  # the pattern the training text repeats

    def full_kd(t):
        with torch.no_grad(), t._as_full():
            return float(kd_loss(t._head(t.model, x), t._head(t.teacher, x)))
    assert full_kd(done) < 0.9 * full_kd(plain)
    _trainer(tmp_path, "resumed", full_delta_finish=12, **kw).run(progress=False, stop_after=7)  # inside the finish
    second = _trainer(tmp_path, "resumed", full_delta_finish=12, **kw)
    assert second.load_state() and second.step == 7
    rest = second.run(progress=False)
    assert [lg["total"] for lg in rest] == pytest.approx([lg["total"] for lg in logs[7:]], rel=1e-6, abs=1e-7)
    with pytest.raises(StarElasticError, match="there is no delta"):
        _trainer(tmp_path, "e", full_anchor=1.0, full_delta_finish=3)


def test_each_steps_rate_is_over_its_own_time_across_saves_and_the_finish(tmp_path):
    """A step's tokens/s is over the time its own work took (StepClock), on a fake clock that each step moves
    by its cost: 1 s a training step, 3 s a finish step, 10 s a save. Read late (the loop reads a step after
    the next one is queued), the last training step got the first finish step's time, and a step read right
    after the one before (at a save) a time near zero: the GPU's metrics showed 5.6 million tokens/s."""
    t = _trainer(tmp_path, "clock", full_anchor=1.0, full_delta_rank=4, full_delta_finish=4, save_every=3)
    now = [0.0]
    t.now = lambda: now[0]
    step, save = t.train_step, t.save_state

    def timed_step(defer=False):
        now[0] += 3.0 if t.step >= t.cfg.steps else 1.0
        return step(defer)

    def timed_save(*a, **kw):
        out = save(*a, **kw)
        now[0] += 10.0
        return out
    t.train_step, t.save_state = timed_step, timed_save
    logs = t.run(progress=False)
    assert len(logs) == 9
    for lg in logs:
        tokens = t.cfg.batch_size * t.cfg.grad_accum * lg["seq_len"]
        cost = 3.0 if lg.get("phase") == "full_delta_finish" else 1.0
        assert lg["tokens_per_s"] == pytest.approx(tokens / cost), lg["step"]


def _gap_model(rank_of_gap: int | None, seed: int = 0):
    """A tiny model and a copy of it (the 'parent') whose linear weights, and each routed expert's, differ from
    it by a random gap of rank `rank_of_gap` per layer / expert (None: full rank)."""
    g = torch.Generator().manual_seed(seed)
    model = Model(CFG).eval()
    parent = copy.deepcopy(model)
    probe = FullDelta(model, 1)
    assert probe.experts  # CFG has a MoE layer: its experts are covered too
    with torch.no_grad():
        for name in probe.targets:
            w = probe.weight_of(parent, name)
            *stack, out_f, in_f = w.shape
            r = rank_of_gap or min(out_f, in_f)
            w.add_(0.05 * torch.randn(*stack, out_f, r, generator=g) @ torch.randn(*stack, r, in_f, generator=g)
                   / r ** 0.5)
    return model, parent


def test_a_restored_delta_is_the_best_rank_r_correction_of_the_shared_weights(tmp_path):
    """FullDelta.restore: where the parent differs from the shared weights by a rank-r gap, a rank-r delta
    restored from the weights makes the full budget the parent exactly (share 1), weighted by the inputs or
    not. Where the gap is full rank, the plain restore is the nearest rank-r correction in weights (the
    Eckart-Young error: the tail of the singular values), and the input-weighted one is nearer on the inputs it
    was calibrated on than the plain one is (its error there is the least of any rank-r correction)."""
    from star_elastic.elastic.delta import input_covariances

    model, parent = _gap_model(3)
    x = torch.randint(0, CFG.vocab_size, (4, 16))
    probe = FullDelta(model, 1)
    for covariances in (None, input_covariances(parent, probe.names, parent, [x], experts=probe.experts)):
        delta = FullDelta(model, 3)
        assert delta.restore(model, parent, covariances).share == pytest.approx(1.0, abs=1e-6)
        with torch.no_grad(), delta.applied(model):
            torch.testing.assert_close(model(x), parent(x), rtol=1e-4, atol=1e-4)

    model, parent = _gap_model(None, seed=1)
    probe = FullDelta(model, 1)
    calib = [torch.randint(0, CFG.vocab_size, (4, 16)) for _ in range(2)]
    covariances = input_covariances(parent, probe.names, parent, calib, experts=probe.experts)
    plain, weighted = FullDelta(model, 2), FullDelta(model, 2)
    share = plain.restore(model, parent, None).share
    assert 0 < share < 1 and weighted.restore(model, parent, covariances).share < 1
    for name in plain.targets:  # the experts expert by expert: the tail of each one's singular values
        gap = (plain.weight_of(parent, name) - plain.weight_of(model, name)).detach().double()
        s = torch.linalg.svdvals(gap)
        assert float(torch.linalg.norm(gap - plain.delta(name).detach().double())) == pytest.approx(
            float(s[..., 2:].norm()), rel=1e-4)
        if name in plain.experts:  # weighted by each expert's E[x^2] per input channel: nearer in that metric
            ms = covariances[name].double()

            def err(d):  # sum over experts of tr((G_e - D_e) diag(m_e) (G_e - D_e)^T)
                e = gap - d.detach().double()
                return float((e * e * ms[:, None, :]).sum())
            assert err(weighted.delta(name)) <= err(plain.delta(name)) * (1 + 1e-3)
            assert not torch.allclose(weighted.delta(name), plain.delta(name))
            continue
        cov = covariances[name].double()

        def err(d):  # the mean squared output error over the calibration inputs: tr((G - D) C (G - D)^T)
            e = gap - d.detach().double()
            return float(torch.trace(e @ cov @ e.T))
        assert err(weighted.delta(name)) <= err(plain.delta(name)) * (1 + 1e-3)


def test_the_restore_reports_what_other_ranks_and_its_parameters_given_out_by_layer_would_cover(monkeypatch):
    """Restored.report (restore_report): the share of the drift a restore at half, two and four times the rank
    would cover (the one at the rank is the restore's own), and what the same parameters cover given out layer by
    layer where the drift is: more than a uniform rank when one layer carries most of it. None where an SVD was
    not exact (its tail unknown)."""
    from star_elastic.elastic import delta as delta_module

    model, parent = _gap_model(None, seed=2)
    delta = FullDelta(model, 2)
    with torch.no_grad():  # one layer's gap ten times the others'
        w = delta.weight_of(parent, delta.names[0])
        w.add_(9 * (w - delta.weight_of(model, delta.names[0])))
    restored = delta.restore(model, parent)
    share, report = restored.share, restored.report
    assert set(report) == {"rank 1", "rank 2", "rank 4", "rank 8", "allocated"}
    assert report["rank 2"] == pytest.approx(share, rel=1e-9)
    assert report["rank 1"] < report["rank 2"] < report["rank 4"] < report["rank 8"] <= 1 + 1e-9
    assert FullDelta(model, 8).restore(model, parent).share == pytest.approx(report["rank 8"], rel=1e-9)
    assert report["allocated"] > report["rank 2"] + 0.05
    uniform = FullDelta(model, 2)
    # no drift at all: nothing to report on
    assert uniform.restore(model, copy.deepcopy(model)).report is None
    monkeypatch.setattr(delta_module, "EXACT_SVD_MAX", 2)  # every layer on the randomized SVD
    assert delta.restore(model, parent).report is None


def test_a_restore_that_gives_its_rank_out_by_layer_spends_no_more_and_covers_what_it_reported(monkeypatch):
    """FullDelta.restore(allocate=True): the rank's parameters given out where the drift is (allocate_ranks):
    the layer that carries most of it gets more than the rank, the others less (at least 1), no more parameters
    in all than the uniform rank's; it covers what the uniform restore's report said it would, more than the
    uniform one, and the full model is nearer its parent. Above the exact SVD's size: a
    randomized SVD's top values of each layer, no layer given more than it looked at."""
    from star_elastic.elastic import delta as delta_module

    model, parent = _gap_model(None, seed=2)
    heavy = FullDelta(model, 1).names[0]
    with torch.no_grad():
        w = FullDelta(model, 1).weight_of(parent, heavy)
        w.add_(9 * (w - FullDelta(model, 1).weight_of(model, heavy)))
    uniform, spent = FullDelta(model, 2), FullDelta(model, 2)
    covered, uniform_report = (lambda r: (r.share, r.report))(uniform.restore(model, parent))
    spent_restored = spent.restore(model, parent, allocate=True)
    share = spent_restored.share
    ranks = spent.ranks()
    assert ranks[heavy] > 2 and min(ranks.values()) >= 1 and any(r < 2 for r in ranks.values())
    assert sum(p.numel() for p in spent.parameters()) <= sum(p.numel() for p in uniform.parameters())
    assert share == pytest.approx(uniform_report["allocated"], rel=1e-9) and share > covered + 0.05
    assert spent_restored.report == pytest.approx(uniform_report, rel=1e-9)  # the report does not depend on the spend

    def gap(d):
        with torch.no_grad():
            return sum(float((d.weight_of(parent, n) - d.weight_of(model, n) - d.delta(n)).double().norm() ** 2)
                       for n in d.targets)
    assert gap(spent) < gap(uniform)
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad(), spent.applied(model):  # the resized delta runs in the model's layers
        assert torch.isfinite(model(x)).all()
    # above the exact SVD's size (every layer here, with the bound at 2) each layer's top ALLOCATE_SPAN x r values
    # from the randomized SVD: the same ranks and share as the exact spectra where no layer wants more than that
    even, even_parent = _gap_model(None, seed=1)
    exact = FullDelta(even, 2)
    exact_share = exact.restore(even, even_parent, allocate=True).share
    monkeypatch.setattr(delta_module, "EXACT_SVD_MAX", 2)
    found = FullDelta(even, 2)
    found_restored = found.restore(even, even_parent, allocate=True)
    assert found_restored.share == pytest.approx(exact_share, rel=1e-6)
    assert found.ranks() == exact.ranks() and max(exact.ranks().values()) <= delta_module.ALLOCATE_SPAN * 2
    assert set(found_restored.report) == {"rank 1", "rank 2", "rank 4", "rank 8", "allocated"}  # as far as it looked
    # ... and where one layer wants more, it gets that far and no further, still ahead of the uniform rank
    capped = FullDelta(model, 2)
    assert capped.restore(model, parent, allocate=True).share > covered + 0.05
    assert capped.ranks()[heavy] == delta_module.ALLOCATE_SPAN * 2 < ranks[heavy]


def test_above_the_exact_size_the_restore_factors_by_a_randomized_svd_as_good_as_the_full_one():
    """Nano's experts (1856 x 2688) take 11 s each for a float64 SVD on the CPU, and a restore has thousands:
    above EXACT_SVD_MAX rows and columns `top_singular` finds the rank-r part by a randomized range finder. On a
    drift of decaying spectrum (what training leaves) its rank-r error is the full SVD's to 1e-9, batched over
    experts; it is the same call to call, and the global RNG is left where it was."""
    from star_elastic.elastic.delta import EXACT_SVD_MAX, top_singular

    g = torch.Generator().manual_seed(0)
    m, n, r = EXACT_SVD_MAX + 6, EXACT_SVD_MAX + 40, 8
    q1, _ = torch.linalg.qr(torch.randn(2, m, 48, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(2, n, 48, generator=g, dtype=torch.float64))
    spectrum = 0.7 ** torch.arange(48, dtype=torch.float64)  # decaying, as a drift's
    a = q1 * spectrum @ q2.mT + 1e-6 * torch.randn(2, m, n, generator=g, dtype=torch.float64)
    before = torch.get_rng_state()
    u, s, vh = top_singular(a, r)
    assert torch.equal(torch.get_rng_state(), before)
    assert u.shape == (2, m, r) and s.shape == (2, r) and vh.shape == (2, r, n)
    exact = torch.linalg.svdvals(a)[..., :r]
    assert torch.allclose(s, exact, rtol=1e-9, atol=0)
    best = (a ** 2).sum((-2, -1)) - (exact ** 2).sum(-1)  # Eckart-Young: the rank-r error of the full SVD
    got = ((a - u * s[..., None, :] @ vh) ** 2).sum((-2, -1))
    assert torch.allclose(got, best, rtol=1e-9)
    again = top_singular(a, r)
    assert all(torch.equal(x, y) for x, y in zip((u, s, vh), again))
    # at or below the size, the exact SVD: SmolLM2's layers (576 wide) and every test's restore
    small = a[0, :EXACT_SVD_MAX, :200]
    assert torch.allclose(top_singular(small, r)[1], torch.linalg.svdvals(small)[:r], rtol=1e-12)


def test_input_covariances_are_the_mean_outer_product_of_each_layers_inputs():
    """input_covariances against the inputs caught directly: E[x x^T] over every token of every batch."""
    from star_elastic.elastic.delta import input_covariances

    model = Model(CFG).eval()
    name = FullDelta(model, 1).names[0]
    caught = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: caught.append(a[0].reshape(-1, a[0].shape[-1])))
    batches = [torch.randint(0, CFG.vocab_size, (2, 8)), torch.randint(0, CFG.vocab_size, (3, 5))]
    with torch.no_grad():
        got = input_covariances(model, [name], model, batches)[name]
    handle.remove()
    xs = torch.cat(caught[:2])
    torch.testing.assert_close(got, xs.T @ xs / xs.shape[0], rtol=1e-5, atol=1e-6)
    # under the caller's bf16 autocast (the trainer's on a GPU), still summed in float32: on an H200 the sum's
    # matmul came out bf16 and the next batch's addmm_ refused it (twenty-sixth session, `run.sh PLAN17 RESTORE`)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under = input_covariances(model, [name], model, batches)[name]
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, got, rtol=0.05, atol=0.05 * float(got.abs().max()))


def test_input_covariances_weigh_each_expert_by_the_tokens_routed_to_it():
    """For the routed experts, input_covariances gives each expert's mean square per input channel over the
    tokens routed to it (up_proj: the expert's input; down_proj: its hidden activation), ones for an expert no
    token reached."""
    from star_elastic.elastic.delta import input_covariances

    model = Model(CFG).eval()
    probe = FullDelta(model, 1)
    module_name = probe.experts[0].rpartition(".")[0]
    experts = model.get_submodule(module_name)
    caught = []
    handle = experts.register_forward_hook(lambda m, a, o: caught.append((a[0].detach(), a[1])))
    batches = [torch.randint(0, CFG.vocab_size, (2, 8)), torch.randint(0, CFG.vocab_size, (3, 5))]
    with torch.no_grad():
        got = input_covariances(model, [], model, batches, experts=probe.experts)
    handle.remove()
    x, idx = torch.cat([c[0] for c in caught[:2]]), torch.cat([c[1] for c in caught[:2]])
    for e in range(experts.up_proj.shape[0]):
        xe = x[(idx == e).any(-1)]
        if not xe.shape[0]:
            assert torch.equal(got[f"{module_name}.up_proj"][e], torch.ones(x.shape[-1]))
            continue
        he = experts.hidden(xe @ experts.up_proj[e].T)
        torch.testing.assert_close(got[f"{module_name}.up_proj"][e], (xe * xe).mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[f"{module_name}.down_proj"][e], (he * he).mean(0), rtol=1e-5, atol=1e-7)


def test_training_ends_with_the_restored_delta_and_the_finish_starts_from_it(tmp_path):
    """TrainConfig.full_delta_restore: where the training's steps end, B A is FullDelta.restore's of the
    trained shared weights (the smaller budgets' weights as a run without it leaves them, though the anchor's
    passes are skipped); the finish trains on
    from there; the full budget is closer to the parent right after it than with the trained delta; a run
    stopped inside the finish resumes exactly; bad values are one-line errors."""
    kw = dict(full_anchor=1.0, full_delta_rank=4, lr=3e-3)
    trained = _trainer(tmp_path, "trained", **kw)
    trained.run(progress=False)
    restored = _trainer(tmp_path, "restored", full_delta_restore="weights", **kw)
    logs = restored.run(progress=False)
    assert restored.restored is not None and 0 < restored.restored.share <= 1 and trained.restored is None
    # the anchor's passes, which would train only what the restore replaces, are skipped: the shared weights
    # train bit for bit as beside them
    assert not any("full_kd" in lg for lg in logs) and len(logs) == 5
    for a, b in zip(trained.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)
    want = FullDelta(restored.model, 4)
    want.restore(restored.model, restored.teacher)
    for name in want.targets:
        torch.testing.assert_close(restored.delta.delta(name), want.delta(name), rtol=1e-5, atol=1e-7)
    x = torch.arange(64).repeat(2).view(4, 32)

    def full_kd(t):
        with torch.no_grad(), t._as_full():
            return float(kd_loss(t._head(t.model, x), t._head(t.teacher, x)))
    assert full_kd(restored) < full_kd(trained)

    second = _resumes_exactly(tmp_path, stop_after=6, full_delta_restore="activations", full_delta_finish=4, **kw)
    assert second.restored is not None  # from the state, whole: it ran before the stop, not again
    assert 0 < second.restored.undamped <= 1 and second.restored.residual > 0
    assert second.restored.report["rank 4"] == pytest.approx(second.restored.share, rel=1e-6)
    # the rank given out by layer (TrainConfig.full_delta_allocate): the optimiser trains the resized delta in the
    # finish, and a run stopped inside it resumes exactly, the delta at the ranks it was given
    spent = _resumes_exactly(tmp_path / "allocated", stop_after=6, full_delta_restore="activations",
                             full_delta_finish=4, full_delta_allocate=True, **kw)
    assert len(set(spent.delta.ranks().values())) > 1
    assert spent.restored.share == pytest.approx(spent.restored.report["allocated"], rel=1e-6)
    in_optimizer = {id(p) for g in spent.opt.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer and spent.opt.state[p]["exp_avg"].shape == p.shape
               for p in spent.delta.parameters())  # trained in the finish at their new shapes
    with pytest.raises(StarElasticError, match="there is no restore"):
        _trainer(tmp_path, "g", full_anchor=1.0, full_delta_rank=2, full_delta_allocate=True)
    with pytest.raises(StarElasticError, match="there is none"):
        _trainer(tmp_path, "e", full_anchor=1.0, full_delta_restore="weights")
    with pytest.raises(StarElasticError, match="one of weights, activations"):
        _trainer(tmp_path, "f", full_anchor=1.0, full_delta_rank=2, full_delta_restore="svd")


def test_the_experts_delta_runs_as_merged_weights_when_decoding_gathers_and_when_prefill_groups(tmp_path):
    """The routed experts' B A (FullDelta.experts): the full budget with the delta applied equals a copy with it
    merged on one token (decode: the chosen experts' W, A and B gathered, W x + B (A x), their W + B A never
    formed) and on many (every expert's), and a delta file written before the experts had one still reads, on the
    linear layers alone."""
    from star_elastic.elastic.delta import save_delta

    model = Model(CFG).eval()
    delta = FullDelta(model, 2, seed=3)
    with torch.no_grad():
        for p in delta.up.values():
            p.normal_(0, 0.05)
    merged = delta.merge_into(copy.deepcopy(model))
    assert delta.experts and any(not torch.equal(merged.get_parameter(n), model.get_parameter(n)) for n in delta.experts)
    from star_elastic.elastic.delta import _ExpertsWithDelta

    formed = []  # decoding runs W x + B (A x) on the gathered factors: it never forms W + B A of the chosen experts
    plain_weights = _ExpertsWithDelta.weights

    def spy(self, which, idx=None):
        formed.append(idx is not None)
        return plain_weights(self, which, idx)
    for length in (1, 9):  # one token: T * k <= E / 2, the gather path; nine: every expert's tokens grouped
        x = torch.randint(0, CFG.vocab_size, (1, length))
        with torch.no_grad(), delta.applied(model), pytest.MonkeyPatch.context() as mp:
            mp.setattr(_ExpertsWithDelta, "weights", spy)
            got = model(x)
        torch.testing.assert_close(got, merged(x), rtol=1e-5, atol=1e-5)
        assert not any(formed)
        with torch.no_grad():
            assert not torch.allclose(model(x), got, atol=1e-4)  # undone after the block
    save_delta(FullDelta(model, 2, seed=3).without_experts(), tmp_path / "old.safetensors")
    read = FullDelta.read(model, tmp_path / "old.safetensors")
    assert read.experts == [] and read.names == delta.names and read.rank == 2


def test_a_restore_that_covers_the_experts_brings_a_hybrids_full_budget_closer_to_its_parent(tmp_path):
    """On a hybrid whose smaller budgets trained the routed experts, the restore with the experts' B A leaves the
    full budget nearer its parent (its KD on held-out tokens) than the same restore on the linear layers alone
    (what the delta covered before the twenty-seventh session), in both modes."""
    from star_elastic.elastic.delta import input_covariances

    t = _trainer(tmp_path, "t", full_anchor=1.0, full_delta_rank=4, lr=3e-3)
    t.run(progress=False)
    assert t.delta.experts and any(not torch.equal(t.delta.weight_of(t.model, n), t.delta.weight_of(t.teacher, n))
                                   for n in t.delta.experts)  # the smaller budgets moved the experts
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # five tiny steps move them little: a drift of a few hundred steps, low-rank as measured
        for n in t.delta.experts:
            w = t.delta.weight_of(t.model, n)
            e, out_f, in_f = w.shape
            w.add_(torch.randn(e, out_f, 2, generator=g) @ torch.randn(e, 2, in_f, generator=g) / in_f ** 0.5)
    x = torch.randint(0, CFG.vocab_size, (4, 32), generator=torch.Generator().manual_seed(5))
    calib = [torch.randint(0, CFG.vocab_size, (4, 32), generator=torch.Generator().manual_seed(6))]
    covariances = input_covariances(t.teacher, t.delta.names, t.teacher, calib, experts=t.delta.experts)

    def full_kd(delta):
        with torch.no_grad(), delta.applied(t.model):
            return float(kd_loss(t._head(t.model, x), t._head(t.teacher, x)))
    for cov in (None, covariances):
        both, linear = FullDelta(t.model, 4), FullDelta(t.model, 4).without_experts()
        share = both.restore(t.model, t.teacher, cov).share
        linear.restore(t.model, t.teacher, cov)
        assert full_kd(both) < 0.5 * full_kd(linear)  # measured: 0.0105 against 0.11
        # the experts restored a few at a time (Nano's are 5 GB a float64 copy) give the same factors
        import star_elastic.elastic.delta as delta_module
        chunked = FullDelta(t.model, 4)
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(delta_module, "EXPERT_CHUNK", 3)  # 8 experts: 3, 3, 2
            assert chunked.restore(t.model, t.teacher, cov).share == pytest.approx(share, rel=1e-12)
        for k, v in both.state_dict().items():
            assert torch.allclose(chunked.state_dict()[k], v, rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("rank", [8, 2])
def test_the_experts_delta_in_grouped_gemms_equals_the_merged_weights(rank):
    """Where the experts run as grouped GEMMs (prefill and batched decode on a GPU), the full budget's delta is
    W x + B (A x), three grouped GEMMs, not every expert's W + B A formed: the same as the merged weights' GEMM
    (bf16, as the GPU path runs it; torch's grouped GEMM also runs on the CPU). A rank whose bf16 rows are not
    16 bytes (2 here) takes the merged weights instead, and agrees too."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    model = Model(CFG).eval()
    delta = FullDelta(model, rank, seed=3)
    with torch.no_grad():
        for p in delta.up.values():
            p.normal_(0, 0.2)
    merged = delta.merge_into(copy.deepcopy(model))
    module = delta.experts[0].rpartition(".")[0]
    offs = torch.tensor([1, 3, 3, 6, 7, 9, 11, 12], dtype=torch.int32)  # eight experts, one with no token
    g = torch.Generator().manual_seed(0)
    for which, width in (("up_proj", CFG.hidden_size), ("down_proj", CFG.moe_intermediate_size)):
        xs = torch.randn(12, width, generator=g)
        with torch.no_grad():
            want = merged.get_submodule(module).grouped(which, xs, offs, torch.bfloat16).float()
            with delta.applied(model):
                got = model.get_submodule(module).grouped(which, xs, offs, torch.bfloat16).float()
            plain = model.get_submodule(module).grouped(which, xs, offs, torch.bfloat16).float()
        torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * float(want.abs().max()))
        assert float((plain - want).abs().max()) > 0.1 * float(want.abs().max())  # the delta matters here


def test_the_full_budgets_own_norms_are_recomputed_in_backward_with_the_same_gradients(monkeypatch):
    """With the delta applied and the full budget's own norm weights (elastify --keep-full's held norms), a
    Mamba layer's gated norm reads the own weight through `norm_weight` and is recomputed in backward as the
    plain layer's is (the own norm overrode forward before, and autograd kept its fp32 intermediates: 83 KB a
    token for a Mamba layer at the 539M config, eager, against 41 plain): the own weights', the delta's and the
    input's gradients equal autograd's keeping everything, and the model keeps less than 1.15x the plain one's
    bytes."""
    import star_elastic.model as model_module
    from star_elastic.model import ModelConfig

    cfg = ModelConfig(vocab_size=97, hidden_size=32, layer_types="MM", mamba_num_heads=8, mamba_head_dim=16,
                      ssm_state_size=8, n_groups=2, chunk_size=8)
    torch.manual_seed(0)
    model = Model(cfg)
    delta = FullDelta(model, 4)
    for p in delta.parameters():
        p.data.normal_(0, 0.1)
    own = {n: (p.detach() * 1.1).requires_grad_() for n, p in model.named_parameters() if "norm" in n}
    delta.keep(model, own)
    leaves = [*delta.rest.values(), *delta.parameters()]
    for t in delta.rest.values():
        t.requires_grad_()
    x = torch.randint(0, cfg.vocab_size, (2, 16))

    def run():
        with delta.applied(model):
            loss = model(x).float().pow(2).mean()
        return torch.autograd.grad(loss, leaves)

    got = run()
    monkeypatch.setattr(model_module, "checkpoint", lambda fn, *a, **settings: fn(*a))
    want = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in got[:len(delta.rest)])
    monkeypatch.undo()

    def kept(applied: bool) -> int:  # bytes autograd keeps for backward, each storage once, weights apart
        weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *leaves]}
        seen = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in weights:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                delta.applied(model) if applied else torch.enable_grad():
            model(x)
        return sum(seen.values())

    assert kept(True) < 1.15 * kept(False)  # 1.07; 1.29 while the own norm was a forward of its own
    with delta.applied(model):  # the gated norm reads the own weight through the method the layer calls
        norm = model.model.layers[0].mixer.norm
        assert norm.norm_weight() is delta.rest["model.layers.0.mixer.norm.weight"]


# --------------------------------------------------------------------------- the rest rounded (--full-delta-bits)

@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_pack_to_their_bits_and_round_to_the_levels_their_scale_allows(bits):
    from star_elastic.elastic.rounding import pack_codes, rest_dense, round_rest, unpack_codes

    g = torch.Generator().manual_seed(bits)
    gap = torch.randn(24, 128, generator=g, dtype=torch.float64)
    codes, scales = round_rest(gap, None, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** bits and scales.shape == (24, 2)
    packed = pack_codes(codes, bits)
    assert packed.shape == (24, 128 * bits // 8) and torch.equal(unpack_codes(packed, bits), codes)
    dense = rest_dense(codes, scales, bits)
    assert all(len(torch.unique(grp)) <= 2 ** bits for grp in dense.reshape(-1, 64))  # a scale a group of 64
    miss = float(((gap - dense) ** 2).sum() / (gap ** 2).sum())
    assert miss < {1: 0.4, 2: 0.15, 4: 0.02, 8: 1e-4}[bits]  # of a Gaussian, near what the bits allow


def test_gptq_spends_the_rounding_error_where_the_inputs_do_not_look():
    """Under inputs with correlated channels GPTQ misses less of the drift as the inputs see it than plain
    rounding does; under white inputs it is plain rounding."""
    from star_elastic.elastic.rounding import rest_dense, round_rest

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g, dtype=torch.float64) @ torch.randn(128, 128, generator=g,
                                                                              dtype=torch.float64)
    cov, gap = x.T @ x / 2048, torch.randn(48, 128, generator=g, dtype=torch.float64)

    def miss(codes_scales, bits):
        e = gap - rest_dense(*codes_scales, bits)
        return float(torch.einsum("oi,ij,oj->", e, cov, e) / torch.einsum("oi,ij,oj->", gap, cov, gap))
    for bits in (1, 2, 4):
        assert miss(round_rest(gap, cov, bits), bits) < 0.8 * miss(round_rest(gap, None, bits), bits)
    white = round_rest(gap, torch.eye(128, dtype=torch.float64), 4, damping=0.0)
    assert torch.equal(white[0], round_rest(gap, None, 4)[0])


def test_a_restore_with_its_rest_rounded_covers_more_and_resumes_exactly_in_the_finish(tmp_path):
    """TrainConfig.full_delta_bits: the restore rounds each linear layer's rest past rank r, the full budget runs
    W + B A + R, it is closer to the parent than with the rank alone, the share returned counts both, and a run
    stopped inside the finish resumes exactly with its rounded rest (a buffer no optimiser sees)."""
    kw = dict(full_anchor=1.0, full_delta_rank=2, lr=3e-3, full_delta_restore="activations")
    ranked = _trainer(tmp_path, "ranked", **kw)
    ranked.run(progress=False)
    rounded = _trainer(tmp_path, "rounded", full_delta_bits=4, **kw)
    rounded.run(progress=False)
    assert rounded.restored.share > ranked.restored.share
    assert rounded.delta.bits == 4 and all(rounded.delta.rounded(n) is not None for n in rounded.delta.names)
    x = torch.arange(64).repeat(2).view(4, 32)

    def full_kd(t):
        with torch.no_grad(), t._as_full():
            return float(kd_loss(t._head(t.model, x), t._head(t.teacher, x)))
    assert full_kd(rounded) < full_kd(ranked)
    for name in rounded.delta.names:  # the delta is B A + R, and merging adds the same
        key = name.replace(".", "/")
        ba = rounded.delta.up[key].float() @ rounded.delta.down[key].float()
        torch.testing.assert_close(rounded.delta.delta(name), ba + rounded.delta.rounded(name))
    in_optimizer = {id(p) for g in rounded.opt.param_groups for p in g["params"]}
    assert not any(id(b) in in_optimizer for b in rounded.delta.buffers())
    second = _resumes_exactly(tmp_path / "resumed", stop_after=6, full_delta_finish=4, full_delta_bits=2, **kw)
    assert all(second.delta.rounded(n) is not None for n in second.delta.names)
    with pytest.raises(StarElasticError, match="there is no restore"):
        _trainer(tmp_path, "h", full_anchor=1.0, full_delta_rank=2, full_delta_bits=4)
    with pytest.raises(StarElasticError, match="give one of 1, 2, 4, 8"):
        _trainer(tmp_path, "i", **{**kw, "full_delta_bits": 3})


def test_the_restore_says_its_share_under_the_inputs_as_they_are_beside_the_damped_one():
    """Restored.undamped: the share of the drift the delta covers under each layer's input covariance
    itself (the restore's own share counts a damping term beside it), recomputed here layer by layer; without
    covariances the two are one. The model's own inputs are of low rank (a few calibration tokens), the directions
    they do not reach count only through the damping."""
    from star_elastic.elastic.delta import input_covariances

    model, parent = _gap_model(None, seed=3)
    x = torch.randint(0, CFG.vocab_size, (1, 6))  # 6 tokens: every layer's input covariance of rank <= 6
    probe = FullDelta(model, 1)
    cov = input_covariances(parent, probe.names, parent, [x], experts=probe.experts)
    plain = FullDelta(model, 2)
    restored = plain.restore(model, parent)
    assert restored.share == pytest.approx(restored.undamped, rel=1e-9)
    for bits in (0, 1):
        delta = FullDelta(model, 2, bits=bits)
        restored = delta.restore(model, parent, cov)
        missed = total = 0.0
        with torch.no_grad():
            for name in delta.targets:
                gap = (delta.weight_of(parent, name) - delta.weight_of(model, name)).double()
                e = gap - delta.delta(name).double()
                c = cov[name].double()
                if name in delta.experts:
                    missed += float(((e ** 2) * c[:, None, :]).sum())
                    total += float(((gap ** 2) * c[:, None, :]).sum())
                else:
                    missed += float(torch.einsum("oi,ij,oj->", e, c, e))
                    total += float(torch.einsum("oi,ij,oj->", gap, c, gap))
        assert restored.undamped == pytest.approx(1 - missed / total, rel=1e-6)
        assert restored.undamped > restored.share  # the unreached directions count only under the damping
        parents = {n: delta.weight_of(parent, n).detach().double() for n in delta.targets}
        energy = sum(float(((w ** 2) * cov[n].double()[:, None, :]).sum()) if n in delta.experts else
                     float(torch.einsum("oi,ij,oj->", w, cov[n].double(), w)) for n, w in parents.items())
        assert restored.residual == pytest.approx(missed / energy, rel=1e-6)
    # the same drift twice as large: the same share, four times what it leaves (what the share alone hides)
    once = FullDelta(model, 2)
    once_restored = once.restore(model, parent, cov)
    farther = copy.deepcopy(model)
    with torch.no_grad():
        for name in once.targets:
            w = once.weight_of(farther, name)
            w.sub_(once.weight_of(parent, name) - w)  # W - (W_p - W): the gap doubled
    twice = FullDelta(farther, 2)
    twice_restored = twice.restore(farther, parent, cov)
    assert twice_restored.share == pytest.approx(once_restored.share, rel=1e-6)
    assert twice_restored.residual == pytest.approx(4 * once_restored.residual, rel=1e-6)


def test_the_dense_rest_is_made_once_and_made_again_when_its_codes_change():
    """`applied` runs every full-budget step: the rest made dense is reused while its codes and scales are the
    same tensors unchanged, and follows them when a resumed state loads into them in place or a new rest is set
    (a stale copy would run the full budget on the rest it had before)."""
    from star_elastic.elastic.rounding import rest_dense, round_rest

    model = Model(CFG)
    delta = FullDelta(model, 2, bits=2)
    name = delta.names[0]
    w = model.get_submodule(name).weight
    g = torch.Generator().manual_seed(0)

    def running():
        with delta.applied(model):
            return model.get_submodule(name).delta_rest

    delta.set_rounded(name, *round_rest(torch.randn(w.shape, generator=g, dtype=torch.float64), None, 2))
    first = running()
    assert running() is first and torch.equal(first, delta.rounded(name).to(first.dtype))
    codes, scales = round_rest(torch.randn(w.shape, generator=g, dtype=torch.float64), None, 2)
    state = {k: v.clone() for k, v in delta.state_dict().items()}
    key = name.replace(".", "/")
    state[f"rounded_codes.{key}"], state[f"rounded_scales.{key}"] = codes, scales.float()
    delta.load_state_dict(state)  # in place, as a resume does
    torch.testing.assert_close(running().float(), rest_dense(codes, scales.float(), 2))
    delta.set_rounded(name, torch.zeros_like(codes), torch.ones_like(scales))
    torch.testing.assert_close(running().float(), delta.rounded(name))


def test_a_delta_files_metadata_that_does_not_parse_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from conftest import one_line_error
    from star_elastic.elastic.delta import read_delta_file

    t = {"x.delta_down": torch.zeros(2, 4), "x.delta_up": torch.zeros(4, 2)}
    for meta, problem in [({"rank": "2", "bits": "3"}, "3 bits a weight"), ({"rank": "two"}, "not whole numbers")]:
        save_file(t, str(tmp_path / "d.safetensors"), metadata=meta)
        one_line_error(lambda: read_delta_file(tmp_path / "d.safetensors"), problem)
    save_file(t, str(tmp_path / "d.safetensors"))  # an older file: no metadata, the rank its tensors'
    stored, rank, bits = read_delta_file(tmp_path / "d.safetensors")
    assert set(stored) == set(t) and rank is None and bits == 0


def test_a_width_that_does_not_pack_its_codes_is_one_line():
    from conftest import one_line_error
    from star_elastic.model import ModelConfig

    model = Model(ModelConfig(family="llama", vocab_size=63, hidden_size=36, layer_types="*", num_attention_heads=4,
                              num_key_value_heads=2, head_dim=9, intermediate_size=64, bos_token_id=1, eos_token_id=2))
    one_line_error(lambda: FullDelta(model, 2, bits=1), "36 inputs do not pack 8 codes to a byte")
    assert FullDelta(model, 2, bits=4).bits == 4  # two codes to a byte: 36 packs
    one_line_error(lambda: FullDelta(model, 2, bits=3), "give one of 1, 2, 4, 8")


def test_a_resume_state_that_kept_the_share_alone_still_reads():
    """Restored.from_state: a state written before the restore's outcome was one object (the share a float, the
    report, undamped share and residual beside it, or missing) reads as one; a state with no restore as None."""
    from star_elastic.elastic.delta import Restored

    report = {"rank 2": 0.9, "allocated": 0.95}
    old = Restored.from_state({"restored": 0.9, "restore_report": report})
    assert old == Restored(0.9, None, None, report)
    later = Restored.from_state({"restored": 0.9, "restore_report": report, "restored_undamped": 0.93,
                                 "restore_residual": 1e-4})
    assert (later.undamped, later.residual) == (0.93, 1e-4)
    assert Restored.from_state({"restored": dataclasses.asdict(later)}) == later
    assert Restored.from_state({}) is None and Restored.from_state({"restored": None}) is None


def test_a_budgets_kd_weight_scales_its_pull_on_the_shared_weights_and_no_other_budgets(tmp_path):
    """With the delta, what moves the shared weights is the smaller budgets' steps alone, through one set of
    AdamW moments; a budget whose gradient runs larger (the 0.5's ran 1.5-2x the 0.75's on the GPU, RESULTS
    §9, forty-eighth session) has more than its share of steps in them. Its KD weight scales that gradient
    (below the clip) and leaves every other budget's and the delta's alone."""
    def first_steps(weights):
        t = _trainer(tmp_path, f"w{weights[2]}", full_anchor=1.0, full_delta_rank=4, steps=2, budget_kd_weights=weights)
        return t, t.run(progress=False)

    (plain, a), (halved, b) = first_steps([1.0, 1.0, 1.0]), first_steps([1.0, 1.0, 0.5])
    assert [lg["budget"] for lg in a] == [lg["budget"] for lg in b] and a[0]["budget"] == "0.5"
    assert b[0]["grad_norm"] == pytest.approx(0.5 * a[0]["grad_norm"], rel=1e-4)  # the same step, its pull halved
    assert b[0]["delta_grad_norm"] == pytest.approx(a[0]["delta_grad_norm"], rel=1e-4)  # the anchor's untouched
    assert b[0]["kd"] == pytest.approx(a[0]["kd"], rel=1e-5)  # the log reads the unweighted fit
    assert not all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), halved.model.parameters()))


def test_per_budget_moments_beside_the_delta_resume_exactly(tmp_path):
    """What the GPU's calls do (a run stopped by --call-seconds before the restore goes on in the next call):
    stopped after 3 of the 5 training steps, resumed, it ends where the straight run does, delta included."""
    kw = dict(KEPT, budget_lrs=[3e-3, 3e-3, 6e-3])
    straight = _trainer(tmp_path, "straight", **kw)
    want = straight.run(progress=False)
    _trainer(tmp_path, "resumed", **kw).run(progress=False, stop_after=3)
    second = _trainer(tmp_path, "resumed", **kw)
    assert second.load_state() and second.step == 3
    rest = second.run(progress=False)
    assert [lg["total"] for lg in rest] == pytest.approx([lg["total"] for lg in want[3:]], rel=1e-6, abs=1e-7)
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for key in straight.delta.up:
        torch.testing.assert_close(second.delta.up[key], straight.delta.up[key], rtol=1e-6, atol=1e-7)


def test_with_own_moments_the_smaller_budgets_weights_no_longer_decide_who_pulls_the_shared_weights(tmp_path):
    """The cause of the 0.75's under-fit at 16.8M (docs/RESULTS.md §9, forty-eighth to fiftieth sessions): with one
    AdamW the 0.5's larger gradient fills the moments both budgets share, so its scale decides how far each budget's
    steps move the shared weights (here its KD weight x4 moves the run's end). With each budget's own moments, beside
    --keep-full's delta and hold, a budget's step is normalised by its own gradient: the same run with the 0.5's
    weight x4 ends nearly where it did (what is left: Adam's epsilon where a gradient is tiny, and the router,
    which keeps one set of moments over the weighted sum; 63x closer than with one AdamW when written). Not a fix:
    on the GPU (fifty-first session) own moments left the 0.75 further from its (c) than the weight did, because
    each of the 0.5's steps then reaches the shared weights undamped (tests/test_budget_moments.py, the toy)."""
    def end(kd, lrs):
        t = _trainer(tmp_path, f"{kd}-{lrs}", **KEPT, budget_kd_weights=[1.0, 1.0, kd], budget_lrs=lrs)
        t.run(progress=False)
        return torch.cat([p.detach().flatten() for p in t.model.parameters()])

    def moved(a, b):
        return float((a - b).norm() / a.norm())

    shared = moved(end(1.0, None), end(4.0, None))
    own = moved(end(1.0, [3e-3] * 3), end(4.0, [3e-3] * 3))
    assert shared > 1e-3 and own < shared / 20, (shared, own)
