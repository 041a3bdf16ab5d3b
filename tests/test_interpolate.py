"""Budgets between two trained ones (issue 13 item 5): the router's architecture for the blended
input, nested between its trained neighbours, in its band; refused outside the trained range."""

import pytest
import torch

from elastic_ckpt import NEMOTRON, random_parent, word_tokenizer
from star_elastic.elastic.checkpoint import interpolated_budget, load_elastic, read_manifest, save_elastic
from star_elastic.elastic.cost import CostModel, parse_budget
from star_elastic.elastic.router import Router, RouterConfig, project_budgets
from star_elastic.errors import StarElasticError
from star_elastic.serve.engine import ElasticEngine
from star_elastic.validate import check_nesting


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("interp") / "ckpt"
    model = random_parent("nemotron_h")
    budgets = [parse_budget(b, model.config) for b in ("1.0", "0.75", "0.5")]
    torch.manual_seed(0)
    router = Router(model.config, budgets, RouterConfig(hidden_dim=16)).eval()
    specs = [router.spec_of(p.choice) for p in project_budgets(router, budgets)]  # in band, nested
    save_elastic(model, router, budgets, out, tokenizer=word_tokenizer(out.parent), specs=specs)
    return out


def test_a_budget_between_two_trained_ones_is_in_band_and_nested(ckpt):
    c = load_elastic(ckpt)
    cost = CostModel(NEMOTRON)
    for name in ("0.7", "0.72", "70%"):
        spec, info = interpolated_budget(c.manifest, c.router, name)
        assert info["interpolated"] and info["name"] == name
        target = parse_budget(name, NEMOTRON).target
        assert abs(spec.num_parameters(NEMOTRON) / target - 1) <= 0.05
        assert abs(info["projection"]["cost"] / target - 1) <= 0.05
        assert c.spec(name) == spec  # the checkpoint resolves it the same way
        larger, smaller = c.spec("0.75"), c.spec("0.5")
        problems = check_nesting(NEMOTRON, {"0.75": larger, name: spec, "0.5": smaller})
        assert all(v is None for v in problems.values()), problems
        assert cost.cost("params", _arch(smaller)) <= cost.cost("params", _arch(spec)) <= cost.cost("params", _arch(larger))


def _arch(spec):
    from star_elastic.elastic.cost import Arch
    return Arch.from_spec(spec, NEMOTRON)


def test_the_router_alone_resolves_it_without_the_weights(ckpt):
    from star_elastic.elastic.checkpoint import load_router

    c = load_elastic(ckpt)
    assert interpolated_budget(c.manifest, load_router(ckpt), "0.72")[0] == c.spec("0.72")


def test_a_trained_budget_by_another_spelling_is_the_trained_one(ckpt):
    c = load_elastic(ckpt)
    spec, info = interpolated_budget(c.manifest, c.router, "75%")
    assert info == {"name": "0.75", "interpolated": False} and spec == c.spec("0.75")


@pytest.mark.parametrize("name, why", [("0.3", "outside the trained"), ("2.0", "more than the whole parent"),
                                       ("abc", "not a number"),
                                       # this tiny grid jumps from 0.72 to 0.48 of the parent between them
                                       ("0.6", "between the trained 0.5 and 0.75")])
def test_budgets_outside_the_trained_range_are_refused_in_one_line(ckpt, name, why):
    c = load_elastic(ckpt)
    with pytest.raises(StarElasticError, match=why) as e:
        c.spec(name)
    assert "\n" not in str(e.value)
    with pytest.raises(StarElasticError, match="not in this checkpoint"):  # without the router: trained only
        from star_elastic.elastic.checkpoint import budget_spec
        budget_spec(read_manifest(ckpt), name)


def test_the_server_serves_an_interpolated_budget_as_its_sliced_model(ckpt):
    from star_elastic.elastic import slice_model

    engine = ElasticEngine.load(ckpt)
    view = engine.view("0.7")
    spec = engine.ckpt.spec("0.7")
    c = load_elastic(ckpt)
    ref = slice_model(c.model, spec).eval()
    x = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(view(x.to(engine.device)), ref(x), atol=1e-4, rtol=1e-4)


