"""Serving head order: the engine stores heads rank-major so that every budget's heads are a plain
prefix. Views over such a parent compute what `slice_model` of the parent as loaded computes."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from elastic_ckpt import SPECS, make_checkpoint, random_parent
from star_elastic.elastic import ElasticSpec, slice_model
from star_elastic.elastic.checkpoint import load_elastic
from star_elastic.errors import StarElasticError
from star_elastic.generate import generate
from star_elastic.model import Model
from star_elastic.elastic.masking import masked
from star_elastic.serve.engine import ElasticEngine
from star_elastic.serve.order import in_serving_order, serving_order_fits, use_serving_order
from star_elastic.serve.views import GroupedLinear, PartsConv1d, budget_view, shares_storage

# every budget keeps every KV group (nemotron_h: n_groups=2 Mamba, 4 query heads per KV group, MoE, MLP)
CASES = {
    "nemotron_h": [SPECS["nemotron_h"]["1.0"], SPECS["nemotron_h"]["0.75"],
                   ElasticSpec(hidden_size=16, num_attention_heads=2, mamba_num_heads=2, intermediate_size=32,
                               n_routed_experts=4, moe_intermediate_size=8, layers=[0, 1, 2, 3, 5]),
                   ElasticSpec(num_attention_heads=[None, 2, None, None, None, 6],  # per-layer sizes
                               mamba_num_heads=[2, None, None, 6, None, None], hidden_size=24)],
    "llama": [SPECS["llama"]["0.75"], ElasticSpec(hidden_size=16, num_attention_heads=[2, 4, 2], layers=[0, 2])],
}


def _plain(view) -> bool:
    """Every projection and conv a plain module over 2-D views: no grouped (bmm) or part-wise path."""
    return not any(isinstance(m, (GroupedLinear, PartsConv1d)) for m in view.modules())


@pytest.mark.parametrize("family", list(CASES))
def test_views_in_serving_order_equal_sliced_parent(family):
    original = random_parent(family)
    parent = use_serving_order(copy.deepcopy(original))
    assert serving_order_fits(original.config, CASES[family])
    x = torch.randint(0, 63, (2, 11))
    with torch.no_grad():
        assert rel_err(parent(x), original(x)) < 1e-5  # the parent itself, reordered, computes the same
    assert torch.equal(generate(parent, x[:, :4], 8), generate(original, x[:, :4], 8))
    for spec in CASES[family]:
        view, sliced = budget_view(parent, spec), slice_model(original, spec).eval()
        assert view.config == sliced.config and view.copied == [] and shares_storage(view, parent)
        assert _plain(view)
        with torch.no_grad():
            assert rel_err(view(x), sliced(x)) < 1e-5
        assert torch.equal(generate(view, x[:, :4], 10), generate(sliced, x[:, :4], 10))
    # q_proj / o_proj of a budget with fewer query heads per KV group: plain prefixes of the parent's
    layer = 1 if family == "nemotron_h" else 0
    attn = lambda m: m.model.layers[layer].mixer if family == "nemotron_h" else m.model.layers[layer].self_attn
    q, o = attn(budget_view(parent, CASES[family][-1])).q_proj, attn(budget_view(parent, CASES[family][-1])).o_proj
    assert type(q) is type(o) is torch.nn.Linear
    assert q.weight.data_ptr() == attn(parent).q_proj.weight.data_ptr()
    assert o.weight.data_ptr() == attn(parent).o_proj.weight.data_ptr()


def test_serving_order_refuses_what_it_would_get_wrong():
    original = random_parent("nemotron_h")
    parent = use_serving_order(copy.deepcopy(original))
    with pytest.raises(StarElasticError, match="serving order"):
        parent.state_dict()  # so saving, exporting and slice_model refuse too
    with pytest.raises(StarElasticError, match="serving order"):
        slice_model(parent, SPECS["nemotron_h"]["0.75"])
    masks = SPECS["nemotron_h"]["0.75"].masks(parent.config)
    with pytest.raises(ValueError, match="serving order"), masked(parent, masks):
        pass
    with pytest.raises(StarElasticError, match="KV groups"):
        budget_view(parent, SPECS["nemotron_h"]["0.5"])  # drops a KV group
    with pytest.raises(StarElasticError, match="channels"):
        budget_view(parent, ElasticSpec(mamba_num_heads=4, mamba_head_dim=4))
    assert not serving_order_fits(parent.config, [SPECS["nemotron_h"]["0.5"]])
    assert not serving_order_fits(parent.config, [ElasticSpec(mamba_head_dim=4)])
    use_serving_order(parent, False)  # undone: the parent as loaded, bit for bit
    for (name, a), b in zip(parent.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name


def test_engine_uses_serving_order_only_where_every_budget_fits(tmp_path, monkeypatch):
    # SPECS' 0.5 budget drops a KV group: grouped views, the parent as loaded
    engine = ElasticEngine.load(make_checkpoint(tmp_path / "a", "nemotron_h"), serving_order=True)
    assert not any(in_serving_order(m) for m in engine.parent.modules())
    monkeypatch.setitem(SPECS["nemotron_h"], "0.5", CASES["nemotron_h"][2])  # keeps every KV group
    path = make_checkpoint(tmp_path / "b", "nemotron_h")
    engine = ElasticEngine.load(path, serving_order=True)
    assert all(in_serving_order(engine.parent.model.layers[i].mixer) for i in (0, 1))
    original = load_elastic(path).model.eval()
    ids = torch.tensor([[1, 5, 9, 4, 7]])
    for b in engine.budgets:
        view = engine.view(b)
        assert _plain(view) and (view is engine.parent or shares_storage(view, engine.parent))
        want = generate(slice_model(original, engine.ckpt.spec(b)).eval(), ids, 8)[0, 5:].tolist()
        assert engine.generate(b, ids, 8).tokens == want


def test_mamba_decode_in_serving_order_does_not_reorder(monkeypatch):
    """Prefill stores the SSM state rank-major; each decode token then runs rank-major as stored:
    the step matches the parent as loaded on the permuted state, with no head reordering at all."""
    import star_elastic.serve.order as order_mod
    from star_elastic.serve.order import rank_major

    original = random_parent("nemotron_h")
    parent = use_serving_order(copy.deepcopy(original))
    ids = torch.randint(0, 63, (2, 7))
    with torch.no_grad():
        caches = [m.make_cache(2, 16) for m in (original, parent)]
        pos = torch.arange(6)
        for m, cache in zip((original, parent), caches):
            m(ids[:, :6], cache, pos)
        for i, (a, b) in enumerate(zip(*caches)):
            if hasattr(a, "ssm"):  # the same state, heads rank-major
                G = parent.model.layers[i].mixer.n_groups
                assert rel_err(b.ssm, rank_major(a.ssm.flatten(-2), G).view_as(a.ssm)) < 1e-5
        want = original(ids[:, 6:], caches[0], torch.tensor([6]))

        def refuse(*_):
            raise AssertionError("reordered heads in a decode step")
        monkeypatch.setattr(order_mod, "group_major", refuse)
        monkeypatch.setattr(order_mod, "rank_major", refuse)
        got = parent(ids[:, 6:], caches[1], torch.tensor([6]))
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("head_dim", [8, 3])  # 8 divides B and C's 32 rows (one copy for the conv's input), 3 does not
def test_prefill_and_decode_in_serving_order_give_the_plain_orders_logits(head_dim):
    from dataclasses import replace

    from elastic_ckpt import NEMOTRON

    torch.manual_seed(0)
    original = Model(replace(NEMOTRON, mamba_head_dim=head_dim)).eval()
    parent = use_serving_order(copy.deepcopy(original))
    ids = torch.randint(0, 63, (2, 9))
    for a, b in zip(prefill_then_decode(parent, ids), prefill_then_decode(original, ids)):
        assert rel_err(a, b) < 1e-5


def prefill_then_decode(model, ids) -> list:
    """`model`'s logits for a prefill of ids' first 6 tokens, then for each later token decoded one at a time."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    with torch.no_grad():
        cache = model.make_cache(ids.shape[0], 16)
        return [model(ids[:, :6], cache, pos[:6])] + [model(ids[:, i:i + 1], cache, pos[i:i + 1])
                                                      for i in range(6, ids.shape[1])]


