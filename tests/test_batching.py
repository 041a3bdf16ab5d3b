"""Continuous batching (serve/batching.py): batched generations equal one-at-a-time ones for mixed
budgets and prompt lengths (hybrid Mamba / attention / MoE, and Llama), equal-length prompts admitted
together share one prefill forward (a failing one fails alone), cancelled or disconnected requests
free their slots while the others go on unchanged, and more requests than slots all finish."""

import json
import socket
import threading
import time

import pytest
import torch

from elastic_ckpt import make_checkpoint
from star_elastic.serve.app import create_app
from star_elastic.serve.batching import BatchedEngine
from star_elastic.serve.engine import ElasticEngine

BUDGETS = ["1.0", "0.75", "0.5"]


@pytest.fixture(scope="module", params=["nemotron_h", "llama"])
def engine(request, tmp_path_factory):
    """The sequential engine: the reference, and the weights a BatchedEngine shares."""
    return ElasticEngine.load(make_checkpoint(tmp_path_factory.mktemp("ck") / "ckpt", request.param))


@pytest.fixture(params=[None, True], ids=["cpu-default", "static-pipelined"])
def batched(engine, request):
    """BatchedEngines over `engine`'s weights: the CPU's default step (eager, on the active rows, read at
    once), or the GPU's (the static step, pipelined: the next step launched from the device's tokens
    before this one is read), run eagerly; a test's own `static` wins."""
    made = []

    def make(slots, static=None):
        made.append(BatchedEngine.of(engine, slots=slots, static=request.param if static is None else static))
        return made[-1]

    yield make
    for b in made:
        b.close()


