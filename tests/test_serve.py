"""The OpenAI-compatible server: models, completions, chat, streaming, bad requests, and concurrent
requests at mixed budgets over a real socket (greedy outputs equal to sequential ones)."""

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from elastic_ckpt import make_checkpoint
from star_elastic.serve.app import create_app
from star_elastic.serve.engine import ElasticEngine

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}w1"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ElasticEngine.load(make_checkpoint(tmp_path_factory.mktemp("ck") / "ckpt", "nemotron_h", TEMPLATE))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as c:
        yield c


def expected(engine, budget, prompt_ids, n):
    gen = engine.generate(budget, torch.tensor([prompt_ids]), n)
    return engine.tokenizer.decode(gen.tokens, skip_special_tokens=True), gen


def ids(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_lists_every_budget(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["1.0", "0.75", "0.5"]
    assert data[0]["params"] > data[1]["params"] > data[2]["params"]


@pytest.mark.parametrize("budget", ["1.0", "0.5"])
def test_completion_equals_the_engine(client, engine, budget):
    r = client.post("/v1/completions", json={"model": budget, "prompt": "w5 w6 w7", "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    text, gen = expected(engine, budget, ids(engine, "w5 w6 w7"), 8)
    assert body["object"] == "text_completion" and body["model"] == budget
    assert body["choices"][0]["text"] == text and body["choices"][0]["finish_reason"] == gen.finish_reason
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": len(gen.tokens), "total_tokens": 3 + len(gen.tokens)}


def test_chat_uses_the_template_and_streams_the_same_text(client, engine):
    req = {"model": "0.75", "messages": [{"role": "user", "content": "w9 w10"}], "max_tokens": 7}
    body = client.post("/v1/chat/completions", json=req).json()
    text, _ = expected(engine, "0.75", ids(engine, "w9 w10 w1"), 7)  # the template appends w1
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completion_stream_and_stop_string(client, engine):
    text, _ = expected(engine, "0.5", ids(engine, "w10 w11"), 10)
    with client.stream("POST", "/v1/completions", json={"model": "0.5", "prompt": "w10 w11", "max_tokens": 10,
                                                        "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]) == text
    with client.stream("POST", "/v1/completions", json={"model": "0.5", "prompt": "w10 w11", "max_tokens": 10,
                                                        "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln and ln != "data: [DONE]"]
    assert chunks[-1]["choices"] == [] and "usage" not in chunks[-2]  # OpenAI's usage chunk, last
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == text
    plain = client.post("/v1/completions", json={"model": "0.5", "prompt": "w10 w11", "max_tokens": 10}).json()
    assert chunks[-1]["usage"] == plain["usage"]
    stop = text.split()[2]  # a word the model writes: the text ends before it
    body = client.post("/v1/completions", json={"model": "0.5", "prompt": "w10 w11", "max_tokens": 10,
                                                "stop": stop}).json()
    assert body["choices"][0]["text"] == text[:text.index(stop)] and body["choices"][0]["finish_reason"] == "stop"


def test_think_budget_through_the_api(client, engine):
    body = client.post("/v1/chat/completions", json={
        "model": "1.0", "think_budget": "0.5", "max_think_tokens": 4, "think_marker": "w59 w58",
        "messages": [{"role": "user", "content": "w4"}], "max_tokens": 5}).json()
    gen = engine.think_then_answer(torch.tensor([ids(engine, "w4 w1")]), "0.5", "1.0", 4, 5, "w59 w58")
    dec = lambda t: engine.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    assert body["choices"][0]["message"] == {"role": "assistant", "content": dec(gen.tokens),
                                             "reasoning_content": dec(gen.thinking)}


BAD = [
    ({"model": "0.3", "prompt": "w1"}, 404, "does not exist"),
    ({"prompt": "w1"}, 400, "'model' is required"),
    ({"model": "0.5", "prompt": "w1", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "0.5", "prompt": "w1", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "0.5", "prompt": " ".join(["w1"] * 10), "max_tokens": 90}, 400, "plus max_tokens (90)"),
    ({"model": "0.5", "prompt": " ".join(["w1"] * 200)}, 400, "over the model's context of 96"),
    ({"model": "0.5", "prompt": 12}, 400, "'prompt' must be a string"),
    ({"model": "0.5", "prompt": "w1", "temperature": "hot"}, 400, "temperature"),
    ({"model": "0.5", "prompt": "w1", "n": 2}, 400, "'n' must be 1"),
    ({"model": "0.5", "prompt": "w1", "think_budget": "9"}, 404, "'9' does not exist"),
    ({"model": "0.5", "prompt": "w1", "stream": True, "stream_options": {"usage": 1}}, 400, "'stream_options' must"),
    ({"model": "0.5", "prompt": "w1", "stream_options": {"include_usage": True}}, 400, "only allowed with 'stream'"),
    ([1, 2], 400, "JSON object"),
]


@pytest.mark.parametrize("body, status, words", BAD, ids=[w for _, _, w in BAD])
def test_bad_requests_are_clear_4xx_errors(client, body, status, words):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error"
    assert client.post("/v1/completions", json={"model": "0.5", "prompt": "w1", "max_tokens": 2}).status_code == 200


def test_malformed_json_and_bad_messages(client):
    r = client.post("/v1/chat/completions", content=b'{"model": "0.5", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "0.5", "messages": [{"role": "user"}]})
    assert r.status_code == 400 and "messages[0]" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/v1/models").status_code == 200  # still serving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_mixed_budget_requests_over_a_socket(engine):
    """Threads hit a real uvicorn server at different budgets (some streaming) at once: each gets
    exactly what it gets alone."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        jobs = [("0.5", "w3 w4", False), ("1.0", "w3 w4", True), ("0.75", "w10", False), ("0.5", "w20 w21", True),
                ("1.0", "w30", False), ("0.75", "w3 w4", True), ("0.5", "w3 w4", False), ("1.0", "w7 w8", False)]
        want = [expected(engine, b, ids(engine, p), 12)[0] for b, p, _ in jobs]
        got = [None] * len(jobs)

        def call(i):
            b, p, stream = jobs[i]
            req = {"model": b, "prompt": p, "max_tokens": 12, "stream": stream}
            with httpx.Client(base_url=url, timeout=60) as c:
                if not stream:
                    got[i] = c.post("/v1/completions", json=req).json()["choices"][0]["text"]
                    return
                with c.stream("POST", "/v1/completions", json=req) as r:
                    lines = [ln for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
                got[i] = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == want
        bad = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "w1"})
        assert bad.status_code == 404 and "does not exist" in bad.json()["error"]["message"]
        assert httpx.get(url + "/v1/models").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def byte_level_tokenizer():
    """A small byte-level BPE tokenizer (SmolLM2's kind): characters outside its merges take one token per
    byte, so a character can end inside a later token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


UNICODE_TEXT = "Crème brûlée, 東京 🦊 and the quick fox.\n  Ünïcödé — the lazy dog " * 3


def test_streamed_text_is_the_whole_decode_read_a_few_tokens_at_a_time():
    """The streaming detokenizer's pieces join to exactly what decoding the whole answer gives (multi-byte
    characters split over tokens included), and each step decodes a few tokens, not the answer so far
    (which made streaming quadratic in the answer's length)."""
    from star_elastic.serve.app import Detokenizer

    tok = byte_level_tokenizer()
    ids = tok(UNICODE_TEXT, add_special_tokens=False)["input_ids"]
    lengths = []

    class Counting:
        def decode(self, tokens, **kw):
            lengths.append(len(tokens))
            return tok.decode(tokens, **kw)

    detok = Detokenizer(Counting())
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == detok.sent == tok.decode(ids) == UNICODE_TEXT
    assert "" in pieces  # a character not yet whole was held back, not sent broken
    assert len(ids) > 100 and max(lengths) <= 8


def test_a_stream_sends_what_is_queued_as_one_piece_and_cuts_at_a_stop_string():
    """Tokens that queue up while the event loop is busy go out as one chunk, not a chunk each; text that may be
    the start of a stop string is held back until the next tokens say, so a stop string that spans two reads
    still cuts the text where it begins, and nothing of it is sent."""
    import asyncio

    from star_elastic.serve.app import Detokenizer, StreamEnd, text_deltas

    tok = byte_level_tokenizer()
    ids = tok(UNICODE_TEXT, add_special_tokens=False)["input_ids"]

    async def run(batches, stops):
        """What the stream yields when each batch of items is queued whole before it reads again: one piece
        for each batch but the last, then everything to the end."""
        queue, out = asyncio.Queue(), []
        gen = text_deltas(queue, Detokenizer(tok), stops)
        for batch in batches:
            for item in batch:
                queue.put_nowait(item)
            out.append(await gen.__anext__())
        out += [piece async for piece in gen]
        return out

    done = ("done", "generation")
    whole = asyncio.run(run([[("token", t) for t in ids] + [done]], []))
    assert whole == [UNICODE_TEXT, StreamEnd("done", "generation", False)]

    stop_at = UNICODE_TEXT.index("quick")
    split = next(i for i in range(len(ids)) if len(tok.decode(ids[:i])) > stop_at + 2)  # inside "quick"
    first, rest = [("token", t) for t in ids[:split]], [("token", t) for t in ids[split:]]
    parts = asyncio.run(run([first, rest + [done]], ["quick"]))
    texts = [p for p in parts if isinstance(p, str)]
    assert "".join(texts) == UNICODE_TEXT[:stop_at] and parts[-1] == StreamEnd("done", "generation", True)


@pytest.mark.parametrize("flag, backend", [([], None), (["--compile", "on"], "inductor"), (["--compile", "auto"], None)])
def test_serve_command_compiles_the_decode_step_when_asked(tmp_path, monkeypatch, capsys, flag, backend):
    """`star-elastic serve --compile on` hands the batched engine the inductor backend for its decode step; off by
    default, and auto leaves it off on a CPU. The server itself is not started here."""
    from star_elastic import cli
    from star_elastic.serve import app

    served = []
    monkeypatch.setattr(app, "serve", lambda engine, host, port: served.append(engine))
    ckpt = make_checkpoint(tmp_path / "ckpt", "nemotron_h", TEMPLATE)
    assert cli.main(["serve", str(ckpt), "--device", "cpu", "--port", "0", *flag]) == 0
    assert len(served) == 1 and served[0].scheduler.compile == backend
    assert ("decode step compiled" in capsys.readouterr().out) == (backend is not None)
    served[0].close()
