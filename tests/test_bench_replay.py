"""benchmarks/bench_replay.py: generate's batch-1 decode step against the engine's, on the host's clock."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pytest  # noqa: E402


def test_both_steps_compute_the_same_logits_and_every_timing_is_measured(tmp_path):
    """The smoke run on the CPU: generate's DecodeStep and the engine's StaticStep, one row each, give the same
    first logits (the same model, positions handled alike), and each of the four timings is a positive time,
    written to the JSON with the bound's share computed from them."""
    from bench_replay import main

    out = tmp_path / "r.json"
    result = main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text())["rows"].keys() == {"generate", "engine"}
    assert result["first_logits_max_diff"] == 0 and result["first_logits_max_abs"] > 0
    for row in result["rows"].values():
        assert all(row[k] > 0 for k in ("idle", "queued", "free_running", "read_behind"))
        assert row["bound_share_free_running"] == pytest.approx(
            result["step_weight_bytes"] / row["free_running"] / (result["hbm_gbs"] * 1e9))
    # the engine's own loop ran the request: every step but the first launched from the last one's tokens, and the
    # host's launching and waiting are parts of the step's period
    loop = result["scheduler"]
    assert loop["steps"] >= 5 and loop["chained"] == loop["steps"] - 1
    assert 0 < loop["launch"] + loop["wait"] <= loop["period"]
    assert all(v > 0 for v in result["launch_pieces"].values())


def test_compiling_on_a_cpu_is_refused_in_one_line():
    from bench_replay import main

    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--model", "tiny", "--compile", "on"])
