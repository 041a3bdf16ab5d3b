"""`star-elastic convert` (a whole checkpoint in FP8 or another dtype) and `star-elastic slice --format
decilm` (a Llama budget as DeciLM block_configs), end to end through `cli.main` on tiny random
checkpoints written to disk, and every error path: one line, exit status 2, nothing left behind.

What is checked is behaviour, not files: converted checkpoints are loaded back (ours, and stock
transformers for a plain FP8 checkpoint) and their logits compared with the source's within FP8's
error; every budget of the FP8 elastic checkpoint slices out byte for byte as the BF16 one's FP8
slice; DeciLM outputs run through `reference_logits` (vLLM's DeciLM math, tests/test_decilm_export.py)
and equal what the library's `export(..., format="decilm")` writes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import elastic_ckpt
from conftest import entries, randomize_, rel_err
from star_elastic import cli, fp8, hf
from star_elastic.elastic import ElasticSpec, slice_model
from star_elastic.elastic.checkpoint import budget_names, budget_spec, load_elastic, read_manifest, save_elastic
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router
from star_elastic.elastic.slicing import export
from star_elastic.model import Model, ModelConfig
from test_aligned_exports import transformers_forward
from test_decilm_export import reference_logits

F8 = torch.float8_e4m3fn
ERR = "star-elastic: error: "
# A Llama whose budgets DeciLM can hold: FFN widths in multiples of 256, one query-head count per budget
DECI = ModelConfig(family="llama", vocab_size=63, hidden_size=64, layer_types="****", num_attention_heads=8,
                   num_key_value_heads=4, head_dim=16, intermediate_size=1024, mlp_gated=True, mlp_act="silu",
                   rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=96, bos_token_id=1,
                   eos_token_id=2)
DECI_SPECS = {"1.0": ElasticSpec(),
              "0.75": ElasticSpec(hidden_size=56, intermediate_size=768),
              "0.5": ElasticSpec(hidden_size=48, layers=[0, 2, 3], intermediate_size=[768, None, 256, 512],
                                 num_attention_heads=[4, None, 4, 4], num_key_value_heads=[4, None, 2, 4])}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("STAR_ELASTIC_QUIET", "1")


def ids(seed=0):
    return torch.randint(3, 63, (2, 11), generator=torch.Generator().manual_seed(seed))


def run(capsys, *argv):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def logits(model, x=None):
    with torch.no_grad():
        return model.float().eval()(ids() if x is None else x)


def assert_refused(rc, out, err, root, *words, name="out"):
    """Exit status 2, one line naming every word, and nothing written under `root`: neither the
    output nor a temporary sibling."""
    assert rc == 2, (out, err)
    err = err.strip()
    assert err.startswith(ERR) and "\n" not in err, err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    assert not (root / name).exists() and not list(root.glob(f".{name}*")), entries(root)


def decilm_checkpoint(out, seed: int = 0):
    """An elastic Llama checkpoint with budgets DeciLM can hold (DECI_SPECS; 0.5 per layer)."""
    model = randomize_(Model(DECI), seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    budgets = [parse_budget(name, DECI) for name in DECI_SPECS]
    router = Router(DECI, budgets)
    router.spec = lambda i: DECI_SPECS[budgets[i].name]
    out.mkdir(parents=True)
    return save_elastic(model, router, budgets, out, tokenizer=elastic_ckpt.word_tokenizer(out.parent))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"deci": elastic Llama (DECI), "llama" / "nemotron_h": elastic_ckpt's (budgets DeciLM cannot hold),
    "plain": a plain Llama checkpoint (DECI's parent, no manifest), "nemotron_plain": a plain NemotronH}."""
    root = tmp_path_factory.mktemp("convert")
    out = {"deci": decilm_checkpoint(root / "deci" / "ckpt")}
    for family in ("llama", "nemotron_h"):
        out[family] = elastic_ckpt.make_checkpoint(root / family / "ckpt", family)
    for name, cfg in (("plain", DECI), ("nemotron_plain", replace_attention_bias(elastic_ckpt.NEMOTRON))):
        (root / name).mkdir()
        model = randomize_(Model(cfg), 1).eval()
        out[name] = hf.save_pretrained(model, root / name / "ckpt", elastic_ckpt.word_tokenizer(root / name))
    return out


def replace_attention_bias(cfg):  # transformers' NemotronH has no attention biases
    from dataclasses import replace

    return replace(cfg, attention_bias=False)


# ----------------------------------------------------------------------------- convert

