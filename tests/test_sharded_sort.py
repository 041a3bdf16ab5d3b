"""The function-preserving sort applied while a checkpoint is read (star_elastic/sharded_sort.py):
in one process, its two appliers of the one axis-to-tensor mapping (layout.index_plan) against each other, and
one-line refusals of permutations that do not fit. Sharded over 2 gloo ranks:
tests/test_sharded_importance.py (one spawn for importance, sort and search)."""

import copy
import random

import pytest
import torch

from conftest import one_line_error, random_parent_config, random_spec, randomize_
from star_elastic import hf, parallel, sharded_sort
from star_elastic.elastic.importance import random_importance
from star_elastic.elastic.slicing import take
from star_elastic.elastic.sort import apply_plan, index_plan, permutations, sort_model
from star_elastic.model import Model, ModelConfig

pytestmark = pytest.mark.skipif(not parallel.available(), reason="this torch has no FSDP2")

# odd sizes (vocabulary 65, 6 experts) so that the ranks' shards differ in length; Mamba heads in
# 2 groups and experts in 2 router groups, so that the sort's group constraints are exercised
NEMOTRON = ModelConfig(vocab_size=65, hidden_size=32, layer_types="M*-E", num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                       n_groups=2, chunk_size=8, n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2,
                       moe_intermediate_size=16, moe_shared_expert_intermediate_size=24)
LLAMA = ModelConfig(family="llama", vocab_size=65, hidden_size=32, layer_types="**", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=48, mlp_gated=True, mlp_act="silu",
                    rope_theta=10000.0, tie_word_embeddings=True)
CONFIGS = {"nemotron": NEMOTRON, "llama": LLAMA}
X = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(1))


def parent(family):
    torch.manual_seed(0)
    return randomize_(Model(CONFIGS[family])).eval()


def scores(family):  # every axis, experts' FFN neurons one order per expert
    return random_importance(parent(family), seed=5)


def _save(tmp):
    for family in CONFIGS:
        model = parent(family)
        total = sum(p.numel() * 4 for p in model.parameters())
        hf.save_pretrained(model, tmp / family, max_shard_bytes=total // 2)  # shards + index


def sorted_parent(family, s: dict):
    """sort_model on the whole parent, by scores `s`: what a sorted load must give."""
    model = copy.deepcopy(parent(family))
    perms = sort_model(model, s)
    return model, perms


def test_one_process_without_torch_distributed(tmp_path):
    _save(tmp_path)
    for family in CONFIGS:
        want, perms = sorted_parent(family, scores(family))
        m, got_perms = sharded_sort.load_sorted(tmp_path / family, scores=scores(family), device="cpu")
        assert got_perms.keys() == perms.keys() and all(torch.equal(got_perms[k], v) for k, v in perms.items())
        assert not parallel.is_sharded(m) and (m.lm_head.weight is m.embed.weight) == (family == "llama")
        got, want = m.state_dict(), want.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        with torch.no_grad():
            assert (m(X) - parent(family)(X)).abs().max().item() < 1e-4
        # from the permutations, into bf16: the sorted values, cast (the MoE router stays float32)
        bf16 = sharded_sort.load_sorted(tmp_path / family, perms=perms, dtype=torch.bfloat16, device="cpu")[0]
        for k, v in bf16.state_dict().items():
            assert torch.equal(v, want[k] if ".mixer.gate." in k else want[k].to(torch.bfloat16)), k


def test_bad_permutations_are_refused_in_one_line(tmp_path):
    _save(tmp_path)
    path = tmp_path / "nemotron"
    perms = permutations(NEMOTRON, scores("nemotron"))

    def load(**kw):
        return lambda: sharded_sort.load_sorted(path, device="cpu", **kw)

    one_line_error(load(), "scores or permutations")
    one_line_error(load(scores=scores("nemotron"), perms=perms), "exactly one")
    one_line_error(load(perms={**perms, "layers.2.ffn": torch.arange(47)}), "layers.2.ffn", "48")
    one_line_error(load(perms={**perms, "hidden": torch.zeros(32, dtype=torch.long)}), "hidden", "permutation")
    one_line_error(load(perms={"layers.0.ffn": torch.arange(48)}), "layers.0.ffn", "no such axis")
    one_line_error(load(perms={"layers.1.attn_heads": torch.tensor([0, 2, 1, 3])}), "KV group")
    one_line_error(load(perms={"layers.1.kv_heads": torch.tensor([1, 0])}), "KV group")
    one_line_error(load(perms={"layers.0.mamba_heads": torch.tensor([2, 1, 0, 3])}), "groups")
    one_line_error(load(perms={"layers.3.experts": torch.tensor([3, 1, 2, 0, 4, 5])}), "groups")
    one_line_error(load(perms={"layers.3.expert_ffn": torch.arange(16).repeat(5, 1)}), "layers.3.expert_ffn")
    # whole KV groups with their query heads, and experts inside their group, are fine
    sharded_sort.load_sorted(path, device="cpu", perms={"layers.1.attn_heads": torch.tensor([2, 3, 0, 1]),
                                                        "layers.1.kv_heads": torch.tensor([1, 0]),
                                                        "layers.3.experts": torch.tensor([2, 0, 1, 5, 4, 3])})


@pytest.mark.parametrize("seed", range(8))
def test_the_sort_and_the_slicer_apply_the_mapping_alike(seed):
    """`layout.index_plan` is applied two ways: `apply_plan` (the sorts: experts first, then each
    kept expert's own neuron order) and `slicing.take` (per-expert orders by parent expert first,
    then every index; also on stream.py's stand-in tensors). On random parents, with sort
    permutations and with a random spec's prefix indices, they cut the same tensors."""
    rng = random.Random(seed)
    cfg = random_parent_config(rng)
    torch.manual_seed(seed)
    model = Model(cfg)
    for idx in (permutations(cfg, random_importance(model, seed)), random_spec(cfg, rng).indices(cfg)):
        for name, t in model.state_dict().items():
            assert torch.equal(apply_plan(t, index_plan(name, cfg, idx)), take(name, t, cfg, idx)), name
