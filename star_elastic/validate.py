"""`star-elastic validate CKPT`: can every budget of an elastic checkpoint be trusted?

Checks, in order (a failed one that leaves nothing to check further stops the rest):
  files      every file the manifest lists is there, of its recorded size and sha256; every weight
             file that a load reads is listed
  load       the parent loads: config, names and shapes of every tensor, budgets fit the config
  per budget
    slice    its spec slices, and the sliced model has the parameters the manifest records
    cost     params / active / memory recomputed equal the manifest's, and the budget's own cost is
             within the budget loss' dead band (5%) of its target
    nested   its masks are prefixes (within groups for grouped axes), contained in every larger
             budget's masks, and its sliced weights equal the parent's units selected by those masks
    outputs  sliced == masked forward on one batch (real text with --data, else random tokens),
             within a tolerance for the dtype
  quality    with --data: held-out perplexity per budget; a larger budget that is worse than a
             smaller one is a warning, not a failure
Failures exit with status 1 after the report; errors that stop before a checkpoint is found (not a
directory, no manifest) are one line, status 2, like every other command.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .elastic.cost import BAND
from .elastic.masking import masked as masked_by
from .errors import StarElasticError

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class Check:
    name: str
    status: str  # "ok", "fail", "warn", "skip"
    detail: str
    budget: str | None = None


class Report:
    def __init__(self):
        self.checks: list[Check] = []

    def add(self, name, status, detail, budget=None) -> Check:
        c = Check(name, status, detail, budget)
        self.checks.append(c)
        return c

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failed(self) -> bool:  # cli.main exits with status 1
        return not self.ok

    def to_dict(self) -> dict:
        return {"ok": self.ok, "failures": len(self.failures),
                "warnings": sum(c.status == "warn" for c in self.checks),
                "checks": [asdict(c) for c in self.checks]}

    def format(self) -> str:
        mark = {"ok": "ok  ", "fail": "FAIL", "warn": "warn", "skip": "skip"}
        lines = [f"{mark[c.status]}  {c.name:<8} {c.budget or '':>8}  {c.detail}" for c in self.checks]
        lines.append("valid" if self.ok else f"INVALID: {len(self.failures)} check(s) failed")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- structural checks

def _groups(cfg, key: str) -> int:
    """How many contiguous groups the units of mask `key` form (prefixes are kept per group)."""
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", key)
    if m is None:
        return 1
    c, axis = cfg.layer(int(m.group(1))), m.group(2)
    if axis == "attn_heads":
        return c.num_key_value_heads
    if axis == "mamba_heads":
        return c.n_groups
    if axis == "experts":
        return c.n_group
    return 1


def prefix_problem(mask: torch.Tensor, groups: int) -> str | None:
    """None if the 0/1 `mask` keeps a prefix of every group (attention: of the kept KV groups, which
    themselves form a prefix); else what is wrong."""
    per = mask.view(groups, -1).bool()
    for g, row in enumerate(per):
        k = int(row.sum())
        if not row[:k].all():
            return f"group {g} keeps units {row.nonzero().flatten().tolist()}, not a prefix"
    kept_groups = per.any(1)
    k = int(kept_groups.sum())
    if not kept_groups[:k].all():
        return f"keeps groups {kept_groups.nonzero().flatten().tolist()}, not a prefix"
    return None


def check_nesting(cfg, specs: dict) -> dict[str, str | None]:
    """Per budget (specs ordered largest first): None if its masks are group-wise prefixes contained
    in every larger budget's, else the first problem."""
    out, names = {}, list(specs)
    for i, name in enumerate(names):
        problem = None
        for key, m in specs[name].masks(cfg).items():
            if m.dim() == 1 and (problem := prefix_problem(m, _groups(cfg, key))):
                problem = f"{key}: {problem}"
                break
        for larger in names[:i]:
            if problem:
                break
            if what := specs[name].outside(specs[larger], cfg):
                problem = f"{what} that budget {larger} drops"
        out[name] = problem
    return out


