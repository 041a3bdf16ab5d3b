"""Perplexity on a token stream.

How text is scored: documents are tokenized one by one, each followed by the document
separator (see `data.tokenize_documents`), and concatenated. The stream is cut into
non-overlapping windows of `seq_len` tokens (the last, shorter window is kept). No BOS is
inserted at window starts; inside each window every token but the first is predicted from the
tokens before it in that window. So `tokens` = stream length minus the number of windows.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _logits(model, ids):
    out = model(ids)
    return out if torch.is_tensor(out) else out.logits


def windows(stream: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Batches of the non-overlapping windows the module docstring describes."""
    if stream.dim() != 1 or stream.numel() < 2:
        raise ValueError("perplexity needs a 1-D stream of at least 2 tokens")
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n_full = stream.numel() // seq_len
    wins = [stream[: n_full * seq_len].view(n_full, seq_len)] if n_full else []
    if stream.numel() % seq_len > 1:
        wins.append(stream[n_full * seq_len:][None])
    return [w[i: i + batch_size] for w in wins for i in range(0, w.shape[0], batch_size)]


def _kl_sum(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Summed KL(reference || model) over the positions of two (..., vocab) logit tensors, in nats."""
    ref = F.log_softmax(reference_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(F.log_softmax(logits.float().flatten(0, -2), dim=-1), ref, log_target=True, reduction="sum").item()


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int = 1024, batch_size: int = 4,
               max_tokens: int | None = None, progress: bool = True, device=None, reference=None) -> dict:
    """Perplexity of `model` (ours, or any callable returning logits / an object with .logits). With a
    `reference` model (a parent), also "kl_from_reference": the mean KL(reference || model) a scored position,
    in nats, which sees a model move where perplexity may not (a flatter model scores better on text its
    parent is unsure of and worse on text it is sure of, docs/RESULTS.md §9)."""
    batches = windows(stream, seq_len, batch_size, max_tokens)
    if device is None:
        device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    nll, kl, count = 0.0, 0.0, 0
    bar = tqdm(batches, desc="perplexity", unit="batch",
               disable=not progress or bool(os.environ.get("STAR_ELASTIC_QUIET")))
    for ids in bar:
        ids = ids.to(device)
        logits = _logits(model, ids)[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        if reference is not None:
            kl += _kl_sum(_logits(reference, ids)[:, :-1], logits)
        count += ids[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
           "windows": sum(b.shape[0] for b in batches), "seq_len": seq_len}
    if reference is not None:
        out["kl_from_reference"] = max(0.0, kl / count)
    return out


def answer_tokens(transcripts: list[tuple[torch.Tensor, int]]) -> int:
    """The answer tokens that answer_scores scores in chat transcripts, (ids, prompt_len) each."""
    return sum(len(ids) - start for ids, start in transcripts)


@torch.no_grad()
def answer_scores(model, transcripts: list[tuple[torch.Tensor, int]], device=None, reference=None) -> dict:
    """`model` on the answer tokens alone of chat transcripts, (ids, prompt_len) each, each token given
    everything before it (prompts and templates left out, so that a system prompt repeated in every transcript
    does not dilute the answers): its perplexity; per answer whether its first token is the model's argmax
    ("first_kept": for transcripts of a parent's greedy answers, the answers it would still begin the same
    way; a first token that tips starts another answer, at a cost to the perplexity too small to show) and
    the model's margin there, top log-probability less the second ("first_margin": a near-tie tips at the
    slightest training); "first_token_kept", the share kept. With a `reference` model, "kl_from_reference" on
    the answer positions, as perplexity's."""
    if device is None:
        device = next(model.parameters()).device
    nll, kl, kept, margins = 0.0, 0.0, [], []
    for ids, start in transcripts:
        ids = ids.to(device)[None]
        logits = _logits(model, ids)[0, start - 1:-1].float()
        nll += F.cross_entropy(logits, ids[0, start:], reduction="sum").item()
        if reference is not None:
            kl += _kl_sum(_logits(reference, ids)[0, start - 1:-1], logits)
        top = logits[0].log_softmax(-1).topk(2).values
        kept.append(bool(logits[0].argmax() == ids[0, start]))
        margins.append(float(top[0] - top[1]))
    n = max(answer_tokens(transcripts), 1)
    out = {"perplexity": math.exp(nll / n), "first_token_kept": sum(kept) / max(len(kept), 1), "first_kept": kept,
           "first_margin": margins}
    if reference is not None:
        out["kl_from_reference"] = max(0.0, kl / n)
    return out


