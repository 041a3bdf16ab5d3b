"""benchmarks/bench_elastic.py --merge refuses results that do not score the same held-out text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_merging_runs_of_different_seeds_is_refused(tmp_path):
    """The seed draws the train / held-out split. A seed-1 elastic run merged with seed-0 baselines
    once reported a +11.9% drift of the full model that was the split, not the model."""
    for seed in (0, 1):
        (tmp_path / f"s{seed}.json").write_text(json.dumps({"seed": seed, "smoke": False, "command": "x"}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_elastic.py"), "--merge",
                        str(tmp_path / "s0.json"), str(tmp_path / "s1.json")], capture_output=True, text=True)
    assert r.returncode != 0 and "different seeds" in r.stderr
    ok = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_elastic.py"), "--merge",
                         str(tmp_path / "s0.json"), str(tmp_path / "s0.json")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_minitron_arch_takes_the_rows_of_the_named_variant(tmp_path):
    """`--minitron-arch RESULT.json:elastic_anchor` distils (c) on the sandwich run's architectures; a
    bare RESULT.json keeps taking (b)'s; a variant the file lacks is a one-line error."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_elastic
    from star_elastic.elastic.cost import Budget
    from star_elastic.errors import StarElasticError

    def row(method, ffn):
        return {"method": method, "budget": "0.5", "spec": {"intermediate_size": ffn}}

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"seed": 3, "A": {"rows": [row("elastic", 512), row("elastic_anchor", 640)]}}))
    half = [Budget(kind="params", target=50.0, full=100.0, name="0.5")]
    assert bench_elastic.recorded_elastic_specs(str(path), "A", 3, half)["0.5"].intermediate_size == 512
    assert bench_elastic.recorded_elastic_specs(f"{path}:elastic_anchor", "A", 3, half)["0.5"].intermediate_size == 640
    with pytest.raises(StarElasticError, match="no elastic_small row"):
        bench_elastic.recorded_elastic_specs(f"{path}:elastic_small", "A", 3, half)
    bundle = tmp_path / "bundle.json"  # a session's runs in one file, as docs/results keeps them
    bundle.write_text(json.dumps({"runs": {"E0": json.loads(path.read_text())}}))
    got = bench_elastic.recorded_elastic_specs(f"{bundle}#E0:elastic_anchor", "A", 3, half)
    assert got["0.5"].intermediate_size == 640
    with pytest.raises(StarElasticError, match="no run 'E9'.*has: E0"):
        bench_elastic.recorded_elastic_specs(f"{bundle}#E9", "A", 3, half)


def test_the_runs_log_keeps_every_budget_through_the_whole_run(tmp_path):
    """bench_elastic's JSON log thins each budget along its own steps: thinned along the run's (every 34th of
    2,048 steps, a Fibonacci stride), the trainer's golden-ratio order put the 0.5 alone in the first half of
    the forty-seventh session's log and the 0.75 alone in the second."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_elastic
    from test_train import trainer

    t = trainer(tmp_path, steps=2048, stage1_fraction=0.5, stage2_weights=[0.0, 0.8, 0.2], full_anchor=1.0)
    logs = []
    for step in range(2048):  # the trainer's own order, no training: what a 2,048-step run draws
        t.step = step
        logs.append({"step": step, "budget": t.budgets[t.sample_budget()].name, "kd": 1.0, "eval": {}})
    logs += [{"step": 2048 + i, "budget": "1.0", "phase": "full_delta_finish", "kd": 0.1} for i in range(768)]
    old = logs[:2048:2048 // 60]  # the old thinning, along the run
    assert {lg["budget"] for lg in old[: len(old) // 2]} == {"0.5"} and {lg["budget"] for lg in old[-10:]} == {"0.75"}
    thin = bench_elastic.thin_log(logs)
    for half in (thin[: len(thin) // 3], [lg for lg in thin if 1024 <= lg["step"] < 2048]):
        assert {lg["budget"] for lg in half} >= {"0.75", "0.5"}  # both budgets, early and late
    counts = {b: sum(lg["budget"] == b and "phase" not in lg for lg in thin) for b in ("0.75", "0.5")}
    assert all(60 <= n <= 120 for n in counts.values()), counts
    assert sum("phase" in lg for lg in thin) >= 60 and all("eval" not in lg for lg in thin)
    assert [lg["step"] for lg in thin] == sorted(lg["step"] for lg in thin)
