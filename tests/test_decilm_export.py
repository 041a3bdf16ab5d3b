"""Per-layer Llama budgets exported as DeciLM / Nemotron-NAS `block_configs` (star_elastic/decilm.py).

No engine that serves the format (vLLM's DeciLMForCausalLM, TensorRT-LLM) runs here, so
`reference_logits` below implements its published math from the checkpoint alone: the config parsed
by the config class the checkpoint ships (as vLLM does, through trust_remote_code), per layer KV
heads = num_attention_heads // n_heads_in_group and an FFN of round_up(int(2 * ffn_mult * hidden / 3),
256) (vLLM's nemotron_nas model file), head_dim from the config (vLLM's LlamaAttention),
RoPE from transformers' own init functions, and every tensor's name and shape checked as vLLM's
weight loader does. It shares no code with star_elastic's model: our sliced logits must equal it.
"""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import LLAMA3_ROPE, one_line_error, randomize_, rel_err, word_tokenizer
from star_elastic import decilm, hf
from star_elastic.elastic import ElasticSpec, slice_model
from star_elastic.elastic.slicing import export
from star_elastic.model import Model, ModelConfig

VOCAB = 64
# FFN widths that DeciLM can express are multiples of 256: a parent with 4 x 256
LLAMA = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=64, layer_types="****", num_attention_heads=8,
                    num_key_value_heads=4, head_dim=16, intermediate_size=1024, mlp_gated=True, mlp_act="silu",
                    rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
LLAMA_BIAS = ModelConfig(**{**LLAMA.to_dict(), "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False,
                            "rope_theta": LLAMA3_ROPE["rope_theta"], "rope_scaling": dict(LLAMA3_ROPE)})
TOL = 1e-5  # our float32 model against the float64 reference


def parent(cfg: ModelConfig, seed: int = 0) -> Model:
    return randomize_(Model(cfg), seed).eval()


