"""Speed of masked training and of CUDA-graph decode through the serving path (issue 10 item 1).

Two measurements on one ~0.5B hybrid parent (hidden 1024, layers `MEMEM*EMEMEM*EMEMEM*EME`, 32 experts
top-4, 32 Mamba heads x 64, state 128, 8 groups, vocab 32000), random weights (speed does not depend
on what they say):
  1. a training step (forward + backward + AdamW) on batch 4 x 2048 under a hard 0.5-budget mask
     (`masked(model, spec.masks(...))` around the forward and backward, as train.py runs it) and
     unmasked: fp32 weights, bf16 autocast on a GPU, steps interleaved, median of several;
  2. greedy decode at batch 1 through the serving path: an elastic checkpoint with budgets 1.0 and
     0.5 loaded by `ElasticEngine` (serving head order where the budgets allow it, budget views),
     `generate` on each budget's view (a CUDA graph per decode step on a GPU). Decode tokens/s is the
     marginal rate, from two lengths of generation; end-to-end tokens/s includes the prefill.

It uses only what both the package before the move of masks out of model.py and the one after have
(`elastic.spec.masked`, `ElasticSpec`, `choose_spec`, the serve engine), so the same script times
both, e.g. the old tree copied to .devcarry/base:

    python benchmarks/bench_masks.py --out docs/results/masks_h200_after.json
    PYTHONPATH=.devcarry/base python benchmarks/bench_masks.py --out docs/results/masks_h200_before.json
    python benchmarks/bench_masks.py --tiny       # a small model on the CPU: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

# after PYTHONPATH, so that PYTHONPATH=<old tree> times the old package
sys.path.append(str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import star_elastic  # noqa: E402
from star_elastic.elastic.checkpoint import load_elastic, save_elastic  # noqa: E402
from star_elastic.elastic.cost import parse_budget  # noqa: E402
from star_elastic.elastic.router import Router  # noqa: E402
from star_elastic.elastic.search import DEFAULT_AXES, applicable_axes, choose_spec  # noqa: E402
from star_elastic.elastic.spec import ElasticSpec, masked  # noqa: E402
from star_elastic.generate import generate  # noqa: E402
from star_elastic.model import Model, ModelConfig  # noqa: E402
from star_elastic.serve.engine import ElasticEngine  # noqa: E402

HYBRID = dict(vocab_size=32000, hidden_size=1024, layer_types="MEMEM*EMEMEM*EMEMEM*EME", num_attention_heads=16,
              num_key_value_heads=4, head_dim=64, mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128,
              n_groups=8, chunk_size=128, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
              moe_shared_expert_intermediate_size=1024, max_position_embeddings=4096)
TINY = dict(vocab_size=256, hidden_size=64, layer_types="MEM*EME", num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2, chunk_size=16,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
            max_position_embeddings=512)


def api() -> str:
    """Which masking the package under test has: module swaps from outside, or Model.set_masks."""
    try:
        import star_elastic.elastic.masking  # noqa: F401
        return "elastic.masking (outside the model)"
    except ImportError:
        return "Model.set_masks (inside the model)"


def parent(cfg: ModelConfig, device) -> Model:
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(cfg)
    return common.scaled_normal_(model)


def half_spec(cfg: ModelConfig) -> ElasticSpec:
    """The zero-shot search's homogeneous architecture at half the parameters."""
    total = ElasticSpec().num_parameters(cfg)
    return choose_spec(cfg, total // 2, [a for a in DEFAULT_AXES if a in applicable_axes(cfg)])


def interleaved(runs: dict, reps: int, device) -> dict:
    """Seconds of each run, `reps` times, the runs interleaved (a, b, a, b, ...) so that drift hits all alike."""
    times = {k: [] for k in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            t0 = common.clock(device)
            fn()
            times[name].append(common.clock(device) - t0)
    return times


def train_steps(model: Model, spec: ElasticSpec, batch: int, seq: int, reps: int, warmup: int, device) -> dict:
    """Median seconds of a training step under the spec's hard masks and unmasked, interleaved."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    masks = spec.masks(model.config, device=device)

    def step(mask: dict):
        with masked(model, mask):
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    runs = {"masked": lambda: step(masks), "unmasked": lambda: step({})}
    peak = {}
    for name, fn in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(device)
    times = interleaved(runs, reps, device)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"seconds": med, "tokens_per_s": batch * seq / med, "all_seconds": ts,
                     "peak_bytes": peak.get(name)}
    out["masked_over_unmasked"] = out["masked"]["seconds"] / out["unmasked"]["seconds"]
    return out


def build_checkpoint(model: Model, spec: ElasticSpec, out: Path) -> Path:
    cfg = model.config
    budgets = [parse_budget("1.0", cfg), parse_budget("0.5", cfg)]
    router = Router(cfg, budgets)
    specs = [ElasticSpec(), spec]
    router.spec = lambda i: specs[i]  # the search's architecture stands in for a trained router's argmax
    return save_elastic(model.cpu(), router, budgets, out, tokenizer=None)


def decode(ckpt_dir: Path, dtype, device, prompt_len: int, short: int, long: int, reps: int) -> dict:
    """Greedy decode through the engine's budget views: end-to-end and marginal tokens/s per budget."""
    engine = ElasticEngine(load_elastic(ckpt_dir, dtype=dtype, device=device))
    engine.parent.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, engine.parent.config.vocab_size, (1, prompt_len), generator=g).to(device)
    rows = {}
    for budget in ("1.0", "0.5"):
        view = engine.view(budget)
        runs = {n: (lambda n=n: generate(view, prompt, n)) for n in (short, long)}
        for fn in runs.values():  # capture the decode graph (per length bucket) and warm up
            fn()
        times = interleaved(runs, reps, device)
        t_short, t_long = statistics.median(times[short]), statistics.median(times[long])
        rows[budget] = {"params": view.num_parameters(), "seconds_long": t_long, "seconds_short": t_short,
                        "tokens_per_s": long / t_long, "decode_tokens_per_s": (long - short) / (t_long - t_short),
                        "all_seconds": times}
    return {"serving_order": bool(engine.serving_order), "prompt_len": prompt_len, "short": short, "long": long,
            "budgets": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", help="default: cuda when there is one")
    ap.add_argument("--tiny", action="store_true", help="a small model and few tokens: a CPU smoke test")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens of the longer generation (the shorter: a quarter)")
    ap.add_argument("--skip", choices=["train", "decode"], help="leave one measurement out")
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args()
    if args.tiny:
        args.batch, args.seq, args.reps, args.warmup, args.prompt_len, args.tokens = 2, 64, 3, 1, 8, 16
        args.device = args.device or "cpu"
    device = common.setup(args.device, deterministic=False)  # timed as train.py and the server run
    cfg = ModelConfig(**(TINY if args.tiny else HYBRID))
    model = parent(cfg, device)
    spec = half_spec(cfg)
    n_full, n_half = model.num_parameters(), spec.num_parameters(cfg)
    print(f"star_elastic from {Path(star_elastic.__file__).parent} ({api()}); {common.machine(device)}")
    print(f"parent {n_full / 1e6:.1f}M parameters, layers {cfg.layer_types}; budget 0.5: {n_half / 1e6:.1f}M "
          f"({n_half / n_full:.3f}), spec {spec.to_dict()}", flush=True)
    result = {"machine": common.machine(device), "torch": torch.__version__, "package": str(Path(star_elastic.__file__).parent),
              "masking_api": api(), "command": " ".join(sys.argv), "config": cfg.to_dict(), "params": n_full,
              "half_spec": spec.to_dict(), "half_params": n_half}
    if args.skip != "train":
        tr = train_steps(model, spec, args.batch, args.seq, args.reps, args.warmup, device)
        result["train"] = {"batch": args.batch, "seq": args.seq, "reps": args.reps, "warmup": args.warmup,
                           "dtype": "fp32 weights, bf16 autocast" if device.type == "cuda" else "fp32", **tr}
    if args.skip != "decode":
        with tempfile.TemporaryDirectory(prefix="bench_masks_") as work:
            ckpt = build_checkpoint(model, spec, Path(work) / "ckpt")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            result["decode"] = {"dtype": str(dtype), "graphs": device.type == "cuda",
                                **decode(ckpt, dtype, device, args.prompt_len, args.tokens // 4, args.tokens, args.reps)}

    print(f"\n{'measurement':<44} {'seconds':>9} {'tokens/s':>10}")
    if "train" in result:
        t = result["train"]
        for name in ("unmasked", "masked"):
            label = f"train step {args.batch}x{args.seq}, {name}" + (" (budget 0.5)" if name == "masked" else "")
            print(f"{label:<44} {t[name]['seconds']:>9.4f} {t[name]['tokens_per_s']:>10.0f}")
        print(f"{'  masked / unmasked':<44} {t['masked_over_unmasked']:>9.3f}x")
    if "decode" in result:
        d = result["decode"]
        for b, r in d["budgets"].items():
            label = f"decode, budget {b} ({r['params'] / 1e6:.0f}M), {d['long']} new"
            print(f"{label:<44} {r['seconds_long']:>9.4f} {r['tokens_per_s']:>10.1f}   decode only {r['decode_tokens_per_s']:.1f} tok/s")
        print(f"serving head order: {'on' if d['serving_order'] else 'off'}; CUDA graphs: {'on' if d['graphs'] else 'off'}")
    if args.out:
        common.write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
