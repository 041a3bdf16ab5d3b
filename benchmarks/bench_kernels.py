"""Issue 16's fast paths, measured side by side in one run: the Mamba-2 scan (ours against
`mamba_ssm`'s Triton kernel), the chunked distillation loss, and the whole elastic training step.
Parts, in the order they run (`--parts`):

1. scan: Nemotron 3 Nano's Mamba shapes (64 heads x 64, 8 groups, state 128, chunk 128), batch 4 x
   4096 and 1 x 16384, inputs as autocast gives them (x, B, C bf16; dt, A fp32): our einsum scan
   eager and under torch.compile, and the Triton kernel; forward, forward + backward, peak memory
   above the inputs, relative error of y, final state and gradients against float64 (fresh random
   inputs at the scales training sees, not zeros).
2. kd: the distillation loss at a 131,072-token vocabulary over 8,192 tokens (hidden 2688), from
   the LM head's input on (head matmuls included), forward + backward under bf16 autocast: whole
   fp32 logits as train.py computed them before issue 16 (unchunked), the same logits with kd_loss's chunks,
   and the fused head (`HeadInput`: student, then student and teacher); time and peak memory.
3. train: whole elastic training steps (star_elastic.train.ElasticTrainer, bf16 autocast, AdamW,
   budgets 1.0 / 0.75 / 0.5 with the router) of a Nano-width parent: hidden 2688, 128 experts top-6
   (moe_intermediate 1856, shared 3712), 64 Mamba heads x 64, state 128, 32 attention heads / 2 KV
   heads x 128, vocabulary 131072, layers `MEM*EM` (the 3.44B parent of issue 16's 27,151 tokens/s;
   `--pattern MEMEM*EME` is 6.07B, about 121 GB of weights, gradients, AdamW and teacher). With the
   einsum scan (STAR_ELASTIC_NO_TRITON=1), with the Triton scan, and with the Triton scan and the
   fused KD (train.py's default since issue 16: the trainer hands kd_loss `HeadInput`s; the other
   variants put back whole-batch logits, `model(x)`, as train.py did before), and, with `--compile`
   (on by default on a GPU), the last of these with each layer under torch.compile (inductor,
   TrainConfig.compile; its first steps compile and are not timed). Tokens/s and
   model FLOP utilisation: 6 x active parameters per student token + 2 x for the teacher's forward,
   over the H200's 790 TFLOP/s bf16 peak (an argmax forward of the score estimator on smaller
   budgets comes on top, uncounted).
4. check: the Triton and einsum scans against float64 (outputs, final states, gradients; sequences
   not a multiple of the chunk and shorter than one, initial states), at Nano's head / state /
   chunk sizes, whose autotuning the parts above paid for (`--check-odd` adds a budget view's
   shapes: fewer heads per group, head sizes 48 and 32, each a fresh autotune of ~130 Triton
   configurations); then a small hybrid model with Nano's Mamba shapes, bf16 autocast with the
   Triton scan on and off, against the same model in fp32: logits and every gradient, under soft
   masks (their gradients too), and a prefill continued from its cache.
5. profile (only when asked: `--parts train,profile`): where the step's time goes. torch.profiler
   over two steps (budgets 1.0 and 0.5, after two warm-up steps) of the trainer as elastify runs it,
   self time per GPU kernel (per operator on a CPU), grouped into categories (GEMM, grouped GEMM of
   the experts, the Triton scan, attention, the distillation loss's softmax, routing's sorts and
   scatters, copies and casts, elementwise, the optimizer); the top 25 kernels. `--profile-model
   smollm2`: SmolLM2-135M's shapes at bench_elastic's 16 x 512 instead, the run behind issue 17's
   evidence, whose step uses a few percent of an H200.

    PYTHONPATH=.devcarry/mamba:$PWD python benchmarks/bench_kernels.py --json $OUT/kernels.json
    python benchmarks/bench_kernels.py --tiny        # a CPU smoke run (Triton rows: an einsum stand-in)

The Triton kernel comes from `mamba_ssm` on the path: `pip install mamba-ssm`, or, with no CUDA
build, its source distribution (`MAMBA_SKIP_CUDA_BUILD=TRUE pip download --no-deps
--no-build-isolation --no-binary=:all: mamba-ssm==2.3.2.post1`) unpacked, its `mamba_ssm/` folder
with `__init__.py` cut to the version line (the original imports compiled CUDA modules), e.g. in
the git-ignored `.devcarry/mamba/`. Needs triton and einops. Deterministic algorithms stay off
here (mamba_ssm would pick slower deterministic kernel configurations; training does not ask for
them either).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import math
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BF16_PEAK, active_params, nano_config, smollm2_config  # noqa: E402
from star_elastic import kernels, parallel  # noqa: E402
from star_elastic.elastic.cost import parse_budget  # noqa: E402
from star_elastic.elastic.losses import HeadInput, kd_loss  # noqa: E402
from star_elastic.elastic.router import Router, RouterConfig  # noqa: E402
from star_elastic.elastic.spec import ElasticSpec, masked  # noqa: E402
from star_elastic.model import Model, ModelConfig, ssd_scan  # noqa: E402
from star_elastic.train import ElasticTrainer, TrainConfig  # noqa: E402

def tiny_config(pattern: str = "MEM*EM") -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=64, layer_types=pattern, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=32,
                       n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32)


# ----------------------------------------------------------------------------- helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds of one call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = common.clock(device)
        fn()
        times.append(common.clock(device) - t0)
    return sorted(times)[len(times) // 2]


def extra_gib(fn, device) -> float | None:
    """Peak memory a call allocates above what was resident before it, GiB; None on the CPU."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def triton_switch(on: bool):
    """The Triton scan on or off for the block (kernels.py reads the environment at every call)."""
    return common.environment({kernels.ENV_ENABLE: "1" if on else "0", kernels.ENV_DISABLE: "0" if on else "1"})


