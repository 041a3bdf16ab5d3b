"""What each `star-elastic` subcommand runs: `cmd_<name>(args)`, the parsed flags in, one call into
the library out, and the lines it prints.

cli.py defines the flags and wires each subcommand here (`set_defaults(fn=commands.cmd_<name>)`);
serve/cli.py holds `generate CKPT --budget` and `serve` the same way. The work itself lives in the
library (zero_shot.py, elastify.py, evaluate.py, validate.py, inspection.py, generate.py, serve/),
which never imports this module or cli.py (tests/test_imports.py). What the commands share (device,
dtype, model and text resolution, prompts, safe output files) is runtime.py. Errors the user can fix
are `StarElasticError`s, printed by `cli.main` as one line, exit status 2.
"""

from __future__ import annotations

import math
import time

from .runtime import (DEFAULT_MODEL, check_output, comma_list, compile_backend, encode_prompt, eval_tokens,
                      load_model_and_tokenizer, pick_device, pick_dtype, resolve_model, write_json)


def _log(msg):
    print(msg, flush=True)


def _floats(text, flag):
    """'0.5,0.3,0.2' -> [0.5, 0.3, 0.2]; None stays None."""
    from .errors import StarElasticError

    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StarElasticError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.5,0.3,0.2") from None


# ----------------------------------------------------------------------------- eval and generate

def cmd_eval(args):
    """A plain model: its perplexity. An elastic checkpoint: every budget against the parent."""
    from .elastic.checkpoint import is_elastic_checkpoint
    from .errors import StarElasticError
    from .evaluate import perplexity

    path = resolve_model(args.model)
    if not path.exists():
        raise StarElasticError(f"{path}: no such file or directory")
    if is_elastic_checkpoint(path):
        return _eval_checkpoint(args)
    for flag in ("budgets", "plot", "compare"):
        if getattr(args, flag):
            raise StarElasticError(f"--{flag} needs an elastic checkpoint; {args.model} is not one "
                                   f"({'no manifest.json' if path.is_dir() else 'not a directory'})")
    args.split = args.split or "all"
    device = pick_device(args.device)
    model, tokenizer = load_for_inference(args, device)
    stream = eval_tokens(tokenizer, args.data, args.split)
    t0 = time.perf_counter()
    res = perplexity(model, stream, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
    res.update(model=str(resolve_model(args.model)), data=args.data, split=args.split, device=str(device),
               seconds=round(time.perf_counter() - t0, 2))
    print(f"perplexity {res['perplexity']:.4f} over {res['tokens']} tokens "
          f"({res['windows']} windows of {args.seq_len}, {args.split} split of {args.data})")
    if args.json:
        write_json(res, args.json)
    return res


def _eval_checkpoint(args) -> dict:
    """`eval CKPT`: evaluate.evaluate_checkpoint, its table, then --plot and --json."""
    from pathlib import Path

    from .errors import StarElasticError
    from .evaluate import evaluate_checkpoint, format_table

    for out in (args.json, args.plot):  # refuse a directory as an output before any work
        if out:
            check_output(out, force=True, kind="file")
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise StarElasticError(f"--plot {args.plot}: give a .png file name")
    device = pick_device(args.device)
    result = evaluate_checkpoint(args.model, args.data, budgets=args.budgets, compare=args.compare or (),
                                 split=args.split or "heldout", seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_tokens=args.max_tokens, device=device, dtype=pick_dtype(args.dtype, device),
                                 verify=args.verify, fp8_matmul=args.fp8_matmul)
    path, split = result["checkpoint"], result["split"]
    print(f"{len(result['budgets'])} budget(s) of {path} on {result['tokens']} tokens ({split} split of {args.data}, "
          f"windows of {args.seq_len}); agreement and KL against the parent")
    print(format_table(result))
    if args.plot:  # before the JSON: a plotting error leaves neither behind
        from .plots import quality_plot

        quality_plot(result["budgets"], result["compare"], args.plot,
                     title=f"{Path(path).name}: {split} {args.data}, {result['tokens']} tokens")
        print(f"wrote {args.plot}")
    if args.json:
        write_json(result, args.json)
    return result


def load_for_inference(args, device):
    """(model, tokenizer) for eval / generate: as `load_model_and_tokenizer`; with --fp8-matmul, read in
    float32 (an FP8 checkpoint's stored values then requantise exactly), then every decoder linear layer
    multiplies in FP8 (fp8.use_fp8_matmuls), the rest computing in --dtype."""
    compute = pick_dtype(args.dtype, device)
    if not getattr(args, "fp8_matmul", False):
        return load_model_and_tokenizer(args.model, device, compute)
    import torch

    from .fp8 import use_fp8_matmuls
    model, tokenizer = load_model_and_tokenizer(args.model, device, torch.float32)
    done = use_fp8_matmuls(model, compute)
    _log(f"FP8 matmuls in {done['swapped']} linear layers ({done['bytes'] / 2**20:.1f} MiB of FP8 weights and scales)"
         + (f"; {len(done['kept'])} kept in {str(compute).removeprefix('torch.')} (sizes not multiples of 16)"
            if done["kept"] else ""))
    return model, tokenizer


def cmd_generate(args):
    import torch

    from .generate import generate
    from .serve.cli import cmd_generate_budget, wants_budget

    if wants_budget(args):  # a budget (or two) of an elastic checkpoint: serve/cli.py
        return cmd_generate_budget(args)
    device = pick_device(args.device)
    model, tokenizer = load_for_inference(args, device)
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.raw)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, ids.to(device), args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   eos_token_id=tokenizer.eos_token_id, generator=gen)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(text)
    return text


