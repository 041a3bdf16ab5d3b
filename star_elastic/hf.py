"""Hugging Face checkpoints in and out: config.json + safetensors (sharded too), and GGUF.

Our parameter names are transformers' own, so loading is `load_state_dict` after a check of
names and shapes; saving writes what `AutoModelForCausalLM.from_pretrained` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import fp8, parallel
from .errors import StarElasticError
from .hf_files import (MAX_HEADER_BYTES, PICKLE_SUFFIXES, _weight_files, read_json, safetensors_header,  # noqa: F401
                       shard_groups, shard_names, write_index)
from .model import Model, ModelConfig

SUPPORTED = {"nemotron_h": "NemotronHForCausalLM", "llama": "LlamaForCausalLM"}
MAMBA_CHAR = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-", "moe": "E"}
HF_BLOCK = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
SHARD_BYTES = 2 * 1024**3


# ----------------------------------------------------------------------------- configs

def dt_floor(c) -> float:
    """The lower clamp of softplus(dt + dt_bias) that the installed transformers' NemotronH applies, which our
    `time_step_min` mirrors: `time_step_limit[0]` from transformers 5.25 on, `time_step_min` before (5.24 clamped
    at it; from 5.25 it only initialises dt_bias). An export writes both (the same value), so it runs alike in
    either."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release >= (5, 25) and getattr(c, "time_step_limit", None) is not None:
        return float(c.time_step_limit[0])
    return float(c.time_step_min)


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """Our dataclass from a transformers config dict (legacy NemotronH names included)."""
    from transformers import LlamaConfig, NemotronHConfig, PretrainedConfig

    model_type = d.get("model_type")
    if model_type == "star_elastic" and isinstance(d.get("star_elastic"), dict):
        # our format for per-layer sizes: a stock config under a name transformers refuses
        model_type = d["star_elastic"].get("model_type")
        d = {**d, "model_type": model_type}
    if model_type not in SUPPORTED:
        archs = d.get("architectures") or [model_type]
        raise StarElasticError(f"{source}: unknown architecture {archs[0]!r} "
                               f"(supported: {', '.join(SUPPORTED.values())})")
    d = PretrainedConfig._decode_special_floats({k: v for k, v in d.items() if k != "star_elastic"})
    try:
        c = (NemotronHConfig if model_type == "nemotron_h" else LlamaConfig).from_dict(d)
    except Exception as e:  # transformers validates values; surface its reason on one line
        raise StarElasticError(f"{source}: invalid {model_type} config: {str(e).splitlines()[0]}") from None
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, tie_word_embeddings=bool(c.tie_word_embeddings),
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  max_position_embeddings=c.max_position_embeddings, intermediate_size=c.intermediate_size,
                  attention_bias=bool(getattr(c, "attention_bias", False)), mlp_bias=bool(c.mlp_bias),
                  bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if model_type == "llama":
        rope = dict(c.rope_parameters or {})
        rope_type = rope.get("rope_type", "default")
        return ModelConfig(family="llama", layer_types="*" * c.num_hidden_layers, norm_eps=c.rms_norm_eps,
                           head_dim=head_dim, rope_theta=float(rope.get("rope_theta", 10000.0)),
                           rope_scaling=None if rope_type == "default" else rope,
                           mlp_gated=True, mlp_act=c.hidden_act, **common)
    return ModelConfig(
        family="nemotron_h", layer_types="".join(MAMBA_CHAR[t] for t in c.layers_block_type),
        norm_eps=c.layer_norm_epsilon, head_dim=head_dim, rope_theta=None, mlp_gated=False, mlp_act=c.mlp_hidden_act,
        mamba_num_heads=c.mamba_num_heads, mamba_head_dim=c.mamba_head_dim, ssm_state_size=c.ssm_state_size,
        n_groups=c.n_groups, conv_kernel=c.conv_kernel, chunk_size=c.chunk_size,
        time_step_min=dt_floor(c), use_conv_bias=bool(c.use_conv_bias), mamba_bias=bool(c.use_bias),
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size,
        moe_shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size, n_group=c.n_group,
        topk_group=c.topk_group, norm_topk_prob=bool(c.norm_topk_prob),
        routed_scaling_factor=float(c.routed_scaling_factor), moe_latent_size=c.moe_latent_size, **common)


