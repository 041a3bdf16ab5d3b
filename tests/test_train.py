"""Elastic training loop: it learns, resumes exactly, and 2 gloo ranks equal 1 process."""

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from star_elastic.elastic.cost import parse_budget
from star_elastic.elastic.router import Router, RouterConfig
from star_elastic.model import Model, ModelConfig
from star_elastic.train import ElasticTrainer, TrainConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, layer_types="M*EM-", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                  n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                  moe_shared_expert_intermediate_size=16)
BUDGETS = ["1.0", "0.75", "0.5"]


def make(seed=0, steps=8, batch=4, **overrides):
    torch.manual_seed(seed)
    model = Model(CFG)
    teacher = copy.deepcopy(model)
    budgets = [parse_budget(b, CFG) for b in BUDGETS]
    router = Router(CFG, budgets, RouterConfig(hidden_dim=16, width_choices=4))
    g = torch.Generator().manual_seed(123)
    # data with structure (a repeating pattern plus noise), so that there is something to learn
    base = torch.arange(64).repeat(40)
    noise = torch.randint(0, 64, base.shape, generator=g)
    stream = torch.where(torch.rand(base.shape, generator=g) < 0.2, noise, base)
    rows = stream[: (stream.numel() // 32) * 32].view(-1, 32)
    cfg = TrainConfig(steps=steps, batch_size=batch, seq_len=16, stage2_seq_len=32, warmup_steps=2,
                      lr=3e-3, router_lr=1e-2, router_warmup_steps=30, **overrides)
    return model, teacher, router, budgets, rows, cfg, stream[:600]


def trainer(tmp_path, name="run", **kw):
    model, teacher, router, budgets, rows, cfg, heldout = make(**kw)
    return ElasticTrainer(model, teacher, router, budgets, rows, cfg, tmp_path / name, heldout=heldout)


def test_budget_sampling_follows_the_two_stages(tmp_path):
    t = trainer(tmp_path, steps=400)
    seen = {"stage1": [], "stage2": []}
    for step in range(400):
        t.step = step
        seen["stage1" if step < 200 else "stage2"].append(t.sample_budget())
    s1 = torch.bincount(torch.tensor(seen["stage1"]), minlength=3).float() / 200
    s2 = torch.bincount(torch.tensor(seen["stage2"]), minlength=3).float() / 200
    assert (s1 - 1 / 3).abs().max() < 0.12  # uniform
    assert s2[0] > s2[1] > s2[2] and abs(s2[0] - 0.5) < 0.12  # weighted toward the full model
    t.step = 0
    assert t.seq_len() == 16
    t.step = 300
    assert t.seq_len() == 32


def test_training_reduces_the_distillation_loss_and_logs(tmp_path):
    t = trainer(tmp_path, steps=30, eval_every=15, eval_tokens=200)
    # a student that starts away from the teacher: perturb it
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logs = t.run(progress=False)
    full = [l["kd"] for l in logs if l["budget"] == "1.0"]
    assert full[-1] < full[0]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 and {"kd", "budget", "total", "lr", "tau", "grad_norm"} <= set(json.loads(lines[0]))
    evals = [l["eval"] for l in logs if "eval" in l]
    assert evals and set(evals[0]) == set(BUDGETS)
    assert all(v["perplexity"] > 1 for v in evals[0].values())
    assert (tmp_path / "run" / "train_state" / "state.json").exists()


def test_killed_and_resumed_run_reproduces_the_same_losses(tmp_path):
    straight = trainer(tmp_path, "straight", steps=8).run(progress=False)
    first = trainer(tmp_path, "resumed", steps=8)
    first.run(progress=False, stop_after=3)
    second = trainer(tmp_path, "resumed", steps=8)  # a fresh process: same init, then the checkpoint
    assert second.load_state() and second.step == 3
    rest = second.run(progress=False)
    resumed = [l["total"] for l in rest]
    assert resumed == pytest.approx([l["total"] for l in straight[3:]], rel=1e-6, abs=1e-7)
    assert [l["budget"] for l in rest] == [l["budget"] for l in straight[3:]]


def test_resume_refuses_other_budgets(tmp_path):
    t = trainer(tmp_path, steps=2)
    t.run(progress=False)
    other = trainer(tmp_path, steps=2)
    other.budgets = other.budgets[:2]
    with pytest.raises(Exception, match="budgets"):
        other.load_state()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, teacher, router, budgets, rows, cfg, _ = make(steps=4, batch=4)
        t = ElasticTrainer(model, teacher, router, budgets, rows, cfg, f"{tmp}/dist")
        logs = t.run(progress=False)
        if rank == 0:
            torch.save({"losses": [l["total"] for l in logs],
                        "weights": {k: v.clone() for k, v in t.model.state_dict().items()}}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    single = trainer(tmp_path, "single", steps=4, batch=4)
    logs = single.run(progress=False)
    out = tmp_path / "dist.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert got["losses"] == pytest.approx([l["total"] for l in logs], rel=1e-4)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(got["weights"][k], v, rtol=1e-4, atol=1e-5), (k, (got["weights"][k] - v).abs().max().item())


@pytest.mark.parametrize("judge", ["drawn", "expected"])
def test_budget_loss_judges_the_drawn_architecture(tmp_path, judge):
    """A router split 50/50 between the smallest and the full FFN has an expected cost right on a
    mid budget, so the expected-cost budget loss is 0, while every architecture drawn from it (and
    its argmax) is far outside the band. Judged on the drawn architecture, the loss sees that, and
    its gradient (the expected cost's) reaches the router."""
    from star_elastic.elastic.cost import Budget, CostModel

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, layer_types="**", num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=256, mlp_gated=True, mlp_act="silu",
                      rope_theta=10000.0)
    torch.manual_seed(0)
    model = Model(cfg)
    full = CostModel(cfg).full("params")
    router = Router(cfg, [Budget("params", full / 2, full, "mid")],
                    RouterConfig(axes=("ffn",), hidden_dim=8, width_choices=16))
    last = router.mlps["ffn"][-1]
    with torch.no_grad():  # logits: the smallest and the full width equally likely, nothing else
        last.weight.zero_()
        last.bias.fill_(-30.0)
        last.bias[0] = last.bias[-1] = 5.0
    router.set_progress(0.0)
    with torch.no_grad():
        mid = float(CostModel(cfg).cost("params", router(0).arch))  # the expected cost of that split
    budget = Budget("params", mid, full, "mid")
    router.budgets = [budget]
    rows = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    t = ElasticTrainer(model, copy.deepcopy(model), router, [budget], rows,
                       TrainConfig(steps=1, batch_size=4, seq_len=16, router_warmup_steps=0, budget_cost=judge),
                       tmp_path / "run")
    log = t.train_step()
    assert abs(log["expected_cost_fraction"] - budget.fraction) < 1e-3
    assert abs(log["cost_fraction"] / budget.fraction - 1) > 0.3  # the drawn architecture is far off
    if judge == "drawn":
        assert log["budget_loss"] > 0.3
    else:
        assert log["budget_loss"] == 0.0
