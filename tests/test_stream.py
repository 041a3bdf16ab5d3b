"""Streaming slicer: what `stream_slice` writes from a parent on disk is what `slice_model` computes
on the loaded parent (same tensors, bit for bit, same config), for every parent layout (ours,
transformers' own, stacked experts; single file or shards) and random specs; the output is atomic,
errors are one line, and the memory held at once is about one tensor."""

import json
import random
import weakref

import pytest
import torch
from safetensors.torch import load_file
from transformers import PretrainedConfig

from conftest import entries, hf_model, llama_config, nemotron_config, one_line_error, randomize_
from star_elastic import hf
from star_elastic.elastic import ElasticSpec, export, slice_model, sort_model
from star_elastic.elastic import stream
from star_elastic.elastic.stream import output_bytes, stream_slice
from star_elastic.model import Model, ModelConfig
from conftest import random_parent_config, random_spec
from test_elastic import LLAMA, NEMOTRON, hf_logits, random_scores

VOCAB = 64


def ids(seq=9, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))


def tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference(parent_dir, spec) -> Model:
    """What streaming must reproduce: the loaded parent, sliced in memory."""
    return slice_model(hf.load(parent_dir), spec)


def savable(model: Model) -> Model:
    """`hf.load` keeps config.json's encoded infinities ({"__float__": "Infinity"}) in `hf_config`,
    which `config_to_hf` cannot take back (a NemotronH loaded from disk cannot be saved as it is):
    decode them, as stream_slice does."""
    model.hf_config = PretrainedConfig._decode_special_floats(model.hf_config)
    return model


def assert_same_model(out_dir, small: Model, vocab=VOCAB):
    """`out_dir` loads as `small`: equal config, bit-equal tensors, equal logits."""
    back = hf.load(out_dir)
    assert back.config == small.config
    a, b = back.state_dict(), small.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = ids(vocab=vocab)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def save_parent(model: Model, directory, **kwargs):
    return hf.save_pretrained(model, directory, **kwargs)


# ----------------------------------------------------------------------------- equality with slice_model

@pytest.mark.parametrize("seed", range(16))
def test_stream_equals_slice_model_random_specs(tmp_path, seed):
    rng = random.Random(1000 + seed)
    cfg = random_parent_config(rng)
    model = randomize_(Model(cfg), seed).eval()
    sort_model(model, random_scores(cfg, seed))  # a sorted parent, as an elastic checkpoint stores it
    if rng.random() < 0.3:
        model.to(torch.bfloat16)
    parent = save_parent(model, tmp_path / "parent", max_shard_bytes=rng.choice([hf.SHARD_BYTES, 3000]))
    spec = random_spec(cfg, rng)
    shard = rng.choice([hf.SHARD_BYTES, 2500])
    try:
        hf.config_to_hf(ModelConfig.from_dict({**spec.config(cfg).to_dict(), "layer_sizes": None}))
    except Exception:  # transformers rejects e.g. a Llama hidden size not a multiple of its heads
        one_line_error(lambda: stream_slice(parent, spec, tmp_path / "out", progress=False), "transformers rejects")
        assert entries(tmp_path) == ["parent"]
        spec.hidden_size = None
    out = stream_slice(parent, spec, tmp_path / "out", progress=False, max_shard_bytes=shard)
    assert_same_model(out, reference(parent, spec))
    assert entries(tmp_path) == ["out", "parent"]  # no staging directory left behind