def jobs(n, seed=0):
    """n (budget, prompt (1, t), max new tokens, sampling) with prompts of 1 to 19 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(1, 20, (1,), generator=g))
        sampling = dict(temperature=0.9, top_p=0.8, seed=i) if i % 5 == 4 else {}
        out.append((BUDGETS[i % 3], torch.randint(3, 63, (1, t), generator=g),
                    int(torch.randint(2, 25, (1,), generator=g)), sampling))
    return out


def sequential(engine, work):
    return [(g.tokens, g.finish_reason) for g in (engine.generate(b, ids, n, **kw) for b, ids, n, kw in work)]


@pytest.mark.parametrize("static", [False, True])
def test_batched_equals_sequential_for_mixed_budgets_and_lengths(engine, batched, static):
    """Submitted at once: rows join (prefilled alone, each at its length) and leave (the last row moves
    into a finished one) between steps; greedy and seeded sampled rows give what they give alone.
    `static`: the GPU's step (every row of the pool, free rows fed token 0 at position 0, the shape a
    CUDA graph replays), run eagerly: the free rows change nothing for the active ones."""
    work = jobs(12)
    want = sequential(engine, work)
    eng = batched(slots=4, static=static)
    reqs = [eng.submit(b, ids, n, **kw) for b, ids, n, kw in work]
    assert [r.wait(120) for r in reqs] == want
    assert eng.scheduler.max_batch > 1  # decoded together, not one at a time
    # idle: a static step's pool keeps its caches for the next burst until released, an eager one gives them back
    pools = eng.scheduler.pools.values()
    assert eng.scheduler.active() == 0 and all((p.cache is not None) == static for p in pools)
    eng.scheduler.release_idle()
    assert all(p.cache is None for p in pools)


def test_the_static_steps_rehearsal_leaves_the_running_rows_as_they_were(engine):
    """A CUDA graph is captured on the live caches (its warm-up and capture run the step on them):
    the rows of running sequences are saved before and put back after."""
    from star_elastic.serve.batching import StaticStep, _rows

    model = engine.view("0.75")
    cache = model.make_cache(4, 256)
    with torch.no_grad():
        model(torch.tensor([[5, 7, 9]]), _rows(cache, 0, 1), torch.arange(3))  # row 0: a running sequence...
        for b in cache.buffers():
            b[1:].copy_(b[:1])  # ...and so do the others
        before = [b.clone() for b in cache.buffers()]
        step = StaticStep(model, cache, 4, use_graph=False)
        step.rehearse(capture=False)
        assert all(torch.equal(a, b) for a, b in zip(before, cache.buffers()))
        step._run()  # what the rehearsal ran: it writes into the caches, so the restore is what kept them
        assert not all(torch.equal(a, b) for a, b in zip(before, cache.buffers()))


def test_more_requests_than_slots_from_many_threads(engine, batched):
    """The blocking API from 10 threads with 2 slots per budget (think-then-answer among them): every
    request finishes, and each gets what it gets alone."""
    work = jobs(16, seed=1)
    want = sequential(engine, work)
    prompt = torch.tensor([[5, 9, 14]])
    want_think = engine.think_then_answer(prompt, "0.5", "1.0", 5, 6, "w59 w58")
    eng = batched(slots=2)
    got, lock = {}, threading.Lock()

    def worker(k):
        for i in range(k, len(work), 10):
            b, ids, n, kw = work[i]
            g = eng.generate(b, ids, n, **kw)
            with lock:
                got[i] = (g.tokens, g.finish_reason)
        if k == 0:
            got["think"] = eng.think_then_answer(prompt, "0.5", "1.0", 5, 6, "w59 w58")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(work))] == want
    think = got["think"]
    assert (think.thinking, think.tokens) == (want_think.thinking, want_think.tokens)
    assert max(len(p.active) for p in eng.scheduler.pools.values()) == 0
    assert all(p.rows <= 2 for p in eng.scheduler.pools.values())


def test_a_longer_request_joining_grows_the_caches(engine, batched):
    """A request whose prompt + tokens need more than the pool's length joins running ones: the caches
    grow (the running rows copied) and every output stays the sequential one."""
    work = [("0.5", torch.tensor([[4, 8, 15, 16]]), 20, {}), ("0.5", torch.tensor([[23, 42]]), 12, {}),
            ("0.5", torch.tensor([[7] * 9]), 270, {})]
    want = sequential(engine, work)
    eng = batched(slots=4)
    gate = threading.Event()
    first = eng.submit(*work[0][:3], on_token=lambda tok: gate.wait(30) and False)  # held until all are queued
    rest = [eng.submit(b, ids, n) for b, ids, n, _ in work[1:]]
    gate.set()
    assert [r.wait(120) for r in [first] + rest] == want


def test_cancel_frees_the_slot_and_the_others_go_on(engine, batched):
    """One slot per budget. A cancels itself (event set by its 3rd token): its slot goes to B, queued
    behind it at the same budget; C at another budget is unaffected; D, cancelled while waiting,
    never runs. B and C equal their sequential outputs."""
    a_ids, b_ids, c_ids = torch.tensor([[3, 4, 5]]), torch.tensor([[10, 20, 30, 40]]), torch.tensor([[6]])
    want_a = engine.generate("0.5", a_ids, 40).tokens
    want_b = engine.generate("0.5", b_ids, 10)
    want_c = engine.generate("1.0", c_ids, 15)
    eng = batched(slots=1)
    cancel_a, cancel_d = threading.Event(), threading.Event()
    seen_a = []

    def on_a(tok):
        seen_a.append(tok)
        if len(seen_a) == 3:
            cancel_a.set()
        return False

    cancel_d.set()
    a = eng.submit("0.5", a_ids, 40, on_token=on_a, cancel=cancel_a)
    b = eng.submit("0.5", b_ids, 10)
    c = eng.submit("1.0", c_ids, 15)
    d = eng.submit("0.75", c_ids, 15, cancel=cancel_d)
    tokens_a, reason_a = a.wait(60)
    if len(want_a) > 3:  # (the model did not end by itself before)
        assert tokens_a == want_a[:3] and reason_a == "length"
    assert b.wait(60) == (want_b.tokens, want_b.finish_reason)
    assert c.wait(60) == (want_c.tokens, want_c.finish_reason)
    assert d.wait(60) == ([], "cancelled")
    assert eng.scheduler.active() == 0


def test_cancel_from_another_thread_leaves_at_once(engine, batched):
    """A request cancelled from outside (not at one of its tokens) leaves the batch before the next step,
    with a prefix of its sequential output; the request decoding beside it is unchanged."""
    long_ids, other_ids = torch.tensor([[11, 12, 13]]), torch.tensor([[30, 31]])
    want_long, want_other = engine.generate("1.0", long_ids, 40).tokens, engine.generate("1.0", other_ids, 20)
    eng = batched(slots=4)
    cancel, seen = threading.Event(), []

    def on_other(tok):
        seen.append(tok)
        if len(seen) == 4:
            cancel.set()
            eng.scheduler.wake()
        return False

    long = eng.submit("1.0", long_ids, 40, cancel=cancel)
    other = eng.submit("1.0", other_ids, 20, on_token=on_other)
    tokens, _ = long.wait(60)
    assert tokens == want_long[:len(tokens)]
    if len(want_long) == 40:
        assert len(tokens) < 40
    assert other.wait(60) == (want_other.tokens, want_other.finish_reason)
    assert eng.scheduler.active() == 0


def test_a_failing_callback_fails_its_own_request_only(engine, batched):
    want = engine.generate("0.75", torch.tensor([[9, 8, 7]]), 12)
    eng = batched(slots=4)

    def boom(tok):
        raise ValueError("client callback failed")

    bad = eng.submit("0.75", torch.tensor([[3, 4]]), 12, on_token=boom)
    good = eng.submit("0.75", torch.tensor([[9, 8, 7]]), 12)
    with pytest.raises(ValueError, match="client callback failed"):
        bad.wait(60)
    assert good.wait(60) == (want.tokens, want.finish_reason)
    assert eng.scheduler.active() == 0


# ----------------------------------------------------------------------------- batched prefill


def held(eng, budget, ids, n):
    """Submit a request that holds the scheduler thread inside its first token's callback (so every
    request submitted meanwhile waits for the same admission), and the event that lets it go."""
    entered, gate = threading.Event(), threading.Event()

    def on_token(tok):
        entered.set()
        gate.wait(30)
        return False

    req = eng.submit(budget, ids, n, on_token=on_token)
    assert entered.wait(30)
    return req, gate


def shapes_of_calls(model, into):
    """Record the (batch, tokens) shape of every forward of `model`; the hook's handle."""
    return model.register_forward_pre_hook(lambda m, args: into.append(tuple(args[0].shape)))


