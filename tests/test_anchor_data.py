"""The full anchor on text of its own (`elastify --anchor-data`, `ElasticTrainer(anchor_rows=...)`).

On a GPU the full model held within 1% of its parent in the training domain but drifted out of it
(+0.9% to +1.4% on French Wikipedia at lr 2e-4, docs/RESULTS.md §9), and that drift caps the rate
that the smaller budgets could use: the anchor only ever saw the training text. With
`--anchor-data self` it distils on text sampled from the parent itself (generate.sample_rows)."""

import pytest
import torch

from star_elastic.elastify import parse_anchor_data
from star_elastic.errors import StarElasticError
from star_elastic.generate import generate, sample_rows
from star_elastic.model import Model
from star_elastic.train import ElasticTrainer

from test_train import CFG, make

ANCHOR_TOKEN = 7


def _trainer(tmp_path, name, anchor_rows=None, **kw):
    model, teacher, router, budgets, rows, cfg, _ = make(**{"steps": 6, "full_anchor": 1.0, **kw})
    rows = rows.masked_fill(rows == ANCHOR_TOKEN, ANCHOR_TOKEN + 1)  # the training text has no ANCHOR_TOKEN
    return ElasticTrainer(model, teacher, router, budgets, rows, cfg, tmp_path / name, anchor_rows=anchor_rows)


def _anchor_rows(n=6, length=32):
    rows = torch.full((n, length), ANCHOR_TOKEN)
    rows[:, ::3] = torch.arange(n)[:, None]  # rows that differ, so that their order shows
    return rows


def _spy(t):
    """Record, in order, the batch of every budget pass and of every anchor pass."""
    seen = []
    budget_pass, anchor_pass = t._budget_pass, t._anchor_pass

    def on_budget(b, x, teacher):
        seen.append(("budget", x.clone()))
        return budget_pass(b, x, teacher)

    def on_anchor(x, teacher, anchor):
        seen.append(("anchor", x.clone()))
        return anchor_pass(x, teacher, anchor)

    t._budget_pass, t._anchor_pass = on_budget, on_anchor
    return seen


def _of(seen, kind):
    return [x for k, x in seen if k == kind]


def test_the_anchor_distils_on_its_own_text_and_the_budgets_on_theirs(tmp_path):
    plain = _trainer(tmp_path, "plain")
    seen_plain = _spy(plain)
    plain.run(progress=False)
    own = _trainer(tmp_path, "own", anchor_rows=_anchor_rows())
    seen_own = _spy(own)
    logs = own.run(progress=False)
    anchored = [lg for lg in logs if "full_kd" in lg]
    assert anchored and len(_of(seen_own, "anchor")) == len(anchored)
    # the anchor's batches are its text's rows (cut to the step's length), never the training batch
    for x in _of(seen_own, "anchor"):
        assert (x == ANCHOR_TOKEN).float().mean() > 0.6  # two tokens in three of _anchor_rows
    for x in _of(seen_own, "budget"):
        assert not (x == ANCHOR_TOKEN).any()
    # the smaller budgets see the same batches as without it: the anchor's text is a stream of its own
    assert len(_of(seen_own, "budget")) == len(_of(seen_plain, "budget"))
    assert all(torch.equal(a, b) for a, b in zip(_of(seen_own, "budget"), _of(seen_plain, "budget")))
    # without it the anchor distils on its step's training batch, as before
    pairs = [(seen_plain[i - 1], seen_plain[i]) for i in range(1, len(seen_plain)) if seen_plain[i][0] == "anchor"]
    assert pairs and all(k == "budget" and torch.equal(a, b) for (k, a), (_, b) in pairs)
    # and it trains the model toward the teacher on that text: another gradient, other weights
    assert not all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), own.model.parameters()))


def test_the_anchor_text_resumes_where_it_stopped(tmp_path):
    straight = _trainer(tmp_path, "straight", anchor_rows=_anchor_rows())
    seen_straight = _spy(straight)
    want = straight.run(progress=False)
    first = _trainer(tmp_path, "resumed", anchor_rows=_anchor_rows())
    first.run(progress=False, stop_after=3)
    second = _trainer(tmp_path, "resumed", anchor_rows=_anchor_rows())
    assert second.load_state() and second.step == 3
    seen = _spy(second)
    rest = second.run(progress=False)
    assert [lg["total"] for lg in rest] == pytest.approx([lg["total"] for lg in want[3:]], rel=1e-6, abs=1e-7)
    mine, theirs = _of(seen, "anchor"), _of(seen_straight, "anchor")
    assert mine and len(theirs) > len(mine)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs[-len(mine):]))  # the same rows, in the same order
    # a state written with anchor text does not resume a run without, nor the other way round
    with pytest.raises(StarElasticError, match="anchor text"):
        _trainer(tmp_path, "resumed").load_state()


