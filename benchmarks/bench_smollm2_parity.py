"""SmolLM2-135M real weights: our perplexity vs transformers' on held-out real text.

Both models come from the same GGUF file: transformers reads it itself (`gguf_file=`), we read
the safetensors directory converted from it once. Same windows, same tokens.

    python benchmarks/bench_smollm2_parity.py --data wiki --max-tokens 16384 --json parity.json
"""

from __future__ import annotations

import argparse
import json

import common


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
        common.write_json(args.json, res)


def compare(data: str, max_tokens: int, seq_len: int) -> dict:
    from star_elastic.assets import smollm2_gguf
    from star_elastic.evaluate import transformers_parity

    return transformers_parity(smollm2_gguf(), data, max_tokens, seq_len)


if __name__ == "__main__":
    main()