# ----------------------------------------------------------------------------- elastify and the demo

def save_dtype(arg: str, path) -> str | None:
    """The elastic checkpoint's dtype: `auto` is the parent's own (a bf16 parent stays bf16, not the
    fp32 master weights that trained it: half the bytes); a GGUF parent, dequantised, stays float32."""
    from pathlib import Path

    from .sharded_load import open_checkpoint

    if arg != "auto":
        return arg
    if not Path(path).is_dir():
        return None
    dtype = open_checkpoint(Path(path), None, "elastified")[4]  # from the headers: no weights read
    return str(dtype).removeprefix("torch.")


def restore_mode(given: str | None, rank: int, default: str) -> str:
    """--full-delta-restore as given ("none": off), else `default` where there is a delta (rank > 0); a mode
    given without a delta is a one-line error."""
    from .errors import StarElasticError

    if given not in (None, "none") and not rank:
        raise StarElasticError(f"--full-delta-restore {given}: it sets --full-delta-rank's delta, and there is no "
                               "delta: give a rank")
    return "" if given == "none" or not rank else given or default


def cmd_elastify(args):
    """importance -> sort -> router + multi-budget distillation -> one elastic checkpoint (elastify.py)."""
    from pathlib import Path

    from .elastify import ElastifyConfig, elastify, print_table
    from .hf import require_tokenizer
    from .train import init_distributed, leave_distributed, sharding, world
    from .zero_shot import check_multiple

    check_multiple(args.multiple)
    levers = lever_options(args, KEEP_FULL if args.keep_full else PLAIN_LEVERS)
    budgets = comma_list(args.budgets)
    weights = budget_weights(args, budgets)
    out = check_output(args.out, args.force)
    device = init_distributed() or pick_device(args.device)  # under torchrun: this rank's GPU
    rank, ranks = world()
    sharded = sharding(args.shard, ranks) == "fsdp"
    path = resolve_model(args.model)
    # under torchrun with FSDP2 (the default there) a checkpoint directory is never loaded whole on a rank:
    # elastify takes its path and loads it sharded; else the whole model, master weights in fp32 (on a
    # GPU the steps run under bf16 autocast)
    if sharded and Path(path).is_dir() and args.dtype is None:
        model, tokenizer = path, require_tokenizer(path)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, device,
                                                    None if args.dtype is None else pick_dtype(args.dtype, device))
        model.float()
    cfg = ElastifyConfig(budgets=budgets, tokens=args.tokens,
                         seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, router_lr=args.router_lr,
                         axes=tuple(comma_list(args.axes)) or ElastifyConfig.axes,
                         heterogeneous=args.heterogeneous, calib_batches=args.calib_batches,
                         eval_tokens=args.eval_tokens, seed=args.seed, stage1_fraction=args.stage1_fraction,
                         stage2_weights=weights["stage2_weights"], stage2_seq_len=args.stage2_seq_len,
                         kd_weights=weights["kd_weights"],
                         budget_lrs=_floats(args.budget_lrs, "--budget-lrs"),
                         all_budgets=args.all_budgets, train_on=args.train_on,
                         anchor_projection=args.anchor_projection, **lever_config(levers),
                         drift_data=args.drift_data, chat_drift=args.chat_drift, router_init=args.router_init,
                         router_estimator=args.router_estimator, router_freeze=args.router_freeze,
                         router_baseline_rows=args.router_baseline_rows,
                         router_prior=args.router_prior, shard=args.shard,
                         multiple=args.multiple, save_dtype=save_dtype(args.save_dtype, path),
                         compile=compile_backend(args.compile, device, sharded))
    if rank == 0:
        where = f"{ranks} ranks ({device.type})" if ranks > 1 else str(device)
        size = f"{model.num_parameters() / 1e6:.1f}M parameters" if hasattr(model, "num_parameters") else \
            "loaded sharded over the ranks"
        compiled = ", layers under torch.compile (the first steps compile; --compile off: eager)" if cfg.compile else ""
        print(f"elastify {path}: {size}, budgets {', '.join(cfg.budgets)}, {cfg.tokens:,} training tokens, "
              f"on {where}{compiled}", flush=True)
        if args.keep_full:
            print(f"--keep-full: {' '.join(filter(None, (lever_flags(levers), weight_flags(weights, args))))}",
                  flush=True)
            at = keep_full_measured(budgets, cfg.tokens)
            if at is None:  # measured for other budgets: say so
                print("--keep-full's stage-2 and KD weights were measured for budgets "
                      f"{' and '.join(','.join(map(str, k)) for k in KEEP_FULL_WEIGHTS)}; these budgets train "
                      "with elastify's unless --stage2-weights / --kd-weights are given", flush=True)
            elif weight_flags(weights, args):  # which measurement the weights come from
                measured = ", ".join(map(_tokens, keep_full_points(budgets)))
                step = cfg.batch_size * cfg.seq_len  # (measured at elastify's default, 16 x 512 tokens a step)
                other = f"; they were measured at {KEEP_FULL_STEP_TOKENS:,} tokens a step, these take {step:,}" \
                    if step != KEEP_FULL_STEP_TOKENS else ""
                print(f"--keep-full's budget weights: those measured at {_tokens(at)} training tokens (measured "
                      f"at {measured}; the nearest to these {_tokens(cfg.tokens)}{other})", flush=True)
    result = elastify(model, tokenizer, args.data, out, cfg, log=_log, device=device)
    if rank == 0:
        print_table(result)
    if ranks > 1:
        leave_distributed()
    return result


