"""Zero-shot slicing on real models and real text (issue 3, item 9; docs/METHOD.md §3, §12).

(a) SmolLM2-135M. Importance calibrated on the train split of one corpus (default Shakespeare),
    perplexity on held-out documents of another (default Wikipedia), at 75% and 50% of the
    parameters, for activation importance, weight-magnitude importance and random order: each
    axis alone (where the budget is reachable with it alone: the table says so where not) and the
    width axes combined; plus the unpruned parent.
(b) --moe: experts. Pretrains a small NemotronH MoE on the Wikipedia train split (a plain AdamW loop,
    bf16 with fp32 master weights on a GPU), then removes 25% and 50% of the routed experts of
    every MoE layer ranked by REAP, by routing frequency, by EAN and at random, and reports
    held-out perplexity of each sliced model and of the unpruned one.

Everything is seeded. On the CPU it is deterministic; on a GPU, deterministic algorithms are
requested (warn-only), so reruns match up to the few kernels without a deterministic version.

    python benchmarks/bench_zero_shot.py --json results/zero_shot_smollm2.json        # (a), ~2-3 min on a GPU
    python benchmarks/bench_zero_shot.py --moe --json results/zero_shot_moe.json      # (b)
    python benchmarks/bench_zero_shot.py --smoke [--moe]                              # tiny, CPU, minutes
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
import time

import torch

import common
import torch.nn.functional as F

from star_elastic import load, load_tokenizer
from star_elastic.assets import smollm2_gguf
from star_elastic.data import TokenBatches, load_corpus_tokens, pack
from star_elastic.elastic import ElasticSpec, slice_model, sort_model
from star_elastic.elastic.importance import estimate_importance, random_importance, weight_magnitude_importance
from star_elastic.elastic.search import DEFAULT_AXES, applicable_axes, choose_spec, describe, smallest_reachable
from star_elastic.errors import StarElasticError
from star_elastic.evaluate import perplexity
from star_elastic.model import Mamba2, Model, ModelConfig, MoE, TopkRouter

METHODS = ("activation", "magnitude", "random")
EXPERT_METHODS = {"REAP": "experts", "frequency": "experts_freq", "EAN": "experts_ean", "random": "experts_random"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", action="store_true", help="part (b): experts on a MoE model trained here")
    ap.add_argument("--smoke", action="store_true", help="tiny settings that run on the CPU in minutes")
    ap.add_argument("--device", help="default: cuda when available")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--eval-data", default="wiki", help="its held-out split is scored ((b): its train split trains)")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens scored per model")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--calib-batches", type=int, default=64, help="calibration batches for importance")
    ap.add_argument("--calib-batch-size", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    # (a)
    ap.add_argument("--calib-data", default="shakespeare", help="(a) train split of this corpus/file calibrates")
    ap.add_argument("--targets", default="0.75,0.5", help="(a) parameter budgets, fractions of the parent")
    ap.add_argument("--depth-batches", type=int, default=2,
                    help="(a) calibration batches for layer ranking (0: skip depth importance)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="(a) model dtype")
    # (b)
    ap.add_argument("--steps", type=int, default=600, help="(b) training steps")
    ap.add_argument("--batch-size", type=int, default=16, help="(b) training batch")
    ap.add_argument("--seq-len", type=int, default=512, help="(b) training sequence length")
    ap.add_argument("--lr", type=float, default=2e-3, help="(b) peak learning rate")
    ap.add_argument("--hidden", type=int, default=256, help="(b) hidden size")
    ap.add_argument("--pattern", default="ME*EMEME", help="(b) layer types (M Mamba, E MoE, * attention, - MLP)")
    ap.add_argument("--experts", type=int, default=32, help="(b) routed experts per MoE layer")
    ap.add_argument("--top-k", type=int, default=4, help="(b) experts per token")
    ap.add_argument("--expert-ffn", type=int, default=256, help="(b) FFN width of every expert")
    ap.add_argument("--balance-rate", type=float, default=1e-3,
                    help="(b) aux-loss-free balancing: correction-bias step per update (0: off)")
    ap.add_argument("--removed", default="0.25,0.5", help="(b) fractions of the routed experts removed")
    ap.add_argument("--tokenizer", help="(b) tokenizer directory (default: SmolLM2's, read from its GGUF)")
    if ap.parse_known_args(argv)[0].smoke:  # every code path, tiny sizes; explicit flags still win
        # Depth importance costs L(L+1)/2 forwards (465 for SmolLM2): minutes on a CPU, so the smoke
        # run skips it (the activation depth row reads n/a; random order still slices by depth).
        ap.set_defaults(calib_batches=2, calib_batch_size=1, calib_seq_len=32, depth_batches=0, eval_tokens=256,
                        eval_seq_len=128, steps=30, batch_size=4, seq_len=64, hidden=64, pattern="ME*E", experts=8,
                        top_k=2, expert_ffn=64, lr=3e-3)
    return ap.parse_args(argv)


def setup(args) -> torch.device:
    return common.setup(args.device, args.seed)


machine = common.machine


def calibration(tokens: torch.Tensor, args) -> list[torch.Tensor]:
    """The first --calib-batches seeded random batches of packed train windows."""
    batches = TokenBatches(pack(tokens, args.calib_seq_len), args.calib_batch_size, seed=args.seed)
    n = min(args.calib_batches, len(batches))  # never a second pass over the same windows
    return [next(batches) for _ in range(n)]


def fmt_ppl(v: float) -> str:
    """Perplexities of pruned models span 10 to 1e9: fixed point while short, then 3 significant digits."""
    return f"{v:.2f}" if v < 1e5 else f"{v:.3g}"


def ppl(model, stream, args) -> float:
    return perplexity(model, stream, seq_len=args.eval_seq_len, batch_size=8, progress=False)["perplexity"]


# ----------------------------------------------------------------------------- (a) SmolLM2

def axis_sets(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each axis alone, then the width axes together."""
    usable = applicable_axes(cfg)
    singles = [a for a in ("hidden", "attention", "mamba", "ffn", "experts", "depth") if a in usable]
    sets = {a: (a,) for a in singles}
    sets["combined (" + ",".join(a for a in DEFAULT_AXES if a in usable) + ")"] = tuple(
        a for a in DEFAULT_AXES if a in usable)
    return sets


