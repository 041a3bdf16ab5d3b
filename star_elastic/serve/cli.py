"""`star-elastic generate CKPT --budget NAME` / `--think-budget A --answer-budget B`, and `star-elastic serve CKPT`.

Wired into star_elastic/cli.py by `add_generate_budget_args` and `add_serve_parser`.
"""

from __future__ import annotations

import sys


def add_generate_budget_args(sp):
    """Extra `generate` options for an elastic checkpoint."""
    sp.add_argument("--budget", help="MODEL is an elastic checkpoint: generate with this budget (a view of the "
                                     "loaded parent, no copy)")
    sp.add_argument("--think-budget", help="elastic budget control: reason with this budget ...")
    sp.add_argument("--answer-budget", help="... then answer with this one (prefills prompt + reasoning)")
    sp.add_argument("--think-marker", default=None, help="end of the reasoning (default: </think>)")
    sp.add_argument("--max-think-tokens", type=int, default=512, help="reasoning token limit (default 512)")
    add_head_order_arg(sp)


def add_head_order_arg(sp):
    sp.add_argument("--head-order", choices=["loaded", "serving"], default="loaded",
                    help="where budgets keep heads per group: loaded (default) keeps the parent as loaded and copies "
                         "those parts of each budget once (about 5%% of a Nano-shaped parent for budgets 0.75 and "
                         "0.5), the views then decoding at the sliced models' speed (0.99-1.01x on an H100); serving "
                         "permutes the parent's heads once so that every budget's are a prefix, no memory beside the "
                         "parent, a few reorder copies each token (0.95-1.00x) (docs/RESULTS.md, views against "
                         "slices)")


def wants_budget(args) -> bool:
    return any(getattr(args, a, None) is not None for a in ("budget", "think_budget", "answer_budget"))


def _engine(args):
    from ..runtime import pick_device, pick_dtype, resolve_model
    from .engine import ElasticEngine

    device = pick_device(args.device)
    engine = ElasticEngine.load(resolve_model(args.model), device=device, dtype=pick_dtype(args.dtype, device),
                                fp8_matmul=getattr(args, "fp8_matmul", False),
                                serving_order=getattr(args, "head_order", "loaded") == "serving")
    info = engine.fp8_info
    if info is not None:
        print(f"FP8 matmuls: {info['swapped']} linear layers, {info['shared']} of them views of the parent's one FP8 "
              f"copy ({info['bytes'] / 2**20:.1f} MiB)", file=sys.stderr)
    return engine


def cmd_generate_budget(args):
    """Generate at one budget, or think with one and answer with another; prints the text."""
    from ..runtime import encode_prompt, resolve_model
    from ..elastic.checkpoint import budget_names, read_manifest
    from ..errors import StarElasticError
    from .engine import DEFAULT_MARKER

    think = args.think_budget is not None or args.answer_budget is not None
    if think and args.budget is not None:
        raise StarElasticError("give either --budget NAME or --think-budget A --answer-budget B, not both")
    if think and (args.think_budget is None or args.answer_budget is None):
        raise StarElasticError("elastic budget control needs both --think-budget and --answer-budget")
    if args.max_think_tokens < 1:
        raise StarElasticError(f"--max-think-tokens must be at least 1, got {args.max_think_tokens}")
    trained = budget_names(read_manifest(resolve_model(args.model)))  # read before the weights load
    names = [n for n in (args.budget, args.think_budget, args.answer_budget) if n is not None]
    engine = _engine(args)
    for name in names:
        if str(name) not in trained:
            engine.view(name)  # the router's architecture for it, or a one-line error
            print(f"[budget {name}: interpolated between trained budgets ({', '.join(trained)}), not trained itself]",
                  file=sys.stderr)
    ids = encode_prompt(engine.tokenizer, args.prompt, chat=not args.raw)
    if ids.shape[1] + args.max_new_tokens + (args.max_think_tokens if think else 0) > engine.context_length:
        raise StarElasticError(f"prompt ({ids.shape[1]} tokens) + tokens to generate is over the model's context "
                               f"of {engine.context_length}")
    decode = lambda t: engine.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    if not think:
        gen = engine.generate(args.budget, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed)
        text = decode(gen.tokens)
        print(text)
        return text
    marker = DEFAULT_MARKER if args.think_marker is None else args.think_marker
    gen = engine.think_then_answer(ids, args.think_budget, args.answer_budget, args.max_think_tokens,
                                   args.max_new_tokens, marker, args.temperature, args.top_p, args.seed)
    thinking, answer = decode(gen.thinking), decode(gen.tokens)
    print(f"[thinking: budget {args.think_budget}, {len(gen.thinking)} tokens, {gen.think_seconds:.2f} s]",
          file=sys.stderr)
    print(thinking)
    print(f"[answer: budget {args.answer_budget}, {len(gen.tokens)} tokens, "
          f"{gen.seconds - gen.think_seconds:.2f} s]", file=sys.stderr)
    print(answer)
    return {"thinking": thinking, "answer": answer}


def add_serve_parser(sub, model_args):
    sp = sub.add_parser("serve", help="OpenAI-compatible HTTP server: every budget of an elastic checkpoint")
    model_args(sp)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--slots", type=int, default=16, help="sequences decoded together per budget (continuous "
                                                           "batching; more requests wait for a free slot; default 16)")
    sp.add_argument("--fp8-matmul", action="store_true",
                    help="every trained budget multiplies in FP8, sharing one FP8 copy of the parent's linear weights")
    sp.add_argument("--compile", choices=["off", "on", "auto"], default="off",
                    help="the batched decode step under torch.compile (inductor) before its CUDA graph: on an H200 "
                         "0.84 ms a step at batch 1 against 1.18 eager (docs/RESULTS.md, serving at Nano width), at "
                         "the cost of compiling once per budget and pool size as requests arrive (a pool of one request "
                         "with inductor's GEMVs tuned: longer to compile); auto: on a GPU with Triton; default off")
    add_head_order_arg(sp)
    sp.set_defaults(fn=cmd_serve)
    return sp


def cmd_serve(args):
    from ..errors import StarElasticError

    try:
        from .app import serve
    except ImportError as e:
        raise StarElasticError(f"serving needs FastAPI and uvicorn ({e}): pip install 'star-elastic[serve]'") from None
    if not 0 <= args.port < 65536:
        raise StarElasticError(f"--port must be from 0 to 65535, got {args.port}")
    slots = getattr(args, "slots", 16)
    if slots < 1:
        raise StarElasticError(f"--slots must be at least 1, got {slots}")
    from .batching import BatchedEngine

    from ..runtime import compile_backend

    base = _engine(args)
    backend = compile_backend(getattr(args, "compile", "off"), base.device)
    engine = BatchedEngine.of(base, slots=slots, compile=backend)
    order = "heads in serving order" if engine.serving_order else "heads as loaded"
    print(f"star-elastic serve: budgets {', '.join(engine.budgets)} on {engine.device}, {slots} slots per budget, "
          f"{order}{', decode step compiled' if backend else ''}, http://{args.host}:{args.port}/v1", flush=True)
    serve(engine, args.host, args.port)
