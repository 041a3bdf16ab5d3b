"""benchmarks/bench_elastic.py --merge refuses results that do not score the same held-out text."""

import json
import subprocess
import sys
from pathlib import Path

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
