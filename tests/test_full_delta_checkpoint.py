"""An elastic checkpoint with the full budget's own delta (`elastify --full-delta-rank`, elastic/delta.py).

The weights hold the full budget merged (W + B A), so transformers loads the full model; A and B sit in
full_delta.safetensors; every smaller budget is a prefix of W = weights - B A, in every path that makes a
budget: loading (views, evaluation, validation) and the streaming slicer."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from star_elastic import cli, load
from star_elastic.elastic.delta import FullDelta
from star_elastic.elastic.checkpoint import DELTA_FILE, budget_spec, load_elastic, read_manifest, save_elastic
from star_elastic.elastic.masking import masked
from star_elastic.elastic.slicing import slice_model
from star_elastic.elastic.stream import stream_slice
from star_elastic.elastify import ElastifyConfig, elastify
from star_elastic.errors import StarElasticError
from star_elastic.evaluate import budget_models
from star_elastic.model import Model
from star_elastic.serve.engine import ElasticEngine
from star_elastic.train import ElasticTrainer
from star_elastic.validate import validate_checkpoint

from test_elastify import PARENTS, WORDS, text, tokenizer  # noqa: F401 (fixtures)
from test_full_delta import SMALLER_ONLY
from test_train import make


def write_word_text(path):
    """80 documents of 40 words in runs of WORDS' order from seeded starts: text a tiny parent learns from."""
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[(int(torch.randint(0, 60, (1,), generator=g)) + j) % 60] for j in range(40))
            for _ in range(80)]
    path.write_text("\n\n".join(docs))


def _logits(model, x):
    with torch.no_grad():
        return model(x).float()


def _close(a, b, tol=1e-4):
    return float((a - b).norm() / b.norm()) < tol


@pytest.fixture(scope="module", params=list(PARENTS))
def written(request, tmp_path_factory):
    """A tiny parent elastified with a delta of rank 4 (budgets 1.0 / 0.5)."""
    from conftest import word_tokenizer

    tmp = tmp_path_factory.mktemp(f"delta_{request.param}")
    write_word_text(tmp / "text.txt")
    torch.manual_seed(0)
    cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32 * 6, seq_len=32, batch_size=16, calib_batches=2,
                         eval_tokens=256, lr=1e-3, full_delta_rank=4)
    out = tmp / "ckpt"
    result = elastify(Model(PARENTS[request.param]), word_tokenizer(tmp, WORDS), str(tmp / "text.txt"), out, cfg,
                      log=lambda *_: None)
    return out, result


def test_the_weights_are_the_full_budget_merged_and_transformers_runs_it(written):
    out, result = written
    manifest = read_manifest(out)
    assert manifest["full_delta"]["rank"] == 4 and manifest["full_delta"]["file"] == DELTA_FILE
    assert DELTA_FILE in manifest["files"] and DELTA_FILE in manifest["sizes"]  # checksummed like the weights
    ckpt = load_elastic(out, verify=True)
    assert ckpt.delta is not None and ckpt.delta.rank == 4
    x = torch.randint(0, 63, (2, 12))
    full = _logits(ckpt.full_model(), x)
    assert not _close(_logits(ckpt.model, x), full, 1e-3)  # the delta learnt: W alone is another model
    ref = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # the stock loader sees W + B A
    with torch.no_grad():
        assert _close(ref(x).logits.float(), full)
    # the full budget's perplexity elastify reported is the merged model's
    assert result["trained"]["1.0"] > 0


def check_every_path(out, tmp_path):
    """Budget 0.5 of checkpoint `out` is the same model masked on the loaded shared weights, sliced from them,
    streamed from disk, in evaluation and in a server; so is the full budget (the loaded model merged).
    Returns (loaded checkpoint, input, the 0.5's logits, the server)."""
    manifest = read_manifest(out)
    ckpt = load_elastic(out)
    spec = budget_spec(manifest, "0.5")
    x = torch.randint(0, 63, (2, 12))
    want = _logits(slice_model(ckpt.model, spec), x)
    with torch.no_grad(), masked(ckpt.model, spec.masks(ckpt.model.config)):
        assert _close(ckpt.model(x).float(), want, 1e-5)  # masks on W: the training's view of the budget
    stream_slice(out, spec, tmp_path / "half", progress=False)  # from disk
    assert _close(_logits(load(tmp_path / "half"), x), want)
    stream_slice(out, budget_spec(manifest, "1.0"), tmp_path / "full", progress=False)
    assert _close(_logits(load(tmp_path / "full"), x), _logits(ckpt.full_model(), x))
    models = budget_models(ckpt, ["1.0", "0.5"])  # evaluation's models, from one loaded copy
    assert models["1.0"] is ckpt.full_model() and _close(_logits(models["0.5"], x), want)
    engine = ElasticEngine.load(out)  # a server's views, from one loaded copy
    assert _close(_logits(engine.view("1.0"), x), _logits(ckpt.full_model(), x))
    assert _close(_logits(engine.view("0.5"), x), want)
    assert validate_checkpoint(out, progress=False).ok
    return ckpt, x, want, engine


