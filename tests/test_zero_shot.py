"""The zero-shot pipeline of `slice` as a library call (`zero_shot.zero_shot_slice`), no command
line: tiny random parents in memory, sliced to a parameter target or an explicit spec, written
atomically and loaded back."""

import json
import random

import pytest
import torch

from conftest import entries, one_line_error, randomize_, rel_err, word_tokenizer
from star_elastic import hf
from star_elastic.elastic import ElasticSpec
from star_elastic.elastic.importance import random_importance
from star_elastic.elastic.masking import masked
from star_elastic.model import Model, ModelConfig
from star_elastic.zero_shot import SliceConfig, parse_axes, slice_budget, zero_shot_slice

WORDS = [f"w{i}" for i in range(60)]
PARENTS = {
    "nemotron_h": ModelConfig(family="nemotron_h", vocab_size=64, hidden_size=32, layer_types="M*-EM*E",
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                              mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8,
                              n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                              moe_shared_expert_intermediate_size=24, bos_token_id=1, eos_token_id=2),
    "llama": ModelConfig(family="llama", vocab_size=64, hidden_size=32, layer_types="****", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=48, mlp_gated=True, mlp_act="silu",
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
CALIB = {"batches": 2, "batch_size": 2, "seq_len": 16}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("STAR_ELASTIC_QUIET", "1")


@pytest.fixture
def tokenizer(tmp_path):
    (tmp_path / "tok").mkdir()
    return word_tokenizer(tmp_path / "tok", WORDS)


@pytest.fixture
def text(tmp_path):
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(40)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def ids(seed=0):
    return torch.randint(3, 63, (2, 13), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(PARENTS))
def test_slice_to_a_parameter_target(tmp_path, tokenizer, text, family):
    model = randomize_(Model(PARENTS[family]), seed=1).eval()
    total = model.num_parameters()
    lines = []
    out = tmp_path / "small"
    info = zero_shot_slice(model, tokenizer, out, SliceConfig(params="0.6", data=text, **CALIB), log=lines.append,
                           parent="tiny")
    target = int(0.6 * total)
    small = hf.load(out)
    n = small.num_parameters()
    assert 0.85 * target <= n <= target
    assert info["parameters"] == n and info["target"] == target and info["parent_parameters"] == total
    assert info["parent"] == "tiny" and info["importance"]["method"] == "activation"
    assert json.loads((out / "star_elastic_slice.json").read_text()) == json.loads(json.dumps(info, default=str))
    assert hf.load_tokenizer(out)("w3 w7")["input_ids"] == tokenizer("w3 w7")["input_ids"]
    assert entries(tmp_path) == ["small", "text.txt", "tok"]  # written through a staging directory, renamed
    assert any(line.startswith("importance: activations over 2 batches") for line in lines)
    assert lines[-1].startswith(f"wrote {out} (a stock Hugging Face checkpoint")

    # the slice is the parent (sorted in place by the pipeline) under the spec's masks
    spec = ElasticSpec.from_dict(info["spec"])
    assert small.config == spec.config(model.config)
    x = ids()
    with torch.no_grad(), masked(model, spec.masks(model.config)):
        assert rel_err(small(x), model(x)) < 1e-5


def test_slice_an_explicit_spec_with_given_scores(tmp_path, tokenizer):
    model = randomize_(Model(PARENTS["llama"]), seed=2).eval()
    spec = ElasticSpec(intermediate_size=32, layers=[0, 1, 3])
    scores = random_importance(model, seed=3)
    out = tmp_path / "small"
    info = zero_shot_slice(model, tokenizer, out, SliceConfig(spec=spec, scores=scores), log=lambda _: None)
    small = hf.load(out)
    assert info["target"] is None and small.num_parameters() == spec.num_parameters(PARENTS["llama"])
    assert small.config == spec.config(PARENTS["llama"]) and info["importance"]["method"] == "random"


def test_parse_axes_takes_text_or_names():
    cfg = PARENTS["llama"]
    assert parse_axes("ffn, depth", cfg) == parse_axes(("ffn", "depth"), cfg) == ["ffn", "depth"]
    one_line_error(lambda: parse_axes("mamba", cfg), "no 'mamba' axis")


@pytest.mark.parametrize("cfg,words", [
    (SliceConfig(), ["exactly one of"]),
    (SliceConfig(params="0.5", spec=ElasticSpec(intermediate_size=32)), ["exactly one of"]),
    (SliceConfig(params="0.5", scores={}, method="random"), ["exclude"]),
    (SliceConfig(params="0.5", method="sorted"), ["--method", "sorted"]),
    (SliceConfig(params="0.5", multiple=0), ["--multiple", "positive"]),
    (SliceConfig(params="0.5"), ["--data"]),  # activation importance without calibration text
    (SliceConfig(params="0.5", method="magnitude", axes="depth"), ["layer order"]),
    (SliceConfig(spec=ElasticSpec(), budget="0.5", method="random"), ["--budget", "--method"]),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, tokenizer, cfg, words):
    model = Model(PARENTS["llama"])
    one_line_error(lambda: zero_shot_slice(model, tokenizer, tmp_path / "out", cfg, log=lambda _: None), *words)
    assert entries(tmp_path) == ["tok"]


# ----------------------------------------------------------------------------- a trained budget, streamed

@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
def test_slice_budget_streams_the_budget(tmp_path, family):
    """`slice_budget(ckpt, name, out)`: the budget's slice of the sorted parent, written without
    loading it, loading back as `slice_model` of the loaded parent (same tensors, same logits)."""
    from elastic_ckpt import make_checkpoint
    from star_elastic.elastic import slice_model
    from star_elastic.elastic.checkpoint import budget_spec, read_manifest

    ckpt = make_checkpoint(tmp_path / "ckpt", family)
    lines = []
    info = slice_budget(ckpt, "0.75", tmp_path / "small", log=lines.append, progress=False)
    spec = budget_spec(read_manifest(ckpt), "0.75")
    ref, small = slice_model(hf.load(ckpt), spec), hf.load(tmp_path / "small")
    assert small.config == ref.config
    a, b = small.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(small(ids()), ref(ids()))
    assert info["streamed"] is True and info["spec"] == spec.to_dict() and info["parameters"] == small.num_parameters()
    assert info == json.loads((tmp_path / "small" / "star_elastic_slice.json").read_text())
    assert any("streaming its prefix from disk" in line for line in lines)
    assert lines[-1].startswith(f"wrote {tmp_path / 'small'} (a stock Hugging Face checkpoint, with the tokenizer")
    one_line_error(lambda: slice_budget(ckpt, "0.3", tmp_path / "nope", progress=False), "0.3", "outside the trained")
    assert entries(tmp_path) == ["ckpt", "small", "tokenizer.json"]
