"""benchmarks/bench_elastic.py --state-dir: a (b) run longer than one device call goes on where the
last call stopped (device calls end at 600 s; an anchored SmolLM2 run at 16M tokens needs ~13 minutes)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from star_elastic.elastify import ElastifyConfig

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, str(ROOT / "benchmarks" / "bench_elastic.py"), "--smoke", "--part", "B", "--variants",
         "elastic", "--no-minitron", "--pretrain-steps", "4", "--heldout", "wiki", "--eval-tokens", "128"]


def test_a_stopped_run_resumes_from_its_state_and_counts_every_step_once(tmp_path):
    state, first, second = tmp_path / "state", tmp_path / "first.json", tmp_path / "second.json"
    r = subprocess.run(BENCH + ["--state-dir", str(state), "--max-train-seconds", "0", "--json", str(first)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 75, r.stderr[-2000:]  # stopped after the first tenth, state kept
    (run_dir,) = state.iterdir()
    assert json.loads((run_dir / "bench.json").read_text())["step"] == 1 and (run_dir / "train_state").exists()
    r = subprocess.run(BENCH + ["--state-dir", str(state), "--json", str(second)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at step 1" in r.stdout
    part = json.loads(second.read_text())["B"]
    elastic = part["methods"]["elastic"]
    assert elastic["resumed_at_step"] == 1 and elastic["steps"] == 16
    rows = [row for row in part["rows"] if row["method"] == "elastic"]
    assert sum(row["steps_sampled"] for row in rows) == 16  # the first call's step counted, none twice
    assert len(elastic["argmax_trajectory"]) == 16  # one per tenth (a step each here), across both calls
    assert not any(state.iterdir())  # the finished run's weights and moments are removed


def test_a_parent_file_gives_every_process_the_same_pretrained_hybrid(tmp_path):
    """`--parent-b FILE`: the first run pretrains B's parent and writes it there, a later one (a resumed call, or
    (c) run in a process of its own) distils that parent instead of pretraining another (a GPU's pretraining is
    not the same run to run; here a different pretraining rate stands for that); a file this bench did not
    write is a one-line refusal."""
    from safetensors.torch import save_file

    parent = tmp_path / "parent.safetensors"
    runs = {}
    for name, lr in (("first", "3e-3"), ("second", "1e-2")):
        r = subprocess.run(BENCH + ["--parent-b", str(parent), "--pretrain-lr", lr, "--json", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = (json.loads((tmp_path / name).read_text())["B"], r.stdout)
        assert parent.exists()
    (first, _), (second, out) = runs["first"], runs["second"]
    assert "the parent pretrained by an earlier call" in out and "pretrained by an earlier call" not in runs["first"][1]
    parent_rows = [[row for row in part["rows"] if row["method"] == "parent"] for part in (first, second)]
    assert parent_rows[0] == parent_rows[1] and parent_rows[0]  # the same parent, scored the same
    assert second["pretraining"]["log"] == first["pretraining"]["log"]
    assert second["pretraining"]["seconds"] == first["pretraining"]["seconds"]
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    r = subprocess.run(BENCH + ["--parent-b", str(tmp_path / "foreign.safetensors"), "--json", str(tmp_path / "f")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "foreign.safetensors" in r.stderr.strip().splitlines()[-1]


def test_the_anchor_cache_gives_later_runs_of_the_same_parent_the_same_text(tmp_path):
    """`--anchor-cache DIR`: the first anchored run samples its text and keeps it there; a later run of the same
    parent, seed and settings reads it (no sampling, the same fingerprint), and a run at another seed samples
    its own."""
    parent, cache = tmp_path / "parent.safetensors", tmp_path / "anchors"
    argv = [a if a != "elastic" else "elastic_anchor" for a in BENCH] + [
        "--parent-b", str(parent), "--anchor-data", "self:1024", "--anchor-cache", str(cache)]

    def run(name, *extra):
        r = subprocess.run(argv + list(extra) + ["--json", str(tmp_path / name)], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads((tmp_path / name).read_text())["B"]["methods"]["elastic_anchor"]["anchor_sha"], r.stdout

    first, out1 = run("first")
    second, out2 = run("second")
    assert "anchor text from" not in out1 and "sampled from the parent" in out1
    assert "anchor text from" in out2 and "sampled from the parent" not in out2
    assert first == second and len(list(cache.glob("anchor-*.safetensors"))) == 1
    third, out3 = run("third", "--seed", "1")  # another seed: its own text, its own file
    assert "sampled from the parent" in out3 and len(list(cache.glob("anchor-*.safetensors"))) == 2


def _two_processes(target, shared, tmp_path, key):
    """`target(shared, out)` in two spawned processes started at once; the tensor `key` each wrote to its `out`."""
    import multiprocessing as mp

    from safetensors.torch import load_file

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(shared, str(tmp_path / f"out{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return [load_file(str(tmp_path / f"out{i}"))[key] for i in range(2)]


def _anchor_rows_in_a_process(cache, out):
    """One bench process's anchor text through --anchor-cache, its sampler slow and its text its own (as two
    samples on CUDA are), written to `out`."""
    import os
    import time
    from argparse import Namespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_elastic
    from safetensors.torch import save_file
    from star_elastic.model import Model
    from test_train import CFG

    def slow_own_sample(spec, teacher, tokenizer, row_len, rows_per_step, tokens, seed):
        time.sleep(1.0)
        return torch.full((4, row_len), os.getpid() % 1000)

    bench_elastic.anchor_text = slow_own_sample
    torch.manual_seed(0)
    args = Namespace(anchor_data="self:64", anchor_cache=str(cache), seed=0)
    rows, _ = bench_elastic.anchor_text_rows(args, Model(CFG).eval(), None, 16, 32, 4)
    save_file({"rows": rows.contiguous()}, out)


def test_runs_started_side_by_side_share_one_sample_of_the_anchor_text(tmp_path):
    """Two processes of one machine asking --anchor-cache for the same text at once (an elastic run and its (c)
    with --budget-mix, started side by side): one samples, the other waits for its file and reads it, instead of
    each sampling text of its own (on CUDA, other text)."""
    a, b = _two_processes(_anchor_rows_in_a_process, tmp_path / "cache", tmp_path, "rows")
    assert torch.equal(a, b) and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def _parent_in_a_process(path, out):
    """One bench process's --parent-b parent, its pretraining slow and its weights its own (as two pretrainings on
    a GPU are), the sum of its weights written to `out`."""
    import os
    import time

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_elastic
    from safetensors.torch import save_file
    from star_elastic.model import Model
    from test_train import CFG

    def slow_own_pretraining(parent, train, pre, device):
        time.sleep(1.0)
        with torch.no_grad():
            for p in parent.parameters():
                p.fill_(os.getpid() % 1000)
        return [{"step": 1, "loss": 1.0}]

    bench_elastic.zs.train_moe = slow_own_pretraining
    parent = Model(CFG)
    bench_elastic.pretrained_parent(parent, None, None, torch.device("cpu"), str(path))
    save_file({"sum": torch.stack([p.double().sum() for p in parent.parameters()]).sum()[None]}, out)


def test_runs_started_side_by_side_distil_one_pretrained_parent(tmp_path):
    """Two processes asking --parent-b for the same file before it exists: one pretrains and writes it, the other
    waits under the lock and loads it, instead of each distilling a parent of its own (on a GPU, another one)."""
    a, b = _two_processes(_parent_in_a_process, tmp_path / "parent.safetensors", tmp_path, "sum")
    assert torch.equal(a, b) and (tmp_path / "parent.safetensors").exists()


def test_max_train_seconds_without_a_state_dir_is_refused():
    r = subprocess.run(BENCH + ["--max-train-seconds", "10"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--max-train-seconds needs --state-dir" in r.stderr


def test_minitron_arch_elastic_takes_the_anchored_run_when_the_paper_sampling_did_not_run(tmp_path):
    """`--variants elastic_anchor --minitron-arch elastic`: (c) distils the anchored run's architectures
    in the same process (the hybrid parent's pretraining differs between processes, so (b+) and (c) must
    share one), not the zero-shot search's."""
    out = tmp_path / "b.json"
    argv = [a if a != "elastic" else "elastic_anchor" for a in BENCH if a != "--no-minitron"]
    r = subprocess.run(argv + ["--minitron-arch", "elastic", "--json", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["B"]["rows"]
    spec = {m: {row["budget"]: row["spec"] for row in rows if row["method"] == m}
            for m in ("elastic_anchor", "minitron", "zero_shot")}
    assert spec["minitron"] == {b: s for b, s in spec["elastic_anchor"].items() if b != "1.0"}
    assert spec["minitron"] != {b: s for b, s in spec["zero_shot"].items() if b != "1.0"}  # else the test proves nothing


def test_joint_anchor_trains_the_recorded_architectures_with_the_full_model_on_every_step(tmp_path):
    """(b'+) `joint_anchor`: no router, the architectures (c) distils (here recorded from an earlier run),
    the full model on every step, stage-2 and per-budget KD weights passed through; (c) on the same ones."""
    recorded = {"0.75": {"hidden_size": 48}, "0.5": {"hidden_size": 32, "n_routed_experts": 7}}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"seed": 0, "B": {"rows": [{"method": "elastic_anchor", "budget": b, "spec": s}
                                                             for b, s in recorded.items()]}}))
    out = tmp_path / "b.json"
    argv = [a if a != "elastic" else "joint_anchor" for a in BENCH if a != "--no-minitron"]
    r = subprocess.run(argv + ["--minitron-arch", f"{earlier}:elastic_anchor", "--stage2-weights", "0,3,1",
                               "--kd-weights", "1,2,1", "--budget-lrs", "1e-3,2e-3,2e-3", "--anchor-data", "self",
                               "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    part = json.loads(out.read_text())["B"]
    spec = {m: {row["budget"]: row["spec"] for row in part["rows"] if row["method"] == m and row["budget"] != "1.0"}
            for m in ("joint_anchor", "minitron", "zero_shot")}
    assert spec["joint_anchor"] == spec["minitron"] == recorded != spec["zero_shot"]
    method = part["methods"]["joint_anchor"]
    assert method["full_anchor"] == ElastifyConfig.full_anchor and method["budget_lrs"] == [1e-3, 2e-3, 2e-3]
    steps = {row["budget"]: row["steps_sampled"] for row in part["rows"] if row["method"] == "joint_anchor"}
    assert steps["1.0"] == 0 and steps["0.75"] > steps["0.5"]  # every step a smaller budget, stage 2 tilted
    # the full budget, distilled beside every sampled one, reports its KD (on the anchor's rows) all the same
    kd = {row["budget"]: row["final_kd"] for row in part["rows"] if row["method"] == "joint_anchor"}
    assert all(v is not None and v > 0 for v in kd.values()), kd
    assert list(part["heldout_sha"]) == ["wiki"] and len(part["heldout_sha"]["wiki"]) == 16
    assert f"anchor text fingerprint {method['anchor_sha']}" in r.stdout  # two runs on the same rows print one


def test_malformed_weights_are_one_line_errors():
    r = subprocess.run(BENCH + ["--stage2-weights", "1,x"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "weights are comma-separated numbers, got '1,x'" in r.stderr
    assert "Traceback" not in r.stderr


def test_minitron_lrs_keeps_each_budgets_best_learning_rate_and_records_every_try(tmp_path):
    """(c) at its best: `--minitron-lrs` distils each smaller budget once per rate and keeps the try with
    the lowest perplexity on the first held-out source; every try's perplexities are in the JSON."""
    out = tmp_path / "c.json"
    argv = [a for a in BENCH if a != "--no-minitron"]
    argv[argv.index("--variants") + 1] = ""
    r = subprocess.run(argv + ["--minitron-lrs", "1e-5,3e-3", "--json", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    part = json.loads(out.read_text())["B"]
    per_budget = part["methods"]["minitron"]["per_budget"]
    rows = {row["budget"]: row for row in part["rows"] if row["method"] == "minitron"}
    assert per_budget and set(per_budget) == set(rows)
    for name, info in per_budget.items():
        sweep = info["lr_sweep"]
        assert set(sweep) == {"1e-05", "0.003"}
        best = min(sweep, key=lambda lr: sweep[lr]["wiki"])
        assert info["lr"] == float(best) and rows[name]["lr"] == float(best)
        assert rows[name]["perplexity"] == sweep[best]
    bad = subprocess.run(argv + ["--minitron-lrs", "fast"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--minitron-lrs: not a list of numbers" in bad.stderr


def test_the_joint_trainer_on_one_budget_alone_is_minitron_distillation(tmp_path):
    """The harness behind every (b)/(c) ratio: ElasticTrainer training only the 0.75 budget (no router, no
    anchor, stage 2 all on it) is (c) on the same architecture to float rounding on the CPU: the same
    batches, schedule, clipping and optimiser, the mask instead of the slice. So a joint run's gap to (c) is
    joint training's, not the harness's; the full budget, never trained, still moves with the shared weights.
    Bit for bit on some CPUs; on others the masked and the sliced matmuls sum in other orders (1e-6 relative
    after training, 2026-12-02), so the bound is 1e-5, a ten-thousandth of what the training moves."""
    out = tmp_path / "h.json"
    argv = [a for a in BENCH if a not in ("--no-minitron",)]
    argv[argv.index("elastic")] = "joint_fixed"
    r = subprocess.run(argv + ["--budgets", "1.0,0.75", "--stage1-fraction", "0", "--stage2-weights", "0,1",
                               "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    part = json.loads(out.read_text())["B"]
    rows = {(row["method"], row["budget"]): row for row in part["rows"]}
    joint, alone = rows[("joint_fixed", "0.75")], rows[("minitron", "0.75")]
    assert joint["steps_sampled"] == part["training"]["minitron_steps_per_budget"] > 0
    assert rows[("joint_fixed", "1.0")]["steps_sampled"] == 0
    assert joint["spec"] == alone["spec"] and joint["perplexity"].keys() == alone["perplexity"].keys()
    start = rows[("zero_shot", "0.75")]["perplexity"]
    for text, ppl in alone["perplexity"].items():
        assert abs(ppl / start[text] - 1) > 0.01  # the training moved it, by far more than the bound below
        assert math.isclose(joint["perplexity"][text], ppl, rel_tol=1e-5), (text, joint["perplexity"][text], ppl)
    assert rows[("joint_fixed", "1.0")]["perplexity"] != rows[("parent", "1.0")]["perplexity"]
    assert part["methods"]["joint_fixed"]["stage1_fraction"] == 0.0


def test_a_call_stops_before_the_tenth_that_would_overrun_its_limit():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_elastic import out_of_time

    assert out_of_time(300, 100, 350)  # the next tenth would end at 400: stop now, not after it
    assert not out_of_time(200, 100, 350)
    assert out_of_time(0.1, 0.1, 0)  # --max-train-seconds 0: one tenth, then stop
    assert not out_of_time(1e9, 1e9, None)



def test_a_call_goes_on_while_the_run_can_finish_and_stops_with_a_stretch_to_spare():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_elastic import call_over

    # the rest (50 s) and its scores (30 s) fit in the call's 590 s: train on, though two more stretches would not
    assert not call_over(500, 60, 20, 50, 30, 590)
    # the run cannot finish here: train while the next stretch, one to spare and the save fit
    assert not call_over(500, 30, 20, 500, 30, 590)  # 500 + 2 x 30 + 20 = 580
    assert call_over(500, 40, 20, 500, 30, 590)  # 600: stop now, the state saved
    # the forty-fourth session's last call: its finish ran slower than the elastic steps, and the timeout came
    # first (no --call-seconds then); a run whose rest does not fit with its scores stops before the limit
    assert call_over(200, 33, 5, 190, 40, 268)


def test_a_call_stops_between_tenths_and_the_next_goes_on_from_that_step(tmp_path):
    """--call-seconds reads the clock every quarter tenth, not every tenth (a tenth of a 16M-token run is a minute
    or more on an H100), saves the state where it stops and the next call trains every step once."""
    state, first, second = tmp_path / "state", tmp_path / "first.json", tmp_path / "second.json"
    bench = BENCH + ["--tokens-b", "5120", "--state-dir", str(state)]  # 40 steps: tenths of 4, stretches of 1
    r = subprocess.run(bench + ["--call-seconds", "0", "--json", str(first)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 75, r.stderr[-2000:]
    assert "stopped at step 1/40" in r.stdout and "(--call-seconds 0)" in r.stdout
    (run_dir,) = state.iterdir()
    assert json.loads((run_dir / "bench.json").read_text())["step"] == 1 and (run_dir / "train_state").exists()
    r = subprocess.run(bench + ["--call-seconds", "100000", "--json", str(second)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]  # a call long enough for the rest runs it to the end
    assert "resumed at step 1" in r.stdout
    elastic = json.loads(second.read_text())["B"]["methods"]["elastic"]
    rows = [row for row in json.loads(second.read_text())["B"]["rows"] if row["method"] == "elastic"]
    assert elastic["resumed_at_step"] == 1 and sum(row["steps_sampled"] for row in rows) == 40
    assert [t["step"] for t in elastic["argmax_trajectory"]] == list(range(4, 41, 4))  # at each tenth's end only


def test_call_seconds_without_a_state_dir_is_refused():
    r = subprocess.run(BENCH + ["--call-seconds", "500"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "--call-seconds needs --state-dir" in r.stderr


def test_the_bench_refuses_a_hold_the_trainer_would_refuse_in_the_same_words():
    """bench_elastic checks --hold / --hold-rate / --hold-pull with the trainer's own rule (train_config.hold_problem),
    before any model is built, so a run on the GPU machine cannot fail minutes in on a typo."""
    for flags, words in [(["--hold", "embedding"], "'embedding' is not one of embeddings, norms"),
                         (["--hold-rate", "0.1"], "a rate or a pull is of the parts held"),
                         (["--hold", "norms", "--hold-pull", "10"], "a pull needs a rate > 0")]:
        r = subprocess.run(BENCH + flags, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("--hold") and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_a_delta_beside_a_hold_that_trains_scores_the_full_model_elastify_full_keeps_held_writes(tmp_path):
    """With --full-delta-rank and --hold at a rate the bench also scores the merged full model with only the held
    parts put back at the parent's (`full_keeps_held`): on the hybrid not the same as every non-delta weight put
    back (Mamba's own, the experts, the gates), nor the merged model as trained."""
    out = tmp_path / "k.json"
    argv = BENCH[:BENCH.index("--variants")] + ["--variants", "joint_anchor"] + \
        BENCH[BENCH.index("--variants") + 2:]
    r = subprocess.run(argv + ["--full-delta-rank", "2", "--hold", "embeddings,norms", "--hold-rate", "1",
                               "--hold-pull", "10", "--full-delta-finish", "40", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    part = json.loads(out.read_text())["B"]
    how = part["methods"]["joint_anchor"]
    # the rate is over every step the trainer ran in its seconds, the delta's finish's too
    per_step = part["training"]["T"] // part["training"]["elastic_steps"]
    assert how["finish_tokens"] == 40 * per_step and how["steps"] <= 40
    ran = (how["steps"] + 40) * per_step
    assert math.isclose(how["tokens_per_s"] * how["train_seconds"], ran, rel_tol=0.1), (how, ran)
    full = next(row for row in part["rows"] if row["method"] == "joint_anchor" and row["budget"] == "1.0")
    kept, rest = how["full_keeps_held"]["wiki"], how["full_with_parents_rest"]["wiki"]
    assert math.isfinite(kept) and kept != rest and kept != full["perplexity"]["wiki"]


def test_the_full_budget_kept_from_the_first_step_needs_a_delta_beside_a_hold_that_trains():
    """--full-keeps-held-training (TrainConfig.full_keeps_held) is refused in one line, before any training,
    without the delta and a hold at a rate: there would be nothing of the parent's for the full budget to keep."""
    for extra in ([], ["--full-delta-rank", "2", "--hold", "norms"], ["--hold", "norms", "--hold-rate", "1"]):
        r = subprocess.run(BENCH + ["--full-keeps-held-training", *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == ("--full-keeps-held-training: give --full-delta-rank, --hold and "
                                                     "--hold-rate > 0")


def test_a_resumed_run_with_the_full_budgets_delta_and_kept_values_equals_one_run(tmp_path):
    """PLAN17 16K's run (T = 16M, several device calls) resumes a full delta beside held parts that train and
    are pulled back, the full budget keeping the parent's values from the first step: stopped after its first
    tenth and resumed, it scores what one uninterrupted run scores, every budget (the delta, the pull's parent
    values and the kept values all come back)."""
    flags = ["--variants", "elastic_anchor", "--full-anchor", "1", "--full-delta-rank", "2", "--hold",
             "embeddings,norms", "--hold-rate", "1", "--hold-pull", "10", "--full-keeps-held-training",
             "--tokens-b", "4096"]  # 32 steps, stopped after 3: the first anchor step moves nothing (KD 0)
    one, resumed, state = tmp_path / "one.json", tmp_path / "resumed.json", tmp_path / "state"
    r = subprocess.run(BENCH + flags + ["--json", str(one)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(BENCH + flags + ["--state-dir", str(state), "--max-train-seconds", "0", "--json",
                                        str(tmp_path / "first.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 75, r.stderr[-2000:]
    r = subprocess.run(BENCH + flags + ["--state-dir", str(state), "--json", str(resumed)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "resumed at step 3" in r.stdout, r.stderr[-2000:]

    def trained(path):
        return {row["budget"]: row["perplexity"]["wiki"] for row in json.loads(path.read_text())["B"]["rows"]
                if row["method"] == "elastic_anchor"}

    a, b = trained(one), trained(resumed)
    assert set(a) == {"1.0", "0.75", "0.5"} and set(b) == set(a)
    for budget, ppl in a.items():
        assert math.isclose(b[budget], ppl, rel_tol=1e-6), (budget, ppl, b[budget])


def test_strict_determinism_is_applied_and_recorded(tmp_path):
    """--strict-determinism turns deterministic algorithms on without warn-only (on a GPU SDPA then leaves its
    cuDNN backend, whose backward is not deterministic), the run completes under it, and the result says which
    mode it ran in (here on the CPU: off without the flag, since only a GPU run asks for warn-only)."""
    out = {}
    for name, extra in (("plain", []), ("strict", ["--strict-determinism"])):
        out[name] = tmp_path / f"{name}.json"
        r = subprocess.run(BENCH + extra + ["--json", str(out[name])], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out["strict"].read_text())["deterministic"] == "strict"
    assert json.loads(out["plain"].read_text())["deterministic"] == "off"
    one, two = (json.loads(out[n].read_text())["B"]["rows"] for n in ("plain", "strict"))
    assert [row["perplexity"] for row in one] == [row["perplexity"] for row in two]  # the CPU was deterministic already


def test_strict_runs_sample_their_anchor_text_warn_only_and_stop_on_a_nondeterministic_op():
    """Under --strict-determinism the parent samples the anchor's text with deterministic algorithms at warn-only
    (strict made that forward-only sampling 12x slower on the GPU), strict again afterwards; an op that warns of
    a non-deterministic kernel meanwhile stops the run with its message, and outside strict mode nothing changes."""
    import warnings

    import pytest
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_elastic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True, warn_only=False)
        with pytest.warns(UserWarning, match="unrelated"), bench_elastic.sampling_determinism():
            assert bench_elastic.determinism() == "warn-only"
            warnings.warn("an unrelated warning")  # not about determinism: shown, and the run goes on
        assert bench_elastic.determinism() == "strict"
        with pytest.raises(SystemExit, match="without a deterministic kernel: index_add_cuda_ does not have a "
                                             "deterministic implementation"):
            with bench_elastic.sampling_determinism():
                warnings.warn("index_add_cuda_ does not have a deterministic implementation, but you set ...")
        assert bench_elastic.determinism() == "strict"
        torch.use_deterministic_algorithms(False)
        with bench_elastic.sampling_determinism(), pytest.warns(UserWarning, match="index_add_cuda_"):
            assert bench_elastic.determinism() == "off"
            warnings.warn("index_add_cuda_ does not have a deterministic implementation")  # not strict: no stop
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_the_bench_scores_every_row_on_the_parents_own_chat_answers(tmp_path):
    """--heldout wiki,chat: beside the prose, every row is scored on the parent's greedy answers to elastify's
    chat questions (its answers' tokens alone): the sorted parent's zero-shot 1.0 as the parent (the sort
    preserves its function), the trained rows elsewhere."""
    from star_elastic.elastify import CHAT_QUESTIONS

    out = tmp_path / "chat.json"
    argv = [a if a != "wiki" else "wiki,chat" for a in BENCH]
    r = subprocess.run(argv + ["--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    part = json.loads(out.read_text())["B"]
    assert list(part["heldout"]) == ["wiki", "chat"] and part["heldout"]["chat"] >= len(CHAT_QUESTIONS)
    rows = part["rows"]
    assert all(set(row["perplexity"]) == {"wiki", "chat"} for row in rows)
    parent = next(row for row in rows if row["method"] == "parent")["perplexity"]["chat"]
    zero = next(row for row in rows if row["method"] == "zero_shot" and row["budget"] == "1.0")["perplexity"]["chat"]
    assert parent > 1 and math.isclose(zero, parent, rel_tol=1e-4)
    trained = [row["perplexity"]["chat"] for row in rows if row["method"] == "elastic"]
    assert trained and all(not math.isclose(t, parent, rel_tol=1e-4) for t in trained)


def test_a_calls_setup_is_kept_with_the_anchor_cache_and_read_by_the_next_call(tmp_path):
    """--anchor-cache: the parent's chat answers (most of a device call's setup), its importance and the parent's
    and (a)'s scores are made once a machine and read by every later call of the same parent (a resumed run's
    next call, a run beside it); a file that says otherwise is what the next call reports, so the file is what it
    reads, and another parent makes its own."""
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    argv = [a if a != "wiki" else "wiki,chat" for a in BENCH] + ["--variants=", "--anchor-cache", str(cache)]

    rows = {}

    def run(name, *more):
        out = tmp_path / f"{name}.json"
        r = subprocess.run(argv + list(more) + ["--json", str(out)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        rows[name] = {(row["method"], row["budget"]): row for row in json.loads(out.read_text())["B"]["rows"]}
        return rows[name][("parent", "1.0")]["perplexity"]["chat"], r.stdout

    first, out = run("first")
    (kept,) = cache.glob("chat-*.safetensors")
    assert "chat answers from" not in out and "importance from" not in out
    second, out = run("second")
    assert "the parent's chat answers from" in out and second == first and "importance from" in out
    assert rows["second"] == rows["first"]
    answers = load_file(str(kept))
    answers["ids0"] = answers["ids0"].flip(0)  # the first answer's tokens reversed: another text to score
    save_file(answers, str(kept))
    third, _ = run("third")
    assert third != first  # other answers: scored afresh (the scores' key holds the held-out text's fingerprint)
    # the parent's and (a)'s scores are kept too, under the model's weights and the text: what the file says is
    # what the next call reports
    scores = list(cache.glob("score-*.json"))
    assert len(scores) == 2 * 4  # (the parent; (a)'s 1.0, the parent sorted: other weights, the same function;
    # (a)'s 0.75 and 0.5) x two chat texts
    for f in scores:
        kept_score = json.loads(f.read_text())
        f.write_text(json.dumps({**kept_score, "perplexity": {k: 2 * v for k, v in kept_score["perplexity"].items()}}))
    fourth, _ = run("fourth")
    assert math.isclose(fourth, 2 * third, rel_tol=1e-12)
    from star_elastic.elastic.importance import load_scores, save_scores

    (importance,) = cache.glob("importance-*.safetensors")
    got = load_scores(importance)
    save_scores({k: v if k == "meta" else -v for k, v in got.items()}, importance)  # the least important first
    run("reversed")
    cut = ("zero_shot", "0.5")  # sorted the other way, (a)'s 0.5 is another model
    assert rows["reversed"][cut]["spec"] == rows["fourth"][cut]["spec"]
    assert rows["reversed"][cut]["perplexity"]["wiki"] != rows["fourth"][cut]["perplexity"]["wiki"]
    _, out = run("other", "--pretrain-lr", "1e-2")  # another parent: its own answers, in a file of their own
    assert "chat answers from" not in out and len(list(cache.glob("chat-*.safetensors"))) == 2


def test_a_weights_digest_tells_a_permuted_tensor_from_the_original():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_elastic import weights_digest

    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.weight.copy_(b.weight.flip(0))  # the same values, rows in another order: the same sums, another model
    assert weights_digest(a) != weights_digest(b)


def test_a_run_cut_while_its_full_budget_is_scored_keeps_its_training_log_and_smaller_rows(tmp_path, monkeypatch):
    """A device call's limit that falls while the trained rows are scored (twenty-fourth session: two runs lost
    everything after 512 steps) leaves the training's record and the smaller budgets' rows in --json: the full
    budget, whose scores with a delta take several passes, is scored last."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_elastic

    class Cut(Exception):
        pass

    def cut_at_the_full_budget(model, heldouts, args, reference=None):
        if reference is not None:  # only the full budget is scored against the parent
            raise Cut
        return real(model, heldouts, args)

    real = bench_elastic.scores
    monkeypatch.setattr(bench_elastic, "scores", cut_at_the_full_budget)
    out = tmp_path / "cut.json"
    argv = BENCH[2:BENCH.index("--variants")] + ["--variants", "joint_anchor"] + BENCH[BENCH.index("--variants") + 2:]
    try:
        bench_elastic.main(argv + ["--full-delta-rank", "2", "--json", str(out)])
    except Cut:
        pass
    else:
        raise AssertionError("the full budget was never scored against its parent")
    part = json.loads(out.read_text())["B"]
    how = part["methods"]["joint_anchor"]
    assert how["steps"] == 16 and how["log"] and "eval_seconds" not in how
    assert how["full_without_delta"] is not None and how["full_kl_from_parent"] is None  # cut between the two
    scored = {row["budget"] for row in part["rows"] if row["method"] == "joint_anchor"}
    assert scored == set(part["budgets"]) - {"1.0"}
