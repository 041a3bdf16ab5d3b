"""benchmarks/bench_load.py, briefly: the real server (in-process) under 3 concurrent clients for 3 s
over a tiny checkpoint. No request fails, every budget is served, the server is idle afterwards,
and the JSON holds what the results tables need. No timing is asserted."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_load  # noqa: E402


def test_load_benchmark_serves_every_budget_without_failures(tmp_path):
    out = tmp_path / "load.json"
    res = bench_load.main(["--model", "tiny", "--in-process", "--threads", "1", "--clients", "3", "--seconds", "3",
                           "--baseline-seconds", "1", "--prompt-tokens", "8", "--new-tokens", "6",
                           "--json", str(out)])
    data = json.loads(out.read_text())
    for key in ("command", "machine", "cpu", "torch", "date", "budgets", "clients", "phases", "gain", "failures",
                "memory_samples", "requests", "request_fields", "markdown", "tokens_match"):
        assert key in data, key
    assert data["budgets"] == ["1.0", "0.75", "0.5"] and data["clients"] == 3
    assert data["failures"] == [] and data["warmup_failures"] == []
    assert data["tokens_match"] is True  # EOS ignored: the server wrote exactly what the clients counted
    assert data["server_exit_code"] == 0
    for name in ("sequential", "concurrent"):
        phase = data["phases"][name]
        for b in data["budgets"] + ["all"]:
            s = phase["summary"][b]
            assert s["failed"] == 0 and s["requests"] >= 1, (name, b, s)
            for k in ("tok_s", "latency_p50", "latency_p99", "ttft_p50", "ttft_p99"):
                assert k in s, k
        assert phase["after"]["leaked"] is None, phase["after"]  # no slot held, nothing waiting, caches dropped
        assert phase["memory"]["rss_peak"] >= phase["memory"]["rss_start"] > 0
    assert data["phases"]["concurrent"]["clients"] == 3
    fields = data["request_fields"]
    rows = [dict(zip(fields, r)) for r in data["requests"]]
    assert {r["budget"] for r in rows if r["phase"] == "concurrent"} == set(data["budgets"])
    for r in rows:
        assert r["error"] is None and r["tokens"] == 6 and r["finish"] == "length", r
        assert r["ttft"] is not None and 0 < r["ttft"] <= r["latency"], r
    assert len(rows) == sum(p["summary"]["all"]["requests"] for p in data["phases"].values())
    assert "| all |" in data["markdown"] and res["gain"]["all"] > 0


def test_the_server_layer_alone_with_fake_model_steps(tmp_path, monkeypatch):
    """--fake-step-ms: the model is not run (each step a wait that writes token 42), so the benchmark measures
    the server's own work; every request still gets its tokens through the real server and scheduler."""
    from star_elastic.serve import batching

    for cls, name in ((batching.SlotPool, "decode"), (batching.Scheduler, "_prefill")):
        monkeypatch.setattr(cls, name, getattr(cls, name))  # put back after the test: the fake patches the classes
    out = tmp_path / "load.json"
    bench_load.main(["--model", "tiny", "--in-process", "--threads", "1", "--clients", "3", "--seconds", "2",
                     "--baseline-seconds", "1", "--prompt-tokens", "8", "--new-tokens", "5", "--fake-step-ms", "2",
                     "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["fake_step_ms"] == 2.0 and data["failures"] == [] and data["tokens_match"] is True
    rows = [dict(zip(data["request_fields"], r)) for r in data["requests"]]
    assert rows and all(r["error"] is None and r["tokens"] == 5 for r in rows)
    assert batching.SlotPool.decode.__module__ == "bench_load"  # the model really was replaced
