"""Elastic training on 1 GPU vs N GPUs (torchrun, one process per GPU), same global batch.

Runs `star-elastic elastify` twice through torchrun (--nproc_per_node 1, then N) on the same
parent, data and settings, and reports the steady-state training throughput of each (median
tokens/s over the steps after the first fifth, all ranks together), the speed-up and the scaling
efficiency, and every budget's held-out perplexity after training (the runs see the same global
batches, so they should agree up to bf16 / reduction-order noise).

    python benchmarks/bench_multi_gpu.py --gpus 2 --json out.json            # SmolLM2 on wiki
    python benchmarks/bench_multi_gpu.py --smoke --json out.json             # CPU, 2 gloo ranks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, args, out: Path) -> dict:
    batch = args.batch_size * nproc if args.weak else args.batch_size
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "star_elastic", "elastify", args.model, "--budgets", args.budgets, "--data", args.data,
           "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--batch-size", str(batch),
           "--calib-batches", str(args.calib_batches), "--eval-tokens", str(args.eval_tokens), "--out", str(out),
           "--force"] + (["--device", "cpu"] if args.smoke else [])
    env = {**os.environ, "STAR_ELASTIC_QUIET": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{nproc} ranks failed:\n{p.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    tr, ev = manifest["training"], manifest["evaluation"]
    return {"ranks": nproc, "global_batch": batch, "command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1),
            "train_seconds": tr["seconds"], "tokens": tr["tokens"], "steps": tr["steps"],
            "tokens_per_s": tr["tokens_per_s"], "perplexity": ev["trained_perplexity"],
            "params": {b["name"]: b["params"] for b in manifest["budgets"]}}


def tiny_parent(out: Path) -> str:
    from star_elastic import save_pretrained
    from star_elastic.assets import smollm2_gguf
    from star_elastic.hf import load_tokenizer
    from star_elastic.model import Model, ModelConfig

    tokenizer = load_tokenizer(smollm2_gguf())
    cfg = ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=64, layer_types="**",
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                      mlp_gated=True, mlp_act="silu", rope_theta=10000.0, tie_word_embeddings=True)
    save_pretrained(Model(cfg), out, tokenizer=tokenizer)
    return str(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="ranks of the parallel run (the baseline has 1)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="wiki")
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--tokens", type=int, default=2_097_152)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (sequences per step, all ranks)")
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--weak", action="store_true",
                    help="weak scaling: --batch-size sequences per rank (the N-rank run's global batch is N times larger)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run with gloo ranks")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.seq_len, args.batch_size, args.calib_batches, args.eval_tokens = 4096, 64, 8, 2, 1024
    import torch

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # the plumbing only: a tiny random Llama with SmolLM2's tokenizer
            args.model = tiny_parent(Path(tmp) / "parent")
        one = run(1, args, Path(tmp) / "one")
        many = run(args.gpus, args, Path(tmp) / "many")
    speedup = many["tokens_per_s"] / one["tokens_per_s"]
    res = {"benchmark": "bench_multi_gpu", "scaling": "weak" if args.weak else "strong", "date": time.strftime("%Y-%m-%d"), "machine": machine,
           "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
           "runs": [one, many], "speedup": round(speedup, 3), "efficiency": round(speedup / args.gpus, 3)}
    batch = f"{args.batch_size} sequences per rank" if args.weak else f"global batch {args.batch_size}"
    print(f"\n{machine}: elastify {args.model}, {batch} x {args.seq_len}, {args.tokens:,} tokens")
    print(f"{'ranks':>5} {'tokens/s':>10} {'train s':>8} " + " ".join(f"{'ppl ' + b:>10}" for b in one["perplexity"]))
    for r in (one, many):
        print(f"{r['ranks']:>5} {r['tokens_per_s']:>10,} {r['train_seconds']:>8} "
              + " ".join(f"{v:>10.3f}" for v in r["perplexity"].values()))
    print(f"speed-up {speedup:.2f}x on {args.gpus} ranks (scaling efficiency {speedup / args.gpus:.0%})")
    if args.json:
        common.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
