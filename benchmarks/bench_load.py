"""The server under load (issue 12, item 4): N concurrent clients drive the real OpenAI-compatible
server over loopback for a fixed time; throughput, p50/p99 latency and time to first token per
budget, failed requests (there must be none), and the server process's memory sampled every second
(it must stay bounded), side by side with one client for the same time (the sequential baseline).

Server: `create_app` (star_elastic/serve/app.py) over a `BatchedEngine`, what `star-elastic serve`
runs, in a child process (this script with --serve-child) on 127.0.0.1 at a free port, stopped with
SIGINT (uvicorn's graceful shutdown) at the end; its RSS is read from /proc every second. (`--in-process`
serves from a uvicorn thread of this process instead: quicker to start, for the tests, but the
clients then share the server's GIL and RSS.) Two additions, both outside the app's code: the
engine ignores EOS, so that every request writes its `max_tokens` (the API has no `ignore_eos`;
`--keep-eos` serves as `star-elastic serve` does, then requests may end early) and counts the tokens
it writes per budget; and a GET /bench/stats route reports those counts, slots in use, waiting
requests, threads and memory (for the checks below, not for speed).

Clients: asyncio + httpx, `--clients` of them, each in a loop for `--seconds`: a budget (round robin,
client c starting at budget c), a prompt of `--prompt-tokens` random token ids, `max_tokens` =
`--new-tokens`, greedy, streamed (a fraction `--non-stream-fraction` not streamed), then the next; a
request under way at the deadline runs to its end. Per request: time to first token (the first SSE
chunk carrying text; a non-streamed request: its whole latency, and it is left out of the TTFT
figures), latency (until `data: [DONE]` / the whole body), tokens (a streamed request asks for the usage
chunk, `stream_options.include_usage`: a chunk carries all the text ready when it is sent, several tokens
when the server's loop falls behind, and `tokens_per_chunk` says how often). A failure is any non-200
status, exception, error event in the stream, stream without [DONE] or its usage chunk or, with EOS
ignored, a request that ends other than at its token limit. Throughput = tokens written / seconds from the
phase's start to its last request's end (tokens as the server counted them; they must equal the
clients' count). Percentiles are nearest-rank. After each phase the server must be idle again: no
slot in use, no request waiting, every pool's caches dropped.

Order: warm-up (every budget, streamed and not, then one round of N clients), one client for
`--baseline-seconds`, N clients for `--seconds`.

    python benchmarks/bench_load.py --model tiny --clients 8 --seconds 20 --json docs/results/load_cpu_tiny.json
    python benchmarks/bench_load.py --model smollm2 --clients 4 --seconds 30 --json docs/results/load_cpu_smollm2.json
    python benchmarks/bench_load.py --model hybrid --device cuda --clients 64 --seconds 60 --json load_h200_hybrid.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from star_elastic.serve.batching import BatchedEngine  # noqa: E402


# ----------------------------------------------------------------------------- the server (child process)

class LoadEngine(BatchedEngine):
    """The server's engine, EOS ignored (`ignore_eos`) and tokens counted per budget."""

    ignore_eos = True

    def start_counting(self):
        self.count_lock, self.counts = threading.Lock(), {}

    @property
    def eos_ids(self) -> list[int]:
        return [] if self.ignore_eos else super().eos_ids

    def generate(self, budget, *args, **kwargs):
        gen = super().generate(budget, *args, **kwargs)
        with self.count_lock:
            c = self.counts.setdefault(str(budget), {"requests": 0, "tokens": 0})
            c["requests"] += 1
            c["tokens"] += len(gen.tokens)
        return gen


