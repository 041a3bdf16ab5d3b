"""Continuous (iteration-level) batching: many concurrent requests, at any mix of budgets, on one
loaded copy of the weights.

Design. One scheduler thread owns every cache and runs every forward; request threads only submit
and wait (`BatchedEngine` has `ElasticEngine`'s methods, each request blocking its caller).
  - Slots: each model (a budget's view; budgets with the same view share one) has a `SlotPool`: static
    caches for `slots` sequences, a KV row per attention layer and conv + SSM state per Mamba layer.
    The active sequences fill rows 0..n-1; one that leaves (finished, cancelled, disconnected) has the
    last row copied into its place, so a step runs on the contiguous prefix [:n] of every buffer (views,
    no gather). Rows and length grow on demand (length in buckets of 256, as `generate`). An idle pool
    keeps its caches and captured step for the next burst where the step is static (a GPU: capturing it again
    cost each burst ~8 ms), else gives them back; `Scheduler.release_idle()` gives back the kept ones. Memory
    stays within slots x longest request per budget served.
  - Join: between steps, waiting requests (FIFO; one whose pool is full waits without blocking other
    budgets) are prefilled into zeroed rows. Those admitted together with the same model and the same
    prompt length form a group, prefilled in one forward over consecutive rows (they are added one
    after another, so their rows are); different lengths form different groups, so no prompt is padded
    and no Mamba state needs per-row masking: each row computes what sequential `generate` computes.
    A group whose forward fails is prefilled again one request at a time, so that only the request at
    fault fails. First tokens are then handed over in arrival order.
  - Step: one batched forward per model with active sequences (different widths cannot share one),
    each row at its own position (`Model.forward` takes pos (b, t): per-row RoPE, KV writes and
    causal masks; Mamba's one-token update is per row anyway). Then each row samples with its own
    settings and generator, and stops on EOS, stop strings, its token limit, `on_token` returning True
    or its cancel event (checked before every step: a waiting or decoding request leaves at once).
  - Static step (on a GPU; `Scheduler(static=True)` elsewhere): the step runs on every row of the pool,
    the active ones first and the free ones fed token 0 at position 0 (their rows are zeroed when a
    request joins), so its shapes change only when the pool grows, and on a GPU it is captured once
    per pool size as a CUDA graph and replayed: one launch a step instead of one per kernel, which the
    eager step paid on the host (docs/RESULTS.md, "Serving at Nano width on a GPU": 0.19x of a
    CUDA-graph `generate` at one request). The capture runs the step on the live caches, so they are
    saved before it and put back after. A capture that fails falls back to the eager static step.
  - Pipelined (`Scheduler.pipeline`, on with the static step): a step's tokens reach the host with a
    device sync, and the host then samples, checks stops and hands tokens over while the device waits
    (an H200 engine step at one request took 1.59 ms where `generate`, which never waits, took ~0.8).
    So when every active request is greedy and the rows have not changed, the next step is launched
    first, fed this step's argmax on the device one position on, and this step is read while it runs.
    A request that stops at this step has had one token computed past its end (its cache row is freed
    or overwritten; the token is dropped); rows that changed (a join, a leave) or a sampled request
    make the next step wait for the host, as without the pipeline.
Greedy outputs equal one-at-a-time ones token for token (tests/test_batching.py): the arithmetic per
row is the same, up to summation order inside batched products and over a longer masked cache. Not
yet: chunked prefill, or one forward over prompts of different lengths (a long prompt joining stalls
the running sequences for its prefill).

Counters (`Scheduler.counters()`, for tests and benchmarks): forwards and tokens of prefill and decode,
and the seconds spent in each phase on the host clock; the device is synchronised at the phase
boundaries only when `sync_timing` is set (benchmarks), never by default. A request finished during a
phase is handed back after that phase's time is counted.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque

import torch
import torch.nn as nn

from ..generate import GEMV_OPTIONS, capture_graph, sample
from ..model import Model
from ..runtime import HostSlots
from .engine import ElasticEngine, StopWatcher

DEFAULT_SLOTS = 16


class Request:
    """One submitted generation. `wait()` returns (new tokens, finish reason: "stop", "length" or
    "cancelled" when `cancel` was set before the first token), or raises what failed it."""

    def __init__(self, model: Model, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                 generator, eos: list[int], watcher: StopWatcher, cancel: threading.Event):
        self.model, self.ids = model, ids.reshape(-1).long()
        self.max_new_tokens, self.temperature, self.top_p, self.generator = max_new_tokens, temperature, top_p, generator
        self.eos, self.watcher, self.cancel = set(eos), watcher, cancel
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.row: int | None = None  # its row in the pool while it decodes
        self.length = 0  # tokens in its cache rows
        self.next_token: int | None = None  # sampled, not yet fed
        self.done = threading.Event()

    def finish(self, reason: str | None = None, error: BaseException | None = None):
        if reason is None:  # as the sequential engine decides it
            hit = self.watcher.hit is not None or (self.tokens and self.tokens[-1] in self.eos)
            reason = "stop" if hit else ("cancelled" if not self.tokens and self.cancel.is_set() else "length")
        self.reason, self.error = reason, error
        self.done.set()

    def wait(self, timeout: float | None = None) -> tuple[list[int], str]:
        if not self.done.wait(timeout):
            raise TimeoutError("the generation did not finish in time")
        if self.error is not None:
            raise self.error
        return self.tokens, self.reason


def _rows(cache: nn.ModuleList, lo: int, hi: int) -> nn.ModuleList:
    """The caches of rows lo..hi-1: the same cache modules over views of their buffers (writes land in the pool)."""
    out = []
    for c in cache:
        v = c.__class__.__new__(c.__class__)
        nn.Module.__init__(v)
        for name, buf in c.named_buffers(recurse=False):
            v.register_buffer(name, buf[lo:hi])
        out.append(v)
    return nn.ModuleList(out)


class StaticStep:
    """The decode step over every row of a pool's cache, with fixed input buffers (token and position
    per row), replayed from a CUDA graph when `use_graph`. Built for one cache: a pool that grows
    builds a new one. `compile` (a torch.compile backend, e.g. "inductor"): the step's small kernels
    fused first, so that the graph holds fewer of them; on an H200 replaying the ~200-kernel graph of a
    one-token Nano step took the host about as long as the device took to run it (docs/RESULTS.md,
    serving at Nano width). A pool of one row compiles with inductor's GEMVs tuned, as generate does."""

    def __init__(self, model: Model, cache: nn.ModuleList, rows: int, use_graph: bool, compile: str | None = None):
        self.model, self.cache, self.graph = model, cache, None
        if compile:  # one graph per view and pool size: more than the default limit of 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # a pool of one row multiplies one-row products: inductor tunes them as reductions (generate.GEMV_OPTIONS)
        options = GEMV_OPTIONS if compile == "inductor" and rows == 1 else None
        self.forward = torch.compile(model, backend=compile, dynamic=False, options=options) if compile else model
        device = model.lm_head.weight.device
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        if use_graph:
            self.rehearse(capture=True)

    def _run(self) -> torch.Tensor:
        return self.forward(self.token, self.cache, self.pos, last_only=True)[:, -1]

    def rehearse(self, capture: bool):
        """Warm-up forwards (and, with `capture`, the CUDA graph's capture) on the live caches, which
        are saved first and put back after: the rows of running sequences come out as they went in."""
        saved = [b.clone() for b in self.cache.buffers()]
        try:
            if capture:  # thread_local: request threads may touch the GPU while the scheduler thread captures
                self.graph, self.logits = capture_graph(self._run, capture_error_mode="thread_local")
            else:
                self._run()
        finally:
            for b, s in zip(self.cache.buffers(), saved):
                b.copy_(s)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) of one token per row: `tokens` and `pos` (n,) for the first n rows, the
        other rows token 0 at position 0."""
        n = tokens.shape[0]
        if n < self.token.shape[0]:  # (every kernel launched here is host time a step: none for a full pool)
            self.token[n:].zero_()
            self.pos[n:].zero_()
        self.token[:n, 0].copy_(tokens)
        self.pos[:n, 0].copy_(pos)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


class SlotPool:
    """Static caches for up to `slots` sequences of one model; active sequence i is in row i."""

    def __init__(self, model: Model, slots: int):
        self.model, self.slots = model, slots
        self.cache: nn.ModuleList | None = None
        self.rows = self.length = 0
        self.active: list[Request] = []
        self._views: dict[tuple[int, int], nn.ModuleList] = {}
        self._static: StaticStep | None = None  # for the current cache
        self.inflight = None  # the step launched and not yet read (Scheduler._step, pipelined)
        self._host: HostSlots | None = None  # pinned buffers for the steps' tokens (host_copy)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, static: bool, use_graph: bool,
               compile: str | None = None) -> torch.Tensor:
        """Logits (n, vocab) of the next token of the n active rows, fed `tokens` at positions `pos` (n,):
        on the rows [:n] alone, or (`static`) on every row of the pool, from a CUDA graph with `use_graph`,
        compiled with `compile`."""
        n = tokens.shape[0]
        if not static:
            return self.model(tokens[:, None], self.view(0, n), pos[:, None], last_only=True)[:, -1]
        if self._static is None or self._static.cache is not self.cache:
            try:
                self._static = StaticStep(self.model, self.cache, self.rows, use_graph, compile)
            except Exception as e:  # noqa: BLE001 - no graph (or no compiled step): the same step, eager
                warnings.warn(f"batched decode without a CUDA graph{' or compile' if compile else ''} "
                              f"({type(e).__name__}: {e})", stacklevel=2)
                self._static = StaticStep(self.model, self.cache, self.rows, use_graph=False)
        return self._static(tokens, pos)[:n]

    def buffers(self):
        return [] if self.cache is None else list(self.cache.buffers())

    def host_copy(self, tokens: torch.Tensor):
        """`tokens` (n,) copied to the host behind an event (`HostCopy`), into this pool's pinned buffers, made
        once: a pool has at most two launched steps unread (the one in flight and the one being read), so three
        buffers in turn are never overwritten before they are read."""
        if self._host is None:
            self._host = HostSlots(self.slots, tokens.dtype, tokens.device, depth=3)
        return self._host.copy(tokens)

    def free(self) -> int:
        return self.slots - len(self.active)

    def view(self, lo: int, hi: int) -> nn.ModuleList:
        if (lo, hi) not in self._views:
            self._views[(lo, hi)] = _rows(self.cache, lo, hi)
        return self._views[(lo, hi)]

    def reserve(self, length: int, more: int = 1):
        """Room for `more` sequences (at most `free()`) of up to `length` tokens: grow rows (powers of
        two up to `slots`) and length (buckets of 256), copying what the active rows hold."""
        # an idle pool sizes itself as a fresh one would (its kept caches and step serve a burst of that shape only:
        # a lone request after a burst of 32 must not run the 32-row step)
        busy = bool(self.active)
        rows, need = max(1, self.rows) if busy else 1, len(self.active) + more
        while rows < need and rows < self.slots:
            rows = min(self.slots, 2 * rows)
        length = max(self.length if busy else 0, -(-length // 256) * 256)
        if self.cache is not None and (rows, length) == (self.rows, self.length):
            return
        if not busy:
            self.release()  # before the new caches: never both at once
        cache, n = self.model.make_cache(rows, length), len(self.active)
        if self.cache is not None and n:
            for new, old in zip(cache.buffers(), self.cache.buffers()):
                if new.dim() == 4 and new.shape[2] != old.shape[2]:  # KV (b, heads, length, d)
                    new[:n, :, :old.shape[2]].copy_(old[:n])
                else:
                    new[:n].copy_(old[:n])
        self.cache, self.rows, self.length, self._views, self._static = cache, rows, length, {}, None

    def add(self, req: Request):
        """Give the request the next row, len(active): requests added one after another take
        consecutive rows (until one is removed)."""
        row = len(self.active)
        for buf in self.buffers():  # a fresh sequence: empty Mamba state, no stale KV
            buf[row].zero_()
        req.row = row
        self.active.append(req)

    def remove(self, req: Request):
        """Free the request's row: the last active row moves into it."""
        row, last = req.row, len(self.active) - 1
        if row != last:
            for buf in self.buffers():
                buf[row].copy_(buf[last])
            self.active[row] = self.active[last]
            self.active[row].row = row
        self.active.pop()
        req.row = None
        if not self.active:
            if self.inflight is not None:  # a step past every request's end may still run on these caches and
                try:                        # its graph's memory: wait for it (once a burst) before they go
                    self.inflight.tokens()  # or are written by the next burst
                except Exception:  # noqa: BLE001 - it failed: nothing of it is read, and the failure is reported
                    pass           # by whatever runs next on the device
            self.inflight = None
            # a static step (and its caches) is kept for the next burst: capturing it again took ~8 ms a burst on an
            # H100 at Nano width (docs/RESULTS.md); the eager step has nothing worth keeping
            if self._static is None:
                self.release()

    def release(self):
        """Give the caches and the captured step back (an idle pool)."""
        self.cache, self.rows, self.length, self._views, self._static = None, 0, 0, {}, None


