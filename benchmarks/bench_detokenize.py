"""The server's host work per streamed token (issue 12, item 4): turning each new token into text.

Side by side in one run, on SmolLM2's tokenizer (the installed GGUF package): decoding the whole answer so far
at every token (what `serve/app.py` did until the thirty-second session: its cost grows with the answer, so a
stream costs the square of its length) against `Detokenizer`, which decodes the last few tokens. Per
answer length: microseconds a token for each, their ratio, and a check that both give the same text. A
random answer of token ids from the vocabulary's ordinary range stands in for a model's; the tokenizer's
decode does not depend on what the ids mean.

    python benchmarks/bench_detokenize.py --json docs/results/detokenize_cpu.json
"""

from __future__ import annotations

import argparse
import random
import time

import common
import torch

from star_elastic.hf import load_tokenizer
from star_elastic.runtime import DEFAULT_MODEL, resolve_model
from star_elastic.serve.app import Detokenizer


class WholeDecode:
    """The earlier way: the whole token list decoded at every token, the new text cut off the end."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def per_token_us(make, tokenizer, ids: list[int], repeats: int) -> tuple[float, str]:
    """Median over `repeats` of the microseconds a token costs streaming `ids` through `make(tokenizer)`."""
    times, text = [], ""
    for _ in range(repeats):
        d = make(tokenizer)
        t0 = time.perf_counter()
        text = "".join(d.add(t) for t in ids)
        times.append((time.perf_counter() - t0) / len(ids) * 1e6)
    return sorted(times)[len(times) // 2], text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32,256,1024,4096", help="answer lengths in tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    tokenizer = load_tokenizer(resolve_model(DEFAULT_MODEL))
    rng = random.Random(0)
    rows = []
    print(f"{common.machine(torch.device('cpu'))}, SmolLM2's tokenizer ({len(tokenizer)} tokens)")
    print(f"{'answer':>8s} {'whole decode':>14s} {'Detokenizer':>12s} {'ratio':>7s}  same text")
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = [rng.randrange(256, len(tokenizer) - 256) for _ in range(n)]
        old_us, old_text = per_token_us(WholeDecode, tokenizer, ids, args.repeats)
        new_us, new_text = per_token_us(Detokenizer, tokenizer, ids, args.repeats)
        same = new_text == old_text == tokenizer.decode(ids, skip_special_tokens=True)
        rows.append({"tokens": n, "whole_decode_us_per_token": round(old_us, 2), "detokenizer_us_per_token":
                     round(new_us, 2), "ratio": round(old_us / new_us, 2), "same_text": same})
        print(f"{n:8d} {old_us:12.1f} us {new_us:9.1f} us {old_us / new_us:6.1f}x  {same}")
    if args.json:
        common.write_json(args.json, {"benchmark": "bench_detokenize", "machine": common.machine(torch.device("cpu")),
                                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
