"""Budget views: submodels over the parent's own tensors that compute what the sliced standalone
model computes; no copies with compact=False, and with compact views (the default) copies of only the
parts a grouped bmm would run."""

import pytest
import torch

from conftest import rel_err
from elastic_ckpt import SPECS, random_parent
from elastic_ckpt import make_checkpoint
from star_elastic.elastic import ElasticSpec, slice_model
from star_elastic.generate import generate
from star_elastic.serve.engine import ElasticEngine
from star_elastic.serve.views import (GroupedLinear, PartsConv1d, budget_view, copied_bytes, grouped,
                                      shares_storage)

CASES = [(family, name) for family in SPECS for name in SPECS[family]] + [
    # per-layer (heterogeneous) sizes, including a Mamba layer that keeps all heads of one group count
    ("nemotron_h", ElasticSpec(num_attention_heads=[None, 2, None, None, None, 6],
                               num_key_value_heads=[None, 1, None, None, None, 2],
                               mamba_num_heads=[2, None, None, 6, None, None], hidden_size=24)),
    ("nemotron_h", ElasticSpec(mamba_num_heads=2, num_attention_heads=8, n_routed_experts=6, layers=[0, 2, 3])),
]


def _spec(family, name):
    return SPECS[family][name] if isinstance(name, str) else name


def _storage_bytes(*models) -> int:
    seen = {}
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n if isinstance(n, str) else i}" for i, (f, n) in enumerate(CASES)])
def test_view_equals_sliced_model_and_copies_nothing(family, name):
    parent = random_parent(family)
    spec = _spec(family, name)
    view, sliced = budget_view(parent, spec, compact=False), slice_model(parent, spec).eval()
    assert view.config == sliced.config
    assert view.num_parameters() == sliced.num_parameters() == spec.num_parameters(parent.config)
    # every tensor of the view lies in one of the parent's storages
    assert view.copied == [] and shares_storage(view, parent)
    assert _storage_bytes(parent, view) == _storage_bytes(parent)
    x = torch.randint(0, 63, (2, 13))
    with torch.no_grad():
        got, want = view(x), sliced(x)
    assert rel_err(got, want) < 1e-5
    assert torch.equal(generate(view, x[:, :5], 12), generate(sliced, x[:, :5], 12))  # caches sized for the view


def test_mamba_channels_with_heads_per_group_are_copied_and_named():
    """The one layout no strided view expresses: copied once, listed, and still exact."""
    parent = random_parent("nemotron_h")
    spec = ElasticSpec(mamba_num_heads=4, mamba_head_dim=[4, None, None, None, None, None])
    view, sliced = budget_view(parent, spec, compact=False), slice_model(parent, spec).eval()
    assert view.copied and all(n.startswith("model.layers.0.mixer.") for n in view.copied)
    assert shares_storage(view, parent)  # everything else is a view
    view.copied = []
    assert not shares_storage(view, parent)  # the listed ones really are copies
    x = torch.randint(0, 63, (2, 9))
    with torch.no_grad():
        assert rel_err(view(x), sliced(x)) < 1e-5


def test_views_follow_the_parent_in_place():
    """Views, not copies: a change to the parent's weights shows in the view."""
    parent = random_parent("llama")
    view = budget_view(parent, SPECS["llama"]["0.5"])
    x = torch.randint(0, 63, (1, 6))
    with torch.no_grad():
        before = view(x)
        parent.model.layers[0].self_attn.q_proj.weight.mul_(3)
        after = view(x)
    assert rel_err(before, after) > 1e-3


def test_grouped_views_and_modules():
    t = torch.arange(48.0).view(12, 4)
    g = grouped(t, 0, 3, 2, 2)  # first 2 rows of each of the first 2 groups of 4
    assert g.shape == (2, 2, 4) and g.data_ptr() == t.data_ptr() and torch.equal(g[1, 0], t[4])
    assert grouped(t, 0, 3, 3, 4).shape == (12, 4) and grouped(t, 0, 3, 1, 2).shape == (2, 4)  # merged
    x = torch.randn(5, 4)
    lin = GroupedLinear([g, t[:3]])
    want = torch.cat([x @ t[[0, 1, 4, 5]].T, x @ t[:3].T], -1)
    assert torch.allclose(lin(x), want)
    w = torch.randn(3, 12)
    cols = GroupedLinear([grouped(w, 1, 3, 3, 2)], in_groups=True)  # columns 0,1, 4,5, 8,9
    xi = torch.randn(5, 6)
    assert torch.allclose(cols(xi), xi @ w[:, [0, 1, 4, 5, 8, 9]].T, atol=1e-6)
    conv_w, xc = torch.randn(6, 3), torch.randn(2, 6, 7)
    conv = PartsConv1d([grouped(conv_w[:4], 0, 2, 2, 1), conv_w[4:]], [None, None])  # channels 0, 2, 4, 5
    keep = [0, 2, 4, 5]
    want = torch.nn.functional.conv1d(xc[:, :4], conv_w[keep, None], groups=4)
    assert torch.allclose(conv(xc[:, :4]), want, atol=1e-6)


