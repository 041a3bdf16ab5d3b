"""Does the full anchor's gradient work against the smaller budgets' on a real parent?

Joint training of fixed architectures (no router) with the full anchor and `--anchor-projection`, which
logs each step the cosine between the anchor's gradient and the smaller budget's over the whole model
(TrainConfig.anchor_projection, docs/METHOD.md §15). A negative cosine is a conflict, the case the
projection removes; on the CPU test model the two agree (0.8-0.97). Quality is not measured here (a few
steps); `bench_elastic.py --anchor-projection` does that on a GPU.

    python benchmarks/bench_anchor_conflict.py --steps 14 --json docs/results/anchor_conflict_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from star_elastic.data import TokenBatches, load_corpus_tokens, pack  # noqa: E402
from star_elastic.elastic.importance import estimate_importance  # noqa: E402
from star_elastic.elastic.sort import sort_model  # noqa: E402
from star_elastic.elastic.cost import parse_budget  # noqa: E402
from star_elastic.elastic.spec import ElasticSpec  # noqa: E402
from star_elastic.runtime import DEFAULT_MODEL, load_model_and_tokenizer, pick_device  # noqa: E402
from star_elastic.train import ElasticTrainer, TrainConfig  # noqa: E402


def parser(doc: str) -> argparse.ArgumentParser:
    """The options of a few joint steps of fixed FFN cuts on SmolLM2 (this benchmark's, bench_anchor_data's)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data", default="wiki,bible")
    ap.add_argument("--ffn", default="960,832", help="the smaller budgets' FFN widths (budgets 0.75, 0.5)")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--full-anchor", type=float, default=0.5)
    ap.add_argument("--device", help="default: cuda when there is one")
    ap.add_argument("--calib-batches", type=int, default=8,
                    help="batches that rank the units before the cut, as elastify does (0: cut the parent unsorted, "
                         "as the first run of this benchmark did)")
    ap.add_argument("--json", help="write every step's figures here")
    return ap


def fixed_cuts(args, **train):
    """(model, teacher, budgets, rows, specs, TrainConfig, device, tokenizer): SmolLM2 from its own weights,
    importance-sorted (`--calib-batches`), its FFN cut to `--ffn` for the smaller budgets (nothing else
    cut), stage 2 from the first step with the full budget never drawn (the anchor trains it), `train`
    overriding the TrainConfig."""
    torch.manual_seed(0)
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, None)
    model.float()
    stream, _ = load_corpus_tokens(args.data, tokenizer, seed=0)
    rows = pack(stream[: 400 * args.seq_len * args.batch_size], args.seq_len)
    if args.calib_batches:  # the function-preserving sort, so that each cut keeps the most important units
        calib = TokenBatches(rows, args.batch_size, seed=7)
        sort_model(model, estimate_importance(model, (b.to(device) for b in calib), num_batches=args.calib_batches,
                                              progress=False))
    teacher = copy.deepcopy(model).eval()
    widths = [int(w) for w in args.ffn.split(",")]
    budgets = [parse_budget(b, model.config) for b in ["1.0"] + ["0.75", "0.5", "0.25"][: len(widths)]]
    specs = [ElasticSpec()] + [ElasticSpec(intermediate_size=w) for w in widths]
    cfg = TrainConfig(**{**dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                warmup_steps=1, full_anchor=args.full_anchor, stage1_fraction=0.0,
                                stage2_weights=[0.0] + [1.0] * len(widths)), **train})
    return model, teacher, budgets, rows, specs, cfg, device, tokenizer


def record(name, args, device, path, **fields):
    """Write benchmark `name`'s JSON: what produced it (command, machine, date) and `fields`."""
    common.write_json(path, {"benchmark": name, "date": datetime.date.today().isoformat(),
                             "machine": common.machine(device),
                             "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                             "config": vars(args), **fields}, indent=1)


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    model, teacher, budgets, rows, specs, cfg, device, _ = fixed_cuts(args, anchor_projection=True)
    trainer = ElasticTrainer(model, teacher, None, budgets, rows, cfg, Path(tempfile.mkdtemp()), fixed_specs=specs)
    print("step budget  cos(anchor, smaller)  kd(smaller)  kd(full)")
    steps, t0 = [], time.perf_counter()
    for i in range(args.steps):
        lg = trainer.train_step()
        steps.append({"step": i, "budget": lg["budget"], "anchor_cos": lg["anchor_cos"], "kd": lg["kd"],
                      "full_kd": lg["full_kd"]})
        print(f"{i:4d} {lg['budget']:>6} {lg['anchor_cos']:+21.4f} {lg['kd']:12.4f} {lg['full_kd']:9.5f}", flush=True)
    later = [s["anchor_cos"] for s in steps[2:]]
    print(f"steps 2+: mean cosine {sum(later) / max(1, len(later)):+.3f}, negative on {sum(c < 0 for c in later)} "
          f"of {len(later)} ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        record("bench_anchor_conflict", args, device, args.json, steps=steps)

if __name__ == "__main__":
    main()
