"""Where each elastic axis's units live in the parent's tensors: for a tensor name, which index of
which dimension each axis selects (`index_plan`), and applying such a plan (`apply_plan`). The one
place that knows the layout: slicing (`slicing.take`), the in-place sort (`sort.sort_model`), the
load-time sort of a sharded parent (sharded_sort.py) and the streaming slicer all go through it."""

from __future__ import annotations

import re

import torch

from star_elastic.model import ModelConfig, mamba_in_proj_rows


def _rows(units: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """Rows of a projection whose units (heads) own `size` consecutive rows each."""
    return None if units is None else (units[:, None] * size + torch.arange(size)).flatten()


def _mamba_inner(c: ModelConfig, heads, channels) -> torch.Tensor | None:
    """Indices into the d_inner = heads x head_dim features (z, x, gated norm, out_proj input)."""
    if heads is None and channels is None:
        return None
    heads = torch.arange(c.mamba_num_heads) if heads is None else heads
    channels = torch.arange(c.mamba_head_dim) if channels is None else channels
    return (heads[:, None] * c.mamba_head_dim + channels[None, :]).flatten()


EMBEDDINGS = ("model.embeddings.weight", "model.embed_tokens.weight", "lm_head.weight")
FINAL_NORMS = ("model.norm_f.weight", "model.norm.weight")


def index_plan(name: str, cfg: ModelConfig, idx: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Which units of each dimension of parent tensor `name` (config `cfg`) the indices `idx` select:
    {dim: index}, only the dims that some key of idx reaches. idx is keyed like `permutations` (or
    `ElasticSpec.indices`); an index is 1-D along its dim, or for the experts' FFN dim (E, n): one
    row per parent expert, each expert's own neuron order.

    This is the one place that says how an axis maps onto the tensors: the in-place sort
    (`sort_model`) and the load-time sort of a sharded parent (sharded_sort.py) both apply it with
    `apply_plan`. `slicing.take` applies it too."""
    hidden = idx.get("hidden")
    plan: dict[int, torch.Tensor] = {}

    def put(dim, units):
        if units is not None:
            plan[dim] = units
        return plan

    if name in EMBEDDINGS:
        return put(1, hidden)
    if name in FINAL_NORMS:
        return put(0, hidden)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(\w+)", name)
    if m is None or int(m.group(1)) >= cfg.num_layers:
        raise ValueError(f"{name}: not a tensor of this model")
    i, module, leaf = int(m.group(1)), m.group(2), m.group(3)
    c = cfg.layer(i)

    def get(axis):
        return idx.get(f"layers.{i}.{axis}")

    if module in ("norm", "input_layernorm", "post_attention_layernorm"):
        return put(0, hidden)
    part = module.rsplit(".", 1)[-1]
    if part == "experts":  # (E, I, d) up and (E, d, I) down; d is hidden unless there is a latent space
        ffn_dim = 1 if leaf == "up_proj" else 2
        put(0, get("experts"))
        put(ffn_dim, get("expert_ffn"))
        return plan if c.moe_latent_size else put(3 - ffn_dim, hidden)
    if part == "gate" and leaf == "e_score_correction_bias":
        return put(0, get("experts"))
    if module == "mixer.norm":  # Mamba's gated norm
        return put(0, _mamba_inner(c, get("mamba_heads"), get("mamba_channels")))
    if leaf in ("dt_bias", "A_log", "D"):
        return put(0, get("mamba_heads"))
    if part == "conv1d":  # channels [x | B | C]: B and C stay whole
        inner = _mamba_inner(c, get("mamba_heads"), get("mamba_channels"))
        if inner is not None:
            d_inner = c.mamba_num_heads * c.mamba_head_dim
            inner = torch.cat([inner, d_inner + torch.arange(2 * c.n_groups * c.ssm_state_size)])
        return put(0, inner)

    # nn.Linear: (out units, in units) of its weight; its bias follows the out units
    ffn_axis = "shared_ffn" if "shared_experts" in module else "ffn"
    if part in ("q_proj", "k_proj", "v_proj", "o_proj"):
        heads = _rows(get("kv_heads" if part in ("k_proj", "v_proj") else "attn_heads"), c.head_dim)
        out_units, in_units = (hidden, heads) if part == "o_proj" else (heads, hidden)
    elif part in ("up_proj", "gate_proj"):
        out_units, in_units = get(ffn_axis), hidden
    elif part == "down_proj":
        out_units, in_units = hidden, get(ffn_axis)
    elif part == "in_proj":  # rows [z | x | B | C | dt] (model.mamba_in_proj_rows)
        inner, heads = _mamba_inner(c, get("mamba_heads"), get("mamba_channels")), get("mamba_heads")
        out_units = None
        if inner is not None:
            rows = mamba_in_proj_rows(c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size)
            dt = torch.arange(c.mamba_num_heads) if heads is None else heads
            out_units = torch.cat([rows["z"].start + inner, rows["x"].start + inner,
                                   torch.arange(rows["B"].start, rows["C"].stop), rows["dt"].start + dt])
        in_units = hidden
    elif part == "out_proj":
        out_units, in_units = hidden, _mamba_inner(c, get("mamba_heads"), get("mamba_channels"))
    elif part == "gate":  # the router
        out_units, in_units = get("experts"), hidden
    elif part == "fc1_latent_proj":
        out_units, in_units = None, hidden
    elif part == "fc2_latent_proj":
        out_units, in_units = hidden, None
    else:
        raise ValueError(f"{name}: not a tensor of this model")
    put(0, out_units)
    return put(1, in_units) if leaf == "weight" else plan


def apply_plan(t: torch.Tensor, plan: dict[int, torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
    """`t` indexed as `index_plan` says (`t` itself when the plan is empty). `rows`: `t` holds only
    these rows of the parent tensor (dim 0, the plan's dim 0 already applied: a rank's rows as read
    from a checkpoint); the per-expert FFN orders are then taken for those experts."""
    if rows is None and 0 in plan:
        rows = plan[0]
        t = t.index_select(0, rows.to(t.device))
    for dim, ix in plan.items():
        if dim == 0:
            continue
        if ix.dim() == 2:  # an index per parent expert (row of dim 0)
            ix = ix if rows is None else ix[rows]
            shape = list(t.shape)
            shape[dim] = ix.shape[1]
            index = ix[:, :, None] if dim == 1 else ix[:, None, :]
            t = t.gather(dim, index.to(t.device).expand(shape))
        else:
            t = t.index_select(dim, ix.to(t.device))
    return t
