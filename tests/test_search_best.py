"""search_spec: the best homogeneous zero-shot architecture over combinations of axes, scored by
calibration perplexity of the sorted parent masked to each candidate (Minitron's search)."""

import math
import random

import pytest
import torch
from conftest import one_line_error, random_parent_config, randomize_

from star_elastic.elastic import ElasticSpec, slice_model, sort_model
from star_elastic.elastic.importance import estimate_importance
from star_elastic.elastic.masking import is_masked
from star_elastic.elastic.search import (DEFAULT_AXES, MIN_FRACTION, calibration_perplexity, choose_spec,
                                         nested_choice, nested_search, search_spec)
from star_elastic.errors import StarElasticError
from star_elastic.evaluate import perplexity
from star_elastic.model import Model, ModelConfig

CFG = ModelConfig(vocab_size=63, hidden_size=32, layer_types="M*EM-", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                  n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                  moe_shared_expert_intermediate_size=16, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def sorted_parent():
    """(importance-sorted random hybrid parent, calibration batches, layer order)."""
    torch.manual_seed(0)
    model = randomize_(Model(CFG)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CFG.vocab_size, (4, 32), generator=g) for _ in range(2)]
    scores = estimate_importance(model, batches, depth=True, progress=False)
    sort_model(model, scores)
    return model, batches, scores["layer_order"].tolist()


def unmasked(model) -> bool:
    return not is_masked(model) and all(type(m).__module__ == "star_elastic.model" or type(m).__module__.startswith("torch")
                                        for m in model.modules())


def total(model) -> int:
    return ElasticSpec().num_parameters(model.config)


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_best_is_the_lowest_perplexity_candidate_and_all_fit(sorted_parent, fraction):
    model, batches, _ = sorted_parent
    target = int(fraction * total(model))
    with torch.no_grad():
        before = model(batches[0])
    spec, records = search_spec(model, target, DEFAULT_AXES, batches)

    assert len(records) > 1
    assert spec.to_dict() == records[0]["spec"]
    ppls = [r["perplexity"] for r in records]
    assert ppls == sorted(ppls) and records[0]["perplexity"] == min(ppls)
    assert len({str(r["spec"]) for r in records}) == len(records)  # identical specs scored once
    for r in records:
        assert MIN_FRACTION * target <= r["params"] <= target
        assert r["params"] == ElasticSpec.from_dict(r["spec"]).num_parameters(model.config)
        assert "depth" not in r["axes"] and r["axes"] == r["combinations"][0]
        assert math.isfinite(r["perplexity"])
    # the masked score is the sliced model's perplexity on the same rows
    small = slice_model(model, spec)
    sliced = math.exp(sum(perplexity(small, b.reshape(-1), seq_len=b.shape[1], batch_size=b.shape[0],
                                     progress=False)["nll"] for b in batches) / len(batches))
    assert records[0]["perplexity"] == pytest.approx(sliced, rel=1e-4)
    # the parent is whole again
    assert unmasked(model)
    with torch.no_grad():
        assert torch.equal(model(batches[0]), before)


def test_depth_only_with_a_layer_order(sorted_parent):
    model, batches, order = sorted_parent
    target = int(0.6 * total(model))
    _, without = search_spec(model, target, ("hidden", "depth"), batches)
    assert [r["combinations"] for r in without] == [[["hidden"]]]
    _, with_order = search_spec(model, target, ("hidden", "depth"), batches, layer_order=order, min_axes=2)
    assert all(c == ["hidden", "depth"] for r in with_order for c in r["combinations"])
    assert any("layers" in r["spec"] for r in with_order)


