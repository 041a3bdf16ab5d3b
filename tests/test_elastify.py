"""The elastify pipeline end to end on tiny models, and the elastic checkpoint it writes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import word_tokenizer

from star_elastic import load
from star_elastic.elastic.checkpoint import budget_spec, load_elastic, read_manifest
from star_elastic.elastic.masking import masked
from star_elastic.elastic.slicing import slice_model
from star_elastic.elastify import ElastifyConfig, drift_source, elastify, passes_warning
from star_elastic.errors import StarElasticError
from star_elastic.model import Model, ModelConfig

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture
def tokenizer(tmp_path):
    return word_tokenizer(tmp_path, WORDS)


@pytest.fixture
def text(tmp_path):
    g = torch.Generator().manual_seed(0)
    docs = []
    for d in range(80):  # documents with a learnable pattern: runs of consecutive words
        start = int(torch.randint(0, 60, (1,), generator=g))
        docs.append(" ".join(WORDS[(start + j) % 60] for j in range(40)))
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(docs))
    return path


PARENTS = {
    "nemotron_h": ModelConfig(vocab_size=63, hidden_size=32, layer_types="M*EM-", num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, intermediate_size=64, mamba_num_heads=4,
                              mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=8,
                              num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                              bos_token_id=1, eos_token_id=2),
    "llama": ModelConfig(family="llama", vocab_size=63, hidden_size=32, layer_types="***", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64, rope_theta=10000.0,
                         mlp_gated=True, mlp_act="silu", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


@pytest.mark.parametrize("family", list(PARENTS))
def test_elastify_writes_a_checkpoint_every_budget_slices_from(tmp_path, tokenizer, text, family):
    torch.manual_seed(0)
    model = Model(PARENTS[family])
    parent_params = model.num_parameters()
    cfg = ElastifyConfig(budgets=["1.0", "0.75", "0.5"], tokens=16 * 32 * 6, seq_len=32, batch_size=16,
                         calib_batches=2, eval_tokens=256, lr=1e-3)
    out = tmp_path / "ckpt"
    result = elastify(model, tokenizer, str(text), out, cfg, log=lambda *_: None)
    assert set(result["trained"]) == {"1.0", "0.75", "0.5"} and set(result["zero_shot"]) == set(result["trained"])
    assert not (tmp_path / ".ckpt.train").exists()  # resumable state removed after success
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # the step log kept
    assert [s["step"] for s in steps] == list(range(6)) and all("full_kd" in s and "kd" in s for s in steps)
    assert not list(out.glob(".*"))  # no temporary file left beside it
    # elastify never writes a checkpoint its own validate rejects (off-band budgets are projected)
    from star_elastic.validate import validate_checkpoint
    report = validate_checkpoint(out)
    assert report.ok, [c for c in report.checks if c.status == "fail"]

    manifest = read_manifest(out)
    assert [b["name"] for b in manifest["budgets"]] == ["1.0", "0.75", "0.5"]
    assert 0.5 < manifest["training"]["passes"] == result["training"]["passes"] < 2  # passes over the text, recorded
    share = manifest["training"]["exported_arch_share"]  # how much of each budget's training the export saw
    assert set(share) == {"1.0", "0.75", "0.5"} and share["1.0"] is None  # None: no router draw (this short run
    assert all(share[b] is None or 0 <= share[b] <= 1 for b in ("0.75", "0.5"))  # may not sample every budget)
    # by default the full model trains on every step beside one smaller budget (the full anchor), so the
    # smaller budgets split all the steps between them instead of ~58% (the paper's sampling)
    steps = manifest["training"]["steps_per_budget"]
    assert steps["1.0"] == manifest["training"]["steps"] == steps["0.75"] + steps["0.5"]
    stages = manifest["training"]["stages_s"]  # where the time went, stage by stage
    assert list(stages) == ["data", "importance_and_sort", "search_and_zero_shot", "teacher_and_router", "training",
                            "evaluation"]
    assert all(v >= 0 for v in stages.values()) and stages["training"] <= manifest["training"]["seconds"] + 0.1
    full = manifest["budgets"][0]
    assert full["params"] == parent_params == manifest["parent"]["params"]
    assert set(manifest["files"]) >= {"model.safetensors", "router.safetensors"}
    # the checkpoint directory is a stock HF checkpoint of the sorted, trained parent
    ref, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    ckpt = load_elastic(out, verify=True)
    x = torch.randint(0, 63, (2, 12))
    for i, entry in enumerate(manifest["budgets"]):
        spec = budget_spec(manifest, entry["name"])
        proj = entry["projection"]  # the router's argmax, or its projection into the band: recorded
        if not proj["projected"]:
            assert spec.to_dict() == ckpt.router.spec(i).to_dict()
        assert abs(proj["ratio"] - 1) <= 0.05 and proj["cost"] == entry["params"] and proj["target"] == entry["target"]
        assert spec.num_parameters(ckpt.model.config) == entry["params"]
        small = slice_model(ckpt.model, spec)
        with torch.no_grad(), masked(ckpt.model, spec.masks(ckpt.model.config)):
            under_masks, sliced = ckpt.model(x), small(x)
        assert ((under_masks - sliced).norm() / under_masks.norm()) < 1e-5
    sizes = [e["params"] for e in manifest["budgets"]]
    assert sizes[0] > sizes[1] > sizes[2]


def test_many_passes_over_one_corpus_warn_of_drift():
    # the cause of the full budget's out-of-domain drift at 13 passes (docs/RESULTS.md §9) is said up front
    assert passes_warning(4_000_000, 1_000_000, "wiki") is None
    one = passes_warning(13_000_000, 1_000_000, "wiki")
    assert "13.0 passes" in one and "--data wiki,bible" in one and "\n" not in one
    mixed = passes_warning(13_000_000, 1_000_000, "wiki,bible")
    assert "13.0 passes" in mixed and "other domains" in mixed


def test_a_smaller_budget_far_from_the_parent_out_of_domain_is_pointed_to_the_budget_mix():
    from star_elastic.elastify import elsewhere_note

    note = elsewhere_note("0.9", 1.35, {"shakespeare": 1.47, "chat answers": 1.65}, budget_mix=0.0)
    assert note.strip().startswith("note: budget 0.9") and "1.65x the parent's perplexity on chat answers" in note
    assert "1.35x in domain" in note and "--budget-mix F" in note and "\n" not in note
    assert elsewhere_note("0.9", 1.35, {"shakespeare": 1.47}, budget_mix=0.0) is None  # within 10% of in domain
    assert elsewhere_note("0.9", 1.35, {"chat answers": 1.65}, budget_mix=0.5) is None  # the mix is on already
    assert elsewhere_note("0.9", 1.35, {}, budget_mix=0.0) is None  # no other source


def test_drift_is_measured_on_a_bundled_corpus_the_training_does_not_use():
    assert drift_source("wiki", "auto") == "shakespeare"
    assert drift_source("shakespeare:0.5,wiki:0.5", "auto") == "bible"
    assert drift_source("wiki,shakespeare,bible", "auto") == "wiki-fr"
    assert drift_source("my_text.txt", "auto") is None  # own text: name a second domain with --drift-data
    assert drift_source("wiki", "bible") == "bible" and drift_source("wiki", "") is None


CHAT = "{% for m in messages %}user {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer {% endif %}"


def test_answer_scores_score_the_answers_alone_and_count_the_first_tokens_kept():
    """Chat transcripts are scored on their answers' tokens, each given everything before it: equal to the
    cross-entropy computed by hand over those positions, and not the whole transcript's perplexity; an answer
    counts as begun the same way when its first token is the model's argmax there."""
    import math

    import torch.nn.functional as F

    from star_elastic.evaluate import answer_scores

    torch.manual_seed(0)
    model = Model(PARENTS["llama"]).eval()
    transcripts = [(torch.randint(0, 63, (14,)), 9), (torch.randint(0, 63, (10,)), 4)]
    nll, n = 0.0, 0
    with torch.no_grad():
        logits = [model(ids[None])[0] for ids, _ in transcripts]
    for (ids, start), lg in zip(transcripts, logits):
        nll += F.cross_entropy(lg[start - 1:-1], ids[start:], reduction="sum").item()
        n += len(ids) - start
    got = answer_scores(model, transcripts)
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)
    assert got["first_token_kept"] == sum(int(lg[s - 1].argmax() == ids[s]) for (ids, s), lg in
                                          zip(transcripts, logits)) / 2
    assert got["first_kept"] == [bool(lg[s - 1].argmax() == ids[s]) for (ids, s), lg in zip(transcripts, logits)]
    for margin, ((ids, s), lg) in zip(got["first_margin"], zip(transcripts, logits)):
        top = lg[s - 1].log_softmax(-1).sort(descending=True).values
        assert margin > 0 and math.isclose(margin, float(top[0] - top[1]), rel_tol=1e-4)
    whole = answer_scores(model, [(ids, 1) for ids, _ in transcripts])["perplexity"]  # every token but the first
    assert not math.isclose(whole, math.exp(nll / n), rel_tol=1e-3)
    # answers begun with the argmax: all kept; one first token changed: half
    greedy = [(torch.cat([ids[:s], lg[s - 1].argmax()[None], ids[s + 1:]]), s) for (ids, s), lg in
              zip(transcripts, logits)]
    assert answer_scores(model, greedy)["first_token_kept"] == 1.0
    other = (greedy[0][0].clone(), greedy[0][1])
    other[0][other[1]] = (other[0][other[1]] + 1) % 63
    assert answer_scores(model, [other, greedy[1]])["first_token_kept"] == 0.5