def run_smollm2(args, device) -> dict:
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    gguf = smollm2_gguf()
    model = load(gguf, dtype=dtype, device=device)
    tokenizer = load_tokenizer(gguf)
    cfg, total = model.config, model.num_parameters()
    max_docs = 300 if args.smoke else None  # the smoke run tokenizes a slice of each corpus
    calib_train, _ = load_corpus_tokens(args.calib_data, tokenizer, seed=args.seed, max_docs=max_docs)
    _, heldout = load_corpus_tokens(args.eval_data, tokenizer, seed=args.seed, max_docs=max_docs)
    heldout = heldout[:args.eval_tokens]
    batches = calibration(calib_train, args)
    print(f"SmolLM2-135M: {total:,} parameters on {machine(device)} ({args.dtype}); calibration "
          f"{len(batches)} x {args.calib_batch_size} x {args.calib_seq_len} tokens of {args.calib_data} (train split), "
          f"evaluation {heldout.numel()} held-out tokens of {args.eval_data}  [{time.perf_counter() - t0:.0f} s]",
          flush=True)

    res = {"part": "smollm2", "parent_parameters": total, "calibration": {
        "data": f"{args.calib_data} (train split)", "batches": len(batches), "batch_size": args.calib_batch_size,
        "seq_len": args.calib_seq_len, "depth_batches": args.depth_batches},
        "evaluation": {"data": f"{args.eval_data} (held-out split)", "tokens": heldout.numel(),
                       "seq_len": args.eval_seq_len}}
    res["parent_perplexity"] = ppl(model, heldout, args)
    print(f"parent perplexity {res['parent_perplexity']:.3f}", flush=True)

    t = time.perf_counter()
    scores = {"activation": estimate_importance(model, batches, depth=args.depth_batches > 0,
                                                depth_batches=args.depth_batches, progress=not args.smoke),
              "magnitude": weight_magnitude_importance(model),
              "random": random_importance(model, seed=args.seed)}
    res["importance_seconds"] = round(time.perf_counter() - t, 1)
    print(f"importance done in {res['importance_seconds']} s", flush=True)
    if "layer_order" in scores["activation"]:
        res["layer_order_activation"] = scores["activation"]["layer_order"].tolist()
        print(f"layers by depth importance, least important first: {res['layer_order_activation']}", flush=True)

    targets = [float(x) for x in args.targets.split(",")]
    rows = []
    for method in METHODS:
        sorted_model = copy.deepcopy(model)
        sort_model(sorted_model, scores[method])  # every axis: function-preserving
        for frac in targets:
            target = int(frac * total)
            for name, axes in axis_sets(cfg).items():
                row = {"method": method, "target_fraction": frac, "axes": name}
                try:
                    spec = choose_spec(cfg, target, axes, layer_order=scores[method].get("layer_order"))
                except StarElasticError as e:
                    if "layer order" in str(e):
                        row["note"] = ("n/a: weight magnitude ranks no layers" if method == "magnitude"
                                       else "n/a: depth importance skipped")
                    elif "below the smallest" in str(e):
                        low = smallest_reachable(cfg, axes, layer_order=scores[method].get("layer_order"))
                        row["note"] = f"unreachable with this axis alone: it goes down to {low / total:.1%}"
                    else:
                        row["note"] = str(e)
                    rows.append(row)
                    continue
                small = slice_model(sorted_model, spec)
                n = small.num_parameters()
                row.update(spec=spec.to_dict(), architecture=describe(spec, cfg), parameters=n,
                           parameter_fraction=n / total, perplexity=ppl(small, heldout, args))
                rows.append(row)
                print(f"  {method:10s} {frac:4.0%} {name:34s} {n / total:6.1%}  ppl {fmt_ppl(row['perplexity'])}",
                      flush=True)
                del small
        del sorted_model
    res["rows"] = rows
    res["table"] = table_smollm2(res, targets, list(axis_sets(cfg)))
    return res


