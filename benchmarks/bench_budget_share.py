"""Does a smaller budget's share of the steps hold a larger one back, and does its KD weight give it back?

Issue 17's open gap (docs/RESULTS.md §9): trained jointly, the 0.75 fits its own training batches worse than a
(c) run given the same steps alone, while the 0.5 does better than its own. With the full budget's delta the
anchor cannot be the cause (its backward reaches the delta alone); the 0.5's steps can, through the shared
weights and the one set of AdamW moments the two budgets share, where its larger gradient weighs more than its
share of the steps. Three runs of fixed FFN cuts of SmolLM2 (bench_anchor_conflict's `fixed_cuts`, no anchor),
the 0.75 on the same number of steps in each:

  alone   the 0.75 alone (a (c) run on the joint trainer: at stage-2 weights 0, 1, 0)
  joint   the 0.75 and the 0.5 in turn, twice the steps (0, 1, 1)
  kd<w>   the same with the 0.5's KD weighted w (--kd-weights 1,1,w)

Each prints the 0.75's KD on its own batches over the last fifth of its steps, both budgets' held-out
perplexity (in domain and out), and each budget's mean gradient norm. A CPU probe at a short horizon, not a
quality claim: the GPU runs (`benchmarks/device/run.sh PLAN17 16m7`) measure the lever at 16.8M tokens.

    python benchmarks/bench_budget_share.py --steps 60 --json docs/results/budget_share_cpu.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_anchor_conflict import fixed_cuts, parser, record  # noqa: E402
from star_elastic.data import load_corpus_tokens  # noqa: E402
from star_elastic.train import ElasticTrainer  # noqa: E402


def run(name: str, built: tuple, heldout: dict) -> dict:
    """One run of `fixed_cuts`' sorted parent, budgets and TrainConfig (`built`); its figures."""
    model, teacher, budgets, rows, specs, cfg, _, _ = built
    steps, weights, kd = cfg.steps, cfg.stage2_weights, cfg.budget_kd_weights
    t0 = time.perf_counter()
    trainer = ElasticTrainer(model, teacher, None, budgets, rows, cfg, Path(tempfile.mkdtemp()), fixed_specs=specs)
    logs = trainer.run(progress=False, save=False)
    by_budget: dict[str, list[dict]] = {}
    for lg in logs:
        by_budget.setdefault(lg["budget"], []).append(lg)
    out = {"name": name, "steps": steps, "stage2_weights": weights, "kd_weights": kd, "seconds": 0.0,
           "steps_sampled": {b: len(v) for b, v in by_budget.items()},
           "grad_norm_mean": {b: sum(lg["grad_norm"] for lg in v) / len(v) for b, v in by_budget.items()},
           "kd_last_fifth": {b: sum(lg["kd"] for lg in v[-max(1, len(v) // 5):]) / max(1, len(v) // 5)
                             for b, v in by_budget.items()},
           "heldout": {}}
    for source, stream in heldout.items():
        trainer.heldout = stream
        out["heldout"][source] = {b: r["perplexity"] for b, r in trainer.evaluate().items() if b != "1.0"}
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None):
    ap = parser(__doc__)
    ap.set_defaults(steps=60, data="wiki")
    ap.add_argument("--kd", default="0.5", help="the 0.5's KD weights to run beside joint, comma-separated")
    ap.add_argument("--heldout", default="wiki,shakespeare")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--clip", type=float, default=1.0)
    args = ap.parse_args(argv)
    if args.ffn.count(",") != 1:
        raise SystemExit("--ffn: two widths, the 0.75's and the 0.5's")
    n, heldout = args.steps, None
    plan = [("alone", [0.0, 1.0, 0.0], None, n), ("joint", [0.0, 1.0, 1.0], None, 2 * n)]
    plan += [(f"kd{w}", [0.0, 1.0, 1.0], [1.0, 1.0, float(w)], 2 * n) for w in args.kd.split(",")]
    results = []
    print(f"{'run':>8} {'0.75 steps':>10} {'0.75 KD, last fifth':>20} {'grad norm 0.75 / 0.5':>21}  held-out "
          f"perplexity 0.75 | 0.5 ({args.heldout})")
    for name, weights, kd, steps in plan:
        built = fixed_cuts(args, full_anchor=0.0, steps=steps, stage2_weights=weights, budget_kd_weights=kd,
                           clip=args.clip, eval_tokens=args.eval_tokens)
        device, tokenizer = built[-2:]
        if heldout is None:  # the same held-out text for every run
            heldout = {s: load_corpus_tokens(s, tokenizer, seed=0)[1][: args.eval_tokens]
                       for s in args.heldout.split(",")}
        r = run(name, built, heldout)
        results.append(r)
        g = r["grad_norm_mean"]
        ppl = "  ".join(f"{v.get('0.75', float('nan')):.2f} | {v.get('0.5', float('nan')):.2f}"
                        for v in r["heldout"].values())
        print(f"{name:>8} {r['steps_sampled'].get('0.75', 0):10d} {r['kd_last_fifth']['0.75']:20.4f} "
              f"{g['0.75']:10.3f} / {g.get('0.5', float('nan')):.3f}  {ppl}  ({r['seconds']:.0f} s)", flush=True)
    alone = results[0]
    for r in results[1:]:
        kd = r["kd_last_fifth"]["0.75"] / alone["kd_last_fifth"]["0.75"] - 1
        ppl = " / ".join(f"{r['heldout'][s]['0.75'] / alone['heldout'][s]['0.75'] - 1:+.1%}" for s in heldout)
        print(f"{r['name']} against alone, the 0.75: KD on its batches {kd:+.1%}, held-out {ppl}")
    if args.json:
        record("bench_budget_share", args, device, args.json, runs=results)


if __name__ == "__main__":
    main()