def test_the_full_budgets_drift_on_the_parents_own_chat_answers(tmp_path, tokenizer, text):
    """With a chat template, elastify has the parent answer CHAT_QUESTIONS greedily before training and reports
    the full budget's perplexity on those answers against the parent's ("chat answers" in the drift table and
    the manifest); the transcripts are the parent's greedy answers; a base tokenizer, or chat_drift off, has
    no such source."""
    from star_elastic.elastify import CHAT_QUESTIONS, chat_transcripts

    tokenizer.chat_template = CHAT
    torch.manual_seed(0)
    parent = Model(PARENTS["llama"]).eval()
    transcripts = chat_transcripts(parent, tokenizer, max_new_tokens=5)
    assert len(transcripts) == len(CHAT_QUESTIONS)
    for ids, start in transcripts:  # each answer token is the parent's argmax after what came before it
        with torch.no_grad():
            logits = parent(ids[None])[0]
        assert torch.equal(logits[start - 1:-1].argmax(-1), ids[start:])
    cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32 * 2, seq_len=32, batch_size=16, calib_batches=1,
                         eval_tokens=128, drift_data="")
    answers = chat_transcripts(parent, tokenizer)  # what elastify asks the parent before training (greedy)
    logged = []
    result = elastify(parent, tokenizer, str(text), tmp_path / "ckpt", cfg, log=logged.append)
    chat = result["drift"]["chat answers"]
    # the smaller budget on the same answers, scored as its slice of the written checkpoint scores them
    from star_elastic.evaluate import answer_scores
    ckpt = load_elastic(tmp_path / "ckpt")
    small = slice_model(ckpt.model, budget_spec(ckpt.manifest, "0.5")).eval()
    elsewhere = result["elsewhere"]["chat answers"]
    assert set(elsewhere) == {"0.5"}
    assert elsewhere["0.5"] == pytest.approx(answer_scores(small, answers)["perplexity"], rel=1e-4)
    assert read_manifest(tmp_path / "ckpt")["evaluation"]["trained_perplexity_elsewhere"] == result["elsewhere"]
    # said when the budget is further from the parent there than in its training domain (by over 10%)
    gap = (elsewhere["0.5"] / chat["parent"]) / (result["trained"]["0.5"] / result["drift"]["train domain"]["parent"])
    notes = [line for line in logged if "keeps less of the parent out of its training domain" in line]
    assert len(notes) == (gap > 1.1) and all("budget 0.5" in n and "--budget-mix" in n for n in notes)
    assert chat["parent"] > 1 and chat["full_budget"] > 1 and chat["change"] != 0  # training moved it
    # and the parent's KL from the full budget says how far (here barely moved: on the answers, to rounding)
    assert result["drift"]["train domain"]["kl_from_parent"] > 0
    assert all(0 <= d["kl_from_parent"] < 1e-3 for d in result["drift"].values()), result["drift"]
    # the parent begins every answer with its own greedy token (it wrote them), and the count is of answers
    assert chat["answers"] == len(CHAT_QUESTIONS) and chat["first_token_kept"]["parent"] == 1.0
    assert 0 <= chat["first_token_kept"]["full_budget"] <= 1
    clear = chat["clear_first_tokens"]  # the answers the parent begins by a clear margin, and how many were kept
    assert clear["margin_nats"] == 0.5 and 0 <= clear["kept"] <= clear["answers"] <= len(CHAT_QUESTIONS)
    import io

    from star_elastic.elastify import print_table
    table = io.StringIO()
    print_table(result, file=table)
    n = len(CHAT_QUESTIONS)
    assert (f"full budget on chat answers held-out: {chat['full_budget']:.3f}" in table.getvalue() and
            f"greedy first token: {round(chat['first_token_kept']['full_budget'] * n)} of {n} (the parent itself {n}; "
            f"{clear['kept']} of the {clear['answers']} it begins by over 0.5 nats)" in table.getvalue())
    assert (f"smaller budgets on chat answers held-out: 0.5 {elsewhere['0.5']:.3f} "
            f"({elsewhere['0.5'] / chat['parent']:.2f}x) against the parent's {chat['parent']:.3f}") in table.getvalue()
    assert read_manifest(tmp_path / "ckpt")["evaluation"]["full_budget_drift"]["chat answers"] == chat
    off = elastify(Model(PARENTS["llama"]), tokenizer, str(text), tmp_path / "off",
                   ElastifyConfig(**{**cfg.__dict__, "chat_drift": False}), log=lambda *_: None)
    assert "chat answers" not in off["drift"] and off["elsewhere"] == {}
    from star_elastic.elastify import chat_warning
    assert chat_warning({**chat, "clear_first_tokens": {"margin_nats": 0.5, "answers": 18, "kept": 18}}) is None
    warned = chat_warning({**chat, "clear_first_tokens": {"margin_nats": 0.5, "answers": 18, "kept": 15}})
    assert "begins 3 of the 18 chat answers its parent begins clearly" in warned and "--anchor-data chat" in warned
    assert chat_warning({"parent": 1.0}) is None  # prose sources have no answers to count
    tokenizer.chat_template = None
    assert chat_transcripts(parent, tokenizer) is None
    from star_elastic.cli import build_parser
    base = ["elastify", "m", "--data", "wiki", "--tokens", "64", "--out", "o"]
    assert build_parser().parse_args(base).chat_drift and not build_parser().parse_args(base + ["--no-chat-drift"]).chat_drift