# The demo's two sizes. CPU: 1.0 / 0.9 on the FFN axis alone, 12 steps of wiki and bible at lr 3e-5, stage 2
# weighted toward the 0.9 budget, chosen by measurement on the 2-core machine (docs/RESULTS.md §5): 0.8 did not
# answer on topic after 16 steps; wiki alone (at 1e-4 or 3e-5) flipped the full budget's first answer to a list
# in French, where the parent prefers "The" over "L" by only 0.08 nats; 16 steps took 9.7-11.6 minutes (a step
# is ~1.1 TFLOP on a CPU that multiplies at 62 GFLOP/s), 12 steps 8.2 with the same answers. GPU: the real
# thing, every default axis, tens of millions of tokens. The CPU demo keeps the paper's sampling: with one
# smaller budget the full anchor would run both models on every step, 1.9x the time, past 10 minutes.
# The levers that hold the full budget, as elastify defaults them (ElastifyConfig's: the full anchor at 0.5, nothing
# else; the restore wherever a delta is on) ...
PLAIN_LEVERS = dict(full_anchor=0.5, anchor_data=None, anchor_mix=1.0, budget_mix=0.0, full_delta_rank=0,
                    full_delta_lr=0.0, full_delta_finish=0, full_delta_restore="activations", full_delta_allocate=False,
                    full_delta_bits=0, hold=None, hold_rate=0.0, hold_pull=0.0, full_keeps_held="")