@pytest.mark.parametrize("static", [False, True])
def test_requests_admitted_together_are_prefilled_in_groups(engine, batched, static):
    """Mixed budgets, prompts of three lengths (several of each per budget), some sampled, one
    finishing at its first token, more than the slots at one budget: admitted in one go, the
    equal-length prompts of a budget share a forward, and every output is the one-at-a-time one."""
    g = torch.Generator().manual_seed(3)
    work = []
    for i in range(14):
        t = (3, 6, 6, 9)[i % 4]
        sampling = {"temperature": 0.9, "top_p": 0.8, "seed": i} if i % 5 == 2 else {}
        n = 1 if i == 7 else 3 + i % 6
        work.append((BUDGETS[i % 3], torch.randint(3, 62, (1, t), generator=g), n, sampling))
    want = sequential(engine, work)
    gate_work = ("0.75", torch.tensor([[5, 6]]), 3)
    want_gate = engine.generate(*gate_work).tokens
    eng = batched(slots=4, static=static)
    gate_req, gate = held(eng, *gate_work)
    reqs = [eng.submit(b, ids, n, **kw) for b, ids, n, kw in work]
    gate.set()
    assert gate_req.wait(60) == (want_gate, "length")
    assert [r.wait(60) for r in reqs] == want
    c = eng.scheduler.counters()
    assert c["prefilled"] == len(work) + 1 and c["prefills"] < c["prefilled"]  # some shared a forward
    assert c["prefill_tokens"] == sum(ids.shape[1] for _, ids, _, _ in work) + 2
    # every token came from a prefill (the first) or a decode step
    assert c["prefilled"] + c["decode_tokens"] == sum(len(t) for t, _ in want) + len(want_gate)
    assert eng.scheduler.active() == 0


def test_equal_length_prompts_admitted_together_take_one_prefill_forward(engine, batched):
    """Five prompts of 4 tokens to one budget, queued while a request of that budget runs: one
    prefill forward of batch 5 (one at a time, it was five of batch 1), on the rows after the
    running one, which goes on unchanged; every output is the sequential one."""
    prompts = [torch.tensor([[3 + i, 10 + i, 20 + 2 * i, 40 - i]]) for i in range(5)]
    want = [engine.generate("0.5", p, 6 + i) for i, p in enumerate(prompts)]
    want_gate = engine.generate("0.5", torch.tensor([[7, 8]]), 12).tokens
    model, calls = engine.view("0.5"), []
    eng = batched(slots=8)
    hook = shapes_of_calls(model, calls)
    try:
        gate_req, gate = held(eng, "0.5", torch.tensor([[7, 8]]), 12)
        reqs = [eng.submit("0.5", p, 6 + i) for i, p in enumerate(prompts)]
        gate.set()
        assert [r.wait(60) for r in reqs] == [(w.tokens, w.finish_reason) for w in want]
        assert gate_req.wait(60)[0] == want_gate
    finally:
        hook.remove()
    assert [s for s in calls if s[1] > 1] == [(1, 2), (5, 4)]  # the running request's prefill, then the group's
    assert eng.scheduler.prefills == 2 and eng.scheduler.prefilled == 6


