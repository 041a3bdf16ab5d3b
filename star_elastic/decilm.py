"""Per-layer Llama budgets as DeciLM / Nemotron-NAS `block_configs` checkpoints (vLLM reads them).

The format of NVIDIA's Puzzle models (Llama-3.1-Nemotron-51B, Llama-3.3-Nemotron-Super-49B):
`architectures: ["DeciLMForCausalLM"]`, `model_type: "nemotron-nas"`, Llama's global fields and
weight names, and one `block_configs` entry per layer:

    {"attention": {"n_heads_in_group": g, "no_op": false, "replace_with_linear": false},
     "ffn": {"ffn_mult": m, "no_op": false, "replace_with_linear": false}}

Every layer has the global `num_attention_heads` query heads and `num_attention_heads // g` KV
heads; its gated-SiLU FFN is `round_up(int(2 * m * hidden_size / 3), 256)` wide. That is what vLLM's
`DeciLMForCausalLM` (its nemotron_nas model file) and TensorRT-LLM build. So the
format expresses per-layer KV groups and per-layer FFN widths that are multiples of 256, not per-layer
query-head counts nor other FFN widths: `block_configs` refuses those with a one-line reason.
`head_dim` is written as a config field, which vLLM's attention reads; an engine that derived it
as hidden_size // num_attention_heads instead would misbuild a budget that cut the hidden size.

Stock transformers has no `nemotron-nas` class: the config class comes with the checkpoint
(`configuration_decilm.py`, `auto_map`, loaded with trust_remote_code), which is how vLLM parses the
format too. The weights are written unquantised (a model loaded from FP8 is exported dequantised).
This module knows the format only; `elastic/slicing.py` writes the checkpoint (`export(...,
format="decilm")`), `convert.write_decilm` rewrites an exported Llama slice as one (`star-elastic
slice ... --format decilm`), and `hf.read_config` reads one back (`as_star_elastic`). Nothing here
imports hf.py.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import StarElasticError
from .model import ModelConfig

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
CONFIG_MODULE = "configuration_decilm"  # the config class shipped in the checkpoint (auto_map)
FFN_MULTIPLE = 256  # DeciLM's FFN widths are round_up(int(2 * ffn_mult * hidden / 3), 256)


def intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width that DeciLM engines build for `ffn_mult` (vLLM's, TensorRT-LLM's and llama.cpp's formula)."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % FFN_MULTIPLE == 0 else n + FFN_MULTIPLE - n % FFN_MULTIPLE


def ffn_mult(width: int, hidden_size: int) -> float | None:
    """An `ffn_mult` that DeciLM engines turn back into exactly `width`, or None when there is none
    (the width is not a positive multiple of 256)."""
    if width < FFN_MULTIPLE or width % FFN_MULTIPLE:
        return None
    for m in (1.5 * width / hidden_size, 1.5 * (width - FFN_MULTIPLE / 2) / hidden_size):  # exact, then mid-window
        if intermediate_size(m, hidden_size) == width:
            return m
    return None


def _refuse(reason: str) -> StarElasticError:
    return StarElasticError(f"cannot write DeciLM block_configs: {reason}")


def check_parent(cfg: ModelConfig) -> None:
    """What any budget of a parent `cfg` needs to be written as DeciLM, known before a spec is chosen:
    a Llama with gated SiLU MLPs; else a one-line StarElasticError. `block_configs` checks a budget's sizes."""
    if cfg.family != "llama":
        raise _refuse(f"they describe Llama layers (attention + gated MLP), not a {cfg.family} model with Mamba / "
                      "MoE blocks; per-layer NemotronH budgets stay in star-elastic's format (README: what loads where)")
    if cfg.mlp_act != "silu":
        raise _refuse(f"hidden_act {cfg.mlp_act!r}: vLLM's DeciLM runs gated SiLU MLPs only")


def block_configs(cfg: ModelConfig) -> list[dict]:
    """One `block_configs` entry per layer of the Llama `cfg` (per-layer sizes or not), or a one-line
    StarElasticError saying why the format cannot hold it exactly."""
    check_parent(cfg)
    layers = [cfg.layer(i) for i in range(cfg.num_layers)]
    heads = {c.num_attention_heads for c in layers}
    if len(heads) > 1:
        raise _refuse(f"the layers keep {sorted(heads)} query heads, and the format has one num_attention_heads for "
                      "every layer (per layer only KV groups, n_heads_in_group); keep the same query heads in every "
                      "layer, or use star-elastic's format")
    out = []
    for i, c in enumerate(layers):
        m = ffn_mult(c.intermediate_size, cfg.hidden_size)
        if m is None:
            raise _refuse(f"layer {i} keeps an FFN of {c.intermediate_size}, and the format's width is "
                          f"round_up(int(2 * ffn_mult * hidden_size / 3), {FFN_MULTIPLE}): only positive multiples of "
                          f"{FFN_MULTIPLE} are exact; keep star-elastic's format for it")
        out.append({"attention": {"n_heads_in_group": c.num_attention_heads // c.num_key_value_heads,
                                  "no_op": False, "replace_with_linear": False},
                    "ffn": {"ffn_mult": m, "no_op": False, "replace_with_linear": False}})
    return out