def config_to_hf(cfg: ModelConfig, base: dict | None = None) -> dict:
    """A transformers config dict for `cfg`, starting from the checkpoint's own (`base`) so that
    fields we do not model (chat settings, dtype, ...) survive a load/save round trip."""
    from transformers import LlamaConfig, NemotronHConfig, PretrainedConfig

    if cfg.layer_sizes and any(cfg.layer_sizes):
        raise StarElasticError("per-layer sizes cannot be written as a stock Hugging Face config "
                               "(transformers has one size per axis for all layers)")
    d = PretrainedConfig._decode_special_floats(dict(base or {}))  # base may come straight from config.json
    for k in ("architectures", "model_type", "transformers_version", "star_elastic"):
        d.pop(k, None)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, tie_word_embeddings=cfg.tie_word_embeddings,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                  head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                  intermediate_size=cfg.intermediate_size, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
                  bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if cfg.family == "llama":
        rope = dict(cfg.rope_scaling or {"rope_type": "default"})
        rope["rope_theta"] = cfg.rope_theta
        d.update(common, num_hidden_layers=cfg.num_layers, rms_norm_eps=cfg.norm_eps, hidden_act=cfg.mlp_act,
                 rope_parameters=rope)
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
        out = _hf_config(LlamaConfig, d)
    else:
        for legacy in ("hybrid_override_pattern", "num_hidden_layers", "mamba_n_groups", "mamba_d_conv",
                       "mamba_chunk_size", "mamba_dt_min", "mamba_conv_bias"):
            d.pop(legacy, None)
        d.update(common, layers_block_type=[HF_BLOCK[k] for k in cfg.layer_types],
                 layer_norm_epsilon=cfg.norm_eps, mlp_hidden_act=cfg.mlp_act,
                 mamba_num_heads=cfg.mamba_num_heads, mamba_head_dim=cfg.mamba_head_dim,
                 ssm_state_size=cfg.ssm_state_size, n_groups=cfg.n_groups, conv_kernel=cfg.conv_kernel,
                 chunk_size=cfg.chunk_size, time_step_min=cfg.time_step_min,
                 time_step_limit=[cfg.time_step_min, float("inf")], use_conv_bias=cfg.use_conv_bias,
                 use_bias=cfg.mamba_bias, n_routed_experts=cfg.n_routed_experts,
                 num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
                 moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
                 n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                 routed_scaling_factor=cfg.routed_scaling_factor, moe_latent_size=cfg.moe_latent_size,
                 expand=max(1, cfg.mamba_num_heads * cfg.mamba_head_dim // cfg.hidden_size))
        out = _hf_config(NemotronHConfig, d)
    out.architectures = [SUPPORTED[cfg.family]]
    return out.to_dict()


def _hf_config(cls, d: dict):
    """transformers validates sizes (a Llama hidden size must divide by its head count, ...): say
    which rule a sliced config breaks in one line rather than with its traceback."""
    try:
        return cls.from_dict(d)
    except Exception as e:  # ValueError, or huggingface_hub's validation error wrapping one
        reason = str(e.__cause__ or e).strip().splitlines()[0]
        raise StarElasticError(f"transformers rejects this {cls.__name__[:-6]} config: {reason}") from None


def config_json(d: dict) -> str:
    """config.json text as transformers writes it (infinities as {"__float__": "Infinity"}: strict JSON)."""
    from transformers import PretrainedConfig

    return json.dumps(PretrainedConfig._encode_special_floats(d), indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------- NemotronH on disk

EXPERT_KEY = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def from_disk_layout(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """NemotronH checkpoints on disk (NVIDIA's, and what transformers itself writes) name the
    decoder `backbone.` and store one tensor per expert; in memory transformers (and we) use
    `model.` and one stacked (E, ...) tensor per projection. This is transformers' own mapping."""
    out, experts = {}, {}
    for name, t in tensors.items():
        if name.startswith("backbone."):
            name = "model." + name[len("backbone."):]
        m = EXPERT_KEY.match(name)
        if m:
            experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = t
        else:
            out[name] = t
    for name, parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise StarElasticError(f"{source}: experts of {name} are not numbered 0..{len(parts) - 1}")
        out[name] = torch.stack([parts[j] for j in range(len(parts))])
    return out


@dataclass(frozen=True, eq=False)
class Row:
    """Row `j` of the tensor `of`, taken only once `of` is whole: one expert of a sharded NemotronH
    stack, which is stored one tensor per expert (the stack is gathered once, not once per expert)."""
    of: torch.Tensor
    j: int

    @property
    def shape(self) -> torch.Size:
        return self.of.shape[1:]

    @property
    def dtype(self) -> torch.dtype:
        return self.of.dtype


def to_disk_layout(state: dict[str, torch.Tensor], rows: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of `from_disk_layout`: what transformers' `save_pretrained` writes for NemotronH.
    `rows`: each expert as a `Row` of its stack, not a view (for stacks that are FSDP2 shards)."""
    out = {}
    for name, t in state.items():
        if name.startswith("model."):
            name = "backbone." + name[len("model."):]
        if name.endswith((".mixer.experts.up_proj", ".mixer.experts.down_proj")):
            prefix, proj = name.rsplit(".", 1)
            out.update({f"{prefix}.{j}.{proj}.weight": Row(t, j) if rows else t[j] for j in range(t.shape[0])})
        else:
            out[name] = t
    return out


# ----------------------------------------------------------------------------- loading



def header_tensors(files: list[Path], skip=lambda name: False) -> dict[str, torch.Tensor]:
    """Every tensor of the files as an empty meta tensor of its shape: names and shapes from the
    headers alone, so that a checkpoint can be checked against its config without reading data."""
    out = {}
    for f in files:
        for name, v in safetensors_header(f).items():
            if not skip(name):
                out[name] = torch.empty(v["shape"], device="meta")
    return out


def read_safetensors(files: list[Path], skip=lambda name: False) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in files:
        safetensors_header(f)
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    if not skip(name):
                        tensors[name] = sf.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise StarElasticError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return tensors


def check_names(expected, present, source: str) -> None:
    """One-line error unless the checkpoint holds exactly the tensors the config implies."""
    missing, unexpected = sorted(set(expected) - set(present)), sorted(set(present) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}, e.g. {unexpected[0]}")
        raise StarElasticError(f"{source}: weights do not match the config: {'; '.join(parts)}")


def check_shapes(model: Model, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`tensors` less a tied lm_head, after checking that they are exactly `model`'s, shape for shape."""
    expected = model.state_dict()
    tensors = dict(tensors)
    if model.config.tied:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    check_names(expected, tensors, source)
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise StarElasticError(f"{source}: tensor {name} has shape {tuple(t.shape)}, "
                                   f"the config implies {tuple(expected[name].shape)}")
    return tensors


def load_weights(model: Model, tensors: dict[str, torch.Tensor], source: str) -> Model:
    """Copy a checkpoint state dict into `model`, refusing missing, unexpected or misshapen tensors."""
    tensors = check_shapes(model, tensors, source)
    model.load_state_dict(tensors, strict=False, assign=True)
    if model.config.tied:
        model.lm_head.weight = model.embed.weight
    return model


def read_config(path: Path) -> tuple[dict, ModelConfig]:
    """config.json of a checkpoint directory: as read, and as our config (per-layer sizes included)."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise StarElasticError(f"{path}: not a model directory (no config.json)")
    raw = read_json(config_file)
    if raw.get("model_type") == "nemotron-nas":  # DeciLM block_configs: read as our per-layer Llama (decilm.py)
        from .decilm import as_star_elastic
        raw = as_star_elastic(raw, str(config_file))
    cfg = config_from_hf(raw, str(config_file))
    fp8.check_quantization(raw, str(config_file))  # unquantised or FP8; any other method: one line
    if isinstance(raw.get("star_elastic"), dict) and raw["star_elastic"].get("layer_sizes"):
        try:  # checked here so that a bad list fails as one line, not deep inside Model()
            cfg = replace(cfg, layer_sizes=raw["star_elastic"]["layer_sizes"])
            for i in range(cfg.num_layers):
                cfg.layer(i)
        except (ValueError, TypeError) as e:
            raise StarElasticError(f"{config_file}: invalid star_elastic.layer_sizes ({e})") from None
    return raw, cfg


def load(path, dtype: torch.dtype | None = None, device=None) -> Model:
    """Load a Hugging Face NemotronH / Llama checkpoint directory, or a GGUF file, as our Model.

    FP8 checkpoints (fp8.py) are dequantised on load, into `dtype` (None: the checkpoint's unquantised
    dtype, bfloat16). `dtype=torch.float8_e4m3fn`: the model holds its weights as stored (dequantised
    if FP8) and is saved in FP8 (`save_pretrained`, `export`), as is an FP8 checkpoint loaded with no
    dtype; a floating-point dtype saves in that dtype."""
    path = Path(path)
    save_as = dtype
    if fp8.is_fp8_dtype(dtype):  # FP8 is how it is saved, not what it computes in
        fp8.fp8_dtype()
        dtype = None
    if not path.exists():
        raise StarElasticError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".gguf":
            path = gguf_to_safetensors(path)
        elif path.suffix in PICKLE_SUFFIXES:
            raise StarElasticError(f"{path}: pickle files are never loaded; give a safetensors checkpoint directory")
        else:
            raise StarElasticError(f"{path}: expected a checkpoint directory (config.json + safetensors) or a .gguf file")
    raw, cfg, tensors, model = _open(path, read_safetensors, dtype)
    model = load_weights(model, tensors, str(path))
    if model.inv_freq is not None:  # a non-persistent buffer: rebuild it off the meta device
        from .model import rope_frequencies
        model.inv_freq = rope_frequencies(cfg)
    model.hf_config = fp8.saved_config(raw, save_as)
    model.source = str(path)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def _open(path: Path, read, dtype=None) -> tuple[dict, ModelConfig, dict, Model]:
    """(raw config, config, tensors in our layout, model on the meta device) of a checkpoint
    directory, after the manifest checks; `read` takes the tensors' data or only their headers.
    FP8 weights come dequantised (into `dtype`; None: the checkpoint's unquantised dtype)."""
    raw, cfg = read_config(path)
    check_elastic_manifest(path, cfg)
    tensors = read(_weight_files(path), skip=lambda n: n.startswith("mtp."))
    tensors = fp8.dequantize_tensors(tensors, raw, str(path), dtype)
    if cfg.family == "nemotron_h":
        tensors = from_disk_layout(tensors, str(path))
    with torch.device("meta"):
        model = Model(cfg)
    return raw, cfg, tensors, model


def check_elastic_manifest(path: Path, cfg: ModelConfig) -> None:
    """An elastic checkpoint is also a plain HF directory: whoever loads it (eval, generate, slice,
    serve) gets the cheap manifest checks (files present and of the recorded sizes, budgets that fit
    the config) before any tensor is read. A directory without our manifest is left alone."""
    # elastic/manifest.py imports nothing that imports hf.py. Imported here, not at the top, because
    # importing any star_elastic.elastic module first runs elastic/__init__.py, whose slicing.py
    # imports hf.py: at the top, that would run while hf.py is half-initialised.
    from .elastic.manifest import check_cheap, has_manifest, read_manifest

    if has_manifest(path):
        check_cheap(path, read_manifest(path), cfg)


def check_checkpoint(path) -> tuple[dict, ModelConfig]:
    """Everything `load` checks, from config.json and the safetensors headers alone (no tensor data):
    (raw config, config). For commands that need the architecture but not the weights."""
    path = Path(path)
    if not path.is_dir():
        raise StarElasticError(f"{path}: expected a checkpoint directory (config.json + safetensors)")
    raw, cfg, tensors, model = _open(path, header_tensors)
    check_shapes(model, tensors, str(path))
    return raw, cfg


def load_tokenizer(path):
    """The tokenizer saved beside a checkpoint (or inside a GGUF file), or None if there is none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        path = gguf_to_safetensors(path)
    kwargs = {}
    if (path / "config.json").is_file() and read_json(path / "config.json").get("model_type") == "nemotron-nas":
        from transformers import LlamaConfig  # DeciLM: a Llama tokenizer, without running (or asking to run)
        kwargs["config"] = LlamaConfig()  # the config class that the checkpoint ships (decilm.py)
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, TypeError):
        return None


def require_tokenizer(path, tokenizer=None):
    """`tokenizer`, or the one saved beside the checkpoint at `path` (`load_tokenizer`); where there is none, a
    one-line error that says what to put there."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    if tokenizer is None:
        raise StarElasticError(f"{path}: no tokenizer files next to the weights: save the parent's tokenizer there "
                               "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes tokenizer.json and "
                               "tokenizer_config.json)")
    return tokenizer


GGUF_CONVERSION = 2  # 2: special tokens as the GGUF file says (special_tokens_from_gguf)


def special_tokens_from_gguf(tokenizer, gguf: Path) -> None:
    """Set the tokenizer's BOS, EOS, padding and unknown tokens to the ids the GGUF file names, where the reader
    made them otherwise: transformers 5.17 (the GPU machines') read SmolLM2-Instruct's EOS as <|im_start|>, the
    file's BOS, against <|im_end|> in the file, so that documents were joined and answers ended at the wrong
    token (the parent's held-out perplexity 16.31 on wiki against 15.32, docs/RESULTS.md §9)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    for role in ("bos", "eos", "padding", "unknown"):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is None:
            continue
        tid = int(field.parts[field.data[0]][0])
        attr = {"padding": "pad", "unknown": "unk"}.get(role, role)
        if getattr(tokenizer, f"{attr}_token_id", None) != tid and 0 <= tid < len(tokenizer):
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(tid))


def gguf_to_safetensors(gguf: Path) -> Path:
    """Convert a GGUF file once (dequantised through transformers' reader) into a cached HF directory."""
    from .assets import CACHE_DIR

    st = gguf.stat()
    # GGUF_CONVERSION in the key: a directory converted before the special tokens were checked is converted again
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{GGUF_CONVERSION}".encode()).hexdigest()[:16]
    out = Path(CACHE_DIR) / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf as _  # noqa: F401  (transformers needs it; fail here with a clear message)
    except ImportError:
        raise StarElasticError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    import sys
    print(f"converting {gguf.name} to safetensors (once, cached in {out.parent}) ...", file=sys.stderr)
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise StarElasticError(f"{gguf}: cannot read GGUF file ({str(e).splitlines()[0]})") from None
    special_tokens_from_gguf(tok, gguf)
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # the weights were dequantised to fp32 on reading
    state = hf.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    with _staging(out) as tmp:
        (tmp / "config.json").write_text(config_json(config))
        write_safetensors(state, tmp)
        tok.save_pretrained(str(tmp))
    return out


# ----------------------------------------------------------------------------- saving

class _staging:
    """Write into a temporary sibling directory, then rename it into place: never a half-written output."""

    def __init__(self, dest):
        self.dest = Path(dest)

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", dir=self.dest.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _as_umask_allows(self.tmp)
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        return False


staging = _staging


def _as_umask_allows(root: Path) -> None:
    """Give `root` and everything in it the permissions a plain mkdir / open would: the temporary
    directory is made 0700 and safetensors writes its files 0600, so a finished checkpoint was
    unreadable to other users (a server running as another account, a shared cache)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_safetensors(state: dict, out: Path | None, max_shard_bytes: int = SHARD_BYTES,
                      stats: dict | None = None, dtypes: dict[str, torch.dtype] | None = None) -> None:
    """model.safetensors into the directory `out`, or shards + index when larger than `max_shard_bytes`.

    `state` may hold FSDP2 shards (DTensors) and `Row`s of them: each is gathered whole when its turn
    comes, one at a time, so every rank must call this with the same `state`; the ranks that do not
    write pass `out=None` and drop each tensor once gathered. The writer keeps one file's tensors on
    the host at a time. Files are planned from the shapes before any gather, by one rule whatever
    the sharding, so a sharded model writes the files its unsharded copy would. `out` is a `staging`
    directory (every caller's): a write that fails leaves nothing. `stats` (if given) gets the names of the files
    and `peak_bytes`: the most bytes of whole tensors held at once (the file being filled and the
    tensor being gathered). `dtypes`: name -> the dtype to write it in (each tensor cast as it is
    written; names not in it as they are held)."""
    def nbytes(k):
        t = state[k]
        return t.shape.numel() * stored(k).itemsize

    def stored(k):  # the dtype tensor k is written in
        return (dtypes or {}).get(k, source(state[k]).dtype)

    def source(t):  # what is gathered for `t`: a Row's whole stack
        return t.of if isinstance(t, Row) else t

    shards = shard_groups(list(state), nbytes, max_shard_bytes)
    names = shard_names(len(shards))
    like = next((source(t) for t in state.values() if parallel.is_dtensor(source(t))), None)
    error, peak = None, 0
    last = gathered = None  # the tensor last gathered, and it whole (a stack serves all of its Rows)
    for fname, shard in zip(names, shards):
        tensors, held = {}, 0
        for k in shard:
            t = state[k]
            if source(t) is not last:
                gathered = None  # the previous tensor goes before the next is gathered
                last, gathered = source(t), parallel.full_tensor(source(t).detach())
            writes = out is not None and error is None
            if writes:
                tensors[k] = (gathered[t.j] if isinstance(t, Row) else gathered).contiguous().cpu().to(stored(k))
                held += nbytes(k)
                peak = max(peak, held + gathered.numel() * gathered.element_size())
            if not (writes and isinstance(t, Row)):
                gathered = None  # dropped at once; only the writer keeps a stack for its next rows
        if out is not None and error is None:
            try:
                _write_file(tensors, Path(out) / fname)
            except Exception as e:  # keep gathering: the other ranks are waiting in the gathers
                error = e
        tensors = None
    if like is not None:  # sharded: every rank learns whether the writer wrote every file
        if not parallel.all_ok(error is None, like) and error is None:
            raise StarElasticError("the checkpoint was not written: rank 0 failed writing it (see its error)")
    if error is not None:
        raise error
    if out is not None and len(shards) > 1:
        write_index(Path(out), {k: fname for fname, shard in zip(names, shards) for k in shard},
                    sum(nbytes(k) for k in state))
    if stats is not None:
        stats.update(files=names, peak_bytes=peak)


def _write_file(tensors: dict[str, torch.Tensor], f: Path) -> None:
    """One safetensors file (into a `staging` directory: the whole checkpoint appears at once or not at all)."""
    save_file(tensors, str(f), metadata={"format": "pt"})


def save_pretrained(model: Model, out, tokenizer=None, max_shard_bytes: int = SHARD_BYTES,
                    config: dict | None = None, stats: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + safetensors (+ tokenizer) that transformers' AutoModelForCausalLM loads.
    `config`: the config.json to write instead (star-elastic's per-layer format). A config with an FP8
    quantization_config (a model loaded as FP8, `load`) is written in FP8 (fp8.py).

    A model sharded by FSDP2 (parallel.py) is never whole on any rank: every rank calls this, the
    tensors are gathered one at a time and rank 0 alone writes (`write_safetensors`), the same files
    as the unsharded model's. `stats`: see `write_safetensors` (filled on the rank that writes).
    `dtype`: a floating-point dtype to write the weights in (None: as the model holds them), e.g. a
    bf16 parent's checkpoint after training in fp32 master weights."""
    out = Path(out)
    if getattr(model, "fp8_matmuls", False):
        raise StarElasticError("a model with FP8 matmuls (fp8.use_fp8_matmuls) is for inference; save the model "
                               "as loaded, or write FP8 with `star-elastic convert CKPT --dtype fp8`")
    hf = config if config is not None else config_to_hf(model.config, getattr(model, "hf_config", None))
    quantize = fp8.is_fp8_config(hf)
    sharded = parallel.is_sharded(model)
    if quantize and dtype is not None:
        raise StarElasticError("an FP8 model is written in FP8; give no dtype to save it in")
    if sharded and quantize:
        raise StarElasticError("an FP8 model is not written from FSDP2 shards; save it in its compute dtype, "
                               "then convert it (star-elastic convert CKPT --dtype fp8)")
    state = model.state_dict()
    if model.config.tied:
        state.pop("lm_head.weight", None)
    if quantize:
        state = fp8.cast_unquantized(state, model.config)
    if model.config.family == "nemotron_h":
        state = to_disk_layout(state, rows=sharded)
    if quantize:
        state, hf = fp8.quantize_state(state, hf)
    dtypes = None
    if dtype is not None:  # what each tensor is as `Model.to(dtype)` holds it (the MoE router stays float32)
        with torch.device("meta"):
            held = Model(model.config).to(dtype).state_dict()
        if model.config.family == "nemotron_h":
            held = to_disk_layout(held)
        dtypes = {k: v.dtype for k, v in held.items()}
    like = next(model.parameters())
    if sharded and dist.get_rank() != 0:
        # rank 0 first says whether it could start writing: else its error would leave this rank
        # waiting in the first gather until the backend's timeout
        if not parallel.all_ok(True, like):
            raise StarElasticError(f"{out}: the checkpoint was not written: rank 0 could not start writing it "
                                   "(see its error)")
        write_safetensors(state, None, max_shard_bytes, dtypes=dtypes)  # take part in the gathers; rank 0 writes
        return out
    said = False  # sharded: whether rank 0 has told the others if it could start
    try:
        with _staging(out) as tmp:
            (tmp / "config.json").write_text(config_json(hf))
            if sharded:
                said = True
                parallel.all_ok(True, like)
            write_safetensors(state, tmp, max_shard_bytes, stats, dtypes=dtypes)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    except BaseException:
        if sharded and not said:
            said = True
            parallel.all_ok(False, like)  # the other ranks learn it and raise, instead of waiting
        raise
    finally:
        if sharded and stats is not None:
            stats["told_ranks"] = said  # a caller that failed before this call must tell them itself
    return out
