"""Importance of every elastic unit, from forward passes on calibration batches (docs/METHOD.md §3).

Scores are a flat dict: "hidden" (D,), per layer i f"layers.{i}.<axis>" (see `AXES`), optionally
"layer_order" / "layer_scores" (depth), and "meta" (a small dict: family, layer types, ...).
Higher = more important everywhere except depth, which is an order (least important first).

Activations are read with forward hooks registered from outside the model and removed on exit,
so the model code knows nothing about importance. Aggregation (Minitron's best): per sequence the
mean over tokens of |activation|, then the L2 norm over sequences. We keep the sum of squares
over sequences and take the root at the end, so batches (and ranks, under torch.distributed)
simply add up.

A model sharded by FSDP2 (parallel.py) is scored as it is: every hook runs inside its module's
forward, where FSDP has gathered the block's parameters (the REAP hook reads the experts' weights
there), and the weight baseline gathers one tensor at a time. Its forwards are collectives, so all
ranks run as many: a rank out of batches runs uncounted one-token forwards until every rank is.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from star_elastic import parallel
from star_elastic.errors import StarElasticError
from star_elastic.model import MLP, Attention, Experts, LlamaLayer, Mamba2, MoE

# Per-layer score names: f"layers.{i}.{axis}".
AXES = {
    "attn_heads": "attention query heads: L2 norm of each head's output (o_proj input)",
    "mamba_heads": "Mamba heads: ||s[h, top channels]|| of the in_proj x-branch s (heads, head_dim)",
    "mamba_channels": "Mamba head channels: ||s[:, d]|| over heads",
    "ffn": "dense MLP neurons: up_proj output (non-gated) or down_proj input (gated)",
    "shared_ffn": "MoE shared-expert neurons: up_proj output",
    "experts": "routed experts by REAP: mean over routed tokens of g_j * ||f_j||",
    "experts_freq": "baseline: fraction of routing assignments that chose the expert",
    "experts_ean": "baseline: sum over routed tokens of ||f_j||, divided by all tokens",
    "expert_ffn": "per-expert FFN neurons (E, I): mean |up_proj output| over the expert's tokens",
}
# Keys that only activation statistics can give; the weight and random baselines leave them out.
OPTIONAL_AXES = ("experts_freq", "experts_ean")
FORMAT = "star-elastic-importance"
FORMAT_VERSION = "1"


def layer_key(i: int, axis: str) -> str:
    return f"layers.{i}.{axis}"


def _quiet() -> bool:
    return bool(os.environ.get("STAR_ELASTIC_QUIET"))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _is_sharded(model) -> bool:
    """Whether any part of `model` is an FSDP2 unit: its forward is then a collective."""
    return _distributed() and any(parallel.is_sharded(m) for m in model.modules())


def _most(n: int, device) -> int:
    """The largest `n` over all ranks."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _idle_forward(model, device) -> None:
    """A one-token forward, run by a rank out of batches so that the sharded forwards of the
    others (which gather parameters from every rank) find it; what it computes is dropped."""
    model(torch.zeros(1, 1, dtype=torch.long, device=device))


# ----------------------------------------------------------------------------- model structure

class _Layer:
    """The scorable parts of one decoder layer, found by module class (None where absent)."""

    def __init__(self, index: int, layer: nn.Module):
        self.index = index
        self.norms, self.attn, self.mamba, self.mlp, self.moe = [], None, None, None, None
        if isinstance(layer, LlamaLayer):
            self.norms = [layer.input_layernorm, layer.post_attention_layernorm]
            self.attn, self.mlp = layer.self_attn, layer.mlp
            return
        self.norms = [layer.norm]
        mixer = layer.mixer
        if isinstance(mixer, Attention):
            self.attn = mixer
        elif isinstance(mixer, Mamba2):
            self.mamba = mixer
        elif isinstance(mixer, MoE):
            self.moe = mixer
        elif isinstance(mixer, MLP):
            self.mlp = mixer
        else:
            raise TypeError(f"layer {index}: unknown mixer {type(mixer).__name__}")

    def key(self, axis: str) -> str:
        return layer_key(self.index, axis)


