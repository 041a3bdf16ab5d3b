"""Continuous batching (issue 12): generated tokens/s of the batching engine at batch sizes 1, 4, 8,
16 for each budget, side by side with the same requests run one at a time.

For each budget and batch size B, B requests (random prompts of --prompt-len tokens, --new-tokens
each, EOS ignored so every request writes all of them) are submitted at once to a `BatchedEngine`
with B slots, queued together so that they are admitted together (equal prompt lengths: one prefill
forward per budget); tokens/s = B x new tokens / seconds until the last one ends (prefills included).
The sequential baseline runs the same kind of request through `generate` (what `ElasticEngine`
does), one after another. "mixed" submits B requests to every budget at once: one server, all
budgets. Each figure is the median of --reps runs; `greedy_equal` checks the batched tokens against
the sequential ones.

The scheduler's counters split each batched run into admission (prefill forwards and each request's
first token) and decode steps, the device synchronised at each phase's end (for these runs only):
decode tok/s = tokens the decode steps wrote (B x (new tokens - 1)) / seconds in decode steps, what
the batched step itself achieves, also given relative to the full budget's at the same B. At B = 1,
the decode step against the memory-bandwidth bound, at every batch size B: bytes of the weights a step
reads (common.step_weight_bytes: all but the embedding table, and of the routed experts the share that B
tokens reach, k / E at B = 1) / seconds per step, as a share of --hbm-gbs (default on a GPU the card's
HBM bandwidth, common.hbm_gbs: an H100's 3,350 GB/s, an H200's 4,800; on a CPU only when given). The ratio of a budget's bytes to the full budget's at the same B
is the most a bandwidth-bound step could gain from the budget (printed beside the measured ratio).

    python benchmarks/bench_batching.py --smoke
    python benchmarks/bench_batching.py --model tiny --out docs/results/batching_cpu_tiny.json
    python benchmarks/bench_batching.py --model smollm2 --batch-sizes 1,4,8,16 --out batching_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_serve import budget_specs, build_checkpoint, parent_config  # noqa: E402
from star_elastic.elastic.checkpoint import load_elastic  # noqa: E402
from star_elastic.generate import generate  # noqa: E402
from star_elastic.model import Model  # noqa: E402
from star_elastic.serve.batching import BatchedEngine  # noqa: E402


def batched_run(engine: BatchedEngine, budget_prompts: list[tuple[str, torch.Tensor]], new_tokens: int):
    """Seconds until every request ends, the tokens of each, and the scheduler's counters of the run
    (seconds and tokens in admission and in decode steps)."""
    sched = engine.scheduler
    sched.sync_timing = True  # exact phase times: the device synchronised at each phase's end
    sched.reset_counters()  # idle here: every earlier request has been handed back after its phase
    t0 = common.clock(engine.device)
    with sched.cond:  # (reentrant) the scheduler takes none of them before all are queued: one admission
        reqs = [engine.submit(b, p, new_tokens, ignore_eos=True) for b, p in budget_prompts]
    out = [r.wait()[0] for r in reqs]
    return common.clock(engine.device) - t0, out, sched.counters()


def phases(runs) -> dict:
    """Median admission and decode seconds over runs, and the median decode-only tokens/s."""
    counts = [c for _, _, c in runs]
    rates = [c["decode_tokens"] / c["decode_s"] for c in counts if c["decode_s"] > 0]

    def per_step(key):  # median over runs of a counter's seconds per decode step
        values = [c[key] / c["steps"] for c in counts if c["steps"]]
        return statistics.median(values) if values else None

    return {"prefill_s": statistics.median(c["prefill_s"] for c in counts),
            "decode_s": statistics.median(c["decode_s"] for c in counts),
            "decode_tok_s": statistics.median(rates) if rates else None,
            "prefill_forwards": counts[0]["prefills"], "decode_steps": counts[0]["steps"],
            "decode_tokens": counts[0]["decode_tokens"],
            "step_s": per_step("decode_s"),
            # where a step's time goes on the host: queuing its work, waiting for its tokens, the rest (Python)
            "launch_s_per_step": per_step("launch_s"), "wait_s_per_step": per_step("wait_s")}


def fmt(x, spec) -> str:
    return "n/a" if x is None else format(x, spec)


def sequential_run(engine: BatchedEngine, budget_prompts: list[tuple[str, torch.Tensor]], new_tokens: int):
    t0 = common.clock(engine.device)
    out = []
    for b, p in budget_prompts:
        ids = p.to(engine.device)
        out.append(generate(engine.view(b), ids, new_tokens)[0, ids.shape[1]:].tolist())
    return common.clock(engine.device) - t0, out


def profile_paths(engine: BatchedEngine, budget: str, prompt: torch.Tensor, new_tokens: int, device) -> dict:
    """One request of `budget`, batch 1, through the engine's batched step and through `generate`, each
    under torch.profiler: per generated token, the kernels launched, the device's busy time (kernel
    self time; CPU operator time on a CPU) against the wall time, and the kernels that take it. Busy
    well below wall: the device waits on the host; as much kernel time as wall: the kernels themselves."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    out = {}
    for name, run in (("engine", lambda: batched_run(engine, [(budget, prompt)], new_tokens)),
                      ("generate", lambda: sequential_run(engine, [(budget, prompt)], new_tokens))):
        run()  # warm: views, caches, graphs
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = common.clock(device)
            run()
            wall = common.clock(device) - t0
        rows = [(e.key, e.count, e.self_device_time_total if cuda else e.self_cpu_time_total)
                for e in prof.key_averages()
                if (cuda and "CUDA" in str(getattr(e, "device_type", ""))) or (not cuda and e.self_cpu_time_total > 0)]
        rows = [r for r in rows if r[2] > 0]
        if not cuda and name == "engine":  # its step runs on the scheduler's thread, which the CPU profiler misses
            out[name] = {"wall_ms_per_token": 1e3 * wall / new_tokens, "busy_ms_per_token": None}
            print(f"  profile, {name:8s} budget {budget} batch 1: {out[name]['wall_ms_per_token']:.3f} ms a token "
                  "(its operators run on the scheduler's thread, which the CPU profiler does not record; the GPU's "
                  "kernels are recorded)", flush=True)
            continue
        busy = sum(t for _, _, t in rows) / 1e6
        out[name] = {"wall_ms_per_token": 1e3 * wall / new_tokens, "busy_ms_per_token": 1e3 * busy / new_tokens,
                     "busy_share": busy / wall, "launches_per_token": sum(c for _, c, _ in rows) / new_tokens,
                     "top": [{"name": k[:100], "calls_per_token": c / new_tokens, "ms_per_token": t / 1e3 / new_tokens}
                             for k, c, t in sorted(rows, key=lambda r: -r[2])[:8]]}
        p = out[name]
        print(f"  profile, {name:8s} budget {budget} batch 1: {p['wall_ms_per_token']:.3f} ms a token, "
              f"{'kernels' if cuda else 'CPU operators'} {p['busy_ms_per_token']:.3f} ms ({p['busy_share']:.0%} busy), "
              f"{p['launches_per_token']:.0f} {'launches' if cuda else 'calls'} a token", flush=True)
        for r in p["top"]:
            print(f"      {r['ms_per_token']:8.4f} ms {r['calls_per_token']:6.1f}x  {r['name'][:90]}")
    return out


