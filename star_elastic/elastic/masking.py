"""Masked execution: a sub-network of the parent run inside the full-size model, applied from
outside it (docs/METHOD.md §5). Training, the architecture search and the checks run budgets so;
the model itself (model.py) knows nothing of masks.

`masked(model, masks)` is the one way in: the model runs under `masks` inside the `with` block and
is back to the full model afterwards, whatever happens. Masks are per-unit weights: 1 keep, 0 drop,
or fractional (the router's soft masks; gradients flow into them). Keys, each optional (missing =
keep all; `mask_shapes` lists them for a model):
  "hidden" (hidden_size,)       embedding channels, for the whole model
  "layers.{i}" ()               depth: 0 makes layer i the identity, a fraction scales its updates
  "layers.{i}.{axis}" (units,)  axis: attn_heads, mamba_heads, mamba_channels, ffn, experts,
                                expert_ffn (same neurons in every expert), shared_ffn
`ElasticSpec.masks` builds hard ones; the router (router.py) hard or soft ones.

Each mask acts where slicing cuts (the boundaries importance.py reads), by a module swap: the
module's class is replaced in place by a subclass that overrides one small method of the plain
module (Mamba's gated norm: its channel scale), or that multiplies its input or output
(`_ScaledInput`, `_ScaledOutput` mixed into whatever class the module has), and put back on exit.
Swapping the class, not the module, keeps every parameter where it is, so optimisers, FSDP's shards
(parallel.py) and hooks see the same modules. Not hooks: torch.compile does not guard on a module's
hooks, so a layer compiled unmasked would go on running unmasked under a hook; it guards on classes.
  hidden          the embeddings' output and every residual update scaled (with depth); every
                  RMSNorm becomes `MaskedRMSNorm` (mean of squares over the kept channels)
  layers.{i}      the layer's residual updates (its mixers' outputs) scaled; a hard 0 (no gradient)
                  makes the layer the identity
  attn_heads      each query head's channels scaled at o_proj's input
  ffn, shared_ffn the neurons scaled at down_proj's input
  mamba_heads,    the gated norm becomes `MaskedGatedRMSNorm`: dropped heads / channels zeroed, each
  mamba_channels  group normalised over its kept channels (heads and channels are independent
                  SSMs up to there)
  experts         the router becomes `MaskedTopkRouter`: dropped experts are never chosen, the
                  chosen experts' weights scaled by their mask
  expert_ffn      the experts become `MaskedExperts`: the neurons scaled after the activation
Applying or removing masks drops the model's captured decode graphs (`generate.forget_decode_steps`).
Masks index the plain model's units: a model in serving order (serve/order.py) refuses them.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn

from star_elastic.generate import forget_decode_steps
from star_elastic.model import (MLP, Attention, Experts, GatedRMSNorm, LlamaLayer, Mamba2, Model, MoE, RMSNorm,
                                TopkRouter)

# ----------------------------------------------------------------------------- masked modules


class MaskedRMSNorm(RMSNorm):
    """RMSNorm over an input that is zero on the dropped hidden channels: the mean of squares over the
    kept channels only, as the sliced model computes it. `mask` (hidden_size,)."""

    mask: torch.Tensor

    def mean_square(self, xf):
        return xf.pow(2).sum(-1, keepdim=True) / self.mask.float().sum()


class MaskedGatedRMSNorm(GatedRMSNorm):
    """Mamba's gated norm with `head_mask` (heads,) and / or `channel_mask` (head_dim,) (either None):
    the dropped heads' and channels' outputs zeroed, each group normalised over its kept channels (its channel
    scale, which `model.gated_rms_norm` applies: so the layer recomputes the masked norm in backward too)."""

    head_mask: torch.Tensor | None
    channel_mask: torch.Tensor | None
    heads: int

    def channel_scale(self):
        unit = torch.ones(self.heads, self.weight.shape[0] // self.heads, device=self.weight.device)
        if self.head_mask is not None:
            unit = unit * self.head_mask.float()[:, None]
        if self.channel_mask is not None:
            unit = unit * self.channel_mask.float()
        return unit.flatten()


class MaskedTopkRouter(TopkRouter):
    """`mask` (n_routed_experts,): an expert at 0 is never chosen (before group selection too: groups
    rank their kept experts); a chosen expert's weight is scaled by its mask (1 under a hard mask)."""

    mask: torch.Tensor

    def select(self, choice):
        return super().select(choice.masked_fill(self.mask == 0, -torch.inf))

    def weigh(self, scores, idx):
        return super().weigh(scores, idx) * self.mask.float()[idx]