def test_a_failing_request_in_a_prefill_group_fails_alone(engine, batched):
    """Three equal-length prompts join a running request; the middle one makes the forward fail in
    the last layer (after the earlier layers wrote the group's cache rows). The group is prefilled
    again one request at a time: only that request fails, the others and the running one give their
    sequential outputs (their rows zeroed again before the retry)."""
    good = [torch.tensor([[4, 9, 16, 25]]), torch.tensor([[36, 49, 30, 11]])]
    bad = torch.tensor([[5, 61, 62, 7]])
    want = [engine.generate("0.5", p, 8) for p in good]
    want_gate = engine.generate("0.5", torch.tensor([[7, 8]]), 14).tokens
    model, calls, seen = engine.view("0.5"), [], {}

    def fail_on_62(m, args):
        if seen["ids"].shape[1] > 1 and bool((seen["ids"] == 62).any()):
            raise RuntimeError("this prompt breaks the model")

    eng = batched(slots=4)
    hooks = [shapes_of_calls(model, calls),
             model.register_forward_pre_hook(lambda m, args: seen.__setitem__("ids", args[0])),
             model.model.layers[-1].register_forward_pre_hook(fail_on_62)]
    try:
        gate_req, gate = held(eng, "0.5", torch.tensor([[7, 8]]), 14)
        reqs = [eng.submit("0.5", p, 8) for p in (good[0], bad, good[1])]
        gate.set()
        assert reqs[0].wait(60) == (want[0].tokens, want[0].finish_reason)
        with pytest.raises(RuntimeError, match="this prompt breaks the model"):
            reqs[1].wait(60)
        assert reqs[2].wait(60) == (want[1].tokens, want[1].finish_reason)
        assert gate_req.wait(60)[0] == want_gate
    finally:
        for h in hooks:
            h.remove()
    assert [s for s in calls if s[1] > 1] == [(1, 2), (3, 4), (1, 4), (1, 4), (1, 4)]  # the group, then each alone
    assert eng.scheduler.active() == 0


# ----------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_client_that_disconnects_frees_its_slot(engine, stream):
    """Over a real socket: the scheduler holds a request after its 2nd token until the request is
    cancelled, the client hangs up, and the server cancels it (its slot freed, fewer tokens than asked);
    the server then answers the next request as the sequential engine does."""
    import httpx
    import uvicorn

    eng = BatchedEngine.of(engine, slots=2)
    sched, step, held = eng.scheduler, eng.scheduler._step, []
    blocked = threading.Event()

    def gated(pool):  # no timing: the request cannot finish before the server has seen the disconnect
        for r in pool.active:
            if len(r.tokens) >= 2 and not r.cancel.is_set():
                held.append(r)
                blocked.set()
                r.cancel.wait(30)
        step(pool)

    sched._step = gated
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(eng), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    try:
        body = json.dumps({"model": "0.5", "prompt": [5, 6, 7], "max_tokens": 60, "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert blocked.wait(30)
        req = held[0]
        assert req.done.wait(30) and req.cancel.is_set()
        assert len(req.tokens) < 60 and sched.active() == 0
        sched._step = step
        want = engine.generate("0.75", torch.tensor([[8, 9]]), 6)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "0.75", "prompt": [8, 9], "max_tokens": 6}, timeout=60)
        assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(want.tokens, skip_special_tokens=True)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        eng.close()


