"""Build wiki_next_sentence.jsonl: a 4-way multiple-choice task from the held-out Wikipedia intros
(the same seeded 10% of documents that elastify never trains on). Each item gives an article's first
sentence; the answer is its true second sentence, the distractors are second sentences of three
other held-out articles.

    python examples/lm_eval/make_wiki_next_sentence.py            # writes the JSONL beside this file
    python examples/lm_eval/make_wiki_next_sentence.py --items 500
"""

import argparse
import json
import random
import re
from pathlib import Path

from star_elastic.assets import resolve_text
from star_elastic.data import read_documents, split_documents

SENTENCE = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def main(n: int = 100, seed: int = 0):
    _, heldout = split_documents(read_documents(resolve_text("wiki")), 0.1, seed=0)
    pairs = []
    for doc in heldout:
        s = SENTENCE.split(doc.split("\n")[0])
        if len(s) >= 2 and 40 <= len(s[0]) <= 200 and 30 <= len(s[1]) <= 200:
            pairs.append((s[0], s[1]))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    items = []
    for i, (first, second) in enumerate(pairs[:n]):
        others = rng.sample([p[1] for j, p in enumerate(pairs) if j != i], 3)
        choices = others + [second]
        rng.shuffle(choices)
        items.append({"context": first, "choices": choices, "label": choices.index(second)})
    out = Path(__file__).with_name("wiki_next_sentence.jsonl")
    out.write_text("".join(json.dumps(x) + "\n" for x in items))
    print(f"wrote {out}: {len(items)} items from {len(pairs)} held-out articles with two sentences")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100, help="multiple-choice items to write (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="which articles and distractors")
    args = ap.parse_args()
    if args.items < 1:
        ap.error(f"--items must be at least 1, got {args.items}")
    main(args.items, args.seed)
