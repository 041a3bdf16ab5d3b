"""benchmarks/bench_speed.py: which anchor it measured. transformers' NemotronH is 13x faster on its kernels
than on its PyTorch fallback, so a run must say which one it ran against."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_kernels_transformers_lacks_are_named_and_hf_kernels_refuses_without_them():
    import importlib.util

    from bench_speed import missing_kernels

    missing = missing_kernels()
    have = {name: importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d")}
    for name, installed in have.items():  # not installed: named (installed, it may still fail to import)
        assert installed or any(m.startswith(name) for m in missing)
    if missing:  # the CPU machine: --hf-kernels refuses in one line, before building any model
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--tiny", "--hf-kernels"],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 1 and "--hf-kernels:" in r.stderr and "HFKBUILD" in r.stderr
        assert "Traceback" not in r.stderr


def test_transformers_fallback_warnings_are_collected():
    from bench_speed import watch_fallbacks

    seen = watch_fallbacks()
    logging.getLogger("transformers.models.nemotron_h").warning(
        "`causal_conv1d_fn` is falling back to its reference PyTorch implementation because `causal_conv1d` is "
        "not installed.")
    logging.getLogger("transformers").warning("something else")
    assert seen == ["causal_conv1d_fn"]


def test_profile_groups_a_steps_time_by_category_and_the_total_is_their_sum():
    import torch

    from bench_speed import profile_steps

    w = torch.randn(64, 64, requires_grad=True)
    opt = torch.optim.AdamW([w])

    def step():
        x = torch.randn(64, 32).t().contiguous()  # a copy, for the copies' operators below
        (torch.relu(x @ w) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()

    p = profile_steps(step, torch.device("cpu"))
    assert p["categories"]["GEMM"] > 0 and p["categories"]["optimizer (AdamW)"] > 0
    assert abs(sum(p["categories"].values()) - p["ms_per_step"]) < 1e-2
    assert p["top"] and all(t["ms_per_step"] >= 0 for t in p["top"])
    # where the step is not operator time: the wall time holds the operators' self times; the copy is traced
    # to the operator that made it, with its shape
    assert p["wall_ms_profiled"] >= p["ms_per_step"] and p["idle_ms"] is None and p["host_top"] == []
    assert any(r["chain"].startswith("aten::copy_") and "[32, 64]" in r["chain"] for r in p["copy_operators"])


def test_compiled_variants_compile_a_copy_layer_by_layer_and_leave_the_eager_model_eager():
    """bench_speed's compiled rows: the whole model compiled, and each decoder layer compiled on a copy, as the
    trainer runs it (train.compile_layers); the eager model itself stays uncompiled (its own row is eager), and
    each variant computes what it does."""
    import torch

    from bench_speed import compiled_variants
    from star_elastic.model import Model
    from test_elastify import PARENTS

    torch.manual_seed(0)
    ours = Model(PARENTS["nemotron_h"]).eval()
    variants = compiled_variants(ours, backend="eager")
    assert set(variants) == {"ours_compiled", "ours_compiled_layers"}
    layered = variants["ours_compiled_layers"]
    assert layered is not ours and all("_compiled_call_impl" in vars(layer) for layer in layered.model.layers)
    assert not any("_compiled_call_impl" in vars(layer) for layer in ours.model.layers)
    x = torch.randint(0, PARENTS["nemotron_h"].vocab_size, (2, 16))
    with torch.no_grad():
        want = ours(x)
        for m in variants.values():
            torch.testing.assert_close(m(x), want)


def test_graphed_mamba_variant_captures_the_mamba_layers_of_a_copy_and_compiles_the_rest():
    """bench_speed --graphed-mamba (issue 16: the Mamba layer's host work): on a copy, the Mamba layers are handed to
    the CUDA-graph capture in one call (one memory pool), each called with the hidden states alone, with a static
    input of the hidden states' shape that requires grad, in training mode (a graphed module called in the other
    mode runs uncaptured); every other layer is compiled as the trainer compiles it; `ours` is left as it was; and
    the variant computes what `ours` does (here with a capture that returns the callables as they are)."""
    import torch

    from bench_speed import graphed_mamba_variant
    from star_elastic.model import Model
    from test_elastify import PARENTS

    torch.manual_seed(0)
    cfg = PARENTS["nemotron_h"]
    ours = Model(cfg).eval()
    calls = []

    def capture(callables, samples):
        calls.append((callables, samples, [c.training for c in callables]))
        return callables

    x = torch.randint(0, cfg.vocab_size, (2, 16))
    kinds = [layer.kind for layer in ours.model.layers]
    assert "M" in kinds and len(set(kinds)) > 1
    for inside in ("compiled", "eager"):
        calls.clear()
        m = graphed_mamba_variant(ours, (2, 16, cfg.hidden_size), torch.float32, backend="eager", graph=capture,
                                  inside=inside)
        assert len(calls) == 1
        callables, samples, modes = calls[0]
        assert len(callables) == kinds.count("M") and all(modes)
        assert all(len(s) == 1 and s[0].shape == (2, 16, cfg.hidden_size) and s[0].requires_grad for s in samples)
        for kind, layer in zip(kinds, m.model.layers):
            if kind == "M":  # the graphed callable in the layer's place, compiled inside or eager as asked
                assert type(layer).__name__ == "GraphedLayer"
                assert ("_compiled_call_impl" in vars(layer.graphed[0].layer)) == (inside == "compiled")
            else:
                assert "_compiled_call_impl" in vars(layer)
        assert list(m.state_dict()) == list(ours.state_dict())  # the checkpoint's names, as a dictionary copy
        assert not any("_compiled_call_impl" in vars(layer) for layer in ours.model.layers)
        assert all(type(layer).__name__ == "Block" for layer in ours.model.layers)
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(x), ours(x))
    with pytest.raises(ValueError, match="inside"):
        graphed_mamba_variant(ours, (2, 16, cfg.hidden_size), torch.float32, backend="eager", graph=capture,
                              inside="fused")


def test_every_training_row_says_the_loss_it_started_from_and_transformers_is_timed_again_last(tmp_path):
    """bench_speed's training rows each record their first step's loss (issue 16: a variant that is fast because it
    computes something else, e.g. a graph replaying stale inputs, must show it): on the tiny config every row starts
    within 1% of the loss measured before training, transformers' and ours' first rows at the same value. And
    transformers trains again after ours, the ratio given against both of its rows."""
    import json

    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--tiny", "--no-compile",
                        "--iters", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    firsts = {k.removeprefix("train_first_loss_"): v for k, v in res.items() if k.startswith("train_first_loss_")}
    assert {"transformers", "ours", "ours_chunked_ce", "transformers_again"} <= set(firsts)
    want = res["loss_whole_logits"]
    assert all(abs(v - want) < 0.01 * want for v in firsts.values()), (firsts, want)
    assert abs(firsts["ours"] - firsts["transformers"]) < 1e-3 * want
    norms = {k.removeprefix("train_first_grad_norm_"): v for k, v in res.items() if k.startswith("train_first_grad_norm_")}
    assert set(norms) == set(firsts) and all(v > 0 for v in norms.values())
    assert norms["ours"] == pytest.approx(norms["transformers"], rel=1e-3)  # same weights, same loss: same gradient
    assert all(v == pytest.approx(norms["transformers"], rel=0.05) for v in norms.values())
    assert all(f"first loss {v:.4f}" in r.stdout for v in firsts.values())
    # transformers timed again after ours, the ratio against both (the host's speed drifts between rows)
    best = max(v for k, v in res.items() if k.startswith("train_tok_s_ours"))
    assert res["ratio_train"] == pytest.approx(best / res["train_tok_s_transformers"])
    assert res["ratio_train_against_the_later_transformers"] == pytest.approx(best / res["train_tok_s_transformers_again"])


def test_train_rows_trains_only_the_rows_named_and_names_an_unknown_one(tmp_path):
    """--train-rows (a shorter device call): only those rows train, the ratios from them; a row the run does not
    have is refused in one line that lists the run's rows."""
    import json

    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--tiny", "--no-compile", "--iters", "1"]
    r = subprocess.run(cmd + ["--train-rows", "transformers,ours_chunked_ce,transformers_again", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    trained = {k.removeprefix("train_tok_s_") for k in res if k.startswith("train_tok_s_")}
    assert trained == {"transformers", "ours_chunked_ce", "transformers_again"}
    assert res["ratio_train"] == pytest.approx(res["train_tok_s_ours_chunked_ce"] / res["train_tok_s_transformers"])
    r = subprocess.run(cmd + ["--train-rows", "ours,ours_graphed"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "no row ours_graphed in this run" in r.stderr and "transformers_again" in r.stderr
    assert "Traceback" not in r.stderr