def test_unknown_budget_and_damaged_files_are_clear_errors(tmp_path, tokenizer, text):
    torch.manual_seed(0)
    cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32 * 2, seq_len=32, batch_size=16, calib_batches=1,
                         eval_tokens=128)
    out = tmp_path / "ckpt"
    elastify(Model(PARENTS["nemotron_h"]), tokenizer, str(text), out, cfg, log=lambda *_: None)
    manifest = read_manifest(out)
    with pytest.raises(StarElasticError, match=r"budget '0.6' is not in this checkpoint \(trained budgets: 1.0, 0.5\)"):
        budget_spec(manifest, "0.6")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StarElasticError, match="checksum"):
        load_elastic(out, verify=True)
    (out / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StarElasticError, match="not a star-elastic manifest"):
        read_manifest(out)
    with pytest.raises(StarElasticError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_cli_elastify_then_slice_a_budget(tmp_path, tokenizer, text, capsys):
    from star_elastic import cli, save_pretrained

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    ckpt = tmp_path / "ckpt"
    assert cli.main(["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text),
                     "--tokens", str(8 * 32 * 3), "--seq-len", "32", "--batch-size", "8", "--calib-batches", "1",
                     "--eval-tokens", "128", "--out", str(ckpt), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "trained ppl" in printed and "vs the parent" in printed
    manifest = read_manifest(ckpt)
    # a trained budget slices to a stock HF checkpoint equal to the masked parent
    assert cli.main(["slice", str(ckpt), "--budget", "0.5", "--out", str(tmp_path / "half"), "--device", "cpu"]) == 0
    ref, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "half"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    parent = load(ckpt)
    spec = budget_spec(manifest, "0.5")
    x = torch.randint(3, 63, (2, 10))
    with torch.no_grad(), masked(parent, spec.masks(parent.config)):
        assert ((ref(x).logits - parent(x)).norm() / parent(x).norm()) < 1e-4
    assert ref.num_parameters() == manifest["budgets"][1]["params"]
    # a budget not in the manifest: a clear error, nothing written
    capsys.readouterr()
    assert cli.main(["slice", str(ckpt), "--budget", "0.3", "--out", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "budget 0.3 is outside the trained" in err and "\n" not in err
    assert not (tmp_path / "nope").exists()


def test_a_bf16_parent_gives_a_bf16_checkpoint_and_a_dtype_can_be_asked(tmp_path, tokenizer, text, capsys):
    """Training keeps fp32 master weights; the checkpoint used to be written in them, twice the bytes of
    a bf16 parent (a 10B parent: 40 GB instead of 20). `--save-dtype auto` (the default) writes the
    parent's dtype, the MoE router in float32 as transformers keeps it; a dtype can be asked for."""
    from safetensors import safe_open

    from star_elastic import cli, save_pretrained
    from star_elastic.validate import validate_checkpoint

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["nemotron_h"]).to(torch.bfloat16), tmp_path / "parent", tokenizer=tokenizer)
    args = ["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text), "--tokens",
            str(8 * 32 * 2), "--seq-len", "32", "--batch-size", "8", "--calib-batches", "1", "--eval-tokens", "128",
            "--device", "cpu"]
    assert cli.main(args + ["--out", str(tmp_path / "auto")]) == 0
    capsys.readouterr()
    # --tokens not a whole number of steps: the same two steps, and the run says what it rounded
    args[args.index("--tokens") + 1] = str(8 * 32 * 2 + 100)
    assert cli.main(args + ["--out", str(tmp_path / "f32"), "--save-dtype", "float32"]) == 0
    assert "training on 512 tokens in 2 steps (--tokens 612 in whole steps of 8 x 32)" in capsys.readouterr().out

    def dtypes(ckpt):
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}

    auto, f32 = dtypes(tmp_path / "auto"), dtypes(tmp_path / "f32")
    router = {k for k in auto if k.endswith((".mixer.gate.weight", ".mixer.gate.e_score_correction_bias"))}
    assert router and {auto[k] for k in router} == {"F32"}
    assert {v for k, v in auto.items() if k not in router} == {"BF16"} and set(f32.values()) == {"F32"}
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("auto") < 0.6 * size("f32")
    assert validate_checkpoint(tmp_path / "auto").ok  # every budget slices and matches its masked self


def test_a_compiled_elastify_writes_the_checkpoint_of_an_eager_one_and_leaves_plain_layers(tmp_path, tokenizer,
                                                                                         text):
    """ElastifyConfig.compile trains with each layer under torch.compile (here dynamo's aot_eager, the
    CPU's stand-in for inductor), then evaluates and exports the plain layers: the same checkpoint."""
    from safetensors.torch import load_file

    ckpts = {}
    for backend in (None, "aot_eager"):
        torch.manual_seed(0)
        model = Model(PARENTS["nemotron_h"])
        cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=8 * 32 * 3, seq_len=32, batch_size=8, calib_batches=1,
                             eval_tokens=128, compile=backend)
        elastify(model, tokenizer, str(text), tmp_path / str(backend), cfg, log=lambda *a: None)
        assert not any("_compiled_call_impl" in vars(layer) for layer in model.model.layers)
        ckpts[backend] = load_file(tmp_path / str(backend) / "model.safetensors")
    torch._dynamo.reset()
    assert ckpts[None].keys() == ckpts["aot_eager"].keys()
    for k, v in ckpts[None].items():
        torch.testing.assert_close(ckpts["aot_eager"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_compile_auto_is_inductor_on_a_gpu_with_triton_and_eager_elsewhere(monkeypatch):
    """elastify / demo --compile: auto (the default) compiles on a GPU whose torch has Triton, unsharded."""
    import importlib.util

    from star_elastic.runtime import compile_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_backend("auto", cpu) is None and compile_backend("on", cpu) == "inductor"
    assert compile_backend("off", cuda) is None
    real = importlib.util.find_spec
    for triton, want in ((object(), "inductor"), (None, None)):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, t=triton: t if name == "triton" else real(name, *a))
        assert compile_backend("auto", cuda) == want
        assert compile_backend("auto", cuda, sharded=True) is None and compile_backend("on", cuda, sharded=True)
    with pytest.raises(ValueError, match="auto, on or off"):
        compile_backend("yes", cpu)


def test_torchrun_two_gloo_ranks_write_the_checkpoint_one_process_writes(tmp_path, tokenizer, text):
    """`torchrun --nproc_per_node 2 -m star_elastic elastify ...`: rank 0 alone writes, and the
    checkpoint equals a one-process run's (same global batches, gradients averaged over ranks)."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from star_elastic import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["nemotron_h"]), tmp_path / "parent", tokenizer=tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text), "--tokens",
            str(8 * 32 * 3), "--seq-len", "32", "--batch-size", "8", "--calib-batches", "2", "--eval-tokens", "128",
            "--lr", "1e-2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STAR_ELASTIC_QUIET": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "star_elastic"]
    p = subprocess.run(launcher + args + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    from star_elastic import cli

    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert two["training"]["ranks"] == 2 and one["training"]["ranks"] == 1
    # torchrun shards by default (FSDP2); one process replicates (there is nothing to shard over)
    assert two["training"]["parallel"]["sharding"] == "fsdp2" and one["training"]["parallel"]["sharding"] == "replicated"
    # the sharded run never held the parent whole: loaded sharded, scored on the shards, sorted as loaded again,
    # written tensor by tensor; and it still equals the one-process run below
    assert two["training"]["parallel"]["parent_load"].startswith("sharded from disk")
    assert two["training"]["parallel"]["checkpoint_write"] == "gathered tensor by tensor on rank 0"
    assert "parent_load" not in one["training"]["parallel"]
    assert [b["spec"] for b in one["budgets"]] == [b["spec"] for b in two["budgets"]]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)
    assert worst < 1e-3, worst
    # training moved the model far more (over 10x) than the two runs may differ (1e-4, below)
    before, after = one["evaluation"]["zero_shot_perplexity"]["0.5"], one["evaluation"]["trained_perplexity"]["0.5"]
    assert abs(after - before) / before > 1e-3
    for name, ppl in one["evaluation"]["trained_perplexity"].items():
        assert abs(two["evaluation"]["trained_perplexity"][name] - ppl) / ppl < 1e-4
    assert not any(p.name.startswith(".two") for p in tmp_path.iterdir())  # resumable state removed


def test_demo_runs_end_to_end_and_says_what_to_do_next(tmp_path, tokenizer, text, capsys, monkeypatch):
    """`star-elastic demo` on a tiny parent in place of SmolLM2: the CPU preset's budgets, the table
    (zero-shot vs trained vs the parent), answers from one loaded checkpoint, and the next commands."""
    from star_elastic import cli, commands

    model = Model(PARENTS["llama"])
    monkeypatch.setattr(commands, "load_model_and_tokenizer", lambda *a, **k: (model, tokenizer))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--data", str(text), "--tokens", str(8 * 32 * 2), "--seq-len", "32",
                     "--calib-batches", "1", "--eval-tokens", "128", "--max-new-tokens", "4", "--out", str(out),
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    budgets = commands.DEMO_PRESETS["cpu"]["budgets"].split(",")  # the CPU preset's, the smallest last
    assert len(budgets) >= 2 and budgets[0] == "1.0"
    assert f"budgets {','.join(budgets)}" in printed and "vs parent" in printed
    for budget in budgets:
        assert f"{budget:>8}" in printed  # a table row each
    assert printed.count("Q: ") == len(commands.DEMO_PROMPTS)
    assert f"star-elastic slice {out} --budget {budgets[-1]}" in printed and f"star-elastic serve {out}" in printed
    manifest = read_manifest(out)
    assert [b["name"] for b in manifest["budgets"]] == budgets
    # the CPU preset keeps the paper's sampling (the anchor would double a step with one smaller budget)
    steps = manifest["training"]["steps_per_budget"]
    assert sum(steps.values()) == manifest["training"]["steps"] == 2
    # other budgets than the preset's: its stage-2 weights (one per preset budget) are not forced on them
    # and the training levers reach the run: --full-anchor, --all-budgets, --budget-lrs, --router-prior,
    # --anchor-data (the CPU preset has none), and the full budget's delta and hold (all of elastify's)
    assert cli.main(["demo", "--data", str(text), "--budgets", "1.0,0.75,0.5", "--tokens", str(8 * 32), "--seq-len",
                     "32", "--calib-batches", "1", "--eval-tokens", "128", "--max-new-tokens", "2", "--out", str(out),
                     "--device", "cpu", "--full-anchor", "0.5", "--all-budgets", "--budget-lrs", "1e-4,2e-4,3e-4",
                     "--router-prior", "0.7", "--anchor-data", "self:256", "--anchor-mix", "0.5"]) == 0
    manifest = read_manifest(out)
    assert [b["name"] for b in manifest["budgets"]] == ["1.0", "0.75", "0.5"]
    assert manifest["training"]["config"]["all_budgets"] is True
    assert manifest["training"]["config"]["full_anchor"] == 0.5
    assert manifest["training"]["config"]["budget_lrs"] == [1e-4, 2e-4, 3e-4]
    assert manifest["training"]["config"]["router_prior"] == 0.7
    assert manifest["training"]["config"]["anchor_data"] == "self:256"
    assert manifest["training"]["config"]["anchor_mix"] == 0.5
    assert cli.main(["demo", "--data", str(text), "--budgets", "1.0,0.5", "--tokens", str(8 * 32), "--seq-len", "32",
                     "--calib-batches", "1", "--eval-tokens", "128", "--max-new-tokens", "2", "--out", str(out),
                     "--device", "cpu", "--full-anchor", "1", "--full-delta-rank", "4", "--hold", "embeddings,norms",
                     "--hold-rate", "1", "--hold-pull", "30", "--full-keeps-held", "training"]) == 0
    config = read_manifest(out)["training"]["config"]
    assert (config["full_delta_rank"], config["hold"], config["hold_rate"], config["hold_pull"],
            config["full_keeps_held"]) == (4, ["embeddings", "norms"], 1.0, 30.0, "training")
    assert (out / "full_delta.safetensors").is_file()


def test_the_demo_trains_with_elastifys_defaults_on_the_cpu_and_the_recipe_that_keeps_the_full_budget_on_a_gpu():
    """The full-budget flags of `demo` default to its preset: on the CPU elastify's own defaults (none of them),
    on a GPU the recipe measured in docs/RESULTS.md §9 (anchor 1 on half sampled text, a fifth of the smaller
    budgets' rows that text too, a rank-32 delta with the rest rounded to 2 bits, the
    parent's embeddings and norms held at the full rate, pulled back and kept from the first step), which the
    trainer's own checks accept; a flag given wins over either preset, also one that turns a lever off."""
    from star_elastic.cli import build_parser
    from star_elastic.commands import KEEP_FULL, PLAIN_LEVERS, demo_options, lever_options
    from star_elastic.train_config import (DELTA_OPTIONS, budget_mix_problem, delta_option_problem, hold_problem,
                                    keep_problem)

    levers = ("anchor_data", "anchor_mix", "budget_mix", "full_delta_rank", "full_delta_lr", "full_delta_finish", "hold", "hold_rate",
              "hold_pull", "full_keeps_held")
    elastify_args = build_parser().parse_args(["elastify", "m", "--data", "wiki", "--tokens", "64", "--out", "o"])
    cpu, gpu = (demo_options(build_parser().parse_args(["demo"]), kind) for kind in ("cpu", "cuda"))
    plain = lever_options(elastify_args, PLAIN_LEVERS)
    assert {k: cpu[k] for k in levers} == {k: plain[k] for k in levers}
    assert {k: gpu[k] for k in KEEP_FULL} == KEEP_FULL  # the GPU demo runs elastify --keep-full's recipe
    assert cpu["full_anchor"] == 0.0
    assert {k: gpu[k] for k in levers + ("full_anchor",)} == {
        "anchor_data": "self", "anchor_mix": 0.5, "budget_mix": 0.2, "full_delta_rank": 32, "full_delta_lr": 4e-4, "full_delta_finish": 256,
        "hold": "embeddings,norms",
        "hold_rate": 1.0,
        "hold_pull": 0.0, "full_keeps_held": "training", "full_anchor": 1.0}
    hold = gpu["hold"].split(",")
    assert budget_mix_problem(gpu["budget_mix"], anchor_text=True) is None
    assert hold_problem(hold, gpu["hold_rate"], gpu["hold_pull"], sharded=False) is None
    assert keep_problem(gpu["full_keeps_held"], gpu["full_delta_rank"], hold, gpu["hold_rate"]) is None
    given = demo_options(build_parser().parse_args(["demo", "--full-delta-rank", "0", "--full-keeps-held",
                                                    "--anchor-mix", "1", "--hold-pull", "10"]), "cuda")
    assert (given["full_delta_rank"], given["full_keeps_held"], given["anchor_mix"], given["hold_pull"]) == (
        0, "after", 1.0, 10.0)
    assert given["hold"] == "embeddings,norms"  # what was not given stays the preset's
    # the delta turned off takes the preset's rate and finish of it along (else: "there is no delta"), and
    # every preset's and given set passes the trainer's check
    assert (given["full_delta_lr"], given["full_delta_finish"]) == (0, 0)
    for opt in (cpu, gpu, given):
        assert all(delta_option_problem(k, opt[k], opt["full_delta_rank"]) is None for k in DELTA_OPTIONS)
    wrong = demo_options(build_parser().parse_args(["demo", "--full-delta-rank", "0", "--full-delta-finish", "8"]),
                         "cuda")
    assert delta_option_problem("full_delta_finish", wrong["full_delta_finish"], 0)  # a flag given is kept, refused
    # the delta's closed-form restore: on with the GPU preset's delta, off without a delta, a flag given wins,
    # and a mode given without a delta is refused
    assert (cpu["full_delta_restore"], gpu["full_delta_restore"], given["full_delta_restore"]) == ("", "activations", "")
    assert demo_options(build_parser().parse_args(["demo", "--full-delta-restore", "weights"]), "cuda")[
        "full_delta_restore"] == "weights"
    assert demo_options(build_parser().parse_args(["demo", "--full-delta-restore", "none"]), "cuda")[
        "full_delta_restore"] == ""
    with pytest.raises(StarElasticError, match="there is no delta"):
        demo_options(build_parser().parse_args(["demo", "--full-delta-restore", "weights"]), "cpu")
    # stage-2 weights: the preset's for its own budgets, none (elastify's) for others, a given set in --budgets
    # order, and a given set of the wrong length refused in one line before anything loads
    assert cpu["stage2_weights"] == [0.3, 0.7] and gpu["stage2_weights"] == [0.0, 0.2, 0.8]
    assert demo_options(build_parser().parse_args(["demo", "--budgets", "1.0,0.9,0.8"]), "cpu")["stage2_weights"] is None
    assert demo_options(build_parser().parse_args(["demo", "--budgets", "1.0,0.75"]), "cuda")["stage2_weights"] is None
    assert demo_options(build_parser().parse_args(["demo", "--stage2-weights", "0,0.3,0.7"]), "cuda")[
        "stage2_weights"] == [0.0, 0.3, 0.7]
    with pytest.raises(StarElasticError, match="2 weights for 3 budgets"):
        demo_options(build_parser().parse_args(["demo", "--stage2-weights", "0.3,0.7"]), "cuda")


def test_keep_full_is_the_recipe_and_a_flag_beside_it_wins(tmp_path, tokenizer, text, capsys):
    """elastify's full-budget levers: without --keep-full ElastifyConfig's own defaults (the full anchor alone);
    with it the recipe that held the full model within 1% (commands.KEEP_FULL), every value of which passes the
    trainer's checks; a flag given beside it wins, and turning the delta off takes its options along. A run with
    it writes a checkpoint whose manifest records the recipe."""
    import dataclasses

    from star_elastic import cli, save_pretrained
    from star_elastic.cli import build_parser
    from star_elastic.commands import KEEP_FULL, PLAIN_LEVERS, lever_options
    from star_elastic.train_config import delta_option_problem, hold_problem, keep_problem, DELTA_OPTIONS

    base = ["elastify", "m", "--data", "wiki", "--tokens", "64", "--out", "o"]
    defaults = {f.name: f.default for f in dataclasses.fields(ElastifyConfig)}
    assert {k: defaults[k] for k in PLAIN_LEVERS} == PLAIN_LEVERS
    assert lever_options(build_parser().parse_args(base), PLAIN_LEVERS) == {**PLAIN_LEVERS, "full_delta_restore": ""}

    def opts(*flags):
        args = build_parser().parse_args(base + list(flags))
        return lever_options(args, KEEP_FULL if args.keep_full else PLAIN_LEVERS)
    recipe = opts("--keep-full")
    assert recipe == KEEP_FULL and recipe["full_delta_restore"] == "activations"
    assert recipe["full_delta_bits"] > 0  # the drift's tail past the rank rounded, not dropped (RESULTS §9)
    hold = recipe["hold"].split(",")
    assert hold_problem(hold, recipe["hold_rate"], recipe["hold_pull"], sharded=False) is None
    assert keep_problem(recipe["full_keeps_held"], recipe["full_delta_rank"], hold, recipe["hold_rate"]) is None
    assert all(delta_option_problem(k, recipe[k], recipe["full_delta_rank"]) is None for k in DELTA_OPTIONS)
    assert opts("--keep-full", "--hold-pull", "30", "--full-anchor", "0.5") == {**KEEP_FULL, "hold_pull": 30.0,
                                                                                "full_anchor": 0.5}
    # the recipe as flags (what elastify --keep-full prints), typed back without it, is the recipe
    from star_elastic.commands import lever_flags
    assert lever_flags({**PLAIN_LEVERS, "full_delta_restore": ""}) == ""
    assert opts(*lever_flags(KEEP_FULL).split()) == KEEP_FULL
    assert "--full-delta-restore weights" in lever_flags(opts("--keep-full", "--full-delta-restore", "weights"))
    off = opts("--keep-full", "--full-delta-rank", "0")
    assert (off["full_delta_lr"], off["full_delta_finish"], off["full_keeps_held"], off["full_delta_restore"]) == (
        0, 0, "", "")
    assert keep_problem(off["full_keeps_held"], 0, hold, off["hold_rate"]) is None

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    args = ["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text), "--seq-len", "32",
            "--batch-size", "8", "--calib-batches", "1", "--eval-tokens", "128", "--device", "cpu",
            "--tokens", str(8 * 32 * 2), "--keep-full", "--full-delta-rank", "4", "--full-delta-finish", "2",
            "--out", str(tmp_path / "ckpt")]
    assert cli.main(args) == 0
    config = read_manifest(tmp_path / "ckpt")["training"]["config"]
    assert (config["full_anchor"], config["anchor_data"], config["budget_mix"], config["full_delta_rank"],
            config["full_delta_finish"], config["hold"], config["hold_pull"], config["full_keeps_held"],
            config["full_delta_bits"]) == (
        1.0, "self", KEEP_FULL["budget_mix"], 4, 2, ["embeddings", "norms"], 0.0, "training",
        KEEP_FULL["full_delta_bits"])
    assert KEEP_FULL["budget_mix"] > 0  # the smaller budgets see the parent's own text too (RESULTS §9)
    # budgets 1.0,0.5 have no measured stage-2 / KD weights: the run says it trains them with elastify's
    assert (config["stage2_weights"], config["kd_weights"]) == (None, None)
    assert "weights were measured for budgets 1.0,0.75,0.5; these budgets train with elastify's" in \
        capsys.readouterr().out


def test_keep_full_weights_the_budgets_it_was_measured_on(tmp_path, tokenizer, text, capsys):
    """`--keep-full` on budgets 1.0,0.75,0.5 also sets their stage-2 and distillation weights (commands.
    KEEP_FULL_WEIGHTS: the full budget never drawn in stage 2, the 0.5's KD below the others'; RESULTS §9), those
    measured at the training tokens nearest --tokens (0.4 at 16.8M, 0.7 at 4.2M), which reach elastify's config
    and its printed recipe; each flag given wins; another budget list or no --keep-full keeps elastify's defaults.
    Until the fifty-third session --keep-full left both at the defaults (stage 2 toward the full model, every KD
    weight 1), with which the 0.75 trailed one distilled alone; until the fifty-fourth it set 0.4 at any --tokens,
    with which at 4.2M tokens the 0.5 trailed one distilled alone by up to 10% (seed 1)."""
    from star_elastic import cli, save_pretrained
    from star_elastic.cli import build_parser
    from star_elastic.commands import KEEP_FULL_WEIGHTS, budget_weights, keep_full_measured, weight_flags
    from star_elastic.validate import validate_checkpoint

    def weights(*flags, tokens=16_777_216):
        args = build_parser().parse_args(["elastify", "m", "--data", "wiki", "--tokens", str(tokens), "--out", "o",
                                          *flags])
        return budget_weights(args, args.budgets.split(","))
    at16, at4 = KEEP_FULL_WEIGHTS[1.0, 0.75, 0.5][16_777_216], KEEP_FULL_WEIGHTS[1.0, 0.75, 0.5][4_194_304]
    recipe = at16
    assert weights("--keep-full") == weights("--keep-full", "--budgets", "1,0.75,0.50") == recipe
    assert weights("--keep-full", "--budgets", "0.5,1.0,0.75") == {"stage2_weights": [0.2, 0.0, 0.8],
                                                                   "kd_weights": [0.4, 1.0, 1.0]}  # in flag order
    assert recipe["stage2_weights"][0] == 0 and recipe["kd_weights"][2] < 1
    # the nearest measurement in ratio: 4.2M's up to twice 4.2M, 16.8M's from there and past it
    assert at4["kd_weights"] == [1.0, 1.0, 0.7] and at4["stage2_weights"] == recipe["stage2_weights"]
    for tokens, expected in ((1024, at4), (4_194_304, at4), (8_000_000, at4), (9_000_000, at16), (10**9, at16)):
        assert weights("--keep-full", tokens=tokens) == expected, tokens
    assert keep_full_measured(["1.0", "0.75", "0.5"], 6_000_000) == 4_194_304
    assert keep_full_measured(["1.0", "0.5"], 6_000_000) is None
    assert weights() == weights("--keep-full", "--budgets", "1.0,0.5") == {"stage2_weights": None, "kd_weights": None}
    assert weights("--keep-full", "--budgets", "full,half") == {"stage2_weights": None, "kd_weights": None}
    assert weights("--keep-full", "--kd-weights", "1,1,1") == {**recipe, "kd_weights": [1.0, 1.0, 1.0]}
    assert weights("--stage2-weights", "0.2,0.4,0.4") == {"stage2_weights": [0.2, 0.4, 0.4], "kd_weights": None}
    assert weights(*weight_flags(recipe).split()) == recipe  # the printed flags, typed back, are the recipe

    # a run with it on a tiny parent: the weights reach the trainer (the manifest's config) and the checkpoint passes
    # validate (stage 2 never draws the full budget: the delta, restored where training ends, keeps it)
    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    run = ["elastify", str(tmp_path / "parent"), "--data", str(text), "--seq-len", "32", "--batch-size", "8",
           "--calib-batches", "1", "--eval-tokens", "128", "--device", "cpu", "--tokens", str(8 * 32 * 4),
           "--keep-full", "--full-delta-rank", "4", "--full-delta-finish", "2", "--stage2-weights", "0,0.5,0.5",
           "--out", str(tmp_path / "ckpt")]
    assert cli.main(run) == 0
    config = read_manifest(tmp_path / "ckpt")["training"]["config"]
    # (1,024 training tokens: 4.2M's weights, the nearest measured)
    assert (config["stage2_weights"], config["kd_weights"]) == ([0.0, 0.5, 0.5], at4["kd_weights"])
    assert validate_checkpoint(tmp_path / "ckpt").ok
    printed = capsys.readouterr().out
    said = next(line for line in printed.splitlines() if line.startswith("--keep-full:"))
    assert said.endswith(" --kd-weights 1,1,0.7") and "--stage2-weights" not in said  # what it ran, not what was given
    assert "--keep-full's budget weights: those measured at 4.2M training tokens (measured at 4.2M, 16.8M; the " \
        "nearest to these 1,024; they were measured at 8,192 tokens a step, these take 256)" in printed
    assert "were measured for budgets" not in printed


def test_keep_full_under_fsdp2_is_the_same_recipe_and_the_sharded_trainer_accepts_it():
    """`--keep-full` is one recipe on one device and under FSDP2: its rounded rest (--full-delta-bits) is built
    sharded too (each layer's by the rank that factors it, sent to every rank: tests/test_fsdp_delta.py). Until
    the forty-sixth session the sharded trainer refused it and `--keep-full` fell back to rank 64 without it."""
    from star_elastic import commands
    from star_elastic.commands import KEEP_FULL, lever_config
    from star_elastic.elastic.cost import parse_budget
    from star_elastic.elastify import train_config
    from star_elastic.train_config import check_config

    assert KEEP_FULL["full_delta_bits"] == 2 and not hasattr(commands, "KEEP_FULL_SHARDED")
    budgets = [parse_budget(b, PARENTS["llama"]) for b in ("1.0", "0.5")]
    cfg = ElastifyConfig(budgets=["1.0", "0.5"], **lever_config(KEEP_FULL))
    for sharded in (False, True):
        check_config(train_config(cfg, budgets, PARENTS["llama"], 8, cfg.full_anchor), budgets, sharded=sharded,
                     anchor_text=True)


def test_shard_and_router_flags_reach_the_training_config(tmp_path):
    """--shard, --router-estimator and --router-freeze are parsed into the config elastify trains with;
    a wrong value is refused before anything loads, and FSDP without torchrun is one line."""
    from star_elastic.cli import build_parser
    from star_elastic.train import ElasticTrainer, TrainConfig

    args = build_parser().parse_args(["elastify", "m", "--data", "wiki", "--tokens", "64", "--out", "o",
                                      "--shard", "none", "--router-estimator", "straight-through",
                                      "--router-freeze", "0.2", "--router-prior", "0.5", "--compile",
                                      "--router-baseline-rows", "0.25"])
    assert (args.shard, args.router_estimator, args.router_freeze, args.router_prior, args.compile) == (
        "none", "straight-through", 0.2, 0.5, "on")
    assert args.router_baseline_rows == 0.25
    from star_elastic.elastify import train_config
    from star_elastic.elastic.cost import parse_budget

    cfg = ElastifyConfig(budgets=["1.0", "0.5"], router_baseline_rows=0.25)
    budgets = [parse_budget(b, PARENTS["llama"]) for b in cfg.budgets]
    assert train_config(cfg, budgets, PARENTS["llama"], 8, 0.5).router_baseline_rows == 0.25
    assert build_parser().parse_args(["elastify", "m", "--data", "wiki", "--tokens", "64", "--out", "o"]).compile == "auto"
    assert build_parser().parse_args(["demo", "--compile", "off"]).compile == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["elastify", "m", "--data", "wiki", "--tokens", "64", "--out", "o", "--shard", "x"])
    model = Model(PARENTS["llama"])
    with pytest.raises(StarElasticError, match="fsdp"):
        ElasticTrainer(model, Model(PARENTS["llama"]), None, [], torch.zeros(4, 8, dtype=torch.long),
                       TrainConfig(shard="fsdp", seq_len=8, batch_size=4), tmp_path, fixed_specs=[])


def test_a_router_prior_without_the_search_start_is_refused(tmp_path, tokenizer, text):
    cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32, seq_len=32, batch_size=16, calib_batches=1,
                         eval_tokens=64, router_init="cost", router_prior=1.0)
    with pytest.raises(StarElasticError, match="router-init search"):
        elastify(Model(PARENTS["llama"]), tokenizer, str(text), tmp_path / "o", cfg, log=lambda *_: None)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value, message", [
    ("stage1_fraction", 1.5, "--stage1-fraction must be in [0, 1], got 1.5"),
    ("router_freeze", 1.0, "--router-freeze is a share of the steps in [0, 1), got 1"),
    ("router_baseline_rows", 0.0, "--router-baseline-rows is a share of the batch's rows in (0, 1], got 0"),
    ("kd_weights", [1.0], "--kd-weights 1: give one weight per budget (1.0, 0.5)"),
    ("stage2_weights", [1.0, 0.0], "--stage2-weights [1.0, 0.0] give every step to the full budget"),
    ("train_on", "both", "--train-on is 'drawn' or 'argmax', got 'both'"),
    ("full_delta_rank", -2, "--full-delta-rank -2: give a positive rank"),
])
def test_every_training_option_is_refused_in_elastifys_words_before_any_data_is_read(tmp_path, tokenizer, option,
                                                                                     value, message):
    """elastify checks the trainer's options with the trainer's own rules (train_config.check_config) before the data,
    importance and search take their time, naming its flags: a bad --stage1-fraction used to surface, in the
    trainer's field names, only once the trainer was built. The data path here does not exist: the option's
    error comes first."""
    cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=16 * 32, seq_len=32, batch_size=16, **{option: value})
    with pytest.raises(StarElasticError) as got:
        elastify(Model(PARENTS["llama"]), tokenizer, str(tmp_path / "no-such-text"), tmp_path / "o", cfg,
                 log=lambda *_: None)
    assert message in str(got.value)
    assert not (tmp_path / "o").exists()


