"""Elastic training's options (`TrainConfig`, data: a dataclass), the learning-rate schedule, and the rules that
check the options before any work: the trainer checks them, and so does `elastify` with its own flag names, from
the same functions (`check_config` and the `*_problem` rules), so the two never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .elastic.cost import Budget
from .elastic.losses import LossWeights
from .elastic.delta import HELD_PARTS
from .elastic.rounding import REST_BITS
from .elastic.router import ESTIMATORS
from .errors import StarElasticError


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences of seq_len per step over all ranks (stage 2: the same tokens in longer rows)
    grad_accum: int = 1
    seq_len: int = 256  # stage 1
    stage2_seq_len: int | None = None  # longer context in stage 2 (None: same as stage 1)
    stage1_fraction: float = 0.5  # share of the steps with uniform budget sampling
    stage2_weights: list[float] | None = None  # budget probabilities in stage 2 (default: toward the full model)
    lr: float = 1e-4
    router_lr: float = 1e-2
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.0
    clip: float = 1.0
    router_mode: str = "hard"
    router_estimator: str = "score"  # how distillation reaches hard choices: "score" or "straight-through"
    router_quality: float = 1.0  # weight of the router's score-function (quality) term
    router_baseline_rows: float = 1.0  # the share of the batch's rows that term's baseline (the router's argmax,
    #                                    a forward without gradient) runs on, the draw's KD compared on the same
    #                                    rows: below 1 the extra forward costs that share of one, the advantage
    #                                    is noisier (issue 16: a smaller budget's step ran ~1.35x a full one's)
    router_freeze_fraction: float = 0.0  # the last share of the steps trains each budget's in-band argmax,
    #                                      no draws, no router updates (the exported architecture trains last)
    freeze_select: int = 8  # at the freeze, the router's draws (besides its argmax and the warm start) among
    #                         which each budget's architecture is chosen by measured KD; 0: the argmax
    freeze_select_batches: int = 4  # training batches that score them
    draw_in_band: bool = True  # redraw (up to 32 times) until the drawn architecture is in its budget's band
    router_band_penalty: float = 10.0  # in that term's advantage, per unit of relative cost outside the band:
    #                                    a draw that distils better only by leaving the band is not rewarded
    router_warmup_steps: int = 300  # budget-only steps of the router before any model step (cheap)
    router_prior: float = 0.0  # >0: weight of a cross-entropy pulling each smaller budget's router toward its
    #                            warm-start (search) architecture all through training, so it leaves it only
    #                            where the quality term outweighs the pull; needs warm_start
    budget_cost: str = "drawn"  # the budget loss judges the "drawn" architecture or the "expected" one
    router_clip: float = 1.0  # the router's gradient is clipped on its own (the model's norm would drown it)
    entropy_floor: float = 0.1  # least normalised entropy of each router choice distribution (no saturation)
    budget_kd_weights: list[float] | None = None  # per-budget KD weight (budget order); None: all 1
    budget_order: str = "even"  # "even": each budget gets its share of the steps up to a step or two (a
    #                             low-discrepancy sequence); "random": independent draws, the paper's
    all_budgets: bool = False  # every step trains every smaller budget on the same batch (each with its own router
    #                            draw; beside the full anchor: the sandwich rule in full), so each trains on all T
    #                            tokens at one more forward and backward a budget; logged as kd@NAME etc.
    train_on: str = "drawn"  # which of a smaller budget's architectures the model trains each step: "drawn" (the
    #                          router's draw, the paper's) or "argmax" (the router's current choice, nested and in
    #                          band: what would be exported; the draw is then only scored, without gradient, for the
    #                          router's quality term, so a far draw explores without training the model on it)
    full_anchor: float = 0.0  # >0: every step also distils the full model on the same batch (sandwich rule);
    #                           the budget sampler then draws only the smaller budgets (equally in stage 2 too,
    #                           unless stage2_weights says otherwise)
    anchor_projection: bool = False  # with the full anchor: where its gradient conflicts with the smaller
    #                                  budgets' (a negative inner product over the model), it loses its component
    #                                  along theirs (PCGrad, optim.project_conflict), so the anchor holds the full
    #                                  model only in directions that do not undo the smaller budgets' step
    anchor_mix: float = 1.0  # with anchor text (anchor_rows): the share of the anchor's rows drawn from it, the
    #                          rest the step's training batch's (1: the anchor text alone)
    budget_mix: float = 0.0  # with anchor text (anchor_rows): the share of each smaller budget's rows drawn from it
    #                          too, the rest the step's training batch's (0: the training text alone). The shared
    #                          weights are moved by every smaller budget's steps; on the training text alone they
    #                          leave the parent's behaviour elsewhere further behind than a budget trained alone
    #                          does (the 0.75 level in domain, 3-7% behind out of it at 16M: docs/RESULTS.md §9)
    full_delta_rank: int = 0  # >0, with the full anchor: the full budget gets a low-rank delta of its own on every
    #                           linear layer, trained by the anchor alone, which then leaves the shared weights to
    #                           the smaller budgets (elastic/delta.py; elastify --full-delta-rank); its gradient is
    #                           clipped on its own, so the anchor does not scale their step either
    full_delta_lr: float = 0.0  # the delta's own rate (0: `lr`). B starts at zero and moves at Adam's pace, the
    #                             shared weights drift at the same pace, and a rank-R product of two such factors
    #                             follows a full-rank drift slowly (LoRA+ gives B a higher rate for this reason);
    #                             the GPU runs left the full model +8% on the parent's chat answers (RESULTS §9)
    full_delta_finish: int = 0  # steps after the `steps` that train the delta alone, the shared weights (and so
    #                             the smaller budgets) fixed: the full budget distilled on the anchor's batch, at
    #                             the delta's rate on a cosine of its own. While the shared weights train, the delta
    #                             follows their drift from behind (the full budget's KD rose over the first hundred
    #                             steps of the twenty-fourth session's GPU runs, then fell with the rate); with them
    #                             fixed it can catch up, and costs the smaller budgets nothing
    # the delta set in closed form where training ends (before the finish, if any): B A the rank-r part of the
    # parent's linear weights less the shared ones (FullDelta.restore), "weights" the nearest in weights,
    # "activations" weighted by the inputs each layer sees in the parent on RESTORE_BATCHES steps' worth of the
    # anchor's text; "" off. The trained delta follows the shared weights' drift from behind; this starts where
    # they are, and the finish trains on from there. Measured on the CPU probe (docs/RESULTS.md §9, twenty-sixth
    # session): rank 64 held 97.7% of the weighted gap, the parent's KL from the full model 0.06-0.08 -> 0.003
    full_delta_restore: str = ""
    # with the restore: the rank's parameters given out layer by layer where the drift is (delta.allocate_ranks:
    # each further singular pair where its squared value per parameter is highest), not the rank on every layer.
    # What it would cover is reported beside every restore (Restored.report) whether on or not
    full_delta_allocate: bool = False
    # with the restore: the rest of each linear layer's drift past its rank-r part rounded to this many bits a
    # weight (1, 2, 4 or 8; 0: none), a fixed term beside B A (rounding.round_rest). On SmolLM2's own drift 4 bits
    # covered 99.96% where rank 64 covered 98.4% (docs/RESULTS.md §9, forty-first session)
    full_delta_bits: int = 0
    # held at or near the parent's values in every budget: "embeddings" (with the LM head), "norms", or both
    # (delta.HELD_PARTS). Frozen (hold_rate 0) beside the delta, the full model's only drift is in the linear
    # layers its delta covers: measured, within 1% of its parent everywhere at two seeds, but the 0.75 up to 4%
    # and the 0.5 up to 9% behind separate distillation (RESULTS §9, seventeenth session)
    hold: list[str] | None = None
    # their rate, as a fraction of every rate: 0 freezes them; 0.1 lets them move a tenth as fast (Adam's step is
    # proportional to the rate), between what the smaller budgets need and what holds the full model
    hold_rate: float = 0.0
    # > 0 (with hold_rate > 0): after each step they move back toward the parent's values by hold_pull x the rate
    # (L2-SP, decoupled as AdamW's decay is): a drift that the gradient keeps asking for stays, at an offset of
    # about 1 / hold_pull a weight, while one the gradient does not sustain (Adam's noise on rare tokens' rows)
    # decays
    hold_pull: float = 0.0
    # with the delta and a hold at a rate: the full budget runs the parent's values of what `hold` names from the
    # first step (FullDelta.keep), so its delta learns beside the values it is exported with, while the held
    # parts train for the smaller budgets alone (elastify --full-keeps-held training)
    full_keeps_held: bool = False
    budget_lrs: list[float] | None = None  # per-budget model learning rates (budget order): each budget's
    #                                        gradient then has its own AdamW moments and rate (BudgetAdamW), as if
    #                                        distilled alone; None: one AdamW over the summed gradient, at `lr`
    loss: LossWeights = field(default_factory=LossWeights)
    eval_every: int = 0  # steps; 0: only at the end
    eval_tokens: int = 4096
    save_every: int = 0  # steps; 0: only at the end
    seed: int = 0
    log_every: int = 1
    compile: str | None = None  # a torch.compile backend ("inductor" on GPUs) applied to each layer of the
    #                             student and the teacher, and to the distillation loss's chunks; None: eager
    shard: str = "auto"  # under torch.distributed: "fsdp" (FSDP2, the "auto" default when there are 2+ ranks)
    #                      or "none" (every rank holds everything; gradients all-reduced by hand)


def default_stage2_weights(n: int) -> list[float]:
    """Toward the full model (budget 0 is the largest): 0.5 / 0.3 / 0.2 for three budgets."""
    if n == 3:
        return [0.5, 0.3, 0.2]
    w = [0.5 ** i for i in range(n)]
    return [x / sum(w) for x in w]


def cosine(t: float, min_ratio: float) -> float:
    """The rate's factor at t in [0, 1] of a cosine from 1 down to min_ratio."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return cosine((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), cfg.min_lr_ratio)


