"""Model tests: logits parity with transformers, the chunked Mamba-2 scan against a plain
recurrence, MoE dispatch paths, cached decoding, generation and backward."""

import pytest
import torch
import torch.nn.functional as F

from conftest import LLAMA3_ROPE, VOCAB, hf_model, llama_config, nemotron_config, ours_from, rel_err
from star_elastic.generate import generate, sample
from star_elastic.hf import config_from_hf, load_weights
from star_elastic.model import (Experts, MambaCache, Model, ModelConfig, MoE, expert_counts, ssd_scan,
                                window_conv)

TOL = 1e-4

# ----------------------------------------------------------------------------- parity: NemotronH

NEMOTRON_CASES = {
    "all-blocks-gqa2-groups2": dict(),
    "kv1-groups1": dict(num_key_value_heads=1, n_groups=1),
    "groups4-heads8": dict(mamba_num_heads=8, mamba_head_dim=4, n_groups=4),
    "moe-ngroup2-unnormed-scaled-latent": dict(n_group=2, topk_group=1, norm_topk_prob=False,
                                               routed_scaling_factor=2.5, moe_latent_size=16),
    "moe-ngroup4-topk2-normed-scaled": dict(n_group=4, topk_group=2, norm_topk_prob=True,
                                            routed_scaling_factor=1.7, num_experts_per_tok=3),
    "dt-clamp-active": dict(time_step_min=0.5),
    "deeper-mixed": dict(layers_block_type=["moe", "mamba", "attention", "mamba", "mlp", "attention", "moe"],
                         moe_latent_size=12),
    "bias-everywhere": dict(use_bias=True, use_conv_bias=True, mlp_bias=True),
    "untied-explicit": dict(tie_word_embeddings=False),
    # transformers 5.24's NemotronHForCausalLM has `_tied_weights_keys = {}`: it never ties, even with
    # tie_word_embeddings=True, and its state dict holds an independent lm_head.weight.
    "tied-flag": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("seq", [16, 13, 21, 5, 1])
@pytest.mark.parametrize("overrides", list(NEMOTRON_CASES.values()), ids=list(NEMOTRON_CASES))
def test_nemotron_h_logits_match_transformers(overrides, seq):
    ref = hf_model(nemotron_config(**overrides))
    ours = ours_from(ref)
    ids = torch.randint(0, VOCAB, (2, seq))
    with torch.no_grad():
        # no cache: transformers 5.25's hybrid cache fails on a first layer without state ('DummyLayer' has no
        # get_seq_length), and the logits of one forward do not need it
        expected = ref(ids, use_cache=False).logits
        got = ours(ids)
    assert got.shape == expected.shape == (2, seq, VOCAB)
    assert rel_err(got, expected) < TOL


def test_nemotron_h_tied_flag_is_not_tied_in_transformers():
    """Pins the transformers behaviour the parity test above is written against."""
    ref = hf_model(nemotron_config(tie_word_embeddings=True))
    assert ref.lm_head.weight.data_ptr() != ref.model.embeddings.weight.data_ptr()
    sd = ref.state_dict()
    assert "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embeddings.weight"])


@pytest.mark.parametrize("name,default", [
    ("mixer.A_log", lambda p: torch.log(torch.arange(1, p.numel() + 1, dtype=p.dtype))),
    ("mixer.D", torch.ones_like),
    ("mixer.dt_bias", torch.ones_like),
    ("mixer.norm.weight", torch.ones_like),
    ("layers.0.norm.weight", torch.ones_like),
    ("norm_f.weight", torch.ones_like),
    ("e_score_correction_bias", torch.zeros_like),
])
def test_parity_test_is_sensitive_to_constant_initialised_tensors(name, default):
    """Putting one randomised tensor back to transformers' constant init must break parity,
    otherwise the parity tests could not catch a loader that drops it."""
    ref = hf_model(nemotron_config())
    ours = ours_from(ref, clone=True)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).logits) < TOL
    hits = [t for n, t in list(ours.named_parameters()) + list(ours.named_buffers()) if n.endswith(name)]
    assert hits
    with torch.no_grad():
        hits[0].copy_(default(hits[0]))
        assert rel_err(ours(ids), ref(ids).logits) > 1e-3


# ----------------------------------------------------------------------------- parity: Llama

