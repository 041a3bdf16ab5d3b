"""Big parents never whole on one device (issue 11): a checkpoint loaded straight into FSDP2 shards
(star_elastic/sharded_load.py, parallel.meta_sharded) with 2 gloo ranks on the CPU. The gathered
weights equal the saved ones bit for bit, the sharded forward the whole model's, names, tied
embeddings and buffers come out as `hf.load` gives them, and each rank holds and reads about half."""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open as real_safe_open
from safetensors.torch import load_file, save_file

from star_elastic import hf, parallel, sharded_load
from star_elastic.model import Model, ModelConfig

from conftest import free_port, gloo_group, one_line_error, randomize_

pytestmark = pytest.mark.skipif(not parallel.available(), reason="this torch has no FSDP2")

# odd sizes, so that the two ranks' shards differ in length (FSDP2 pads the second): vocabulary 65,
# 5 experts, 3 Mamba heads
NEMOTRON = ModelConfig(vocab_size=65, hidden_size=32, layer_types="M*-E", num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=48, mamba_num_heads=3, mamba_head_dim=8, ssm_state_size=8,
                       n_groups=1, chunk_size=8, n_routed_experts=5, num_experts_per_tok=2, moe_intermediate_size=16,
                       moe_shared_expert_intermediate_size=24)
LLAMA = ModelConfig(family="llama", vocab_size=65, hidden_size=32, layer_types="**", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=48, mlp_gated=True, mlp_act="silu",
                    rope_theta=10000.0, tie_word_embeddings=True)
CONFIGS = {"nemotron": NEMOTRON, "llama": LLAMA}
X = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(1))


class _Counting:
    """safe_open that counts the bytes of every tensor (or slice) read through it."""
    read = 0

    def __init__(self, f, framework):
        self.inner = real_safe_open(f, framework=framework)

    def __enter__(self):
        self.h = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def _count(self, t):
        _Counting.read += t.numel() * t.element_size()
        return t

    def get_tensor(self, name):
        return self._count(self.h.get_tensor(name))

    def get_slice(self, name):
        return _CountingSlice(self, self.h.get_slice(name))


class _CountingSlice:
    def __init__(self, opened, inner):
        self.opened, self.inner = opened, inner

    def __getitem__(self, rows):
        return self.opened._count(self.inner[rows])


class _Failing(_Counting):
    def get_slice(self, name):
        raise OSError("injected read failure")


