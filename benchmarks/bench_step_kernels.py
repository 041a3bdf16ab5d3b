"""Where a batched decode step's time goes, kernel by kernel, for each budget side by side (issue 12: the 0.5 at
1.8x the full model's throughput at batch 32). The weights a bandwidth-bound step at B = 32 reads would let the
0.5 run 1.91x the full model's rate (`bench_batching.py --bytes-only`); measured it runs 1.1-1.5x, every step at
20-30% of its bound. This finds the kernels whose time does not shrink with the budget.

For each budget's view (the engine's, over one loaded Nano-shaped parent and its zero-shot budgets) and each batch
size, the engine's own static step (`StaticStep`: every row, compiled with --compile, replayed from a CUDA graph)
on fresh caches with the rows at position 40:
  period       seconds a step, steps replayed back to back (the device's pace), and its share of the bound
               (the weights the step reads, `common.step_weight_bytes`, over the card's GB/s)
  kernels      the step's kernels under torch.profiler: milliseconds a step by category and the largest kernels,
               each budget's beside the first (full) budget's, with the ratio, so the parts that do not shrink show

    python benchmarks/bench_step_kernels.py --device cuda --json out.json          # Nano, B = 32, compiled
    python benchmarks/bench_step_kernels.py --smoke                                # tiny model, CPU, eager
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_kernels import categorise, timed_rows  # noqa: E402
from bench_serve import CONTIGUOUS_MODES, build_checkpoint, contiguous_copies  # noqa: E402
from star_elastic import kernels, model  # noqa: E402
from star_elastic.elastic.checkpoint import load_elastic  # noqa: E402
from star_elastic.serve.batching import StaticStep  # noqa: E402
from star_elastic.serve.engine import ElasticEngine  # noqa: E402
from star_elastic.serve.views import budget_view  # noqa: E402

# decode-only kernels that the training categories (bench_kernels) would file under another name
# (inductor names its fused kernels after the operators inside: its fusion of Mamba's conv, dt and state update names
# a convolution, which the training categories would call the causal conv; the fifty-sixth session's first run did)
# (the update kernels by their own names: inductor's fusions beside our operator carry "mamba_state_update" in theirs)
DECODE_CATEGORIES = [("Mamba state update", ("selective_scan_update", "_state_update_kernel")),
                     ("inductor GEMM / GEMV templates", ("triton_tem",)),
                     ("Mamba decode fused by inductor (conv, dt, state update)", ("convolution", "softplus")),
                     ("other inductor fusions", ("triton_poi", "triton_red", "triton_per"))]


def former_expert_counts(flat: torch.Tensor, experts: int) -> torch.Tensor:
    """The MoE layer's count of routed copies per expert as it was until the fifty-eighth session: an int64
    `index_add_`, which inductor cannot lower (no int64 atomic add), so on CUDA a sorting scatter with a bounds
    check."""
    return flat.new_zeros(experts).index_add_(0, flat, torch.ones_like(flat))


def former_window_conv(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Decoding's conv as it was until the fifty-eighth session: PyTorch's depthwise conv over the window, a kernel
    inductor cannot fuse."""
    return torch.nn.functional.conv1d(window, weight, bias, groups=window.shape[1])


# --former: the step as the model computed it before a change, beside today's (its functions swapped in for a variant)
FORMER = {"none": {}, "counts": {"expert_counts": former_expert_counts}, "conv": {"window_conv": former_window_conv}}
FORMER["both"] = {**FORMER["counts"], **FORMER["conv"]}


@contextlib.contextmanager
def former(name: str):
    """`model`'s functions as they were before the changes `name` stands for (FORMER), for the block."""
    with contextlib.ExitStack() as stack:
        for attr, fn in FORMER[name].items():
            stack.enter_context(mock.patch.object(model, attr, fn))
        yield


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in DECODE_CATEGORIES if any(k in low for k in keys)), None) or categorise(name)


def step_for(view, rows: int, device, compile: str | None, graph: bool, position: int = 40):
    """The engine's static step over `rows` fresh rows of `view`, fed random tokens at `position`: a callable."""
    step = StaticStep(view, view.make_cache(rows, 256), rows, use_graph=graph, compile=compile)
    g = torch.Generator().manual_seed(rows)
    tokens = torch.randint(3, view.config.vocab_size, (rows,), generator=g).to(device)
    pos = torch.full((rows,), position, dtype=torch.long, device=device)
    return lambda: step(tokens, pos)


