"""benchmarks/bench_syncs.py: the host syncs of a training step, counted by line of Python (GPU only)."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_syncs  # noqa: E402


def test_syncs_are_counted_per_line_of_python_and_per_step():
    sync = "called a synchronizing CUDA operation"
    ours = bench_syncs.OURS + "/star_elastic/train.py"
    records = [warnings.WarningMessage(sync, UserWarning, ours, 10)] * 4 + \
        [warnings.WarningMessage(sync, UserWarning, "/site/torch/x.py", 5)] * 2 + \
        [warnings.WarningMessage("something else", UserWarning, ours, 11)] * 3
    assert bench_syncs.count_syncs(records, steps=2) == [{"where": "star_elastic/train.py:10", "per_step": 2.0},
                                                          {"where": "/site/torch/x.py:5", "per_step": 1.0}]


@pytest.mark.parametrize("variant", ["joint", "router"])
def test_the_counted_trainers_build_and_step(tmp_path, variant):
    """What the GPU run counts: SmolLM2's shapes, budgets 1.0 / 0.75 / 0.5, the anchor; here one tiny step."""
    import torch

    t = bench_syncs.trainer(variant, torch.device("cpu"), batch=1, seq=32, steps=1, out=str(tmp_path))
    assert (t.router is None) == (variant == "joint")
    assert "full_kd" in t.train_step()


def test_without_a_gpu_it_says_so_in_one_line():
    r = subprocess.run([sys.executable, str(BENCH / "bench_syncs.py"), "--device", "cpu"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "needs a CUDA device" in r.stderr and "Traceback" not in r.stderr
