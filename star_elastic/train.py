"""Elastic training: the sorted parent and the budget router, trained together by distillation
from the frozen parent over several budgets (docs/METHOD.md §7-§9).

Every step: pick a budget (stage 1 uniform, stage 2 weighted toward the full model), run the student
on it and minimise KL(teacher || student) + lambda * budget loss. The full budget is the parent: its
steps run the unmasked student. A smaller budget's architecture is drawn by the router (or fixed,
for the ablation without one), and the student runs masked to it; the router learns which draws
distil better from a score-function term against its argmax architecture on the same batch (one
extra forward without gradient, skipped when the draw is the argmax). With `full_anchor` the full
model is also distilled on the same batch. The model code knows nothing of this: masks are applied
from outside it (`masked`, elastic/masking.py). The distillation losses take the models' final hidden
states and LM head weight (`head_input`) and apply the head a chunk of tokens at a time, so training
never holds the (tokens, vocab) logits of a whole batch.

Distribution is applied from outside, torchrun style: under `torch.distributed` every rank draws
the same global batch order and takes its own slice of it, all ranks sample the same budget and
architecture, and gradients are averaged over the ranks. So N ranks with batch b compute what one
process with batch N*b computes. By default (`TrainConfig.shard="auto"`) the student and the frozen
teacher are sharded with FSDP2 (star_elastic/parallel.py): each rank holds 1/N of the weights and of
the optimiser state, and gradients are reduce-scattered; the small router is replicated and its
gradient all-reduced. `shard="none"` replicates everything and all-reduces every gradient by hand.
"""

from __future__ import annotations

import functools
import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import parallel, train_state
from .data import TokenBatches
from .elastic.cost import Arch, Budget, CostModel
from .elastic.losses import (HeadInput, advantage, budget_loss, compiled_kd, drawn_cost, first_rows,
                             full_choice_loss, head_input, kd_loss, score_function_loss, task_loss)
from .elastic.router import (Projection, Router, entropy, entropy_floor_loss, full_projection,
                             larger_choice, nested_in_band, project_budgets)
from .elastic.delta import FullDelta, Restored, embeddings_and_norms, held_values, input_covariances
from .elastic.masking import masked
from .elastic.spec import ElasticSpec
from .errors import StarElasticError
from .runtime import HostCopy
from .optim import BudgetAdamW, adamw, project_conflict, put_grads, take_grads
from .evaluate import perplexity
from .model import Model
from .train_config import RESTORE_BATCHES, TrainConfig, check_config, cosine, lr_factor, stage2_weights


GOLDEN = (5 ** 0.5 - 1) / 2  # 1 / phi: the budget order's low-discrepancy sequence


def mix_rows(own: torch.Tensor, x: torch.Tensor, share: float) -> torch.Tensor:
    """`share` of the rows from `own` (the anchor's text), the rest from `x` (the step's batch)."""
    keep = round(share * x.shape[0])
    return own if keep == x.shape[0] else torch.cat([own[:keep], x[keep:]])