def rss_bytes(pid: int | str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fake_model_steps(seconds: float):
    """The batched engine's model replaced by a wait: each decode step and each prefill sleeps `seconds` (the
    GIL released, as while a GPU replays a graph) and returns logits whose argmax is token 42, so that what is
    measured is the server's own work per request and token (HTTP, scheduling, streaming)."""
    from star_elastic.serve import batching

    def logits(n: int, vocab: int) -> torch.Tensor:
        out = torch.zeros(n, vocab)
        out[:, 42] = 1.0
        return out

    def decode(pool, tokens, pos, *args, **kwargs):
        time.sleep(seconds)
        return logits(tokens.shape[0], pool.model.config.vocab_size)

    def prefill(sched, pool, reqs):
        time.sleep(seconds)
        for r in reqs:
            r.length = len(r.ids)
        sched.prefills += 1
        sched.prefilled += len(reqs)
        return logits(len(reqs), pool.model.config.vocab_size)

    batching.SlotPool.decode = decode
    batching.Scheduler._prefill = prefill


def make_app(ckpt, a):
    """(app, engine, info): `create_app` over a `LoadEngine` of `ckpt`, plus the /bench/stats route."""
    from star_elastic.serve.app import create_app
    from star_elastic.serve.engine import ElasticEngine

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype or
                                                                  ("bfloat16" if device.type == "cuda" else "float32")]
    if getattr(a, "fake_step_ms", None):
        fake_model_steps(a.fake_step_ms / 1e3)
    engine = LoadEngine.of(ElasticEngine.load(ckpt, device=device, dtype=dtype), slots=a.slots,
                           compile=getattr(a, "compile", None))
    engine.ignore_eos = not a.keep_eos
    engine.start_counting()
    app = create_app(engine)
    info = {"machine": common.machine(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "dtype": str(dtype), "threads": torch.get_num_threads(), "params": engine.parent.num_parameters(),
            "budgets": list(engine.budgets), "vocab_size": engine.parent.config.vocab_size,
            "context": engine.context_length, "slots": a.slots, "ignore_eos": engine.ignore_eos,
            "pid": os.getpid()}

    @app.get("/bench/stats")
    async def bench_stats(reset: int = 0):
        sch = engine.scheduler
        pools = list(sch.pools.values())
        with engine.count_lock:
            counts = {k: dict(v) for k, v in engine.counts.items()}
        out = {**info, "counts": counts, "active": sch.active(), "waiting": len(sch.waiting), "steps": sch.steps,
               "max_batch": sch.max_batch, "pools": len(pools), "pools_holding_cache": sum(p.cache is not None for p in pools),
               "threads_alive": threading.active_count(), "rss": rss_bytes()}
        if device.type == "cuda":
            out["cuda_allocated"] = torch.cuda.memory_allocated(device)
            out["cuda_reserved"] = torch.cuda.memory_reserved(device)
            out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        if reset:
            sch.max_batch = 0
        return out

    return app, engine, info


def uvicorn_server(app, port: int):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))


def serve_child(a):
    """Serve the checkpoint on 127.0.0.1:a.port until SIGINT / SIGTERM (graceful: requests under way end first)."""
    app, engine, info = make_app(a.serve_child, a)
    print(f"serving {a.serve_child} on http://127.0.0.1:{a.port} ({info['machine']})", flush=True)
    try:
        uvicorn_server(app, a.port).run()
    except KeyboardInterrupt:  # uvicorn shuts down, then raises the signal it caught again
        pass
    finally:
        engine.close()
    print("server stopped", flush=True)