@pytest.mark.parametrize("family", ["deci", "nemotron_h"])
def test_convert_elastic_checkpoint_to_fp8_keeps_every_budget(ckpts, tmp_path, capsys, family):
    """The whole elastic checkpoint in FP8: manifest kept (budgets, router, checksums that verify),
    linear weights float8 with one scale per row, every budget's logits within FP8's error of the
    source's, and every budget sliced from it byte for byte the source's `--dtype fp8` slice."""
    src = ckpts[family]
    rc, out, err = run(capsys, "convert", src, "--dtype", "fp8", "--out", tmp_path / "f8")
    assert rc == 0, err
    f8 = tmp_path / "f8"
    assert f"wrote {f8}: FP8 elastic checkpoint (3 budgets, manifest kept)" in out
    a, b = read_manifest(src), read_manifest(f8)
    assert a["budgets"] == b["budgets"] and a["router"] == b["router"]
    assert b["quantization"]["method"] == "fp8" and b["files"].keys() == a["files"].keys()
    t = tensors(f8)
    q = "model.layers.1.mlp.down_proj.weight" if family == "deci" else "backbone.layers.1.mixer.o_proj.weight"
    assert t[q].dtype == F8 and t[q + "_scale_inv"].shape == (t[q].shape[0], 1)
    assert t[q + "_scale_inv"].dtype == torch.float32
    source, converted = load_elastic(src, dtype=torch.float32), load_elastic(f8, dtype=torch.float32, verify=True)
    tol = 0.03 if family == "deci" else 0.25  # random hybrid parents amplify rounding (tests/test_fp8.py)
    for name in budget_names(a):
        spec = budget_spec(a, name)
        ref, got = logits(slice_model(source.model, spec)), logits(slice_model(converted.model, spec))
        assert 0 < rel_err(got, ref) < tol, name  # not the source (0), and within FP8's error
    rc, _, err = run(capsys, "slice", f8, "--budget", "0.5", "--out", tmp_path / "from-f8")
    assert rc == 0, err
    rc, _, err = run(capsys, "slice", src, "--budget", "0.5", "--dtype", "fp8", "--out", tmp_path / "direct")
    assert rc == 0, err
    ta, tb = tensors(tmp_path / "from-f8"), tensors(tmp_path / "direct")
    assert ta.keys() == tb.keys()
    for k in ta:
        x, y = (v.view(torch.uint8) if v.dtype == F8 else v for v in (ta[k], tb[k]))
        assert ta[k].dtype == tb[k].dtype and torch.equal(x, y), k