def test_every_smaller_budget_is_a_prefix_of_the_shared_weights_in_every_path(written, tmp_path):
    out, _ = written
    ckpt, x, want, engine = check_every_path(out, tmp_path)
    # streamed, the stored W + B A minus the kept rows of B times the kept columns of A: without that
    # subtraction the slice is another model (what the test guards against)
    merged_slice = slice_model(load(out), budget_spec(read_manifest(out), "0.5"))
    assert not _close(_logits(merged_slice, x), want, 1e-3)
    with pytest.raises(StarElasticError, match="runs its delta"):  # a copy of the server's parent would merge twice
        engine.ckpt.full_model()
    from star_elastic.lm_eval_adapter import BudgetScorer  # lm-eval's scorer of one budget
    assert _close(_logits(BudgetScorer.from_checkpoint(str(out), budget="1.0").model, x), _logits(ckpt.full_model(), x))
    assert _close(_logits(BudgetScorer.from_checkpoint(str(out), budget="0.5").model, x), want)


def test_a_delta_given_out_by_layer_is_written_read_and_run_at_its_own_ranks(tmp_path):
    """`elastify --full-delta-allocate`: the restore gives rank 4's parameters out layer by layer; the manifest
    names each layer's rank, the delta reads back at those ranks, transformers runs the merged full budget, and
    every path that makes a budget gives the 0.5 and the full model as with a uniform rank."""
    from conftest import word_tokenizer

    write_word_text(tmp_path / "text.txt")
    torch.manual_seed(0)
    cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32 * 6, seq_len=32, batch_size=16, calib_batches=2,
                         eval_tokens=256, lr=1e-3, full_delta_rank=4, full_delta_restore="weights",
                         full_delta_allocate=True)
    out = tmp_path / "ckpt"
    elastify(Model(PARENTS["nemotron_h"]), word_tokenizer(tmp_path, WORDS), str(tmp_path / "text.txt"), out, cfg,
             log=lambda *_: None)
    manifest = read_manifest(out)
    ranks = manifest["full_delta"]["ranks"]
    assert manifest["full_delta"]["rank"] == 4 and len(set(ranks.values())) > 1
    ckpt = load_elastic(out)
    assert ckpt.delta.rank == 4 and ckpt.delta.ranks() == ranks
    x = torch.randint(0, 63, (2, 12))
    ref = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert _close(ref(x).logits.float(), _logits(ckpt.full_model(), x))
    check_every_path(out, tmp_path)


