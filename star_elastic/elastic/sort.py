"""Function-preserving sort: permute every elastic axis so that the most important unit comes first.

Permuting hidden channels, heads, neurons or experts consistently in every tensor that reads or
writes them leaves the model's function unchanged (RMSNorm is permutation-equivariant, routing
and attention do not depend on the order of experts or heads). After the sort every submodel is a
prefix of the parent (docs/METHOD.md §4-§5).
"""

from __future__ import annotations

import re

import torch

from star_elastic.errors import StarElasticError
from star_elastic.model import Model, ModelConfig

from .axes import UNIT_KEYS
from .slicing import take
from .spec import unit_counts

# Score keys the sort uses, per layer ("layers.{i}.{axis}"); other keys (depth order, expert
# baselines, metadata) are ignored.
SORTED_AXES = UNIT_KEYS  # every per-layer axis


def _descending(s: torch.Tensor) -> torch.Tensor:
    """Most important first along the last dim; ties keep their order, so equal scores change nothing."""
    return torch.sort(s, dim=-1, descending=True, stable=True).indices


def _within_groups(s: torch.Tensor, groups: int) -> torch.Tensor:
    """Sort units inside each of `groups` contiguous groups; the groups stay where they are."""
    per = s.numel() // groups
    return (torch.arange(groups)[:, None] * per + _descending(s.view(groups, per))).flatten()


def permutations(cfg: ModelConfig, scores: dict, experts_key: str = "experts") -> dict[str, torch.Tensor]:
    """Per-axis permutations (new order of parent units) from importance scores (higher = more
    important), keyed like `ElasticSpec.indices`. `experts_key` picks the expert score to rank by
    (e.g. "experts_freq" or "experts_ean" for the baselines)."""
    counts = unit_counts(cfg)
    perms = {}
    for key, s in scores.items():
        if key == "hidden":
            layer, axis = None, "hidden"
        else:
            m = re.fullmatch(r"layers\.(\d+)\.(\w+)", key)
            if m is None:
                continue
            layer, axis = int(m.group(1)), m.group(2)
            if axis == experts_key:
                axis = "experts"
            elif axis == "experts" or axis not in SORTED_AXES:
                continue
            key = f"layers.{layer}.{axis}"
            if layer >= cfg.num_layers or key not in counts:
                raise StarElasticError(f"importance scores: {key} does not match the model "
                                       f"(layer types {cfg.layer_types!r})")
        s = torch.as_tensor(s).detach().float().cpu()
        n = counts[key]
        want = (counts[f"layers.{layer}.experts"], n) if axis == "expert_ffn" and s.dim() == 2 else (n,)
        if tuple(s.shape) != want:
            raise StarElasticError(f"importance scores: {key} has shape {tuple(s.shape)}, the model has {want}")
        c = cfg if layer is None else cfg.layer(layer)
        if axis == "attn_heads":  # KV groups by their heads' total score, then heads within each group
            per = c.num_attention_heads // c.num_key_value_heads
            grouped = s.view(c.num_key_value_heads, per)
            groups = _descending(grouped.sum(-1))
            perms[key] = (groups[:, None] * per + _descending(grouped)[groups]).flatten()
            perms[f"layers.{layer}.kv_heads"] = groups
        elif axis == "mamba_heads":  # B and C are shared within a group: heads never leave theirs
            perms[key] = _within_groups(s, c.n_groups)
        elif axis == "experts":  # the router's groups are fixed blocks of experts
            perms[key] = _within_groups(s, c.n_group)
        else:  # hidden, mamba_channels, ffn, shared_ffn; expert_ffn per expert when (E, I)
            perms[key] = _descending(s)
    return perms


@torch.no_grad()
def sort_model(model: Model, scores: dict, experts_key: str = "experts") -> dict[str, torch.Tensor]:
    """Reorder `model` in place by importance `scores` (keys "hidden", "layers.{i}.{axis}" as
    `importance.estimate_importance` writes them; missing axes stay as they are). Returns the
    permutations applied. Masks set on the model refer to the old order: set them again after."""
    perms = permutations(model.config, scores, experts_key)
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen:  # tied embeddings / lm_head: one tensor, permuted once
            continue
        seen.add(t.data_ptr())
        t = t.detach()
        new = take(name, t, model.config, perms)
        if new is not t:
            t.copy_(new)
    return perms