LLAMA_CASES = {
    "default-rope-untied": dict(),
    "default-rope-tied": dict(tie_word_embeddings=True),
    "llama3-rope-untied": dict(rope_parameters=LLAMA3_ROPE),
    "llama3-rope-tied-kv1": dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, num_key_value_heads=1),
    "theta500k-3layers": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, num_hidden_layers=3),
}


@pytest.mark.parametrize("seq", [1, 9, 70])
@pytest.mark.parametrize("overrides", list(LLAMA_CASES.values()), ids=list(LLAMA_CASES))
def test_llama_logits_match_transformers(overrides, seq):
    ref = hf_model(llama_config(**overrides))
    ours = ours_from(ref)
    if ref.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed.weight
    ids = torch.randint(0, VOCAB, (2, seq))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < TOL


def test_llama3_rope_scaling_matters():
    """The llama3 case is a real test: our model with plain rope gives different logits."""
    ref = hf_model(llama_config(rope_parameters=LLAMA3_ROPE))
    ours = ours_from(ref)
    cfg = config_from_hf(ref.config.to_dict())
    cfg.rope_scaling = None
    plain = load_weights(Model(cfg), dict(ref.state_dict()), "ref").eval()
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).logits) < TOL
        assert rel_err(plain(ids), ref(ids).logits) > 1e-3


# ----------------------------------------------------------------------------- the chunked scan

def recurrence(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t, per head; heads i*j..(i+1)*j-1 use group i."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    j = h // g
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if h0 is None else h0.clone()
    y = torch.zeros(b, t, h, p, dtype=torch.float64)
    for s in range(t):
        for head in range(h):
            grp = head // j
            decay = torch.exp(dt[:, s, head] * A[head])[:, None, None]
            inp = (dt[:, s, head, None] * x[:, s, head])[:, :, None] * B[:, s, grp][:, None, :]
            state[:, head] = decay * state[:, head] + inp
            y[:, s, head] = torch.einsum("bpn,bn->bp", state[:, head], C[:, s, grp])
    return y, state


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("t", [1, 5, 8, 16, 21])
def test_ssd_scan_equals_recurrence(t, with_state, groups):
    torch.manual_seed(t * 10 + groups)
    b, h, p, n = 2, 4, 3, 5
    f64 = dict(dtype=torch.float64)
    x = torch.randn(b, t, h, p, **f64)
    dt = F.softplus(torch.randn(b, t, h, **f64))
    A = -torch.rand(h, **f64) * 2 - 0.1
    B = torch.randn(b, t, groups, n, **f64)
    C = torch.randn(b, t, groups, n, **f64)
    h0 = torch.randn(b, h, p, n, **f64) if with_state else None
    y, final = ssd_scan(x, dt, A, B, C, chunk_size=8, initial_state=h0)
    y_ref, final_ref = recurrence(x, dt, A, B, C, h0)
    assert y.dtype == torch.float64 and y.shape == (b, t, h, p) and final.shape == (b, h, p, n)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(final, final_ref) < 1e-10


def test_ssd_scan_groups_are_contiguous_blocks_of_heads():
    """With g=2 and h=4, heads 0,1 read group 0 and heads 2,3 group 1 (not interleaved)."""
    torch.manual_seed(1)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(1, 6, 4, 2, **f64)
    dt = F.softplus(torch.randn(1, 6, 4, **f64))
    A = -torch.rand(4, **f64) - 0.1
    B, C = torch.randn(1, 6, 2, 3, **f64), torch.randn(1, 6, 2, 3, **f64)
    B[:, :, 1] = 0  # group 1 feeds nothing: heads 2, 3 must stay zero, heads 0, 1 must not
    y, _ = ssd_scan(x, dt, A, B, C, chunk_size=4)
    assert y[:, :, 2:].abs().max() == 0
    assert y[:, :, :2].abs().min() > 0


# ----------------------------------------------------------------------------- MoE dispatch

def _experts(n_experts=8, d=12, inter=6, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=d, n_routed_experts=n_experts, moe_intermediate_size=inter, num_experts_per_tok=2)
    ex = Experts(cfg)
    with torch.no_grad():
        ex.up_proj.normal_(0, 0.5)
        ex.down_proj.normal_(0, 0.5)
    return ex


def _experts_reference(ex, x, idx, w):
    out = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = idx[t, s]
            hdn = F.relu(ex.up_proj[e].double() @ x[t].double()).square()
            out[t] += w[t, s].double() * (ex.down_proj[e].double() @ hdn)
    return out


def test_experts_gather_path_equals_grouped_path():
    ex = _experts()
    x = torch.randn(20, 12)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(20)])
    w = torch.rand(20, 2)
    with torch.no_grad():
        full = ex(x, idx, w)  # 40 routed slots: grouped / per-expert path
        for lo in (0, 1, 5, 18):  # 1 or 2 tokens: T * k <= E / 2, the gather path
            for n in (1, 2):
                part = ex(x[lo:lo + n], idx[lo:lo + n], w[lo:lo + n])
                assert rel_err(part, full[lo:lo + n]) < 1e-6
        assert rel_err(full, _experts_reference(ex, x, idx, w)) < 1e-6