def weights_problem(parent, small, spec) -> str | None:
    """None if every tensor of the sliced model equals the parent's tensor restricted to the units
    the budget's masks keep (index sets read off the masks, not the spec's own index helper)."""
    from .elastic.slicing import _renamed, take

    cfg = parent.config
    idx = {k: m.nonzero().flatten() for k, m in spec.masks(cfg).items() if m.dim() == 1}
    for key in list(idx):  # a KV group is kept when any of its query heads is
        if key.endswith(".attn_heads"):
            c = cfg.layer(int(key.split(".")[1]))
            groups = (idx[key] // (c.num_attention_heads // c.num_key_value_heads)).unique()
            if len(groups) < c.num_key_value_heads:
                idx[key[: -len("attn_heads")] + "kv_heads"] = groups
    new_index = {old: new for new, old in enumerate(spec.kept_layers(cfg))}
    small_state = small.state_dict()
    for name, t in parent.state_dict().items():
        new = _renamed(name, new_index)
        if new is None:
            continue
        if new not in small_state:
            return f"sliced model lacks {new}"
        expected = take(name, t, cfg, idx)
        if expected.shape != small_state[new].shape or not torch.equal(expected, small_state[new]):
            return f"{new} differs from the parent's kept units"
    return None


# ----------------------------------------------------------------------------- the command

def validate_checkpoint(path, data: str | None = None, device=None, dtype=None, seq_len: int = 128,
                        max_tokens: int = 2048, batch_size: int = 4, progress: bool = True) -> Report:
    from .elastic.checkpoint import check_files, read_manifest, load_elastic, verify_files
    from .elastic.cost import Arch, CostModel, MemorySettings
    from .elastic.slicing import slice_model
    from .evaluate import perplexity

    path = Path(path)
    manifest = read_manifest(path)  # not ours at all: one-line error, as everywhere
    report = Report()
    try:
        check_files(path, manifest)
        verify_files(path, manifest, progress=progress)
        report.add("files", "ok", f"{len(manifest['files'])} file(s): sizes and sha256 match the manifest "
                                  f"({', '.join(manifest['files'])})")
    except StarElasticError as e:
        report.add("files", "fail", str(e))
    try:
        ckpt = load_elastic(path, dtype=dtype, device=device)
        report.add("load", "ok", f"parent loads: {ckpt.model.num_parameters():,} parameters, "
                                 f"{ckpt.model.config.family}, config matches the manifest")
    except StarElasticError as e:
        report.add("load", "fail", str(e))
        return report

    model, cfg = ckpt.model, ckpt.model.config
    cost = CostModel(cfg, MemorySettings(**manifest["memory_settings"]) if "memory_settings" in manifest else None)
    entries = sorted(manifest["budgets"], key=lambda b: -b["params"])  # largest first, for nesting
    specs = {b["name"]: ckpt.spec(b["name"]) for b in entries}
    nesting = check_nesting(cfg, specs)
    dtype_now = model.lm_head.weight.dtype
    tol = TOLERANCE.get(dtype_now, 1e-2)
    ids = _probe_batch(ckpt, data, seq_len, model.lm_head.weight.device)
    sliced = {}
    for b in entries:
        name = b["name"]
        spec = specs[name]
        # the full budget with a delta of its own (delta.py) is W + B A, not a slice of W
        full_delta = ckpt.delta is not None and spec.keeps_parent(cfg)
        try:
            small = ckpt.full_model() if full_delta else slice_model(model, spec).eval()
        except Exception as e:  # a spec that passed the manifest checks but cannot be built
            report.add("slice", "fail", f"cannot slice: {str(e).splitlines()[0]}", name)
            continue
        n = small.num_parameters()
        report.add("slice", "ok" if n == b["params"] else "fail",
                   f"{n:,} parameters" + ("" if n == b["params"] else f", the manifest records {b['params']:,}"), name)
        sliced[name] = small

        arch = Arch.from_spec(spec, cfg)
        got = {k: int(cost.cost(kind, arch)) for k, kind in (("params", "params"), ("active_params", "active"),
                                                              ("memory_bytes", "memory"))}
        wrong = [f"{k} {got[k]:,} vs manifest {b[k]:,}" for k in got if got[k] != b[k]]
        kind = b.get("kind", "params")
        own = got[{"params": "params", "active": "active_params", "memory": "memory_bytes"}[kind]]
        ratio = own / b["target"] if b.get("target") else float("nan")
        full_budget = b["target"] >= cost.full(kind)
        in_band = (abs(ratio - 1) <= BAND) if not full_budget else ratio <= 1 + 1e-9 and ratio >= 1 - BAND
        if wrong:
            report.add("cost", "fail", "recomputed cost differs: " + "; ".join(wrong), name)
        else:
            report.add("cost", "ok" if in_band else "fail",
                       f"{kind} {own:,} = {ratio:.3f} x target {b['target']:,.0f}"
                       + ("" if in_band else f" (outside the {BAND:.0%} band)"), name)

        problem = nesting[name] or weights_problem(ckpt.full_model() if full_delta else model, small, spec)
        larger = [e["name"] for e in entries[: entries.index(b)]]
        report.add("nested", "fail" if problem else "ok", problem or (
            "prefix of the parent" + (f", inside budget(s) {', '.join(larger)}" if larger else "")
            + "; weights = parent's kept units"), name)

        with masked_by(model, spec.masks(cfg, device=ids.device, dtype=dtype_now)), torch.no_grad(), \
                ckpt.delta.applied(model) if full_delta else nullcontext():
            masked, out = model(ids).float(), small(ids).float()
        err = ((masked - out).norm() / masked.norm().clamp(min=1e-30)).item()
        report.add("outputs", "ok" if err <= tol else "fail",
                   f"sliced vs masked relative error {err:.1e} (tolerance {tol:.0e}, {str(dtype_now)[6:]}, "
                   f"{'real' if data else 'random'} batch {tuple(ids.shape)})", name)
        del out, masked

    if data is None:
        report.add("quality", "skip", "no --data: perplexity per budget not measured")
        return report
    from .runtime import eval_tokens

    stream = eval_tokens(ckpt.tokenizer, data, "heldout")
    ppl = {name: perplexity(m, stream, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                            progress=False)["perplexity"] for name, m in sliced.items()}
    order = [b["name"] for b in entries if b["name"] in ppl]
    worse = [(big, small) for i, big in enumerate(order) for small in order[i + 1:] if ppl[big] > ppl[small]]
    listing = ", ".join(f"{n}: {ppl[n]:.3f}" for n in order)
    if worse:
        big, small = worse[0]
        report.add("quality", "warn", f"not monotone: budget {big} is worse than the smaller {small} "
                                      f"(held-out perplexity {listing})")
    else:
        report.add("quality", "ok", f"held-out perplexity falls with budget size ({listing})")
    return report


def _probe_batch(ckpt, data, seq_len, device) -> torch.Tensor:
    """A small batch to compare sliced and masked outputs on: the first held-out windows of --data, or
    seeded random tokens."""
    if data is not None and ckpt.tokenizer is not None:
        from .runtime import eval_tokens

        stream = eval_tokens(ckpt.tokenizer, data, "heldout")
        n = min(2, stream.numel() // seq_len)
        if n:
            return stream[: n * seq_len].view(n, seq_len).to(device)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, ckpt.model.config.vocab_size, (2, min(seq_len, 64)), generator=g).to(device)