def _grouped_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (GroupedLinear, PartsConv1d))]


@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n if isinstance(n, str) else i}" for i, (f, n) in enumerate(CASES)])
def test_compact_view_equals_sliced_model(family, name):
    """Compact views (the default): no grouped module; the copies are the sliced model's own tensors,
    listed, and counted by copied_bytes; everything else still lies in the parent's storage."""
    parent = random_parent(family)
    spec = _spec(family, name)
    view, sliced = budget_view(parent, spec), slice_model(parent, spec).eval()
    assert view.config == sliced.config and view.num_parameters() == sliced.num_parameters()
    assert _grouped_modules(view) == []
    assert shares_storage(view, parent)
    # the listed tensors are distinct copies, and copied_bytes is exactly what the view adds to the parent
    assert _storage_bytes(parent, view) == _storage_bytes(parent) + copied_bytes(view)
    state = sliced.state_dict()
    views = dict(view.named_parameters())
    for n in view.copied:
        assert torch.equal(views[n], state[n]) and views[n].is_contiguous()
    x = torch.randint(0, 63, (2, 13))
    with torch.no_grad():
        got, want = view(x), sliced(x)
    assert rel_err(got, want) < 1e-6
    assert torch.equal(generate(view, x[:, :5], 12), generate(sliced, x[:, :5], 12))


@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
def test_compact_copies_only_the_grouped_parts(family):
    """Heads kept per KV group (and, in the hybrid, Mamba heads kept per group): compact=False runs
    them as grouped bmm views; compact copies exactly q_proj / o_proj (in_proj, conv1d, out_proj)
    weights and the grouped biases, and runs plain nn.Linear / conv like the sliced model."""
    parent = random_parent(family)
    spec = SPECS[family]["0.75"]
    assert _grouped_modules(budget_view(parent, spec, compact=False))  # the grouped layout this replaces
    view, sliced = budget_view(parent, spec), slice_model(parent, spec).eval()
    assert _grouped_modules(view) == []
    attn = "self_attn" if family == "llama" else "mixer"
    attention = [i for i, t in enumerate(view.config.layer_types) if t == "*"]
    want = {f"model.layers.{i}.{attn}.{p}" for i in attention for p in ("q_proj.weight", "o_proj.weight")}
    if family == "nemotron_h":  # attention_bias and mamba_bias: q_proj's bias is per group, o_proj's a prefix
        want |= {f"model.layers.{i}.mixer.q_proj.bias" for i in attention}
        mamba = [i for i, t in enumerate(view.config.layer_types) if t == "M"]
        want |= {f"model.layers.{i}.mixer.{p}" for i in mamba for p in
                 ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "out_proj.weight", "dt_bias",
                  "A_log", "D")}  # the per-head vectors too: as strided views they were copied at every token
        assert mamba and all(isinstance(view.model.layers[i].mixer.conv1d, torch.nn.Conv1d) for i in mamba)
    assert set(view.copied) == want and len(view.copied) == len(want)
    assert all(type(view.get_submodule(n.rsplit(".", 1)[0])) is torch.nn.Linear for n in want if "_proj." in n)
    params = dict(view.named_parameters())
    assert copied_bytes(view) == sum(params[n].numel() * params[n].element_size() for n in want) > 0
    assert shares_storage(view, parent)  # k_proj, v_proj, o_proj's bias, Mamba's norm weight: views
    view.copied = []
    assert not shares_storage(view, parent)  # the listed ones really are copies
    x = torch.randint(0, 63, (2, 9))
    with torch.no_grad():
        assert torch.allclose(view(x), sliced(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compact", [True, False])
def test_engine_greedy_generation_equals_the_sliced_model(tmp_path, compact):
    """Through the engine (the hybrid's 0.5 budget drops a KV group, so no serving order: 0.75 keeps
    attention and Mamba heads per group), greedy tokens equal the sliced model's."""
    engine = ElasticEngine.load(make_checkpoint(tmp_path / "ckpt", "nemotron_h"), compact_views=compact)
    assert not engine.serving_order
    view = engine.view("0.75")
    assert bool(view.copied) == compact and bool(_grouped_modules(view)) != compact
    sliced = slice_model(engine.parent, engine.ckpt.spec("0.75")).eval()
    ids = torch.randint(3, 63, (1, 7), generator=torch.Generator().manual_seed(0))
    got = engine.generate("0.75", ids, 12)
    want = generate(sliced, ids, 12, eos_token_id=engine.eos_ids)[0, ids.shape[-1]:].tolist()
    assert got.tokens == want and len(want) > 0
