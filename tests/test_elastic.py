"""Elastic core: specs and their validation, the function-preserving sort, masked execution inside
the parent, slicing (sliced == masked over random specs and parents) and export."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (hf_model, llama_config, nemotron_config, one_line_error, ours_from, random_parent_config,
                      random_spec, randomize_, rel_err)
from star_elastic import hf
from star_elastic.elastic import ElasticSpec, count_parameters, export, permutations, slice_model, sort_model
from star_elastic.elastic.masking import is_masked, mask_shapes, masked
from star_elastic.elastic.spec import unit_counts
from star_elastic.model import Model, ModelConfig

TOL = 1e-5  # fp32, ours against ours
HF_TOL = 1e-4  # against transformers' own implementation
VOCAB = 64

# 7 layers, every block type; 3 KV groups of 2 query heads, 2 Mamba groups of 4 heads, 2 router groups
NEMOTRON = ModelConfig(family="nemotron_h", vocab_size=VOCAB, hidden_size=24, layer_types="M*-EM*E",
                       num_attention_heads=6, num_key_value_heads=3, head_dim=8, intermediate_size=40,
                       mamba_num_heads=8, mamba_head_dim=6, ssm_state_size=8, n_groups=2, chunk_size=8,
                       n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=12,
                       moe_shared_expert_intermediate_size=20, n_group=2, topk_group=1, norm_topk_prob=True,
                       routed_scaling_factor=1.5, time_step_min=0.001, bos_token_id=1, eos_token_id=2)
NEMOTRON_LATENT = ModelConfig(**{**NEMOTRON.to_dict(), "moe_latent_size": 10, "mamba_bias": True, "mlp_bias": True,
                                 "n_group": 1, "norm_topk_prob": False, "layer_types": "E-M*E"})
LLAMA = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=24, layer_types="***", num_attention_heads=6,
                    num_key_value_heads=2, head_dim=8, intermediate_size=40, mlp_gated=True, mlp_act="silu",
                    rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
LLAMA_BIAS = ModelConfig(**{**LLAMA.to_dict(), "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False})
PARENTS = {"nemotron": NEMOTRON, "nemotron-latent-bias": NEMOTRON_LATENT, "llama-tied": LLAMA,
           "llama-bias": LLAMA_BIAS}


def parent(cfg: ModelConfig, seed: int = 0) -> Model:
    return randomize_(Model(cfg), seed).eval()


def ids(seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


def random_scores(cfg: ModelConfig, seed: int = 0) -> dict:
    """Scores for every axis, in the format of importance.estimate_importance (plus keys it ignores)."""
    g = torch.Generator().manual_seed(seed)
    counts = unit_counts(cfg)
    scores = {k: torch.rand(n, generator=g) for k, n in counts.items() if not k.endswith("kv_heads")}
    for k in [k for k in scores if k.endswith(".expert_ffn")]:
        scores[k] = torch.rand(counts[k.replace("expert_ffn", "experts")], counts[k], generator=g)
    scores["meta"] = {"method": "random"}
    scores["layer_order"] = torch.arange(cfg.num_layers)
    return scores


# ----------------------------------------------------------------------------- spec

def test_spec_json_round_trip():
    spec = ElasticSpec(hidden_size=16, layers=[0, 2, 3], num_attention_heads=2,
                       mamba_num_heads=[4, None, None, None, 6, None, None],
                       n_routed_experts=[None] * 3 + [4] + [None] * 3)
    text = spec.to_json()
    assert ElasticSpec.from_json(text) == spec
    assert json.loads(text) == spec.to_dict() and "intermediate_size" not in json.loads(text)  # None omitted
    assert ElasticSpec.from_json("{}") == ElasticSpec()


@pytest.mark.parametrize("text,words", [
    ('{"attention_heads": 2}', ["unknown axis", "attention_heads"]),
    ('{"hidden_size": [8, 8]}', ["hidden_size", "integer"]),
    ('{"intermediate_size": true}', ["intermediate_size", "integer"]),
    ('{"intermediate_size": "8"}', ["intermediate_size"]),
    ("{nope", ["not valid json"]),
    ("[1, 2]", ["json object"]),
])
def test_spec_from_json_errors(text, words):
    one_line_error(lambda: ElasticSpec.from_json(text), *words)


@pytest.mark.parametrize("cfg,kwargs,words", [
    (NEMOTRON, dict(mamba_num_heads=3), ["layer 0", "mamba_num_heads=3", "not divisible", "n_groups=2"]),
    (NEMOTRON, dict(intermediate_size=41), ["layer 2", "larger than the parent", "40"]),
    (NEMOTRON, dict(hidden_size=25), ["hidden_size=25", "larger than the parent"]),
    (NEMOTRON, dict(hidden_size=0), ["hidden_size", "positive"]),
    (NEMOTRON, dict(moe_intermediate_size=0), ["moe_intermediate_size", "at least 1"]),
    (NEMOTRON, dict(mamba_head_dim=[0, None, None, None, 6, None, None]), ["layer 0", "at least 1"]),
    (NEMOTRON, dict(layers=[0, 7]), ["unknown layer index 7", "0..6"]),
    (NEMOTRON, dict(layers=[1, 1]), ["twice"]),
    (NEMOTRON, dict(layers=[]), ["at least one layer"]),
    (NEMOTRON, dict(mamba_num_heads=[4, 4]), ["mamba_num_heads", "2 entries", "7 layers"]),
    (NEMOTRON, dict(num_attention_heads=[None, 4, None, None, None, 2, None, None]), ["8 entries"]),
    (NEMOTRON, dict(mamba_num_heads=[None, 4, None, None, None, None, None]),
     ["mamba_num_heads[1]", "attention block"]),
    (NEMOTRON, dict(num_attention_heads=4), ["layer 1", "not a multiple of num_key_value_heads=3"]),
    (NEMOTRON, dict(num_attention_heads=6, num_key_value_heads=2), ["3 per group", "parent has 2"]),
    (NEMOTRON, dict(num_key_value_heads=4), ["num_key_value_heads=4", "larger than the parent"]),
    (NEMOTRON, dict(n_routed_experts=1), ["fewer than num_experts_per_tok=2"]),
    (NEMOTRON, dict(n_routed_experts=5), ["not a multiple of n_group=2"]),
    (NEMOTRON, dict(n_routed_experts=2), ["1 expert per router group"]),
    (NEMOTRON, dict(n_routed_experts=9), ["larger than the parent"]),
    (LLAMA, dict(mamba_num_heads=2), ["mamba_num_heads", "no layer"]),
])
def test_spec_validation_errors(cfg, kwargs, words):
    spec = ElasticSpec(**kwargs)
    one_line_error(lambda: spec.validate(cfg), *words)
    one_line_error(lambda: spec.config(cfg))  # everything that resolves a spec validates it first


def test_spec_config_homogeneous_and_per_layer():
    spec = ElasticSpec(hidden_size=16, layers=[0, 1, 2, 3, 5, 6], num_key_value_heads=2,
                       mamba_num_heads=[2, None, None, None, 6, None, None],  # layer 4 is dropped: homogeneous
                       n_routed_experts=[None, None, None, 4, None, None, 6], mamba_head_dim=4)
    cfg = spec.config(NEMOTRON)
    assert cfg.layer_types == "M*-E*E" and cfg.hidden_size == 16
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)  # every head of the kept groups
    assert (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.intermediate_size) == (2, 4, 40)
    assert cfg.layer_sizes == [{}, {}, {}, {"n_routed_experts": 4}, {}, {"n_routed_experts": 6}]
    assert cfg.n_routed_experts == 4  # the plain field is a real layer's value
    assert not spec.is_homogeneous(NEMOTRON)
    assert ElasticSpec(n_routed_experts=[None, None, None, 6, None, None, 6]).is_homogeneous(NEMOTRON)
    assert ElasticSpec().config(NEMOTRON) == NEMOTRON


def test_spec_per_layer_attention_keeps_query_and_kv_together():
    spec = ElasticSpec(num_key_value_heads=[None, 1, None], num_attention_heads=[4, 2, 6])
    cfg = spec.config(LLAMA)
    assert cfg.layer_sizes == [{"num_attention_heads": 4, "num_key_value_heads": 2},
                               {"num_attention_heads": 2, "num_key_value_heads": 1},
                               {"num_attention_heads": 6, "num_key_value_heads": 2}]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)


def test_masks_and_indices_are_prefixes_per_group():
    spec = ElasticSpec(hidden_size=20, num_attention_heads=2, num_key_value_heads=2, mamba_num_heads=4,
                       n_routed_experts=4, layers=[0, 1, 2, 3, 4, 5])
    m = spec.masks(NEMOTRON)
    assert m["hidden"].tolist() == [1] * 20 + [0] * 4
    assert m["layers.1.attn_heads"].tolist() == [1, 0, 1, 0, 0, 0]  # 1 head in each of the first 2 KV groups
    assert m["layers.0.mamba_heads"].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]  # 2 heads in each of the 2 groups
    assert m["layers.3.experts"].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    assert m["layers.6"].item() == 0 and "layers.5" not in m
    assert "layers.6.experts" not in m  # dropped layers need no unit masks
    assert spec.indices(NEMOTRON)["layers.1.kv_heads"].tolist() == [0, 1]
    # on a device they come in one transfer, views of one tensor: same keys, shapes and dtype ("meta" stands in
    # for a GPU here; on a GPU each copy from the host waits for its queue)
    far = spec.masks(NEMOTRON, device="meta", dtype=torch.bfloat16)
    assert {k: (v.shape, v.device.type, v.dtype) for k, v in far.items()} == {
        k: (v.shape, "meta", torch.bfloat16) for k, v in m.items()}
    bases = {id(v._base) for v in far.values()}
    assert len(bases) == 1 and None not in (v._base for v in far.values())


# ----------------------------------------------------------------------------- sort

def axes_of(cfg):
    return ["hidden"] + sorted({k.split(".")[-1] for k in unit_counts(cfg) if k.startswith("layers.")} - {"kv_heads"})


SORT_CASES = [(name, axis) for name, cfg in PARENTS.items() for axis in axes_of(cfg) + ["all"]]


@pytest.mark.parametrize("name,axis", SORT_CASES, ids=[f"{n}-{a}" for n, a in SORT_CASES])
def test_sort_preserves_function_and_puts_most_important_first(name, axis):
    cfg = PARENTS[name]
    model = parent(cfg)
    x = ids()
    with torch.no_grad():
        before = model(x)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    scores = random_scores(cfg, seed=3)
    if axis != "all":
        scores = {k: v for k, v in scores.items() if k == axis or k.endswith("." + axis)}
    perms = sort_model(model, scores)
    with torch.no_grad():
        after = model(x)
    assert rel_err(after, before) < TOL
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, old[k])]
    assert changed, "the sort moved nothing"
    if cfg.tied:
        assert model.lm_head.weight is model.embed.weight
    # re-sorting by the permuted scores is the identity: the most important unit now comes first
    permuted = {}
    for key, s in scores.items():
        if key in perms:
            p = perms[key]
            permuted[key] = s.gather(-1, p) if p.dim() == 2 else s[p]
    for key, p in permutations(cfg, permuted).items():
        assert torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)), key


def test_sort_ranks_heads_within_groups_and_kv_groups_by_total():
    scores = {"layers.1.attn_heads": torch.tensor([0.1, 0.2, 0.9, 0.0, 0.5, 0.6]),  # groups: .3, .9, 1.1
              "layers.0.mamba_heads": torch.tensor([1, 4, 2, 3, 9, 8, 7, 6.]),  # group 0 stays first
              "layers.3.experts": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7.])}
    p = permutations(NEMOTRON, scores)
    assert p["layers.1.kv_heads"].tolist() == [2, 1, 0]
    assert p["layers.1.attn_heads"].tolist() == [5, 4, 2, 3, 1, 0]
    assert p["layers.0.mamba_heads"].tolist() == [1, 3, 2, 0, 4, 5, 6, 7]
    assert p["layers.3.experts"].tolist() == [3, 2, 1, 0, 7, 6, 5, 4]


def test_sort_by_a_baseline_expert_score_and_bad_scores():
    scores = {"layers.3.experts": torch.arange(8.), "layers.3.experts_freq": torch.arange(8.).flip(0)}
    assert permutations(NEMOTRON, scores)["layers.3.experts"].tolist() == [3, 2, 1, 0, 7, 6, 5, 4]
    assert permutations(NEMOTRON, scores, experts_key="experts_freq")["layers.3.experts"].tolist() == list(range(8))
    one_line_error(lambda: permutations(NEMOTRON, {"layers.2.attn_heads": torch.rand(6)}), "layers.2.attn_heads")
    one_line_error(lambda: permutations(NEMOTRON, {"hidden": torch.rand(23)}), "hidden", "(23,)", "(24,)")
    one_line_error(lambda: permutations(NEMOTRON, {"layers.9.ffn": torch.rand(40)}), "layers.9.ffn")


# ----------------------------------------------------------------------------- masks

def test_no_masks_and_all_ones_masks_change_nothing():
    model = parent(NEMOTRON)
    x = ids()
    with torch.no_grad():
        before = model(x)
        counts = unit_counts(NEMOTRON)
        ones = {k: torch.ones(n) for k, n in counts.items() if not k.endswith("kv_heads")}
        ones.update({f"layers.{i}": torch.ones(()) for i in range(NEMOTRON.num_layers)})
        assert set(ones) == set(mask_shapes(model))  # every key the model takes
        with masked(model, ones):
            assert is_masked(model)
            assert rel_err(model(x), before) < TOL
        assert not is_masked(model)
        assert torch.equal(model(x), before)


def test_masks_reject_unknown_keys_and_shapes():
    model = parent(NEMOTRON)
    x = ids()
    with torch.no_grad():
        before = model(x)
    for masks, match in (({"layers.0.ffn": torch.ones(40)}, "layers.0.ffn"),  # layer 0 is a Mamba block
                         ({"hidden": torch.ones(23)}, "shape"), ({"layers.2": torch.ones(1)}, "shape")):
        with pytest.raises(ValueError, match=match), masked(model, masks):
            pass
    assert not is_masked(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_masks_nest_and_come_off_whatever_happens():
    """An inner block replaces the outer masks and gives them back; an error inside still unmasks."""
    model, x = parent(NEMOTRON), ids()
    small = {"layers.2.ffn": (torch.arange(40) < 10).float(), "hidden": (torch.arange(24) < 16).float()}
    with torch.no_grad():
        full = model(x)
        with masked(model, small):
            outer = model(x)
            with masked(model, {"layers.1.attn_heads": (torch.arange(6) < 2).float()}):
                inner = model(x)
            assert torch.equal(model(x), outer)
            with masked(model, {}):
                assert torch.equal(model(x), full)
        assert rel_err(outer, full) > 1e-3 and rel_err(inner, full) > 1e-3 and rel_err(inner, outer) > 1e-3
        with pytest.raises(RuntimeError, match="inside"), masked(model, small):
            raise RuntimeError("inside")
        assert not is_masked(model) and torch.equal(model(x), full)
    assert all(type(m).__module__ == "star_elastic.model" or type(m).__module__.startswith("torch")
               for m in model.modules())  # every swapped class is back
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def _scale_(model, key, unit, a):
    """Scale, in the weights, what a soft mask of value `a` on `unit` of `key` should scale."""
    layer = model.model.layers[int(key.split(".")[1])]
    if key.endswith("ffn"):
        layer.mixer.down_proj.weight[:, unit] *= a
    elif key.endswith("attn_heads"):
        hd = layer.mixer.head_dim
        layer.mixer.o_proj.weight[:, unit * hd:(unit + 1) * hd] *= a
    elif key.endswith("experts"):
        layer.mixer.experts.down_proj[unit] *= a


@pytest.mark.parametrize("key,unit", [("layers.2.ffn", 5), ("layers.1.attn_heads", 3), ("layers.3.experts", 6)])
def test_soft_masks_scale_their_units(key, unit):
    """A fractional mask weights a unit's contribution; gradients reach the mask."""
    model, x = parent(NEMOTRON), ids()
    mask = torch.ones(unit_counts(NEMOTRON)[key])
    mask[unit] = 0.3
    mask.requires_grad_(True)
    with masked(model, {key: mask}):
        got = model(x)
    got.square().mean().backward()
    assert mask.grad is not None and mask.grad[unit] != 0
    _scale_(model, key, unit, 0.3)
    with torch.no_grad():
        assert rel_err(got.detach(), model(x)) < TOL


