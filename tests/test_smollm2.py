"""Real weights: SmolLM2-135M perplexity on real held-out text equals transformers' (slow)."""

import pytest


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers():
    from star_elastic.assets import smollm2_gguf
    from star_elastic.evaluate import transformers_parity

    res = transformers_parity(smollm2_gguf(), "wiki", max_tokens=2048, seq_len=512)
    assert res["ours"]["tokens"] == res["transformers"]["tokens"] > 2000
    assert 5 < res["ours"]["perplexity"] < 60  # a real model on real text, not noise
    assert res["relative_difference"] < 1e-3
