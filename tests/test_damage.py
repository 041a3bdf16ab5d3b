"""Damaged and foreign input: every command that reads an elastic checkpoint (eval, validate, inspect,
slice --budget, generate) answers with one line naming the file, and writes nothing."""

import json
import os
import pickle

import pytest

from conftest import entries, one_line_error
from star_elastic import cli
from star_elastic.elastic.checkpoint import load_elastic

MARKER = "unpickled-marker"


class Payload:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def truncated(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def header_garbage(ckpt):  # same size, so the manifest's size check passes; the header check does not
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"#" * 16
    f.write_bytes(bytes(data))


def manifest_params(ckpt):
    m = json.loads((ckpt / "manifest.json").read_text())
    m["parent"]["params"] += 1
    (ckpt / "manifest.json").write_text(json.dumps(m))


def budget_too_wide(ckpt):
    m = json.loads((ckpt / "manifest.json").read_text())
    m["budgets"][2]["spec"]["hidden_size"] = 64
    (ckpt / "manifest.json").write_text(json.dumps(m))


def config_shapes(ckpt):  # config.json no longer describes the weights (or the manifest)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))


def renamed_tensor(ckpt):  # weights re-saved with a tensor under another name, manifest updated to match
    from safetensors.torch import load_file, save_file

    from star_elastic.elastic.checkpoint import sha256

    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    name = next(k for k in tensors if k.endswith("norm_f.weight"))
    tensors["backbone.final_norm.weight"] = tensors.pop(name)
    save_file(tensors, str(f), metadata={"format": "pt"})
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"]["model.safetensors"], m["sizes"]["model.safetensors"] = sha256(f), f.stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(m))


def unlisted_shard(ckpt):
    m = json.loads((ckpt / "manifest.json").read_text())
    del m["files"]["model.safetensors"]
    (ckpt / "manifest.json").write_text(json.dumps(m))


def manifest_not_json(ckpt):
    (ckpt / "manifest.json").write_text("{ this is not json")


def not_a_checkpoint(ckpt):
    for f in ckpt.iterdir():
        f.unlink()
    (ckpt / "notes.txt").write_text("just notes")


def pickle_weights(ckpt):  # the safetensors file replaced by a pickle that would leave a marker
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(str(ckpt.parent / MARKER)), f)


def pickle_as_safetensors(ckpt):  # a pickle under the safetensors name (and the recorded size gone)
    with open(ckpt / "model.safetensors", "wb") as f:
        pickle.dump(Payload(str(ckpt.parent / MARKER)), f)
    m = json.loads((ckpt / "manifest.json").read_text())
    del m["sizes"]["model.safetensors"]
    (ckpt / "manifest.json").write_text(json.dumps(m))


# damage -> words the one-line error must hold ("{ckpt}" = the checkpoint directory)
CASES = {
    "truncated": (truncated, ["model.safetensors", "bytes"]),
    "header_garbage": (header_garbage, ["model.safetensors", "not a safetensors file"]),
    "manifest_params": (manifest_params, ["manifest.json", "do not match"]),
    "budget_too_wide": (budget_too_wide, ["manifest.json", "budget '0.5'", "hidden_size=64"]),
    "config_shapes": (config_shapes, ["manifest.json", "do not match"]),
    "renamed_tensor": (renamed_tensor, ["{ckpt}", "missing 1 tensor", "final_norm"]),
    "unlisted_shard": (unlisted_shard, ["model.safetensors", "not listed in the manifest"]),
    "manifest_not_json": (manifest_not_json, ["manifest.json", "not valid JSON"]),
    "not_a_checkpoint": (not_a_checkpoint, ["{ckpt}", "no manifest.json"]),
    "pickle_weights": (pickle_weights, ["model.safetensors", "missing"]),
    "pickle_as_safetensors": (pickle_as_safetensors, ["model.safetensors", "not a safetensors file"]),
}

