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
    import bench_saved
    from bench_speed import hf_config

    from star_elastic.hf import config_from_hf
    from star_elastic.model import Model

    hc = hf_config(True)
    hc.layers_block_type, hc.num_hidden_layers = ["linear_attention"], 1
    cfg = config_from_hf(hc.to_dict())
    model = Model(cfg).to(torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (1, 64))
    with ExitStack() as stack:
        bench_saved.kernels_in(stack, "stand-in", torch.device("cpu"), conv=False)
        shapes = {(dtype, shape) for _, dtype, shape in bench_saved.kept(model, x, compiled=False)}
    assert ("float32", (1, cfg.mamba_num_heads, 64)) in shapes
    channels = cfg.mamba_num_heads * cfg.mamba_head_dim + 2 * cfg.n_groups * cfg.ssm_state_size
    assert not any(shape == (1, channels, 64 + cfg.conv_kernel - 1) for _, shape in shapes)


def test_a_moe_layer_keeps_one_hidden_wide_copy_of_each_routed_token():
    """Under the grouped GEMM's stand-in a MoE layer keeps the routed token copies (tokens x top_k, hidden) for
    the up projection's gradient, and no second such tensor: the routing weights scale the activation before
    the down projection, so its output is not kept for their gradient (it was, 6 x 2688 values a token at Nano)."""
    import bench_saved
    from bench_speed import hf_config

    from star_elastic.hf import config_from_hf
    from star_elastic.model import Model

    hc = hf_config(True)
    hc.layers_block_type, hc.num_hidden_layers = ["moe"], 1
    hc.moe_intermediate_size = hc.hidden_size // 2  # widths apart, so a shape names its tensor
    cfg = config_from_hf(hc.to_dict())
    model = Model(cfg).to(torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (1, 64))
    with ExitStack() as stack:
        bench_saved.kernels_in(stack, "stand-in", torch.device("cpu"), conv=False)
        shapes = [shape for _, _, shape in bench_saved.kept(model, x, compiled=False)]
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
    import bench_saved
    from bench_speed import hf_config

    from star_elastic.hf import config_from_hf
    from star_elastic.model import Model

    hc = hf_config(True)
    hc.layers_block_type, hc.num_hidden_layers = ["mamba"], 1
    cfg = config_from_hf(hc.to_dict())
    model = Model(cfg).to(torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (1, 64))
    total = {}
    for on in (False, True):
        with ExitStack() as stack:
            bench_saved.kernels_in(stack, "stand-in", torch.device("cpu"), conv=False)
            total[on] = sum(n for n, _, _ in bench_saved.kept(model, x, compiled=False, **{run: on}))
    assert total[False] < total[True] < 1.3 * total[False]
