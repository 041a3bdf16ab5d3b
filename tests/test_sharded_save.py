"""The final checkpoint written from an FSDP2-sharded model (issue 11, item 4): 2 gloo ranks on the
CPU gather it tensor by tensor, rank 0 writes stock Hugging Face shards + index, the same files,
byte for byte, as `save_pretrained` of the unsharded model; transformers and our loaders read them;
a write that fails midway leaves nothing behind and no rank waiting."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import entries, free_port, gloo_group, llama_config, randomize_, rel_err
from star_elastic import hf, parallel
from star_elastic.elastic.checkpoint import load_elastic, read_manifest, save_elastic
from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router, RouterConfig
from star_elastic.errors import StarElasticError
from star_elastic.hf import config_from_hf
from star_elastic.model import Model, ModelConfig

from test_hf import NEMOTRON, hf_logits

pytestmark = pytest.mark.skipif(not parallel.available(), reason="this torch has no FSDP2")

SMALL = 40_000  # bytes per file: several shards for these models
# an odd vocabulary: the embeddings and LM head split unevenly over 2 ranks (FSDP2 pads the last)
CONFIGS = {
    "nemotron_h": ModelConfig(**{**NEMOTRON.to_dict(), "vocab_size": 63}),  # expert stacks: one tensor per expert
    "llama-tied": config_from_hf(llama_config(vocab_size=63, tie_word_embeddings=True).to_dict()),
}
BUDGETS = ["1.0", "0.5"]


def whole(name: str) -> Model:
    return randomize_(Model(CONFIGS[name]), seed=3).eval()


def router_for(cfg: ModelConfig) -> Router:
    torch.manual_seed(5)  # every rank and the test build the same router
    return Router(cfg, [parse_budget(b, cfg) for b in BUDGETS], RouterConfig(hidden_dim=16, width_choices=4))


def sharded(name: str) -> Model:
    return parallel.shard_model(whole(name), mixed_precision=False).eval()


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what the test checks
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank, world, port, out, tmp):
    with gloo_group(rank, world, port):
        got = {}
        x = torch.randint(0, 63, (2, 11), generator=torch.Generator().manual_seed(1))
        for name in CONFIGS:
            model = sharded(name)
            stats = {}
            hf.save_pretrained(model, f"{tmp}/{name}-sharded", max_shard_bytes=SMALL, stats=stats)
            hf.save_pretrained(model, f"{tmp}/{name}-one")  # fits one file: model.safetensors as ever
            with torch.no_grad():
                got[name] = {"logits": model(x), "stats": stats}
        got["x"] = x

        # the elastic checkpoint: every rank calls save_elastic, rank 0 writes
        model = sharded("nemotron_h")
        record = {"sharding": "fsdp2"}
        save_elastic(model, router_for(model.config), [parse_budget(b, model.config) for b in BUDGETS],
                     f"{tmp}/elastic", extra={"training": {"parallel": record}}, max_shard_bytes=SMALL, record=record)
        # ... read back sharded by every rank (sharded_load.py): the same whole weights
        from star_elastic.sharded_load import load_sharded

        back = parallel.full_state_dict(load_sharded(f"{tmp}/elastic", torch.float32, "cpu"), rank0_only=False)
        want = whole("nemotron_h").state_dict()
        got["load_sharded_equal"] = back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)

        # a write that fails after its first shard (disk full, say): every rank raises, nothing is left
        real, calls = hf._write_file, []

        def failing(tensors, f):
            calls.append(f.name)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            real(tensors, f)

        if rank == 0:
            hf._write_file = failing
        got["failed_save"] = _error(lambda: hf.save_pretrained(model, f"{tmp}/failed", max_shard_bytes=SMALL))
        calls.clear()
        got["failed_elastic"] = _error(lambda: save_elastic(
            model, router_for(model.config), [parse_budget(b, model.config) for b in BUDGETS], f"{tmp}/failed-elastic",
            max_shard_bytes=SMALL))
        hf._write_file = real
        got["calls"] = len(calls)
        # rank 0 cannot even start (its output's parent is a file): every rank raises at once, none waits
        blocker = f"{tmp}/a-file"
        if rank == 0:
            with open(blocker, "w") as f:
                f.write("not a directory")
        dist.barrier()
        got["unstartable_save"] = _error(lambda: hf.save_pretrained(model, f"{blocker}/ckpt", max_shard_bytes=SMALL))
        got["unstartable_elastic"] = _error(lambda: save_elastic(
            model, router_for(model.config), [parse_budget(b, model.config) for b in BUDGETS], f"{blocker}/eckpt",
            max_shard_bytes=SMALL))
        # the ranks are still in step: the next collective write works
        hf.save_pretrained(model, f"{tmp}/after-failure", max_shard_bytes=SMALL)
        dist.barrier()
        if rank == 0:
            torch.save(got, out)
        else:
            torch.save({k: got[k] for k in ("failed_save", "failed_elastic", "unstartable_save", "unstartable_elastic")},
                       f"{out}.rank1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_save")
    mp.spawn(_worker, args=(2, free_port(), str(tmp / "got.pt"), str(tmp)), nprocs=2, join=True)
    return tmp, torch.load(tmp / "got.pt", weights_only=False), torch.load(tmp / "got.pt.rank1", weights_only=False)


def weight_files(directory) -> list[str]:
    return [f for f in entries(directory) if f.startswith("model")]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_model_writes_the_unsharded_save_pretrained_files(runs, tmp_path, name):
    tmp, got, _ = runs
    ref = hf.save_pretrained(whole(name), tmp_path / "ref", max_shard_bytes=SMALL)
    out = tmp / f"{name}-sharded"
    files = weight_files(out)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in files and "model.safetensors" not in shards
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    assert entries(out) == entries(ref)  # config.json too; no temporary file left
    for f in entries(ref):  # the same names, dtypes, tied embeddings once, metadata: byte for byte
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in hf.read_safetensors([out / s for s in shards]).values())
    # rank 0 held at most one file's tensors and the tensor being gathered
    largest = max(t.numel() * t.element_size() for t in whole(name).state_dict().values())
    assert got[name]["stats"]["files"] == shards and 0 < got[name]["stats"]["peak_bytes"] <= SMALL + 2 * largest


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_and_our_load_read_the_sharded_directory(runs, name):
    tmp, got, _ = runs
    out, x = tmp / f"{name}-sharded", got["x"]
    want = got[name]["logits"]  # the sharded model's own forward
    assert rel_err(hf_logits(out, x), want) < 1e-4
    with torch.no_grad():
        assert rel_err(hf.load(out)(x), want) < 1e-6


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_sharded_model_that_fits_one_file_writes_model_safetensors(runs, name):
    tmp, got, _ = runs
    assert weight_files(tmp / f"{name}-one") == ["model.safetensors"]


def test_load_elastic_reads_a_sharded_elastic_checkpoint(runs, tmp_path):
    tmp, got, _ = runs
    path = tmp / "elastic"
    manifest = read_manifest(path)
    shards = [f for f in weight_files(path) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and (path / "model.safetensors.index.json").exists()
    assert set(manifest["files"]) == set(shards) | {"router.safetensors", "model.safetensors.index.json"} \
        == set(manifest["sizes"])  # the index too: loaders read it
    ck = load_elastic(path, verify=True)  # every shard's sha256
    want, have = whole("nemotron_h").state_dict(), ck.model.state_dict()
    assert have.keys() == want.keys() and all(torch.equal(have[k], want[k]) for k in want)
    assert got["load_sharded_equal"]
    # the same checkpoint as one process writes from the whole model
    cfg = CONFIGS["nemotron_h"]
    ref = save_elastic(whole("nemotron_h"), router_for(cfg), [parse_budget(b, cfg) for b in BUDGETS],
                       tmp_path / "ref", max_shard_bytes=SMALL)
    assert entries(ref) == entries(path)
    mine = read_manifest(ref)
    assert manifest["files"] == mine["files"] and manifest["budgets"] == mine["budgets"]
    assert manifest["parent"] == mine["parent"]
    record = manifest["training"]["parallel"]
    assert record["checkpoint_write"] == "gathered tensor by tensor on rank 0"
    assert 0 < record["checkpoint_write_peak_bytes"] < sum(manifest["sizes"][s] for s in shards)
    # a budget streamed out of the shards (what star-elastic slice --budget runs)
    from star_elastic.elastic.checkpoint import budget_spec
    from star_elastic.elastic.stream import stream_slice

    stream_slice(path, budget_spec(manifest, "0.5"), tmp_path / "half", progress=False)
    assert hf.load(tmp_path / "half").num_parameters() == next(b["params"] for b in manifest["budgets"]
                                                              if b["name"] == "0.5")


def test_a_write_failing_midway_leaves_nothing_and_every_rank_raises(runs):
    tmp, got, other = runs
    assert got["failed_save"].startswith("OSError") and "No space left" in got["failed_save"]
    assert got["failed_elastic"].startswith("OSError")
    assert got["calls"] == 2  # it failed after a complete first shard
    for msg in (other["failed_save"], other["failed_elastic"]):
        assert msg.startswith("StarElasticError") and "rank 0" in msg and "\n" not in msg
    assert not (tmp / "failed").exists() and not (tmp / "failed-elastic").exists()
    assert not any(p.name.startswith(".failed") for p in tmp.iterdir())  # no staging directory left
    assert weight_files(tmp / "after-failure") == weight_files(tmp / "nemotron_h-sharded")


# ----------------------------------------------------------------------------- one process

def test_a_small_plain_model_still_writes_one_model_safetensors(tmp_path):
    stats = {}
    out = hf.save_pretrained(whole("llama-tied"), tmp_path / "ckpt", stats=stats)
    assert weight_files(out) == ["model.safetensors"] and stats["files"] == ["model.safetensors"]
    assert entries(tmp_path) == ["ckpt"]


def test_a_plain_write_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    real, calls = hf._write_file, []

    def failing(tensors, f):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, f)

    monkeypatch.setattr(hf, "_write_file", failing)
    with pytest.raises(OSError):
        hf.save_pretrained(whole("nemotron_h"), tmp_path / "ckpt", max_shard_bytes=SMALL)
    assert len(calls) == 2 and entries(tmp_path) == []


def test_an_fp8_model_is_not_written_from_shards(monkeypatch):
    """FP8 quantises whole tensors at once: from shards, a one-line error before any gather."""
    from star_elastic import fp8

    monkeypatch.setattr(parallel, "is_sharded", lambda m: True)
    config = {"quantization_config": {"quant_method": fp8.QUANT_METHOD}}
    with pytest.raises(StarElasticError, match="FP8"):
        hf.save_pretrained(whole("llama-tied"), "unused", config=config)


def test_a_replaced_shard_index_is_caught(runs, tmp_path):
    """The index decides which shards a load reads, so the manifest checks it like a weight file."""
    import shutil

    tmp, _, _ = runs
    path = tmp_path / "copy"
    shutil.copytree(tmp / "elastic", path)
    index = path / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"total_size"', '"total_size" ', 1))  # same meaning, other bytes
    with pytest.raises(StarElasticError, match="index.json"):
        load_elastic(path, verify=True)


def test_a_rank_0_that_cannot_start_writing_leaves_no_rank_waiting(runs):
    """Rank 0 fails before the first gather (its output cannot be created): it raises its own error and
    every other rank a one-line one, at once, not at the backend's timeout; the next write still works."""
    tmp, got, other = runs
    for key in ("unstartable_save", "unstartable_elastic"):
        assert got[key].split(":")[0] in ("NotADirectoryError", "FileExistsError", "OSError"), got[key]
        assert other[key].startswith("StarElasticError") and "rank 0" in other[key] and "\n" not in other[key]
    assert weight_files(tmp / "after-failure") == weight_files(tmp / "nemotron_h-sharded")