COMMANDS = {
    "eval": lambda ckpt, out, text: ["eval", str(ckpt), "--data", str(text), "--seq-len", "32", "--json",
                                     str(out / "r.json"), "--plot", str(out / "p.png")],
    "inspect": lambda ckpt, out, text: ["inspect", str(ckpt), "--out", str(out / "maps")],
    "slice": lambda ckpt, out, text: ["slice", str(ckpt), "--budget", "0.5", "--out", str(out / "half")],
    "validate": lambda ckpt, out, text: ["validate", str(ckpt)],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_damage_is_one_line_naming_the_file_and_nothing_is_written(elastic_ckpt, copy_ckpt, tmp_path, capsys,
                                                                   case, command):
    damage, words = CASES[case]
    damage(copy_ckpt)
    out = tmp_path / "out"
    out.mkdir()
    before = entries(copy_ckpt)
    status = cli.main(COMMANDS[command](copy_ckpt, out, elastic_ckpt[1]))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    if command == "validate" and case not in ("manifest_not_json", "not_a_checkpoint"):
        assert status == 1 and last.startswith("star-elastic: validation failed:"), last  # a report, then this
        words = words[:1]  # the first failing check names the file; its words may differ (e.g. checksum)
    else:
        assert status == 2 and last.startswith("star-elastic: error:"), last
    for w in words:
        assert w.format(ckpt=copy_ckpt).lower() in last.lower(), (w, last)
    assert entries(out) == [] and entries(copy_ckpt) == before
    assert not (tmp_path / MARKER).exists()  # nothing was unpickled


def test_library_loaders_refuse_damage_too(copy_ckpt):
    """generate / serve build on load_elastic: the same checks, the same one line."""
    truncated(copy_ckpt)
    one_line_error(lambda: load_elastic(copy_ckpt), "model.safetensors", "bytes")


def test_data_corruption_needs_the_checksum(copy_ckpt, elastic_ckpt, tmp_path, capsys):
    """A flipped bit inside tensor data passes the cheap checks; --verify (and validate) catch it."""
    f = copy_ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01
    f.write_bytes(bytes(data))
    load_elastic(copy_ckpt)  # cheap checks only: loads
    one_line_error(lambda: load_elastic(copy_ckpt, verify=True), "model.safetensors", "checksum")
    for argv in (["eval", str(copy_ckpt), "--data", str(elastic_ckpt[1]), "--verify", "--json", str(tmp_path / "r.json")],
                 ["inspect", str(copy_ckpt), "--verify", "--out", str(tmp_path / "maps")],
                 ["slice", str(copy_ckpt), "--budget", "0.5", "--verify", "--out", str(tmp_path / "cut")]):
        assert cli.main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "model.safetensors" in last and "checksum" in last, last
    assert not any(os.path.exists(tmp_path / name) for name in ("r.json", "maps", "cut"))


def test_a_pickle_file_given_as_the_model(tmp_path, capsys):
    with open(tmp_path / "model.pt", "wb") as f:
        pickle.dump(Payload(str(tmp_path / MARKER)), f)
    for argv in (["eval", str(tmp_path / "model.pt"), "--data", "wiki"], ["inspect", str(tmp_path / "model.pt")],
                 ["validate", str(tmp_path / "model.pt")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "model.pt" in err and "\n" not in err, err
    assert not (tmp_path / MARKER).exists()


def test_slice_budget_verify_passes_an_intact_checkpoint(elastic_ckpt, tmp_path):
    assert cli.main(["slice", str(elastic_ckpt[0]), "--budget", "0.5", "--verify", "--out", str(tmp_path / "cut")]) == 0
    assert (tmp_path / "cut" / "config.json").is_file()
    assert cli.main(["slice", str(elastic_ckpt[0]), "--params", "0.5", "--verify", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_checkpoint_is_named_missing(tmp_path, capsys, command):
    """A mistyped path says so, not that some directory lacks a manifest; a file where the checkpoint
    directory should be says that; nothing is written either way."""
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    for path, words in ((tmp_path / "nope", ["no such file or directory"]),
                        (tmp_path / "weights.bin", ["directory"])):
        assert cli.main(COMMANDS[command](path, out, text)) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("star-elastic: error:") and str(path) in last, last
        for w in words:
            assert w in last, (w, last)
    assert entries(out) == []
