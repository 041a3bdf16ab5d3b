"""Serving every budget from one elastic checkpoint: speed and memory of budget views (issue 5).

Measured side by side in one run, on one machine:
  1. decode and prefill tokens/s of each budget's view vs the same budget sliced standalone (target >= 0.95x);
     the decode steps alone (generate's time less that of one new token: the prefill), against the weights a
     step reads over the card's bandwidth (common.step_weight_bytes, common.hbm_gbs)
  2. budget switch latency: building a view (then cached) vs loading the sliced budget from disk
  3. resident memory: all budgets from one checkpoint vs each budget loaded standalone
     (CPU: bytes of distinct tensor storages; GPU: torch.cuda.memory_allocated)
  4. tokens/s of each budget relative to the full model
  5. elastic budget control: think with the smallest budget, answer with the full one, vs the full
     model for both (same token counts: speed does not depend on what the tokens say)
  6. F.linear / bmm on strided weight views vs contiguous copies (no silent per-call copy)
  7. compact views (the default) against grouped ones (--compact both): where a budget keeps heads per
     group outside the serving head order, compact views copy those parts once (views.copied_bytes,
     reported per budget next to the parent's and the sliced copy's size) and run plain GEMMs
  8. a diagnostic of the view/sliced decode gap (--contiguous-views, off by default): each budget below the
     full model's view again, with only some of its strided tensors replaced by contiguous copies (the
     routed experts' up/down weights, the non-contiguous Linear/conv weights, or every non-contiguous
     tensor), timed against the sliced copy as in 1; the parent is left untouched

Without --ckpt it builds its own checkpoint, untrained (quality does not matter for speed): the
parent (SmolLM2-135M, or a random hybrid Nemotron-H with --model hybrid, or a tiny one with --smoke)
with budget architectures from the zero-shot search. Imports neither FastAPI nor uvicorn.

    python benchmarks/bench_serve.py --smoke
    python benchmarks/bench_serve.py --model smollm2 --out docs/results/serve_cpu_smollm2.json
    python benchmarks/bench_serve.py --device cuda --model hybrid --out docs/results/serve_h100_hybrid.json
    python benchmarks/bench_serve.py --device cuda --model nano --head-order serving   # no copies, reorders a token
    python benchmarks/bench_serve.py --device cuda --model nano --compact both  # copies vs grouped bmm
    python benchmarks/bench_serve.py --device cuda --model nano --contiguous-views none,experts,linear,all

Views run over the parent as loaded, with compact copies of the parts kept per group (`--head-order loaded`, the
engine's default since the thirty-ninth session), or (`--head-order serving`) in the serving head order
(serve/order.py) where every budget allows it. Until the thirty-ninth session the serving order was this
benchmark's default: a command recorded before then without `--grouped-views` ran `--head-order serving`
(`--grouped-views`, kept for those records, is `--head-order loaded`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from star_elastic import load  # noqa: E402
from star_elastic.elastic import slice_model  # noqa: E402
from star_elastic.elastic.checkpoint import budget_names, load_elastic, save_elastic  # noqa: E402
from star_elastic.elastic.cost import parse_budget  # noqa: E402
from star_elastic.elastic.router import Router  # noqa: E402
from star_elastic.elastic.search import DEFAULT_AXES, applicable_axes, choose_spec  # noqa: E402
from star_elastic.elastic.slicing import export  # noqa: E402
from star_elastic.generate import generate  # noqa: E402
from star_elastic.model import Experts, Model, ModelConfig  # noqa: E402
from star_elastic.serve.order import serving_order_fits, use_serving_order  # noqa: E402
from star_elastic.serve.views import GroupedLinear, PartsConv1d, budget_view, copied_bytes, shares_storage  # noqa: E402

HYBRID = dict(vocab_size=32000, hidden_size=1536, layer_types="M*M-MEM*M-ME", num_attention_heads=16,
              num_key_value_heads=4, head_dim=96, intermediate_size=4096, mamba_num_heads=32, mamba_head_dim=64,
              ssm_state_size=64, n_groups=4, chunk_size=128, n_routed_experts=16, num_experts_per_tok=2,
              moe_intermediate_size=768, moe_shared_expert_intermediate_size=1536, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=128, layer_types="M*EM-*", num_attention_heads=8, num_key_value_heads=2,
            head_dim=16, intermediate_size=256, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
            chunk_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
            moe_shared_expert_intermediate_size=128, max_position_embeddings=1024)


def parent_config(kind: str, layers: str | None = None) -> ModelConfig:
    """The config of the parent `build_checkpoint` makes for `kind` (smollm2: its shapes). `layers`: nano's
    widths with another layer pattern (M Mamba, E MoE, * attention; default `M*EM`), e.g. Nano's own mix."""
    if layers is not None and kind != "nano":
        raise SystemExit(f"--layers is for --model nano (got --model {kind})")
    if kind == "smollm2":
        return common.smollm2_config()
    return common.nano_config(layers or "M*EM") if kind == "nano" else ModelConfig(**{"hybrid": HYBRID}.get(kind, TINY))