def bytes_table(kind: str, budgets: list[str], sizes: list[int], layers: str | None = None) -> dict:
    """The weights a decode step of each budget reads at each batch size, in bf16 (common.step_weight_bytes), on
    the meta device, and their ratio to the full budget's: no model built."""
    cfg = parent_config(kind, layers)
    parsed, specs = budget_specs(cfg, budgets)
    out = {}
    print(f"weights a decode step reads ({kind}, bf16), x the full budget's at the same B:")
    print(f"{'budget':>7} " + " ".join(f"{f'B = {n}':>18}" for n in sizes))
    for b, spec in zip(parsed, specs):
        with torch.device("meta"):
            model = Model(spec.config(cfg)).to(torch.bfloat16)
        out[b.name] = {n: common.step_weight_bytes(model.config, model, n) for n in sizes}
    full = next(iter(out.values()))  # budgets come largest first: the full budget's row
    for name, row in out.items():
        print(f"{name:>7} " + " ".join(f"{row[n] / 1e9:9.3f} GB {full[n] / row[n]:5.2f}x" for n in sizes))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="an elastic checkpoint (default: build one, untrained)")
    ap.add_argument("--model", choices=["smollm2", "hybrid", "nano", "tiny"], default="tiny", help="parent to build")
    ap.add_argument("--layers", help="nano's widths with these layers (default M*EM; Nano's own 52 are "
                    "common.NANO_LAYERS), drawn on the GPU on one")
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens each request writes (EOS ignored)")
    ap.add_argument("--sequential-requests", type=int, default=4, help="requests timed one at a time per budget")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--no-mixed", action="store_true", help="skip the all-budgets-at-once runs")
    ap.add_argument("--compile", metavar="BACKEND",
                    help="the static step under torch.compile with this backend (e.g. inductor) before its CUDA "
                         "graph: fewer kernels for the host to launch a step (StaticStep)")
    ap.add_argument("--static", choices=["auto", "on", "off"], default="auto",
                    help="the engine's static step (every row of the pool; a CUDA graph on a GPU): auto = on a GPU")
    ap.add_argument("--hbm-gbs", type=float,
                    help="peak memory bandwidth, GB/s, for the B = 1 decode's share of it (default on a GPU: the card's, "
                         "common.hbm_gbs: an H100 3,350, an H200 4,800; not reported on a CPU unless given)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens: a quick check")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="read every decode step before launching the next (Scheduler.pipeline off), for the side by side")
    ap.add_argument("--fp8-matmul", action="store_true",
                    help="every budget multiplies in FP8 (ElasticEngine.use_fp8_matmuls), batched and sequential alike")
    ap.add_argument("--profile", action="store_true",
                    help="also profile batch 1 of the first budget, the engine's step against generate's: kernels, "
                         "launches and the device's busy share a token")
    ap.add_argument("--bytes-only", action="store_true",
                    help="only the weights a decode step reads per budget and batch size (bf16, on the meta device: "
                         "no model built, no GPU), and the most a bandwidth-bound step gains per budget")
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args()
    if args.bytes_only:
        return bytes_table(args.model, args.budgets.split(","), [int(b) for b in args.batch_sizes.split(",")],
                           args.layers)
    if args.smoke:
        args.model, args.batch_sizes, args.prompt_len, args.new_tokens, args.reps = "tiny", "1,4", 8, 8, 1
        args.sequential_requests = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or
                                                                  ("bfloat16" if device.type == "cuda" else "float32")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    # FP8 weights are 1 byte where the active-bytes count assumes the checkpoint's dtype: no bound then
    hbm_gbs = None if args.fp8_matmul else args.hbm_gbs or (common.hbm_gbs(device) if device.type == "cuda" else None)
    ckpt_dir = Path(args.ckpt) if args.ckpt else build_checkpoint(
        args.model, args.budgets.split(","), common.scratch_dir("bench_batching_") / "ckpt", layers=args.layers,
        device=device if args.layers and device.type == "cuda" else None)
    ckpt = load_elastic(ckpt_dir, dtype=dtype, device=device)
    ckpt.model.requires_grad_(False)
    names = [b for b in BatchedEngine(ckpt, slots=1, static=False).budgets]
    V = ckpt.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (1, args.prompt_len), generator=g) for _ in range(max(*sizes, args.sequential_requests))]
    print(f"checkpoint {ckpt_dir}: {ckpt.model.num_parameters() / 1e6:.1f}M parameters, budgets {', '.join(names)}; "
          f"{device}, {dtype}, {torch.get_num_threads()} threads; prompt {args.prompt_len}, {args.new_tokens} new tokens",
          flush=True)

    engines = {}
    static = None if args.static == "auto" else args.static == "on"

    def engine(slots: int) -> BatchedEngine:  # one scheduler per slot count, all over the same parent and views
        if slots not in engines:
            base = next(iter(engines.values()), None)
            engines[slots] = BatchedEngine(ckpt, slots=slots, static=static, compile=args.compile) if base is None \
                else BatchedEngine.of(base, slots, static=static, compile=args.compile)
            engines[slots].scheduler.pipeline = engines[slots].scheduler.pipeline and not args.no_pipeline
            if base is None and args.fp8_matmul:  # the engines share the views, so the FP8 weights too
                info = engines[slots].use_fp8_matmuls()
                print(f"FP8 matmuls: {info}", flush=True)
        return engines[slots]

    rows = []
    for b in names:  # the sequential run and every batch size interleaved, rep by rep: load on a shared machine hits all alike
        work = [(b, prompts[i]) for i in range(args.sequential_requests)]
        sequential_run(engine(1), work[:1], 2)  # warm-up: views, caches
        for n in sizes:  # n requests: the pool grows to its timed size, and its static step is built (and, on a
            batched_run(engine(n), [(b, prompts[i]) for i in range(n)], 2)  # GPU, captured) before any timed run
        seq, runs = [], {n: [] for n in sizes}
        for _ in range(args.reps):
            seq.append(sequential_run(engine(1), work, args.new_tokens))
            for n in sizes:
                runs[n].append(batched_run(engine(n), [(b, prompts[i]) for i in range(n)], args.new_tokens))
        seq_tok_s = len(work) * args.new_tokens / statistics.median(t for t, _ in seq)
        seq_tokens = seq[0][1]
        view = engine(1).view(b)
        active_bytes = common.step_weight_bytes(view.config, view, 1)
        for n in sizes:
            tok_s = n * args.new_tokens / statistics.median(t for t, _, _ in runs[n])
            k = min(n, len(seq_tokens))
            equal = runs[n][0][1][:k] == seq_tokens[:k]
            row = {"budget": b, "batch": n, "batched_tok_s": tok_s, "sequential_tok_s": seq_tok_s,
                   "speedup": tok_s / seq_tok_s, "greedy_equal": equal,
                   "max_batch": engines[n].scheduler.max_batch, **phases(runs[n]), "active_weight_bytes": active_bytes,
                   "step_weight_bytes": common.step_weight_bytes(view.config, view, n)}
            if row["step_s"]:  # each weight a step reads, read once
                row["decode_gbs"] = row["step_weight_bytes"] / row["step_s"] / 1e9
                row["hbm_fraction"] = row["decode_gbs"] / hbm_gbs if hbm_gbs else None
            rows.append(row)
            print(f"  budget {b:>6} batch {n:>3}: batched {tok_s:9.1f} tok/s  sequential {seq_tok_s:9.1f} tok/s  "
                  f"{tok_s / seq_tok_s:5.2f}x  greedy equal: {equal}; prefill {row['prefill_s'] * 1e3:8.1f} ms "
                  f"({row['prefill_forwards']} fwd), decode {row['decode_s'] * 1e3:8.1f} ms "
                  f"({row['decode_steps']} steps): decode {fmt(row['decode_tok_s'], '9.1f')} tok/s", flush=True)
    for r in rows:  # the decode step of each budget against the full budget's at the same batch size
        full = next(x for x in rows if x["budget"] == names[0] and x["batch"] == r["batch"])
        both = r["decode_tok_s"] and full["decode_tok_s"]
        r["decode_vs_full"] = r["decode_tok_s"] / full["decode_tok_s"] if both else None
    mixed = []
    if not args.no_mixed:
        for n in sizes:
            eng = engine(n)
            batch = [(b, prompts[i]) for i in range(n) for b in names]
            runs = [batched_run(eng, batch, args.new_tokens) for _ in range(args.reps)]
            tok_s = len(batch) * args.new_tokens / statistics.median(t for t, _, _ in runs)
            # one at a time, the same requests take the sum of each budget's sequential time
            seq_s = sum(n * args.new_tokens / r["sequential_tok_s"] for r in rows if r["batch"] == n)
            mixed.append({"batch_per_budget": n, "requests": len(batch), "batched_tok_s": tok_s,
                          "sequential_tok_s": len(batch) * args.new_tokens / seq_s,
                          "speedup": tok_s * seq_s / (len(batch) * args.new_tokens), **phases(runs)})
            m = mixed[-1]
            print(f"  all budgets at once, {n:>3} each: batched {tok_s:9.1f} tok/s  sequential "
                  f"{m['sequential_tok_s']:9.1f} tok/s  {m['speedup']:5.2f}x; prefill {m['prefill_s'] * 1e3:8.1f} ms "
                  f"({m['prefill_forwards']} fwd), decode {m['decode_s'] * 1e3:8.1f} ms: decode "
                  f"{fmt(m['decode_tok_s'], '9.1f')} tok/s (every budget's steps together)", flush=True)
    def grid(title: str, cell):
        """A table of budgets x batch sizes: cell(row, the full budget's row at the same B) in each."""
        print(title)
        print(f"{'budget':>7} " + " ".join(f"{f'B = {n}':>22}" for n in sizes))
        for b in names:
            cells = [cell(next(x for x in rows if x["budget"] == b and x["batch"] == n),
                          next(x for x in rows if x["budget"] == names[0] and x["batch"] == n)) for n in sizes]
            print(f"{b:>7} " + " ".join(f"{c:>22}" for c in cells))

    def weights(r, full):
        r["bytes_vs_full"] = full["step_weight_bytes"] / r["step_weight_bytes"]
        size = r["step_weight_bytes"]
        size = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        return f"{size} {r['bytes_vs_full']:.2f}x" + ("" if r.get("hbm_fraction") is None else f", {r['hbm_fraction']:.0%}")

    def admission(r, full):
        r["prefill_share"] = r["prefill_s"] / (r["prefill_s"] + r["decode_s"])
        return f"{r['prefill_share']:.0%}"

    grid(f"\ndecode steps alone (tok/s written by decode steps / seconds in them), x the full budget {names[0]} at "
         "the same B:", lambda r, full: f"{fmt(r['decode_tok_s'], '9.1f')} ({fmt(r['decode_vs_full'], '5.2f')}x)")
    grid("weights a decode step reads, x the full budget's at the same B (the most a bandwidth-bound step gains), "
         "and the step's share of the bandwidth bound:", weights)
    grid("share of the batched time in admission (prefill forwards and first tokens):", admission)
    for r in rows:
        if r["batch"] == 1 and r.get("decode_gbs") is not None:
            share = "" if r["hbm_fraction"] is None else f", {r['hbm_fraction']:.1%} of {hbm_gbs:.0f} GB/s"
            print(f"B = 1 decode, budget {r['budget']}: {r['step_s'] * 1e3:.3f} ms a step, "
                  f"{r['active_weight_bytes'] / 1e6:.1f} MB of active weights a step = "
                  f"{r['decode_gbs']:.1f} GB/s{share}; on the host: launching {r['launch_s_per_step'] * 1e3:.3f} ms, "
                  f"waiting for tokens {r['wait_s_per_step'] * 1e3:.3f} ms, the rest "
                  f"{(r['step_s'] - r['launch_s_per_step'] - r['wait_s_per_step']) * 1e3:.3f} ms")
    profiled = profile_paths(engine(1), names[0], prompts[0], args.new_tokens, device) if args.profile else None
    for eng in engines.values():
        eng.close()
    result = {"benchmark": "bench_batching", "command": " ".join(["python"] + sys.argv),
              "machine": common.machine(device), "device": str(device), "dtype": str(dtype),
              "threads": torch.get_num_threads(), "model": args.model if not args.ckpt else args.ckpt,
              "layers": args.layers,
              "params": ckpt.model.num_parameters(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "reps": args.reps, "hbm_gbs": hbm_gbs, "fp8_matmul": args.fp8_matmul,
              "static_step": next(iter(engines.values())).scheduler.static if engines else None,
              "compile": args.compile,
              "cuda_graph": next(iter(engines.values())).scheduler.use_graph if engines else None,
              "pipelined": next(iter(engines.values())).scheduler.pipeline if engines else None,
              "rows": rows, "mixed": mixed, "profile": profiled}
    if args.out:
        common.write_json(args.out, result, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
