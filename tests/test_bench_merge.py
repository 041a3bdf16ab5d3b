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