def hold_problem(hold, rate: float, pull: float, sharded: bool) -> str | None:
    """What is wrong with holding `hold` (TrainConfig.hold) at `rate` with `pull`, in words that fit both the
    trainer's config and elastify's flags; None when nothing is."""
    odd = sorted(set(hold or []) - set(HELD_PARTS))
    return ("a rate or a pull is of the parts held: name them (embeddings, norms)" if not hold and (rate or pull) else
            None if not hold else
            f"{odd[0]!r} is not one of {', '.join(HELD_PARTS)}" if odd else
            f"the rate {rate:g} is not in [0, 1]" if not 0 <= rate <= 1 else
            f"the pull {pull:g} is negative" if pull < 0 else
            "a pull needs a rate > 0 (a frozen part has nothing to pull back)" if pull and not rate else
            "frozen (rate 0) not with FSDP sharding (shard 'none', or a rate > 0)" if sharded and not rate else None)


def budget_mix_problem(mix: float, anchor_text: bool) -> str | None:
    """What is wrong with a budget_mix of `mix` (TrainConfig / ElastifyConfig, bench --budget-mix) with or without
    anchor text, after the option's name; None when nothing is."""
    return (f"{mix:g}: the anchor text's share of a smaller budget's rows, in [0, 1]" if not 0 <= mix <= 1 else
            "mixes the anchor's own text into the smaller budgets' batches: give anchor text (--anchor-data)"
            if mix and not anchor_text else None)