class _Launched:
    """A decode step queued on the device: the requests of its rows (in row order), the positions fed,
    its logits (n, vocab; a static step's are overwritten by its next replay) and their argmax (n,),
    copied to the host as soon as the step has computed it (`HostCopy`): reading it waits for this step
    alone, not for the pipelined next one (which left the device idle while the host launched the next:
    docs/RESULTS.md, serving at Nano width)."""

    __slots__ = ("reqs", "pos", "logits", "greedy", "host")

    def __init__(self, reqs, pos, logits, greedy, host):
        self.reqs, self.pos, self.logits, self.greedy, self.host = reqs, pos, logits, greedy, host

    def tokens(self) -> list[int]:
        """The argmax tokens on the host: waits for this step (and what was queued before it) only."""
        return self.host.tolist()


class Scheduler:
    """The batching loop (see the module doc). `submit` from any thread; one daemon thread runs it."""

    def __init__(self, device, slots: int = DEFAULT_SLOTS, static: bool | None = None, compile: str | None = None):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.device, self.slots = device, slots
        self.compile = compile  # the static step's torch.compile backend (StaticStep), None: eager
        # the static step pays for the free rows: worth it where a CUDA graph removes the launches
        self.use_graph = torch.device(device).type == "cuda"
        self.static = self.use_graph if static is None else static
        self.pipeline = self.static  # launch the next step before reading this one (module doc)
        self.pools: dict[int, SlotPool] = {}
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False
        self.max_batch = 0  # the largest batch a decode step ran
        self.sync_timing = False  # synchronise the device at phase boundaries (benchmarks: exact phase times)
        self._finished: list[tuple[Request, str | None, BaseException | None]] = []  # handed back after a phase
        self._release: list[threading.Event] = []  # release_idle's calls, for the scheduler's thread to answer
        self.reset_counters()

    # -------------------------------------------------------------------------- from request threads

    def submit(self, req: Request) -> Request:
        with self.cond:
            if self.closed:
                raise RuntimeError("the scheduler is closed")
            self.waiting.append(req)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="star-elastic-batching", daemon=True)
                self.thread.start()
            self.cond.notify()
        return req

    def wake(self):
        """Look again now (a cancel event was set): a request leaves without waiting for a step."""
        with self.cond:
            self.cond.notify()

    def active(self) -> int:
        """Sequences holding a slot now."""
        return sum(len(p.active) for p in list(self.pools.values()))

    def release_idle(self, timeout: float | None = 60.0):
        """Give back the caches and captured steps that idle pools keep for their next burst (static steps keep
        them: `SlotPool.remove`), e.g. before loading something else on the device. The scheduler's thread does
        it between steps (it alone touches the pools); this waits for that."""
        done = threading.Event()
        with self.cond:
            if self.thread is None or self.closed:  # nothing has run, or close() gives everything back
                return
            self._release.append(done)
            self.cond.notify()
        if not done.wait(timeout):
            raise TimeoutError("the scheduler did not release its idle pools in time")

    def _release_idle(self):
        with self.cond:
            waiting, self._release = self._release, []
        for pool in self.pools.values():
            if not pool.active:
                pool.release()
        for done in waiting:
            done.set()

    def reset_counters(self):
        """Zero the counters (between benchmark runs, while nothing runs)."""
        self.steps = 0  # batched decode forwards run
        self.chained = 0  # of them, launched from the previous step's tokens on the device (pipelined)
        self.decode_tokens = 0  # tokens those steps wrote (active rows, not the static step's free ones)
        self.decode_s = 0.0  # seconds in decode steps (forward, sampling, bookkeeping)
        self.launch_s = 0.0  # of them, on the host queuing a step's work (inputs, the graph's replay, argmax)
        self.wait_s = 0.0  # of them, waiting for a step's tokens (the device's work not yet hidden)
        self.prefills = 0  # prefill forwards run (a group of equal-length prompts is one)
        self.prefilled = 0  # requests prefilled (each writes its first token there)
        self.prefill_tokens = 0  # prompt tokens prefilled
        self.prefill_s = 0.0  # seconds in admission (reserve, prefill forwards, first tokens)

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in ("steps", "chained", "decode_tokens", "decode_s", "launch_s", "wait_s",
                                               "prefills", "prefilled", "prefill_tokens", "prefill_s", "max_batch")}

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
        for req in list(self.waiting) + [r for p in self.pools.values() for r in p.active]:
            req.finish("cancelled")
        self._release_idle()  # the thread has stopped: every pool, and any release_idle still waiting

    # -------------------------------------------------------------------------- the scheduler thread

    def _loop(self):
        while True:
            with self.cond:
                while (not self.closed and not self.waiting and not self._release
                       and not any(p.active for p in self.pools.values())):
                    self.cond.wait()
                if self.closed:
                    return
                waiting, self.waiting = list(self.waiting), deque()
            if self._release:
                self._release_idle()
            try:
                with torch.no_grad():
                    left = self._admit(waiting)
                    with self.cond:
                        self.waiting.extendleft(reversed(left))  # first come, first served
                    for pool in list(self.pools.values()):
                        self._drop_cancelled(pool)
                        if pool.active:
                            try:
                                self._step(pool)
                            except Exception as e:  # noqa: BLE001 - this model's requests fail, the others go on
                                self._fail(pool, e)
            except BaseException as e:  # noqa: BLE001 - never let the loop die silently
                for pool in self.pools.values():
                    self._fail(pool, e)

    def _fail(self, pool: SlotPool, error: BaseException):
        for req in list(pool.active):
            pool.remove(req)
            req.finish(error=error)

    def _pool(self, model: Model) -> SlotPool:
        key = id(model)
        if key not in self.pools or self.pools[key].model is not model:
            self.pools[key] = SlotPool(model, self.slots)
        return self.pools[key]

    def _clock(self) -> float:
        if self.sync_timing and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _finish(self, req: Request, reason: str | None = None, error: BaseException | None = None):
        """Finish `req` at the end of the current phase (after its time is counted)."""
        self._finished.append((req, reason, error))

    def _flush(self):
        done, self._finished = self._finished, []
        for req, reason, error in done:
            req.finish(reason, error)

    def _admit(self, waiting: list[Request]) -> list[Request]:
        """Prefill the waiting requests that have a free slot, first come first served; the others are
        returned, in order. Those of one model with prompts of one length go in one forward (module
        doc); then each gets its first token, in arrival order."""
        if not waiting:  # nothing to time: a synchronised clock would wait for the step in flight
            return []
        t0 = self._clock()
        try:
            left, groups, taken = [], {}, {}
            for req in waiting:
                if req.cancel.is_set() or req.max_new_tokens <= 0:
                    req.finish()
                    continue
                pool = self._pool(req.model)
                if taken.get(id(pool), 0) >= pool.free():
                    left.append(req)
                    continue
                taken[id(pool)] = taken.get(id(pool), 0) + 1
                groups.setdefault((id(pool), len(req.ids)), (pool, []))[1].append(req)
            first = {}  # id(request) -> logits (vocab,) of its first token
            for pool, reqs in groups.values():
                done = self._prefill_group(pool, reqs) if len(reqs) > 1 else self._prefill_one(pool, reqs[0])
                for req, logits in done:
                    first[id(req)] = (pool, req, logits)
            for req in waiting:
                if id(req) in first:
                    self._emit(*first[id(req)])
            return left
        finally:
            self.prefill_s += self._clock() - t0
            self._flush()

    def _prefill(self, pool: SlotPool, reqs: list[Request]) -> torch.Tensor:
        """One forward over the prompts (all of one length) of requests just added to `pool`, on their
        rows, which must be consecutive: the logits (n, vocab) of their first tokens."""
        lo = reqs[0].row
        if [r.row for r in reqs] != list(range(lo, lo + len(reqs))):
            raise RuntimeError(f"a prefill group's rows are not consecutive: {[r.row for r in reqs]}")
        ids = torch.stack([r.ids for r in reqs]).to(self.device)
        t = ids.shape[1]
        logits = pool.model(ids, pool.view(lo, lo + len(reqs)), torch.arange(t, device=self.device), last_only=True)
        for r in reqs:
            r.length = t
        self.prefills += 1
        self.prefilled += len(reqs)
        self.prefill_tokens += ids.numel()
        return logits[:, -1]

    def _prefill_one(self, pool: SlotPool, req: Request) -> list[tuple[Request, torch.Tensor]]:
        try:
            pool.reserve(len(req.ids) + req.max_new_tokens)
            pool.add(req)
            logits = self._prefill(pool, [req])
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            if req.row is not None:
                pool.remove(req)
            self._finish(req, error=e)
            return []
        return [(req, logits[0])]

    def _prefill_group(self, pool: SlotPool, reqs: list[Request]) -> list[tuple[Request, torch.Tensor]]:
        try:
            pool.reserve(max(len(r.ids) + r.max_new_tokens for r in reqs), more=len(reqs))
            for r in reqs:
                pool.add(r)
            logits = self._prefill(pool, reqs)
        except Exception:  # noqa: BLE001 - maybe one request's fault: again one at a time, so only it fails
            for r in sorted((r for r in reqs if r.row is not None), key=lambda r: -r.row):
                pool.remove(r)  # the last rows first: nothing moves
            return [x for r in reqs for x in self._prefill_one(pool, r)]
        return list(zip(reqs, logits))

    def _drop_cancelled(self, pool: SlotPool):
        for req in [r for r in pool.active if r.cancel.is_set()]:
            pool.remove(req)
            req.finish()

    def _step(self, pool: SlotPool):
        """One token for every active sequence of the pool: one batched forward. Pipelined (module doc):
        the step launched last time, if any, is read now, after the next one is launched from its tokens
        on the device when that is the step that would run anyway."""
        # a device sync would wait for the step in flight, which is what the pipeline hides
        clock = time.perf_counter if self.pipeline else self._clock
        t0 = clock()
        try:
            step, pool.inflight = pool.inflight, None
            if step is not None and (step.reqs != pool.active or not self._chainable(pool)):
                self._read(pool, step)  # rows changed since it was launched: its tokens first, then the host's
                step = None
                if not pool.active:
                    return
            if step is None:
                step = self._launch(pool, None)
            if self.pipeline and self._chainable(pool):
                pool.inflight = self._launch(pool, step)
            self._read(pool, step)
        finally:
            self.decode_s += clock() - t0
            self._flush()

    def _chainable(self, pool: SlotPool) -> bool:
        """Whether the next step can be launched before this one is read: every request greedy (its token
        is the argmax, on the device) and one more position in the cache for each."""
        return all(r.temperature <= 0 and r.length + 2 <= pool.length for r in pool.active)

    def _launch(self, pool: SlotPool, prev: "_Launched | None") -> "_Launched":
        """Queue one decode forward over the pool's active rows: fed the requests' next tokens from the
        host, or (`prev`, launched on the same rows) its argmax tokens one position on, on the device."""
        t0 = time.perf_counter()
        reqs = list(pool.active)
        if prev is None:
            tokens = torch.tensor([r.next_token for r in reqs], dtype=torch.long, device=self.device)
            pos = torch.tensor([r.length for r in reqs], dtype=torch.long, device=self.device)
        else:
            tokens, pos = prev.greedy, prev.pos + 1
            self.chained += 1
        logits = pool.decode(tokens, pos, self.static, self.use_graph and self.static, self.compile)
        self.steps += 1
        self.max_batch = max(self.max_batch, len(reqs))
        greedy = logits.argmax(-1)
        launched = _Launched(reqs, pos, logits, greedy, pool.host_copy(greedy))
        self.launch_s += time.perf_counter() - t0
        return launched

    def _read(self, pool: SlotPool, step: "_Launched"):
        """Hand over a launched step's tokens (one device sync), to the requests still in the pool; one
        that has left since (finished, cancelled, failed) had a token computed past its end, dropped."""
        t0 = time.perf_counter()
        greedy = step.tokens()
        self.wait_s += time.perf_counter() - t0
        for i, req in enumerate(step.reqs):
            if req.row is None:
                continue
            req.length += 1
            self.decode_tokens += 1
            self._emit(pool, req, step.logits[i], greedy[i])

    def _emit(self, pool: SlotPool, req: Request, logits: torch.Tensor, greedy: int | None = None):
        """Sample the request's next token from its logits (vocab,), hand it over, and free the slot
        when the request is done."""
        try:
            if req.temperature > 0:
                tok = int(sample(logits[None], req.temperature, req.top_p, req.generator)[0])
            else:
                tok = int(logits.argmax(-1)) if greedy is None else greedy
            req.tokens.append(tok)
            stop = req.watcher([tok])  # stop strings, on_token (may return True), the cancel event
        except Exception as e:  # noqa: BLE001 - a failing callback ends its own request only
            pool.remove(req)
            self._finish(req, error=e)
            return
        if stop or len(req.tokens) >= req.max_new_tokens or tok in req.eos:
            pool.remove(req)
            self._finish(req)
        else:
            req.next_token = tok