def test_every_per_budget_list_is_read_in_budgets_order():
    """--stage2-weights, --kd-weights and --budget-lrs are each one value a budget in --budgets order (stage 2's
    weights were read largest budget first while the other two were reordered: `--budgets 0.5,1.0
    --stage2-weights 1,0` gave the full budget stage 2's steps)."""
    from star_elastic.elastic.cost import parse_budget
    from star_elastic.elastify import train_config

    config = PARENTS["llama"]
    cfg = ElastifyConfig(budgets=["0.5", "1.0", "0.75"], stage2_weights=[1.0, 0.0, 0.5], kd_weights=[3.0, 1.0, 2.0],
                         budget_lrs=[3e-4, 1e-4, 2e-4])
    budgets = sorted((parse_budget(b, config) for b in cfg.budgets), key=lambda b: -b.fraction)
    got = train_config(cfg, budgets, config, steps=4, anchor=1.0)
    assert [b.name for b in budgets] == ["1.0", "0.75", "0.5"]
    assert got.stage2_weights == [0.0, 0.5, 1.0]
    assert got.budget_kd_weights == [1.0, 2.0, 3.0] and got.budget_lrs == [1e-4, 2e-4, 3e-4]


def test_all_budgets_and_train_on_reach_the_run_and_its_manifest(tmp_path, tokenizer, text, capsys):
    """`elastify --all-budgets --train-on argmax --budget-lrs ...`: every step trains every budget (the
    manifest's steps per budget say so: each smaller budget every step, the full one by the anchor), the
    config recorded in the manifest holds the options, and rates that do not match the budgets are a
    one-line error before anything is written."""
    from star_elastic import cli, save_pretrained

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    ckpt = tmp_path / "ckpt"
    assert cli.main(["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.75,0.5", "--data", str(text),
                     "--tokens", str(8 * 32 * 3), "--seq-len", "32", "--batch-size", "8", "--calib-batches", "1",
                     "--eval-tokens", "128", "--out", str(ckpt), "--device", "cpu", "--all-budgets",
                     "--train-on", "argmax", "--budget-lrs", "1e-4,3e-4,2e-4"]) == 0
    training = read_manifest(ckpt)["training"]
    assert training["steps_per_budget"] == {"1.0": 3, "0.75": 3, "0.5": 3}
    assert training["config"]["all_budgets"] is True and training["config"]["train_on"] == "argmax"
    assert training["config"]["budget_lrs"] == [1e-4, 3e-4, 2e-4]
    capsys.readouterr()
    assert cli.main(["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.75,0.5", "--data", str(text),
                     "--tokens", "768", "--out", str(tmp_path / "o2"), "--device", "cpu", "--budget-lrs",
                     "1e-4,2e-4"]) == 2
    assert "error: --budget-lrs 0.0001, 0.0002: give one positive rate per budget (1.0, 0.75, 0.5)" in \
        capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert cli.main(["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.75,0.5", "--data", str(text),
                     "--tokens", "768", "--out", str(tmp_path / "o2"), "--device", "cpu", "--budget-lrs",
                     "1e-4,0,1e-4"]) == 2
    assert "error: --budget-lrs 0.0001, 0, 0.0001: give one positive rate per budget" in capsys.readouterr().err