def test_the_pipelined_step_chains_and_drops_the_tokens_past_an_end(engine, batched):
    """The static step pipelined: greedy requests of different lengths at one budget, their steps
    launched from the previous step's tokens on the device (counted), a request ending while the next
    step is in flight: every output equals the one-at-a-time one, nothing past its end handed over,
    and decode_tokens counts only what was handed over, its time split into launching and waiting. Off
    (`pipeline = False`): no step chained."""
    work = [("1.0", torch.tensor([[3, 4, 5]]), 6, {}), ("1.0", torch.tensor([[9, 10, 11]]), 14, {}),
            ("1.0", torch.tensor([[20, 21, 22]]), 3, {})]
    want = sequential(engine, work)
    for pipeline in (True, False):
        eng = batched(slots=4, static=True)
        eng.scheduler.pipeline = pipeline
        gate = threading.Event()
        first = eng.submit(*work[0][:3], on_token=lambda tok: gate.wait(30) and False)  # all admitted together
        rest = [eng.submit(b, ids, n) for b, ids, n, _ in work[1:]]
        gate.set()
        assert [r.wait(120) for r in [first] + rest] == want
        c = eng.scheduler.counters()
        assert c["prefilled"] + c["decode_tokens"] == sum(len(t) for t, _ in want)
        assert (c["chained"] > 0) == pipeline
        # the host's share of the decode time: queuing the steps and waiting for their tokens, inside it
        assert 0 < c["launch_s"] and 0 < c["wait_s"] and c["launch_s"] + c["wait_s"] <= c["decode_s"]
        assert eng.scheduler.active() == 0 and all(p.inflight is None for p in eng.scheduler.pools.values())


def test_a_compiled_static_step_decodes_what_the_eager_one_does(engine):
    """Scheduler(compile=...): the static step under torch.compile (dynamo's aot_eager on the CPU, inductor
    on a GPU, then captured as a CUDA graph) writes the same tokens as one at a time, mixed budgets and
    lengths, and was compiled (not the eager fallback, which warns)."""
    import warnings

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    work = jobs(6, seed=3)
    want = sequential(engine, work)
    eng = BatchedEngine.of(engine, slots=4, static=True, compile="aot_eager")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed compile falls back with a warning: fail here instead
            reqs = [eng.submit(b, ids, n, **kw) for b, ids, n, kw in work]
            got = [r.wait(300) for r in reqs]
        assert got == want
        assert counters["stats"]["unique_graphs"] > 0 and eng.scheduler.max_batch > 1
    finally:
        eng.close()
        torch._dynamo.reset()


def test_a_pool_of_one_row_compiles_its_step_with_inductors_gemvs_tuned(engine, monkeypatch):
    """StaticStep under inductor: a pool of one row (one request decoding) compiles with coordinate descent
    tuning (generate.GEMV_OPTIONS: its products have one row, tuned as reductions; generate's batch-1 step does
    the same), a pool of several with inductor's defaults, and another backend with no options (aot_eager takes
    none). The compiled model here is the eager one, recorded: the steps decode what the eager step does."""
    from star_elastic.generate import GEMV_OPTIONS
    from star_elastic.serve.batching import StaticStep

    calls = []

    def recording_compile(model, **kwargs):
        calls.append(kwargs)
        return model
    monkeypatch.setattr(torch, "compile", recording_compile)
    model = engine.parent
    for rows, backend, options in ((1, "inductor", GEMV_OPTIONS), (2, "inductor", None), (1, "aot_eager", None)):
        step = StaticStep(model, model.make_cache(rows, 16), rows, use_graph=False, compile=backend)
        assert calls[-1] == {"backend": backend, "dynamic": False, "options": options}, (rows, backend)
        tokens, pos = torch.tensor([5] * rows), torch.zeros(rows, dtype=torch.long)
        want = model(tokens[:, None], model.make_cache(rows, 16), pos[:, None], last_only=True)[:, -1]
        assert torch.allclose(step(tokens, pos), want)
    assert len(calls) == 3 and GEMV_OPTIONS == {"coordinate_descent_tuning": True}


