"""The full anchor's gradient projected off the smaller budgets' where they conflict
(TrainConfig.anchor_projection, optim.project_conflict).

The twelfth session's runs on an H200 put the 0.75 budget's gap to separate distillation on the full
anchor's pull on the shared weights (docs/RESULTS.md §9): its weight trades the full model against the
smaller budgets. The projection removes only the part of the pull that undoes their step."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, gloo_group
from star_elastic import parallel
from star_elastic.elastic.spec import ElasticSpec
from star_elastic.errors import StarElasticError
from star_elastic.optim import project_conflict
from star_elastic.train import ElasticTrainer

from test_train import make

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_anchor_conflict import main as conflict_main  # noqa: E402

SPECS = [ElasticSpec(), ElasticSpec(intermediate_size=48), ElasticSpec(intermediate_size=32)]


def test_a_conflicting_gradient_loses_its_component_along_the_other_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    o = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    flat_o = torch.cat([t.flatten() for t in o])
    # against: minus 2 o plus a part orthogonal to o
    ortho = torch.randn(flat_o.shape, generator=g)
    ortho -= (ortho @ flat_o) / (flat_o @ flat_o) * flat_o
    grads = [t.clone() for t in (-2 * flat_o + ortho).split([12, 5])]
    grads = [grads[0].view(4, 3), grads[1]]
    cos = project_conflict(grads, o)
    assert cos < 0
    after = torch.cat([t.flatten() for t in grads])
    assert torch.allclose(after, ortho, atol=1e-5)  # the conflicting part gone, the orthogonal one kept
    agreeing = [t.clone() for t in o]
    before = [t.clone() for t in agreeing]
    assert project_conflict(agreeing, [t + 0.1 for t in o]) > 0
    assert all(torch.equal(a, b) for a, b in zip(agreeing, before))  # no conflict: untouched
    # a parameter without a gradient on either side is left alone
    grads = [torch.ones(3), None]
    assert project_conflict(grads, [-torch.ones(3), torch.ones(2)]) == pytest.approx(-1.0)
    assert torch.allclose(grads[0], torch.zeros(3), atol=1e-7) and grads[1] is None


def _fixed(tmp_path, name, tail=None, **kw):
    """Fixed FFN cuts, no router; stage 2 from the start, the full budget never drawn (its weight 0), so
    runs with and without the anchor train the same smaller budget on the same batch each step. The
    student starts away from its teacher: everywhere a little (no `tail`; every budget's gradient then
    points back toward the teacher, and they agree), or (`tail`) only in the output of the FFN neurons
    that only the full model uses (48-63), scaled: at 3 the full model overshoots where the smaller
    budgets fall short, so its fix on the shared weights pulls against theirs (a conflict)."""
    model, teacher, _, budgets, rows, cfg, _ = make(**{"steps": 3, "stage1_fraction": 0.0,
                                                        "stage2_weights": [0.0, 1.0, 1.0], "clip": 1e9, **kw})
    with torch.no_grad():
        if tail is None:
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        else:
            dict(model.named_parameters())["model.layers.4.mixer.down_proj.weight"][:, 48:] *= tail
    return ElasticTrainer(model, teacher, None, budgets, rows, cfg, tmp_path / name, fixed_specs=SPECS)


def _applied_gradient(t) -> tuple[list[torch.Tensor], dict]:
    """The gradient that the optimiser applies on the first step, and the step's log."""
    seen = []
    step = t.opt.step

    def spy(*a, **k):
        seen.append([p.grad.clone() for p in t.model.parameters()])
        return step(*a, **k)

    t.opt.step = spy
    logs = t.train_step()
    return seen[0], logs