# ... and as `elastify --keep-full` sets them: the recipe that held SmolLM2's full model within 1% of its parent,
# or better, on five sources at two seeds, chat answers included (docs/RESULTS.md §9, twenty-seventh session: the
# delta on every linear layer and routed expert, restored in closed form where training ends, then 256 steps
# alone at 4e-4; the parent's embeddings and norms its own from the first step), the GPU demo's preset. No pull
# of the shared embeddings and norms toward the parent's since the twenty-ninth session (§9): the full model
# keeps the parent's own, so the pull only held the smaller budgets back (without it SmolLM2's full model the
# same or closer, its 0.5 ahead of (c) by 4-7 points more at seed 0, and the hybrid's 0.75 5-10 points better).
# A fifth of the smaller budgets' rows the parent's own text since the thirty-fourth session (§9): at 4.2M on
# SmolLM2, two seeds, the 0.75 then level with (c) in domain (+0.1 to +0.6%) and 3.7-6.6% ahead out of it, where
# without it it trailed by 3-6%; half (0.5) cost 3-4% in domain. Rank 32 with the rest of each layer's drift rounded
# to 2 bits a weight since the forty-fifth session (§9): at 16.8M tokens on an H100 it held the full model within
# 1% of its parent on all five sources (chat answers +0.6%), where rank 64 alone left chat +3.8% and rank 64 with 4
# bits +1.2%; the drift's tail is not low-rank (§9, forty-first session); 18% of the parent's bytes beside it. The
# same under FSDP2: each layer's rest rounded by the rank that factors it, then sent to every rank (FullDelta.restore)
KEEP_FULL = dict(full_anchor=1.0, anchor_data="self", anchor_mix=0.5, budget_mix=0.2, full_delta_rank=32,
                 full_delta_lr=4e-4, full_delta_finish=256, full_delta_restore="activations", full_delta_allocate=False,
                 full_delta_bits=2, hold="embeddings,norms", hold_rate=1.0, hold_pull=0.0, full_keeps_held="training")


# ... and the budgets' weights that go with it, for the budget list and the training tokens they were measured at
# (each of the two flags given wins; other lists keep elastify's until measured): stage 2 never draws the full
# budget (its delta keeps it) and draws 0.75 four times as often as 0.5, and the 0.5's distillation counts less
# than the others' in the one AdamW: 0.4 at 16.8M tokens, 0.7 at 4.2M. On SmolLM2 at 16.8M (docs/RESULTS.md §9,
# forty-ninth to fifty-third sessions) 0.4 put the 0.75 and the 0.5 both within 2% of each distilled alone on all
# five sources at two seeds, the full model within 1% of its parent, where equal weights left the 0.75 2-3% behind
# out of domain and 0.5 the 0.75 +3.2% on chat answers at seed 1; on the hybrid at 16M both smaller budgets stayed
# ahead of theirs. At 4.2M (fifty-fourth session) 0.4 starved the 0.5 (+2.4 to +10.4% behind its own at seed 1:
# it gets 180 of the 512 steps, too few at four tenths of the rate) where 0.7 put it 7-19% ahead at both seeds
# and kept the 0.75 within 2% (+2.02% on chat answers at seed 0, the edge). A run takes the weights measured
# nearest its --tokens (in ratio). The weight is an empirical knob: it does not even out the budgets' gradient
# norms (benchmarks/bench_budget_pull.py).
KEEP_FULL_STEP_TOKENS = 16 * 512  # the batch they were measured with (elastify's default), tokens a step
KEEP_FULL_WEIGHTS = {(1.0, 0.75, 0.5): {4_194_304: dict(stage2_weights=[0.0, 0.8, 0.2], kd_weights=[1.0, 1.0, 0.7]),
                                        16_777_216: dict(stage2_weights=[0.0, 0.8, 0.2], kd_weights=[1.0, 1.0, 0.4])}}


def keep_full_points(budgets: list[str]) -> dict:
    """KEEP_FULL_WEIGHTS' measurements for these budgets, in any order, by training tokens ({} if none)."""
    try:
        return KEEP_FULL_WEIGHTS.get(tuple(sorted((float(b) for b in budgets), reverse=True)), {})
    except ValueError:  # named budgets (elastify says what is wrong with them) have no preset
        return {}


