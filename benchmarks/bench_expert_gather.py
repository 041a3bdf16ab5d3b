"""The MoE decode gather from a budget's strided expert views: where does batch-1 decode lose its 13%?

`Experts.forward` decodes a few tokens (T x top-k <= experts / 2) by gathering the chosen experts'
weights, `up_proj[idx]` and `down_proj[idx]`, then two einsums. A budget served from one copy of the
weights (`serve/views.py`) holds *strided views* of the parent, up_proj[:e, :i, :d] and
down_proj[:e, :d, :i] (last dim stride 1, the other strides the parent's), and decodes slower
through them (0.87x of a sliced copy on an H200 at Nano shapes) than through a contiguous copy. This
benchmark times that decode, side by side in one run, for each budget cut (--cuts, e x i x d, views
of one --parent) and T tokens (--tokens) of top-k (--top-k) distinct random experts:

  a  contig          the einsum decode on a contiguous (e, i, d) copy (the sliced-copy reference)
  b  view            the same code on the strided views of the parent
  c  wide_i64/_c128  the gather from the view reinterpreted with a wider element (`w.view(int64)`,
                     8 bytes; `w.view(complex128)`, 16 bytes), `.view(bfloat16)` back, same einsums
  d  index_select    torch.index_select(w, 0, idx.flatten()) on the view (bf16, and int64-wide);
     rows / rows_i64 index_select of the needed rows of the parent: the view as_strided to 2-D rows
                     (row stride the parent's), rows expert * (stride0 / stride1) + arange(i)
  e  grouped_mm      torch._grouped_mm on the view as the prefill path does (tokens sorted by
                     expert, offs = cumulative counts per expert, int32); also on the copy
                     (grouped_mm_contig). On CUDA bf16 only (on the CPU under --smoke: wiring)
  m  model           Experts.forward itself on the views: what a served budget runs (the gather in wide
                     words at 1 token; from 2 tokens on a GPU, the grouped GEMM)
  f  loop_host       no gather: one matmul pair per chosen expert straight on the view, the expert
                     ids known on the host (not a drop-in: the model would have to sync for them)
  g  compiled        (b) under torch.compile (inductor on CUDA; aot_eager on the CPU, wiring only): what
                     `generate(compile="default")` runs at 1 token (and compile=True did until the fifty-fifth session)
     compiled_gemv   the same under inductor's coordinate descent tuning (generate.GEMV_OPTIONS, what
                     `generate(compile=True)` and the engine's compiled one-row step run at 1 token since the
                     fifty-fifth session): inductor then writes a product with one row (M = 1)
                     as a multiply-and-sum reduction, so the gather folds into it and each chosen expert's
                     weights are read once (1 x the bytes, where gather-and-einsum moves 3 x)
     fused           that product written out as broadcast multiplies and sums, under inductor's defaults

Each variant computes the same output (T, d) (routing weights applied); max |diff| against (a) is
printed and checked (bf16 tolerance; the gather variants should be bit-equal). Times are medians
(`common.timed` over --rounds x --sets calls, the expert sets cycled so that one call's experts are
not another's cached ones) in microseconds a call, eager and (on CUDA) replayed from a CUDA graph;
speed = t(a) / t(variant), so 0.87 means 13% slower than the copy. `gather` is the two gathers
alone. HBM = active expert bytes (T x k x i x d x 2 bytes x 2 for up and down) / time, as a share of
--hbm-gbs (the one after `gather us`: the gathers alone, counting their read and their write, 2 x the
bytes; the gather-and-einsum decode moves 3 x the bytes, so it cannot pass 33% of the bound). Deterministic
algorithms are off while timing (as train.py and the server run; --deterministic keeps them).

    python benchmarks/bench_expert_gather.py --json docs/results/expert_gather_h200.json   # a GPU
    python benchmarks/bench_expert_gather.py --device cpu --smoke                         # CPU: wiring only
A variant that fails (an unsupported view, _grouped_mm's stride checks) is reported with its error.
"""

from __future__ import annotations

import argparse
import datetime

import torch

import common
from star_elastic.generate import GEMV_OPTIONS
from star_elastic.model import Experts, activation, back_to_tokens, gathered_experts, scaled_activation

VARIANTS = ("model", "contig", "view", "wide_i64", "wide_c128", "index_select", "index_select_i64", "rows", "rows_i64",
            "grouped_mm", "grouped_mm_contig", "loop_host", "compiled", "compiled_gemv", "fused")
