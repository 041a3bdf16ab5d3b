"""benchmarks/bench_elastic.py --state-dir: a (b) run longer than one device call goes on where the
last call stopped (device calls end at 600 s; an anchored SmolLM2 run at 16M tokens needs ~13 minutes)."""

import json
import subprocess
import sys
from pathlib import Path

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