class BatchedEngine(ElasticEngine):
    """`ElasticEngine` whose generations run batched with whatever else is running (module doc):
    the same methods and outputs, any number of concurrent callers, `slots` sequences per budget."""

    def __init__(self, ckpt, serving_order: bool = False, slots: int = DEFAULT_SLOTS, static: bool | None = None,
                 compile: str | None = None):
        super().__init__(ckpt, serving_order)
        self.scheduler = Scheduler(self.device, slots, static, compile)

    @classmethod
    def of(cls, engine: ElasticEngine, slots: int = DEFAULT_SLOTS, static: bool | None = None,
           compile: str | None = None) -> "BatchedEngine":
        """A batching engine over an already loaded engine's parent and views (nothing copied).
        `static`: the static step (every row, CUDA graph on a GPU); None: on a GPU only. `compile`: its
        torch.compile backend (StaticStep; None: eager)."""
        new = cls.__new__(cls)
        new.__dict__.update(engine.__dict__)  # the same checkpoint, parent and views dict
        new.scheduler = Scheduler(new.device, slots, static, compile)
        return new

    def _exclusive(self):
        return _NoLock()  # the scheduler owns the caches: callers need not take turns

    def submit(self, budget: str, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None, on_token=None,
               cancel: threading.Event | None = None, ignore_eos: bool = False) -> Request:
        """Queue one generation and return at once; `Request.wait()` gives (tokens, reason).
        `ignore_eos`: write all `max_new_tokens` (benchmarks)."""
        return self._submit(self.view(budget), ids, max_new_tokens, temperature, top_p, seed, stop or [], on_token,
                            [] if ignore_eos else self.eos_ids, cancel)

    def _submit(self, model, ids, max_new_tokens, temperature, top_p, seed, stops, on_token, eos, cancel) -> Request:
        cancel = threading.Event() if cancel is None else cancel
        gen = None
        if temperature > 0:  # as the sequential engine seeds it: the same draws for the same logits
            gen = torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)
        watcher = StopWatcher(self.tokenizer, stops, on_token, cancel)
        req = Request(model, ids, max_new_tokens, temperature, top_p, gen, eos, watcher, cancel)
        return self.scheduler.submit(req)

    def _generate(self, model, ids, max_new_tokens, temperature, top_p, seed, stops, on_token, eos,
                  cancel=None) -> tuple[list[int], str]:
        req = self._submit(model, ids, max_new_tokens, temperature, top_p, seed, stops, on_token, eos, cancel)
        try:
            while not req.done.wait(0.5):
                pass
        finally:  # the caller went away (KeyboardInterrupt in a CLI, say): free the slot
            if not req.done.is_set():
                req.cancel.set()
                self.scheduler.wake()
        tokens, reason = req.wait()
        return tokens, "length" if reason == "cancelled" else reason

    def close(self):
        """Stop the scheduler: waiting and running requests end as "cancelled"."""
        self.scheduler.close()


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["BatchedEngine", "Request", "Scheduler", "SlotPool", "StaticStep", "DEFAULT_SLOTS"]
