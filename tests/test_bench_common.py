"""benchmarks/common.py: the shapes the speed and scale benchmarks run at."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_nano_parent_of_issue_14_has_nanos_size():
    """benchmarks/common.NANO_LAYERS with Nano's widths is the 31.6B parent (3.2B active) issue 14 runs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from common import NANO_LAYERS, active_params, nano_config
    from star_elastic.model import Model

    cfg = nano_config()
    assert cfg.layer_types == NANO_LAYERS and [NANO_LAYERS.count(k) for k in "ME*"] == [23, 23, 6]
    with torch.device("meta"):
        model = Model(cfg)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - 31.58) < 0.01
    assert abs(active_params(cfg, model) / 1e9 - 3.23) < 0.01


def test_a_decode_steps_weight_bytes_count_the_experts_its_batch_reaches():
    """common.step_weight_bytes: at batch 1 the active weights (k of E experts, as active_params counts them);
    at larger batches the share of the experts that B tokens reach, toward every weight but the embedding
    table; E read from the layer's own tensors, so a budget with fewer experts reads a larger share of them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import active_params, step_weight_bytes
    from star_elastic.elastic.spec import ElasticSpec
    from star_elastic.model import Model, ModelConfig

    cfg = ModelConfig(vocab_size=100, hidden_size=16, layer_types="ME", mamba_num_heads=4, mamba_head_dim=4,
                      ssm_state_size=4, n_groups=2, n_routed_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=8, moe_shared_expert_intermediate_size=8)
    model = Model(cfg)
    elem = model.lm_head.weight.element_size()
    routed = model.model.layers[1].mixer.experts
    n_routed = routed.up_proj.numel() + routed.down_proj.numel()
    everything = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    assert step_weight_bytes(cfg, model, 1) == active_params(cfg, model) * elem
    assert step_weight_bytes(cfg, model, 4) == (everything - n_routed * (1 - 2 / 8) ** 4) * elem
    assert step_weight_bytes(cfg, model, 10_000) == everything * elem
    small = Model(ElasticSpec(n_routed_experts=4).config(cfg))  # 4 experts kept: 2 of 4 read at batch 1
    e = small.model.layers[1].mixer.experts
    n_small = e.up_proj.numel() + e.down_proj.numel()
    rest = sum(p.numel() for p in small.parameters()) - small.embed.weight.numel() - n_small
    assert step_weight_bytes(small.config, small, 1) == (rest + n_small / 2) * elem


def test_a_decode_steps_state_bytes_are_each_mamba_layers_fp32_state_read_and_written_once():
    """common.step_state_bytes: 2 x batch x heads x head_dim x state x 4 bytes per Mamba layer (none for attention
    or MoE layers), a budget with fewer Mamba heads moving fewer; at Nano's widths and B = 32, 134 MB a layer."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from common import nano_config, step_state_bytes
    from star_elastic.elastic.spec import ElasticSpec
    from star_elastic.model import Model, ModelConfig

    cfg = ModelConfig(vocab_size=100, hidden_size=16, layer_types="M*EM", num_attention_heads=2, num_key_value_heads=1,
                      mamba_num_heads=4, mamba_head_dim=4, ssm_state_size=8, n_groups=2, n_routed_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=8, moe_shared_expert_intermediate_size=8)
    assert step_state_bytes(Model(cfg), 3) == 2 * (2 * 3 * 4 * 4 * 8 * 4)
    assert step_state_bytes(Model(ElasticSpec(mamba_num_heads=2).config(cfg)), 3) == 2 * (2 * 3 * 2 * 4 * 8 * 4)
    with torch.device("meta"):
        nano = Model(nano_config("MEM"))
    assert step_state_bytes(nano, 32) == 2 * 2 * 32 * 64 * 64 * 128 * 4 and abs(step_state_bytes(nano, 32) / 2 - 134e6) < 1e6


def test_the_bandwidth_bound_is_the_cards_own(monkeypatch):
    """A decode step's share of the HBM bound is held against the card it ran on (the thirty-sixth session's H100
    run was first reported against an H200's 4,800 GB/s): an H100 3,350, an H200 4,800, an unknown card and the
    CPU the default."""
    import torch

    import common

    for name, gbs in (("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H200", 4800.0), ("NVIDIA A100", common.HBM_GBS)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert common.hbm_gbs(torch.device("cuda")) == gbs
    assert common.hbm_gbs(torch.device("cpu")) == common.HBM_GBS


def test_a_benchmarks_scratch_folder_is_gone_when_it_exits_even_on_an_error(tmp_path):
    """common.scratch_dir: bench_serve / bench_batching build a checkpoint and its slices there (~13 GB at Nano
    width); it is removed at exit, whether the benchmark ends or fails (a few left behind filled the GPU
    machine's disk in the fifty-fifth session)."""
    import subprocess

    for ends in ("pass", "raise SystemExit(3)", "raise ValueError('boom')"):
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import common\n"
                f"w = common.scratch_dir('bench_t_'); (w / 'ckpt').mkdir(); (w / 'ckpt' / 'a').write_bytes(b'x')\n"
                f"print(w, flush=True)\n{ends}\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
        work = Path(out.stdout.strip())
        assert work.parent == tmp_path and work.name.startswith("bench_t_"), out.stderr
        assert not work.exists(), ends
