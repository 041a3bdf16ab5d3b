"""The delta's restore at Nemotron 3 Nano's shapes: its rank-r factorisation (elastic/delta.py `top_singular`,
a randomized SVD above EXACT_SVD_MAX rows and columns) against the full float64 SVD it replaced, side by side
on one device, for every kind of layer the full budget's delta covers (Mamba in/out projections, attention,
shared and routed experts), and what the whole restore of Nano's 52 layers adds up to at each.

    python benchmarks/bench_restore_svd.py --device cuda --json restore_svd.json

The matrices are random (float64, as the restore runs): a flat spectrum, the randomized SVD's hardest case, so
the share of the energy its rank-r part catches against the full SVD's is printed beside the times. The
routed experts are timed on a batch of --experts of them and scaled to 128. Whitening (a Cholesky and a
triangular solve per linear layer) and the weights' gathers are not counted: they are the same on both paths.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from star_elastic.elastic.delta import EXACT_SVD_MAX, FullDelta, top_singular  # noqa: E402
from star_elastic.model import Model  # noqa: E402


def shapes(rank: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(layer kind, target's name within its layer, weight shape) for one layer of each kind, from a Nano-shaped
    FullDelta built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Model(common.nano_config("ME*"))
    delta = FullDelta(model, rank)
    kind = {"0": "M", "1": "E", "2": "*"}
    return [(kind[n.split(".")[2]], n.split(".", 3)[3], tuple(delta.weight_of(model, n).shape)) for n in delta.targets]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--rank", type=int, default=64, help="the delta's rank (elastify --keep-full: 64)")
    ap.add_argument("--experts", type=int, default=4, help="routed experts timed a batch (scaled to 128)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 1 on a GPU, 0 on the CPU)")
    ap.add_argument("--json", default="restore_svd.json")
    args = ap.parse_args()
    device = common.setup(args.device, deterministic=False)
    warmup = args.warmup if args.warmup is not None else int(device.type == "cuda")
    per_kind = Counter(common.NANO_LAYERS)
    rows, total_ours, total_full = [], 0.0, 0.0
    g = torch.Generator(device=device).manual_seed(0)
    for kind, name, shape in shapes(args.rank):
        scale = 1
        if len(shape) == 3:  # routed experts (E, out, in)
            scale, shape = shape[0] / args.experts, (args.experts, *shape[1:])
        a = torch.randn(*shape, generator=g, device=device, dtype=torch.float64)
        k = min(args.rank, *shape[-2:])
        ours = common.timed(lambda: top_singular(a, k), device, warmup=warmup, iters=args.repeats)
        full = common.timed(lambda: torch.linalg.svd(a, full_matrices=False), device, warmup=warmup, iters=args.repeats)
        s_ours = top_singular(a, k)[1]
        s_full = torch.linalg.svdvals(a)[..., :k]
        share = float((s_ours ** 2).sum() / (s_full ** 2).sum())
        n = per_kind[kind] * scale
        total_ours, total_full = total_ours + n * ours, total_full + n * full
        rows.append({"layer": kind, "target": name, "shape": list(shape), "scaled_by": scale, "ours_s": ours,
                     "full_svd_s": full, "speedup": full / ours, "energy_share_vs_full": share,
                     "randomized": min(shape[-2:]) > EXACT_SVD_MAX, "in_nano": n})
        print(f"{kind} {name:28s} {str(tuple(shape)):20s} ours {ours * 1e3:9.1f} ms  full SVD {full * 1e3:9.1f} ms  "
              f"{full / ours:6.1f}x  rank-{k} energy {share:.6f} of the full SVD's", flush=True)
    print(f"the whole restore at Nano ({len(common.NANO_LAYERS)} layers, rank {args.rank}) on {common.machine(device)}: "
          f"ours {total_ours:.0f} s, the full SVD {total_full:.0f} s ({total_full / total_ours:.1f}x); one rank's "
          "share of it under torchrun is 1/ranks (layers dealt out)")
    common.write_json(args.json, {"benchmark": "bench_restore_svd", "date": datetime.date.today().isoformat(),
                                  "machine": common.machine(device),
                                  "torch": torch.__version__, "rank": args.rank, "exact_svd_max": EXACT_SVD_MAX,
                                  "rows": rows, "nano_restore_ours_s": total_ours,
                                  "nano_restore_full_svd_s": total_full})


if __name__ == "__main__":
    main()
