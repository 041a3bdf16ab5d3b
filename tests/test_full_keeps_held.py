"""The full budget keeps the parent's embeddings and norms as its own (`elastify --full-keeps-held`, delta.py).

Trained with them held at a rate, the smaller budgets read the trained values and the full budget the
parent's: in the checkpoint the main tensors hold the full budget's (what transformers loads), and
full_delta.safetensors the smaller budgets' (`<parameter>.shared`). Every path that makes a budget must pick
the right ones: loading (views, evaluation, validation), the streaming slicer and a server."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from star_elastic import cli
from star_elastic.elastic.checkpoint import DELTA_FILE, load_elastic, read_manifest
from star_elastic.elastic.delta import SHARED, FullDelta, held_values, save_delta
from star_elastic.elastify import ElastifyConfig, elastify
from star_elastic.errors import StarElasticError
from star_elastic.model import Model

from test_elastify import PARENTS, WORDS, text, tokenizer  # noqa: F401 (fixtures)
from test_full_delta_checkpoint import check_every_path, write_word_text


def _logits(model, x):
    with torch.no_grad():
        return model(x).float()


def _close(a, b, tol=1e-4):
    return float((a - b).norm() / b.norm()) < tol


def _by_row(t, name=""):
    """A tensor's values sorted within each row: the importance sort permutes hidden channels, not rows; a
    mixer's own (Mamba's per-head values and conv channels, a gate's experts) whole, its rows permuted too."""
    return t.float().flatten().sort().values if ".mixer." in name else t.float().sort(dim=-1).values


HELD = ["embeddings", "norms", "mamba", "gates"]  # every part the full budget can keep (Llama: the first two)


@pytest.fixture(scope="module", params=[(p, when) for p in PARENTS for when in ("after", "training")],
                ids=lambda p: "-".join(p))
def written(request, tmp_path_factory):
    """A tiny parent elastified with a delta of rank 4, its embeddings and norms held at the full rate and
    pulled back, the full budget keeping the parent's (budgets 1.0 / 0.5), put back after training or kept
    from its first step. Also the parent's held values."""
    from conftest import word_tokenizer

    family, when = request.param
    tmp = tmp_path_factory.mktemp(f"keeps_{family}_{when}")
    write_word_text(tmp / "text.txt")
    torch.manual_seed(0)
    parent = Model(PARENTS[family])
    with torch.no_grad():  # norms away from ones, so that "the parent's" is not just "untouched"
        for p in held_values(parent, ["norms"]).keys():
            parent.get_parameter(p).mul_(1 + 0.1 * torch.rand_like(parent.get_parameter(p)))
    before = {k: v.clone() for k, v in held_values(parent, HELD).items()}
    cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32 * 6, seq_len=32, batch_size=16, calib_batches=2,
                         eval_tokens=256, lr=1e-3, full_delta_rank=4, hold=HELD, hold_rate=1.0,
                         hold_pull=10.0, full_keeps_held=when)
    out = tmp / "ckpt"
    result = elastify(parent, word_tokenizer(tmp, WORDS), str(tmp / "text.txt"), out, cfg, log=lambda *_: None)
    return out, result, before


def test_the_weights_hold_the_parents_embeddings_and_norms_and_transformers_runs_the_full_model(written):
    out, result, before = written
    own = read_manifest(out)["full_delta"]["own"]
    assert set(own) == set(before)  # every held tensor (NemotronH: its LM head too; Llama's is tied)
    shared = {k.removesuffix(SHARED): v for k, v in load_file(str(out / DELTA_FILE)).items() if k.endswith(SHARED)}
    assert set(shared) == set(own)
    ckpt = load_elastic(out, verify=True)
    full = ckpt.full_model()
    params = dict(full.named_parameters())
    for name in own:  # the full budget's: the parent's, channels sorted; the smaller budgets': trained away
        assert torch.equal(_by_row(params[name], name), _by_row(before[name], name)), name
        assert torch.equal(dict(ckpt.model.named_parameters())[name], shared[name].float()), name
    assert any(not torch.equal(_by_row(shared[n], n), _by_row(before[n], n)) for n in own)
    if any(".mixer." in n for n in own):  # a hybrid: Mamba's own and the gates kept too, and trained away
        assert {n.rpartition(".")[2] for n in own if ".mixer." in n} >= {"A_log", "D", "dt_bias", "weight"}
        assert any(not torch.equal(_by_row(shared[n], n), _by_row(before[n], n)) for n in own if ".mixer." in n)
    x = torch.randint(0, 63, (2, 12))
    ref = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # the stock loader sees the full budget
    with torch.no_grad():
        assert _close(ref(x).logits.float(), _logits(full, x))
    # elastify's full-budget figures are this model's: evaluated with the delta and the parent's values applied
    with torch.no_grad(), ckpt.delta.applied(ckpt.model):
        assert _close(ckpt.model(x).float(), _logits(full, x))
    assert result["trained"]["1.0"] > 0