def _timed_logits(model, ids) -> tuple[torch.Tensor, float]:
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    t0 = time.perf_counter()
    logits = _logits(model, ids)
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    return logits[:, :-1].float(), time.perf_counter() - t0


@torch.no_grad()
def compare_models(reference, models: dict, stream: torch.Tensor, seq_len: int = 1024, batch_size: int = 4,
                   max_tokens: int | None = None, progress: bool = True) -> dict:
    """Per model of `models` (name -> model; the reference itself may be one of them): perplexity,
    and agreement with `reference` on the same windows — the fraction of scored positions where the
    top-1 tokens agree, and the mean KL(reference || model) per position in nats — and forward
    throughput (tokens through the model per second of its forward passes, measured here).

    Batches run in the outer loop, models in the inner one, so that no logits are kept beyond one
    batch and machine noise spreads evenly over the models."""
    device = next(reference.parameters()).device
    batches = windows(stream, seq_len, batch_size, max_tokens)
    stats = {name: {"nll": 0.0, "agree": 0, "kl": 0.0, "seconds": 0.0} for name in models}
    count, forwarded = 0, 0
    bar = tqdm(batches, desc=f"evaluating {len(models)} models", unit="batch",
               disable=not progress or bool(os.environ.get("STAR_ELASTIC_QUIET")))
    for ids in bar:
        ids = ids.to(device)
        target = ids[:, 1:].flatten()
        ref, ref_seconds = _timed_logits(reference, ids)
        ref_logp = F.log_softmax(ref.flatten(0, 1), dim=-1)
        ref_top = ref_logp.argmax(-1)
        for name, model in models.items():
            logits, seconds = (ref, ref_seconds) if model is reference else _timed_logits(model, ids)
            logp = ref_logp if model is reference else F.log_softmax(logits.flatten(0, 1), dim=-1)
            st = stats[name]
            st["nll"] += F.nll_loss(logp, target, reduction="sum").item()
            st["agree"] += (logp.argmax(-1) == ref_top).sum().item()
            st["kl"] += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
            st["seconds"] += seconds
        count += target.numel()
        forwarded += ids.numel()
    return {name: {"perplexity": math.exp(st["nll"] / count), "nll": st["nll"] / count, "tokens": count,
                   "top1_agreement": st["agree"] / count, "kl_from_full": max(0.0, st["kl"] / count),
                   "tokens_per_s": forwarded / st["seconds"] if st["seconds"] > 0 else float("inf"),
                   "forward_seconds": st["seconds"]}
            for name, st in stats.items()}


# ----------------------------------------------------------------------------- every budget of a checkpoint

def budget_models(ckpt, names: list[str]) -> dict:
    """name -> the sliced model of that budget (the full model itself for a budget that keeps the whole
    parent: `ckpt.full_model()`, merged with its delta if it has one). Sliced rather than masked: a
    physically smaller model is what a budget deploys as, so its throughput is the real one, and it is
    faster than running the full-size model under masks."""
    from .elastic.slicing import slice_model

    cfg, out = ckpt.model.config, {}
    for name in names:
        spec = ckpt.spec(name)
        out[name] = ckpt.full_model() if spec.keeps_parent(cfg) else slice_model(ckpt.model, spec).eval()
    return out


def select_budgets(manifest: dict, text: str | None, path=None) -> list[str]:
    """Budget names from a comma-separated --budgets (default: all), each checked against the manifest:
    a trained budget, or with the checkpoint's `path` one between two trained ones (interpolated, read
    off the router alone); anything else is a one-line error."""
    from .elastic.checkpoint import budget_names, budget_spec, resolve_budget

    if not text:
        return budget_names(manifest)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if path is None or n in budget_names(manifest):
            budget_spec(manifest, n)  # an unknown name: one line listing the trained ones
        else:
            resolve_budget(path, manifest, n)  # outside the trained range: one line saying so
    return names


