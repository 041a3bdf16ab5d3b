"""benchmarks/bench_saved.py: the bytes each kind of layer keeps for backward, with stand-ins for the GPU
kernels that keep what the kernels keep, so that the CPU counts what a GPU step keeps."""

import json
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def one_layer(kind: str, **hf):
    """A bf16 model of one layer of `kind` (a layers_block_type) at bench_speed's tiny config (`hf` overriding
    it), and a 64-token row."""
    from bench_speed import hf_config

    from star_elastic.hf import config_from_hf
    from star_elastic.model import Model

    hc = hf_config(True)
    hc.layers_block_type, hc.num_hidden_layers = [kind], 1
    for k, v in hf.items():
        setattr(hc, k, v)
    cfg = config_from_hf(hc.to_dict())
    return cfg, Model(cfg).to(torch.bfloat16), torch.randint(0, cfg.vocab_size, (1, 64))


def kept_with_stand_ins(model, x, **how) -> list:
    """bench_saved.kept (eager) with the kernels' stand-ins in place; `how`: its masks / keep_full."""
    import bench_saved

    with ExitStack() as stack:
        bench_saved.kernels_in(stack, "stand-in", torch.device("cpu"), conv=False)
        return bench_saved.kept(model, x, compiled=False, **how)


def test_each_kind_of_layer_is_counted_and_the_kernels_are_put_back(tmp_path):
    import bench_saved
    from star_elastic import kernels
    from star_elastic import model as model_module

    before = (kernels._load, kernels.uses_triton, model_module.uses_grouped_mm)
    bench_saved.main(["--model", "tiny", "--tokens", "64", "--json", str(tmp_path / "saved.json")])
    assert (kernels._load, kernels.uses_triton, model_module.uses_grouped_mm) == before
    res = json.loads((tmp_path / "saved.json").read_text())
    eager = res["modes"]["eager"]
    assert set(eager["layers"]) == {"Mamba", "MoE", "attention"} and eager["whole_model_counts_every_kind"]
    assert all(r["kb_per_token"] > 0 for r in eager["layers"].values()) and eager["rest_kb_per_token"] > 0
    assert eager["whole_model_kb_per_token"] > 23 * min(r["kb_per_token"] for r in eager["layers"].values())
    assert res["fused_mamba_kb_per_token"] > 0


def test_a_mamba_layer_keeps_the_scan_kernels_tensors_and_not_the_padded_conv_input():
    """Under the stand-ins a Mamba layer keeps what mamba_chunk_scan_combined keeps (dA_cumsum, (b, heads, t) in
    fp32), and not the zero-padded conv input (b, channels, t + k - 1) that autograd kept before the conv was
    recomputed in backward."""
    cfg, model, x = one_layer("linear_attention")
    shapes = {(dtype, shape) for _, dtype, shape in kept_with_stand_ins(model, x)}
    assert ("float32", (1, cfg.mamba_num_heads, 64)) in shapes
    channels = cfg.mamba_num_heads * cfg.mamba_head_dim + 2 * cfg.n_groups * cfg.ssm_state_size
    assert not any(shape == (1, channels, 64 + cfg.conv_kernel - 1) for _, shape in shapes)


def test_a_moe_layer_keeps_one_hidden_wide_copy_of_each_routed_token():
    """Under the grouped GEMM's stand-in a MoE layer keeps the routed token copies (tokens x top_k, hidden) for
    the up projection's gradient, and no second such tensor: the routing weights scale the activation before
    the down projection, so its output is not kept for their gradient (it was, 6 x 2688 values a token at Nano)."""
    from bench_speed import hf_config

    # the experts' widths apart from the hidden size, so that a shape names its tensor
    cfg, model, x = one_layer("moe", moe_intermediate_size=hf_config(True).hidden_size // 2)
    shapes = [shape for _, _, shape in kept_with_stand_ins(model, x)]
    copies = 64 * cfg.num_experts_per_tok
    assert (copies, cfg.moe_intermediate_size) in shapes  # the experts ran on the grouped path
    assert shapes.count((copies, cfg.hidden_size)) == 1
    # and two activation-wide ones: the up projection's output and the down projection's input; the
    # activation's own output is recomputed in backward, not kept beside them
    assert shapes.count((copies, cfg.moe_intermediate_size)) == 2


@pytest.mark.parametrize("run", ["masks", "keep_full"])
def test_a_masked_or_own_norm_mamba_layer_keeps_about_what_a_plain_one_keeps(run):
    """Under a smaller budget's soft masks (bench_saved.budget_masks, as training's masked steps run), or as the
    full anchor's pass runs under elastify --keep-full (the full budget's delta and its own norm weights), a
    Mamba layer keeps little more than plain: the masked or own-weight gated norm is recomputed in backward, not
    run as a swapped-in forward whose fp32 intermediates autograd kept (at the 539M config, eager, 94.7 and
    84.8 KB a token against 36.6 plain)."""
    _, model, x = one_layer("mamba")
    total = {on: sum(n for n, _, _ in kept_with_stand_ins(model, x, **{run: on})) for on in (False, True)}
    assert total[False] < total[True] < 1.3 * total[False]