def keep_full_measured(budgets: list[str], tokens: int) -> int | None:
    """The training tokens of the measurement a run of these budgets and `tokens` takes its weights from: the
    nearest in ratio (None where none was measured for these budgets)."""
    points = keep_full_points(budgets)
    return min(points, key=lambda t: abs(math.log(t / max(tokens, 1)))) if points else None


def keep_full_weights(budgets: list[str], tokens: int) -> dict:
    """The weights of that measurement (keep_full_measured), in the budgets' order ({} where none was made)."""
    at = keep_full_measured(budgets, tokens)
    if at is None:
        return {}
    sizes = [float(b) for b in budgets]
    largest_first = sorted(sizes, reverse=True)
    return {k: [v[largest_first.index(b)] for b in sizes] for k, v in keep_full_points(budgets)[at].items()}


def budget_weights(args, budgets: list[str]) -> dict:
    """--stage2-weights and --kd-weights as numbers, each as given, else with --keep-full the recipe's for these
    budgets and --tokens (keep_full_weights; None where it has none: elastify's defaults)."""
    preset = keep_full_weights(budgets, args.tokens) if args.keep_full else {}
    return {k: _floats(getattr(args, k), "--" + k.replace("_", "-")) if getattr(args, k) is not None
            else preset.get(k) for k in ("stage2_weights", "kd_weights")}


def _tokens(n: int) -> str:
    """A token count as a person reads it: 4.2M, or 1,024 below a tenth of a million."""
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def keep_full_weights_help() -> str:
    """--keep-full's budget weights in words, for --help: the flags of each measurement and its tokens."""
    return "; ".join(f"for budgets {','.join(map(str, budgets))} also " + " or ".join(
        f"{weight_flags(w)} at {_tokens(tokens)} training tokens" for tokens, w in points.items())
        + " (the nearest to --tokens)" for budgets, points in KEEP_FULL_WEIGHTS.items())


def weight_flags(weights: dict, args=None) -> str:
    """Budget weights (budget_weights'), those no flag in `args` gave, as the flags that set them."""
    return " ".join(f"--{k.replace('_', '-')} {','.join(f'{w:g}' for w in v)}" for k, v in weights.items()
                    if v is not None and getattr(args, k, None) is None)


def lever_options(args, base: dict) -> dict:
    """`base`'s settings (a preset: PLAIN_LEVERS, KEEP_FULL, a demo's), each replaced by its flag where one was
    given (the parser's default for these is None). A delta turned off by a flag takes the base's options of it
    along (its rate, finish, and the keeping of the parent's values beside it), flags given staying; the restore
    is on wherever a delta is (restore_mode)."""
    from .train_config import DELTA_OPTIONS

    opt = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}
    if not opt["full_delta_rank"]:
        opt.update({k: 0 for k in DELTA_OPTIONS if getattr(args, k, None) is None})
        # what goes with the delta
        for k, off in (("full_keeps_held", ""), ("full_delta_allocate", False), ("full_delta_bits", 0)):
            if getattr(args, k, None) is None:
                opt[k] = off
    opt["full_delta_restore"] = restore_mode(getattr(args, "full_delta_restore", None), opt["full_delta_rank"],
                                             base["full_delta_restore"])
    return opt


def lever_config(opt: dict) -> dict:
    """The resolved levers (lever_options') as ElastifyConfig's fields: --hold's comma list as a list."""
    return {**{k: opt[k] for k in PLAIN_LEVERS}, "hold": comma_list(opt["hold"]) or None}


def lever_flags(opt: dict) -> str:
    """The full-budget levers `opt` (lever_options') as the flags that set them, those at elastify's defaults left
    out: what a run with a preset ran, in words a user can type."""
    flags = []
    for k, v in opt.items():
        flag = "--" + k.replace("_", "-")
        if k == "full_delta_restore":  # on ("activations") wherever a delta is: said only when otherwise
            if opt["full_delta_rank"] and v != PLAIN_LEVERS[k]:
                flags.append(f"{flag} {v or 'none'}")
        elif isinstance(v, bool):  # a switch: its flag alone
            if v != PLAIN_LEVERS[k]:
                flags.append(flag)
        elif v != PLAIN_LEVERS[k]:
            flags.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(flags)


