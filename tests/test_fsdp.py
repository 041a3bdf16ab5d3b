"""Sharded elastic training (FSDP2, star_elastic/parallel.py) with 2 gloo ranks on the CPU: the same
losses, gradient norms and weights as one process, exact resume, and whole weights out of the shards."""


import pytest
import torch
import torch.multiprocessing as mp

from conftest import assert_close_dicts, free_port, gloo_group
from star_elastic import parallel
from star_elastic.elastic.masking import masked
from star_elastic.elastic.spec import ElasticSpec
from star_elastic.errors import StarElasticError
from star_elastic.model import Model, ModelConfig
from star_elastic.train import ElasticTrainer

from test_train import CFG, make, trainer

STEPS, HALF = 6, 3
KW = dict(steps=STEPS, batch=4, clip=0.01)  # a low clip: most steps clip (the student starts as the teacher)
TIED = ModelConfig(family="llama", vocab_size=64, hidden_size=32, layer_types="**", num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, intermediate_size=48, mlp_gated=True, mlp_act="silu",
                   rope_theta=10000.0, tie_word_embeddings=True)

pytestmark = pytest.mark.skipif(not parallel.available(), reason="this torch has no FSDP2")


def _sharded(tmp, name, **kw):
    model, teacher, router, budgets, rows, cfg, heldout = make(shard="fsdp", **KW, **kw)
    return ElasticTrainer(model, teacher, router, budgets, rows, cfg, f"{tmp}/{name}", heldout=heldout)


