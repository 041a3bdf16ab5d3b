"""Speed of our decoder vs transformers' NemotronH, side by side in one run (same card, batch, weights).

Measures, in bf16 on a GPU (fp32 on CPU with --tiny): forward tokens/s, training-step tokens/s
(forward + backward + AdamW), greedy generation tokens/s at batch 1; checks outputs agree.
Prints ratios and writes JSON.

    python benchmarks/bench_speed.py --json out.json            # the 539M config of the issue-16 table
    python benchmarks/bench_speed.py --tiny                     # a smoke run on the CPU
    python benchmarks/bench_speed.py --hf-kernels --json out.json   # transformers on its kernels (issue 16)
    python benchmarks/bench_speed.py --hf-kernels --profile          # ... and where each training step's time goes
    python benchmarks/bench_speed.py --hf-kernels --profile --cudagraphs  # ... and ours compiled with CUDA graphs

Without `mamba_ssm` and `causal_conv1d`, transformers runs its pure-PyTorch Mamba path (the slowest anchor);
with them (`--hf-kernels` insists on them; benchmarks/device/run.sh HFKPRE runs this on causal_conv1d
cross-built at home by benchmarks/device/cross_build_causal_conv1d.sh, or HFKBUILD builds it on the GPU, then HFK) it runs their Triton and CUDA kernels, the anchor a user who installs them gets, and our model uses
`mamba_ssm`'s Triton scan too. Every transformers function that fell back to PyTorch (transformers says so in
a warning) is listed in the JSON (`transformers_fallbacks`), so a run shows which anchor it measured. Both
models train with the same AdamW (fused on a GPU, as the trainer's) and the same cross-entropy on whole fp32
logits (what transformers' own loss computes); ours also with the library's chunked one (`*_chunked_ce`:
`next_token_ce` on a `head_input`, as elastic training's losses run), printed beside, the best of ours in the
ratio. Where `causal_conv1d` imports, `ours_pytorch_conv` is ours with Mamba's conv on PyTorch's conv1d.
Ours compiled twice: `ours_compiled`, the whole model under `torch.compile` (graphs broken at each Triton call),
and `ours_compiled_layers`, each decoder layer compiled on a copy, as elastify trains (`train.compile_layers`).
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F

import common
from star_elastic.elastic.losses import head_input, next_token_ce
from star_elastic.generate import generate
from star_elastic.hf import config_from_hf, load_weights
from star_elastic.model import Model

# 23 layers, Mamba/MoE alternating with three attention layers, as in ENVIRONMENT.md's reference run
PATTERN = "MEMEM*EMEMEM*EMEMEM*EME"


def hf_config(tiny: bool):
    from transformers import NemotronHConfig

    if tiny:
        return NemotronHConfig(vocab_size=512, hidden_size=64, layers_block_type=[_hf(c) for c in "MEM*E"],
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=8,
                               mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=32, n_routed_experts=8,
                               num_experts_per_tok=2, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
                               intermediate_size=128)
    return NemotronHConfig(vocab_size=131072, hidden_size=1024, layers_block_type=[_hf(c) for c in PATTERN],
                           num_attention_heads=16, num_key_value_heads=4, head_dim=64, mamba_num_heads=32,
                           mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128, n_routed_experts=32,
                           num_experts_per_tok=4, moe_intermediate_size=256, moe_shared_expert_intermediate_size=512,
                           intermediate_size=4096, n_group=1, topk_group=1, norm_topk_prob=True)


def _hf(c):
    return {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}[c]


def missing_kernels() -> list[str]:
    """What keeps transformers' NemotronH off its fast Mamba path here: the kernels that do not import."""
    checks = {"mamba_ssm (its Triton SSD kernels)": "from mamba_ssm.ops.triton.ssd_combined import "
                                                    "mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined",
              "mamba_ssm's selective_state_update": "from mamba_ssm.ops.triton.selective_state_update import "
                                                    "selective_state_update",
              "causal_conv1d (a CUDA build)": "import causal_conv1d, causal_conv1d_cuda"}
    missing = []
    for what, statement in checks.items():
        try:
            exec(statement, {})
        except Exception as e:  # noqa: BLE001 - any failure to import is the answer
            missing.append(f"{what} does not import ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    return missing


def watch_fallbacks() -> list[str]:
    """A list that fills with the names of transformers' functions that fall back to their PyTorch reference
    (transformers warns once for each), for the JSON."""
    import logging

    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "falling back" in msg:
                seen.append(msg.split("`")[1] if "`" in msg else msg[:120])

    logging.getLogger("transformers").addHandler(Catch())
    return seen


def pytorch_conv(on: bool = True):
    """Our Mamba conv on PyTorch's conv1d, not causal_conv1d's kernel (the default where it imports; kernels.ENV_CONV,
    read at each call)."""
    from star_elastic import kernels

    return common.environment({kernels.ENV_CONV: "0"} if on else {})


def profile_steps(step, device, steps: int = 2) -> dict:
    """torch.profiler over `steps` calls of `step` (after the timed ones): milliseconds a step by category of
    kernel (bench_kernels' categories; operators' CPU time on a CPU), the top kernels, and where the step is not
    kernel time: its wall time under the profiler, the share with no kernel running (`idle_ms`: the host
    launching or waiting), the kernel launches a step, and the operators (with input shapes and the nearest
    callers, `bench_kernels.op_chains`) whose kernels are the copies and dtype casts."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from bench_kernels import categorise, category_ms, op_chains, timed_rows

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    averages = prof.key_averages()  # one aggregation of the events, read three ways below
    rows = timed_rows(averages, cuda)
    by_cat = category_ms(rows, steps)
    top = sorted(rows, key=lambda r: -r[1])[:15]
    kernel_ms = sum(by_cat.values())
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                            "cuLaunchKernelEx"))
    # the operators behind the copies: their chains whose kernels categorise as copies (a chain's own name is
    # an operator's; its kernels are what it launched, so the operator's name decides)
    copies = [(c, t) for c, t in op_chains(prof.events(), cuda)
              if categorise(c.split(" < ")[0]) == "copies and dtype casts"][:12]
    # the host's side on a GPU: what the CPU spends a step on, by event (operators, compiled regions, CUDA
    # runtime calls such as kernel launches and synchronisations: a wait shows as a long cudaStreamSynchronize)
    host = sorted(((e.key, e.self_cpu_time_total, e.count) for e in averages if e.self_cpu_time_total > 0),
                  key=lambda r: -r[1])[:15] if cuda else []
    return {"clock": "GPU kernel self time" if cuda else "CPU operator self time",
            "ms_per_step": round(kernel_ms, 3),
            "wall_ms_profiled": round(wall_ms, 3),
            "idle_ms": round(max(0.0, wall_ms - kernel_ms), 3) if cuda else None,
            "kernel_launches_per_step": launches / steps if cuda else None,
            "categories": {k: round(v, 3) for k, v in by_cat.items()},
            "top": [{"name": n[:120], "ms_per_step": round(t / 1e3 / steps, 3)} for n, t in top],
            "copy_operators": [{"chain": c[:300], "ms_per_step": round(t / 1e3 / steps, 3)} for c, t in copies],
            "host_top": [{"name": n[:120], "cpu_ms_per_step": round(t / 1e3 / steps, 3), "calls_per_step": c / steps}
                         for n, t, c in host]}


def print_profiles(profiles: dict):
    """The training step's time by category, one column a variant."""
    names = list(profiles)
    cats = sorted({c for p in profiles.values() for c in p["categories"]},
                  key=lambda c: -max(p["categories"].get(c, 0.0) for p in profiles.values()))
    print(f"\ntraining step by category, ms a step ({next(iter(profiles.values()))['clock']}):")
    print(f"  {'':40s}" + "".join(f"{n[:16]:>17s}" for n in names))
    for c in cats + ["total"]:
        vals = [p["ms_per_step"] if c == "total" else p["categories"].get(c, 0.0) for p in profiles.values()]
        print(f"  {c:40s}" + "".join(f"{v:17.2f}" for v in vals))
    for key, label in (("wall_ms_profiled", "wall, profiled"), ("idle_ms", "no kernel running"),
                       ("kernel_launches_per_step", "kernel launches a step")):
        if all(p.get(key) is not None for p in profiles.values()):
            print(f"  {label:40s}" + "".join(f"{p[key]:17.2f}" for p in profiles.values()))
    for name, p in profiles.items():
        if p.get("host_top"):
            print(f"  the host's time in {name}, by event (CPU ms a step, calls a step):")
            for row in p["host_top"][:8]:
                print(f"    {row['cpu_ms_per_step']:7.2f} {row['calls_per_step']:7.0f}  {row['name'][:110]}")
        if p.get("copy_operators"):
            print(f"  copies and casts in {name}, by operator (ms a step):")
            for row in p["copy_operators"][:6]:
                print(f"    {row['ms_per_step']:7.2f}  {row['chain'][:150]}")


def compiled_variants(ours: Model, backend: str = "inductor") -> dict:
    """`ours` compiled the two ways there are: the whole model (`torch.compile(ours)`, broken into graphs at every
    Triton call, the scan's and the conv's) and each decoder layer compiled on a copy, as elastify's trainer and
    demo run it (`train.compile_layers`), so that the eager `ours` stays eager. {name: model}."""
    import copy

    from star_elastic.train import compile_layers

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # (see generate.py)
    return {"ours_compiled": torch.compile(ours, backend=backend),
            "ours_compiled_layers": compile_layers(copy.deepcopy(ours), backend)}


def graphed_mamba_variant(ours: Model, hidden_shape, dtype, backend: str = "inductor", graph=None,
                          inside: str = "compiled") -> Model:
    """Issue 16: how much of the compiled step's time with no kernel running is the Mamba layers' host work (the
    scan's ~15 Triton launches a backward, through Triton's Python launcher, and ours around them: ~40 ms of CPU a
    step at 539M, RESULTS §2): `train.graph_mamba_layers` on a copy of `ours`, so that `ours` stays eager.
    `inside` "eager" was the forty-seventh session's first try: the idle time went, 28.6 -> 3.2 ms a step, but the
    eager layer's unfused elementwise work came back, +13 ms."""
    import copy

    from star_elastic.train import graph_mamba_layers

    return graph_mamba_layers(copy.deepcopy(ours), hidden_shape, dtype, backend, graph=graph, inside=inside)


def logits_of(model, x, hf: bool):
    return model(x).logits if hf else model(x)


def whole_logits_ce(model, x, hf: bool):
    """Next-token cross-entropy on the whole batch's logits cast to fp32: what transformers' own loss computes."""
    return F.cross_entropy(logits_of(model, x, hf)[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config, for a CPU smoke run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd variant")
    ap.add_argument("--cudagraphs", action="store_true",
                    help="also train ours compiled with CUDA graphs (mode='reduce-overhead', the chunked loss): "
                         "whether the compiled step's time with no kernel running is the host launching")
    ap.add_argument("--graphed-mamba", nargs="?", const="compiled", choices=("compiled", "eager"),
                    help="also train ours with each layer compiled and the Mamba layers captured in CUDA graphs, "
                         "forward and backward (whether the Mamba layer's host work is what the step waits on); "
                         "inside the graphs the layers compiled (the default) or eager")
    ap.add_argument("--profile", action="store_true",
                    help="also profile two training steps of each variant (torch.profiler: kernel time by category, "
                         "the categories of bench_kernels' profile), side by side: where ours and transformers' differ")
    ap.add_argument("--skip-hf-train", action="store_true")
    ap.add_argument("--train-rows", metavar="NAMES",
                    help="train only these rows, comma-separated (e.g. transformers,ours_compiled_layers,"
                         "ours_compiled_layers_graphed_compiled_mamba,transformers_again): a shorter device call")
    ap.add_argument("--hf-kernels", action="store_true",
                    help="refuse to run unless transformers can use mamba_ssm's and causal_conv1d's kernels")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    missing = missing_kernels()
    if args.hf_kernels and missing:
        raise SystemExit(f"--hf-kernels: {'; '.join(missing)} (on the GPU machine: benchmarks/device/run.sh "
                         "HFKPRE with causal_conv1d cross-built by cross_build_causal_conv1d.sh, or HFKBUILD then HFK)")
    fallbacks = watch_fallbacks()
    if args.tiny:
        args.batch, args.seq, args.prompt, args.new_tokens = 2, 128, 16, 16
    torch.manual_seed(0)
    from transformers import NemotronHForCausalLM

    hc = hf_config(args.tiny)
    ref = NemotronHForCausalLM(hc).to(device=device, dtype=dtype)
    ours = load_weights(Model(config_from_hf(hc.to_dict())), {k: v.clone() for k, v in ref.state_dict().items()}, "ref")
    n_active = common.active_params(ours.config, ours)
    ours.to(device=device, dtype=dtype)
    n_params = ours.num_parameters()
    card = common.machine(device)
    print(f"device {card}, dtype {dtype}, params {n_params / 1e6:.1f}M, batch {args.batch}x{args.seq}")
    res = {"date": datetime.date.today().isoformat(), "device": card, "dtype": str(dtype), "params": n_params,
           "config": hc.to_dict(), "batch": args.batch, "seq": args.seq, "torch": torch.__version__}
    import transformers
    res["transformers"] = transformers.__version__
    res["transformers_kernels_missing"] = missing
    res["transformers_fallbacks"] = fallbacks  # filled as transformers warns

    x = torch.randint(0, hc.vocab_size, (args.batch, args.seq), device=device)
    tokens = x.numel()

    # 1. outputs agree: both bf16 models against the same weights run by transformers in fp32, and
    # against each other (bf16 rounding alone moves a random 23-layer network's logits by a few %)
    ref.eval(), ours.eval()
    probe = x[:1, :512]
    with torch.no_grad():
        gold = NemotronHForCausalLM(hc).to(device=device, dtype=torch.float32).eval()
        gold.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        g = gold(probe).logits.float()
        del gold
        a, b = logits_of(ref, probe, True).float(), logits_of(ours, probe, False).float()
    rel = lambda u, v: ((u - v).norm() / v.norm()).item()
    res["logits_rel_err_ours_vs_transformers"] = rel(b, a)
    res["logits_rel_err_transformers_vs_fp32"] = rel(a, g)
    res["logits_rel_err_ours_vs_fp32"] = rel(b, g)
    res["argmax_agreement_ours_vs_transformers"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    res["argmax_agreement_ours_vs_fp32"] = (g.argmax(-1) == b.argmax(-1)).float().mean().item()
    res["argmax_agreement_transformers_vs_fp32"] = (g.argmax(-1) == a.argmax(-1)).float().mean().item()
    print("logits rel err: ours-vs-transformers {:.2e}, transformers-vs-fp32 {:.2e}, ours-vs-fp32 {:.2e}".format(
        res["logits_rel_err_ours_vs_transformers"], res["logits_rel_err_transformers_vs_fp32"],
        res["logits_rel_err_ours_vs_fp32"]))
    print("argmax agreement with fp32: transformers {:.4f}, ours {:.4f}".format(
        res["argmax_agreement_transformers_vs_fp32"], res["argmax_agreement_ours_vs_fp32"]))
    del a, b, g

    # 2. forward throughput
    variants = {"transformers": (ref, True), "ours": (ours, False)}
    if device.type == "cuda" and not any(m.startswith("causal_conv1d") for m in missing):
        # eager, Mamba's conv on PyTorch's conv1d: what "ours" ran before causal_conv1d's kernel became the default
        variants["ours_pytorch_conv"] = (ours, False)
        with torch.no_grad():
            c = logits_of(ours, probe, False).float()
            with pytorch_conv():
                b = logits_of(ours, probe, False).float()
        res["logits_rel_err_causal_conv_vs_ours"] = rel(c, b)
        print(f"logits rel err: ours (causal_conv1d's conv) against ours on PyTorch's conv "
              f"{res['logits_rel_err_causal_conv_vs_ours']:.2e}")
        del b, c
    compiled = {} if args.no_compile else compiled_variants(ours)
    variants.update({name: (m, False) for name, m in compiled.items()})
    for name, (m, hf) in variants.items():
        with torch.no_grad(), pytorch_conv(name.endswith("pytorch_conv")):
            s = common.timed(lambda: logits_of(m, x, hf), device, 2, args.iters)
        res[f"forward_tok_s_{name}"] = tokens / s
        print(f"forward  {name:14s} {tokens / s:10.0f} tok/s")

    # 3. training step: forward + backward + AdamW, fresh copies so both start from the same weights. Every
    # variant takes the same cross-entropy on whole logits (what transformers' own loss computes: the logits cast
    # to fp32, then cross_entropy), and ours also the library's own (`*_chunked_ce`: `next_token_ce` on a
    # `head_input`, the LM head and the loss a chunk of tokens at a time, no (tokens, vocab) tensor of the batch)
    with torch.no_grad():  # the two losses agree (bf16 logits rounded differently; fp32 on the CPU: exactly)
        whole = whole_logits_ce(ours, x, False)
        chunked = next_token_ce(head_input(ours, x), x)
    res["loss_whole_logits"], res["loss_chunked_ce"] = whole.item(), chunked.item()
    print(f"loss: whole logits {whole.item():.5f}, chunked (next_token_ce) {chunked.item():.5f}")
    train_variants = dict(variants)
    train_variants["ours_chunked_ce"] = (ours, False)
    train_variants.update({f"{name}_chunked_ce": (m, False) for name, m in compiled.items()})
    if args.cudagraphs and not args.no_compile:
        # a second compile of the same module (its own graphs and recompiles); the graph breaks at the Triton
        # calls run eagerly between the captured regions
        train_variants["ours_cudagraphs_chunked_ce"] = (torch.compile(ours, mode="reduce-overhead"), False)

    def graphed_failed(e: Exception, what: str):  # the graphed row is an experiment: its failure is the finding
        res["graphed_mamba_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"{what} ({res['graphed_mamba_error']})")

    if args.graphed_mamba and device.type != "cuda":
        print("--graphed-mamba: CUDA graphs need a GPU; the row is left out on the CPU")
    elif args.graphed_mamba:
        # built last, when the other variants' copies are made: a capture failing (a host sync inside the layer,
        # an allocation the graph cannot replay) costs this row alone, said in one line
        try:
            suffix = "" if args.graphed_mamba == "eager" else "_compiled"
            train_variants[f"ours_compiled_layers_graphed{suffix}_mamba"] = (graphed_mamba_variant(
                ours, (args.batch, args.seq, ours.config.hidden_size), dtype, inside=args.graphed_mamba), False)
        except Exception as e:  # noqa: BLE001
            graphed_failed(e, "graphed Mamba layers: not captured")
    # transformers timed again last: the rows between ran on a host whose speed drifts (the forty-seventh session
    # saw 13-45% between machines and calls), so the ratio comes with its bracket
    train_variants["transformers_again"] = variants["transformers"]
    if args.train_rows:
        keep = args.train_rows.split(",")
        # (a graphed row whose capture failed is not there: its error is the finding, recorded above)
        unknown = [r for r in keep if r not in train_variants and not ("graphed" in r and "graphed_mamba_error" in res)]
        if unknown:
            raise SystemExit(f"bench_speed: --train-rows: no row {', '.join(unknown)} in this run (its rows: "
                             f"{', '.join(train_variants)})")
        train_variants = {k: v for k, v in train_variants.items() if k in keep}
    for name, (m, hf) in train_variants.items():
        if name.startswith("transformers") and args.skip_hf_train:
            continue
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
        first = []  # the first step's loss and gradient norm: every row should print about the same (a variant that
        # is fast because it computes something else shows here; rows that share `ours` start where the last one
        # left it, lr 1e-5)

        def step():
            if "cudagraphs" in name:  # a new iteration: the last step's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            loss = next_token_ce(head_input(m, x), x) if name.endswith("chunked_ce") else whole_logits_ce(m, x, hf)
            if not first:
                first.append(loss.detach().clone())
            loss.backward()
            if len(first) == 1:  # and the gradient's norm it took: a backward that computes something else shows
                # (each norm in fp32, one gradient at a time: get_total_norm would reduce bf16 gradients in bf16)
                first.append(torch.linalg.vector_norm(
                    torch.stack([p.grad.float().norm() for p in m.parameters() if p.grad is not None])))
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with pytorch_conv(name.endswith("pytorch_conv")):
            try:
                s = common.timed(step, device, 2, args.iters)
            except Exception as e:  # noqa: BLE001 - only the experimental graphed row may fail alone
                if "graphed" not in name:
                    raise
                graphed_failed(e, f"train    {name}: failed")
                continue
            if args.profile and name != "transformers_again":
                res.setdefault("train_profile", {})[name] = profile_steps(step, device)
        res[f"train_tok_s_{name}"] = tokens / s
        # model FLOP utilisation: 6 x the parameters a token multiplies through (attention's and the scan's own
        # products left out) against the bf16 peak measured on the device machines
        res[f"train_mfu_{name}"] = 6 * n_active * tokens / s / common.BF16_PEAK
        if device.type == "cuda":
            res[f"train_peak_gib_{name}"] = torch.cuda.max_memory_allocated() / 2**30
        res[f"train_first_loss_{name}"], res[f"train_first_grad_norm_{name}"] = first[0].item(), first[1].item()
        print(f"train    {name:24s} {tokens / s:10.0f} tok/s  {100 * res[f'train_mfu_{name}']:5.1f}% MFU  "
              f"first loss {first[0].item():.4f}, its gradient's norm {first[1].item():.4f}")
        opt = None  # frees the AdamW moments before the next variant
        m.eval()

    # 4. greedy generation at batch 1: transformers' generate vs ours (CUDA graph on a GPU)
    prompt = torch.randint(0, hc.vocab_size, (1, args.prompt), device=device)
    with torch.no_grad():
        ref_out = None

        def hf_gen():
            nonlocal ref_out
            ref_out = ref.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=0)

        s = common.timed(hf_gen, device, 1, 2)
        res["generate_tok_s_transformers"] = args.new_tokens / s
        our_out = None

        def our_gen():
            nonlocal our_out
            our_out = generate(ours, prompt, args.new_tokens)

        s = common.timed(our_gen, device, 1, 3)
        res["generate_tok_s_ours"] = args.new_tokens / s
        if not args.no_compile:
            s = common.timed(lambda: generate(ours, prompt, args.new_tokens, compile=True), device, 1, 3)
            res["generate_tok_s_ours_compiled"] = args.new_tokens / s
            print(f"generate ours_compiled {res['generate_tok_s_ours_compiled']:8.1f} tok/s")
    same = (ref_out[0, args.prompt:] == our_out[0, args.prompt:]).long()
    res["generate_first_divergence"] = int(same.argmin()) if not bool(same.all()) else args.new_tokens
    print(f"generate transformers {res['generate_tok_s_transformers']:8.1f} tok/s, ours {res['generate_tok_s_ours']:8.1f} tok/s;"
          f" identical greedy tokens before first divergence: {res['generate_first_divergence']}/{args.new_tokens}")

    if args.profile:
        print_profiles(res["train_profile"])
    best_train = max((v for k, v in res.items() if k.startswith("train_tok_s_ours")), default=None)
    if best_train and "train_tok_s_transformers" in res:
        res["ratio_train"] = best_train / res["train_tok_s_transformers"]
    if best_train and "train_tok_s_transformers_again" in res:
        res["ratio_train_against_the_later_transformers"] = best_train / res["train_tok_s_transformers_again"]
        print(f"transformers trained at {res.get('train_tok_s_transformers', float('nan')):.0f} tok/s first and "
              f"{res['train_tok_s_transformers_again']:.0f} last: the best of ours "
              f"{res.get('ratio_train', float('nan')):.2f}x / {res['ratio_train_against_the_later_transformers']:.2f}x")
    res["ratio_forward"] = max(v for k, v in res.items() if k.startswith("forward_tok_s_ours")) / res["forward_tok_s_transformers"]
    res["ratio_generate"] = max(v for k, v in res.items() if k.startswith("generate_tok_s_ours")) / res["generate_tok_s_transformers"]
    print(f"transformers' kernels missing: {missing or 'none'}; its functions that fell back to PyTorch: "
          f"{sorted(set(fallbacks)) or 'none'}")
    print("ratios (ours / transformers): " + ", ".join(f"{k[6:]} {v:.2f}x" for k, v in res.items() if k.startswith("ratio_")))
    if args.json:
        common.write_json(args.json, res, default=str)


if __name__ == "__main__":
    main()
