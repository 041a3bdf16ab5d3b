"""Continuous batching (issue 12): generated tokens/s of the batching engine at batch sizes 1, 4, 8,
16 for each budget, side by side with the same requests run one at a time.

For each budget and batch size B, B requests (random prompts of --prompt-len tokens, --new-tokens
each, EOS ignored so every request writes all of them) are submitted at once to a `BatchedEngine`
with B slots; tokens/s = B x new tokens / seconds until the last one ends (prefills included). The
sequential baseline runs the same kind of request through `generate` (what `ElasticEngine` does),
one after another. "mixed" submits B requests to every budget at once: one server, all budgets.
Each figure is the median of --reps runs; `greedy_equal` checks the batched tokens against the
sequential ones.

    python benchmarks/bench_batching.py --smoke
    python benchmarks/bench_batching.py --model tiny --out docs/results/batching_cpu_tiny.json
    python benchmarks/bench_batching.py --model smollm2 --batch-sizes 1,4,8,16 --out batching_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_serve import build_checkpoint  # noqa: E402
from star_elastic.elastic.checkpoint import load_elastic  # noqa: E402
from star_elastic.generate import generate  # noqa: E402
from star_elastic.serve.batching import BatchedEngine  # noqa: E402


def batched_run(engine: BatchedEngine, budget_prompts: list[tuple[str, torch.Tensor]], new_tokens: int):
    """Seconds until every request ends, and the tokens of each."""
    t0 = common.clock(engine.device)
    reqs = [engine.submit(b, p, new_tokens, ignore_eos=True) for b, p in budget_prompts]
    out = [r.wait()[0] for r in reqs]
    return common.clock(engine.device) - t0, out


def sequential_run(engine: BatchedEngine, budget_prompts: list[tuple[str, torch.Tensor]], new_tokens: int):
    t0 = common.clock(engine.device)
    out = []
    for b, p in budget_prompts:
        ids = p.to(engine.device)
        out.append(generate(engine.view(b), ids, new_tokens)[0, ids.shape[1]:].tolist())
    return common.clock(engine.device) - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="an elastic checkpoint (default: build one, untrained)")
    ap.add_argument("--model", choices=["smollm2", "hybrid", "nano", "tiny"], default="tiny", help="parent to build")
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sequential-requests", type=int, default=4, help="requests timed one at a time per budget")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--no-mixed", action="store_true", help="skip the all-budgets-at-once runs")
    ap.add_argument("--static", choices=["auto", "on", "off"], default="auto",
                    help="the engine's static step (every row of the pool; a CUDA graph on a GPU): auto = on a GPU")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens: a quick check")
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batch_sizes, args.prompt_len, args.new_tokens, args.reps = "tiny", "1,4", 8, 8, 1
        args.sequential_requests = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or
                                                                  ("bfloat16" if device.type == "cuda" else "float32")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ckpt_dir = Path(args.ckpt) if args.ckpt else build_checkpoint(
        args.model, args.budgets.split(","), Path(tempfile.mkdtemp(prefix="bench_batching_")) / "ckpt")
    ckpt = load_elastic(ckpt_dir, dtype=dtype, device=device)
    ckpt.model.requires_grad_(False)
    names = [b for b in BatchedEngine(ckpt, slots=1, static=False).budgets]
    V = ckpt.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (1, args.prompt_len), generator=g) for _ in range(max(sizes))]
    print(f"checkpoint {ckpt_dir}: {ckpt.model.num_parameters() / 1e6:.1f}M parameters, budgets {', '.join(names)}; "
          f"{device}, {dtype}, {torch.get_num_threads()} threads; prompt {args.prompt_len}, {args.new_tokens} new tokens",
          flush=True)

    engines = {}
    static = None if args.static == "auto" else args.static == "on"

    def engine(slots: int) -> BatchedEngine:  # one scheduler per slot count, all over the same parent and views
        if slots not in engines:
            base = next(iter(engines.values()), None)
            engines[slots] = BatchedEngine(ckpt, slots=slots, static=static) if base is None else \
                BatchedEngine.of(base, slots, static=static)
        return engines[slots]

    rows = []
    for b in names:  # the sequential run and every batch size interleaved, rep by rep: load on a shared machine hits all alike
        work = [(b, prompts[i]) for i in range(args.sequential_requests)]
        sequential_run(engine(1), work[:1], 2)  # warm-up: views, caches
        for n in sizes:
            batched_run(engine(n), [(b, prompts[0])], 2)
        seq, runs = [], {n: [] for n in sizes}
        for _ in range(args.reps):
            seq.append(sequential_run(engine(1), work, args.new_tokens))
            for n in sizes:
                runs[n].append(batched_run(engine(n), [(b, prompts[i]) for i in range(n)], args.new_tokens))
        seq_tok_s = len(work) * args.new_tokens / statistics.median(t for t, _ in seq)
        seq_tokens = seq[0][1]
        for n in sizes:
            tok_s = n * args.new_tokens / statistics.median(t for t, _ in runs[n])
            k = min(n, len(seq_tokens))
            equal = runs[n][0][1][:k] == seq_tokens[:k]
            rows.append({"budget": b, "batch": n, "batched_tok_s": tok_s, "sequential_tok_s": seq_tok_s,
                         "speedup": tok_s / seq_tok_s, "greedy_equal": equal,
                         "max_batch": engines[n].scheduler.max_batch})
            print(f"  budget {b:>6} batch {n:>3}: batched {tok_s:9.1f} tok/s  sequential {seq_tok_s:9.1f} tok/s  "
                  f"{tok_s / seq_tok_s:5.2f}x  greedy equal: {equal}", flush=True)
    mixed = []
    if not args.no_mixed:
        for n in sizes:
            eng = engine(n)
            batch = [(b, prompts[i]) for i in range(n) for b in names]
            runs = [batched_run(eng, batch, args.new_tokens) for _ in range(args.reps)]
            tok_s = len(batch) * args.new_tokens / statistics.median(t for t, _ in runs)
            # one at a time, the same requests take the sum of each budget's sequential time
            seq_s = sum(n * args.new_tokens / r["sequential_tok_s"] for r in rows if r["batch"] == n)
            mixed.append({"batch_per_budget": n, "requests": len(batch), "batched_tok_s": tok_s,
                          "sequential_tok_s": len(batch) * args.new_tokens / seq_s,
                          "speedup": tok_s * seq_s / (len(batch) * args.new_tokens)})
            print(f"  all budgets at once, {n:>3} each: batched {tok_s:9.1f} tok/s  sequential "
                  f"{mixed[-1]['sequential_tok_s']:9.1f} tok/s  {mixed[-1]['speedup']:5.2f}x", flush=True)
    for eng in engines.values():
        eng.close()
    result = {"benchmark": "bench_batching", "command": " ".join(["python"] + sys.argv),
              "machine": common.machine(device), "device": str(device), "dtype": str(dtype),
              "threads": torch.get_num_threads(), "model": args.model if not args.ckpt else args.ckpt,
              "params": ckpt.model.num_parameters(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "reps": args.reps, "static_step": next(iter(engines.values())).scheduler.static if engines else None,
              "cuda_graph": next(iter(engines.values())).scheduler.use_graph if engines else None,
              "rows": rows, "mixed": mixed}
    if args.out:
        common.write_json(args.out, result, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
