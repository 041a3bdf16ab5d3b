"""benchmarks/bench_delta_forms.py: the forms of the full budget's delta, each against the drift it was cut from
(the rounding itself, rounding.round_rest, is tested in test_full_delta.py)."""

import sys
from pathlib import Path

import torch

from conftest import ELASTIC_WORDS, randomize_, word_tokenizer
from star_elastic import hf
from star_elastic.elastify import ElastifyConfig, elastify
from star_elastic.model import Model, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_delta_forms as bench  # noqa: E402


def test_sizes_count_packed_bits_scales_and_factors():
    assert bench.bits_bytes((576, 1536), 2) == 576 * 1536 / 4 + 2 * 576 * 1536 / 64
    assert bench.rank_bytes((576, 1536), 64) == 2 * 64 * (576 + 1536)
    assert bench.bits_bytes((32, 48), 1) == 32 * 48 / 8 + 2 * 32 * 48 / 16  # groups of gcd(48, 64) = 16


def test_the_benchmark_scores_every_form_against_the_sorted_parent(tmp_path):
    cfg = ModelConfig(vocab_size=63, hidden_size=32, layer_types="*-*-", num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=64, bos_token_id=1, eos_token_id=2)
    tokenizer = word_tokenizer(tmp_path)
    torch.manual_seed(0)
    hf.save_pretrained(randomize_(Model(cfg)), tmp_path / "parent", tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(ELASTIC_WORDS[(int(torch.randint(0, 60, (1,), generator=g)) + j) % 60]
                                         for j in range(40)) for _ in range(60)))
    elastify(hf.load(tmp_path / "parent"), tokenizer, str(text), tmp_path / "ckpt",
             ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32 * 4, seq_len=32, batch_size=16, calib_batches=2,
                            eval_tokens=128, lr=1e-2, full_anchor=1.0, full_delta_rank=4, full_delta_restore="activations",
                            hold=["embeddings", "norms"], hold_rate=1.0, full_keeps_held="training", chat_drift=False),
             log=lambda *_: None)
    out = bench.main([str(tmp_path / "ckpt"), "--parent", str(tmp_path / "parent"), "--calib", str(text),
                      "--calib-rows", "8", "--seq-len", "32", "--sources", str(text), "--eval-tokens", "256",
                      "--no-chat", "--json", str(tmp_path / "forms.json")])
    assert (tmp_path / "forms.json").is_file() and out["rank"] == 4
    rows = out["rows"]
    assert set(rows) >= {"no delta", "checkpoint's full", "rank 4", "rank 8", "4-bit", "1-bit",
                         "rank 2 + 1-bit rest"}
    covered = {k: r["covered"] for k, r in rows.items() if "covered" in r}
    assert covered.pop("no delta") == 0 and all(0 < v <= 1 for v in covered.values())
    assert covered["rank 8"] > covered["rank 4"] and covered["4-bit"] > covered["2-bit"]
    assert covered["rank 2 + 1-bit rest"] > covered["1-bit"]  # the rest adds to what the bits alone cover
    assert rows["4-bit"]["bytes"] > rows["2-bit"]["bytes"] > rows["1-bit"]["bytes"]
    # the full budget keeps its own embeddings and norms, so its drift is the linear layers' alone: the shared
    # weights carry a real one (four steps at 1e-2), and what a form covers of it is what it takes back
    alone = abs(rows["no delta"]["drift"][str(text)])
    assert alone > 0.01
    assert abs(rows["4-bit"]["drift"][str(text)]) < alone / 10
    # the shares under the damped covariance too (the restore's own measure): the bench's rank 4 is the best rank-4
    # delta under it, so it covers no less than the checkpoint's own rank-4 delta, restored from other inputs
    ckpt_row = rows["checkpoint's full"]
    assert 0 < ckpt_row["covered"] <= 1 and 0 < ckpt_row["covered_damped"] <= 1
    assert rows["rank 4"]["covered_damped"] >= ckpt_row["covered_damped"] - 1e-9
    assert all(r["covered_damped"] != r["covered"] for k, r in rows.items() if k != "no delta" and "covered" in r)
    # --no-scores: the same shares, no scoring
    quick = bench.main([str(tmp_path / "ckpt"), "--parent", str(tmp_path / "parent"), "--calib", str(text),
                        "--calib-rows", "8", "--seq-len", "32", "--no-scores"])
    assert all(not r["scores"] for r in quick["rows"].values())
    assert all(abs(quick["rows"][k]["covered"] - r["covered"]) < 1e-9 for k, r in rows.items() if "covered" in r)
