"""Generation at a budget, elastic budget control (think small, answer large) and the CLI for both."""

import threading

import pytest
import torch

from elastic_ckpt import SPECS, make_checkpoint
from star_elastic import cli
from star_elastic.elastic.slicing import slice_model
from star_elastic.generate import generate
from star_elastic.serve.engine import ElasticEngine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = make_checkpoint(tmp_path_factory.mktemp("ck") / "ckpt", "nemotron_h")
    return ElasticEngine.load(out)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "ckpt", "llama")


PROMPT = torch.tensor([[5, 9, 14, 20, 7]])


def test_generate_at_a_budget_equals_the_sliced_model(engine):
    small = slice_model(engine.parent, SPECS["nemotron_h"]["0.5"]).eval()
    want = generate(small, PROMPT, 10, eos_token_id=engine.eos_ids)[0, 5:].tolist()
    assert engine.generate("0.5", PROMPT, 10).tokens == want
    assert engine.view("1.0") is engine.parent and engine.view("0.5") is engine.view("0.5")  # built once
    with pytest.raises(Exception, match="outside the trained params budgets"):
        engine.view("0.3")


def test_think_then_answer_equals_two_phases_by_hand(engine):
    think, answer = engine.view("0.5"), engine.view("1.0")
    free = generate(think, PROMPT, 12, eos_token_id=engine.eos_ids)[0, 5:].tolist()
    # a marker the small model does write (its 4th token): thinking must stop right after it
    marker = engine.tokenizer.decode([free[3]])
    got = engine.think_then_answer(PROMPT, "0.5", "1.0", max_think_tokens=12, max_answer_tokens=8, marker=marker)
    k = free.index(free[3]) + 1
    assert got.thinking == free[:k]
    by_hand = generate(answer, torch.cat([PROMPT, torch.tensor([free[:k]])], 1), 8, eos_token_id=engine.eos_ids)
    assert got.tokens == by_hand[0, 5 + k:].tolist()
    # no marker within the limit: thinking stops at the limit and the marker is appended
    absent = "w59 w58"
    assert absent not in engine.tokenizer.decode(free[:4])
    got = engine.think_then_answer(PROMPT, "0.5", "1.0", max_think_tokens=4, max_answer_tokens=6, marker=absent)
    closed = free[:4] + engine.tokenizer(absent, add_special_tokens=False)["input_ids"]
    assert got.thinking == closed
    by_hand = generate(answer, torch.cat([PROMPT, torch.tensor([closed])], 1), 6, eos_token_id=engine.eos_ids)
    assert got.tokens == by_hand[0, 5 + len(closed):].tolist()


def test_concurrent_generations_equal_sequential_ones(engine):
    """Views share the parent's weights and each model keeps one set of caches: concurrent calls on the
    same and on different budgets must not see each other's state."""
    prompts = [torch.tensor([[3 + i, 10 + 2 * i, 40 - i]]) for i in range(6)]
    budgets = ["0.5", "0.75", "0.5", "1.0", "0.75", "0.5"]
    want = [engine.generate(b, p, 10).tokens for b, p in zip(budgets, prompts)]
    got = [None] * 6

    def work(i):
        got[i] = engine.generate(budgets[i], prompts[i], 10).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_cli_generate_at_a_budget_and_think_answer(llama_ckpt, capsys):
    ckpt = llama_ckpt
    engine = ElasticEngine.load(ckpt)
    prompt = "w3 w4 w5"
    ids = engine.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert cli.main(["generate", str(ckpt), "--budget", "0.5", "--prompt", prompt, "--max-new-tokens", "6",
                     "--raw", "--device", "cpu"]) == 0
    want = engine.tokenizer.decode(engine.generate("0.5", ids, 6).tokens, skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == want.strip()
    assert cli.main(["generate", str(ckpt), "--think-budget", "0.5", "--answer-budget", "1.0", "--prompt", prompt,
                     "--max-think-tokens", "4", "--max-new-tokens", "5", "--think-marker", "w1", "--raw"]) == 0
    printed = capsys.readouterr()
    gen = engine.think_then_answer(ids, "0.5", "1.0", 4, 5, "w1")
    dec = lambda t: engine.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    assert printed.out.split("\n")[:2] == [dec(gen.thinking), dec(gen.tokens)]
    assert "[thinking: budget 0.5" in printed.err
    # plain generate on the same directory (a stock checkpoint of the parent) still works
    assert cli.main(["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", "4", "--raw"]) == 0
    assert capsys.readouterr().out.strip() == dec(engine.generate("1.0", ids, 4).tokens).strip()


@pytest.mark.parametrize("extra, words", [
    (["--budget", "0.3"], ["budget 0.3 is outside the trained params budgets (0.5, 0.75, 1.0)"]),
    (["--think-budget", "0.5"], ["needs both"]),
    (["--think-budget", "0.5", "--answer-budget", "2.0"], ["'2.0' is more than the whole parent"]),
    (["--budget", "0.5", "--max-new-tokens", "500"], ["context"]),
])
def test_cli_budget_errors_are_one_line(llama_ckpt, capsys, extra, words):
    assert cli.main(["generate", str(llama_ckpt), "--prompt", "w3", "--raw", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("star-elastic: error:") and "\n" not in err
    for w in words:
        assert w in err, err


def test_cli_budget_on_a_plain_checkpoint_is_one_line(tmp_path, capsys):
    from star_elastic import save_pretrained
    from elastic_ckpt import random_parent, word_tokenizer

    save_pretrained(random_parent("llama"), tmp_path / "plain", tokenizer=word_tokenizer(tmp_path))
    assert cli.main(["generate", str(tmp_path / "plain"), "--budget", "0.5", "--prompt", "w3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest" in err and "\n" not in err
