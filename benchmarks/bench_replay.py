"""Where a batch-1 decode step's time goes on the host: generate's step against the batched engine's (issue 12).

On an H100 at Nano width (fifty-fifth session) generate's compiled decode step took 0.46 ms and the engine's
one-request step 0.77 ms, its host launching for 0.38 ms and waiting 0.36 ms a step, though both replay a CUDA graph
of the same compiled model. This times one captured step of each kind in three ways, side by side in one run:

  idle         the host's time in one call with nothing queued (the graph's launch, the inputs' copies)
  queued       the host's time in a call behind 20 queued steps (whether a launch waits for the device)
  free-running the period of steps launched back to back with no read (generate's way: the device's pace)
  read-behind  the period when each step's token is read after the next is launched (the engine's pipeline)
and then (fifty-sixth session: both captured steps came out at 0.48-0.51 ms, the launch 0.02-0.07 ms of host time,
so the engine's 0.77 ms is not its graph) the engine's whole loop and its pieces on the host's clock:
  scheduler    one greedy request through a `Scheduler` with one slot (the engine's loop, pipelined): its period
               a decode step, and of it the host's time launching (`launch_s`) and waiting for tokens (`wait_s`)
  pieces       the host's time of each thing the loop's launch does besides the graph's replay: the argmax, the
               pinned copy of it to the host (`HostCopy`), and the step's own input copies (`StaticStep.__call__`)

If `queued` is far above `idle`, launching waits for the device and the pipeline cannot hide the host's work; if
read-behind is above free-running by about the host's time, the host's launch and read are not overlapped.

    python benchmarks/bench_replay.py --device cuda --model nano --json out.json
    python benchmarks/bench_replay.py --smoke          # tiny model on the CPU, eager: a check of the wiring
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from bench_serve import parent_config  # noqa: E402
from star_elastic.generate import DecodeStep  # noqa: E402
from star_elastic.model import Model  # noqa: E402
from star_elastic.runtime import HostCopy, HostSlots  # noqa: E402
from star_elastic.serve.batching import Request, Scheduler, StaticStep  # noqa: E402
from star_elastic.serve.engine import StopWatcher  # noqa: E402


def steps(model: Model, device, compile: bool, graph: bool, length: int) -> dict:
    """generate's one-row step and the engine's one-row pool step, each with its own cache, as callables
    of (token tensor (1,), position int) that return the logits (1, vocab)."""
    gen = DecodeStep(model, model.make_cache(1, length), 1, use_graph=graph, compile=compile)
    eng = StaticStep(model, model.make_cache(1, length), 1, use_graph=graph,
                     compile="inductor" if compile else None)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    return {"generate": lambda tok, p: gen(tok, p)[:, -1],
            "engine": lambda tok, p: eng(tok, pos.fill_(p))}


def host_time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(step, device, n: int, reps: int) -> dict:
    """The four timings of the module doc for one step callable, medians over `reps`."""
    tok = torch.full((1,), 5, dtype=torch.long, device=device)
    out = {"idle": [], "queued": [], "free_running": [], "read_behind": []}
    for i in range(3):  # warm-up: first calls allocate
        step(tok, i)
    for _ in range(reps):
        common.clock(device)
        out["idle"].append(host_time(lambda: step(tok, 1)))
        for i in range(20):
            step(tok, i)
        out["queued"].append(host_time(lambda: step(tok, 21)))
        t0 = common.clock(device)
        for i in range(n):
            tok = step(tok, i % 128).argmax(-1)  # the next token on the device, no read
        out["free_running"].append((common.clock(device) - t0) / n)
        t0 = common.clock(device)
        prev = None
        for i in range(n):  # launch this step, then read the previous one's token (one step ahead)
            nxt = step(tok, i % 128).argmax(-1)
            if prev is not None:
                int(prev)
            prev, tok = nxt, nxt
        int(prev)
        out["read_behind"].append((common.clock(device) - t0) / n)
    return {k: statistics.median(v) for k, v in out.items()}


def scheduler_row(model: Model, device, compile: bool, new_tokens: int, reps: int) -> dict:
    """One greedy request of `new_tokens` through the engine's loop (a one-slot `Scheduler`, static step, pipelined
    on a GPU), medians over `reps` after a warm-up request: seconds a decode step, and of it the host's launching and
    waiting, from the scheduler's own counters."""
    import threading

    sched = Scheduler(device, slots=1, static=True, compile="inductor" if compile else None)
    ids = torch.arange(3, 35, device="cpu")

    def run(n: int) -> dict:
        cancel = threading.Event()
        sched.reset_counters()
        req = Request(model, ids, n, 0.0, 1.0, None, [], StopWatcher(None, [], None, cancel), cancel)
        sched.submit(req).wait()
        return sched.counters()

    try:
        run(8)  # warm: the pool, its compiled step and graph
        counts = [run(new_tokens) for _ in range(reps)]
    finally:
        sched.close()
    per = {k: statistics.median(c[k] / c["steps"] for c in counts) for k in ("decode_s", "launch_s", "wait_s")}
    return {"period": per["decode_s"], "launch": per["launch_s"], "wait": per["wait_s"],
            "steps": counts[0]["steps"], "chained": counts[0]["chained"]}


