"""The `eval` and `generate` subcommands end to end on a tiny saved checkpoint with a tokenizer."""

import json
import math

import pytest
import torch

from conftest import word_tokenizer
from star_elastic import cli, load, save_pretrained
from star_elastic.data import read_documents, tokenize_documents
from star_elastic.evaluate import perplexity
from star_elastic.generate import generate
from star_elastic.model import Model, ModelConfig

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "home"]


@pytest.fixture
def checkpoint(tmp_path):
    tokenizer = word_tokenizer(tmp_path, WORDS)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(vocab), hidden_size=32, layer_types="M*E-", head_dim=8, mamba_head_dim=8,
                      mamba_num_heads=4, ssm_state_size=8, chunk_size=8, bos_token_id=1, eos_token_id=2)
    model = Model(cfg)
    with torch.no_grad():  # make the logits far from uniform so that the checks below mean something
        model.lm_head.weight.mul_(20)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tokenizer)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(12)) for i in range(30)))
    return tmp_path / "ckpt", tokenizer, text


def test_eval_json_matches_library(checkpoint, tmp_path, capsys):
    ckpt, tokenizer, text = checkpoint
    out = tmp_path / "res" / "ppl.json"
    assert cli.main(["eval", str(ckpt), "--data", str(text), "--seq-len", "16", "--json", str(out),
                     "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    stream = tokenize_documents(read_documents(text), tokenizer)
    expected = perplexity(load(ckpt), stream, seq_len=16, progress=False)
    assert res["tokens"] == expected["tokens"] == stream.numel() - math.ceil(stream.numel() / 16)
    assert res["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert res["perplexity"] > 1
    assert "perplexity" in capsys.readouterr().out


def test_eval_heldout_split_scores_fewer_tokens(checkpoint, tmp_path):
    ckpt, _, text = checkpoint
    results = {}
    for split in ("all", "heldout"):
        out = tmp_path / f"{split}.json"
        assert cli.main(["eval", str(ckpt), "--data", str(text), "--split", split, "--seq-len", "16",
                         "--json", str(out)]) == 0
        results[split] = json.loads(out.read_text())["tokens"]
    assert 0 < results["heldout"] < results["all"]


def test_generate_prints_the_greedy_continuation(checkpoint, capsys):
    ckpt, tokenizer, _ = checkpoint
    assert cli.main(["generate", str(ckpt), "--prompt", "the cat sat", "--max-new-tokens", "6", "--raw"]) == 0
    printed = capsys.readouterr().out.strip()
    ids = torch.tensor([tokenizer("the cat sat", add_special_tokens=False)["input_ids"]])
    expected = generate(load(ckpt), ids, 6, eos_token_id=tokenizer.eos_token_id)
    assert printed == tokenizer.decode(expected[0, 3:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("argv, words", [
    (["eval", "{missing}", "--data", "{text}"], ["no such file"]),
    (["eval", "{ckpt}", "--data", "{missing}"], ["no such file or corpus"]),
    (["eval", "{ckpt}", "--data", "{text}", "--seq-len", "0"], ["--seq-len", "at least 1"]),
    # --tokens 0 trained one step and wrote a checkpoint
    (["elastify", "{ckpt}", "--out", "{missing}", "--data", "{text}", "--budgets", "1.0,0.5", "--tokens", "0"],
     ["--tokens", "at least 1"]),
    (["generate", "{text}", "--prompt", "x"], ["checkpoint directory"]),
    # no tokens at all: a conv kernel's "padded input size" RuntimeError from the first Mamba layer before
    (["generate", "{ckpt}", "--prompt", "", "--raw"], ["prompt is empty"]),
    (["eval", "{text}", "--data", "{text}", "--plot", "{missing}"], ["{text}", "--plot", "not a directory"]),
    # weights and config alone: each command says what is missing and how to add it, not a transformers traceback
    (["generate", "{bare}", "--prompt", "x"], ["no tokenizer files", "save_pretrained"]),
    (["eval", "{bare}", "--data", "{text}"], ["no tokenizer files", "save_pretrained"]),
    (["elastify", "{bare}", "--out", "{missing}", "--data", "{text}", "--budgets", "1.0,0.5", "--tokens", "4096"],
     ["no tokenizer files", "save_pretrained"]),
])
def test_errors_are_one_line(checkpoint, tmp_path, capsys, argv, words):
    ckpt, _, text = checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((ckpt / name).read_bytes())
    fill = {"missing": tmp_path / "nope", "text": text, "ckpt": ckpt, "bare": bare}
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("star-elastic: error:") and "\n" not in err
    for w in words:
        assert w.format(**fill) in err
    assert not fill["missing"].exists()  # nothing written


def test_generate_refuses_a_prompt_without_tokens(checkpoint):
    model = load(checkpoint[0])
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 4)


def test_the_tiny_parent_example_takes_flags_and_refuses_bad_layers(tmp_path):
    """examples/tiny_nemotron_h.py wrote a model into a folder named "--help" when asked for help; now --help
    prints its usage, and an unknown layer character is a one-line error, both writing nothing."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "tiny_nemotron_h.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], cwd=tmp_path, capture_output=True, text=True)  # noqa: E731
    r = run("--help")
    assert r.returncode == 0 and "--layers" in r.stdout
    r = run(str(tmp_path / "bad"), "--layers", "MXZ")
    assert r.returncode == 2 and "one character a layer" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # the lm-eval task's builder took its first argument as a number: --help was a ValueError traceback
    builder = script.parent / "lm_eval" / "make_wiki_next_sentence.py"
    r = subprocess.run([sys.executable, str(builder), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--items" in r.stdout
    r = subprocess.run([sys.executable, str(builder), "--items", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--items must be at least 1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("device, words", [("gpu", ["'gpu'", "not a device"]), ("cuda", ["cuda", "no CUDA device"]),
                                           ("cuda:3", ["cuda:3", "no CUDA device"])])
def test_a_device_that_is_not_here_is_one_line(checkpoint, capsys, monkeypatch, device, words):
    """torch's 'Torch not compiled with CUDA enabled' AssertionError (or its device-string RuntimeError) came
    from deep inside the first copy, as a traceback; the machine is made CUDA-less so that this holds on a GPU too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["generate", str(checkpoint[0]), "--prompt", "the cat", "--raw", "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("star-elastic: error:") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