def test_a_resumed_run_reads_the_interrupted_runs_anchor_text_not_a_new_sample(tmp_path):
    """Text sampled from the parent on CUDA differs from process to process (a 16M-token SmolLM2 run resumed
    on a new sample, twenty-ninth session): the state keeps the rows, and a resumed trainer handed another
    sample trains on the interrupted one's, as a run that never stopped would."""
    from star_elastic.train_state import saved_anchor_rows

    straight = _trainer(tmp_path, "straight", anchor_rows=_anchor_rows())
    want = straight.run(progress=False)
    first = _trainer(tmp_path, "resumed", anchor_rows=_anchor_rows())
    first.run(progress=False, stop_after=3)
    assert torch.equal(saved_anchor_rows(tmp_path / "resumed"), _anchor_rows())
    assert saved_anchor_rows(tmp_path / "straight") is not None and saved_anchor_rows(tmp_path / "none") is None
    other = _anchor_rows().flip(0)  # a new sample: other rows of the same shape
    second = _trainer(tmp_path, "resumed", anchor_rows=other)
    assert second.load_state() and torch.equal(second.anchor_batches.rows, _anchor_rows())
    rest = second.run(progress=False)
    assert [lg["total"] for lg in rest] == pytest.approx([lg["total"] for lg in want[3:]], rel=1e-6, abs=1e-7)
    # rows of another shape (another --seq-len or --anchor-data count) are a one-line refusal
    with pytest.raises(StarElasticError, match=r"the state's anchor text is \(6, 32\) rows x tokens, this run's \(8, 32\)"):
        _trainer(tmp_path, "resumed", anchor_rows=_anchor_rows(n=8)).load_state()


