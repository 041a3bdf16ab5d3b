"""Cut a submodel out of an importance-sorted parent, and export it as a checkpoint.

`take` maps one parent tensor, by its checkpoint name, to the rows/columns that a set of kept
units owns. Slicing is `take` with prefix indices (`ElasticSpec.indices`); sorting (sort.py) is
`take` with permutations. It needs one tensor at a time, so it also serves a streaming slicer.
"""

from __future__ import annotations

import contextvars
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from star_elastic import decilm, hf
from star_elastic.errors import StarElasticError
from star_elastic.model import Model, ModelConfig, rope_frequencies

from .layout import index_plan
from .spec import ElasticSpec

ELASTIC_ARCHITECTURE = "StarElasticForCausalLM"
ELASTIC_MODEL_TYPE = "star_elastic"
PER_LAYER_NOTE = ("per-layer sizes: stock transformers has one size per axis for all layers and cannot express "
                  "this model; it is written in star-elastic's own format (load it with star_elastic.load)")
DECILM_HINT = ("; a Llama budget with one query-head count and FFN widths in multiples of 256 can also be written "
               "as DeciLM block_configs, which vLLM serves (export format='decilm'; README: What loads where)")


_PER_LAYER_NOTE = contextvars.ContextVar("per_layer_note", default=True)


def per_layer_note(family: str | None = None) -> None:
    """Say on stderr that a per-layer slice is written in our own format (unless `no_per_layer_note`)."""
    if _PER_LAYER_NOTE.get():
        print(f"star-elastic: {PER_LAYER_NOTE}{DECILM_HINT if family == 'llama' else ''}", file=sys.stderr)


@contextmanager
def no_per_layer_note():
    """For a writer that rewrites the per-layer export in another format (convert.write_decilm)."""
    token = _PER_LAYER_NOTE.set(False)
    try:
        yield
    finally:
        _PER_LAYER_NOTE.reset(token)


def _sel(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx.to(t.device))


def take(name: str, t: torch.Tensor, cfg: ModelConfig, idx: dict[str, torch.Tensor]) -> torch.Tensor:
    """The part of parent tensor `name` (config `cfg`) that the units in `idx` own, in idx's order.

    idx keys as `ElasticSpec.indices`: "hidden", "layers.{i}.{attn_heads, kv_heads, mamba_heads,
    mamba_channels, ffn, experts, expert_ffn, shared_ffn}"; a missing key keeps every unit in
    place. "expert_ffn" may be (experts, kept) to pick different neurons per expert (by parent
    expert). Layer renumbering for dropped layers is the caller's business. Which dimension each
    key selects is `layout.index_plan`'s; `t` may be a stand-in that only knows `index_select`
    (elastic/stream.py's `_Selection`).
    """
    plan = index_plan(name, cfg, idx)
    for dim, ix in plan.items():  # one neuron order per parent expert: taken before the experts are picked
        if ix.dim() == 2:
            shape = list(t.shape)
            shape[dim] = ix.shape[1]
            index = ix[:, :, None] if dim == 1 else ix[:, None, :]
            t = t.gather(dim, index.to(t.device).expand(shape))
    for dim, ix in plan.items():
        if ix.dim() == 1:
            t = _sel(t, dim, ix)
    return t


def _renamed(name: str, new_index: dict[int, int]) -> str | None:
    """`name` with its layer index renumbered, None for a tensor of a dropped layer."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m is None:
        return name
    i = int(m.group(1))
    return None if i not in new_index else f"model.layers.{new_index[i]}.{name[m.end():]}"


@torch.no_grad()
def slice_model(parent: Model, spec: ElasticSpec) -> Model:
    """The physically smaller model for `spec`: the first units of every axis of the (sorted) parent.

    Computes what `parent` computes under `spec.masks(...)`. Its tensors are copies; the parent is
    left as it was."""
    cfg = spec.config(parent.config)
    idx = spec.indices(parent.config)
    new_index = {old: new for new, old in enumerate(spec.kept_layers(parent.config))}
    state = {}
    for name, t in parent.state_dict().items():
        new = _renamed(name, new_index)
        if new is not None:
            part = take(name, t, parent.config, idx)
            state[new] = part.clone() if part is t else part
    with torch.device("meta"):
        model = Model(cfg)
    hf.load_weights(model, state, "slice")
    if model.inv_freq is not None:  # non-persistent: rebuilt off the meta device
        model.inv_freq = rope_frequencies(cfg).to(parent.lm_head.weight.device)
    if hasattr(parent, "hf_config"):  # the parent's extra HF fields (chat template ids, ...) carry over
        model.hf_config = parent.hf_config
    return model.train(parent.training)


def star_elastic_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """config.json for a model with per-layer sizes: the HF config (global sizes taken from its
    first layers) under a model type transformers does not know, plus the per-layer sizes."""
    layer_sizes = cfg.layer_sizes
    d = hf.config_to_hf(ModelConfig.from_dict({**cfg.to_dict(), "layer_sizes": None}), base)
    d["architectures"] = [ELASTIC_ARCHITECTURE]
    d["star_elastic"] = {"model_type": d["model_type"], "layer_sizes": layer_sizes}
    d["model_type"] = ELASTIC_MODEL_TYPE  # transformers refuses it by name instead of mis-loading shapes
    return d


def export(model: Model, out_dir, tokenizer=None, format: str = "hf") -> Path:
    """Save a (sliced) model. One size per axis: a standard Hugging Face checkpoint that stock
    transformers loads. Per-layer sizes: star-elastic's format (read by `star_elastic.load`), with a
    note on stderr that transformers cannot express it. `format="decilm"`: a Llama model (per-layer
    sizes or not) as DeciLM / Nemotron-NAS block_configs (`export_decilm`)."""
    if format == "decilm":
        return export_decilm(model, out_dir, tokenizer)
    if format != "hf":
        raise StarElasticError(f"unknown export format {format!r} (hf, decilm)")
    cfg = model.config
    if not (cfg.layer_sizes and any(cfg.layer_sizes)):
        return hf.save_pretrained(model, out_dir, tokenizer)
    per_layer_note(cfg.family)
    config = star_elastic_config(cfg, getattr(model, "hf_config", None))
    return hf.save_pretrained(model, out_dir, tokenizer, config=config)


def export_decilm(model: Model, out_dir, tokenizer=None) -> Path:
    """A Llama model as a DeciLM / Nemotron-NAS checkpoint (star_elastic/decilm.py): config.json with
    per-layer `block_configs`, the config class it names (configuration_decilm.py, for
    trust_remote_code), Llama's weight names. vLLM serves it as DeciLMForCausalLM
    (`vllm serve DIR --trust-remote-code`); `star_elastic.load` reads it back. A model the format
    cannot hold exactly is refused with a one-line StarElasticError before anything is written."""
    cfg = model.config
    decilm.block_configs(cfg)  # refuses first, on the sizes alone
    llama = hf.config_to_hf(decilm.first_layer_config(cfg), getattr(model, "hf_config", None))
    config = decilm.decilm_config(cfg, llama)
    with hf.staging(out_dir) as tmp:  # weights as save_pretrained writes a Llama's, plus the config class
        written = hf.save_pretrained(model, tmp / "weights", tokenizer, config=config)
        for f in list(written.iterdir()):
            f.rename(tmp / f.name)
        written.rmdir()
        (tmp / f"{decilm.CONFIG_MODULE}.py").write_text(decilm.CONFIGURATION_SOURCE)
    return Path(out_dir)
