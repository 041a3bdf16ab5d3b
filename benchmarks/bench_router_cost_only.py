"""The router at SmolLM2-135M's shapes on the cost model alone (no model, no distillation): which
architectures the budget rule of train.py and its warm-up reach by themselves (docs/RESULTS.md §9).

    python benchmarks/bench_router_cost_only.py [--steps 600] [--json OUT]

CPU, seconds. Budgets 0.75 and 0.5 alternate; the rule: drawn + argmax cost with the expected
cost's gradient, 5% band, entropy floor 0.1, Adam lr 1e-2 (as ElasticTrainer), the logit scale
ramped 1 -> 10."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

import common
from star_elastic.elastic.cost import CostModel, parse_budget
from star_elastic.elastic.losses import budget_loss, drawn_cost
from star_elastic.elastic.router import Router, RouterConfig, entropy_floor_loss
from star_elastic.elastic.search import describe
from star_elastic.train import ElasticTrainer, TrainConfig

SMOLLM2 = common.smollm2_config()  # the cost model reads only the widths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cfg, axes = SMOLLM2, ("hidden", "attention", "ffn")
    cm = CostModel(cfg)
    budgets = [parse_budget(b, cfg) for b in ("1.0", "0.75", "0.5")]
    out = {}

    def report(name, r):
        r.eval()
        out[name] = {b.name: {"architecture": describe(r.spec(i), cfg),
                              "cost_vs_target": cm.spec_cost("params", r.spec(i)) / b.target}
                     for i, b in enumerate(budgets) if not b.is_full}
        print(f"{name:>10}: " + "; ".join(f"{k}: {v['architecture']} ({v['cost_vs_target']:.3f}x)"
                                          for k, v in out[name].items()))

    torch.manual_seed(0)
    r = Router(cfg, budgets, RouterConfig(axes=axes))
    me = SimpleNamespace(router=r, cfg=TrainConfig(), budgets=budgets, cost=cm, warm_start=None, start_projections=None)
    me._fit_router_to = lambda proj, opt: ElasticTrainer._fit_router_to(me, proj, opt)
    ElasticTrainer.warm_up_router(me)
    report("warm-up", r)

    torch.manual_seed(0)
    r = Router(cfg, budgets, RouterConfig(axes=axes)).train()
    opt = torch.optim.Adam(r.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        r.set_progress(step / args.steps)
        b = 1 + step % 2
        d = r(b, generator=g)
        expected = cm.cost("params", d.arch)
        argmax = r.argmax_arch(d.probs)
        loss = (budget_loss(drawn_cost(cm.cost("params", d.chosen_arch), expected), budgets[b])
                + budget_loss(drawn_cost(cm.cost("params", argmax), expected), budgets[b])
                + entropy_floor_loss(d.probs, 0.1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        r.train()
    report("cost only", r)
    if args.json:
        common.write_json(args.json, {"benchmark": "bench_router_cost_only", "steps": args.steps, "results": out})


if __name__ == "__main__":
    main()
