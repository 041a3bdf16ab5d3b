"""benchmarks/device/run.sh: what a device call hands to Python (a fake `python3` records it; no GPU needed)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path, target: str, **env_vars) -> list[tuple[list[str], str]]:
    """`run.sh target` with a fake python3 (and `env_vars` set): each call's PYTHONPATH entries and arguments, in
    order."""
    fake = tmp_path / "bin"
    fake.mkdir(parents=True)
    (fake / "python3").write_text('#!/bin/sh\necho "$PYTHONPATH|$*" >> "$OUT/calls"\n')
    (fake / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), **env_vars}
    subprocess.run(["bash", "benchmarks/device/run.sh", target], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=60)
    return [(path.split(":"), args) for path, args in
            (line.split("|", 1) for line in (out / "calls").read_text().splitlines())]


def test_hfkpre_puts_the_cross_built_causal_conv1d_on_the_path_the_benchmark_runs_with(tmp_path):
    # the thirty-eighth session's first call: HFKPRE set PYTHONPATH for `bash $0 HFK`, whose preamble set it
    # afresh, so transformers' kernels were "missing" on a machine that had them
    [(path, args)] = run_script(tmp_path, "HFKPRE")
    assert "bench_speed.py --hf-kernels" in args
    assert ".devcarry/causal_conv1d_built" in path and ".devcarry/mamba" in path
    assert path.index(".devcarry/causal_conv1d_built") < path.index(".devcarry/mamba")


def profiled_run_calls(tmp_path, target: str, **env_vars):
    """`run.sh target`'s two calls: pytest, then the 539M table profiled, both with causal_conv1d's build on the path."""
    calls = run_script(tmp_path, target, **env_vars)
    assert len(calls) == 2 and calls[0][1].startswith("-m pytest")
    assert "benchmarks/bench_speed.py --hf-kernels" in calls[1][1] and "--profile" in calls[1][1]
    assert all(".devcarry/causal_conv1d_built" in path for path, _ in calls)
    return calls


def test_s40_runs_the_causal_conv_test_and_the_profile_both_with_the_build_on_the_path(tmp_path):
    calls = profiled_run_calls(tmp_path, "S40")
    assert "-k causal_conv" in calls[0][1]


def test_s41_profiles_with_cuda_graphs_beside_and_runs_the_conv_scan_tests_first_when_asked(tmp_path):
    # the tests passed in the fortieth session: S41 alone is the profile (184 s of device time saved)
    [(path, args)] = run_script(tmp_path / "plain", "S41")
    assert "bench_speed.py --hf-kernels" in args and "--profile" in args and "--cudagraphs" in args
    assert ".devcarry/causal_conv1d_built" in path
    calls = profiled_run_calls(tmp_path / "tests", "S41", TESTS="1")
    assert "cuda and (conv_scan or causal_conv)" in calls[0][1]


def test_s44_times_the_router_baseline_on_half_the_rows_then_serves_then_profiles(tmp_path):
    calls = run_script(tmp_path, "S44")
    assert [args.split()[0] for _, args in calls][:2] == ["benchmarks/bench_kernels.py", "benchmarks/bench_rest_serve.py"]
    assert "--parts train" in calls[0][1] and "--baseline-rows 0.5" in calls[0][1]
    assert ".devcarry/mamba" in calls[0][0] and "bench_speed.py --hf-kernels" in calls[-1][1]


def test_s49_times_the_graphed_mamba_layers_compiled_inside_without_the_profile(tmp_path):
    # S48's profile ran past its call: S49 is the same table, unprofiled, with the build and mamba_ssm on the path
    [(path, args)] = run_script(tmp_path, "S49")
    assert "bench_speed.py --hf-kernels" in args and "--graphed-mamba compiled" in args and "--profile" not in args
    assert ".devcarry/causal_conv1d_built" in path and ".devcarry/mamba" in path
