"""FSDP2-sharded elastic training on 2+ GPUs (bf16 mixed precision), under torchrun.

Two parts:
- check: a 0.5B hybrid trained with FSDP2 and replicated (same seed, same batches): the final
  weights' largest relative difference, per-step losses, peak memory per rank, and an exact resume
  under FSDP2 (half the steps, reload, the other half).
- nano: a Nemotron-3-Nano-shaped parent (hidden 2688, 128 experts top-6, 64 Mamba heads x 64,
  state 128, vocabulary 131k; 16 layers `MEMEM*EMEMEM*EME`, 10.1B parameters, 1.58B active).
  Replicated it cannot train on one H200 (fp32 weights + gradients + two Adam moments = 16 bytes a
  parameter, 162 GB, before the bf16 teacher); sharded over the ranks it does. Peak memory per rank, tokens/s and model FLOP
  utilisation (6 x active parameters per student token, 2x for the teacher and for the argmax
  forward of the score estimator).
  By default every rank builds the parent whole on its GPU and the trainer shards it; with
  `--meta-init` it is built on the meta device and each rank materialises only its own shards
  (parallel.meta_sharded), initialised as the constructor would (parallel.init_sharded_, one layer
  whole at a time): the parent never sits whole on one device.

    torchrun --nproc_per_node 2 benchmarks/bench_fsdp.py --part check,nano --json fsdp.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch
import torch.distributed as dist

import common
from common import BF16_PEAK, active_params
from star_elastic import parallel
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router, RouterConfig
from star_elastic.model import Model, ModelConfig
from star_elastic.train import ElasticTrainer, TrainConfig, init_distributed, leave_distributed, world

CHECK = ModelConfig(vocab_size=32000, hidden_size=1024, layer_types="M*EM*-EM", num_attention_heads=16,
                    num_key_value_heads=4, head_dim=64, intermediate_size=4096, mamba_num_heads=32, mamba_head_dim=64,
                    ssm_state_size=64, n_groups=4, chunk_size=128, n_routed_experts=16, num_experts_per_tok=2,
                    moe_intermediate_size=1024, moe_shared_expert_intermediate_size=2048)
NANO = common.nano_config("MEMEM*EMEMEM*EME")


def trainer(cfg: ModelConfig, device, name: str, shard: str, steps: int, batch: int, seq: int, tmp: str,
            meta_init: bool = False):
    torch.manual_seed(0)
    if meta_init:  # never whole; sharded as the trainer shards (so it keeps them), the weights of the path below
        mixed = device.type == "cuda"
        model = parallel.init_sharded_(parallel.meta_sharded(cfg, torch.float32, device, mixed_precision=mixed), 0)
        teacher = parallel.init_sharded_(parallel.meta_sharded(cfg, torch.bfloat16, device, mixed_precision=mixed), 0)
    else:
        with torch.device(device):
            model = Model(cfg)
        teacher = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():  # a student that differs from its teacher, so the KD is not zero
        for p in model.parameters():
            local = p.to_local() if meta_init else p  # meta_init: this rank's shard
            local.add_(0.01 * torch.randn_like(local))
    budgets = [parse_budget(b, cfg) for b in ["1.0", "0.75", "0.5"]]
    router = Router(cfg, budgets, RouterConfig()).to(device)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, cfg.vocab_size, (max(64, 4 * batch), seq), generator=g)
    tc = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, lr=1e-4, warmup_steps=2, router_warmup_steps=50,
                     shard=shard)
    return ElasticTrainer(model, teacher, router, budgets, rows, tc, f"{tmp}/{name}")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)).item() for k in a)


def part_check(device, rank, tmp, steps, seq) -> dict:
    out, weights = {}, {}
    for shard in ("fsdp", "none"):
        reset_peak(device)
        t = trainer(CHECK, device, shard, shard, steps, 16, seq, tmp)
        logs = t.run(progress=False)
        out[shard] = {"losses": [round(l["total"], 5) for l in logs], "budgets": [l["budget"] for l in logs],
                      "peak_gib": t.peak_memory(), "parallel": t.distribution,
                      "tokens_per_s_last": [round(l["tokens_per_s"]) for l in logs[-4:]]}
        weights[shard] = parallel.full_state_dict(t.model)
        del t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    half = steps // 2
    trainer(CHECK, device, "resumed", "fsdp", steps, 16, seq, tmp).run(progress=False, stop_after=half)
    t = trainer(CHECK, device, "resumed", "fsdp", steps, 16, seq, tmp)
    assert t.load_state() and t.step == half, "the FSDP2 run did not resume from its half-way state"
    t.run(progress=False)
    resumed = parallel.full_state_dict(t.model)
    if rank == 0:
        out["params_M"] = round(sum(v.numel() for v in weights["fsdp"].values()) / 1e6, 1)
        out["weights_rel_diff_fsdp_vs_replicated"] = max_rel_diff(weights["fsdp"], weights["none"])
        out["resume_rel_diff"] = max_rel_diff(resumed, weights["fsdp"])
    return out


def part_nano(device, ranks, tmp, steps, batch, seq, meta_init=False) -> dict:
    reset_peak(device)
    t = trainer(NANO, device, "nano", "fsdp", steps, batch, seq, tmp, meta_init=meta_init)
    # the train state is written sharded (DCP) by the trainer, but this benchmark measures steps only: not saved
    t.save_state = lambda: None
    with torch.device("meta"):
        meta = Model(NANO)
    n_total = sum(p.numel() for p in meta.parameters())
    n_active = active_params(NANO, meta)
    logs = t.run(progress=False)
    tok_s = sorted(l["tokens_per_s"] for l in logs[2:])[len(logs[2:]) // 2]  # median past the first two steps
    # per token: student forward+backward 6N, teacher forward 2N, and on smaller-budget steps one
    # argmax forward without gradient (2N, an upper bound: a smaller budget runs fewer parameters)
    flops = 10 * n_active * tok_s
    return {"params_B": round(n_total / 1e9, 2), "active_params_B": round(n_active / 1e9, 3),
            "replicated_bytes_needed_GB": round(16 * n_total / 1e9, 1), "peak_gib_per_rank": t.peak_memory(),
            "tokens_per_s_median": round(tok_s), "budgets": [l["budget"] for l in logs],
            "tokens_per_s": [round(l["tokens_per_s"]) for l in logs],
            "mfu_upper_bound": round(flops / (ranks * BF16_PEAK), 4), "parallel": t.distribution,
            "batch_tokens": batch * seq, "init": "meta, sharded" if meta_init else "whole, then sharded"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="check,nano")
    ap.add_argument("--steps", type=int, default=12, help="training steps of each run")
    ap.add_argument("--nano-batch", type=int, default=8, help="sequences per step over all ranks (nano)")
    ap.add_argument("--nano-seq", type=int, default=1024)
    ap.add_argument("--meta-init", action="store_true",
                    help="nano: build the parent on the meta device, each rank materialising only its shards")
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU too")
    args = ap.parse_args()
    device = init_distributed()
    rank, ranks = world()
    if args.smoke:  # a CPU run of the same code (gloo), tiny shapes: catches mistakes before GPU time
        global CHECK, NANO
        CHECK = ModelConfig(vocab_size=256, hidden_size=64, layer_types="M*EM", num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
                            chunk_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
        NANO = CHECK
    elif device.type != "cuda" or ranks < 2:
        raise SystemExit("run under torchrun with 2+ GPUs: torchrun --nproc_per_node 2 benchmarks/bench_fsdp.py")
    out = {"ranks": ranks, "torch": torch.__version__, "gpu": common.machine(device)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = [tmp]
        dist.broadcast_object_list(tmp, src=0)  # one folder for every rank's checkpoint files
        for part in args.part.split(","):
            if part == "check":
                out["check"] = part_check(device, rank, tmp[0], args.steps, 64 if args.smoke else 512)
            elif part == "nano":
                out["nano"] = part_nano(device, ranks, tmp[0], args.steps, args.nano_batch,
                                         64 if args.smoke else args.nano_seq, meta_init=args.meta_init)
            else:
                raise SystemExit(f"unknown part {part!r}: check or nano")
            if rank == 0:
                print(json.dumps({part: out[part]}, indent=1), flush=True)
                if args.json:
                    common.write_json(args.json, out, indent=1)
    leave_distributed()


if __name__ == "__main__":
    main()