def test_soft_hidden_and_depth_masks_are_differentiable():
    model, x = parent(NEMOTRON), ids()
    hidden = torch.linspace(1, 0.2, 24).requires_grad_(True)
    depth = torch.tensor(0.5, requires_grad=True)
    heads = torch.linspace(1, 0.1, 8).requires_grad_(True)
    with masked(model, {"hidden": hidden, "layers.4": depth, "layers.0.mamba_heads": heads}):
        model(x).square().mean().backward()
    for t in (hidden, depth, heads):
        assert t.grad is not None and t.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- sliced == masked

@pytest.mark.parametrize("seed", range(30))
def test_sliced_equals_masked_random_specs(seed):
    rng = random.Random(seed)
    cfg = random_parent_config(rng)
    model = parent(cfg, seed)
    if rng.random() < 0.5:  # a sorted parent is a random parent too; exercise both paths
        sort_model(model, random_scores(cfg, seed))
    spec = random_spec(cfg, rng)
    spec = ElasticSpec.from_json(spec.to_json())
    x = ids(seq=rng.choice([1, 5, 11]), seed=seed)
    with torch.no_grad():
        full = model(x)
        with masked(model, spec.masks(cfg)):
            under_masks = model(x)
        small = slice_model(model, spec)
        sliced = small(x)
    sub_cfg = spec.config(cfg)
    assert small.config == sub_cfg
    assert small.num_parameters() == spec.num_parameters(cfg) == count_parameters(sub_cfg)
    assert count_parameters(cfg) == model.num_parameters()
    assert rel_err(sliced, under_masks) < TOL, spec
    if spec.num_parameters(cfg) < model.num_parameters():  # the masks did something
        assert rel_err(under_masks, full) > 1e-3
    if cfg.tied:
        assert small.lm_head.weight is small.embed.weight


