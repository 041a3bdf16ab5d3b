"""Importance estimation: every axis against a direct computation written without hooks (or with
the test's own), REAP and its baselines against running every expert on every token, depth
against physically deleting layers, hook hygiene, file round trips and the 2-rank all-reduce."""

import copy
import os

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import free_port, gloo_group, randomize_
from star_elastic.data import TokenBatches
from star_elastic.elastic.importance import (
    _accumulate_experts, _Sums, check_scores, estimate_importance, load_scores, random_importance,
    save_scores, weight_magnitude_importance)
from star_elastic.errors import StarElasticError
from star_elastic.model import Model, ModelConfig

V = 32
TINY = dict(vocab_size=V, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
            intermediate_size=24, mamba_num_heads=4, mamba_head_dim=4, ssm_state_size=4, n_groups=2,
            chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
            moe_shared_expert_intermediate_size=12)


def nemotron(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(Model(ModelConfig(**{**TINY, "layer_types": "M*-E", **overrides})), seed).eval()


def llama(seed=0):
    cfg = ModelConfig(**{**TINY, "family": "llama", "layer_types": "**", "mlp_gated": True,
                         "mlp_act": "silu", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    return randomize_(Model(cfg), seed).eval()


def batches(n=3, b=2, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (b, t), generator=g) for _ in range(n)]


def estimate(model, data, **kw):
    return estimate_importance(model, data, progress=False, **kw)


@pytest.fixture(autouse=True)
def _quiet_single_thread(monkeypatch):
    monkeypatch.setenv("STAR_ELASTIC_QUIET", "1")
    # These tensors are tiny: thread start-up costs more than it saves, and on a busy 2-core
    # machine two threads per op make a forward ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer_inputs(model, data):
    """Each layer's input x for each batch, captured by the test's own pre-hooks."""
    seen = {i: [] for i in range(len(model.model.layers))}
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0]))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for ids in data:
                model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def l2_of_seq_means(acts):
    """Reference aggregation: per sequence the token mean of |a|, L2 over all sequences."""
    per_seq = torch.cat([a.abs().mean(dim=1) for a in acts])  # (all sequences, ...)
    return per_seq.square().sum(0).sqrt()


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- keys and shapes

def test_keys_and_shapes_nemotron():
    model = nemotron()
    s = estimate(model, batches())
    expected = {"hidden": (16,), "layers.0.mamba_heads": (4,), "layers.0.mamba_channels": (4,),
                "layers.1.attn_heads": (4,), "layers.2.ffn": (24,), "layers.3.shared_ffn": (12,),
                "layers.3.experts": (8,), "layers.3.experts_freq": (8,), "layers.3.experts_ean": (8,),
                "layers.3.expert_ffn": (8, 8)}
    assert set(s) == set(expected) | {"meta"}
    for k, shape in expected.items():
        assert tuple(s[k].shape) == shape, k
        assert s[k].dtype == torch.float32 and torch.isfinite(s[k]).all() and (s[k] >= 0).all(), k
    assert s["meta"]["family"] == "nemotron_h" and s["meta"]["num_layers"] == 4
    assert s["meta"]["sequences"] == 6 and s["meta"]["tokens"] == 72
    check_scores(s, model)

    for baseline in (weight_magnitude_importance(model), random_importance(model, seed=3)):
        check_scores(baseline, model)
        for k in expected:
            if not k.endswith(("_freq", "_ean")):
                assert baseline[k].shape == s[k].shape and (baseline[k] > 0).all(), k
    assert torch.equal(random_importance(model, 3)["hidden"], random_importance(model, 3)["hidden"])
    assert not torch.equal(random_importance(model, 3)["hidden"], random_importance(model, 4)["hidden"])


