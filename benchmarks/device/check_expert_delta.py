"""On a GPU: the full budget's delta on a hybrid's routed experts runs the CUDA grouped-GEMM path (W x + B (A x))
and the one-token gather path, equal to the merged weights under bf16 autocast, and its backward reaches A and B
(the finish trains them). Prints the largest relative differences; exit 1 when one is off. (`run.sh` carries
nothing for it: `python benchmarks/device/check_expert_delta.py` from the repository root.)"""

import copy
import sys

import torch

from star_elastic.elastic.delta import FullDelta
from star_elastic.model import Model, ModelConfig

cfg = ModelConfig(vocab_size=256, hidden_size=128, layer_types="ME*E", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=256, mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16,
                  n_groups=2, chunk_size=16, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=64,
                  moe_shared_expert_intermediate_size=64)
dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the loop path: a dry run
torch.manual_seed(0)
model = Model(cfg).to(dev).eval()
bad = []
for rank in (64, 4):  # 4: bf16 rows of 8 bytes, the merged fallback
    delta = FullDelta(model, rank, seed=1)
    with torch.no_grad():
        for p in delta.up.values():
            p.normal_(0, 0.05)
    merged = delta.merge_into(copy.deepcopy(model))
    for length in (1, 64):  # one token: the gather path; 64: the grouped GEMMs
        x = torch.randint(0, cfg.vocab_size, (2 if length > 1 else 1, length), device=dev)
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
            want = merged(x).float()
            with delta.applied(model):
                got = model(x).float()
        rel = float((got - want).norm() / want.norm())
        print(f"rank {rank}, {x.numel()} tokens: applied against merged, relative difference {rel:.2e}")
        bad += [rel] if rel > 2e-2 else []
    x = torch.randint(0, cfg.vocab_size, (2, 64), device=dev)
    with torch.autocast(dev, dtype=torch.bfloat16), delta.applied(model):
        model(x).float().square().mean().backward(inputs=list(delta.parameters()))
    keys = [e.replace(".", "/") for e in delta.experts]
    reached = [k for k in keys if delta.up[k].grad is not None and delta.up[k].grad.abs().sum() > 0]
    print(f"rank {rank}: the backward reached {len(reached)} of the experts' {len(keys)} B tensors")
    bad += [] if len(reached) == len(keys) else ["no gradient"]
    for p in delta.parameters():
        p.grad = None
sys.exit(1 if bad else 0)
