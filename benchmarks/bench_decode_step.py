"""Mamba-2's one-token decode update (issue 12 item 3): the PyTorch recurrence (`model.recurrence_step`)
against `mamba_ssm`'s Triton `selective_state_update` (`kernels.triton_state_update`), side by side in
one run, at Nemotron 3 Nano's Mamba shapes (64 heads x 64 channels, state 128, 8 groups).

1. The update alone, per batch size: microseconds a call, and the share of the HBM bound (the fp32
   state is read and written once: 2 x b x 64 x 64 x 128 x 4 bytes; --hbm-gbs, default 4800 for an
   H200), with the two results compared (y and the new state, relative error).
2. Greedy decoding of a Nano-shaped model (layers --layers, random weights, bf16) with the kernel on
   and off (`STAR_ELASTIC_TRITON_STEP`, read at each call): the logits of the first decode steps
   compared, then decode tokens/s with CUDA graphs (the graphs captured afresh for each setting), and
   (--compile, on a GPU by default) with the step under torch.compile too: a one-token step of this
   model is about 180 small kernels per 4 layers (counted on the CPU), ~2,300 for Nano's 52, each a
   few microseconds on a GPU even when replayed from a graph; compiling fuses the elementwise ones.

    python benchmarks/bench_decode_step.py --json docs/results/decode_step_h200.json   # a GPU
    python benchmarks/bench_decode_step.py --smoke                                      # CPU: wiring only
On the CPU (or without mamba_ssm) the kernel rows say why they are missing; the recurrence still runs.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch

import common
from star_elastic import kernels
from star_elastic.generate import forget_decode_steps, generate
from star_elastic.model import Model, ModelConfig, recurrence_step


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--layers", default="M*EM", help="the decode model's layers (M Mamba, E MoE, * attention)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--hbm-gbs", type=float, default=common.HBM_GBS, help=f"peak memory bandwidth, GB/s (default: {common.HBM_GBS:g}, an H200's)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="also decode with the Triton update and generate(compile=True), which fuses the step's "
                         "small kernels (auto: on a GPU only)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few iterations (CPU)")
    ap.add_argument("--json")
    return ap.parse_args(argv)


def model_config(args) -> ModelConfig:
    if args.smoke:
        return ModelConfig(vocab_size=97, hidden_size=64, layer_types="M*EM", num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16,
                           n_groups=2, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=32, moe_shared_expert_intermediate_size=32)
    return common.nano_config(args.layers)


def step_inputs(b, h, p, n, g, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, h, p, generator=gen).to(device, torch.bfloat16)
    dt = torch.nn.functional.softplus(torch.randn(b, h, generator=gen)).to(device)
    A = (-torch.rand(h, generator=gen) - 0.1).to(device)
    B = torch.randn(b, g, n, generator=gen).to(device).repeat_interleave(h // g, dim=1)  # per head
    C = torch.randn(b, g, n, generator=gen).to(device).repeat_interleave(h // g, dim=1)
    state = torch.randn(b, h, p, n, generator=gen).to(device)
    return x, dt, A, B, C, state


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def bench_update(cfg: ModelConfig, args, device) -> list[dict]:
    h, p, n, g = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
    available = device.type == "cuda" and kernels._load_update()[0] is not None
    rows = []
    for b in [int(v) for v in args.batch_sizes.split(",")]:
        x, dt, A, B, C, state = step_inputs(b, h, p, n, g, device)
        s_ref, s_tri = state.clone(), state.clone()
        y_ref = recurrence_step(x, dt, A, B, C, s_ref)
        row = {"batch": b, "state_bytes": state.numel() * 4}
        t = common.timed(lambda: recurrence_step(x, dt, A, B, C, state), device, warmup=3, iters=args.iters)
        row["recurrence_us"] = t * 1e6
        if available:
            y_tri = kernels.triton_state_update(x, dt, A, B, C, s_tri)
            row.update(y_rel_err=rel(y_tri, y_ref), state_rel_err=rel(s_tri, s_ref))
            t = common.timed(lambda: kernels.triton_state_update(x, dt, A, B, C, state), device, warmup=3,
                             iters=args.iters)
            row["triton_us"] = t * 1e6
            row["speedup"] = row["recurrence_us"] / row["triton_us"]
        for key in ("recurrence_us", "triton_us"):  # the state read once and written once
            if key in row and device.type == "cuda":
                row[key.replace("_us", "_hbm_fraction")] = common.bandwidth_share(2 * row["state_bytes"], row[key] * 1e-6,
                                                                                   args.hbm_gbs)
        rows.append(row)
        print(f"  state update, batch {b:3d}: recurrence {row['recurrence_us']:8.1f} us"
              + (f", Triton {row['triton_us']:7.1f} us ({row['speedup']:.1f}x; y rel err {row['y_rel_err']:.1e}, "
                 f"state {row['state_rel_err']:.1e})" if "triton_us" in row else ", Triton: not available here")
              + (f"; HBM bound fraction {row.get('recurrence_hbm_fraction', 0):.1%} / "
                 f"{row.get('triton_hbm_fraction', 0):.1%}" if device.type == "cuda" else ""), flush=True)
    return rows


def bench_decode(cfg: ModelConfig, args, device) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = Model(cfg)
    model.to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    out, logits = {}, {}
    for name, on in (("recurrence", "0"), ("triton", "1")):
        os.environ[kernels.ENV_STEP] = on  # read at each call (the scan stays as it is for both)
        forget_decode_steps(model)
        with torch.no_grad():  # prefill, then three one-token steps on the cache (no graph): logits compared
            t = ids.shape[1]
            cache = model.make_cache(1, t + 4)
            steps = [model(ids, cache, torch.arange(t, device=device), last_only=True)[:, -1]]
            for i in range(3):
                nxt = steps[-1].argmax(-1, keepdim=True)
                steps.append(model(nxt, cache, torch.arange(t + i, t + i + 1, device=device), last_only=True)[:, -1])
        logits[name] = torch.stack(steps)
        gen = lambda: generate(model, ids, args.new_tokens, use_graph=device.type == "cuda")  # noqa: E731
        tokens = gen()
        t = common.timed(gen, device, warmup=1, iters=3)
        out[name] = {"tok_s": args.new_tokens / t, "tokens": tokens[0, ids.shape[1]:].tolist()}
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        os.environ[kernels.ENV_STEP] = "1"  # a Mamba layer's update stays outside the compiled graph
        forget_decode_steps(model)
        gen = lambda: generate(model, ids, args.new_tokens, use_graph=device.type == "cuda", compile=True)  # noqa: E731
        tokens = gen()
        t = common.timed(gen, device, warmup=1, iters=3)
        out["compiled"] = {"tok_s": args.new_tokens / t, "tokens": tokens[0, ids.shape[1]:].tolist()}
        out["compiled"]["greedy_equal"] = out["compiled"]["tokens"] == out["triton"]["tokens"]
        print(f"  decode, batch 1, kernels on and the step compiled: {out['compiled']['tok_s']:,.0f} tok/s "
              f"({out['compiled']['tok_s'] / out['recurrence']['tok_s']:.2f}x kernels off); greedy equal to "
              f"eager: {out['compiled']['greedy_equal']}", flush=True)
    os.environ.pop(kernels.ENV_STEP, None)
    forget_decode_steps(model)
    out["uses_triton_step"] = device.type == "cuda" and dtype in kernels._DTYPES and kernels._load_update()[0] is not None
    out["logits_rel_err"] = rel(logits["triton"], logits["recurrence"])
    out["greedy_equal"] = out["triton"]["tokens"] == out["recurrence"]["tokens"]
    out["speedup"] = out["triton"]["tok_s"] / out["recurrence"]["tok_s"]
    if device.type == "cuda":  # a token reads every active weight once: the HBM bound of batch-1 decode
        out["active_weight_bytes"] = common.active_params(cfg, model) * torch.finfo(dtype).bits // 8
        bound = args.hbm_gbs * 1e9 / out["active_weight_bytes"]
        for name in ("recurrence", "triton", "compiled"):
            if name in out:
                out[name]["hbm_bound_fraction"] = out[name]["tok_s"] / bound
        print(f"  HBM bound {bound:,.0f} tok/s ({out['active_weight_bytes'] / 1e9:.2f} GB of active weights a token): "
              + ", ".join(f"{n} {out[n]['hbm_bound_fraction']:.0%}" for n in ("recurrence", "triton", "compiled")
                          if n in out), flush=True)
    print(f"  decode, batch 1, {cfg.layer_types}: kernels off {out['recurrence']['tok_s']:,.0f} tok/s, kernels on "
          f"{out['triton']['tok_s']:,.0f} tok/s ({out['speedup']:.2f}x); first-step logits rel err "
          f"{out['logits_rel_err']:.1e}; greedy equal: {out['greedy_equal']}", flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.iters, args.new_tokens, args.prompt_len = "1,4", 3, 8, 8
    # a speed benchmark (the tenth session's H200 figures ran with deterministic kernels on)
    device = common.setup(args.device, deterministic=False)
    cfg = model_config(args)
    print(f"Mamba-2 decode update on {common.machine(device)}: heads {cfg.mamba_num_heads} x {cfg.mamba_head_dim}, "
          f"state {cfg.ssm_state_size}, groups {cfg.n_groups}"
          + ("" if device.type == "cuda" and kernels._load_update()[0] is not None else
             f"; Triton state update not used here ({kernels._load_update()[1] or 'not a GPU'})"), flush=True)
    result = {"benchmark": "bench_decode_step", "date": datetime.date.today().isoformat(),
              "machine": common.machine(device), "torch": torch.__version__, "smoke": args.smoke,
              "hbm_gbs": args.hbm_gbs}
    for part, run in (("update", bench_update), ("decode", bench_decode)):
        result[part] = run(cfg, args, device)
        if args.json:  # after each part: a run cut short keeps what it finished
            common.write_json(args.json, result)
    if args.json:
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