class MaskedExperts(Experts):
    """`mask` (moe_intermediate_size,): the same neurons of every expert scaled after the activation."""

    mask: torch.Tensor

    def neuron_scale(self):
        return self.mask


PLAIN = (RMSNorm, GatedRMSNorm, Attention, Mamba2, MLP, TopkRouter, Experts, MoE)

# ----------------------------------------------------------------------------- mixed-in scalings


class _ScaledInput:
    """Mixed into a projection's class (o_proj, down_proj): each of its input's units (`size`
    channels each) times `mask`, so the dropped heads or neurons contribute nothing."""

    mask: torch.Tensor
    size: int

    def forward(self, x, *args, **kwargs):
        m = self.mask.to(x.dtype)
        x = x * m if self.size == 1 else (x.unflatten(-1, (-1, self.size)) * m[:, None]).flatten(-2)
        return super().forward(x, *args, **kwargs)


class _ScaledOutput:
    """Mixed into the embeddings' or a mixer's class: the output times `scale` (per hidden channel,
    or a scalar)."""

    scale: torch.Tensor

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return out * self.scale.to(out.dtype)


class _Dropped:
    """Mixed into a layer's class: the identity, no compute at all (a hard-dropped layer)."""

    def forward(self, x, *args, **kwargs):
        return x


@functools.cache
def _mixed(mixin: type, cls: type) -> type:
    """`cls` with `mixin`'s forward in front, one class per pair. torch.compile guards on a module's
    class, so the same class every step means the same graph."""
    return type(mixin.__name__.strip("_") + cls.__name__, (mixin, cls), {})


class ClassSwaps:
    """Modules whose class was swapped in place, to put back (`undo`, last first): how masks are applied
    here, and the full budget's delta (delta.py). Attributes go in the instance dict directly: a mask or
    a delta that is an nn.Parameter must not become one of the module's parameters."""

    def __init__(self):
        self.done: list[tuple[nn.Module, type, list[str]]] = []

    def swap(self, module: nn.Module, cls: type, **attrs):
        self.done.append((module, type(module), list(attrs)))
        module.__class__ = cls
        vars(module).update(attrs)

    def mix(self, module: nn.Module, mixin: type, **attrs):
        """`module`'s own class with `mixin`'s forward in front."""
        self.swap(module, _mixed(mixin, type(module)), **attrs)

    def undo(self):
        for module, plain, attrs in reversed(self.done):
            module.__class__ = plain
            for name in attrs:
                vars(module).pop(name, None)
        self.done = []


def _mixers(layer: nn.Module) -> dict[str, nn.Module]:
    """A layer's mixers by kind: a Nemotron-H block's one, a Llama layer's attention and MLP."""
    if isinstance(layer, LlamaLayer):
        return {"*": layer.self_attn, "-": layer.mlp}
    return {layer.kind: layer.mixer}


def _targets(model: Model) -> dict[str, tuple[nn.Module, int]]:
    """Per-layer mask key -> (the mixer it acts on, number of units)."""
    targets = {}
    for i, layer in enumerate(model.model.layers):
        mods, key = _mixers(layer), f"layers.{i}."
        if "*" in mods:
            targets[key + "attn_heads"] = (mods["*"], mods["*"].num_heads)
        if "-" in mods:
            targets[key + "ffn"] = (mods["-"], mods["-"].down_proj.in_features)
        if "M" in mods:
            targets[key + "mamba_heads"] = (mods["M"], mods["M"].num_heads)
            targets[key + "mamba_channels"] = (mods["M"], mods["M"].head_dim)
        if "E" in mods:
            moe = mods["E"]
            targets[key + "experts"] = (moe, moe.experts.up_proj.shape[0])
            targets[key + "expert_ffn"] = (moe, moe.experts.up_proj.shape[1])
            targets[key + "shared_ffn"] = (moe.shared_experts, moe.shared_experts.down_proj.in_features)
    return targets


def mask_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """Every key `masked` takes for `model`, with the shape its mask must have."""
    shapes = {"hidden": (model.config.hidden_size,)}
    shapes.update({f"layers.{i}": () for i in range(len(model.model.layers))})
    shapes.update({k: (n,) for k, (_, n) in _targets(model).items()})
    return shapes