def budget_specs(cfg: ModelConfig, budgets: list[str]) -> tuple[list, list]:
    """(parsed budgets, the zero-shot search's homogeneous architecture for each): what the untrained
    checkpoints of these benchmarks serve."""
    parsed = [parse_budget(b, cfg) for b in budgets]
    axes = [a for a in DEFAULT_AXES if a in applicable_axes(cfg)]
    return parsed, [choose_spec(cfg, int(b.target), axes) for b in parsed]


def build_checkpoint(kind: str, budgets: list[str], out: Path, layers: str | None = None, device=None) -> Path:
    """An untrained elastic checkpoint: the parent plus the zero-shot search's homogeneous architecture per budget.
    `layers`: see `parent_config`. `device` (a GPU): the random parent drawn there and saved in bf16, for parents
    of ten billion parameters and more, whose fp32 draw on the CPU takes minutes (and 4 bytes a parameter)."""
    tokenizer = None
    if kind == "smollm2":
        from star_elastic.assets import smollm2_gguf
        from star_elastic.hf import load_tokenizer

        path = smollm2_gguf()
        model, tokenizer = load(path, dtype=torch.float32), load_tokenizer(path)
    else:
        torch.manual_seed(0)
        # nano: Nemotron 3 Nano's widths with 4 layers (2.1B parameters), the shapes issue 12's targets are set at
        with torch.device(device or "cpu"):
            model = common.scaled_normal_(Model(parent_config(kind, layers)))
        if device is not None and torch.device(device).type == "cuda":
            model = model.to(torch.bfloat16)
    cfg = model.config
    parsed, specs = budget_specs(cfg, budgets)
    router = Router(cfg, parsed)
    router.spec = lambda i: specs[i]  # the searched architectures stand in for a trained router's argmax
    return save_elastic(model, router, parsed, out, tokenizer=tokenizer)


