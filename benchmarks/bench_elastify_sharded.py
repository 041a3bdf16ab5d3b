"""`elastify` end to end under torchrun on a parent that one GPU cannot train (issue 11, item 7).

Three steps, timed, in one command:
1. parent: a Nemotron-3-Nano-shaped NemotronH with random weights (bench_fsdp.NANO: hidden 2688,
   128 experts top-6, 64 Mamba heads x 64, state 128, vocabulary 131k, 16 layers, 10.1B parameters),
   built once on one GPU in bf16 and written as sharded Hugging Face safetensors with a tokenizer.
   Replicated, AdamW alone needs 16 bytes a parameter (151 GiB): more than one H200 holds.
2. `torchrun --nproc_per_node N -m star_elastic elastify PARENT ...`: the parent is loaded sharded
   from disk (never whole on one rank), importance is estimated on the shards, sorted as it is
   loaded again, searched, trained with FSDP2 and written tensor by tensor.
3. report: the manifest's `training.parallel` (per-rank peak memory, sharding), tokens/s, model
   FLOP utilisation (10 x active parameters per token: student forward and backward 6N, teacher 2N,
   the score term's argmax forward 2N; an upper bound, smaller budgets run fewer), the time of every
   step of the pipeline (from the log) and the checkpoint's size.

    python benchmarks/bench_elastify_sharded.py --tokenizer TOK --work /root/work --json sharded.json
    python benchmarks/bench_elastify_sharded.py --smoke --tokenizer TOK   # CPU, 2 gloo ranks, tiny

The random parent's perplexities mean nothing (it has learnt no language); this measures memory,
speed and that every step runs sharded at this size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

import common
from bench_fsdp import NANO
from common import BF16_PEAK, active_params
from star_elastic import save_pretrained
from star_elastic.hf import load_tokenizer
from star_elastic.model import Model, ModelConfig

SMOKE = ModelConfig(vocab_size=49152, hidden_size=64, layer_types="ME*E", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                    n_groups=2, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    moe_shared_expert_intermediate_size=64)


def kill_tree(pid: int) -> None:
    """The launcher and its workers (torchrun starts them in sessions of their own)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        for proc in parent.children(recursive=True) + [parent]:
            proc.kill()
    except psutil.NoSuchProcess:
        pass


def make_parent(cfg: ModelConfig, tokenizer, out: Path, device: str) -> dict:
    """The random parent written as sharded safetensors; its size, parameter counts and write time."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Model(cfg).to(torch.bfloat16)
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    active = active_params(cfg, model)
    t0 = time.perf_counter()
    save_pretrained(model, out, tokenizer=tokenizer)
    written = time.perf_counter() - t0
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"params": params, "active_params": active, "build_s": round(built, 1), "write_s": round(written, 1),
            "bytes": size, "files": len(list(out.glob("*.safetensors")))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer directory (its ids must fit the vocabulary)")
    ap.add_argument("--work", default="bench_elastify_sharded", help="where the parent and checkpoint go")
    ap.add_argument("--ranks", type=int, default=None, help="processes (default: one per GPU)")
    ap.add_argument("--layers", default=NANO.layer_types, help="the parent's layer pattern (Nano's mixers)")
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--data", default="wiki")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step, all ranks together")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--timeout", type=float, default=None, help="seconds the elastify run may take")
    ap.add_argument("--keep", action="store_true", help="keep the parent and the checkpoint")
    ap.add_argument("--elastify-args", default="", metavar="ARGS",
                    help="more flags for elastify, e.g. \"--keep-full\" (the recipe that keeps the full model)")
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="tiny parent, 2 gloo ranks on the CPU")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    cfg = replace(NANO, layer_types=args.layers) if not args.smoke else SMOKE
    ranks = args.ranks or (torch.cuda.device_count() if cuda else 2)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.eval_tokens = 2, 4, 32, 256
    work = Path(args.work)
    parent, out = work / "parent", work / "elastic"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    device = torch.device("cuda:0" if cuda else "cpu")
    result = {"benchmark": "bench_elastify_sharded", "machine": f"{ranks} x {common.machine(device)}",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "ranks": ranks,
              "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"no tokenizer in {args.tokenizer}")
    result["parent"] = make_parent(cfg, tokenizer, parent, "cuda:0" if cuda else "cpu")
    print(f"parent: {result['parent']['params'] / 1e9:.2f}B parameters ({result['parent']['active_params'] / 1e9:.2f}B "
          f"active), {result['parent']['bytes'] / 1e9:.1f} GB in {result['parent']['files']} files, written in "
          f"{result['parent']['write_s']} s", flush=True)

    tokens = args.steps * args.batch_size * args.seq_len
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "-m", "star_elastic",
           "elastify", str(parent), "--budgets", args.budgets, "--data", args.data, "--tokens", str(tokens),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--calib-batches",
           str(args.calib_batches), "--eval-tokens", str(args.eval_tokens), "--out", str(out)]
    if not cuda:
        cmd += ["--device", "cpu"]
    cmd += shlex.split(args.elastify_args)
    env = {**os.environ, "STAR_ELASTIC_QUIET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if not cuda else "4")}
    result["elastify_command"] = " ".join(cmd[1:])
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    killer = threading.Timer(args.timeout, kill_tree, (p.pid,)) if args.timeout else None
    if killer:
        killer.start()
    lines = []  # each line with the seconds since the launch: the stages' times, which the log does not give
    for line in p.stdout:
        line = line.replace("\r", "\n").splitlines()[-1].rstrip() if line.strip() else ""
        if line and "%|" not in line:  # progress bars left out
            lines.append(f"[{time.perf_counter() - t0:6.1f} s] {line}")
    p.wait()
    if killer:
        killer.cancel()
    if p.returncode == -signal.SIGKILL:
        lines.append(f"killed after --timeout {args.timeout} s")
    result["elastify_s"] = round(time.perf_counter() - t0, 1)
    result["log"] = lines[:40] + lines[40:][-80:]  # the start and the end (a failure's tracebacks)
    print("\n".join(result["log"][-40:]), flush=True)
    result["returncode"] = p.returncode
    if p.returncode == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        training = manifest["training"]
        result["training"] = {k: training.get(k) for k in ("tokens", "steps", "seconds", "tokens_per_s", "ranks",
                                                          "parallel", "stages_s")}
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        result["budgets"] = [{k: b.get(k) for k in ("name", "params", "fraction")} for b in manifest["budgets"]]
        rate = training.get("tokens_per_s") or 0
        flops = 10 * result["parent"]["active_params"] * rate
        result["mfu_upper_bound"] = flops / (BF16_PEAK * ranks) if cuda else None
        peaks = training["parallel"].get("peak_memory_gib")
        print(f"elastify: {result['elastify_s']} s wall, {ranks} ranks, {training['parallel'].get('sharding')}; "
              f"training {training['steps']} steps in {training['seconds']} s, {rate:,} tokens/s"
              + (f", MFU <= {result['mfu_upper_bound']:.1%}" if cuda else "")
              + (f"; peak per rank {peaks} GiB" if peaks else "")
              + f"; checkpoint {result['checkpoint_bytes'] / 1e9:.1f} GB", flush=True)
    if args.json:
        common.write_json(args.json, result)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