def test_convert_plain_checkpoint_loads_in_transformers(ckpts, tmp_path, capsys):
    """A plain Llama checkpoint to FP8: transformers' fine-grained FP8 config (one scale per row), no
    manifest; stock transformers loads it and gives our logits of it, within FP8's error of the
    source's; back to float32 it is the dequantised weights, without quantization_config."""
    src = ckpts["plain"]
    rc, out, err = run(capsys, "convert", src, "--dtype", "fp8", "--out", tmp_path / "f8")
    assert rc == 0, err
    f8 = tmp_path / "f8"
    assert f"wrote {f8}: FP8 checkpoint," in out and not (f8 / "manifest.json").exists()
    q = json.loads((f8 / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [1, 1024]  # the widest input: down_proj
    theirs = transformers_forward(f8, ids())
    ours = logits(hf.load(f8, dtype=torch.float32))
    assert rel_err(theirs, ours) < 1e-5
    # FP8 linear weights, bfloat16 embeddings and norms, all randomised: within a few percent (test_fp8.py)
    assert 0 < rel_err(ours, logits(hf.load(src))) < 0.08
    rc, _, err = run(capsys, "convert", f8, "--dtype", "float32", "--out", tmp_path / "f32")
    assert rc == 0, err
    assert "quantization_config" not in json.loads((tmp_path / "f32" / "config.json").read_text())
    back, held = hf.load(tmp_path / "f32").state_dict(), hf.load(f8, dtype=torch.float32).state_dict()
    assert all(v.dtype == torch.float32 for v in back.values())
    assert back.keys() == held.keys() and all(torch.equal(back[k], held[k]) for k in back)


def test_convert_errors_are_one_line_and_write_nothing(ckpts, tmp_path, capsys):
    src = ckpts["deci"]

    def copy(name, edit=None):
        d = shutil.copytree(src, tmp_path / "in" / name)
        if edit:
            edit(d)
        return d

    def truncate(f, n=100):
        f.write_bytes(f.read_bytes()[:-n])

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty").mkdir()
    (tmp_path / "in" / "model.gguf").write_bytes(b"GGUF")
    foreign = copy("foreign", lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})))
    pickled = copy("pickled", lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x"),
                                         (d / "manifest.json").unlink()))
    cases = [
        (tmp_path / "in" / "missing", ["missing", "no such file or directory"]),
        (tmp_path / "in" / "model.gguf", ["GGUF", "checkpoint directory"]),
        (tmp_path / "in" / "empty", ["no config.json"]),
        (foreign, ["unknown architecture", "GPT2LMHeadModel"]),
        (pickled, ["pickle", "pytorch_model.bin"]),
        (copy("truncated", lambda d: truncate(d / "model.safetensors")), ["model.safetensors"]),
        (copy("router", lambda d: truncate(d / "router.safetensors", 8)), ["router.safetensors"]),
        (copy("manifest", lambda d: (d / "manifest.json").write_text("{")), ["manifest.json", "JSON"]),
    ]
    for directory, words in cases:
        rc, out, err = run(capsys, "convert", directory, "--dtype", "fp8", "--out", tmp_path / "out")
        assert_refused(rc, out, err, tmp_path, *words)
    # the output: inside the input, the input itself (--force cannot help), an existing one without --force
    for out, force, words in [(src / "fp8", [], ["inside the checkpoint"]), (src, ["--force"], ["overwrite"])]:
        before = entries(src)
        rc, _, err = run(capsys, "convert", src, "--dtype", "fp8", "--out", out, *force)
        assert rc == 2 and err.startswith(ERR) and "\n" not in err.strip() and all(w in err for w in words), err
        assert entries(src) == before
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    rc, _, err = run(capsys, "convert", src, "--dtype", "fp8", "--out", tmp_path / "out")
    assert rc == 2 and "--force" in err and entries(tmp_path / "out") == ["keep.txt"]
    with pytest.raises(SystemExit) as e:  # --dtype is required: argparse's usage error
        cli.main(["convert", str(src), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()


def test_convert_failure_midway_leaves_nothing_and_keeps_the_old_output(ckpts, tmp_path, capsys, monkeypatch):
    src, real, calls = ckpts["deci"], fp8.quantize, {"n": 0}

    def failing(w, name="tensor"):
        calls["n"] += 1
        if calls["n"] == 5:
            from star_elastic.errors import StarElasticError
            raise StarElasticError("disk full")
        return real(w, name)

    monkeypatch.setattr(fp8, "quantize", failing)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "convert", src, "--dtype", "fp8", "--out", out)
    assert rc == 2 and "disk full" in err and entries(tmp_path) == []
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls["n"] = 0
    rc, _, err = run(capsys, "convert", src, "--dtype", "fp8", "--out", out, "--force")
    assert rc == 2 and entries(tmp_path) == ["out"] and entries(out) == ["keep.txt"]
    assert calls["n"] == 5  # it did fail midway, after writing had begun


@pytest.mark.parametrize("dtype", ["fp8", "bfloat16"])
def test_slice_without_a_budget_points_to_convert(ckpts, tmp_path, capsys, dtype):
    rc, out, err = run(capsys, "slice", ckpts["deci"], "--dtype", dtype, "--out", tmp_path / "out")
    assert_refused(rc, out, err, tmp_path, "--params, --spec or --budget", "star-elastic convert",
                   f"--dtype {dtype}")
    assert out == ""


# ----------------------------------------------------------------------------- slice --format decilm

def test_slice_budget_format_decilm(ckpts, tmp_path, capsys):
    """A per-layer budget of an elastic Llama, streamed and written as DeciLM: vLLM's DeciLM math on
    the files gives the sliced model's logits; the files are what the library's export writes; our
    loader reads it back, tokenizer included; the slice record says so."""
    src = ckpts["deci"]
    out = tmp_path / "deci"
    rc, stdout, err = run(capsys, "slice", src, "--budget", "0.5", "--format", "decilm", "--out", out)
    assert rc == 0, err
    assert "own format" not in err  # the per-layer note is for our format, not for the DeciLM rewrite
    assert f"wrote {out}: DeciLM / Nemotron-NAS block_configs, 3 layers" in stdout and ".deci." not in stdout
    assert {"config.json", "configuration_decilm.py", "model.safetensors", "tokenizer.json",
            "star_elastic_slice.json"} <= set(entries(out)) and not list(tmp_path.glob(".*"))
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DeciLMForCausalLM"] and len(raw["block_configs"]) == 3
    assert [b["attention"]["n_heads_in_group"] for b in raw["block_configs"]] == [1, 2, 1]
    assert json.loads((out / "star_elastic_slice.json").read_text())["format"] == "decilm"
    spec = budget_spec(read_manifest(src), "0.5")
    small = slice_model(load_elastic(src, dtype=torch.float32).model, spec)
    x = ids()
    assert rel_err(logits(small, x), reference_logits(out, x)) < 1e-5
    back = hf.load(out)
    assert back.config == small.config and torch.equal(logits(back, x), logits(small, x))
    assert hf.load_tokenizer(out)("w1 w2")["input_ids"] == [4, 5]
    lib = export(slice_model(hf.load(src), spec), tmp_path / "lib", format="decilm")
    assert json.loads((lib / "config.json").read_text()) == raw
    ta, tb = tensors(out), tensors(lib)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_slice_fp8_checkpoint_format_decilm_is_dequantised(ckpts, tmp_path, capsys):
    """From an FP8 elastic checkpoint, --format decilm writes the dequantised weights (bfloat16, no
    scales, no quantization_config): exactly the budget that `--dtype bfloat16` slices."""
    f8 = tmp_path / "f8"
    assert run(capsys, "convert", ckpts["deci"], "--dtype", "fp8", "--out", f8)[0] == 0
    rc, _, err = run(capsys, "slice", f8, "--budget", "0.5", "--format", "decilm", "--out", tmp_path / "d")
    assert rc == 0, err
    rc, _, err = run(capsys, "slice", f8, "--budget", "0.5", "--dtype", "bfloat16", "--out", tmp_path / "h")
    assert rc == 0, err
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    ta, tb = tensors(tmp_path / "d"), tensors(tmp_path / "h")
    assert ta.keys() == tb.keys() and not any(k.endswith("_scale_inv") for k in ta)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, tb[k]) for k, v in ta.items())
    x = ids()
    assert rel_err(logits(hf.load(tmp_path / "h"), x), reference_logits(tmp_path / "d", x)) < 1e-5