SPECS = {
    "nemotron-homogeneous": (NEMOTRON, ElasticSpec(
        hidden_size=16, layers=[0, 1, 2, 3, 6], num_attention_heads=2, num_key_value_heads=1, mamba_num_heads=4,
        mamba_head_dim=4, intermediate_size=20, n_routed_experts=4, moe_intermediate_size=6,
        moe_shared_expert_intermediate_size=10)),
    "nemotron-experts-only": (NEMOTRON, ElasticSpec(n_routed_experts=4)),
    "nemotron-per-layer": (NEMOTRON, ElasticSpec(
        hidden_size=20, layers=[0, 1, 2, 3, 4, 6], mamba_num_heads=[2, None, None, None, 6, None, None],
        n_routed_experts=[None, None, None, 4, None, None, 6], num_attention_heads=[None, 2, None, None, None, 6, None],
        num_key_value_heads=[None, 1, None, None, None, 3, None])),
    "llama-homogeneous": (LLAMA, ElasticSpec(hidden_size=16, layers=[0, 2], num_attention_heads=4,
                                             intermediate_size=24)),
    "llama-per-layer": (LLAMA, ElasticSpec(intermediate_size=[8, 30, None], layers=[0, 1])),
    "full": (NEMOTRON, ElasticSpec()),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_stream_output_is_exports_output(tmp_path, name, capsys):
    """Same config.json text, same tensor names/values and (same shard size) the same shards as
    `export(slice_model(load(parent)))`; homogeneous outputs load in stock transformers."""
    cfg, spec = SPECS[name]
    parent = save_parent(randomize_(Model(cfg), 3).eval(), tmp_path / "parent")
    small = savable(reference(parent, spec))
    ref = export(small, tmp_path / "ref")
    capsys.readouterr()
    out = stream_slice(parent, spec, tmp_path / "out")
    err = capsys.readouterr().err
    assert "slicing parent" in err and "tensor" in err  # the progress bar
    assert (out / "config.json").read_text() == (ref / "config.json").read_text()
    a, b = tensors(out), tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_model(out, small)
    if small.config.layer_sizes is None:
        got, hf_cfg = hf_logits(out, ids())  # asserts no missing / unexpected / mismatched keys
        with torch.no_grad():
            assert ((got - small(ids())).abs().max() / small(ids()).abs().max()) < 1e-4
    else:
        assert "per-layer" in err and "star_elastic.load" in err
        assert json.loads((out / "config.json").read_text())["model_type"] == "star_elastic"


def test_sharded_output_matches_save_pretrained_shards(tmp_path):
    cfg, spec = SPECS["nemotron-homogeneous"]
    parent = save_parent(randomize_(Model(cfg), 4).eval(), tmp_path / "parent", max_shard_bytes=4096)
    out = stream_slice(parent, spec, tmp_path / "out", progress=False, max_shard_bytes=3000)
    files = entries(out)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 3 and "model.safetensors" not in files and "model.safetensors.index.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    small = savable(reference(parent, spec))
    ref = hf.save_pretrained(small, tmp_path / "ref", max_shard_bytes=3000)
    assert index == json.loads((ref / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert_same_model(out, small)


@pytest.mark.parametrize("make,spec", [
    (lambda: nemotron_config(layers_block_type=["mamba", "attention", "mlp", "moe", "mamba", "moe"], n_group=2,
                             topk_group=1),
     ElasticSpec(hidden_size=24, layers=[0, 1, 2, 3, 5], n_routed_experts=4, mamba_num_heads=2,
                 num_attention_heads=2, moe_intermediate_size=8)),
    (lambda: nemotron_config(moe_latent_size=16), ElasticSpec(n_routed_experts=[None, None, None, 4])),
    (lambda: llama_config(tie_word_embeddings=True), ElasticSpec(layers=[1], intermediate_size=20,
                                                                 num_attention_heads=2, hidden_size=16)),
], ids=["nemotron_h", "nemotron_h-latent-per-layer", "llama-tied"])
def test_parent_written_by_transformers_sharded(tmp_path, make, spec):
    ref = hf_model(make())
    ref.save_pretrained(tmp_path / "parent", max_shard_size="4KB")
    parent = tmp_path / "parent"
    assert (parent / "model.safetensors.index.json").exists()
    out = stream_slice(parent, spec, tmp_path / "out", progress=False)
    small = reference(parent, spec)
    assert_same_model(out, small, vocab=100)
    if small.config.layer_sizes is None:
        hf_logits(out, ids(vocab=100))


def test_parent_in_memory_layout_stacked_experts(tmp_path):
    """A NemotronH parent written with `model.` names and stacked (E, ...) experts."""
    model = randomize_(Model(NEMOTRON), 5).eval()
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text(hf.config_json(hf.config_to_hf(NEMOTRON)))
    hf.write_safetensors(model.state_dict(), parent, max_shard_bytes=6000)
    assert any(k.endswith("mixer.experts.up_proj") for k in tensors(parent))
    spec = ElasticSpec(hidden_size=20, n_routed_experts=[None, None, None, 6, None, None, 4],
                       moe_intermediate_size=8, layers=[0, 1, 3, 4, 6])
    out = stream_slice(parent, spec, tmp_path / "out", progress=False)
    assert_same_model(out, reference(parent, spec))
    assert any(".mixer.experts.3.down_proj.weight" in k for k in tensors(out))  # written in the disk layout


def test_tokenizer_files_are_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    parent = hf.save_pretrained(randomize_(Model(LLAMA)).eval(), tmp_path / "parent", tokenizer=tok)
    out = stream_slice(parent, ElasticSpec(intermediate_size=20), tmp_path / "out", progress=False)
    back = hf.load_tokenizer(out)
    assert back is not None and back("w3 w7")["input_ids"] == tok("w3 w7")["input_ids"]


# ----------------------------------------------------------------------------- atomic output, errors

@pytest.mark.parametrize("after", [0, 5])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, after):
    parent = save_parent(randomize_(Model(NEMOTRON)).eval(), tmp_path / "parent")
    real, calls = stream._write_tensor, {"n": 0}

    def failing(fh, t):
        if calls["n"] >= after:
            raise OSError("disk full")
        calls["n"] += 1
        real(fh, t)

    monkeypatch.setattr(stream, "_write_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        stream_slice(parent, ElasticSpec(n_routed_experts=4), tmp_path / "out" / "small", progress=False,
                     max_shard_bytes=4096)
    assert entries(tmp_path / "out") == []  # neither the output nor a temporary directory
    # an existing output survives a failed overwrite untouched
    monkeypatch.setattr(stream, "_write_tensor", real)
    stream_slice(parent, ElasticSpec(hidden_size=16), tmp_path / "out" / "small", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "small").iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(stream, "_write_tensor", failing)
    with pytest.raises(OSError):
        stream_slice(parent, ElasticSpec(n_routed_experts=4), tmp_path / "out" / "small", progress=False)
    assert entries(tmp_path / "out") == ["small"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "small").iterdir()} == before


@pytest.fixture
def nemotron_parent(tmp_path):
    return save_parent(randomize_(Model(NEMOTRON)).eval(), tmp_path / "parent", max_shard_bytes=8192)


def _errors_leave_nothing(tmp_path, fn, *words):
    one_line_error(fn, *words)
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_error_spec_invalid_for_parent(tmp_path, nemotron_parent):
    _errors_leave_nothing(tmp_path, lambda: stream_slice(nemotron_parent, ElasticSpec(mamba_num_heads=3),
                                                         tmp_path / "out"), "mamba_num_heads=3", "n_groups=2")
    _errors_leave_nothing(tmp_path, lambda: stream_slice(nemotron_parent, ElasticSpec(layers=[0, 9]),
                                                         tmp_path / "out"), "unknown layer index 9")
    _errors_leave_nothing(tmp_path, lambda: stream_slice(nemotron_parent, {"heads": 2}, tmp_path / "out"),
                          "unknown axis")


def test_error_truncated_shard(tmp_path, nemotron_parent):
    shard = sorted(nemotron_parent.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _errors_leave_nothing(tmp_path, lambda: stream_slice(nemotron_parent, ElasticSpec(), tmp_path / "out"),
                          shard.name, "truncated")
    shard.write_bytes(b"\x10")
    _errors_leave_nothing(tmp_path, lambda: stream_slice(nemotron_parent, ElasticSpec(), tmp_path / "out"),
                          shard.name, "truncated")


def test_error_not_a_safetensors_checkpoint(tmp_path, nemotron_parent):
    spec = ElasticSpec()
    _errors_leave_nothing(tmp_path, lambda: stream_slice(tmp_path / "nope", spec, tmp_path / "out"), "no such")
    f = next(nemotron_parent.glob("model-*.safetensors"))
    _errors_leave_nothing(tmp_path, lambda: stream_slice(f, spec, tmp_path / "out"), "checkpoint directory")
    (tmp_path / "empty").mkdir()
    _errors_leave_nothing(tmp_path, lambda: stream_slice(tmp_path / "empty", spec, tmp_path / "out"), "config.json")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((nemotron_parent / "config.json").read_text())
    torch.save({"x": torch.zeros(2)}, pickled / "pytorch_model.bin")
    _errors_leave_nothing(tmp_path, lambda: stream_slice(pickled, spec, tmp_path / "out"), "pickle", "safetensors")
    (nemotron_parent / "model.safetensors.index.json").unlink()
    _errors_leave_nothing(tmp_path, lambda: stream_slice(nemotron_parent, spec, tmp_path / "out"),
                          "no model.safetensors")


def test_error_weights_do_not_match_config(tmp_path):
    parent = save_parent(randomize_(Model(NEMOTRON)).eval(), tmp_path / "parent")
    raw = json.loads((parent / "config.json").read_text())
    raw["intermediate_size"] = 44
    (parent / "config.json").write_text(json.dumps(raw))
    _errors_leave_nothing(tmp_path, lambda: stream_slice(parent, ElasticSpec(), tmp_path / "out"),
                          "down_proj", "shape", "config implies")


def test_error_output_would_replace_parent(tmp_path, nemotron_parent):
    before = entries(nemotron_parent)
    one_line_error(lambda: stream_slice(nemotron_parent, ElasticSpec(), nemotron_parent), "replace the parent")
    one_line_error(lambda: stream_slice(nemotron_parent, ElasticSpec(), tmp_path), "replace the parent")
    assert entries(nemotron_parent) == before


# ----------------------------------------------------------------------------- memory

class _Tracker:
    """Wraps safe_open: records every key read and the bytes each get_slice/get_tensor result spans,
    and (with weak references) the bytes of read and produced tensors alive at any moment."""

    def __init__(self, real):
        self.real, self.keys, self.calls, self.live, self.peak = real, [], [], 0, 0

    def hold(self, t):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n):
        self.live -= n

    def __call__(self, *args, **kwargs):
        handle, tracker = self.real(*args, **kwargs), self

        class Slice:
            def __init__(self, key):
                self.s, self.key = handle.get_slice(key), key

            def __getitem__(self, item):
                t = self.s[item]
                tracker.keys.append(self.key)
                tracker.calls.append(t.numel() * t.element_size())
                return tracker.hold(t)

        class Handle:
            def get_slice(self, key):
                return Slice(key)

            def get_tensor(self, key):
                t = handle.get_tensor(key)
                tracker.keys.append(key)
                tracker.calls.append(t.numel() * t.element_size())
                return tracker.hold(t)

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

        return Handle()


def test_memory_is_one_tensor_and_dropped_units_are_never_read(tmp_path, monkeypatch):
    """A parent of ~8 MB in ~150 tensors: the bytes of parent data and output tensors alive at once
    stay within two of the largest tensor (the box read and its cut), far below the checkpoint; dropped
    layers and dropped experts are never opened, and less than the parent is read."""
    cfg = ModelConfig(**{**NEMOTRON.to_dict(), "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384,
                         "n_routed_experts": 16, "moe_intermediate_size": 96, "layer_types": "M*-EM*E-E",
                         "mamba_head_dim": 16, "head_dim": 16})
    parent = save_parent(randomize_(Model(cfg)).eval(), tmp_path / "parent", max_shard_bytes=3 * 1024**2)
    on_disk = {}
    for f in parent.glob("*.safetensors"):
        for k, v in stream._header(f).items():
            on_disk[k] = v
    sizes = {k: stream.DTYPE_BYTES[v["dtype"]] * torch.Size(v["shape"]).numel() for k, v in on_disk.items()}
    total, largest = sum(sizes.values()), max(sizes.values())
    assert total > 8 * 1024**2 and len(sizes) > 120 and largest < total / 8

    tracker = _Tracker(stream.safe_open)
    monkeypatch.setattr(stream, "safe_open", tracker)
    written = []
    real_write = stream._write_tensor

    def write(fh, t):
        tracker.hold(t)  # the output tensor, alive until the writer drops it
        written.append(t.numel() * t.element_size())
        real_write(fh, t)

    monkeypatch.setattr(stream, "_write_tensor", write)
    spec = ElasticSpec(hidden_size=96, n_routed_experts=[None, None, None, 8, None, None, 10, None, 6],
                       layers=[0, 1, 2, 3, 5, 6, 8], intermediate_size=200, mamba_num_heads=4)
    out = stream_slice(parent, spec, tmp_path / "out", progress=False, max_shard_bytes=4 * 1024**2)

    assert tracker.peak <= 2 * largest, (tracker.peak, largest)
    assert tracker.peak < total / 4
    assert max(tracker.calls) <= largest
    assert len(tracker.keys) == len(set(tracker.keys)) == len(written)  # each tensor read once
    read = set(tracker.keys)
    assert not any(k.startswith(("backbone.layers.4.", "backbone.layers.7.")) for k in read)  # dropped layers
    kept = spec.indices(cfg)
    for layer, n in ((3, 8), (6, 10), (8, 6)):  # two router groups: the first n/2 experts of each
        experts = {int(k.split(".")[5]) for k in read if k.startswith(f"backbone.layers.{layer}.mixer.experts.")}
        assert experts == set(kept[f"layers.{layer}.experts"].tolist()) and len(experts) == n  # dropped: never opened
    assert sum(tracker.calls) < 0.8 * total  # only the kept boxes are read
    assert sum(written) == output_bytes(parent, spec) == sum(t.numel() * t.element_size()
                                                               for t in tensors(out).values())
    monkeypatch.undo()
    assert_same_model(out, reference(parent, spec), vocab=2048)


def test_read_plan_uses_boxes_not_whole_tensors(tmp_path):
    """Every tensor of an ordinary spec is planned as index selections (no fallback to reading it
    whole), and the bytes read for a column slice are the kept box."""
    cfg, spec = SPECS["nemotron-homogeneous"]
    parent = save_parent(randomize_(Model(cfg)).eval(), tmp_path / "parent")
    raw, pcfg = stream._parent_config(parent)
    plain, experts = stream._parent_tensors(parent, pcfg)
    items = stream._items(pcfg, spec.config(pcfg), spec, plain, experts)
    assert items and all(it.keep is not None for it in items)
    emb = next(it for it in items if it.out == "backbone.embeddings.weight")
    assert emb.keep[0] is None and emb.keep[1].tolist() == list(range(16))


# ----------------------------------------------------------------------------- dtypes

def _mixed_dtype_parent(cfg: ModelConfig, directory):
    """A sorted parent whose file holds bfloat16 (the MoE router's gate included, which a loaded
    model keeps in float32) beside float32 tensors: what `load` and `export` make of each dtype."""
    model = randomize_(Model(cfg), 5).eval()
    sort_model(model, random_scores(cfg, 5))
    parent = save_parent(model, directory)
    f = parent / "model.safetensors"
    state = load_file(str(f))
    for i, k in enumerate(sorted(state)):
        if i % 2 or ".gate." in k:
            state[k] = state[k].to(torch.bfloat16)
    from safetensors.torch import save_file

    save_file(state, str(f), metadata={"format": "pt"})
    return parent


@pytest.mark.parametrize("family", ["nemotron", "llama"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_stream_dtype_is_loading_with_that_dtype(tmp_path, family, dtype):
    """`stream_slice(..., dtype=d)` writes what `export(slice_model(load(parent, dtype=d)))` writes:
    every floating tensor cast as it is written, the MoE gate through `d` then back to float32 (the
    model keeps it so); no dtype: each tensor as stored. The bytes planned and written agree."""
    cfg, spec = SPECS["nemotron-homogeneous" if family == "nemotron" else "llama-homogeneous"]
    parent = _mixed_dtype_parent(cfg, tmp_path / "parent")
    ref = export(savable(slice_model(hf.load(parent, dtype=dtype), spec)), tmp_path / "ref")
    out = stream_slice(parent, spec, tmp_path / "out", dtype=dtype, progress=False)
    assert (out / "config.json").read_text() == (ref / "config.json").read_text()
    a, b = tensors(out), tensors(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (k, a[k].dtype, b[k].dtype)
    gates = {t.dtype for k, t in a.items() if ".gate." in k}
    assert gates == (set() if family == "llama" else {torch.bfloat16} if dtype is None else {torch.float32})
    others = {t.dtype for k, t in a.items() if ".gate." not in k}
    assert others == ({torch.float32, torch.bfloat16} if dtype is None else {dtype})
    assert output_bytes(parent, spec, dtype) == sum(t.numel() * t.element_size() for t in a.values())


def test_stream_dtype_errors(tmp_path, nemotron_parent):
    for bad in (torch.int8, "bfloat16"):
        _errors_leave_nothing(tmp_path, lambda bad=bad: stream_slice(nemotron_parent, ElasticSpec(), tmp_path / "out",
                                                                     dtype=bad), "floating-point")