def test_every_smaller_budget_reads_the_trained_values_in_every_path(written, tmp_path):
    """Masked, sliced, streamed from disk (the .shared values, cut), evaluated and served from one copy (the
    full budget running its own values by class swap): the same models."""
    out, _, _ = written
    check_every_path(out, tmp_path)


def test_keep_is_applied_and_merged_alike_and_bad_input_is_one_line(tmp_path):
    torch.manual_seed(0)
    model = Model(PARENTS["nemotron_h"])
    parent = held_values(model, HELD)
    assert any(n.endswith("A_log") for n in parent) and any("gate" in n for n in parent)
    delta = FullDelta(model, 2)
    with torch.no_grad():
        for p in held_values(model, HELD):
            model.get_parameter(p).add_(0.05 * torch.randn_like(model.get_parameter(p)))
        for p in delta.up.values():
            p.normal_(0, 0.05)
    x = torch.randint(0, 63, (2, 9))
    with torch.no_grad(), delta.applied(model):
        without = model(x)
    delta.keep(model, parent)
    with torch.no_grad(), delta.applied(model):
        assert delta.is_applied(model)
        ran = model(x)
    import copy
    merged = _logits(delta.merge_into(copy.deepcopy(model)), x)
    assert _close(ran, merged, 1e-5) and not _close(ran, without, 1e-3)
    with pytest.raises(ValueError, match="pass it"):
        save_delta(delta, tmp_path / "d.safetensors")
    with pytest.raises(StarElasticError, match="not one of the model's parameters"):
        FullDelta(model, 2).keep(model, {"model.embeddings.weight": torch.zeros(3, 3)})
    save_delta(delta, tmp_path / "d.safetensors", model=model)
    other = Model(PARENTS["llama"])
    with pytest.raises(StarElasticError, match="not one of the model's parameters|do not match"):
        FullDelta.read(other, tmp_path / "d.safetensors")


def test_cli_full_keeps_held_needs_the_delta_and_a_hold_that_trains(tmp_path, tokenizer, text, capsys):  # noqa: F811
    from star_elastic import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    common = ["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text), "--seq-len", "32",
              "--batch-size", "8", "--calib-batches", "1", "--eval-tokens", "128", "--device", "cpu",
              "--tokens", str(8 * 32 * 2), "--full-keeps-held"]
    for extra in ([], ["--full-delta-rank", "2", "--hold", "norms"], ["--hold", "norms", "--hold-rate", "1"]):
        assert cli.main(common + ["--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert "--full-keeps-held" in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()
    assert cli.main(common + ["--out", str(tmp_path / "ok"), "--full-delta-rank", "2", "--hold", "norms",
                              "--hold-rate", "1"]) == 0
    assert read_manifest(tmp_path / "ok")["full_delta"]["own"]
    assert "keeps the parent's norms" in capsys.readouterr().out
    assert cli.main(common + ["training", "--out", str(tmp_path / "kept"), "--full-delta-rank", "2", "--hold",
                              "norms", "--hold-rate", "1"]) == 0
    assert read_manifest(tmp_path / "kept")["full_delta"]["own"]
    assert "kept the parent's norms as its own throughout training" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(common + ["always", "--out", str(tmp_path / "bad")])
    assert "invalid choice: 'always'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
