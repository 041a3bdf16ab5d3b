"""Zero-shot slicing from the command line: the budget search (`parse_params`, `choose_spec`), and
`star-elastic importance` / `slice` end to end on tiny checkpoints saved to disk with a tokenizer,
checked against stock transformers, against the masked parent, and on every error path."""

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import NANO, SMOLLM2, randomize_, rel_err
from star_elastic import cli, hf
from star_elastic.elastic import ElasticSpec, count_parameters, sort_model
from star_elastic.elastic.importance import load_scores, random_importance, save_scores, weight_magnitude_importance
from star_elastic.elastic.masking import masked
from star_elastic.elastic.search import choose_spec, parse_params, smallest_reachable
from star_elastic.errors import StarElasticError
from star_elastic.model import Model, ModelConfig

WORDS = [f"w{i}" for i in range(60)]
VOCAB = 64  # [UNK] <s> </s> + 60 words, and a spare

NEMOTRON = ModelConfig(family="nemotron_h", vocab_size=VOCAB, hidden_size=32, layer_types="M*-EM*E",
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                       mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8,
                       n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                       moe_shared_expert_intermediate_size=24, routed_scaling_factor=1.5, time_step_min=0.001,
                       bos_token_id=1, eos_token_id=2)
LLAMA = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=32, layer_types="****", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=48, mlp_gated=True, mlp_act="silu",
                    rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
PARENTS = {"nemotron": NEMOTRON, "llama": LLAMA, "smollm2": SMOLLM2, "nano": NANO}
ERR_PREFIX = "star-elastic: error: "


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("STAR_ELASTIC_QUIET", "1")


# ----------------------------------------------------------------------------- parse_params

@pytest.mark.parametrize("text,expected", [
    ("0.5", 500_000), ("1.0", 1_000_000), ("1", 1), ("0.25", 250_000), ("50%", 500_000), ("100%", 1_000_000),
    ("70K", 70_000), ("500k", 500_000), ("0.5M", 500_000), ("1M", 1_000_000), (" 123456 ", 123_456),
    ("123_456", 123_456), ("1e-1", 100_000), (".5", 500_000),
])
def test_parse_params(text, expected):
    assert parse_params(text, 1_000_000) == expected


def test_parse_params_large_suffixes_and_exact_total():
    assert parse_params("1.2B", 2 * 10**9) == 1_200_000_000
    assert parse_params("70M", 134_515_008) == 70_000_000
    assert parse_params("1.0", 134_515_008) == 134_515_008  # a fraction of 1 is the total, not a rounding of it
    assert parse_params("0.5", 134_515_009) == 67_257_504  # floor: the target is an upper bound


@pytest.mark.parametrize("text,words", [
    ("lots", ["not a number"]), ("", ["not a number"]), ("0.5 M params", ["not a number"]), ("1.2X", ["not a number"]),
    ("0", ["positive"]), ("0.0", ["positive"]), ("-0.5", ["positive"]), ("-3M", ["positive"]),
    ("1.5", ["more than the whole parent"]), ("150%", ["more than the whole parent"]),
    ("2M", ["more than the parent's", "1,000,000"]), ("1000001", ["more than the parent's"]),
    ("0.0000001", ["less than one parameter"]),
])
def test_parse_params_errors(text, words):
    with pytest.raises(StarElasticError) as e:
        parse_params(text, 1_000_000)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


# ----------------------------------------------------------------------------- choose_spec

