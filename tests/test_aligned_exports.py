"""Aligned sizes and exports that run (issue 13).

Kept widths are aligned for GPUs by default (`spec.aligned_multiple`) in the zero-shot search and the
router's choices, and never what stock transformers cannot run (`spec.stock_multiple`). A budget
chosen by the default search, exported as a Hugging Face checkpoint, loads with
`AutoModelForCausalLM.from_pretrained` *and runs a forward pass* on the path transformers takes by
default on a CPU (MoE experts through `torch.nn.functional.grouped_mm`, which needs strides of 16
bytes), with our sliced model's logits: random parents (conftest's `random_parent_config`) and random
parameter fractions, seeded."""

import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import NANO, SMOLLM2, random_parent_config, randomize_, rel_err
from star_elastic.elastic import export, slice_model, sort_model
from star_elastic.elastic.importance import random_importance
from star_elastic.elastic.router import Router, RouterConfig
from star_elastic.elastic.search import DEFAULT_AXES, applicable_axes, choose_spec
from star_elastic.elastic.spec import ElasticSpec, aligned_multiple, count_parameters, stock_multiple
from star_elastic.errors import StarElasticError
from star_elastic.model import Model, ModelConfig

TOL = 1e-4  # fp32, relative (norm) error of the logits

# The issue's case: a small hybrid NemotronH with MoE (no latent projection), sliced to 0.75 of its
# parameters. Before alignment the search chose hidden_size 117 here; transformers loaded the export
# and then failed in its MoE: "torch._grouped_mm: strides should be multiple of 16 bytes".
ISSUE_PARENT = ModelConfig(family="nemotron_h", vocab_size=64, hidden_size=128, layer_types="M*E-",
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                           mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=8,
                           n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1,
                           bos_token_id=1, eos_token_id=2)


def transformers_forward(directory, x, dtype=torch.float32, moe: bool = False):
    """Logits of the checkpoint in `directory` as stock transformers runs it: `from_pretrained` with
    its defaults, no missing / unexpected / mismatched keys. `moe`: the model has MoE layers, which
    must run through `torch.nn.functional.grouped_mm` (transformers' default experts on a CPU)."""
    ref, info = AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    calls, grouped_mm = [], torch.nn.functional.grouped_mm

    def counted(*args, **kwargs):
        calls.append(1)
        return grouped_mm(*args, **kwargs)

    torch.nn.functional.grouped_mm = counted
    try:
        with torch.no_grad():  # no cache: transformers 5.24's cache fails on a NemotronH without attention layers
            logits = ref.eval()(x, use_cache=False).logits
    finally:
        torch.nn.functional.grouped_mm = grouped_mm
    if moe:  # the path that needs 16-byte strides, not a fallback
        assert ref.config._experts_implementation == "grouped_mm" and calls
    return logits


def test_issue_moe_slice_runs_on_transformers_grouped_gemm(tmp_path):
    model = randomize_(Model(ISSUE_PARENT), seed=3).eval()
    total = count_parameters(ISSUE_PARENT)
    x = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    for frac in (0.75, 0.5):
        spec = choose_spec(ISSUE_PARENT, int(frac * total))
        sub = spec.config(ISSUE_PARENT)
        assert sub.hidden_size % 8 == 0 and sub.moe_intermediate_size % 8 == 0, spec
        small = slice_model(model, spec)
        out = export(small, tmp_path / f"{frac}")
        with torch.no_grad():
            ours = small(x)
        assert rel_err(transformers_forward(out, x, moe=True), ours) < TOL, spec
        # bf16, the dtype checkpoints are served in, needs multiples of 8 (16 bytes): it runs too
        assert torch.isfinite(transformers_forward(out, x, torch.bfloat16, moe=True)).all()


