"""benchmarks/bench_step_kernels.py: a batched decode step's kernels for each budget, side by side."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pytest  # noqa: E402


def test_every_budget_and_batch_size_is_timed_and_its_kernels_add_up():
    """The smoke run (tiny model, CPU, eager): one row per budget and batch size, its time split by category with
    nothing lost, the smaller budgets reading fewer bytes than the full one, and the ratios taken against it."""
    from bench_step_kernels import main

    result = main(["--smoke"])
    rows = result["rows"]
    assert [(r["budget"], r["batch"]) for r in rows] == [(b, n) for b in ("1.0", "0.75", "0.5") for n in (1, 4)]
    for r in rows:
        assert r["period"] > 0 and r["kernel_ms"] > 0
        assert sum(r["categories"].values()) == pytest.approx(r["kernel_ms"])
        full = next(x for x in rows if x["budget"] == "1.0" and x["batch"] == r["batch"])
        assert r["rate_vs_full"] == pytest.approx(full["period"] / r["period"])
        assert (r["bytes_vs_full"] > 1) == (r["budget"] != "1.0")


def test_the_state_update_kernel_has_its_own_category():
    from bench_step_kernels import kernel_category

    assert kernel_category("_selective_scan_update_kernel") == "Mamba state update"
    assert kernel_category("_state_update_kernel") == "Mamba state update"  # ours (star_elastic/decode_kernel.py)
    # inductor's fusion of the conv and dt beside our operator, named after it too: not the update
    beside = "triton_poi_fused__to_copy__unsafe_view_add_clamp_convolution_exp_mamba_state_update_neg_select_silu_slice_0"
    assert kernel_category(beside) == "Mamba decode fused by inductor (conv, dt, state update)"
    assert kernel_category("triton_tem_fused_mm_0") == "inductor GEMM / GEMV templates"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<4, mul>") == "elementwise"
    # inductor's fusion of Mamba's one-token step, named after the convolution inside it: not the causal conv kernel
    fused = "triton_poi_fused__to_copy__unsafe_view_add_clamp_clone_convolution_exp_expand_mul_neg_select_silu_slice_0"
    assert kernel_category(fused) == "Mamba decode fused by inductor (conv, dt, state update)"
    assert kernel_category("triton_poi_fused_copy__8") == "other inductor fusions"


def test_the_update_kernels_run_as_variants_and_one_that_cannot_run_here_is_refused():
    """--step-kernels: each named decode update a variant of every row (the CPU runs the recurrence: torch); one that
    this install cannot run (our Triton kernel on a CPU) is refused in one line, not measured as something else."""
    from bench_step_kernels import main

    rows = main(["--smoke", "--budgets", "1.0,0.5", "--step-kernels", "torch"])["rows"]
    assert {r["step_kernel"] for r in rows} == {"torch"} and len(rows) == 4
    with pytest.raises(SystemExit, match="--step-kernels own: not importable here"):
        main(["--smoke", "--budgets", "1.0", "--step-kernels", "own"])


def test_contiguous_copies_run_as_variants_of_the_smaller_budgets_only():
    """--contiguous none,linear: each smaller budget once as the engine's view and once with its linear weights
    copied contiguous (the full model holds the parent's own tensors: once); the copies read the same bytes; a
    layout that is not one is refused."""
    from bench_step_kernels import main

    rows = [r for r in main(["--smoke", "--budgets", "1.0,0.5", "--contiguous", "none,linear"])["rows"]
            if r["batch"] == 4]
    assert [(r["budget"], r["contiguous"]) for r in rows] == [("1.0", "none"), ("0.5", "none"), ("0.5", "linear")]
    assert rows[1]["step_weight_bytes"] == rows[2]["step_weight_bytes"]
    assert all(r["rate_vs_full"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        main(["--smoke", "--contiguous", "rows"])


def test_the_former_model_runs_as_variants_side_by_side(monkeypatch):
    """--former none,both: every row once with today's model and once with the functions it replaced (the int64
    index_add_ count, PyTorch's conv at decode; the model really calls them in that variant), compared row by row;
    each former function computes what today's does; the model's own are back afterwards; an unknown name is refused."""
    import bench_step_kernels
    import torch
    from star_elastic import model

    calls = []
    count, conv = bench_step_kernels.former_expert_counts, bench_step_kernels.former_window_conv
    monkeypatch.setitem(bench_step_kernels.FORMER, "both", {
        "expert_counts": lambda f, e: calls.append("counts") or count(f, e),
        "window_conv": lambda w, k, b: calls.append("conv") or conv(w, k, b)})
    flat = torch.randint(0, 16, (40,))
    assert torch.equal(count(flat, 16), model.expert_counts(flat, 16))
    window, weight, bias = torch.randn(2, 8, 4), torch.randn(8, 1, 4), torch.randn(8)
    assert torch.allclose(conv(window, weight, bias), model.window_conv(window, weight, bias), atol=1e-6)
    ours = (model.expert_counts, model.window_conv)
    rows = bench_step_kernels.main(["--smoke", "--budgets", "1.0,0.5", "--former", "none,both"])["rows"]
    assert [(r["budget"], r["former"]) for r in rows if r["batch"] == 4] == [
        ("1.0", "none"), ("0.5", "none"), ("1.0", "both"), ("0.5", "both")]
    assert {"counts", "conv"} <= set(calls), "a former function never reached the model"
    assert all(r["speedup_vs_former"]["both"] > 0 for r in rows if r["former"] == "none")
    assert (model.expert_counts, model.window_conv) == ours
    with pytest.raises(SystemExit):
        bench_step_kernels.main(["--smoke", "--former", "bincount"])
