"""benchmarks/device/run.sh: what a device call hands to Python (a fake `python3` records it; no GPU needed)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path, target: str, *words, **env_vars) -> list[tuple[list[str], str]]:
    """`run.sh target words...` with a fake python3 (and `env_vars` set): each call's PYTHONPATH entries and
    arguments, in order."""
    fake = tmp_path / "bin"
    fake.mkdir(parents=True)
    (fake / "python3").write_text('#!/bin/sh\necho "$PYTHONPATH|$*" >> "$OUT/calls"\n')
    (fake / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), **env_vars}
    subprocess.run(["bash", "benchmarks/device/run.sh", target, *words], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=60)
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
    rows = args.split("--train-rows ")[1].split()[0].split(",")  # the rows it needs, in one argument
    assert rows[0] == "transformers" and rows[-1] == "transformers_again"
    assert {"ours_compiled_layers", "ours_compiled_layers_graphed_compiled_mamba"} <= set(rows)
    assert ".devcarry/causal_conv1d_built" in path and ".devcarry/mamba" in path


def fake_device(tmp_path, python: str = "") -> dict:
    """The environment for run.sh on a fake device: python3 records its arguments in $OUT/calls (then runs the
    shell lines `python`), nvidia-smi shows one GPU, and the home folder under tmp_path already holds the joined
    model."""
    home, fake, out = tmp_path / "home", tmp_path / "bin", tmp_path / "out"
    (home / ".cache" / "star_elastic").mkdir(parents=True)
    (home / ".cache" / "star_elastic" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_text("joined")
    fake.mkdir()
    out.mkdir()
    (fake / "python3").write_text('#!/bin/sh\necho "$*" >> "$OUT/calls"\n' + python)
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: fake"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), "DEVICE_HOME": str(home),
            "MIX": "0.2"}


def plan17_calls(tmp_path, case: str, **variables) -> dict[str, str]:
    """`run.sh PLAN17 case`'s bench_elastic command lines, on a fake device (`fake_device`, `variables` set in its
    environment), by the result file each writes; `tmp_path` taken out of them, so that two cases' lines compare
    as they would on one machine."""
    env = {**fake_device(tmp_path), **variables}
    subprocess.run(["bash", "benchmarks/device/run.sh", "PLAN17", case], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=60)
    lines = (Path(env["OUT"]) / "calls").read_text().replace(str(tmp_path), "").splitlines()
    return {c.split("--json ")[1].split("/")[-1]: c for c in lines if c.startswith("benchmarks/bench_elastic.py")}


def test_plan17_16m6_gives_each_per_budget_c_run_its_steps_and_every_joint_run_a_state(tmp_path):
    # 16m6: the recipe without the 0.5 on the 0.75's 1,331 steps, beside seed 1's (c) on J16mv02's per-budget steps
    # (no state: they must finish in the call); 16m6b: that run resumed beside J16mv02 at seed 1
    first = plan17_calls(tmp_path / "a", "16m6")
    assert set(first) == {"J16mv7502.json", "C16mv02s1.json", "C16mvb02s1.json"}
    j75 = first["J16mv7502.json"]
    assert "--budgets 1.0,0.75 " in j75 and f"--tokens-a {1331 * 8192} " in j75 and "--state-dir" in j75
    assert "--seed 0 " in j75 and "--full-delta-bits 2" in j75 and "--budget-mix 0.2" in j75
    for name, budgets, steps in (("C16mv02s1.json", "1.0,0.75", 1331), ("C16mvb02s1.json", "1.0,0.5", 717)):
        c = first[name]
        assert f"--budgets {budgets} " in c and f"--tokens-a {steps * 8192} " in c and "--state-dir" not in c
        assert "--seed 1 " in c and "#E1:" in c and "--variants= " in c
    second = plan17_calls(tmp_path / "b", "16m6b")
    assert set(second) == {"J16mv7502.json", "J16mv02s1.json"}
    s1 = second["J16mv02s1.json"]
    assert "--seed 1 " in s1 and "#E1:" in s1 and "--stage2-weights 0,0.8,0.2" in s1 and "--state-dir" in s1
    assert "--tokens-a 16777216" in s1 and "--seed 0" not in s1
    alone = plan17_calls(tmp_path / "c", "16m6a")
    assert set(alone) == {"J16mv7502.json"}  # 16m6a: the same run, alone
    assert alone["J16mv7502.json"] == j75


def test_plan17_16m7_runs_j16mv02s_recipe_with_the_half_budgets_kd_halved(tmp_path):
    # 16m7: J16mv02's flags (same per-budget steps, so the same per-budget (c)) with --kd-weights 1,1,0.5
    # (beside it 0.3, J16mvl02; 16m7a: J16mvk02 alone)
    calls = plan17_calls(tmp_path / "a", "16m7")
    assert set(calls) == {"J16mvk02.json", "J16mvl02.json"} and "--kd-weights 1,1,0.3 " in calls["J16mvl02.json"]
    assert plan17_calls(tmp_path / "b", "16m7a") == {"J16mvk02.json": calls["J16mvk02.json"]}
    c = calls["J16mvk02.json"]
    for flag in ("--kd-weights 1,1,0.5 ", "--stage2-weights 0,0.8,0.2 ", "--tokens-a 16777216 ", "--seed 0 ",
                 "--full-delta-rank 32 --full-delta-bits 2", "--budget-mix 0.2 ", "--hold-pull 0 ", "--state-dir"):
        assert flag in c, flag


def test_plan17_16m7b_runs_the_kd_weighted_recipe_at_seed_1_beside_its_own_per_budget_c(tmp_path):
    # 16m7b: J16mvk02 at seed 1 (E1's architectures), with seed 1's (c) on its per-budget steps (no state), the
    # (c) runs the very command lines 16m6 gives them (one result whichever case made it)
    calls = plan17_calls(tmp_path / "a", "16m7b")
    assert set(calls) == {"J16mvk02s1.json", "C16mv02s1.json", "C16mvb02s1.json"}
    j = calls["J16mvk02s1.json"]
    for flag in ("--kd-weights 1,1,0.5 ", "--stage2-weights 0,0.8,0.2 ", "--tokens-a 16777216 ", "--seed 1 ", "#E1:",
                 "--full-delta-rank 32 --full-delta-bits 2", "--budget-mix 0.2 ", "--state-dir"):
        assert flag in j, flag
    assert "--seed 0" not in j and "#E0:" not in j
    six = plan17_calls(tmp_path / "b", "16m6")
    for name in ("C16mv02s1.json", "C16mvb02s1.json"):
        assert calls[name] == six[name]


def assert_the_kd_weighted_runs_but(tmp_path, calls, name, flags):
    """`calls`' runs `name` (seed 0) and `name`s1 (seed 1) are 16m7a's / 16m7b's KD-weighted runs, J16mvk02 and
    J16mvk02s1, with their --kd-weights swapped for `flags`, word for word."""
    kd = {**plan17_calls(tmp_path / "kd0", "16m7a"), **plan17_calls(tmp_path / "kd1", "16m7b")}
    for ours, theirs in ((name, "J16mvk02"), (name + "s1", "J16mvk02s1")):
        want = kd[theirs + ".json"].replace("--kd-weights 1,1,0.5", flags).replace(theirs, ours)
        assert calls[ours + ".json"].split() == want.split(), ours


def test_plan17_16m8_runs_the_recipe_with_each_budgets_own_moments_at_both_seeds(tmp_path):
    # 16m8: J16mv02's recipe with --budget-lrs at the one rate (each budget its own AdamW moments) and the KD weights
    # at 1, at seed 0 and seed 1, each the very command line of the KD-weighted run of its seed with the weights
    # swapped for the moments; 16m8a: seed 1 alone
    calls = plan17_calls(tmp_path / "a", "16m8")
    assert set(calls) == {"J16mvs02.json", "J16mvs02s1.json"}
    for name, seed in (("J16mvs02", 0), ("J16mvs02s1", 1)):
        c = calls[name + ".json"]
        assert "--budget-lrs 2e-4,2e-4,2e-4 " in c and "--kd-weights" not in c and f"--seed {seed} " in c
        assert "--lr-a 2e-4 " in c  # the one rate the moments run at
    assert_the_kd_weighted_runs_but(tmp_path, calls, "J16mvs02", "--budget-lrs 2e-4,2e-4,2e-4")
    assert set(plan17_calls(tmp_path / "d", "16m8a")) == {"J16mvs02s1.json"}


def test_plan17_16m9_weights_the_half_budgets_kd_at_both_seeds_in_one_adamw(tmp_path):
    # 16m9: the KD-weighted runs of 16m7a / 16m7b (seed 0 / seed 1) with the 0.5's weight at KD (default 0.4),
    # their command lines otherwise the same; 16m9a / 16m9b: seed 1 / seed 0 alone; KD=0.3 names the runs by the weight
    calls = plan17_calls(tmp_path / "a", "16m9")
    assert set(calls) == {"J16mvw0402.json", "J16mvw0402s1.json"}
    assert "--seed 0 " in calls["J16mvw0402.json"] and "--seed 1 " in calls["J16mvw0402s1.json"]
    assert_the_kd_weighted_runs_but(tmp_path, calls, "J16mvw0402", "--kd-weights 1,1,0.4")
    assert plan17_calls(tmp_path / "d", "16m9a") == {"J16mvw0402s1.json": calls["J16mvw0402s1.json"]}
    assert plan17_calls(tmp_path / "f", "16m9b") == {"J16mvw0402.json": calls["J16mvw0402.json"]}
    three = plan17_calls(tmp_path / "e", "16m9a", KD="0.3")
    assert set(three) == {"J16mvw0302s1.json"} and "--kd-weights 1,1,0.3 " in three["J16mvw0302s1.json"]


def test_plan17_16m9h_is_the_hybrid_at_16m_with_the_kd_weight_on_b16s_architectures_against_its_c(tmp_path):
    # 16m9h: HB16's command line (the hybrid at 16M, seed 0, its recipe and parent file) with the 0.5's KD weighted
    # (default 0.4), on B16's architectures without the router (B16's (c) ran on them: a router's other choice would
    # have the pair refused), the run named by the weight; exit 75 and no ratios while it is unfinished, then the
    # ratios against B16's (c), part B
    env = fake_device(tmp_path / "w", 'case "$1" in benchmarks/bench_elastic.py)\n'
                                      '  for a; do [ "$prev" = --json ] && echo "{}" > "$a"; prev=$a; done; exit $RC;; esac\n')
    out = Path(env["OUT"])

    def call(rc: int, **variables) -> tuple[int, list[str]]:
        (out / "calls").unlink(missing_ok=True)
        p = subprocess.run(["bash", "benchmarks/device/run.sh", "PLAN17", "16m9h"], cwd=ROOT, capture_output=True,
                           env={**env, "RC": str(rc), **variables}, timeout=60, text=True)
        return p.returncode, (out / "calls").read_text().replace(str(tmp_path / "w"), "").splitlines()

    rc, calls = call(75)
    [run] = [c for c in calls if c.startswith("benchmarks/bench_elastic.py")]
    assert rc == 75 and not any("compare_elastic" in c for c in calls)
    [b16] = plan17_calls(tmp_path / "hb", "HB16").values()
    fixed = "--variants joint_anchor --minitron-arch docs/results/elastic_session30_h200.json#B16:elastic_anchor "
    assert fixed in run and "--kd-weights 1,1,0.4 " in run and "--seed 0 " in run and "--tokens-b 16777216 " in run
    assert sorted(run.replace(fixed, "").replace("--kd-weights 1,1,0.4 ", "").split()) == \
        sorted(b16.replace("--variants elastic_anchor ", "").replace("B16", "B16jw04").split())
    rc, calls = call(0)
    [ratios] = [c for c in calls if "compare_elastic" in c]
    assert rc == 0 and "--part B" in ratios and "--pairs B16jw04:C16ba53,B16jw04:C16bb53" in ratios
    assert "elastic_session30_h200.json" in ratios and "/res/B16jw04.json" in ratios
    # the (c) it pairs with are in a bundle the call reads: today's parent's (C16ba / C16bb of the thirtieth session
    # came from a parent today's code no longer pretrains bit for bit, and the ratios refused them)
    bundle = "docs/results/elastic_session53_h200.json"
    assert bundle in ratios and {"C16ba53", "C16bb53"} <= set(json.loads((ROOT / bundle).read_text())["runs"])
    rc, calls = call(75, KD="0.3")
    assert "--kd-weights 1,1,0.3 " in calls[0] and "/res/B16jw03.json" in calls[0]
    # the second seed: B16s1's architectures and parent file, against seed 1's (c) on today's parent (HB16c's,
    # bundled by the fifty-fourth session under names a later machine's HB16c does not give)
    rc, calls = call(0, SEED="1")
    [run] = [c for c in calls if c.startswith("benchmarks/bench_elastic.py")]
    [ratios] = [c for c in calls if "compare_elastic" in c]
    assert "--minitron-arch docs/results/elastic_session31_h200.json#B16s1:elastic_anchor " in run
    assert "--seed 1 " in run and "/res/parentB1.safetensors " in run and "/res/B16jw04s1.json" in run
    assert "--pairs B16jw04s1:C16ba54s1,B16jw04s1:C16bb54s1" in ratios and "--part B" in ratios
    bundle = "docs/results/elastic_session54_h100.json"
    assert bundle in ratios and {"C16ba54s1", "C16bb54s1"} <= set(json.loads((ROOT / bundle).read_text())["runs"])
    # the names HB16c gives seed 1's (c) runs
    assert {"C16bas1.json", "C16bbs1.json"} == set(plan17_calls(tmp_path / "c1", "HB16c", SEED="1"))


def test_plan17_hb16c_compares_with_the_bundles_one_run_not_its_c_runs_of_the_same_names(tmp_path):
    # the thirtieth session's bundle holds B16 and its own C16ba / C16bb: given whole beside this machine's C16ba /
    # C16bb, compare_elastic refused ("in two of the files", fifty-third session); BUNDLE#RUN takes B16 alone
    env = fake_device(tmp_path)
    subprocess.run(["bash", "benchmarks/device/run.sh", "PLAN17", "HB16c"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=60)
    [compare] = [c for c in (Path(env["OUT"]) / "calls").read_text().splitlines() if "compare_elastic" in c]
    files = compare.split("compare_elastic.py ")[1].split(" --part")[0].split()
    assert files[0] == "docs/results/elastic_session30_h200.json#B16" and "--pairs B16:C16ba,B16:C16bb" in compare
    assert [f.split("/")[-1] for f in files[1:]] == ["C16ba.json", "C16bb.json"]


def test_plan17_16m9n_runs_seed_0_at_the_weight_beside_the_hybrid_with_it(tmp_path):
    # 16m9n: 16m9b's and 16m9h's runs, each its very command line, side by side in one call
    both = plan17_calls(tmp_path / "n", "16m9n")
    assert both == {**plan17_calls(tmp_path / "b", "16m9b"), **plan17_calls(tmp_path / "h", "16m9h")}
    assert set(both) == {"J16mvw0402.json", "B16jw04.json"}


def test_plan17_4kw_is_keep_fulls_weights_at_4m_against_each_budget_alone_at_both_seeds(tmp_path):
    # 4kw: the 16.8M recipe (16m9's, seed 0 and seed 1) at 4.2M with --keep-full's 256-step finish and its budget
    # weights, beside each seed's budgets distilled alone on the steps the trainer's even order gives them at 512
    runs = plan17_calls(tmp_path / "q", "4kw")
    assert set(runs) == {"J4kw04.json", "J4kw04s1.json", "C4kv.json", "C4kvb.json", "C4kvs1.json", "C4kvbs1.json"}
    at16 = plan17_calls(tmp_path / "m", "16m9")
    for seed, x in ((0, ""), (1, "s1")):
        joint = runs[f"J4kw04{x}.json"]
        assert "--tokens-a 4194304 " in joint and joint.split("--full-delta-finish ")[-1].startswith("256 ")
        assert "--stage2-weights 0,0.8,0.2 --kd-weights 1,1,0.4 " in joint and f"--seed {seed} " in joint
        # the 16.8M run's flags, the tokens and the finish aside
        drop = ("--tokens-a", "--full-delta-finish", "--state-dir", "--json", "--call-seconds")

        def flags(line):
            words = line.split()
            return sorted(w for i, w in enumerate(words) if w not in drop and (i == 0 or words[i - 1] not in drop))
        assert flags(joint) == flags(at16[f"J16mvw0402{x}.json"])
        for name, budgets, steps in ((f"C4kv{x}.json", "1.0,0.75", 332), (f"C4kvb{x}.json", "1.0,0.5", 180)):
            c = runs[name]
            assert f"--budgets {budgets} " in c and f"--tokens-a {steps * 8192} " in c and "--state-dir" not in c
            assert f"--seed {seed} " in c and f"#E{seed}:" in c and "--variants= " in c and "--budget-mix 0.2" in c


def test_plan17_4kx_is_4kw_at_other_kd_weights_on_the_05_and_nothing_else_changed(tmp_path):
    # 4kx: 4kw's joint runs with the 0.5's KD weight changed (its (c) runs stay valid: the stage-2 weights, so the
    # steps each budget gets, are 4kw's); KDS picks the weight:seed pairs
    at4 = plan17_calls(tmp_path / "w", "4kw")
    runs = plan17_calls(tmp_path / "x", "4kx")
    assert set(runs) == {"J4kw07s1.json", "J4kw1s1.json", "J4kw07.json"}
    for name, kd, base in (("J4kw07s1", "0.7", "J4kw04s1"), ("J4kw1s1", "1", "J4kw04s1"), ("J4kw07", "0.7", "J4kw04")):
        line = runs[f"{name}.json"]
        assert f"--kd-weights 1,1,{kd} " in line and "--stage2-weights 0,0.8,0.2 " in line
        expected = at4[f"{base}.json"].replace("--kd-weights 1,1,0.4", f"--kd-weights 1,1,{kd}").replace(base, name)
        assert line == expected
    assert set(plan17_calls(tmp_path / "k", "4kx", KDS="0.55:0")) == {"J4kw055.json"}


def test_ratios_wait_for_the_runs_to_finish_and_the_call_says_call_again(tmp_path):
    # a run stopped by its call (exit 75, its JSON written, no .done) gets no ratios in that call: compare_elastic
    # is not started, and the script exits 75; once the run finishes, the ratios run
    # bench_elastic writes its JSON and exits as $RC says; compare_elastic is only recorded
    env = fake_device(tmp_path, 'case "$1" in benchmarks/bench_elastic.py)\n'
                                '  for a; do [ "$prev" = --json ] && echo "{}" > "$a"; prev=$a; done; exit $RC;; esac\n')
    out = Path(env["OUT"])

    def call(rc: int, case: str = "16m7a") -> tuple[int, list[str]]:
        (out / "calls").unlink(missing_ok=True)
        p = subprocess.run(["bash", "benchmarks/device/run.sh", "PLAN17", case], cwd=ROOT, capture_output=True,
                           env={**env, "RC": str(rc)}, timeout=60, text=True)
        return p.returncode, (out / "calls").read_text().splitlines()

    rc, calls = call(75)
    assert rc == 75 and not any("compare_elastic" in c for c in calls)
    assert any(c.startswith("benchmarks/bench_elastic.py") for c in calls)
    rc, calls = call(0)
    [ratios] = [c for c in calls if "compare_elastic" in c]  # one process for the six pairs
    assert rc == 0 and ratios.split("--pairs ")[1].count(":") == 6 and "/res/J16mvk02.json" in ratios
    # a case that reads one seed's ratios of two still says "call again" when its run stopped (16m9a: seed 1's,
    # after which the skipped seed 0's check must not turn the 75 into a 0)
    for case in ("16m8a", "16m8", "16m9a", "16m9b", "16m9", "16m9n", "4kw", "4kx"):
        rc, calls = call(75, case)
        assert rc == 75 and not any("compare_elastic" in c for c in calls), case


def test_decode12_times_the_expert_decode_candidates_then_generate_compiled_both_ways(tmp_path):
    # issue 12's next measurement, a part a call: the MoE decode's compiled candidates at Nano's experts, then
    # bench_serve's compiled decode with inductor's defaults and with its GEMVs tuned (generate.GEMV_OPTIONS)
    [gather] = [args for _, args in run_script(tmp_path / "g", "DECODE12")]  # the first part by default
    assert gather.startswith("benchmarks/bench_expert_gather.py --device cuda")
    variants = gather.split("--variants ")[1].split()[0].split(",")
    assert {"compiled", "compiled_gemv", "fused"} <= set(variants) and variants[0] == "contig"
    assert "--tokens 1 " in gather and "--cuts 128x1856x2688," in gather
    for mode in ("default", "gemv"):
        [serve] = [args for _, args in run_script(tmp_path / mode, "DECODE12", mode, "--reps", "2")]
        assert serve.startswith("benchmarks/bench_serve.py --model nano --device cuda")
        assert f"--compile {mode} " in serve and f"serve_nano_compile_{mode}.json" in serve and serve.endswith("--reps 2")
    both = [args for _, args in run_script(tmp_path / "both", "DECODE12", "both")]  # one call, one card
    assert [a.split("--compile ")[1].split()[0] for a in both] == ["default", "gemv"]
    with pytest.raises(subprocess.CalledProcessError):  # a part it does not have: exit 2, nothing run
        run_script(tmp_path / "typo", "DECODE12", "gemvv")
    [replay] = [args for _, args in run_script(tmp_path / "replay", "REPLAY12", "--reps", "3")]
    assert replay.startswith("benchmarks/bench_replay.py --device cuda --model nano --json ")
    assert replay.endswith("replay_nano.json --reps 3")


def test_s58_checks_our_decode_kernel_then_times_the_former_model_beside_then_batches_at_32_and_64(tmp_path):
    calls = run_script(tmp_path, "S58")
    assert len(calls) == 3 and calls[0][1].startswith("-m pytest")
    assert "our_decode_kernel_on_cuda" in calls[0][1] and ".devcarry/mamba" in calls[0][0]
    assert "bench_step_kernels.py" in calls[1][1] and "--former none,both" in calls[1][1]
    assert "--layers MEMEM*EMEMEM*EME" in calls[1][1]
    assert "bench_batching.py" in calls[2][1] and calls[2][1].endswith("--new-tokens 64")
    assert "--batch-sizes 32,64" in calls[2][1]


def test_s59_times_the_step_then_profiles_it_compiled_then_runs_the_kd_curve_by_part(tmp_path):
    calls = run_script(tmp_path, "S59")
    assert len(calls) == 3 and all("bench_kernels.py" in args for _, args in calls)
    assert all(".devcarry/mamba" in path for path, _ in calls)  # the Triton scan on the path in every part
    parts = [args.split("--parts")[-1].split()[0] for _, args in calls]  # the last --parts given wins
    assert parts == ["train", "profile", "kdcurve"]
    assert "--compile" not in calls[1][1]  # compiled by the bench's default on a GPU, as elastify trains
    assert "--kd-apart" in calls[2][1] and "--kd-fp32" in calls[2][1]
    assert [args.split("--json")[-1].split()[0].rsplit("/", 1)[-1] for _, args in calls] == [
        "kernels_train.json", "kernels_profile.json", "kdcurve.json"]
    # two calls where one would not fit: the step and its profile, then the KD curve alone
    def args(calls, out):  # each call's arguments, its $OUT named alike
        return [a.replace(str(out), "OUT") for _, a in calls]
    step, kd = run_script(tmp_path / "step", "S59", "step"), run_script(tmp_path / "kd", "S59", "kd")
    assert args(step, tmp_path / "step" / "out") == args(calls[:2], tmp_path / "out")
    assert args(kd, tmp_path / "kd" / "out") == args(calls[2:], tmp_path / "out")
    with pytest.raises(subprocess.CalledProcessError):  # a part it does not have: exit 2, nothing run
        run_script(tmp_path / "typo", "S59", "kdd")
