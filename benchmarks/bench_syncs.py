"""Where a training step still waits for the GPU (issue 16, item 3: no host synchronisation).

    python benchmarks/bench_syncs.py --variants joint,router --steps 4 --json syncs.json

Builds SmolLM2-135M's shapes with random weights (benchmarks/common.smollm2_config), budgets 1.0 / 0.75 / 0.5,
the full anchor at 0.5, and runs a few steps of `ElasticTrainer` under `torch.cuda.set_sync_debug_mode("warn")`:
every operation that makes the host wait for the device (a tensor read back to Python, a copy from pageable host
memory, a data-dependent shape) warns, and the warnings are counted by the line of Python that caused them.
The steps are taken as `ElasticTrainer.run` takes them: each step's logs read after the next step is queued.
That read waits on a CUDA event (`runtime.HostCopy`), which the sync detector does not flag; such waits are
counted apart, by the line that read, since one that comes after the next step is queued keeps the device busy.
`joint`: fixed architectures, no router (the bench's joint runs); `router`: the learnable router. A step is
host-bound when these waits keep the host from queueing ahead, so the table says where to look, not how long.
Needs a CUDA device; counting, not timing."""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

import common
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router, RouterConfig
from star_elastic.elastic.spec import ElasticSpec
from star_elastic.model import Model
from star_elastic.train import ElasticTrainer, TrainConfig

# E0's architectures (docs/results/elastic_session9_h200.json), the bench's joint runs
JOINT_SPECS = {"0.75": ElasticSpec(intermediate_size=960),
               "0.5": ElasticSpec(hidden_size=432, num_attention_heads=6, num_key_value_heads=2, intermediate_size=832)}
OURS = str(Path(__file__).resolve().parents[1])


def where(record: warnings.WarningMessage) -> str:
    """A warning's Python line, relative to the repository when it is ours."""
    name = record.filename
    if name.startswith(OURS):
        name = name[len(OURS) + 1:]
    return f"{name}:{record.lineno}"


def count_syncs(records: list, steps: int) -> list[dict]:
    """The synchronisation warnings among `records`, per line of Python, most first, with counts a step."""
    hits = collections.Counter(where(r) for r in records if "synchronizing" in str(r.message))
    return [{"where": k, "per_step": n / steps} for k, n in hits.most_common()]


@contextlib.contextmanager
def event_waits():
    """Count every `torch.cuda.Event.synchronize` by the first line of ours outside runtime.py that led to it."""
    hits, original = collections.Counter(), torch.cuda.Event.synchronize

    def counted(self):
        for frame in reversed(traceback.extract_stack()[:-1]):
            if frame.filename.startswith(OURS) and not frame.filename.endswith("runtime.py"):
                hits[f"{frame.filename[len(OURS) + 1:]}:{frame.lineno}"] += 1
                break
        return original(self)

    torch.cuda.Event.synchronize = counted
    try:
        yield hits
    finally:
        torch.cuda.Event.synchronize = original


def steps_as_run_takes_them(t: ElasticTrainer, steps: int):
    """`steps` steps, each one's logs read once the next is queued, the last at once (as `run` does)."""
    previous = None
    for _ in range(steps):
        logs = t.train_step(defer=True)
        if previous is not None:
            previous.result()
        previous = logs
    previous.result()


def trainer(variant: str, device: torch.device, batch: int, seq: int, steps: int, out: str) -> ElasticTrainer:
    cfg = common.smollm2_config()
    torch.manual_seed(0)
    model = Model(cfg).to(device)
    teacher = Model(cfg).to(device)
    teacher.load_state_dict(model.state_dict())
    budgets = [parse_budget(b, cfg) for b in ("1.0", "0.75", "0.5")]
    rows = torch.randint(0, cfg.vocab_size, (batch * (steps + 4), seq))
    tcfg = TrainConfig(steps=steps + 2, batch_size=batch, seq_len=seq, lr=2e-4, full_anchor=0.5, warmup_steps=1)
    if variant == "joint":
        specs = [JOINT_SPECS.get(b.name, ElasticSpec()) for b in budgets]
        return ElasticTrainer(model, teacher, None, budgets, rows, tcfg, out, fixed_specs=specs)
    router = Router(cfg, budgets, RouterConfig()).to(device)
    return ElasticTrainer(model, teacher, router, budgets, rows, tcfg, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="joint,router")
    ap.add_argument("--steps", type=int, default=4, help="steps counted, after two uncounted ones")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args(argv)
    device = common.setup(args.device, deterministic=False)
    if device.type != "cuda":
        raise SystemExit("bench_syncs: needs a CUDA device (a host sync is the host waiting for a GPU)")
    unknown = set(args.variants.split(",")) - {"joint", "router"}
    if unknown:
        raise SystemExit(f"bench_syncs: unknown variant(s) {sorted(unknown)}: joint, router")
    results = {}
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory(prefix="bench_syncs_") as out:
            t = trainer(variant, device, args.batch_size, args.seq_len, args.steps, out)
            for _ in range(2):  # first steps: allocations, autotuning, caches
                t.train_step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as records, event_waits() as waits:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    steps_as_run_takes_them(t, args.steps)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        rows = count_syncs(records, args.steps)
        events = [{"where": k, "per_step": n / args.steps} for k, n in waits.most_common()]
        results[variant] = rows
        results[f"{variant}_event_waits"] = events
        total = sum(r["per_step"] for r in rows)
        print(f"{variant}: {total:.1f} host syncs a step ({args.batch_size} x {args.seq_len}, budgets 1.0 / 0.75 / 0.5, "
              f"anchor 0.5); {sum(r['per_step'] for r in events):.1f} waits on an event (a step's logs, read after "
              "the next step is queued)")
        for r in rows[:20]:
            print(f"  {r['per_step']:6.1f}  {r['where']}")
        for r in events:
            print(f"  {r['per_step']:6.1f}  {r['where']}  (event)")
    if args.json:
        common.write_json(args.json, {"benchmark": "bench_syncs", "command": " ".join(sys.argv),
                                      "machine": common.machine(device), "torch": torch.__version__,
                                      "steps": args.steps, "variants": results})


if __name__ == "__main__":
    main()