def scan_inputs(b, t, h, p, g, n, device, dtype=torch.bfloat16, seed=0):
    """Random scan inputs at the scales training sees: x, B, C ~ N(0, 1) in `dtype`; dt = softplus(
    N(0, 0.5) + dt_bias) with per-head dt_bias giving dt around 1e-3..1e-1 (Mamba's init range);
    A = -U(1, 16) (A_log's init range), fp32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, t, h, p, device=device, generator=gen).to(dtype)
    dt0 = torch.exp(torch.rand(h, device=device, generator=gen) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))  # inverse softplus
    dt = F.softplus(torch.randn(b, t, h, device=device, generator=gen) * 0.5 + dt_bias)
    A = -(1 + 15 * torch.rand(h, device=device, generator=gen))
    B = torch.randn(b, t, g, n, device=device, generator=gen).to(dtype)
    C = torch.randn(b, t, g, n, device=device, generator=gen).to(dtype)
    return x, dt, A, B, C


def scan_grads(fn, inputs, gy, initial=None):
    """y, final state and the gradients of <y, gy> for x, dt, A, B, C."""
    leaves = [v.detach().clone().requires_grad_() for v in inputs]
    y, final = fn(*leaves, initial)
    y.backward(gy.to(y.dtype))
    return y.detach(), final.detach(), [v.grad for v in leaves]


# ----------------------------------------------------------------------------- 1. check

def part_check(device, odd: bool, tiny: bool) -> dict:
    """The Triton scan and the einsum scan against float64, then a small model with it on and off.
    Shapes use Nano's heads, head size, state and chunk, so that mamba_ssm's autotuning (~130 Triton
    configurations, compiled on first use of each shape key) is shared with the scan and train parts;
    `odd` adds a budget view's shapes (fewer heads per group, head size 48 or 32), each a new key."""
    H, P, G, N, L = (8, 16, 2, 16, 32) if tiny else (64, 64, 8, 128, 128)
    shapes = [(2, 300, H, P, G, N, L, False), (2, 300, H, P, G, N, L, True), (3, 5, H, P, G, N, L, True),
              (1, 1000, H, P, G, N, L, False)]
    if odd:
        shapes += [(1, 200, 32, 48, 8, 128, 128, True), (2, 100, 6, 32, 3, 64, 64, False)]
    out = {"shapes": []}
    for b, t, h, p, g, n, L, with_state in shapes:
        inputs = scan_inputs(b, t, h, p, g, n, device, torch.bfloat16, seed=t + h)
        gen = torch.Generator(device=device).manual_seed(1)
        gy = torch.randn(b, t, h, p, device=device, generator=gen)
        h0 = torch.randn(b, h, p, n, device=device, generator=gen) if with_state else None
        ref = scan_grads(lambda *a: ssd_scan(*a[:5], L, a[5]), [v.double() for v in inputs], gy.double(),
                         None if h0 is None else h0.double())
        row = {"b": b, "t": t, "heads": h, "head_dim": p, "groups": g, "state": n, "chunk": L,
               "initial_state": with_state}
        for name, fn in (("einsum", lambda *a: ssd_scan(*a[:5], L, a[5])),
                         ("triton", lambda *a: kernels.triton_scan(*a[:5], L, a[5]))):
            got = scan_grads(fn, inputs, gy, h0)
            row[name] = {"y": rel(got[0], ref[0]), "final_state": rel(got[1], ref[1]),
                         **{f"d{k}": rel(a, r) for k, a, r in zip(("x", "dt", "A", "B", "C"), got[2], ref[2])}}
        out["shapes"].append(row)
        print("  scan {b}x{t} h{heads} p{head_dim} g{groups} n{state} L{chunk}{s}: ".format(
            **row, s=" +h0" if with_state else "") + "; ".join(
            f"{k} {row['triton'][k]:.1e} (einsum {row['einsum'][k]:.1e})" for k in row["triton"]))
    out["worst_triton"] = {k: max(r["triton"][k] for r in out["shapes"]) for k in out["shapes"][0]["triton"]}
    out["worst_einsum"] = {k: max(r["einsum"][k] for r in out["shapes"]) for k in out["shapes"][0]["einsum"]}

    # a small hybrid model with Nano's Mamba shapes: fp32 without autocast (the einsum scan: the
    # reference), then bf16 autocast with the Triton scan on and off: logits and gradients against the
    # reference, plain, under soft masks (gradients into the masks too), and a prefill continued from
    # its cache; the Triton run's errors should be the einsum run's (bf16's), not larger
    cfg = ModelConfig(vocab_size=2048, hidden_size=512, layer_types="M*ME", num_attention_heads=4, num_key_value_heads=2,
                      head_dim=128, mamba_num_heads=H, mamba_head_dim=P, ssm_state_size=N, n_groups=G, chunk_size=L,
                      n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                      moe_shared_expert_intermediate_size=128)
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 300), device=device)
    soft_masks = {k: 0.5 + 0.5 * v for k, v in ElasticSpec(mamba_num_heads=H // 2, mamba_head_dim=3 * P // 4,
                                                          hidden_size=384)
                  .masks(cfg, device=device).items()}

    def run(autocast: bool, on: bool):
        with triton_switch(on), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            model.zero_grad()
            logits = model(x)
            logits.float().square().mean().backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            soft = {k: v.clone().requires_grad_() for k, v in soft_masks.items()}
            with masked(model, soft):
                model.zero_grad()
                part = model(x)
                part.float().square().mean().backward()
            mask_grads = torch.cat([soft[k].grad.flatten() for k in sorted(soft)])
            cache = model.make_cache(2, 512)
            with torch.no_grad():
                model(x[:, :170], cache=cache, pos=torch.arange(170, device=device))
                again = model(x[:, 170:], cache=cache, pos=torch.arange(170, 300, device=device))
        return {"logits": logits.detach().float(), "grads": grads, "masked_logits": part.detach().float(),
                "mask_grads": mask_grads, "cached_prefill_logits": again.float()}

    ref = run(False, False)
    out["model"] = {}
    for name, on in (("triton_bf16", True), ("einsum_bf16", False)):
        got = run(True, on)
        errs = sorted(rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"])
        out["model"][name] = {"logits": rel(got["logits"], ref["logits"]),
                              "grads_median": errs[len(errs) // 2], "grads_worst": errs[-1],
                              **{k: rel(got[k], ref[k]) for k in ("masked_logits", "mask_grads", "cached_prefill_logits")}}
        print(f"  model, {name} against fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in out["model"][name].items()))
    return out


# ----------------------------------------------------------------------------- 2. scan

def part_scan(device, tiny: bool, compile_: bool, iters: int, have_triton: bool) -> dict:
    h, p, g, n, L = (8, 16, 2, 16, 64) if tiny else (64, 64, 8, 128, 128)
    shapes = [(2, 256), (1, 512)] if tiny else [(4, 4096), (1, 16384)]
    variants = {"einsum": lambda *a: ssd_scan(*a[:5], L, a[5] if len(a) > 5 else None)}
    if compile_:
        compiled = torch.compile(ssd_scan, dynamic=False)
        variants["einsum_compiled"] = lambda *a: compiled(*a[:5], L, a[5] if len(a) > 5 else None)
    if have_triton:
        variants["triton"] = lambda *a: kernels.triton_scan(*a[:5], L, a[5] if len(a) > 5 else None)
    out = {"heads": h, "head_dim": p, "groups": g, "state": n, "chunk": L, "variants": list(variants)}
    for b, t in shapes:
        key = f"{b}x{t}"
        res = out[key] = {}
        inputs = scan_inputs(b, t, h, p, g, n, device, torch.bfloat16, seed=b * t)
        gy = torch.randn(b, t, h, p, device=device, generator=torch.Generator(device=device).manual_seed(2))
        ref = scan_grads(lambda *a: ssd_scan(*a[:5], L, None), [v.double() for v in inputs], gy.double())
        for name, fn in variants.items():
            r = res[name] = {}
            try:
                with torch.no_grad():
                    r["forward_ms"] = 1e3 * timed(lambda: fn(*inputs), device, 3, iters)
                leaves = [v.detach().clone().requires_grad_() for v in inputs]

                def fwd_bwd():
                    for v in leaves:
                        v.grad = None
                    y, _ = fn(*leaves)
                    y.backward(gy.to(y.dtype))

                r["forward_backward_ms"] = 1e3 * timed(fwd_bwd, device, 3, iters)
                for v in leaves:
                    v.grad = None
                r["peak_extra_gib"] = extra_gib(fwd_bwd, device)  # above the inputs (and the fp64 reference) held
                y, final, grads = scan_grads(fn, inputs, gy)
                r["rel_err_y_vs_fp64"] = rel(y, ref[0])
                r["rel_err_state_vs_fp64"] = rel(final, ref[1])
                r["rel_err_grads_vs_fp64"] = {k: rel(a, b) for k, a, b in zip(("x", "dt", "A", "B", "C"), grads, ref[2])}
            except Exception as e:  # one variant failing (e.g. out of memory) leaves the others' numbers
                r["error"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
            free(device)
        if "triton" in res and "forward_ms" in res["triton"]:
            y_ein = scan_grads(variants["einsum"], inputs, gy)[0]
            y_tri = scan_grads(variants["triton"], inputs, gy)[0]
            res["rel_err_triton_vs_einsum_fp32"] = rel(y_tri, y_ein)
        del ref
        free(device)
    return out


def print_scan(out: dict):
    names = out["variants"]
    print(f"\n  scan, {out['heads']} heads x {out['head_dim']}, {out['groups']} groups, state {out['state']}, "
          f"chunk {out['chunk']} (x, B, C bf16)")
    print("  " + f"{'shape':10s} {'':20s}" + "".join(f"{n:>17s}" for n in names)
          + ("   einsum/triton  compiled/triton" if "triton" in names else ""))
    for key, res in out.items():
        if not isinstance(res, dict) or "einsum" not in res:
            continue
        for metric, unit in (("forward_ms", "ms"), ("forward_backward_ms", "ms"), ("peak_extra_gib", "GiB"),
                             ("rel_err_y_vs_fp64", ""), ("rel_err_grads_vs_fp64", "")):
            vals = []
            for n in names:
                v = res[n].get(metric)
                if isinstance(v, dict):
                    v = max(v.values())
                vals.append(v)
            cells = "".join(f"{'-':>17s}" if v is None else f"{v:17.2e}" if metric.startswith("rel") else
                            f"{v:13.2f} {unit:3s}" for v in vals)
            ratio = ""
            if "triton" in names and metric.endswith("_ms") and res["triton"].get(metric):
                r = [res.get(n, {}).get(metric) for n in ("einsum", "einsum_compiled")]
                ratio = "   " + "  ".join(f"{x / res['triton'][metric]:13.2f}x" if x else f"{'-':>14s}" for x in r)
            label = metric.replace("rel_err_grads_vs_fp64", "grad rel err (worst)").replace("rel_err_y_vs_fp64",
                                                                                           "y rel err vs fp64")
            print(f"  {key:10s} {label:20s}{cells}{ratio}")


# ----------------------------------------------------------------------------- 3. kd

def part_kd(device, tiny: bool, iters: int) -> dict:
    n, d, vocab = (512, 64, 4096) if tiny else (8192, 2688, 131072)
    ac = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    cd = torch.bfloat16 if device.type == "cuda" else None
    gen = torch.Generator(device=device).manual_seed(3)
    h = torch.randn(n, d, device=device, generator=gen).requires_grad_()
    W = (0.02 * torch.randn(vocab, d, device=device, generator=gen)).requires_grad_()
    tdt = torch.bfloat16 if device.type == "cuda" else torch.float32  # the teacher as elastify keeps it
    ht = (h.detach() + 0.3 * torch.randn(n, d, device=device, generator=gen)).to(tdt)
    Wt = (W.detach() + 0.005 * torch.randn(vocab, d, device=device, generator=gen)).to(tdt)

    def teacher_logits():
        with torch.no_grad(), torch.autocast(**ac):
            return F.linear(ht, Wt).float()  # fp32, as Model.forward returns them

    def student_logits():
        with torch.autocast(**ac):
            return F.linear(h, W).float()

    variants = {
        "unchunked": lambda: kd_loss(student_logits(), teacher_logits(), chunk_tokens=n),
        "chunked_logits": lambda: kd_loss(student_logits(), teacher_logits()),
        "fused_student": lambda: kd_loss(HeadInput(h, W, cd), teacher_logits()),
        "fused_both": lambda: kd_loss(HeadInput(h, W, cd), HeadInput(ht, Wt, cd)),
    }
    out = {"tokens": n, "hidden": d, "vocab": vocab, "chunk_tokens_default": max(1, 2 ** 27 // vocab),
           "variants": {}}
    ref = None
    for name, fn in variants.items():
        r = out["variants"][name] = {}

        def step():
            h.grad = W.grad = None
            loss = fn()
            loss.backward()
            return loss

        try:
            r["forward_backward_ms"] = 1e3 * timed(step, device, 2, iters)
            h.grad = W.grad = None
            r["peak_extra_gib"] = extra_gib(step, device)  # gradients included
            loss = step()
            got = (loss.detach(), h.grad.clone(), W.grad.clone())
            if ref is None:
                ref = got
            r["loss"] = float(got[0])
            r["rel_diff_vs_unchunked"] = {"loss": rel(got[0], ref[0]), "grad_hidden": rel(got[1], ref[1]),
                                          "grad_weight": rel(got[2], ref[2])}
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        free(device)
    base = out["variants"]["unchunked"]
    print(f"\n  KD loss, {n} tokens x vocab {vocab} (hidden {d}), head matmuls included, forward + backward")
    print(f"  {'variant':16s} {'ms':>9s} {'vs unchunked':>13s} {'peak extra GiB':>15s} {'loss/grad rel diff':>22s}")
    for name, r in out["variants"].items():
        if "error" in r:
            print(f"  {name:16s} {r['error'][:80]}")
            continue
        speed = base.get("forward_backward_ms", float("nan")) / r["forward_backward_ms"]
        mem = "-" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f}"
        diff = max(r["rel_diff_vs_unchunked"].values())
        print(f"  {name:16s} {r['forward_backward_ms']:9.2f} {speed:12.2f}x {mem:>15s} {diff:22.1e}")
    return out


# ----------------------------------------------------------------------------- 4. train

def fused_kd(on: bool):
    """The trainer hands kd_loss HeadInputs (train.py's default: the head applied a chunk at a time),
    or, off, whole-batch logits: `model(x)` in place of `head_input(model, x)`, the earlier train.py."""
    import star_elastic.train as train_module
    return nullcontext() if on else mock.patch.object(
        train_module, "head_input", lambda model, input_ids, **kwargs: model(input_ids, **kwargs))


def keep_activations(on: bool):
    """On: the model keeps every activation autograd records (`model.checkpoint` a plain call, Mamba's norm and
    out_proj by autograd: `norm_then_out_proj`), as before the thirty-third session, where a Mamba layer's conv
    and gated norm and the router's scores are recomputed in backward: what the recompute costs in time and
    saves in memory, side by side."""
    import star_elastic.model as model_module
    if not on:
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(mock.patch.object(model_module, "checkpoint", lambda fn, *args, **settings: fn(*args)))
    stack.enter_context(mock.patch.object(model_module, "norm_and_out_proj", model_module.norm_then_out_proj))
    return stack


def conv_scan_switch(on: bool):
    """On: Mamba's conv, scan and skip as one function (kernels.conv_scan, the library's default), which keeps
    the conv's input rather than its output for backward; read when a compiled layer is traced."""
    return common.environment({kernels.ENV_CONV_SCAN: "1" if on else "0"})


def foreach_adam(on: bool):
    """On: the trainer's AdamW in its foreach form (train.py's before the fused one), so the optimiser's
    share of the step is measured side by side."""
    import star_elastic.train as train_module
    return mock.patch.object(train_module, "adamw", functools.partial(train_module.adamw, fused=False, foreach=True)) \
        if on else nullcontext()


def clip_first(on: bool):
    """On: the trainer clips the model's gradient before the optimiser (clip_grad_norm_'s pass over it), as it
    did before the sixtieth session, not inside the fused AdamW kernel (`ElasticTrainer._clip`'s `in_step`)."""
    from star_elastic.train import ElasticTrainer
    return mock.patch.object(ElasticTrainer, "_clips_in_step", lambda self: False) if on else nullcontext()


def eager_kd_value(on: bool):
    """On: the trainer's KD without gradients (the router's score-function baseline) in eager passes over each
    chunk's logits, as before the sixty-first session, while the KD with gradients stays compiled (compiled_kd)."""
    import star_elastic.train as train_module
    from star_elastic.elastic import losses

    @contextmanager
    def gradients_only(backend):
        with losses.compiled_kd(backend):
            outer, losses._FUSED_VALUE = losses._FUSED_VALUE, None
            try:
                yield
            finally:
                losses._FUSED_VALUE = outer

    return mock.patch.object(train_module, "compiled_kd", gradients_only) if on else nullcontext()


def small_kd_chunks(on: bool):
    """On: the compiled KD in the eager path's chunks (CHUNK_ELEMENTS logits, 1024 tokens of a 131k vocabulary),
    as before the sixty-first session, not FUSED_CHUNK_ELEMENTS' (4096 tokens)."""
    from star_elastic.elastic import losses
    return mock.patch.object(losses, "FUSED_CHUNK_ELEMENTS", losses.CHUNK_ELEMENTS) if on else nullcontext()


def step_setup(cfg: ModelConfig, device, batch: int, seq: int):
    """What the train and profile parts time: (student, bf16 teacher on a GPU, budgets 1.0 / 0.75 / 0.5,
    token rows), the student a little away from its teacher so that the KD is not zero."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(cfg)
    teacher = copy.deepcopy(model).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    budgets = [parse_budget(b, cfg) for b in ["1.0", "0.75", "0.5"]]
    rows = torch.randint(0, cfg.vocab_size, (max(16, 4 * batch), seq), generator=torch.Generator().manual_seed(1))
    return model, teacher, budgets, rows


def step_trainer(model, teacher, cfg, budgets, rows, batch, seq, steps, device, tmp, compile_backend=None,
                 shard="none", baseline_rows: float = 1.0):
    """The trainer as elastify builds it (router included), on one process, its state never written."""
    router = Router(cfg, budgets, RouterConfig()).to(device)
    # baseline_rows 0: no score-function term (router_quality 0), so no argmax forward on any step
    tc = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, lr=1e-5, warmup_steps=1, router_warmup_steps=50,
                     shard=shard, compile=compile_backend, router_baseline_rows=baseline_rows or 1.0,
                     router_quality=1.0 if baseline_rows else 0.0)
    t = ElasticTrainer(model, teacher, router, budgets, rows, tc, tmp)
    t.save_state = lambda: None  # a 3.4B train state is ~40 GB: not written
    return t


def _train(model, teacher, cfg, budgets, rows, batch, seq, steps, device, compile_backend=None, shard="none",
           baseline_rows: float = 1.0, fp32: bool = False):
    """One trainer's run: its step logs and peak memory (its optimiser state freed on return). With
    `compile_backend` the layers run under torch.compile (TrainConfig.compile; `run` puts them back). With
    shard "fsdp" the student and teacher are copies sharded by FSDP2 over a process group of this one
    process: each block's weights cast to bf16 once a gather, not at every use under autocast. `fp32`: the
    teacher in fp32 and no bf16 autocast (what a GPU run computes in bf16 done in fp32; the CPU's runs are)."""
    with tempfile.TemporaryDirectory() as tmp, one_rank_group(device, shard == "fsdp"):
        if shard == "fsdp":  # fully_shard changes a module in place: the other variants keep the plain ones
            model, teacher = copy.deepcopy(model), copy.deepcopy(teacher)
        t = step_trainer(model, teacher.float() if fp32 else teacher, cfg, budgets, rows, batch, seq, steps, device,
                         tmp, compile_backend, shard, baseline_rows)
        if fp32:
            t.autocast = torch.autocast(device.type, enabled=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        logs = t.run(progress=False)
        return logs, t.peak_memory()


@contextmanager
def one_rank_group(device, on: bool = True):
    """A torch.distributed group of this process alone (FSDP2 needs one), for the block; nothing if `on` is
    false or a group exists."""
    if not on or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{common.free_port()}", world_size=1, rank=0)
    try:
        yield
    finally:
        dist.destroy_process_group()


def part_train(device, tiny: bool, pattern: str, batch: int, seq: int, steps: int, have_triton: bool,
               compile_step: bool = False, fsdp1: bool = False, keep: bool = False, apart: bool = False,
               baseline_rows: float | None = None, clip_apart: bool = False, only: str | None = None,
               kd_value_apart: bool = False, kd_chunk_apart: bool = False) -> dict:
    cfg = tiny_config(pattern) if tiny else nano_config(pattern)
    model, teacher, budgets, rows = step_setup(cfg, device, batch, seq)
    n_total = sum(p.numel() for p in model.parameters())
    n_active = active_params(cfg, model)
    # (name, Triton scan, fused KD, compile backend, foreach AdamW, shard, kind: "" the default, "keep" every
    # activation kept, "apart" Mamba's conv, scan and skip apart, not as kernels.conv_scan, "clip_first" the clip
    # before the optimiser); the compiled step's first steps
    # compile (the median of the last steps is timed), one graph per layer kind, budget kind and grad mode.
    # "_keep": every activation kept (no recompute in backward, --keep-activations), beside the default;
    # "_apart": Mamba's conv and scan apart, autograd keeping the conv's output (--conv-scan-apart; the default
    # until the thirty-sixth session): the default rows run them as one function, the conv recomputed in backward.
    # "_clip_first": the model's gradient clipped before the optimiser, not in its fused kernel (--clip-apart;
    # the default until the sixtieth session), compiled only (eager if the step is not compiled).
    # "_eager_kd_value": the KD without gradients (the router's baseline forward) in eager passes, not compiled
    # (--kd-value-apart; the default until the sixty-first session; the same as the default where nothing compiles).
    # "_small_kd_chunks": the compiled KD in the eager path's chunks, 1024 tokens at Nano's vocabulary, not 4096
    # (--kd-chunk-apart; the default until the sixty-first session; the same as the default where nothing compiles).
    # "_fsdp1": FSDP2 over this one process, whose bf16 gathers cast each block's weights once a forward (and
    # once a backward) where autocast casts them at every use: the profile's hundreds of small casts. Measured
    # on an H200 (thirty-first session, docs/RESULTS.md §12): 10% slower and 24-27 GiB more, eager and compiled,
    # so these rows run only when asked (--fsdp1): they cost about 45 s of device time a run
    best = "triton_fused_kd" if have_triton else "einsum_fused_kd"
    variants = [("einsum", False, False, None, False, "none", "")]
    variants += [("triton", True, False, None, False, "none", "")] if have_triton else []
    variants += [(best + "_foreach_adam", have_triton, True, None, True, "none", ""),
                 (best, have_triton, True, None, False, "none", "")]
    extra = [a for a, on in (("keep", keep), ("apart", apart and have_triton)) if on]
    variants += [(f"{best}_{a}", have_triton, True, None, False, "none", a) for a in extra]
    step_apart = [kind for kind, on in (("clip_first", clip_apart), ("eager_kd_value", kd_value_apart),
                                        ("small_kd_chunks", kd_chunk_apart)) if on]
    if compile_step:
        variants.append((best + "_compiled", have_triton, True, "inductor", False, "none", ""))
        variants += [(f"{best}_compiled_{a}", have_triton, True, "inductor", False, "none", a)
                     for a in extra + step_apart]
    else:
        variants += [(f"{best}_{a}", have_triton, True, None, False, "none", a) for a in step_apart]
    if fsdp1 and not (parallel.available() and dist.is_available()):
        print("  --fsdp1: FSDP2 is not available in this torch build; its rows are left out")
    elif fsdp1:
        variants.append((best + "_fsdp1", have_triton, True, None, False, "fsdp", ""))
        if compile_step:
            variants.append((best + "_compiled_fsdp1", have_triton, True, "inductor", False, "fsdp", ""))
    variants = [v + (1.0,) for v in variants]  # the router's baseline on every row of the batch (the default)
    if baseline_rows is not None:  # beside the default: the baseline's forward on a share of the rows
        # (TrainConfig.router_baseline_rows; the smaller budgets' steps ran ~1.35x a full one's, forty-third session);
        # 0: none at all (no quality term), the same draws: what the argmax forward costs a step, measured
        tag = f"baseline{baseline_rows:g}" if baseline_rows else "no_quality"
        variants.append((f"{best}_{tag}", have_triton, True, None, False, "none", "", baseline_rows))
        if compile_step:
            variants.append((f"{best}_compiled_{tag}", have_triton, True, "inductor", False, "none", "", baseline_rows))
    if only:  # --rows: only the rows whose names hold one of these words (a short device call)
        variants = [v for v in variants if any(w in v[0] for w in only.split(","))]
    out = {"pattern": pattern, "params_B": round(n_total / 1e9, 3), "active_params_B": round(n_active / 1e9, 3),
           "batch": batch, "seq": seq, "tokens_per_step": batch * seq, "steps": steps,
           "flops_per_token": 8 * n_active, "peak_tflops": BF16_PEAK / 1e12, "variants": {}}
    print(f"\n  training step: layers {pattern}, {n_total / 1e6:.1f}M parameters ({n_active / 1e6:.1f}M active), "
          f"batch {batch} x {seq}, {steps} steps per variant")
    for name, triton_on, fused, backend, foreach, shard, kind, share in variants:
        r = out["variants"][name] = {"router_baseline_rows": share}
        try:
            with triton_switch(triton_on), fused_kd(on=fused), foreach_adam(on=foreach), \
                    keep_activations(kind == "keep"), conv_scan_switch(kind not in ("keep", "apart")), \
                    clip_first(kind == "clip_first"), eager_kd_value(kind == "eager_kd_value"), \
                    small_kd_chunks(kind == "small_kd_chunks"):
                logs, r["peak_gib"] = _train(model, teacher, cfg, budgets, rows, batch, seq, steps, device, backend,
                                             shard, baseline_rows=share)
            tok_s, mixed, by_budget = step_rates(logs)
            r.update(tokens_per_s=round(tok_s, 1), tokens_per_s_each=[round(log["tokens_per_s"]) for log in logs],
                     tokens_per_s_mixed=round(mixed, 1),
                     tokens_per_s_by_budget={b: round(v, 1) for b, v in by_budget.items()},
                     budgets=[log["budget"] for log in logs], kd=[round(log.get("kd", float("nan")), 4) for log in logs],
                     # which steps ran the router's argmax architecture once more (drawn != argmax: its score is
                     # the router's quality signal), a forward more than a step without, and how many
                     argmax_forward_each=(each := [log.get("drawn_is_argmax") == 0.0 for log in logs]),
                     argmax_forwards=sum(each),
                     mfu=round(8 * n_active * tok_s / BF16_PEAK, 4), mfu_mixed=round(8 * n_active * mixed / BF16_PEAK, 4))
            print(f"  {name:16s} {tok_s:10.0f} tok/s  MFU {r['mfu']:.3f}  peak {r['peak_gib']} GiB  "
                  f"budgets {r['budgets']}")
            print(f"  {'':16s} mixed {mixed:.0f} tok/s (MFU {r['mfu_mixed']:.3f}) over the timed steps; by budget "
                  + ", ".join(f"{b} {v:.0f}" for b, v in r["tokens_per_s_by_budget"].items()))
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
            print(f"  {name:16s} failed: {r['error'][:120]}")
        free(device)
    base = out["variants"].get("einsum", {}).get("tokens_per_s")
    if base:
        out["speedup_vs_einsum"] = {k: round(v["tokens_per_s"] / base, 3) for k, v in out["variants"].items()
                                    if "tokens_per_s" in v}
        print("  tokens/s against the einsum scan: " + ", ".join(f"{k} {v:.2f}x" for k, v in out["speedup_vs_einsum"].items()))
    return out


def step_rates(logs: list[dict]) -> tuple[float, float, dict]:
    """(median step's tokens/s, mixed tokens/s, {budget: its median step's}) over the timed steps (the first two
    compile and warm up). The median step is the headline kept since the seventh session; with this bench's draws
    it lands on a full-budget step, and the smaller budgets' steps (the router and masks beside the same model)
    run slower, so `mixed`, the tokens the timed steps made over their time (equal tokens a step: the harmonic mean
    of the rates), is what training at those draws runs at (forty-third session)."""
    timed = logs[2:] if len(logs) > 3 else logs[1:] or logs
    rates = [log["tokens_per_s"] for log in timed]
    by_budget = {}
    for log in timed:
        by_budget.setdefault(log["budget"], []).append(log["tokens_per_s"])
    return (sorted(rates)[len(rates) // 2], len(rates) / sum(1 / t for t in rates),
            {b: sorted(v)[len(v) // 2] for b, v in by_budget.items()})


def part_kdcurve(device, tiny: bool, pattern: str, batch: int, seq: int, steps: int, have_triton: bool,
                 compile_step: bool, apart: bool = False, fp32: bool = False) -> dict:
    """Issue 16's "no loss of accuracy" over training: the elastic step's distillation losses over `steps` steps from
    one start, on the reference path (the einsum scan, the KD on whole-batch logits, eager) twice (its own
    run-to-run noise) and on the fast default (the Triton scan where it imports, the fused KD, layers and loss
    compiled where `compile_step`). Each run starts from copies of the same student, teacher and router, and
    draws the same budgets. Reports every step's KD, the mean relative gap of each run to the reference over
    the steps (and its signed mean: on an H200 the fast path ran above the reference at every step), and the last
    ten steps' mean KD. `apart`: also each of the fast path's parts alone on the reference path, to say which one
    moves the curve. `fp32`: also the reference path in fp32 (no bf16 autocast, an fp32 teacher; second, so that
    a call cut short has it), and every run's gap to it: how far bf16's own rounding moves the curve, the
    yardstick for "within noise" where the reference repeats itself to 0.005% (H200)."""
    cfg = tiny_config(pattern) if tiny else nano_config(pattern)
    model, teacher, budgets, rows = step_setup(cfg, device, batch, seq)
    # every run starts from copies of these, so they wait in host memory: the card holds one run's model, teacher
    # and optimiser (on an 80 GB H100 the originals beside a run's copies ran out of memory, thirty-sixth session)
    model, teacher = model.cpu(), teacher.cpu()
    fast_name = ("triton" if have_triton else "einsum") + "_fused_kd" + ("_compiled" if compile_step else "")
    # (Triton scan, fused KD, compile backend, fp32)
    variants = {"reference": (False, False, None, False)}
    variants.update({"reference_fp32": (False, False, None, True)} if fp32 else {})
    if apart:  # early, so that a call cut short has them: which part moves the curve is the question
        variants.update({"fused_kd_only": (False, True, None, False)})
        variants.update({"triton_only": (True, False, None, False)} if have_triton else {})
        variants.update({"compiled_only": (False, False, "inductor", False)} if compile_step else {})
    variants.update({fast_name: (have_triton, True, "inductor" if compile_step else None, False),
                     "reference_again": (False, False, None, False)})
    out = {"pattern": pattern, "batch": batch, "seq": seq, "steps": steps, "variants": {}}
    print(f"\n  KD over {steps} steps: layers {pattern}, batch {batch} x {seq}; " + ", ".join(variants))
    for name, (triton_on, fused, backend, in_fp32) in variants.items():
        torch.manual_seed(1)  # the router's start
        try:
            with triton_switch(triton_on), fused_kd(on=fused):
                logs, _ = _train(copy.deepcopy(model).to(device), copy.deepcopy(teacher).to(device), cfg, budgets,
                                 rows, batch, seq, steps, device, backend, fp32=in_fp32)
        except torch.OutOfMemoryError as e:  # the fp32 run holds twice the bytes: on an 80 GB card it may not fit
            out["variants"][name] = {"error": f"OutOfMemoryError: {e}"[:300]}
            print(f"  {name:28s} out of memory")
            free(device)
            continue
        out["variants"][name] = r = {"kd": [log.get("kd") for log in logs], "budgets": [log["budget"] for log in logs]}
        free(device)
        kd_gaps(name, r, out["variants"]["reference"])  # printed as each run ends: a call cut short keeps the runs done
        if "kd" in out["variants"].get("reference_fp32", {}):
            kd_gaps(name, r, out["variants"]["reference_fp32"], "fp32")
    return out


def kd_gaps(name: str, r: dict, ref: dict, to: str = "reference"):
    """Run `r`'s KD curve against the run `ref` (`to`: the reference run's name in the keys): its gaps and
    last-ten mean, stored in `r` and printed."""
    pairs = [(a, b) for a, b in zip(r["kd"], ref["kd"]) if a is not None and b is not None and b]
    last = [k for k in r["kd"][-10:] if k is not None]
    if to == "reference":
        r["same_budgets"] = r["budgets"] == ref["budgets"]
    r[f"mean_rel_gap_to_{to}"] = sum(abs(a - b) / abs(b) for a, b in pairs) / max(1, len(pairs))
    r[f"mean_signed_gap_to_{to}"] = sum((a - b) / abs(b) for a, b in pairs) / max(1, len(pairs))
    r["last10_mean_kd"] = sum(last) / max(1, len(last))
    print(f"  {name:28s} mean |KD - {to}| / {to} over the steps {r[f'mean_rel_gap_to_{to}']:.2e} "
          f"(signed {r[f'mean_signed_gap_to_{to}']:+.2e}); "
          f"last ten steps' mean KD {r['last10_mean_kd']:.4f}; the same budgets drawn: {r['budgets'] == ref['budgets']}")


# kernel and operator names -> what they do in the step (the first pattern that matches wins)
PROFILE_CATEGORIES = [
    ("optimizer (AdamW)", ("optimizer", "adam", "multi_tensor", "foreach")),
    ("grouped GEMM (MoE experts)", ("grouped_mm", "grouped_gemm", "groupproblem")),  # torch._grouped_mm: cutlass
    ("causal conv1d", ("conv",)),
    ("Mamba scan (Triton)", ("chunk_scan", "chunk_state", "state_passing", "bmm_chunk", "chunk_cumsum")),
    ("attention (SDPA)", ("flash", "attention", "fmha")),
    ("GEMM", ("gemm", "xmma", "nvjet", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "matmul", "sm90", "sm80")),
    ("softmax / distillation loss", ("softmax", "logsumexp", "kl_div", "log_softmax")),
    ("routing: sort, gather, scatter, index", ("sort", "gather", "scatter", "index", "radix", "cumsum", "topk")),
    ("copies and dtype casts", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
    ("reductions", ("reduce", "sum", "norm", "mean")),
    ("views and launch overhead (CPU)", ("view", "strided", "permute", "reshape", "transpose", "expand", "slice",
                                         "select", "split", "unflatten", "empty", "detach", "item")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton_poi", "triton_red", "silu", "mul", "add",
                     "exp", "neg", "div", "sub", "pow", "rsqrt", "where", "clamp")),
]


def categorise(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in PROFILE_CATEGORIES if any(k in low for k in keys)), "other")


def category_ms(rows: list[tuple[str, float]], steps: int) -> dict[str, float]:
    """Milliseconds a step by category (`categorise`) of `timed_rows`' (name, us) over `steps` steps, largest first."""
    by_cat: dict[str, float] = {}
    for name, t in rows:
        by_cat[categorise(name)] = by_cat.get(categorise(name), 0.0) + t / 1e3 / steps
    return dict(sorted(by_cat.items(), key=lambda kv: -kv[1]))


def timed_rows(events, cuda: bool) -> list[tuple[str, float]]:
    """(name, self time in us) of the profiled events that add up to the step: on a GPU the kernels'
    device time (not operators': an operator's time is its kernels' time), leaving out user
    annotations such as `Optimizer.step#AdamW.step`, whose device span covers kernels already counted
    (the seventh session's profile counted the optimiser twice that way); on a CPU operators' self time."""
    if not cuda:
        return [(e.key, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    return [(e.key, e.self_device_time_total) for e in events
            if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)
            and not getattr(e, "is_user_annotation", False) and e.self_device_time_total > 0]


def op_chains(events, cuda: bool, depth: int = 5) -> list[tuple[str, float]]:
    """(chain, self time in us) per operator that runs kernels itself, summed over calls: the operator,
    its input shapes and its nearest `depth - 1` ancestors (a backward shows as its autograd node, e.g.
    `ToCopyBackward0`: which forward operator's gradient ran it), so a kernel category's time can be
    traced to the code that launches it. Self device time on a GPU (the kernels an operator launches
    directly), self CPU time on a CPU. `events`: profile().events()."""
    out: dict[str, float] = {}
    for e in events:
        if "CPU" not in str(getattr(e, "device_type", "CPU")):
            continue  # kernels themselves: counted through the operator that launched them
        if e.name.startswith("Command Buffer Full") or e.name.startswith("cuda"):
            continue  # CUDA runtime calls: on the H200 a full launch queue showed as 2.7 s "a step"
        t = getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total
        if t <= 0:
            continue
        chain, p = [], e
        while p is not None and len(chain) < depth:
            chain.append(p.name)
            p = p.cpu_parent
        key = " < ".join(chain) + f"  {[list(s) for s in (e.input_shapes or []) if s]}"
        out[key] = out.get(key, 0.0) + t
    return sorted(out.items(), key=lambda kv: -kv[1])


def part_profile(device, tiny: bool, pattern: str, batch: int, seq: int, fast: bool, top: int = 25,
                 model_name: str = "nano", compile_backend: str | None = None) -> dict:
    """Where the elastic training step's time goes: torch.profiler over two steps (after the warm-up steps)
    of the trainer as elastify runs it (Triton scan when available, fused distillation loss; eager, or each
    layer and the loss's chunks compiled with `compile_backend`, elastify's default on a GPU, warmed up
    until each budget's graphs exist), self time per kernel on a GPU (per operator on a CPU), grouped into
    categories. `model_name` "smollm2": SmolLM2-135M's shapes instead of Nano's."""
    from torch.profiler import ProfilerActivity, profile

    cfg = smollm2_config() if model_name == "smollm2" else tiny_config(pattern) if tiny else nano_config(pattern)
    model, teacher, budgets, rows = step_setup(cfg, device, batch, seq)
    cuda = device.type == "cuda"
    warm = 4 if compile_backend else 2  # compiled: each budget's step twice (the second compiles what is left)
    with tempfile.TemporaryDirectory() as tmp, triton_switch(fast):
        t = step_trainer(model, teacher, cfg, budgets, rows, batch, seq, warm + 4, device, tmp, compile_backend)
        t.warm_up_router()
        order = iter([0, 2] * (warm // 2 + 1))  # the full budget and the smallest, warmed up then profiled
        t.sample_budget = lambda: next(order)
        for _ in range(warm):
            t.train_step()
        if cuda:
            torch.cuda.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(2):
                t.train_step()
            if cuda:
                torch.cuda.synchronize(device)
    rows_ = timed_rows(prof.key_averages(), cuda)
    total = sum(t_ for _, t_ in rows_) or 1.0
    by_cat = category_ms(rows_, 2)
    kernels_ = sorted(rows_, key=lambda r: -r[1])[:top]
    out = {"model": model_name, "pattern": "".join(cfg.layer_types), "batch": batch, "seq": seq, "steps_profiled": 2,
           "compiled": compile_backend,
           "budgets_profiled": ["1.0", "0.5"],
           "clock": "GPU kernel self time" if cuda else "CPU operator self time",
           "total_ms_per_step": round(total / 1e3 / 2, 2),
           "categories": {k: {"ms_per_step": round(v, 2), "share": round(v * 1e3 * 2 / total, 4)}
                          for k, v in by_cat.items()},
           "top": [{"name": n[:120], "ms_per_step": round(t_ / 1e3 / 2, 3), "share": round(t_ / total, 4)}
                   for n, t_ in kernels_],
           # twice as many operator chains as kernels: each operator appears under several callers
           "top_ops": [{"op": n[:300], "ms_per_step": round(t_ / 1e3 / 2, 3), "share": round(t_ / total, 4)}
                       for n, t_ in op_chains(prof.events(), cuda)[:2 * top]]}
    print(f"  {out['clock']}, {out['total_ms_per_step']} ms a step (budgets 1.0 and 0.5, two steps, "
          f"{'compiled' if compile_backend else 'eager'}):")
    for k, v in out["categories"].items():
        print(f"    {k:40s} {v['ms_per_step']:9.2f} ms  {100 * v['share']:5.1f}%")
    print("  top kernels:")
    for r in out["top"][:12]:
        print(f"    {r['ms_per_step']:9.3f} ms  {100 * r['share']:5.1f}%  {r['name'][:90]}")
    print("  top operators (with their callers and input shapes):")
    for r in out["top_ops"][:12]:
        print(f"    {r['ms_per_step']:9.3f} ms  {100 * r['share']:5.1f}%  {r['op'][:150]}")
    return out


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes: a smoke run, on the CPU too")
    ap.add_argument("--parts", default="scan,kd,train,check",
                    help="comma-separated, run in this order: scan, kd, train, check (check last: by then the "
                         "kernel's autotuning for Nano's shapes is done); profile: where a training step's time "
                         "goes (torch.profiler, by kernel and category); kdcurve: the step's KD losses over "
                         "--kd-steps steps, the fast path against the reference (batch 1)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="the torch.compile'd einsum scan and training step (auto: on a GPU only)")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per kernel measurement (median)")
    ap.add_argument("--pattern", default="MEM*EM", help="layers of the Nano-width parent")
    ap.add_argument("--profile-model", choices=["nano", "smollm2"], default="nano",
                    help="the profile part's parent: Nano's widths (--pattern, --batch, --seq) or SmolLM2-135M's "
                         "shapes at bench_elastic's 16 x 512")
    ap.add_argument("--batch", type=int, default=2, help="sequences per training step")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence in the training step")
    ap.add_argument("--steps", type=int, default=6, help="training steps per variant (the first two not timed)")
    ap.add_argument("--check-odd", action="store_true",
                    help="also check a budget view's scan shapes (each shape key costs a fresh Triton autotune)")
    ap.add_argument("--kd-steps", type=int, default=50, help="--parts kdcurve: training steps per run")
    ap.add_argument("--kd-apart", action="store_true",
                    help="--parts kdcurve: also the Triton scan, the fused KD and the compiled step each alone")
    ap.add_argument("--kd-fp32", action="store_true",
                    help="--parts kdcurve: also the reference path in fp32 (no bf16 autocast, an fp32 teacher), and "
                         "every run's gap to it")
    ap.add_argument("--fsdp1", action="store_true",
                    help="--parts train: also the step sharded by FSDP2 over this one process (measured slower)")
    ap.add_argument("--keep-activations", action="store_true",
                    help="--parts train: also the step keeping every activation (no recompute in backward)")
    ap.add_argument("--conv-scan-apart", action="store_true",
                    help="--parts train: also the step with Mamba's conv, scan and skip apart, not as one "
                         "function (STAR_ELASTIC_CONV_SCAN=0), eager and compiled")
    ap.add_argument("--clip-apart", action="store_true",
                    help="--parts train: also the compiled step with the model's gradient clipped before the "
                         "optimiser (clip_grad_norm_), not inside the fused AdamW kernel (the default)")
    ap.add_argument("--kd-value-apart", action="store_true",
                    help="--parts train: also the compiled step with the KD of the router's baseline forward (no "
                         "gradients) in eager passes, not compiled (the default)")
    ap.add_argument("--kd-chunk-apart", action="store_true",
                    help="--parts train: also the compiled step with the KD in the eager path's chunks (1024 tokens "
                         "at a 131k vocabulary), not the compiled path's (4096, the default)")
    ap.add_argument("--rows", metavar="WORDS",
                    help="--parts train: only the rows whose names hold one of these comma-separated words, e.g. "
                         "'compiled' (the einsum, triton and eager rows take about two minutes of a device call)")
    ap.add_argument("--baseline-rows", type=float, metavar="F",
                    help="--parts train: also the step with the router's score-function baseline on this share of "
                         "the batch's rows (TrainConfig.router_baseline_rows), beside the default (every row); 0: "
                         "without the score-function term at all (router_quality 0: no argmax forward)")
    ap.add_argument("--device")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    device = common.setup(args.device, deterministic=False)  # before mamba_ssm is imported
    if args.tiny:
        args.batch, args.seq, args.steps, args.iters = 2, 64, 3, min(args.iters, 3)
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    parts = args.parts.split(",")
    known = ("check", "scan", "kd", "train", "profile", "kdcurve")
    unknown = set(parts) - set(known)
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}: {', '.join(known)}")
    have_triton = device.type == "cuda" and kernels.kernel() is not None
    why_not = None if have_triton else ("no CUDA device" if device.type != "cuda" else kernels.unavailable_reason())
    stand_in = not have_triton and args.tiny and device.type == "cpu"
    if stand_in:
        use_stand_in()
    res = {"date": datetime.date.today().isoformat(), "machine": common.machine(device), "torch": torch.__version__,
           "tiny": args.tiny, "triton_scan": have_triton, "triton_unavailable": why_not, "stand_in": stand_in,
           "command": " ".join(sys.argv)}
    for mod in ("triton", "mamba_ssm"):
        try:
            res[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            res[mod] = None
    print(f"{res['machine']}, torch {res['torch']}, triton {res['triton']}, mamba_ssm {res['mamba_ssm']}; "
          f"Triton scan {'on' if have_triton else 'unavailable: ' + str(why_not)}"
          + ("; CPU smoke run: 'triton' rows run an einsum stand-in, their numbers are not the kernel's" if stand_in else ""))
    fast = have_triton or stand_in
    runs = {
        "check": lambda: part_check(device, args.check_odd, args.tiny) if fast else {"skipped": why_not},
        "scan": lambda: part_scan(device, args.tiny, compile_, args.iters, fast),
        "kd": lambda: part_kd(device, args.tiny, args.iters),
        "train": lambda: part_train(device, args.tiny, args.pattern, args.batch, args.seq, args.steps, fast,
                                    compile_, args.fsdp1, args.keep_activations, args.conv_scan_apart,
                                    args.baseline_rows, args.clip_apart, args.rows, args.kd_value_apart,
                                    args.kd_chunk_apart),
        "kdcurve": lambda: part_kdcurve(device, args.tiny, args.pattern, 1, min(args.seq, 2048), args.kd_steps, fast,
                                        compile_, args.kd_apart, args.kd_fp32),
        "profile": lambda: part_profile(device, args.tiny, args.pattern, *(
            (16, 512) if args.profile_model == "smollm2" and not args.tiny else (args.batch, args.seq)), fast,
            model_name=args.profile_model, compile_backend="inductor" if compile_ else None),
    }
    for part in parts:
        print(f"\n== {part}")
        t0 = time.perf_counter()
        try:
            res[part] = runs[part]()
            if part == "scan":
                print_scan(res[part])
        except Exception as e:  # one part failing keeps the others' results
            traceback.print_exc()
            res[part] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        res.setdefault("wall_s", {})[part] = round(time.perf_counter() - t0, 1)
        print(f"   ({part}: {res['wall_s'][part]:.0f} s)")
        free(device)
        if args.json:
            common.write_json(args.json, res)
    summary(res)
    if args.json:
        common.write_json(args.json, res)
        print(f"\nwrote {args.json}")


def use_stand_in():
    """CPU smoke runs only: the Triton paths run an einsum stand-in with the kernel's output dtype,
    so that every code path of this script runs before GPU time is spent on it."""

    def triton_scan(x, dt, A, B, C, chunk_size, initial_state=None, scan=None):
        y, final = ssd_scan(x, dt, A, B, C, chunk_size, initial_state)
        return y.to(x.dtype).to(torch.promote_types(x.dtype, torch.float32)), final

    kernels.triton_scan = triton_scan
    kernels.uses_triton = lambda x: x.dtype in (torch.bfloat16, torch.float16) and not kernels.disabled()
    # conv + scan as one function (the default rows; --conv-scan-apart beside) on the scan's forward and backward
    # in PyTorch
    from bench_saved import ScanOpsStandIn

    ops = ScanOpsStandIn()
    kernels._load_conv_scan = lambda: ((ops.fwd, ops.bwd), None)
    kernels.uses_conv_scan = lambda x: x.dtype in (torch.bfloat16, torch.float16) and kernels.conv_scan_enabled()


def summary(res: dict):
    """The headline numbers side by side."""
    print("\n== summary")
    scan = res.get("scan", {})
    for key, r in scan.items():
        if isinstance(r, dict) and "triton" in r and r["triton"].get("forward_ms"):
            t = r["triton"]
            line = [f"scan {key}: triton fwd {t['forward_ms']:.2f} ms, fwd+bwd {t['forward_backward_ms']:.2f} ms"]
            for name in ("einsum", "einsum_compiled"):
                o = r.get(name, {})
                if o.get("forward_ms"):
                    line.append(f"{name} takes {o['forward_ms'] / t['forward_ms']:.2f}x (fwd) / "
                                f"{o['forward_backward_ms'] / t['forward_backward_ms']:.2f}x (fwd+bwd) the kernel's time")
            if "rel_err_triton_vs_einsum_fp32" in r:
                line.append(f"triton vs einsum y {r['rel_err_triton_vs_einsum_fp32']:.1e}")
            print("  " + "; ".join(line))
    kd = res.get("kd", {}).get("variants", {})
    base = kd.get("unchunked", {})
    for name, r in kd.items():
        if name != "unchunked" and r.get("forward_backward_ms") and base.get("forward_backward_ms"):
            mem = ""
            if r.get("peak_extra_gib") is not None and base.get("peak_extra_gib"):
                mem = f", peak {r['peak_extra_gib']:.2f} GiB vs {base['peak_extra_gib']:.2f} GiB unchunked"
            print(f"  kd {name}: {base['forward_backward_ms'] / r['forward_backward_ms']:.2f}x the unchunked speed{mem}")
    tr = res.get("train", {}).get("variants", {})
    for name, r in tr.items():
        if "tokens_per_s" in r:
            print(f"  train {name}: {r['tokens_per_s']:.0f} tok/s (median step), MFU {r['mfu']:.3f}; mixed "
                  f"{r['tokens_per_s_mixed']:.0f} tok/s, MFU {r['mfu_mixed']:.3f}; peak {r.get('peak_gib')} GiB")


if __name__ == "__main__":
    main()
