"""benchmarks/bench_router_cost_only.py runs: it borrows ElasticTrainer's router warm-up on a stand-in
object, which broke unseen when the warm-up read a new trainer attribute (start_projections)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_cost_only_router_bench_runs_and_reports_both_budgets(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_router_cost_only.py"), "--steps", "4",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())["results"]
    assert set(got["warm-up"]) == set(got["cost only"]) == {"0.75", "0.5"}
    # the warm-up fits the router to the budgets' bands before any training step
    assert all(abs(v["cost_vs_target"] - 1) < 0.1 for v in got["warm-up"].values())
    assert all(v["cost_vs_target"] > 0 for v in got["cost only"].values())  # 4 steps: anywhere, but an architecture
