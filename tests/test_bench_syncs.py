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


def test_steps_are_taken_as_run_takes_them_each_read_after_the_next_is_queued():
    events = []

    class Logs:
        def __init__(self, i):
            self.i = i

        def result(self):
            events.append(("read", self.i))

    class Trainer:
        n = 0

        def train_step(self, defer=False):
            assert defer
            self.n += 1
            events.append(("step", self.n))
            return Logs(self.n)

    bench_syncs.steps_as_run_takes_them(Trainer(), 3)
    assert events == [("step", 1), ("step", 2), ("read", 1), ("step", 3), ("read", 2), ("read", 3)]


def test_event_waits_are_counted_by_the_line_that_read(monkeypatch):
    """A wait on a CUDA event (HostCopy's) is invisible to torch's sync detector; the bench counts it by the
    first line of ours that led to it, and puts the method back after."""
    import inspect

    import torch

    def stand_in(self):
        return None

    monkeypatch.setattr(torch.cuda.Event, "synchronize", stand_in)
    with bench_syncs.event_waits() as hits:
        for _ in range(2):
            line = inspect.currentframe().f_lineno + 1
            torch.cuda.Event.synchronize(None)
    assert dict(hits) == {f"tests/test_bench_syncs.py:{line}": 2}
    assert torch.cuda.Event.synchronize is stand_in
