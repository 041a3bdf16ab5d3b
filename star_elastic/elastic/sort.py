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
from .layout import apply_plan, index_plan  # noqa: F401  (re-exported: sharded_sort and tests import them here)
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


def check_permutations(cfg: ModelConfig, perms: dict[str, torch.Tensor]) -> None:
    """Raise StarElasticError unless `perms` (keyed like `permutations` returns them) are permutations
    of the model's units that keep its function: query heads inside their KV group (which moves with
    "kv_heads"), Mamba heads inside their group, experts inside their router group."""
    counts = unit_counts(cfg)
    for key, p in perms.items():
        if key not in counts:
            raise StarElasticError(f"permutation {key}: no such axis in this model (layer types {cfg.layer_types!r})")
        n = counts[key]
        p = torch.as_tensor(p)
        per_expert = key.endswith(".expert_ffn") and p.dim() == 2  # one neuron order per expert
        want = (counts[key.replace("expert_ffn", "experts")], n) if per_expert else (n,)
        if tuple(p.shape) != want or p.is_floating_point() \
                or not torch.equal(p.sort(-1).values, torch.arange(n).expand(want)):
            raise StarElasticError(f"permutation {key}: expected a permutation of the model's {n} units "
                                   f"(shape {want}), got shape {tuple(p.shape)}")
    for key, n in counts.items():  # grouped axes: a unit may move only inside its group
        layer, _, axis = key.rpartition(".")
        if not layer:
            continue  # hidden channels: any order
        c = cfg.layer(int(layer.split(".")[1]))
        if axis == "attn_heads" and (key in perms or f"{layer}.kv_heads" in perms):
            per = n // c.num_key_value_heads
            q = torch.as_tensor(perms.get(key, torch.arange(n))).view(-1, per) // per  # each head's KV group
            kv = torch.as_tensor(perms.get(f"{layer}.kv_heads", torch.arange(c.num_key_value_heads)))
            if not torch.equal(q, kv[:, None].expand_as(q)):
                raise StarElasticError(f"permutation {key}: query heads must stay in their KV group, "
                                       f"and the groups move as {layer}.kv_heads says")
        groups = {"mamba_heads": c.n_groups, "experts": c.n_group}.get(axis)
        if groups and key in perms:
            size = n // groups
            if not torch.equal(torch.as_tensor(perms[key]) // size, torch.arange(n) // size):
                raise StarElasticError(f"permutation {key}: units must stay in their {groups} groups of {size}")


# ----------------------------------------------------------------------------- which rows and columns

@torch.no_grad()
def sort_model(model: Model, scores: dict, experts_key: str = "experts") -> dict[str, torch.Tensor]:
    """Reorder `model` in place by importance `scores` (keys "hidden", "layers.{i}.{axis}" as
    `importance.estimate_importance` writes them; missing axes stay as they are). Returns the
    permutations applied. Masks set on the model refer to the old order: set them again after.
    A parent too big for one device is sorted as it is loaded instead: sharded_sort.load_sorted."""
    perms = permutations(model.config, scores, experts_key)
    apply_permutations(model, perms)
    return perms


@torch.no_grad()
def apply_permutations(model: Model, perms: dict[str, torch.Tensor]) -> Model:
    """Reorder `model` in place by `perms` (as `sort_model` returns them, or as an elastic checkpoint stores the
    order its parent was sorted in: checkpoint.read_parent_order), checked to keep its function first."""
    check_permutations(model.config, perms)
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen:  # tied embeddings / lm_head: one tensor, permuted once
            continue
        seen.add(t.data_ptr())
        plan = index_plan(name, model.config, perms)
        if plan:
            t.detach().copy_(apply_plan(t.detach(), plan))
    return model
