"""Real weights: SmolLM2-135M perplexity on real held-out text equals transformers' (slow)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers():
    from bench_smollm2_parity import compare

    res = compare("wiki", max_tokens=2048, seq_len=512)
    assert res["ours"]["tokens"] == res["transformers"]["tokens"] > 2000
    assert 5 < res["ours"]["perplexity"] < 60  # a real model on real text, not noise
    assert res["relative_difference"] < 1e-3
