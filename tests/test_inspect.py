"""`star-elastic inspect CKPT` and the importance scores an elastic checkpoint stores."""

import json

import pytest
import torch

from conftest import entries, randomize_
from star_elastic import cli
from star_elastic.elastic.checkpoint import IMPORTANCE_FILE, read_manifest
from star_elastic.elastic.importance import estimate_importance, load_scores, permuted_scores
from star_elastic.elastic.sort import sort_model
from star_elastic.elastic.spec import ElasticSpec
from star_elastic.hf import read_config
from star_elastic.model import Model, ModelConfig

PNG = b"\x89PNG\r\n\x1a\n"


def test_inspect_reports_every_budget_per_layer_and_the_storage_saved(elastic_ckpt, tmp_path, capsys):
    path, _ = elastic_ckpt
    out = tmp_path / "inspect"
    assert cli.main(["inspect", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert entries(out) == ["architecture.png", "importance.png", "inspect.json"]
    assert (out / "architecture.png").read_bytes()[:8] == PNG and (out / "importance.png").read_bytes()[:8] == PNG
    info = json.loads((out / "inspect.json").read_text())
    manifest = read_manifest(path)
    cfg = read_config(path)[1]
    parent = ElasticSpec().sizes(cfg)
    for b in manifest["budgets"]:
        got = info["budgets"][b["name"]]
        assert got["params"] == b["params"] and got["active_params"] == b["active_params"]
        sizes = ElasticSpec.from_dict(b["spec"]).sizes(cfg)
        for layer, s, p in zip(got["layers"], sizes, parent):
            assert {k: layer[k] for k in s} == s
            assert layer["fractions"] == pytest.approx({k: s[k] / p[k] for k in s})
        assert f"budget {b['name']}:" in printed
    st = info["storage"]
    assert st["checkpoint_bytes"] == sum((path / f).stat().st_size for f in manifest["files"])
    assert st["separate_total_bytes"] == 4 * sum(b["params"] for b in manifest["budgets"])  # fp32 weights
    assert st["saved_bytes"] == st["separate_total_bytes"] - st["checkpoint_bytes"]
    assert "storage:" in printed and "saved" in printed


def test_an_old_checkpoint_without_scores_skips_the_map_with_a_note(copy_ckpt, tmp_path, capsys):
    (copy_ckpt / IMPORTANCE_FILE).unlink()
    manifest = json.loads((copy_ckpt / "manifest.json").read_text())
    del manifest["files"][IMPORTANCE_FILE], manifest["sizes"][IMPORTANCE_FILE]
    (copy_ckpt / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "inspect"
    assert cli.main(["inspect", str(copy_ckpt), "--out", str(out)]) == 0
    assert "importance map skipped" in capsys.readouterr().out
    assert entries(out) == ["architecture.png", "inspect.json"]


def test_stored_scores_are_in_the_sorted_order(elastic_ckpt):
    """Scores re-estimated on the sorted model equal the original scores permuted as the sort permuted
    the units: entry j scores the sorted model's unit j (the checkpoint stores them so)."""
    cfg = ModelConfig(vocab_size=63, hidden_size=32, layer_types="M*E-", num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                      n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      moe_shared_expert_intermediate_size=16)
    model = randomize_(Model(cfg)).eval()
    batches = [torch.randint(0, 63, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = estimate_importance(model, batches, num_batches=2, progress=False)
    perms = sort_model(model, before)
    after = estimate_importance(model, batches, num_batches=2, progress=False)
    expected = permuted_scores(before, perms)
    assert any(not torch.equal(before[k], expected[k]) for k in before if k != "meta")  # the sort moved units
    for key in after:
        if key != "meta":
            torch.testing.assert_close(expected[key], after[key], rtol=1e-4, atol=1e-6, msg=key)
    stored = load_scores(elastic_ckpt[0] / IMPORTANCE_FILE)
    assert stored["meta"]["order"] == "sorted" and "layers.2.experts" in stored
    assert IMPORTANCE_FILE in read_manifest(elastic_ckpt[0])["files"]  # checksummed like the weights