GATHERED = {"contig", "view", "wide_i64", "wide_c128", "index_select", "index_select_i64", "rows", "rows_i64"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device")
    ap.add_argument("--parent", default="128x1856x2688", help="the parent's experts x intermediate x hidden")
    ap.add_argument("--cuts", default="128x1856x2688,96x1536x2304,64x1280x1792",
                    help="budget cuts, e x i x d each (views of the parent's leading slices)")
    ap.add_argument("--tokens", default="1,4", help="T, tokens decoded at once")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sets", type=int, default=8, help="distinct expert choices cycled through (defeats L2 reuse)")
    ap.add_argument("--rounds", type=int, default=5, help="passes over the sets per timed sample")
    ap.add_argument("--iters", type=int, default=20, help="timed samples (the median is kept)")
    ap.add_argument("--no-graph", action="store_true", help="eager only (CUDA graphs are used on CUDA otherwise)")
    ap.add_argument("--deterministic", action="store_true", help="keep common.setup's deterministic algorithms on")
    ap.add_argument("--hbm-gbs", type=float, default=common.HBM_GBS,
                    help=f"peak memory bandwidth, GB/s (default: {common.HBM_GBS:g}, an H200's)")
    ap.add_argument("--rtol", type=float, default=3e-2, help="max |diff| allowed, as a share of max |output of (a)|")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, top-2, a few iterations (CPU)")
    ap.add_argument("--json")
    return ap.parse_args(argv)


def shape(s: str) -> tuple[int, int, int]:
    e, i, d = (int(v) for v in s.lower().split("x"))
    return e, i, d


# ----------------------------------------------------------------------------- the variants

def gather_index(w, idx):
    return w[idx]  # plain indexing, what Experts.forward did before gather_experts: (T, k, rows, cols), contiguous


def gather_wide(dtype):
    def gather(w, idx):
        return w.view(dtype)[idx].view(w.dtype)
    return gather


def gather_index_select(dtype=None):
    def gather(w, idx):
        src = w if dtype is None else w.view(dtype)
        out = torch.index_select(src, 0, idx.flatten())
        out = out if dtype is None else out.view(w.dtype)
        return out.view(*idx.shape, *w.shape[1:])
    return gather


def gather_rows(dtype=None):
    """index_select of the chosen experts' rows from the view seen as the parent's 2-D rows."""
    def gather(w, idx):
        e, r, c = w.shape
        s0, s1 = w.stride(0), w.stride(1)
        assert w.stride(2) == 1 and s0 % s1 == 0, f"rows need stride(2) 1 and stride(0) a multiple of stride(1): {w.stride()}"
        rows2d = w.as_strided(((e - 1) * (s0 // s1) + r, c), (s1, 1))  # storage offset kept: the view's
        rows = (idx.flatten()[:, None] * (s0 // s1) + torch.arange(r, device=w.device)).flatten()
        src = rows2d if dtype is None else rows2d.view(dtype)
        out = torch.index_select(src, 0, rows)
        out = out if dtype is None else out.view(w.dtype)
        return out.view(*idx.shape, r, c)
    return gather


def einsum_decode(act, x, up_g, down_g, weights):
    """Experts.forward's decode branch after its gathers."""
    return gathered_experts(act, x, up_g, down_g, weights)


def grouped_mm_decode(act, x, up, down, idx, weights):
    """Experts.forward's grouped-GEMM branch (the prefill path), on whatever up/down are."""
    k = idx.shape[1]
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    token = order // k
    xs = x[token]
    counts = flat.new_zeros(up.shape[0]).index_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    h = scaled_activation(torch._grouped_mm(xs, up.transpose(1, 2), offs=offs), act,
                          copies=weights.flatten()[order, None])
    return back_to_tokens(torch._grouped_mm(h, down.transpose(1, 2), offs=offs), order, k)


def loop_host_decode(act, x, up, down, idx_host, weights):
    """One matmul pair per (token, expert) straight on the (strided) weights; expert ids from the host."""
    out = torch.zeros_like(x)
    for t, row in enumerate(idx_host):
        for j, ex in enumerate(row):
            y = act(x[t:t + 1] @ up[ex].T) @ down[ex].T
            out[t:t + 1] += y * weights[t:t + 1, j:j + 1].to(y.dtype)
    return out


def fused_decode(act, x, up, down, idx, weights):
    """gathered_experts' product as broadcast multiplies and sums on the gathered experts (T, k, I, D) and
    (T, k, D, I): no matrix product, so under torch.compile one reduction kernel each that reads the chosen
    experts through idx (the gather folded in) and accumulates in fp32."""
    h = (x[:, None, None, :] * up[idx]).sum(-1)  # (T, k, I)
    h = scaled_activation(h, act, copies=weights[..., None])
    return (h[:, :, None, :] * down[idx]).sum(-1).sum(1).to(x.dtype)  # (T, k, D) summed over the k


def compiled(fn, device, options=None):
    """fn under torch.compile: inductor on CUDA (with `options`, inductor's), aot_eager elsewhere (the CPU checks
    the wiring; inductor's C++ there is slow to build and is not what a GPU runs)."""
    if device.type != "cuda":
        return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
    return torch.compile(fn, fullgraph=True, dynamic=False, options=options)


def experts_on(views, act) -> Experts:
    """An Experts module holding `views` (up, down) as its weights, as serve/views.py gives a budget."""
    ex = Experts.__new__(Experts)
    torch.nn.Module.__init__(ex)
    ex.up_proj = torch.nn.Parameter(views[0], requires_grad=False)
    ex.down_proj = torch.nn.Parameter(views[1], requires_grad=False)
    ex.act = act
    return ex


def make_variant(name, act, views, copies, device):
    """(gather or None, full decode fn(x, idx, idx_host, weights)) for variant `name`."""
    if name in ("compiled", "compiled_gemv", "fused"):
        up, down = views
        fn = compiled((lambda x, idx, w: fused_decode(act, x, up, down, idx, w)) if name == "fused"
                      else (lambda x, idx, w: gathered_experts(act, x, up[idx], down[idx], w)), device,
                      GEMV_OPTIONS if name == "compiled_gemv" else None)
        return None, lambda x, idx, idx_host, w: fn(x, idx, w)
    if name == "model":
        ex = experts_on(views, act)
        return None, lambda x, idx, idx_host, w: ex(x, idx, w)
    if name in GATHERED:
        up, down = copies if name == "contig" else views
        g = {"contig": gather_index, "view": gather_index, "wide_i64": gather_wide(torch.int64),
             "wide_c128": gather_wide(torch.complex128), "index_select": gather_index_select(),
             "index_select_i64": gather_index_select(torch.int64), "rows": gather_rows(),
             "rows_i64": gather_rows(torch.int64)}[name]
        gather = lambda idx: (g(up, idx), g(down, idx))  # noqa: E731
        return gather, lambda x, idx, idx_host, w: einsum_decode(act, x, *gather(idx), w)
    if name in ("grouped_mm", "grouped_mm_contig"):
        up, down = copies if name == "grouped_mm_contig" else views
        return None, lambda x, idx, idx_host, w: grouped_mm_decode(act, x, up, down, idx, w)
    if name == "loop_host":
        up, down = views
        return None, lambda x, idx, idx_host, w: loop_host_decode(act, x, up, down, idx_host, w)
    raise ValueError(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")


# ----------------------------------------------------------------------------- timing

def time_calls(call, n_sets, args, device, graph: bool) -> float:
    """Microseconds a call: `call(s)` for s over the sets, --rounds times a sample, median of --iters
    samples (common.timed); with `graph`, one CUDA graph of a pass over the sets, replayed."""
    if graph:
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up on a side stream before capture, as the docs ask
            for s in range(n_sets):
                call(s)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(g):
            for s in range(n_sets):
                call(s)

        def run():
            for _ in range(args.rounds):
                g.replay()
    else:
        def run():
            for _ in range(args.rounds):
                for s in range(n_sets):
                    call(s)
    t = common.timed(run, device, warmup=2, iters=args.iters)
    return t / (args.rounds * n_sets) * 1e6


def bench_config(cut, T, parent, act, args, device, variants, modes) -> dict:
    e, i, d = cut
    k = args.top_k
    up_p, down_p = parent
    views = (up_p[:e, :i, :d], down_p[:e, :d, :i])  # what serve/views.py gives a budget's Experts
    copies = (views[0].clone(memory_format=torch.contiguous_format), views[1].clone(memory_format=torch.contiguous_format))
    gen = torch.Generator(device="cpu").manual_seed(1000 * T + e)
    x = torch.randn(T, d, generator=gen).to(device, torch.bfloat16)
    sets = [torch.randperm(e, generator=gen)[:T * k].view(T, k) for _ in range(args.sets)]
    idx_host = [s.tolist() for s in sets]
    idx = [s.to(device) for s in sets]
    weights = [torch.rand(T, k, generator=gen).to(device) for _ in sets]
    weights = [w / w.sum(-1, keepdim=True) * 2.5 for w in weights]  # normalised, routed_scaling_factor 2.5
    active = T * k * i * d * 2 * 2  # bf16 up + down of the chosen experts

    row = {"e": e, "i": i, "d": d, "tokens": T, "top_k": k, "active_bytes": active,
           "view_strides": {"up": list(views[0].stride()), "down": list(views[1].stride())},
           "view_contiguous": views[0].is_contiguous(), "variants": {}}
    ref = None
    with torch.no_grad():
        for name in variants:
            v = {}
            row["variants"][name] = v
            try:
                if name.startswith("grouped_mm") and not (hasattr(torch, "_grouped_mm") and (device.type == "cuda" or args.smoke)):
                    raise RuntimeError("needs torch._grouped_mm on CUDA (bf16)")
                gather, fn = make_variant(name, act, views, copies, device)
                outs = [fn(x, idx[s], idx_host[s], weights[s]) for s in range(len(sets))]
                if ref is None:
                    if name != "contig":
                        raise RuntimeError("the first variant must be 'contig' (the reference)")
                    ref = outs
                diff = max(float((o.float() - r.float()).abs().max()) for o, r in zip(outs, ref))
                scale = max(float(r.float().abs().max()) for r in ref)
                v.update(max_abs_diff=diff, exact=all(torch.equal(o, r) for o, r in zip(outs, ref)),
                         within_tol=diff <= args.rtol * scale + 1e-6, ref_max_abs=scale)
                if name == "model":  # what a served budget computes, against the sliced copy's gather
                    row["model_forward_equals_contig"] = v["exact"]
                for mode in modes:
                    graph = mode == "graph"
                    try:
                        us = time_calls(lambda s, fn=fn: fn(x, idx[s], idx_host[s], weights[s]), len(sets), args, device, graph)
                        v[f"{mode}_us"] = us
                        v[f"{mode}_hbm_fraction"] = common.bandwidth_share(active, us * 1e-6, args.hbm_gbs)
                        if gather is not None:
                            gus = time_calls(lambda s, g=gather: g(idx[s]), len(sets), args, device, graph)
                            v[f"{mode}_gather_us"] = gus
                            v[f"{mode}_gather_hbm_fraction"] = common.bandwidth_share(2 * active, gus * 1e-6, args.hbm_gbs)
                    except Exception as exc:  # e.g. a capture that fails: the other mode may still stand
                        v[f"{mode}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            except Exception as exc:
                v["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    a = row["variants"].get("contig", {})
    for v in row["variants"].values():
        for mode in modes:
            if f"{mode}_us" in v and f"{mode}_us" in a:
                v[f"{mode}_speed_vs_contig"] = a[f"{mode}_us"] / v[f"{mode}_us"]
    return row


def print_config(row, modes, device):
    hdr = (f"\ncut e={row['e']} i={row['i']} d={row['d']}, T={row['tokens']} x top-{row['top_k']}: "
           f"{row['active_bytes'] / 1e6:.1f} MB of active expert weights; view strides up {tuple(row['view_strides']['up'])} "
           f"down {tuple(row['view_strides']['down'])}{' (contiguous: the parent itself)' if row['view_contiguous'] else ''}")
    if "model_forward_equals_contig" in row:
        hdr += f"; Experts.forward on the views bit-equal to (a): {row['model_forward_equals_contig']}"
    print(hdr)
    cols = "".join(f" | {m:>5} us  speed   HBM gather us   HBM" for m in modes)
    print(f"  {'variant':<18}{cols} | max|diff|  exact ok")
    for name, v in row["variants"].items():
        if "error" in v:
            print(f"  {name:<18} | error: {v['error']}")
            continue
        line = f"  {name:<18}"
        for m in modes:
            if f"{m}_us" in v:
                g = (f"{v[m + '_gather_us']:9.1f} {v[m + '_gather_hbm_fraction']:5.1%}" if f"{m}_gather_us" in v
                     else f"{'-':>9} {'-':>5}")
                line += (f" | {v[m + '_us']:8.1f} {v.get(m + '_speed_vs_contig', float('nan')):5.2f}x "
                         f"{v[m + '_hbm_fraction']:5.1%} {g}")
            else:
                line += f" | {'error: ' + v.get(m + '_error', '?'):<39.39}"
        line += f" | {v['max_abs_diff']:9.2e}  {'yes' if v['exact'] else 'no ':<5} {'ok' if v['within_tol'] else 'FAIL'}"
        print(line, flush=True)
    for m in modes:
        errs = {n: v[f"{m}_error"] for n, v in row["variants"].items() if f"{m}_error" in v}
        for n, err in errs.items():
            print(f"  {n} ({m}): {err}")


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        if args.parent == parse_args([]).parent:
            args.parent, args.cuts, args.top_k = "32x48x64", "32x48x64,24x40x48,16x32x32", 2
        args.sets, args.rounds, args.iters = 2, 1, 3
    # timed as the server runs (index_add_ and empty() unhindered) unless --deterministic
    device = common.setup(args.device, deterministic=args.deterministic)
    variants = [v for v in args.variants.split(",") if v]
    if variants[0] != "contig":
        variants = ["contig"] + [v for v in variants if v != "contig"]  # (a) is every ratio's reference
    modes = ["eager"] + (["graph"] if device.type == "cuda" and not args.no_graph else [])
    E, I, D = shape(args.parent)
    cuts = [shape(c) for c in args.cuts.split(",")]
    for e, i, d in cuts:
        if e > E or i > I or d > D:
            raise SystemExit(f"cut {e}x{i}x{d} is larger than the parent {E}x{I}x{D}")
    tokens = [int(t) for t in args.tokens.split(",")]
    for T in tokens:
        if T * args.top_k > min(c[0] for c in cuts):
            raise SystemExit(f"T x top-k = {T * args.top_k} distinct experts do not fit in a cut's experts")
    act = activation("relu2")  # Nemotron-H's expert activation (ModelConfig's default)
    gen = torch.Generator(device=device).manual_seed(0)  # made on the device: 2 x 1.3 GB at Nano's shapes
    up_p = torch.randn(E, I, D, generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02)
    down_p = torch.randn(E, D, I, generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02)
    print(f"MoE decode gather from strided expert views on {common.machine(device)}, torch {torch.__version__}: "
          f"parent {E}x{I}x{D} bf16, top-{args.top_k}, {args.sets} expert sets cycled, median of {args.iters} x "
          f"{args.rounds * args.sets} calls; speed = t(contig) / t(variant); HBM share of {args.hbm_gbs:g} GB/s; "
          f"deterministic algorithms {'on' if torch.are_deterministic_algorithms_enabled() else 'off'}; "
          f"torch._grouped_mm {'present' if hasattr(torch, '_grouped_mm') else 'absent'}", flush=True)
    result = {"benchmark": "bench_expert_gather", "date": datetime.date.today().isoformat(),
              "machine": common.machine(device), "torch": torch.__version__, "smoke": args.smoke,
              "hbm_gbs": args.hbm_gbs, "parent": [E, I, D], "top_k": args.top_k, "sets": args.sets,
              "rounds": args.rounds, "iters": args.iters, "modes": modes,
              "deterministic": torch.are_deterministic_algorithms_enabled(), "rows": []}
    failed = []
    for cut in cuts:
        for T in tokens:
            row = bench_config(cut, T, (up_p, down_p), act, args, device, variants, modes)
            print_config(row, modes, device)
            result["rows"].append(row)
            failed += [f"{name} at {cut[0]}x{cut[1]}x{cut[2]} T={T} (max |diff| {v['max_abs_diff']:.2e})"
                       for name, v in row["variants"].items() if "within_tol" in v and not v["within_tol"]]
            if args.json:  # after each configuration: a run cut short keeps what it finished
                common.write_json(args.json, result)
    if args.json:
        print(f"wrote {args.json}")
    assert not failed, "outputs differ beyond bf16 tolerance: " + "; ".join(failed)
    print("all variants' outputs agree with (a) within tolerance")
    return result


if __name__ == "__main__":
    main()