def _check(model: Model, masks: dict[str, torch.Tensor]):
    """ValueError for a key or shape `model` does not have, or a module that is not a plain one."""
    for name, m in model.named_modules():
        base = next((c for c in PLAIN if isinstance(m, c)), None)
        if base is not None and type(m) is not base:
            raise ValueError(f"{name or 'model'} is a {type(m).__name__}, not a plain {base.__name__}: masks index "
                             "the plain model's units (a model in serving order, serve/order.py, must be put back "
                             "with use_serving_order(model, False) first)")
    shapes = mask_shapes(model)
    unknown = sorted(set(masks) - set(shapes))
    if unknown:
        raise ValueError(f"unknown mask key(s) {unknown} for this model")
    for key, m in masks.items():
        if tuple(m.shape) != shapes[key]:
            raise ValueError(f"mask {key!r} has shape {tuple(m.shape)}, expected {shapes[key]}")


# ----------------------------------------------------------------------------- applying masks


class _Masking:
    """The masks applied to one model: the modules whose class was swapped, to put back."""

    def __init__(self, model: Model, masks: dict[str, torch.Tensor]):
        self.model, self.masks = model, masks
        self.swaps = ClassSwaps()
        try:
            self._apply()
        except BaseException:
            self.remove()
            raise

    def _apply(self):
        masks, model, swaps = self.masks, self.model, self.swaps
        hidden = masks.get("hidden")
        if hidden is not None:
            swaps.mix(model.embed, _ScaledOutput, scale=hidden)
            for module in model.modules():
                if isinstance(module, RMSNorm):
                    swaps.swap(module, MaskedRMSNorm, mask=hidden)
        for i, layer in enumerate(model.model.layers):
            depth = masks.get(f"layers.{i}")
            if depth is not None and not depth.requires_grad and bool(depth == 0):
                swaps.mix(layer, _Dropped)
                continue
            if depth is not None or hidden is not None:  # the weight of the layer's residual updates
                weight = hidden if depth is None else depth if hidden is None else depth * hidden
                for mixer in _mixers(layer).values():
                    swaps.mix(mixer, _ScaledOutput, scale=weight)
        for key, (module, _) in _targets(model).items():
            m = masks.get(key)
            if m is None:
                continue
            axis = key.rsplit(".", 1)[1]
            if axis == "attn_heads":
                swaps.mix(module.o_proj, _ScaledInput, mask=m, size=module.head_dim)
            elif axis in ("ffn", "shared_ffn"):
                swaps.mix(module.down_proj, _ScaledInput, mask=m, size=1)
            elif axis == "experts":
                swaps.swap(module.gate, MaskedTopkRouter, mask=m)
            elif axis == "expert_ffn":
                swaps.swap(module.experts, MaskedExperts, mask=m)
            else:  # mamba_heads, mamba_channels: one swap of the gated norm for both
                if type(module.norm) is not MaskedGatedRMSNorm:
                    swaps.swap(module.norm, MaskedGatedRMSNorm, heads=module.num_heads, head_mask=None,
                               channel_mask=None)
                vars(module.norm)["head_mask" if axis == "mamba_heads" else "channel_mask"] = m

    def remove(self):
        self.swaps.undo()


_ACTIVE: "weakref.WeakKeyDictionary[Model, _Masking]" = weakref.WeakKeyDictionary()


@contextmanager
def masked(model: Model, masks: dict[str, torch.Tensor]):
    """`model` running under `masks` (keys in the module doc; {} for none) inside the block, the full
    model again afterwards whatever happens. Nested blocks replace the outer masks and restore them
    on exit. Yields the model."""
    outer = _ACTIVE.pop(model, None)
    if outer is not None:
        outer.remove()
    try:
        _check(model, masks)
        _ACTIVE[model] = _Masking(model, masks)
    except BaseException:
        if outer is not None:
            _ACTIVE[model] = _Masking(model, outer.masks)
        raise
    changed = bool(masks) or (outer is not None and bool(outer.masks))
    if changed:
        forget_decode_steps(model)
    try:
        yield model
    finally:
        _ACTIVE.pop(model).remove()  # ours, or ours re-applied by a nested block on its way out
        if outer is not None:
            _ACTIVE[model] = _Masking(model, outer.masks)
        if changed:
            forget_decode_steps(model)


def is_masked(model: Model) -> bool:
    """Whether `model` runs under any mask now (inside a `masked` block with masks)."""
    active = _ACTIVE.get(model)
    return active is not None and bool(active.masks)
