"""Importance, sort and search on a parent that is never whole on one rank (issue 11), with 2 gloo
ranks on the CPU, one spawn: the parent loaded into FSDP2 shards (sharded_load.load_sharded), each
rank scoring its own calibration batches (estimate_importance, depth included; the weight
baseline too), then the checkpoint loaded again sharded *and sorted* by those scores
(sharded_sort.load_sorted), then searched (search.search_spec). Each step gives what the whole
model gives in one process: the same scores (to fp32 rounding) as on all the batches, the same
sorted weights as sort_model bit for bit, the unsorted parent's logits, the same search ranking."""

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, gloo_group
from star_elastic import parallel, sharded_load, sharded_sort
from star_elastic.elastic.importance import estimate_importance, weight_magnitude_importance
from star_elastic.elastic.search import calibration_perplexity, search_spec
from star_elastic.elastic.spec import ElasticSpec, count_parameters

from test_meta_load import _Counting, _Failing, real_safe_open
from test_sharded_sort import CONFIGS, X, _save, parent, sorted_parent

pytestmark = pytest.mark.skipif(not parallel.available(), reason="this torch has no FSDP2")


def _batches(n, b, t, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 65, (b, t), generator=g) for _ in range(n)]


# each rank its own calibration data, in different numbers and shapes: rank 1 runs a forward more,
# which rank 0 must match with an idle one (FSDP's forwards are collectives)
RANK_BATCHES = [_batches(2, 2, 12, seed=10), _batches(3, 3, 10, seed=11)]
ALL = RANK_BATCHES[0] + RANK_BATCHES[1]
DEPTH = 2  # depth batches per rank; one process on ALL keeps the same four with 2 * DEPTH
CALIB = _batches(2, 2, 12, seed=12)  # the search's, the same on every rank
SEARCH_AXES = ("hidden", "ffn", "experts", "mamba")
SPEC = ElasticSpec(hidden_size=24, num_attention_heads=2, intermediate_size=32, n_routed_experts=4)


def target(family):
    return int(0.7 * count_parameters(CONFIGS[family]))