def test_spec_stock_tools_cannot_run_is_refused_in_one_line():
    with pytest.raises(StarElasticError) as e:
        ElasticSpec(hidden_size=86).validate_stock(ISSUE_PARENT)
    msg = str(e.value)
    assert "\n" not in msg and "hidden_size=86" in msg and "multiple of 8" in msg and "grouped" in msg, msg
    with pytest.raises(StarElasticError, match="moe_intermediate_size=20 is not a multiple of 8"):
        ElasticSpec(moe_intermediate_size=20).validate_stock(ISSUE_PARENT)
    ElasticSpec(hidden_size=88, moe_intermediate_size=24, intermediate_size=37).validate_stock(ISSUE_PARENT)
    # a latent MoE runs its experts in the latent space: the hidden size is free, the expert width is not
    latent = replace(ISSUE_PARENT, moe_latent_size=64)
    ElasticSpec(hidden_size=86).validate_stock(latent)
    assert stock_multiple(latent, "hidden_size") == 1 and stock_multiple(latent, "moe_intermediate_size") == 8
    # no MoE: nothing runs through the grouped GEMM
    assert stock_multiple(replace(ISSUE_PARENT, layer_types="M*-"), "hidden_size") == 1


# ----------------------------------------------------------------------------- the alignment rule

FFN_WIDTHS = ("intermediate_size", "moe_intermediate_size", "moe_shared_expert_intermediate_size")


def test_aligned_multiple_rule():
    # the largest of 64 / 32 / 16 / 8 that divides the parent's width and leaves >= 8 sizes; every
    # size under 128 channels (test-sized models)
    assert [aligned_multiple(n) for n in (4096, 2688, 1536, 1856, 576, 512, 384, 256, 192, 128, 120, 64, 32)] == \
        [64, 64, 64, 64, 64, 64, 32, 32, 16, 16, 1, 1, 1]
    assert aligned_multiple(1000) == 8 and aligned_multiple(130) == 1  # 64 does not divide 1000
    assert aligned_multiple(9, 64) == 64 and aligned_multiple(4, 8) == 1  # heads x head_dim
    assert aligned_multiple(576, base=18) == 72  # Llama: a multiple of every query-head count (LlamaConfig)
    assert aligned_multiple(32, required=8) == 8  # what stock tools need comes first
    assert aligned_multiple(576, multiple=64) == 64 and aligned_multiple(48, multiple=16, required=8) == 16
    with pytest.raises(StarElasticError, match="positive"):
        aligned_multiple(64, multiple=0)


@pytest.mark.parametrize("cfg", [SMOLLM2, NANO], ids=["smollm2", "nano"])
def test_search_and_router_widths_are_aligned_by_default(cfg):
    total = count_parameters(cfg)
    axes = [a for a in ("hidden", "attention", "mamba", "mamba_channels", "ffn", "experts", "expert_ffn", "shared_ffn")
            if a in applicable_axes(cfg)]
    hidden_step = 72 if cfg is SMOLLM2 else 64  # SmolLM2: lcm(8, its 3 / 6 / 9 query heads)
    for frac in (0.4, 0.6, 0.8):
        spec = choose_spec(cfg, int(frac * total), axes)
        sub = spec.config(cfg)
        assert sub.hidden_size % hidden_step == 0, spec
        for f in FFN_WIDTHS:
            assert getattr(sub, f) % 64 == 0 or getattr(sub, f) == getattr(cfg, f), (f, spec)
        assert sub.num_attention_heads * sub.head_dim % 64 == 0, spec
        assert sub.mamba_num_heads * sub.mamba_head_dim % 64 == 0, spec  # Nano's 64-channel heads: any count
        spec.validate_stock(cfg)
    # the router: aligned widths in steps of about 1/16 of the parent's (RouterConfig.width_choices)
    r = Router(cfg, 2, RouterConfig(axes=tuple(axes)))
    for name, slot in r.slots.items():
        if slot.axis in ("hidden", "ffn", "expert_ffn", "shared_ffn"):
            step, n = slot.sizes[0], slot.sizes[-1]
            assert step % (hidden_step if slot.axis == "hidden" else 64) == 0, (name, slot.sizes)
            assert slot.sizes == list(range(step, n, step)) + [n] and 8 <= len(slot.sizes) <= 32, (name, slot.sizes)
    assert Router(cfg, 2, RouterConfig(axes=("ffn",) if cfg is SMOLLM2 else ("expert_ffn",), width_multiple=None)
                  ).slots["ffn" if cfg is SMOLLM2 else "expert_ffn"].sizes[0] % 64 != 0  # the old steps, as trained


