"""How hard does the 0.5 pull the 0.75 off its fit, with one AdamW (the 0.5's KD weighted 1, 0.5, 0.3) and with
each budget's own AdamW moments (`--budget-lrs`)? A CPU probe on the 5-layer hybrid of tests/test_train.py (random
teacher, the student a perturbed copy, a synthetic pattern), fixed nested architectures, the 0.75 and the 0.5
alone on 65% / 35% of the steps (SmolLM2's share under stage 2 at 0.8 / 0.2; `--share`), no full budget (as where
--keep-full's delta takes the anchor's gradient), beside each budget distilled alone on the steps it got ((c)).
Each run's figure is a budget's KD on 64 of its training rows at the end; beside it (g) the 0.5's mean gradient
norm over the 0.75's (what a rule that evens the budgets' gradients out would go by).

Issue 17 (docs/RESULTS.md §9, fifty-first session): on SmolLM2 at 16.8M tokens own moments left the 0.75 further
from its (c) than one AdamW with the 0.5's KD at 0.5. `--beta1 0` runs everything without momentum, to see how
much of the difference the momentum the budgets share accounts for. About 15 s a seed at 120 steps:

    python benchmarks/bench_budget_pull.py --steps 120 400 --seeds 0 1 2 --beta1 0.9 0 --json OUT.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import tempfile
from pathlib import Path

import torch

import common
from bench_budget_cost import CFG, pattern_rows  # CFG: tests/test_train.py's toy hybrid, every block type
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.losses import kd_loss
from star_elastic.elastic.masking import masked
from star_elastic.elastic.spec import ElasticSpec
from star_elastic.model import Model
from star_elastic.train import ElasticTrainer, TrainConfig

NESTED = [ElasticSpec(), ElasticSpec(intermediate_size=48, mamba_num_heads=2, moe_intermediate_size=12),
          ElasticSpec(hidden_size=24, intermediate_size=32, mamba_num_heads=2, moe_intermediate_size=8,
                      num_key_value_heads=1)]
LR = 3e-3
VARIANTS = {"w=1": {}, "w=0.5": dict(budget_kd_weights=[1.0, 1.0, 0.5]), "w=0.4": dict(budget_kd_weights=[1.0, 1.0, 0.4]),
            "w=0.3": dict(budget_kd_weights=[1.0, 1.0, 0.3]), "own": dict(budget_lrs=[LR] * 3),
            "own-0.5-at-lr/2": dict(budget_lrs=[LR, LR, LR / 2]), "own-0.5-at-lr/4": dict(budget_lrs=[LR, LR, LR / 4])}
DEFAULT = "w=1,w=0.5,w=0.3,own"


def fits(steps: int, stage2_weights: list[float], seed: int = 0, beta1: float = 0.9, **train) -> tuple[dict, list[float], dict]:
    """(steps each budget got, [the 0.75's KD, the 0.5's KD] on 64 training rows at the end, each budget's mean
    gradient norm over the last three quarters of the steps) of one run."""
    torch.manual_seed(seed)
    model = Model(CFG)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a student away from its teacher, so that every budget has work to do
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = pattern_rows(40)  # a repeating pattern with a fifth of noise
    cfg = TrainConfig(**{**dict(steps=steps, batch_size=8, seq_len=16, stage2_seq_len=32, warmup_steps=10, lr=LR,
                                stage1_fraction=0.0, stage2_weights=stage2_weights, full_anchor=0.0, clip=1e9),
                         **train})
    budgets = [parse_budget(b, CFG) for b in ("1.0", "0.75", "0.5")]
    with tempfile.TemporaryDirectory() as tmp:
        t = ElasticTrainer(model, teacher, None, budgets, rows, cfg, Path(tmp), fixed_specs=NESTED)
        for group in t.opt.param_groups:
            group["betas"] = (beta1, group["betas"][1])
        logs = t.run(progress=False, save=False)
    x = rows[:64, :16]
    with torch.no_grad():
        result = []
        for spec in NESTED[1:]:
            with masked(model, spec.masks(CFG)):
                result.append(float(kd_loss(model(x), teacher(x))))
    late = logs[steps // 4:]  # past the warm-up and the first fall
    norms = {b: sum(lg["grad_norm"] for lg in late if lg["budget"] == b)
             / max(1, sum(lg["budget"] == b for lg in late)) for b in ("0.75", "0.5")}
    return {b: sum(lg["budget"] == b for lg in logs) for b in ("0.75", "0.5")}, result, norms


def compare(steps: int, seed: int, beta1: float, variants: dict, share: float = 0.65) -> dict:
    """Every variant's fits, and each budget's (c) on the steps it got, with ratios to (c); `share`: the 0.75's
    share of the steps (the 0.5 the rest)."""
    weights = [0.0, share, 1.0 - share]
    done = {name: fits(steps, weights, seed, beta1, **kw) for name, kw in variants.items()}
    n = next(iter(done.values()))[0]  # the steps each budget got: the even order's, whatever the variant
    alone = [fits(n["0.75"], [0.0, 1.0, 0.0], seed, beta1)[1][0], fits(n["0.5"], [0.0, 0.0, 1.0], seed, beta1)[1][1]]
    return {"steps": steps, "seed": seed, "beta1": beta1, "share": share, "steps_sampled": n, "c": alone,
            "runs": {k: {"kd": kd, "vs_c": [kd[0] / alone[0] - 1, kd[1] / alone[1] - 1],
                         # the 0.5's gradient norm over the 0.75's (budget_lrs: each budget's own, clipped alone)
                         "grad_norm_ratio": norms["0.5"] / norms["0.75"]} for k, (_, kd, norms) in done.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[120])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--beta1", type=float, nargs="+", default=[0.9])
    ap.add_argument("--share", type=float, default=0.65, help="the 0.75's share of the steps, the 0.5 the rest")
    ap.add_argument("--variants", default=DEFAULT, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    os.environ["STAR_ELASTIC_QUIET"] = "1"
    results = []
    print(f"{'steps':>5} {'seed':>4} {'beta1':>5}  " + "  ".join(f"{k:>24}" for k in variants)
          + "   (the 0.75's KD vs its (c) | the 0.5's; g: the 0.5's gradient norm over the 0.75's)")
    for steps in args.steps:
        for beta1 in args.beta1:
            for seed in args.seeds:
                r = compare(steps, seed, beta1, variants, args.share)
                results.append(r)
                cells = "  ".join(f"{100 * v['vs_c'][0]:+7.1f}% | {100 * v['vs_c'][1]:+6.1f}% g{v['grad_norm_ratio']:.2f}"
                                  for v in r["runs"].values())
                print(f"{steps:5d} {seed:4d} {beta1:5g}  {cells}", flush=True)
    if args.json:
        common.write_json(args.json, {"benchmark": "bench_budget_pull", "machine": common.machine(torch.device("cpu")),
                                      "date": datetime.date.today().isoformat(),
                                      "command": " ".join(["python benchmarks/bench_budget_pull.py",
                                                           *(sys.argv[1:] if argv is None else argv)]),
                                      "results": results}, indent=1)


if __name__ == "__main__":
    main()