def test_full_spec_slices_to_the_parent_exactly():
    for cfg in PARENTS.values():
        model = parent(cfg)
        small = slice_model(model, ElasticSpec())
        x = ids()
        with torch.no_grad():
            assert torch.equal(small(x), model(x))
        for (k, a), b in zip(model.state_dict().items(), small.state_dict().values()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), k  # equal values, own storage


def test_sliced_decoding_with_cache_equals_masked():
    """The cached paths (Mamba one-token step, static KV cache) honour the masks too."""
    model = parent(NEMOTRON)
    spec = ElasticSpec(hidden_size=16, num_key_value_heads=2, num_attention_heads=2, mamba_head_dim=4,
                       mamba_num_heads=[2, None, None, None, 6, None, None], n_routed_experts=6,
                       layers=[0, 1, 3, 4, 5, 6])
    small = slice_model(model, spec)
    x = ids(seq=6)
    outs = []
    with torch.no_grad(), masked(model, spec.masks(NEMOTRON)):
        for m in (model, small):
            cache = m.make_cache(2, 10)
            logits = [m(x, cache, torch.arange(6))]
            for t in range(6, 10):
                logits.append(m(x[:, t - 6:t - 5], cache, torch.tensor([t])))
            outs.append(torch.cat(logits, dim=1))
    assert rel_err(outs[1], outs[0]) < TOL


