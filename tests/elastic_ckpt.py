"""A tiny elastic checkpoint for the serving tests, written in a second: a random parent, budgets
whose architectures are given (no training: serving depends on the shapes, not the quality), and a
WordLevel tokenizer."""

import torch

import conftest
from conftest import randomize_
from star_elastic.elastic import ElasticSpec
from star_elastic.elastic.checkpoint import save_elastic
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router
from star_elastic.model import Model, ModelConfig

WORDS = [f"w{i}" for i in range(60)]

# n_groups=2 Mamba with biases, GQA attention, MoE, MLP; budgets cut heads per group and drop a layer
NEMOTRON = ModelConfig(vocab_size=63, hidden_size=32, layer_types="M*EM-*", num_attention_heads=8,
                       num_key_value_heads=2, head_dim=8, intermediate_size=64, mamba_num_heads=8, mamba_head_dim=8,
                       ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, mamba_bias=True,
                       attention_bias=True, max_position_embeddings=96, bos_token_id=1, eos_token_id=2)
LLAMA = ModelConfig(family="llama", vocab_size=63, hidden_size=32, layer_types="***", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=64, rope_theta=10000.0, mlp_gated=True,
                    mlp_act="silu", tie_word_embeddings=True, max_position_embeddings=96, bos_token_id=1,
                    eos_token_id=2)
SPECS = {
    "nemotron_h": {"1.0": ElasticSpec(),
                   "0.75": ElasticSpec(hidden_size=24, num_attention_heads=4, mamba_num_heads=6, intermediate_size=48),
                   "0.5": ElasticSpec(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, mamba_num_heads=4,
                                      intermediate_size=32, n_routed_experts=4, moe_intermediate_size=8,
                                      moe_shared_expert_intermediate_size=8, layers=[0, 1, 2, 3, 5])},
    "llama": {"1.0": ElasticSpec(),
              "0.75": ElasticSpec(hidden_size=24, num_attention_heads=2, intermediate_size=48),
              "0.5": ElasticSpec(hidden_size=16, num_attention_heads=[2, 4, 2], num_key_value_heads=[1, 2, 2],
                                 intermediate_size=[32, 16, 48], layers=[0, 2])},
}


def word_tokenizer(directory, chat_template: str | None = None):
    return conftest.word_tokenizer(directory, WORDS, chat_template)


def random_parent(family: str, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = randomize_(Model(NEMOTRON if family == "nemotron_h" else LLAMA), seed).eval()
    with torch.no_grad():  # decisive logits: greedy choices are not near-ties
        model.lm_head.weight.mul_(8)
    return model


def make_checkpoint(out, family: str = "nemotron_h", chat_template: str | None = None, seed: int = 0):
    """Write an elastic checkpoint with budgets 1.0 / 0.75 / 0.5 (architectures from SPECS) to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model = random_parent(family, seed)
    specs = SPECS[family]
    budgets = [parse_budget(name, model.config) for name in specs]
    router = Router(model.config, budgets)
    router.spec = lambda i: specs[budgets[i].name]  # the given architectures instead of a trained argmax
    return save_elastic(model, router, budgets, out, tokenizer=word_tokenizer(out.parent, chat_template))
