"""Shared helpers for the model / checkpoint tests: tiny transformers configs, reference models
with every parameter randomised (so that no constant initialisation can hide a bug), and our
model built from the same state dict."""

import math
import os
import random
import socket
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from star_elastic.errors import StarElasticError
from star_elastic.hf import config_from_hf, load_weights
from star_elastic.model import Model, ModelConfig
from star_elastic.train import leave_distributed

# Tiny tensors: one intra-op thread is faster than two, and far faster on a busy 2-core machine.
torch.set_num_threads(1)

VOCAB = 100
HIDDEN = 32

NEMOTRON_BASE = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, layers_block_type=["mamba", "attention", "mlp", "moe"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
    mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, moe_latent_size=None,
    tie_word_embeddings=False, layer_norm_epsilon=1e-5,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

LLAMA_BASE = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=False,
    tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=None, bos_token_id=1, eos_token_id=2,
)

# Llama 3.1 scaling tuned so that head_dim=16 (wavelengths 6.3, 20, 63, 199, ...) hits all three
# branches: kept (< 16), blended (16..64) and divided by the factor (> 64).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def free_port() -> int:
    """A free TCP port on localhost, for a process group of spawned gloo ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world: int, port: int):
    """The process group of one spawned CPU rank (gloo, one thread), destroyed on the way out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        leave_distributed()


def assert_close_dicts(a: dict, b: dict, rtol=1e-4, atol=1e-5):
    """Two state dicts with the same keys and close tensors (the worst key named on failure)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max().item())


def nemotron_config(**overrides):
    from transformers import NemotronHConfig

    cfg = NemotronHConfig(**{**NEMOTRON_BASE, **overrides})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**LLAMA_BASE, **overrides})
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter and float buffer with O(1)-scaled random values.

    Transformers initialises A_log, D, dt_bias, norm weights, biases and e_score_correction_bias
    to constants and linear weights to std 0.02; with those, a wrong D, a missing norm weight or a
    mis-scaled expert could still give matching logits. Here each mixer contributes O(1) to the
    residual stream and every constant becomes a random value.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo

    seen = set()
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                  if b.is_floating_point() and "inv_freq" not in n]
    for name, p in tensors:
        if id(p) in seen:  # tied weights: once
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            v = rand(p.shape, -1.0, 1.2)  # A in [-3.3, -0.37]
        elif leaf == "dt_bias":
            v = rand(p.shape, -2.0, 0.5)
        elif leaf == "D":
            v = rand(p.shape, -1.5, 1.5)
        elif leaf == "e_score_correction_bias":
            v = rand(p.shape, -0.3, 0.3)
        elif "norm" in name and leaf == "weight":
            v = rand(p.shape, 0.5, 1.5)
        elif leaf == "bias":
            v = rand(p.shape, -0.2, 0.2)
        elif "embed" in name:
            v = torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif "conv1d" in name:
            v = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5
        elif name.endswith("gate.weight"):  # router: spread the scores so that routing is decisive
            v = torch.randn(p.shape, generator=g, dtype=torch.float64)
        else:  # linear / expert weights (..., out, in)
            v = torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[-1])
        p.copy_(v.to(p.dtype))
    return model


def hf_model(hf_config, seed=0):
    """A transformers causal LM for `hf_config`, randomised, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(hf_config)
    ref.config._attn_implementation = "eager"
    return randomize_(ref, seed).eval()