def test_experts_gradients_equal_the_reference_on_every_path():
    """The routing weights scale each copy's activation before the down projection, and the copies come back to
    token order by a gather and a sum (neither keeps the down projection's output for backward): the same
    function as weighting the output, so the gradients of x, the weights and both tensors equal the
    reference's, on the per-expert path (many tokens) and the gather path (one)."""
    ex = _experts().double()
    torch.manual_seed(1)
    for T in (20, 1):
        x = torch.randn(T, 12, dtype=torch.float64, requires_grad=True)
        idx = torch.stack([torch.randperm(8)[:2] for _ in range(T)])
        w = torch.rand(T, 2, dtype=torch.float64, requires_grad=True)
        g = torch.randn(T, 12, dtype=torch.float64)
        grads = []
        for run in (ex, _experts_reference):
            out = run(x, idx, w) if run is ex else run(ex, x, idx, w)
            grads.append(torch.autograd.grad((out * g).sum(), (x, w, ex.up_proj, ex.down_proj)))
        for got, want in zip(*grads):
            assert rel_err(got, want) < 1e-10


def test_gather_experts_moves_words_and_equals_indexing():
    """gather_experts: w[idx] bit for bit, from a parent or a budget's strided view, moved as 16-byte words
    where the layout allows (the index op sees complex128), else as 8-byte ones (int64), element by element
    where neither fits (a width not in whole words), and through autograd where a gradient is wanted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from star_elastic.model import gather_experts

    class IndexDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.index:
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    parent = torch.randn(16, 24, 40).to(torch.bfloat16)
    idx = torch.tensor([[3, 7], [11, 0]])
    for w, word in ((parent, torch.complex128), (parent[:12, :20, :32], torch.complex128),
                    (parent[:12, :20, :36], torch.int64), (parent[:12, :20, :30], torch.bfloat16)):
        with IndexDtypes() as mode:
            got = gather_experts(w, idx)
        assert torch.equal(got, w[idx]) and got.is_contiguous()
        assert mode.seen == [word]
    w = parent.float().requires_grad_()
    gather_experts(w, idx).sum().backward()  # a gradient wanted: plain indexing
    assert w.grad[3].eq(1).all() and w.grad[1].eq(0).all()


def test_experts_with_unused_experts():
    ex = _experts()
    x = torch.randn(10, 12, requires_grad=True)
    idx = torch.randint(0, 3, (10, 2))  # only experts 0..2 receive tokens
    idx[:, 1] = (idx[:, 0] + 1) % 3
    w = torch.rand(10, 2)
    out = ex(x, idx, w)
    assert rel_err(out.detach(), _experts_reference(ex, x.detach(), idx, w)) < 1e-6
    out.square().sum().backward()
    assert torch.isfinite(ex.up_proj.grad).all() and torch.isfinite(ex.down_proj.grad).all()
    assert ex.up_proj.grad[3:].abs().max() == 0 and ex.up_proj.grad[:3].abs().max() > 0
    assert torch.isfinite(x.grad).all()


def traced_ops(fn, *args) -> list[str]:
    """The operators `fn(*args)` calls, as make_fx traces them (what torch.compile's graph would hold)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return [str(n.target) for n in make_fx(fn)(*args).graph.nodes if n.op == "call_function"]


def test_expert_counts_are_bincounts_without_an_int64_accumulating_scatter():
    """The count of routed copies per expert equals bincount's (unused experts 0, fixed length), and its graph has
    no index_add / index_put / scatter_add: inductor cannot lower an int64 one (no int64 atomic add on GPUs), so
    on CUDA it ran as a sorting scatter with a bounds check, about eight small kernels a MoE layer a decode step."""
    flat = torch.tensor([3, 0, 3, 5, 3, 0])
    assert expert_counts(flat, 8).tolist() == torch.bincount(flat, minlength=8).tolist() == [2, 0, 0, 3, 0, 1, 0, 0]
    flat = torch.randint(0, 128, (32 * 6,))
    assert torch.equal(expert_counts(flat, 128), torch.bincount(flat, minlength=128))
    ops = traced_ops(lambda f: expert_counts(f, 128), flat)
    assert ops and not any(name in op for op in ops for name in ("index_add", "index_put", "scatter_add")), ops


def test_moe_routes_around_starved_experts():
    """A large negative correction bias keeps most experts out; the MoE output equals the reference."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                      moe_shared_expert_intermediate_size=12, norm_topk_prob=False, routed_scaling_factor=1.5)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_()
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, -9, -9, -9, -9, -9.0]))
        moe.experts.up_proj.normal_(0, 0.5)
        moe.experts.down_proj.normal_(0, 0.5)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        idx, w = moe.gate(x.reshape(-1, 16))
        assert idx.max() <= 2
        scores = torch.sigmoid(x.reshape(-1, 16) @ moe.gate.weight.T)
        assert torch.allclose(w, scores.gather(1, idx) * 1.5)  # bias picks, but does not weight
        expected = _experts_reference(moe.experts, x.reshape(-1, 16), idx, w).view(3, 5, 16)
        expected = expected + moe.shared_experts(x).double()
        assert rel_err(moe(x), expected) < 1e-6
        assert rel_err(moe(x[:1, :1]), expected[:1, :1]) < 1e-6  # single token: gather path


# ----------------------------------------------------------------------------- cached decoding

def _hybrid():
    ref = hf_model(nemotron_config(layers_block_type=["mamba", "attention", "moe", "mamba", "mlp", "attention"]))
    return ref, ours_from(ref)


def _llama():
    ref = hf_model(llama_config(rope_parameters=LLAMA3_ROPE, num_hidden_layers=3))
    return ref, ours_from(ref)


@pytest.mark.parametrize("build", [_hybrid, _llama], ids=["nemotron_h", "llama"])
def test_cached_decoding_equals_full_recompute(build):
    _, model = build()
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(ids)
        # prefill 11 (not a multiple of chunk 8), then one token at a time
        cache = model.make_cache(2, 30)
        out = [model(ids[:, :11], cache, torch.arange(11))]
        for i in range(11, 30):
            out.append(model(ids[:, i:i + 1], cache, torch.tensor([i])))
        assert rel_err(torch.cat(out, 1), full) < TOL
        # prefill 7, then multi-token chunks (13 > chunk size, then 10), then single steps
        cache = model.make_cache(2, 30)
        out = [model(ids[:, :7], cache, torch.arange(7)),
               model(ids[:, 7:20], cache, torch.arange(7, 20)),
               model(ids[:, 20:27], cache, torch.arange(20, 27))]
        for i in range(27, 30):
            out.append(model(ids[:, i:i + 1], cache, torch.tensor([i])))
        assert rel_err(torch.cat(out, 1), full) < TOL
        # last_only returns the last position's logits
        cache = model.make_cache(2, 30)
        last = model(ids[:, :15], cache, torch.arange(15), last_only=True)
        assert last.shape == (2, 1, VOCAB) and rel_err(last, full[:, 14:15]) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decodings_conv_is_the_convs_output_without_a_convolution(dtype):
    """One token's conv over the cache's window equals nn.Conv1d's (to its rounding in bf16), and a Mamba layer's
    one-token step traces to no convolution: a conv is a kernel torch.compile cannot fuse, one a Mamba layer a
    decode step."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(24, 24, 4, groups=24).to(dtype)
    window = torch.randn(3, 24, 4, dtype=dtype)
    ours, ref = window_conv(window, conv.weight, conv.bias), conv(window)
    assert ours.shape == ref.shape == (3, 24, 1) and ours.dtype == dtype
    assert (ours.float() - ref.float()).abs().max() <= (1e-6 if dtype == torch.float32 else 2 ** -7 * ref.abs().max())
    _, model = _hybrid()
    mixer = model.model.layers[0].mixer
    cache = MambaCache(2, mixer, model.config.conv_kernel, torch.float32, "cpu")
    with torch.no_grad():
        ops = traced_ops(lambda u: mixer(u, cache), torch.randn(2, 1, model.config.hidden_size))
    assert ops and not any("conv" in op for op in ops), [op for op in ops if "conv" in op]


def test_cache_requires_pos():
    _, model = _llama()
    with pytest.raises(ValueError, match="pos"):
        model(torch.zeros(1, 3, dtype=torch.long), model.make_cache(1, 3))


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("build", [_hybrid, _llama], ids=["nemotron_h", "llama"])
def test_greedy_generation_matches_transformers(build):
    ref, model = build()
    ids = torch.randint(3, VOCAB, (2, 7))
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    got = generate(model, ids, max_new_tokens=20)
    assert expected.shape == (2, 27)
    assert torch.equal(got, expected)
    single = generate(model, ids[1], max_new_tokens=20)  # 1-D prompt
    assert torch.equal(single, expected[1:])
    assert torch.equal(generate(model, ids, max_new_tokens=1), expected[:, :8])


def _first(row, tokens):
    hits = [i for i, tok in enumerate(row.tolist()) if tok in tokens]
    return hits[0] if hits else None


@pytest.mark.parametrize("build", [_hybrid, _llama], ids=["nemotron_h", "llama"])
def test_eos_stops_and_pads(build):
    _, model = build()
    ids = torch.randint(3, VOCAB, (2, 6))
    free = generate(model, ids, max_new_tokens=20)[:, 6:]
    # an EOS that row 0 produces early (its first occurrence at step <= 5)
    eos = next(tok for k, tok in enumerate(free[0].tolist()) if k >= 3 and _first(free[0], {tok}) == k)
    for eos_arg in (eos, [eos, VOCAB + 7]):
        got = generate(model, ids, max_new_tokens=20, eos_token_id=eos_arg)[:, 6:]
        firsts = [_first(r, {eos}) for r in free]
        n = 20 if None in firsts else max(firsts) + 1
        assert got.shape == (2, n)
        for r in range(2):
            stop = firsts[r] if firsts[r] is not None else n
            assert torch.equal(got[r, :stop + 1], free[r, :stop + 1][:n])
            assert (got[r, stop + 1:] == eos).all()  # padded with EOS after it finished
    alone = generate(model, ids[:1], max_new_tokens=20, eos_token_id=eos)[0, 6:]
    assert alone.tolist() == free[0, :firsts[0] + 1].tolist()  # stops right after the EOS
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


def test_eos_read_a_few_steps_late_cuts_the_output_where_every_row_finished():
    """generate reads whether every row is done EOS_CHECK_EVERY steps at a time (no device wait a token) and
    cuts what it computed past that point: the output is the one of stopping at once, whichever step the
    last row finishes at (before, on or after a read, or in the last steps before the token limit)."""
    from star_elastic import generate as gen

    _, model = _hybrid()
    ids = torch.randint(3, VOCAB, (3, 5))
    free = generate(model, ids, max_new_tokens=24)[:, 5:]
    checked = 0
    for eos in sorted(set(free.flatten().tolist())):
        firsts = [_first(r, {eos}) for r in free]
        for limit in (3, 8, 9, 17, 24):
            want_n = limit if None in firsts or max(firsts) >= limit else max(firsts) + 1
            want = free[:, :want_n].clone()
            for r, f in enumerate(firsts):
                if f is not None and f < want_n:
                    want[r, f + 1:] = eos  # rows that finish first are padded with EOS
            got = generate(model, ids, max_new_tokens=limit, eos_token_id=eos)[:, 5:]
            assert torch.equal(got, want), (eos, limit)
            checked += None not in firsts and max(firsts) < limit
    assert checked >= 3 and gen.EOS_CHECK_EVERY > 1  # stops before the limit happened, reads were late


def test_compiled_decode_tunes_one_row_products_at_batch_one_and_refuses_an_unknown_mode(monkeypatch):
    """generate(compile=True) compiles the one-token step of one row under inductor's coordinate descent tuning
    (generate.GEMV_OPTIONS: one-row products as tuned reductions, the MoE gather folded in; measured 1.33x
    inductor's defaults on an H100 at Nano width) and a step of several rows with inductor's defaults;
    compile="gemv" tunes at any batch, compile="default" at none. Each is its own cached step, and the tokens
    are the eager step's. A mode it does not know is one line, before anything compiles. (The compiled model
    here is the eager one, recorded: inductor's C++ on this CPU is too slow for the suite; what it makes on a GPU
    is benchmarks/bench_expert_gather.py's and bench_serve.py's.)"""
    from star_elastic import generate as gen
    from star_elastic.errors import StarElasticError

    calls = []

    def recording_compile(model, **kwargs):
        calls.append(kwargs)
        return model
    monkeypatch.setattr(torch, "compile", recording_compile)
    _, model = _hybrid()
    tuned = {"coordinate_descent_tuning": True}
    for batch, cases in ((1, ((True, tuned), ("gemv", tuned), ("default", None))),
                         (2, ((True, None), ("gemv", tuned), ("default", None)))):
        ids = torch.randint(3, VOCAB, (batch, 5))
        eager = generate(model, ids, max_new_tokens=6, use_graph=False)
        for mode, options in cases:
            assert torch.equal(generate(model, ids, max_new_tokens=6, use_graph=False, compile=mode), eager)
            assert calls[-1] == {"dynamic": False, "options": options}, (batch, mode)
    assert len(calls) == 6 and gen.GEMV_OPTIONS == tuned
    with pytest.raises(StarElasticError, match="compile='max': use True"):
        generate(model, ids, max_new_tokens=2, use_graph=False, compile="max")
    assert len(calls) == 6


@pytest.mark.parametrize("build", [_hybrid, _llama], ids=["nemotron_h", "llama"])
def test_seeded_sampling_is_reproducible_and_top_p_tiny_is_greedy(build):
    _, model = build()
    ids = torch.randint(3, VOCAB, (2, 5))
    runs = [generate(model, ids, 20, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    greedy = generate(model, ids, 20)
    assert not torch.equal(runs[0], greedy)
    nucleus1 = generate(model, ids, 20, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(nucleus1, greedy)


def test_sampled_tokens_stay_inside_the_nucleus():
    _, model = _llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.15)  # flatter distributions: nuclei of several tokens
    ids = torch.randint(3, VOCAB, (3, 4))
    top_p = 0.5
    out = generate(model, ids, 20, temperature=1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = torch.softmax(model(out[:, :-1]), -1)[:, 3:]  # distributions each new token was drawn from
    sizes = []
    for r in range(3):
        for s in range(20):
            p = probs[r, s]
            tok = out[r, 4 + s]
            mass_before = p[p > p[tok]].sum()
            assert mass_before <= top_p + 1e-5
            sizes.append(int((p.sort(descending=True).values.cumsum(0) - p.sort(descending=True).values <= top_p).sum()))
    assert max(sizes) > 1  # the test exercised real nuclei, not only argmax


def test_sample_top_p_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.1, 0.3]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, top_p=0.6, generator=g)
    counts = torch.bincount(draws, minlength=4)
    assert counts[0] == 0 and counts[2] == 0  # outside the nucleus {1, 3}
    assert abs(counts[1].item() / 4000 - 0.5 / 0.8) < 0.03
    assert torch.equal(sample(logits[:2], temperature=0.0), torch.tensor([1, 1]))


# ----------------------------------------------------------------------------- backward

def test_backward_gives_finite_grads_everywhere():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, layer_types="M*-EM", num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8,
                      ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=16)
    model = Model(cfg)
    with torch.no_grad():
        model.model.layers[3].mixer.gate.weight.normal_()
    ids = torch.randint(0, VOCAB, (2, 19))
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name  # every block type is on the gradient path


def test_the_moe_router_keeps_its_fp32_values_when_the_model_is_cast():
    """Routing hangs on small score differences: a cast of the model to bf16 keeps the router's fp32
    weights and correction bias as they were, not rounded through bf16 and back."""
    cfg = ModelConfig(vocab_size=32, hidden_size=16, layer_types="E", n_routed_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=8, moe_shared_expert_intermediate_size=8)
    torch.manual_seed(0)
    model = Model(cfg)
    gate = model.model.layers[0].mixer.gate
    gate.e_score_correction_bias.normal_()
    before = (gate.weight.detach().clone(), gate.e_score_correction_bias.clone())
    model.to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert gate.weight.dtype == torch.float32 and torch.equal(gate.weight.detach(), before[0])
    assert torch.equal(gate.e_score_correction_bias, before[1])


def _kept_bytes(fn, inside=None) -> int:
    """fn's result, and {storage: bytes} of the tensors autograd keeps for backward while `fn` runs, each storage
    once (while the module `inside` runs, if given)."""
    seen, on = {}, [inside is None]
    if inside is not None:
        hooks = [inside.register_forward_pre_hook(lambda *a: on.__setitem__(0, True)),
                 inside.register_forward_hook(lambda *a: on.__setitem__(0, False))]

    def keep(t):
        if on[0]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = fn()
    for h in hooks if inside is not None else ():
        h.remove()
    return out, seen


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("skip_inside", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_norm_and_out_proj_gives_autograds_values_and_gradients(skip_inside, dtype, masked):
    """Mamba's D skip, gated norm and out_proj as one function whose backward is written out (the norm
    recomputed, its output not kept): the output and the gradients of y, x, D, z, the norm's weight, a soft
    mask's channel scale and out_proj's weight and bias equal autograd's through the plain composition
    (norm_then_out_proj): from float64 inputs to fp32 rounding (the norm computes in fp32); with bf16 inputs
    under autocast (as training runs it on a GPU, here on the CPU) to bf16 rounding. skip_inside: x None, y
    already has the skip (kernels.conv_scan). masked: the channels scaled by a soft mask (0 for some, between 0
    and 1 for others), each group normalised over its kept share, as MaskedGatedRMSNorm gives it."""
    from star_elastic.model import norm_and_out_proj, norm_then_out_proj

    torch.manual_seed(0)
    b, t, h, p, G, hidden = 2, 5, 4, 6, 2, 7
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    y = torch.randn(b, t, h, p, dtype=dtype)
    x = None if skip_inside else torch.randn(b, t, h, p, dtype=dtype)
    z = torch.randn(b, t, h * p, dtype=dtype)
    D, weight = torch.randn(h, dtype=wide), 1 + 0.1 * torch.randn(h * p, dtype=wide)
    unit = torch.rand(h * p).mul(torch.rand(h * p) > 0.3) if masked else None  # a soft mask, some channels at 0
    out_w, out_b = torch.randn(hidden, h * p, dtype=wide) / 5, torch.randn(hidden, dtype=wide)
    leaves = [v.requires_grad_() for v in (y, x, D, z, weight, unit, out_w, out_b) if v is not None]
    g = torch.randn(b, t, hidden, dtype=wide)
    results = []
    for fn in (norm_and_out_proj, norm_then_out_proj):
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(y, x, D, z, weight, G, 1e-5, out_w, out_b, wide, unit)
        results.append((out, *torch.autograd.grad((out.to(wide) * g).sum(), leaves, allow_unused=True)))
    for got, want in zip(*results):
        if skip_inside and want is None:  # D: only through x's skip
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the norm computes in fp32
        else:
            assert (got.float() - want.float()).norm() <= 0.02 * want.float().norm()


def test_a_mamba_layer_recomputes_its_conv_and_norm_in_backward_with_the_same_gradients(monkeypatch):
    """Training keeps for a Mamba layer's backward only what the scan and the linear layers need: the causal
    conv + SiLU and the D skip + gated norm are recomputed in backward (torch.utils.checkpoint), where autograd
    kept the zero-padded conv input, the conv's output and the norm's fp32 intermediates (at the 539M config
    88.6 -> 36.6 KB a token eager, benchmarks/bench_saved.py); so are the MoE router's scores (its fp32 copy of
    the input), and the experts' activation times its neuron mask and routing weights (kept beside its input
    before). The gradients are the same, the router's and the masks' included, masked or not."""
    from contextlib import nullcontext

    from star_elastic import kernels
    from star_elastic import model as model_module
    from star_elastic.elastic.masking import masked
    from star_elastic.elastic.spec import ElasticSpec

    cfg = ModelConfig(vocab_size=97, hidden_size=32, layer_types="ME", mamba_num_heads=4, mamba_head_dim=8,
                      ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)
    torch.manual_seed(0)
    model = Model(cfg)
    with torch.no_grad():  # a router that prefers some experts: its gradient then reaches the chosen ones' weights
        model.model.layers[1].mixer.gate.weight.normal_()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    spec = ElasticSpec(mamba_num_heads=2, hidden_size=24, moe_intermediate_size=8)
    keep_everything = lambda fn, *a, **settings: fn(*a)  # noqa: E731  (what autograd kept before)

    def grads(masks, backward_inside=True):  # the parameters' and, masked, the (soft) masks' gradients: the
        model.zero_grad(set_to_none=True)       # router learns through them
        soft = {k: (0.5 + 0.5 * m.float()).requires_grad_() for k, m in spec.masks(cfg).items()}
        with masked(model, soft) if masks else nullcontext():
            loss = model(x).float().pow(2).mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:  # the masks' classes are gone when backward recomputes (the trainer's order)
            loss.backward()
        return {**{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                **({f"mask {k}": m.grad for k, m in soft.items() if m.grad is not None} if masks else {})}

    for masks, inside in ((False, True), (True, True), (True, False)):
        got = grads(masks, inside)
        monkeypatch.setattr(model_module, "checkpoint", keep_everything)
        monkeypatch.setattr(model_module, "norm_and_out_proj", model_module.norm_then_out_proj)
        want = grads(masks, inside)
        monkeypatch.undo()
        assert got.keys() == want.keys() and got and (not masks or {
            "mask hidden", "mask layers.0.mamba_heads", "mask layers.1.expert_ffn"} <= got.keys())
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)

    # what the layer keeps, the scan apart (a stand-in that keeps nothing; the kernel keeps its own inputs)
    def kept() -> int:
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = _kept_bytes(lambda: model(x), inside=model.model.layers[0])[1]
        return sum(n for storage, n in seen.items() if storage not in weights)

    def scan_keeping_nothing(x, dt, A, B, C, chunk_size, initial_state=None, *, fallback):
        with torch.no_grad():
            y, final = fallback(x, dt, A, B, C, chunk_size, initial_state)
        return y.requires_grad_(), final

    monkeypatch.setattr(kernels, "chunk_scan", scan_keeping_nothing)
    recomputed = kept()
    monkeypatch.setattr(model_module, "checkpoint", keep_everything)
    monkeypatch.setattr(model_module, "norm_and_out_proj", model_module.norm_then_out_proj)
    # 0.53 at these widths (0.58 while the norm's output was kept for out_proj), 0.41 at the 539M config
    assert recomputed < 0.55 * kept(), (recomputed, kept())


def test_rms_norm_runs_torchs_fused_norm_unless_a_mask_gives_its_mean_of_squares(monkeypatch):
    """A plain RMSNorm runs torch's rms_norm (one fused kernel on CUDA, forward and backward) and gives the
    written-out norm's values and gradients (fp32 in, bf16 in), and so does Mamba's gated norm per group; a
    masked one (its own mean of squares over the kept channels, or a channel scale) keeps the written-out form."""
    from star_elastic.elastic.masking import MaskedRMSNorm
    from star_elastic.model import GatedRMSNorm, RMSNorm

    calls = []
    fused = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda *a, **k: calls.append(a[1]) or fused(*a, **k))
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
        y = norm(x)
        assert len(calls) == 1 and tuple(calls.pop()) == (16,)
        xf = x.float()
        want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        g = torch.randn_like(want)
        got_x, got_w = torch.autograd.grad((y * g).sum(), (x, norm.weight))
        want_x, want_w = torch.autograd.grad((want * g).sum(), (x, norm.weight))
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        for a, b in ((y, want), (got_x, want_x), (got_w, want_w)):
            torch.testing.assert_close(a, b, **tol)
    gated = GatedRMSNorm(16, 4, 1e-5)  # Mamba's: each of 4 groups of 4 channels normalised on its own
    x, z = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    y = gated(x, z)
    assert len(calls) == 1 and tuple(calls.pop()) == (4,)
    g = (x * F.silu(z)).unflatten(-1, (4, 4))
    torch.testing.assert_close(y, (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2))
    gated.channel_scale = lambda: torch.tensor([1.0, 1.0, 0.5, 0.0] * 4)  # a mask's soft channel scale
    gated(x, z)
    assert not calls
    masked = MaskedRMSNorm(16, 1e-5)
    masked.mask = torch.tensor([1.0] * 12 + [0.0] * 4)
    x = torch.randn(2, 16) * masked.mask
    y = masked(x)
    assert not calls
    torch.testing.assert_close(y[:, :12], RMSNorm(12, 1e-5)(x[:, :12]))  # the kept channels' own norm
