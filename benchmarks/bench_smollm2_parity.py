"""SmolLM2-135M real weights: our perplexity vs transformers' on held-out real text.

Both models come from the same GGUF file: transformers reads it itself (`gguf_file=`), we read
the safetensors directory converted from it once. Same windows, same tokens.

    python benchmarks/bench_smollm2_parity.py --data wiki --max-tokens 16384 --json parity.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="wiki")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    res = compare(args.data, args.max_tokens, args.seq_len)
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


def compare(data: str, max_tokens: int, seq_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    from star_elastic import load, load_tokenizer
    from star_elastic.assets import smollm2_gguf
    from star_elastic.runtime import eval_tokens
    from star_elastic.evaluate import perplexity

    gguf = smollm2_gguf()
    ours = load(gguf)
    tokenizer = load_tokenizer(gguf)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    stream = eval_tokens(tokenizer, data, "heldout")
    out = {"date": datetime.date.today().isoformat(), "machine": f"CPU ({platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads)", "data": f"held-out split of {data}", "seq_len": seq_len}
    for name, model in (("ours", ours), ("transformers", ref)):
        t0 = time.perf_counter()
        r = perplexity(model, stream, seq_len=seq_len, batch_size=4, max_tokens=max_tokens)
        out[name] = {"perplexity": r["perplexity"], "tokens": r["tokens"], "seconds": round(time.perf_counter() - t0, 1)}
    out["relative_difference"] = abs(out["ours"]["perplexity"] / out["transformers"]["perplexity"] - 1)
    return out


if __name__ == "__main__":
    main()