def test_slice_spec_and_params_format_decilm(ckpts, tmp_path, capsys):
    """Zero-shot slices of a plain Llama: a per-layer --spec as DeciLM computes what the same slice in
    star-elastic's format computes; --params with --multiple 256 (FFN widths DeciLM can hold) too,
    and without it the chosen width is refused with a hint, after the work, leaving nothing."""
    src = ckpts["plain"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(DECI_SPECS["0.5"].to_dict()))
    common = ["--spec", spec, "--method", "magnitude"]
    for fmt in ("decilm", "hf"):
        rc, _, err = run(capsys, "slice", src, *common, "--format", fmt, "--out", tmp_path / fmt)
        assert rc == 0, err
    x = ids()
    ours = logits(hf.load(tmp_path / "hf"), x)
    assert rel_err(reference_logits(tmp_path / "decilm", x), ours) < 1e-5
    assert torch.equal(logits(hf.load(tmp_path / "decilm"), x), ours)

    rc, _, err = run(capsys, "slice", src, "--params", "0.8", "--multiple", "256", "--method", "magnitude",
                     "--format", "decilm", "--out", tmp_path / "p")
    assert rc == 0, err
    raw = json.loads((tmp_path / "p" / "config.json").read_text())
    widths = {hf.load(tmp_path / "p").config.layer(i).intermediate_size for i in range(4)}
    assert raw["model_type"] == "nemotron-nas" and widths == {768}
    assert rel_err(reference_logits(tmp_path / "p", x), logits(hf.load(tmp_path / "p"), x)) < 1e-5
    rc, out, err = run(capsys, "slice", src, "--params", "0.8", "--method", "magnitude", "--format", "decilm",
                       "--out", tmp_path / "q")
    assert_refused(rc, out, err, tmp_path, "DeciLM", "multiples of 256", "--multiple 256", name="q")


@pytest.mark.parametrize("case", ["nemotron_h", "nemotron_spec", "query_heads", "ffn_width", "fp8"])
def test_slice_format_decilm_refusals_come_first(ckpts, tmp_path, capsys, case):
    """What DeciLM cannot hold is refused in one line before anything is sliced (nothing printed,
    nothing written): a NemotronH parent, per-layer query heads, an FFN width that is not a multiple
    of 256, FP8 output."""
    spec = tmp_path / "in" / "spec.json"
    spec.parent.mkdir()
    spec.write_text(json.dumps({"num_attention_heads": [4, 8, 8, 8]}))
    argv, words = {
        "nemotron_h": ([ckpts["nemotron_h"], "--budget", "0.5"], ["Llama", "nemotron_h"]),
        "nemotron_spec": ([ckpts["nemotron_plain"], "--params", "0.5", "--method", "magnitude"], ["Llama", "nemotron_h"]),
        "query_heads": ([ckpts["plain"], "--spec", spec, "--method", "magnitude"], ["query heads", "[4, 8]"]),
        "ffn_width": ([ckpts["llama"], "--budget", "0.75"], ["layer 0 keeps an FFN of 48", "256"]),
        "fp8": ([ckpts["deci"], "--budget", "0.5", "--dtype", "fp8"], ["unquantised", "--dtype fp8"]),
    }[case]
    rc, out, err = run(capsys, "slice", *argv, "--format", "decilm", "--out", tmp_path / "out")
    assert_refused(rc, out, err, tmp_path, *words)
    assert out == ""  # before any work
