"""benchmarks/bench_serve.py --contiguous-views: contiguous copies of a budget view's strided tensors,
made in the view only (the parent is not written), computing what the plain view computes."""

import sys
from pathlib import Path

import pytest
import torch

from elastic_ckpt import SPECS, random_parent
from star_elastic.generate import generate
from star_elastic.model import Experts
from star_elastic.serve.order import use_serving_order
from star_elastic.serve.views import budget_view, shares_storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_serve import contiguous_copies, tensor_pointers  # noqa: E402


def _tensors(model):
    return dict(list(model.named_parameters()) + list(model.named_buffers()))


def _parent(family):
    parent = random_parent(family).requires_grad_(False)
    if family == "nemotron_h":
        use_serving_order(parent)  # as the bench serves it: every 0.75 budget part a prefix
    return parent  # llama: group-major, the 0.75 view holds compact copies of q_proj / o_proj


@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
@pytest.mark.parametrize("mode", ["experts", "linear", "all"])
def test_copies_are_contiguous_equal_and_leave_the_parent_alone(family, mode):
    if family == "llama" and mode == "experts":
        pytest.skip("no MoE layer")
    parent = _parent(family)
    spec = SPECS[family]["0.75"]
    before, values = tensor_pointers(parent), {k: t.clone() for k, t in _tensors(parent).items()}
    plain, view = budget_view(parent, spec), budget_view(parent, spec)
    names, nbytes = contiguous_copies(view, mode)

    got, want = _tensors(view), _tensors(plain)
    assert names and set(names) <= set(view.copied)
    assert nbytes == sum(got[n].numel() * got[n].element_size() for n in set(names) & set(got))
    for n, t in got.items():
        assert torch.equal(t, want[n])  # the same values, copied or not
        chosen = n in names
        if chosen:  # a copy: contiguous, in storage of its own
            assert t.is_contiguous() and not want[n].is_contiguous()
            assert t.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in values.values()}
            assert t.untyped_storage().data_ptr() != want[n].untyped_storage().data_ptr()
        elif n not in plain.copied:  # not chosen (nor a compact view's own copy): the parent's tensor, as before
            assert t.data_ptr() == want[n].data_ptr() and t.stride() == want[n].stride()
    expert_weights = {f"{k}.{leaf}" for k, m in view.named_modules() if isinstance(m, Experts)
                      for leaf in ("up_proj", "down_proj")}
    if mode == "experts":
        assert set(names) == expert_weights  # the routed experts' weights, and nothing else
    if mode == "linear":
        assert not set(names) & expert_weights and any(n.endswith("lm_head.weight") or "proj.weight" in n for n in names)
    if mode == "all":
        assert all(t.is_contiguous() for t in got.values())
    if family == "llama":  # tied embeddings stay tied (one copy)
        assert view.lm_head.weight is view.embed.weight
    assert shares_storage(view, parent)  # every tensor outside view.copied is still the parent's

    x = torch.randint(0, 63, (2, 11))
    with torch.no_grad():
        if mode == "experts":  # the same gathered weights: bit for bit
            assert torch.equal(view(x), plain(x))
        else:  # a contiguous weight may take another GEMM kernel
            torch.testing.assert_close(view(x), plain(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(view, x[:, :5], 8), generate(plain, x[:, :5], 8))

    # the parent: the same tensors at the same addresses, with the same values
    assert tensor_pointers(parent) == before
    assert all(torch.equal(t, values[k]) for k, t in _tensors(parent).items())


def test_none_copies_nothing_and_an_unknown_mode_is_refused():
    parent = _parent("nemotron_h")
    view = budget_view(parent, SPECS["nemotron_h"]["0.75"])
    ptrs = tensor_pointers(view)
    assert contiguous_copies(view, "none") == ([], 0) and tensor_pointers(view) == ptrs
    with pytest.raises(ValueError):
        contiguous_copies(view, "experts,linear")


def test_first_diff_names_where_two_greedy_outputs_part():
    """bench_serve reports where a view's greedy tokens leave its slice's: late is a near tie rounded apart,
    at 0 a different computation; one output a prefix of the other parts at the shorter's length."""
    from bench_serve import first_diff

    a = torch.tensor([5, 6, 7, 8])
    assert first_diff(a, a.clone()) is None
    assert first_diff(a, torch.tensor([5, 6, 9, 8])) == 2
    assert first_diff(a, torch.tensor([1, 6, 7, 8])) == 0
    assert first_diff(a, a[:3]) == 3 and first_diff(a[:2], a) == 2
