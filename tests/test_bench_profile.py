"""benchmarks/bench_kernels.py --parts profile: where a training step's time goes, by category."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_kernels import categorise, timed_rows  # noqa: E402


def test_gpu_kernel_names_land_in_their_categories():
    # names as torch.profiler reports them on an H100 / H200
    assert categorise("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT") == "GEMM"
    assert categorise("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "GEMM"
    assert categorise("_chunk_scan_fwd_kernel") == "Mamba scan (Triton)"
    assert categorise("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention (SDPA)"
    assert categorise("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>") \
        == "elementwise"
    assert categorise("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>") == \
        "softmax / distillation loss"
    assert categorise("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer (AdamW)"
    assert categorise("something_new") == "other"
    # torch._grouped_mm's kernel on an H200 is a cutlass GemmUniversal over a GroupProblemShape
    assert categorise("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13Gemm"
                      "UniversalINS5_17GroupProblemShapeIN4cute5tupleIJiiiEEEEE") == "grouped GEMM (MoE experts)"


def test_a_gpu_user_annotation_is_not_counted_beside_the_kernels_it_spans():
    """The optimiser's `record_function` range shows on the GPU timeline with the device time of the
    kernels inside it; counted as a row of its own it made AdamW look twice as costly."""
    from types import SimpleNamespace as E

    events = [E(key="Optimizer.step#AdamW.step", device_type="DeviceType.CUDA", is_user_annotation=True,
                self_device_time_total=28.0, self_cpu_time_total=1.0),
              E(key="multi_tensor_apply_kernel<FusedAdamMathFunctor>", device_type="DeviceType.CUDA",
                is_user_annotation=False, self_device_time_total=28.0, self_cpu_time_total=0.0),
              E(key="aten::_fused_adamw_", device_type="DeviceType.CPU", is_user_annotation=False,
                self_device_time_total=0.0, self_cpu_time_total=3.0)]
    assert timed_rows(events, cuda=True) == [("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 28.0)]
    assert [name for name, _ in timed_rows(events, cuda=False)] == ["Optimizer.step#AdamW.step", "aten::_fused_adamw_"]


def test_the_profile_part_runs_and_accounts_for_the_whole_step(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--tiny", "--parts", "profile",
                        "--device", "cpu", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    prof = json.loads(out.read_text())["profile"]
    shares = [c["share"] for c in prof["categories"].values()]
    assert abs(sum(shares) - 1) < 1e-3 and prof["categories"]["GEMM"]["share"] > 0
    assert prof["total_ms_per_step"] > 0 and len(prof["top"]) > 5
    # each operator with its callers: backward work names the forward operator whose gradient it is
    ops = [r["op"] for r in prof["top_ops"]]
    assert len(ops) > 5 and any(op.startswith("aten::mm < aten::matmul < aten::linear") for op in ops)
    assert any("Backward" in op for op in ops) and any(" < " in op for op in ops)


def test_the_smollm2_shapes_are_smollm2s():
    import torch

    from common import smollm2_config
    from star_elastic.model import Model

    with torch.device("meta"):
        model = Model(smollm2_config())
    assert model.num_parameters() == 134_515_008  # SmolLM2-135M-Instruct's count, as loaded (RESULTS §9)


def test_active_parameters_leave_out_the_embedding_lookup_and_the_unchosen_experts():
    """One helper for every benchmark's MFU (benchmarks/common.py). bench_fsdp's own copy once looked
    for `embed_tokens`, which a NemotronH model does not have, and counted the 352M-parameter table:
    1.58B active for its 10.1B parent instead of 1.23B, MFU 14.5% instead of 11.3%."""
    import torch

    from common import active_params, nano_config, smollm2_config
    from star_elastic.model import Model

    cfg = nano_config("MEMEM*EMEMEM*EME")
    with torch.device("meta"):
        model = Model(cfg)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for k, p in model.named_parameters() if ".experts." in k and "shared" not in k)
    unchosen = routed * (1 - 6 / 128)
    assert active_params(cfg, model) == total - model.embed.weight.numel() - unchosen
    assert round(active_params(cfg, model) / 1e9, 2) == 1.23
    with torch.device("meta"):
        tied = Model(smollm2_config())
    assert active_params(tied.config, tied) == tied.num_parameters()  # the tied table is the LM head: counted once


def test_the_one_rank_fsdp_variant_trains_what_the_plain_step_trains(monkeypatch):
    """bench_kernels.py --parts train's "_fsdp1" rows: FSDP2 over a group of this one process (on a GPU its bf16
    gathers cast each block's weights once a pass instead of at every use). On the CPU, in fp32, it runs the
    same steps as the plain trainer from the same start: the same budgets and distillation losses, and it
    leaves no process group behind."""
    import copy

    import pytest
    import torch
    import torch.distributed as dist

    from bench_kernels import _train, step_setup, tiny_config

    from star_elastic import parallel

    sharded = []
    shard_model = parallel.shard_model
    monkeypatch.setattr(parallel, "shard_model", lambda m, **kw: sharded.append(m) or shard_model(m, **kw))
    cfg = tiny_config()
    model, teacher, budgets, rows = step_setup(cfg, torch.device("cpu"), 2, 64)
    runs = {}
    for shard in ("none", "fsdp"):
        torch.manual_seed(1)  # the router's start
        logs, _ = _train(copy.deepcopy(model), copy.deepcopy(teacher), cfg, budgets, rows, 2, 64, 4,
                         torch.device("cpu"), shard=shard)
        runs[shard] = logs
    assert len(sharded) == 2 and not dist.is_initialized()  # the fsdp run's student and teacher, sharded
    assert [lg["budget"] for lg in runs["fsdp"]] == [lg["budget"] for lg in runs["none"]]
    kd = {k: [lg["kd"] for lg in v if "kd" in lg] for k, v in runs.items()}
    assert len(kd["none"]) >= 3 and kd["fsdp"] == pytest.approx(kd["none"], rel=1e-4, abs=1e-6)


def test_the_kd_curve_part_trains_each_path_from_one_start():
    """bench_kernels.py --parts kdcurve: the reference path twice and the fast default from copies of one start
    draw the same budgets; on the CPU (fp32, deterministic) the reference repeats itself exactly and the fused KD
    follows it to rounding over the steps."""
    import torch

    from bench_kernels import part_kdcurve

    out = part_kdcurve(torch.device("cpu"), True, "MEM*EM", 1, 64, 6, have_triton=False, compile_step=False,
                       apart=True)
    runs = out["variants"]
    # apart: each fast part alone; with no Triton and no compile only the fused KD is a part of its own
    # in the order they ran: the parts alone first, so that a device call cut short has them
    assert list(runs) == ["reference", "fused_kd_only", "einsum_fused_kd", "reference_again"]
    assert all(r["same_budgets"] and len(r["kd"]) == 6 for r in runs.values())
    assert runs["reference_again"]["kd"] == runs["reference"]["kd"]
    assert runs["reference_again"]["mean_signed_gap_to_reference"] == 0
    assert runs["fused_kd_only"]["kd"] == runs["einsum_fused_kd"]["kd"]  # the same path, named twice
    assert abs(runs["einsum_fused_kd"]["mean_signed_gap_to_reference"]) <= runs["einsum_fused_kd"][
        "mean_rel_gap_to_reference"] < 1e-5
    assert len(set(runs["reference"]["kd"])) > 1  # the losses moved: the runs trained


def test_the_kd_curve_in_fp32_is_the_reference_path_without_bf16():
    """bench_kernels.py --parts kdcurve --kd-fp32: the reference path with no bf16 anywhere, second in the order.
    On the CPU the reference is already fp32, so the two curves are the same to the bit; handed a bf16 teacher
    (what a GPU run's teacher is), the fp32 run computes the teacher in fp32: its curve is that of the same weights
    handed over in fp32, which the bf16 teacher's own run is not; and the trainer's autocast is switched off."""
    import torch

    import bench_kernels
    from bench_kernels import _train, part_kdcurve, step_setup, tiny_config

    out = part_kdcurve(torch.device("cpu"), True, "MEM*EM", 1, 64, 4, have_triton=False, compile_step=False,
                       fp32=True)
    runs = out["variants"]
    assert list(runs) == ["reference", "reference_fp32", "einsum_fused_kd", "reference_again"]
    assert runs["reference_fp32"]["kd"] == runs["reference"]["kd"]
    assert runs["reference_again"]["mean_rel_gap_to_fp32"] == 0  # every run after it measured against it too
    assert runs["einsum_fused_kd"]["mean_rel_gap_to_fp32"] == runs["einsum_fused_kd"]["mean_rel_gap_to_reference"]

    cfg = tiny_config("M*E")
    device = torch.device("cpu")
    model, teacher, budgets, rows = step_setup(cfg, device, 1, 32)
    trainers = []
    made = bench_kernels.step_trainer
    bench_kernels.step_trainer = lambda *a, **k: trainers.append(made(*a, **k)) or trainers[-1]
    try:
        kd = {}
        bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
        for name, t, fp32 in [("its weights in fp32", copy.deepcopy(bf16).float(), False), ("bf16", bf16, False),
                              ("bf16, run in fp32", bf16, True)]:
            torch.manual_seed(1)
            logs, _ = _train(copy.deepcopy(model), copy.deepcopy(t), cfg, budgets, rows, 1, 32, 3, device, fp32=fp32)
            kd[name] = [lg["kd"] for lg in logs]
    finally:
        bench_kernels.step_trainer = made
    assert kd["bf16, run in fp32"] == kd["its weights in fp32"] != kd["bf16"]
    assert trainers[0].autocast is None and not trainers[2].autocast._enabled


def test_the_training_step_with_every_activation_kept_runs_beside_the_default():
    """bench_kernels.py --parts train --keep-activations: the step with nothing recomputed in backward runs beside
    the default (what the recompute costs and saves, on a GPU; the gradients are the same,
    tests/test_model.py), with model.checkpoint a plain call and Mamba's norm and out_proj by autograd only inside
    its row."""
    import torch

    import star_elastic.model as model_module
    from bench_kernels import keep_activations, part_train

    own, fused = model_module.checkpoint, model_module.norm_and_out_proj
    with keep_activations(True):
        assert model_module.checkpoint is not own and model_module.checkpoint(lambda a: a + 1, 1, x=0) == 2
        assert model_module.norm_and_out_proj is model_module.norm_then_out_proj
    assert model_module.checkpoint is own and model_module.norm_and_out_proj is fused
    out = part_train(torch.device("cpu"), True, "MEM*EM", 1, 64, 4, have_triton=False, keep=True)
    assert model_module.checkpoint is own and model_module.norm_and_out_proj is fused
    runs = out["variants"]
    default, kept = runs["einsum_fused_kd"], runs["einsum_fused_kd_keep"]
    assert "error" not in default and "error" not in kept and kept["tokens_per_s"] > 0
    assert len(kept["kd"]) == len(default["kd"]) == 4


def test_train_part_runs_conv_scan_by_default_and_the_apart_row_beside(monkeypatch):
    """bench_kernels --parts train --conv-scan-apart: the default rows run Mamba's conv, scan and skip as one
    function (kernels.conv_scan, the library's default on a GPU; here the scan's PyTorch stand-ins, in fp32 as the
    CPU trains) wherever the Triton paths are on, and the "_apart" row beside them never does (nor the einsum
    row); the same budgets drawn, and KD losses the default's to 2%."""
    import torch

    import bench_kernels
    from bench_saved import ScanOpsStandIn
    from star_elastic import kernels

    ops = ScanOpsStandIn()
    monkeypatch.setattr(kernels, "_load_conv_scan", lambda: ((ops.fwd, ops.bwd), None))
    monkeypatch.setattr(kernels, "uses_conv_scan", lambda x: kernels.conv_scan_enabled())  # the CPU trains in fp32
    monkeypatch.delenv(kernels.ENV_CONV_SCAN, raising=False)
    calls_per_row, train = [], bench_kernels._train

    def counted(*args, **kwargs):
        before = len(ops.calls)
        out = train(*args, **kwargs)
        calls_per_row.append(len(ops.calls) - before)
        return out

    monkeypatch.setattr(bench_kernels, "_train", counted)
    out = bench_kernels.part_train(torch.device("cpu"), True, "MEM*EM", 1, 64, 4, have_triton=True, apart=True)
    runs = out["variants"]
    assert list(runs) == ["einsum", "triton", "triton_fused_kd_foreach_adam", "triton_fused_kd",
                          "triton_fused_kd_apart"]
    assert calls_per_row[0] == 0 and all(n > 0 for n in calls_per_row[1:4]) and calls_per_row[4] == 0
    default, apart = runs["triton_fused_kd"], runs["triton_fused_kd_apart"]
    assert "error" not in default and "error" not in apart
    assert apart["budgets"] == default["budgets"]
    assert all(abs(a - b) <= 0.02 * abs(b) for a, b in zip(apart["kd"], default["kd"]))
    assert kernels.ENV_CONV_SCAN not in __import__("os").environ  # the switch is put back after each row


def test_the_step_rates_say_what_the_mixed_draws_run_at_beside_the_median_step():
    """bench_kernels.step_rates: the median timed step (the headline, which lands on a full-budget step at these
    draws) beside the tokens the timed steps made over their time, and each budget's median step."""
    from bench_kernels import step_rates

    logs = [{"budget": b, "tokens_per_s": t} for b, t in
            (("0.75", 200), ("1.0", 600), ("0.5", 30000), ("1.0", 40000), ("1.0", 40000), ("0.75", 30000))]
    median, mixed, by_budget = step_rates(logs)
    assert median == 40000  # the upper middle of the four timed steps: a full-budget step
    assert mixed == pytest.approx(4 / (2 / 30000 + 2 / 40000))  # equal tokens a step: time adds up
    assert mixed < median and by_budget == {"0.5": 30000, "1.0": 40000, "0.75": 30000}


def test_train_part_times_the_router_baseline_on_a_share_of_the_rows_beside_the_default(monkeypatch):
    """bench_kernels --parts train --baseline-rows 0.5: one more row whose trainer runs the router's baseline on
    half the batch's rows (TrainConfig.router_baseline_rows), the others on every row; the same budgets drawn."""
    import torch

    import bench_kernels

    made, trainer = [], bench_kernels.step_trainer

    def spy(*args, **kwargs):
        t = trainer(*args, **kwargs)
        made.append(t.cfg.router_baseline_rows)
        return t

    monkeypatch.setattr(bench_kernels, "step_trainer", spy)
    out = bench_kernels.part_train(torch.device("cpu"), True, "MEM*EM", 2, 64, 4, have_triton=False, baseline_rows=0.5)
    runs = out["variants"]
    assert list(runs)[-1] == "einsum_fused_kd_baseline0.5" and made[-1] == 0.5 and set(made[:-1]) == {1.0}
    half, default = runs["einsum_fused_kd_baseline0.5"], runs["einsum_fused_kd"]
    assert "error" not in half and half["router_baseline_rows"] == 0.5 and default["router_baseline_rows"] == 1.0
    assert half["budgets"] == default["budgets"] and half["tokens_per_s"] > 0


def test_train_part_without_the_quality_term_runs_no_argmax_forward_on_the_same_draws():
    """bench_kernels --parts train --baseline-rows 0: a row whose trainer has no score-function term
    (router_quality 0), so no step runs the argmax architecture's forward, on the draws the default row makes:
    beside it, what that forward costs a step."""
    import torch

    import bench_kernels

    out = bench_kernels.part_train(torch.device("cpu"), True, "MEM*EM", 2, 64, 6, have_triton=False, baseline_rows=0)
    runs = out["variants"]
    none, default = runs["einsum_fused_kd_no_quality"], runs["einsum_fused_kd"]
    assert "error" not in none and none["budgets"] == default["budgets"]
    assert default["argmax_forwards"] > 0 and none["argmax_forwards"] == 0


def test_train_part_runs_the_clip_before_the_optimiser_beside_the_default(monkeypatch):
    """bench_kernels --parts train --clip-apart: a row with the model's gradient clipped before the optimiser
    (clip_grad_norm_ over the model's parameters, as before the sixtieth session) beside the default, whose clip
    is the fused AdamW kernel's (of the fused-AdamW rows only that one hands the model's gradient to
    clip_grad_norm_)."""
    import torch

    from bench_kernels import part_train

    sizes, clip = [], torch.nn.utils.clip_grad_norm_

    def counted(params, *a, **k):
        params = list(params)
        sizes.append(sum(p.numel() for p in params))
        return clip(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counted)
    n_model = {}
    for apart in (False, True):
        sizes.clear()
        out = part_train(torch.device("cpu"), True, "MEM*EM", 1, 64, 3, have_triton=False, clip_apart=apart)
        n_model[apart] = sum(n > 1e5 for n in sizes)  # the model's gradient (the router's is small)
    runs = out["variants"]
    assert list(runs)[-1] == "einsum_fused_kd_clip_first" and runs["einsum_fused_kd_clip_first"]["tokens_per_s"] > 0
    # the foreach AdamW row clips first too (its optimiser has no fused kernel); the new row's three steps besides
    assert n_model[True] - n_model[False] == 3
    # --rows: only the rows named (on a GPU "compiled": the default and its clip_first row), a shorter device call
    out = part_train(torch.device("cpu"), True, "MEM*EM", 1, 64, 3, have_triton=False, clip_apart=True,
                     only="clip_first")
    assert list(out["variants"]) == ["einsum_fused_kd_clip_first"] and "speedup_vs_einsum" not in out


def test_train_part_runs_the_baseline_kd_in_eager_passes_beside_the_default():
    """bench_kernels --parts train --kd-value-apart: a row whose KD without gradients (the router's baseline
    forward) runs the eager passes, as before the sixty-first session, while the KD with gradients stays
    compiled; the default row compiles both."""
    import torch

    import star_elastic.train as train_module
    from bench_kernels import eager_kd_value, part_train
    from star_elastic.elastic import losses

    for on in (False, True):
        with eager_kd_value(on), train_module.compiled_kd("aot_eager"):
            assert losses._FUSED_CHUNK is not None
            assert (losses._FUSED_VALUE is None) == on
    assert losses._FUSED_CHUNK is None and losses._FUSED_VALUE is None
    out = part_train(torch.device("cpu"), True, "MEM*EM", 1, 64, 3, have_triton=False, kd_value_apart=True,
                     kd_chunk_apart=True, only="kd_value,kd_chunks")
    assert list(out["variants"]) == ["einsum_fused_kd_eager_kd_value", "einsum_fused_kd_small_kd_chunks"]
    assert all(row["tokens_per_s"] > 0 for row in out["variants"].values())


def test_small_kd_chunks_are_the_eager_paths():
    """bench_kernels' small_kd_chunks (--kd-chunk-apart's row): the compiled KD in the eager path's chunks."""
    from bench_kernels import small_kd_chunks
    from star_elastic.elastic import losses

    fused = losses.FUSED_CHUNK_ELEMENTS
    assert fused > losses.CHUNK_ELEMENTS
    with small_kd_chunks(True):
        assert losses.FUSED_CHUNK_ELEMENTS == losses.CHUNK_ELEMENTS
    with small_kd_chunks(False):
        assert losses.FUSED_CHUNK_ELEMENTS == fused
    assert losses.FUSED_CHUNK_ELEMENTS == fused