DEMO_PRESETS = {
    "cpu": dict(data="wiki,bible", budgets="1.0,0.9", axes="ffn", tokens=12288, seq_len=128, batch_size=8, lr=3e-5,
                calib_batches=4, eval_tokens=2048, stage2_weights=[0.3, 0.7], all_budgets=False,
                # the full-budget levers: elastify's defaults, without the anchor
                **{**PLAIN_LEVERS, "full_anchor": 0.0}),
    # The GPU preset, chosen by measurement on one H200 (docs/RESULTS.md §5, where every run and lever tried is
    # kept): two domains, since wiki alone at this token count repeats itself and the full model drifts; 0.9 / 0.8
    # on every axis reach 1.09-1.10x / 1.32x the parent's held-out perplexity in 6-9 minutes and answer on topic
    # (0.75 / 0.5 reached 1.63x / 3.78x, off topic); the full budget kept by KEEP_FULL (`elastify --keep-full`,
    # §9). Stage 2 draws 0.8 four times as often as 0.9 and never the full budget (the delta keeps it): 0.8 at
    # 1.28x the parent on an H100 in 433 s (thirty-ninth session, §5), where elastify's weights gave 1.32x.
    "cuda": dict(data="wiki,bible", budgets="1.0,0.9,0.8", axes=None, tokens=12_582_912, seq_len=512,
                 batch_size=16, lr=2e-4, calib_batches=16, eval_tokens=16384, stage2_weights=[0.0, 0.2, 0.8],
                 all_budgets=False, **KEEP_FULL),
}
DEMO_PROMPTS = ("What is the capital of France?", "Name three primary colors.", "What do bees make?")


def demo_options(args, device_type: str) -> dict:
    """The demo's settings: each flag given, else the CPU or GPU preset's."""
    from .errors import StarElasticError

    opt = lever_options(args, DEMO_PRESETS["cuda" if device_type == "cuda" else "cpu"])
    n = len(comma_list(opt["budgets"]))
    if args.stage2_weights is not None:  # given: in --budgets order, one a budget
        opt["stage2_weights"] = _floats(args.stage2_weights, "--stage2-weights")
        if len(opt["stage2_weights"]) != n:
            raise StarElasticError(f"--stage2-weights {args.stage2_weights}: {len(opt['stage2_weights'])} weights for "
                                   f"{n} budgets ({opt['budgets']})")
    elif opt["stage2_weights"] and len(opt["stage2_weights"]) != n:
        opt["stage2_weights"] = None  # the preset's are for its own budgets; other --budgets get elastify's
    return opt


