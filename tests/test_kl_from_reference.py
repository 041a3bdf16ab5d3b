"""evaluate.perplexity / answer_scores with a reference model: the mean KL(reference || model) a scored position,
the drift measure that perplexity misses (a flatter model scores better on prose its parent is unsure of)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_
from star_elastic.evaluate import answer_scores, compare_models, perplexity
from star_elastic.model import Model, ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, layer_types="*-*-", head_dim=8)


def _pair():
    torch.manual_seed(0)
    parent = randomize_(Model(CFG)).eval()
    moved = copy.deepcopy(parent)
    with torch.no_grad():
        moved.lm_head.weight.mul_(0.7)  # flatter: the same argmax, less sure
    return parent, moved


def test_kl_from_the_reference_is_zero_for_itself_and_the_mean_kl_for_another():
    parent, moved = _pair()
    stream = torch.randint(0, 64, (300,))
    assert perplexity(parent, stream, seq_len=64, batch_size=2, progress=False,
                      reference=parent)["kl_from_reference"] == 0.0
    got = perplexity(moved, stream, seq_len=64, batch_size=2, progress=False, reference=parent)
    ours = compare_models(parent, {"moved": moved}, stream, seq_len=64, batch_size=2, progress=False)["moved"]
    assert got["kl_from_reference"] > 0 and got["kl_from_reference"] == pytest.approx(ours["kl_from_full"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-6)
    assert "kl_from_reference" not in perplexity(moved, stream, seq_len=64, progress=False)


def test_on_chat_answers_the_kl_is_over_the_answer_positions_alone():
    parent, moved = _pair()
    ids = torch.randint(0, 64, (20,))
    start = 12
    with torch.no_grad():
        p = F.log_softmax(parent(ids[None])[0, start - 1:-1].float(), -1)
        q = F.log_softmax(moved(ids[None])[0, start - 1:-1].float(), -1)
    want = float((p.exp() * (p - q)).sum(-1).mean())
    got = answer_scores(moved, [(ids, start)], reference=parent)
    assert got["kl_from_reference"] == pytest.approx(want, rel=1e-4) and want > 0
    assert answer_scores(parent, [(ids, start)], reference=parent)["kl_from_reference"] == 0.0