def test_the_fused_rank_major_norm_equals_the_written_out_one():
    """What a CUDA decode runs (torch's rms_norm over the groups written group-major, the product written back
    rank-major) against the written-out norm, on z strided as in_proj's output leaves it, fp32 and bf16."""
    from star_elastic.serve.order import rank_major_gated_norm, rank_major_gated_norm_fused

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(2, 3, 8, 2 * 16 + 1, dtype=dtype)[..., :16]  # (b, t, heads, head_dim), rows of 33
        x = torch.randn(2, 3, 8 * 16)
        w = torch.randn(8 * 16, dtype=dtype)
        with torch.no_grad():
            want, got = rank_major_gated_norm(x, z, w, 4, 1e-5), rank_major_gated_norm_fused(x, z, w, 4, 1e-5)
        assert got.dtype == want.dtype and got.shape == want.shape and rel_err(got, want) < 1e-6


def test_a_decode_token_in_serving_order_adds_only_the_unavoidable_copies():
    """Counted by operator on the CPU, a decode token in serving order runs what the plain order runs plus one copy a
    Mamba layer (its conv input gathered from rank-major rows) and two an attention layer (queries to SDPA's order,
    the output back). Before: in_proj's output was split twice, copying the conv input each time, and attention's
    output was reordered and merged in two copies (12 extra here, against 6 now; on an H100 every view, the full
    budget's too, decoded at 0.93x of its slice, thirty-eighth session). The CUDA norm's saving (torch's fused
    rms_norm, four kernels a Mamba layer) does not show on the CPU, where rms_norm is written out in both orders."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import decode_ops

    original = random_parent("nemotron_h")
    parent = use_serving_order(copy.deepcopy(original))
    ids = torch.randint(0, 63, (1, 6))

    def per_token(model):
        return sum(decode_ops(model, ids).values())

    kinds = original.config.layer_types
    extra = per_token(parent) - per_token(original)
    assert 0 < extra <= kinds.count("M") + 2 * kinds.count("*"), extra


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused norm runs on CUDA (run.sh S39 runs this first)")
def test_serving_order_on_cuda_gives_the_plain_orders_logits_through_the_fused_norm(monkeypatch):
    from star_elastic.serve import order

    torch.manual_seed(0)
    original = random_parent("nemotron_h").cuda()
    parent = use_serving_order(copy.deepcopy(original))
    ids = torch.randint(0, 63, (2, 9), device="cuda")
    calls, fused = [], order.rank_major_gated_norm_fused
    monkeypatch.setattr(order, "rank_major_gated_norm_fused", lambda *a: calls.append(1) or fused(*a))
    want, got = prefill_then_decode(original, ids), prefill_then_decode(parent, ids)
    assert calls  # the fused norm ran
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4


def test_head_order_loaded_keeps_the_parent_and_copies_what_the_budgets_keep_per_group(tmp_path, monkeypatch, capsys):
    """`--head-order loaded` (`ElasticEngine.load(serving_order=False)`): the parent stays as loaded (its state dict
    readable), a budget keeping heads per group holds copies of those parts (plain modules, no grouped product), and
    every budget generates what its slice does, from the command line too."""
    from star_elastic import cli
    from star_elastic.serve.views import copied_bytes

    monkeypatch.setitem(SPECS["nemotron_h"], "0.5", CASES["nemotron_h"][2])  # keeps every KV group: the order fits
    path = make_checkpoint(tmp_path / "b", "nemotron_h")
    engine = ElasticEngine.load(path, serving_order=False)
    assert not engine.serving_order and not any(in_serving_order(m) for m in engine.parent.modules())
    engine.parent.state_dict()  # not refused: nothing permuted
    original = load_elastic(path).model.eval()
    ids = torch.tensor([[1, 5, 9, 4, 7]])
    for b in engine.budgets:
        view = engine.view(b)
        assert _plain(view)
        assert (copied_bytes(view) > 0) == (b != "1.0")  # heads kept per group: copied once
        want = generate(slice_model(original, engine.ckpt.spec(b)).eval(), ids, 8)[0, 5:].tolist()
        assert engine.generate(b, ids, 8).tokens == want
    prompt = "w3 w4 w5"
    outs = []
    for order in ("serving", "loaded"):
        assert cli.main(["generate", str(path), "--budget", "0.5", "--prompt", prompt, "--max-new-tokens", "6",
                         "--raw", "--device", "cpu", "--head-order", order]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()
    from star_elastic.serve import app

    served = []
    monkeypatch.setattr(app, "serve", lambda engine, host, port: served.append(engine))
    for order in ("serving", "loaded"):
        assert cli.main(["serve", str(path), "--device", "cpu", "--port", "0", "--head-order", order]) == 0
        assert served[-1].serving_order == (order == "serving")
        assert f"heads {'in serving order' if order == 'serving' else 'as loaded'}" in capsys.readouterr().out
        served[-1].close()
