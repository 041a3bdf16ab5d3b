"""benchmarks/bench_batching.py: what it accepts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_batch_size_below_the_sequential_requests_runs(tmp_path):
    """--batch-sizes 1 with the default 4 sequential requests: prompts are made for whichever needs more (the
    fifty-fifth session's B = 1 call on the GPU stopped on an IndexError instead)."""
    out = tmp_path / "b.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_batching.py"), "--model", "tiny",
                          "--batch-sizes", "1", "--no-mixed", "--prompt-len", "8", "--new-tokens", "4", "--reps", "1",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["batch"] for r in rows} == {1} and len({r["budget"] for r in rows}) == 3