def test_explicit_multiple():
    cfg = ISSUE_PARENT
    spec = choose_spec(cfg, int(0.6 * count_parameters(cfg)), DEFAULT_AXES + ("expert_ffn",), multiple=32)
    sub = spec.config(cfg)
    assert all(getattr(sub, f) % 32 == 0 for f in ("hidden_size", "intermediate_size", "moe_intermediate_size"))
    # --multiple 1: every size, but never one that stock transformers cannot run (MoE: multiples of 8)
    spec = choose_spec(cfg, int(0.6 * count_parameters(cfg)), ("hidden", "ffn"), multiple=1)
    assert spec.hidden_size % 8 == 0
    sizes = Router(cfg, 2, RouterConfig(axes=("hidden", "ffn"), width_multiple=1)).slots
    assert sizes["hidden"].sizes == list(range(8, 129, 8)) and sizes["ffn"].sizes == list(range(1, 97))


# ----------------------------------------------------------------------------- property: random parents

def stock_parent(rng: random.Random, family: str) -> ModelConfig:
    """A random parent of `family` from conftest's generator, widened to sizes stock transformers runs
    itself: hidden x8 (a multiple of the query heads for Llama, as LlamaConfig requires; 96 to 192
    channels, so that the widest are aligned by the default rule, the others not), FFN x2,
    expert FFN widths rounded up to multiples of 8 (grouped-GEMM strides of 16 bytes), and no
    attention biases on NemotronH (transformers 5.24's NemotronH attention is built with bias=False
    whatever its config's attention_bias says: it would drop them as unexpected keys)."""
    while (cfg := random_parent_config(rng)).family != family:
        pass
    hidden = 8 * cfg.hidden_size
    if family == "llama":
        hidden = cfg.num_attention_heads * -(-hidden // cfg.num_attention_heads)
    return replace(cfg, hidden_size=hidden, intermediate_size=2 * cfg.intermediate_size,
                   moe_intermediate_size=8 * -(-2 * cfg.moe_intermediate_size // 8),
                   attention_bias=cfg.attention_bias and family == "llama")


@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
@pytest.mark.parametrize("seed", range(10))
def test_random_budget_exports_run_in_transformers(tmp_path, family, seed):
    rng = random.Random(f"export-runs-{family}-{seed}")
    cfg = stock_parent(rng, family)
    model = randomize_(Model(cfg), seed=seed).eval()
    sort_model(model, random_importance(model, seed=seed))
    order = list(range(cfg.num_layers))
    rng.shuffle(order)
    extra = [a for a in ("mamba_channels", "expert_ffn", "shared_ffn", "depth") if a in applicable_axes(cfg)]
    x = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    total, done = count_parameters(cfg), 0
    for attempt in range(12):
        axes = list(DEFAULT_AXES) + rng.sample(extra, rng.randint(0, len(extra)))
        frac = rng.uniform(0.35, 0.97)
        try:
            spec = choose_spec(cfg, int(frac * total), axes, layer_order=order)
        except StarElasticError:  # a target below what these axes reach on so small a parent
            continue
        spec.validate_stock(cfg)
        sub = spec.config(cfg)
        for f in FFN_WIDTHS + (("hidden_size",) if family != "llama" else ()):  # Llama: also a multiple of heads
            n, v = getattr(cfg, f), getattr(sub, f)
            assert v == n or v % aligned_multiple(n, required=stock_multiple(cfg, f)) == 0, (f, spec)
        small = slice_model(model, spec)
        out = export(small, tmp_path / f"{attempt}")
        with torch.no_grad():
            ours = small(x)
        assert rel_err(transformers_forward(out, x, moe="E" in small.config.layer_types), ours) < TOL, (cfg, spec)
        done += 1
        if done == 2:
            break
    assert done >= 1, cfg
