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
