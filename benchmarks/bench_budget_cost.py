"""Does the router's inference architecture land inside its budget's band? The budget loss judged
on the expected cost vs on the drawn architecture (TrainConfig.budget_cost), on the 5-layer hybrid
of tests/test_train.py trained on a synthetic pattern (CPU, about 5 minutes).

    python benchmarks/bench_budget_cost.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

import common
from star_elastic.elastic.cost import CostModel, parse_budget
from star_elastic.elastic.router import Router, RouterConfig
from star_elastic.model import Model, ModelConfig
from star_elastic.train import ElasticTrainer, TrainConfig

# a toy hybrid with every block type (the shape of tests/test_train.py's)
CFG = ModelConfig(vocab_size=64, hidden_size=32, layer_types="M*EM-", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                  n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                  moe_shared_expert_intermediate_size=16)
BUDGETS = ["1.0", "0.75", "0.5"]


def pattern_rows(repeats: int) -> torch.Tensor:
    """Rows of 32 tokens of CFG's vocabulary: 0..63 repeated `repeats` times, a fifth of the tokens noise (fixed)."""
    g = torch.Generator().manual_seed(123)
    base = torch.arange(64).repeat(repeats)
    stream = torch.where(torch.rand(base.shape, generator=g) < 0.2, torch.randint(0, 64, base.shape, generator=g), base)
    return stream[: (stream.numel() // 32) * 32].view(-1, 32)


def run(judge: str, seed: int, steps: int, out: str) -> list[float]:
    torch.manual_seed(seed)
    model = Model(CFG)
    budgets = [parse_budget(b, CFG) for b in BUDGETS]
    router = Router(CFG, budgets, RouterConfig(width_choices=8))
    rows = pattern_rows(200)
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=32, warmup_steps=10, lr=3e-3, router_lr=1e-2,
                      budget_cost=judge, seed=seed)
    ElasticTrainer(model, copy.deepcopy(model), router, budgets, rows, cfg, out).run(progress=False)
    router.eval()
    cost = CostModel(CFG)
    return [cost.spec_cost("params", router.spec(i)) / b.target for i, b in enumerate(budgets)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ["STAR_ELASTIC_QUIET"] = "1"
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for judge in ("expected", "drawn"):
            for seed in range(args.seeds):
                ratios = run(judge, seed, args.steps, f"{tmp}/{judge}{seed}")
                rows.append({"budget_cost": judge, "seed": seed, "cost_over_target": dict(zip(BUDGETS, ratios))})
                print(judge, seed, " ".join(f"{b}: {r:.3f}" for b, r in zip(BUDGETS, ratios)), flush=True)
    if args.json:
        common.write_json(args.json, {"benchmark": "bench_budget_cost", "date": time.strftime("%Y-%m-%d"),
                                      "machine": common.machine(torch.device("cpu")), "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
