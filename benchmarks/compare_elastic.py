"""Like-for-like ratios between bench_elastic.py runs: (b)/(c) - 1 per budget and held-out source, and
the full budget against its parent, for pairs of runs named in result files or session bundles.

    python benchmarks/compare_elastic.py docs/results/elastic_session11_h200.json \\
        docs/results/elastic_session9_h200.json --pairs J0q:C4,E0q:C4,J0:E0c --json OUT.json

Each file is a bench_elastic.py result (its stem names its one run) or a bundle with a "runs" object
(docs/results/elastic_session*_h200.json). A pair "B:C" compares the trained rows of run B (the first
one-run method in it, or B@METHOD) with the Minitron rows of run C, budget by budget. Both runs must
have the same seed (it draws the held-out text) and each compared budget the same architecture;
otherwise the pair is refused in one line. A run that its bundle marks "invalid" (the reason) is
printed with the reason. This is what the ratio tables of docs/RESULTS.md §9 are
computed with."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import common
from star_elastic.elastic.cost import BAND  # a budget's share of the parameters within 5% of its target

SKIP = {"parent", "zero_shot", "zero_shot_elastic_arch"}


def load_runs(paths: list[str]) -> dict:
    """run name -> its result (one bench_elastic.py JSON each), from result files and bundles; BUNDLE#RUN takes
    that one run of a bundle (as --minitron-arch names it), so that a bundle can stand beside a new run of the
    same name as one of its others."""
    runs = {}
    for given in paths:
        path, _, only = given.partition("#")
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"compare_elastic: cannot read {path} ({e})") from None
        found = data["runs"] if isinstance(data.get("runs"), dict) else {Path(path).stem: data}
        if only:
            if only not in found:
                raise SystemExit(f"compare_elastic: {path} has no run {only!r} (it has {', '.join(found)})")
            found = {only: found[only]}
        for name, run in found.items():
            if name in runs:
                raise SystemExit(f"compare_elastic: run {name!r} is in two of the files; give one of them")
            runs[name] = run
    return runs


def _part(run: dict, name: str, part: str) -> dict:
    if part not in run:
        raise SystemExit(f"compare_elastic: run {name!r} has no part {part}")
    return run[part]


def rows_of(run: dict, name: str, part: str, method: str | None) -> tuple[str, dict]:
    """(method, budget -> row) of one method of a run: `method`, else the first trained one-run method."""
    rows = [r for r in _part(run, name, part)["rows"] if r["method"] not in SKIP]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if method is None:
        method = next((m for m in methods if m != "minitron"), None)
    if method not in methods:
        raise SystemExit(f"compare_elastic: run {name!r} has no {method or 'one-run'} rows (has: {', '.join(methods)})")
    return method, {r["budget"]: r for r in rows if r["method"] == method}


PARENT_TOLERANCE = 1e-3  # the parent on the same text scores the same, to a GPU's rounding


def same_text(pair: str, b_part: dict, c_part: dict) -> dict:
    """The parent's perplexities of run B, once both runs are seen to score the same held-out text: their
    held-out fingerprints agree (runs from the twenty-third session on), and so does the untouched parent's
    perplexity on every source both score. A seed alone does not make it the same text: another tokenizer,
    corpus or --max-docs draws other tokens, and a ratio across them would measure that."""
    parents = [next(r for r in p["rows"] if r["method"] == "parent")["perplexity"] for p in (b_part, c_part)]
    prints = [p.get("heldout_sha") or {} for p in (b_part, c_part)]
    for s in sorted(set(prints[0]) & set(prints[1])):
        if prints[0][s] != prints[1][s]:
            raise SystemExit(f"compare_elastic: {pair}: the two runs score different held-out {s} text "
                             f"(fingerprints {prints[0][s]} and {prints[1][s]})")
    for s in [s for s in parents[0] if s in parents[1]]:
        if abs(parents[0][s] / parents[1][s] - 1) > PARENT_TOLERANCE:
            raise SystemExit(f"compare_elastic: {pair}: the parent scores {parents[0][s]:.2f} against "
                             f"{parents[1][s]:.2f} on {s}: the two runs score different held-out text")
    return parents[0]


def compare(runs: dict, pair: str, part: str = "A") -> dict:
    """The ratios of one pair "B[@METHOD]:C" (see the module doc)."""
    try:
        b_name, c_name = pair.split(":")
    except ValueError:
        raise SystemExit(f"compare_elastic: a pair is RUN:RUN (e.g. J0q:C4), got {pair!r}") from None
    b_name, _, method = b_name.partition("@")
    for n in (b_name, c_name):
        if n not in runs:
            raise SystemExit(f"compare_elastic: no run {n!r} (have: {', '.join(runs)})")
    b_run, c_run = runs[b_name], runs[c_name]
    if b_run.get("seed") != c_run.get("seed"):
        raise SystemExit(f"compare_elastic: {pair}: seeds {b_run.get('seed')} and {c_run.get('seed')} score different "
                         "held-out text")
    method, b_rows = rows_of(b_run, b_name, part, method or None)
    _, c_rows = rows_of(c_run, c_name, part, "minitron")
    b_part, c_part = _part(b_run, b_name, part), _part(c_run, c_name, part)
    parent = same_text(pair, b_part, c_part)
    how = b_part.get("methods", {}).get(method, {})
    out = {"pair": pair, "method": method, "seed": b_run.get("seed"),
           "lr": b_part["training"].get("lr"), "lr_c": c_part["training"].get("lr"),
           "budget_lrs": how.get("budget_lrs"), "full_anchor": how.get("full_anchor"),
           "anchor_projection": bool(how.get("anchor_projection")), "anchor_data": how.get("anchor_data"),
           "anchor_mix": how.get("anchor_mix"),
           # --budget-mix: the smaller budgets' share of the parent's own text, (b)'s and (c)'s (a pair may mix a
           # (b) that had it with a (c) that had not: against the plain (c) it is the honest baseline)
           "budget_mix": how.get("budget_mix"),
           "budget_mix_c": c_part.get("methods", {}).get("minitron", {}).get("budget_mix"),
           "full_delta_rank": how.get("full_delta_rank"), "full_delta_scope": how.get("full_delta_scope"),
           "full_delta_lr": how.get("full_delta_lr"), "full_delta_finish": how.get("full_delta_finish"),
           "full_delta_restore": how.get("full_delta_restore"), "full_delta_restored": how.get("full_delta_restored"),
           "full_delta_restore_report": how.get("full_delta_restore_report"),
           "full_delta_allocate": how.get("full_delta_allocate"),
           # "freeze_embeddings_and_norms": true in the runs before TrainConfig.hold
           "hold": how.get("hold") or (["embeddings", "norms"] if how.get("freeze_embeddings_and_norms") else None),
           "hold_rate": how.get("hold_rate"), "hold_pull": how.get("hold_pull"), "budgets": {},
           # a bundle marks a run whose rows must not be read as a result ("invalid": why), e.g. one that a
           # bug found later trained as something else; the ratios are still printed, under the warning
           "invalid": {n: r["invalid"] for n, r in ((b_name, b_run), (c_name, c_run)) if r.get("invalid")},
           # one whose full budget alone must not be read as the setting's (its smaller budgets stand)
           "full_budget_invalid": b_run.get("full_budget_invalid")}
    for budget, c in c_rows.items():
        b = b_rows.get(budget)
        if b is None:
            continue
        if b["spec"] != c["spec"]:
            raise SystemExit(f"compare_elastic: {pair}: budget {budget} has two architectures "
                             f"({b['architecture']} against {c['architecture']})")
        out["budgets"][budget] = {"architecture": b["architecture"], "param_fraction": b["param_fraction"],
                                  "vs_c": {s: b["perplexity"][s] / c["perplexity"][s] - 1 for s in c["perplexity"]},
                                  # how well each fits its own training batches at the end: a nested budget that
                                  # fits them as well as (c) and still trails out of domain lacks other things
                                  "kd_end": {"b": b.get("final_kd"), "c": last_fifth_kd(c_part, budget)},
                                  # (c)'s own rate: with --minitron-lrs each budget's is the sweep's choice
                                  "lr_c": c.get("lr", out["lr_c"]),
                                  "lr_sweep_c": c_part.get("methods", {}).get("minitron", {}).get(
                                      "per_budget", {}).get(budget, {}).get("lr_sweep")}
    out["grad_norm_last_fifth"] = last_fifth_grad_norms(how, b_part["training"].get("elastic_steps"))
    if "1.0" in b_rows:
        full = b_rows["1.0"]["perplexity"]
        out["full_vs_parent"] = {s: full[s] / parent[s] - 1 for s in parent}
    if how.get("full_kl_from_parent"):  # nats a token (bench_elastic from the twenty-third session on)
        out["full_kl_from_parent"] = how["full_kl_from_parent"]
    for key in ("full_without_delta", "full_with_parents_rest", "full_keeps_held"):  # a delta run's (bench_elastic)
        if how.get(key):
            out[key + "_vs_parent"] = {s: how[key][s] / parent[s] - 1 for s in parent}
    out["targets"] = targets(out)
    return out


# issue 17's targets (docs/RESULTS.md §9): each smaller budget at most 2% worse than (c) and in its band, the full
# model at most 1% worse than its parent, on every held-out source (better counts as met)
SMALLER_TARGET, FULL_TARGET = 0.02, 0.01


def in_band(budget: str, param_fraction: float) -> bool | None:
    """Whether a budget named by its share of the parameters ("0.75") kept a share within BAND of it (None: a
    budget named otherwise)."""
    try:
        target = float(budget)
    except ValueError:
        return None
    return abs(param_fraction / target - 1) <= BAND


def targets(r: dict) -> dict[str, dict]:
    """Per budget of a compared pair: met or not, the sources that miss with their ratio, and whether it kept
    its share of the parameters within the band."""
    out = {b: {"target": SMALLER_TARGET, "misses": {s: x for s, x in row["vs_c"].items() if x > SMALLER_TARGET},
               "in_band": in_band(b, row["param_fraction"]), "param_fraction": row["param_fraction"]}
           for b, row in r["budgets"].items() if b != "1.0"}
    if "full_vs_parent" in r:
        out["1.0"] = {"target": FULL_TARGET,
                      "misses": {s: x for s, x in r["full_vs_parent"].items() if x > FULL_TARGET}}
    for v in out.values():
        v["met"] = not v["misses"] and v.get("in_band") is not False
    return out


def verdict(name: str, v: dict) -> str:
    against = "its parent" if name == "1.0" else "(c)"
    said = f"{name} within {100 * v['target']:g}% of {against}: " + (
        "MISSED on " + ", ".join(f"{s} {100 * x:+.1f}" for s, x in v["misses"].items()) if v["misses"] else "met")
    if v.get("in_band") is False:
        said += f", OUT of its band ({100 * v['param_fraction']:.1f}% of the parameters)"
    return said


def last_fifth_grad_norms(how: dict, steps: int | None) -> dict[str, float]:
    """A joint run's median gradient norm (before clipping) by budget over the last fifth of its training steps, from
    its JSON log (the delta's finish left out): which budget's gradient weighs most in the AdamW moments they share
    (RESULTS §9, forty-eighth session). The median, as a few logged steps spike to 10x the rest (J16mvk02's 0.5:
    3.5 among 0.19-0.26), which a mean of eight takes for the budget's level. Logs thinned along the run's steps
    (before bench_elastic.thin_log) may hold one budget alone there."""
    if not steps:
        return {}
    norms: dict[str, list[float]] = {}
    for entry in how.get("log") or []:
        if entry.get("phase") is None and entry.get("grad_norm") is not None and entry["step"] >= steps * 4 // 5:
            norms.setdefault(entry["budget"], []).append(entry["grad_norm"])
    return {b: statistics.median(norms[b]) for b in sorted(norms, key=float, reverse=True)}  # largest budget first


def last_fifth_kd(part: dict, budget: str) -> float | None:
    """(c)'s mean KD over the last fifth of its steps, from its log (windows of a fifth, the last one short),
    as bench_elastic's final_kd is (b)'s; None where the run has no log of it."""
    info = part.get("methods", {}).get("minitron", {}).get("per_budget", {}).get(budget)
    if not info or not info.get("log"):
        return None
    start, total, n, prev = info["steps"] * 4 // 5, 0.0, 0, 0
    for entry in info["log"]:
        window = entry["step"] - prev
        if entry["step"] > start:
            total, n = total + entry["kd"] * window, n + window
        prev = entry["step"]
    return total / n if n else None


def fmt(ratios: dict) -> str:
    return " / ".join(f"{100 * v:+.1f}" for v in ratios.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="bench_elastic.py result files or session bundles (BUNDLE#RUN: one run "
                                             "of a bundle)")
    ap.add_argument("--pairs", required=True, help="comma-separated B[@METHOD]:C pairs of run names")
    ap.add_argument("--part", default="A", choices=["A", "B"])
    ap.add_argument("--json", help="write the ratios here")
    args = ap.parse_args(argv)
    runs = load_runs(args.files)
    results, refused = [], []
    for pair in filter(None, (p.strip() for p in args.pairs.split(","))):
        try:  # a pair refused (e.g. a router that chose other architectures) does not hide the others
            results.append(compare(runs, pair, args.part))
        except SystemExit as e:
            refused.append(str(e))
    for r in results:
        sources = next(iter(r["budgets"].values()))["vs_c"] if r["budgets"] else {}
        lr = f"{r['lr']:g}" if not r["budget_lrs"] else "per budget " + ",".join(f"{x:g}" for x in r["budget_lrs"])
        anchor = (f", anchor {r['full_anchor']:g}" if r["full_anchor"] else "") + (
            " projected" if r["anchor_projection"] else "") + (f" on {r['anchor_data']}" if r.get("anchor_data") else "") + (
            f" ({100 * r['anchor_mix']:.0f}% of its rows)" if r.get("anchor_mix") not in (None, 1.0) else "") + (
            f", the smaller budgets {100 * r['budget_mix']:.0f}% on it" if r.get("budget_mix") else "") + (
            f", (c) {100 * r['budget_mix_c']:.0f}% on it" if r.get("budget_mix_c") else "") + (
            f", full delta rank {r['full_delta_rank']}" if r.get("full_delta_rank") else "") + (
            " given out layer by layer" if r.get("full_delta_allocate") else "") + (
            f" at lr {r['full_delta_lr']:g}" if r.get("full_delta_lr") else "") + (
            f", restored from the weights' drift ({r['full_delta_restore']}" + (
                f", {r['full_delta_restored']:.0%} of it" + (
                    "; " + ", ".join(f"{k} {v:.1%}" for k, v in r["full_delta_restore_report"].items())
                    if r.get("full_delta_restore_report") else "") + ")"
                if r.get("full_delta_restored") is not None else ")")
            if r.get("full_delta_restore") else "") + (
            f", its finish {r['full_delta_finish']} steps" if r.get("full_delta_finish") else "") + (
            " on embeddings and norms too" if r.get("full_delta_scope") == "all" else "") + (
            (f", {' and '.join(r['hold'])} at {r['hold_rate']:g}x the rate" if r.get("hold_rate") else
             f", {' and '.join(r['hold'])} frozen") + (f", pulled back at {r['hold_pull']:g}" if r.get("hold_pull")
                                                        else "") if r.get("hold") else "")
        c_lrs = {v["lr_c"] for v in r["budgets"].values() if v.get("lr_c") is not None} or {r["lr_c"]}
        lr_c = f"{c_lrs.pop():g}" if len(c_lrs) == 1 else "(c)'s per budget"
        print(f"{r['pair']} ({r['method']}, seed {r['seed']}{anchor}, lr {lr} against {lr_c}); "
              f"(b)/(c) - 1 in %, {' / '.join(sources)}")
        for name, why in r["invalid"].items():
            print(f"  INVALID run {name}: {why}")
        for budget, v in r["budgets"].items():
            print(f"  {budget:>5} [{100 * v['param_fraction']:.1f}%] {fmt(v['vs_c'])}   {v['architecture']}")
            if v.get("lr_sweep_c"):  # (c) at the best of several rates: which, and of which
                print(f"    (c) at lr {v['lr_c']:g}, the best on its first source of {', '.join(v['lr_sweep_c'])}")
            kd = v.get("kd_end") or {}
            if kd.get("b") is not None and kd.get("c") is not None:
                print(f"    its KD on its training batches over the last fifth: {kd['b']:.4f} against (c)'s "
                      f"{kd['c']:.4f} ({100 * (kd['b'] / kd['c'] - 1):+.1f}%)")
        if r.get("grad_norm_last_fifth"):
            print("  gradient norm before clipping, the last fifth of its logged steps: "
                  + " / ".join(f"{b} {v:.3f}" for b, v in r["grad_norm_last_fifth"].items()))
        if "full_vs_parent" in r:
            print(f"  full against its parent: {fmt(r['full_vs_parent'])}")
            if r.get("full_budget_invalid"):
                print(f"    NOT the setting's full budget: {r['full_budget_invalid']}")
        if "full_kl_from_parent" in r:
            print("    the parent's KL from it, nats a token: "
                  + " / ".join(f"{v:.4f}" for v in r["full_kl_from_parent"].values()))
        if "full_without_delta_vs_parent" in r:
            print(f"    its shared weights alone: {fmt(r['full_without_delta_vs_parent'])}")
        if "full_with_parents_rest_vs_parent" in r:
            print(f"    with the parent's embeddings, norms and other non-delta weights: "
                  f"{fmt(r['full_with_parents_rest_vs_parent'])}")
        if "full_keeps_held_vs_parent" in r:
            print(f"    keeping the parent's held values (elastify --full-keeps-held): {fmt(r['full_keeps_held_vs_parent'])}")
        if r["targets"]:
            print("  targets: " + "; ".join(verdict(b, v) for b, v in r["targets"].items()))
    for why in refused:
        print(why)
    if args.json:
        common.write_json(args.json, {"benchmark": "compare_elastic", "command": " ".join(sys.argv), "pairs": results,
                                      "refused": refused})
    if refused:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
