"""The whole pipeline of `star-elastic elastify`: importance -> sort -> router + multi-budget
distillation -> one elastic checkpoint, with every budget's held-out perplexity before
(zero-shot: importance-sorted prefix only) and after training."""

from __future__ import annotations

import copy
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .assets import CORPORA
from .data import TokenBatches, load_corpus_tokens, pack, parse_mixture
from .elastic.checkpoint import save_elastic
from .elastic.cost import CostModel, parse_budget
from .elastic.importance import estimate_importance, permuted_scores
from .elastic.router import DEFAULT_AXES, Router, RouterConfig, project_budgets
from .elastic.masking import masked
from .elastic.spec import ElasticSpec
from .elastic.search import describe, nested_search, search_spec
from .elastic.sort import sort_model
from . import parallel
from .sharded_load import load_sharded
from .sharded_sort import load_sorted
from .errors import StarElasticError
from .evaluate import answer_scores, answer_tokens, perplexity
from .generate import forget_decode_steps, generate, sample_rows
from .runtime import chat_prefix, encode_prompt
from .elastic.delta import held_values
from .train_state import saved_anchor_rows
from .train import ElasticTrainer, world
from .train_config import RESTORE_MODES, TrainConfig, check_config, keep_problem


@dataclass
class ElastifyConfig:
    budgets: list[str] = field(default_factory=lambda: ["1.0", "0.75", "0.5"])
    tokens: int = 20_000  # training tokens, all budgets together
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 1e-4
    router_lr: float = 1e-2
    axes: tuple = DEFAULT_AXES
    heterogeneous: bool = False
    calib_batches: int = 8  # importance estimation
    eval_tokens: int = 4096  # held-out tokens per budget evaluation
    heldout_fraction: float = 0.1
    seed: int = 0
    # the curriculum (docs/METHOD.md §9): stage 1 uniform over budgets at seq_len, stage 2 weighted at stage2_seq_len
    stage1_fraction: float = 0.5
    # in --budgets order; default: the smaller budgets equally with the full anchor, else the paper's 0.5 / 0.3 /
    # 0.2 toward the full model
    stage2_weights: list[float] | None = None
    stage2_seq_len: int | None = None
    kd_weights: list[float] | None = None  # per budget, in --budgets order
    budget_lrs: list[float] | None = None  # per budget, in --budgets order: own AdamW moments and rate each
    #                                        (TrainConfig.budget_lrs; RESULTS §9, twelfth session); None: `lr` for all
    # the full model is distilled on every step too (the sandwich rule; the budget sampler skips it), so each
    # smaller budget trains on as many tokens as distilling it alone would. Measured on SmolLM2 at 4.2M tokens
    # (docs/RESULTS.md §9, eighth session): the smaller budgets went from +15% / +21% behind (c) on the same
    # architecture to +3% / -2%, the full model stayed within 1% of the parent out of domain; a step costs
    # a second student pass (1.6x the time). 0: the paper's sampling alone. At weight 0.5 rather than 1 the
    # shared weights follow the smaller budgets more: on SmolLM2 at 4.2M tokens the 0.75 gained 2-4 points on
    # (c) and the 0.5 moved ahead of it, the full model within 1% of the parent out of domain at lr 1e-4 and
    # within 1.4% at 2e-4 (§9, tenth and twelfth sessions); lighter still trades the full model away
    full_anchor: float = 0.5
    all_budgets: bool = False  # every step trains every smaller budget too (TrainConfig.all_budgets)
    # the full anchor's own text: None, the training batch of its step; "self[:TOKENS]", text sampled from the
    # parent itself (its knowledge beyond the training text, which the anchor is there to keep); else text as
    # `data` is given (its train split)
    anchor_data: str | None = None
    anchor_mix: float = 1.0  # the anchor text's share of the anchor's rows, the rest the training batch's
    budget_mix: float = 0.0  # the anchor text's share of each smaller budget's rows too (TrainConfig.budget_mix)
    anchor_projection: bool = False  # the anchor's gradient off the smaller budgets' where they conflict
    #                                  (TrainConfig.anchor_projection)
    # >0: the full budget's own low-rank delta of this rank on every linear layer, trained by the anchor alone
    # (TrainConfig.full_delta_rank, elastic/delta.py), written merged into the checkpoint's weights with A and
    # B beside them. Measured on SmolLM2 at 4.2M tokens (docs/RESULTS.md §9, fifteenth and sixteenth
    # sessions): the 0.75 level with separate distillation in domain and the 0.5 ahead, but the full model
    # +3.0-3.8% on Shakespeare (anchor 0.5 without it: +0.5%); hence off by default
    full_delta_rank: int = 0
    full_delta_lr: float = 0.0  # its own rate (TrainConfig.full_delta_lr; 0: --lr)
    full_delta_finish: int = 0  # steps after training that train the delta alone (TrainConfig.full_delta_finish)
    # with a delta (full_delta_rank > 0): the delta set in closed form where training ends, before the finish,
    # "activations" or "weights" (TrainConfig.full_delta_restore, FullDelta.restore); "": off. Measured on the
    # CPU probe (docs/RESULTS.md §9, twenty-sixth session): the parent's KL from the full model 0.06-0.08 nats a
    # token -> 0.003-0.004, the smaller budget unchanged; hence on wherever the delta is
    full_delta_restore: str = "activations"
    full_delta_allocate: bool = False  # the restore gives the rank's parameters out layer by layer (TrainConfig's)
    full_delta_bits: int = 0  # the restore rounds the rest past rank r to this many bits a weight (TrainConfig's)
    # the embeddings (with the LM head) and / or norms held at or near the parent's (TrainConfig.hold, hold_rate,
    # hold_pull). Measured (§9, seventeenth session): both frozen beside the delta keep the full model within 1%
    # of its parent everywhere at two seeds, at a cost to the smaller budgets (0.75 up to 4%, 0.5 up to 9% behind
    # separate distillation); hence off by default
    hold: list[str] | None = None
    hold_rate: float = 0.0
    hold_pull: float = 0.0
    # with the delta and a hold at a rate: the full budget keeps the parent's values of what `hold` names as its
    # own (FullDelta.keep), the smaller budgets the trained ones. "after": put back once training ends; measured
    # (§9, eighteenth and nineteenth sessions): held at the rate and pulled back at 100, the full model within 1%
    # of its parent everywhere at two seeds, the 0.75 within 1.5% of separate distillation at one of them.
    # "training": kept from the first step (TrainConfig.full_keeps_held), so the delta learns beside them;
    # measured (§9, twenty-first session): pulled back at 30 (or 10), the full model within 1% of its parent
    # everywhere at two seeds. "": off (the default)
    full_keeps_held: str = ""
    train_on: str = "drawn"  # the model trains the router's draw or its in-band argmax (TrainConfig.train_on)
    drift_data: str | None = "auto"  # held-out text of a second domain for the full budget's drift ("": none)
    # the full budget's drift on the parent's own greedy answers to CHAT_QUESTIONS too, when the tokenizer has a
    # chat template (scored on the answers' tokens; "chat answers" in the drift table)
    chat_drift: bool = True
    router_init: str = "search"  # the router starts from the zero-shot search's architectures, or "cost" alone
    router_estimator: str = "score"  # how distillation reaches the router: "score" or "straight-through"
    router_freeze: float = 0.0  # the last share of the steps trains the in-band argmax, the router fixed
    router_baseline_rows: float = 1.0  # the score-function baseline's share of the batch's rows (TrainConfig's)
    router_prior: float = 0.0  # pull of each smaller budget's router toward the search's architecture (router_init search)
    shard: str = "auto"  # under torchrun: "auto"/"fsdp" (FSDP2) or "none" (replicated, gradients all-reduced)
    multiple: int | None = None  # kept widths are multiples of it (None: aligned for GPUs, spec.aligned_multiple)
    save_dtype: str | None = None  # the checkpoint's weights ("bfloat16", ...); None: as trained (fp32 master)
    compile: str | None = None  # torch.compile backend of each layer for training ("inductor"), undone after


