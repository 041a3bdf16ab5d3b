"""benchmarks/bench_expert_gather.py on the CPU: every candidate decode from a budget's strided expert
views computes what the contiguous copy computes, the gathers bit for bit, and `model` is what a served
budget runs (Experts.forward on the views)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_expert_gather import GATHERED, VARIANTS, main  # noqa: E402


def test_every_variant_agrees_with_the_contiguous_gather(tmp_path, capsys):
    out = tmp_path / "gather.json"
    main(["--device", "cpu", "--smoke", "--iters", "2", "--rounds", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["tokens"] for r in rows} == {1, 4} and any(not r["view_contiguous"] for r in rows)
    for r in rows:
        assert set(r["variants"]) == set(VARIANTS)
        for name, v in r["variants"].items():
            assert "error" not in v or name.startswith("grouped_mm"), (name, v)
            assert v.get("within_tol", True), (name, v)
            if name in GATHERED:
                assert v["exact"], name
        # on the CPU the model decodes a few tokens by the gather: bit for bit the copy's answer
        assert r["variants"]["model"]["exact"] and r["model_forward_equals_contig"]
    assert "all variants' outputs agree" in capsys.readouterr().out