def _layers(model) -> list[_Layer]:
    return [_Layer(i, layer) for i, layer in enumerate(model.model.layers)]


def _hidden_size(model) -> int:
    return model.embed.weight.shape[1]


def _unit_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every score key a model has (optional ones included) and its shape."""
    shapes = {"hidden": (_hidden_size(model),)}
    for L in _layers(model):
        if L.attn is not None:
            shapes[L.key("attn_heads")] = (L.attn.num_heads,)
        if L.mamba is not None:
            shapes[L.key("mamba_heads")] = (L.mamba.num_heads,)
            shapes[L.key("mamba_channels")] = (L.mamba.head_dim,)
        if L.mlp is not None:
            shapes[L.key("ffn")] = (L.mlp.up_proj.out_features,)
        if L.moe is not None:
            e, i = L.moe.experts.up_proj.shape[:2]
            shapes[L.key("shared_ffn")] = (L.moe.shared_experts.up_proj.out_features,)
            for axis in ("experts", "experts_freq", "experts_ean"):
                shapes[L.key(axis)] = (e,)
            shapes[L.key("expert_ffn")] = (e, i)
    return shapes


def _meta(model, method: str, **extra) -> dict:
    cfg = model.config
    return {"family": cfg.family, "layer_types": cfg.layer_types, "num_layers": len(model.model.layers),
            "hidden_size": _hidden_size(model), "method": method, **extra}


# ----------------------------------------------------------------------------- accumulation

class _Sums:
    """Named float64 accumulators (sums of squares, sums, counts), created up front so that every
    rank holds the same tensors in the same order for the all-reduce."""

    def __init__(self):
        self.t: dict[str, torch.Tensor] = {}
        self.paused = False  # during a rank's idle forwards (see _idle_forward)

    def new(self, name: str, shape, device) -> None:
        self.t[name] = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, name: str, value: torch.Tensor) -> None:
        if not self.paused:
            self.t[name] += value.to(torch.float64)

    def all_reduce(self) -> None:
        """Sum every accumulator over ranks with one collective."""
        if not _distributed() or not self.t:
            return
        names = list(self.t)  # insertion order: identical on every rank (same model)
        flat = torch.cat([self.t[n].flatten() for n in names])
        torch.distributed.all_reduce(flat)
        for n, piece in zip(names, flat.split([self.t[n].numel() for n in names])):
            self.t[n] = piece.view_as(self.t[n])


def _seq_sumsq(a: torch.Tensor) -> torch.Tensor:
    """(b, t, ...) -> (...): per sequence the mean over tokens of |a|, squared and summed over
    sequences (the root is taken at the end: L2 over the batch)."""
    per_seq = a.float().abs().mean(dim=1)
    return per_seq.double().square().sum(0)


def _accumulate_experts(experts: Experts, x, idx, weights, sums: _Sums, prefix: str) -> None:
    """REAP, frequency, EAN and per-expert neuron statistics for one call of an Experts module.

    x: (T, D) tokens as the experts see them; idx, weights: (T, k) the router's choices and gate
    weights. Each expert runs only on its own routed tokens, one expert at a time, so temporaries
    are at most (T*k, D) (the routed copies, as the model's own forward makes) and (tokens of one
    expert, I): never experts x tokens.

    Called from the Experts module's forward pre-hook: in a model sharded by FSDP2 its parameters
    are then the whole ones that FSDP gathered for the forward (FSDP's own pre-hook runs first), so
    full_tensor is a no-op there; it gathers only if a caller runs this outside the forward.
    """
    up, down = parallel.full_tensor(experts.up_proj), parallel.full_tensor(experts.down_proj)
    if sums.paused:  # an idle forward (after the gathers: on every rank the same collectives)
        return
    T, k = idx.shape
    E, I = up.shape[:2]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)  # assignments grouped by expert
    counts = torch.bincount(flat, minlength=E)
    xs = x[order // k]  # (T*k, D): each token once per expert that chose it, as the model does
    norms, neurons = [], []
    for j, xe in enumerate(xs.split(counts.tolist())):
        if len(xe):
            h = xe @ up[j].T  # (n_j, I)
            norms.append((experts.act(h) @ down[j].T).float().norm(dim=-1))  # ||f_j||, pre-gate
            neurons.append(h.float().abs().sum(0))
    # Per-assignment values -> per-expert sums with a few scatter-adds, not per-expert kernels.
    norm = torch.cat(norms).double() if norms else x.new_zeros(0, dtype=torch.float64)
    expert = flat[order]
    gate = weights.reshape(-1)[order].double()
    zeros = torch.zeros(E, dtype=torch.float64, device=x.device)
    reap = zeros.index_add(0, expert, gate * norm)
    ean = zeros.index_add(0, expert, norm)
    routed = counts.nonzero().flatten()
    neuron_sums = torch.zeros(E, I, dtype=torch.float64, device=x.device)
    if neurons:
        neuron_sums.index_copy_(0, routed, torch.stack(neurons).double())
    sums.add(prefix + "reap", reap)
    sums.add(prefix + "ean", ean)
    sums.add(prefix + "count", counts)
    sums.add(prefix + "neurons", neuron_sums)
    sums.add(prefix + "tokens", torch.tensor(float(T)))


def _call_args(args, kwargs, names):
    """Positional-or-keyword arguments of a hooked call, by name."""
    return list(args[:len(names)]) + [kwargs[n] for n in names[len(args):]]


class _Hooks:
    """Hook handles that are all removed on exit, error or not."""

    def __init__(self):
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # The wrappers return None: a hook that returned a value would replace the module's
    # input or output.
    def output(self, module, fn):  # fn(output)
        def hook(m, args, out):
            fn(out)
        self.handles.append(module.register_forward_hook(hook))

    def input(self, module, fn):  # fn(first positional input)
        def hook(m, args):
            fn(args[0])
        self.handles.append(module.register_forward_pre_hook(hook))


def _register(model, hooks: _Hooks, sums: _Sums) -> None:
    """Attach one statistics hook per scored activation."""
    dev = model.embed.weight.device
    for L in _layers(model):
        for n, norm in enumerate(L.norms):
            name = f"{L.key('norm')}{n}"
            sums.new(name, norm.weight.shape, dev)
            hooks.output(norm, lambda out, name=name: sums.add(name, _seq_sumsq(out)))

        if L.attn is not None:
            attn, name = L.attn, L.key("attn_heads")
            sums.new(name, (attn.num_heads,), dev)

            def heads(o_in, attn=attn, name=name):  # o_proj input (b, t, heads * head_dim)
                per_head = o_in.unflatten(-1, (attn.num_heads, attn.head_dim)).float().norm(dim=-1)
                sums.add(name, _seq_sumsq(per_head))
            hooks.input(attn.o_proj, heads)

        if L.mamba is not None:
            mamba, name = L.mamba, L.key("mamba")
            sums.new(name, (mamba.num_heads, mamba.head_dim), dev)

            def xbranch(out, mamba=mamba, name=name):  # in_proj output: z | x | B | C | dt
                s = out[..., mamba.rows["x"]].unflatten(-1, (mamba.num_heads, mamba.head_dim))
                sums.add(name, _seq_sumsq(s))
            hooks.output(mamba.in_proj, xbranch)

        if L.mlp is not None:
            _register_mlp(L.mlp, L.key("ffn"), hooks, sums, dev)

        if L.moe is not None:
            moe, prefix = L.moe, L.key("moe.")
            _register_mlp(moe.shared_experts, L.key("shared_ffn"), hooks, sums, dev)
            E, I = moe.experts.up_proj.shape[:2]
            for name, shape in (("reap", E), ("ean", E), ("count", E), ("neurons", (E, I)), ("tokens", ())):
                sums.new(prefix + name, shape, dev)

            def routed(module, args, kwargs, prefix=prefix):
                x, idx, weights = _call_args(args, kwargs, ("x", "idx", "weights"))
                _accumulate_experts(module, x, idx, weights, sums, prefix)
            hooks.handles.append(moe.experts.register_forward_pre_hook(routed, with_kwargs=True))


def _register_mlp(mlp: MLP, name: str, hooks: _Hooks, sums: _Sums, dev) -> None:
    sums.new(name, (mlp.up_proj.out_features,), dev)
    if mlp.gated:
        # Gated: up_proj's output alone ignores the gate, which can silence a neuron; the
        # down_proj input act(gate) * up is what the neuron actually contributes.
        hooks.input(mlp.down_proj, lambda a: sums.add(name, _seq_sumsq(a)))
    else:
        # Non-gated: Minitron's |X W1_i^T|, the up_proj output before the activation.
        hooks.output(mlp.up_proj, lambda out: sums.add(name, _seq_sumsq(out)))


def _finalize(model, sums: _Sums, mamba_channel_keep: int | None) -> dict:
    s = {n: t.to(torch.float32) for n, t in sums.t.items()}
    hidden = torch.zeros(_hidden_size(model))
    scores = {}
    for L in _layers(model):
        for n in range(len(L.norms)):  # per-norm L2 over sequences, summed over layers
            hidden += s[f"{L.key('norm')}{n}"].sqrt().cpu()
        if L.attn is not None:
            scores[L.key("attn_heads")] = s[L.key("attn_heads")].sqrt()
        if L.mamba is not None:
            a = s[L.key("mamba")].sqrt()  # (heads, head_dim)
            channels = a.norm(dim=0)
            keep = channels.argsort(descending=True)[:mamba_channel_keep]  # [:None] keeps all
            scores[L.key("mamba_heads")] = a[:, keep].norm(dim=1)
            scores[L.key("mamba_channels")] = channels
        if L.mlp is not None:
            scores[L.key("ffn")] = s[L.key("ffn")].sqrt()
        if L.moe is not None:
            p = L.key("moe.")
            count = s[p + "count"]
            routed = count.clamp(min=1)  # never-chosen experts: sums are 0, so their scores are 0
            scores[L.key("shared_ffn")] = s[L.key("shared_ffn")].sqrt()
            scores[L.key("experts")] = s[p + "reap"] / routed
            scores[L.key("experts_freq")] = count / count.sum().clamp(min=1)
            scores[L.key("experts_ean")] = s[p + "ean"] / s[p + "tokens"].clamp(min=1)
            scores[L.key("expert_ffn")] = s[p + "neurons"] / routed[:, None]
    scores = {"hidden": hidden, **{k: v.cpu() for k, v in scores.items()}}
    return scores


# ----------------------------------------------------------------------------- depth

@contextlib.contextmanager
def _skipped(model, layers):
    """Run with the given layers replaced by the identity (a hook returning the layer input)."""
    def identity(module, args, kwargs, output):
        return args[0] if args else kwargs["x"]
    handles = [model.model.layers[j].register_forward_hook(identity, with_kwargs=True) for j in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _depth_order(model, batches: list[torch.Tensor], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterative normalised-MSE layer removal. Each round scores every remaining layer j by
    sum (M_full - M_{-(removed + j)})^2 / sum M_full^2 over the logits of the original model,
    removes the lowest, and repeats: L(L+1)/2 forwards per batch. Ties go to the lower index.
    A sharded model: a rank with fewer batches than another adds idle forwards to each trial."""
    num_layers = len(model.model.layers)
    device = model.embed.weight.device
    idle = _most(len(batches), device) - len(batches) if _is_sharded(model) else 0

    def idle_forwards():  # after this rank's batches, as many forwards as the rank with the most
        for _ in range(idle):
            _idle_forward(model, device)

    full = [model(b) for b in batches]  # reference logits, kept for all rounds
    idle_forwards()
    denom = sum((f.double().square().sum() for f in full), torch.zeros((), dtype=torch.float64, device=device))
    remaining, order, at_removal = list(range(num_layers)), [], []
    bar = tqdm(total=num_layers * (num_layers + 1) // 2, desc="depth importance", unit="trial",
               disable=not progress)
    with bar:
        while remaining:
            err = torch.zeros(len(remaining), dtype=torch.float64, device=denom.device)
            for c, j in enumerate(remaining):
                with _skipped(model, order + [j]):
                    for b, f in zip(batches, full):
                        err[c] += (model(b) - f).double().square().sum()
                    idle_forwards()
                bar.update(1)
            if _distributed():  # one collective per round; all ranks then pick the same layer
                both = torch.cat([err, denom[None]])
                torch.distributed.all_reduce(both)
                err, total = both[:-1], both[-1]
            else:
                total = denom
            score = err / total.clamp(min=1e-30)
            c = int(score.argmin())
            order.append(remaining.pop(c))
            at_removal.append(float(score[c]))
    return torch.tensor(order, dtype=torch.long), torch.tensor(at_removal, dtype=torch.float32)


# ----------------------------------------------------------------------------- public API

@torch.no_grad()
def estimate_importance(model, batches, *, depth: bool = False, depth_batches: int = 2,
                        mamba_channel_keep: int | None = None, num_batches: int | None = None,
                        progress: bool = True) -> dict:
    """Activation importance of every unit over `batches` (LongTensor (b, t) token ids, any device).

    depth: also rank layers by iterative normalised MSE on the first `depth_batches` batches
    (L(L+1)/2 forwards each) -> "layer_order" (least important first), "layer_scores".
    mamba_channel_keep: score Mamba heads on their top-k channels only (default: all channels).
    num_batches: stop after this many (needed for endless iterators such as TokenBatches).
    Under torch.distributed every rank passes its own share of the data (any number of batches,
    none included) and gets the result for the union. The model may be sharded by FSDP2.
    Statistics are accumulated in float64 whatever the model's dtype.
    """
    if mamba_channel_keep is not None and mamba_channel_keep < 1:
        raise StarElasticError(f"mamba_channel_keep must be at least 1, got {mamba_channel_keep}")
    if depth and depth_batches < 1:
        raise StarElasticError(f"depth importance needs depth_batches of at least 1, got {depth_batches}")
    device = model.embed.weight.device
    show = progress and not _quiet() and _rank() == 0
    total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    sharded = _is_sharded(model)
    sums, kept = _Sums(), []
    sums.new("sequences", (), device)
    sums.new("tokens", (), device)
    with _Hooks() as hooks, tqdm(total=total, desc="importance", unit="batch", disable=not show) as bar, \
            parallel.compute_autocast(model):
        _register(model, hooks, sums)
        if num_batches is not None:  # islice: never draw a batch past the last one used
            batches = itertools.islice(batches, num_batches)
        batches = iter(batches)
        while True:
            batch = next(batches, None)
            # sharded: one forward per step on every rank, while any rank has a batch left
            if sharded and not _most(batch is not None, device):
                break
            if batch is None and not sharded:
                break
            if batch is None:
                sums.paused = True
                _idle_forward(model, device)
                sums.paused = False
                continue
            batch = batch.to(device)
            if batch.dim() != 2:
                raise StarElasticError(f"expected token batches of shape (batch, seq), got {tuple(batch.shape)}")
            model(batch)
            sums.add("sequences", torch.tensor(float(batch.shape[0])))
            sums.add("tokens", torch.tensor(float(batch.numel())))
            if depth and len(kept) < depth_batches:
                kept.append(batch)
            bar.update(1)
    sums.all_reduce()
    if sums.t["sequences"].item() == 0:
        raise StarElasticError("importance estimation got no calibration batches")
    scores = _finalize(model, sums, mamba_channel_keep)
    scores["meta"] = _meta(model, "activation", sequences=int(sums.t["sequences"].item()),
                           tokens=int(sums.t["tokens"].item()), mamba_channel_keep=mamba_channel_keep)
    if depth:  # a rank without batches takes part with none (every rank's collectives still run)
        with parallel.compute_autocast(model):
            scores["layer_order"], scores["layer_scores"] = _depth_order(model, kept, show)
    return scores


def _sumsq(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares of w over every dimension but `dim`."""
    w = w.detach().double()
    return w.square().sum(dim=[d for d in range(w.dim()) if d != dim % w.dim()])


@torch.no_grad()
def weight_magnitude_importance(model) -> dict:
    """Baseline: each unit's score is the L2 norm of the weights it owns (the rows it writes in
    the projection into its space and the columns it reads in the projection out of it).

    Same keys as `estimate_importance` except the activation-only expert baselines and depth.
    A model sharded by FSDP2: each weight is gathered whole when its turn comes, one at a time
    (a collective: every rank calls this).
    """
    hidden = torch.zeros(_hidden_size(model), dtype=torch.float64)
    seen = set()

    def channel(p, dim, w=None):  # hidden channel c owns p's slice c along `dim`; tied weights count once
        nonlocal hidden
        if id(p) not in seen:
            seen.add(id(p))
            hidden += _sumsq(_whole(p) if w is None else w, dim).cpu()

    channel(model.embed.weight, 1)
    channel(model.lm_head.weight, 1)
    scores = {}
    for L in _layers(model):
        if L.attn is not None:
            a = L.attn
            q = _whole(a.q_proj.weight)
            channel(a.q_proj.weight, 1, q)
            for proj in (a.k_proj, a.v_proj):
                channel(proj.weight, 1)
            o = _whole(a.o_proj.weight)
            channel(a.o_proj.weight, 0, o)
            heads = _sumsq(q.unflatten(0, (a.num_heads, a.head_dim)), 0) \
                + _sumsq(o.unflatten(1, (a.num_heads, a.head_dim)), 1)
            scores[L.key("attn_heads")] = heads.sqrt()
        if L.mamba is not None:
            m = L.mamba
            w, out = _whole(m.in_proj.weight).double(), _whole(m.out_proj.weight).double()
            channel(m.in_proj.weight, 1, w)
            channel(m.out_proj.weight, 0, out)
            d, hp = m.num_heads * m.head_dim, (m.num_heads, m.head_dim)
            per = (w[:d].unflatten(0, hp).square().sum(-1)  # z rows
                   + w[d:2 * d].unflatten(0, hp).square().sum(-1)  # x rows
                   + out.unflatten(1, hp).square().sum(0))  # out_proj columns
            dt = w[-m.num_heads:].square().sum(-1)  # the head's dt row
            scores[L.key("mamba_heads")] = (per.sum(1) + dt).sqrt()
            scores[L.key("mamba_channels")] = per.sum(0).sqrt()
            del w, out
        if L.mlp is not None:
            scores[L.key("ffn")] = _mlp_weight_scores(L.mlp, channel)
        if L.moe is not None:
            moe = L.moe
            channel(moe.gate.weight, 1)
            scores[L.key("shared_ffn")] = _mlp_weight_scores(moe.shared_experts, channel)
            if moe.latent:
                channel(moe.fc1_latent_proj.weight, 1)
                channel(moe.fc2_latent_proj.weight, 0)
            up = _whole(moe.experts.up_proj).double()
            neurons = up.square().sum(2)  # (E, I)
            if not moe.latent:
                channel(moe.experts.up_proj, 2, up)
            up = None  # one expert stack whole at a time
            down = _whole(moe.experts.down_proj).double()
            neurons += down.square().sum(1)
            if not moe.latent:
                channel(moe.experts.down_proj, 1, down)
            down = None
            scores[L.key("experts")] = neurons.sum(1).sqrt()
            scores[L.key("expert_ffn")] = neurons.sqrt()
    scores = {"hidden": hidden.sqrt(), **scores}
    scores = {k: v.float().cpu() for k, v in scores.items()}
    scores["meta"] = _meta(model, "weight")
    return scores


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A weight whole: gathered from its FSDP2 shards (a collective), or itself."""
    return parallel.full_tensor(p.detach())


def _mlp_weight_scores(mlp: MLP, channel) -> torch.Tensor:
    projs = [mlp.up_proj] + ([mlp.gate_proj] if mlp.gated else [])
    ws = [_whole(p.weight) for p in projs]
    down = _whole(mlp.down_proj.weight)
    for p, w in zip(projs, ws):
        channel(p.weight, 1, w)
    channel(mlp.down_proj.weight, 0, down)
    return (sum(_sumsq(w, 0) for w in ws) + _sumsq(down, 1)).sqrt()


def random_importance(model, seed: int = 0) -> dict:
    """Baseline: uniform random scores of the right shapes, and a random layer order."""
    g = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(shape, generator=g) for k, shape in _unit_shapes(model).items()
              if k.rsplit(".", 1)[-1] not in OPTIONAL_AXES}
    n = len(model.model.layers)
    scores["layer_order"] = torch.randperm(n, generator=g)
    scores["layer_scores"] = torch.rand(n, generator=g).sort().values
    scores["meta"] = _meta(model, "random", seed=seed)
    return scores