@pytest.mark.parametrize("name", PARENTS)
def test_choose_spec_within_bounds_for_random_targets(name):
    cfg = PARENTS[name]
    total = count_parameters(cfg)
    rng = random.Random(name)
    order = list(range(cfg.num_layers))
    rng.shuffle(order)
    axis_sets = [None, ("hidden",), ("ffn", "depth"), ("attention", "mamba", "experts", "ffn", "depth")]
    checked = 0
    for axes in axis_sets:
        for _ in range(8):
            target = int(total * rng.uniform(0.3, 1.0))
            kw = {} if axes is None else {"axes": axes}
            try:
                spec = choose_spec(cfg, target, layer_order=order, **kw)
            except StarElasticError as e:
                # The default axes reach any of these targets. Fewer axes may not: a target below
                # their reach, or between two sizes of a coarse axis (the tiny Llama's hidden size
                # moves in steps of its 4 heads: transformers requires hidden % heads == 0; SmolLM2's,
                # aligned, in steps of 72 = lcm(8, its 9 heads), 1/8 of it).
                assert axes is not None, e
                assert "below the smallest model reachable" in str(e) or (
                    "too coarse" in str(e) and len(axes) == 1), e
                continue
            n = spec.num_parameters(cfg)
            assert 0.85 * target <= n <= target, (axes, target, n, spec)
            assert spec.is_homogeneous(cfg)
            sub = spec.config(cfg)
            if cfg.family == "llama":  # else transformers' LlamaConfig refuses the export
                assert sub.hidden_size % sub.num_attention_heads == 0, spec
            for k in spec.to_dict():  # only the chosen axes move
                assert k in {"hidden_size": "hidden", "num_attention_heads": "attention", "layers": "depth",
                             "num_key_value_heads": "attention", "mamba_num_heads": "mamba",
                             "intermediate_size": "ffn", "n_routed_experts": "experts"}.keys()
            checked += 1
    assert checked >= 16


def test_choose_spec_full_target_is_the_parent_and_one_less_is_not():
    for cfg in PARENTS.values():
        total = count_parameters(cfg)
        assert choose_spec(cfg, total) == ElasticSpec()
        spec = choose_spec(cfg, total - 1)
        assert 0.85 * total <= spec.num_parameters(cfg) < total


def test_choose_spec_respects_groups_and_granularity():
    # Nano: 64 Mamba heads in 8 groups, 32 query heads over 2 KV groups, 128 experts with top-6
    for frac in (0.3, 0.5, 0.75):
        spec = choose_spec(NANO, int(frac * count_parameters(NANO)))
        spec.validate(NANO)
        assert spec.hidden_size is None or spec.hidden_size % 8 == 0
        assert spec.mamba_num_heads is None or spec.mamba_num_heads % 8 == 0
        assert spec.n_routed_experts is None or spec.n_routed_experts >= 6
        assert spec.num_key_value_heads is None  # query heads go first, inside each KV group
    # MoE alone, down to its floor: top-2 of 8 in 2 router groups with topk_group 1 needs 2 per group
    cfg = ModelConfig(**{**NEMOTRON.to_dict(), "n_group": 2, "topk_group": 1})
    smallest = ElasticSpec(n_routed_experts=4).num_parameters(cfg)
    assert choose_spec(cfg, smallest, axes=("experts",)).n_routed_experts == 4
    with pytest.raises(StarElasticError, match=f"{smallest:,}"):
        choose_spec(cfg, smallest - 1, axes=("experts",))


def test_choose_spec_depth_drops_least_important_layers_first():
    order = [5, 1, 3, 0, 2, 4, 6]  # least important first
    one_layer = count_parameters(NEMOTRON) - ElasticSpec(layers=[0, 1, 2, 3, 4, 6]).num_parameters(NEMOTRON)
    spec = choose_spec(NEMOTRON, count_parameters(NEMOTRON) - one_layer, axes=("depth",), layer_order=order)
    assert spec.layers == [0, 1, 2, 3, 4, 6]
    two_layers = ElasticSpec(layers=[0, 1]).num_parameters(LLAMA)
    spec = choose_spec(LLAMA, two_layers + 10, axes=("depth",), layer_order=[2, 0, 3, 1])
    assert spec.layers == [1, 3]


