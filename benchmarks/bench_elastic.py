"""Elastic training against zero-shot slicing and Minitron-style distillation (issue 4, item 8).

Equal total training tokens T for every trained method; budgets are fractions of the parent's
total parameters (default 1.0 / 0.75 / 0.5); every row is scored on the same held-out tokens.

(a) zero-shot: the importance-sorted parent, each budget the homogeneous prefix that
    `search.choose_spec` picks (no training);
(b) elastic:   ONE run of T tokens (ElasticTrainer: budget router + sorted parent, forward KL from
    the frozen sorted parent) serving every budget; each budget is the router's argmax spec,
    sliced out of the trained parent (and, as a check, also scored masked inside it); variants
    (`--variants`): `elastic` the paper's budget sampling, `elastic_anchor` the full model distilled
    on every step beside one smaller budget (elastify's default), `elastic_small`, `joint_fixed`,
    `joint_anchor` (the last two without a router, on (c)'s architectures);
(c) Minitron:  each smaller budget on its own: the (a) architecture sliced from the sorted parent,
    distilled from the frozen parent (forward KL, plain AdamW loop, same lr, schedule, batch,
    sequence length and batch order as (b)) for T / (number of smaller budgets) tokens each;
plus the untouched parent for the 100% budget, and (a@b): the architectures the router chose in
(b), cut from the untrained sorted parent (no training), to separate what the router's choice of
architecture gives from what training gives. `--minitron-arch elastic` makes (c) distil those
architectures instead of choose_spec's.

Part A: SmolLM2-135M parent (the GGUF of star_elastic.assets), trained on the wiki train split.
Part B: a hybrid Mamba / attention / MoE NemotronH parent pretrained here on the wiki train split
        (bench_zero_shot.py --moe's model and loop, imported), REAP-sorted experts (its budgets drop
        experts: the router axes include "experts").
Held-out: the wiki held-out split (primary) and the shakespeare held-out split.

GPU: bf16 autocast with fp32 master weights (ElasticTrainer; the same here for (c)), teacher in
bf16; perplexity in fp32. Seeded everywhere; on a GPU deterministic algorithms are requested
(warn-only). The JSON is rewritten after every stage, so a run cut short keeps what it finished;
with `--state-dir` a (b) run cut short (or stopped by `--max-train-seconds` or `--call-seconds`, exit 75)
goes on from its saved state when the same command runs again.

    python benchmarks/bench_elastic.py --part A --json docs/results/elastic_smollm2_h100.json  # one GPU
    python benchmarks/bench_elastic.py --part B --json docs/results/elastic_moe_h100.json       # one GPU
    python benchmarks/bench_elastic.py --smoke                                        # CPU, both parts, tiny

Sizes: T = 4,194,304 tokens per part (512 steps of 16 x 512; (c) 256 steps per smaller budget), on
the ~0.96M-token wiki train split (about 4.4 epochs for (b)); held-out 65,536 tokens per source.
Progress lines give tokens/s and the time left of every training run; scale with --tokens-a/-b.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

STARTED = time.perf_counter()  # --call-seconds counts from here: before torch's import, which takes seconds
import warnings  # noqa: E402
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.utils.deterministic
from safetensors.torch import load_file

import bench_zero_shot as zs  # noqa: E402  (MoE parent: config, initialisation, pretraining loop)
import common  # noqa: E402

from star_elastic import load, load_tokenizer  # noqa: E402
from star_elastic.assets import smollm2_gguf  # noqa: E402
from star_elastic.data import TokenBatches, load_corpus_tokens, pack  # noqa: E402
from star_elastic.elastic import ElasticSpec, slice_model, sort_model  # noqa: E402
from star_elastic.elastic.cost import CostModel, parse_budget  # noqa: E402
from star_elastic.elastic.delta import held_values  # noqa: E402
from star_elastic.elastic.importance import estimate_importance, load_scores, save_scores  # noqa: E402
from star_elastic.elastic.losses import kd_loss  # noqa: E402
from star_elastic.elastic.router import DEFAULT_AXES, Router, RouterConfig, project_budgets  # noqa: E402
from star_elastic.commands import restore_mode  # noqa: E402
from star_elastic.elastify import (ANCHOR_SELF_TOKENS, CHAT_QUESTIONS, SAMPLED, ElastifyConfig, anchor_text,  # noqa: E402
                                   chat_transcripts, parse_anchor_data)
from star_elastic.elastic.search import applicable_axes, choose_spec, describe, nested_search, search_spec  # noqa: E402
from star_elastic.errors import StarElasticError  # noqa: E402
from star_elastic.evaluate import answer_scores, answer_tokens, perplexity  # noqa: E402
from star_elastic.model import Model  # noqa: E402
from star_elastic.runtime import comma_list  # noqa: E402
from star_elastic.train_state import saved_anchor_rows  # noqa: E402
from star_elastic.train import ElasticTrainer, adamw, compile_layers, mix_rows  # noqa: E402
from star_elastic.train_config import (  # noqa: E402
    DELTA_OPTIONS, TrainConfig, budget_mix_problem, delta_option_problem, hold_problem, keep_problem, lr_factor)

METHODS = ("zero_shot", "elastic", "minitron")
VARIANTS = ("elastic", "elastic_small", "elastic_anchor", "joint_fixed", "joint_anchor")
FIXED = ("joint_fixed", "joint_anchor")  # no router: (c)'s architectures, trained jointly
ANCHORED = ("elastic_anchor", "joint_anchor")  # the full model distilled on every step
ANCHOR_ROWS: dict[tuple, torch.Tensor] = {}  # --anchor-data's rows, sampled from the parent once a process
LABELS = {"parent": "parent", "zero_shot": "(a) zero-shot", "elastic": "(b) elastic", "minitron": "(c) Minitron",
          "elastic_anchor": "(b+) anchored", "elastic_small": "(b*) small-weighted", "joint_fixed": "(b') fixed arch",
          "joint_anchor": "(b'+) fixed, anchored",
          "zero_shot_elastic_arch": "(a@b) zero-shot"}


def thin_log(logs: list[dict], keep: int = 60) -> list[dict]:
    """About `keep` step logs of each budget (and of the delta's finish), in step order, evaluations left out.
    Each budget thinned along its own steps: every n-th step of the run (the forty-seventh session's stride 34
    of 2,048) is a Fibonacci stride under the trainer's golden-ratio budget order, which lands on one budget for
    hundreds of steps, so the 0.5 was logged only in the first half of the run and the 0.75 only in the second."""
    groups: dict[tuple, list[dict]] = {}
    for lg in logs:
        groups.setdefault((lg.get("budget"), lg.get("phase")), []).append(lg)
    kept = [lg for g in groups.values() for lg in g[::max(1, len(g) // keep)]]
    return [{k: v for k, v in lg.items() if k != "eval"} for lg in sorted(kept, key=lambda lg: lg["step"])]


def weights(text: str) -> list[float]:
    """--stage2-weights, --kd-weights, --small-weights: comma-separated numbers (checked as flags are read)."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights are comma-separated numbers, got {text!r}") from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["A", "B", "all"], default="all",
                    help="A: SmolLM2-135M; B: pretrained MoE hybrid; all: both (one GPU: run them separately)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings that run on the CPU in a few minutes")
    ap.add_argument("--device", help="default: cuda when available")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict-determinism", action="store_true",
                    help="on a GPU, deterministic algorithms strictly, not warn-only: SDPA then leaves its cuDNN "
                         "backend, whose backward is not deterministic (the one warning of the twenty-first "
                         "session's runs, whose like-for-like smaller budgets differed by up to 3 points), and any "
                         "other op without a deterministic kernel stops the run")
    ap.add_argument("--json", help="write the results here (rewritten after every stage)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: SmolLM2's, read from its GGUF)")
    ap.add_argument("--model", help="(A) parent checkpoint directory or GGUF (default: the SmolLM2-135M GGUF)")
    ap.add_argument("--train-data", default="wiki", help="its train split trains (and calibrates) every method")
    ap.add_argument("--heldout", default="wiki,shakespeare,bible,wiki-fr",
                    help="held-out splits scored, comma-separated corpora/files (the first is the primary); "
                         "'chat': the parent's own greedy answers to elastify's chat questions, scored on the "
                         "answers' tokens (a tokenizer with a chat template)")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens scored per model and source")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--calib-batches", type=int, default=64, help="calibration batches for importance")
    ap.add_argument("--calib-batch-size", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--budgets", default="1.0,0.75,0.5", help="parameter budgets (fractions of the parent's total)")
    ap.add_argument("--axes", default=",".join(DEFAULT_AXES),
                    help="elastic axes of the router and of choose_spec (those a parent lacks are skipped)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per training step, (b) and (c)")
    ap.add_argument("--seq-len", type=int, default=512, help="training sequence length, (b) and (c)")
    ap.add_argument("--router-lr", type=float, default=1e-2)
    ap.add_argument("--tokens-a", type=int, default=4_194_304, help="(A) T: training tokens of (b), and of (c) in all")
    ap.add_argument("--lr-a", type=float, default=1e-4, help="(A) model learning rate of (b) and (c)")
    ap.add_argument("--minitron-lrs", metavar="LR,LR,...",
                    help="(c) at its best: distil each budget once per learning rate and keep the one with the lowest "
                         "perplexity on the first held-out source (each try recorded); default: (c) at --lr-a/--lr-b")
    ap.add_argument("--tokens-b", type=int, default=4_194_304, help="(B) T")
    ap.add_argument("--lr-b", type=float, default=3e-4, help="(B) model learning rate of (b) and (c)")
    ap.add_argument("--variants", default="elastic,elastic_anchor,joint_fixed",
                    help="trained one-run methods: elastic (router, the paper's sampling), elastic_small (router, "
                         "stage 2 weighted toward the smaller budgets: --small-weights), elastic_anchor (router, the "
                         "full model distilled every step: elastify's default), joint_fixed (no router: (c)'s architectures), "
                         "joint_anchor (no router, (c)'s architectures, the full model on every step: what sharing "
                         "weights with the full model costs each budget, the router left out)")
    ap.add_argument("--warm-start", type=int, default=1,
                    help="1: the router starts from (a)'s architectures (as elastify does); 0: from the cost alone")
    ap.add_argument("--router-estimator", choices=["score", "straight-through"], default="score",
                    help="how distillation reaches the router (TrainConfig.router_estimator)")
    ap.add_argument("--all-budgets", action="store_true",
                    help="one-run variants: every step trains every smaller budget on the same batch "
                         "(TrainConfig.all_budgets; with the anchor, the sandwich rule in full)")
    ap.add_argument("--anchor-projection", action="store_true",
                    help="anchored variants: the full anchor's gradient loses its component along the smaller "
                         "budgets' where the two conflict (TrainConfig.anchor_projection)")
    ap.add_argument("--full-delta-rank", type=int, default=0, metavar="R",
                    help="anchored variants: the full budget gets a rank-R delta of its own on every linear layer, "
                         "which the anchor alone trains, leaving the shared weights to the smaller budgets; the "
                         "full budget is evaluated merged (TrainConfig.full_delta_rank)")
    ap.add_argument("--full-delta-lr", type=float, default=0.0, metavar="LR",
                    help="with --full-delta-rank: the delta's own learning rate (default 0: the model's; "
                         "TrainConfig.full_delta_lr)")
    ap.add_argument("--full-delta-finish", type=int, default=0, metavar="STEPS",
                    help="with --full-delta-rank: STEPS more steps after training that train the delta alone, the "
                         "shared weights fixed (TrainConfig.full_delta_finish; their tokens are the full budget's "
                         "alone, beside T)")
    ap.add_argument("--full-delta-restore", choices=("weights", "activations"), default="",
                    help="with --full-delta-rank: where training ends, the delta set in closed form to the rank-r part "
                         "of the parent's linear weights less the shared ones (TrainConfig.full_delta_restore)")
    ap.add_argument("--full-delta-allocate", action="store_true",
                    help="with --full-delta-restore: its rank's parameters given out layer by layer where the drift "
                         "is (TrainConfig.full_delta_allocate)")
    ap.add_argument("--full-delta-bits", type=int, choices=(0, 1, 2, 4, 8), default=0,
                    help="with --full-delta-restore: the rest of each linear layer's drift past rank r rounded to "
                         "this many bits a weight (TrainConfig.full_delta_bits)")
    ap.add_argument("--hold", metavar="PARTS", type=comma_list,
                    help="anchored variants: hold these at or near the parent's values in every budget, "
                         "comma-separated: embeddings (with the LM head), norms, mamba, gates (TrainConfig.hold; frozen unless "
                         "--hold-rate)")
    ap.add_argument("--hold-rate", type=float, default=0.0, metavar="F",
                    help="with --hold: what it names trains at F times every rate (TrainConfig.hold_rate; default 0: "
                         "frozen)")
    ap.add_argument("--hold-pull", type=float, default=0.0, metavar="L",
                    help="with --hold-rate: each step pulls what --hold names back toward the parent's values by L "
                         "times the rate (TrainConfig.hold_pull, L2-SP)")
    ap.add_argument("--full-keeps-held-training", action="store_true",
                    help="with --full-delta-rank and --hold at a rate: the full budget runs the parent's values of what "
                         "--hold names from the first step (TrainConfig.full_keeps_held; elastify --full-keeps-held "
                         "training), so its row is that model; without it the row trains beside the shared values "
                         "and full_keeps_held scores them put back after training")
    ap.add_argument("--freeze-embeddings-norms", dest="hold", action="store_const", const=["embeddings", "norms"],
                    help="--hold embeddings,norms (the sixteenth and seventeenth sessions' runs)")
    ap.add_argument("--anchor-data", metavar="self[:TOKENS]|chat[:TOKENS]|self+chat[:TOKENS]",
                    help="anchored variants: the full anchor distils on text sampled from the parent (elastify "
                         "--anchor-data self, or chat: conversations opening with the tokenizer's chat template; "
                         "1M tokens unless given), not on the step's training batch")
    ap.add_argument("--anchor-cache", metavar="DIR",
                    help="keep the anchor's sampled text in DIR, keyed by the parent's weights, the seed and the "
                         "anchor's settings: later runs of the same parent read it instead of sampling again (a "
                         "minute or two a run on a GPU, and on CUDA other text each time); with --heldout chat, the "
                         "parent's chat answers too")
    ap.add_argument("--anchor-mix", type=float, default=1.0, metavar="F",
                    help="with --anchor-data: the share of the anchor's rows from that text, the rest from the "
                         "step's training batch (TrainConfig.anchor_mix)")
    ap.add_argument("--budget-mix", type=float, default=0.0, metavar="F",
                    help="with --anchor-data: the share of each smaller budget's rows from that text too, in the "
                         "anchored variants and in (c) alike, so that the comparison stays like for like "
                         "(TrainConfig.budget_mix; 0: the training text alone)")
    ap.add_argument("--train-on", choices=["drawn", "argmax"], default="drawn",
                    help="router variants: the model trains the router's draw (the paper's) or its in-band argmax, "
                         "the draw then only scored for the router (TrainConfig.train_on)")
    ap.add_argument("--router-freeze", type=float, default=0.0,
                    help="the last share of the steps trains each budget's in-band argmax, the router fixed")
    ap.add_argument("--freeze-select", type=int, default=8,
                    help="with --router-freeze: router draws among which each budget's frozen architecture is "
                         "chosen by measured KD (0: the router's argmax)")
    ap.add_argument("--router-prior", type=float, default=0.0,
                    help="weight of the pull of each smaller budget's router toward (a)'s architecture, all through "
                         "training (TrainConfig.router_prior; needs --warm-start 1)")
    ap.add_argument("--small-weights", type=weights, default="0.2,0.4,0.4", help="stage-2 budget weights of elastic_small")
    ap.add_argument("--no-minitron", action="store_true", help="skip (c) (e.g. when another GPU runs it: --merge)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="merge the rows of these result files (the same parts, run on several GPUs) into --json")
    ap.add_argument("--full-anchor", type=float, default=ElastifyConfig.full_anchor,
                    help="weight of the full model's KD in elastic_anchor and joint_anchor (default: elastify's, "
                         "%(default)g; runs before the twelfth session used 1)")
    ap.add_argument("--stage1-fraction", type=float, default=0.5,
                    help="share of the steps with budgets drawn uniformly (TrainConfig.stage1_fraction; 0 with "
                         "--stage2-weights 0,1 and budgets 1.0,0.75 trains the 0.75 alone: the harness against (c))")
    ap.add_argument("--stage2-weights", type=weights, metavar="W,W,...",
                    help="stage-2 budget weights (budget order, the full one first) of every variant but "
                         "elastic_small (TrainConfig.stage2_weights; anchored variants never draw the full one)")
    ap.add_argument("--kd-weights", type=weights, metavar="W,W,...",
                    help="per-budget distillation weights (budget order) of every one-run variant "
                         "(TrainConfig.budget_kd_weights; default all 1)")
    ap.add_argument("--budget-lrs", type=weights, metavar="LR,LR,...",
                    help="per-budget model learning rates (budget order) of every one-run variant: each budget's "
                         "gradient gets its own AdamW moments and rate, as if distilled alone (TrainConfig.budget_lrs; "
                         "default: one AdamW at --lr-a/--lr-b)")
    ap.add_argument("--zero-shot", choices=["search", "shrink"], default="search",
                    help="(a): the best homogeneous architecture over axis combinations by calibration "
                         "perplexity (search), or choose_spec's combined shrink of all axes")
    ap.add_argument("--minitron-arch", default="search", metavar="search|elastic|nested|RESULT.json",
                    help="(c) distils (a)'s searched architecture (search), the one the router chose in (b) of this "
                         "run (elastic: the elastic variant's if it ran, else the first variant's), the router's nested starts (nested: the architectures a --router-prior run "
                         "holds, so (c) can run beside it on another GPU), or the (b) architectures recorded in an earlier result file of the same "
                         "part and seed (the like-for-like check when (b) and (c) do not fit in one process; "
                         "RESULT.json:VARIANT takes another variant's, e.g. :elastic_anchor; BUNDLE.json#RUN one run of a "
                         "session's bundle in docs/results)")
    ap.add_argument("--state-dir", metavar="DIR",
                    help="keep each one-run method's resumable training state under DIR, so that the same command "
                         "run again goes on where a stopped or killed call left it (removed once its rows are in)")
    ap.add_argument("--max-train-seconds", type=float, metavar="S",
                    help="with --state-dir: stop training before a tenth of the steps that would end past S "
                         "seconds of this call (at the pace of the last tenth; at least one tenth a call), and exit "
                         "75 (run the same command again to go on)")
    ap.add_argument("--call-seconds", type=float, metavar="S",
                    help="with --state-dir: this process must be done S seconds after it started (a device call's "
                         "limit, less a margin): training goes on while the run can still finish and be scored "
                         "inside S, else while one more stretch of steps (a fortieth of the run) and the state's save "
                         "fit with a stretch to spare, then the state is saved and it exits 75")
    ap.add_argument("--compile", action="store_true",
                    help="every training loop, (b) and (c), with its layers under torch.compile (TrainConfig.compile)")
    ap.add_argument("--max-docs", type=int, help="first N documents of each corpus only (quick runs)")
    # (B) the parent and its pretraining (bench_zero_shot.py --moe's defaults)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--pretrain-batch-size", type=int, default=16)
    ap.add_argument("--pretrain-seq-len", type=int, default=512)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--pattern", default="ME*EMEME", help="layer types (M Mamba, E MoE, * attention, - MLP)")
    ap.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=256)
    ap.add_argument("--balance-rate", type=float, default=1e-3, help="aux-loss-free balancing during pretraining")
    ap.add_argument("--parent-b", metavar="FILE.safetensors",
                    help="B's pretrained parent from FILE if it is there, else pretrained and written there: runs in "
                         "other processes (a resumed call, (c) run apart) then distil the same parent, where a GPU's "
                         "pretraining is not the same run to run")
    if ap.parse_known_args(argv)[0].smoke:  # every code path at tiny sizes; explicit flags still win
        ap.set_defaults(max_docs=300, eval_tokens=256, eval_seq_len=128, calib_batches=2, calib_batch_size=2,
                        calib_seq_len=64, batch_size=2, seq_len=64, tokens_a=512, tokens_b=2048, lr_b=1e-3,
                        pretrain_steps=30, pretrain_batch_size=4, pretrain_seq_len=64, pretrain_lr=3e-3,
                        hidden=64, pattern="ME*E", experts=8, top_k=2, expert_ffn=64)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- helpers

clock = common.clock


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def scores(model, heldouts: dict, args, reference=None) -> dict:
    """Per held-out source, fp32 (no autocast), evaluate's result: its "perplexity", and with a `reference`
    (the parent) the parent's KL from the model ("kl_from_reference", nats a scored position)."""
    model.eval()
    return {name: answer_scores(model, stream, reference=reference) if isinstance(stream, list) else
            perplexity(model, stream, seq_len=args.eval_seq_len, batch_size=args.eval_batch_size,
                       progress=False, reference=reference) for name, stream in heldouts.items()}


def score(model, heldouts: dict, args) -> dict:
    """Held-out perplexity per source, fp32 (no autocast)."""
    return {name: got["perplexity"] for name, got in scores(model, heldouts, args).items()}


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 1e5 else f"{v:.3g}"


def determinism() -> str:
    """The deterministic-algorithms mode this process runs in: strict, warn-only or off."""
    if not torch.are_deterministic_algorithms_enabled():
        return "off"
    return "warn-only" if torch.is_deterministic_algorithms_warn_only_enabled() else "strict"


@contextlib.contextmanager
def sampling_determinism():
    """Strict determinism relaxed to warn-only while the parent samples text, and held to account: strict mode
    made sampling 12x slower on the GPU (389 s for 1M tokens against about 30 s, twenty-second session). Any op
    that warns of a non-deterministic kernel meanwhile stops the run. That is not yet enough: two strict runs
    of the twenty-third session, no warning raised, sampled different anchor text (their full budgets' KD
    parted at the first step while the smaller budgets trained bit for bit alike); each run prints its anchor
    text's fingerprint, and benchmarks/check_sampling.py looks for the kernel."""
    if determinism() != "strict":
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=False)
    loose = [str(w.message).splitlines()[0] for w in caught if "determinis" in str(w.message)]
    for w in caught:  # the others shown as they would have been
        if "determinis" not in str(w.message):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if loose:
        raise SystemExit(f"--strict-determinism: sampling the anchor text ran an op without a deterministic "
                         f"kernel: {loose[0]}")


class Results:
    """The result dict, written to --json after every stage."""

    def __init__(self, args, device, argv):
        self.args = args
        self.t0 = time.perf_counter()
        self.data = {"benchmark": "bench_elastic", "date": datetime.date.today().isoformat(),
                     "machine": common.machine(device), "torch": torch.__version__, "seed": args.seed,
                     "smoke": args.smoke, "deterministic": determinism(),
                     "command": "python benchmarks/bench_elastic.py " + " ".join(sys.argv[1:] if argv is None else argv)}

    def save(self):
        self.data["seconds"] = round(time.perf_counter() - self.t0, 1)
        if self.args.json:
            common.write_json(self.args.json, self.data)


def recorded_elastic_specs(path: str, part_name: str, seed: int, smaller) -> dict:
    """budget name -> the (b) architecture of that budget in an earlier bench_elastic result file.
    `path` may end in `:VARIANT` (e.g. `B.json:elastic_anchor`) to take another one-run method's rows,
    and name one run of a bundle of runs with `#RUN` (`BUNDLE.json#E0:elastic_anchor`)."""
    method, run = "elastic", None
    head, _, tail = path.rpartition(":")
    if head and tail in VARIANTS:
        path, method = head, tail
    if "#" in path:  # BUNDLE.json#RUN: one run of a session's bundle (docs/results/elastic_session9_h200.json)
        path, run = path.rsplit("#", 1)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise StarElasticError(f"--minitron-arch {path}: cannot read a result file ({e})") from None
    if run is not None:
        if run not in data.get("runs", {}):
            raise StarElasticError(f"--minitron-arch {path}: no run {run!r} in its 'runs' "
                                   f"(has: {', '.join(data.get('runs', {})) or 'none'})")
        data = data["runs"][run]
    if data.get("seed") != seed:
        raise StarElasticError(f"--minitron-arch {path}: that run used seed {data.get('seed')}, this one {seed} "
                               "(the seed draws the held-out text, so the rows would not compare)")
    rows = (data.get(part_name) or {}).get("rows", [])
    found = {r["budget"]: ElasticSpec.from_dict(r["spec"]) for r in rows if r.get("method") == method}
    missing = [b.name for b in smaller if b.name not in found]
    if missing:
        raise StarElasticError(f"--minitron-arch {path}: no {method} row of part {part_name} for budget(s) "
                               f"{', '.join(missing)}")
    return {b.name: found[b.name] for b in smaller}


def heldout_streams(tokenizer, args, primary_heldout: torch.Tensor | None = None) -> dict:
    """name -> the first --eval-tokens tokens of that corpus' held-out split (the same for every row)."""
    out = {}
    for name in (n.strip() for n in args.heldout.split(",") if n.strip()):
        if name == "chat":  # the parent's own chat answers: filled in by with_chat once the parent is ready
            out[name] = None
            continue
        if name == args.train_data and primary_heldout is not None:
            stream = primary_heldout
        else:
            stream = load_corpus_tokens(name, tokenizer, seed=args.seed, max_docs=args.max_docs)[1]
        out[name] = stream[:args.eval_tokens]
    return out


def with_chat(heldouts: dict, parent, tokenizer, args=None) -> dict:
    """--heldout chat: the parent's greedy answers to elastify's chat questions (elastify.chat_transcripts),
    scored on the answers' tokens like the other sources (the full budget's chat drift, each budget's chat).
    With --anchor-cache they are kept there beside the anchor's text: answering takes most of a call's setup
    (40 s on the CPU, a device call's 50-60 s on an H100 with three runs side by side), and every call of a
    resumed run, and every run of the machine, scores the same answers."""
    if "chat" in heldouts:
        key = ("chat", CHAT_QUESTIONS, getattr(tokenizer, "chat_template", None))
        cached = anchor_cache_file(args, key, parent, prefix="chat") if args is not None else None

        def read(f):
            got = load_file(str(f))
            print(f"  the parent's chat answers from {f}", flush=True)
            return [(got[f"ids{i}"], int(start)) for i, start in enumerate(got["starts"].tolist())]

        def answer():
            with sampling_determinism():  # generation, forward-only, like the anchor's sampling
                return chat_transcripts(parent, tokenizer)

        def write(f, transcripts):
            if transcripts is not None:  # (none: refused below, nothing kept)
                common.write_safetensors(f, {"starts": torch.tensor([start for _, start in transcripts]),
                                             **{f"ids{i}": ids.contiguous() for i, (ids, _) in enumerate(transcripts)}})

        heldouts["chat"] = made_once(cached, read, answer, write)
        if heldouts["chat"] is None:
            raise SystemExit("--heldout chat: the parent answers through its tokenizer's chat template, and this "
                             "tokenizer has none")
    return heldouts


def heldout_record(heldouts: dict) -> dict:
    """What a part records of its held-out sources: the tokens scored per source (a chat source: its answers'
    tokens) and each one's fingerprint (compare_elastic refuses runs that read different text)."""
    return {"heldout": {k: answer_tokens(v) if isinstance(v, list) else int(v.numel()) for k, v in heldouts.items()},
            "heldout_sha": {k: common.fingerprint(v) for k, v in heldouts.items()}}


def importance_and_sort(model, train: torch.Tensor, args, device) -> tuple[dict, list[torch.Tensor]]:
    """Importance on the calibration batches and the sort; (what was done, the batches). With --anchor-cache
    the scores are kept there under the parent's weights and the batches (11-12 s of every device call of a
    resumed 16M run), and a later call of the same parent sorts by them."""
    t = clock(device)
    batches = zs.calibration(train, args)
    cached = anchor_cache_file(args, ("importance", tuple(common.fingerprint(b) for b in batches)), model,
                               prefix="importance")

    def read(f):
        print(f"  importance from {f}", flush=True)
        return load_scores(f)

    scores = made_once(cached, read, lambda: estimate_importance(model, batches, progress=False),
                       lambda f, got: save_scores(got, f))
    sort_model(model, scores, experts_key="experts")  # experts by REAP; every permutation function-preserving
    return {"data": f"{args.train_data} (train split)", "batches": len(batches), "batch_size": args.calib_batch_size,
            "seq_len": args.calib_seq_len, "tokens": sum(b.numel() for b in batches),
            "experts_ranked_by": "REAP" if any(k.endswith(".experts") for k in scores) else None,
            "seconds": round(clock(device) - t, 1)}, batches


# ----------------------------------------------------------------------------- (c) the plain distillation loop

def minitron_lrs(args, lr: float) -> list[float]:
    """(c)'s learning rates: --minitron-lrs, or the part's one rate."""
    if not args.minitron_lrs:
        return [lr]
    try:
        lrs = [float(x) for x in args.minitron_lrs.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--minitron-lrs: not a list of numbers: {args.minitron_lrs!r}") from None
    if not lrs or min(lrs) <= 0:
        raise SystemExit(f"--minitron-lrs: learning rates must be positive: {args.minitron_lrs!r}")
    return lrs


def distil(student, teacher, rows: torch.Tensor, steps: int, lr: float, args, device, label: str,
           mix: tuple[torch.Tensor, float] | None = None) -> dict:
    """Forward KL from the frozen teacher, AdamW (betas 0.9/0.95, no weight decay), warmup + cosine
    and clipping exactly as ElasticTrainer (TrainConfig defaults, lr_factor), bf16 autocast on a GPU
    with fp32 master weights; batches in the order ElasticTrainer draws them (same seed). `mix`: (anchor
    rows, share): that share of each batch's rows from the anchor's text, the rest its own as without it
    (TrainConfig.budget_mix; a stream of its own over the same rows as the elastic run's)."""
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
                      warmup_steps=max(1, steps // 20), seed=args.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = adamw(params, lr=lr, weight_decay=cfg.weight_decay)
    batches = TokenBatches(rows, cfg.batch_size, seed=cfg.seed)
    own = None if mix is None else TokenBatches(mix[0][:, :cfg.seq_len], cfg.batch_size, seed=cfg.seed + 3)
    teacher.eval()
    student.train()
    log, window = [], []
    t0 = clock(device)
    every = max(1, steps // 5)
    backend = "inductor" if args.compile else None  # as (b)'s trainer does (TrainConfig.compile); undone below
    for m in (student, teacher):
        compile_layers(m, backend)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, cfg)
        x = next(batches)[:, :cfg.seq_len].to(device)
        if own is not None:
            x = mix_rows(next(own).to(device), x, mix[1])
        with torch.no_grad(), autocast(device):
            t_logits = teacher(x)
        with autocast(device):
            s_logits = student(x)
        loss = kd_loss(s_logits, t_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == steps:
            el = clock(device) - t0
            tok_s = (step + 1) * x.numel() / el
            log.append({"step": step + 1, "kd": sum(window) / len(window), "seconds": round(el, 1),
                        "tokens_per_s": round(tok_s)})
            print(f"    {label} step {step + 1:5d}/{steps}  kd {log[-1]['kd']:.4f}  {tok_s:,.0f} tok/s  "
                  f"{el:.0f} s, ~{(steps - step - 1) * x.numel() / tok_s:.0f} s to go", flush=True)
            window = []
    for m in (student, teacher):
        compile_layers(m, None)
    student.eval()
    return {"steps": steps, "tokens": steps * cfg.batch_size * cfg.seq_len, "seconds": round(clock(device) - t0, 1),
            "log": log}


# ----------------------------------------------------------------------------- the comparison

def compare(parent, sorted_parent, train: torch.Tensor, heldouts: dict, T: int, lr: float, args, device,
            part: dict, save, calibration: list[torch.Tensor], tokenizer) -> None:
    """(a), (b), (c) on `sorted_parent` (fp32, trained by nobody: every method copies it) into part["rows"];
    (a)'s search scores its candidates on the importance `calibration` batches (the first 8). `tokenizer`:
    the part's (its chat template opens --anchor-data chat's rows)."""
    cfg = sorted_parent.config
    total = sorted_parent.num_parameters()
    budgets = sorted((parse_budget(b, cfg) for b in args.budgets.split(",")), key=lambda b: -b.fraction)
    axes = tuple(a for a in args.axes.split(",") if a in applicable_axes(cfg))
    smaller = [b for b in budgets if not b.is_full]
    rows = pack(train, args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    steps_b = max(1, T // tokens_per_step)
    steps_c = max(1, T // max(1, len(smaller)) // tokens_per_step)
    part.update(budgets=[b.name for b in budgets], axes=list(axes), training={
        "data": f"{args.train_data} (train split)", "train_tokens_available": int(train.numel()),
        "T": steps_b * tokens_per_step, "elastic_steps": steps_b,
        "minitron_steps_per_budget": steps_c, "minitron_tokens_per_budget": steps_c * tokens_per_step,
        "epochs_elastic": round(steps_b * tokens_per_step / train.numel(), 2),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": lr, "router_lr": args.router_lr,
        "minitron_arch": args.minitron_arch,
        "schedule": "linear warmup (steps/20) + cosine to 0.1 x lr; AdamW betas (0.9, 0.95), no weight decay, clip 1.0",
        "precision": "bf16 autocast, fp32 master weights, bf16 teacher" if device.type == "cuda" else "fp32",
        "compiled": bool(args.compile)})
    part["rows"] = out = []
    part["methods"] = methods = {}

    def row(method, budget, model, spec, ppl, tokens, **extra):
        n = model.num_parameters() if model is not None else spec.num_parameters(cfg)
        r = {"method": method, "budget": budget.name, "target_fraction": budget.fraction, "params": n,
             "param_fraction": n / total, "architecture": describe(spec, cfg), "spec": spec.to_dict(),
             "training_tokens": tokens, "perplexity": ppl, **extra}
        out.append(r)
        print(f"  {LABELS[method]:15s} {budget.name:>5s}  {n:>12,} params ({n / total:6.1%})  "
              + "  ".join(f"{k} {fmt(v)}" for k, v in ppl.items()) + f"   [{r['architecture']}]", flush=True)
        save()

    # the untouched parent
    ppl, seconds = cached_score(parent, heldouts, args)
    row("parent", budgets[0], parent, ElasticSpec(), ppl, 0)
    part["parent_eval_seconds"] = round(seconds, 1)  # the scoring's, when read back from --anchor-cache too

    # (a) zero-shot
    t = clock(device)
    specs, searched = {}, {}
    calib = [x.to(device) for x in calibration[:8]]
    for b in budgets:
        if args.zero_shot == "search" and not b.is_full and calib:
            spec, records = search_spec(sorted_parent, int(b.target), axes, calib)
            searched[b.name] = records
        else:
            spec = ElasticSpec() if b.is_full else choose_spec(cfg, int(b.target), axes)
        specs[b.name] = spec
        small = slice_model(sorted_parent, spec)
        row("zero_shot", b, small, spec, cached_score(small, heldouts, args)[0], 0)
        del small
    # the router's start (elastify's): (a)'s architectures made to nest (search.nested_search)
    searched_smaller = [b for b in budgets if not b.is_full and b.name in searched]
    nested_starts, nested_plans = {}, []
    if searched_smaller:
        got, _ = nested_search(sorted_parent, [int(b.target) for b in searched_smaller],
                               [searched[b.name] for b in searched_smaller], axes, calib, plans=nested_plans)
        nested_starts = {b.name: s for b, s in zip(searched_smaller, got)}
    part["zero_shot_search"] = {"rule": args.zero_shot, "calibration_batches": len(calib), "candidates": searched,
                                "nested_starts": {k: v.to_dict() for k, v in nested_starts.items()},
                                "nested_plans": nested_plans}
    methods["zero_shot"] = {"tokens": 0, "seconds": round(clock(device) - t, 1),
                            "note": "slicing + evaluation; no training (importance calibration shared by all)"}
    save()

    teacher = copy.deepcopy(sorted_parent).eval().requires_grad_(False)
    if device.type == "cuda":
        teacher.to(torch.bfloat16)

    # (c)'s architectures where they are known before (b) runs (recorded in a file, or the nested starts):
    # the fixed-architecture variants train the same ones, so (b'+) against (c) is like for like
    c_specs = dict(specs)
    if args.minitron_arch == "nested":
        c_specs.update(nested_starts)
    elif args.minitron_arch not in ("search", "elastic"):
        c_specs.update(recorded_elastic_specs(args.minitron_arch, part["part"], args.seed, smaller))

    # (b) one run of T tokens for every budget, in each variant asked for
    elastic_specs = None
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            raise StarElasticError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        got = one_run(variant, sorted_parent, teacher, budgets, rows, heldouts, c_specs if variant in FIXED else specs,
                      steps_b, lr, args, device,
                      row, methods, tokens_per_step, nested_starts, tokenizer, save=save,
                      parent_eval_s=part["parent_eval_seconds"])
        if variant not in FIXED and (elastic_specs is None or variant == "elastic"):  # the router's choice
            elastic_specs = got
    # (a@b) the router's architectures cut from the untrained sorted parent: how much of (b) is architecture
    for b in smaller:
        if elastic_specs is None:
            break
        small = slice_model(sorted_parent, elastic_specs[b.name])
        row("zero_shot_elastic_arch", b, small, elastic_specs[b.name], score(small, heldouts, args), 0)
        del small
    save()
    specs = elastic_specs if args.minitron_arch == "elastic" and elastic_specs is not None else c_specs

    # (c) Minitron-style: each smaller budget alone, T / len(smaller) tokens
    methods["minitron"] = {"tokens": 0, "train_seconds": 0.0, "per_budget": {}}
    mix = None  # --budget-mix: (c) distils on the same share of the parent's own text as (b)'s smaller budgets
    if args.budget_mix and not args.no_minitron and smaller:
        # (b)'s steps: the key of (b)'s text, so that (c) reads the same rows
        mix_rows_c, sha = anchor_text_rows(args, teacher, tokenizer, rows.shape[1], tokens_per_step, steps_b)
        mix = (mix_rows_c, args.budget_mix)
        methods["minitron"].update(budget_mix=args.budget_mix, anchor_data=args.anchor_data, anchor_sha=sha)
    for b in budgets:
        if b.is_full or args.no_minitron:
            continue
        print(f"(c) Minitron {b.name}: {steps_c} steps = {steps_c * tokens_per_step:,} tokens", flush=True)
        best, sweep, seconds, first = None, {}, 0.0, next(iter(heldouts))
        for lr_c in minitron_lrs(args, lr):  # one, or the sweep: (c) at its best learning rate
            torch.manual_seed(args.seed)
            small = slice_model(sorted_parent, specs[b.name])
            info = distil(small, teacher, rows, steps_c, lr_c, args, device, label=f"minitron {b.name} lr {lr_c:g}",
                          mix=mix)
            t = clock(device)
            ppl = score(small, heldouts, args)
            info.update(lr=lr_c, eval_seconds=round(clock(device) - t, 1))
            sweep[f"{lr_c:g}"] = ppl
            seconds += info["seconds"]
            if best is None or ppl[first] < best[1][first]:
                best = (info, ppl, small)
            del small
        info, ppl, small = best
        if len(sweep) > 1:
            info["lr_sweep"] = sweep  # held-out perplexity of each try; the row is the best on the first source
            print(f"(c) Minitron {b.name}: learning rate {info['lr']:g} of {', '.join(sweep)} is the best on "
                  f"{first}", flush=True)
        row("minitron", b, small, specs[b.name], ppl, info["tokens"], lr=info["lr"])
        m = methods["minitron"]
        m["per_budget"][b.name] = info
        m["tokens"] += info["tokens"]  # the chosen try's: every try trains on the same T / budgets tokens
        m["train_seconds"] = round(m["train_seconds"] + seconds, 1)
        del small, best
        save()
    del teacher
    part["table"] = table(part)
    save()


def one_run(variant, sorted_parent, teacher, budgets, rows, heldouts, specs, steps, lr, args, device, row, methods,
            tokens_per_step, nested_starts: dict, tokenizer, save=lambda: None, parent_eval_s: float = 0.0) -> dict:
    """One training run of `steps` serving every budget: `elastic` (router, the paper's budget
    sampling, the full budget = the unmasked parent), `elastic_small` (the same, stage 2 weighted
    toward the smaller budgets), `elastic_anchor` (router; every step distils a
    sampled smaller budget and the full model on the same batch), `joint_fixed` (no router: each
    budget trains (c)'s architecture; what joint training does without architecture search),
    `joint_anchor` (joint_fixed with the full model on every step: what sharing weights costs a budget).
    Rows per budget; returns the specs it ended with. `parent_eval_s`: the parent's scoring time, from
    which --call-seconds keeps room for this run's scores."""
    cfg = sorted_parent.config
    print(f"({LABELS[variant]}): {steps} steps of {args.batch_size} x {args.seq_len} = {steps * tokens_per_step:,} "
          f"tokens, budgets {', '.join(b.name for b in budgets)}", flush=True)
    torch.manual_seed(args.seed)
    student = copy.deepcopy(sorted_parent)
    axes = tuple(a for a in args.axes.split(",") if a in applicable_axes(cfg))
    router = None if variant in FIXED else Router(cfg, budgets, RouterConfig(axes=axes)).to(device)
    fixed = [specs[b.name] for b in budgets] if router is None else None
    tcfg = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
                       router_lr=args.router_lr, warmup_steps=max(1, steps // 20), seed=args.seed,
                       full_anchor=args.full_anchor if variant in ANCHORED else 0.0,
                       router_estimator=args.router_estimator, router_freeze_fraction=args.router_freeze,
                       train_on=args.train_on, all_budgets=args.all_budgets,
                       anchor_projection=args.anchor_projection and variant in ANCHORED,
                       full_delta_rank=args.full_delta_rank if variant in ANCHORED else 0,
                       full_delta_lr=args.full_delta_lr if variant in ANCHORED else 0.0,
                       full_delta_finish=args.full_delta_finish if variant in ANCHORED else 0,
                       full_delta_restore=args.full_delta_restore if variant in ANCHORED else "",
                       full_delta_allocate=args.full_delta_allocate and variant in ANCHORED,
                       full_delta_bits=args.full_delta_bits if variant in ANCHORED else 0,
                       hold=args.hold if variant in ANCHORED else None,
                       hold_rate=args.hold_rate if variant in ANCHORED else 0.0,
                       hold_pull=args.hold_pull if variant in ANCHORED else 0.0,
                       full_keeps_held=args.full_keeps_held_training and variant in ANCHORED,
                       anchor_mix=args.anchor_mix if args.anchor_data and variant in ANCHORED else 1.0,
                       budget_mix=args.budget_mix if args.anchor_data and variant in ANCHORED else 0.0,
                       freeze_select=args.freeze_select,
                       router_prior=args.router_prior if router is not None and args.warm_start else 0.0,
                       stage2_weights=args.small_weights if variant == "elastic_small"
                       else args.stage2_weights, budget_kd_weights=args.kd_weights,
                       budget_lrs=args.budget_lrs, stage1_fraction=args.stage1_fraction,
                       compile="inductor" if args.compile else None)
    tmp = tempfile.TemporaryDirectory(prefix="bench_elastic_")  # metrics.jsonl of ElasticTrainer.run
    # with --state-dir the run keeps its resumable state there, so a run longer than one device call
    # goes on where the last call stopped (--max-train-seconds, or a kill: at most a tenth is redone)
    state = Path(args.state_dir) / f"{variant}-seed{args.seed}-{steps}steps" if args.state_dir else None
    warm = None
    if router is not None and args.warm_start:  # (a)'s architectures, nested (elastify's start)
        warm = [None if b.is_full else nested_starts.get(b.name, specs[b.name]) for b in budgets]
        print("  router starts from " + "; ".join(f"{b.name}: {describe(w, cfg)}" for b, w in zip(budgets, warm)
                                                  if w is not None), flush=True)
    anchor_rows, anchor_sha = None, None
    saved = saved_anchor_rows(state) if state is not None and args.anchor_data and variant in ANCHORED else None
    if saved is not None:  # a resumed call reads the interrupted one's rows (a new sample differs on CUDA)
        anchor_rows = saved
        anchor_sha = common.fingerprint(anchor_rows)
        print(f"  anchor text of the interrupted call, fingerprint {anchor_sha}", flush=True)
    elif args.anchor_data and variant in ANCHORED:
        anchor_rows, anchor_sha = anchor_text_rows(args, teacher, tokenizer, rows.shape[1], tokens_per_step, steps)
    # a delta beside a hold that trains: the parent's held values, in the student's precision before it trains,
    # for the full model that `elastify --full-keeps-held` writes (scored as "full_keeps_held")
    # (kept from the first step instead, tcfg.full_keeps_held, the full row itself is that model)
    parents_held = held_values(student, tcfg.hold) if tcfg.full_delta_rank and tcfg.hold and tcfg.hold_rate and \
        not tcfg.full_keeps_held else None
    trainer = ElasticTrainer(student, teacher, router, budgets, rows, tcfg, out_dir=state or tmp.name,
                             fixed_specs=fixed, warm_start=warm, anchor_rows=anchor_rows)
    if state is None:
        trainer.save_state = lambda: None  # no resumable state: it would write the weights and AdamW moments
    logs, trajectory, earlier_s = resume(trainer, state)  # all empty unless an earlier call left a state
    start = trainer.step
    t = clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    every, last_el = max(1, steps // 10), 0.0
    stretch = max(1, every // 4)  # --call-seconds reads the clock this often (a tenth's state is saved at its end)
    # the scores that follow the training: the parent's evaluation time per model scored, a budget each and four
    # more for the full one (without its delta, with the parent's rest, with the held values, against the teacher)
    score_s = 1.5 * parent_eval_s * (len(budgets) + 4)
    save_s, step_s = None, None  # the state's save (timed at each tenth's end), a step's time
    print(f"  {clock(device) - STARTED:.0f} s of this process before its first step", flush=True)
    full_name = next((b.name for b in budgets if b.is_full), None)  # its KD on the anchor's rows, when anchored
    # trajectory: each smaller budget's argmax architecture after every tenth: when did it settle?

    def stop(el: float, why: str, saved: bool = False):  # the state saved, exit 75: the same command goes on
        if not saved:  # (saved: the tenth's end has just written the state and bench.json)
            trainer.save_state()
            common.write_json(state / "bench.json", {"trajectory": trajectory, "seconds": earlier_s + el,
                                                     "step": trainer.step})
        print(f"  stopped at step {trainer.step}/{trainer.end} after {el:.0f} s ({why}); the same command goes on "
              f"from here (state in {state})", flush=True)
        raise SystemExit(RESUME_EXIT)

    while trainer.step < trainer.end:  # the package's loop (ElasticTrainer.run), a tenth at a time
        # (then the delta's finish, --full-delta-finish), in stretches of a quarter tenth
        tenth_end = min(trainer.end, (trainer.step // every + 1) * every)
        while trainer.step < tenth_end:
            n, s0 = min(stretch, tenth_end - trainer.step), clock(device)
            restoring = bool(tcfg.full_delta_restore) and trainer.step < steps <= trainer.step + n
            logs += trainer.run(progress=False, stop_after=n, save=False)
            if not restoring or step_s is None:  # the pace of training, not of the delta's restore
                step_s = (clock(device) - s0) / n
            if state is None or args.call_seconds is None or trainer.step >= trainer.end:
                continue
            # the delta's restore (where the elastic steps end) is guessed at two tenths' time, the finish after
            # it at the elastic steps' pace: the stretch after the restore measures the finish's own
            restore_s = 8 * stretch * step_s if tcfg.full_delta_restore and trainer.step < steps else 0.0
            next_s = stretch * step_s + (restore_s if trainer.step + stretch >= steps else 0.0)
            if call_over(clock(device) - STARTED, next_s, save_s if save_s is not None else stretch * step_s,
                         (trainer.end - trainer.step) * step_s + restore_s, score_s, args.call_seconds):
                stop(clock(device) - t, f"--call-seconds {args.call_seconds:g}")
        if router is not None:
            trajectory.append({"step": trainer.step, **{b.name: describe(router.spec(i), cfg)
                                                         for i, b in enumerate(budgets) if not b.is_full}})
        s0 = clock(device)
        trainer.save_state()  # a call killed from here on redoes at most a tenth
        save_s = clock(device) - s0  # (no state: a no-op, ~0)
        el = clock(device) - t
        if state is not None:
            common.write_json(state / "bench.json", {"trajectory": trajectory, "seconds": earlier_s + el,
                                                     "step": trainer.step})
            tenth_s, last_el = el - last_el, el
            if out_of_time(el, tenth_s, args.max_train_seconds) and trainer.step < trainer.end:
                stop(el, "--max-train-seconds", saved=True)
        tok_s = (trainer.step - start) * tokens_per_step / el
        recent = {}
        for lg in logs[-every:]:
            for name, kd in budget_kds(lg, full_name):
                recent.setdefault(name, []).append(kd)
        cost = {lg["budget"]: lg.get("argmax_cost_fraction") for lg in logs[-every:] if "argmax_cost_fraction" in lg}
        print(f"    {variant} step {trainer.step:5d}/{trainer.end}  kd "
              + " ".join(f"{b.name}:{sum(recent[b.name]) / len(recent[b.name]):.4f}" for b in budgets if b.name in recent)
              + ("  argmax cost " + " ".join(f"{k}:{v:.3f}" for k, v in cost.items()) if cost else "")
              + f"  {tok_s:,.0f} tok/s  {el:.0f} s, ~{(trainer.end - trainer.step) * tokens_per_step / tok_s:.0f} s to go"
              + (f"  (state saved in {save_s:.1f} s)" if state is not None else ""), flush=True)
    train_s = earlier_s + clock(device) - t  # over every call of a resumed run
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    student.eval()
    costs = CostModel(cfg)
    if router is not None:
        router.eval()
        projections = project_budgets(router, budgets, costs)
        final = {b.name: router.spec_of(p.choice) for b, p in zip(budgets, projections)}
    else:
        projections, final = [None] * len(budgets), {b.name: specs[b.name] for b in budgets}
    # the training's record first, so that a run cut while it is scored (a device call's limit) keeps its log;
    # the scores are added below, the full budget's (with its diagnostics, the longest) last
    methods[variant] = {"tokens": steps * tokens_per_step, "steps": steps, "train_seconds": round(train_s, 1),
                        "full_anchor": tcfg.full_anchor,
                        "train_on": tcfg.train_on, "all_budgets": tcfg.all_budgets, "budget_lrs": tcfg.budget_lrs,
                        "anchor_projection": tcfg.anchor_projection, "stage1_fraction": tcfg.stage1_fraction,
                        "full_delta_rank": tcfg.full_delta_rank or None,
                        "full_delta_lr": tcfg.full_delta_lr or None,
                        "full_delta_finish": tcfg.full_delta_finish or None,
                        "full_delta_restore": tcfg.full_delta_restore or None,
                        **({} if trainer.restored is None else {
                            "full_delta_restored": trainer.restored.share,
                            "full_delta_restored_undamped": trainer.restored.undamped,
                            "full_delta_residual": trainer.restored.residual,
                            "full_delta_restore_report": trainer.restored.report}),
                        "full_delta_allocate": tcfg.full_delta_allocate or None,
                        "full_delta_bits": tcfg.full_delta_bits or None,
                        "full_keeps_held_training": tcfg.full_keeps_held,
                        # the full budget's scores beside its perplexity, added once it is scored
                        "full_without_delta": None, "full_with_parents_rest": None, "full_keeps_held": None,
                        "full_kl_from_parent": None,
                        "hold": tcfg.hold, "hold_rate": tcfg.hold_rate if tcfg.hold else None,
                        "hold_pull": tcfg.hold_pull if tcfg.hold else None,
                        "anchor_data": args.anchor_data if anchor_rows is not None else None,
                        "anchor_mix": tcfg.anchor_mix if anchor_rows is not None else None,
                        "budget_mix": tcfg.budget_mix or None,
                        "anchor_sha": anchor_sha,
                        "anchor_cos": cosines(logs),
                        # the rate over every step the trainer ran: the finish's too (train_s holds them)
                        "finish_tokens": tcfg.full_delta_finish * tokens_per_step,
                        "tokens_per_s": round((steps + tcfg.full_delta_finish) * tokens_per_step / train_s),
                        "peak_gpu_gib": peak,
                        "selection": trainer.selection, "argmax_trajectory": trajectory,
                        "resumed_at_step": start or None,
                        "log": thin_log(logs)}
    save()
    t = clock(device)
    # each budget's final KD: over the last fifth of the training's steps, the full budget's over the last fifth
    # of the delta's finish where there is one (--full-delta-finish)
    trained = [lg for lg in logs if "phase" not in lg]
    finish = [lg for lg in logs if "phase" in lg]
    tail, finish_tail = trained[len(trained) * 4 // 5:], finish[len(finish) * 4 // 5:]
    for i in sorted(range(len(budgets)), key=lambda i: budgets[i].is_full):
        b, proj = budgets[i], projections[i]
        spec = final[b.name]
        small = slice_model(student, spec)
        if b.is_full and trainer.delta is not None:  # the full budget is the shared weights plus its delta
            without_delta = score(small, heldouts, args)  # what the delta carries: the shared weights alone
            trainer.delta.merge_into(small)
            parent_rest = score(with_values(small, parents_rest(teacher, trainer.delta)), heldouts, args)
            # what elastify --full-keeps-held writes: the parent's held values put in
            keeps_held = score(with_values(small, parents_held), heldouts, args) if parents_held is not None else None
            methods[variant].update(full_without_delta=without_delta, full_with_parents_rest=parent_rest,
                                    full_keeps_held=keeps_held)
            save()
        # the full budget with how far it moved, which perplexity can hide (a flatter model gains on prose)
        got = scores(small, heldouts, args, reference=teacher if b.is_full else None)
        ppl = {name: g["perplexity"] for name, g in got.items()}
        if b.is_full:
            methods[variant]["full_kl_from_parent"] = {name: g["kl_from_reference"] for name, g in got.items()}
        del small
        kd = [v for lg in (finish_tail if b.is_full and finish_tail else tail) for name, v in budget_kds(lg, full_name)
              if name == b.name]
        row(variant, b, None, spec, ppl, steps * tokens_per_step,
            cost_vs_target=costs.spec_cost("params", spec) / b.target,
            projection=proj.to_dict() if proj is not None else None,
            steps_sampled=sum(any(name == b.name for name, _ in budget_kds(lg)) for lg in logs),
            trained_share=trainer.trained_share(i, proj.choice) if proj is not None else None,
            final_kd=sum(kd) / len(kd) if kd else None)
    methods[variant]["eval_seconds"] = round(clock(device) - t, 1)
    save()
    tmp.cleanup()
    if state is not None:  # the rows are written: the run is done, its state (weights, moments) goes
        shutil.rmtree(state, ignore_errors=True)
    return final


def anchor_text_rows(args, teacher, tokenizer, row_len: int, tokens_per_step: int, steps: int):
    """--anchor-data's rows and their fingerprint: sampled from the parent once a process (every anchored variant,
    and (c) with --budget-mix, distils on the same text), or read from --anchor-cache."""
    key = (args.anchor_data, row_len, tokens_per_step, min(ANCHOR_SELF_TOKENS, steps * tokens_per_step))
    if key not in ANCHOR_ROWS:
        cached = anchor_cache_file(args, key, teacher)
        # under a lock: runs started side by side (an elastic run and its (c) with --budget-mix) would each sample,
        # and on CUDA get other text; the second waits for the first's file and reads it

        def read(f):
            print(f"  anchor text from {f}", flush=True)
            return load_file(str(f))["rows"]

        def sample():
            with sampling_determinism():
                return anchor_text(parse_anchor_data(args.anchor_data), teacher, tokenizer, row_len,
                                   tokens_per_step // row_len, key[-1], seed=args.seed)

        ANCHOR_ROWS[key] = made_once(cached, read, sample,
                                     lambda f, rows: common.write_safetensors(f, {"rows": rows.contiguous()}))
    sha = common.fingerprint(ANCHOR_ROWS[key])
    print(f"  anchor text fingerprint {sha}", flush=True)
    return ANCHOR_ROWS[key], sha


def cosines(logs: list[dict]) -> dict | None:
    """With --anchor-projection: how often the full anchor's gradient conflicted with the smaller budgets'
    (the steps it was projected on) and their mean cosine, over the run and its last tenth."""
    cos = [lg["anchor_cos"] for lg in logs if "anchor_cos" in lg]
    if not cos:
        return None
    last = cos[-max(1, len(cos) // 10):]
    return {"negative_share": sum(c < 0 for c in cos) / len(cos), "mean": sum(cos) / len(cos),
            "last_tenth_mean": sum(last) / len(last)}


def budget_kds(log: dict, full: str | None = None) -> list[tuple[str, float]]:
    """(budget, distillation loss) of every budget a step trained: the sampled one, with --all-budgets the
    others (logged as kd@NAME), and with the full anchor the full budget `full` (logged as full_kd, on the
    anchor's rows)."""
    out = [(log["budget"], log["kd"])] + [(k[3:], v) for k, v in log.items() if k.startswith("kd@")]
    if full is not None and "full_kd" in log and all(name != full for name, _ in out):
        out.append((full, log["full_kd"]))
    return out


def call_over(elapsed_s: float, next_s: float, save_s: float, left_s: float, score_s: float, limit_s: float) -> bool:
    """--call-seconds: stop now (the state saved, exit 75) `elapsed_s` after the process started? Not while
    the rest of the run (`left_s`) and its scores (`score_s`) fit inside `limit_s`; else once the next
    stretch (`next_s`), one more to spare (the one after may run slower: the delta's finish) and the state's
    save would pass it."""
    if elapsed_s + left_s + score_s <= limit_s:
        return False
    return elapsed_s + 2 * next_s + save_s > limit_s


def out_of_time(elapsed_s: float, last_tenth_s: float, limit_s: float | None) -> bool:
    """--max-train-seconds: stop before the tenth that would end past the limit at the last tenth's pace, not
    after it (a tenth can take minutes, and the call must end inside the device's limit)."""
    return limit_s is not None and elapsed_s + last_tenth_s > limit_s


RESUME_EXIT = 75  # EX_TEMPFAIL: stopped by --max-train-seconds, to be run again with the same command


def resume(trainer: ElasticTrainer, state: Path | None) -> tuple[list, list, float]:
    """An earlier call's progress from `state` (the trainer's resumable state, its metrics.jsonl and the
    bench's own bench.json): (step logs, argmax trajectory, training seconds) so far, the trainer
    moved to the saved step. Steps logged after the saved state (a call killed mid-tenth) are dropped:
    they are trained again."""
    if state is None or not trainer.load_state():
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)  # a stale half-written directory: start clean
        return [], [], 0.0
    metrics = state / "metrics.jsonl"
    logs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    logs = [lg for lg in logs if lg["step"] < trainer.step]
    metrics.write_text("".join(json.dumps(lg) + "\n" for lg in logs))
    side = json.loads((state / "bench.json").read_text()) if (state / "bench.json").exists() else {}
    trajectory = [t for t in side.get("trajectory", []) if t["step"] <= trainer.step]
    print(f"  resumed at step {trainer.step} from {state} ({len(logs)} steps logged, "
          f"{side.get('seconds', 0.0):.0f} s trained before)", flush=True)
    return logs, trajectory, float(side.get("seconds", 0.0))


def table(part: dict) -> str:
    """Per held-out source: each budget's perplexity under (a), every trained one-run variant and (c),
    with each variant's ratio to (c) (at 100%, (c) is the untouched parent: the ratio is the drift)."""
    rows = part["rows"]
    sources = list(rows[0]["perplexity"])
    by = {(r["method"], r["budget"]): r for r in rows}
    parent = by[("parent", part["budgets"][0])]
    variants = [v for v in VARIANTS if v in part["methods"]]
    tr = part["training"]
    lines = [f"held-out perplexity ({', '.join(sources)}; {tr['data']} trains); T = {tr['T']:,} tokens: each "
             f"one-run method one run of T, (c) {tr['minitron_tokens_per_budget']:,} per smaller budget"]
    for s in sources:
        lines.append("")
        lines.append(f"[{s}]  parent {parent['params']:,} params: ppl {fmt(parent['perplexity'][s])}")
        head = f"{'budget':>6} {'(a) params':>14} {'(a) zero-shot':>14} {'(c) Minitron':>13}"
        for v in variants:
            head += f" {LABELS[v] + ' (vs c)':>28}"
        lines.append(head)
        for name in part["budgets"]:
            a, c = by.get(("zero_shot", name)), by.get(("minitron", name))
            full = a is not None and a["param_fraction"] == 1.0
            vc = c["perplexity"][s] if c else (parent["perplexity"][s] if full else None)
            share = f"{a['param_fraction']:.1%}" if a else "-"
            line = f"{name:>6} {share:>14} {fmt(a['perplexity'][s] if a else None):>14} {fmt(vc):>13}"
            for v in variants:
                r = by.get((v, name))
                if r is None:
                    line += f" {'-':>28}"
                    continue
                vb = r["perplexity"][s]
                off = "*" if abs(r.get("cost_vs_target", 1.0) - 1) > 0.05 else ""
                rel = f"{vb / vc - 1:+.1%}" if vc else "-"
                cell = f"{fmt(vb)} ({rel}) {off}{r['param_fraction']:.1%}"
                line += f" {cell:>28}"
            lines.append(line)
    m = part["methods"]
    lines.append("")
    lines.append("each trained cell: perplexity (its ratio to (c) - 1) and the share of the parent's parameters it keeps")
    if any(r["method"] in VARIANTS and abs(r.get("cost_vs_target", 1.0) - 1) > 0.05 for r in rows):
        lines.append("* more than 5% away from its budget")
    lines.append(f"(c) at 100% is the untouched parent. Wall time: zero-shot {m['zero_shot']['seconds']} s; "
                 + "; ".join(f"{LABELS[v]} {m[v]['train_seconds']} s ({m[v]['tokens_per_s']:,} tok/s"
                             + (f", the delta's finish's {m[v]['finish_tokens']:,} tokens in them"
                                if m[v].get("finish_tokens") else "") + ")" for v in variants)
                 + f"; Minitron {m['minitron']['train_seconds']} s training ({m['minitron']['tokens']:,} tokens)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- part A: SmolLM2-135M

def run_a(args, device, res: Results) -> dict:
    part = res.data["A"] = {"part": "A"}
    t0 = clock(device)
    path = Path(args.model) if args.model else smollm2_gguf()
    parent = load(path, dtype=torch.float32, device=device).eval()
    tokenizer = load_tokenizer(args.tokenizer or path)
    if tokenizer is None:
        raise StarElasticError(f"{args.tokenizer or path}: no tokenizer there")
    train, held = load_corpus_tokens(args.train_data, tokenizer, seed=args.seed, max_docs=args.max_docs)
    heldouts = with_chat(heldout_streams(tokenizer, args, held), parent, tokenizer, args)
    part.update(parent={"name": path.name, "params": parent.num_parameters(), "config": parent.config.to_dict()},
                **heldout_record(heldouts), eval_seq_len=args.eval_seq_len, setup_seconds=round(clock(device) - t0, 1))
    print(f"A: {path.name}, {parent.num_parameters():,} parameters on {res.data['machine']}; {train.numel():,} "
          f"train tokens of {args.train_data}; held-out {part['heldout']}  [{part['setup_seconds']} s]", flush=True)
    sorted_parent = copy.deepcopy(parent)
    part["importance"], calibration = importance_and_sort(sorted_parent, train, args, device)
    compare(parent, sorted_parent, train, heldouts, args.tokens_a, args.lr_a, args, device, part, res.save,
            calibration, tokenizer)
    part["seconds"] = round(clock(device) - t0, 1)
    res.save()
    return part


# ----------------------------------------------------------------------------- part B: pretrained MoE hybrid

def run_b(args, device, res: Results) -> dict:
    part = res.data["B"] = {"part": "B"}
    t0 = clock(device)
    tokenizer = load_tokenizer(args.tokenizer or smollm2_gguf())
    if tokenizer is None:
        raise StarElasticError(f"{args.tokenizer}: no tokenizer there")
    train, held = load_corpus_tokens(args.train_data, tokenizer, seed=args.seed, max_docs=args.max_docs)
    heldouts = heldout_streams(tokenizer, args, held)
    pre = SimpleNamespace(hidden=args.hidden, pattern=args.pattern, experts=args.experts, top_k=args.top_k,
                          expert_ffn=args.expert_ffn, steps=args.pretrain_steps, batch_size=args.pretrain_batch_size,
                          seq_len=args.pretrain_seq_len, lr=args.pretrain_lr, balance_rate=args.balance_rate,
                          seed=args.seed)
    cfg = zs.moe_config(pre, len(tokenizer), tokenizer)
    torch.manual_seed(args.seed)
    parent = Model(cfg)
    zs.init_weights(parent, args.seed)
    parent.to(device)
    print(f"B: NemotronH {cfg.layer_types!r}, hidden {cfg.hidden_size}, {args.experts} experts top-{args.top_k}, "
          f"{parent.num_parameters():,} parameters on {res.data['machine']}; pretraining {args.pretrain_steps} steps "
          f"of {args.pretrain_batch_size} x {args.pretrain_seq_len} on {train.numel():,} tokens of {args.train_data}",
          flush=True)
    log, seconds = pretrained_parent(parent, train, pre, device, args.parent_b)
    heldouts = with_chat(heldouts, parent, tokenizer, args)
    part.update(parent={"params": parent.num_parameters(), "config": cfg.to_dict()},
                **heldout_record(heldouts), eval_seq_len=args.eval_seq_len,
                pretraining={"data": f"{args.train_data} (train split)", "steps": args.pretrain_steps,
                             "batch_size": args.pretrain_batch_size, "seq_len": args.pretrain_seq_len,
                             "tokens": args.pretrain_steps * args.pretrain_batch_size * args.pretrain_seq_len,
                             "lr": args.pretrain_lr, "balance_rate": args.balance_rate,
                             "precision": "bf16 + fp32 master weights" if device.type == "cuda" else "fp32",
                             "seconds": seconds, "log": log,
                             **({"file": args.parent_b} if args.parent_b else {})})
    res.save()
    sorted_parent = copy.deepcopy(parent)
    part["importance"], calibration = importance_and_sort(sorted_parent, train, args, device)
    compare(parent, sorted_parent, train, heldouts, args.tokens_b, args.lr_b, args, device, part, res.save,
            calibration, tokenizer)
    part["seconds"] = round(clock(device) - t0, 1)
    part["table"] += (f"\nParent pretraining: {part['pretraining']['tokens']:,} tokens in "
                      f"{part['pretraining']['seconds']} s (not counted in T)")
    res.save()
    return part


@contextlib.contextmanager
def file_lock(path: Path | None):
    """An exclusive lock beside `path` (PATH.lock) for the block, between the processes of one machine; none
    for None."""
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def made_once(path: Path | None, read, make, write):
    """make() once a machine: under `path`'s lock (runs started side by side wait for the first), read(path) when
    the file is there, else make() and, with a path, write(path, what it made). None: make() alone."""
    with file_lock(path):
        if path is not None and path.exists():
            return read(path)
        got = make()
        if path is not None:
            write(path, got)
        return got


def weights_digest(model) -> str:
    """A digest of `model`'s weights: each tensor's name, shape, float64 sum and position-weighted sum (so that
    a permutation of a tensor, a function-changing one included, reads as another model)."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().double().flatten()
            ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
            h.update(f"{name}{tuple(p.shape)}{float(flat.sum()):.17g}{float(flat @ ramp):.17g}".encode())
    return h.hexdigest()


def anchor_cache_file(args, key: tuple, teacher, prefix: str = "anchor", suffix: str = ".safetensors") -> Path | None:
    """--anchor-cache's file for the anchor text of `key` (its settings) sampled from `teacher` at args.seed, or
    None without the flag: named by a digest of those and of the teacher's weights (`weights_digest`), so that
    another parent, seed or setting never reads it. `prefix`: what the file holds (the anchor's text, the parent's
    chat answers, a model's scores)."""
    if not args.anchor_cache:
        return None
    import hashlib

    h = hashlib.sha256(repr((key, args.seed, weights_digest(teacher))).encode())
    return Path(args.anchor_cache) / f"{prefix}-{h.hexdigest()[:20]}{suffix}"


def cached_score(model, heldouts: dict, args) -> tuple[dict, float]:
    """`score` and the seconds it took, kept in --anchor-cache under a digest of the model's weights, the held-out
    text and the scoring settings: the parent's and (a)'s rows are the same in every call of a resumed run and in
    every run of one parent on a machine (30-45 s of a device call with three runs side by side), so they are
    scored once. The seconds are the scoring's own, read back with it (--call-seconds keeps room by them)."""
    key = ("score", tuple((name, common.fingerprint(stream)) for name, stream in heldouts.items()),
           args.eval_seq_len, args.eval_batch_size, next(model.parameters()).device.type)
    cached = anchor_cache_file(args, key, model, prefix="score", suffix=".json")
    device = next(model.parameters()).device

    def timed():
        t = clock(device)
        return {"perplexity": score(model, heldouts, args), "seconds": clock(device) - t}

    got = made_once(cached, lambda f: json.loads(f.read_text()), timed, common.write_json)
    return got["perplexity"], got["seconds"]


def pretrained_parent(parent: Model, train, pre, device, path: str | None) -> tuple[list, float]:
    """Pretrain `parent` (fp32, eval mode after), or with `path` load it from there when the file exists (its
    pretraining's log and seconds from the file's metadata), writing it there after pretraining (a temporary
    file renamed). Under a lock beside the file: runs started side by side would each pretrain, and on a GPU
    get other parents; one pretrains, the others wait and read its file. Returns the pretraining's log and
    seconds."""
    from safetensors import safe_open
    from safetensors.torch import load_model, save_model

    with file_lock(Path(path) if path else None):
        if path and Path(path).exists():
            try:
                with safe_open(path, "pt") as f:
                    meta = f.metadata() or {}
                if "log" not in meta:
                    raise ValueError("no pretraining log in it")
                load_model(parent, path, device=str(device))
            except Exception as e:  # a foreign, truncated or other-shaped file: one line, not the loader's traceback
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise SystemExit(f"--parent-b {path}: not this bench's parent for these settings ({why})") from None
            print(f"  the parent pretrained by an earlier call, from {path}", flush=True)
            parent.eval()
            return json.loads(meta["log"]), float(meta["seconds"])
        t = clock(device)
        log = zs.train_moe(parent, train, pre, device)  # returns the fp32 model in eval mode
        seconds = round(clock(device) - t, 1)
        if path:
            tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            save_model(parent, str(tmp), metadata={"log": json.dumps(log), "seconds": str(seconds)})
            tmp.replace(path)
        return log, seconds


def merge(files: list[str], out: str | None) -> dict:
    """One result from runs of the same parts on several GPUs: the first file's, plus every row and
    method the others add (rows shared by all, the parent and (a), are the same runs)."""
    data = [json.loads(Path(f).read_text()) for f in files]
    # the seed draws the train / held-out split: rows of different seeds score different text, and
    # ratios across them mean nothing (a merge of a seed-1 run with seed-0 baselines once reported
    # a +11.9% drift that was the split, not the model)
    for key in ("seed", "smoke"):
        values = {f: d.get(key) for f, d in zip(files, data)}
        if len(set(values.values())) > 1:
            raise SystemExit(f"cannot merge runs with different {key}s: {values}")
    res = data[0]
    for other in data[1:]:
        for name in ("A", "B"):
            if name not in other:
                continue
            if name not in res:
                res[name] = other[name]
                continue
            part, add = res[name], other[name]
            have = {(r["method"], r["budget"]) for r in part["rows"]}
            part["rows"] += [r for r in add["rows"] if (r["method"], r["budget"]) not in have]
            for k, v in add["methods"].items():
                if k not in part["methods"] or (k == "minitron" and not part["methods"][k]["per_budget"]):
                    part["methods"][k] = v
            part["seconds"] = max(part.get("seconds", 0), add.get("seconds", 0))
        res["command"] = " ; ".join(d["command"] for d in data)
    for name in ("A", "B"):
        if name in res:
            res[name]["table"] = table(res[name]) + res[name]["table"][res[name]["table"].find("\nParent pretraining"):] \
                if "\nParent pretraining" in res[name]["table"] else table(res[name])
            print(f"== part {name} ==\n{res[name]['table']}\n")
    if out:
        common.write_json(out, res)
    return res


def parents_rest(parent, delta) -> dict:
    """The parent's parameters outside what the delta covers (embeddings and the tied LM head, norms; on the
    hybrid also Mamba's own, the MoE gates), by name: put into the merged full model (`with_values`), what it
    would be if only the linear layers and routed experts drifted. Its perplexity beside the merged model's
    says whether the drift the delta does not repair lies outside what it covers."""
    covered = {f"{name}.weight" for name in delta.names} | set(delta.experts)
    return {name: p for name, p in parent.named_parameters() if name not in covered}


def with_values(full, values: dict):
    """A copy of the model `full` with `values` ({parameter name: tensor}) put in."""
    out = copy.deepcopy(full)
    own = dict(out.named_parameters())
    with torch.no_grad():
        for name, v in values.items():
            own[name].copy_(v.to(own[name].dtype))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    for given, flag in ((args.max_train_seconds, "--max-train-seconds"), (args.call_seconds, "--call-seconds")):
        if given is not None and not args.state_dir:
            raise SystemExit(f"{flag} needs --state-dir: a stopped run goes on from its saved state")
    if args.anchor_mix != 1.0 and not args.anchor_data:
        raise SystemExit("--anchor-mix mixes the anchor's own text into its batch: give --anchor-data")
    why = budget_mix_problem(args.budget_mix, bool(args.anchor_data))
    if why:
        raise SystemExit(f"--budget-mix {why}")
    why = hold_problem(args.hold, args.hold_rate, args.hold_pull, sharded=False)
    if why:  # the trainer's own check, in elastify's words
        raise SystemExit(f"--hold {','.join(args.hold or [])}: {why}")
    why = keep_problem(args.full_keeps_held_training, args.full_delta_rank, args.hold, args.hold_rate)
    if why:  # the trainer's own check, as for --hold
        raise SystemExit(f"--full-keeps-held-training: {why}")
    for option in DELTA_OPTIONS:
        why = delta_option_problem(option, getattr(args, option), args.full_delta_rank)
        if why:
            raise SystemExit(f"--{option.replace('_', '-')} {getattr(args, option):g}: {why}")
    try:  # a mode given without a delta: elastify's one-line error
        restore_mode(args.full_delta_restore or None, args.full_delta_rank, "")
    except StarElasticError as e:
        raise SystemExit(str(e)) from None
    if args.full_delta_bits and not args.full_delta_restore:
        raise SystemExit("--full-delta-bits rounds the drift the delta's restore finds: give --full-delta-restore")
    if args.full_delta_allocate and not args.full_delta_restore:
        raise SystemExit("--full-delta-allocate gives the delta's rank out where its restore finds the drift: give "
                         "--full-delta-restore")
    if args.anchor_data and parse_anchor_data(args.anchor_data)[0] not in SAMPLED:
        raise SystemExit(f"--anchor-data {args.anchor_data!r}: the bench samples the anchor's text from the parent: "
                         "self, chat or self+chat, each with :TOKENS or without")
    device = common.setup(args.device, args.seed)  # seeds; on a GPU deterministic algorithms (warn-only) and cuBLAS workspace
    if device.type == "cuda":  # deterministic results do not need every new tensor NaN-filled first
        torch.utils.deterministic.fill_uninitialized_memory = False
    if args.strict_determinism:
        torch.use_deterministic_algorithms(True, warn_only=False)
    res = Results(args, device, argv)
    for name, run in (("A", run_a), ("B", run_b)):
        if args.part in (name, "all"):
            torch.manual_seed(args.seed)
            run(args, device, res)
            print(f"\n== part {name} ({res.data[name]['seconds']:.0f} s) ==\n{res.data[name]['table']}\n", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res.save()
    print(f"total {res.data['seconds']:.0f} s on {res.data['machine']}")
    return res.data


if __name__ == "__main__":
    main()