# ----------------------------------------------------------------------------- checks and files

def check_scores(scores: dict, model) -> None:
    """Raise StarElasticError unless `scores` fit `model`: same family and layer count, every
    required key present, every key known, every shape right, layer_order a permutation."""
    meta = scores.get("meta", {})
    n = len(model.model.layers)
    if meta.get("family") not in (None, model.config.family):
        raise StarElasticError(f"scores are for a {meta['family']} model, not {model.config.family}")
    if meta.get("num_layers") not in (None, n):
        raise StarElasticError(f"scores are for {meta['num_layers']} layers, the model has {n}")
    shapes = _unit_shapes(model)
    missing = [k for k in shapes if k not in scores and k.rsplit(".", 1)[-1] not in OPTIONAL_AXES]
    if missing:
        raise StarElasticError(f"scores lack {len(missing)} entries for this model, e.g. {missing[0]}")
    for k, v in scores.items():
        if k == "meta":
            continue
        if k in ("layer_order", "layer_scores"):
            if tuple(v.shape) != (n,):
                raise StarElasticError(f"scores: {k} has shape {tuple(v.shape)}, expected ({n},)")
            if k == "layer_order" and sorted(v.tolist()) != list(range(n)):
                raise StarElasticError(f"scores: layer_order is not a permutation of the {n} layers")
        elif k not in shapes:
            raise StarElasticError(f"scores: entry {k} matches no unit of this model")
        elif tuple(v.shape) != shapes[k]:
            raise StarElasticError(f"scores: {k} has shape {tuple(v.shape)}, the model needs {shapes[k]}")