def test_choose_spec_attention_alone_cannot_reach_half_of_smollm2():
    total = count_parameters(SMOLLM2)
    smallest = ElasticSpec(num_attention_heads=1, num_key_value_heads=1).num_parameters(SMOLLM2)
    assert smallest_reachable(SMOLLM2, ("attention",)) == smallest
    with pytest.raises(StarElasticError) as e:
        choose_spec(SMOLLM2, total // 2, axes=("attention",))
    msg = str(e.value)
    assert "below the smallest model reachable by shrinking attention" in msg and f"{smallest:,}" in msg


def test_choose_spec_errors():
    total = count_parameters(LLAMA)
    with pytest.raises(StarElasticError, match=f"more than the parent's .*{total:,}"):
        choose_spec(LLAMA, total + 1)
    with pytest.raises(StarElasticError, match="unknown axis 'wings'"):
        choose_spec(LLAMA, total // 2, axes=("wings",))
    with pytest.raises(StarElasticError, match="none of the axes mamba"):
        choose_spec(LLAMA, total // 2, axes=("mamba",))
    with pytest.raises(StarElasticError, match="layer order"):
        choose_spec(LLAMA, total // 2, axes=("depth",))
    with pytest.raises(StarElasticError, match="per-layer"):
        choose_spec(ElasticSpec(intermediate_size=[8, 16, 16, 16]).config(LLAMA), 1000)
    # sizes too coarse: one layer, attention only, two query heads of 64 channels; half the heads
    # lose far more than 15% of a target just under the parent
    coarse = ModelConfig(**{**LLAMA.to_dict(), "layer_types": "*", "num_attention_heads": 2,
                            "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 1})
    total = count_parameters(coarse)
    assert ElasticSpec(num_attention_heads=1).num_parameters(coarse) < 0.85 * (total - 1)
    with pytest.raises(StarElasticError, match="too coarse"):
        choose_spec(coarse, total - 1, axes=("attention",))


# ----------------------------------------------------------------------------- checkpoints on disk

def make_tokenizer():
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Saved checkpoints (random weights + tokenizer) of both families, a text file, and a llama scores file."""
    root = tmp_path_factory.mktemp("cli_slice")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(60)]
    (root / "text.txt").write_text("\n\n".join(docs) + "\n")
    tok = make_tokenizer()
    paths = {"text": root / "text.txt"}
    for name, cfg in (("nemotron", NEMOTRON), ("llama", LLAMA)):
        model = randomize_(Model(cfg), seed=1).eval()
        paths[name] = hf.save_pretrained(model, root / name, tokenizer=tok)
        if name == "llama":
            paths["llama_scores"] = save_scores(random_importance(model), root / "llama_scores.safetensors")
    return paths


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def ids(seed=0):
    return torch.randint(3, VOCAB - 1, (2, 13), generator=torch.Generator().manual_seed(seed))


def stock_transformers(path, x):
    """Logits and parameter count of `path` loaded by transformers itself, with no missing/unexpected keys."""
    ref, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32,
                                                     experts_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return ref.eval()(x, use_cache=False).logits, ref.num_parameters()


CALIB = ["--batches", "3", "--batch-size", "2", "--seq-len", "16"]


@pytest.mark.parametrize("name", ["nemotron", "llama"])
def test_importance_then_slice_end_to_end(tmp_path, capsys, files, name):
    scores_file, out = tmp_path / "scores.safetensors", tmp_path / "small"
    rc, stdout, err = run(capsys, "importance", files[name], "--data", files["text"], "--out", scores_file, *CALIB)
    assert rc == 0, err
    assert "wrote" in stdout and scores_file.is_file()
    scores = load_scores(scores_file)
    assert scores["meta"]["method"] == "activation" and scores["meta"]["sequences"] == 6

    rc, stdout, err = run(capsys, "slice", files[name], "--params", "0.6", "--scores", scores_file, "--out", out)
    assert rc == 0, err
    parent = hf.load(files[name])
    total = parent.num_parameters()
    target = int(0.6 * total)
    assert f"target {target / 1e3:.2f}K" in stdout and "architecture:" in stdout

    x = ids()
    hf_logits, n = stock_transformers(out, x)
    small = hf.load(out)
    assert n == small.num_parameters()
    assert 0.85 * target <= n <= target
    assert f"{n:,}" in stdout
    with torch.no_grad():
        assert rel_err(hf_logits, small(x)) < 1e-4
    assert hf.load_tokenizer(out)("w3 w7")["input_ids"] == make_tokenizer()("w3 w7")["input_ids"]

    # The slice is the parent sorted by these scores, run under the spec's masks: the most important
    # units were kept.
    record = json.loads((out / "star_elastic_slice.json").read_text())
    spec = ElasticSpec.from_dict(record["spec"])
    assert record["parameters"] == n and record["target"] == target and spec.to_dict()
    assert small.config == spec.config(parent.config)
    sort_model(parent, scores)
    with torch.no_grad(), masked(parent, spec.masks(parent.config)):
        assert rel_err(small(x), parent(x)) < 1e-5


def test_slice_estimates_activation_importance_with_depth(tmp_path, capsys, files):
    out = tmp_path / "small"
    rc, stdout, err = run(capsys, "slice", files["llama"], "--params", "0.7", "--data", files["text"],
                          "--axes", "ffn,depth", "--out", out, *CALIB)
    assert rc == 0, err
    assert "importance: activations over 3 batches" in stdout
    record = json.loads((out / "star_elastic_slice.json").read_text())
    assert record["importance"]["method"] == "activation"
    assert set(record["spec"]) <= {"intermediate_size", "layers"} and record["spec"]
    total = count_parameters(LLAMA)
    _, n = stock_transformers(out, ids())
    assert 0.85 * 0.7 * total <= n <= 0.7 * total


@pytest.mark.parametrize("name", ["nemotron", "llama"])
def test_params_one_is_the_parent_exactly(tmp_path, capsys, files, name):
    out = tmp_path / "same"
    rc, stdout, err = run(capsys, "slice", files[name], "--params", "1.0", "--data", files["text"], "--out", out)
    assert rc == 0, err
    assert "copied unchanged" in stdout
    parent, copy = hf.load(files[name]), hf.load(out)
    x = ids(1)
    with torch.no_grad():
        assert torch.equal(copy(x), parent(x))
    for (k, a), b in zip(parent.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b), k
    hf_logits, n = stock_transformers(out, x)
    assert n == parent.num_parameters()
    with torch.no_grad():
        assert rel_err(hf_logits, parent(x)) < 1e-4


def test_slice_explicit_spec_with_magnitude_importance(tmp_path, capsys, files):
    spec = ElasticSpec(hidden_size=24, layers=[0, 1, 2, 3, 4, 6], num_attention_heads=2, n_routed_experts=4,
                       mamba_num_heads=2, intermediate_size=20)
    spec_file, out = tmp_path / "spec.json", tmp_path / "small"
    spec_file.write_text(spec.to_json())
    rc, stdout, err = run(capsys, "slice", files["nemotron"], "--spec", spec_file, "--method", "magnitude",
                          "--out", out)
    assert rc == 0, err
    assert "importance: weight magnitude" in stdout and "layers 7 -> 6" in stdout
    x = ids(2)
    hf_logits, n = stock_transformers(out, x)
    small = hf.load(out)
    assert small.config == spec.config(NEMOTRON) and n == spec.num_parameters(NEMOTRON)
    parent = hf.load(files["nemotron"])
    sort_model(parent, weight_magnitude_importance(parent))
    with torch.no_grad(), masked(parent, spec.masks(NEMOTRON)):
        assert rel_err(hf_logits, small(x)) < 1e-4
        assert rel_err(small(x), parent(x)) < 1e-5


def test_slice_per_layer_spec_writes_own_format(tmp_path, capsys, files):
    spec_file, out = tmp_path / "spec.json", tmp_path / "hetero"
    spec_file.write_text(json.dumps({"intermediate_size": [8, 16, 24, 48]}))
    rc, stdout, err = run(capsys, "slice", files["llama"], "--spec", spec_file, "--method", "random", "--out", out)
    assert rc == 0, err
    assert "per-layer" in err and "star-elastic per-layer format" in stdout
    small = hf.load(out)
    assert [small.config.layer(i).intermediate_size for i in range(4)] == [8, 16, 24, 48]


def test_force_replaces_an_existing_output(tmp_path, capsys, files):
    out = tmp_path / "small"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    rc, _, err = run(capsys, "slice", files["llama"], "--params", "0.8", "--method", "random", "--out", out)
    assert rc == 2 and "already exists" in err and (out / "old.txt").read_text() == "keep me"
    rc, _, err = run(capsys, "slice", files["llama"], "--params", "0.8", "--method", "random", "--out", out, "--force")
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]  # no staging leftovers


@pytest.fixture
def bad_inputs(tmp_path, files):
    (tmp_path / "bad.json").write_text("{hidden_size: 3")
    (tmp_path / "big.json").write_text('{"intermediate_size": 49}')
    (tmp_path / "odd.json").write_text('{"hidden_size": 22}')
    (tmp_path / "scores.safetensors").write_text("not safetensors")
    return tmp_path


ERRORS = {
    "too small": (["--params", "0.0001", "--method", "random"], ["below the smallest model reachable"]),
    "too big": (["--params", "1.5", "--method", "random"], ["more than the whole parent"]),
    "too many": (["--params", "10B", "--method", "random"], ["more than the parent's"]),
    "garbage": (["--params", "lots", "--method", "random"], ["not a number"]),
    "params and spec": (["--params", "0.5", "--spec", "{tmp}/big.json"], ["exactly one of --params"]),
    "neither": (["--method", "random"], ["exactly one of --params"]),
    "bad spec json": (["--spec", "{tmp}/bad.json", "--method", "random"], ["bad.json", "not valid JSON"]),
    "spec too large": (["--spec", "{tmp}/big.json", "--method", "random"], ["intermediate_size=49", "larger"]),
    "spec missing": (["--spec", "{tmp}/nope.json", "--method", "random"], ["nope.json", "no such file"]),
    "foreign scores": (["--params", "0.5", "--scores", "{llama_scores}"], ["llama", "nemotron_h"]),
    "broken scores": (["--params", "0.5", "--scores", "{tmp}/scores.safetensors"], ["not a readable scores file"]),
    "no data": (["--params", "0.5"], ["--data"]),
    "axis absent": (["--params", "0.5", "--axes", "hidden,depthwise", "--method", "random"], ["unknown axis 'depthwise'"]),
    "magnitude depth": (["--params", "0.5", "--axes", "depth", "--method", "magnitude"], ["layer order"]),
    "scores and method": (["--params", "0.5", "--scores", "{llama_scores}", "--method", "random"], ["exclude"]),
    "zero batches": (["--params", "0.5", "--data", "{text}", "--batches", "0"], ["--batches", "at least 1"]),
    "missing data": (["--params", "0.5", "--data", "{tmp}/nope.txt"], ["nope.txt"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_slice_errors_are_one_line_and_write_nothing(tmp_path, capsys, files, bad_inputs, case):
    argv, words = ERRORS[case]
    fill = {"tmp": bad_inputs, "llama_scores": files["llama_scores"], "text": files["text"]}
    argv = [a.format(**fill) for a in argv]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, stdout, err = run(capsys, "slice", files["nemotron"], "--out", out, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERR_PREFIX), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging leftovers


def test_llama_spec_transformers_cannot_load(tmp_path, capsys, files):
    (tmp_path / "odd.json").write_text('{"hidden_size": 22}')  # 4 heads: transformers' LlamaConfig refuses it
    rc, _, err = run(capsys, "slice", files["llama"], "--spec", tmp_path / "odd.json", "--method", "random",
                     "--out", tmp_path / "out")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "hidden_size=22" in err and "LlamaConfig" in err and not (tmp_path / "out").exists()


def test_spec_stock_transformers_cannot_run_is_refused(tmp_path, capsys, files):
    (tmp_path / "odd.json").write_text('{"hidden_size": 20}')  # MoE experts: grouped-GEMM strides of 16 bytes
    rc, _, err = run(capsys, "slice", files["nemotron"], "--spec", tmp_path / "odd.json", "--method", "random",
                     "--out", tmp_path / "out")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith(ERR_PREFIX)
    assert "hidden_size=20 is not a multiple of 8" in err and "grouped GEMM" in err and "use 16 or 24" in err
    assert not (tmp_path / "out").exists()


def test_slice_multiple(tmp_path, capsys, files):
    out = tmp_path / "small"
    rc, _, err = run(capsys, "slice", files["nemotron"], "--params", "0.8", "--multiple", "16", "--method", "random",
                     "--out", out)
    assert rc == 0, err
    spec = json.loads((out / "star_elastic_slice.json").read_text())["spec"]
    sub = ElasticSpec.from_dict(spec).config(NEMOTRON)
    assert spec.get("hidden_size", 32) % 16 == 0 and spec.get("intermediate_size", 48) % 16 == 0, spec
    assert sub.num_attention_heads * sub.head_dim % 16 == 0 and sub.mamba_num_heads * sub.mamba_head_dim % 16 == 0
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    for argv, words in ((["--params", "0.6", "--multiple", "0"], ["--multiple", "positive"]),
                        (["--spec", tmp_path / "spec.json", "--multiple", "8"], ["--multiple", "--params"])):
        rc, _, err = run(capsys, "slice", files["nemotron"], *argv, "--method", "random", "--out", tmp_path / "o2")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o2").exists()


def test_axis_the_model_lacks(tmp_path, capsys, files):
    rc, _, err = run(capsys, "slice", files["llama"], "--params", "0.5", "--axes", "mamba", "--method", "random",
                     "--out", tmp_path / "out")
    assert rc == 2 and err.startswith(ERR_PREFIX) and "no 'mamba' axis" in err and not (tmp_path / "out").exists()


def test_importance_errors(tmp_path, capsys, files):
    target = tmp_path / "scores.safetensors"
    target.write_bytes(b"old")
    rc, _, err = run(capsys, "importance", files["llama"], "--data", files["text"], "--out", target, *CALIB)
    assert rc == 2 and "already exists" in err and target.read_bytes() == b"old"
    rc, _, err = run(capsys, "importance", files["llama"], "--data", files["text"], "--out", tmp_path / "s2",
                     "--seq-len", "100000")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "fewer than one sequence" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors"]
    rc, _, err = run(capsys, "importance", files["llama"], "--data", files["text"], "--out", target, "--force",
                     "--depth", *CALIB)
    assert rc == 0, err
    scores = load_scores(target)
    assert scores["meta"]["family"] == "llama" and sorted(scores["layer_order"].tolist()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- slice CKPT --budget: streamed

BUDGETS = ["1.0", "0.75", "0.5"]
# what a tokenizer read with from_pretrained adds to tokenizer_config.json when it is saved again
LOAD_TIME_KEYS = {"is_local", "local_files_only"}


@pytest.fixture(scope="module")
def budget_ckpts(tmp_path_factory):
    """Tiny elastic checkpoints, one per family (tests/elastic_ckpt.py): a random sorted parent, the
    budgets 1.0 / 0.75 / 0.5 with given architectures (0.5 per-layer for Llama), a word tokenizer
    with a chat template."""
    from elastic_ckpt import make_checkpoint

    root = tmp_path_factory.mktemp("budget_ckpts")
    return {family: make_checkpoint(root / family / "ckpt", family, chat_template="{{ messages[0]['content'] }}")
            for family in ("nemotron_h", "llama")}


def loading_path(ckpt, name, out, dtype=None) -> dict:
    """What `slice CKPT --budget NAME` wrote before it streamed: the whole parent loaded (as stored,
    or in `dtype`) with its tokenizer, the budget's spec cut and exported by `zero_shot_slice`."""
    from star_elastic.elastic.checkpoint import budget_spec, read_manifest
    from star_elastic.runtime import load_model_and_tokenizer
    from star_elastic.zero_shot import SliceConfig, zero_shot_slice

    model, tokenizer = load_model_and_tokenizer(str(ckpt), torch.device("cpu"), dtype)
    cfg = SliceConfig(spec=budget_spec(read_manifest(ckpt), name), budget=name)
    return zero_shot_slice(model, tokenizer, out, cfg, log=lambda _: None, parent=str(ckpt))


def no_tensor_data(monkeypatch):
    """From here on, reading a checkpoint's tensors whole (what `load` does) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the parent was loaded")

    monkeypatch.setattr(hf, "read_safetensors", refuse)


def slice_tensors(directory) -> dict:
    """The model's tensors in `directory` (not an elastic checkpoint's router or importance files)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_slice(new, old):
    """`new` (streamed) holds what `old` (loaded) holds: config.json, every tensor (name, dtype,
    value), the same files, the same record (but for "streamed"), the same tokenizer."""
    from transformers import AutoTokenizer

    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
    assert json.loads((new / "config.json").read_text()) == json.loads((old / "config.json").read_text())
    a, b = slice_tensors(new), slice_tensors(old)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    record = json.loads((new / "star_elastic_slice.json").read_text())
    assert record.pop("streamed") is True
    assert record == json.loads((old / "star_elastic_slice.json").read_text())
    # tokenizer files: copied from the checkpoint where the loading path saved the loaded tokenizer
    # again; the same files, equal but for the keys that round trip adds
    names = [p.name for p in old.iterdir() if p.name.startswith(("tokenizer", "chat_template", "special_tokens"))]
    assert "tokenizer.json" in names and "chat_template.jinja" in names
    for name in names:
        if name == "tokenizer_config.json":
            got, want = (json.loads((d / name).read_text()) for d in (new, old))
            assert got == {k: v for k, v in want.items() if k not in LOAD_TIME_KEYS or k in got}, name
        else:
            assert (new / name).read_bytes() == (old / name).read_bytes(), name
    t_new, t_old = AutoTokenizer.from_pretrained(str(new)), AutoTokenizer.from_pretrained(str(old))
    text = "w1 w2 w3 w59 unknown"
    assert t_new(text).input_ids == t_old(text).input_ids and t_new.chat_template == t_old.chat_template
    assert (t_new.bos_token, t_new.eos_token, t_new.unk_token) == (t_old.bos_token, t_old.eos_token, t_old.unk_token)


@pytest.mark.parametrize("name", BUDGETS)
@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
def test_budget_streams_what_loading_wrote(tmp_path, capsys, monkeypatch, budget_ckpts, family, name):
    """Every budget, the full one (the parent's architecture) included, streamed without loading the
    parent, is bit for bit what loading the parent and exporting the slice wrote."""
    ckpt = budget_ckpts[family]
    loading_path(ckpt, name, tmp_path / "loaded")
    no_tensor_data(monkeypatch)
    rc, out, err = run(capsys, "slice", ckpt, "--budget", name, "--out", tmp_path / "streamed")
    assert rc == 0, err
    assert f"budget {name} of the elastic checkpoint (trained, sorted): streaming its prefix from disk" in out
    assert_same_slice(tmp_path / "streamed", tmp_path / "loaded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loaded", "streamed"]  # no staging leftovers
    if name == "1.0":  # the parent itself, every tensor as stored
        parent, small = slice_tensors(ckpt), slice_tensors(tmp_path / "streamed")
        assert parent.keys() == small.keys() and all(torch.equal(parent[k], small[k]) for k in parent)


@pytest.mark.parametrize("family,dtype", [("nemotron_h", "bfloat16"), ("llama", "bfloat16"), ("nemotron_h", "float16")])
def test_budget_dtype_casts_while_streaming(tmp_path, capsys, monkeypatch, budget_ckpts, family, dtype):
    """--dtype with --budget streams too, each tensor cast as it is written: what loading the parent
    in that dtype wrote (the MoE gate, kept in float32 by the model, through the dtype and back)."""
    ckpt = budget_ckpts[family]
    loading_path(ckpt, "0.5", tmp_path / "loaded", dtype=getattr(torch, dtype))
    no_tensor_data(monkeypatch)
    monkeypatch.delenv("STAR_ELASTIC_QUIET")
    rc, _, err = run(capsys, "slice", ckpt, "--budget", "0.5", "--dtype", dtype, "--out", tmp_path / "streamed")
    assert rc == 0, err
    assert "slicing ckpt" in err and "tensor" in err  # the progress bar
    assert_same_slice(tmp_path / "streamed", tmp_path / "loaded")
    kinds = {k: t.dtype for k, t in slice_tensors(tmp_path / "streamed").items()}
    assert {d for k, d in kinds.items() if ".gate." not in k} == {getattr(torch, dtype)}
    assert all(d == torch.float32 for k, d in kinds.items() if ".gate." in k)


def test_budget_errors_are_one_line_and_write_nothing(tmp_path, capsys, budget_ckpts):
    ckpt = budget_ckpts["nemotron_h"]
    before = sorted(p.name for p in ckpt.iterdir())
    for argv, words in (
            (["--budget", "0.3"], ["budget 0.3 is outside the trained params budgets", "0.75"]),
            (["--budget", "0.5", "--method", "random"], ["--budget", "--method"]),
            (["--budget", "0.5", "--scores", tmp_path / "s.safetensors"], ["--budget", "--scores"]),
            (["--budget", "0.5", "--data", "wiki"], ["--budget", "--data"]),
            (["--budget", "0.5", "--params", "0.5"], ["no --params or --spec"])):
        rc, _, err = run(capsys, "slice", ckpt, "--out", tmp_path / "out", *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(ERR_PREFIX), err
        for w in words:
            assert str(w) in lines[0], (w, lines[0])
        assert list(tmp_path.iterdir()) == []
    # --force cannot make the slice replace the checkpoint it streams from
    rc, _, err = run(capsys, "slice", ckpt, "--budget", "0.5", "--out", ckpt, "--force")
    assert rc == 2 and "would replace the elastic checkpoint" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_budget_truncated_shard_is_one_line_and_writes_nothing(tmp_path, capsys, budget_ckpts):
    import shutil

    ckpt = shutil.copytree(budget_ckpts["llama"], tmp_path / "ckpt")
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    rc, _, err = run(capsys, "slice", ckpt, "--budget", "0.5", "--out", tmp_path / "out")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(ERR_PREFIX) and "model.safetensors" in last and "bytes" in last, err
    # the manifest made to agree: the header check names the file
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sizes"]["model.safetensors"] = f.stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run(capsys, "slice", ckpt, "--budget", "0.5", "--out", tmp_path / "out")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(ERR_PREFIX) and "model.safetensors" in last and "truncated" in last, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_budget_failure_mid_stream_leaves_nothing(tmp_path, capsys, monkeypatch, budget_ckpts):
    """A read that fails after some tensors were written: one line, no output, no staging directory."""
    from star_elastic.elastic import stream

    real, calls = stream._Reader.tensor, {"n": 0}

    def failing(self, item, cfg):
        calls["n"] += 1
        if calls["n"] == 5:
            raise StarElasticError(f"{item.src.file}: cannot read tensor {item.src.key} (simulated)")
        return real(self, item, cfg)

    monkeypatch.setattr(stream._Reader, "tensor", failing)
    rc, _, err = run(capsys, "slice", budget_ckpts["nemotron_h"], "--budget", "0.75", "--out", tmp_path / "out")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(ERR_PREFIX) and "simulated" in last, err
    assert calls["n"] == 5 and list(tmp_path.iterdir()) == []
