"""How far the full model drifts out of the training domain with the anchor on the training batch, and
with the anchor on text sampled from the parent (`--anchor-data self`, docs/METHOD.md §15 item 16).

Two arms from the same start, side by side in one process: joint training of fixed FFN cuts (no router)
on the training text, the full anchor distilling the full model either on each step's training batch or
on a batch of text sampled from the parent before training (`generate.sample_rows`). The smaller budgets
see the same batches in both. Before and after, held-out perplexity of the full model on the training
domain and on sources absent from it, and of the first smaller budget on the same sources. A few steps
at a high rate, so that the drift shows on a CPU: a probe of the mechanism, not the GPU runs' quality
comparison (`bench_elastic.py --anchor-data self`, `benchmarks/device/run.sh PLAN17 18`).

    python benchmarks/bench_anchor_data.py --steps 16 --lr 1e-3 --json docs/results/anchor_data_cpu_smollm2.json
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_anchor_conflict import fixed_cuts, parser, record  # noqa: E402
from star_elastic.data import load_corpus_tokens  # noqa: E402
from star_elastic.elastic.masking import masked  # noqa: E402
from star_elastic.elastify import anchor_text  # noqa: E402
from star_elastic.evaluate import perplexity  # noqa: E402
from star_elastic.train import ElasticTrainer  # noqa: E402


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--heldout", default="wiki,shakespeare,wiki-fr", help="held-out sources (the first: in domain)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens a source")
    ap.set_defaults(steps=16, lr=1e-3)
    args = ap.parse_args(argv)
    model, teacher, budgets, rows, specs, cfg, device, tokenizer = fixed_cuts(args)
    heldouts = {name: load_corpus_tokens(name, tokenizer, seed=0)[1] for name in args.heldout.split(",")}

    def score(m, spec) -> dict:
        with masked(m, spec.masks(m.config, device=device)):
            return {name: perplexity(m, s, seq_len=args.seq_len, batch_size=4, max_tokens=args.eval_tokens,
                                     progress=False, device=device)["perplexity"] for name, s in heldouts.items()}

    t0 = time.perf_counter()
    sampled = anchor_text(("self", None), teacher, tokenizer, args.seq_len, args.batch_size,
                          args.steps * args.batch_size * args.seq_len, seed=0)
    sample_s = time.perf_counter() - t0
    before = {"full": score(model, specs[0]), budgets[1].name: score(model, specs[1])}
    arms = {}
    for arm, anchor_rows in (("training batch", None), ("self", sampled)):
        t0 = time.perf_counter()
        student = copy.deepcopy(model)
        trainer = ElasticTrainer(student, teacher, None, budgets, rows, cfg, Path(tempfile.mkdtemp()),
                                 fixed_specs=specs, anchor_rows=anchor_rows)
        logs = trainer.run(progress=False)
        after = {"full": score(student, specs[0]), budgets[1].name: score(student, specs[1])}
        arms[arm] = {"after": after, "seconds": round(time.perf_counter() - t0, 1),
                     "full_kd": [lg.get("full_kd") for lg in logs], "kd": [lg["kd"] for lg in logs]}
        del student, trainer
    print(f"{args.steps} steps of {args.batch_size} x {args.seq_len} at lr {args.lr:g}, anchor {args.full_anchor:g}; "
          f"anchor text sampled in {sample_s:.0f} s")
    print("held-out perplexity, change from the parent (full) or from the zero-shot cut")
    print(f"{'':24}" + "".join(f"{name:>22}" for name in heldouts))
    for who in before:
        print(f"{who + ' before':24}" + "".join(f"{before[who][n]:22.2f}" for n in heldouts))
        for arm, r in arms.items():
            print(f"{who + ', ' + arm:24}" + "".join(
                f"{r['after'][who][n]:13.2f} ({r['after'][who][n] / before[who][n] - 1:+6.1%})" for n in heldouts))
    if args.json:
        record("bench_anchor_data", args, device, args.json, before=before, arms=arms, sample_seconds=round(sample_s, 1))


if __name__ == "__main__":
    main()