def table_smollm2(res, targets, names) -> str:
    lines = [f"held-out perplexity, {res['evaluation']['data']}, {res['evaluation']['tokens']} tokens; "
             f"importance from {res['calibration']['data']}",
             f"parent (100%): {res['parent_perplexity']:.2f}",
             f"{'budget':>6}  {'axes':34s} {'params':>7}  " + "".join(f"{m:>12s}" for m in METHODS)]
    by = {(r["method"], r["target_fraction"], r["axes"]): r for r in res["rows"]}
    for frac in targets:
        for name in names:
            cells, frac_done, notes = [], None, []
            for m in METHODS:
                r = by[(m, frac, name)]
                if "perplexity" in r:
                    cells.append(f"{fmt_ppl(r['perplexity']):>12s}")
                    frac_done = r["parameter_fraction"]
                else:
                    cells.append(f"{'-':>12s}")
                    notes.append(r["note"])
            share = f"{frac_done:7.1%}" if frac_done is not None else f"{'-':>7s}"
            note = f"   ({'; '.join(sorted(set(notes)))})" if notes else ""
            lines.append(f"{frac:>6.0%}  {name:34s} {share}  " + "".join(cells) + note)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- (b) experts

def moe_config(args, vocab_size: int, tokenizer) -> ModelConfig:
    h = args.hidden
    return ModelConfig(
        family="nemotron_h", vocab_size=vocab_size, hidden_size=h, layer_types=args.pattern,
        num_attention_heads=max(2, h // 32), num_key_value_heads=2, head_dim=32,
        intermediate_size=4 * h, mamba_num_heads=max(2, 2 * h // 64), mamba_head_dim=64, ssm_state_size=64,
        n_groups=2, chunk_size=128, time_step_min=0.0, n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_ffn,
        moe_shared_expert_intermediate_size=args.expert_ffn, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


@torch.no_grad()
def init_weights(model: Model, seed: int) -> None:
    """A from-scratch initialisation (our Model has none of its own): normal(0.02) weights, output
    projections scaled down by depth (GPT-2), Mamba's A in [1, 16] and dt in [1e-3, 0.1] as Mamba-2
    initialises them."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_layers
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("A_log", "dt_bias", "D") or "norm" in name or leaf == "bias":
            continue
        std = 0.02 / math.sqrt(2 * n_layers) if any(k in name for k in ("o_proj", "out_proj", "down_proj")) else 0.02
        p.copy_(torch.randn(p.shape, generator=g) * std)
    for m in model.modules():
        if isinstance(m, Mamba2):
            h = m.num_heads
            m.A_log.copy_(torch.log(torch.empty(h).uniform_(1, 16, generator=g)))
            dt = torch.exp(torch.empty(h).uniform_(math.log(1e-3), math.log(0.1), generator=g))
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            m.D.fill_(1.0)
            m.conv1d.weight.copy_(torch.randn(m.conv1d.weight.shape, generator=g) * 0.1)
            if m.conv1d.bias is not None:
                m.conv1d.bias.zero_()


class Balancer:
    """Aux-loss-free load balancing (as DeepSeek-V3 and Nemotron 3 train their routers): after each
    update, nudge every expert's selection bias up if it got fewer tokens than average, down if
    more. Without it a router trained from scratch tends to collapse onto a few experts, and
    expert pruning would only remove dead experts."""

    def __init__(self, model: Model, rate: float):
        self.rate, self.loads, self.handles = rate, {}, []
        for name, m in model.named_modules():
            if isinstance(m, TopkRouter):
                self.handles.append(m.register_forward_hook(self._count(name)))
                self.loads[name] = (m, torch.zeros(m.weight.shape[0], device=m.weight.device))

    def _count(self, name):
        def hook(module, args, out):
            idx = out[0]
            self.loads[name][1].add_(torch.bincount(idx.flatten(), minlength=module.weight.shape[0]).float())
        return hook

    @torch.no_grad()
    def step(self) -> None:
        for router, counts in self.loads.values():
            if self.rate:
                router.e_score_correction_bias.add_(self.rate * torch.sign(counts.mean() - counts))
            counts.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train_moe(model: Model, train: torch.Tensor, args, device) -> list[dict]:
    """AdamW with warm-up and cosine decay. On a GPU: bf16 model, fp32 master weights and optimizer
    state (bf16 weights alone would round away late small updates)."""
    bf16 = device.type == "cuda"
    params = list(model.parameters())
    master = [p.detach().clone() for p in params] if bf16 else params
    if bf16:
        model.to(torch.bfloat16)  # the router stays fp32 (TopkRouter._apply)
    decay = [m for m, p in zip(master, params) if p.dim() >= 2]
    no_decay = [m for m, p in zip(master, params) if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, args.steps // 20)

    def lr_at(step):  # linear warm-up, cosine to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    batches = TokenBatches(pack(train, args.seq_len), args.batch_size, seed=args.seed)
    balancer = Balancer(model, args.balance_rate)
    log, t0, window = [], time.perf_counter(), []
    model.train()
    for step in range(args.steps):
        x = next(batches).to(device)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        if bf16:
            for m, p in zip(master, params):
                m.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bf16:
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
        balancer.step()
        window.append(loss.item())
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - t0
            entry = {"step": step + 1, "loss": sum(window) / len(window), "seconds": round(elapsed, 1),
                     "tokens_per_s": round((step + 1) * x.numel() / elapsed)}
            log.append(entry)
            window = []
            print(f"  step {entry['step']:5d}  loss {entry['loss']:.3f}  {entry['tokens_per_s']:,} tok/s", flush=True)
    balancer.remove()
    if bf16:  # evaluation and importance run on the fp32 master weights
        model.float()
        with torch.no_grad():
            for m, p in zip(master, params):
                p.copy_(m)
    model.eval()
    return log


def run_moe(args, device) -> dict:
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer or smollm2_gguf())
    if tokenizer is None:
        raise StarElasticError(f"{args.tokenizer}: no tokenizer there")
    max_docs = 600 if args.smoke else None
    train, heldout = load_corpus_tokens(args.eval_data, tokenizer, seed=args.seed, max_docs=max_docs)
    heldout = heldout[:args.eval_tokens]
    cfg = moe_config(args, len(tokenizer), tokenizer)
    torch.manual_seed(args.seed)
    model = Model(cfg)
    init_weights(model, args.seed)
    model.to(device)
    total = model.num_parameters()
    E = args.experts
    routed = sum(m.experts.up_proj.numel() + m.experts.down_proj.numel() for m in model.modules() if isinstance(m, MoE))
    active = total - routed * (E - args.top_k) // E
    print(f"MoE NemotronH {cfg.layer_types!r}: hidden {cfg.hidden_size}, {E} experts top-{args.top_k}, "
          f"{total:,} parameters ({active:,} active), on {machine(device)}; training on {train.numel():,} "
          f"tokens of {args.eval_data} (train split), {args.steps} steps of {args.batch_size} x {args.seq_len}  "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    t = time.perf_counter()
    log = train_moe(model, train, args, device)
    train_seconds = time.perf_counter() - t
    res = {"part": "moe", "config": cfg.to_dict(), "parameters": total, "active_parameters": active,
           "training": {"data": f"{args.eval_data} (train split)", "steps": args.steps, "batch_size": args.batch_size,
                        "seq_len": args.seq_len, "lr": args.lr, "balance_rate": args.balance_rate,
                        "precision": "bf16 + fp32 master weights" if device.type == "cuda" else "fp32",
                        "seconds": round(train_seconds, 1), "log": log},
           "evaluation": {"data": f"{args.eval_data} (held-out split)", "tokens": heldout.numel(),
                          "seq_len": args.eval_seq_len}}

    batches = calibration(train, args)
    scores = estimate_importance(model, batches, progress=not args.smoke)
    g = torch.Generator().manual_seed(args.seed)
    moe_layers = [i for i, k in enumerate(cfg.layer_types) if k == "E"]
    for i in moe_layers:
        scores[f"layers.{i}.experts_random"] = torch.rand(E, generator=g)
    freq = torch.stack([scores[f"layers.{i}.experts_freq"] for i in moe_layers])
    res["calibration"] = {"data": f"{args.eval_data} (train split)", "batches": len(batches),
                          "batch_size": args.calib_batch_size, "seq_len": args.calib_seq_len,
                          "routing_share_min_max_per_layer": [[round(f.min().item(), 4), round(f.max().item(), 4)]
                                                              for f in freq]}
    res["unpruned_perplexity"] = ppl(model, heldout, args)
    print(f"unpruned perplexity {res['unpruned_perplexity']:.3f}; routing share per layer (min, max): "
          f"{res['calibration']['routing_share_min_max_per_layer']} (uniform {1 / E:.4f})", flush=True)

    rows = []
    for removed in [float(x) for x in args.removed.split(",")]:
        keep = E - round(removed * E)
        spec = ElasticSpec(n_routed_experts=keep)
        spec.validate(cfg)
        for label, key in EXPERT_METHODS.items():
            m = copy.deepcopy(model)
            sort_model(m, {k: v for k, v in scores.items() if k.endswith("." + key)}, experts_key=key)
            small = slice_model(m, spec)
            row = {"method": label, "removed_fraction": removed, "experts_kept": keep,
                   "parameters": small.num_parameters(), "perplexity": ppl(small, heldout, args)}
            rows.append(row)
            print(f"  {label:10s} {removed:4.0%} removed ({keep}/{E} kept)  ppl {row['perplexity']:10.3f}", flush=True)
            del m, small
    res["rows"] = rows
    res["table"] = table_moe(res, E)
    return res


def table_moe(res, E) -> str:
    removed = sorted({r["removed_fraction"] for r in res["rows"]})
    lines = [f"held-out perplexity, {res['evaluation']['data']}, {res['evaluation']['tokens']} tokens; "
             f"unpruned ({E} experts): {res['unpruned_perplexity']:.3f}",
             f"{'experts removed':>16s}" + "".join(f"{m:>12s}" for m in EXPERT_METHODS)]
    by = {(r["method"], r["removed_fraction"]): r for r in res["rows"]}
    for f in removed:
        keep = by[("REAP", f)]["experts_kept"]
        lines.append(f"{f'{f:.0%} ({keep}/{E} kept)':>16s}" + "".join(
            f"{by[(m, f)]['perplexity']:12.3f}" for m in EXPERT_METHODS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    device = setup(args)
    t0 = time.perf_counter()
    res = run_moe(args, device) if args.moe else run_smollm2(args, device)
    res.update(date=datetime.date.today().isoformat(), machine=machine(device), torch=torch.__version__,
               seed=args.seed, smoke=args.smoke, seconds=round(time.perf_counter() - t0, 1),
               command="python benchmarks/bench_zero_shot.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print()
    print(res["table"])
    print(f"\ntotal {res['seconds']:.0f} s on {res['machine']}")
    if args.json:
        common.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