def init_distributed():
    """Join the process group that torchrun describes (WORLD_SIZE > 1 in the environment): NCCL
    with one GPU per rank (cuda:LOCAL_RANK), gloo on the CPU. Returns this rank's device, or None
    when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def leave_distributed():
    """Destroy the process group, then let the interpreter exit cleanly. gloo's worker threads free a
    finished collective's tensors after the caller has moved on, and freeing a tensor that Python also
    holds takes the GIL; a thread still waiting for it when the interpreter finalizes is killed inside
    C++ (std::terminate: SIGABRT after a run that had succeeded; about 1 two-rank run in 20 when the
    last collective came just before exit, torch 2.13, Python 3.11). Sleeping releases the GIL to them."""
    if dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.05)


def sharding(shard: str, world: int) -> str:
    """"fsdp" or "none", from TrainConfig.shard over `world` ranks ("auto": FSDP2 when there are 2+)."""
    if shard not in ("auto", "none", "fsdp"):
        raise StarElasticError(f"shard is 'auto', 'none' or 'fsdp', got {shard!r}")
    if shard == "auto":
        return "fsdp" if world > 1 and parallel.available() else "none"
    if shard == "fsdp" and not (parallel.available() and dist.is_initialized()):
        raise StarElasticError("shard='fsdp' needs torch.distributed initialised (torchrun) and a torch with FSDP2")
    return shard


world = parallel.world  # (rank, ranks): commands, elastify and the benchmarks import it from here


class ElasticTrainer:
    """Holds the student, the frozen teacher, the router and their optimiser; `run()` trains.

    `budgets` are ordered largest first (index 0 is the full model when it is trained).
    `rows`: packed training sequences (n, L) with L >= the longest stage's seq_len; `heldout`: a
    1-D token stream for the periodic per-budget perplexity."""

    def __init__(self, model: Model, teacher: Model, router: Router | None, budgets: list[Budget], rows: torch.Tensor,
                 cfg: TrainConfig, out_dir, heldout: torch.Tensor | None = None, cost: CostModel | None = None,
                 fixed_specs: list[ElasticSpec] | None = None, warm_start: list[ElasticSpec | None] | None = None,
                 anchor_rows: torch.Tensor | None = None):
        self.model, self.teacher, self.router, self.budgets, self.cfg = model, teacher, router, budgets, cfg
        self.out = Path(out_dir)
        self.heldout = heldout
        self.cost = cost or CostModel(model.config)
        self.rank, self.world = world()
        self.shard = sharding(cfg.shard, self.world)
        # every option checked before anything below changes the model (compiled, sharded, parts frozen)
        check_config(cfg, budgets, self.shard == "fsdp", anchor_rows is not None)
        # no router: each budget trains the fixed architecture given (the ablation of joint training alone)
        if (router is None) == (fixed_specs is None):
            raise StarElasticError("give either a router or fixed_specs (one architecture per budget), not both")
        if fixed_specs is not None and len(fixed_specs) != len(budgets):
            raise StarElasticError(f"{len(fixed_specs)} fixed architectures for {len(budgets)} budgets")
        self.fixed_specs = fixed_specs
        # per budget, an architecture chosen by quality (e.g. the zero-shot search's) that the router
        # starts from, instead of one fitted to the cost alone
        if warm_start is not None and len(warm_start) != len(budgets):
            raise StarElasticError(f"{len(warm_start)} warm-start architectures for {len(budgets)} budgets")
        self.warm_start = warm_start
        if cfg.router_prior and (router is None or warm_start is None):
            raise StarElasticError("a router prior pulls toward warm-start architectures: give warm_start "
                                   "(elastify: --router-init search) or set the prior to 0")
        # the warm starts on the router's grid, each put in half its band and nested in the larger
        # budgets' (the search ranks budgets one by one, and its choices need not nest): what the
        # router is fitted to before training and, with a prior, pulled toward all through it
        self.start_projections = None if warm_start is None or router is None else project_budgets(
            router, budgets, self.cost, cfg.loss.band / 2,
            start=[None if s is None else router.choice_of(s) for s in warm_start])
        self.prior_choices = [None if w is None or b.is_full else p.choice for w, b, p in
                              zip(warm_start, budgets, self.start_projections)] if cfg.router_prior else None
        # every step holds batch_size x seq_len tokens; stage 2 holds the same tokens in longer rows
        self.row_len = max(cfg.seq_len, cfg.stage2_seq_len or 0)
        if rows.shape[1] < self.row_len:
            raise StarElasticError(f"training rows have {rows.shape[1]} tokens, the schedule needs {self.row_len}")
        tokens = cfg.batch_size * cfg.seq_len
        if tokens % self.row_len or self.row_len % cfg.seq_len or (tokens // self.row_len) % self.world:
            raise StarElasticError(
                f"a step of {cfg.batch_size} x {cfg.seq_len} tokens does not split into whole rows of "
                f"{self.row_len} over {self.world} rank(s): make the stage-2 length a multiple of seq_len and "
                f"batch_size x seq_len a multiple of it times the ranks")
        if anchor_rows is not None and (anchor_rows.shape[1] < self.row_len or
                                        anchor_rows.shape[0] < tokens // self.row_len):
            raise StarElasticError(f"anchor text of {tuple(anchor_rows.shape)} rows x tokens: a step needs "
                                   f"{tokens // self.row_len} rows of {self.row_len} tokens")
        self.device = next(model.parameters()).device
        self.now = time.perf_counter  # the host's clock for a step's rate on the CPU (StepClock)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        teacher.eval().requires_grad_(False)
        if cfg.compile:  # compile, then shard each layer: the order torchtitan uses
            for m in (model, teacher):
                compile_layers(m, cfg.compile)
        if self.shard == "fsdp":  # before the optimiser: it is built over the sharded parameters
            mesh = parallel.device_mesh(self.device)
            mixed = self.device.type == "cuda"  # bf16 compute, fp32 master weights and reductions
            for m in (model, teacher):
                parallel.shard_model(m, mixed_precision=mixed, mesh=mesh)
                _keep_root_unsharded(m)
        # every rank draws the same global batches; each keeps its own slice (see module docstring)
        self.batches = TokenBatches(rows[:, :self.row_len], tokens // self.row_len, seed=cfg.seed)
        # the full anchor's own text (elastify --anchor-data), batches drawn on the steps it runs; None: it
        # distils on the training batch of its step
        self.anchor_batches = None
        if anchor_rows is not None:
            self.anchor_batches = TokenBatches(anchor_rows[:, :self.row_len], tokens // self.row_len, seed=cfg.seed + 3)
        self._fixed_masks: dict[int, tuple[ElasticSpec, dict]] = {}  # _spec_masks
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)  # budgets
        self.gumbel = torch.Generator().manual_seed(cfg.seed + 2)  # router noise
        slow = self._held_parts(model)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in slow], "lr": cfg.lr,
                   "base_lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if slow:  # cfg.hold at a rate: a group of its own, its schedule the model's scaled
            rate = cfg.lr * cfg.hold_rate
            groups.append({"params": list(slow.values()), "lr": rate, "base_lr": rate, "weight_decay": cfg.weight_decay})
        # cfg.hold_pull: the parent's values (taken before any resume loads trained ones) to pull them back to
        self.held = ((list(slow.values()), [p.detach().clone() for p in slow.values()])
                     if slow and cfg.hold_pull else None)
        # the model's (and held parts') groups; the delta's and the router's follow
        self.model_groups = model_groups = len(groups)
        self.delta = self._full_delta(groups)
        self.restored: Restored | None = None  # what restore_delta covered of the drift, once it ran
        # with the delta restored where training ends, the anchor's passes would train a delta that the restore
        # replaces, and nothing else (their gradient reaches the delta alone): skipped, ~40% of a step. The budget
        # sampler still leaves the full budget to the anchor (cfg.full_anchor), so the shared weights train as
        # they would beside it, bit for bit
        self.restore_only = self.delta is not None and bool(cfg.full_delta_restore)
        self.end = cfg.steps + cfg.full_delta_finish  # the last step: the delta's finish after the training's
        if router is not None:
            groups.append({"params": list(router.parameters()), "lr": cfg.router_lr, "base_lr": cfg.router_lr,
                           "weight_decay": 0.0})
        if cfg.budget_lrs is None:
            self.opt = adamw(groups)
        else:  # each budget's own moments and rate: the model's groups (the held parts' at their rate times the
            # budget's) scale their schedule per budget; the delta, which the anchor alone trains, and the router
            # keep one set of moments over every budget's gradient, as before
            scales = {f"b{i}": r / cfg.lr for i, r in enumerate(cfg.budget_lrs)}  # keys: _stash
            for group in groups[:model_groups]:
                group["scales"] = dict(scales)
            for group in groups[model_groups:]:
                group["per_budget"] = False
            self.opt = BudgetAdamW(groups, lr=cfg.lr)
        self.step = 0
        self.stage2 = stage2_weights(cfg, len(budgets))
        self.kd_weights = cfg.budget_kd_weights or [1.0] * len(budgets)
        self.full = next((i for i, b in enumerate(budgets) if b.is_full), None)
        self.selection: list[dict] = []  # what `select_architectures` measured (candidate 0: the argmax)
        # per budget, the router's draws that trained: architecture (sorted (slot, choice) pairs) -> steps
        self.arch_steps: list[dict[tuple, int]] = [{} for _ in budgets]

    # ------------------------------------------------------------------------- distribution

    @property
    def distribution(self) -> dict:
        """How this run was distributed, for the manifest (`training.parallel`)."""
        return {"ranks": self.world, "sharding": "fsdp2" if self.shard == "fsdp" else "replicated",
                "mixed_precision": "bf16 compute, fp32 master weights and reductions" if self.device.type == "cuda"
                else "fp32"}

    def peak_memory(self) -> list[float] | None:
        """Each rank's peak GPU memory so far, in GiB (a collective under torch.distributed); None on the CPU."""
        if self.device.type != "cuda":
            return None
        mine = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.world == 1:
            return [round(mine, 2)]
        every = [None] * self.world
        dist.all_gather_object(every, round(mine, 2))
        return every

    def full_model(self) -> Model:
        """The student with whole (unsharded) weights, to evaluate and save after training: the model
        itself when it is not sharded, else a plain copy gathered from the shards (a collective: every
        rank calls it and gets one)."""
        if self.shard != "fsdp":
            return self.model
        return parallel.unsharded_copy(self.model)

    # ------------------------------------------------------------------------- router warm-up

    def warm_up_router(self):
        """Fit the router to the budgets alone before the model trains, at the logit scale training
        starts with: an untrained router draws arbitrary architectures (a 1/16-wide hidden size for
        a 0.75 budget, say), and distilling through those would waste steps. Costs no model forward:
        the cost model is analytic. Each smaller budget's argmax is brought inside half its band
        while every slot keeps its entropy floor, and it stops once they all are, so training
        starts on budget with a router that can still move (one fitted at the final, sharp scale
        would be one-hot, with no gradient left). The full budget learns its anchor. With
        `warm_start` architectures (elastify: the zero-shot search's, chosen by calibration
        perplexity), the router is instead fitted to those, put in half the band."""
        if self.router is None or self.cfg.router_warmup_steps <= 0:
            return
        opt = torch.optim.Adam(self.router.parameters(), lr=self.cfg.router_lr)
        self.router.train()
        self.router.set_progress(0.0)
        band = self.cfg.loss.band
        if self.start_projections is not None:  # start at the given architectures (nested, in half the band)
            return self._fit_router_to(self.start_projections, opt)
        for _ in range(self.cfg.router_warmup_steps):
            loss, settled = 0.0, True
            for i, budget in enumerate(self.budgets):
                q = self.router.probs(i)
                if budget.is_full:
                    loss = loss + full_choice_loss(q)
                    continue
                expected = self.cost.cost(budget.kind, self.router.expected_arch(q))
                argmax = self.cost.cost(budget.kind, self.router.argmax_arch(q))
                settled = settled and abs(argmax / budget.target - 1) <= band / 2
                loss = (loss + budget_loss(drawn_cost(argmax, expected), budget, band / 2)
                        + entropy_floor_loss(q, self.cfg.entropy_floor))
            if settled:  # every argmax in half its band: stop while the router is still soft
                return
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        # a coarse grid of sizes can keep the argmaxes jumping across a band: settle them on the nearest
        # in-band nested architectures the router prefers (the same projection as after training)
        self._fit_router_to(project_budgets(self.router, self.budgets, self.cost, band / 2), opt)

    def _fit_router_to(self, projections, opt):
        """Cross-entropy steps until every budget's argmax is its projection's choice, with at least
        half the probability at the starting scale (a margin the first steps do not undo)."""
        targets = [p.choice for p in projections]
        for _ in range(self.cfg.router_warmup_steps):
            loss, settled = 0.0, True
            for i, choice in enumerate(targets):
                for name, logit in self.router.logits(i).items():
                    p = torch.softmax(logit.detach() * self.router.scale, -1)
                    if int(logit.argmax()) == choice[name] and float(p[choice[name]]) >= 0.5:
                        continue  # this slot is there: leave it as soft as it is
                    settled = False
                    loss = loss + F.cross_entropy(logit[None], torch.tensor([choice[name]], device=logit.device))
            if settled:
                return
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    # ------------------------------------------------------------------------- one step

    def stage1(self) -> bool:
        return self.step < self.cfg.stage1_fraction * self.cfg.steps

    def sample_budget(self) -> int:
        probs = torch.full((len(self.budgets),), 1.0) if self.stage1() else torch.tensor(self.stage2, dtype=torch.float)
        if self.cfg.full_anchor:  # the full model is in every step already
            probs[self.full] = 0.0
        if self.cfg.budget_order == "random":
            return int(torch.multinomial(probs, 1, generator=self.sampler))
        # "even": step i takes the budget whose slice of [0, 1) (its probability wide) holds frac(i / phi),
        # a low-discrepancy sequence: over any run of steps each budget's count is within a step or two of
        # its share, where random draws gave one budget 7% fewer steps than its share in 512 (RESULTS §9)
        u = ((self.step + 1) * GOLDEN) % 1.0
        edges = torch.cumsum(probs / probs.sum(), 0)
        return min(int((edges <= u).sum()), len(self.budgets) - 1)

    def seq_len(self) -> int:
        return self.cfg.seq_len if self.stage1() or not self.cfg.stage2_seq_len else self.cfg.stage2_seq_len

    def _ctx(self):
        return self.autocast if self.autocast is not None else torch.autocast("cpu", enabled=False)

    def _head(self, model: Model, x: torch.Tensor) -> HeadInput:
        """`model` on x up to its LM head, under the trainer's autocast (in the caller's grad mode). The
        losses apply the head a chunk of tokens at a time, so no (tokens, vocab) logits of the batch
        exist: at a 131k vocabulary those dwarf the activations (elastic/losses.py)."""
        with self._ctx():
            return head_input(model, x)

    def _batch(self, L: int, batches: TokenBatches | None = None) -> torch.Tensor:
        """This rank's share of the next global batch (of the training text, or of `batches`), as rows of
        L tokens."""
        rows = next(batches or self.batches)
        per_rank = rows.shape[0] // self.world
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank].reshape(-1, L)
        if self.device.type == "cuda":  # a copy from pageable memory first waits for the GPU's queue to drain
            return mine.pin_memory().to(self.device, non_blocking=True)
        return mine.to(self.device)

    def _spec_masks(self, b: int, spec: ElasticSpec) -> dict[str, torch.Tensor]:
        """The hard masks of budget b's fixed architecture, built once while it stays the same: building
        them copies an index tensor to the GPU for each mask, and each such copy waits for the GPU's queue
        to drain (dozens of host syncs a step, the host unable to run ahead)."""
        cached = self._fixed_masks.get(b)
        if cached is None or cached[0] is not spec:
            cached = self._fixed_masks[b] = (spec, spec.masks(self.model.config, device=self.device))
        return cached[1]

    def _decide(self, b: int, budget: Budget):
        """(masks, RouterOutput or None) of budget b for this step. The full budget is the parent:
        no masks, no router draw."""
        if budget.is_full:
            return None, None
        if self.router is None:
            return self._spec_masks(b, self.fixed_specs[b]), None
        if self.router_frozen:
            return self._spec_masks(b, self._frozen_specs()[b]), None
        # draws are held to what could be exported: nested in the larger budget's architecture as it
        # would be exported now, and (draw_in_band) in the band; otherwise the export would cut an
        # architecture that never trained (SmolLM2, H200, 2026-12-01: +57% and +83% at 0.5)
        upper = larger_choice(self.router, self.budgets, b, self.cost, self.cfg.loss.band)

        def acceptable(choice):
            return all(k <= upper[n] for n, k in choice.items()) and (not self.cfg.draw_in_band or self._off_band(
                budget, self.cost.cost(budget.kind, self.router.arch_of(choice))) == 0)

        def nearest_in_band(choice):  # no acceptable draw in 32: the nested in-band architecture nearest the last
            try:  # project_budgets' step for this budget, from the draw, under the upper already found
                return nested_in_band(self.router, self.budgets, b, choice, upper, self.cost, self.cfg.loss.band).choice
            except StarElasticError:  # the grid has none: the draw trains, and the budget loss judges it
                return choice

        decision = self.router(b, mode=self.cfg.router_mode, generator=self.gumbel, estimator=self.cfg.router_estimator,
                               accept=acceptable, fallback=nearest_in_band)
        decision.trained = decision.choice
        if self.cfg.train_on == "argmax":  # the router's own choice trains; the draw is scored only
            argmax = self.router.argmax_choice(decision.probs)
            decision.trained = argmax if acceptable(argmax) else nearest_in_band(argmax)
            if decision.trained != decision.choice:
                return {k: v.to(self.device) for k, v in self.router.hard_masks(decision.trained).items()}, decision
        return {k: v.to(self.device) for k, v in decision.masks.items()}, decision

    @property
    def router_frozen(self) -> bool:
        """In the last `router_freeze_fraction` of the steps the router no longer moves."""
        f = self.cfg.router_freeze_fraction
        return self.router is not None and f > 0 and self.step >= self.freeze_start

    def _frozen_specs(self) -> list[ElasticSpec]:
        """Each budget's architecture once the router is frozen: its argmax, projected into the band
        and nested as after training (so the architecture trained last is the one exported). At the
        first frozen step the architectures are chosen by measured distillation first
        (`select_architectures`) and the router is committed to them; a run resumed later in the
        frozen phase reads them back from the committed router."""
        if getattr(self, "_frozen", None) is None:
            if self.cfg.freeze_select and self.step == self.freeze_start:
                self._fit_router_to(self.select_architectures(), torch.optim.Adam(self.router.parameters(),
                                                                                   lr=self.cfg.router_lr))
            self.router.eval()
            self._frozen = [ElasticSpec() if b.is_full else self.router.spec_of(p.choice)
                            for b, p in zip(self.budgets, project_budgets(self.router, self.budgets, self.cost))]
        return self._frozen

    @property
    def freeze_start(self) -> int:
        return round(self.cfg.steps * (1 - self.cfg.router_freeze_fraction))

    @torch.no_grad()
    def select_architectures(self) -> list[Projection]:
        """Per budget, largest first, the in-band architecture nested in the larger budget's that
        distils best now, among the router's argmax, the warm-start architecture and
        `cfg.freeze_select` in-band draws (each projected into its band and nested). Scored by the KD
        against the teacher on the first `freeze_select_batches` training batches (fixed rows, the
        same on every rank). Why: the router's argmax can switch late in training (measured on
        SmolLM2: the worst runs switched after 70% of the steps) and a late argmax is exported after
        few steps on it; the KD of the shared weights as they are is a direct measure."""
        self.model.eval()
        per_step = self.cfg.batch_size * self.cfg.seq_len // self.row_len
        rows = self.batches.rows[:per_step * self.cfg.freeze_select_batches, :self.row_len]
        mine = rows.reshape(self.cfg.freeze_select_batches, self.world, -1, self.row_len)[:, self.rank]
        mine = mine.reshape(self.cfg.freeze_select_batches, -1, self.cfg.seq_len)
        # kept for every candidate: the teacher's final hidden states (tokens x D), not its logits
        teacher = [self._head(self.teacher, x.to(self.device)).detach() for x in mine]

        def score(choice) -> float:
            masks = {k: v.to(self.device) for k, v in self.router.hard_masks(choice).items()}
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            with masked(self.model, masks):
                for x, t in zip(mine, teacher):
                    total += kd_loss(self._head(self.model, x.to(self.device)), t).double()
            if self.world > 1:
                dist.all_reduce(total)
            return float(total)

        order = sorted(range(len(self.budgets)), key=lambda i: -self.budgets[i].fraction)
        chosen: list[Projection | None] = [None] * len(self.budgets)
        upper = self.router.full_choice()
        progress = self.router.training_progress
        for i in order:
            b = self.budgets[i]
            if b.is_full:
                chosen[i] = full_projection(self.router, b, self.cost)
                continue
            starts = [None]  # the argmax
            if self.warm_start is not None and self.warm_start[i] is not None:
                starts.append(self.router.choice_of(self.warm_start[i]))
            self.router.train()  # draws at the starting (exploring) scale: the late one is near one-hot
            self.router.set_progress(0.0)
            starts += [self.router(i, mode="hard", generator=self.gumbel).choice for _ in range(self.cfg.freeze_select)]
            self.router.set_progress(progress)
            self.router.eval()
            candidates, argmax_key = {}, None
            for s in starts:
                try:
                    p = nested_in_band(self.router, self.budgets, i, s, upper, self.cost, self.cfg.loss.band)
                except StarElasticError:
                    continue  # no in-band architecture from this start
                key = tuple(sorted(p.choice.items()))
                argmax_key = key if s is None else argmax_key
                candidates.setdefault(key, p)
            if not candidates:
                raise StarElasticError(f"budget {b.name}: no in-band architecture nested in the larger budget's")
            scores = [score(p.choice) for p in candidates.values()]
            best = min(range(len(scores)), key=scores.__getitem__)
            key, chosen[i] = list(candidates.items())[best]
            self.selection.append({"step": self.step, "budget": b.name, "kd": [round(k, 5) for k in scores],
                                   "chosen": best, "chosen_is_argmax": key == argmax_key,
                                   "cost_fraction": chosen[i].cost / b.full})
            upper = chosen[i].choice
        self.model.train()
        return chosen

    def _router_loss(self, b: int, budget: Budget, decision, logs: dict) -> torch.Tensor | None:
        """The budget loss (or, for b = 1, the anchor) and the entropy floor of the router's choice
        for budget b; logs its drawn / expected cost and per-axis entropies."""
        if self.router is None:
            return None
        if self.router_frozen:
            if not budget.is_full:
                spec = self._frozen_specs()[b]
                logs["cost_fraction"] = self.cost.cost(budget.kind, Arch.from_spec(spec, self.model.config)) / budget.full
            logs["router_frozen"] = 1.0
            return None
        w = self.cfg.loss
        if decision is None:  # the full budget: the anchor keeps its logits on the parent for blending
            logs["anchor"] = full_choice_loss(self.router.probs(b))
            return w.budget * w.anchor * logs["anchor"]
        expected = self.cost.cost(budget.kind, decision.arch)
        drawn_value = torch.as_tensor(self.cost.cost(budget.kind, decision.chosen_arch), dtype=torch.float32)
        argmax = self.cost.cost(budget.kind, self.router.argmax_arch(decision.probs))
        logs["argmax_cost_fraction"] = argmax / budget.full
        if self.cfg.budget_cost == "drawn":
            # judged twice, with the expected cost's gradient: the architecture that ran this step, and
            # the argmax, which is what gets exported (a flat distribution can draw in band around an
            # argmax that is not)
            logs["budget"] = (budget_loss(drawn_cost(drawn_value, expected), budget, w.band)
                              + budget_loss(drawn_cost(argmax, expected), budget, w.band))
        else:
            logs["budget"] = budget_loss(expected, budget, w.band)
        logs["entropy_floor"] = entropy_floor_loss(decision.probs, self.cfg.entropy_floor)
        prior = self._prior_loss(b, logs)
        logs["cost_fraction"] = float(drawn_value) / budget.full  # of the architecture that ran (host-side)
        logs["expected_cost_fraction"] = torch.as_tensor(expected).detach() / budget.full
        by_axis = {}
        for name, p in decision.probs.items():
            by_axis.setdefault(self.router.slots[name].axis, []).append(entropy(p.detach()))
        for axis, h in by_axis.items():
            logs[f"entropy.{axis}"] = sum(h) / len(h)
        return w.budget * logs["budget"] + logs["entropy_floor"] + prior

    def _prior_loss(self, b: int, logs: dict) -> torch.Tensor | float:
        """The router prior: mean cross-entropy of budget b's slot logits against its warm-start choice."""
        if not self.cfg.router_prior or self.prior_choices[b] is None:
            return 0.0
        start = self.prior_choices[b]
        logits = self.router.logits(b)
        ce = sum(F.cross_entropy(logit[None], torch.tensor([start[name]], device=logit.device))
                 for name, logit in logits.items()) / len(logits)
        logs["prior"] = ce
        return self.cfg.router_prior * ce

    def _off_band(self, budget: Budget, cost: float) -> float:
        """How far a cost is outside the budget's band, relative to its target (0 inside)."""
        return float(budget_loss(cost, budget, self.cfg.loss.band))

    def _other_kd(self, x, teacher: HeadInput, decision, logs: dict) -> torch.Tensor | None:
        """The distillation loss (no gradient) of the architecture this step does not train, on the same
        batch: with train_on "drawn", the score-function baseline, the router's argmax (scored against
        it, a draw is judged by its architecture, not by how hard the batch is); with "argmax", the
        draw, scored against the trained argmax; on the batch's first cfg.router_baseline_rows share of
        rows. None when there is no score term (or its weight is 0: the forward would be for nothing), or the
        draw is the argmax (no signal)."""
        if decision is None or decision.log_prob is None or not self.cfg.router_quality:
            return None
        scored = self.router.argmax_choice(decision.probs) if self.cfg.train_on == "drawn" else decision.choice
        logs["drawn_is_argmax"] = float(scored == decision.trained)
        if scored == decision.trained:
            logs["advantage"] = 0.0
            return None
        rows = self._baseline_rows(x)
        with torch.no_grad(), masked(self.model, {k: v.to(self.device) for k, v in self.router.hard_masks(scored).items()}):
            return kd_loss(self._head(self.model, x[:rows]), first_rows(teacher, rows))

    def _baseline_rows(self, x: torch.Tensor) -> int:
        """How many of batch x's rows (the first) the score-function term compares the two architectures on
        (cfg.router_baseline_rows; at least one)."""
        return max(1, round(self.cfg.router_baseline_rows * x.shape[0]))

    def _companions(self, b: int) -> list[int]:
        """The smaller budgets a step trains besides its sampled budget b: with `all_budgets` every other
        one (largest first), else none."""
        if not self.cfg.all_budgets:
            return []
        return [j for j, budget in enumerate(self.budgets) if j != b and not budget.is_full]

    def _budget_pass(self, b: int, x, teacher: HeadInput) -> tuple[torch.Tensor, dict]:
        """Budget b's forward and backward on batch x: its architecture (the parent's for the full
        budget; the router's draw or argmax, `train_on`; a fixed one without a router) distilled from
        the teacher's `teacher`, plus its router terms. Returns (its loss, what it logs)."""
        cfg, budget = self.cfg, self.budgets[b]
        masks, decision = self._decide(b, budget)
        if decision is not None:  # the architecture the model trains this step
            key = tuple(sorted(decision.trained.items()))
            self.arch_steps[b][key] = self.arch_steps[b].get(key, 0) + 1
        step_logs = {}
        router_loss = self._router_loss(b, budget, decision, step_logs)
        other = self._other_kd(x, teacher, decision, step_logs)
        with masked(self.model, masks or {}):
            student = self._head(self.model, x)
            losses = task_loss(student, teacher, x, replace(cfg.loss, kd=cfg.loss.kd * self.kd_weights[b]))
            total = losses["total"] + (router_loss if router_loss is not None else 0.0)
            if other is not None:  # the router's quality term: this draw against the argmax
                rows = self._baseline_rows(x)  # the trained architecture's KD on the rows the other one ran on
                trained_kd = losses["kd"] if "kd" in losses and rows == x.shape[0] else \
                    kd_loss(first_rows(student.detach(), rows), first_rows(teacher, rows))
                drawn_kd, baseline = (trained_kd, other) if cfg.train_on == "drawn" else (other, trained_kd)
                drawn_kd, baseline = self._global_mean(drawn_kd, baseline)  # the advantage of the whole batch
                a = advantage(drawn_kd, baseline) + cfg.router_band_penalty * (
                    self._off_band(budget, step_logs["cost_fraction"] * budget.full)
                    - self._off_band(budget, step_logs["argmax_cost_fraction"] * budget.full))
                step_logs.update(kd_argmax=baseline, advantage=a)
                total = total + cfg.router_quality * score_function_loss(decision.log_prob, a)
            (total / cfg.grad_accum).backward()
        del student
        self._stash(b)
        # "budget" is the budget's name in the step's log
        return total, {("budget_loss" if k == "budget" else k): v for k, v in {**losses, **step_logs}.items()}

    def _held_parts(self, model) -> dict[int, torch.nn.Parameter]:
        """cfg.hold: at rate 0 its parameters stop training here; at a rate > 0, {id: parameter} of them for
        a group of the optimiser's of its own (after the model's other parameters)."""
        cfg = self.cfg
        if not cfg.hold:
            return {}
        parts = embeddings_and_norms(model, cfg.hold)
        if cfg.hold_rate:
            return {id(p): p for p in parts}
        for p in parts:
            p.requires_grad_(False)
        return {}

    def _full_delta(self, groups: list) -> FullDelta | None:
        """cfg.full_delta_rank: the full budget's delta (elastic/delta.py), its parameters a group of the
        optimiser's after the model's (before the router's, whose group is last)."""
        cfg = self.cfg
        if not cfg.full_delta_rank:
            return None
        delta = FullDelta(self.model, cfg.full_delta_rank, seed=cfg.seed + 4, bits=cfg.full_delta_bits)
        if cfg.full_keeps_held:  # the parent's values, taken before any resume loads trained ones
            delta.keep(self.model, held_values(self.model, cfg.hold))
        lr = cfg.full_delta_lr or cfg.lr
        groups.append({"params": list(delta.parameters()), "lr": lr, "base_lr": lr, "weight_decay": 0.0,
                       "full_delta": True})
        return delta

    def restore_delta(self) -> Restored:
        """cfg.full_delta_restore: the delta set from the parent's weights and the shared ones as they are now
        (FullDelta.restore), Adam's moments of the old one dropped. Returns what it covers of the drift (also
        `self.restored`). A function of the weights and fixed calibration rows alone, so a resumed run gets the
        same delta."""
        cfg = self.cfg
        covariances = None
        if cfg.full_delta_restore == "activations":
            per_step = cfg.batch_size * cfg.seq_len // self.row_len
            n = per_step * RESTORE_BATCHES
            own = 0 if self.anchor_batches is None else round(cfg.anchor_mix * n)  # the anchor's mix of texts
            rows = self.batches.rows[:n - own]
            if own:
                rows = torch.cat([self.anchor_batches.rows[:own], rows])
            batches = (rows[i:i + per_step].to(self.device) for i in range(0, rows.shape[0], per_step))
            with eager_layers(self.teacher):
                covariances = input_covariances(self.teacher, self.delta.names, lambda x: self._head(self.teacher, x),
                                                batches, experts=self.delta.experts)
            if self.world > 1:  # the ranks' means averaged (the same rows on every rank: the same means)
                for v in covariances.values():
                    dist.all_reduce(v)
                    v /= self.world
        old = list(self.delta.parameters())
        self.restored = self.delta.restore(self.model, self.teacher, covariances, allocate=cfg.full_delta_allocate)
        for p in old:
            self.opt.state.pop(p, None)
        self.delta_to_optimizer()
        return self.restored

    def delta_to_optimizer(self):
        """The optimiser's delta group holds the delta's parameters as they are now (a restore that gave its rank
        out layer by layer, or a resume of one, made new ones)."""
        for group in self.opt.param_groups:
            if group.get("full_delta"):
                group["params"] = list(self.delta.parameters())

    def _as_full(self):
        """Where the full budget runs: with its delta, if it has one."""
        return self.delta.applied(self.model) if self.delta is not None else nullcontext()

    def train_step(self, defer: bool = False) -> "dict | StepLogs":
        """One step. Its logs as floats; `defer`: as `StepLogs`, read later (`run` reads a step's logs while
        the next one runs, so that the host never waits for the GPU to finish a step just to log it)."""
        cfg = self.cfg
        if self.step >= cfg.steps:  # past the training's steps: the delta's finish
            return self._finish_step(defer)
        b = self.sample_budget()
        budget = self.budgets[b]
        if self.router is not None and not self.router_frozen:
            self.router.set_progress(self.step / max(1, cfg.steps))
            self.router.train()
        elif self.router is not None:
            self._frozen_specs()  # fixed at the first frozen step, whichever budget it samples
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(self.step, cfg)
        self.model.train()
        L = self.seq_len()
        logs, sums = {}, {}

        def add(name, value):  # tensors stay where they are until the step's end: one host sync, not one a value
            value = value.detach().double() if torch.is_tensor(value) else float(value)
            sums[name] = sums.get(name, 0.0) + value / cfg.grad_accum

        anchor = None  # anchor_projection: the full anchor's gradient, kept apart from the smaller budgets'
        anchored = cfg.full_anchor and not budget.is_full and not self.restore_only
        for _ in range(cfg.grad_accum):
            x = plain = self._batch(L)
            if cfg.budget_mix and not budget.is_full:  # rows of the parent's own text in the budget's batch too
                x = mix_rows(self._batch(L, self.anchor_batches), plain, cfg.budget_mix)
            # the anchor's own batch copied to the GPU now, beside the step's: a copy from the host waits
            # for the GPU's queue to drain, and mid-step it would wait for the budget pass too
            own = self._batch(L, self.anchor_batches) if anchored and self.anchor_batches is not None else None
            with torch.no_grad():
                teacher = self._head(self.teacher, x)
            with compiled_kd(cfg.compile):  # the loss's chunks compiled too (None: eager)
                total, logged = self._budget_pass(b, x, teacher)
                for k, v in logged.items():
                    add(k, v)
                for j in self._companions(b):  # all_budgets: every other smaller budget on the same batch
                    t, logged = self._budget_pass(j, x, teacher)
                    total = total + t
                    for k, v in logged.items():
                        add(f"{k}@{self.budgets[j].name}", v)
                if anchored:  # the sandwich rule: the full model on the same batch, or on a batch of its own text
                    xa, ta = self._anchor_batch(plain, teacher if plain is x else None, own)
                    full_kd, anchor = self._anchor_pass(xa, ta, anchor)
                    add("full_kd", full_kd)
                    total = total + cfg.full_anchor * full_kd
            add("total", total)
        logs.update(sums)
        if self.router is not None:  # replicated: its gradient is all-reduced by hand
            logs["router_grad_norm"] = self._clip(self.router.parameters(), cfg.router_clip).detach()
        # sharded, FSDP has averaged the model's gradients already (reduce-scatter in each backward)
        reduce = self.shard != "fsdp"
        if anchor is not None:
            logs["anchor_cos"] = self._project_anchor(anchor, reduce)
            reduce = False  # averaged over the ranks there, or by FSDP

        def clip(in_step: bool = False):  # the model's gradient
            return self._clip(self.model.parameters(), cfg.clip, reduce=reduce, in_step=in_step).detach()

        if self.delta is not None:  # on its own: clipped with the model's as one norm, the anchor (which trains the
            # delta alone) scaled the smaller budgets' step whenever the clip bound (a fifth to a third of the
            # nineteenth session's logged steps). Replicated, not sharded by FSDP2: its gradient all-reduced by hand
            # (`reduce` is off only after the anchor's projection, which the delta is not run with)
            logs["delta_grad_norm"] = self._clip(self.delta.parameters(), cfg.clip).detach()

        if isinstance(self.opt, BudgetAdamW):  # each budget's gradient clipped and applied on its own
            for key in list(self.opt.stashed):
                self.opt.unstash(key)
                name = self.budgets[int(key[1:])].name  # keys are f"b{index}" (_stash)
                logs["grad_norm" + ("" if name == budget.name else f"@{name}")] = clip()
                self.opt.step(key)
                for p in self.model.parameters():  # the router's gradient stays for its one step below
                    p.grad = None
        else:
            logs["grad_norm"] = clip(in_step=self._clips_in_step())
        self.opt.step()  # BudgetAdamW: the router's group
        self.opt.grad_scale = None  # the clip's scale (_clip in_step): this step's alone (the delta's finish steps
        # clip on their own)
        self.opt.zero_grad(set_to_none=True)
        if self.held is not None:  # cfg.hold_pull: toward the parent's values, in proportion to the rate now
            params, parent = self.held
            with torch.no_grad():
                torch._foreach_lerp_(params, parent, min(1.0, self.opt.param_groups[0]["lr"] * cfg.hold_pull))
        meta = dict(step=self.step, budget=budget.name, target_fraction=budget.fraction, seq_len=L,
                    lr=self.opt.param_groups[0]["lr"])
        if self.router is not None:
            meta.update(tau=self.router.tau, scale=self.router.scale)
        if budget.is_full:
            meta["cost_fraction"] = 1.0
        self.step += 1
        out = StepLogs(logs, meta, self.world, self.device)
        return out if defer else out.result()

    def _anchor_batch(self, x, teacher: HeadInput | None, own) -> tuple[torch.Tensor, HeadInput]:
        """The full anchor's batch and its teacher: the step's (x, with `teacher` when the step has it), or
        `own` rows of the anchor text with the rest of the step's (anchor_mix)."""
        if own is not None:
            x, teacher = mix_rows(own, x, self.cfg.anchor_mix), None
        if teacher is None:
            with torch.no_grad():
                teacher = self._head(self.teacher, x)
        return x, teacher

    def _finish_step(self, defer: bool) -> "dict | StepLogs":
        """One step of the delta's finish (cfg.full_delta_finish): the full budget distilled on the anchor's
        batch, its delta alone trained (the other groups at rate 0, and no gradient reaches them), at the
        delta's rate on a cosine from it to min_lr_ratio x it over the finish."""
        cfg = self.cfg
        factor = cosine((self.step - cfg.steps) / max(1, cfg.full_delta_finish), cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * factor if group.get("full_delta") else 0.0
        self.model.train()
        L = self.seq_len()
        only = list(self.delta.parameters())
        total = 0.0
        for _ in range(cfg.grad_accum):
            x = self._batch(L)
            own = self._batch(L, self.anchor_batches) if self.anchor_batches is not None else None
            xa, ta = self._anchor_batch(x, None, own)
            with compiled_kd(cfg.compile), self._as_full():
                full_kd = kd_loss(self._head(self.model, xa), ta)
            (full_kd / cfg.grad_accum).backward(inputs=only)
            total = total + full_kd.detach().double() / cfg.grad_accum
        logs = {"kd": total, "full_kd": total, "total": total,
                "delta_grad_norm": self._clip(only, cfg.clip).detach()}  # replicated: all-reduced, sharded or not
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        meta = dict(step=self.step, budget=self.budgets[self.full].name, target_fraction=1.0, seq_len=L,
                    lr=next(g["lr"] for g in self.opt.param_groups if g.get("full_delta")), phase="full_delta_finish",
                    cost_fraction=1.0)
        self.step += 1
        out = StepLogs(logs, meta, self.world, self.device)
        return out if defer else out.result()

    def _anchor_pass(self, x, teacher: HeadInput, anchor: list | None) -> tuple[torch.Tensor, list | None]:
        """The full anchor's forward and backward on batch x (the unmasked parent, weight `full_anchor`).
        With `anchor_projection` its gradient is kept apart from the smaller budgets', added to `anchor`
        (the step's so far), for `_project_anchor`. Returns (its distillation loss, `anchor`)."""
        cfg = self.cfg
        # right after their backward, as _stash does: taken after the anchor's forward, under FSDP2 the
        # root module's gradients (embeddings, final norm, head) were missing from them
        theirs = take_grads(self.model.parameters()) if cfg.anchor_projection else None
        with self._as_full():
            student = self._head(self.model, x)
        full_kd = kd_loss(student, teacher)
        # with the full budget's delta, the anchor trains it alone: no gradient reaches the shared weights
        only = list(self.delta.parameters()) if self.delta is not None else None
        (cfg.full_anchor * full_kd / cfg.grad_accum).backward(inputs=only)
        if only is None:  # a delta's gradient is stepped with one set of moments, not the full budget's
            self._stash(self.full)
        if theirs is not None:
            anchor = take_grads(self.model.parameters(), add_to=anchor)
            put_grads(self.model.parameters(), theirs)
        return full_kd, anchor

    def _project_anchor(self, anchor: list, reduce: bool) -> torch.Tensor:
        """Project the step's anchor gradient off the smaller budgets' on the model (optim.project_conflict)
        and add it to theirs; returns the cosine before. Replicated (`reduce`), both are averaged over the
        ranks first, so that the projection sees the whole batch's gradients, as one process would."""
        smaller = [p.grad for p in self.model.parameters()]
        if reduce:
            self._all_reduce_grads(smaller + anchor)
        cos = project_conflict(anchor, smaller, dist.all_reduce if self.shard == "fsdp" and self.world > 1 else None)
        put_grads(self.model.parameters(), anchor, add=True)
        return cos

    def _stash(self, b: int):
        """With BudgetAdamW, set budget b's gradients (its backward's, just run) apart from the others'."""
        if isinstance(self.opt, BudgetAdamW):
            self.opt.stash(f"b{b}")

    def _global_mean(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Scalars averaged over the ranks (each rank's share of the batch is the same size), detached:
        what one process holding the whole batch would compute. Under one process, as they are."""
        if self.world == 1:
            return tuple(v.detach() for v in values)
        t = torch.stack([v.detach().float().reshape(()) for v in values])
        dist.all_reduce(t)
        return tuple(t / self.world)

    def _clip(self, params, max_norm: float, reduce: bool = True, in_step: bool = False) -> torch.Tensor:
        """All-reduce (under torchrun, with `reduce`) and clip the gradients of `params`; their norm
        before clipping. Sharded gradients (DTensors) are clipped by their global norm: the norm of
        the whole gradient over all ranks, the same on every rank.

        `in_step` (the model's gradient, where `_clips_in_step`): the clip left to the fused AdamW kernel,
        which divides every gradient by its `grad_scale` (what GradScaler unscales with) as it reads it, here
        1 / clip_grad_norm_'s coefficient. That saves clip_grad_norm_'s pass over the model's gradients, each
        read and written once more: 10 ms of the compiled step's 183 at Nano width (H100, sixtieth session). The
        other groups' gradients (the router's and the delta's, each clipped on its own) are multiplied by the
        scale first, so that they come out as they were; they are small. The same update as clipping first, to
        fp32 rounding (tests/test_train.py)."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros(())
        if reduce:
            self._all_reduce_grads([p.grad for p in params])
        if not in_step:
            return parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).float()  # clip_grad_norm_'s coefficient, inverted
        others = [p.grad for g in self.opt.param_groups[self.model_groups:] for p in g["params"] if p.grad is not None]
        if others:
            torch._foreach_mul_(others, scale)
        self.opt.grad_scale = scale
        return norm

    def _clips_in_step(self) -> bool:
        """Whether the model's gradient clip can be left to the optimiser's fused kernel (`_clip`'s `in_step`):
        torch's fused AdamW over plain (not FSDP2-sharded) tensors."""
        return (type(self.opt) is torch.optim.AdamW and self.shard != "fsdp"
                and all(g.get("fused") for g in self.opt.param_groups))

    def _all_reduce_grads(self, grads):
        grads = [g for g in grads if g is not None]
        if self.world == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out perplexity of each budget's argmax architecture (masked in the parent)."""
        if self.heldout is None:
            return {}
        self.model.eval()
        if self.router is not None:
            self.router.eval()
        out = {}
        for i, budget in enumerate(self.budgets):
            spec = (self.fixed_specs[i] if self.router is None else self._frozen_specs()[i] if self.router_frozen
                    else self.router.spec(i))
            with (masked(self.model, spec.masks(self.model.config, device=self.device)), self._ctx(),
                  self._as_full() if budget.is_full else nullcontext()):
                r = perplexity(self.model, self.heldout, seq_len=self.cfg.seq_len, batch_size=4,
                               max_tokens=self.cfg.eval_tokens, progress=False, device=self.device)
            out[budget.name] = {"perplexity": r["perplexity"], "params": spec.num_parameters(self.model.config)}
        return out

    # ------------------------------------------------------------------------- checkpoints

    def state_path(self) -> Path:
        return self.out / "train_state"

    def save_state(self):
        """Everything a resumed run needs, written atomically (train_state.py)."""
        train_state.save(self)

    def load_state(self) -> bool:
        """Resume from `out_dir/train_state` if it exists; True when resumed (train_state.py)."""
        return train_state.load(self)

    def state_bytes(self) -> int:
        return train_state.size(self)

    def room_for_state(self) -> bool:
        return train_state.room_for(self)

    def trained_share(self, b: int, choice: dict[str, int]) -> float | None:
        """The share of budget b's router-drawn steps that trained `choice` (e.g. the exported
        architecture): low when the router settled late on what is exported, or the export moved it
        (SmolLM2 seed 0, H200: its 0.5 settled at 70% of the run and finished 17% behind separate
        distillation). None when the router drew nothing for b (the full budget, fixed architectures)."""
        total = sum(self.arch_steps[b].values())
        return self.arch_steps[b].get(tuple(sorted(choice.items())), 0) / total if total else None

    # ------------------------------------------------------------------------- the loop

    def run(self, progress: bool = True, stop_after: int | None = None, save: bool = True) -> list[dict]:
        """Train to `cfg.steps` (or `stop_after` more steps, for tests of resuming); metrics go to
        `out_dir/metrics.jsonl` (and TensorBoard when installed). Returns this call's step logs. With
        `cfg.compile`, the layers are plain again once training is over (or has failed). The state is
        saved at the end and after `stop_after` steps; `save=False` leaves that to the caller (a bench that
        reads its clock more often than it saves)."""
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.jsonl"
        writer = _tensorboard(self.out) if self.rank == 0 else None
        end = self.end if stop_after is None else min(self.end, self.step + stop_after)
        bar = tqdm(total=end, initial=self.step, desc="elastic training", unit="step",
                   disable=not progress or self.rank != 0 or bool(os.environ.get("STAR_ELASTIC_QUIET")))
        per_budget = {}
        if self.step == 0:
            self.warm_up_router()
        failed = True
        try:
            logs = self._loop(end, bar, per_budget, metrics, writer)
            failed = False
        finally:  # TensorBoard writes from a thread: close it, or it writes on after the run (into a removed dir)
            bar.close()
            if writer is not None:
                writer.close()
            if self.cfg.compile and (failed or self.step >= self.end):  # training over: what evaluates
                for m in (self.model, self.teacher):                          # and exports runs plain layers
                    compile_layers(m, None)
        if save and (self.step >= self.end or stop_after is not None):
            if stop_after is not None or self.room_for_state():
                self.save_state()
        return logs

    def _loop(self, end: int, bar, per_budget: dict, metrics: Path, writer) -> list[dict]:
        logs, queued = [], None
        clock = StepClock(self.device, self.now)
        since = clock.mark()
        while self.step < end:
            step = self.train_step(defer=True), clock.mark()  # the mark: behind the step's work
            if self.step == self.cfg.steps and self.cfg.full_delta_restore:  # training over: set the delta
                self.restore_delta()
            if queued is not None:  # the step before, read while this one runs on the device
                since = self._record(*queued, since, clock, bar, per_budget, metrics, writer, logs)
            queued = step
            if (self.step >= end or self.cfg.eval_every and self.step % self.cfg.eval_every == 0
                    or self.cfg.save_every and self.step % self.cfg.save_every == 0):
                # evaluating or saving: at this step's weights, with nothing queued behind it
                since = self._record(*queued, since, clock, bar, per_budget, metrics, writer, logs)
                queued = None
        return logs

    def _record(self, step: "StepLogs", done, since, clock: "StepClock", bar, per_budget: dict, metrics: Path,
                writer, logs: list):
        """A step's logs to the bar, the metrics file and TensorBoard, with its evaluation and saved state
        when they are due (`_loop` reads those steps at once). Its rate is over the time from the end of
        the step before (`since`) to its own end (`done`), both marks of `clock`; returns the mark the next
        step's time starts from."""
        log = step.result()
        n = log["step"] + 1  # steps done once this one is (self.step may be one further: _loop reads late)
        per_budget[log["budget"]] = log["kd"] if "kd" in log else log["total"]
        bar.set_postfix({f"kd@{k}": f"{v:.3f}" for k, v in per_budget.items()})
        bar.update(1)
        log["tokens_per_s"] = (self.cfg.batch_size * self.cfg.grad_accum * log["seq_len"]) / max(
            1e-9, clock.seconds(since, done))
        since = done
        if self.cfg.eval_every and n % self.cfg.eval_every == 0 and n < self.cfg.steps:
            log["eval"] = self.evaluate()
        logs.append(log)
        if self.rank == 0 and n % self.cfg.log_every == 0:
            with metrics.open("a") as f:
                f.write(json.dumps(log) + "\n")
            if writer is not None:
                for k, v in log.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(f"train/{k}", v, n)
        saving = bool(self.cfg.save_every and n % self.cfg.save_every == 0)
        if saving:
            self.save_state()
        if "eval" in log or saving:
            since = clock.mark()  # the next step's time leaves out the evaluation's and the save's
        return since


@contextmanager
def eager_layers(model: Model):
    """Inside: `model`'s compiled layers (compile_layers) run eagerly, e.g. under hooks that a graph would not
    run; after, compiled again, with the graphs they had."""
    saved = [vars(layer).pop("_compiled_call_impl", None) for layer in model.model.layers]
    try:
        yield model
    finally:
        for layer, call in zip(model.model.layers, saved):
            if call is not None:
                vars(layer)["_compiled_call_impl"] = call


def compile_layers(model: Model, backend: str | None = "inductor") -> Model:
    """torch.compile each decoder layer in place (parameter names unchanged; `backend=None` undoes it).
    Per layer, not the whole model, so that the graphs are small and shared by every layer of a kind,
    and what varies between budgets (masks are hooks and class swaps of a layer's modules,
    elastic/masking.py) costs a few recompiles, not one graph per architecture: the masks' values are
    graph inputs. The Triton scan (kernels.py) stays outside the graphs."""
    if backend is not None and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise StarElasticError(f"unknown torch.compile backend {backend!r} (e.g. 'inductor'; None: eager)")
    # layers of one kind share the code they run; each masked / unmasked variant of each kind is a
    # graph, more than the default 8 for a hybrid model
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.model.layers:
        if backend is None:
            vars(layer).pop("_compiled_call_impl", None)  # what nn.Module.compile sets
        else:
            layer.compile(backend=backend)
    return model


class _HiddenOnly(torch.nn.Module):
    """A decoder layer called with the hidden states alone: the one tensor argument that
    `torch.cuda.make_graphed_callables` captures with."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class GraphedLayer(torch.nn.Module):
    """A layer's graphed callable in the layer's place, under the layer's own parameter names (its modules,
    parameters and buffers are this module's, so the model's state dict reads as before and saves as a
    checkpoint); the callable is held outside the module tree. `Model.forward` passes rope, cache and pos,
    which a Mamba layer does not read in training (no cache)."""

    def __init__(self, layer, graphed):
        super().__init__()
        self._modules, self._parameters, self._buffers = layer._modules, layer._parameters, layer._buffers
        self.kind = layer.kind
        self.graphed = (graphed,)  # a tuple: not a submodule, so not a second name for the same weights

    def forward(self, x, rope=None, cache=None, pos=None):
        return self.graphed[0](x)


def graph_mamba_layers(model: Model, hidden_shape, dtype, backend: str | None = "inductor", graph=None,
                       inside: str = "compiled") -> Model:
    """Plain training on a GPU with the Mamba layers' host work gone: every layer of `model` compiled in place
    (compile_layers), then the Mamba layers each captured whole, forward and backward, in CUDA graphs
    (`torch.cuda.make_graphed_callables`, all in one call so that they share one memory pool); the graph replays
    what the host launched once, where the scan's Triton launches and the code around them cost ~40 ms of CPU a
    step at 539M (docs/RESULTS.md §2: 1.56x transformers-with-kernels in one run, `bench_speed --graphed-mamba`).
    For plain training only: captured in training mode at one hidden-states shape (`hidden_shape`: batch, seq,
    hidden; every step must have it), with no masks (a masked layer's hooks are not graph inputs) and no cache.
    `inside`: "compiled" (the capture's warm-up compiles the layers, their fused kernels captured) or "eager";
    `graph`: the capture (default make_graphed_callables; tests pass a stand-in)."""
    if inside not in ("compiled", "eager"):
        raise ValueError(f"inside: 'compiled' or 'eager', not {inside!r}")
    # allow_unused_input: a parameter that no output reads (none in a plain Mamba layer) is not an error
    graph = graph or functools.partial(torch.cuda.make_graphed_callables, allow_unused_input=True)
    compile_layers(model, backend).train()  # captured in the mode it trains in: a graphed module called in the
    # other mode runs its forward uncaptured
    mamba = [i for i, layer in enumerate(model.model.layers) if getattr(layer, "kind", None) == "M"]
    device = model.lm_head.weight.device
    wrapped = []
    for i in mamba:
        layer = model.model.layers[i]
        if inside == "eager":
            vars(layer).pop("_compiled_call_impl", None)
        wrapped.append(_HiddenOnly(layer))
    samples = tuple((torch.randn(hidden_shape, device=device, dtype=dtype, requires_grad=True),) for _ in mamba)
    graphed = graph(tuple(wrapped), samples) if mamba else ()
    for i, g in zip(mamba, graphed):
        model.model.layers[i] = GraphedLayer(model.model.layers[i], g)
    return model


class StepClock:
    """When a step's work ended, for its rate. On a GPU an event recorded on the stream behind the step's
    kernels, read when the step is: the host's clock at that read would give a step read right after the
    one before (at a save or an evaluation, or where a step waits on its own work) the time of neither.
    On the CPU a step's work is done when `train_step` returns: the host's clock (`now`) then."""

    def __init__(self, device: torch.device, now=time.perf_counter):
        self.cuda, self.now = device.type == "cuda", now

    def mark(self):
        if not self.cuda:
            return self.now()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


class StepLogs:
    """A step's logs, its tensors read to the host later (`result`). On a GPU they are stacked (averaged over
    the ranks) and copied to the host at once (`HostCopy`): reading them after the next step is queued does
    not wait for that step too, as `.tolist()` would."""

    def __init__(self, logs: dict, meta: dict, world: int, device: torch.device):
        self.meta, self.world = meta, world
        self.values = None
        if device.type != "cuda":
            self.logs = logs
            return
        # values off the GPU are read now (no wait); across ranks every value is averaged, as on the CPU
        self.logs = {k: v.item() if torch.is_tensor(v) and not v.is_cuda else v for k, v in logs.items()}
        self.keys = [k for k, v in self.logs.items() if torch.is_tensor(v) or world > 1]
        if self.keys:
            stacked = torch.stack([self.logs[k].reshape(()).double() if torch.is_tensor(self.logs[k]) else
                                   torch.full((), float(self.logs[k]), dtype=torch.float64, device=device)
                                   for k in self.keys])
            if world > 1:  # queued now, in the same order on every rank
                dist.all_reduce(stacked)
                stacked /= world
            self.values = HostCopy(stacked)

    def result(self) -> dict:
        """The logs as floats, with the step's own fields (step, budget, lr, ...)."""
        if self.values is not None:
            out = {**self.logs, **dict(zip(self.keys, self.values.tolist()))}
        else:
            out = _floats(self.logs)
            if self.world > 1:  # report the mean over ranks, so every rank logs the same numbers
                t = torch.tensor([out[k] for k in sorted(out)], dtype=torch.float64)
                dist.all_reduce(t)
                out = dict(zip(sorted(out), (t / self.world).tolist()))
        return {**out, **self.meta}


def _floats(logs: dict) -> dict:
    """The step's logs with every tensor made a float, in one transfer per device: on a GPU one host
    sync for the step instead of one for each logged value. Every tensor is whole (`_clip` gathers
    the norms it returns)."""
    out = dict(logs)
    by_device: dict[torch.device, list[str]] = {}
    for k, v in logs.items():
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():
        out.update(zip(keys, torch.stack([logs[k].reshape(()).double() for k in keys]).tolist()))
    return out


def _keep_root_unsharded(module):
    """`head_input` reads the LM head's weight after the forward and the loss uses it whole, so a
    sharded (FSDP2) root must not reshard after its forward: the student's reshards in its backward,
    a frozen teacher's (no backward) stays gathered, the embeddings and head whole on every rank."""
    if not parallel.is_sharded(module):
        return
    if not hasattr(module, "set_reshard_after_forward"):
        raise StarElasticError("this torch's FSDP2 has no set_reshard_after_forward, which the fused distillation "
                               "loss (head_input) needs to keep the sharded root whole until the backward: use a "
                               "newer torch, or shard='none'")
    module.set_reshard_after_forward(False, recurse=False)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))