def cmd_demo(args):
    """The quick start: elastify SmolLM2 on real text (CPU-sized on a CPU, GPU-sized on a GPU),
    show each budget's held-out perplexity as a zero-shot slice and after training against the
    parent, ask every budget a few questions from one loaded copy of the weights, and say what
    to do next."""
    from .elastify import ElastifyConfig, elastify, print_table
    from .serve.engine import ElasticEngine

    device = pick_device(args.device)
    opt = demo_options(args, device.type)
    out = check_output(args.out, force=True)  # the demo replaces its own checkpoint, never a file
    axes = tuple(comma_list(opt["axes"])) or ElastifyConfig.axes
    print(f"star-elastic demo on {device}: SmolLM2-135M -> budgets {opt['budgets']} (axes: {', '.join(axes)}) on "
          f"{opt['tokens']:,} tokens of {opt['data']}" + ("" if device.type == "cuda" else
          f" in {max(1, opt['tokens'] // (opt['batch_size'] * opt['seq_len']))} steps at lr {opt['lr']:g} - a "
          "CPU-sized run; on a GPU the demo trains 12.6M tokens of wiki and bible on every axis at "
          "1.0 / 0.9 / 0.8, keeping the full budget (on one H100 in 7 minutes: 1.10x and 1.28x the parent's "
          "perplexity, docs/RESULTS.md §5)"), flush=True)
    levers = {k: opt[k] for k in PLAIN_LEVERS}
    if device.type == "cuda" and lever_flags(levers):  # (the CPU preset holds nothing beyond elastify's, anchor off)
        print(f"the full budget held by: {lever_flags(levers)}" + (" (elastify --keep-full)" if levers == KEEP_FULL
                                                                   else ""), flush=True)
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, device, None)
    model.float()  # master weights; bf16 autocast on a GPU
    budgets = comma_list(opt["budgets"])
    cfg = ElastifyConfig(budgets=budgets, tokens=opt["tokens"], seq_len=opt["seq_len"], batch_size=opt["batch_size"],
                         lr=opt["lr"], axes=axes, calib_batches=opt["calib_batches"], eval_tokens=opt["eval_tokens"],
                         stage2_weights=opt["stage2_weights"], all_budgets=opt["all_budgets"],
                         budget_lrs=_floats(args.budget_lrs, "--budget-lrs"), router_prior=args.router_prior,
                         **lever_config(opt), compile=compile_backend(args.compile, device))
    result = elastify(model, tokenizer, opt["data"], out, cfg, log=_log)
    print_table(result)
    del model

    # every budget from one loaded copy of the weights (budget views), as a deployment would run them
    engine = ElasticEngine.load(out, device=device)
    print(f"\nevery budget from one loaded checkpoint, greedy, {args.max_new_tokens} tokens at most:", flush=True)
    for prompt in ([args.prompt] if args.prompt else DEMO_PROMPTS):
        ids = encode_prompt(engine.tokenizer, prompt)
        print(f"  Q: {prompt}", flush=True)
        for name in engine.budgets:
            answer = engine.generate(name, ids, args.max_new_tokens)
            text = " ".join(engine.tokenizer.decode(answer.tokens, skip_special_tokens=True).split())
            print(f"    {name:>5}: {text or '(nothing before the end-of-text token)'}", flush=True)
    small = cfg.budgets[-1]
    print(f"""
next:
  star-elastic slice {out} --budget {small} --out runs/demo-{small}   # a standalone Hugging Face checkpoint
  star-elastic serve {out}                                  # every budget behind one OpenAI-compatible server
  star-elastic eval {out} --data {opt['data']}                        # every budget against the parent
  star-elastic validate {out}                               # checksums, bands, nesting, sliced == masked
  README: "Trusting every budget" and "Command line"; docs/METHOD.md for the method""", flush=True)
    return result


# ----------------------------------------------------------------------------- importance and slicing

def cmd_importance(args):
    from .elastic.importance import save_scores
    from .zero_shot import calibration_scores

    out = check_output(args.out, args.force, kind="file")
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, pick_dtype(args.dtype, device))
    scores = calibration_scores(model, tokenizer, args.data, batches=args.batches, batch_size=args.batch_size,
                                seq_len=args.seq_len, seed=args.seed, depth=args.depth, log=_log)
    scores["meta"].update(model=str(resolve_model(args.model)), data=args.data, seq_len=args.seq_len, seed=args.seed)
    save_scores(scores, out)  # through a temporary file: never half-written
    meta = scores["meta"]
    print(f"wrote {out} ({len(scores) - 1} score tensors from {meta['sequences']} sequences, "
          f"{meta['tokens']} tokens{', with layer order' if 'layer_order' in scores else ''})")
    return scores


