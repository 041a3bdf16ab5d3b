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


def test_layers_give_nano_widths_another_layer_mix_and_are_refused_for_other_parents():
    """--layers: the bytes a step reads follow the pattern (Nano's 16-layer mix reads more than the default `M*EM`,
    and its 0.5, the search's architecture for that mix, gains less by bytes at B = 32: 1.80x against 1.91x);
    another --model refuses it in one line."""
    bench = str(ROOT / "benchmarks" / "bench_batching.py")

    def table(*extra):
        run = subprocess.run([sys.executable, bench, "--model", "nano", "--bytes-only", "--batch-sizes", "32",
                              "--budgets", "1.0,0.5", *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        rows = [line.split() for line in run.stdout.splitlines() if line.strip().startswith(("1.0", "0.5"))]
        return {r[0]: (float(r[1]), float(r[3].rstrip("x"))) for r in rows}

    default, deep = table(), table("--layers", "MEMEM*EMEMEM*EME")
    assert deep["1.0"][0] > 4 * default["1.0"][0]  # GB a step: 12 more layers of Nano's widths
    assert deep["0.5"][1] < default["0.5"][1]
    run = subprocess.run([sys.executable, bench, "--model", "tiny", "--bytes-only", "--layers", "M*EM"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode != 0 and "--layers is for --model nano" in run.stderr.strip().splitlines()[-1]