def pieces(step, device, n: int = 200) -> dict:
    """Median host seconds of what the engine's launch does around a step: the step call itself (input copies and
    the graph's replay), the argmax of its logits, and `HostCopy` of that argmax with a new pinned buffer and event
    (the engine's way until the fifty-sixth session) and into buffers made once (`HostSlots`, the engine's now)."""
    tok = torch.full((1,), 5, dtype=torch.long, device=device)
    logits = step(tok, 0)
    greedy = logits.argmax(-1)
    slots = HostSlots(1, greedy.dtype, device)  # the pool's buffers, made once (SlotPool.host_copy)
    out = {"step_call": [], "argmax": [], "host_copy": [], "host_copy_reused": []}
    for i in range(n):
        if i % 20 == 0:
            common.clock(device)  # never let the queue fill
        out["step_call"].append(host_time(lambda: step(tok, 1)))
        out["argmax"].append(host_time(lambda: logits.argmax(-1)))
        out["host_copy"].append(host_time(lambda: HostCopy(greedy)))
        out["host_copy_reused"].append(host_time(lambda: slots.copy(greedy)))
    common.clock(device)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["nano", "hybrid", "tiny"], default="nano")
    ap.add_argument("--compile", choices=["off", "on"], default="on",
                    help="both steps under torch.compile as they run by default (generate(compile=True), the "
                         "engine's backend inductor: at one row both with inductor's GEMVs tuned); off: eager")
    ap.add_argument("--steps", type=int, default=100, help="steps a timed run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=200, help="tokens of the request the scheduler row times")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, eager, few steps")
    ap.add_argument("--json", help="results file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.compile, args.steps, args.reps, args.new_tokens = "tiny", "off", 4, 1, 6
    device = common.setup(args.device, deterministic=False)
    if args.compile != "off" and device.type != "cuda":
        ap.error("--compile needs --device cuda (inductor on this CPU is too slow to be the point)")
    graph = device.type == "cuda"
    dtype = torch.bfloat16 if graph else torch.float32
    with torch.device(device):
        model = common.scaled_normal_(Model(parent_config(args.model))).to(dtype).eval()
    model.requires_grad_(False)
    compile = args.compile == "on"
    weight_bytes = common.step_weight_bytes(model.config, model, 1)
    hbm = common.hbm_gbs(device)
    rows = {}
    with torch.no_grad():
        made = steps(model, device, compile, graph, 256)
        # both compute the same model: the first token's logits on fresh caches agree (bf16 rounding aside)
        first = {k: f(torch.full((1,), 5, dtype=torch.long, device=device), 0).float().clone() for k, f in made.items()}
        gap = (first["generate"] - first["engine"]).abs().max().item()
        scale = first["generate"].abs().max().item()
        print(f"first logits, generate's step against the engine's: max |diff| {gap:.3g} (max |logit| {scale:.3g})")
        for name, step in made.items():
            r = measure(step, device, args.steps, args.reps)
            r["bound_share_free_running"] = common.bandwidth_share(weight_bytes, r["free_running"], hbm)
            r["bound_share_read_behind"] = common.bandwidth_share(weight_bytes, r["read_behind"], hbm)
            rows[name] = r
            print(f"{name:>9}: host idle {r['idle'] * 1e3:.3f} ms, queued {r['queued'] * 1e3:.3f} ms; period "
                  f"free-running {r['free_running'] * 1e3:.3f} ms ({100 * r['bound_share_free_running']:.1f}% of "
                  f"{hbm:,.0f} GB/s), read behind {r['read_behind'] * 1e3:.3f} ms "
                  f"({100 * r['bound_share_read_behind']:.1f}%)", flush=True)
        parts = pieces(made["engine"], device)
        print("engine's launch, host time of each piece: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in parts.items()),
              flush=True)
        loop = scheduler_row(model, device, compile, args.new_tokens, args.reps)
        loop["bound_share"] = common.bandwidth_share(weight_bytes, loop["period"], hbm)
        print(f"engine's loop (Scheduler, one slot, {loop['steps']} steps, {loop['chained']} chained): period "
              f"{loop['period'] * 1e3:.3f} ms ({100 * loop['bound_share']:.1f}%), of it launching "
              f"{loop['launch'] * 1e3:.3f} ms, waiting {loop['wait'] * 1e3:.3f} ms", flush=True)
    result = {"command": " ".join(sys.argv), "machine": common.machine(device), "torch": torch.__version__,
              "model": args.model, "compile": args.compile, "cuda_graph": graph, "steps": args.steps,
              "reps": args.reps, "step_weight_bytes": weight_bytes, "hbm_gbs": hbm, "rows": rows,
              "launch_pieces": parts, "scheduler": loop,
              "first_logits_max_diff": gap, "first_logits_max_abs": scale}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
