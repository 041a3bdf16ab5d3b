"""The elastic axes, named once (docs/METHOD.md §2). Every module that cuts, masks, scores, sorts,
costs or searches an axis reads it from here.

An axis has the user's name (`--axes`), the ElasticSpec / ModelConfig field that holds its kept
size, and, for per-layer axes, the key its unit masks and importance scores go by
(`layers.{i}.<key>`); hidden channels and depth are model-wide and have none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Axis:
    name: str
    field: str  # ElasticSpec / ModelConfig size field ("layers" for depth)
    key: str | None  # per-layer mask and score key; None for the model-wide axes
    cuts: str  # what a smaller size removes, for help texts


AXES: dict[str, Axis] = {a.name: a for a in (
    Axis("hidden", "hidden_size", None, "embedding channels (hidden_size)"),
    Axis("attention", "num_attention_heads", "attn_heads",
         "attention query heads, evenly inside the KV groups, then whole KV groups"),
    Axis("mamba", "mamba_num_heads", "mamba_heads", "Mamba heads, the same number in every group"),
    Axis("mamba_channels", "mamba_head_dim", "mamba_channels", "channels of every Mamba head (mamba_head_dim)"),
    Axis("ffn", "intermediate_size", "ffn", "dense FFN neurons (intermediate_size)"),
    Axis("experts", "n_routed_experts", "experts", "routed experts of every MoE layer"),
    Axis("expert_ffn", "moe_intermediate_size", "expert_ffn", "FFN neurons of every routed expert"),
    Axis("shared_ffn", "moe_shared_expert_intermediate_size", "shared_ffn", "FFN neurons of the shared expert"),
    Axis("depth", "layers", None, "layers, least important first (needs a layer order from depth importance)"),
)}
DEFAULT_AXES = ("hidden", "attention", "mamba", "ffn", "experts")
UNIT_KEYS = tuple(a.key for a in AXES.values() if a.key)  # the per-layer axes, as masks and scores name them
