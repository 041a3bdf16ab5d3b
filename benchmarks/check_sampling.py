"""Is the parent's sampled text the same from run to run? The anchor's text (`elastify --anchor-data self`)
is sampled from the parent; two strict-determinism runs of bench_elastic.py on one H200 (twenty-third
session) trained their smaller budgets bit for bit alike, yet their full budgets, which alone read that text,
parted from the first step (its KD 0.001873 against 0.001854). This samples the same rows twice per mode, in
the decode step's CUDA graph and eagerly, under warn-only and strict deterministic algorithms, and prints each
sample's fingerprint and time. Run it twice side by side to compare across processes as well.

    python benchmarks/check_sampling.py --rows 256 --json OUT.json
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.utils.deterministic

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from star_elastic import load  # noqa: E402
from star_elastic.assets import smollm2_gguf  # noqa: E402
from star_elastic.generate import sample_rows  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint (default: SmolLM2-135M-Instruct, as bench_elastic.py part A)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=128, help="rows sampled at once (elastify's on a GPU)")
    ap.add_argument("--modes", default="warn-only,strict", help="deterministic-algorithm modes to try")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's weights; bench_elastic.py's teacher samples in bfloat16 on a GPU")
    ap.add_argument("--device")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = common.setup(args.device)  # as bench_elastic.py: warn-only, the cuBLAS workspace, no NaN filling
    torch.utils.deterministic.fill_uninitialized_memory = False
    model = load(args.model or smollm2_gguf(), dtype=getattr(torch, args.dtype), device=device).eval()
    results = []
    for mode in args.modes.split(","):
        torch.use_deterministic_algorithms(True, warn_only=mode == "warn-only")
        for graph in ([True, False] if device.type == "cuda" else [False]):
            prints = []
            for _ in range(2):
                t = common.clock(device)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    rows = sample_rows(model, args.rows, args.length, batch_size=args.batch_size, seed=0,
                                       use_graph=graph)
                prints.append({"fingerprint": common.fingerprint(rows), "seconds": round(common.clock(device) - t, 2),
                               "warnings": sorted({str(w.message).splitlines()[0] for w in caught})})
            same = prints[0]["fingerprint"] == prints[1]["fingerprint"]
            results.append({"mode": mode, "cuda_graph": graph, "same_twice": same, "samples": prints})
            print(f"{mode:9s} graph {str(graph):5s}  " + "  ".join(f"{p['fingerprint']} {p['seconds']:.1f} s"
                                                                 for p in prints)
                  + f"  {'same' if same else 'DIFFERENT'}" + "".join(f"\n    warned: {w}" for p in prints
                                                                     for w in p["warnings"]), flush=True)
    if args.json:
        common.write_json(args.json, {"benchmark": "check_sampling", "machine": common.machine(device),
                                      "torch": torch.__version__, "command": " ".join(sys.argv), "rows": args.rows,
                                      "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
                                      "length": args.length, "results": results})


if __name__ == "__main__":
    main()