class Server:
    """The server of `ckpt` on 127.0.0.1 at a free port: a child process (this script with --serve-child),
    or with `args.in_process` a uvicorn thread of this process. `stop()` shuts it down gracefully."""

    def __init__(self, ckpt: Path, args, log_path: Path):
        import httpx

        self.port = common.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.in_process, self.log_path, self.log, self.proc = args.in_process, log_path, None, None
        t0 = time.perf_counter()
        if self.in_process:
            app, self.engine, _ = make_app(ckpt, args)
            self.uvicorn = uvicorn_server(app, self.port)
            self.thread = threading.Thread(target=self.uvicorn.run, name="bench-load-server", daemon=True)
            self.thread.start()
            self.pid = os.getpid()
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-child", str(ckpt), "--port",
                   str(self.port), "--slots", str(args.slots), "--device", args.device]
            cmd += ["--dtype", args.dtype] if args.dtype else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--keep-eos"] if args.keep_eos else []
            cmd += ["--fake-step-ms", str(args.fake_step_ms)] if args.fake_step_ms else []
            cmd += ["--compile", args.compile] if args.compile else []
            self.log = open(log_path, "w")
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
            self.pid = self.proc.pid
        self.http = httpx.Client(base_url=self.base, timeout=10.0)
        while True:
            if not self.alive():
                raise RuntimeError(f"the server exited ({self.exit_code()}) before it answered:\n{self.log_tail()}")
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > args.start_timeout:
                self.stop()
                raise RuntimeError(f"the server did not answer within {args.start_timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.start_seconds = time.perf_counter() - t0

    def alive(self) -> bool:
        return self.thread.is_alive() if self.in_process else self.proc.poll() is None

    def exit_code(self):
        return None if self.in_process else self.proc.returncode

    def stats(self, reset: bool = False) -> dict:
        return self.http.get("/bench/stats", params={"reset": int(reset)}).json()

    def log_tail(self, n: int = 30) -> str:
        if self.in_process:
            return "(in process: its messages went to this process's output)"
        if not self.log.closed:
            self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int | None:
        """Exit code of the child (0: shut down cleanly), or 0 / None for the thread (None: it did not end)."""
        self.http.close()
        if self.in_process:
            self.uvicorn.should_exit = True
            self.thread.join(30)
            self.engine.close()
            return None if self.thread.is_alive() else 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Sampler(threading.Thread):
    """Every second: the server process's RSS (read from /proc here, the server busy or not) and its
    /bench/stats (slots in use, waiting, GPU memory). `phase` labels the samples."""

    def __init__(self, server: Server, period: float = 1.0):
        super().__init__(daemon=True, name="bench-load-sampler")
        import httpx

        self.server, self.period, self.phase = server, period, "start"
        self.http = httpx.Client(base_url=server.base, timeout=5.0)
        self.samples: list[dict] = []
        self.lock, self.halt = threading.Lock(), threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> dict:
        s = {"t": round(time.perf_counter() - self.t0, 3), "phase": self.phase, "rss": rss_bytes(self.server.pid)}
        try:
            st = self.http.get("/bench/stats").json()
            s.update({k: st.get(k) for k in ("active", "waiting", "threads_alive", "cuda_allocated", "cuda_reserved")
                      if k in st})
            if s["rss"] is None:
                s["rss"] = st.get("rss")
        except Exception as e:  # noqa: BLE001 - a late sample is not a failed request
            s["stats_error"] = f"{type(e).__name__}: {e}"
        with self.lock:
            self.samples.append(s)
        return s

    def run(self):
        while not self.halt.wait(self.period):
            self.sample()

    def stop(self):
        self.halt.set()
        self.join()
        self.http.close()


# ----------------------------------------------------------------------------- the clients

async def one_request(http, budget: str, prompt: list[int], new_tokens: int, stream: bool, ignore_eos: bool,
                      t_phase: float) -> dict:
    body = {"model": budget, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "stream": stream}
    if stream:  # a chunk may carry several tokens: the usage chunk at the end counts them
        body["stream_options"] = {"include_usage": True}
    rec = {"budget": budget, "stream": stream, "start": 0.0, "ttft": None, "latency": None, "tokens": 0,
           "finish": None, "error": None}
    t0 = time.perf_counter()
    rec["start"] = t0 - t_phase
    try:
        if stream:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    rec["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
                    return rec
                done, chunks = False, 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        rec["error"] = f"error event: {obj['error'].get('message')}"
                        return rec
                    if not obj["choices"]:  # the usage chunk
                        rec["tokens"] = obj["usage"]["completion_tokens"]
                        continue
                    choice = obj["choices"][0]
                    if choice.get("text"):
                        chunks += 1
                        if rec["ttft"] is None:
                            rec["ttft"] = time.perf_counter() - t0
                    if choice.get("finish_reason"):
                        rec["finish"] = choice["finish_reason"]
            rec["latency"] = time.perf_counter() - t0
            rec["chunks"] = chunks
            if not done:
                rec["error"] = "the stream ended without data: [DONE]"
            elif not rec["tokens"]:  # a server without the usage chunk: a text chunk a token, as it then sent
                rec["tokens"] = new_tokens if ignore_eos and rec["finish"] == "length" else chunks
        else:
            r = await http.post("/v1/completions", json=body)
            rec["latency"] = time.perf_counter() - t0
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
                return rec
            j = r.json()
            rec["finish"], rec["tokens"] = j["choices"][0]["finish_reason"], j["usage"]["completion_tokens"]
            rec["ttft"] = rec["latency"]  # the first token arrives with the last
        if rec["error"] is None and ignore_eos and (rec["finish"] != "length" or rec["tokens"] != new_tokens):
            rec["error"] = f"EOS ignored, yet finish_reason {rec['finish']!r} after {rec['tokens']} tokens"
    except Exception as e:  # noqa: BLE001 - every failure is counted and printed
        rec["latency"] = time.perf_counter() - t0
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


async def drive(base: str, clients: int, seconds: float, budgets: list[str], vocab: int, args, seed: int,
                rounds: int | None = None, alive=None) -> tuple[list[dict], float]:
    """`clients` concurrent loops for `seconds` (or `rounds` requests each): (records, wall seconds)."""
    import httpx

    lo = min(32, vocab // 2)  # clear of the special tokens at the start of most vocabularies
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    records: list[dict] = []
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(args.request_timeout), limits=limits) as http:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def client(c: int):
            rng = random.Random(seed * 100003 + c)
            i = 0
            while (i < rounds) if rounds is not None else (time.perf_counter() < deadline):
                if alive is not None and not alive():
                    records.append({"budget": None, "stream": None, "client": c, "start": time.perf_counter() - t0,
                                    "ttft": None, "latency": None, "tokens": 0, "finish": None,
                                    "error": "the server stopped"})
                    return
                budget = budgets[(c + i) % len(budgets)]
                stream = rng.random() >= args.non_stream_fraction
                prompt = [rng.randrange(lo, vocab) for _ in range(args.prompt_tokens)]
                rec = await one_request(http, budget, prompt, args.new_tokens, stream, not args.keep_eos, t0)
                rec["client"] = c
                records.append(rec)
                i += 1

        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return records, wall


# ----------------------------------------------------------------------------- figures

def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def summarize(records: list[dict], wall: float, server_tokens: dict[str, int], budgets: list[str]) -> dict:
    """Per budget and "all": requests, failed, tokens, tok/s, requests/s, latency and TTFT p50 / p99."""
    out = {}
    for b in budgets + ["all"]:
        rs = [r for r in records if b == "all" or r["budget"] == b]
        ok = [r for r in rs if r["error"] is None]
        lat = [r["latency"] for r in ok]
        ttft = [r["ttft"] for r in ok if r["stream"] and r["ttft"] is not None]
        client_tokens = sum(r["tokens"] for r in ok)
        tokens = sum(server_tokens.values()) if b == "all" else server_tokens.get(b, 0)
        out[b] = {"requests": len(rs), "ok": len(ok), "failed": len(rs) - len(ok),
                  "streamed": sum(bool(r["stream"]) for r in ok), "no_text": sum(r["stream"] and r["ttft"] is None for r in ok),
                  "tokens": tokens, "client_tokens": client_tokens, "tok_s": tokens / wall, "req_s": len(ok) / wall,
                  "latency_p50": pct(lat, 50), "latency_p99": pct(lat, 99), "latency_max": max(lat, default=None),
                  "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
                  "request_tok_s_p50": pct([r["tokens"] / r["latency"] for r in ok if r["latency"]], 50),
                  # tokens a text chunk carries: 1 while the server keeps up, more when its loop falls behind
                  "tokens_per_chunk": (sum(r["tokens"] for r in ok if r.get("chunks")) /
                                       max(1, sum(r.get("chunks", 0) for r in ok)))}
    return out


def memory_summary(samples: list[dict], phase: str) -> dict:
    s = [x for x in samples if x["phase"] == phase and x.get("rss") is not None]
    if not s:
        return {}
    rss = [x["rss"] for x in s]
    half = [x["rss"] for x in s if x["t"] >= (s[0]["t"] + s[-1]["t"]) / 2]
    out = {"samples": len(s), "rss_start": rss[0], "rss_peak": max(rss), "rss_end": rss[-1],
           "rss_growth_second_half": half[-1] - half[0] if half else 0,
           "active_peak": max((x.get("active") or 0 for x in s), default=0),
           "waiting_peak": max((x.get("waiting") or 0 for x in s), default=0)}
    cuda = [x["cuda_allocated"] for x in s if x.get("cuda_allocated") is not None]
    if cuda:
        out.update(cuda_start=cuda[0], cuda_peak=max(cuda), cuda_end=cuda[-1])
    return out


def wait_idle(server: Server, timeout: float = 10.0) -> dict:
    """The server's stats once no slot is in use and nothing waits (or after `timeout`); `leaked`
    says what is still held then."""
    t0 = time.perf_counter()
    while True:
        st = server.stats()
        idle = st["active"] == 0 and st["waiting"] == 0 and st["pools_holding_cache"] == 0
        if idle or time.perf_counter() - t0 > timeout:
            break
        time.sleep(0.1)
    st["idle_after_s"] = round(time.perf_counter() - t0, 3)
    st["leaked"] = None if idle else {k: st[k] for k in ("active", "waiting", "pools_holding_cache")}
    return st


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    seq, con = res["phases"]["sequential"], res["phases"]["concurrent"]
    n = res["clients"]
    lines = [f"{res['machine']} ({res['cpu']}), torch {res['torch']}, {res['dtype']}, {res['threads']} threads; "
             f"{res['model']} ({res['params'] / 1e6:.1f}M parameters), {res['slots']} slots per budget; prompt "
             f"{res['prompt_tokens']} tokens, {res['new_tokens']} new tokens"
             f"{' (EOS ignored)' if res['ignore_eos'] else ''}, {res['non_stream_fraction']:.0%} not streamed; "
             f"1 client for {seq['seconds']:.0f} s, then {n} clients for {con['seconds']:.0f} s; {res['date']}", "",
             f"| budget | requests (1 / {n}) | failed | tok/s, 1 client | tok/s, {n} clients | gain | "
             f"latency p50 / p99 (s), 1 / {n} | TTFT p50 / p99 (s), 1 / {n} |",
             "|---|---|---|---|---|---|---|---|"]
    for b in res["budgets"] + ["all"]:
        s, c = seq["summary"][b], con["summary"][b]
        gain = c["tok_s"] / s["tok_s"] if s["tok_s"] else None
        lines.append(f"| {b} | {s['requests']} / {c['requests']} | {s['failed'] + c['failed']} | {s['tok_s']:.1f} | "
                     f"{c['tok_s']:.1f} | {fmt(gain)}x | {fmt(s['latency_p50'])} / {fmt(s['latency_p99'])} ; "
                     f"{fmt(c['latency_p50'])} / {fmt(c['latency_p99'])} | {fmt(s['ttft_p50'], '.3f')} / "
                     f"{fmt(s['ttft_p99'], '.3f')} ; {fmt(c['ttft_p50'], '.3f')} / {fmt(c['ttft_p99'], '.3f')} |")
    lines += ["", "| phase | server RSS start / peak / end (MB) | growth, second half (MB) | largest batch | "
                  "slots in use / waiting after | server threads after | CPU cores busy: server / clients |",
              "|---|---|---|---|---|---|---|"]
    mb = lambda x: fmt(None if x is None else x / 2**20, ".0f")  # noqa: E731
    for name, p in (("1 client", seq), (f"{n} clients", con)):
        m, a = p["memory"], p["after"]
        lines.append(f"| {name} | {mb(m.get('rss_start'))} / {mb(m.get('rss_peak'))} / {mb(m.get('rss_end'))} | "
                     f"{mb(m.get('rss_growth_second_half'))} | {p['max_batch']} | {a['active']} / {a['waiting']} | "
                     f"{a['threads_alive']} | {fmt(p['cpu']['server_cores'])} / {fmt(p['cpu']['client_cores'])} |")
    if any("cuda_peak" in p["memory"] for p in (seq, con)):
        lines += ["", "| phase | GPU allocated start / peak / end (MB) |", "|---|---|"]
        for name, p in (("1 client", seq), (f"{n} clients", con)):
            m = p["memory"]
            lines.append(f"| {name} | {mb(m.get('cuda_start'))} / {mb(m.get('cuda_peak'))} / {mb(m.get('cuda_end'))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the benchmark

def word_tokenizer(directory: Path, vocab_size: int):
    """A WordLevel tokenizer of `vocab_size` ids ([UNK] <s> </s>, then w0, w1, ...) saved in `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<s>",
                                   eos_token="</s>", unk_token="[UNK]")


def build(model: str, budgets: list[str], out: Path) -> Path:
    """bench_serve's untrained elastic checkpoint; the random parents get a word tokenizer (the server needs one)."""
    from bench_serve import build_checkpoint

    from star_elastic.hf import read_config

    ckpt = build_checkpoint(model, budgets, out)
    if model != "smollm2":
        word_tokenizer(out.parent, read_config(ckpt)[1].vocab_size).save_pretrained(str(ckpt))
    return ckpt


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="an elastic checkpoint with a tokenizer (default: build one, untrained)")
    ap.add_argument("--model", choices=["tiny", "hybrid", "nano", "smollm2"], default="tiny", help="parent to build")
    ap.add_argument("--budgets", help="budgets to build (default 1.0,0.75,0.5) and to request (default: all served)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="the concurrent phase")
    ap.add_argument("--baseline-seconds", type=float, help="the one-client phase (default: --seconds)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--non-stream-fraction", type=float, default=0.25, help="requests not streamed (0..1)")
    ap.add_argument("--keep-eos", action="store_true", help="stop at EOS as `star-elastic serve` does")
    ap.add_argument("--slots", type=int, default=16, help="sequences batched per budget (star-elastic serve's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--threads", type=int, help="the server's torch CPU threads")
    ap.add_argument("--in-process", action="store_true", help="serve from a thread of this process (quicker to "
                    "start; the clients then share its GIL, and the RSS is theirs too)")
    ap.add_argument("--compile", metavar="BACKEND",
                    help="the server's batched decode step under torch.compile (e.g. inductor), as `star-elastic "
                         "serve --compile on`")
    ap.add_argument("--fake-step-ms", type=float,
                    help="the server layer alone: every decode step and prefill a sleep of this many ms (the GIL "
                         "free, as a GPU's graph replay leaves it) that writes a fixed token, the model not run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--serve-child", metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.clients < 1 or a.seconds <= 0 or not 0 <= a.non_stream_fraction <= 1:
        ap.error("--clients must be >= 1, --seconds > 0, --non-stream-fraction in 0..1")
    if a.baseline_seconds is None:
        a.baseline_seconds = a.seconds
    return a


def run_phase(server: Server, sampler: Sampler, name: str, clients: int, seconds: float, budgets, vocab, args,
              seed: int) -> dict:
    before = server.stats(reset=True)
    sampler.phase = name
    sampler.sample()
    cpu0, mine0 = cpu_seconds(server.pid), time.process_time()
    records, wall = asyncio.run(drive(server.base, clients, seconds, budgets, vocab, args, seed,
                                      alive=server.alive))
    cpu1, mine1 = cpu_seconds(server.pid), time.process_time()
    sampler.sample()
    sampler.phase = f"after {name}"
    after = wait_idle(server)
    tokens = {b: after["counts"].get(b, {}).get("tokens", 0) - before["counts"].get(b, {}).get("tokens", 0)
              for b in set(after["counts"]) | set(before["counts"])}
    summary = summarize(records, wall, tokens, budgets)
    # CPU cores kept busy: the server's process, and the clients' own (server in a child process only)
    cpu = {"server_cores": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / wall,
           "client_cores": None if server.in_process else (mine1 - mine0) / wall}
    with sampler.lock:
        memory = memory_summary(sampler.samples, name)
    print(f"  {name}: {clients} client(s), {wall:.1f} s: {summary['all']['ok']} requests, "
          f"{summary['all']['failed']} failed, {summary['all']['tok_s']:.1f} tok/s, latency p50 "
          f"{fmt(summary['all']['latency_p50'])} s, TTFT p50 {fmt(summary['all']['ttft_p50'], '.3f')} s, "
          f"{summary['all']['tokens_per_chunk']:.2f} tokens a streamed chunk, largest "
          f"batch {after['max_batch']}, RSS {fmt(memory.get('rss_peak', 0) / 2**20, '.0f')} MB peak; CPU cores busy: "
          f"server {fmt(cpu['server_cores'])}, clients {fmt(cpu['client_cores'])}", flush=True)
    for r in records:
        if r["error"] is not None:
            print(f"    FAILED ({r['budget']}, {'streamed' if r['stream'] else 'not streamed'}, client "
                  f"{r.get('client')}, at {r['start']:.2f} s): {r['error']}", flush=True)
    if after["leaked"]:
        print(f"    NOT IDLE {after['idle_after_s']} s after the phase: {after['leaked']}", flush=True)
    return {"clients": clients, "seconds": wall, "target_seconds": seconds, "summary": summary, "cpu": cpu,
            "server_tokens": tokens, "max_batch": after["max_batch"], "steps": after["steps"] - before["steps"],
            "memory": memory, "after": {k: after[k] for k in ("active", "waiting", "pools_holding_cache",
                                                               "threads_alive", "rss", "idle_after_s", "leaked")},
            "records": records}


def main(argv=None):
    args = parse_args(argv)
    if args.serve_child:
        return serve_child(args)
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise SystemExit("bench_load needs httpx: pip install httpx") from None
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
    server = sampler = None
    try:
        if args.ckpt:
            ckpt = Path(args.ckpt)
        else:
            t0 = time.perf_counter()
            ckpt = build(args.model, (args.budgets or "1.0,0.75,0.5").split(","), tmp / "ckpt")
            print(f"built an untrained {args.model} elastic checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
        server = Server(ckpt, args, tmp / "server.log")
        info = server.stats()
        budgets = args.budgets.split(",") if args.budgets else info["budgets"]
        print(f"server up in {server.start_seconds:.1f} s: {info['machine']} ({info['cpu']}), torch {info['torch']}, "
              f"{info['params'] / 1e6:.1f}M parameters, budgets {', '.join(info['budgets'])}, {info['slots']} slots, "
              f"{info['threads']} threads, EOS {'ignored' if info['ignore_eos'] else 'kept'}", flush=True)
        sampler = Sampler(server)
        sampler.phase = "warm-up"
        sampler.start()
        # warm-up: every budget's view built and run, streamed and not; then one round of every client
        warm = argparse.Namespace(**{**vars(args), "non_stream_fraction": 0.0})
        recs, _ = asyncio.run(drive(server.base, len(budgets), 0, budgets, info["vocab_size"], warm, args.seed + 7,
                                    rounds=1))
        warm.non_stream_fraction = 1.0
        recs += asyncio.run(drive(server.base, len(budgets), 0, budgets, info["vocab_size"], warm, args.seed + 8,
                                  rounds=1))[0]
        recs += asyncio.run(drive(server.base, args.clients, 0, budgets, info["vocab_size"], args, args.seed + 9,
                                  rounds=1))[0]
        bad = [r["error"] for r in recs if r["error"]]
        print(f"warm-up: {len(recs)} requests, {len(bad)} failed" + (f": {bad[0]}" if bad else ""), flush=True)
        wait_idle(server)
        phases = {"sequential": run_phase(server, sampler, "sequential", 1, args.baseline_seconds, budgets,
                                          info["vocab_size"], args, args.seed),
                  "concurrent": run_phase(server, sampler, "concurrent", args.clients, args.seconds, budgets,
                                          info["vocab_size"], args, args.seed + 1)}
        sampler.stop()
        code = server.stop()
        print(f"server stopped (exit code {code})", flush=True)
    except BaseException:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if server is not None:
            server.stop()
            print(f"server log ({server.log_path}):\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        if server is None or not server.alive():
            shutil.rmtree(tmp, ignore_errors=True)

    failures = [f"{name}: {r['budget']} {'streamed' if r['stream'] else 'not streamed'}: {r['error']}"
                for name, p in phases.items() for r in p["records"] if r["error"]]
    res = {"benchmark": "bench_load", "command": " ".join(["python"] + sys.argv if argv is None
                                                          else ["python", "benchmarks/bench_load.py"] + list(argv)),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           **{k: info[k] for k in ("machine", "cpu", "cpu_count", "torch", "python", "device", "dtype", "threads",
                                   "params", "slots", "ignore_eos", "context")},
           "model": args.ckpt or args.model, "budgets": budgets, "clients": args.clients,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "non_stream_fraction": args.non_stream_fraction, "server_start_seconds": server.start_seconds,
           "fake_step_ms": args.fake_step_ms, "compile": args.compile,  # set: the model not run, each step a wait (the server layer alone)
           "server_exit_code": code,
           "server": "in-process thread" if args.in_process else "child process", "warmup_failures": bad, "failures": failures,
           "gain": {b: (phases["concurrent"]["summary"][b]["tok_s"] / phases["sequential"]["summary"][b]["tok_s"]
                        if phases["sequential"]["summary"][b]["tok_s"] else None) for b in budgets + ["all"]},
           "tokens_match": all(p["summary"][b]["tokens"] == p["summary"][b]["client_tokens"]
                               for p in phases.values() for b in budgets),
           "phases": {name: {k: v for k, v in p.items() if k != "records"} for name, p in phases.items()},
           "memory_samples": sampler.samples,
           # one row per request: phase, client, budget, streamed, start, ttft, latency, tokens, finish, error
           "request_fields": ["phase", "client", "budget", "stream", "start", "ttft", "latency", "tokens", "finish",
                              "error"],
           "requests": [[name, r.get("client"), r["budget"], r["stream"]] +
                        [None if r[k] is None else round(r[k], 5) for k in ("start", "ttft", "latency")] +
                        [r["tokens"], r["finish"], r["error"]] for name, p in phases.items() for r in p["records"]]}
    res["markdown"] = markdown(res)
    print()
    print(res["markdown"])
    print(f"\nfailed requests: {len(failures)}; server tokens equal the clients' count: {res['tokens_match']}; "
          f"gain of {args.clients} clients over 1: {fmt(res['gain']['all'])}x")
    if args.json:
        common.write_json(args.json, res, indent=1)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