def test_keys_llama_and_check_scores_rejects_mismatch():
    model = llama()
    s = estimate(model, batches())
    assert set(s) == {"hidden", "meta", "layers.0.attn_heads", "layers.0.ffn", "layers.1.attn_heads", "layers.1.ffn"}
    check_scores(s, model)
    with pytest.raises(StarElasticError, match="nemotron_h"):
        check_scores(estimate(nemotron(), batches(1)), model)
    bad = dict(s, **{"layers.1.ffn": torch.ones(23)})
    with pytest.raises(StarElasticError, match="layers.1.ffn has shape"):
        check_scores(bad, model)
    with pytest.raises(StarElasticError, match="matches no unit"):
        check_scores(dict(s, **{"layers.1.mamba_heads": torch.ones(4)}), model)
    with pytest.raises(StarElasticError, match="lack"):
        check_scores({k: v for k, v in s.items() if k != "layers.0.attn_heads"}, model)


# ----------------------------------------------------------------------------- direct computations

def test_hidden_and_ffn_match_direct_computation_nemotron():
    model, data = nemotron(), batches()
    s = estimate(model, data)
    xs = layer_inputs(model, data)
    layers = model.model.layers
    with torch.no_grad():
        normed = {i: [layers[i].norm(x) for x in xs[i]] for i in xs}
        hidden = sum(l2_of_seq_means(normed[i]) for i in normed)
        # non-gated MLP (layer 2) and the MoE's shared expert (layer 3): up_proj output, pre-activation
        ffn = l2_of_seq_means([h @ layers[2].mixer.up_proj.weight.T for h in normed[2]])
        shared = l2_of_seq_means([h @ layers[3].mixer.shared_experts.up_proj.weight.T for h in normed[3]])
    torch.testing.assert_close(s["hidden"], hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["layers.2.ffn"], ffn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["layers.3.shared_ffn"], shared, rtol=1e-5, atol=1e-6)


def test_hidden_and_gated_ffn_match_direct_computation_llama():
    model, data = llama(), batches()
    s = estimate(model, data)
    xs = layer_inputs(model, data)
    hidden = 0
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            rope = model.rope(torch.arange(data[0].shape[1]), torch.float32)
            first = [layer.input_layernorm(x) for x in xs[i]]
            mid = [x + layer.self_attn(h, rope) for x, h in zip(xs[i], first)]
            second = [layer.post_attention_layernorm(x) for x in mid]
            hidden = hidden + l2_of_seq_means(first) + l2_of_seq_means(second)
            mlp = layer.mlp  # gated: the down_proj input silu(gate) * up
            ffn = l2_of_seq_means([F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T) for h in second])
            torch.testing.assert_close(s[f"layers.{i}.ffn"], ffn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["hidden"], hidden, rtol=1e-5, atol=1e-6)


def test_attention_head_scores_equal_direct_computation():
    model, data = nemotron(), batches()
    s = estimate(model, data)
    block = model.model.layers[1]
    attn = block.mixer
    outs = []
    with torch.no_grad():
        for x in layer_inputs(model, data)[1]:
            h = block.norm(x)
            b, t, _ = h.shape
            q = (h @ attn.q_proj.weight.T).view(b, t, 4, 4)
            k = (h @ attn.k_proj.weight.T).view(b, t, 2, 4).repeat_interleave(2, dim=2)  # GQA: 2 q heads per kv
            v = (h @ attn.v_proj.weight.T).view(b, t, 2, 4).repeat_interleave(2, dim=2)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2.0  # sqrt(head_dim)
            logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)  # (b, t, heads, head_dim)
            outs.append(out.norm(dim=-1))  # per token, each head's output vector length
    torch.testing.assert_close(s["layers.1.attn_heads"], l2_of_seq_means(outs), rtol=1e-5, atol=1e-6)


