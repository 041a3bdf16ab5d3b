"""`star-elastic validate CKPT`: a sound checkpoint passes; each kind of fault fails its own check."""

import json

import torch

from conftest import entries
from star_elastic import cli
from star_elastic.elastic import checkpoint, slicing
from star_elastic.elastic.checkpoint import load_elastic, read_manifest
from star_elastic.elastic.spec import ElasticSpec
from star_elastic.evaluate import perplexity
from star_elastic.runtime import eval_tokens
from star_elastic.validate import prefix_problem, weights_problem


def run(tmp_path, capsys, path, *extra):
    out = tmp_path / "report.json"
    status = cli.main(["validate", str(path), "--json", str(out), "--seq-len", "32", *extra])
    captured = capsys.readouterr()
    return status, json.loads(out.read_text()), captured


def checks(report, name):
    return {c["budget"]: c for c in report["checks"] if c["name"] == name}


def test_a_sound_checkpoint_passes_every_check(elastic_ckpt, tmp_path, capsys):
    path, text = elastic_ckpt
    status, report, captured = run(tmp_path, capsys, path, "--data", str(text))
    assert status == 0 and report["ok"], captured.out
    for name in ("slice", "cost", "nested", "outputs"):
        assert set(checks(report, name)) == {"1.0", "0.75", "0.5"}
        assert all(c["status"] == "ok" for c in checks(report, name).values())
    assert "valid" in captured.out
    # monotone quality: ok or warn exactly as the perplexities computed here say
    ckpt = load_elastic(path)
    stream = eval_tokens(ckpt.tokenizer, str(text), "heldout")
    ppl = [perplexity(slicing.slice_model(ckpt.model, ckpt.spec(n)), stream, seq_len=32, max_tokens=2048,
                      progress=False)["perplexity"] for n in ("1.0", "0.75", "0.5")]
    quality = checks(report, "quality")[None]
    assert quality["status"] == ("ok" if ppl[0] <= ppl[1] <= ppl[2] else "warn"), (ppl, quality)


def rewrite_budget(path, name, spec: ElasticSpec, **fields):
    """Replace budget `name` in the manifest by a consistent entry for `spec` (costs recomputed)."""
    manifest = read_manifest(path)
    ckpt = load_elastic(path)
    from star_elastic.elastic.cost import Budget, CostModel

    for i, b in enumerate(manifest["budgets"]):
        if b["name"] == name:
            entry = checkpoint.budget_entry(Budget(b["kind"], b["target"], b["target"] / b["fraction"], name), spec,
                                            ckpt.model.config, CostModel(ckpt.model.config))
            manifest["budgets"][i] = {**entry, **fields}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_budget_not_nested_in_a_larger_one_fails(copy_ckpt, tmp_path, capsys):
    spec75 = ElasticSpec.from_dict(read_manifest(copy_ckpt)["budgets"][1]["spec"])
    assert spec75.intermediate_size < 64  # the 0.75 budget cuts the FFN; give 0.5 the whole FFN
    small = ElasticSpec(hidden_size=16, intermediate_size=64, n_routed_experts=4)
    rewrite_budget(copy_ckpt, "0.5", small)
    status, report, captured = run(tmp_path, capsys, copy_ckpt)
    assert status == 1 and not report["ok"]
    nested = checks(report, "nested")
    assert nested["0.5"]["status"] == "fail" and "0.75" in nested["0.5"]["detail"], nested["0.5"]
    assert nested["1.0"]["status"] == nested["0.75"]["status"] == "ok"
    last = captured.err.strip().splitlines()[-1]  # after the sha256 progress bar
    assert last.startswith("star-elastic: validation failed: budget 0.5:"), last


def test_a_cost_outside_the_band_fails(copy_ckpt, tmp_path, capsys):
    b = read_manifest(copy_ckpt)["budgets"][2]
    rewrite_budget(copy_ckpt, "0.5", ElasticSpec.from_dict(b["spec"]), target=b["params"] * 0.8)
    status, report, _ = run(tmp_path, capsys, copy_ckpt)
    assert status == 1
    cost = checks(report, "cost")
    assert cost["0.5"]["status"] == "fail" and "band" in cost["0.5"]["detail"]
    assert cost["0.75"]["status"] == "ok"


def test_sliced_weights_or_outputs_that_differ_fail(elastic_ckpt, tmp_path, capsys, monkeypatch):
    real = slicing.slice_model

    def damaged(parent, spec):
        small = real(parent, spec)
        with torch.no_grad():
            small.lm_head.weight.mul_(1.01)
        return small
    monkeypatch.setattr(slicing, "slice_model", damaged)
    status, report, _ = run(tmp_path, capsys, elastic_ckpt[0])
    assert status == 1
    assert all(c["status"] == "fail" for c in checks(report, "outputs").values())
    assert all("lm_head" in c["detail"] for c in checks(report, "nested").values())


def test_a_damaged_file_fails_and_the_other_checks_still_run(copy_ckpt, tmp_path, capsys):
    f = copy_ckpt / "router.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: only the checksum can tell
    f.write_bytes(bytes(data))
    status, report, captured = run(tmp_path, capsys, copy_ckpt)
    assert status == 1
    files = checks(report, "files")[None]
    assert files["status"] == "fail" and "router.safetensors" in files["detail"] and "checksum" in files["detail"]
    assert checks(report, "load")[None]["status"] == "ok" and len(checks(report, "outputs")) == 3
    assert "router.safetensors" in captured.err.strip().splitlines()[-1]


def test_prefix_problem():
    assert prefix_problem(torch.tensor([1., 1, 0, 0]), 1) is None
    assert prefix_problem(torch.tensor([1., 0, 1, 0]), 1) is not None
    assert prefix_problem(torch.tensor([1., 0, 1, 0]), 2) is None  # a prefix inside each of two groups
    assert prefix_problem(torch.tensor([0., 0, 1, 0]), 2) is not None  # the kept group is not the first


def test_weights_problem_names_the_tensor(elastic_ckpt):
    ckpt = load_elastic(elastic_ckpt[0])
    spec = ckpt.spec("0.5")
    small = slicing.slice_model(ckpt.model, spec)
    assert weights_problem(ckpt.model, small, spec) is None
    with torch.no_grad():
        small.model.layers[2].mixer.experts.up_proj[0, 0, 0] += 1
    assert "model.layers.2.mixer.experts.up_proj" in weights_problem(ckpt.model, small, spec)


def test_not_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main(["validate", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no manifest.json" in err and str(tmp_path) in err and "\n" not in err
    assert entries(tmp_path) == ["notes.txt"]