@pytest.mark.parametrize("bits", [2, 4])
def test_a_delta_with_its_rest_rounded_is_written_read_and_run(tmp_path, bits):
    """`elastify --full-delta-bits`: the restore rounds each linear layer's drift past rank 2 to `bits` a weight;
    the delta file holds the codes packed, the manifest says so, the delta reads back the same, transformers runs
    the merged full budget, and every path that makes a budget (masks, slices, streaming, evaluation, a server)
    gives the 0.5 and the full model as with the rank alone."""
    from conftest import word_tokenizer

    write_word_text(tmp_path / "text.txt")
    torch.manual_seed(0)
    common = dict(budgets=["1.0", "0.5"], tokens=16 * 32 * 6, seq_len=32, batch_size=16, calib_batches=2,
                  eval_tokens=256, lr=3e-3, full_anchor=1.0, full_delta_rank=2, full_delta_restore="activations")
    outs, results, logs = {}, {}, {0: [], bits: []}
    for b in (0, bits):
        torch.manual_seed(0)
        outs[b] = tmp_path / f"ckpt{b}"
        results[b] = elastify(Model(PARENTS["nemotron_h"]), word_tokenizer(tmp_path, WORDS), str(tmp_path / "text.txt"),
                              outs[b], ElastifyConfig(**common, full_delta_bits=b), log=logs[b].append)
    # the same training (the bits change only the restore): the rounded rest covers more of the same drift
    restored = {b: results[b]["training"]["full_delta_restored"] for b in (0, bits)}
    assert restored[bits] > restored[0]
    # and the log says what the rank alone covered beside it (the rank's own figure, said once without bits)
    assert any(f"rank 2 and the rest rounded to {bits} bits a weight covers {restored[bits]:.1%}" in line
               for line in logs[bits])
    assert any(f"at rank 2 alone: {restored[0]:.1%}" in line for line in logs[bits])
    assert not any("alone" in line for line in logs[0] if "the same restore" in line)
    manifest = read_manifest(outs[bits])
    entry = manifest["full_delta"]
    assert entry["bits"] == bits and entry["rounded_layers"] == len(load_elastic(outs[0]).delta.names)
    from safetensors.torch import load_file
    stored = load_file(str(outs[bits] / DELTA_FILE))  # the codes packed: bits / 8 bytes a weight, and the scales
    assert entry["rounded_bytes"] == sum(t.numel() * t.element_size() for k, t in stored.items()
                                         if k.endswith((".delta_rest", ".delta_rest_scale")))
    assert all(t.dtype == torch.uint8 for k, t in stored.items() if k.endswith(".delta_rest"))
    ckpt = load_elastic(outs[bits])
    assert ckpt.delta.bits == bits
    for name in ckpt.delta.names:
        codes = getattr(ckpt.delta.rounded_codes, name.replace(".", "/"))
        assert int(codes.max()) < 2 ** bits and codes.shape == ckpt.delta.weight_of(ckpt.model, name).shape
    x = torch.randint(0, 63, (2, 12))
    ref = AutoModelForCausalLM.from_pretrained(str(outs[bits])).eval()
    with torch.no_grad():
        assert _close(ref(x).logits.float(), _logits(ckpt.full_model(), x))
    # the smaller budgets never see the rest: the 0.5 is the same model with or without it
    half0 = slice_model(load_elastic(outs[0]).model, budget_spec(read_manifest(outs[0]), "0.5"))
    _, x, want, engine = check_every_path(outs[bits], tmp_path)
    assert _close(_logits(half0, x), want, 1e-5)
    # a server runs each layer with a rest on its own W + B A + R, merged once: no dense R held beside it, and
    # the layer's weight is the exported full model's
    from star_elastic.elastic.delta import _MergedLinear

    delta, parent = engine.ckpt.delta, engine.parent
    assert all(isinstance(parent.get_submodule(n), _MergedLinear) for n in delta.names) and not delta._dense_rests
    exported = dict(load(tmp_path / "full").named_parameters())
    for n in delta.names:
        torch.testing.assert_close(parent.get_submodule(n).own_weight, exported[n + ".weight"], rtol=0, atol=1e-6)
    with pytest.raises(StarElasticError, match="runs its delta"):  # merged, it still counts as running it
        engine.ckpt.full_model()


def test_save_and_load_give_back_the_trained_shared_weights_and_delta(tmp_path):
    model, teacher, router, budgets, rows, cfg, _ = make(**{**SMALLER_ONLY, "full_anchor": 1.0, "full_delta_rank": 3})
    t = ElasticTrainer(model, teacher, router, budgets, rows, cfg, tmp_path / "t")
    t.run(progress=False)
    save_elastic(t.model, t.router, budgets, tmp_path / "ckpt", delta=t.delta)
    for name, p in t.model.named_parameters():  # writing merged left the trained model as it was
        assert p.requires_grad
    ckpt = load_elastic(tmp_path / "ckpt")
    for (name, a), b in zip(t.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=1e-6, msg=name)
    x = torch.randint(0, t.model.config.vocab_size, (2, 10))
    with torch.no_grad(), t.delta.applied(t.model):
        want = t.model(x)
    torch.testing.assert_close(_logits(ckpt.full_model(), x), want, rtol=1e-5, atol=1e-5)


