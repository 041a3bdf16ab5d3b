"""The resumable state of sharded (FSDP2) training, written through torch.distributed.checkpoint
(issue 11, item 4): every rank writes only its shards, atomically, and a 2-rank run killed and
resumed equals an uninterrupted one bit for bit. A state written under one world size or sharding
mode resumes under another (DCP reshards), and an old gathered state still resumes under FSDP2."""

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from conftest import assert_close_dicts, free_port, gloo_group
from star_elastic import parallel
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router, RouterConfig
from star_elastic.errors import StarElasticError
from star_elastic.model import Model
from star_elastic.train import ElasticTrainer

from test_fsdp import TIED
from test_train import BUDGETS, CFG, make, trainer

STEPS, HALF = 6, 3
KW = dict(steps=STEPS, batch=4, clip=0.01)

pytestmark = pytest.mark.skipif(not parallel.available(), reason="this torch has no FSDP2")


def _sharded(out, shard="fsdp"):
    model, teacher, router, budgets, rows, cfg, heldout = make(shard=shard, **KW)
    return ElasticTrainer(model, teacher, router, budgets, rows, cfg, out, heldout=heldout)


def _other(config, out, **kw):
    """A trainer like `make`'s for another model config, on the same data."""
    torch.manual_seed(0)
    model = Model(config)
    budgets = [parse_budget(b, config) for b in BUDGETS]
    router = Router(config, budgets, RouterConfig(hidden_dim=16, width_choices=4))
    rows, cfg = make(**KW, **kw)[4:6]
    return ElasticTrainer(model, copy.deepcopy(model), router, budgets, rows, cfg, out)


def _copy(src, dst, rank):
    """Rank 0 copies a run directory (its state resumed elsewhere); the others wait for it."""
    if rank == 0:
        shutil.copytree(src, dst)
    dist.barrier()


def _elements(path) -> dict[str, int]:
    """Tensor elements in each file of a DCP checkpoint, from its metadata (file sizes would mostly
    measure the per-tensor overhead at this model size)."""
    md = dcp.FileSystemReader(str(path)).read_metadata()
    out = {}
    for index, where in md.storage_data.items():
        chunk = next(c for c in md.state_dict_metadata[index.fqn].chunks if c.offsets == index.offset)
        out[where.relative_path] = out.get(where.relative_path, 0) + chunk.sizes.numel()
    return out


def _state(out) -> dict:
    path = Path(out) / "train_state"
    is_dcp = (path / "dcp").is_dir()
    return {"files": sorted(p.name for p in path.iterdir()),
            "dcp": sorted(p.name for p in (path / "dcp").iterdir()) if is_dcp else [],
            "elements": _elements(path / "dcp") if is_dcp else {},
            "meta": json.loads((path / "state.json").read_text()),
            "leftovers": sorted(p.name for p in Path(out).iterdir() if p.name.startswith("."))}


