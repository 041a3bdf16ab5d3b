"""Checkpoint IO: our save_pretrained read by transformers, transformers' checkpoints read by our
load, one-line StarElasticErrors for every bad input, and atomic saving."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import LLAMA3_ROPE, VOCAB, entries, hf_model, llama_config, nemotron_config, one_line_error, randomize_, rel_err
from star_elastic import hf
from star_elastic.hf import config_from_hf
from star_elastic.model import Model, ModelConfig

TOL = 1e-4

NEMOTRON = ModelConfig(family="nemotron_h", vocab_size=VOCAB, hidden_size=32, layer_types="M*-EM",
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                       mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8,
                       n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                       moe_shared_expert_intermediate_size=24, n_group=2, topk_group=1, norm_topk_prob=False,
                       routed_scaling_factor=2.0, moe_latent_size=16, time_step_min=0.001,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def our_nemotron(**changes) -> Model:
    return randomize_(Model(ModelConfig(**{**NEMOTRON.to_dict(), **changes})), seed=1).eval()


def our_llama(**overrides) -> Model:
    return randomize_(Model(config_from_hf(llama_config(**overrides).to_dict())), seed=2).eval()


def ids(seq=13):
    return torch.randint(0, VOCAB, (2, seq))


def hf_logits(directory, x):
    ref, info = AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return ref.eval()(x).logits


# ----------------------------------------------------------------------------- ours -> transformers

SAVE_CASES = {
    "nemotron_h": lambda: our_nemotron(),
    "nemotron_h-tied": lambda: our_nemotron(tie_word_embeddings=True),
    "llama-tied": lambda: our_llama(tie_word_embeddings=True),
    "llama3-untied": lambda: our_llama(rope_parameters=LLAMA3_ROPE),
}


@pytest.mark.parametrize("shard", [None, 4096], ids=["single", "sharded"])
@pytest.mark.parametrize("make", list(SAVE_CASES.values()), ids=list(SAVE_CASES))
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, make, shard):
    model = make()
    kwargs = {} if shard is None else {"max_shard_bytes": shard}
    out = hf.save_pretrained(model, tmp_path / "ckpt", **kwargs)
    assert out == tmp_path / "ckpt"
    files = entries(out)
    if shard is None:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:
        shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
        assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "config.json").read_text())["architectures"] == [hf.SUPPORTED[model.config.family]]
    x = ids()
    with torch.no_grad():
        expected = model(x)
    assert rel_err(hf_logits(out, x), expected) < TOL
    back = hf.load(out)
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    with torch.no_grad():
        assert rel_err(back(x), expected) < 1e-6
    assert entries(tmp_path) == ["ckpt"]  # no staging directories left behind


# ----------------------------------------------------------------------------- transformers -> ours

LOAD_CONFIGS = {
    "nemotron_h": lambda: nemotron_config(layers_block_type=["mamba", "attention", "mlp", "moe", "mamba"],
                                          n_group=2, topk_group=1, moe_latent_size=16),
    "nemotron_h-tied-flag": lambda: nemotron_config(tie_word_embeddings=True),
    "llama-tied": lambda: llama_config(tie_word_embeddings=True),
    "llama3-untied": lambda: llama_config(rope_parameters=LLAMA3_ROPE),
}
# How much of transformers' output the test repairs before calling our load: nothing; config.json's
# special floats; and also the tensor names / expert layout. Each level isolates one bug.
FIXES = ("as-saved", "floats-decoded", "floats-decoded+keys-converted")
LOAD_CASES = []
for _name, _make in LOAD_CONFIGS.items():
    for _level, _fix in enumerate(FIXES if _name.startswith("nemotron_h") else FIXES[:1]):
        LOAD_CASES.append(pytest.param(_make, _level, id=f"{_name}-{_fix}"))


def _decode_special_floats(directory):
    """Rewrite config.json the way transformers reads it back ({'__float__': 'Infinity'} -> inf)."""
    from transformers import PretrainedConfig

    f = directory / "config.json"
    f.write_text(json.dumps(PretrainedConfig._decode_special_floats(json.loads(f.read_text()))))


def _convert_hub_keys(directory):
    """backbone.* -> model.*, experts.N.{up,down}_proj.weight -> stacked experts.{up,down}_proj."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
        (directory / name).unlink()
    if index.exists():
        index.unlink()
    out, experts = {}, {}
    for k, v in tensors.items():
        k = "model." + k[len("backbone."):] if k.startswith("backbone.") else k
        parts = k.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            experts.setdefault(".".join(parts[:i + 1] + [parts[i + 2]]), {})[int(parts[i + 1])] = v
        else:
            out[k] = v
    for k, per in experts.items():
        out[k] = torch.stack([per[e] for e in sorted(per)])
    save_file(out, str(directory / "model.safetensors"))


