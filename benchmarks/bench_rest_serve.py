"""Serving the full budget of a delta with a rounded rest (`--full-delta-bits`): three products a layer against
its own merged weight (the engine's way since the forty-third session), beside the parent with no delta.

A server's full budget runs each linear layer either as W x + B A x + R x (R, the rest rounded to a few bits a
weight, held dense: `FullDelta.apply`) or on W + B A + R merged once (`apply(merge_rest=True)`, `_MergedLinear`):
the same memory (a dense R is as large as W), one product in place of three. Measured side by side in one run:
decode and prefill tokens/s of the three models (greedy decode, `generate`), the bytes each holds beside the
parent, the share of the memory-bandwidth bound a decode token reaches (the weights a token reads over the card's
HBM bandwidth; on the CPU against the H200's, a scale only), and each form's logits against the full budget's in
float32 (relative RMS; beside it the parent's own rounding in the run's dtype). Random weights (speed does not
depend on what they are): the rest's codes and scales and the factors drawn at random.

    python benchmarks/bench_rest_serve.py --model smollm2 --json docs/results/rest_serve_cpu_smollm2.json
    python benchmarks/bench_rest_serve.py --device cuda --model nano --compile --json $OUT/rest_serve_nano.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from bench_serve import parent_config  # noqa: E402
from star_elastic.elastic.delta import FullDelta  # noqa: E402
from star_elastic.elastic.rounding import rest_group  # noqa: E402
from star_elastic.generate import generate  # noqa: E402
from star_elastic.model import Model  # noqa: E402


def random_delta(model: Model, rank: int, bits: int, seed: int = 0) -> FullDelta:
    """A rank-r delta with a rest rounded to `bits`, every part drawn at random at about 1% of each weight's
    scale (what a trained one adds is of that order, docs/RESULTS.md §9)."""
    g = torch.Generator().manual_seed(seed)
    delta = FullDelta(model, rank, seed=seed, bits=bits)
    with torch.no_grad():
        for key, up in delta.up.items():
            up.copy_(torch.randn(up.shape, generator=g).mul_(1e-2 / rank ** 0.5).to(up))
        for name in delta.names:
            w = delta.weight_of(model, name)
            out_f, in_f = w.shape
            codes = torch.randint(0, 2 ** bits, (out_f, in_f), generator=g, dtype=torch.uint8)
            scales = torch.full((out_f, in_f // rest_group(in_f)), 1e-2 * float(w.float().pow(2).mean().sqrt()))
            delta.set_rounded(name, codes.to(w.device), scales.to(w.device))
    return delta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "nano", "tiny"], default="smollm2",
                    help="the parent's shapes, random weights (nano: Nemotron 3 Nano's widths, layers M*EM)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--bits", type=int, default=1, choices=[1, 2, 4, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="generate's compiled decode (CUDA graphs on a GPU)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    parent = common.scaled_normal_(Model(parent_config(args.model))).to(device).eval().requires_grad_(False)
    cfg = parent.config
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    # the reference: the full budget in float32 (the delta made there, then cast with the models): in bf16 each
    # form rounds differently, W + B A + R rounded once against three products' outputs rounded each
    reference = copy.deepcopy(parent)
    delta = random_delta(reference, args.rank, args.bits).requires_grad_(False)
    with torch.no_grad(), delta.applied(reference):
        want = {"full": reference(prompt).float(), "parent": parent(prompt).float()}
    del reference
    parent, delta = parent.to(dtype), delta.to(dtype)
    models = {"parent": parent, "three products": copy.deepcopy(parent), "merged": copy.deepcopy(parent)}
    delta.apply(models["three products"])
    delta.apply(models["merged"], merge_rest=True)
    def held(model, attr):  # bytes of the tensors the delta's layers hold as `attr`
        return sum(t.numel() * t.element_size() for m in model.modules() if (t := getattr(m, attr, None)) is not None)
    extra = {"parent": 0, "three products": held(models["three products"], "delta_rest"),
             "merged": held(models["merged"], "own_weight")}
    factors = sum(p.numel() * p.element_size() for p in delta.parameters())
    print(f"{args.model} shapes, {parent.num_parameters() / 1e6:.1f}M parameters, rank {args.rank}, rest at "
          f"{args.bits} bit(s); {common.machine(device)}, {dtype}", flush=True)

    with torch.no_grad():
        logits = {k: m(prompt).float() for k, m in models.items()}

    def off(a, b):  # relative RMS distance of logits a from b
        return float((a - b).norm() / b.norm())
    apart = off(logits["merged"], logits["three products"])
    moved = off(want["parent"], want["full"])  # what the delta does, in float32
    # each form against the float32 full budget (the parent in the run's dtype against the float32 parent beside:
    # the dtype's own rounding)
    errors = {"three products": off(logits["three products"], want["full"]),
              "merged": off(logits["merged"], want["full"]), "parent": off(logits["parent"], want["parent"])}

    def gen(m):
        return lambda: generate(m, prompt, args.new_tokens, compile=args.compile)

    def prefill(m):
        def run():
            with torch.no_grad():
                m(prompt, last_only=True)
        return run

    times = {"decode": {k: [] for k in models}, "prefill": {k: [] for k in models}}
    greedy = {}
    for k, m in models.items():  # one warm-up each (compiles, graphs), its tokens compared below
        greedy[k] = gen(m)()
        prefill(m)()
    for _ in range(args.reps):  # interleaved: parent, three, merged, parent, ...
        for k, m in models.items():
            times["decode"][k].append(common.timed(gen(m), device))
            times["prefill"][k].append(common.timed(prefill(m), device))
    med = {part: {k: statistics.median(v) for k, v in per.items()} for part, per in times.items()}
    base_bytes = common.step_weight_bytes(cfg, parent)
    hbm = common.hbm_gbs(device) * 1e9
    rows = {}
    for k in models:
        tok_s = args.new_tokens / med["decode"][k]
        read = base_bytes + (extra[k] + factors if k == "three products" else 0)  # what a decode token reads
        rows[k] = {"decode_tok_s": tok_s, "prefill_tok_s": args.prompt_len / med["prefill"][k],
                   "bytes_beside_parent": extra[k] + (factors if k != "parent" else 0),
                   "weight_bytes_a_token": read, "bandwidth_bound_share": tok_s * read / hbm,
                   "decode_vs_parent": med["decode"]["parent"] / med["decode"][k],
                   "prefill_vs_parent": med["prefill"]["parent"] / med["prefill"][k]}
        print(f"  {k:>14}: decode {tok_s:8.1f} tok/s ({rows[k]['decode_vs_parent']:.3f}x the parent), prefill "
              f"{rows[k]['prefill_tok_s']:9.1f} tok/s ({rows[k]['prefill_vs_parent']:.3f}x); "
              f"{rows[k]['bytes_beside_parent'] / 2**20:7.1f} MiB beside the parent; "
              f"{100 * rows[k]['bandwidth_bound_share']:.1f}% of the bandwidth bound", flush=True)
    merged_vs_three = med["decode"]["three products"] / med["decode"]["merged"]
    print(f"merged / three products: decode {merged_vs_three:.3f}x, prefill "
          f"{med['prefill']['three products'] / med['prefill']['merged']:.3f}x; greedy tokens equal: "
          f"{torch.equal(greedy['merged'], greedy['three products'])}\n"
          f"logits (relative RMS): against the float32 full budget, three products {errors['three products']:.1e}, "
          f"merged {errors['merged']:.1e} (the parent in {dtype} against its float32: {errors['parent']:.1e}); "
          f"the two forms {apart:.1e} apart; the delta moved them {moved:.1e}", flush=True)
    if args.json:
        common.write_json(args.json, {
            "command": " ".join(sys.argv), "machine": common.machine(device), "dtype": str(dtype),
            "model": args.model, "params": parent.num_parameters(), "rank": args.rank, "bits": args.bits,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps, "compile": args.compile,
            "rows": rows, "merged_vs_three_decode": merged_vs_three,
            "merged_vs_three_prefill": med["prefill"]["three products"] / med["prefill"]["merged"],
            "logits_apart": apart, "logits_moved_by_delta": moved, "logits_error_vs_float32": errors,
            "greedy_equal": torch.equal(greedy["merged"], greedy["three products"]),
            "times_s": times})


if __name__ == "__main__":
    main()