def ours_from(ref, clone: bool = False) -> Model:
    """Our model from the reference's config dict and state dict. `load_weights` assigns the given
    tensors (no copy), so without `clone` both models share storage."""
    model = Model(config_from_hf(ref.config.to_dict()))
    state = dict(ref.state_dict())
    if clone:
        state = {k: v.clone() for k, v in state.items()}
    load_weights(model, state, "ref")
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def one_line_error(fn, *words) -> str:
    """fn() raises a StarElasticError whose message is one line holding every word (any case)."""
    with pytest.raises(StarElasticError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    return msg


def entries(directory):
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------- one tiny elastic checkpoint

ELASTIC_WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer(directory, words=ELASTIC_WORDS, chat_template: str | None = None):
    """A WordLevel tokenizer over `words` (ids 3.., after [UNK] <s> </s>), saved in `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    t = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<s>",
                                eos_token="</s>", unk_token="[UNK]")
    if chat_template:
        t.chat_template = chat_template
    return t


@pytest.fixture(scope="session")
def elastic_ckpt(tmp_path_factory):
    """(checkpoint dir, text file): a tiny hybrid NemotronH (Mamba, attention, MoE, MLP) elastified
    into budgets 1.0 / 0.75 / 0.5 on text with a learnable pattern. Built once per session; tests
    that damage it work on a copy (`copy_ckpt`)."""
    from star_elastic.elastify import ElastifyConfig, elastify
    from star_elastic.model import ModelConfig

    root = tmp_path_factory.mktemp("elastic")
    tokenizer = word_tokenizer(root)
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(80):  # runs of consecutive words
        start = int(torch.randint(0, 60, (1,), generator=g))
        docs.append(" ".join(ELASTIC_WORDS[(start + j) % 60] for j in range(40)))
    text = root / "text.txt"
    text.write_text("\n\n".join(docs))
    cfg = ModelConfig(vocab_size=63, hidden_size=32, layer_types="M*EM-", num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                      n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      moe_shared_expert_intermediate_size=16, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    # randomised: a zero-initialised router scores every expert 0.5, and exact ties make top-k
    # choices depend on how many experts there are, so sliced and masked would differ by tie-breaks
    elastify(randomize_(Model(cfg)), tokenizer, str(text), root / "ckpt",
             ElastifyConfig(budgets=["1.0", "0.75", "0.5"], tokens=16 * 32 * 4, seq_len=32, batch_size=16,
                            calib_batches=2, eval_tokens=256, lr=1e-3), log=lambda *_: None)
    return root / "ckpt", text


@pytest.fixture
def copy_ckpt(elastic_ckpt, tmp_path):
    """A private copy of the session's elastic checkpoint, free to damage."""
    import shutil

    return shutil.copytree(elastic_ckpt[0], tmp_path / "ckpt")


# ----------------------------------------------------------------------------- random parents and specs
# Property tests (slicing, costs, streaming) draw many small parents and valid specs from these.

RANDOM_VOCAB = 64


def random_parent_config(rng: random.Random) -> ModelConfig:
    """A small random Llama (35%) or NemotronH with every block type and every optional feature
    (biases, latent MoE, router groups, Mamba groups, conv kernels) drawn at random."""
    if rng.random() < 0.35:
        kv, per = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
        return ModelConfig(family="llama", vocab_size=RANDOM_VOCAB, hidden_size=rng.choice([12, 16, 24]),
                           layer_types="*" * rng.randint(1, 4), num_attention_heads=kv * per,
                           num_key_value_heads=kv, head_dim=rng.choice([4, 8]), intermediate_size=rng.randint(8, 40),
                           mlp_gated=True, mlp_act="silu", rope_theta=10000.0, attention_bias=rng.random() < 0.3,
                           mlp_bias=rng.random() < 0.3, tie_word_embeddings=rng.random() < 0.5)
    kinds = list("M*-E") + [rng.choice("M*-E") for _ in range(rng.randint(0, 3))]
    rng.shuffle(kinds)
    kv, n_groups, n_group = rng.choice([1, 2, 3]), rng.choice([1, 2]), rng.choice([1, 2])
    return ModelConfig(
        family="nemotron_h", vocab_size=RANDOM_VOCAB, hidden_size=rng.choice([12, 16, 24]),
        layer_types="".join(kinds), num_attention_heads=kv * rng.choice([1, 2, 3]), num_key_value_heads=kv,
        head_dim=rng.choice([4, 8]), attention_bias=rng.random() < 0.3, intermediate_size=rng.randint(8, 40),
        mamba_num_heads=n_groups * rng.randint(1, 4), mamba_head_dim=rng.choice([3, 4, 8]),
        ssm_state_size=rng.choice([4, 8]), n_groups=n_groups, conv_kernel=rng.choice([2, 4]),
        chunk_size=rng.choice([4, 8]), use_conv_bias=rng.random() < 0.7, mamba_bias=rng.random() < 0.3,
        mlp_bias=rng.random() < 0.3, n_routed_experts=n_group * rng.randint(2, 4),
        num_experts_per_tok=rng.choice([1, 2]), n_group=n_group, topk_group=n_group,
        moe_intermediate_size=rng.randint(4, 16), moe_shared_expert_intermediate_size=rng.randint(4, 20),
        norm_topk_prob=rng.random() < 0.5, routed_scaling_factor=rng.choice([1.0, 2.0]),
        moe_latent_size=rng.choice([None, 8]),
        tie_word_embeddings=rng.random() < 0.2)  # a flag NemotronH ignores: lm_head stays its own


def valid_sizes(p: ModelConfig, axis: str, i: int) -> list[int]:
    """Valid sizes of `axis` in parent layer i (attention: query heads for the parent's KV groups)."""
    c = p.layer(i)
    if axis == "num_attention_heads":
        return [c.num_key_value_heads * k for k in range(1, c.num_attention_heads // c.num_key_value_heads + 1)]
    if axis == "mamba_num_heads":
        return [c.n_groups * k for k in range(1, c.mamba_num_heads // c.n_groups + 1)]
    if axis == "n_routed_experts":
        per = c.n_routed_experts // c.n_group
        return [c.n_group * k for k in range(max(2, -(-c.num_experts_per_tok // c.topk_group)), per + 1)]
    return list(range(1, getattr(c, axis) + 1))


def random_spec(p: ModelConfig, rng: random.Random):
    """A random valid ElasticSpec of parent p: any hidden size, dropped layers, one size or
    per-layer sizes on every axis, sometimes fewer KV groups."""
    from star_elastic.elastic import ElasticSpec
    from star_elastic.elastic.spec import applies
    from star_elastic.model import PER_LAYER_SIZES

    kw = {}
    if rng.random() < 0.7:
        kw["hidden_size"] = rng.randint(1, p.hidden_size)
    if rng.random() < 0.4 and p.num_layers > 1:
        kw["layers"] = sorted(rng.sample(range(p.num_layers), rng.randint(1, p.num_layers - 1)))
    for axis in PER_LAYER_SIZES:
        has = [i for i, k in enumerate(p.layer_types) if applies(p, k, axis)]
        if not has or axis == "num_key_value_heads":
            continue
        mode = rng.choice(["parent", "one", "per-layer"])
        if mode == "one":
            kw[axis] = rng.choice(valid_sizes(p, axis, has[0]))
        elif mode == "per-layer":
            kw[axis] = [rng.choice(valid_sizes(p, axis, i) + [None]) if i in has else None for i in range(p.num_layers)]
    if "*" in p.layer_types and rng.random() < 0.3:  # fewer KV groups: query heads per group as the parent
        kv = rng.randint(1, p.num_key_value_heads)
        kw["num_key_value_heads"] = kv
        kw["num_attention_heads"] = kv * rng.randint(1, p.num_attention_heads // p.num_key_value_heads)
    return ElasticSpec(**kw)


# SmolLM2-135M and a Nemotron-3-Nano-like hybrid: configs only (counting parameters needs no weights)
SMOLLM2 = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, layer_types="*" * 30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, intermediate_size=1536, mlp_gated=True, mlp_act="silu",
                      rope_theta=100000.0, tie_word_embeddings=True)
NANO = ModelConfig(family="nemotron_h", vocab_size=131072, hidden_size=2688, layer_types="MEMEM*E" * 7 + "MEM",
                   num_attention_heads=32, num_key_value_heads=2, head_dim=128, mamba_num_heads=64, mamba_head_dim=64,
                   ssm_state_size=128, n_groups=8, n_routed_experts=128, num_experts_per_tok=6,
                   moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, n_group=1, topk_group=1)