def _worker(rank, world, port, out, tmp):
    with gloo_group(rank, world, port):
        got = {}
        # 1. masks on sharded modules: the same logits and gradients as the whole model under the same
        # masks, a dropped layer (whose block runs no forward) included
        torch.manual_seed(0)
        whole = Model(CFG)
        sharded = parallel.shard_model(Model(CFG), mixed_precision=False)
        parallel.load_full_state_dict(sharded, whole.state_dict())
        x = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        spec = ElasticSpec(hidden_size=24, layers=[0, 1, 2, 4], num_key_value_heads=1, mamba_num_heads=2,
                           intermediate_size=32, n_routed_experts=4, moe_intermediate_size=8)
        with masked(whole, spec.masks(CFG)):
            want = whole(x)
            want.square().mean().backward()
        with masked(sharded, spec.masks(CFG)):
            logits = sharded(x)
            logits.square().mean().backward()
        got["masked_max_diff"] = (logits - want).abs().max().item()
        assert sharded.model.layers[3].mixer.in_proj.weight.grad is None  # the dropped layer's
        grads = {n: parallel.full_tensor(p.grad) for n, p in sharded.named_parameters() if p.grad is not None}
        assert grads.keys() == {n for n, p in whole.named_parameters() if p.grad is not None}
        got["masked_grad_max_diff"] = max((grads[n] - p.grad).abs().max().item() for n, p in whole.named_parameters()
                                          if p.grad is not None)

        # 1b. the GPU's mixed precision, under CPU bf16 autocast: blocks gathered in bf16, the root (embeddings,
        # LM head) in fp32, so the residual stream is fp32; fp32 master weights and gradients
        whole.zero_grad()
        mixed = parallel.shard_model(Model(CFG), mixed_precision=True)
        parallel.load_full_state_dict(mixed, whole.state_dict())
        seen = {}

        def record(name):  # the norm's input (the residual stream) and its weight as gathered
            def hook(module, args, output):
                seen[name] = (args[0].dtype, module.weight.dtype)
            return hook
        for i, layer in enumerate(mixed.model.layers):
            layer.norm.register_forward_hook(record(f"block {i}"))
        mixed.final_norm.register_forward_hook(record("final"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = whole(x)
            want.square().mean().backward()
            logits = mixed(x)
            logits.square().mean().backward()
        assert seen.pop("final") == (torch.float32, torch.float32)
        assert set(seen.values()) == {(torch.float32, torch.bfloat16)}
        assert {p.dtype for p in mixed.parameters()} == {p.grad.dtype for p in mixed.parameters()} == {torch.float32}
        got["mixed_logits_rel"] = ((logits - want).norm() / want.norm()).item()
        got["mixed_grad_rel"] = max(((parallel.full_tensor(p.grad) - q.grad).norm() / q.grad.norm()).item()
                                    for p, q in zip(mixed.parameters(), whole.parameters()))

        # 2. tied embeddings: sharded in the root unit, gathered and copied back whole
        torch.manual_seed(0)
        tied = Model(TIED)
        ref = {k: v.clone() for k, v in tied.state_dict().items()}
        parallel.shard_model(tied, mixed_precision=False)
        assert tied.lm_head.weight is tied.embed.weight
        plain = parallel.unsharded_copy(tied)
        assert not parallel.is_sharded(plain) and plain.lm_head.weight is plain.embed.weight
        assert all(torch.equal(plain.state_dict()[k], v) for k, v in ref.items())
        with torch.no_grad():
            got["tied_logits_diff"] = (plain(x) - tied(x)).abs().max().item()

        # 3. an uninterrupted sharded run
        t = _sharded(tmp, "straight", eval_every=HALF, eval_tokens=200)
        assert t.shard == "fsdp" and parallel.is_sharded(t.model) and parallel.is_sharded(t.teacher)
        assert t.distribution["sharding"] == "fsdp2" and t.distribution["ranks"] == world
        params = list(t.model.parameters())
        local = sum(p.to_local().numel() for p in params)
        total = sum(p.numel() for p in params)
        assert not any(p.requires_grad for p in t.teacher.parameters())
        logs = t.run(progress=False)
        moments = [s["exp_avg"] for p, s in t.opt.state.items() if p in set(params)]
        assert moments and all(isinstance(m, parallel.DTensor) for m in moments)
        straight = parallel.full_state_dict(t.model)
        plain = t.full_model()
        assert not parallel.is_sharded(plain)
        if rank == 0:
            assert all(torch.equal(plain.state_dict()[k].cpu(), v) for k, v in straight.items())
        got.update(losses=[l["total"] for l in logs], grad_norms=[l["grad_norm"] for l in logs],
                   budgets=[l["budget"] for l in logs], evals=[l["eval"] for l in logs if "eval" in l],
                   weights=straight, local=local, total=total,
                   router={k: v.clone() for k, v in t.router.state_dict().items()})

        # 4. killed after HALF steps and resumed by a fresh trainer (same init, then the checkpoint)
        _sharded(tmp, "resumed").run(progress=False, stop_after=HALF)
        second = _sharded(tmp, "resumed")
        assert second.load_state() and second.step == HALF
        rest = second.run(progress=False)
        got.update(resumed_losses=[l["total"] for l in rest], resumed=parallel.full_state_dict(second.model))

        # 5. a sharded run resumes the state a one-process run wrote (the same files)
        third = _sharded(tmp, "from_single")
        third.out = type(third.out)(f"{tmp}/single_half")
        assert third.load_state() and third.step == HALF
        rest = third.run(progress=False)
        got.update(cross_losses=[l["total"] for l in rest], cross=parallel.full_state_dict(third.model))
        if rank == 0:
            torch.save(got, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (the reference) and 2 gloo ranks sharded, one spawn for every test below."""
    tmp = tmp_path_factory.mktemp("fsdp")
    single = trainer(tmp, "single", eval_every=HALF, eval_tokens=200, **KW)
    logs = single.run(progress=False)
    trainer(tmp, "single_half", **KW).run(progress=False, stop_after=HALF)
    out = tmp / "fsdp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out), str(tmp)), nprocs=2, join=True)
    return single, logs, torch.load(out, weights_only=False)


def test_masks_work_on_sharded_modules(runs):
    got = runs[2]
    assert got["masked_max_diff"] < 1e-5 and got["masked_grad_max_diff"] < 1e-6 and got["tied_logits_diff"] < 1e-5


def test_mixed_precision_gathers_blocks_in_bf16_and_keeps_fp32_masters(runs):
    got = runs[2]
    assert got["mixed_logits_rel"] < 1e-2 and got["mixed_grad_rel"] < 5e-2, (got["mixed_logits_rel"], got["mixed_grad_rel"])


def test_two_sharded_ranks_equal_one_process(runs):
    single, logs, got = runs
    assert got["local"] < 0.6 * got["total"]  # each rank holds about half the weights
    assert got["budgets"] == [l["budget"] for l in logs]
    assert got["losses"] == pytest.approx([l["total"] for l in logs], rel=1e-4)
    # clipping under FSDP sees the global gradient norm, not this rank's shard's
    assert got["grad_norms"] == pytest.approx([l["grad_norm"] for l in logs], rel=1e-4)
    assert sum(n > single.cfg.clip for n in got["grad_norms"]) >= 3  # so clipping did act
    assert_close_dicts(got["weights"], {k: v for k, v in single.model.state_dict().items()})
    assert_close_dicts(got["router"], single.router.state_dict())
    want = [l["eval"] for l in logs if "eval" in l]
    assert len(got["evals"]) == len(want) >= 1
    for g, w in zip(got["evals"], want):
        for name in w:
            assert g[name]["perplexity"] == pytest.approx(w[name]["perplexity"], rel=1e-4)


def test_sharded_resume_is_exact(runs):
    _, _, got = runs
    assert got["resumed_losses"] == got["losses"][HALF:]  # bit for bit, through torch.distributed.checkpoint (each rank its shards)
    assert got["resumed"].keys() == got["weights"].keys()
    assert all(torch.equal(got["resumed"][k], v) for k, v in got["weights"].items())


def test_a_sharded_run_resumes_a_one_process_state(runs):
    single, logs, got = runs
    assert got["cross_losses"] == pytest.approx([l["total"] for l in logs[HALF:]], rel=1e-4)
    assert_close_dicts(got["cross"], single.model.state_dict())


def test_sharding_modes_are_checked(tmp_path):
    assert trainer(tmp_path, "one").shard == "none"  # "auto" with one process: nothing to shard
    with pytest.raises(StarElasticError, match="torch.distributed"):
        trainer(tmp_path, "x", shard="fsdp")
    with pytest.raises(StarElasticError, match="'auto', 'none' or 'fsdp'"):
        trainer(tmp_path, "y", shard="zero3")
