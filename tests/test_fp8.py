"""FP8 nested checkpoints (issue 13, item 4; star_elastic/fp8.py, convert.py, the FP8 paths of hf.py
and elastic/stream.py).

Per-row float8_e4m3fn quantisation: the round trip keeps e4m3's error bound; slicing commutes with
it exactly (the slice of the quantised tensor and its scales dequantises to the slice of the
dequantised tensor; where only rows are cut it is also the quantised slice), over random parents,
specs and sort permutations; a budget cut out of the FP8 elastic checkpoint is byte for byte the FP8
slice of the BF16 one; stock transformers loads our FP8 exports (dequantising on a CPU) with the
weights our loader gives and the same logits; our loader, eval, generate, serve and validate read
FP8; bad input is one line; nothing half-written is ever left."""

import json
import random
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import entries, one_line_error, random_parent_config, random_spec, randomize_, rel_err
import elastic_ckpt
from star_elastic import fp8, hf
from star_elastic.cli import main as cli_main
from star_elastic.convert import convert_fp8
from star_elastic.convert import main as convert_main
from star_elastic.elastic import ElasticSpec, slice_model
from star_elastic.elastic import stream
from star_elastic.elastic.checkpoint import budget_spec, load_elastic, save_elastic
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router
from star_elastic.elastic.slicing import take
from star_elastic.elastic.sort import permutations
from star_elastic.elastic.stream import stream_slice, take_quantized
from star_elastic.model import Model
from test_aligned_exports import transformers_forward
from test_elastic import random_scores

F8 = torch.float8_e4m3fn


def ids(vocab=63, seed=0):
    return torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def fp8_tolerance(model: Model, x=None) -> float:
    """How far FP8 logits may be from `model`'s (relative): 3% on a Llama; the random hybrid parents
    here amplify any rounding (FP8 of the linear weights alone moves their logits by 12-20%, bfloat16
    by 1-14%), so there only a loose 25%. Real-model quality: bench_fp8.py, docs/RESULTS.md."""
    return 0.03 if model.config.family == "llama" else 0.25


def tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, FP8 included (compared as bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == F8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def assert_same_files(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert same(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def make_checkpoint(out, family: str):
    """elastic_ckpt's checkpoint (random parent, budgets 1.0 / 0.75 / 0.5 with given architectures),
    its NemotronH without attention biases, which transformers' NemotronH does not have."""
    cfg = replace(elastic_ckpt.NEMOTRON, attention_bias=False) if family == "nemotron_h" else elastic_ckpt.LLAMA
    model = randomize_(Model(cfg), 0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    specs = elastic_ckpt.SPECS[family]
    budgets = [parse_budget(name, cfg) for name in specs]
    router = Router(cfg, budgets)
    router.spec = lambda i: specs[budgets[i].name]
    out.mkdir(parents=True)
    return save_elastic(model, router, budgets, out, tokenizer=elastic_ckpt.word_tokenizer(out.parent))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{family: (elastic checkpoint, its FP8 copy)}: random parents (float32), budgets 1.0 / 0.75 / 0.5."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for family in ("nemotron_h", "llama"):
        ck = make_checkpoint(root / family / "ckpt", family)
        out[family] = ck, convert_fp8(ck, root / family / "ckpt-fp8", progress=False, log=lambda *_: None)
    return out


# ----------------------------------------------------------------------------- the numbers

def test_round_trip_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 96, generator=g) * torch.logspace(-4, 2, 40)[:, None]  # rows from 1e-4 to 1e2
    w[0, 5] = 0  # an all-zero row
    w[1, 7, 3] = 1e4  # an outlier: its row's other values fall into e4m3's subnormals
    q, s = fp8.quantize(w)
    assert q.dtype == F8 and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (3, 40, 1)
    assert q.float().abs().max() <= fp8.FP8_MAX
    assert torch.equal(s[..., 0], torch.where(w.abs().amax(-1) > 0, w.abs().amax(-1) / 448, torch.ones(())))
    back = fp8.dequantize(q, s)
    # e4m3: 3 mantissa bits, so half a step is 2^-4 of a normal value; below 2^-6 (subnormal) a
    # step is 2^-9 of the scale; plus float32 rounding of w / s and q * s
    bound = 2.0 ** -4 * w.abs() + 2.0 ** -10 * s + 1e-6 * w.abs()
    assert ((back - w).abs() <= bound).all()
    assert torch.equal(back[0, 5], torch.zeros(96))
    assert rel_err(back, w) < 0.03
    assert fp8.dequantize(q, s, torch.bfloat16).dtype == torch.bfloat16
    # transformers' own dequantisation of the same tensors gives the same numbers
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
    assert torch.equal(theirs, back)


def test_block_and_per_tensor_scales_are_read():
    """Foreign FP8 (DeepSeek-style 128 x 128 blocks, per-tensor) dequantises as transformers does."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q = torch.randn(256, 384).to(F8)
    s = torch.rand(2, 3) + 0.5
    ours = fp8.dequantize(q, s, block=[128, 128])
    assert torch.equal(ours, Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32))
    assert torch.equal(fp8.dequantize(q, torch.tensor(0.5)), q.float() * 0.5)
    one_line_error(lambda: fp8.dequantize(q, torch.rand(3, 3), block=[128, 128], name="w"), "w", "do not fit")


@pytest.mark.parametrize("seed", range(12))
def test_slicing_commutes_with_quantisation(seed):
    """For every linear weight of a random parent: the slice of (q, scales) dequantises to exactly
    the slice of the dequantised weight, for a random spec's prefix indices and for a sort's
    permutations (per-expert neurons included); where no column is cut it is also exactly the
    quantisation of the sliced weight."""
    rng = random.Random(2000 + seed)
    cfg = random_parent_config(rng)
    model = randomize_(Model(cfg), seed).eval()
    spec = random_spec(cfg, rng)
    for idx in (spec.indices(cfg), permutations(cfg, random_scores(cfg, seed))):
        checked = 0
        for name, w in model.state_dict().items():
            if not (fp8.is_quantized(name) and w.dim() >= 2):
                continue
            q, s = fp8.quantize(w)
            qs, ss = take_quantized(name, q, s, cfg, idx)
            sliced = take(name, w, cfg, idx)
            assert qs.shape == sliced.shape and ss.shape == sliced.shape[:-1] + (1,)
            assert torch.equal(fp8.dequantize(qs, ss), take(name, fp8.dequantize(q, s), cfg, idx)), name
            checked += 1
        assert checked


def test_row_cuts_equal_quantising_the_slice():
    """Rows alone cut (an MLP's up/gate, attention's q/k/v): the FP8 slice is the FP8 of the slice."""
    cfg = random_parent_config(random.Random(7))
    model = randomize_(Model(cfg), 7).eval()
    for name, w in model.state_dict().items():
        if not (fp8.is_quantized(name) and w.dim() >= 2):
            continue
        rows = torch.arange(0, w.shape[-2], 2)
        q, s = fp8.quantize(w)
        q2, s2 = fp8.quantize(w.index_select(-2, rows))
        assert same(q.index_select(-2, rows), q2) and torch.equal(s.index_select(-2, rows), s2)


def test_which_tensors_are_quantised():
    for name in ("model.layers.0.self_attn.q_proj.weight", "backbone.layers.2.mixer.in_proj.weight",
                 "model.layers.3.mixer.experts.up_proj", "backbone.layers.3.mixer.experts.5.down_proj.weight",
                 "model.layers.3.mixer.shared_experts.up_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.layers.3.mixer.fc1_latent_proj.weight"):
        assert fp8.is_quantized(name), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.3.mixer.gate.weight",
                 "model.layers.3.mixer.gate.e_score_correction_bias", "model.layers.0.mixer.A_log",
                 "model.layers.0.mixer.conv1d.weight", "model.layers.0.self_attn.q_proj.bias",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight", "model.layers.0.mixer.D"):
        assert not fp8.is_quantized(name), name


# ----------------------------------------------------------------------------- nested checkpoints

@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
def test_fp8_budget_is_the_fp8_parents_slice(ckpts, tmp_path, family):
    """Every budget streamed out of the FP8 elastic checkpoint equals, byte for byte, the same budget
    of the BF16 checkpoint streamed with dtype fp8; it loads (dequantised) as the in-memory slice of
    the loaded FP8 parent; dequantised streaming gives the same weights."""
    bf16, f8 = ckpts[family]
    parent = load_elastic(f8, dtype=torch.float32)
    for b in parent.manifest["budgets"]:
        spec = budget_spec(parent.manifest, b["name"])
        a = stream_slice(f8, spec, tmp_path / f"a{b['name']}", progress=False)
        c = stream_slice(bf16, spec, tmp_path / f"c{b['name']}", dtype=F8, progress=False)
        assert_same_files(a, c)
        q = json.loads((a / "config.json").read_text())["quantization_config"]
        assert q["quant_method"] == "fp8" and q["weight_block_size"][0] == 1
        ref = slice_model(parent.model, spec).state_dict()
        for out in (hf.load(a, dtype=torch.float32),
                    hf.load(stream_slice(f8, spec, tmp_path / f"d{b['name']}", dtype=torch.float32, progress=False))):
            got = out.state_dict()
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        assert stream.output_bytes(f8, spec) == sum(t.numel() * t.element_size() for t in tensors(a).values())
    # the FP8 checkpoint's parent is the BF16 parent quantised: close, not equal
    plain = load_elastic(bf16, dtype=torch.float32).model
    with torch.no_grad():
        assert rel_err(parent.model(ids()), plain(ids())) < fp8_tolerance(plain, ids())


def test_fallback_reads_match_box_reads(ckpts, tmp_path, monkeypatch):
    """The whole-tensor paths (taken when `take` does more than pick indices) write the same bytes."""
    bf16, f8 = ckpts["nemotron_h"]
    spec = budget_spec(load_elastic(f8).manifest, "0.5")
    a = stream_slice(f8, spec, tmp_path / "a", progress=False)
    c = stream_slice(bf16, spec, tmp_path / "c", dtype=F8, progress=False)
    d = stream_slice(f8, spec, tmp_path / "d", dtype=torch.float32, progress=False)
    monkeypatch.setattr(stream, "_plan", lambda name, shape, cfg, idx: (
        tuple(take(name, torch.empty(shape, device="meta"), cfg, idx).shape), None))
    assert_same_files(a, stream_slice(f8, spec, tmp_path / "a2", progress=False))
    assert_same_files(c, stream_slice(bf16, spec, tmp_path / "c2", dtype=F8, progress=False))
    assert_same_files(d, stream_slice(f8, spec, tmp_path / "d2", dtype=torch.float32, progress=False))


def test_fp8_elastic_checkpoint_is_smaller_and_keeps_the_rest(ckpts):
    bf16, f8 = ckpts["llama"]
    m8, mb = json.loads((f8 / "manifest.json").read_text()), json.loads((bf16 / "manifest.json").read_text())
    assert m8["budgets"] == mb["budgets"] and m8["router"] == mb["router"]
    assert m8["quantization"]["method"] == "fp8"
    assert (f8 / "router.safetensors").read_bytes() == (bf16 / "router.safetensors").read_bytes()
    assert (f8 / "tokenizer.json").read_bytes() == (bf16 / "tokenizer.json").read_bytes()
    t = tensors(f8)
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == F8
    assert t["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (32, 1)
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    nb = sum(p.stat().st_size for p in bf16.glob("model*.safetensors"))
    n8 = sum(p.stat().st_size for p in f8.glob("model*.safetensors"))
    assert n8 < nb  # tiny model: embeddings and headers weigh; SmolLM2's numbers are in docs/RESULTS.md
    from star_elastic.validate import validate_checkpoint  # checksums, nesting, sliced == masked on the FP8 one

    report = validate_checkpoint(f8)
    assert not [c for c in report.checks if c.status == "fail" and c.name not in ("cost", "nested")]


def test_validate_trained_fp8_checkpoint(elastic_ckpt, tmp_path):
    """The trained tiny checkpoint (valid in BF16/FP32) stays valid in FP8: checksums, costs, nesting,
    sliced == masked, perplexity per budget."""
    from star_elastic.validate import validate_checkpoint

    ckpt, text = elastic_ckpt
    f8 = convert_fp8(ckpt, tmp_path / "f8", progress=False, log=lambda *_: None)
    report = validate_checkpoint(f8, str(text), max_tokens=256)
    assert not report.failed, [c for c in report.checks if c.status == "fail"]


# ----------------------------------------------------------------------------- transformers and our loader

@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
def test_transformers_loads_fp8_exports(ckpts, tmp_path, family):
    """Stock transformers (CPU: it dequantises, as its FP8 quantizer does without a GPU) loads the FP8
    parent and an FP8 budget with no missing / unexpected keys, holds the weights our loader holds
    (bit for bit), and gives our logits; the FP8 logits are within FP8's error of the BF16 ones.
    NemotronH's MoE runs on transformers' grouped-GEMM path."""
    from transformers import AutoModelForCausalLM

    bf16, f8 = ckpts[family]
    name = "0.5" if family == "nemotron_h" else "0.75"  # llama 0.5 has per-layer sizes: our format only
    spec = budget_spec(load_elastic(f8).manifest, name)
    budget = stream_slice(f8, spec, tmp_path / "budget", progress=False)
    for directory in (f8, budget):
        ours = hf.load(directory, dtype=torch.float32)
        theirs = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        their_state = theirs.state_dict()
        for k, v in ours.state_dict().items():
            t = their_state.get(k)
            if t is not None:  # (transformers' tied lm_head / extra buffers aside)
                assert torch.equal(t, v), k
        got = transformers_forward(directory, ids(), moe=family == "nemotron_h")
        with torch.no_grad():
            assert rel_err(got, ours(ids())) < 1e-5
    plain = slice_model(load_elastic(bf16, dtype=torch.float32).model, spec).eval()
    with torch.no_grad():
        assert rel_err(got, plain(ids())) < fp8_tolerance(plain, ids())


def test_load_as_fp8_saves_fp8(tmp_path):
    """hf.load(dtype=float8) -> save_pretrained writes FP8 (what `slice MODEL --params/--spec --dtype fp8`
    does); an FP8 checkpoint loaded as stored saves FP8 again, with a floating dtype it saves plain."""
    from conftest import hf_model, llama_config, ours_from

    ref = hf_model(llama_config())
    plain = hf.save_pretrained(ours_from(ref), tmp_path / "plain")
    m = hf.load(plain, dtype=F8)
    assert m.lm_head.weight.dtype == torch.float32  # computes as stored
    f8 = hf.save_pretrained(m, tmp_path / "f8")
    t = tensors(f8)
    assert t["model.layers.1.mlp.down_proj.weight"].dtype == F8
    assert json.loads((f8 / "config.json").read_text())["quantization_config"]["weight_block_size"] == [1, 64]  # o_proj: 4 heads x 16
    assert_same_files(f8, stream_slice(plain, ElasticSpec(), tmp_path / "streamed", dtype=F8, progress=False))
    again = hf.save_pretrained(hf.load(f8), tmp_path / "again")  # held in bfloat16, quantised again
    ta, tb = tensors(f8), tensors(again)
    assert ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype for k in ta)
    assert json.loads((f8 / "config.json").read_text()) == json.loads((again / "config.json").read_text())
    assert rel_err(hf.load(again, dtype=torch.float32)(ids(100)), hf.load(f8, dtype=torch.float32)(ids(100))) < 1e-2
    back = hf.save_pretrained(hf.load(f8, dtype=torch.float32), tmp_path / "back")
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    assert all(v.dtype == torch.float32 for v in tensors(back).values())
    with torch.no_grad():
        x = ids(100)
        # FP8 linear weights and bfloat16 embeddings / norms (all randomised here): within a few percent
        assert rel_err(hf.load(f8, dtype=torch.float32)(x), ref(x).logits) < 0.08


def test_cli_slice_eval_generate_fp8(ckpts, tmp_path, capsys):
    """`slice CKPT --budget B --dtype fp8` == `slice FP8CKPT --budget B`; `slice MODEL --spec --dtype fp8`;
    eval, generate and the serving engine read the FP8 checkpoint (dequantised on load)."""
    from star_elastic.serve.engine import ElasticEngine

    bf16, f8 = ckpts["nemotron_h"]
    assert cli_main(["slice", str(bf16), "--budget", "0.75", "--dtype", "fp8", "--out", str(tmp_path / "a")]) == 0
    assert cli_main(["slice", str(f8), "--budget", "0.75", "--out", str(tmp_path / "b")]) == 0
    assert "FP8 weights with per-row scales" in capsys.readouterr().out
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"n_routed_experts": 4}))
    assert cli_main(["slice", str(bf16), "--spec", str(spec), "--method", "magnitude", "--dtype", "fp8",
                     "--out", str(tmp_path / "c")]) == 0
    assert tensors(tmp_path / "c")["backbone.layers.2.mixer.experts.3.up_proj.weight"].dtype == F8
    words = tmp_path / "words.txt"
    words.write_text("\n\n".join(" ".join(f"w{(s + j) % 60}" for j in range(30)) for s in range(0, 60, 3)))
    for ck in (bf16, f8):
        assert cli_main(["eval", str(ck), "--data", str(words), "--seq-len", "16", "--max-tokens", "128",
                         "--json", str(tmp_path / f"{ck.name}.json")]) == 0
    a, b = (json.loads((tmp_path / f"{ck.name}.json").read_text()) for ck in (bf16, f8))
    pa, pb = ({k: r["perplexity"] for k, r in x["budgets"].items()} for x in (a, b))
    assert pa.keys() == pb.keys() and all(abs(pb[k] / pa[k] - 1) < 0.3 for k in pa)
    capsys.readouterr()
    assert cli_main(["generate", str(f8), "--budget", "0.5", "--prompt", "w1 w2 w3", "--raw",
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    engine = ElasticEngine.load(f8, dtype=torch.float32)
    assert len(engine.generate("0.5", ids()[:1], 3).tokens) == 3


# ----------------------------------------------------------------------------- bad input, atomic output

def test_errors_are_one_line(ckpts, tmp_path, monkeypatch):
    bf16, f8 = ckpts["llama"]

    def copy(name):
        return shutil.copytree(f8, tmp_path / name)

    # truncated weights
    d = copy("truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    for fn in (lambda: hf.load(d), lambda: stream_slice(d, ElasticSpec(), tmp_path / "o", progress=False),
               lambda: convert_fp8(d, tmp_path / "o", log=lambda *_: None)):
        one_line_error(fn, "model.safetensors")
    assert not (tmp_path / "o").exists()

    def plain_copy(name, edit_config=None, edit_tensors=None):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(f8 / "config.json", d / "config.json")
        t = load_file(str(f8 / "model.safetensors"))
        if edit_tensors:
            edit_tensors(t)
        save_file(t, str(d / "model.safetensors"))
        if edit_config:
            c = json.loads((d / "config.json").read_text())
            edit_config(c)
            (d / "config.json").write_text(json.dumps(c))
        return d

    key = "model.layers.0.self_attn.q_proj.weight"
    cases = [  # (directory, words of the error, whether the header-only check sees it too)
        (plain_copy("gptq", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})),
         ("gptq", "not supported"), True),
        (plain_copy("ue8m0", lambda c: c["quantization_config"].update(scale_fmt="ue8m0")), ("ue8m0",), True),
        (plain_copy("noconfig", lambda c: c.pop("quantization_config")), ("fp8", "quantization_config"), True),
        (plain_copy("noscale", edit_tensors=lambda t: t.pop(key + "_scale_inv")), (key, "_scale_inv"), False),
        (plain_copy("orphan", edit_tensors=lambda t: t.__setitem__(key, t[key].float())), (key, "not fp8"), False),
        (plain_copy("badscale", edit_tensors=lambda t: t.__setitem__(key + "_scale_inv", torch.ones(3, 5))),
         (key,), True),
    ]
    for d, words, header in cases:
        one_line_error(lambda: hf.load(d), *words)
        if header:
            one_line_error(lambda: hf.check_checkpoint(d), *words)
        one_line_error(lambda: stream_slice(d, ElasticSpec(), tmp_path / "o", progress=False), *words[:1])
        assert not (tmp_path / "o").exists()
    # 128 x 128 block scales load (dequantised) but do not slice from disk
    blocky = plain_copy("blocky", lambda c: c["quantization_config"].update(weight_block_size=[128, 128]),
                        lambda t: [t.__setitem__(k, torch.ones(1, 1)) for k in list(t) if k.endswith("_scale_inv")])
    hf.load(blocky)
    one_line_error(lambda: stream_slice(blocky, ElasticSpec(), tmp_path / "o", progress=False), "per-row", "slice")
    one_line_error(lambda: stream_slice(bf16, ElasticSpec(), tmp_path / "o", dtype=torch.float8_e5m2),
                   "floating-point")
    # a torch without float8 dtypes: fp8 asked for is one line (and the command's exit status 2)
    monkeypatch.delattr(torch, "float8_e4m3fn")
    from star_elastic.runtime import pick_dtype

    one_line_error(lambda: pick_dtype("fp8", None), "float8", "torch")
    one_line_error(lambda: fp8.quantize(torch.ones(2, 2)), "float8")
    one_line_error(lambda: convert_fp8(bf16, tmp_path / "o"), "float8")
    assert cli_main(["slice", str(bf16), "--budget", "0.5", "--dtype", "fp8", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_non_finite_weights_are_refused():
    w = torch.ones(4, 4)
    w[1, 2] = float("nan")
    one_line_error(lambda: fp8.quantize(w, "layer.q_proj.weight"), "q_proj", "non-finite")


@pytest.mark.parametrize("where", ["stream", "convert", "save_pretrained"])
def test_writes_are_atomic(ckpts, tmp_path, monkeypatch, where):
    """A failure midway (here: the third quantisation) leaves neither the output nor a temporary
    directory; an existing output is left as it was."""
    bf16, _ = ckpts["nemotron_h"]
    real, calls = fp8.quantize, {"n": 0}

    def failing(w, name="tensor"):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(w, name)

    out = tmp_path / "out" / "x"
    write = {"stream": lambda: stream_slice(bf16, ElasticSpec(n_routed_experts=4), out, dtype=F8, progress=False),
             "convert": lambda: convert_fp8(bf16, out, progress=False, log=lambda *_: None),
             "save_pretrained": lambda: hf.save_pretrained(hf.load(bf16, dtype=F8), out)}[where]
    monkeypatch.setattr(fp8, "quantize", failing)
    with pytest.raises(OSError, match="disk full"):
        write()
    assert not (tmp_path / "out").exists() or entries(tmp_path / "out") == []
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    calls["n"] = 0
    with pytest.raises(OSError, match="disk full"):
        write()
    assert entries(tmp_path / "out") == ["x"] and entries(out) == ["keep.txt"]


def test_convert_command(ckpts, tmp_path, capsys):
    bf16, f8 = ckpts["llama"]
    assert convert_main([str(bf16), "--out", str(tmp_path / "c")]) == 0
    assert_same_files(tmp_path / "c", f8)
    capsys.readouterr()
    assert convert_main([str(bf16), "--out", str(tmp_path / "c")]) == 2  # exists: needs --force
    err = capsys.readouterr().err.strip()
    assert err.startswith("star-elastic: error:") and "\n" not in err and "--force" in err
    assert convert_main([str(bf16), "--out", str(bf16 / "inside")]) == 2
    # back to a floating-point dtype: the FP8 checkpoint dequantised, an elastic checkpoint still
    assert convert_main([str(f8), "--out", str(tmp_path / "b"), "--dtype", "float32"]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "b" / "config.json").read_text())
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["dtype"]["dtype"] == "float32"
    a, b = load_elastic(tmp_path / "b", verify=True).model.state_dict(), load_elastic(f8, dtype=torch.float32).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- FP8 matmuls (fp8.use_fp8_matmuls)

def test_fp8_linear_is_the_product_of_the_quantised_operands():
    """FP8Linear = (x quantised per token) @ (w quantised per row).T, scaled back, plus the bias: the same
    as that product done by hand in float32, to bfloat16's rounding; and near the float layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    layer = fp8.FP8Linear(*fp8.quantize(lin.weight), lin.bias)
    xq, sx = fp8.quantize(x.reshape(-1, 64))  # per token: the same rule as per weight row
    by_hand = fp8.dequantize(xq, sx) @ fp8.dequantize(*fp8.quantize(lin.weight)).T + lin.bias
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    assert rel_err(y.reshape(-1, 48), by_hand) < 4e-3  # bfloat16 output
    assert 1e-3 < rel_err(y, lin(x)) < 0.06  # e4m3 on both operands: a few percent, never exact


def test_fp8_matmuls_keep_an_fp8_checkpoints_own_values(ckpts):
    """Read in float32, an FP8 checkpoint's linear weights requantise to exactly its stored FP8 values and
    scales; layers whose sizes GPUs' FP8 matmul cannot take (not multiples of 16) stay as they are; the
    logits stay near the dequantised model's."""
    for family in ("llama", "nemotron_h"):
        _, f8 = ckpts[family]
        ref = hf.load(f8, dtype=torch.float32)
        model = hf.load(f8, dtype=torch.float32)
        done = fp8.use_fp8_matmuls(model)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, fp8.FP8Linear)}
        assert len(layers) == done["swapped"] > 0
        assert done["bytes"] == sum(m.weight.numel() + 4 * m.weight_scale_inv.numel() for m in layers.values())
        for name in done["kept"]:
            kept = model.get_submodule(name)
            assert type(kept) is torch.nn.Linear and (kept.in_features % 16 or kept.out_features % 16)
        x = ids()
        assert rel_err(model(x), ref(x)) < 2 * fp8_tolerance(model)
        if family == "llama":  # our names are the checkpoint's: compare with the stored tensors
            stored = tensors(f8)
            for name, m in layers.items():
                assert same(m.weight, stored[f"{name}.weight"]), name
                assert torch.equal(m.weight_scale_inv.reshape(-1, 1), stored[f"{name}.weight_scale_inv"]), name


def test_cli_eval_and_generate_with_fp8_matmuls(ckpts, tmp_path, capsys):
    """`eval --fp8-matmul` of an elastic checkpoint (every budget) and of a sliced budget, and
    `generate --fp8-matmul` of a plain checkpoint and of a budget; the perplexities near the
    dequantised runs'."""
    bf16, f8 = ckpts["llama"]
    words = tmp_path / "words.txt"
    words.write_text("\n\n".join(" ".join(f"w{(s + j) % 60}" for j in range(30)) for s in range(0, 60, 3)))
    runs = {}
    for flag in ([], ["--fp8-matmul"]):
        out = tmp_path / f"e{len(flag)}.json"
        assert cli_main(["eval", str(f8), "--data", str(words), "--seq-len", "16", "--max-tokens", "128",
                         "--json", str(out)] + flag) == 0
        runs[bool(flag)] = json.loads(out.read_text())
    assert runs[True].get("fp8_matmul") is True and "fp8_matmul" not in runs[False]
    for name, r in runs[False]["budgets"].items():
        assert abs(runs[True]["budgets"][name]["perplexity"] / r["perplexity"] - 1) < 0.1, name
    assert runs[True]["budgets"]["1.0"]["kl_from_full"] > 0  # the reference is the parent itself, unquantised
    assert cli_main(["slice", str(bf16), "--budget", "0.5", "--out", str(tmp_path / "half")]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "half"), "--data", str(words), "--seq-len", "16", "--max-tokens", "64",
                     "--fp8-matmul"]) == 0
    seen = capsys.readouterr()
    assert "FP8 matmuls in" in seen.err + seen.out and "perplexity" in seen.out
    assert cli_main(["generate", str(tmp_path / "half"), "--prompt", "w1 w2 w3", "--raw", "--max-new-tokens", "4",
                     "--fp8-matmul"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli_main(["generate", str(f8), "--budget", "0.5", "--prompt", "w1 w2", "--raw", "--max-new-tokens", "3",
                     "--fp8-matmul"]) == 0
    seen = capsys.readouterr()
    assert seen.out.strip() and "views of the parent's one FP8 copy" in seen.err
    model = hf.load(f8, dtype=torch.float32)
    fp8.use_fp8_matmuls(model)
    one_line_error(lambda: hf.save_pretrained(model, tmp_path / "nope"), "FP8 matmuls", "inference")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_served_budgets_share_one_fp8_copy_of_the_parent(ckpts, family):
    """ElasticEngine.load(fp8_matmul=True): every trained budget's linear layers that are views of the
    parent become FP8Linear over a prefix of the parent's one FP8 weight and its per-row scales (same
    storage, no copy); each budget's logits stay near the full-precision engine's; the parent keeps no
    full-precision linear weight it could swap; a budget between trained ones is refused in one line."""
    from star_elastic.serve.engine import ElasticEngine

    _, f8 = ckpts[family]
    ref = ElasticEngine.load(f8, dtype=torch.float32)
    eng = ElasticEngine.load(f8, dtype=torch.float32, fp8_matmul=True)
    info = eng.fp8_info
    parent_q = {m.weight.untyped_storage().data_ptr(): m for m in eng.parent.modules()
                if isinstance(m, fp8.FP8Linear)}
    assert parent_q and info["swapped"] >= len(parent_q) and info["shared"] > 0
    assert not any(type(m) is torch.nn.Linear and (m.in_features % 16 == 0 and m.out_features % 16 == 0)
                   and fp8.is_quantized(f"{n}.weight") for n, m in eng.parent.named_modules())
    shared = 0
    for b in eng.budgets:
        view = eng.view(b)
        for m in view.modules():
            if isinstance(m, fp8.FP8Linear) and view is not eng.parent:
                owner = parent_q.get(m.weight.untyped_storage().data_ptr())
                if owner is not None:  # a prefix of the parent's FP8 weight, with the prefix of its scales
                    shared += 1
                    o, i = m.weight.shape
                    assert m.weight.storage_offset() == owner.weight.storage_offset()
                    assert same(m.weight, owner.weight[:o, :i])
                    assert m.weight_scale_inv.untyped_storage().data_ptr() == \
                        owner.weight_scale_inv.untyped_storage().data_ptr()
        x = ids()
        assert rel_err(view(x), ref.view(b)(x)) < 2 * fp8_tolerance(view), b
        assert len(eng.generate(b, x[:1], 3).tokens) == 3
    assert shared == info["shared"]
    one_line_error(lambda: eng.view("0.6"), "FP8 matmuls", "trained budgets")