def test_masks_cleared_when_scoring_raises(sorted_parent):
    model, batches, _ = sorted_parent
    bad = batches[0].clone()
    bad[0, 5] = 10 * CFG.vocab_size  # out of the vocabulary: the embedding lookup raises
    with pytest.raises((IndexError, RuntimeError)):
        search_spec(model, int(0.6 * total(model)), DEFAULT_AXES, [batches[0], bad])
    assert unmasked(model)
    spec = choose_spec(model.config, int(0.6 * total(model)), DEFAULT_AXES)
    with pytest.raises((IndexError, RuntimeError)):
        calibration_perplexity(model, spec, [bad])
    assert unmasked(model)


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_best_at_least_as_good_as_the_combined_shrink(sorted_parent, fraction):
    model, batches, _ = sorted_parent
    target = int(fraction * total(model))
    _, records = search_spec(model, target, DEFAULT_AXES, batches)
    combined = choose_spec(model.config, target, DEFAULT_AXES)
    rec = next(r for r in records if r["spec"] == combined.to_dict())  # a candidate
    assert records[0]["perplexity"] <= rec["perplexity"]
    assert rec["perplexity"] == pytest.approx(calibration_perplexity(model, combined, batches), rel=1e-6)


def test_unreachable_target_is_one_line(sorted_parent):
    model, batches, _ = sorted_parent
    one_line_error(lambda: search_spec(model, 10, DEFAULT_AXES, batches), "no combination", "reach")
    one_line_error(lambda: search_spec(model, total(model) + 1, DEFAULT_AXES, batches), "no combination", "parent")
    one_line_error(lambda: search_spec(model, total(model) // 2, ("depth",), batches), "applies")
    one_line_error(lambda: search_spec(model, total(model) // 2, ("width",), batches), "unknown axis")
    assert unmasked(model)


@pytest.mark.parametrize("seed", range(4))
def test_random_parents(seed):
    """Random Llama / NemotronH parents (conftest): the best fits the target whenever the combined
    shrink does and is no worse than it."""
    rng = random.Random(seed)
    cfg = random_parent_config(rng)
    model = randomize_(Model(cfg), seed).eval()
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16), generator=g)]
    target = int(0.7 * total(model))
    try:
        combined = choose_spec(cfg, target, DEFAULT_AXES)
    except StarElasticError:  # too coarse a parent for this target: the search may still find one
        combined = None
    try:
        spec, records = search_spec(model, target, DEFAULT_AXES, batches)
    except StarElasticError:
        assert combined is None
        return
    assert MIN_FRACTION * target <= spec.num_parameters(cfg) <= target
    assert spec.is_homogeneous(cfg) and unmasked(model)
    if combined is not None:
        assert records[0]["perplexity"] <= next(r["perplexity"] for r in records if r["spec"] == combined.to_dict())


def test_spec_nesting_compares_every_kept_unit_and_layer():
    ffn = ElasticSpec(intermediate_size=32)
    assert ElasticSpec(intermediate_size=16).within(ffn, CFG) and ffn.within(ElasticSpec(), CFG)
    assert not ElasticSpec().within(ffn, CFG)  # the parent keeps FFN units 32..63 that ffn drops
    assert not ElasticSpec(hidden_size=16).within(ffn, CFG)  # narrower, but with the whole FFN
    assert ElasticSpec(hidden_size=16, intermediate_size=32).within(ffn, CFG)
    assert not ElasticSpec(layers=[0, 1, 2]).within(ElasticSpec(layers=[0, 1, 3]), CFG)
    assert ElasticSpec(layers=[0, 1]).within(ElasticSpec(layers=[0, 1, 3]), CFG)


def test_the_router_start_nests_the_larger_budgets_around_the_smallest_budgets_best():
    """Each budget's own best need not nest in the larger budget's (SmolLM2: 0.75 FFN 832, 0.5 hidden
    360 + FFN 960). The smallest budget keeps its best candidate that the larger budgets can contain;
    each larger budget takes its best candidate containing it."""
    rec = lambda ppl, **spec: {"spec": spec, "perplexity": ppl}  # noqa: E731
    big = [rec(10.0, intermediate_size=16), rec(1000.0, hidden_size=24), rec(30.0, hidden_size=16)]
    small = [rec(20.0, hidden_size=16, intermediate_size=40), rec(21.0, intermediate_size=8)]
    specs, nested = nested_choice(CFG, [big, small])
    # not (FFN 16, FFN 8), the lower total perplexity: the smallest budget's best decides
    assert nested and [s.to_dict() for s in specs] == [{"hidden_size": 24}, small[0]["spec"]]
    assert specs[1].within(specs[0], CFG)
    # the own bests, when they nest, are kept
    specs, nested = nested_choice(CFG, [big, [rec(15.0, intermediate_size=8)] + small])
    assert nested and [s.to_dict() for s in specs] == [{"intermediate_size": 16}, {"intermediate_size": 8}]
    # the smallest budget's best fits no larger candidate: its next best that does
    specs, nested = nested_choice(CFG, [big[:1], small])
    assert nested and [s.to_dict() for s in specs] == [{"intermediate_size": 16}, {"intermediate_size": 8}]
    # three budgets: each contains the next smaller
    mid = [rec(30.0, hidden_size=24, intermediate_size=48), rec(35.0, hidden_size=16)]
    specs, nested = nested_choice(CFG, [[rec(5.0, hidden_size=28)], mid, small])
    assert nested and [s.to_dict() for s in specs] == [{"hidden_size": 28}, mid[0]["spec"], small[0]["spec"]]
    # nothing nests: each budget's own best, and the caller is told
    specs, nested = nested_choice(CFG, [[rec(10.0, intermediate_size=16)], [rec(20.0, hidden_size=16)]])
    assert not nested and [s.to_dict() for s in specs] == [{"intermediate_size": 16}, {"hidden_size": 16}]


def test_a_floor_keeps_every_candidate_around_the_smaller_budget(sorted_parent):
    """`choose_spec` / `search_spec` with a floor: every candidate contains the floor and fits the target;
    a floor no spec of the target can hold is a one-line error."""
    model, batches, _ = sorted_parent
    big, small = int(0.75 * total(model)), int(0.5 * total(model))
    floor = choose_spec(CFG, small, ("hidden", "experts"))  # hidden cut, 7 of 8 experts, every FFN neuron
    assert not floor.within(choose_spec(CFG, big, ("ffn", "experts")), CFG)  # drops experts and FFN it keeps
    spec, records = search_spec(model, big, DEFAULT_AXES, batches, floor=floor)
    assert records and floor.within(spec, CFG)
    for r in records:
        assert floor.within(ElasticSpec.from_dict(r["spec"]), CFG) and MIN_FRACTION * big <= r["params"] <= big
    one_line_error(lambda: choose_spec(CFG, small, ("hidden", "experts"), floor=ElasticSpec()), "target")


# a Llama whose FFN holds most parameters, as SmolLM2's does, and a landscape of calibration perplexity
# shaped like SmolLM2's: any hidden cut costs a step, deep FFN cuts cost more (`P` its exponent)
WIDE_FFN = ModelConfig(family="llama", vocab_size=64, hidden_size=64, layer_types="**", num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=256, mlp_gated=True, mlp_act="silu",
                       tie_word_embeddings=True)


def test_a_ceiling_keeps_every_candidate_inside_the_larger_budget(sorted_parent):
    """`choose_spec` / `search_spec` with a ceiling: every candidate fits in it and the target; a
    ceiling too small for the target, or one cutting an axis the combination leaves whole, is refused."""
    model, batches, _ = sorted_parent
    big, small = int(0.75 * total(model)), int(0.5 * total(model))
    ceiling = choose_spec(CFG, big, ("ffn", "experts"))
    assert not choose_spec(CFG, small, ("hidden", "experts")).within(ceiling, CFG)  # keeps FFN the ceiling drops
    spec, records = search_spec(model, small, DEFAULT_AXES, batches, ceiling=ceiling)
    assert records and spec.within(ceiling, CFG)
    for r in records:
        assert ElasticSpec.from_dict(r["spec"]).within(ceiling, CFG) and MIN_FRACTION * small <= r["params"] <= small
    half = int(0.5 * ElasticSpec().num_parameters(WIDE_FFN))  # a hidden cut leaves the FFN the ceiling cuts
    one_line_error(lambda: choose_spec(WIDE_FFN, half, ("hidden",), ceiling=ElasticSpec(intermediate_size=160)),
                   "does not fit inside")
    one_line_error(lambda: choose_spec(CFG, big, ("hidden", "ffn"), ceiling=choose_spec(CFG, small, ("ffn",))),
                   "target")


@pytest.mark.parametrize("p, first", [(3, "largest"), (2, "smallest")])
def test_nested_search_keeps_the_plan_that_loses_least_against_each_budgets_best(monkeypatch, p, first):
    """The budgets' own bests do not nest (0.75 = FFN cut, 0.5 = hidden cut, as on SmolLM2). Smallest
    first moves the 0.75 to a hidden cut; largest first keeps its FFN cut and fits the 0.5 inside it.
    nested_search keeps whichever loses less in total log perplexity against the own bests: on SmolLM2
    smallest first (the only plan before) cost the trained 0.75 12-13% (docs/RESULTS.md §9)."""
    from star_elastic.elastic import search

    def landscape(model, spec, batches, device=None):
        rh, rf = (spec.hidden_size or 64) / 64, (spec.intermediate_size or 256) / 256
        return math.exp((0.0 if rh == 1 else 1 + 8 * (1 - rh)) + 30 * (1 - rf) ** p)

    monkeypatch.setattr(search, "calibration_perplexity", landscape)
    model, batches, axes = Model(WIDE_FFN).eval(), [torch.zeros(1, 4, dtype=torch.long)], ("hidden", "ffn")
    n = ElasticSpec().num_parameters(WIDE_FFN)
    big, small = int(0.75 * n), int(0.5 * n)
    (own_big, big_records), (own_small, small_records) = (search_spec(model, t, axes, batches) for t in (big, small))
    assert own_small.hidden_size < 64 and own_small.intermediate_size is None  # a hidden cut
    assert own_big == ElasticSpec(intermediate_size=160) if p == 3 else own_big.hidden_size < 64  # FFN only if p = 3
    assert not own_small.within(own_big, WIDE_FFN)
    plans = []
    specs, nested = nested_search(model, [big, small], [big_records, small_records], axes, batches, plans=plans)
    assert nested and specs[1].within(specs[0], WIDE_FFN)
    assert [p["order"] for p in plans] == ["smallest first", "largest first"]
    assert [p["order"] for p in plans if p["chosen"]] == [f"{first} first"]
    assert min(plans, key=lambda p: p["loss"])["specs"] == [s.to_dict() for s in specs]
    # the two plans, by hand
    grown = search_spec(model, big, axes, batches, floor=own_small)
    fitted = search_spec(model, small, axes, batches, ceiling=own_big)
    loss = lambda ppls: sum(math.log(x / b) for x, b in zip(ppls, (big_records[0]["perplexity"],  # noqa: E731
                                                                   small_records[0]["perplexity"])))
    smallest_first = ([grown[0], own_small], loss([grown[1][0]["perplexity"], small_records[0]["perplexity"]]))
    largest_first = ([own_big, fitted[0]], loss([big_records[0]["perplexity"], fitted[1][0]["perplexity"]]))
    want = largest_first if first == "largest" else smallest_first
    other = smallest_first if first == "largest" else largest_first
    assert want[1] < other[1] and specs == want[0]


def test_nested_search_grows_the_larger_budget_around_the_smallest(sorted_parent):
    """The larger budget keeps its own best when that holds the smaller's; else the best spec for its
    target that does, found by the floor search (not only among its own records)."""
    model, batches, _ = sorted_parent
    big, small = int(0.75 * total(model)), int(0.5 * total(model))
    rec = lambda spec: {"spec": spec.to_dict(), "perplexity": 1.0}  # noqa: E731
    own, floor = choose_spec(CFG, big, ("ffn", "experts")), choose_spec(CFG, small, ("hidden", "experts"))
    specs, nested = nested_search(model, [big, small], [[rec(own)], [rec(floor)]], DEFAULT_AXES, batches)
    assert nested and specs[1] == floor and specs[0] != own
    assert floor.within(specs[0], CFG) and specs[0].num_parameters(CFG) <= big
    assert specs[0] == search_spec(model, big, DEFAULT_AXES, batches, floor=floor)[0]  # the floor search's best
    inner = ElasticSpec(hidden_size=16, intermediate_size=16, n_routed_experts=3)
    specs, nested = nested_search(model, [big, small], [[rec(own)], [rec(inner)]], DEFAULT_AXES, batches)
    assert nested and specs == [own, inner]  # already nested: kept as they are
