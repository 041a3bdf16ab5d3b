"""benchmarks/check_sampling.py: samples the same rows twice per determinism mode and says whether they agree."""

import json
import sys
from pathlib import Path

from conftest import randomize_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import check_sampling  # noqa: E402

from star_elastic import hf  # noqa: E402
from star_elastic.model import Model, ModelConfig  # noqa: E402


def test_the_same_seed_samples_the_same_rows_twice_on_the_cpu(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, layer_types="M*E-", head_dim=8, mamba_head_dim=8, mamba_num_heads=4,
                      ssm_state_size=8, chunk_size=8)
    ckpt = hf.save_pretrained(randomize_(Model(cfg)), tmp_path / "ckpt")
    check_sampling.main(["--model", str(ckpt), "--rows", "3", "--length", "12", "--batch-size", "2",
                         "--device", "cpu", "--json", str(tmp_path / "out.json")])
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [(r["mode"], r["cuda_graph"]) for r in results] == [("warn-only", False), ("strict", False)]
    prints = {s["fingerprint"] for r in results for s in r["samples"]}
    assert all(r["same_twice"] for r in results) and len(prints) == 1  # one text, in every mode
    assert capsys.readouterr().out.count("same") == 2


def test_it_samples_in_the_benchs_teacher_dtype(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, layer_types="*-", head_dim=8, chunk_size=8)
    ckpt = hf.save_pretrained(randomize_(Model(cfg)), tmp_path / "ckpt")
    for dtype in ("float32", "bfloat16"):
        check_sampling.main(["--model", str(ckpt), "--rows", "4", "--length", "16", "--batch-size", "4",
                             "--modes", "warn-only", "--dtype", dtype, "--device", "cpu",
                             "--json", str(tmp_path / f"{dtype}.json")])
        out = json.loads((tmp_path / f"{dtype}.json").read_text())
        assert out["dtype"] == dtype and out["results"][0]["same_twice"]  # the weights it sampled with