def model_costs(cfg, memory_settings: dict | None = None) -> dict:
    """Parameters / active parameters / memory bytes of a whole model (CostModel of its config)."""
    from .elastic.cost import CostModel, MemorySettings

    cost = CostModel(cfg, MemorySettings(**memory_settings) if memory_settings else None)
    return {"params": int(cost.full("params")), "active_params": int(cost.full("active")),
            "memory_bytes": int(cost.full("memory"))}


def evaluate_budgets(ckpt, stream: torch.Tensor, names: list[str], compare: dict | None = None,
                     seq_len: int = 1024, batch_size: int = 4, max_tokens: int | None = None,
                     progress: bool = True, fp8_matmul: torch.dtype | None = None) -> dict:
    """Every named budget (and every `compare` model, name -> model) against the parent on `stream`:
    `compare_models`' quality numbers plus the manifest's parameters / active parameters / memory.
    `fp8_matmul` (a compute dtype): every budget and compared model runs FP8 matmuls (fp8.py; a whole-
    parent budget on a copy), against the parent in that dtype."""
    entries = {b["name"]: b for b in ckpt.manifest["budgets"]}
    models = budget_models(ckpt, names)
    reference = ckpt.full_model()  # the trained full model: with a delta, merged
    compare = compare or {}
    if fp8_matmul is not None:
        import copy

        from .fp8 import use_fp8_matmuls
        for group in (models, compare):
            for name, m in group.items():
                group[name] = m = copy.deepcopy(m) if m is reference else m
                use_fp8_matmuls(m, fp8_matmul)
        reference.to(fp8_matmul)
    clash = sorted(set(models) & set(compare))
    if clash:
        from .errors import StarElasticError
        raise StarElasticError(f"--compare name {clash[0]!r} is also a budget name; rename the directory")
    quality = compare_models(reference, {**models, **compare}, stream, seq_len, batch_size, max_tokens, progress)
    budgets = {}
    settings = ckpt.manifest.get("memory_settings")
    for name in names:
        e = entries.get(name) or _interpolated_entry(ckpt, name, settings)
        budgets[name] = {"kind": e.get("kind"), "fraction": e.get("fraction"), "params": e["params"],
                         "active_params": e["active_params"], "memory_bytes": e["memory_bytes"],
                         "spec": e["spec"], **({"interpolated": True} if e.get("interpolated") else {}),
                         **quality[name]}
    others = {name: {**model_costs(m.config, settings), **quality[name]} for name, m in compare.items()}
    return {"budgets": budgets, "compare": others}


def _interpolated_entry(ckpt, name: str, settings: dict | None) -> dict:
    """The manifest entry (`checkpoint.budget_entry`) a budget between two trained ones would have."""
    from dataclasses import replace

    from .elastic.checkpoint import budget_entry
    from .elastic.cost import CostModel, MemorySettings, parse_budget

    memory = MemorySettings(**settings) if settings else None
    budget = replace(parse_budget(name, ckpt.model.config, memory), name=name)
    return {**budget_entry(budget, ckpt.spec(name), ckpt.model.config, CostModel(ckpt.model.config, memory)),
            "interpolated": True}


def _fmt_count(n) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_table(result: dict) -> str:
    """The terminal table of `evaluate_budgets`' result."""
    head = (f"{'budget':>14} {'params':>9} {'active':>9} {'memory':>10} {'ppl':>9} {'top-1 agree':>11} "
            f"{'KL(full||b)':>11} {'tok/s':>8}")
    lines = [head, "-" * len(head)]
    for group in ("budgets", "compare"):
        for name, r in result[group].items():
            label = f"{name}*" if r.get("interpolated") else name
            lines.append(f"{label[:14]:>14} {_fmt_count(r['params']):>9} {_fmt_count(r['active_params']):>9} "
                         f"{r['memory_bytes'] / 2**20:>8.1f}MiB {r['perplexity']:>9.3f} {r['top1_agreement']:>11.3f} "
                         f"{r['kl_from_full']:>11.4f} {r['tokens_per_s']:>8.0f}")
    if any(r.get("interpolated") for r in result["budgets"].values()):
        lines.append("* interpolated between two trained budgets (the router's architecture; not trained)")
    return "\n".join(lines)