def keep_problem(keep, full_delta_rank: int, hold, hold_rate: float) -> str | None:
    """What is missing for the full budget to keep the parent's values of what `hold` names (TrainConfig /
    ElastifyConfig.full_keeps_held, bench --full-keeps-held-training): its delta and a hold that trains, without
    which there is nothing of the parent's to keep. None when nothing is (or nothing is kept)."""
    return "give --full-delta-rank, --hold and --hold-rate > 0" if keep and not (full_delta_rank and hold and
                                                                                  hold_rate) else None


RESTORE_MODES = ("", "weights", "activations")  # TrainConfig.full_delta_restore
RESTORE_BATCHES = 8  # steps' worth of rows whose inputs weight the restore ("activations")

# an option of the full budget's delta: what a negative value is told, and what the delta is to it
DELTA_OPTIONS = {"full_delta_lr": ("a rate is positive (0: the model's)", "it is the rate of"),
                 "full_delta_finish": ("a number of steps, 0 or more", "it trains")}


def delta_option_problem(option: str, value: float, full_delta_rank: int) -> str | None:
    """What is wrong with an option of the full budget's delta (DELTA_OPTIONS: its own rate, its finish), as
    TrainConfig / ElastifyConfig and the bench take it; None when nothing is."""
    negative, what = DELTA_OPTIONS[option]
    if value < 0:
        return negative
    if value and not full_delta_rank:
        return f"{what} --full-delta-rank's delta, and there is no delta: give a rank"
    return None


