"""Budget views: submodels over the parent's own tensors (no copies) that compute what the sliced
standalone model computes."""

import pytest
import torch

from conftest import rel_err
from elastic_ckpt import SPECS, random_parent
from star_elastic.elastic import ElasticSpec, slice_model
from star_elastic.generate import generate
from star_elastic.serve.views import GroupedLinear, PartsConv1d, budget_view, grouped, shares_storage

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
    view, sliced = budget_view(parent, spec), slice_model(parent, spec).eval()
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
    view, sliced = budget_view(parent, spec), slice_model(parent, spec).eval()
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