def decilm_config(cfg: ModelConfig, llama: dict) -> dict:
    """config.json of the DeciLM checkpoint: `llama` (the stock Llama config.json of `cfg`'s first layer,
    `hf.config_to_hf`) with the per-layer `block_configs`. The global `intermediate_size` and
    `num_key_value_heads` are null, as in NVIDIA's checkpoints: every layer's are in its block. RoPE is
    written both as transformers 5 has it (`rope_parameters`) and as transformers 4 does (`rope_theta`,
    `rope_scaling`), for engines built on either. A `quantization_config` in `llama` (inherited from a
    model loaded from FP8, whose weights are held dequantised) is dropped: DeciLM checkpoints are
    written unquantised, and a stale FP8 config would make a reader expect FP8 weights and scales."""
    d = {k: v for k, v in llama.items() if k != "quantization_config"}
    d["block_configs"] = block_configs(cfg)
    d.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, num_hidden_layers=cfg.num_layers,
             intermediate_size=None, num_key_value_heads=None,
             auto_map={"AutoConfig": f"{CONFIG_MODULE}.DeciLMConfig"})
    rope = dict(d.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.rope_theta})
    d["rope_theta"] = rope.pop("rope_theta", cfg.rope_theta)
    d["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return d


def _per_layer(d: dict, source: str) -> list[dict]:
    """[{num_attention_heads, num_key_value_heads, intermediate_size}] of every block, or a one-line error."""
    blocks, hidden, heads = d.get("block_configs"), d.get("hidden_size"), d.get("num_attention_heads")
    if not isinstance(blocks, list) or len(blocks) != d.get("num_hidden_layers") or not blocks:
        raise StarElasticError(f"{source}: block_configs must list one block per layer (num_hidden_layers)")
    if not isinstance(hidden, int) or not isinstance(heads, int):
        raise StarElasticError(f"{source}: hidden_size and num_attention_heads must be integers")
    out = []
    for i, b in enumerate(blocks):
        try:
            attn, ffn = b["attention"], b["ffn"]
            if any(s.get(k) for s in (attn, ffn) for k in ("no_op", "replace_with_linear")):
                raise StarElasticError(f"{source}: block {i} has a no_op or replace_with_linear sub-block; "
                                       "star-elastic's layers always have attention and an MLP")
            group, m = attn["n_heads_in_group"], ffn["ffn_mult"]
            if not isinstance(group, int) or group < 1 or heads % group or not isinstance(m, (int, float)):
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StarElasticError(f"{source}: block {i} is not a DeciLM block (attention.n_heads_in_group dividing "
                                   f"num_attention_heads, ffn.ffn_mult)") from None
        out.append({"num_attention_heads": heads, "num_key_value_heads": heads // group,
                    "intermediate_size": intermediate_size(m, hidden)})
    return out


def as_star_elastic(d: dict, source: str) -> dict:
    """A `nemotron-nas` config.json as star-elastic's own per-layer Llama config (`model_type:
    star_elastic`, `star_elastic.layer_sizes`), which `hf.read_config` then reads as any other."""
    sizes = _per_layer(d, source)
    varying = {a for a in sizes[0] if len({s[a] for s in sizes}) > 1}
    if varying & {"num_attention_heads", "num_key_value_heads"}:  # together, as ElasticSpec.config keeps them
        varying |= {"num_attention_heads", "num_key_value_heads"}
    out = {k: v for k, v in d.items() if k not in ("block_configs", "auto_map", "architectures")}
    out.update(model_type="star_elastic", **sizes[0],
               star_elastic={"model_type": "llama",
                             "layer_sizes": [{a: s[a] for a in sorted(varying)} for s in sizes] if varying else None})
    if out.get("rope_parameters"):  # transformers 5's spelling wins over the legacy copy
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
    return out


def first_layer_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without per-layer sizes (its plain fields are its first layer's): the stock Llama part of the config."""
    return replace(cfg, layer_sizes=None)


# The config class shipped in every DeciLM checkpoint we write (`auto_map` points at it). Written for
# this project, not copied: it parses `block_configs` into objects with the attributes that vLLM's and
# TensorRT-LLM's DeciLM code read (`block.attention.n_heads_in_group`, `.no_op`, `.replace_with_linear`,
# `block.ffn.ffn_mult`, ...) and writes them back as JSON. It works with transformers 4 and 5.
CONFIGURATION_SOURCE = '''\
"""DeciLM / Nemotron-NAS config ("nemotron-nas"), written by star-elastic.

Each layer has a block config: attention.n_heads_in_group (query heads per KV head: KV heads =
num_attention_heads // n_heads_in_group), ffn.ffn_mult (the gated-SiLU FFN width is
round_up(int(2 * ffn_mult * hidden_size / 3), 256)), no_op and replace_with_linear (always false here).
The layers are run by vLLM's DeciLMForCausalLM (vllm serve DIR --trust-remote-code).
"""

from transformers import LlamaConfig


class SubblockConfig:
    def __init__(self, **fields):
        self.no_op = False
        self.replace_with_linear = False
        self.__dict__.update(fields)

    def to_dict(self):
        return dict(self.__dict__)

    def __repr__(self):
        return f"{type(self).__name__}({self.__dict__})"


class BlockConfig:
    def __init__(self, attention=None, ffn=None, **extra):
        self.attention = attention if isinstance(attention, SubblockConfig) else SubblockConfig(**(attention or {}))
        self.ffn = ffn if isinstance(ffn, SubblockConfig) else SubblockConfig(**(ffn or {}))
        self.__dict__.update(extra)

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, SubblockConfig) else v for k, v in self.__dict__.items()}

    def __repr__(self):
        return f"BlockConfig({self.to_dict()})"


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        # null in config.json: every layer's sizes are in its block (Llama's config class wants ints there)
        per_block = [k for k in ("intermediate_size", "num_key_value_heads") if k in kwargs and kwargs[k] is None]
        for k in per_block:
            del kwargs[k]
        super().__init__(**kwargs)
        for k in per_block:
            self.__dict__[k] = None
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in block_configs or []]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
'''