def ids(seq: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the reference engine

def shipped_config(directory):
    """The checkpoint's config as a DeciLM engine sees it: config.json through the config class the
    checkpoint ships (auto_map), imported from the directory as trust_remote_code imports it."""
    raw = json.loads((directory / "config.json").read_text())
    module, cls = raw["auto_map"]["AutoConfig"].split(".")
    spec = importlib.util.spec_from_file_location(f"decilm_{abs(hash(str(directory)))}", directory / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, cls).from_dict(raw)


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _inv_freq(config, head_dim):
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") == "default":
        theta = rope.get("rope_theta", 10000.0)
        return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    assert scale == 1.0
    return inv_freq.double()


@torch.no_grad()
def reference_logits(directory, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a DeciLM checkpoint by the math of vLLM's DeciLMForCausalLM, in float64."""
    config = shipped_config(directory)
    assert config.architectures == ["DeciLMForCausalLM"] and config.model_type == "nemotron-nas"
    H, nh, eps = config.hidden_size, config.num_attention_heads, config.rms_norm_eps
    d = getattr(config, "head_dim", None) or H // nh
    weights = {k: v.double() for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    expected = {"model.embed_tokens.weight": (config.vocab_size, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (config.vocab_size, H)
    layers = []
    for i, block in enumerate(config.block_configs):
        assert not (block.attention.no_op or block.attention.replace_with_linear or block.ffn.no_op
                    or block.ffn.replace_with_linear)
        kv = nh // block.attention.n_heads_in_group
        width = _find_multiple(int(2 * block.ffn.ffn_mult * H / 3), 256)
        p = f"model.layers.{i}."
        shapes = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
                  "self_attn.q_proj.weight": (nh * d, H), "self_attn.k_proj.weight": (kv * d, H),
                  "self_attn.v_proj.weight": (kv * d, H), "self_attn.o_proj.weight": (H, nh * d),
                  "mlp.gate_proj.weight": (width, H), "mlp.up_proj.weight": (width, H),
                  "mlp.down_proj.weight": (H, width)}
        if config.attention_bias:
            shapes.update({"self_attn.q_proj.bias": (nh * d,), "self_attn.k_proj.bias": (kv * d,),
                           "self_attn.v_proj.bias": (kv * d,), "self_attn.o_proj.bias": (H,)})
        if config.mlp_bias:
            shapes.update({"mlp.gate_proj.bias": (width,), "mlp.up_proj.bias": (width,), "mlp.down_proj.bias": (H,)})
        expected.update({p + k: s for k, s in shapes.items()})
        layers.append((p, kv))
    assert set(weights) == set(expected), (sorted(set(weights) ^ set(expected)))
    for k, s in expected.items():
        assert tuple(weights[k].shape) == s, (k, tuple(weights[k].shape), s)

    def linear(x, name):
        return F.linear(x, weights[name + ".weight"], weights.get(name + ".bias"))

    b, t = input_ids.shape
    freqs = torch.arange(t, dtype=torch.float64)[:, None] * _inv_freq(config, d)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(x):  # neox style: the two halves of each head
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = weights["model.embed_tokens.weight"][input_ids]
    for p, kv in layers:
        h = _rms(x, weights[p + "input_layernorm.weight"], eps)
        q = rope(linear(h, p + "self_attn.q_proj").view(b, t, nh, d).transpose(1, 2))
        k = rope(linear(h, p + "self_attn.k_proj").view(b, t, kv, d).transpose(1, 2))
        v = linear(h, p + "self_attn.v_proj").view(b, t, kv, d).transpose(1, 2)
        k, v = k.repeat_interleave(nh // kv, 1), v.repeat_interleave(nh // kv, 1)  # query head j reads KV j // group
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(b, t, nh * d), p + "self_attn.o_proj")
        h = _rms(x, weights[p + "post_attention_layernorm.weight"], eps)
        x = x + linear(F.silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = _rms(x, weights["model.norm.weight"], eps)
    head = weights["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    return x @ head.T


# ----------------------------------------------------------------------------- the format's arithmetic

def test_ffn_mult_round_trips_every_multiple_of_256_and_nothing_else():
    for hidden in (48, 64, 576, 960, 2048, 4096, 8192):
        for width in range(256, 32 * 1024 + 1, 256):
            m = decilm.ffn_mult(width, hidden)
            assert m is not None and decilm.intermediate_size(json.loads(json.dumps(m)), hidden) == width
        for width in (1, 64, 200, 1344, 1536 + 64):
            assert decilm.ffn_mult(width, hidden) is None
    # NVIDIA's published block configs (Llama-3.1-Nemotron-51B, hidden 8192): 1.3125 / 2.625 / 5.25
    assert [decilm.intermediate_size(m, 8192) for m in (1.3125, 2.625, 5.25)] == [7168, 14336, 28672]
    assert decilm.ffn_mult(28672, 8192) == 5.25


# ----------------------------------------------------------------------------- export == our sliced model

CASES = [
    (LLAMA, ElasticSpec(intermediate_size=[768, 256, None, 512])),  # per-layer FFN widths
    (LLAMA, ElasticSpec(hidden_size=48, layers=[0, 2, 3], intermediate_size=[768, None, 256, 512],
                        num_attention_heads=[4, None, 4, 4], num_key_value_heads=[4, None, 2, 4])),
    (LLAMA, ElasticSpec(num_attention_heads=4, num_key_value_heads=[4, 2, 2, 4])),  # per-layer KV groups
    (LLAMA_BIAS, ElasticSpec(hidden_size=40, layers=[1, 3], intermediate_size=[None, 512, None, 768])),
    (LLAMA_BIAS, ElasticSpec()),  # homogeneous: the format holds it too
]


@pytest.mark.parametrize("parent_cfg,spec", CASES, ids=["ffn", "hidden-depth-kv-ffn", "kv-groups", "bias-llama3", "same"])
def test_decilm_export_runs_as_the_published_math(parent_cfg, spec, tmp_path):
    model = parent(parent_cfg)
    small = slice_model(model, spec)
    out = export(small, tmp_path / "decilm", format="decilm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "configuration_decilm.py", "model.safetensors"]
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DeciLMForCausalLM"] and raw["model_type"] == "nemotron-nas"
    assert raw["num_hidden_layers"] == len(raw["block_configs"]) == small.config.num_layers
    assert raw["intermediate_size"] is None and raw["num_key_value_heads"] is None
    x = ids()
    with torch.no_grad():
        ours = small(x)
    assert rel_err(ours, reference_logits(out, x)) < TOL
    # and star_elastic reads it back as the same model
    back = hf.load(out)
    assert back.config == small.config
    with torch.no_grad():
        assert torch.equal(back(x), ours)


def test_decilm_export_random_budgets(tmp_path):
    """Random expressible budgets: any hidden size and depth, per-layer FFN multiples of 256 and KV groups."""
    rng = random.Random(0)
    for trial in range(6):
        p = parent(LLAMA if trial % 2 else LLAMA_BIAS, seed=trial)
        L = p.config.num_layers
        q = rng.choice([4, 8])
        kv = [rng.choice([k for k in (1, 2, 4) if q % k == 0 and q // k <= 2]) for _ in range(L)]
        spec = ElasticSpec(hidden_size=rng.choice([32, 48, 64]),
                           layers=sorted(rng.sample(range(L), rng.randint(1, L))),
                           intermediate_size=[rng.choice([256, 512, 768, 1024]) for _ in range(L)],
                           num_attention_heads=q, num_key_value_heads=kv)
        small = slice_model(p, spec)
        out = export(small, tmp_path / f"t{trial}", format="decilm")
        x = ids(seed=trial)
        with torch.no_grad():
            assert rel_err(small(x), reference_logits(out, x)) < TOL, spec


def test_transformers_parses_the_shipped_config_offline(tmp_path):
    """`AutoConfig.from_pretrained(DIR, trust_remote_code=True)`, what vLLM calls, in a fresh process
    with no network and a private module cache: it yields the block objects vLLM reads."""
    small = slice_model(parent(LLAMA), ElasticSpec(intermediate_size=[768, 256, None, 512],
                                                   num_attention_heads=4, num_key_value_heads=[4, 2, 2, 4]))
    out = export(small, tmp_path / "decilm", format="decilm")
    code = (
        "import json, sys\n"
        "from transformers import AutoConfig\n"
        "c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(json.dumps({'type': c.model_type, 'heads': c.num_attention_heads, 'head_dim': c.head_dim,\n"
        "  'kv': [c.num_attention_heads // b.attention.n_heads_in_group for b in c.block_configs],\n"
        "  'mult': [b.ffn.ffn_mult for b in c.block_configs], 'has_mult': all(hasattr(b.ffn, 'ffn_mult') for b in c.block_configs),\n"
        "  'no_op': [b.attention.no_op or b.ffn.no_op or b.attention.replace_with_linear for b in c.block_configs],\n"
        "  'back': json.loads(c.to_json_string())['block_configs']}))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    raw = json.loads((out / "config.json").read_text())
    assert got["type"] == "nemotron-nas" and got["heads"] == 4 and got["head_dim"] == 16 and got["has_mult"]
    assert got["kv"] == [4, 2, 2, 4] and not any(got["no_op"])
    assert [decilm.intermediate_size(m, 64) for m in got["mult"]] == [768, 256, 1024, 512]
    assert got["back"] == raw["block_configs"]


def test_decilm_export_of_an_fp8_loaded_model_is_unquantised(tmp_path):
    """A model loaded from an FP8 checkpoint holds dequantised weights but keeps the FP8
    quantization_config (so that a stock export re-quantises, as transformers does). The DeciLM
    export drops it and writes the weights as held: no FP8 tensors, no scales, and the same model back."""
    from star_elastic.convert import convert_fp8

    plain = hf.save_pretrained(parent(LLAMA), tmp_path / "plain")
    loaded = hf.load(convert_fp8(plain, tmp_path / "fp8", progress=False, log=lambda *_: None))
    assert loaded.hf_config["quantization_config"]["quant_method"] == "fp8"  # what the export inherits
    spec = ElasticSpec(intermediate_size=[768, 256, None, 512], num_attention_heads=4, num_key_value_heads=[4, 2, 2, 4])
    small = slice_model(loaded, spec)
    out = export(small, tmp_path / "decilm", format="decilm")
    raw = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in raw and raw["model_type"] == "nemotron-nas"
    weights = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert not any(k.endswith("_scale_inv") for k in weights)
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}  # dequantised, as the loaded model holds them
    back = hf.load(out)
    theirs, ours = back.state_dict(), small.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    x = ids()
    with torch.no_grad():
        expected = small.float()(x)
    assert rel_err(expected, reference_logits(out, x)) < TOL
    # and within FP8's error of the unquantised parent's same slice
    with torch.no_grad():
        assert 0 < rel_err(expected, slice_model(parent(LLAMA), spec)(x)) < 0.08


# ----------------------------------------------------------------------------- what the format cannot hold

def test_decilm_refuses_what_it_cannot_express_and_writes_nothing(tmp_path):
    hybrid = ModelConfig(vocab_size=VOCAB, hidden_size=32, layer_types="M*-E", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=256, mamba_num_heads=4,
                         mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)
    cases = [
        (slice_model(parent(hybrid), ElasticSpec(mamba_num_heads=[2, None, None, None])),
         ("Llama", "nemotron_h", "star-elastic's format")),
        (slice_model(parent(LLAMA), ElasticSpec(num_attention_heads=[4, 8, 8, 8])),
         ("query heads", "[4, 8]", "num_attention_heads", "n_heads_in_group")),
        (slice_model(parent(LLAMA), ElasticSpec(intermediate_size=[768, 320, None, None])),
         ("layer 1", "320", "256", "ffn_mult")),
        (Model(ModelConfig(**{**LLAMA.to_dict(), "mlp_act": "gelu"})), ("gelu", "SiLU")),
    ]
    for i, (model, words) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        one_line_error(lambda: export(model, out, format="decilm"), "DeciLM", *words)
        assert not out.exists() and not any(tmp_path.glob(f".refused{i}*"))
    one_line_error(lambda: export(Model(LLAMA), tmp_path / "x", format="onnx"), "format", "decilm")


def test_star_elastic_format_hints_at_decilm_for_llama_only_and_converts(tmp_path, capsys, monkeypatch):
    from star_elastic import load, load_tokenizer

    (tmp_path / "tok").mkdir()
    small = slice_model(parent(LLAMA), ElasticSpec(intermediate_size=[768, 256, None, 512]))
    own = export(small, tmp_path / "own", word_tokenizer(tmp_path / "tok"))
    assert "DeciLM" in capsys.readouterr().err
    # an exported slice (e.g. `slice CKPT --budget`'s output) converts, tokenizer included
    out = export(load(own), tmp_path / "decilm", load_tokenizer(own), format="decilm")
    # our tools read its tokenizer without running, or asking to run, the shipped config class
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked whether to run the checkpoint's code"))
    assert (out / "tokenizer.json").exists() and load_tokenizer(out) is not None
    x = ids()
    with torch.no_grad():
        assert rel_err(small(x), reference_logits(out, x)) < TOL
    hybrid = ModelConfig(vocab_size=VOCAB, hidden_size=32, layer_types="MM*", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                         n_groups=2, chunk_size=8)
    export(slice_model(parent(hybrid), ElasticSpec(mamba_num_heads=[2, None, None])), tmp_path / "own-h")
    err = capsys.readouterr().err
    assert "per-layer" in err and "DeciLM" not in err


def test_reading_foreign_decilm_blocks(tmp_path):
    """A DeciLM checkpoint with sub-blocks we cannot run (no_op / replace_with_linear, as NVIDIA's
    Puzzle models have) or a malformed block is refused in one line when loaded."""
    small = slice_model(parent(LLAMA), ElasticSpec(intermediate_size=[768, 256, None, 512]))
    out = export(small, tmp_path / "decilm", format="decilm")
    raw = json.loads((out / "config.json").read_text())
    for mutate, words in [
        (lambda r: r["block_configs"][2]["attention"].update(no_op=True), ("block 2", "no_op")),
        (lambda r: r["block_configs"][1]["ffn"].update(replace_with_linear=True), ("block 1", "replace_with_linear")),
        (lambda r: r["block_configs"][0]["attention"].update(n_heads_in_group=3), ("block 0", "n_heads_in_group")),
        (lambda r: r["block_configs"].pop(), ("block_configs", "num_hidden_layers")),
    ]:
        bad = json.loads(json.dumps(raw))
        mutate(bad)
        (out / "config.json").write_text(json.dumps(bad))
        one_line_error(lambda: hf.load(out), "config.json", *words)


# ----------------------------------------------------------------------------- transformers' own per-layer configs

def test_stock_transformers_llama_and_nemotron_h_refuse_per_layer_config():
    """transformers 5 has a generic `per_layer_config` (configuration_utils' HeterogeneousConfigMixin),
    but its Llama and NemotronH modeling read one global size per axis and raise on a per-layer one.
    When this fails, a transformers release builds them per layer: revisit README "What loads where"."""
    from transformers import LlamaConfig, LlamaForCausalLM, NemotronHConfig, NemotronHForCausalLM

    llama = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    try:
        cfg = LlamaConfig(**llama, per_layer_config={0: {"intermediate_size": 32}})
    except TypeError:
        pytest.skip("this transformers has no per_layer_config")
    with pytest.raises(Exception, match="per-layer"):
        LlamaForCausalLM(cfg)
    nh = NemotronHConfig(vocab_size=VOCAB, hidden_size=64, layers_block_type=["mamba", "moe"], mamba_num_heads=8,
                         mamba_head_dim=8, n_groups=2, ssm_state_size=8, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                         per_layer_config={0: {"mamba_num_heads": 4}})
    with pytest.raises(Exception, match="per-layer"):
        NemotronHForCausalLM(nh)