def permuted_scores(scores: dict, perms: dict[str, torch.Tensor]) -> dict:
    """`scores` re-ordered by the permutations `sort_model` applied, so that entry j of every axis
    scores the sorted model's unit j (a budget's kept prefix is then a prefix of its scores)."""
    out = {}
    for key, s in scores.items():
        if key == "meta":
            out[key] = {**s, "order": "sorted"}
            continue
        layer, _, axis = key.rpartition(".")
        if axis in ("experts_freq", "experts_ean"):  # the baselines follow the experts' order
            axis = "experts"
        perm = perms.get(f"{layer}.{axis}" if layer else key)
        if axis == "expert_ffn" and s.dim() == 2:  # neurons per expert, then the experts themselves
            if perm is not None:
                s = s.gather(1, perm.expand_as(s) if perm.dim() == 1 else perm)
            perm = perms.get(f"{layer}.experts")
        out[key] = s if perm is None else s[perm]
    return out


def save_scores(scores: dict, path) -> Path:
    """Write scores as safetensors; "meta" (family, layer count, ...) goes into the header."""
    path = Path(path)
    meta = scores.get("meta", {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in scores.items() if k != "meta"}
    header = {"format": "pt", "star_elastic": FORMAT, "version": FORMAT_VERSION,
              "family": str(meta.get("family", "")), "num_layers": str(meta.get("num_layers", "")),
              "meta": json.dumps(meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)  # a crash never leaves a half-written scores file under the real name
    return path


def load_scores(path) -> dict:
    """Read a file written by `save_scores`; StarElasticError if it is anything else."""
    path = Path(path)
    if not path.is_file():
        raise StarElasticError(f"{path}: no such scores file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("star_elastic") != FORMAT:
                raise StarElasticError(f"{path}: not a star-elastic importance scores file")
            if header.get("version") != FORMAT_VERSION:
                raise StarElasticError(f"{path}: scores format version {header.get('version')!r}, "
                                       f"this star-elastic reads {FORMAT_VERSION!r}")
            scores = {k: f.get_tensor(k) for k in f.keys()}
            scores["meta"] = json.loads(header.get("meta", "{}"))
    except StarElasticError:
        raise
    except Exception as e:  # safetensors' errors on truncated or foreign files vary by type
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StarElasticError(f"{path}: not a readable scores file ({first})") from None
    return scores