def test_a_mixed_anchor_takes_its_first_rows_from_its_text_and_the_rest_from_the_training_batch(tmp_path):
    """anchor_mix 0.5: half the anchor's rows are its own text's, half its step's training batch's (the
    same rows the budget trained on), so that it holds the full model on both."""
    t = _trainer(tmp_path, "mix", anchor_rows=_anchor_rows(), anchor_mix=0.5)
    seen = _spy(t)
    t.run(progress=False)
    pairs = [(seen[i - 1], seen[i]) for i in range(1, len(seen)) if seen[i][0] == "anchor"]
    assert pairs
    for (kind, x), (_, xa) in pairs:
        half = xa.shape[0] // 2
        assert kind == "budget" and xa.shape == x.shape
        assert (xa[:half] == ANCHOR_TOKEN).float().mean() > 0.6  # the anchor's text
        assert torch.equal(xa[half:], x[half:])  # the step's own rows
    with pytest.raises(StarElasticError, match="give anchor text"):
        _trainer(tmp_path, "none", anchor_mix=0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(StarElasticError, match=r"in \(0, 1\]"):
            _trainer(tmp_path, f"bad{bad}", anchor_rows=_anchor_rows(), anchor_mix=bad)


def test_budget_mix_gives_the_smaller_budgets_rows_of_the_anchor_text_too(tmp_path):
    """budget_mix 0.5 (elastify --budget-mix): half of every smaller budget's rows are the anchor's text (the
    shared weights keep seeing the parent's own text; at 16M tokens on the training text alone the nested 0.75
    fell 3-7% behind (c) out of domain, docs/RESULTS.md §9), the other half its step's training rows as without
    it; the anchor's own batches are other rows of that text, and the training text's stream is unchanged."""
    plain = _trainer(tmp_path, "plain", anchor_rows=_anchor_rows())
    seen_plain = _spy(plain)
    plain.run(progress=False)
    mixed = _trainer(tmp_path, "mixed", anchor_rows=_anchor_rows(), budget_mix=0.5)
    seen = _spy(mixed)
    mixed.run(progress=False)
    budget, budget_plain = _of(seen, "budget"), _of(seen_plain, "budget")
    assert budget and len(budget) == len(budget_plain)
    for x, x_plain in zip(budget, budget_plain):
        half = x.shape[0] // 2
        assert x.shape == x_plain.shape
        assert (x[:half] == ANCHOR_TOKEN).float().mean() > 0.6  # the anchor's text
        assert torch.equal(x[half:], x_plain[half:])  # the step's own training rows, as without the mix
    pairs = [(seen[i - 1], seen[i]) for i in range(1, len(seen)) if seen[i][0] == "anchor"]
    assert pairs
    for (kind, x), (_, xa) in pairs:  # the anchor (mix 1) on anchor text alone
        assert kind == "budget" and (xa == ANCHOR_TOKEN).float().mean() > 0.6
    # drawn apart from the budget's rows of it (the same row only where an epoch of the text turns over)
    assert not all(torch.equal(xa[:xa.shape[0] // 2], x[:x.shape[0] // 2]) for (_, x), (_, xa) in pairs)
    # the training moved on other text: other weights than without the mix
    assert not all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), mixed.model.parameters()))
    with pytest.raises(StarElasticError, match="give anchor text"):
        _trainer(tmp_path, "none", budget_mix=0.5)
    for bad in (-0.1, 1.5):
        with pytest.raises(StarElasticError, match=r"in \[0, 1\]"):
            _trainer(tmp_path, f"bad{bad}", anchor_rows=_anchor_rows(), budget_mix=bad)


def test_budget_mix_resumes_where_it_stopped(tmp_path):
    straight = _trainer(tmp_path, "straight", anchor_rows=_anchor_rows(), budget_mix=0.5)
    want = straight.run(progress=False)
    first = _trainer(tmp_path, "resumed", anchor_rows=_anchor_rows(), budget_mix=0.5)
    first.run(progress=False, stop_after=3)
    second = _trainer(tmp_path, "resumed", anchor_rows=_anchor_rows(), budget_mix=0.5)
    assert second.load_state() and second.step == 3
    rest = second.run(progress=False)
    assert [lg["total"] for lg in rest] == pytest.approx([lg["total"] for lg in want[3:]], rel=1e-6, abs=1e-7)


def test_the_benchs_c_distils_on_the_same_mix():
    """bench_elastic.py --budget-mix: (c)'s distillation takes the same share of its rows from the anchor's
    text (the same rows as the elastic run's), so that (b) against (c) stays like for like."""
    import sys
    from argparse import Namespace
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_elastic import distil

    torch.manual_seed(0)
    teacher = Model(CFG).eval()
    rows = torch.randint(0, ANCHOR_TOKEN, (8, 16))  # the training text has no ANCHOR_TOKEN
    args = Namespace(batch_size=4, seq_len=16, seed=0, compile=False)
    seen = {}
    for name, mix in (("plain", None), ("mixed", (_anchor_rows(length=16), 0.5))):
        student = Model(CFG)
        student.load_state_dict(teacher.state_dict())
        got = seen[name] = []
        student.register_forward_pre_hook(lambda m, a, got=got: got.append(a[0].clone()))
        distil(student, teacher, rows, 3, 1e-3, args, torch.device("cpu"), name, mix=mix)
    assert len(seen["mixed"]) == len(seen["plain"]) == 3
    for x, x_plain in zip(seen["mixed"], seen["plain"]):
        assert (x[:2] == ANCHOR_TOKEN).float().mean() > 0.6 and not (x_plain == ANCHOR_TOKEN).any()
        assert torch.equal(x[2:], x_plain[2:])


def test_anchor_text_is_refused_where_it_cannot_serve(tmp_path):
    with pytest.raises(StarElasticError, match="needs full_anchor"):
        _trainer(tmp_path, "a", anchor_rows=_anchor_rows(), full_anchor=0.0)
    with pytest.raises(StarElasticError, match="a step needs"):
        _trainer(tmp_path, "b", anchor_rows=_anchor_rows(n=1))  # a step of 4 x 16 tokens takes 2 rows of 32
    with pytest.raises(StarElasticError, match="a step needs"):
        _trainer(tmp_path, "c", anchor_rows=_anchor_rows(length=16))  # stage 2's rows are 32 long
    assert parse_anchor_data(None) is None and parse_anchor_data("") is None
    assert parse_anchor_data("self") == ("self", None) and parse_anchor_data("self:4096") == ("self", 4096)
    assert parse_anchor_data("wiki,bible") == ("wiki,bible", None)
    for bad in ("self:", "self:abc", "self:-5", "self:0"):
        with pytest.raises(StarElasticError, match="TOKENS a positive integer"):
            parse_anchor_data(bad)


def test_sampled_rows_come_from_the_model_itself():
    torch.manual_seed(0)
    model = Model(CFG).eval()
    rows = sample_rows(model, 5, 12, batch_size=2, seed=3)
    assert rows.shape == (5, 12) and rows.dtype == torch.long
    assert 0 <= int(rows.min()) and int(rows.max()) < CFG.vocab_size
    assert torch.equal(rows, sample_rows(model, 5, 12, batch_size=2, seed=3))  # the seed fixes them
    assert not torch.equal(rows, sample_rows(model, 5, 12, batch_size=2, seed=4))
    assert len({int(t) for t in rows[:, 0]}) > 1  # first tokens drawn across the vocabulary
    # near zero temperature the sample is the model's own greedy continuation of each first token
    cold = sample_rows(model, 3, 10, batch_size=3, seed=5, temperature=1e-6)
    assert torch.equal(cold, generate(model, cold[:, :1], 9, temperature=0.0))


def test_the_bench_samples_the_anchors_text_and_records_it(tmp_path):
    """bench_elastic.py --anchor-data self:N (the GPU runs' lever): each anchored run distils its full model on
    text sampled from the parent, once a process whatever the number of anchored variants, recorded in
    its method with its share of the anchor's rows (--anchor-mix); text other than the parent's, or a share
    without text, is refused."""
    import json
    import subprocess

    from test_bench_resume import BENCH

    out = tmp_path / "b.json"
    argv = [a if a != "elastic" else "elastic_anchor,joint_anchor" for a in BENCH if a != "--no-minitron"]
    r = subprocess.run(argv + ["--anchor-data", "self:512", "--anchor-mix", "0.5", "--budget-mix", "0.25",
                               "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("anchor text: 512 tokens sampled from the parent") == 1  # (c) reads (b)'s rows too
    methods = json.loads(out.read_text())["B"]["methods"]
    for name in ("elastic_anchor", "joint_anchor"):
        assert methods[name]["anchor_data"] == "self:512" and methods[name]["full_anchor"] > 0
        assert methods[name]["anchor_mix"] == 0.5 and methods[name]["budget_mix"] == 0.25
    c = methods["minitron"]  # (c) distilled on the same share of the same text (--budget-mix)
    assert c["budget_mix"] == 0.25 and c["anchor_sha"] == methods["joint_anchor"]["anchor_sha"]
    argv = [a if a != "elastic" else "elastic_anchor" for a in BENCH]
    r = subprocess.run(argv + ["--anchor-data", "wiki"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "self, chat or self+chat, each with :TOKENS" in r.stderr
    argv = [a if a != "elastic" else "joint_anchor" for a in BENCH if a != "--no-minitron"]
    r = subprocess.run(argv + ["--anchor-data", "chat:512", "--json", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "each opening a conversation (24 tokens of its chat template)" in r.stdout  # SmolLM2's tokenizer's
    assert json.loads(out.read_text())["B"]["methods"]["joint_anchor"]["anchor_data"] == "chat:512"
    r = subprocess.run(argv + ["--anchor-mix", "0.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "give --anchor-data" in r.stderr
    r = subprocess.run(argv + ["--budget-mix", "0.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--budget-mix mixes the anchor's own text" in r.stderr


def test_the_drift_benchmark_reports_both_anchors(elastic_ckpt, tmp_path, capsys):
    """benchmarks/bench_anchor_data.py on a tiny hybrid parent: both arms train from the same start and
    are scored against it; the anchor on sampled text distils on other batches than the training one."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_anchor_data import main

    ckpt, text = elastic_ckpt
    out = tmp_path / "drift.json"
    main(["--model", str(ckpt), "--data", str(text), "--heldout", str(text), "--ffn", "48,32", "--steps", "3",
          "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "64", "--device", "cpu", "--json", str(out)])
    got = json.loads(out.read_text())
    assert set(got["arms"]) == {"training batch", "self"} and got["benchmark"] == "bench_anchor_data"
    for arm in got["arms"].values():
        assert set(arm["after"]) == set(got["before"]) == {"full", "0.75"}
        assert arm["after"]["full"] != got["before"]["full"]  # the full model trained
    # the smaller budgets' distillation losses: the same batches and start; the first step's, before the
    # anchors' different gradients have moved anything, equal
    kd = [arm["kd"] for arm in got["arms"].values()]
    assert kd[0][0] == pytest.approx(kd[1][0], rel=1e-6) and kd[0] != kd[1]
    assert "held-out perplexity" in capsys.readouterr().out


def _sample_on_ranks(rank, world, port, out):
    from conftest import gloo_group
    from star_elastic.elastify import anchor_text

    with gloo_group(rank, world, port):
        torch.manual_seed(rank)  # each rank its own weights: only what rank 0 samples can agree everywhere
        model = Model(CFG).eval()
        rows = anchor_text(("self", 96), model, None, 16, 2, 10 ** 6, seed=3, log=lambda *a: None)
        torch.save(rows, f"{out}.{rank}")


def test_sampled_anchor_text_is_rank_zeros_on_every_rank(tmp_path):
    """Under torchrun rank 0 samples the anchor's text and the others receive it (sampling on a GPU need
    not repeat bit for bit across ranks, and each rank's batches are slices of the same global rows)."""
    import torch.multiprocessing as mp

    from conftest import free_port

    out = tmp_path / "rows"
    mp.spawn(_sample_on_ranks, args=(2, free_port(), str(out)), nprocs=2, join=True)
    zero, one = torch.load(f"{out}.0", weights_only=True), torch.load(f"{out}.1", weights_only=True)
    assert zero.shape == (6, 16) and torch.equal(zero, one)  # 96 tokens: 6 rows of 16
    torch.manual_seed(0)
    assert torch.equal(zero, sample_rows(Model(CFG).eval(), 6, 16, seed=3))


CHAT = "{% for m in messages %}w1 w2 {{ m['content'] }} w3 {% endfor %}{% if add_generation_prompt %}w4 {% endif %}"


def test_chat_anchor_text_opens_every_row_with_the_chat_template(tmp_path):
    """--anchor-data chat: rows sampled from the parent, each opening with the chat template's tokens up to a
    user's words (so that the anchor distils the parent on conversations, where held-out prose does not look);
    parsed like 'self'; refused in one line for a tokenizer without a template."""
    from conftest import word_tokenizer
    from star_elastic.elastify import anchor_text
    from star_elastic.runtime import chat_prefix

    assert parse_anchor_data("chat") == ("chat", None) and parse_anchor_data("chat:512") == ("chat", 512)
    with pytest.raises(StarElasticError, match="'chat' or 'chat:TOKENS' with TOKENS a positive integer"):
        parse_anchor_data("chat:0")
    tokenizer = word_tokenizer(tmp_path, chat_template=CHAT)
    prefix = chat_prefix(tokenizer)
    assert prefix == tokenizer("w1 w2", add_special_tokens=False)["input_ids"] == [4, 5]
    torch.manual_seed(0)
    model = Model(CFG).eval()
    rows = anchor_text(("chat", 6 * 16), model, tokenizer, 16, 2, 0, seed=3, log=lambda *_: None)
    assert rows.shape == (6, 16) and (rows[:, :2] == torch.tensor(prefix)).all()
    assert len({tuple(r) for r in rows[:, 2:].tolist()}) > 1  # sampled after the opening, not one row repeated
    # near zero temperature a row is the parent's greedy continuation of the opening
    cold = sample_rows(model, 2, 12, seed=5, temperature=1e-6, prefix=prefix)
    assert torch.equal(cold, generate(model, torch.tensor([prefix] * 2), 10, temperature=0.0))
    # self+chat: half of each, alternating row by row, each half as its own source samples it
    assert parse_anchor_data("self+chat:96") == ("self+chat", 96)
    mixed = anchor_text(("self+chat", 7 * 16), model, tokenizer, 16, 2, 0, seed=3, log=lambda *_: None)
    assert mixed.shape == (7, 16)
    assert (mixed[1::2, :2] == torch.tensor(prefix)).all()  # the conversations
    assert torch.equal(mixed[0::2], sample_rows(model, 4, 16, seed=3))  # the plain rows, as 'self' samples them
    assert torch.equal(mixed[1::2], sample_rows(model, 3, 16, seed=4, prefix=prefix))
    plain = word_tokenizer(tmp_path)
    assert chat_prefix(plain) is None and chat_prefix(None) is None
    with pytest.raises(StarElasticError, match="self\\+chat samples conversations"):
        anchor_text(("self+chat", None), model, plain, 16, 2, 96, log=lambda *_: None)
    with pytest.raises(StarElasticError, match="has none: use 'self'"):
        anchor_text(("chat", None), model, plain, 16, 2, 96, log=lambda *_: None)
    with pytest.raises(StarElasticError, match="half a row"):
        anchor_text(("chat", None), model, tokenizer, 4, 2, 96, log=lambda *_: None)