def _worker(rank, world, port, out, tmp):
    with gloo_group(rank, world, port):
        got = {}
        if world == 1:  # a 1-rank sharded run resumes the state 2 ranks wrote (DCP reshards 2 -> 1)
            _copy(f"{tmp}/dcp_half", f"{tmp}/one_rank", rank)
            t = _sharded(f"{tmp}/one_rank")
            assert t.shard == "fsdp" and t.load_state() and t.step == HALF
            got.update(losses=[l["total"] for l in t.run(progress=False)], weights=parallel.full_state_dict(t.model))
            torch.save(got, out)
            return

        # 0. a state saved before the first step holds no moments, and saving adds none to the live
        # optimiser (get_state_dict fills an empty one by a zero step, and AdamW would count from 1)
        early = _sharded(f"{tmp}/early")
        early.save_state()
        assert not early.opt.state
        got["early"] = _state(early.out)
        again = _sharded(f"{tmp}/early")
        assert again.load_state() and again.step == 0 and not again.opt.state
        got["early_losses"] = [l["total"] for l in again.run(progress=False, stop_after=HALF)]

        # 1. an uninterrupted sharded run
        t = _sharded(f"{tmp}/straight")
        got.update(losses=[l["total"] for l in t.run(progress=False)], weights=parallel.full_state_dict(t.model),
                   router={k: v.clone() for k, v in t.router.state_dict().items()}, straight=_state(t.out))
        # the sharded save gathers no tensor: with gathering broken, it still writes
        full_tensor, full_state_dict = parallel.full_tensor, parallel.full_state_dict
        parallel.full_tensor = parallel.full_state_dict = None
        try:
            t.save_state()
        finally:
            parallel.full_tensor, parallel.full_state_dict = full_tensor, full_state_dict

        # 2. killed after HALF steps ...
        first = _sharded(f"{tmp}/resumed")
        first.run(progress=False, stop_after=HALF)
        _copy(f"{tmp}/resumed", f"{tmp}/dcp_half", rank)  # resumed below by other world sizes
        # ... then one more step, whose save fails after the shards were written (DCP raises on every
        # rank): the state of step HALF stays whole (resumed below), and no temporary directory is left
        save = dcp.save

        def failing(*args, **kwargs):
            save(*args, **kwargs)
            raise OSError("disk full")
        first.train_step()
        dcp.save = failing
        try:
            first.save_state()
            raise AssertionError("the failing save did not raise")
        except OSError:
            pass
        finally:
            dcp.save = save
        dist.barrier()
        got["after_failure"] = _state(first.out)
        # 3. ... resumed by a fresh trainer (same init, then the checkpoint)
        second = _sharded(f"{tmp}/resumed")
        assert second.load_state() and second.step == HALF
        got.update(resumed_losses=[l["total"] for l in second.run(progress=False)],
                   resumed=parallel.full_state_dict(second.model),
                   resumed_router={k: v.clone() for k, v in second.router.state_dict().items()})

        # 4. the same state resumed by 2 replicated ranks (shard="none": every rank reads whole tensors)
        _copy(f"{tmp}/dcp_half", f"{tmp}/replicated", rank)
        replicated = _sharded(f"{tmp}/replicated", shard="none")
        assert replicated.load_state() and replicated.step == HALF
        got.update(replicated_losses=[l["total"] for l in replicated.run(progress=False)],
                   replicated=replicated.model.state_dict())

        # 5. an old-format state (gathered, one file per kind: what sharded runs wrote before DCP, and
        # what unsharded runs write) resumes under FSDP2, and its next save is in the new format
        _copy(f"{tmp}/single_half", f"{tmp}/from_old", rank)
        old = _sharded(f"{tmp}/from_old")
        got["old"] = _state(old.out)
        assert old.load_state() and old.step == HALF
        got.update(old_losses=[l["total"] for l in old.run(progress=False)],
                   old_weights=parallel.full_state_dict(old.model), old_after=_state(old.out))

        # 6. tied embeddings (SmolLM2's): one sharded tensor under two names in the state dict
        tied = _other(TIED, f"{tmp}/tied", shard="fsdp")
        got["tied_losses"] = [l["total"] for l in tied.run(progress=False)]
        _other(TIED, f"{tmp}/tied_resumed", shard="fsdp").run(progress=False, stop_after=HALF)
        resumed = _other(TIED, f"{tmp}/tied_resumed", shard="fsdp")
        assert resumed.load_state() and resumed.model.lm_head.weight is resumed.model.embed.weight
        got["tied_resumed_losses"] = [l["total"] for l in resumed.run(progress=False)]
        want, have = parallel.full_state_dict(tied.model), parallel.full_state_dict(resumed.model)
        got["tied_equal"] = want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
        if rank == 0:
            torch.save(got, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (the reference, and an old-format state), 2 gloo ranks sharded, then 1 sharded rank."""
    tmp = tmp_path_factory.mktemp("dcp")
    single = trainer(tmp, "single", **KW)
    logs = single.run(progress=False)
    trainer(tmp, "single_half", **KW).run(progress=False, stop_after=HALF)
    mp.spawn(_worker, args=(2, free_port(), str(tmp / "two.pt"), str(tmp)), nprocs=2, join=True)
    mp.spawn(_worker, args=(1, free_port(), str(tmp / "one.pt"), str(tmp)), nprocs=1, join=True)
    two, one = (torch.load(tmp / f"{n}.pt", weights_only=False) for n in ("two", "one"))
    return tmp, single, logs, two, one


def test_each_rank_writes_only_its_shards(runs):
    tmp, single, _, got, _ = runs
    state = got["straight"]
    assert state["meta"]["format"] == "dcp" and state["meta"]["ranks"] == 2 and state["meta"]["step"] == STEPS
    # the student and its moments in dcp/; the replicated router, its moments and the counters beside it
    assert state["files"] == ["dcp", "router.safetensors", "router_optimizer.safetensors", "state.json"]
    assert state["leftovers"] == []
    assert ".metadata" in state["dcp"] and sorted(state["elements"]) == ["__0_0.distcp", "__1_0.distcp"]
    # the student's weights and both AdamW moments (and a step counter per parameter), each rank's
    # file about half of them
    n = sum(p.numel() for p in single.model.parameters())
    total = sum(state["elements"].values())
    assert 3 * n <= total <= 3 * n + 200, (total, n)
    assert all(0.4 * total < e < 0.6 * total for e in state["elements"].values()), state["elements"]
    # unsharded runs write the gathered files as before
    assert sorted(p.name for p in (tmp / "single" / "train_state").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "router.safetensors", "state.json"]


def test_sharded_resume_is_bit_for_bit(runs):
    _, _, _, got, _ = runs
    assert len(got["resumed_losses"]) == STEPS - HALF
    assert got["resumed_losses"] == got["losses"][HALF:]
    assert got["resumed"].keys() == got["weights"].keys()
    assert all(torch.equal(got["resumed"][k], v) for k, v in got["weights"].items())
    assert all(torch.equal(got["resumed_router"][k], v) for k, v in got["router"].items())


def test_a_state_from_before_the_first_step_resumes_exactly(runs):
    _, single, _, got, _ = runs
    assert got["early"]["meta"]["step"] == 0
    weights = sum(v.numel() for v in single.model.state_dict().values())
    assert sum(got["early"]["elements"].values()) == weights  # no optimiser entries
    assert got["early_losses"] == got["losses"][:HALF]


def test_tied_embeddings_resume_bit_for_bit(runs):
    got = runs[3]
    assert len(got["tied_resumed_losses"]) == STEPS - HALF
    assert got["tied_resumed_losses"] == got["tied_losses"][HALF:] and got["tied_equal"]


def test_a_failed_save_keeps_the_previous_state(runs):
    _, _, _, got, _ = runs
    state = got["after_failure"]
    assert state["meta"]["step"] == HALF and state["leftovers"] == []
    assert "router.safetensors" in state["files"] and ".metadata" in state["dcp"]


def test_a_sharded_state_resumes_under_another_world_size_and_sharding(runs):
    """DCP reshards on load: the 2-rank sharded state resumes on 1 sharded rank, on 2 replicated
    ranks and in one unsharded process, to the losses of the uninterrupted one-process run (to fp32
    rounding, as tests/test_fsdp.py compares sharded with one process: other reduction orders)."""
    tmp, single, logs, two, one = runs
    want = [l["total"] for l in logs[HALF:]]
    for got, weights in ((one["losses"], one["weights"]), (two["replicated_losses"], two["replicated"])):
        assert got == pytest.approx(want, rel=1e-4)
        assert_close_dicts(weights, single.model.state_dict())
    shutil.copytree(tmp / "dcp_half", tmp / "unsharded")
    t = trainer(tmp, "unsharded", **KW)
    assert t.shard == "none" and not dist.is_initialized()
    assert t.load_state() and t.step == HALF
    assert [l["total"] for l in t.run(progress=False)] == pytest.approx(want, rel=1e-4)
    assert_close_dicts(t.model.state_dict(), single.model.state_dict())
    assert_close_dicts(t.router.state_dict(), single.router.state_dict())


def test_an_old_gathered_state_resumes_under_fsdp(runs):
    _, single, logs, got, _ = runs
    assert "model.safetensors" in got["old"]["files"] and got["old"]["dcp"] == []
    assert got["old_losses"] == pytest.approx([l["total"] for l in logs[HALF:]], rel=1e-4)
    assert_close_dicts(got["old_weights"], single.model.state_dict())
    after = got["old_after"]  # rewritten in the new format: no gathered weights left beside it
    assert after["meta"]["format"] == "dcp" and after["meta"]["step"] == STEPS
    assert "model.safetensors" not in after["files"] and "optimizer.safetensors" not in after["files"]


def test_a_sharded_state_of_another_model_is_refused_in_one_line(runs):
    tmp = runs[0]
    shutil.copytree(tmp / "dcp_half", tmp / "other")
    t = _other(replace(CFG, intermediate_size=48), tmp / "other")
    with pytest.raises(StarElasticError, match=r"another model \(.*48") as e:
        t.load_state()
    assert "\n" not in str(e.value)