# Tokens of text sampled from the parent for the full anchor by default (--anchor-data self): each of its rows
# comes round every few hundred steps of a GPU-sized run, at a few seconds of sampling on a GPU
ANCHOR_SELF_TOKENS = 1_048_576


# --anchor-data's text sampled from the parent: from a random first token, or conversations from its chat
# template's opening (so that the anchor covers the chat format, where held-out prose does not look), or half
# of each, alternating (self+chat: at 16M tokens the full model held prose within 1% and drifted +2.4% on the
# parent's chat answers, docs/RESULTS.md §9, thirtieth session)
SAMPLED = ("self", "chat", "self+chat")


def parse_anchor_data(spec: str | None) -> tuple[str, int | None] | None:
    """--anchor-data as (source, tokens): ("self" or "chat", N or None) or (text as --data takes it, None);
    None: none."""
    if not spec:
        return None
    name, colon, count = spec.partition(":")
    name = name.strip()
    if name not in SAMPLED:
        return spec, None
    try:
        tokens = int(count) if colon else None
    except ValueError:
        tokens = -1
    if tokens is not None and tokens <= 0:
        raise StarElasticError(f"--anchor-data {spec!r}: '{name}' or '{name}:TOKENS' with TOKENS a positive integer")
    return name, tokens


def anchor_text(spec: tuple[str, int | None], teacher, tokenizer, row_len: int, step_rows: int, tokens: int,
                seed: int = 0, heldout_fraction: float = 0.1, log=print) -> torch.Tensor:
    """The full anchor's own text in rows of `row_len`, at least `step_rows` of them (a step's):
    parse_anchor_data's `spec`, sampled from the parent (`tokens` of it unless the spec says) on rank 0
    and sent to the others, so that every rank holds the same rows (a parent sharded by FSDP2: sampled by
    every rank in step, each gathering the weights, rank 0's rows sent); or a text's train split."""
    source, count = spec
    if source not in SAMPLED:
        return pack(load_corpus_tokens(source, tokenizer, heldout_fraction=heldout_fraction, seed=seed)[0], row_len)
    prefix = None
    if source in ("chat", "self+chat"):
        prefix = chat_prefix(tokenizer)
        if not prefix:
            raise StarElasticError(f"--anchor-data {source} samples conversations through the tokenizer's chat "
                                   "template, and this tokenizer has none: use 'self'")
        if len(prefix) >= row_len // 2:
            raise StarElasticError(f"--anchor-data {source}: the chat template opens with {len(prefix)} tokens, half "
                                   f"a row of {row_len} or more: use 'self' or longer rows")
    rank, ranks = world()
    n = max(step_rows, (count or tokens) // row_len)
    device = teacher.lm_head.weight.device
    t0 = time.perf_counter()
    sharded = parallel.is_sharded(teacher)
    if rank == 0 or sharded:  # sharded, every rank runs the same forwards (each gathers its layers' weights)
        def sample(count, opening, seed):
            with parallel.compute_autocast(teacher):  # no CUDA graph: FSDP's gathers are not for capture
                return sample_rows(teacher, count, row_len, batch_size=128 if device.type == "cuda" else 8, seed=seed,
                                   progress=rank == 0, prefix=opening, use_graph=False if sharded else None).to(device)

        if source == "self+chat":  # alternating, so that any run of rows (a batch, the restore's) holds both
            chats = n // 2
            plain, chat = sample(n - chats, None, seed), sample(chats, prefix, seed + 1)
            rows = torch.empty(n, row_len, dtype=torch.long, device=device)
            rows[0::2], rows[1::2] = plain, chat
        else:
            rows = sample(n, prefix, seed)
        if sharded:
            forget_decode_steps(teacher)  # its caches: the trainer needs the memory
    else:  # filled by the broadcast
        rows = torch.empty(n, row_len, dtype=torch.long, device=device)
    if ranks > 1:
        torch.distributed.broadcast(rows, src=0)
    opens = "each" if source == "chat" else "every other one"
    log(f"anchor text: {n * row_len:,} tokens sampled from the parent ({n} rows of {row_len}"
        f"{f', {opens} opening a conversation ({len(prefix)} tokens of its chat template)' if prefix else ''}) in "
        f"{time.perf_counter() - t0:.0f} s")
    return rows.cpu()


# Passes over the training text above which the full budget drifts out of domain. Measured on SmolLM2
# (docs/RESULTS.md §9, "Drift, ..."): 4.4 passes over one corpus, +1.4% on an unseen one; 13 passes,
# +3.1% to +3.3% (two seeds); 7 passes over a two-domain mixture, +0.3%.
MAX_PASSES = 5.0
# Below this share of its steps on the exported architecture, a budget is warned about (SmolLM2 seed 0
# at 12.6M: its 0.5's router settled on the architecture it exported after 70% of the run; +17% behind (c)).
LOW_SHARE = 0.5


# A smaller budget whose perplexity against the parent's is this much worse out of its training domain than in
# it has kept less of the parent there (on SmolLM2 the 0.75 trailed its (c) by 3-7% out of domain while level in
# it, docs/RESULTS.md §9); --budget-mix trades some of the training domain for it
ELSEWHERE_GAP = 1.1


def elsewhere_note(budget: str, in_domain: float, elsewhere: dict[str, float], budget_mix: float) -> str | None:
    """A one-line note when smaller budget `budget` is over ELSEWHERE_GAP times further from the parent on some
    other source than in its training domain (`in_domain`, `elsewhere`: its perplexity over the parent's), and
    its batches had none of the parent's own text; else None."""
    worst = max(elsewhere, key=elsewhere.get, default=None)
    if budget_mix or worst is None or elsewhere[worst] <= ELSEWHERE_GAP * in_domain:
        return None
    return (f"  note: budget {budget} keeps less of the parent out of its training domain ({elsewhere[worst]:.2f}x the "
            f"parent's perplexity on {worst}, {in_domain:.2f}x in domain); if it must serve other text, --anchor-data "
            "self --budget-mix F gives its batches a share F of the parent's own text, at a cost in domain that "
            "grows with F (on SmolLM2 at F = 0.2, elastify --keep-full's, the 0.75 level with one distilled alone in "
            "domain and 4-7% ahead out of it; at 0.5 3-4% behind in domain; docs/RESULTS.md §9)")


def passes_warning(tokens: int, available: int, data: str) -> str | None:
    """A one-line warning when training would repeat its text more than MAX_PASSES times, else None."""
    passes = tokens / max(available, 1)
    if passes <= MAX_PASSES:
        return None
    mix = parse_mixture(data)
    advice = ("add text of other domains to the mixture" if mix else
              "mix in text of another domain, e.g. --data wiki,bible, or use more text")
    return (f"warning: {tokens:,} training tokens are {passes:.1f} passes over the {available:,} of {data!r}; "
            f"beyond {MAX_PASSES:g} passes the full budget drifts from the parent on other text "
            f"(+3% at 13 passes in docs/RESULTS.md §9): {advice}")


def drift_source(data: str, drift_data: str | None) -> str | None:
    """The held-out source of a second domain for the full budget's drift: `drift_data` as given,
    or ("auto", when the training data is made of bundled corpora) the first bundled corpus it does
    not use. For text of your own, name one (`--drift-data shakespeare`)."""
    if drift_data != "auto":
        return drift_data or None
    used = {name for name, _ in parse_mixture(data) or [(str(data), 1.0)]}
    if not used <= set(CORPORA):
        return None
    return next((name for name in ("shakespeare", "wiki", "bible", "wiki-fr") if name in CORPORA and name not in used),
                None)


def masked_scores(model, spec, heldout, cfg: ElastifyConfig, device, delta=None, reference=None) -> dict:
    """The budget `spec` of `model` on held-out text: {"perplexity"} on a token stream; on chat transcripts
    (chat_transcripts) answer_scores' (the answers' perplexity, first_token_kept). `delta`: the full budget's
    own (delta.py), applied when `spec` keeps the whole parent. `reference` (the parent): its KL from it too."""
    full = delta is not None and not spec.to_dict()
    with masked(model, spec.masks(model.config, device=device)), delta.applied(model) if full else nullcontext(), \
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if isinstance(heldout, list):
            return answer_scores(model, heldout, device, reference=reference)
        return perplexity(model, heldout, seq_len=cfg.seq_len, batch_size=4, max_tokens=cfg.eval_tokens,
                          progress=False, device=device, reference=reference)


def masked_perplexity(model, spec, heldout, cfg: ElastifyConfig, device, delta=None) -> float:
    return masked_scores(model, spec, heldout, cfg, device, delta)["perplexity"]


# A first answer token the parent prefers by more than this (nats, top log-probability less the second) is one
# training should not tip; below it, near-ties tip at the slightest training (the CPU preset's 12 steps at 3e-5
# began 2 of 24 answers otherwise, both near-ties, docs/RESULTS.md §5)
CLEAR_MARGIN = 0.5

# Questions the parent answers before training, for the full budget's drift on chat (ElastifyConfig.chat_drift).
# Held-out prose does not see a chat model's answers move: the GPU demo's full model stayed within 1.4% of its
# parent on two sources of prose yet answered "What is the capital of France?" in a loop in French, where its
# parent says "Paris" (docs/RESULTS.md §5, twenty-second session).
CHAT_QUESTIONS = (
    "What is the capital of France?", "Name three primary colors.", "What do bees make?",
    "How many days are in a week?", "What is the largest planet in the solar system?", "Why is the sky blue?",
    "What is photosynthesis?", "Who wrote Romeo and Juliet?", "How do I boil an egg?", "What is 12 times 7?",
    "Give me a synonym for happy.", "What language is spoken in Brazil?", "What is the boiling point of water?",
    "Explain what a computer program is.", "What should I pack for a beach trip?", "What is the tallest mountain?",
    "Translate 'thank you' into Spanish.", "Write a short sentence about autumn.", "What do plants need to grow?",
    "How does a bicycle work?", "What is the opposite of cold?", "Name a famous painter.",
    "What is the moon made of?", "Suggest a name for a pet cat.",
)


@torch.no_grad()
def chat_transcripts(model, tokenizer, questions=CHAT_QUESTIONS, max_new_tokens: int = 32,
                     progress: bool = False) -> list | None:
    """The parent's greedy answers to `questions` through the tokenizer's chat template, as (ids, prompt_len)
    pairs for answer_scores; None when the tokenizer has no chat template (a base model: no chat to drift)."""
    from tqdm.auto import tqdm

    if not getattr(tokenizer, "chat_template", None):
        return None
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    # in the model's own precision, no autocast: the static caches are in it
    for q in tqdm(questions, desc="chat answers", unit="question", disable=not progress):
        ids = encode_prompt(tokenizer, q).to(device)
        full = generate(model, ids, max_new_tokens, eos_token_id=eos, use_graph=False)[0].cpu()
        if full.numel() > ids.shape[1]:  # an answer of no tokens has nothing to score
            out.append((full, ids.shape[1]))
    return out or None


def train_config(cfg: ElastifyConfig, budgets: list, model_config, steps: int, anchor: float) -> TrainConfig:
    """The trainer's settings from elastify's: values given one a budget in --budgets order (stage 2's weights, KD
    weights, learning rates) put in the trainer's order (largest first), the full anchor as `check_options`
    resolved it, the delta's restore only with a delta."""
    def trainer_order(values):
        if values is None or len(values) != len(cfg.budgets):
            return values  # (none, or a count that check_config refuses)
        by_name = {parse_budget(b, model_config).name: v for b, v in zip(cfg.budgets, values)}
        return [by_name[b.name] for b in budgets]

    stage2, kd_weights, budget_lrs = map(trainer_order, (cfg.stage2_weights, cfg.kd_weights, cfg.budget_lrs))
    # the restore sets the delta: none without one (a mode it does not know is passed on, for check_config to name)
    restore = "" if not cfg.full_delta_rank and cfg.full_delta_restore in RESTORE_MODES else cfg.full_delta_restore
    return TrainConfig(steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                       router_lr=cfg.router_lr, warmup_steps=max(1, steps // 20), eval_tokens=cfg.eval_tokens,
                       seed=cfg.seed, stage1_fraction=cfg.stage1_fraction, stage2_weights=stage2,
                       stage2_seq_len=cfg.stage2_seq_len, budget_kd_weights=kd_weights, full_anchor=anchor,
                       router_estimator=cfg.router_estimator, router_freeze_fraction=cfg.router_freeze,
                       router_baseline_rows=cfg.router_baseline_rows,
                       router_prior=cfg.router_prior, shard=cfg.shard, compile=cfg.compile,
                       all_budgets=cfg.all_budgets, train_on=cfg.train_on, budget_lrs=budget_lrs,
                       anchor_projection=cfg.anchor_projection, anchor_mix=cfg.anchor_mix, budget_mix=cfg.budget_mix,
                       full_delta_rank=cfg.full_delta_rank, full_delta_lr=cfg.full_delta_lr,
                       full_delta_finish=cfg.full_delta_finish, full_delta_restore=restore,
                       full_delta_allocate=cfg.full_delta_allocate, full_delta_bits=cfg.full_delta_bits,
                       hold=cfg.hold,
                       hold_rate=cfg.hold_rate, hold_pull=cfg.hold_pull,
                       full_keeps_held=cfg.full_keeps_held == "training")


def score_budgets(model, teacher, delta, budgets: list, specs: list, projections: list, shares: dict, heldouts: dict,
                  parent_scores: dict, cfg: ElastifyConfig, device, log) -> tuple[dict, dict, dict]:
    """Every trained budget scored where training ended: its held-out perplexity in the training domain
    (`heldouts["train domain"]`), the full budget's drift from its parent (`parent_scores`) on every held-out
    source with the parent's KL from it, and every smaller budget on the sources besides the training
    domain's. Logs each, with the warnings and notes they call for. Returns (perplexity in domain, drift,
    perplexity elsewhere), by budget name."""
    heldout, parent_ppl = heldouts["train domain"], {k: v["perplexity"] for k, v in parent_scores.items()}
    after, full_scores = {}, None
    for b, spec, proj in zip(budgets, specs, projections):
        # the full budget with the parent's KL from it: its drift on the training domain, below, reads this pass
        got = masked_scores(model, spec, heldout, cfg, device, delta, reference=teacher if b.is_full else None)
        after[b.name] = got["perplexity"]
        if b.is_full:
            full_scores = got
        how = (f"projected from the router's {proj.argmax_cost / proj.target:.3f}x" if proj.projected
               else "the router's argmax")
        share = shares[b.name]
        trained = "" if share is None else f", trained on {share:.0%} of its steps"
        log(f"  trained   {b.name:>6}: perplexity {after[b.name]:.3f}, cost {proj.ratio:.3f}x target ({how}{trained})")
        if share is not None and share < LOW_SHARE:
            log(f"  warning: budget {b.name}'s exported architecture trained on only {share:.0%} of that budget's "
                "steps (the router settled late, or the export moved it): expect it behind a budget distilled "
                "alone; --router-prior holds the router near its start")
    drift, elsewhere = {}, {}
    for name, stream in heldouts.items():
        if name != "train domain":  # every smaller budget there too: what a budget keeps of the parent out of domain
            elsewhere[name] = {b.name: masked_scores(model, spec, stream, cfg, device, delta)["perplexity"]
                               for b, spec in zip(budgets, specs) if not b.is_full}
        # with the parent's KL from the full budget: a flatter full model scores better on prose its parent is
        # unsure of and worse on its parent's own answers, at one distance from it (docs/RESULTS.md §9)
        got = full_scores if name == "train domain" and full_scores is not None else \
            masked_scores(model, ElasticSpec(), stream, cfg, device, delta, reference=teacher)
        ppl = got["perplexity"]
        drift[name] = {"parent": parent_ppl[name], "full_budget": ppl, "change": ppl / parent_ppl[name] - 1,
                       "kl_from_parent": got["kl_from_reference"]}
        if "first_token_kept" in got:  # chat answers: how many the full budget still begins as the parent did,
            # of all and of those the parent begins with a clear margin (a near-tie tips at the slightest training)
            sure = [i for i, m in enumerate(parent_scores[name]["first_margin"]) if m > CLEAR_MARGIN]
            drift[name].update(answers=len(stream), first_token_kept={
                "parent": parent_scores[name]["first_token_kept"], "full_budget": got["first_token_kept"]},
                clear_first_tokens={"margin_nats": CLEAR_MARGIN, "answers": len(sure),
                                    "kept": sum(got["first_kept"][i] for i in sure)})
        log(f"  full budget vs parent on {name} held-out: {parent_ppl[name]:.3f} -> {ppl:.3f} "
            f"({drift[name]['change']:+.2%}), KL from the parent {drift[name]['kl_from_parent']:.4f} nats a token"
            + first_tokens(drift[name]))
        warning = chat_warning(drift[name])
        if warning:
            log(warning)
    for b in budgets:
        if not b.is_full:
            note = elsewhere_note(b.name, after[b.name] / parent_ppl["train domain"],
                                  {n: v[b.name] / parent_ppl[n] for n, v in elsewhere.items()}, cfg.budget_mix)
            if note:
                log(note)
    return after, drift, elsewhere


def zero_shot_starts(model, budgets: list, axes: list[str], batches: list, layer_order, heldout, cfg: ElastifyConfig,
                     device, ranks: int, log) -> tuple[list, dict[str, float]]:
    """Zero-shot, no training: each smaller budget's best homogeneous prefix of the sorted parent (Minitron's
    search over axis combinations, scored by calibration perplexity on `batches`), its perplexity on `heldout`,
    and the architectures the router starts from, which must nest where each budget's own best need not: of
    the plans smallest-first and largest-first, the one that moves the budgets least from their own bests.
    Returns (starts in `budgets` order, None where a budget is the full one or not given by parameters;
    {budget name: zero-shot perplexity})."""
    starts, before = [None] * len(budgets), {}
    searched = {}  # budget index -> the search's records, best first
    for i, b in enumerate(budgets):
        if b.kind != "params" or b.is_full:
            continue
        records = search_spec(model, int(b.target), axes, batches, layer_order=layer_order,
                              multiple=cfg.multiple)[1]
        if ranks > 1:  # one ranking for every rank, whatever the rounding of their searches
            box = [records]
            torch.distributed.broadcast_object_list(box, src=0)
            records = box[0]
        searched[i] = records
    order = sorted(searched, key=lambda i: -budgets[i].fraction)
    plans = []
    chosen, nested = nested_search(model, [int(budgets[i].target) for i in order], [searched[i] for i in order],
                                   axes, batches, layer_order=layer_order, multiple=cfg.multiple,
                                   plans=plans) if order else ([], True)
    if len(plans) > 1 and plans[0]["specs"] != plans[1]["specs"]:  # the budgets' own bests did not nest
        losses = "; ".join(f"{p['order']} {p['loss']:.2f}" + (" (chosen)" if p["chosen"] else "") for p in plans)
        log(f"  the budgets' own bests do not nest; nats of calibration perplexity lost by nesting: {losses}")
    if ranks > 1:  # one start for every rank, whatever the rounding of their searches
        box = [[s.to_dict() for s in chosen], nested]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen, nested = [ElasticSpec.from_dict(d) for d in box[0]], box[1]
    for i, spec in zip(order, chosen):
        starts[i] = spec
        b = budgets[i]
        own = ElasticSpec.from_dict(searched[i][0]["spec"])  # the zero-shot baseline: the budget's own best
        before[b.name] = masked_perplexity(model, own, heldout, cfg, device)
        note = "" if spec == own else f"; the router starts nested, at {describe(spec, model.config)}"
        log(f"  zero-shot {b.name:>6}: perplexity {before[b.name]:.3f}  [{describe(own, model.config)}{note}]")
    if not nested and len(order) > 1:
        log("  the search's candidates hold no nested combination: the router starts from each budget's best, "
            "nested by projection")
    return starts, before


# a TrainConfig field -> the elastify flag that sets it, where the two names differ (check_options' messages)
FLAG_OF = {"budget_kd_weights": "kd_weights", "router_freeze_fraction": "router_freeze", "anchor_rows": "anchor_data"}


def flag(field: str) -> str:
    """The elastify flag of a TrainConfig field: `--kd-weights` for budget_kd_weights."""
    return "--" + FLAG_OF.get(field, field).replace("_", "-")


def check_options(cfg: ElastifyConfig, budgets: list, model_config,
                  ranks: int) -> tuple[float, tuple[str, int | None] | None]:
    """The full anchor's weight (0 where there is no full budget and smaller one to train it beside) and
    --anchor-data parsed; a one-line StarElasticError, naming the flags, for any option that contradicts another,
    before the data, importance and search take their time: elastify's own options here, the trainer's by the
    trainer's own `check_config`."""
    if cfg.router_init not in ("search", "cost"):
        raise StarElasticError(f"--router-init is 'search' or 'cost', got {cfg.router_init!r}")
    if cfg.full_keeps_held not in ("", "after", "training"):
        raise StarElasticError(f"--full-keeps-held {cfg.full_keeps_held!r}: 'after' (training) or 'training' "
                               "(from its first step)")
    why = keep_problem(cfg.full_keeps_held, cfg.full_delta_rank, cfg.hold, cfg.hold_rate)  # "after" too
    if why:
        raise StarElasticError(f"--full-keeps-held keeps the parent's values of what --hold trains for the full budget "
                               f"beside its delta: {why}")
    # the anchor needs the full budget and a smaller one to train beside it; without them it has nothing to do
    anchor = cfg.full_anchor if len(budgets) > 1 and any(b.is_full for b in budgets) else 0.0
    anchor_spec = parse_anchor_data(cfg.anchor_data)
    check_config(train_config(cfg, budgets, model_config, 1, anchor), budgets, ranks > 1 and cfg.shard != "none",
                 anchor_spec is not None, name=flag)
    return anchor, anchor_spec


def elastify(model, tokenizer, data: str, out, cfg: ElastifyConfig, log=print, device=None) -> dict:
    """Run the pipeline on `model` (trained in place) and write the checkpoint to `out`. `model` is a
    loaded `Model`, or under torchrun with FSDP2 the path of a safetensors checkpoint directory: then
    the parent never sits whole on one rank (loaded sharded, scored sharded, sorted as it is loaded
    again, written tensor by tensor; `device`: this rank's). An interrupted run resumes from
    `.OUT.train` beside `out`."""
    out = Path(out)
    rank, ranks = world()  # under torchrun: every rank runs this; rank 0 logs and writes
    stages, last = {}, [time.perf_counter()]

    def stage(name):  # seconds since the last stage ended (the manifest's training.stages_s)
        now = time.perf_counter()
        stages[name] = round(now - last[0], 1)
        last[0] = now

    if isinstance(model, (str, Path)):
        device = device or parallel.default_device()
        model = load_sharded(model, torch.float32, device, mixed_precision=device.type == "cuda")
        stage("load")
    device = next(model.parameters()).device
    sharded_parent = parallel.is_sharded(model)
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731
    torch.manual_seed(cfg.seed)
    budgets = sorted((parse_budget(b, model.config) for b in cfg.budgets), key=lambda b: -b.fraction)
    anchor, anchor_spec = check_options(cfg, budgets, model.config, ranks)
    train_stream, heldout = load_corpus_tokens(data, tokenizer, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed)
    row_len = max(cfg.seq_len, cfg.stage2_seq_len or 0)
    rows = pack(train_stream, row_len)
    drift_name = drift_source(data, cfg.drift_data)
    heldouts = {"train domain": heldout}
    if drift_name:
        heldouts[drift_name] = load_corpus_tokens(drift_name, tokenizer, heldout_fraction=cfg.heldout_fraction,
                                                  seed=cfg.seed)[1]
    steps = max(1, cfg.tokens // (cfg.batch_size * cfg.seq_len))
    train_tokens = steps * cfg.batch_size * cfg.seq_len  # --tokens rounded down to whole steps
    log(f"data: {train_stream.numel():,} training tokens ({rows.shape[0]} sequences of {row_len}), "
        f"{heldout.numel():,} held-out; training on {train_tokens:,} tokens in {steps} steps"
        + (f" (--tokens {cfg.tokens:,} in whole steps of {cfg.batch_size} x {cfg.seq_len})"
           if train_tokens != cfg.tokens else ""))
    repeat = passes_warning(train_tokens, train_stream.numel(), data)
    if repeat:
        log(repeat)

    stage("data")
    t0 = time.perf_counter()
    calib_rows = pack(train_stream, cfg.seq_len)
    calib = TokenBatches(calib_rows, min(cfg.batch_size, rows.shape[0]), seed=cfg.seed + 7)
    depth = "depth" in cfg.axes
    # each rank scores its own slice of every calibration batch; statistics are summed over ranks
    share = (lambda b: b[rank::ranks]) if calib.batch_size >= ranks else (lambda b: b)
    scores = estimate_importance(model, (share(b).to(device) for b in calib), num_batches=cfg.calib_batches,
                                 depth=depth)
    if sharded_parent:  # sorting permutes rows across ranks' shards: sort while loading again, row by row
        model, perms = load_sorted(model.source, scores=scores, dtype=torch.float32, device=device,
                                   mixed_precision=device.type == "cuda")
    else:
        perms = sort_model(model, scores)
    log(f"importance on {cfg.calib_batches} batches and function-preserving sort: {time.perf_counter() - t0:.0f} s")
    stage("importance_and_sort")

    # the parent (sorting preserves its function) answering chat questions, before training moves it (a sharded
    # parent cannot generate: the chat source is then left out)
    t0 = time.perf_counter()
    chat = chat_transcripts(model, tokenizer, progress=rank == 0) if cfg.chat_drift and not sharded_parent else None
    if chat:
        heldouts["chat answers"] = chat
        log(f"chat answers: the parent answered {len(chat)} questions ({answer_tokens(chat):,} tokens) "
            f"in {time.perf_counter() - t0:.0f} s, for the full budget's drift on them")
    # the parent on every held-out source: the full budget's reference
    parent_scores = {k: masked_scores(model, ElasticSpec(), v, cfg, device) for k, v in heldouts.items()}
    parent_ppl = {k: v["perplexity"] for k, v in parent_scores.items()}
    # zero-shot, searched on the first calibration batches again (importance consumed them from `calib`)
    layer_order = scores["layer_order"].tolist() if depth else None
    search_batches = [b.to(device) for b, _ in zip(TokenBatches(calib_rows, calib.batch_size, seed=cfg.seed + 7),
                                                    range(max(1, min(cfg.calib_batches, 4))))]
    axes = [a for a in cfg.axes if a != "depth"] or list(DEFAULT_AXES)
    starts, zero_shot = zero_shot_starts(model, budgets, axes, search_batches, layer_order, heldout, cfg, device, ranks,
                                         log)
    before = {**{b.name: parent_ppl["train domain"] for b in budgets if b.is_full}, **zero_shot}

    stage("search_and_zero_shot")
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if sharded_parent:  # the sorted parent once more, sharded, in the teacher's dtype
        teacher = load_sorted(model.source, perms=perms, dtype=teacher_dtype, device=device,
                              mixed_precision=device.type == "cuda")[0]
    else:
        teacher = copy.deepcopy(model).to(teacher_dtype)
    teacher.eval().requires_grad_(False)
    router = Router(model.config, budgets, RouterConfig(axes=tuple(cfg.axes), heterogeneous=cfg.heterogeneous,
                                                        width_multiple="auto" if cfg.multiple is None else cfg.multiple),
                    layer_order=layer_order).to(device)
    tcfg = train_config(cfg, budgets, model.config, steps, anchor)
    restore = tcfg.full_delta_restore
    if anchor and restore:
        log(f"each step draws one smaller budget; the full budget's delta is restored where training ends "
            f"(--full-delta-restore {restore}), so the anchor's passes, which would train only it, are skipped")
    elif anchor:
        log(f"the full model is distilled on every step too (--full-anchor {anchor:g}); each step draws one "
            "smaller budget")
    state_dir = out.parent / f".{out.name}.train"
    anchor_rows = None if anchor_spec is None else saved_anchor_rows(state_dir)
    if anchor_rows is not None:  # the interrupted run's text: a new sample would differ on CUDA
        log(f"anchor text: the interrupted run's {anchor_rows.numel():,} tokens (in {state_dir})")
    elif anchor_spec is not None:
        anchor_rows = anchor_text(anchor_spec, teacher, tokenizer, row_len, cfg.batch_size * cfg.seq_len // row_len,
                                  min(ANCHOR_SELF_TOKENS, train_tokens), cfg.seed, cfg.heldout_fraction, log)
    # the sorted parent's, in full ("training": the trainer keeps them from its first step)
    parents_held = held_values(model, cfg.hold) if cfg.full_keeps_held == "after" else None
    trainer = ElasticTrainer(model, teacher, router, budgets, rows, tcfg, state_dir,
                             heldout=heldout, anchor_rows=anchor_rows,
                             warm_start=starts if cfg.router_init == "search" and any(starts) else None)
    if trainer.load_state():
        log(f"resuming training at step {trainer.step}")
    stage("teacher_and_router")
    t0 = time.perf_counter()
    step_logs = trainer.run()  # with cfg.compile, the layers are plain again after it
    train_s = time.perf_counter() - t0
    stage("training")
    if parents_held is not None:  # from here on (evaluation, checkpoint) the full budget runs the parent's
        trainer.delta.keep(trainer.model, parents_held)
        log(f"the full budget keeps the parent's {', '.join(cfg.hold)} as its own "
            f"({sum(t.numel() for t in parents_held.values()):,} parameters); the smaller budgets the trained ones")
        del parents_held
    elif cfg.full_keeps_held == "training":
        log(f"the full budget kept the parent's {', '.join(cfg.hold)} as its own throughout training "
            f"({sum(t.numel() for t in trainer.delta.rest.values()):,} parameters); the smaller budgets the trained ones")
    if (restored := trainer.restored) is not None:
        given = trainer.delta.ranks().values()
        spent = (f"rank {cfg.full_delta_rank}'s parameters given out layer by layer (ranks {min(given)} to "
                 f"{max(given)})" if cfg.full_delta_allocate else f"rank {cfg.full_delta_rank}") + \
            (f" and the rest rounded to {cfg.full_delta_bits} bit{'s' * (cfg.full_delta_bits > 1)} a weight"
             if cfg.full_delta_bits else "")
        log(f"the delta set from the shared weights' drift ({restore}) where training ended: {spent} covers "
            f"{restored.share:.1%} of it" + (f" ({restored.undamped:.1%} under its inputs' covariance "
                                            f"undamped; what it leaves is {restored.residual:.1e} of the "
                                            "parent's layers' output energy)" if restored.undamped is not None else "")
            + (", then the finish trained it on" if cfg.full_delta_finish else ""))
        if restored.report:  # what other sizes, or the other way of spending this one, would have covered
            # what it said above (with a rounded rest, the rank's part alone is new: it is said too)
            own = "allocated" if cfg.full_delta_allocate else \
                "" if cfg.full_delta_bits else f"rank {cfg.full_delta_rank}"
            alone = f"rank {cfg.full_delta_rank}" if cfg.full_delta_bits else None
            log("  the same restore " + ", ".join(f"at {k}{' alone' * (k == alone)}: {v:.1%}"
                                                  for k, v in restored.report.items()
                                                  if k.startswith("rank") and k != own)
                + (f"; rank {cfg.full_delta_rank}'s parameters given out layer by layer: "
                   f"{restored.report['allocated']:.1%}" if own != "allocated" else ""))
    distribution = {**trainer.distribution, "peak_memory_gib": trainer.peak_memory()}  # per rank, GPU only
    if sharded_parent:
        distribution["parent_load"] = "sharded from disk, importance on the shards, sorted as loaded again"
    log(f"training: {distribution['ranks']} rank(s), {distribution['sharding']}")
    # the student as trained: under FSDP2 still sharded, never whole on any rank. Every rank runs the
    # same evaluation forwards on it, and the checkpoint is gathered tensor by tensor, rank 0 writing
    model = trainer.model
    sharded = trainer.shard == "fsdp"
    # steady-state throughput (all ranks together): the median training step after the first fifth (the
    # delta's finish, a lighter step, apart)
    trained = [s for s in step_logs if "phase" not in s]
    rates = sorted(log["tokens_per_s"] for log in trained[len(trained) // 5:])
    # the steps each budget trained in this run (the full model's include the anchored ones, a smaller
    # budget's those it trained beside another, TrainConfig.all_budgets): its token share
    steps_per_budget = {b.name: sum(1 for s in step_logs if s["budget"] == b.name or (b.is_full and "full_kd" in s)
                                    or f"kd@{b.name}" in s) for b in budgets}
    log("steps per budget: " + ", ".join(f"{k} {v}" for k, v in steps_per_budget.items()) + f" of {len(step_logs)}")
    finish = [s for s in step_logs if s.get("phase") == "full_delta_finish"]
    if finish:  # (a resumed run's logs hold this call's steps only)
        log(f"the delta's finish: {len(finish)} steps ({sum(s['seq_len'] for s in finish) * cfg.batch_size:,} tokens "
            f"beside the {train_tokens:,}, the full budget's alone) with the shared weights fixed, the full budget's "
            f"KD {finish[0]['full_kd']:.4f} -> {finish[-1]['full_kd']:.4f}, "
            f"{sorted(s['tokens_per_s'] for s in finish)[len(finish) // 2]:,.0f} tokens/s")

    router.eval()
    # every budget in its band and nested in the larger ones, by construction (the argmax where it is)
    projections = project_budgets(router, budgets, CostModel(model.config), band=tcfg.loss.band)
    specs = [router.spec_of(p.choice) for p in projections]
    # the share of its steps each budget trained the architecture it exports (None: the full budget)
    shares = {b.name: trainer.trained_share(i, p.choice) for i, (b, p) in enumerate(zip(budgets, projections))}
    after, drift, elsewhere = score_budgets(model, teacher, trainer.delta, budgets, specs, projections, shares,
                                            heldouts, parent_scores, cfg, device, log)
    del teacher
    evaluation = {"data": data, "heldout_tokens": min(cfg.eval_tokens, heldout.numel()), "seq_len": cfg.seq_len,
                  "zero_shot_perplexity": before, "trained_perplexity": after, "full_budget_drift": drift,
                  "trained_perplexity_elsewhere": elsewhere}
    training = {"tokens": train_tokens, "steps": steps, "seconds": round(train_s, 1),
                "passes": round(train_tokens / train_stream.numel(), 2),
                "tokens_per_s": round(rates[len(rates) // 2]) if rates else None, "steps_per_budget": steps_per_budget,
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}}
    stage("evaluation")
    training["stages_s"] = stages
    if (restored := trainer.restored) is not None:  # what the restored delta covered of the shared weights' drift
        training["full_delta_restored"] = round(restored.share, 4)
        if restored.undamped is not None:
            training["full_delta_restored_undamped"] = round(restored.undamped, 4)
            training["full_delta_residual"] = float(f"{restored.residual:.4g}")
        if restored.report:
            training["full_delta_restore_report"] = {k: round(v, 4) for k, v in restored.report.items()}
    log("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in stages.items()))
    training["exported_arch_share"] = shares
    training["ranks"] = ranks
    training["parallel"] = distribution
    if trainer.selection:  # the architectures chosen at the router freeze, by measured KD
        training["freeze_selection"] = trainer.selection
    if rank == 0 or sharded:  # sharded: every rank takes part in the gathers
        save_elastic(model, router, budgets, out, tokenizer, extra={"training": training, "evaluation": evaluation},
                     scores=permuted_scores(scores, perms), specs=specs, projections=projections,
                     record=distribution if sharded else None,
                     dtype=getattr(torch, cfg.save_dtype) if cfg.save_dtype else None, delta=trainer.delta,
                     order=perms)
        written = sum(f.stat().st_size for f in out.glob("*.safetensors")) if rank == 0 else 0
        log(f"checkpoint written in {time.perf_counter() - last[0]:.0f} s ({written / 1e9:.2f} GB of safetensors)")
    if rank == 0:
        keep_step_log(trainer.out / "metrics.jsonl", out)
        shutil.rmtree(trainer.out, ignore_errors=True)  # the resumable state is no longer needed
    if ranks > 1:
        torch.distributed.barrier()
    return {"zero_shot": before, "trained": after, "checkpoint": str(out), "training": training, "drift": drift,
            "elsewhere": elsewhere,
            "projections": [p.to_dict() for p in projections]}


def keep_step_log(log: Path, out: Path):
    """The training's step log (a line a step: each budget's KD, the full budget's on the anchor's rows, the
    router's costs and gradients) beside the checkpoint, as `metrics.jsonl`: it outlives the resumable state,
    which is removed. Copied under a temporary name, then renamed, so the file is never half there."""
    if log.exists():
        tmp = out / ".metrics.jsonl.tmp"
        shutil.copyfile(log, tmp)
        os.replace(tmp, out / "metrics.jsonl")


def print_table(result: dict, file=None):
    """Each budget: its size, its held-out perplexity as a zero-shot slice and after training, and
    the trained one against the parent's; then the full budget's drift on every held-out source, and the
    smaller budgets on every source besides the training domain's, against the parent there."""
    parent = result.get("drift", {}).get("train domain", {}).get("parent")
    print(f"\n{'budget':>8} {'kept':>7} {'zero-shot ppl':>14} {'trained ppl':>12} {'vs parent':>10}", file=file)
    for (name, ppl), proj in zip(result["trained"].items(), result.get("projections") or [{}] * len(result["trained"])):
        zs = result["zero_shot"].get(name)
        kept = f"{proj['cost'] / proj['target'] * float(name):.1%}" if proj and _is_fraction(name) else "-"
        rel = f"{ppl / parent:.2f}x" if parent else "-"
        print(f"{name:>8} {kept:>7} {'-' if zs is None else f'{zs:.3f}':>14} {ppl:>12.3f} {rel:>10}", file=file)
    for source, d in result.get("drift", {}).items():
        print(f"full budget on {source} held-out: {d['full_budget']:.3f} vs the parent's {d['parent']:.3f} "
              f"({d['change']:+.2%})" + first_tokens(d), file=file)
    for source, ppls in (result.get("elsewhere") or {}).items():
        parent_there = result.get("drift", {}).get(source, {}).get("parent")
        if ppls and parent_there:
            print(f"smaller budgets on {source} held-out: " + ", ".join(
                f"{name} {ppl:.3f} ({ppl / parent_there:.2f}x)" for name, ppl in ppls.items())
                + f" against the parent's {parent_there:.3f}", file=file)
    print(f"checkpoint: {result['checkpoint']}", file=file)


def first_tokens(drift: dict) -> str:
    """'; ... first token: 23 of 24 (the parent itself 24; 20 of the 20 it begins by over 0.5 nats)' for a
    chat-answers drift entry, else ''."""
    kept, n, clear = drift.get("first_token_kept"), drift.get("answers"), drift.get("clear_first_tokens")
    if not kept or not n:
        return ""
    sure = (f"; {clear['kept']} of the {clear['answers']} it begins by over {clear['margin_nats']:g} nats"
            if clear else "")
    return (f"; answers begun with the parent's greedy first token: {round(kept['full_budget'] * n)} of {n} "
            f"(the parent itself {round(kept['parent'] * n)}{sure})")


def chat_warning(drift: dict) -> str | None:
    """A warning when the full budget begins otherwise an answer that its parent begins by a clear margin: a
    chat model drifted where held-out prose does not look."""
    clear = drift.get("clear_first_tokens")
    if not clear or clear["kept"] == clear["answers"]:
        return None
    return (f"  warning: the full budget begins {clear['answers'] - clear['kept']} of the {clear['answers']} chat "
            f"answers its parent begins clearly (by over {clear['margin_nats']:g} nats) with another token: it has "
            "drifted as a chat model; --anchor-data chat distils it on conversations (docs/METHOD.md)")


def _is_fraction(name: str) -> bool:
    try:
        return 0 < float(name) <= 1
    except ValueError:
        return False