@pytest.mark.parametrize("tail", [3.0, None], ids=["conflict", "agreement"])
def test_the_step_applies_the_smaller_budgets_gradient_plus_the_projected_anchor(tmp_path, tail):
    small, small_log = _applied_gradient(_fixed(tmp_path, "small", tail, full_anchor=0.0))
    summed, summed_log = _applied_gradient(_fixed(tmp_path, "anchor", tail, full_anchor=0.5))
    projected, log = _applied_gradient(_fixed(tmp_path, "projected", tail, full_anchor=0.5, anchor_projection=True))
    assert small_log["budget"] == summed_log["budget"] == log["budget"] != "1.0"
    anchor = [s - m for s, m in zip(summed, small)]  # the anchor's own gradient, weight included
    expected = [a.clone() for a in anchor]
    cos = float(project_conflict(expected, small))
    assert log["anchor_cos"] == pytest.approx(cos, abs=1e-5)
    assert (cos < 0) == (tail == 3.0)
    for p, m, e in zip(projected, small, expected):
        assert torch.allclose(p, m + e, rtol=1e-4, atol=1e-6)
    same = all(torch.allclose(p, s, rtol=1e-4, atol=1e-6) for p, s in zip(projected, summed))
    assert same == (cos >= 0)  # projected only where the two conflict
    # what the projection buys: the step no longer works against the smaller budget's own gradient
    dot = sum((p * m).sum() for p, m in zip(projected, small))
    assert dot >= sum((m * m).sum() for m in small) * (1 - 1e-4)


def test_the_projection_needs_the_anchor_and_one_adamw(tmp_path):
    with pytest.raises(StarElasticError, match="needs full_anchor > 0"):
        _fixed(tmp_path, "none", full_anchor=0.0, anchor_projection=True)
    with pytest.raises(StarElasticError, match="drop budget_lrs"):
        _fixed(tmp_path, "lrs", full_anchor=1.0, anchor_projection=True, budget_lrs=[1e-3, 1e-3, 1e-3])


def _worker(rank, world, port, tmp, shard):
    with gloo_group(rank, world, port):
        t = _fixed(Path(tmp), f"{shard}{rank}", 3.0, steps=4, full_anchor=1.0, anchor_projection=True, shard=shard)
        logs = t.run(progress=False)
        weights = parallel.full_state_dict(t.model)
        if rank == 0:
            torch.save({"logs": [(l["total"], l["anchor_cos"]) for l in logs], "weights": weights},
                       f"{tmp}/{shard}.pt")


@pytest.mark.parametrize("shard", ["fsdp", "none"])
def test_two_ranks_project_as_one_process(tmp_path, shard):
    """Sharded (FSDP2: the inner products summed over the shards) or replicated (the gradients averaged
    before the projection), 2 gloo ranks give one process's losses, cosines and weights."""
    if shard == "fsdp" and not parallel.available():
        pytest.skip("this torch has no FSDP2")
    one = _fixed(tmp_path, "one", 3.0, steps=4, full_anchor=1.0, anchor_projection=True)
    logs = one.run(progress=False)
    assert min(l["anchor_cos"] for l in logs) < 0  # the projection acted
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), shard), nprocs=2, join=True)
    got = torch.load(tmp_path / f"{shard}.pt", weights_only=True)
    assert [c for _, c in got["logs"]] == pytest.approx([l["anchor_cos"] for l in logs], rel=1e-4, abs=1e-6)
    assert [t for t, _ in got["logs"]] == pytest.approx([l["total"] for l in logs], rel=1e-5)
    for k, v in one.model.state_dict().items():
        assert torch.allclose(got["weights"][k], v, rtol=1e-4, atol=1e-5), k


def test_the_conflict_benchmark_writes_each_steps_cosine(elastic_ckpt, tmp_path, capsys):
    """benchmarks/bench_anchor_conflict.py on a tiny hybrid parent: a line and a JSON entry a step."""
    ckpt, text = elastic_ckpt
    out = tmp_path / "conflict.json"
    conflict_main(["--model", str(ckpt), "--data", str(text), "--ffn", "48,32", "--steps", "3", "--batch-size", "2",
          "--seq-len", "16", "--device", "cpu", "--json", str(out)])
    got = json.loads(out.read_text())
    assert [s["step"] for s in got["steps"]] == [0, 1, 2]
    assert all(-1.0 <= s["anchor_cos"] <= 1.0 and s["budget"] in ("0.75", "0.5") for s in got["steps"])
    assert got["steps"][0]["full_kd"] == pytest.approx(0.0, abs=1e-6)  # the student starts as its parent
    assert "mean cosine" in capsys.readouterr().out