def test_anchor_projection_reaches_the_run_and_is_refused_without_its_anchor(tmp_path, tokenizer, text, capsys):
    """`elastify --anchor-projection`: the manifest's config holds it; without the anchor, or beside
    --budget-lrs, it is a one-line error before anything is written."""
    from star_elastic import cli, save_pretrained

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    common = ["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text), "--seq-len", "32",
              "--batch-size", "8", "--calib-batches", "1", "--eval-tokens", "128", "--device", "cpu"]
    ckpt = tmp_path / "ckpt"
    assert cli.main(common + ["--tokens", str(8 * 32 * 3), "--out", str(ckpt), "--anchor-projection"]) == 0
    assert read_manifest(ckpt)["training"]["config"]["anchor_projection"] is True
    capsys.readouterr()
    for extra, message in ((["--full-anchor", "0"], "needs --full-anchor > 0"),
                           (["--budget-lrs", "1e-4,1e-4"], "drop --budget-lrs")):
        assert cli.main(common + ["--tokens", "768", "--out", str(tmp_path / "o2"), "--anchor-projection"] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "o2").exists()

def test_anchor_data_reaches_the_run_and_bad_values_are_one_line(tmp_path, tokenizer, text, capsys):
    """`elastify --anchor-data self:N` samples the anchor's text from the parent (said, and recorded in the
    manifest), mixed with the training batch by --anchor-mix; a text works as --data does; without the
    anchor, or with a malformed count or share, it is a one-line error before anything is written."""
    from star_elastic import cli, save_pretrained

    torch.manual_seed(0)
    save_pretrained(Model(PARENTS["llama"]), tmp_path / "parent", tokenizer=tokenizer)
    common = ["elastify", str(tmp_path / "parent"), "--budgets", "1.0,0.5", "--data", str(text), "--seq-len", "32",
              "--batch-size", "8", "--calib-batches", "1", "--eval-tokens", "128", "--device", "cpu",
              "--tokens", str(8 * 32 * 3)]
    for i, (spec, mix, budget_mix) in enumerate((("self:512", "0.5", "0.25"), (str(text), "1", "0"))):
        ckpt = tmp_path / f"ckpt{i}"
        assert cli.main(common + ["--out", str(ckpt), "--anchor-data", spec, "--anchor-mix", mix,
                                  "--budget-mix", budget_mix]) == 0
        config = read_manifest(ckpt)["training"]["config"]
        assert config["anchor_data"] == spec and config["anchor_mix"] == float(mix)
        assert config["budget_mix"] == float(budget_mix)  # the smaller budgets' share of it (--budget-mix)
    assert "anchor text: 512 tokens sampled from the parent (16 rows of 32)" in capsys.readouterr().out
    # the delta's finish (--full-delta-finish): run after training, said, and recorded
    ckpt = tmp_path / "finish"
    assert cli.main(common + ["--out", str(ckpt), "--full-delta-rank", "2", "--full-delta-finish", "2"]) == 0
    assert read_manifest(ckpt)["training"]["config"]["full_delta_finish"] == 2
    assert "the delta's finish: 2 steps (512 tokens beside the 768, the full budget's alone)" in capsys.readouterr().out
    # the run's tokens/s is its training steps' (the median), the finish's lighter steps apart
    steps = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    trained = sorted(s["tokens_per_s"] for s in steps if "phase" not in s)
    assert len(trained) == 3 and len(steps) == 5
    assert read_manifest(ckpt)["training"]["tokens_per_s"] == round(trained[1])
    # the delta restored in closed form where training ends (--full-delta-restore): said and recorded
    ckpt = tmp_path / "restore"
    assert cli.main(common + ["--out", str(ckpt), "--full-delta-rank", "2", "--full-delta-restore", "weights"]) == 0
    printed = capsys.readouterr().out
    assert "the delta set from the shared weights' drift (weights) where training ended: rank 2 covers" in printed
    assert 0 < read_manifest(ckpt)["training"]["full_delta_restored"] <= 1
    # and what a larger delta, or this one given out layer by layer, would have covered
    report = read_manifest(ckpt)["training"]["full_delta_restore_report"]
    assert report["rank 2"] == read_manifest(ckpt)["training"]["full_delta_restored"]
    assert report["rank 1"] <= report["rank 2"] <= report["rank 4"] <= report["rank 8"] <= 1
    assert f"at rank 8: {report['rank 8']:.1%}" in printed and "given out layer by layer" in printed
    for extra, message in ((["--anchor-data", "self", "--full-anchor", "0"], "needs --full-anchor > 0"),
                           (["--anchor-data", "self:many"], "TOKENS a positive integer"),
                           (["--anchor-mix", "0.5"], "give anchor text (--anchor-data)"),
                           (["--anchor-data", "self", "--anchor-mix", "0"], "in (0, 1]"),
                           (["--budget-mix", "0.5"], "--budget-mix mixes the anchor's own text"),
                           (["--anchor-data", "self", "--budget-mix", "2"], "--budget-mix 2: the anchor text's share"),
                           (["--full-delta-lr", "1e-3"], "--full-delta-lr 0.001: it is the rate of --full-delta-rank"),
                           (["--full-anchor", "1", "--full-delta-rank", "4", "--full-delta-lr", "-1"], "a rate is positive"),
                           (["--full-delta-finish", "5"], "--full-delta-finish 5: it trains --full-delta-rank's delta"),
                           (["--full-anchor", "1", "--full-delta-rank", "4", "--full-delta-finish", "-1"],
                            "a number of steps"),
                           (["--full-delta-restore", "activations"], "--full-delta-restore activations: it sets")):
        assert cli.main(common + ["--out", str(tmp_path / "o2")] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "o2").exists()