def test_a_delta_file_that_does_not_fit_and_unsupported_uses_are_one_line_errors(written, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from star_elastic.convert import convert

    out, _ = written
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(str(bad / DELTA_FILE))
    key = next(k for k in tensors if k.endswith(".delta_up"))
    tensors[key] = tensors[key][:-1]  # one row short
    save_file(tensors, str(bad / DELTA_FILE))
    with pytest.raises(StarElasticError, match="truncated or replaced"):  # the manifest's size check first
        load_elastic(bad)
    model = load(out)  # a file of the right kind whose shapes do not fit
    with pytest.raises(StarElasticError, match="delta is"):
        FullDelta.read(model, bad / DELTA_FILE)
    tensors.pop(key)
    save_file(tensors, str(bad / DELTA_FILE))
    with pytest.raises(StarElasticError, match="do not match the model's linear layers"):
        FullDelta.read(model, bad / DELTA_FILE)
    (bad / DELTA_FILE).write_bytes(b"not safetensors")
    with pytest.raises(StarElasticError, match="full_delta.safetensors"):
        FullDelta.read(model, bad / DELTA_FILE)
    with pytest.raises(StarElasticError, match="FP8 copies"):
        convert(out, tmp_path / "fp8", "fp8", log=lambda *_: None)
    assert not (tmp_path / "fp8").exists()
    with pytest.raises(StarElasticError, match="FP8 matmuls with a full budget's delta"):
        ElasticEngine.load(out, fp8_matmul=True)


def test_cli_full_delta_rank_reaches_the_checkpoint_and_needs_the_anchor(tmp_path, tokenizer, text, capsys):  # noqa: F811
    from star_elastic import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    common = ["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text), "--seq-len", "32",
              "--batch-size", "8", "--calib-batches", "1", "--eval-tokens", "128", "--device", "cpu",
              "--tokens", str(8 * 32 * 2)]
    assert cli.main(common + ["--out", str(tmp_path / "ckpt"), "--full-delta-rank", "2", "--full-delta-bits", "4"]) == 0
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["full_delta"]["rank"] == 2 and manifest["training"]["config"]["full_delta_rank"] == 2
    assert manifest["full_delta"]["bits"] == 4 and manifest["training"]["config"]["full_delta_bits"] == 4
    assert "the rest rounded to 4 bits a weight" in capsys.readouterr().out
    for extra, message in ((["--full-anchor", "0"], "needs --full-anchor > 0"),
                           (["--full-delta-rank", "-1"], "give a positive rank"),
                           (["--full-delta-restore", "none", "--full-delta-bits", "2"], "there is no restore")):
        args = common + ["--out", str(tmp_path / "o2"), "--full-delta-rank", "2"] + extra
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "o2").exists()


def test_the_delta_covers_a_moes_routed_experts_expert_by_expert(written):
    """A hybrid's routed experts are stacked (E, out, in) tensors, not linear layers: the delta holds an A and
    B per expert for each (the manifest counts them), the restore gives the experts that the smaller budget
    trained a correction of their own, and the full budget's experts are the stored ones (W + B A)."""
    from safetensors.torch import load_file

    out, result = written
    manifest = read_manifest(out)
    ckpt = load_elastic(out, verify=True)
    moe = [n for n, m in ckpt.model.named_modules() if type(m).__name__ == "Experts"]
    assert manifest["full_delta"]["expert_tensors"] == 2 * len(moe) == len(ckpt.delta.experts)
    stored = load_file(str(out / DELTA_FILE))
    for name in ckpt.delta.experts:
        w = ckpt.model.get_parameter(name)
        down, up = stored[f"{name}.delta_down"], stored[f"{name}.delta_up"]
        assert down.shape == (w.shape[0], 4, w.shape[2]) and up.shape == (w.shape[0], w.shape[1], 4)
    if moe:  # the smaller budget trained some experts: the full budget's differ from the shared ones there
        assert any(float(ckpt.delta.delta(name).abs().max()) > 0 for name in ckpt.delta.experts)
        full = ckpt.full_model()
        for name in ckpt.delta.experts:
            torch.testing.assert_close(full.get_parameter(name).float(), ckpt.model.get_parameter(name).float()
                                       + ckpt.delta.delta(name), rtol=1e-5, atol=1e-6)


def test_cli_hold_keeps_the_norms_at_the_parents_and_refuses_what_it_cannot_hold(tmp_path, tokenizer, text, capsys):  # noqa: F811
    """elastify --hold norms (with --full-delta-rank): the checkpoint's norms are the parent's (ones here, so the
    importance sort's permutation cannot hide a change), the rest trained; a part it cannot hold, or a pull on a
    frozen part, is a one-line error before anything is written."""
    from safetensors.torch import load_file

    from star_elastic import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    common = ["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text), "--seq-len", "32",
              "--batch-size", "8", "--calib-batches", "1", "--eval-tokens", "128", "--device", "cpu",
              "--tokens", str(8 * 32 * 2), "--full-delta-rank", "2"]
    assert cli.main(common + ["--out", str(tmp_path / "ckpt"), "--hold", "norms"]) == 0
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["training"]["config"]["hold"] == ["norms"]
    parent, got = load_file(str(tmp_path / "parent" / "model.safetensors")), load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    norms = [k for k in got if "norm" in k]
    assert norms and all(torch.equal(got[k], torch.ones_like(got[k])) for k in norms)
    assert all(torch.equal(parent[k], torch.ones_like(parent[k])) for k in norms)
    ckpt = load_elastic(tmp_path / "ckpt")  # the shared weights (the delta taken off) moved from the parent's
    assert not torch.equal(ckpt.model.embed.weight.sort(dim=1).values,
                           parent["model.embed_tokens.weight"].sort(dim=1).values)
    capsys.readouterr()
    for extra, message in ((["--hold", "heads"], "'heads' is not one of embeddings, norms"),
                           (["--hold", "norms", "--hold-pull", "10"], "a pull needs a rate > 0")):
        assert cli.main(common + ["--out", str(tmp_path / "o2")] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "o2").exists()
