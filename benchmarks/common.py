"""What every benchmark shares: the device set-up, the machine's name, a clock that waits for the
GPU, a median timer on that clock, and JSON written whole. Benchmarks import it as `common` (run
from anywhere as `python benchmarks/NAME.py`: Python puts the script's folder on the path)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def setup(device: str | None, seed: int = 0) -> torch.device:
    """The device asked for (default: CUDA when there is one), seeded; on a GPU deterministic
    algorithms are requested (warn-only) with the cuBLAS workspace they need."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before first use
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    return dev


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn, device: torch.device, warmup: int = 0, iters: int = 1) -> float:
    """Median seconds of one call of `fn` (the upper middle of an even count) after `warmup` untimed
    calls, each call timed on `clock` (the GPU's queued work included)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = clock(device)
        fn()
        times.append(clock(device) - t0)
    return sorted(times)[len(times) // 2]


def write_json(path, data: dict, indent: int = 2, default=None) -> None:
    """`data` as indented JSON at `path` (folders made), written to a temporary file and renamed.
    `default` is json.dumps's: what to write for values JSON has no type for (e.g. `str`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=default) + "\n")
    tmp.replace(path)