def test_the_api_serves_an_interpolated_budget_and_refuses_one_out_of_range(ckpt):
    from fastapi.testclient import TestClient

    from star_elastic.serve.app import create_app

    engine = ElasticEngine.load(ckpt)
    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/completions", json={"model": "0.7", "prompt": "w1 w2", "max_tokens": 4})
        assert r.status_code == 200, r.text
        ids = engine.tokenizer("w1 w2", add_special_tokens=False)["input_ids"]
        want = engine.generate("0.7", torch.tensor([ids]), 4)
        assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(want.tokens, skip_special_tokens=True)
        bad = client.post("/v1/completions", json={"model": "0.3", "prompt": "w1", "max_tokens": 2})
        assert bad.status_code == 404 and "outside the trained" in bad.json()["error"]["message"]


def test_generate_at_an_interpolated_budget_says_so(ckpt, capsys):
    from star_elastic import cli

    assert cli.main(["generate", str(ckpt), "--budget", "0.7", "--prompt", "w3 w4", "--raw",
                     "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr()
    assert "[budget 0.7: interpolated between trained budgets (1.0, 0.75, 0.5), not trained itself]" in printed.err
    engine = ElasticEngine.load(ckpt)
    ids = engine.tokenizer("w3 w4", add_special_tokens=False)["input_ids"]
    want = engine.generate("0.7", torch.tensor([ids]), 3)
    assert printed.out.strip() == engine.tokenizer.decode(want.tokens, skip_special_tokens=True).strip()


def test_slice_streams_an_interpolated_budget_and_records_it(ckpt, tmp_path, capsys):
    import json

    from star_elastic import cli
    from star_elastic.hf import load

    out = tmp_path / "b07"
    assert cli.main(["slice", str(ckpt), "--budget", "0.7", "--out", str(out)]) == 0
    assert "interpolated between trained budgets" in capsys.readouterr().out
    record = json.loads((out / "star_elastic_slice.json").read_text())
    assert record["interpolated"]["interpolated"] and record["streamed"]
    c = load_elastic(ckpt)
    spec = c.spec("0.7")
    assert record["spec"] == spec.to_dict()
    from star_elastic.elastic import slice_model
    sliced, ref = load(out).eval(), slice_model(c.model, spec).eval()
    x = torch.randint(3, 60, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(sliced(x), ref(x))
    assert cli.main(["slice", str(ckpt), "--budget", "0.3", "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_eval_scores_an_interpolated_budget_as_its_sliced_model(ckpt, tmp_path, capsys):
    """`star-elastic eval CKPT --budgets 1.0,0.7,0.5`: the 0.7 between two trained budgets is scored as
    the model `slice --budget 0.7` writes, its costs from its architecture, and labelled; one below
    the trained range is a one-line error."""
    import json

    from star_elastic import cli, load
    from star_elastic.evaluate import compare_models
    from star_elastic.runtime import eval_tokens

    from elastic_ckpt import WORDS

    text = tmp_path / "text.txt"  # documents of the tokenizer's words; eval scores the held-out ones
    text.write_text("\n\n".join(" ".join(WORDS[(d + j) % len(WORDS)] for j in range(40)) for d in range(60)))
    assert cli.main(["eval", str(ckpt), "--data", str(text), "--budgets", "1.0,0.7,0.5", "--seq-len", "16",
                     "--json", str(tmp_path / "r.json"), "--device", "cpu"]) == 0
    assert "interpolated between two trained budgets" in capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())["budgets"]
    assert r["0.7"]["interpolated"] and "interpolated" not in r["0.5"]
    assert r["0.5"]["params"] < r["0.7"]["params"] < r["1.0"]["params"]
    assert abs(r["0.7"]["params"] / r["1.0"]["params"] - 0.7) <= 0.05 * 0.7
    assert cli.main(["slice", str(ckpt), "--budget", "0.7", "--out", str(tmp_path / "s")]) == 0
    c = load_elastic(ckpt)
    stream = eval_tokens(c.tokenizer, str(text), "heldout")
    want = compare_models(c.model, {"s": load(tmp_path / "s").eval()}, stream, 16, 4, None, False)["s"]
    assert r["0.7"]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    capsys.readouterr()  # the slice's progress
    assert cli.main(["eval", str(ckpt), "--data", str(text), "--budgets", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "0.3" in err and "outside the trained" in err