def test_mamba_scores_equal_direct_computation_and_channel_keep():
    model, data = nemotron(), batches()
    block = model.model.layers[0]
    with torch.no_grad():
        # in_proj output = z | x | B | C | dt; x is the second d_inner = 16 slice, (heads 4, head_dim 4)
        xb = [(block.norm(x) @ block.mixer.in_proj.weight.T)[..., 16:32].view(*x.shape[:2], 4, 4)
              for x in layer_inputs(model, data)[0]]
    a = l2_of_seq_means(xb)  # (heads, head_dim)
    s = estimate(model, data)
    torch.testing.assert_close(s["layers.0.mamba_channels"], a.norm(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["layers.0.mamba_heads"], a.norm(dim=1), rtol=1e-5, atol=1e-6)
    top2 = a.norm(dim=0).topk(2).indices
    s2 = estimate(model, data, mamba_channel_keep=2)
    torch.testing.assert_close(s2["layers.0.mamba_heads"], a[:, top2].norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2["layers.0.mamba_channels"], s["layers.0.mamba_channels"])


# ----------------------------------------------------------------------------- experts

def brute_force_experts(model, data, layer):
    """REAP, frequency, EAN and expert neurons by running every expert on every token (fine at this
    size), then keeping the routed (token, expert) pairs."""
    moe = model.model.layers[layer].mixer
    up, down = moe.experts.up_proj, moe.experts.down_proj
    E = up.shape[0]
    reap_sum, ean_sum, count, neuron_sum, tokens = torch.zeros(E), torch.zeros(E), torch.zeros(E), 0, 0
    with torch.no_grad():
        for x in layer_inputs(model, data)[layer]:
            flat = model.model.layers[layer].norm(x).reshape(-1, x.shape[-1])
            idx, w = moe.gate(flat)
            if moe.latent:
                flat = moe.fc1_latent_proj(flat)
            h = torch.einsum("td,eid->eti", flat, up)  # every expert, every token
            f = torch.einsum("eti,edi->etd", F.relu(h).square(), down)
            gate = torch.zeros(flat.shape[0], E).scatter(1, idx, w).T  # (E, T), 0 where not routed
            routed = torch.zeros(flat.shape[0], E).scatter(1, idx, 1.0).T
            norms = f.norm(dim=-1)
            reap_sum += (gate * norms).sum(1)
            ean_sum += (routed * norms).sum(1)
            count += routed.sum(1)
            neuron_sum = neuron_sum + (routed[..., None] * h.abs()).sum(1)
            tokens += flat.shape[0]
    safe = count.clamp(min=1)
    return {"experts": reap_sum / safe, "experts_freq": count / count.sum(), "experts_ean": ean_sum / tokens,
            "expert_ffn": neuron_sum / safe[:, None]}, count


@pytest.mark.parametrize("overrides", [dict(), dict(moe_latent_size=8, n_group=2, topk_group=1,
                                                    routed_scaling_factor=2.5, norm_topk_prob=False)],
                         ids=["plain", "latent-grouped-scaled"])
def test_reap_frequency_ean_match_brute_force(overrides):
    model, data = nemotron(layer_types="E*E", **overrides), batches(n=3, b=3, t=10)
    s = estimate(model, data)
    for layer in (0, 2):
        ref, count = brute_force_experts(model, data, layer)
        assert (count > 0).sum() >= 4  # routing spreads: the comparison is not trivially all zeros
        for axis, expected in ref.items():
            torch.testing.assert_close(s[f"layers.{layer}.{axis}"], expected, rtol=1e-5, atol=1e-6)


def test_expert_never_routed_scores_zero():
    model = nemotron(layer_types="E")
    with torch.no_grad():
        model.model.layers[0].mixer.gate.e_score_correction_bias[5] = -100.0  # never selected
    s = estimate(model, batches())
    for axis in ("experts", "experts_freq", "experts_ean", "expert_ffn"):
        v = s[f"layers.0.{axis}"]
        assert (v[5] == 0).all(), axis
        assert torch.isfinite(v).all() and v.sum() > 0, axis
    assert (s["layers.0.experts"] > 0).sum() >= 5
    torch.testing.assert_close(s["layers.0.experts_freq"].sum(), torch.tensor(1.0))


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces: new memory, so not a view of
    an input (e.g. the experts' weights reinterpreted as 8-byte words before a gather)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_reap_memory_does_not_scale_with_experts_times_tokens():
    """Every tensor the expert statistics create is at most (routed assignments) x max(D, I) or
    (experts) x I; running all experts on all tokens would need experts x tokens x I."""
    E, T, k, D, I = 256, 96, 2, 16, 8
    experts = Model(ModelConfig(**{**TINY, "layer_types": "E", "n_routed_experts": E,
                                   "moe_intermediate_size": I})).model.layers[0].mixer.experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    weights = torch.rand(T, k, generator=g)
    sums = _Sums()
    for name, shape in (("reap", E), ("ean", E), ("count", E), ("neurons", (E, I)), ("tokens", ())):
        sums.new(name, shape, "cpu")
    with torch.no_grad(), LargestTensor() as mode:
        _accumulate_experts(experts, x, idx, weights, sums, "")
    assert mode.largest <= max(T * k * max(D, I), E * I)
    assert mode.largest * 16 < E * T * I  # far from what all-experts-on-all-tokens would take
    with torch.no_grad(), LargestTensor() as brute:  # the instrument does see such a tensor
        torch.einsum("td,eid->eti", x, experts.up_proj)
    assert brute.largest == E * T * I

    # ...and the hook really goes through this path inside estimate_importance: same numbers
    model = Model(ModelConfig(**{**TINY, "layer_types": "E", "n_routed_experts": E})).eval()
    data = batches(n=2, b=3, t=16)
    with torch.no_grad(), LargestTensor() as whole:
        s = estimate(model, data)
    # The largest tensor of the whole call is the router's own (tokens, experts) score matrix;
    # per-expert outputs for every token would be I (or D) times larger.
    assert whole.largest <= 3 * 16 * E
    ref, _ = brute_force_experts(model, data, 0)
    torch.testing.assert_close(s["layers.0.experts"], ref["experts"], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- depth

def brute_force_depth(model, data):
    """Iterative normalised MSE by building models with the layers physically deleted."""
    with torch.no_grad():
        full = [model(b) for b in data]
        denom = sum(f.square().sum() for f in full)
        removed, order, scores = [], [], []
        n = len(model.model.layers)
        while len(order) < n:
            trial = {}
            for j in range(n):
                if j in removed:
                    continue
                pruned = copy.deepcopy(model)
                pruned.model.layers = nn.ModuleList(l for i, l in enumerate(pruned.model.layers)
                                                    if i not in removed + [j])
                trial[j] = sum((pruned(b) - f).square().sum() for b, f in zip(data, full)) / denom
            j = min(trial, key=lambda j: (trial[j], j))
            removed.append(j)
            order.append(j)
            scores.append(trial[j])
    return order, torch.stack(scores)


def test_depth_removes_identity_layer_first_and_matches_deletion():
    model = nemotron(layer_types="M*-E")
    with torch.no_grad():
        model.model.layers[1].mixer.o_proj.weight.zero_()  # attention block now returns its input
    data = batches(n=3)
    s = estimate(model, data, depth=True, depth_batches=2)
    assert s["layer_order"][0].item() == 1 and s["layer_scores"][0].item() == 0.0
    assert s["layer_order"].dtype == torch.long and sorted(s["layer_order"].tolist()) == [0, 1, 2, 3]
    order, scores = brute_force_depth(model, data[:2])  # only the first depth_batches are used
    assert s["layer_order"].tolist() == order
    torch.testing.assert_close(s["layer_scores"], scores, rtol=1e-5, atol=1e-7)
    assert no_hooks(model)
    check_scores(s, model)


def test_depth_llama():
    model = llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    s = estimate(model, batches(n=2), depth=True)
    assert s["layer_order"].tolist() == [0, 1] and s["layer_scores"][0] == 0


# ----------------------------------------------------------------------------- hooks, data, dtype

def test_hooks_removed_after_success_and_errors():
    model, data = nemotron(), batches(n=2)
    with torch.no_grad():
        before = model(data[0])
    estimate(model, data, depth=True)
    assert no_hooks(model)

    def failing():  # the error comes between forwards
        yield data[0]
        raise RuntimeError("data source failed")
    with pytest.raises(RuntimeError, match="data source failed"):
        estimate(model, failing())
    assert no_hooks(model)

    with pytest.raises((RuntimeError, IndexError)):  # inside a forward, hooks active: float ids
        estimate(model, [data[0], torch.full((2, 12), 1e6)])
    assert no_hooks(model)

    # inside the depth search, with identity hooks in place
    calls = []

    def explode(module, args, out):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("boom in depth")
    own = model.lm_head.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom in depth"):
        estimate(model, data, depth=True)
    own.remove()
    assert no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(data[0]), before)  # the model computes what it did


def test_num_batches_stops_an_endless_iterator():
    rows = torch.randint(0, V, (20, 12))
    stream = TokenBatches(rows, batch_size=2)
    s = estimate(nemotron(layer_types="-"), stream, num_batches=3)
    assert s["meta"]["sequences"] == 6
    assert stream.position == 6  # no batch drawn beyond the three used


def test_progress_bar_and_quiet(monkeypatch, capsys):
    model, data = nemotron(layer_types="-"), batches(n=2)
    monkeypatch.delenv("STAR_ELASTIC_QUIET")
    estimate_importance(model, data, progress=True)
    assert "importance" in capsys.readouterr().err
    estimate_importance(model, data, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("STAR_ELASTIC_QUIET", "1")
    estimate_importance(model, data, progress=True)
    assert capsys.readouterr().err == ""


def test_bfloat16_model_accumulates_in_float32():
    model, data = nemotron(layer_types="*-"), batches()
    ref = estimate(model, data)
    s = estimate(copy.deepcopy(model).to(torch.bfloat16), data)
    for k in ref:
        if k != "meta":
            assert s[k].dtype == torch.float32
            torch.testing.assert_close(s[k], ref[k], rtol=3e-2, atol=1e-3)


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(tmp_path):
    model = nemotron()
    s = estimate(model, batches(n=2), depth=True)
    path = save_scores(s, tmp_path / "sub" / "scores.safetensors")
    loaded = load_scores(path)
    assert set(loaded) == set(s)
    assert loaded["meta"] == s["meta"]
    for k in s:
        if k != "meta":
            assert loaded[k].dtype == s[k].dtype and torch.equal(loaded[k], s[k]), k
    check_scores(loaded, model)
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()["family"] == "nemotron_h" and f.metadata()["num_layers"] == "4"
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_load_rejects_foreign_truncated_and_missing_files(tmp_path):
    foreign = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(foreign), metadata={"format": "pt"})
    good = save_scores(random_importance(nemotron(), 0), tmp_path / "good.safetensors")
    raw = good.read_bytes()
    cut_data = tmp_path / "cut_data.safetensors"
    cut_data.write_bytes(raw[:-10])
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(raw[:20])
    text = tmp_path / "notes.safetensors"
    text.write_text("hello world, not tensors\n")
    for path, msg in [(foreign, "not a star-elastic"), (cut_data, "not a readable"),
                      (cut_header, "not a readable"), (text, "not a readable"),
                      (tmp_path / "absent.safetensors", "no such")]:
        with pytest.raises(StarElasticError, match=msg) as e:
            load_scores(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


# ----------------------------------------------------------------------------- distributed

def _rank_worker(rank, world, port, out_dir):
    os.environ["STAR_ELASTIC_QUIET"] = "1"
    with gloo_group(rank, world, port):
        mine = batches(n=4)[rank::world]  # each rank sees half of the data
        s = estimate_importance(nemotron(), mine, depth=True, depth_batches=1, progress=False)
        save_scores(s, os.path.join(out_dir, f"rank{rank}.safetensors"))


def test_two_gloo_ranks_equal_one_process_on_all_data(tmp_path):
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    # one process, all four batches; its two depth batches are the two ranks' first batches
    single = estimate(nemotron(), batches(n=4), depth=True, depth_batches=2)
    ranks = [load_scores(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for r in ranks:
        assert r["meta"]["sequences"] == single["meta"]["sequences"] == 8
        assert r["layer_order"].tolist() == single["layer_order"].tolist()
        for k in single:
            if k != "meta":
                torch.testing.assert_close(r[k], single[k], rtol=1e-5, atol=1e-7, msg=k)
    for k in single:
        if k != "meta":
            assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank holds the same result