# ----------------------------------------------------------------------------- export

def hf_logits(directory, x):
    # eager experts: transformers' default grouped_mm needs 16-byte strides on CPU, odd widths fail
    ref, info = AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True, dtype=torch.float32,
                                                     experts_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():  # no cache: transformers 5.24's cache fails on a NemotronH without attention layers
        return ref.eval()(x, use_cache=False).logits, ref.config


@pytest.mark.parametrize("name,spec", [
    ("nemotron", ElasticSpec(hidden_size=16, layers=[0, 1, 2, 3, 6], num_attention_heads=2, num_key_value_heads=1,
                             mamba_num_heads=4, mamba_head_dim=4, intermediate_size=20, n_routed_experts=4,
                             moe_intermediate_size=6, moe_shared_expert_intermediate_size=10)),
    ("nemotron-latent-bias", ElasticSpec(hidden_size=20, layers=[0, 1, 2, 4], n_routed_experts=[3, None, None, None, 3],
                                         mamba_num_heads=6)),
    ("llama-tied", ElasticSpec(hidden_size=16, layers=[0, 2], num_attention_heads=4, intermediate_size=24)),
    ("llama-bias", ElasticSpec(num_attention_heads=3, num_key_value_heads=1, intermediate_size=[8, 8, 8])),
])
def test_export_homogeneous_loads_in_transformers(tmp_path, name, spec):
    cfg = PARENTS[name]
    model = parent(cfg)
    sort_model(model, random_scores(cfg, 1))
    small = slice_model(model, spec)
    assert small.config.layer_sizes is None
    out = export(small, tmp_path / "small")
    x = ids()
    got, hf_cfg = hf_logits(out, x)
    with torch.no_grad():
        assert rel_err(got, small(x)) < HF_TOL
    kept = len(spec.layers or range(cfg.num_layers))
    if cfg.family == "llama":
        assert hf_cfg.num_hidden_layers == kept
    else:
        assert len(hf_cfg.layers_block_type) == kept
    assert hf_cfg.hidden_size == (spec.hidden_size or cfg.hidden_size)
    back = hf.load(out)
    with torch.no_grad():
        assert rel_err(back(x), small(x)) < TOL


