"""benchmarks/bench_rest_serve.py: a server's full budget with a rounded rest, three products a layer against its
merged weight, beside the parent (speed is the benchmark's; here what it compares must be the same model)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rest_serve.py"


def test_the_merged_rest_is_the_same_model_in_the_same_memory(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(BENCH), "--model", "tiny", "--rank", "4", "--bits", "2",
                        "--prompt-len", "8", "--new-tokens", "4", "--reps", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    rows = got["rows"]
    # the two forms give the same logits (to float32's rounding) and tokens, and the delta did move them
    assert got["logits_apart"] < 1e-5 < got["logits_moved_by_delta"] and got["greedy_equal"]
    # the merged copy takes what the dense rest took, beside the same factors; the parent holds nothing beside
    assert rows["merged"]["bytes_beside_parent"] == rows["three products"]["bytes_beside_parent"] > 0
    assert rows["parent"]["bytes_beside_parent"] == 0
    # a token of the three products reads the dense rest and the factors too; the merged one what the parent reads
    assert rows["three products"]["weight_bytes_a_token"] > rows["merged"]["weight_bytes_a_token"] == \
        rows["parent"]["weight_bytes_a_token"]
    assert "merged / three products: decode" in r.stdout
