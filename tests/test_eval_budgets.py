"""`star-elastic eval CKPT`: every budget of an elastic checkpoint, against computations made here."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import entries, one_line_error
from star_elastic import cli, commands
from star_elastic.elastic.checkpoint import load_elastic, read_manifest
from star_elastic.elastic.slicing import slice_model
from star_elastic.evaluate import compare_models
from star_elastic.runtime import eval_tokens

SEQ = 32


@pytest.fixture(scope="module")
def evaluated(elastic_ckpt, tmp_path_factory):
    path, text = elastic_ckpt
    out = tmp_path_factory.mktemp("eval")
    assert cli.main(["eval", str(path), "--data", str(text), "--seq-len", str(SEQ), "--json", str(out / "r.json"),
                     "--plot", str(out / "plot.png"), "--device", "cpu"]) == 0
    return json.loads((out / "r.json").read_text()), out


def test_every_budget_is_reported_with_manifest_costs(evaluated, elastic_ckpt):
    result, out = evaluated
    manifest = read_manifest(elastic_ckpt[0])
    assert list(result["budgets"]) == [b["name"] for b in manifest["budgets"]]
    for b in manifest["budgets"]:
        r = result["budgets"][b["name"]]
        for key in ("params", "active_params", "memory_bytes"):
            assert r[key] == b[key]
        assert r["tokens_per_s"] > 0 and r["tokens"] == result["tokens"] > 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert entries(out) == ["plot.png", "r.json"]  # no temporary files left behind


def test_quality_numbers_equal_a_direct_computation(evaluated, elastic_ckpt):
    result, _ = evaluated
    path, text = elastic_ckpt
    ckpt = load_elastic(path)
    stream = eval_tokens(ckpt.tokenizer, str(text), "heldout")
    n = stream.numel() // SEQ
    ids = stream[: n * SEQ].view(n, SEQ)  # the full windows; the short tail window is scored too
    tail = stream[n * SEQ:][None]
    with torch.no_grad():
        for name in ("1.0", "0.5"):
            small = slice_model(ckpt.model, ckpt.spec(name))
            nll = kl = agree = count = 0.0
            for x in ([ids, tail] if tail.numel() > 1 else [ids]):
                ref = F.log_softmax(ckpt.model(x)[:, :-1].double(), -1)
                logp = F.log_softmax(small(x)[:, :-1].double(), -1)
                nll += -logp.gather(-1, x[:, 1:, None]).sum().item()
                kl += (ref.exp() * (ref - logp)).sum().item()
                agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
                count += x[:, 1:].numel()
            r = result["budgets"][name]
            assert r["tokens"] == count
            assert r["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)
            assert r["kl_from_full"] == pytest.approx(kl / count, rel=1e-3, abs=1e-6)
            assert r["top1_agreement"] == pytest.approx(agree / count)
    assert result["budgets"]["1.0"]["top1_agreement"] == 1.0 and result["budgets"]["1.0"]["kl_from_full"] < 1e-6
    assert result["budgets"]["0.5"]["kl_from_full"] > 0


def test_compare_dir_is_a_separate_point_equal_to_its_budget(elastic_ckpt, tmp_path, capsys):
    path, text = elastic_ckpt
    half = tmp_path / "half-slice"
    assert cli.main(["slice", str(path), "--budget", "0.5", "--out", str(half), "--device", "cpu"]) == 0
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(path), "--data", str(text), "--seq-len", str(SEQ), "--budgets", "0.5",
                     "--compare", str(half), "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    r = json.loads(out.read_text())
    assert list(r["budgets"]) == ["0.5"] and list(r["compare"]) == ["half-slice"]
    # the exported slice is the budget's own weights: same numbers, same parameter count
    for key in ("perplexity", "top1_agreement", "params", "active_params"):
        assert r["compare"]["half-slice"][key] == pytest.approx(r["budgets"]["0.5"][key], rel=1e-5)
    assert "half-slice" in capsys.readouterr().out


def test_compare_models_of_identical_and_shuffled_logits():
    class Fixed(torch.nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = torch.nn.Parameter(table)

        def forward(self, ids):
            return self.table[ids]

    torch.manual_seed(0)
    table = torch.randn(10, 10)
    ref, same, other = Fixed(table), Fixed(table.clone()), Fixed(torch.randn(10, 10))
    stream = torch.randint(0, 10, (50,))
    r = compare_models(ref, {"ref": ref, "same": same, "other": other}, stream, seq_len=8, progress=False)
    assert r["same"]["top1_agreement"] == 1.0 and r["same"]["kl_from_full"] == pytest.approx(0, abs=1e-6)
    assert r["same"]["perplexity"] == pytest.approx(r["ref"]["perplexity"])
    assert r["other"]["kl_from_full"] > 0.01 and r["other"]["top1_agreement"] < 1


@pytest.mark.parametrize("argv, words", [
    (["--budgets", "0.3"], ["0.3", "outside the trained", "0.5, 0.75, 1.0"]),  # budgets between are interpolated
    (["--budgets", "big"], ["big"]),
    (["--plot", "{tmp}/plot.txt"], ["--plot", ".png"]),
])
def test_bad_arguments_are_one_line_and_write_nothing(elastic_ckpt, tmp_path, capsys, argv, words):
    path, text = elastic_ckpt
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(["eval", str(path), "--data", str(text), "--json", str(tmp_path / "r.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err
    assert entries(tmp_path) == []


def test_budget_flags_need_an_elastic_checkpoint(elastic_ckpt, tmp_path):
    from star_elastic import load, save_pretrained

    path, text = elastic_ckpt
    save_pretrained(load(path), tmp_path / "plain", tokenizer=load_elastic(path).tokenizer)
    one_line_error(lambda: commands.cmd_eval(cli.build_parser().parse_args(
        ["eval", str(tmp_path / "plain"), "--data", str(text), "--budgets", "0.5"])), "--budgets", "elastic checkpoint")