def _worker(rank, world, port, tmp):
    got = {}
    with gloo_group(rank, world, port):
        for family in CONFIGS:
            for layout in ("single", "shards"):
                path = f"{tmp}/{family}-{layout}"
                ref = hf.load(path, device="cpu")  # the normal loader: the whole model
                _Counting.read = 0
                sharded_load.safe_open = _Counting
                m = sharded_load.load_sharded(path, device="cpu")
                sharded_load.safe_open = real_safe_open
                local = sum(p.to_local().numel() * p.element_size() for p in m.parameters())
                with torch.no_grad():
                    logits = m(X)
                r = {"full": parallel.full_state_dict(m, rank0_only=False),
                     "names": [n for n, _ in m.named_parameters()], "ref_names": [n for n, _ in ref.named_parameters()],
                     "keys": list(m.state_dict()), "ref_keys": list(ref.state_dict()),
                     "tied": m.lm_head.weight is m.embed.weight,
                     "buffers": {n: b.clone() for n, b in m.named_buffers()},
                     "ref_buffers": {n: b.clone() for n, b in ref.named_buffers()},
                     "logits_diff": (logits - ref(X)).abs().max().item(),
                     "local_bytes": local, "read_bytes": _Counting.read,
                     "full_bytes": sum(p.numel() * p.element_size() for p in ref.parameters()),
                     "file_bytes": sum(os.path.getsize(f) for f in hf._weight_files(Path(path))),
                     "sharded": parallel.is_sharded(m) and all(parallel.is_sharded(l) for l in m.model.layers)}
                # another dtype: as hf.load casts (the MoE router stays float32)
                bf16 = sharded_load.load_sharded(path, dtype=torch.bfloat16, device="cpu")
                r["bf16"] = parallel.full_state_dict(bf16, rank0_only=False)
                r["ref_bf16"] = hf.load(path, dtype=torch.bfloat16, device="cpu").state_dict()
                got[(family, layout)] = r

            # the constructor's weights, one unit at a time, without the checkpoint
            built = parallel.meta_sharded(CONFIGS[family], torch.float32, "cpu")
            parallel.init_sharded_(built, seed=3)
            got[(family, "init")] = parallel.full_state_dict(built, rank0_only=False)

        # the trainer's shard_model keeps a model loaded sharded with its policy, refuses another
        m = sharded_load.load_sharded(f"{tmp}/nemotron-single", mixed_precision=True)
        assert parallel.shard_model(m, mixed_precision=True) is m
        try:
            parallel.shard_model(m, mixed_precision=False)
            got["policy_error"] = None
        except RuntimeError as e:
            got["policy_error"] = str(e)

        # a rank that cannot read its rows: every rank raises (none is left waiting in a collective)
        if rank == 1:
            sharded_load.safe_open = _Failing
        try:
            sharded_load.load_sharded(f"{tmp}/llama-shards")
            got["read_error"] = None
        except Exception as e:  # noqa: BLE001 - the test checks which
            got["read_error"] = (type(e).__name__, str(e))
        torch.save(got, f"{tmp}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four checkpoints (NemotronH and a tied Llama; one file, and shards + index), loaded by 2 gloo
    ranks in one spawn: (the saved models, each rank's results)."""
    tmp = tmp_path_factory.mktemp("meta_load")
    saved = {}
    for family, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = randomize_(Model(cfg)).eval()
        saved[family] = model
        hf.save_pretrained(model, tmp / f"{family}-single")
        total = sum(p.numel() * 4 for p in model.parameters())
        hf.save_pretrained(model, tmp / f"{family}-shards", max_shard_bytes=total // 2)
        assert (tmp / f"{family}-shards" / "model.safetensors.index.json").exists()
    mp.spawn(_worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    return saved, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


CASES = [(f, l) for f in CONFIGS for l in ("single", "shards")]


@pytest.mark.parametrize("family,layout", CASES)
def test_gathered_weights_are_the_saved_ones_bit_for_bit(runs, family, layout):
    saved, ranks = runs
    want = saved[family].state_dict()
    for got in ranks:
        full = got[(family, layout)]["full"]
        assert full.keys() == want.keys()
        for k, v in want.items():
            assert full[k].dtype == v.dtype and torch.equal(full[k], v), k


@pytest.mark.parametrize("family,layout", CASES)
def test_names_ties_buffers_and_logits_are_the_normal_loaders(runs, family, layout):
    for got in runs[1]:
        r = got[(family, layout)]
        assert r["sharded"]
        assert r["names"] == r["ref_names"] and r["keys"] == r["ref_keys"]
        assert r["tied"] == (family == "llama")
        assert r["buffers"].keys() == r["ref_buffers"].keys()  # inv_freq (llama), router correction bias
        for n, b in r["ref_buffers"].items():
            assert r["buffers"][n].dtype == b.dtype and torch.equal(r["buffers"][n], b), n
        assert r["logits_diff"] < 1e-5


@pytest.mark.parametrize("family,layout", CASES)
def test_each_rank_holds_and_reads_about_half(runs, family, layout):
    ranks = [got[(family, layout)] for got in runs[1]]
    for r in ranks:
        assert r["local_bytes"] < 0.6 * r["full_bytes"], (r["local_bytes"], r["full_bytes"])
        assert r["read_bytes"] < 0.6 * r["file_bytes"], (r["read_bytes"], r["file_bytes"])
    # the shards are the model: together every parameter byte, once (FSDP2's padding aside)
    assert sum(r["local_bytes"] for r in ranks) == ranks[0]["full_bytes"]


@pytest.mark.parametrize("family,layout", CASES)
def test_another_dtype_is_cast_as_hf_load_casts(runs, family, layout):
    saved, ranks = runs
    for got in ranks:
        r = got[(family, layout)]
        assert r["bf16"].keys() == r["ref_bf16"].keys()
        for k, v in r["ref_bf16"].items():
            assert r["bf16"][k].dtype == v.dtype, k
            if ".mixer.gate." in k:  # the MoE router stays float32, its stored values unrounded, on both paths
                assert v.dtype == torch.float32 and torch.equal(r["bf16"][k], saved[family].state_dict()[k]), k
            assert torch.equal(r["bf16"][k], v), k


@pytest.mark.parametrize("family", CONFIGS)
def test_init_sharded_gives_the_constructors_weights(runs, family):
    torch.manual_seed(3)
    want = Model(CONFIGS[family]).state_dict()
    for got in runs[1]:
        full = got[(family, "init")]
        assert full.keys() == want.keys() and all(torch.equal(full[k], v) for k, v in want.items())


def test_the_trainers_shard_model_takes_it_as_it_is(runs):
    for got in runs[1]:
        assert "already sharded with mixed_precision=True" in got["policy_error"]


def test_a_rank_that_cannot_read_makes_every_rank_raise(runs):
    first, second = (got["read_error"] for got in runs[1])
    assert second[0] == "StarElasticError" and "injected read failure" in second[1] and "\n" not in second[1]
    assert "model-0000" in second[1]  # names the file
    assert first[0] == "StarElasticError" and "another rank" in first[1]


def test_local_rows_are_torch_chunks():
    for n in range(10):
        for ranks in range(1, 6):
            chunks = torch.arange(n).chunk(ranks) if n else ()
            for rank in range(ranks):
                want = chunks[rank].tolist() if rank < len(chunks) else []
                assert torch.arange(n)[parallel.local_rows(n, ranks, rank)].tolist() == want, (n, ranks, rank)


# ----------------------------------------------------------------------------- one-line errors, before any collective

@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    out = hf.save_pretrained(randomize_(Model(NEMOTRON)), tmp_path / "ckpt")
    return out, out / "model.safetensors"


def test_a_missing_tensor_is_named(ckpt):
    path, f = ckpt
    tensors = load_file(f)
    del tensors["backbone.layers.1.mixer.k_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    one_line_error(lambda: sharded_load.load_sharded(path), "missing", "model.layers.1.mixer.k_proj.weight")


def test_a_misshapen_tensor_is_named(ckpt):
    path, f = ckpt
    tensors = load_file(f)
    tensors["backbone.layers.0.mixer.A_log"] = torch.zeros(4)
    save_file(tensors, f, metadata={"format": "pt"})
    one_line_error(lambda: sharded_load.load_sharded(path), "model.layers.0.mixer.A_log", "shape")


def test_a_truncated_file_is_named(ckpt):
    path, f = ckpt
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    one_line_error(lambda: sharded_load.load_sharded(path), "truncated", str(f))


def test_without_torch_distributed_it_says_so(ckpt):
    one_line_error(lambda: sharded_load.load_sharded(ckpt[0]), "torch.distributed")


# ----------------------------------------------------------------------------- into the trainer

def _train_worker(rank, world, port, tmp):
    from test_train import make
    from star_elastic.train import ElasticTrainer

    with gloo_group(rank, world, port):
        got = {}
        for how in ("whole", "loaded sharded"):
            model, teacher, router, budgets, rows, cfg, heldout = make(shard="fsdp", steps=3, batch=4, clip=0.01)
            if how == "loaded sharded":  # the same parent, never whole (make's model is what was saved)
                model = sharded_load.load_sharded(f"{tmp}/parent").train()
                teacher = sharded_load.load_sharded(f"{tmp}/parent")
            t = ElasticTrainer(model, teacher, router, budgets, rows, cfg, f"{tmp}/{how}", heldout=heldout)
            got[how] = ([l["total"] for l in t.run(progress=False)], parallel.full_state_dict(t.model))
        if rank == 0:
            torch.save(got, f"{tmp}/train.pt")


def test_a_parent_loaded_sharded_trains_as_a_whole_one(tmp_path):
    """ElasticTrainer (shard="fsdp") takes a student and teacher loaded sharded as they are: the same
    losses and weights as when it shards whole models itself."""
    from test_train import make

    hf.save_pretrained(make()[0], tmp_path / "parent")
    mp.spawn(_train_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "train.pt", weights_only=False)
    (losses, weights), (sharded_losses, sharded_weights) = got["whole"], got["loaded sharded"]
    assert sharded_losses == losses
    assert all(torch.equal(sharded_weights[k], v) for k, v in weights.items())