def test_host_slots_hand_out_their_buffers_in_turn_and_each_copy_reads_its_own_values():
    """The engine's token copies reuse `depth` buffers in turn (SlotPool.host_copy): a copy reads what was copied
    into it while fewer than `depth` copies came after it, a shorter tensor uses the front of a buffer, and a tensor
    larger than the buffers is refused. On the CPU the copies read the tensor itself, as HostCopy does there."""
    from star_elastic.runtime import HostSlots

    slots = HostSlots(4, torch.long, "cpu", depth=3)
    copies = [slots.copy(torch.tensor([i, i + 1])) for i in range(3)]
    assert [c.tolist() for c in copies] == [[0, 1], [1, 2], [2, 3]]
    assert slots.copy(torch.tensor([7])).tolist() == [7]
    if torch.cuda.is_available():  # the pinned buffers themselves: the fourth copy reuses the first one's
        slots = HostSlots(4, torch.long, "cuda", depth=3)
        made = [slots.copy(torch.tensor([i, i], device="cuda")) for i in range(4)]
        assert made[3].host.data_ptr() == made[0].host.data_ptr() and made[3].tolist() == [3, 3]
        assert made[2].tolist() == [2, 2]
        with pytest.raises(ValueError, match="5 elements into slots of 4"):
            slots.copy(torch.zeros(5, dtype=torch.long, device="cuda"))


def test_a_pool_makes_its_host_buffers_once_for_all_its_steps(engine, monkeypatch):
    """The static step's tokens reach the host through the pool's HostSlots, made once for the pool, not a pinned
    buffer and an event a step; the tokens are those of the engine without the pipeline."""
    from star_elastic.runtime import HostSlots

    made = []
    real = HostSlots.__init__

    def counted(self, *a, **k):
        made.append(a)
        real(self, *a, **k)

    monkeypatch.setattr(HostSlots, "__init__", counted)
    ids = torch.randint(3, engine.parent.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    batched = BatchedEngine.of(engine, slots=2, static=True)
    try:
        piped = [batched.submit(b, ids, 12, ignore_eos=True).wait()[0] for b in engine.budgets]
        batched.scheduler.pipeline = False
        plain = [batched.submit(b, ids, 12, ignore_eos=True).wait()[0] for b in engine.budgets]
        pools = len(batched.scheduler.pools)
    finally:
        batched.close()
    assert piped == plain and all(len(t) == 12 for t in piped)
    assert pools >= 1 and len(made) == pools


def test_a_static_pool_keeps_its_captured_step_between_bursts_until_released(engine, monkeypatch):
    """The static step (a CUDA graph on a GPU) is built once for a pool's size and kept while the pool is idle, so a
    request arriving after the last one ended does not capture it again (~8 ms a burst on an H100 at Nano width);
    `release_idle` gives the caches and the step back, and the next burst builds them anew. The eager step of the
    CPU's default keeps nothing. The tokens are the same either way."""
    from star_elastic.serve import batching

    built = []
    real = batching.StaticStep.__init__

    def counted(self, *a, **k):
        built.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(batching.StaticStep, "__init__", counted)
    ids = torch.randint(3, engine.parent.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    budget = engine.budgets[-1]
    batched = BatchedEngine.of(engine, slots=2, static=True)
    try:
        first = batched.submit(budget, ids, 6, ignore_eos=True).wait()[0]
        second = batched.submit(budget, ids, 6, ignore_eos=True).wait()[0]
        assert len(built) == 1 and first == second
        pool = next(iter(batched.scheduler.pools.values()))
        assert pool.cache is not None and not pool.active  # idle, kept
        batched.scheduler.release_idle()
        assert pool.cache is None and pool._static is None
        assert batched.submit(budget, ids, 6, ignore_eos=True).wait()[0] == first and len(built) == 2
        # a burst of two grows the pool to two rows; a lone request after it runs on one row again, not on the kept
        # two-row step (built anew once, then kept)
        with batched.scheduler.cond:  # both queued before the scheduler looks: admitted together
            pair = [batched.submit(budget, ids, 6, ignore_eos=True) for _ in range(2)]
        assert [r.wait()[0] for r in pair] == [first, first] and pool.rows == 2 and len(built) == 3
        assert batched.submit(budget, ids, 6, ignore_eos=True).wait()[0] == first and pool.rows == 1
        assert batched.submit(budget, ids, 6, ignore_eos=True).wait()[0] == first and len(built) == 4
    finally:
        batched.close()
    assert pool.cache is None  # closing gives the kept caches back
    plain = BatchedEngine.of(engine, slots=2)  # the CPU's default: the eager step, nothing kept when idle
    try:
        assert plain.submit(budget, ids, 6, ignore_eos=True).wait()[0] == first
        assert all(p.cache is None for p in plain.scheduler.pools.values())
    finally:
        plain.close()