@pytest.mark.parametrize("shard", [None, "4KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("make_config,fix", LOAD_CASES)
def test_load_reads_transformers_save_pretrained(tmp_path, make_config, fix, shard):
    ref = hf_model(make_config())
    kwargs = {} if shard is None else {"max_shard_size": shard}
    ref.save_pretrained(tmp_path / "ref", **kwargs)
    if shard is not None:
        assert (tmp_path / "ref" / "model.safetensors.index.json").exists()
    if fix >= 1:
        _decode_special_floats(tmp_path / "ref")
    if fix >= 2:
        _convert_hub_keys(tmp_path / "ref")
    model = hf.load(tmp_path / "ref")
    x = ids(21)
    with torch.no_grad():
        assert rel_err(model(x), ref(x).logits) < TOL


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def saved(tmp_path):
    """A small saved nemotron_h checkpoint."""
    return hf.save_pretrained(our_nemotron(), tmp_path / "ckpt")


def test_a_saved_checkpoint_has_the_permissions_of_a_plain_write(tmp_path):
    """The staging directory is made 0700 and safetensors writes 0600: a checkpoint saved by one
    account could not be read by a server running as another. Now it gets what the umask allows."""
    import stat

    old = os.umask(0o022)
    try:
        out = hf.save_pretrained(our_llama(), tmp_path / "ckpt", max_shard_bytes=20_000)  # several shards
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len([p for p in files if p.suffix == ".safetensors"]) > 1
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_error_nonexistent_path(tmp_path):
    one_line_error(lambda: hf.load(tmp_path / "missing"), "missing", "no such file")


def test_error_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: hf.load(tmp_path / "empty"), "config.json")


def test_error_unknown_architecture(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                               "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 100}))
    save_file({"wte.weight": torch.zeros(100, 32)}, str(d / "model.safetensors"))
    msg = one_line_error(lambda: hf.load(d), "unknown architecture", "GPT2LMHeadModel")
    assert "NemotronHForCausalLM" in msg and "LlamaForCausalLM" in msg  # says what is supported


def test_error_invalid_json(saved):
    (saved / "config.json").write_text("{not json")
    one_line_error(lambda: hf.load(saved), "config.json", "json")


def test_error_config_weight_shape_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hidden_size"] = 48
    (saved / "config.json").write_text(json.dumps(cfg))
    one_line_error(lambda: hf.load(saved), "shape", "(100, 32)", "(100, 48)")


def test_error_missing_tensor(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    del tensors["backbone.layers.0.mixer.D"]  # NemotronH is saved in transformers' on-disk layout
    save_file(tensors, str(saved / "model.safetensors"))
    one_line_error(lambda: hf.load(saved), "missing", "layers.0.mixer.D")


def test_error_unexpected_tensor(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["backbone.layers.9.mixer.D"] = torch.zeros(4)
    save_file(tensors, str(saved / "model.safetensors"))
    one_line_error(lambda: hf.load(saved), "unexpected", "layers.9.mixer.D")


def test_error_pickle_only_directory_is_never_unpickled(tmp_path, monkeypatch):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(llama_config().to_dict()))
    # not a pickle at all: unpickling would fail with a different error than the one we expect
    (d / "pytorch_model.bin").write_bytes(b"\x80\x05garbage, not a pickle \xff\x00" * 8)

    def trap(*args, **kwargs):
        raise AssertionError("tried to unpickle")

    monkeypatch.setattr(torch, "load", trap)
    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "loads", trap)
    one_line_error(lambda: hf.load(d), "pickle", "pytorch_model.bin", "safetensors")


def test_error_pickle_file_path(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"garbage")
    one_line_error(lambda: hf.load(f), "pickle")


def test_error_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    one_line_error(lambda: hf.load(saved), "model.safetensors", "truncated")


def test_error_truncated_header(saved):
    (saved / "model.safetensors").write_bytes(b"\x10")
    one_line_error(lambda: hf.load(saved), "safetensors")


def test_error_missing_shard(tmp_path):
    out = hf.save_pretrained(our_nemotron(), tmp_path / "ckpt", max_shard_bytes=4096)
    (out / "model-00002-of-{:05d}.safetensors".format(len(list(out.glob("model-*"))))).unlink()
    one_line_error(lambda: hf.load(out), "missing", "model-00002")


def test_error_no_weights(saved):
    (saved / "model.safetensors").unlink()
    one_line_error(lambda: hf.load(saved), "model.safetensors")


def test_error_random_file_not_gguf(tmp_path):
    f = tmp_path / "weights.dat"
    f.write_bytes(os.urandom(4096))
    one_line_error(lambda: hf.load(f), "weights.dat", "checkpoint directory")


def test_error_garbage_gguf(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from star_elastic import assets

    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path / "cache")
    f = tmp_path / "fake.gguf"
    f.write_bytes(os.urandom(4096))
    one_line_error(lambda: hf.load(f), "fake.gguf", "gguf")
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_error_per_layer_sizes_cannot_be_saved(tmp_path):
    model = our_nemotron()
    model.config.layer_sizes = [{"mamba_num_heads": 2}, {}, {}, {}, {}]
    one_line_error(lambda: hf.save_pretrained(model, tmp_path / "x"), "per-layer")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- atomic saving

def _failing_save_file(after: int):
    calls = {"n": 0}

    def fake(*args, **kwargs):
        if calls["n"] >= after:
            raise RuntimeError("disk full")
        calls["n"] += 1
        return save_file(*args, **kwargs)

    return fake


@pytest.mark.parametrize("after,shard", [(0, None), (3, 4096)], ids=["first-write", "mid-shards"])
def test_failed_save_writes_nothing(tmp_path, monkeypatch, after, shard):
    monkeypatch.setattr(hf, "save_file", _failing_save_file(after))
    kwargs = {} if shard is None else {"max_shard_bytes": shard}
    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_pretrained(our_nemotron(), tmp_path / "out" / "ckpt", **kwargs)
    assert entries(tmp_path / "out") == []  # neither the checkpoint nor a temporary directory


def test_failed_save_keeps_existing_checkpoint(tmp_path, monkeypatch):
    old = our_llama()
    hf.save_pretrained(old, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    monkeypatch.setattr(hf, "save_file", _failing_save_file(0))
    with pytest.raises(RuntimeError):
        hf.save_pretrained(our_nemotron(), tmp_path / "ckpt")
    assert entries(tmp_path) == ["ckpt"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before


def test_overwrite_existing_output_dir(tmp_path):
    first, second = our_nemotron(), our_llama(tie_word_embeddings=True)
    hf.save_pretrained(first, tmp_path / "ckpt", max_shard_bytes=4096)  # shards + index
    (tmp_path / "ckpt" / "stale.txt").write_text("old")
    hf.save_pretrained(second, tmp_path / "ckpt")  # single file: the old index must not survive
    assert entries(tmp_path) == ["ckpt"]
    assert entries(tmp_path / "ckpt") == ["config.json", "model.safetensors"]
    x = ids()
    loaded = hf.load(tmp_path / "ckpt")
    assert loaded.config.family == "llama"
    with torch.no_grad():
        assert rel_err(loaded(x), second(x)) < 1e-6
    hf.save_pretrained(loaded, tmp_path / "ckpt")  # overwrite a directory with the model loaded from it
    with torch.no_grad():
        assert rel_err(hf.load(tmp_path / "ckpt")(x), second(x)) < 1e-6
    assert entries(tmp_path) == ["ckpt"]


def test_save_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    out = hf.save_pretrained(our_llama(), tmp_path / "ckpt", tokenizer=tok)
    back = hf.load_tokenizer(out)
    assert back is not None and back("w3 w7")["input_ids"] == tok("w3 w7")["input_ids"]


def test_a_gguf_files_special_tokens_win_over_what_the_reader_made_of_them(tmp_path):
    """transformers 5.17 read SmolLM2-Instruct's EOS as its BOS (<|im_start|>) where the GGUF file says
    <|im_end|>: documents were joined and chat answers ended at the wrong token on the GPU machines. The
    conversion sets BOS, EOS and padding to the file's ids, and leaves a token the file does not name alone."""
    import gguf

    from conftest import word_tokenizer

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = word_tokenizer(tmp_path)
    tok.eos_token = "<s>"  # the reader's mistake: EOS = BOS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 1, None)
    hf.special_tokens_from_gguf(tok, path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