def stage2_weights(cfg: TrainConfig, n: int) -> list[float]:
    """Stage 2's budget weights: as given; else, with the full anchor, the budgets equally (the full model is
    in every step already, so the smaller ones share stage 2 as they share stage 1); else the paper's, tilted
    toward the full model."""
    return cfg.stage2_weights or ([1.0] * n if cfg.full_anchor else default_stage2_weights(n))


def check_config(cfg: TrainConfig, budgets: list[Budget], sharded: bool, anchor_text: bool, name=lambda field: field):
    """A one-line StarElasticError for the first option of `cfg` that is out of range or contradicts another,
    given the budgets, whether the model is sharded and whether the full anchor has text of its own
    (`anchor_rows`). `name` is what the caller calls a TrainConfig field in its messages: the field itself for
    the trainer, the flag for elastify, which checks its options here before any work."""
    n, full = len(budgets), next((i for i, b in enumerate(budgets) if b.is_full), None)
    stage2 = stage2_weights(cfg, n)
    anchor, text = name("full_anchor"), name("anchor_rows")
    with_anchor = f"it needs {anchor} > 0, the full budget 1.0 and a smaller one"
    if len({b.name for b in budgets}) != n:
        raise StarElasticError(f"budgets {', '.join(b.name for b in budgets)} name the same budget twice")
    if anchor_text and not cfg.full_anchor:
        raise StarElasticError(f"{text} is the full anchor's text: {with_anchor}")
    if not 0 < cfg.anchor_mix <= 1:
        raise StarElasticError(f"{name('anchor_mix')} {cfg.anchor_mix:g}: the anchor text's share of the anchor's "
                               "rows, in (0, 1]")
    if cfg.anchor_mix < 1 and not anchor_text:
        raise StarElasticError(f"{name('anchor_mix')} {cfg.anchor_mix:g} mixes the anchor's own text into its batch: "
                               f"give anchor text ({text})")
    why = budget_mix_problem(cfg.budget_mix, anchor_text)
    if why:
        raise StarElasticError(f"{name('budget_mix')} {why}")
    if cfg.budget_lrs is not None and (len(cfg.budget_lrs) != n or min(cfg.budget_lrs) <= 0):
        raise StarElasticError(f"{name('budget_lrs')} {', '.join(f'{v:g}' for v in cfg.budget_lrs)}: give one "
                               f"positive rate per budget ({', '.join(b.name for b in budgets)})")
    if cfg.budget_kd_weights and len(cfg.budget_kd_weights) != n:
        raise StarElasticError(f"{name('budget_kd_weights')} {', '.join(f'{v:g}' for v in cfg.budget_kd_weights)}: "
                               f"give one weight per budget ({', '.join(b.name for b in budgets)})")
    if cfg.router_estimator not in ESTIMATORS:
        raise StarElasticError(f"{name('router_estimator')} is one of {', '.join(ESTIMATORS)}, got "
                               f"{cfg.router_estimator!r}")
    if not 0 <= cfg.router_freeze_fraction < 1:
        raise StarElasticError(f"{name('router_freeze_fraction')} is a share of the steps in [0, 1), got "
                               f"{cfg.router_freeze_fraction:g}")
    if not 0 < cfg.router_baseline_rows <= 1:
        raise StarElasticError(f"{name('router_baseline_rows')} is a share of the batch's rows in (0, 1], got "
                               f"{cfg.router_baseline_rows:g}")
    if cfg.train_on not in ("drawn", "argmax"):
        raise StarElasticError(f"{name('train_on')} is 'drawn' or 'argmax', got {cfg.train_on!r}")
    if cfg.train_on == "argmax" and cfg.router_estimator != "score":
        raise StarElasticError(f"{name('train_on')} argmax needs the score-function router "
                               f"({name('router_estimator')} score): straight-through masks carry the router's gradient "
                               "through the drawn architecture")
    if cfg.budget_order not in ("even", "random"):
        raise StarElasticError(f"{name('budget_order')} is 'even' or 'random', got {cfg.budget_order!r}")
    if cfg.budget_cost not in ("drawn", "expected"):
        raise StarElasticError(f"{name('budget_cost')} is 'drawn' or 'expected', got {cfg.budget_cost!r}")
    if len(stage2) != n:
        raise StarElasticError(f"{name('stage2_weights')} {stage2} do not match {n} budgets")
    if any(w < 0 for w in stage2) or sum(stage2) <= 0:
        raise StarElasticError(f"{name('stage2_weights')} {stage2} must be non-negative and not all 0")
    if not 0 <= cfg.stage1_fraction <= 1:
        raise StarElasticError(f"{name('stage1_fraction')} must be in [0, 1], got {cfg.stage1_fraction:g}")
    if cfg.full_anchor < 0:
        raise StarElasticError(f"{anchor} is a weight >= 0, got {cfg.full_anchor:g}")
    if cfg.full_anchor and (full is None or n < 2):
        raise StarElasticError(f"{anchor} {cfg.full_anchor:g}: the full anchor needs the full budget (1.0) and at "
                               "least one smaller budget")
    if cfg.anchor_projection and not cfg.full_anchor:
        raise StarElasticError(f"{name('anchor_projection')} projects the full anchor's gradient: {with_anchor}")
    if cfg.anchor_projection and cfg.budget_lrs is not None:
        raise StarElasticError(f"{name('anchor_projection')} works on one AdamW's summed gradient: drop "
                               f"{name('budget_lrs')}")
    if cfg.full_anchor and not any(w > 0 for i, w in enumerate(stage2) if i != full):
        raise StarElasticError(f"{name('stage2_weights')} {stage2} give every step to the full budget, which the "
                               "full anchor trains on every step already: give a smaller budget a weight > 0")
    why = hold_problem(cfg.hold, cfg.hold_rate, cfg.hold_pull, sharded)
    if why:
        raise StarElasticError(f"{name('hold')} {','.join(cfg.hold or [])}: {why}")
    why = keep_problem(cfg.full_keeps_held, cfg.full_delta_rank, cfg.hold, cfg.hold_rate)
    if why:
        raise StarElasticError(f"{name('full_keeps_held')} keeps the parent's values of what {name('hold')} trains for "
                               f"the full budget beside its delta: {why}")
    rank = f"{name('full_delta_rank')} {cfg.full_delta_rank}"
    why = ("give a positive rank" if cfg.full_delta_rank < 0 else
           f"the full anchor trains it: {with_anchor}" if cfg.full_delta_rank and not cfg.full_anchor else
           f"not with {name('anchor_projection')}" if cfg.full_delta_rank and cfg.anchor_projection else None)
    if why:
        raise StarElasticError(f"{rank}: {why}")
    for option in DELTA_OPTIONS:
        why = delta_option_problem(option, getattr(cfg, option), cfg.full_delta_rank)
        if why:
            raise StarElasticError(f"{name(option)} {getattr(cfg, option):g}: {why}")
    restore = f"{name('full_delta_restore')} {cfg.full_delta_restore!r}"
    if cfg.full_delta_restore not in RESTORE_MODES:
        raise StarElasticError(f"{restore}: one of {', '.join(m for m in RESTORE_MODES if m)} (or '' for none)")
    if cfg.full_delta_restore and not cfg.full_delta_rank:
        raise StarElasticError(f"{restore} sets the full budget's delta, and there is none: give "
                               f"{name('full_delta_rank')}")
    if cfg.full_delta_bits and not cfg.full_delta_restore:
        raise StarElasticError(f"{name('full_delta_bits')} rounds the drift the delta's restore finds, and there is "
                               f"no restore: give {name('full_delta_restore')}")
    if cfg.full_delta_bits not in (0, *REST_BITS):
        raise StarElasticError(f"{name('full_delta_bits')} {cfg.full_delta_bits}: give one of "
                               f"{', '.join(map(str, REST_BITS))} (or 0: none)")
    if cfg.full_delta_allocate and not cfg.full_delta_restore:
        raise StarElasticError(f"{name('full_delta_allocate')} gives the delta's rank out where its restore finds the "
                               f"drift, and there is no restore: give {name('full_delta_restore')}")

