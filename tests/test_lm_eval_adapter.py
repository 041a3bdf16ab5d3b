"""The lm-evaluation-harness adapter's scoring, against our own perplexity computation."""

import pytest
import torch

from star_elastic.elastic.checkpoint import load_elastic
from star_elastic.elastic.slicing import slice_model
from star_elastic.evaluate import perplexity
from star_elastic.lm_eval_adapter import BudgetScorer

TEXT = "w5 w6 w7 w8 w9 w10 w11 w12"


@pytest.fixture(scope="module")
def scorer(elastic_ckpt):
    return BudgetScorer.from_checkpoint(str(elastic_ckpt[0]), budget=0.5, max_length=64, batch_size=3)


def test_the_budget_is_the_sliced_model(scorer, elastic_ckpt):
    ckpt = load_elastic(elastic_ckpt[0])
    assert scorer.model.num_parameters() == slice_model(ckpt.model, ckpt.spec("0.5")).num_parameters()
    assert scorer.model.num_parameters() < ckpt.model.num_parameters()


def test_rolling_loglikelihood_is_minus_our_total_nll(scorer):
    tokens = torch.tensor([scorer.prefix_token] + scorer.encode(TEXT))
    ours = perplexity(scorer.model, tokens, seq_len=len(tokens), progress=False)
    assert ours["tokens"] == len(tokens) - 1
    assert scorer.loglikelihood_rolling([TEXT])[0] == pytest.approx(-ours["nll"] * ours["tokens"], rel=1e-5)
    # windows shorter than the text score every token once, each window from one token of context
    short = BudgetScorer(scorer.model, scorer.tokenizer, max_length=3)
    windows = [tokens[s: s + 4] for s in range(0, len(tokens) - 1, 3)]
    expected = sum(-perplexity(scorer.model, w, seq_len=len(w), progress=False)["nll"] * (len(w) - 1) for w in windows)
    assert short.loglikelihood_rolling([TEXT])[0] == pytest.approx(expected, rel=1e-5)


def test_context_plus_continuation_adds_up_and_greedy_is_the_argmax(scorer):
    words = TEXT.split()
    tokens = torch.tensor(scorer.encode(TEXT))  # no separator: a non-empty context is not given one
    ours = perplexity(scorer.model, tokens, seq_len=len(tokens), progress=False)
    context, continuation = " ".join(words[:3]), " " + " ".join(words[3:])
    (ll_head, _), (ll_cont, _), (ll_again, _) = scorer.loglikelihood(
        [(words[0], " " + " ".join(words[1:3])), (context, continuation), (words[0], " " + " ".join(words[1:3]))])
    assert ll_head == ll_again  # batched with others or not, the same number
    assert ll_head + ll_cont == pytest.approx(-ours["nll"] * ours["tokens"], rel=1e-5)
    # a continuation of exactly the model's greedy tokens is flagged greedy; another one is not
    ids = torch.tensor([scorer.encode(context)])
    with torch.no_grad():
        best = scorer.model(ids)[0, -1].argmax().item()
    word = scorer.tokenizer.decode([best])
    other = next(w for w in words if scorer.encode(w) != [best])
    (_, greedy), (_, not_greedy) = scorer.loglikelihood([(context, " " + word), (context, " " + other)])
    assert greedy and not not_greedy


def test_registered_with_lm_eval(elastic_ckpt):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    lm = get_model("star-elastic").create_from_arg_string(f"pretrained={elastic_ckpt[0]},budget=0.5,max_length=64")
    req = Instance("loglikelihood", doc={}, arguments=("w5 w6", " w7"), idx=0)
    assert lm.loglikelihood([req])[0] == pytest.approx(lm.scorer.loglikelihood([("w5 w6", " w7")])[0])
    out = lm.generate_until([Instance("generate_until", doc={}, arguments=("w5 w6", {"until": ["w9"],
                                                                                      "max_gen_toks": 4}), idx=0)])
    assert isinstance(out[0], str) and "w9" not in out[0]
    assert lm_eval is not None