def evaluate_checkpoint(path, data: str, *, budgets: str | list[str] | None = None, compare=(),
                        split: str = "heldout", seq_len: int = 1024, batch_size: int = 4,
                        max_tokens: int | None = None, device=None, dtype=None, verify: bool = False,
                        fp8_matmul: bool = False) -> dict:
    """`star-elastic eval CKPT` without the command line: every budget of the elastic checkpoint at
    `path` (`budgets`: comma-separated names or a list, each checked against the manifest before the
    weights load; None: all) and every plain checkpoint directory in `compare` (same vocabulary
    needed), each against the unsliced parent on the `split` of `data` (a file or corpus name).
    `dtype` None: as stored; `device` None: the CPU; `verify`: every file's sha256 first; `fp8_matmul`:
    every budget with FP8 matmuls (fp8.use_fp8_matmuls) computing in `dtype` (None: float32 on the CPU,
    bfloat16 on a GPU), the weights read in float32 first so that an FP8 checkpoint's come back exact. Returns
    the record the command prints (`format_table`) and writes: the settings, then
    `evaluate_budgets`' `budgets` and `compare`."""
    from .elastic.checkpoint import load_elastic, read_manifest
    from .errors import StarElasticError
    from .hf import load, require_tokenizer
    from .runtime import eval_tokens

    path = Path(path)
    if isinstance(budgets, (list, tuple)):
        budgets = ",".join(str(b) for b in budgets)
    names = select_budgets(read_manifest(path), budgets, path)
    device = torch.device("cpu" if device is None else device)
    compute = dtype
    if fp8_matmul:
        compute = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        dtype = torch.float32
    ckpt = load_elastic(path, dtype=dtype, device=device, verify=verify)
    require_tokenizer(path, ckpt.tokenizer)
    models = {}
    for d in compare:
        model = load(d, dtype=dtype, device=device)
        if model.config.vocab_size != ckpt.model.config.vocab_size:
            raise StarElasticError(f"--compare {d}: vocabulary of {model.config.vocab_size} tokens, the checkpoint "
                                   f"has {ckpt.model.config.vocab_size} (same tokenizer needed)")
        models[Path(d).resolve().name] = model
    stream = eval_tokens(ckpt.tokenizer, data, split)
    t0 = time.perf_counter()
    result = evaluate_budgets(ckpt, stream, names, models, seq_len, batch_size, max_tokens,
                              fp8_matmul=compute if fp8_matmul else None)
    return {"checkpoint": str(path), "data": data, "split": split, "seq_len": seq_len,
            "tokens": next(iter(result["budgets"].values()))["tokens"], "device": str(device),
            "dtype": str(ckpt.model.lm_head.weight.dtype).removeprefix("torch."),
            "reference": "the parent (full, unsliced)", "seconds": round(time.perf_counter() - t0, 2),
            **({"fp8_matmul": True} if fp8_matmul else {}),
            "memory_settings": ckpt.manifest.get("memory_settings"), **result}


def transformers_parity(gguf, data: str = "wiki", max_tokens: int = 16384, seq_len: int = 512) -> dict:
    """Our perplexity against transformers' on the held-out split of `data`, both models read from
    the same GGUF file (transformers with `gguf_file=`, ours through its converted safetensors):
    the same windows, the same tokens. Needs the `gguf` package."""
    import datetime
    import platform

    from transformers import AutoModelForCausalLM

    from .hf import load, load_tokenizer
    from .runtime import eval_tokens

    gguf = Path(gguf)
    ours = load(gguf)
    tokenizer = load_tokenizer(gguf)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    stream = eval_tokens(tokenizer, data, "heldout")
    out = {"date": datetime.date.today().isoformat(), "machine": f"CPU ({platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads)", "data": f"held-out split of {data}", "seq_len": seq_len}
    for name, model in (("ours", ours), ("transformers", ref)):
        t0 = time.perf_counter()
        r = perplexity(model, stream, seq_len=seq_len, batch_size=4, max_tokens=max_tokens)
        out[name] = {"perplexity": r["perplexity"], "tokens": r["tokens"], "seconds": round(time.perf_counter() - t0, 1)}
    out["relative_difference"] = abs(out["ours"]["perplexity"] / out["transformers"]["perplexity"] - 1)
    return out
