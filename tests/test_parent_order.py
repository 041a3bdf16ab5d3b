"""An elastic checkpoint records the order its parent was sorted in (parent_order.safetensors), and
`sorted_parent` sorts the parent's own checkpoint the same way: the teacher, unit for unit, so that what
training moved is a difference of weights."""

import json

import pytest
import torch

from conftest import ELASTIC_WORDS, one_line_error, randomize_, word_tokenizer
from star_elastic import hf
from star_elastic.elastic.checkpoint import PARENT_ORDER_FILE, load_elastic, read_parent_order, sorted_parent
from star_elastic.elastic.sort import apply_permutations
from star_elastic.elastify import ElastifyConfig, elastify
from star_elastic.errors import StarElasticError
from star_elastic.model import Model, ModelConfig

CFG = dict(vocab_size=63, hidden_size=32, layer_types="M*E-", num_attention_heads=4, num_key_value_heads=2,
           head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
           chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
           moe_shared_expert_intermediate_size=16, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def elastified(tmp_path_factory):
    """(parent directory, elastic checkpoint) of a tiny hybrid trained a few steps at a small rate."""
    root = tmp_path_factory.mktemp("order")
    tokenizer = word_tokenizer(root)
    torch.manual_seed(0)
    hf.save_pretrained(randomize_(Model(ModelConfig(**CFG))), root / "parent", tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(ELASTIC_WORDS[(int(torch.randint(0, 60, (1,), generator=g)) + j) % 60] for j in range(40))
            for _ in range(60)]
    (root / "text.txt").write_text("\n\n".join(docs))
    elastify(hf.load(root / "parent"), tokenizer, str(root / "text.txt"), root / "ckpt",
             ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32 * 3, seq_len=32, batch_size=16, calib_batches=2,
                            eval_tokens=128, lr=1e-4), log=lambda *_: None)
    return root / "parent", root / "ckpt"


def test_the_sorted_parent_is_the_checkpoints_teacher_unit_for_unit(elastified):
    parent_dir, ckpt = elastified
    order = read_parent_order(ckpt)
    assert any(not torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)) for p in order.values())  # it sorted
    assert PARENT_ORDER_FILE in json.loads((ckpt / "manifest.json").read_text())["files"]  # checksummed
    teacher = sorted_parent(ckpt, parent_dir, dtype=torch.float32)
    parent = hf.load(parent_dir, dtype=torch.float32)
    trained = load_elastic(ckpt, dtype=torch.float32).model
    ids = torch.randint(3, 63, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # sorting keeps the function
        torch.testing.assert_close(teacher(ids), parent(ids), rtol=1e-4, atol=1e-4)
    # three steps at 1e-4 move each weight by well under 0.01; a unit out of place moves it by the weights' spread
    moved = {n: float((t - teacher.state_dict()[n]).abs().max()) for n, t in trained.state_dict().items()}
    unsorted = {n: float((t - parent.state_dict()[n]).abs().max()) for n, t in trained.state_dict().items()}
    assert max(moved.values()) < 0.01, max(moved.values())
    assert max(unsorted.values()) > 0.1  # the unsorted parent is not the teacher


def test_order_applied_twice_is_a_permutation_of_a_permutation(elastified):
    parent_dir, ckpt = elastified
    once = sorted_parent(ckpt, parent_dir, dtype=torch.float32)
    twice = apply_permutations(sorted_parent(ckpt, parent_dir, dtype=torch.float32), read_parent_order(ckpt))
    ids = torch.randint(3, 63, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(twice(ids), once(ids), rtol=1e-4, atol=1e-4)


def test_a_wrong_parent_or_an_old_checkpoint_is_one_line(elastified, tmp_path):
    parent_dir, ckpt = elastified
    other = tmp_path / "other"
    hf.save_pretrained(Model(ModelConfig(**{**CFG, "hidden_size": 48})), other)
    msg = one_line_error(lambda: sorted_parent(ckpt, other), "not the parent", "hidden_size")
    assert "48" in msg
    for field, value in [("mamba_head_dim", 4), ("head_dim", 4), ("ssm_state_size", 4)]:  # shapes alone differ
        hf.save_pretrained(Model(ModelConfig(**{**CFG, field: value})), tmp_path / field)
        one_line_error(lambda: sorted_parent(ckpt, tmp_path / field), "not the parent", field)
    bad = {k: v.flip(-1)[..., :-1] for k, v in read_parent_order(ckpt).items()}  # not permutations of the units
    with pytest.raises(StarElasticError, match="permutation"):
        apply_permutations(hf.load(parent_dir), bad)
    (tmp_path / "old").mkdir()
    one_line_error(lambda: read_parent_order(tmp_path / "old"), PARENT_ORDER_FILE, "not recorded")