@pytest.mark.parametrize("make,spec", [
    (nemotron_config, ElasticSpec(layers=[0, 1, 3], n_routed_experts=4, hidden_size=24)),
    (llama_config, ElasticSpec(layers=[1], intermediate_size=20, num_attention_heads=2)),
], ids=["nemotron_h", "llama"])
def test_export_of_a_transformers_parent_keeps_its_config(tmp_path, make, spec):
    ref = hf_model(make(pad_token_id=7))
    model = ours_from(ref, clone=True)
    model.hf_config = ref.config.to_dict()  # as hf.load keeps it
    small = slice_model(model, spec)
    out = export(small, tmp_path / "small")
    x = ids()
    got, hf_cfg = hf_logits(out, x)
    with torch.no_grad():
        assert rel_err(got, small(x)) < HF_TOL
    assert hf_cfg.pad_token_id == 7 and hf_cfg.num_hidden_layers == len(spec.layers)


def test_export_per_layer_sizes_in_own_format(tmp_path, capsys):
    model = parent(NEMOTRON)
    spec = ElasticSpec(hidden_size=20, layers=[0, 1, 2, 3, 4, 6], mamba_num_heads=[2, None, None, None, 6, None, None],
                       n_routed_experts=[None, None, None, 4, None, None, 6],
                       num_attention_heads=[None, 2, None, None, None, 6, None],
                       num_key_value_heads=[None, 1, None, None, None, 3, None])
    small = slice_model(model, spec)
    out = export(small, tmp_path / "hetero")
    err = capsys.readouterr().err
    assert "per-layer" in err and "transformers" in err and "star_elastic.load" in err
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["StarElasticForCausalLM"] and raw["model_type"] == "star_elastic"
    assert raw["star_elastic"]["model_type"] == "nemotron_h"
    assert raw["star_elastic"]["layer_sizes"] == small.config.layer_sizes
    assert len(raw["layers_block_type"]) == 6
    with pytest.raises(ValueError, match="star_elastic"):  # transformers refuses it by name
        AutoModelForCausalLM.from_pretrained(str(out))
    back = hf.load(out)
    assert back.config == small.config
    x = ids()
    with torch.no_grad():
        assert rel_err(back(x), small(x)) < TOL
    one_line_error(lambda: hf.save_pretrained(back, tmp_path / "stock"), "per-layer")


def test_load_rejects_bad_per_layer_sizes(tmp_path):
    small = slice_model(parent(NEMOTRON), ElasticSpec(n_routed_experts=[None, None, None, 4, None, None, 6]))
    out = export(small, tmp_path / "hetero")
    raw = json.loads((out / "config.json").read_text())
    raw["star_elastic"]["layer_sizes"] = raw["star_elastic"]["layer_sizes"][:3]
    (out / "config.json").write_text(json.dumps(raw))
    one_line_error(lambda: hf.load(out), "config.json", "layer_sizes")