def cmd_slice(args):
    """Check the flags (before anything is read), then one of:
    --budget NAME: MODEL is an elastic checkpoint, its weights sorted already; the budget's prefix of
      every tensor is streamed from disk (zero_shot.slice_budget -> elastic/stream.py), the parent
      never loaded (--dtype casts each tensor as it is written; --device is not used);
    --params / --spec: load the parent and run the zero-shot pipeline (zero_shot.zero_shot_slice).
    --format decilm: either one's Llama export rewritten as DeciLM block_configs (convert.write_decilm),
    after convert.prepare_decilm has refused, from the config alone, what the format cannot hold."""
    import dataclasses

    from .convert import check_decilm, prepare_decilm, write_decilm
    from .elastic import ElasticSpec
    from .errors import StarElasticError
    from .zero_shot import SliceConfig, check_budget, check_config, read_spec, slice_budget, zero_shot_slice

    if args.dtype and args.params is None and args.spec is None and args.budget is None:
        ckpt = "CKPT" if args.model == DEFAULT_MODEL else args.model
        raise StarElasticError(f"slice cuts one model out of MODEL (--params, --spec or --budget); the whole "
                               f"checkpoint in {args.dtype}, an elastic one with every budget and its manifest, is "
                               f"`star-elastic convert {ckpt} --dtype {args.dtype} --out DIR`")
    budget = manifest = source = None
    if args.budget is not None:  # a budget of an elastic checkpoint: its weights are sorted already
        if args.params is not None or args.spec is not None:
            raise StarElasticError("--budget slices an elastic checkpoint's trained budget: no --params or --spec")
        source = resolve_model(args.model)
        budget, manifest = check_budget(source, args.budget, verify=args.verify)
    elif args.verify:
        raise StarElasticError("--verify checks an elastic checkpoint's files: it goes with --budget")
    # the same flags as a library config; a placeholder stands for --spec until the file is read
    cfg = SliceConfig(params=args.params, spec=budget if budget is not None else ElasticSpec() if args.spec else None,
                      budget=args.budget, axes=args.axes, multiple=args.multiple, scores=args.scores or None,
                      method=args.method, data=args.data, batches=args.batches, batch_size=args.batch_size,
                      seq_len=args.seq_len, seed=args.seed)
    check_config(cfg)
    out = check_output(args.out, args.force)
    if budget is None and args.spec:
        cfg = dataclasses.replace(cfg, spec=read_spec(args.spec))  # fails before loading
    source = source or resolve_model(args.model)  # (the default model is fetched on first use: after the checks)
    dtype = pick_dtype(args.dtype, None) if args.dtype else None  # default: as stored, so 1.0 is exact
    decilm = args.format == "decilm"
    if decilm:  # FP8 output, a parent or a given budget DeciLM cannot hold: refused before any work
        dtype = prepare_decilm(source, dtype, cfg.spec)

    if budget is not None:
        def run(directory, log):
            return slice_budget(source, args.budget, directory, manifest=manifest, dtype=dtype, log=log)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, pick_device(args.device), dtype)
        if decilm:  # a GGUF parent's config is known once loaded
            check_decilm(model.config, cfg.spec)

        def run(directory, log):
            return zero_shot_slice(model, tokenizer, directory, cfg, log=log, parent=str(source))
    if not decilm:
        return run(out, _log)
    hint = "; with --params, --multiple 256 keeps every FFN width a multiple of 256" if args.params else ""
    return write_decilm(out, run, hint=hint, log=_log)


def cmd_convert(args):
    """convert.convert: the whole checkpoint (an elastic one with every budget nested, its manifest
    kept) in --dtype, written through a temporary directory."""
    from .convert import check_source, convert

    check_source(args.model, args.out)  # before --out's own check: --force would not help there
    return convert(args.model, check_output(args.out, args.force), args.dtype, log=_log)


# ----------------------------------------------------------------------------- checks

def cmd_validate(args):
    """validate.validate_checkpoint, its report, and --json; a failed check: exit status 1 (`cli.main`)."""
    import sys

    from .validate import validate_checkpoint

    if args.json:
        check_output(args.json, force=True, kind="file")
    device = pick_device(args.device)
    t0 = time.perf_counter()
    report = validate_checkpoint(args.model, args.data, device, pick_dtype(args.dtype, device), args.seq_len,
                                 args.max_tokens, args.batch_size)
    print(f"validate {args.model}")
    print(report.format())
    if report.failed:
        first = report.failures[0]
        where = f"budget {first.budget}: " if first.budget else ""
        print(f"star-elastic: validation failed: {where}{first.detail}", file=sys.stderr)
    if args.json:
        write_json({"checkpoint": str(args.model), "data": args.data, "seconds": round(time.perf_counter() - t0, 2),
                    **report.to_dict()}, args.json)
    return report


def cmd_inspect(args):
    """inspection.inspect_checkpoint, its report, and with --out the figures and inspect.json."""
    from .inspection import format_report, inspect_checkpoint, write_inspection

    out = check_output(args.out, args.force) if args.out else None
    info = inspect_checkpoint(args.model, verify=args.verify)
    print(format_report(info))
    if out is not None:
        written = write_inspection(info, out)
        print(f"wrote {out}: {', '.join(written)}")
    return info