def side_by_side(fns: dict, reps: int, device) -> dict:
    """Median seconds of each fn, run interleaved (a, b, a, b, ...) after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(common.timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def first_diff(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first position where token sequences a and b differ (a length where one is a prefix), None if equal."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n].to(a.device)).nonzero()
    return int(diff[0]) if len(diff) else (None if len(a) == len(b) else n)


def storage_bytes(*models) -> int:
    seen = {}
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            s = t.untyped_storage()
            seen[(s.device.type, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


CONTIGUOUS_MODES = ("none", "experts", "linear", "all")


def tensor_pointers(model: nn.Module) -> dict:
    """(data_ptr, shape, stride) of every named parameter and buffer: equal before and after means untouched."""
    return {n: (t.data_ptr(), tuple(t.shape), t.stride()) for n, t in
            list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))}


@torch.no_grad()
def contiguous_copies(view: Model, mode: str) -> tuple[list[str], int]:
    """Replace, in `view`'s own modules only, the chosen non-contiguous tensors by contiguous copies:
    `experts` the routed experts' up/down weights (MoE layers), `linear` every nn.Linear and nn.Conv1d
    weight, `all` every parameter and buffer; `none` nothing. The parent's tensors (which the view's
    were views of) are not written. A tensor shared by several modules (tied weights) gets one copy,
    which every holder then holds.
    The names are appended to `view.copied` (so `shares_storage` still holds). Returns (names, bytes
    of the copies)."""
    if mode not in CONTIGUOUS_MODES:
        raise ValueError(f"contiguous-views mode {mode!r}: one of {', '.join(CONTIGUOUS_MODES)}")
    nbytes, done = 0, {}
    for _, m in view.named_modules():
        if mode == "experts":
            chosen = ["up_proj", "down_proj"] if isinstance(m, Experts) else []
        elif mode == "linear":
            chosen = ["weight"] if isinstance(m, (nn.Linear, nn.Conv1d)) else []
        else:
            chosen = list(m._parameters) + list(m._buffers) if mode == "all" else []
        for leaf in chosen:
            t = m._parameters[leaf] if leaf in m._parameters else m._buffers[leaf]
            if t is None or t.is_contiguous() or id(t) in done:
                continue
            c = t.detach().clone(memory_format=torch.contiguous_format)
            done[id(t)] = (t, nn.Parameter(c, requires_grad=False) if isinstance(t, nn.Parameter) else c)
            nbytes += c.numel() * c.element_size()
    names = []  # every place that held a chosen tensor (tied weights stay tied: one copy)
    for prefix, m in view.named_modules(remove_duplicate=False):
        for table in (m._parameters, m._buffers):
            for leaf, t in table.items():
                if t is not None and id(t) in done:
                    table[leaf] = done[id(t)][1]  # (done holds the old tensor too: its id stays its own)
                    names.append(f"{prefix}.{leaf}" if prefix else leaf)
    view.copied.extend(names)
    return names, nbytes


def contiguous_diagnostic(parent: Model, specs: dict, sliced: dict, prompt: torch.Tensor, modes: list[str],
                          compact: bool, new_tokens: int, reps: int, device) -> dict:
    """8. For each budget below the full model: a fresh view per mode (`budget_view`, as the comparison
    builds them), `contiguous_copies` applied to it, and its decode timed against the sliced copy by
    `side_by_side` over `generate`, as in 1 (the plain view, mode `none`, is always among them)."""
    modes = ["none"] + [m for m in modes if m != "none"]
    before = tensor_pointers(parent)
    rows = []
    for n, spec in specs.items():
        if spec.num_parameters(parent.config) >= parent.num_parameters():
            continue  # the full model: its view holds the parent's own (contiguous) tensors
        views, copied = {}, {}
        for m in modes:
            views[m] = budget_view(parent, spec, compact=compact)
            copied[m] = contiguous_copies(views[m], m)
        s = sliced[n]
        gen_t = side_by_side({**{m: (lambda v=views[m]: generate(v, prompt, new_tokens)) for m in modes},
                              "sliced": lambda: generate(s, prompt, new_tokens)}, reps, device)
        want = generate(s, prompt, new_tokens)
        for m in modes:
            left = [k for k, t in list(views[m].named_parameters()) + list(views[m].named_buffers())
                    if not t.is_contiguous()]
            rows.append({"budget": n, "mode": m, "decode_tok_s": new_tokens / gen_t[m],
                         "decode_tok_s_sliced": new_tokens / gen_t["sliced"], "decode_ratio": gen_t["sliced"] / gen_t[m],
                         "copy_bytes": copied[m][1], "copied": copied[m][0], "non_contiguous_left": left,
                         "greedy_equal": torch.equal(generate(views[m], prompt, new_tokens), want)})
        print(f"  contiguous-views, budget {n}: " + ", ".join(f"{r['mode']} {r['decode_ratio']:.3f}x" for r in rows
                                                         if r["budget"] == n) + " of the sliced copy's decode", flush=True)
        del views
        if device.type == "cuda":
            torch.cuda.empty_cache()
    unchanged = tensor_pointers(parent) == before
    assert unchanged, "contiguous-views diagnostic changed the parent's tensors"
    return {"modes": modes, "compact": compact, "rows": rows, "parent_unchanged": unchanged}


def matmul_checks(parent: Model, device, dtype, tokens: list[int], reps: int) -> list[dict]:
    """F.linear on a column-prefix view (lm_head, MLP) and the grouped bmm views vs contiguous copies."""
    from star_elastic.serve.views import GroupedLinear, grouped

    D = parent.config.hidden_size
    W = parent.lm_head.weight
    h = (D * 3 // 4) // 8 * 8
    rows = []
    G = 4
    Wo = torch.randn(D, 4 * 4 * 64, device=device, dtype=dtype)
    cases = {"lm_head[:, :h] (column prefix)": (W[:, :h], None),
             "o_proj heads per group (grouped columns)": (grouped(Wo[:h], 1, G, G, 2 * 64), "cols"),
             "q_proj heads per group (grouped rows)": (grouped(Wo.T[:, :h], 0, G, G, 2 * 64), "rows")}
    for name, (w, mode) in cases.items():
        for n in tokens:
            if mode is None:
                x = torch.randn(n, h, device=device, dtype=dtype)
                view_fn, copy = (lambda x=x, w=w: F.linear(x, w)), w.contiguous()
                copy_fn = lambda x=x, c=copy: F.linear(x, c)  # noqa: E731
            else:
                lin = GroupedLinear([w], in_groups=mode == "cols")
                # the same kept weight as one contiguous matrix: what the sliced model multiplies by
                copy = w.contiguous().flatten(1) if mode == "cols" else w.contiguous().flatten(0, 1)
                x = torch.randn(n, copy.shape[1], device=device, dtype=dtype)
                view_fn, copy_fn = (lambda x=x, m=lin: m(x)), (lambda x=x, c=copy: F.linear(x, c))
            k = 20 if device.type == "cpu" else 200

            def loop(f, k=k):
                for _ in range(k):
                    f()

            t = side_by_side({"view": lambda: loop(view_fn), "contiguous": lambda: loop(copy_fn)}, reps, device)
            rows.append({"op": name, "tokens": n, "view_us": t["view"] / k * 1e6, "contiguous_us": t["contiguous"] / k * 1e6,
                         "ratio": t["contiguous"] / t["view"]})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="an elastic checkpoint (default: build one)")
    ap.add_argument("--model", choices=["smollm2", "hybrid", "nano", "tiny"], help="parent to build (default smollm2; tiny with --smoke)")
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--think-tokens", type=int, default=96)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens: a quick CPU check")
    ap.add_argument("--head-order", choices=["loaded", "serving"], default="loaded",
                    help="the parent's heads as loaded, parts kept per group copied (compact) or run grouped (the "
                         "engine's default), or in the serving head order where it fits")
    ap.add_argument("--grouped-views", dest="head_order", action="store_const", const="loaded",
                    help="the same as --head-order loaded (older records)")
    ap.add_argument("--compact", choices=["on", "off", "both"], default="both",
                    help="views with compact copies of grouped parts (on, the engine's default), grouped bmm views "
                         "(off), or both side by side (the first row of each budget is compact)")
    ap.add_argument("--contiguous-views", metavar="MODES",
                    help="diagnostic (default: off): for each budget below 1.0, views whose chosen tensors are "
                         "contiguous copies, timed against the sliced copy; comma-separated of "
                         f"{','.join(CONTIGUOUS_MODES)} (experts: routed experts' up/down weights; linear: non-contiguous "
                         "Linear/conv weights; all: every non-contiguous tensor; none: the plain view, always timed)")
    ap.add_argument("--compile", nargs="?", const="default", choices=["default", "gemv"],
                    help="decode through torch.compile'd steps, views and sliced copies alike: --compile (default): "
                         "generate(compile='default'), inductor's defaults, fused elementwise kernels; --compile gemv: "
                         "generate(compile='gemv'), inductor's coordinate descent tuning, one-row products as "
                         "tuned reductions with the MoE gather folded in (generate.GEMV_OPTIONS; what "
                         "generate(compile=True) runs at batch 1 since the fifty-fifth session)")
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args()
    contiguous_modes = args.contiguous_views.split(",") if args.contiguous_views else []
    if any(m not in CONTIGUOUS_MODES for m in contiguous_modes):
        ap.error(f"--contiguous-views takes a comma-separated list of {', '.join(CONTIGUOUS_MODES)}")
    if args.smoke:
        args.model = args.model or "tiny"
        args.prompt_len, args.new_tokens, args.think_tokens, args.answer_tokens = 16, 8, 16, 8
    args.model = args.model or "smollm2"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or
                                                                  ("bfloat16" if device.type == "cuda" else "float32")]
    work = common.scratch_dir("bench_serve_")  # the built checkpoint and the sliced exports: removed at exit
    t0 = common.clock(device)
    ckpt_dir = Path(args.ckpt) if args.ckpt else build_checkpoint(args.model, args.budgets.split(","), work / "ckpt")
    build_s = common.clock(device) - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base_mem = torch.cuda.memory_allocated()
    ckpt = load_elastic(ckpt_dir, dtype=dtype, device=device)
    parent = ckpt.model.eval().requires_grad_(False)
    names = budget_names(ckpt.manifest)
    specs = {n: ckpt.spec(n) for n in names}
    print(f"checkpoint {ckpt_dir} ({'built in %.0f s' % build_s if not args.ckpt else 'given'}): "
          f"{parent.num_parameters() / 1e6:.1f}M parameters, budgets {', '.join(names)}; {device}, {dtype}", flush=True)

    # --head-order serving (order.py): where every budget keeps every KV group, heads become prefixes
    serving_order = args.head_order == "serving" and serving_order_fits(parent.config, list(specs.values()))
    if serving_order:
        use_serving_order(parent)
    print(f"serving head order: {'on' if serving_order else 'off'}", flush=True)

    # 2. switch latency: a view is built once (then cached); the alternative loads the sliced budget from disk.
    # The first mode's views (compact, unless --compact off) are the ones the memory figure counts
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.compact]
    views, build_ms = {c: {} for c in modes}, {c: {} for c in modes}
    for c in modes:
        for n in names:
            t = common.timed(lambda: views[c].__setitem__(n, budget_view(parent, specs[n], compact=c)), device)
            build_ms[c][n] = t * 1e3
        if c == modes[0]:
            # 3. memory: one parent + every view (the copies of compact views included), against every
            # budget loaded standalone
            if device.type == "cuda":
                serving_bytes = torch.cuda.memory_allocated() - base_mem
            else:
                serving_bytes = storage_bytes(parent, *views[c].values())
    assert all(shares_storage(v, parent) for vs in views.values() for v in vs.values())
    grouped_parts = {c: {n: [k for k, m in v.named_modules() if isinstance(m, (GroupedLinear, PartsConv1d))]
                         for n, v in views[c].items()} for c in modes}
    sliced, standalone_bytes, load_s, sliced_bytes = {}, 0, {}, {}
    if serving_order:  # slice the parent as loaded (the views, in place, are back in order below)
        use_serving_order(parent, False)
    for n in names:
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        sliced[n] = slice_model(parent, specs[n]).eval().requires_grad_(False)
        standalone_bytes += (torch.cuda.memory_allocated() - before) if device.type == "cuda" else storage_bytes(sliced[n])
        sliced_bytes[n] = storage_bytes(sliced[n])
        export(sliced[n].cpu() if device.type == "cuda" else sliced[n], work / f"sliced-{n}")
        if device.type == "cuda":
            sliced[n] = sliced[n].to(device)
        load_s[n] = common.timed(lambda: load(work / f"sliced-{n}", dtype=dtype, device=device), device)
    if serving_order:
        use_serving_order(parent)
    parent_bytes = storage_bytes(parent)
    print(f"memory: all {len(names)} budgets from one checkpoint {serving_bytes / 2**20:.1f} MiB "
          f"({'compact' if modes[0] else 'grouped'} views, copies included), each loaded standalone "
          f"{standalone_bytes / 2**20:.1f} MiB (ratio {serving_bytes / standalone_bytes:.3f})", flush=True)
    for n in names:
        for c in modes:
            v = views[c][n]
            print(f"  budget {n}, compact {'on' if c else 'off'}: copied {copied_bytes(v) / 2**20:.2f} MiB "
                  f"({len(v.copied)} tensors) next to the parent's {parent_bytes / 2**20:.1f} MiB and the sliced copy's "
                  f"{sliced_bytes[n] / 2**20:.1f} MiB; grouped modules: {len(grouped_parts[c][n])}", flush=True)

    # 1 + 4. tokens/s: view vs sliced, every budget vs the full model
    g = torch.Generator().manual_seed(0)
    V = parent.config.vocab_size
    prompt = torch.randint(3, V, (1, args.prompt_len), generator=g).to(device)
    rows = []
    hbm = common.hbm_gbs(device)  # the card's peak (an H100 3,350 GB/s); a CPU's stand-in is common.HBM_GBS

    def gen(model, ids, new_tokens):
        return generate(model, ids, new_tokens, compile=args.compile or False)

    for n in names:
        s = sliced[n]
        # views of both modes and the sliced copy, interleaved; a mode whose views hold no grouped part
        # (no copies either) is the same model as compact off, so only the first such is timed
        timed = [c for c in modes if c == modes[0] or grouped_parts[c][n] or grouped_parts[modes[0]][n]]
        gen_fns = {c: (lambda v=views[c][n]: gen(v, prompt, args.new_tokens)) for c in timed}
        # generate's time includes the prompt's prefill (eager); one new token is prefill and no decode step,
        # so the difference is the new_tokens - 1 decode steps alone (the same captured step: one length bucket)
        gen_t = side_by_side({**gen_fns, "sliced": lambda: gen(s, prompt, args.new_tokens),
                              ("first", timed[0]): lambda: gen(views[timed[0]][n], prompt, 1),
                              ("first", "sliced"): lambda: gen(s, prompt, 1)}, args.reps, device)
        steps_tok_s = {k: (args.new_tokens - 1) / max(gen_t[k] - gen_t[("first", k)], 1e-9)
                       for k in (timed[0], "sliced")}
        weight_bytes = common.step_weight_bytes(views[modes[0]][n].config, views[modes[0]][n], 1)
        with torch.no_grad():
            pre_t = side_by_side({**{c: (lambda v=views[c][n]: v(prompt, last_only=True)) for c in timed},
                                  "sliced": lambda: s(prompt, last_only=True)}, args.reps, device)
        want = gen(s, prompt, args.new_tokens)
        ops_sliced = sum(common.decode_ops(s, prompt).values())  # the kernels a decode token launches, eager
        per_mode = {}
        for c in modes:
            v, t = views[c][n], (c if c in timed else modes[0])
            per_mode["on" if c else "off"] = {
                "decode_tok_s_view": args.new_tokens / gen_t[t], "decode_ratio": gen_t["sliced"] / gen_t[t],
                "prefill_tok_s_view": args.prompt_len / pre_t[t], "prefill_ratio": pre_t["sliced"] / pre_t[t],
                "greedy_equal": torch.equal(got := gen(v, prompt, args.new_tokens), want),
                # where they part: late, after equal tokens, is a near tie rounded apart (bf16 sums in another
                # order); at the first token, a different computation
                "greedy_first_diff": first_diff(got[0, args.prompt_len:], want[0, args.prompt_len:]),
                "copied_bytes": copied_bytes(v), "copied": list(v.copied), "grouped_modules": len(grouped_parts[c][n]),
                "timed_separately": c in timed, "view_build_ms": build_ms[c][n],
                "decode_ops_view": sum(common.decode_ops(v, prompt).values()), "decode_ops_sliced": ops_sliced}
        first = per_mode["on" if modes[0] else "off"]
        rows.append({"budget": n, "params": views[modes[0]][n].num_parameters(), "compact": modes[0],
                     "decode_tok_s_view": first["decode_tok_s_view"], "decode_tok_s_sliced": args.new_tokens / gen_t["sliced"],
                     "decode_ratio": first["decode_ratio"],
                     "prefill_tok_s_view": first["prefill_tok_s_view"], "prefill_tok_s_sliced": args.prompt_len / pre_t["sliced"],
                     "prefill_ratio": first["prefill_ratio"], "greedy_equal": first["greedy_equal"],
                     "decode_steps_tok_s_view": steps_tok_s[timed[0]], "decode_steps_tok_s_sliced": steps_tok_s["sliced"],
                     "step_weight_bytes": weight_bytes, "hbm_gbs": hbm,
                     "hbm_share_view": common.bandwidth_share(weight_bytes, 1 / steps_tok_s[timed[0]], hbm),
                     "hbm_share_sliced": common.bandwidth_share(weight_bytes, 1 / steps_tok_s["sliced"], hbm),
                     "view_build_ms": first["view_build_ms"], "standalone_load_ms": load_s[n] * 1e3,
                     "copied_bytes": first["copied_bytes"], "parent_bytes": parent_bytes, "sliced_bytes": sliced_bytes[n],
                     "modes": per_mode})
        for m, r in per_mode.items():
            parted = "" if r["greedy_equal"] else f" (from new token {r['greedy_first_diff']} of {args.new_tokens})"
            print(f"  budget {n}, compact {m}: decode view {r['decode_tok_s_view']:.1f} tok/s vs sliced "
                  f"{rows[-1]['decode_tok_s_sliced']:.1f} ({r['decode_ratio']:.3f}x); prefill "
                  f"{r['prefill_ratio']:.3f}x; operators a decode token {r['decode_ops_view']} vs "
                  f"{r['decode_ops_sliced']}; greedy equal: {r['greedy_equal']}{parted}"
                  f"{'' if r['timed_separately'] else ' (the same views as compact on: no grouped part)'}", flush=True)
        r = rows[-1]
        print(f"  budget {n}, decode steps alone (prefill taken out): view {r['decode_steps_tok_s_view']:.1f} tok/s, "
              f"sliced {r['decode_steps_tok_s_sliced']:.1f}; {weight_bytes / 1e6:.1f} MB of weights a step: "
              f"{100 * r['hbm_share_view']:.1f}% / {100 * r['hbm_share_sliced']:.1f}% of {hbm:,.0f} GB/s", flush=True)
    full = rows[0]["decode_tok_s_view"]
    for r in rows:
        r["decode_vs_full"] = r["decode_tok_s_view"] / full

    # 8. which strided tensors cost the view its decode speed (--contiguous-views)
    contiguous = None
    if contiguous_modes:
        contiguous = contiguous_diagnostic(parent, specs, sliced, prompt, contiguous_modes, modes[0],
                                           args.new_tokens, args.reps, device)

    # 5. think small, answer large vs the full model for both (fixed token counts, no EOS)
    small, big = views[modes[0]][names[-1]], views[modes[0]][names[0]]

    def think_answer():
        thought = gen(small, prompt, args.think_tokens)
        gen(big, thought, args.answer_tokens)

    ta = side_by_side({"think_small_answer_full": think_answer,
                       "full_only": lambda: gen(big, prompt, args.think_tokens + args.answer_tokens)}, args.reps, device)
    think = {"think_budget": names[-1], "answer_budget": names[0], "think_tokens": args.think_tokens,
             "answer_tokens": args.answer_tokens, "seconds_think_answer": ta["think_small_answer_full"],
             "seconds_full": ta["full_only"], "speedup": ta["full_only"] / ta["think_small_answer_full"]}

    # 6. strided views in the matrix products themselves
    mm = matmul_checks(parent, device, dtype, [1, args.prompt_len], args.reps)

    print(f"\n{'budget':>7} {'compact':>7} {'params':>9} {'decode view':>12} {'sliced':>9} {'view/sliced':>11} "
          f"{'prefill v/s':>11} {'vs full':>8} {'view build':>11} {'load sliced':>12} {'copied':>10} {'sliced copy':>11}")
    for r in rows:
        for m, x in r["modes"].items():
            print(f"{r['budget']:>7} {m:>7} {r['params'] / 1e6:>8.1f}M {x['decode_tok_s_view']:>8.1f} t/s "
                  f"{r['decode_tok_s_sliced']:>9.1f} {x['decode_ratio']:>10.3f}x {x['prefill_ratio']:>10.3f}x "
                  f"{x['decode_tok_s_view'] / full:>7.2f}x {x['view_build_ms']:>8.1f} ms {r['standalone_load_ms']:>9.1f} ms "
                  f"{x['copied_bytes'] / 2**20:>6.2f} MiB {r['sliced_bytes'] / 2**20:>7.1f} MiB")
    print(f"memory: one checkpoint serving every budget {serving_bytes / 2**20:.1f} MiB "
          f"(parent {parent_bytes / 2**20:.1f} MiB + copies {sum(r['copied_bytes'] for r in rows) / 2**20:.2f} MiB) "
          f"vs standalone {standalone_bytes / 2**20:.1f} MiB ({serving_bytes / standalone_bytes:.3f}x)")
    print(f"think {names[-1]} ({args.think_tokens} tok) -> answer {names[0]} ({args.answer_tokens} tok): "
          f"{think['seconds_think_answer']:.2f} s vs full only {think['seconds_full']:.2f} s ({think['speedup']:.2f}x faster)")
    for r in mm:
        print(f"matmul {r['op']}, {r['tokens']} tokens: view {r['view_us']:.0f} us, contiguous {r['contiguous_us']:.0f} us "
              f"({r['ratio']:.2f}x)")
    if contiguous is not None:
        print(f"\ncontiguous copies in the {'compact' if modes[0] else 'grouped'} views (decode against the sliced copy; "
              f"parent unchanged: {contiguous['parent_unchanged']})")
        print(f"{'budget':>7} {'mode':>8} {'decode':>12} {'sliced':>9} {'view/sliced':>11} {'copies':>11} "
              f"{'tensors':>7} {'strided left':>12} {'greedy eq':>9}")
        for r in contiguous["rows"]:
            print(f"{r['budget']:>7} {r['mode']:>8} {r['decode_tok_s']:>8.1f} t/s {r['decode_tok_s_sliced']:>9.1f} "
                  f"{r['decode_ratio']:>10.3f}x {r['copy_bytes'] / 2**20:>7.2f} MiB {len(r['copied']):>7} "
                  f"{len(r['non_contiguous_left']):>12} {str(r['greedy_equal']):>9}")
    result = {"machine": {"device": str(device), "name": common.machine(device),
                          "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype)},
              "command": " ".join(sys.argv), "checkpoint": args.ckpt or "built (removed at exit)", "model": args.model if not args.ckpt else None,
              "parent_params": parent.num_parameters(), "serving_order": serving_order, "compact": args.compact,
              "specs": {n: specs[n].to_dict() for n in names},
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "reps": args.reps, "compiled_decode": args.compile, "budgets": rows,
              "memory": {"serving_bytes": serving_bytes, "standalone_bytes": standalone_bytes,
                         "ratio": serving_bytes / standalone_bytes, "parent_bytes": parent_bytes,
                         "copied_bytes": {r["budget"]: r["copied_bytes"] for r in rows},
                         "sliced_bytes": sliced_bytes, "how": "cuda.memory_allocated" if device.type == "cuda" else "distinct tensor storages"},
              "think_answer": think, "matmul": mm}
    if contiguous is not None:
        result["contiguous_views"] = contiguous
    if args.out:
        common.write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