def _worker(rank, world, port, tmp):
    got = {}
    with gloo_group(rank, world, port):
        for family in CONFIGS:
            path = f"{tmp}/{family}"
            r = got[family] = {}
            model = sharded_load.load_sharded(path, device="cpu")
            s = estimate_importance(model, RANK_BATCHES[rank], depth=True, depth_batches=DEPTH, progress=False)
            r["scores"] = s
            r["weight"] = weight_magnitude_importance(model)
            # a rank with no data at all takes part with idle forwards
            r["one_rank_data"] = estimate_importance(model, ALL if rank == 0 else [], progress=False)
            del model
            # as elastify loads it on a GPU: blocks gathered in bf16 (FSDP2 mixed precision), the
            # residual stream in fp32; importance runs its forwards under bf16 autocast
            mixed = sharded_load.load_sharded(path, device="cpu", mixed_precision=True)
            r["mixed"] = estimate_importance(mixed, RANK_BATCHES[rank], depth=True, depth_batches=DEPTH,
                                             progress=False)
            del mixed

            _Counting.read = 0
            sharded_sort.safe_open = _Counting
            m, perms = sharded_sort.load_sorted(path, scores=s, device="cpu")
            sharded_sort.safe_open = real_safe_open
            r["read_bytes"] = _Counting.read
            r["perms"], r["full"] = perms, parallel.full_state_dict(m, rank0_only=False)
            r["tied"] = m.lm_head.weight is m.embed.weight
            r["sharded"] = parallel.is_sharded(m) and all(parallel.is_sharded(layer) for layer in m.model.layers)
            with torch.no_grad():
                r["logits"] = m(X)
            spec, records = search_spec(m, target(family), SEARCH_AXES, CALIB, layer_order=s["layer_order"])
            r["search"] = (spec.to_dict(), records)
            if family == "nemotron":
                r["ppl"] = calibration_perplexity(m, SPEC, CALIB)

        # a rank that cannot read its rows: every rank raises (none is left waiting in a collective)
        if rank == 1:
            sharded_sort.safe_open = _Failing
        try:
            sharded_sort.load_sorted(f"{tmp}/llama", scores=got["llama"]["scores"], device="cpu")
            got["read_error"] = None
        except Exception as e:  # noqa: BLE001 - the test checks which
            got["read_error"] = (type(e).__name__, str(e))
    torch.save(got, f"{tmp}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both parents (a hybrid NemotronH, a tied Llama) through the pipeline on 2 gloo ranks."""
    tmp = tmp_path_factory.mktemp("sharded_importance")
    _save(tmp)
    mp.spawn(_worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same_scores(got, want):
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k == "meta":
            assert got[k] == v
        elif k == "layer_order":
            assert got[k].tolist() == v.tolist()
        else:
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("family", CONFIGS)
def test_sharded_scores_are_one_process_on_all_batches(runs, family):
    ranks = runs[1]
    whole = parent(family)
    want = estimate_importance(whole, ALL, depth=True, depth_batches=2 * DEPTH, progress=False)
    assert want["meta"]["sequences"] == 13
    if family == "nemotron":  # the hybrid's keys: Mamba, attention, MLP, REAP and the expert baselines
        assert {"layers.0.mamba_heads", "layers.1.attn_heads", "layers.2.ffn", "layers.3.experts",
                "layers.3.experts_ean", "layers.3.expert_ffn", "layers.3.shared_ffn"} <= want.keys()
    for got in ranks:
        _assert_same_scores(got[family]["scores"], want)
        _assert_same_scores(got[family]["one_rank_data"], estimate_importance(whole, ALL, progress=False))
        _assert_same_scores(got[family]["weight"], weight_magnitude_importance(whole))
    for k, v in ranks[0][family]["scores"].items():  # every rank holds the same result
        assert k == "meta" or torch.equal(v, ranks[1][family]["scores"][k]), k


@pytest.mark.parametrize("family", CONFIGS)
def test_importance_on_a_parent_sharded_in_mixed_precision_is_the_fp32_one_to_bf16_rounding(runs, family):
    """elastify loads a GPU parent with bf16 compute (load_sharded(mixed_precision=True)); a plain
    forward on it multiplied fp32 activations by bf16 weights and failed (first 2-GPU run, 2026-12-01)."""
    for got in runs[1]:
        fp32, mixed = got[family]["scores"], got[family]["mixed"]
        assert mixed.keys() == fp32.keys()
        for k, v in fp32.items():
            if k in ("meta", "layer_order", "layer_scores"):
                continue
            assert mixed[k].dtype == v.dtype and torch.isfinite(mixed[k]).all(), k
            assert (mixed[k] - v).norm() <= 0.05 * v.norm() + 1e-6, k  # bf16 activations, fp64 sums
        assert mixed["layer_order"].shape == fp32["layer_order"].shape


@pytest.mark.parametrize("family", CONFIGS)
def test_sharded_sorted_load_is_sort_model_bit_for_bit_and_keeps_the_function(runs, family):
    tmp, ranks = runs
    files = sum(f.stat().st_size for f in (tmp / family).glob("*.safetensors"))
    with torch.no_grad():
        logits = parent(family)(X)
    for got in ranks:
        r = got[family]
        model, perms = sorted_parent(family, r["scores"])  # the same scores, on the whole parent
        want = model.state_dict()
        assert r["sharded"] and r["tied"] == (family == "llama")
        assert r["perms"].keys() == perms.keys() and all(torch.equal(r["perms"][k], v) for k, v in perms.items())
        assert r["full"].keys() == want.keys()
        for k, v in want.items():
            assert r["full"][k].dtype == v.dtype and torch.equal(r["full"][k], v), k
        assert (r["logits"] - logits).abs().max().item() < 1e-4  # function-preserving
        assert r["read_bytes"] < 0.6 * files, (r["read_bytes"], files)  # its own rows only


def test_search_on_the_sharded_sorted_parent_is_the_whole_ones(runs):
    ranks = runs[1]
    for family in CONFIGS:
        s = ranks[0][family]["scores"]
        model = sorted_parent(family, s)[0]
        spec, records = search_spec(model, target(family), SEARCH_AXES, CALIB, layer_order=s["layer_order"])
        for got in ranks:
            got_spec, got_records = got[family]["search"]
            assert got_spec == spec.to_dict()
            assert [r["spec"] for r in got_records] == [r["spec"] for r in records]
            for a, b in zip(got_records, records):
                assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
        if family == "nemotron":
            want = calibration_perplexity(model, SPEC, CALIB)
            for got in ranks:
                assert got[family]["ppl"] == pytest.approx(want, rel=1e-5)


def test_a_rank_that_cannot_read_makes_every_rank_raise(runs):
    first, second = (got["read_error"] for got in runs[1])
    assert second[0] == "StarElasticError" and "injected read failure" in second[1] and "\n" not in second[1]
    assert first[0] == "StarElasticError" and "another rank" in first[1]