def measure(fn, device, steps: int, profiled: int) -> dict:
    """The period of `fn` replayed back to back, and its kernels' time a step (name -> ms) under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    t0 = common.clock(device)
    for _ in range(steps):
        fn()
    period = (common.clock(device) - t0) / steps
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(profiled):
            fn()
        common.clock(device)
    kernels: dict[str, float] = {}
    for name, us in timed_rows(prof.key_averages(), cuda):
        kernels[name] = kernels.get(name, 0.0) + us / 1e3 / profiled
    return {"period": period, "kernels": kernels}


def by_category(kernels: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ms in kernels.items():
        out[kernel_category(name)] = out.get(kernel_category(name), 0.0) + ms
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["nano", "hybrid", "tiny"], default="nano")
    ap.add_argument("--layers", help="nano's widths with these layers (default M*EM; Nano's own mix is "
                    "common.NANO_LAYERS, e.g. its first 16, MEMEM*EMEMEM*EME: 10.1B parameters, drawn on the GPU)")
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--batch-sizes", default="32")
    ap.add_argument("--compile", choices=["inductor", "off"], default="inductor",
                    help="the static step under torch.compile (the engine's `--compile inductor`), or eager")
    ap.add_argument("--steps", type=int, default=50, help="steps a timed period")
    ap.add_argument("--profiled", type=int, default=10, help="steps under the profiler")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per budget and batch size")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, eager, few steps")
    ap.add_argument("--step-kernels", default="",
                    help="Mamba's decode update, each a variant side by side (own, mamba_ssm, torch: "
                         "STAR_ELASTIC_STEP_KERNEL; default: the one this install runs)")
    ap.add_argument("--contiguous", default="none",
                    help="how each smaller budget's view holds its weights, each a variant: none (the engine's "
                         "views), experts / linear / all (contiguous copies of those, bench_serve.contiguous_copies): "
                         "whether the strided prefixes of the parent's matrices cost a batched step")
    ap.add_argument("--former", default="none",
                    help="comma-separated, each a variant of every row: none (today's model) / counts (the MoE layers' "
                         "count of routed copies as the int64 index_add_ that model.expert_counts replaced) / conv "
                         "(decoding's conv as PyTorch's conv, which model.window_conv replaced) / both")
    ap.add_argument("--json", help="results file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.compile, args.batch_sizes, args.steps, args.profiled = "tiny", "off", "1,4", 3, 2
    device = common.setup(args.device, deterministic=False)
    if args.compile != "off" and device.type != "cuda":
        ap.error("--compile inductor needs --device cuda (pass --compile off on a CPU)")
    graph = device.type == "cuda"
    dtype = torch.bfloat16 if graph else torch.float32
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ckpt_dir = build_checkpoint(args.model, args.budgets.split(","), common.scratch_dir("bench_step_kernels_") / "ckpt",
                                layers=args.layers, device=device if args.layers and graph else None)
    ckpt = load_elastic(ckpt_dir, dtype=dtype, device=device)
    ckpt.model.requires_grad_(False)
    engine = ElasticEngine(ckpt)
    hbm = common.hbm_gbs(device)
    compile = None if args.compile == "off" else args.compile
    rows = []
    variants = [k for k in args.step_kernels.split(",") if k] or [None]
    layouts = args.contiguous.split(",")
    if not set(layouts) <= set(CONTIGUOUS_MODES):
        ap.error(f"--contiguous takes a comma-separated list of {', '.join(CONTIGUOUS_MODES)}")
    formers = args.former.split(",")
    if not set(formers) <= set(FORMER):
        ap.error(f"--former takes a comma-separated list of {', '.join(FORMER)}")

    def views(budget):  # (layout, the budget's model): the engine's view, then fresh views with contiguous copies
        view = engine.view(budget)
        for layout in layouts:
            if layout == "none":
                yield layout, view
            elif view is not engine.parent:  # the full model holds the parent's own (contiguous) tensors
                fresh = budget_view(engine.parent, engine.ckpt.spec(budget), compact=engine.compact_views)
                contiguous_copies(fresh, layout)
                yield layout, fresh

    with torch.no_grad():
        for variant, was in ((v, f) for v in variants for f in formers):
            with common.environment({kernels.ENV_STEP_KERNEL: variant} if variant else {}), former(was):
                torch._dynamo.reset()  # the update's kernel is read once a compile, the swapped functions traced in
                ran = kernels.active_step_kernel() if graph else "torch"
                if variant and ran != variant:
                    raise SystemExit(f"--step-kernels {variant}: not importable here (this install runs {ran})")
                for budget, (layout, view) in ((b, v) for b in engine.budgets for v in views(b)):
                    for n in sizes:
                        r = measure(step_for(view, n, device, compile, graph), device, args.steps, args.profiled)
                        r.update(budget=budget, batch=n, step_kernel=ran, contiguous=layout, former=was,
                                 step_weight_bytes=common.step_weight_bytes(view.config, view, n),
                                 step_state_bytes=common.step_state_bytes(view, n))
                        r["bound_share"] = common.bandwidth_share(r["step_weight_bytes"], r["period"], hbm)
                        # the bound with Mamba's state read and written once beside the weights
                        r["bound_share_with_state"] = common.bandwidth_share(
                            r["step_weight_bytes"] + r["step_state_bytes"], r["period"], hbm)
                        r["kernel_ms"] = sum(r["kernels"].values())
                        r["categories"] = by_category(r["kernels"])
                        rows.append(r)
                        print(f"{ran:>9} budget {budget:>6} ({layout}, former: {was}) B = {n:>3}: "
                              f"{r['period'] * 1e3:.3f} ms a step "
                              f"({n / r['period']:,.0f} tok/s), kernels {r['kernel_ms']:.3f} ms, "
                              f"{r['step_weight_bytes'] / 1e9:.3f} GB read: {100 * r['bound_share']:.1f}% of "
                              f"{hbm:,.0f} GB/s ({100 * r['bound_share_with_state']:.1f}% with Mamba's state, "
                              f"{r['step_state_bytes'] / 1e9:.3f} GB, moved once)", flush=True)

    def label(r):  # the budget, and how its view held its weights where not as the engine's
        return r["budget"] if r["contiguous"] == "none" else f"{r['budget']}/{r['contiguous']}"

    for kernel, was, n in dict.fromkeys((r["step_kernel"], r["former"], r["batch"]) for r in rows):
        at = [r for r in rows if r["batch"] == n and r["step_kernel"] == kernel and r["former"] == was]
        full = at[0]
        print(f"\nB = {n}, Mamba's update on {kernel}, former: {was}: each budget against "
              f"{full['budget']} (measured rate ratio; bytes ratio: a bandwidth-bound step's)")
        for r in at:
            r["rate_vs_full"] = full["period"] / r["period"]
            r["bytes_vs_full"] = full["step_weight_bytes"] / r["step_weight_bytes"]
            r["bytes_with_state_vs_full"] = ((full["step_weight_bytes"] + full["step_state_bytes"])
                                             / (r["step_weight_bytes"] + r["step_state_bytes"]))
            print(f"  {label(r):>12}: {r['rate_vs_full']:.2f}x measured, {r['bytes_vs_full']:.2f}x by the weights' "
                  f"bytes, {r['bytes_with_state_vs_full']:.2f}x with Mamba's state")
        print("  ms a step by kernel category: " + "  ".join(f"{label(r):>12}" for r in at))
        for cat in full["categories"]:
            print(f"  {cat[:38]:<38} " + "  ".join(f"{r['categories'].get(cat, 0.0):12.4f}" for r in at))
        for r in at:
            print(f"  largest kernels, budget {label(r)} (ms a step; the full budget's same kernel):")
            for name, ms in sorted(r["kernels"].items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"    {ms:8.4f}  ({full['kernels'].get(name, 0.0):8.4f})  {name[:110]}")
    if len(formers) > 1:  # the same step before and after the changes, side by side
        print(f"\nEach row's step with former {formers[0]} against the others (period ratio):")

        def same_step(r):
            return r["step_kernel"], r["batch"], r["budget"], r["contiguous"]

        for r in (r for r in rows if r["former"] == formers[0]):
            for x in (x for x in rows if x["former"] != formers[0] and same_step(x) == same_step(r)):
                r.setdefault("speedup_vs_former", {})[x["former"]] = x["period"] / r["period"]
                print(f"  {label(r):>12} B = {r['batch']:>3} ({r['step_kernel']}): {x['period'] / r['period']:.3f}x "
                      f"faster than former {x['former']} ({r['period'] * 1e3:.3f} against {x['period'] * 1e3:.3f} ms)")
    result = {"command": " ".join(sys.argv), "machine": common.machine(device), "torch": torch.__version__,
              "model": args.model, "layers": args.layers, "compile": args.compile, "cuda_graph": graph,
              "dtype": str(dtype), "hbm_gbs": hbm, "rows": rows}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
