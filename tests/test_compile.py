"""The compiled training step (TrainConfig.compile): each layer under torch.compile, masks and all.

The CPU runs dynamo's capture with the "aot_eager" backend (the graphs, guards and AOT autograd
that inductor also gets, without its code generation, too slow for CI); the GPU speed is a
benchmark (benchmarks/bench_kernels.py --parts train)."""

import itertools
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

from conftest import free_port, gloo_group
from star_elastic import parallel
from star_elastic.elastic.masking import masked
from star_elastic.errors import StarElasticError
from star_elastic.train import compile_layers
from test_elastic import LLAMA, NEMOTRON, ids, parent
from test_train import trainer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def cycling(t, order):
    """Budgets drawn in a fixed order, so both trainers train the same budgets and every one is seen."""
    it = itertools.cycle(order)
    t.sample_budget = lambda: next(it)
    return t


def test_a_compiled_step_trains_like_the_eager_one_and_stops_recompiling_once_every_budget_ran(tmp_path):
    kw = dict(steps=12, seed=3, stage2_seq_len=None)
    eager = cycling(trainer(tmp_path, "eager", **kw), [1, 2, 0])
    compiled = cycling(trainer(tmp_path, "compiled", compile="aot_eager", **kw), [1, 2, 0])
    # one cycle of budgets (the full parent, and a router draw for each smaller budget) compiles the graphs
    first = [(eager.train_step(), compiled.train_step()) for _ in range(3)]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the layers ran compiled
    rest = [(eager.train_step(), compiled.train_step()) for _ in range(3)]
    # new draws of the router are new masks, not new graphs: the masks' values are graph inputs
    assert counters["stats"]["unique_graphs"] == graphs
    for a, b in first + rest:
        assert a["budget"] == b["budget"] and a.get("cost_fraction") == b.get("cost_fraction")
        assert b["total"] == pytest.approx(a["total"], rel=1e-4, abs=1e-6)
    for p, q in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_the_trainer_puts_back_plain_layers_when_training_ends_or_fails(tmp_path):
    compiled = lambda t: any("_compiled_call_impl" in vars(layer)  # noqa: E731
                             for m in (t.model, t.teacher) for layer in m.model.layers)
    t = trainer(tmp_path, "ends", steps=2, stage2_seq_len=None, compile="aot_eager")
    assert compiled(t)
    t.run(progress=False, stop_after=1)
    assert compiled(t)  # more to train: still compiled
    t.run(progress=False)
    assert not compiled(t)  # evaluation and export run the plain layers
    t = trainer(tmp_path, "fails", steps=2, stage2_seq_len=None, compile="aot_eager")
    t.train_step = lambda **kw: 1 / 0
    with pytest.raises(ZeroDivisionError):
        t.run(progress=False)
    assert not compiled(t)


def test_compile_layers_keeps_parameter_names_and_can_be_undone(tmp_path):
    t = trainer(tmp_path, steps=2)
    names = [k for k, _ in t.model.named_parameters()]
    compile_layers(t.model, "aot_eager")
    assert [k for k, _ in t.model.named_parameters()] == names  # a checkpoint saves as before
    x = torch.randint(0, 64, (1, 8))
    want = t.teacher(x)
    torch.testing.assert_close(t.model(x), want)
    assert counters["stats"]["unique_graphs"] > 0
    compile_layers(t.model, None)
    counters.clear()
    torch.testing.assert_close(t.model(x), want)
    assert not counters["stats"]["unique_graphs"]  # plain forward again
    with pytest.raises(StarElasticError, match="unknown torch.compile backend 'indcutor'"):
        trainer(tmp_path, "typo", steps=2, compile="indcutor")  # one line before any step, not deep in dynamo


def _one_at_a_time(cfg):
    """Mask sets of one kind each, in an order where each follows one the graphs were not traced under."""
    shapes = {"*": ("attn_heads", cfg.num_attention_heads), "-": ("ffn", cfg.intermediate_size),
              "E": ("experts", cfg.n_routed_experts), "M": ("mamba_heads", cfg.mamba_num_heads)}
    by_axis = {}
    for i, kind in enumerate(cfg.layer_types):
        axis, n = shapes[kind]
        size = n // cfg.n_groups if axis == "mamba_heads" else n  # Mamba heads: in every group
        keep = torch.arange(n) % size < size // 2 + 1
        by_axis.setdefault(axis, {})[f"layers.{i}.{axis}"] = keep.float()
    hidden = {"hidden": (torch.arange(cfg.hidden_size) < cfg.hidden_size - 4).float()}
    return [{}, *by_axis.values(), {"layers.1": torch.tensor(0.5)}, {"layers.1": torch.tensor(0.0)}, hidden,
            {**hidden, **by_axis["attn_heads"]}, by_axis["attn_heads"], {}]


@pytest.mark.parametrize("cfg", [LLAMA, NEMOTRON], ids=["llama", "nemotron"])
def test_a_compiled_layer_runs_every_mask_it_is_given_whichever_ran_first(cfg):
    """torch.compile does not guard on a module's hooks: masks applied by hooks ran the graph traced
    without them (the fifteenth session's compiled 0.75 budget, an FFN-only cut, trained as the full
    model). Masks are class swaps, on which it guards."""
    eager = parent(cfg)
    compiled = compile_layers(parent(cfg), "eager")
    x = ids()
    for masks in _one_at_a_time(cfg):
        with torch.no_grad(), masked(eager, masks), masked(compiled, masks):
            torch.testing.assert_close(compiled(x), eager(x), msg=lambda m: f"{sorted(masks)}: {m}")
    assert counters["stats"]["unique_graphs"] > 0


def _sharded_worker(rank, world, port, out, backend):
    with gloo_group(rank, world, port):
        t = cycling(trainer(Path(out).parent, f"r{rank}{backend}", shard="fsdp", steps=6, seed=3,
                            stage2_seq_len=None, compile=backend), [1, 2, 0])
        logs = [t.train_step()["total"] for _ in range(6)]
        if rank == 0:
            torch.save(logs, out)


@pytest.mark.skipif(not parallel.available(), reason="this torch has no FSDP2")
def test_compiled_layers_shard_with_fsdp_and_train_as_eager_sharded_ones(tmp_path):
    """The trainer compiles, then shards each layer (the order torchtitan uses):
    two gloo ranks of compiled, sharded layers train to the losses of two eager sharded ranks."""
    got = {}
    for backend in (None, "aot_eager"):
        out = tmp_path / f"{backend}.pt"
        mp.spawn(_sharded_worker, args=(2, free_port(), str(out), backend), nprocs=2, join=True)
        got[backend] = torch.load(out)
    assert got["aot_eager"] == pytest.approx(got[None], rel=1e-4, abs=1e-6)