def test_an_interrupted_elastify_resumes_on_its_anchor_text_without_sampling_again(tmp_path, tokenizer, text,
                                                                                  monkeypatch):
    """`elastify --anchor-data self` stopped mid-training: run again, it reads the rows its state kept (a
    new sample costs minutes at Nano and, on CUDA, is other text) and trains on them from where it stopped."""
    from star_elastic import elastify as elastify_module
    from star_elastic.train import ElasticTrainer
    from star_elastic.train_state import saved_anchor_rows

    cfg = ElastifyConfig(budgets=["1.0", "0.5"], tokens=8 * 32 * 4, seq_len=32, batch_size=8, calib_batches=1,
                         eval_tokens=128, lr=1e-3, anchor_data="self:512")
    run, load_state = ElasticTrainer.run, ElasticTrainer.load_state

    def power_cut(self, *a, **k):
        run(self, progress=False, stop_after=2)  # saves the state
        raise RuntimeError("power cut")

    monkeypatch.setattr(ElasticTrainer, "run", power_cut)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="power cut"):
        elastify(Model(PARENTS["llama"]), tokenizer, str(text), tmp_path / "ckpt", cfg, log=lambda *_: None)
    kept = saved_anchor_rows(tmp_path / ".ckpt.train")
    assert kept is not None and kept.shape == (16, 32)
    monkeypatch.setattr(ElasticTrainer, "run", run)

    def sample_again(*a, **k):
        raise AssertionError("sampled again")

    seen = []

    def resume(self):
        resumed = load_state(self)
        seen.append((resumed, self.step, self.anchor_batches.rows.clone()))
        return resumed

    monkeypatch.setattr(elastify_module, "anchor_text", sample_again)
    monkeypatch.setattr(ElasticTrainer, "load_state", resume)
    lines = []
    torch.manual_seed(0)
    elastify(Model(PARENTS["llama"]), tokenizer, str(text), tmp_path / "ckpt", cfg, log=lines.append)
    assert f"anchor text: the interrupted run's 512 tokens (in {tmp_path / '.ckpt.train'})" in lines
    assert "resuming training at step 2" in lines
    assert seen[0][:2] == (True, 2) and torch.equal(seen[0][2], kept)
    assert (tmp_path / "ckpt").is_dir() and not (tmp_path / ".ckpt.train").exists()

