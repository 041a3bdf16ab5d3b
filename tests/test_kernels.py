"""The optional fast paths (issue 16) on the CPU: the scan's dispatch (star_elastic/kernels.py) and
the chunked distillation loss (elastic/losses.py: `kd_loss` on `HeadInput`s, `head_input`).

The Triton kernel itself needs a GPU: benchmarks/bench_kernels.py checks it against the einsum
scan there. Here: the dispatch picks the einsum scan on the CPU, when disabled and when the kernel
cannot be imported; the adapter passes the kernel ssd_scan's arguments (through a stand-in with the
kernel's signature); the model's Mamba layers, masked or not, with a cache or not, go through it.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port, gloo_group
from torch.utils._python_dispatch import TorchDispatchMode

from star_elastic import kernels
from star_elastic.elastic.losses import (CHUNK_ELEMENTS, HeadInput, LossWeights, head_input, kd_loss, next_token_ce,
                                         task_loss)
from star_elastic.elastic.masking import masked
from star_elastic.elastic.spec import ElasticSpec
from star_elastic.model import Model, ModelConfig, ssd_scan

CFG = ModelConfig(vocab_size=97, hidden_size=32, layer_types="M*ME", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8,
                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  moe_shared_expert_intermediate_size=16, intermediate_size=32)


def scan_inputs(b=2, t=13, h=4, p=3, g=2, n=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen).to(dtype)
    dt = F.softplus(torch.randn(b, t, h, generator=gen))
    A = -torch.rand(h, generator=gen) - 0.1
    B = torch.randn(b, t, g, n, generator=gen).to(dtype)
    C = torch.randn(b, t, g, n, generator=gen).to(dtype)
    return x, dt, A, B, C


class StandIn:
    """A stand-in for mamba_chunk_scan_combined: its signature, ssd_scan's arithmetic, and a record
    of how it was called."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                 cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                 return_varlen_states=False):
        self.calls.append(dict(shape=tuple(x.shape), chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                               dt_softplus=dt_softplus, dt_limit=dt_limit, initial=initial_states,
                               return_final_states=return_final_states))
        y, final = ssd_scan(x, dt, A, B, C, chunk_size, initial_states)
        return y.to(x.dtype), final  # the kernel returns y in x's dtype


@pytest.fixture
def stand_in(monkeypatch):
    """The kernel 'imports' (as the stand-in); the environment switches it on and does not disable it."""
    fake = StandIn()
    monkeypatch.setattr(kernels, "_load", lambda: (fake, None))
    monkeypatch.delenv(kernels.ENV_DISABLE, raising=False)
    monkeypatch.setenv(kernels.ENV_ENABLE, "1")
    return fake


# ----------------------------------------------------------------------------- dispatch

def test_cpu_takes_the_einsum_scan_even_when_the_kernel_imports(stand_in):
    x, dt, A, B, C = scan_inputs()
    assert kernels.triton_enabled() and not kernels.uses_triton(x)
    y, final = kernels.chunk_scan(x, dt, A, B, C, 8, fallback=ssd_scan)
    ref_y, ref_final = ssd_scan(x, dt, A, B, C, 8)
    assert torch.equal(y, ref_y) and torch.equal(final, ref_final) and not stand_in.calls


@pytest.mark.parametrize("value, enabled", [("1", False), ("true", False), ("0", True), ("", True)])
def test_environment_variable_disables_the_kernel(stand_in, monkeypatch, value, enabled):
    monkeypatch.setenv(kernels.ENV_DISABLE, value)
    assert kernels.disabled() is not enabled and kernels.triton_enabled() is enabled


def test_the_kernel_is_on_by_default_and_either_variable_switches_it_off(stand_in, monkeypatch):
    """Checked against the einsum scan on a GPU (bench_kernels.py check), the Triton scan is on by default."""
    monkeypatch.delenv(kernels.ENV_ENABLE)
    assert kernels.ON_BY_DEFAULT and kernels.triton_enabled()
    monkeypatch.setenv(kernels.ENV_ENABLE, "0")
    assert kernels.disabled() and not kernels.triton_enabled()
    monkeypatch.setattr(kernels, "ON_BY_DEFAULT", False)  # opt-in mode still works
    monkeypatch.delenv(kernels.ENV_ENABLE)
    assert not kernels.triton_enabled()
    monkeypatch.setenv(kernels.ENV_ENABLE, "1")
    assert kernels.triton_enabled()


def test_cuda_tensors_would_take_the_kernel_unless_disabled(stand_in, monkeypatch):
    """`uses_triton` on a tensor that reports CUDA (the check reads only is_cuda and dtype)."""

    class Cuda:
        is_cuda, dtype = True, torch.bfloat16

    assert kernels.uses_triton(Cuda())
    for dtype in (torch.float32, torch.float64):  # full precision keeps the einsum scan (no TF32 rounding)
        Cuda.dtype = dtype
        assert not kernels.uses_triton(Cuda())
    Cuda.dtype = torch.float16
    assert kernels.uses_triton(Cuda())
    monkeypatch.setenv(kernels.ENV_DISABLE, "1")
    assert not kernels.uses_triton(Cuda())


def test_no_kernel_nothing_breaks(monkeypatch):
    """mamba_ssm not importable: the reason is kept, the model runs on the einsum scan, and asking
    for the Triton scan directly says why it cannot."""
    kernels._import.cache_clear()
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # `import mamba_ssm...` raises ImportError
    try:
        assert kernels.kernel() is None and "mamba_ssm" in kernels.unavailable_reason()
        assert not kernels.triton_enabled()
        x, dt, A, B, C = scan_inputs()
        y, _ = kernels.chunk_scan(x, dt, A, B, C, 8, fallback=ssd_scan)
        assert torch.equal(y, ssd_scan(x, dt, A, B, C, 8)[0])
        torch.manual_seed(0)
        model = Model(CFG)
        assert torch.isfinite(model(torch.randint(0, CFG.vocab_size, (2, 11)))).all()
        with pytest.raises(RuntimeError, match="not available"):
            kernels.triton_scan(x, dt, A, B, C, 8)
    finally:
        kernels._import.cache_clear()


@pytest.mark.parametrize("with_state", [False, True])
def test_triton_adapter_passes_ssd_scan_arguments(with_state):
    """What the kernel is given: dt as is (no softplus, bias or limit of its own), no D or z, the
    initial state in fp32, final states asked for; y comes back as the kernel wrote it (x's dtype: a compiled
    layer widens it inside its graph, keeping the bf16 tensor for backward, not an fp32 copy)."""
    fake = StandIn()
    x, dt, A, B, C = scan_inputs(dtype=torch.bfloat16)
    h0 = torch.randn(2, 4, 3, 5) if with_state else None
    y, final = kernels.triton_scan(x, dt, A, B, C, 8, h0, scan=fake)
    (call,) = fake.calls
    assert call["D"] is None and call["z"] is None and call["dt_bias"] is None and not call["dt_softplus"]
    assert call["dt_limit"] == (0.0, float("inf")) and call["return_final_states"] and call["chunk_size"] == 8
    assert (call["initial"] is None) == (not with_state)
    ref_y, ref_final = ssd_scan(x, dt, A, B, C, 8, h0)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert torch.equal(y, ref_y.to(torch.bfloat16)) and torch.allclose(final, ref_final)


def model_paths(monkeypatch, dispatch: str, calls: list):
    """A small hybrid model run with kernels.<dispatch> forced on, then off: for each, (logits, gradients of a
    loss on them, logits under masks, the logits of a second prefill continued from a cache, the kernel calls
    recorded in `calls` meanwhile)."""
    torch.manual_seed(0)
    model = Model(CFG)
    x = torch.randint(0, CFG.vocab_size, (2, 11))
    spec = ElasticSpec(mamba_num_heads=2, mamba_head_dim=4, hidden_size=24)

    def run(forced: bool):
        monkeypatch.setattr(kernels, dispatch, lambda t: forced)
        calls.clear()
        model.zero_grad()
        full = model(x)
        full.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        with masked(model, spec.masks(CFG)):
            part = model(x)
        cache = model.make_cache(2, 16)
        with torch.no_grad():
            model(x[:, :7], cache=cache, pos=torch.arange(7))
            step = model(x[:, 7:9], cache=cache, pos=torch.arange(7, 9))  # a second prefill, from the state
        return full, grads, part, step, list(calls)

    return run(True), run(False)


def assert_same_paths(fast, slow):
    assert torch.allclose(fast[0], slow[0], atol=1e-5) and torch.allclose(fast[2], slow[2], atol=1e-5)
    assert not torch.allclose(fast[0], fast[2], atol=1e-3)  # the masks did something
    assert torch.allclose(fast[3], slow[3], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast[1], slow[1]))


def test_model_scans_go_through_the_dispatch_masked_or_not_cached_or_not(stand_in, monkeypatch):
    """With the dispatch forced to the 'kernel' (the stand-in computes what ssd_scan does), every
    Mamba layer's scan reaches it: plain, under masks (applied outside the scan, on its outputs)
    and at prefill with a cache (initial state in, final state out); logits and gradients equal
    the einsum path's, and masks change the output the same way on both paths."""
    fast, slow = model_paths(monkeypatch, "uses_triton", stand_in.calls)
    n_mamba = CFG.layer_types.count("M")
    assert len(fast[4]) == 4 * n_mamba and not slow[4]  # forward, masked, two prefills
    assert_same_paths(fast, slow)


class FakeCuda:
    """What a dispatch reads of a tensor: a CUDA one, bf16 unless set."""

    def __init__(self, dtype=torch.bfloat16):
        self.is_cuda, self.dtype = True, dtype


def check_cuda_half_only(monkeypatch, uses, loader: str):
    """What every optional kernel's dispatch `uses` shares, once switched on: CUDA bf16 / fp16 inputs only (CPU
    and fp32 tensors keep PyTorch's path), off with STAR_ELASTIC_NO_TRITON, off when its module (kernels.<loader>)
    does not import."""
    assert uses(FakeCuda()) and uses(FakeCuda(torch.float16))
    assert not uses(torch.zeros(2, dtype=torch.bfloat16)) and not uses(FakeCuda(torch.float32))
    monkeypatch.setenv(kernels.ENV_DISABLE, "1")
    assert not uses(FakeCuda())
    monkeypatch.delenv(kernels.ENV_DISABLE)
    monkeypatch.setattr(kernels, loader, lambda: (None, "ImportError: not installed"))
    assert not uses(FakeCuda())


def check_on_by_default(monkeypatch, uses, loader: str, env: str):
    """An on-by-default kernel's dispatch `uses` (its module kernels.<loader>, already 'importing'): on with
    nothing set, off with `env` set to 0 alone, then, with `env` set to 1, what check_cuda_half_only checks."""
    monkeypatch.delenv(kernels.ENV_DISABLE, raising=False)
    monkeypatch.delenv(env, raising=False)
    assert uses(FakeCuda())  # on by default
    monkeypatch.setenv(env, "0")  # switched off alone
    assert not uses(FakeCuda())
    monkeypatch.setenv(env, "1")
    check_cuda_half_only(monkeypatch, uses, loader)


# ----------------------------------------------------------------------------- the causal conv

class StandInConv:
    """What `causal_conv1d_fn(x, weight, bias, activation="silu")` computes, in PyTorch: silu of the depthwise
    conv of x (b, channels, t) with weight (channels, k), zeros before the first input. Records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, weight, bias=None, activation=None):
        self.calls.append(dict(x=x, weight=weight, bias=bias, activation=activation))
        k = weight.shape[-1]
        out = F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None], bias, groups=x.shape[1])
        return F.silu(out) if activation in ("silu", "swish") else out


def test_causal_conv_dispatch_is_on_by_default_since_checked_on_a_gpu(monkeypatch):
    """CUDA bf16 / fp16 inputs take causal_conv1d's kernel by default (its CUDA test passed on an H100), unless
    switched off alone (STAR_ELASTIC_CAUSAL_CONV=0) or with the Triton paths, or not importable; fp32 and CPU
    tensors never do."""
    monkeypatch.setattr(kernels, "_load_conv", lambda: (StandInConv(), None))
    check_on_by_default(monkeypatch, kernels.uses_causal_conv, "_load_conv", kernels.ENV_CONV)
    monkeypatch.setattr(kernels, "_load_conv", lambda: (None, "no module named causal_conv1d"))
    with pytest.raises(RuntimeError, match="not available: no module named causal_conv1d"):
        kernels.causal_conv(torch.zeros(1, 2, 3), torch.zeros(2, 4), None)


def test_causal_conv_copies_a_layout_the_kernel_would_refuse_or_misread():
    """The kernel reads channels-last views of in_proj's output only with channels and strides multiples of 8
    and 16-byte aligned data (its own checks and vector loads): such a view goes in as it is, any other (an odd
    row width, an odd offset: a small or masked layer) as a channels-first copy, with the same result."""
    conv = StandInConv()
    weight, bias = torch.randn(16, 4), torch.randn(16)

    def run(width: int, offset: int):
        proj = torch.randn(2, 9, width, dtype=torch.bfloat16)
        x = proj[..., offset:offset + 16].transpose(1, 2)  # (b, channels, t), channels stride 1
        conv.calls.clear()
        out = kernels.causal_conv(x, weight, bias, conv=conv)
        assert torch.equal(out, StandInConv()(x.contiguous(), weight.to(x.dtype), bias.to(x.dtype), activation="silu"))
        return conv.calls[0]["x"]

    assert run(40, 8).stride(1) == 1  # a fitting view: read in place
    for width, offset in ((36, 8), (40, 3)):  # row width 36 (not a multiple of 8); offset 3 elements (6 bytes)
        got = run(width, offset)
        assert got.stride(2) == 1 and got.is_contiguous()
    assert kernels.channels_last_fits(torch.zeros(2, 16, 9))  # channels-first: always


def test_the_kernel_reads_the_conv_input_in_place_at_nano_and_539m_widths():
    """At the widths the benchmarks measure (Nemotron 3 Nano's Mamba: 64 heads x 64, 8 groups, state 128; the 539M
    config's: 32 heads x 64) the conv's input, a channels-last view of in_proj's output, meets the kernel's layout
    rules, so the fast path copies nothing; a test-sized layer (odd row width) takes the channels-first copy."""
    from star_elastic.model import Mamba2

    def conv_input_fits(heads: int, head_dim: int, groups: int, state: int, hidden: int = 256) -> bool:
        cfg = ModelConfig(hidden_size=hidden, mamba_num_heads=heads, mamba_head_dim=head_dim, n_groups=groups,
                          ssm_state_size=state)
        with torch.device("meta"):
            layer = Mamba2(cfg)
        proj = torch.empty(2, 5, layer.in_proj.out_features, dtype=torch.bfloat16)
        return kernels.channels_last_fits(layer.split_in_proj(proj)[1].transpose(1, 2))

    assert conv_input_fits(64, 64, 8, 128, hidden=2688)  # Nano
    assert conv_input_fits(32, 64, 8, 128, hidden=1024)  # the 539M config of bench_speed
    assert not conv_input_fits(3, 6, 1, 5)  # row width 2 * 18 + 2 * 5 + 3 = 49


def test_model_conv_through_the_kernel_equals_the_pytorch_conv(monkeypatch):
    """Every Mamba layer's conv without a cache (training, a first prefill) reaches the kernel when it applies
    (a stand-in, forced on here) with the weight as (channels, k) in the input's dtype and SiLU inside: logits
    and gradients equal the PyTorch conv's, masked or not; with a cache the PyTorch path runs (it keeps the
    conv state)."""
    fake = StandInConv()
    monkeypatch.setattr(kernels, "_load_conv", lambda: (fake, None))
    fast, slow = model_paths(monkeypatch, "uses_causal_conv", fake.calls)
    n_mamba = CFG.layer_types.count("M")
    assert len(fast[4]) == 2 * n_mamba and not slow[4]  # plain and masked; the cached prefills keep PyTorch's conv
    call = fast[4][0]
    assert call["activation"] == "silu" and call["weight"].dim() == 2 and call["weight"].dtype == call["x"].dtype
    assert_same_paths(fast, slow)


# ----------------------------------------------------------------------------- conv, scan and skip in one

def scan_ops_stand_in():
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_saved import ScanOpsStandIn

    return ScanOpsStandIn()


def test_conv_scan_dispatch_is_on_by_default_since_checked_on_a_gpu(monkeypatch):
    """conv + scan + skip as one function on CUDA bf16 / fp16 by default (checked on an H100), unless switched off
    alone (STAR_ELASTIC_CONV_SCAN=0) or with the Triton paths, or not importable; CPU and fp32 tensors never
    take it; without it the layer's usual path runs."""
    ops = scan_ops_stand_in()
    monkeypatch.setattr(kernels, "_load_conv_scan", lambda: ((ops.fwd, ops.bwd), None))
    check_on_by_default(monkeypatch, kernels.uses_conv_scan, "_load_conv_scan", kernels.ENV_CONV_SCAN)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.conv_scan(*[torch.zeros(1)] * 6, 8, conv_split=None)


def test_model_through_conv_scan_equals_the_usual_path(monkeypatch):
    """Training's Mamba layers through kernels.conv_scan (the scan's forward and backward as stand-ins with
    mamba_ssm's signatures, forced on here): in_proj's output goes in, the D skip comes out added, and backward
    recomputes the conv. Logits and gradients equal the usual path's (conv, scan, skip apart), masked or not;
    without grad (the cached prefills) the usual path runs. Fails if the skip is added twice or a gradient
    is lost."""
    ops = scan_ops_stand_in()
    monkeypatch.setattr(kernels, "_load_conv_scan", lambda: ((ops.fwd, ops.bwd), None))
    fast, slow = model_paths(monkeypatch, "uses_conv_scan", ops.calls)
    n_mamba = CFG.layer_types.count("M")
    kinds = [k for k, _ in fast[4]]
    assert kinds.count("fwd") == 2 * n_mamba and kinds.count("bwd") == n_mamba and not slow[4]
    assert all(c["D"] is not None and c["z"] is None and c["dt_bias"] is None and not c["dt_softplus"]
               and c["initial"] is None for _, c in fast[4])
    assert_same_paths(fast, slow)


def layer_runs(monkeypatch, layer, u, g):
    """run(conv_scan, reference=False, compiled=False): the Mamba `layer`'s output on `u` under bf16 autocast on
    u's device and the gradients of (output * g).sum() for u and every parameter; conv_scan switches
    kernels.conv_scan on, reference runs norm_then_out_proj (autograd) for the norm and out_proj."""
    import star_elastic.model as model_module

    def run(conv_scan: bool, reference=False, compiled=False):
        monkeypatch.setenv(kernels.ENV_CONV_SCAN, "1" if conv_scan else "0")
        with monkeypatch.context() as m:
            if reference:
                m.setattr(model_module, "norm_and_out_proj", model_module.norm_then_out_proj)
            with torch.autocast(u.device.type, torch.bfloat16):
                out = (torch.compile(layer) if compiled else layer)(u)
            return (out.float(), *torch.autograd.grad((out.float() * g).sum(), [u, *layer.parameters()]))

    return run


def assert_near(got, want):
    """Each tensor of `got` within bf16 rounding (2% of the norm) of `want`'s."""
    for a, b in zip(got, want, strict=True):
        assert (a - b).norm() < 0.02 * b.norm() + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.unavailable_reason() is not None,
                    reason="the Triton scan's forward and backward need a GPU and mamba_ssm")
def test_conv_scan_and_norm_out_proj_on_cuda_give_autograds_output_and_gradients(monkeypatch):
    """On a GPU, mamba_ssm's real forward and backward: a Mamba layer at Nano's head shapes (fewer heads), under
    autocast as training runs it, gives the output and gradients (every parameter's, the input's) of the
    reference (the Triton scan, autograd through the norm and out_proj: norm_then_out_proj) to bf16 rounding:
    with the norm and out_proj's written-out backward (the default), with kernels.conv_scan too, and that
    compiled."""
    from star_elastic.model import Mamba2

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=256, mamba_num_heads=16, mamba_head_dim=64, n_groups=4, ssm_state_size=128,
                      chunk_size=128)
    layer = Mamba2(cfg).cuda()
    u = torch.randn(2, 512, 256, device="cuda", requires_grad=True)
    g = torch.randn(2, 512, 256, device="cuda")
    monkeypatch.delenv(kernels.ENV_DISABLE, raising=False)
    monkeypatch.setenv(kernels.ENV_CONV, "0")  # PyTorch's conv for the reference and the first three
    run = layer_runs(monkeypatch, layer, u, g)
    want = run(False, reference=True)
    for conv_scan, compiled in ((False, False), (True, False), (True, True)):
        got = run(conv_scan, compiled=compiled)
        assert kernels.uses_conv_scan(u.detach().to(torch.bfloat16)) == conv_scan  # the real dispatch took it
        assert_near(got, want)
    if kernels._load_conv()[0] is not None:  # causal_conv1d built (run.sh GPUTESTS with HFK_PATH): its conv too
        monkeypatch.delenv(kernels.ENV_CONV)
        assert kernels.uses_causal_conv(u.detach().to(torch.bfloat16))
        for compiled in (False, True):
            assert_near(run(True, compiled=compiled), want)


def small_mamba_layer():
    """A small Mamba layer (8 heads of 16, 2 groups), an input u (2, 64, 64) that wants its gradient, and g to
    weigh the output by."""
    from star_elastic.model import Mamba2

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
                      chunk_size=32)
    return Mamba2(cfg), torch.randn(2, 64, 64, requires_grad=True), torch.randn(2, 64, 64)


def test_a_compiled_layer_through_conv_scan_gives_the_references_gradients(monkeypatch):
    """Under torch.compile (the layer's graph breaks at conv_scan) and CPU autocast, with the scan's stand-ins:
    the output and gradients equal the eager reference's (autograd through conv, scan, norm and out_proj), as
    tests/test_kernels.py's CUDA test asks on a GPU. A first version passed views of in_proj's output across
    the break, which torch.compile rebuilt with garbage shapes (a RuntimeError, two runs in three)."""
    ops = scan_ops_stand_in()
    monkeypatch.setattr(kernels, "_load_conv_scan", lambda: ((ops.fwd, ops.bwd), None))
    monkeypatch.setattr(kernels, "uses_conv_scan", lambda x: kernels.conv_scan_enabled())
    layer, u, g = small_mamba_layer()
    run = layer_runs(monkeypatch, layer, u, g)
    want = run(False, reference=True)
    for _ in range(2):
        torch._dynamo.reset()
        assert_near(run(True, compiled=True), want)
    assert [k for k, _ in ops.calls] == ["fwd", "bwd"] * 2


def test_conv_scan_runs_its_conv_and_the_recompute_on_the_causal_conv_kernel(monkeypatch):
    """Inside kernels.conv_scan the conv, forward and the backward's recompute, goes through the causal conv kernel
    where it applies (both stand-ins, forced on here), so its backward is the kernel's, not PyTorch's depthwise
    conv's (12 of 136 ms a 539M step on an H100); the output and every gradient equal those with PyTorch's conv.
    Before, conv_scan always ran PyTorch's conv: the kernel saw no call."""
    ops, conv = scan_ops_stand_in(), StandInConv()
    monkeypatch.setattr(kernels, "_load_conv_scan", lambda: ((ops.fwd, ops.bwd), None))
    monkeypatch.setattr(kernels, "_load_conv", lambda: (conv, None))
    monkeypatch.setattr(kernels, "uses_conv_scan", lambda x: True)
    layer, u, g = small_mamba_layer()

    def run(kernel: bool):
        monkeypatch.setattr(kernels, "uses_causal_conv", lambda x: kernel)
        conv.calls.clear()
        out = layer(u)
        return (out, *torch.autograd.grad((out * g).sum(), [u, *layer.parameters()])), len(conv.calls)

    (fast, n_fast), (slow, n_slow) = run(True), run(False)
    assert (n_fast, n_slow) == (2, 0)  # forward, then the recompute in backward
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(fast, slow, strict=True))
    assert layer.conv1d.weight.grad is None  # autograd.grad: nothing accumulated, so the comparison is fair


def test_conv_scan_keeps_the_convs_input_not_its_output(monkeypatch):
    """What a Mamba layer keeps for backward through kernels.conv_scan: not the conv's output (x, B and C for
    the scan and x for the skip: conv_dim values a token), which the usual path keeps; the conv's input is a
    view of in_proj's output, kept anyway."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    from contextlib import ExitStack

    import bench_saved

    cfg = ModelConfig(vocab_size=97, hidden_size=32, layer_types="M", mamba_num_heads=4, mamba_head_dim=8,
                      ssm_state_size=8, n_groups=2, chunk_size=8)
    model = Model(cfg).to(torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (1, 64))
    kept = {}
    for one in (False, True):
        with ExitStack() as stack:
            bench_saved.kernels_in(stack, "stand-in", torch.device("cpu"), conv=False, conv_scan=one)
            kept[one] = sum(n for n, _, _ in bench_saved.kept(model, x, compiled=False))
    conv_dim = 4 * 8 + 2 * 2 * 8
    assert kept[False] - kept[True] >= 64 * conv_dim * 2  # bf16


# ----------------------------------------------------------------------------- chunked distillation

def _head(seed, n_tokens=23, d=12, vocab=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n_tokens, d, generator=g, dtype=dtype) * 2, torch.randn(vocab, d, generator=g, dtype=dtype)



# ----------------------------------------------------------------------------- the decode state update

class StandInUpdate:
    """A stand-in for mamba_ssm's selective_state_update: its signature, its shape checks, its
    arithmetic (head h reads group h // (heads / groups); state updated in place; out in x's dtype)."""

    def __init__(self):
        self.calls = []

    def __call__(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                 state_batch_indices=None):
        b, h, p, n = state.shape
        g = B.shape[1]
        assert x.shape == (b, h, p) and dt.shape == x.shape and A.shape == (h, p, n)
        assert B.shape == (b, g, n) and C.shape == B.shape and h % g == 0
        # mamba_ssm 2.3.2's launcher reads D's and dt_bias's strides (`*(D.stride(0), D.stride(1)) if D
        # is not None else 0` unpacks an int when None), so None fails there
        assert D is not None and dt_bias is not None and D.shape == dt_bias.shape == (h, p)
        tie_hdim = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0
        self.calls.append(dict(dtype=x.dtype, groups=g, B_dtype=B.dtype, z=z, dt_softplus=dt_softplus, tie_hdim=tie_hdim,
                               D_zero=bool((D == 0).all()), dt_bias_zero=bool((dt_bias == 0).all())))
        dt = dt + dt_bias
        Bh, Ch = B.float().repeat_interleave(h // g, dim=1), C.float().repeat_interleave(h // g, dim=1)  # as loaded
        state.copy_(state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * Bh[:, :, None])
        return (torch.einsum("bhpn,bhn->bhp", state, Ch) + x * D).to(x.dtype)


def step_inputs(b=2, h=4, p=3, n=5, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, p, generator=gen).to(dtype), F.softplus(torch.randn(b, h, generator=gen)),
            -torch.rand(h, generator=gen) - 0.1, torch.randn(b, h, n, generator=gen),
            torch.randn(b, h, n, generator=gen), torch.randn(b, h, p, n, generator=gen))


def test_triton_state_update_is_the_recurrence():
    """What the kernel is given (x in fp32 so y comes back fp32; dt, A and the zero dt_bias broadcast
    as stride-0 views; B and C per head; D zeros; no z, no softplus of its own) and that it gives
    recurrence_step's y and state."""
    from star_elastic.model import recurrence_step

    fake = StandInUpdate()
    x, dt, A, B, C, state = step_inputs()
    ref_state = state.clone()
    y = kernels.triton_state_update(x, dt, A, B, C, state, update=fake)
    ref = recurrence_step(x, dt, A, B, C, ref_state)
    (call,) = fake.calls
    assert call["dtype"] == torch.float32 and call["groups"] == 4  # per head: either head order reads right
    assert call["D_zero"] and call["dt_bias_zero"] and call["z"] is None and not call["dt_softplus"]
    assert call["tie_hdim"]  # dt, A and dt_bias broadcast with stride 0: the kernel's tied-head-dim path
    assert y.dtype == torch.float32 and torch.allclose(y, ref, atol=1e-5) and torch.allclose(state, ref_state, atol=1e-5)


def test_state_step_dispatch(monkeypatch):
    """CPU tensors take the recurrence even when the kernel imports; CUDA bf16 / fp16 would take the
    kernel by default (on since it was checked on an H200), unless switched off alone or with the scan; fp32
    keeps the recurrence; not importable: the recurrence."""
    fake = StandInUpdate()
    monkeypatch.setattr(kernels, "_load_update", lambda: (fake, None))
    monkeypatch.delenv(kernels.ENV_DISABLE, raising=False)
    monkeypatch.delenv(kernels.ENV_STEP, raising=False)
    x, dt, A, B, C, state = step_inputs()
    seen = []
    kernels.state_step(x, dt, A, B, C, state, fallback=lambda *a: seen.append(a) or a[0].float())
    assert len(seen) == 1 and not fake.calls
    check_on_by_default(monkeypatch, kernels.uses_triton_step, "_load_update", kernels.ENV_STEP)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.triton_state_update(*step_inputs())


class StandInOwnUpdate:
    """What decode_kernel.state_update computes, in PyTorch (recurrence_step), recording what it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, dt, A, B, C, state):
        from star_elastic.model import recurrence_step

        self.calls.append(dict(x=x.dtype, dt=dt.dtype, A=A.dtype, groups=B.shape[1], B_dtype=B.dtype))
        return recurrence_step(x, dt, A, B, C, state)


def test_the_decode_update_kernel_is_chosen_in_order_or_by_name(monkeypatch):
    """With nothing chosen the first of STEP_ORDER that imports runs (ours where both do, mamba_ssm's where ours
    does not, the recurrence where neither; another order is followed too); STAR_ELASTIC_STEP_KERNEL picks one by name;
    STAR_ELASTIC_TRITON_STEP=0 or the Triton switch-off means the recurrence; our kernel takes any float dtype on
    CUDA, never a CPU tensor; a name that is not a kernel is one clear error."""
    for env in (kernels.ENV_STEP, kernels.ENV_STEP_KERNEL, kernels.ENV_DISABLE, kernels.ENV_ENABLE):
        monkeypatch.delenv(env, raising=False)
    have = {"own": True, "mamba_ssm": True}
    monkeypatch.setattr(kernels, "_load_own_update", lambda: (object(), None) if have["own"] else (None, "no triton"))
    monkeypatch.setattr(kernels, "_load_update", lambda: (object(), None) if have["mamba_ssm"] else (None, "absent"))
    assert kernels.STEP_ORDER == ("own", "mamba_ssm")
    assert kernels.active_step_kernel() == "own"
    assert kernels.uses_own_step(FakeCuda()) and not kernels.uses_triton_step(FakeCuda())
    have["own"] = False
    assert kernels.active_step_kernel() == "mamba_ssm"
    have["own"] = True
    monkeypatch.setattr(kernels, "STEP_ORDER", ("mamba_ssm", "own"))
    assert kernels.active_step_kernel() == "mamba_ssm"
    assert kernels.uses_triton_step(FakeCuda()) and not kernels.uses_own_step(FakeCuda())
    have["mamba_ssm"] = False
    assert kernels.active_step_kernel() == "own"
    assert kernels.uses_own_step(FakeCuda()) and kernels.uses_own_step(FakeCuda(torch.float32))
    assert not kernels.uses_own_step(torch.zeros(2, dtype=torch.bfloat16)) and not kernels.uses_triton_step(FakeCuda())
    have["own"] = False
    assert kernels.active_step_kernel() == "torch"
    have.update(own=True, mamba_ssm=True)
    for name in kernels.STEP_KERNELS:
        monkeypatch.setenv(kernels.ENV_STEP_KERNEL, name)
        assert kernels.active_step_kernel() == name
    monkeypatch.setenv(kernels.ENV_STEP, "0")
    assert kernels.active_step_kernel() == "torch"
    monkeypatch.delenv(kernels.ENV_STEP)
    monkeypatch.setenv(kernels.ENV_DISABLE, "1")
    assert kernels.active_step_kernel() == "torch"
    monkeypatch.delenv(kernels.ENV_DISABLE)
    monkeypatch.setenv(kernels.ENV_STEP_KERNEL, "fast")
    with pytest.raises(ValueError, match="STAR_ELASTIC_STEP_KERNEL='fast': expected one of own, mamba_ssm, torch"):
        kernels.active_step_kernel()


def test_our_decode_update_gets_the_recurrences_arguments_and_refuses_a_state_it_cannot_write():
    """own_state_update hands the kernel dt and A in fp32 and B, C per group as given, returns y and updates the
    state as the recurrence does; a bf16 state or one whose last dim is strided is refused in one line (the kernel
    writes fp32 rows in place), and a missing kernel says why."""
    from star_elastic.model import recurrence_step

    fake = StandInOwnUpdate()
    x, dt, A, B, C, state = step_inputs(h=4)
    B, C = B[:, :2], C[:, :2]  # two groups of two heads
    ref_state = state.clone()
    y = kernels.own_state_update(x, dt.half(), A.half(), B, C, state, update=fake)
    ref = recurrence_step(x, dt.half().float(), A.half().float(), B, C, ref_state)
    (call,) = fake.calls
    assert call["dt"] == call["A"] == torch.float32 and call["groups"] == 2 and call["x"] == torch.bfloat16
    assert torch.allclose(y, ref) and torch.allclose(state, ref_state)
    with pytest.raises(ValueError, match="fp32 state with a contiguous last dim"):
        kernels.own_state_update(x, dt, A, B, C, state.to(torch.bfloat16), update=fake)
    with pytest.raises(ValueError, match="fp32 state with a contiguous last dim"):
        kernels.own_state_update(x, dt, A, B, C, state.transpose(-1, -2).contiguous().transpose(-1, -2), update=fake)
    if kernels._load_own_update()[0] is None:
        with pytest.raises(RuntimeError, match="our Triton decode update is not available"):
            kernels.own_state_update(x, dt, A, B, C, state)


@pytest.mark.parametrize("kernel", ["mamba_ssm", "own"])
@pytest.mark.parametrize("serving_order", [False, True])
def test_decode_through_either_kernel_generates_what_the_recurrence_does(monkeypatch, serving_order, kernel):
    """Greedy decoding of a hybrid model with every Mamba step through `mamba_ssm`'s kernel or ours (stand-ins, forced
    on here) writes the same tokens as through the recurrence, in group-major and serving head order."""
    from star_elastic.generate import generate
    from star_elastic.serve.order import use_serving_order

    torch.manual_seed(0)
    model = Model(CFG).eval()
    if serving_order:
        use_serving_order(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 7))
    ref = generate(model, ids, 8, use_graph=False)
    if kernel == "own":
        fake = StandInOwnUpdate()
        monkeypatch.setattr(kernels, "_own_op", lambda: fake)
        monkeypatch.setattr(kernels, "own_step_available", lambda: True)
        monkeypatch.setattr(kernels, "uses_own_step", lambda x: True)
    else:
        fake = StandInUpdate()
        monkeypatch.setattr(kernels, "_load_update", lambda: (fake, None))
        monkeypatch.setattr(kernels, "uses_triton_step", lambda x: True)
    got = generate(model, ids, 8, use_graph=False)
    assert len(fake.calls) == 7 * 2  # 7 decode steps (the prompt is one prefill) x 2 Mamba layers
    # group-major: B and C per group as the conv gives them (the kernels map heads to groups and cast them
    # themselves); the serving order's rank-major heads need them per head in fp32
    groups = {(c["groups"], c["B_dtype"]) for c in fake.calls}
    assert groups == ({(CFG.mamba_num_heads, torch.float32)} if serving_order else {(CFG.n_groups, torch.float32)})
    assert torch.equal(got, ref)


@pytest.mark.parametrize("chunk", [1, 4, 7, 10, 45, 46, 1000])
@pytest.mark.parametrize("teacher_kind", ["logits", "head"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_chunked_kd_equals_whole_kd(chunk, teacher_kind, with_mask):
    """46 tokens in chunks that divide it and that do not: the fused head (student HeadInput) and
    the checkpointed logits path give the unchunked loss and its gradients (hidden, head weight)."""
    h, W = _head(0)
    ht, Wt = _head(1)
    mask = (torch.arange(46).reshape(2, 23) % 3 != 0) if with_mask else None
    ref_h, ref_W = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref = kd_loss(ref_h @ ref_W.T, ht @ Wt.T, mask)
    ref.backward()
    teacher = ht @ Wt.T if teacher_kind == "logits" else HeadInput(ht, Wt)
    # fused: student as hidden + weight
    a_h, a_W = h.clone().requires_grad_(), W.clone().requires_grad_()
    fused = kd_loss(HeadInput(a_h, a_W), teacher, mask, chunk_tokens=chunk)
    fused.backward()
    # checkpointed: student as logits
    b_h, b_W = h.clone().requires_grad_(), W.clone().requires_grad_()
    logits = b_h @ b_W.T
    ckpt = kd_loss(logits, teacher, mask, chunk_tokens=chunk)
    ckpt.backward()
    for out, gh, gw in ((fused, a_h.grad, a_W.grad), (ckpt, b_h.grad, b_W.grad)):
        assert out.item() == pytest.approx(ref.item(), rel=1e-6)  # fp32 softmaxes inside
        assert torch.allclose(gh, ref_h.grad, rtol=1e-5, atol=1e-8)
        assert torch.allclose(gw, ref_W.grad, rtol=1e-5, atol=1e-8)
    with torch.no_grad():  # no gradient wanted: the same value
        assert kd_loss(HeadInput(h, W), teacher, mask, chunk_tokens=chunk).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("teacher_kind", ["logits", "head"])
def test_compiled_kd_chunks_give_the_eager_loss_and_gradients(teacher_kind):
    """compiled_kd: each chunk's softmaxes, KL and gradient as one torch.compile'd function (the CPU
    runs dynamo's capture with "aot_eager"; inductor's fusion is the GPU's) give the eager chunks'
    loss and gradients, chunks that divide the tokens and one that does not; off again after."""
    from torch._dynamo.utils import counters

    from star_elastic.elastic import losses

    torch._dynamo.reset()
    counters.clear()
    h, W = _head(4)
    ht, Wt = _head(5)
    teacher = ht @ Wt.T if teacher_kind == "logits" else HeadInput(ht, Wt)
    grads = []
    for backend in (None, "aot_eager"):
        a_h, a_W = h.clone().requires_grad_(), W.clone().requires_grad_()
        with losses.compiled_kd(backend):
            loss = kd_loss(HeadInput(a_h, a_W), teacher, chunk_tokens=10)  # 46 tokens: 4 x 10 and 6
            loss.backward()
        grads.append((loss.detach(), a_h.grad, a_W.grad))
    assert losses._FUSED_CHUNK is None
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled chunk ran
    (l0, gh0, gw0), (l1, gh1, gw1) = grads
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6)
    assert torch.allclose(gh1, gh0, rtol=1e-5, atol=1e-8) and torch.allclose(gw1, gw0, rtol=1e-5, atol=1e-8)
    torch._dynamo.reset()


@pytest.mark.parametrize("teacher_kind", ["logits", "head"])
def test_compiled_kd_without_gradients_runs_compiled_and_gives_the_eager_value(teacher_kind):
    """compiled_kd without gradients (the router's score-function baseline, a forward under no_grad): the
    chunks' KL runs as a compiled function too, not the eager passes over (chunk, vocab) logits one kernel at
    a time, and gives the eager value."""
    from torch._dynamo.utils import counters

    from star_elastic.elastic import losses

    h, W = _head(4)
    ht, Wt = _head(5)
    teacher = ht @ Wt.T if teacher_kind == "logits" else HeadInput(ht, Wt)
    with torch.no_grad():
        eager = kd_loss(HeadInput(h, W), teacher, chunk_tokens=10)
        torch._dynamo.reset()
        counters.clear()
        with losses.compiled_kd("aot_eager"):
            compiled = kd_loss(HeadInput(h, W), teacher, chunk_tokens=10)  # 46 tokens: 4 x 10 and 6
        graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs >= 1  # the compiled chunk ran
    assert losses._FUSED_VALUE is None
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)


@pytest.mark.parametrize("grad", [True, False])
def test_compiled_kd_takes_larger_chunks_and_gives_the_eager_loss(monkeypatch, grad):
    """Under compiled_kd, whose chunk keeps no fp32 (chunk, vocab) tensor, the default chunk is
    FUSED_CHUNK_ELEMENTS logits, not the eager path's CHUNK_ELEMENTS: fewer passes of the head's fp32 gradient
    accumulator. Same loss and gradients as the eager chunks."""
    from star_elastic.elastic import losses

    h, W = _head(4)
    ht, Wt = _head(5)
    V = W.shape[0]
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 4 * V)  # eager: 4 tokens a chunk, 12 chunks of 46
    monkeypatch.setattr(losses, "FUSED_CHUNK_ELEMENTS", 16 * V)  # compiled: 16 tokens, 3 chunks
    calls, out = [], []
    for backend in (None, "aot_eager"):
        a_h, a_W = h.clone().requires_grad_(grad), W.clone().requires_grad_(grad)
        torch._dynamo.reset()
        with losses.compiled_kd(backend):
            name = "_FUSED_CHUNK" if grad else "_FUSED_VALUE"
            fused = getattr(losses, name)
            if fused is not None:  # counted (compiled_kd puts the old value back as it ends)
                setattr(losses, name, lambda *a: calls.append(a[0].shape[0]) or fused(*a))
            with torch.set_grad_enabled(grad):
                loss = kd_loss(HeadInput(a_h, a_W), HeadInput(ht, Wt))
            if grad:
                loss.backward()
        out.append((loss.detach(), a_h.grad, a_W.grad))
    torch._dynamo.reset()
    assert losses._FUSED_CHUNK is None and losses._FUSED_VALUE is None
    assert calls == [16, 16, 14]
    (l0, gh0, gw0), (l1, gh1, gw1) = out
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6)
    if grad:
        assert torch.allclose(gh1, gh0, rtol=1e-5, atol=1e-8) and torch.allclose(gw1, gw0, rtol=1e-5, atol=1e-8)


def test_fused_kd_makes_no_tensor_of_the_whole_batch_logits():
    """Every tensor any op makes, forward and backward, is at most one chunk of logits (or the
    head's weight / its gradient): nothing of (tokens, vocab) for the whole batch."""
    n, d, vocab, chunk = 64, 8, 300, 7
    h, W = (t.float() for t in _head(2, n_tokens=n // 2, d=d, vocab=vocab))
    ht, Wt = (t.float() for t in _head(3, n_tokens=n // 2, d=d, vocab=vocab))
    h.requires_grad_(), W.requires_grad_()

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    with Largest():
        loss = kd_loss(HeadInput(h, W), HeadInput(ht, Wt), chunk_tokens=chunk)
        loss.backward()
    assert Largest.biggest <= max(chunk * vocab, vocab * d) < n * vocab
    assert h.grad is not None and W.grad is not None


def test_default_chunk_keeps_small_vocabularies_whole_and_cuts_large_ones():
    s, t = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    assert CHUNK_ELEMENTS // 40 > 15  # one chunk: the computation is the unchunked one
    assert torch.equal(kd_loss(s, t), kd_loss(s, t, chunk_tokens=10 ** 9))
    assert CHUNK_ELEMENTS // 131072 == 1024  # Nemotron's 131k vocabulary: 1024 tokens a chunk


def test_head_input_is_the_model_up_to_its_head():
    """head_input: the hidden states the LM head would take (masks applied), its weight; the head
    is back afterwards; KD on head inputs gives the model's parameters the gradients that KD on
    its logits gives them."""
    torch.manual_seed(0)
    student, teacher = Model(CFG), Model(CFG)
    x = torch.randint(0, CFG.vocab_size, (2, 9))
    with masked(student, ElasticSpec(hidden_size=24, mamba_num_heads=2).masks(CFG)):
        hi = head_input(student, x)
        assert torch.allclose(hi.logits(), student(x), atol=1e-6)
    assert "forward" not in vars(student.lm_head) and student(x).shape == (2, 9, CFG.vocab_size)
    assert hi.weight is student.lm_head.weight and hi.dtype is None
    with torch.no_grad():
        t_logits, t_head = teacher(x), head_input(teacher, x)
    ref = kd_loss(student(x), t_logits)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    loss = kd_loss(head_input(student, x), t_head, chunk_tokens=5)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in student.named_parameters():
        if n in ref_grads:
            assert torch.allclose(p.grad, ref_grads[n], rtol=1e-4, atol=1e-7), n


def test_head_input_records_autocast_dtype():
    torch.manual_seed(0)
    model = Model(CFG)
    x = torch.randint(0, CFG.vocab_size, (1, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hi = head_input(model, x)
        logits = model(x)
    assert hi.dtype == torch.bfloat16 and hi.weight.dtype == torch.float32
    assert torch.equal(hi.logits(), logits)  # the head's matmul in bf16, as autocast ran it


def test_ce_and_task_loss_take_head_inputs():
    h, W = _head(4)
    ids = torch.randint(0, 50, (2, 23))
    ids[0, 5] = -100  # ignored
    a_h, a_W = h.clone().requires_grad_(), W.clone().requires_grad_()
    ref = next_token_ce(a_h @ a_W.T, ids)
    ref.backward()
    b_h, b_W = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = next_token_ce(HeadInput(b_h, b_W), ids, chunk_tokens=6)
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(b_h.grad, a_h.grad, rtol=1e-5, atol=1e-9) and torch.allclose(b_W.grad, a_W.grad, rtol=1e-5)
    ht, Wt = _head(5)
    both = task_loss(HeadInput(h, W), HeadInput(ht, Wt), ids, LossWeights(kd=1.0, ce=0.5), chunk_tokens=4)
    plain = task_loss(h @ W.T, ht @ Wt.T, ids, LossWeights(kd=1.0, ce=0.5))
    assert set(both) == {"kd", "ce", "total"}
    assert all(both[k].item() == pytest.approx(plain[k].item(), rel=1e-6) for k in both)
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(HeadInput(h, W), torch.randn(2, 23, 49))


# ----------------------------------------------------------------------------- head inputs under FSDP2

def _fsdp_worker(rank, world, port, out):
    import torch.distributed as dist

    from star_elastic import parallel

    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        whole, whole_teacher = Model(CFG), Model(CFG)
        x = torch.randint(0, CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
        ref = kd_loss(whole(x), whole_teacher(x).detach())
        ref.backward()
        student, teacher = (parallel.shard_model(Model(CFG), mixed_precision=False) for _ in range(2))
        parallel.load_full_state_dict(student, whole.state_dict())
        parallel.load_full_state_dict(teacher, whole_teacher.state_dict())
        teacher.requires_grad_(False)
        mine = x[rank * 2:(rank + 1) * 2]
        refused = False
        try:  # the root resharded after its forward: the head's weight is a shard again
            head_input(student, mine)
        except RuntimeError as e:
            refused = "set_reshard_after_forward" in str(e)
        for m in (student, teacher):
            m.set_reshard_after_forward(False, recurse=False)
        student.zero_grad()
        with torch.no_grad():
            t = head_input(teacher, mine)
        loss = kd_loss(head_input(student, mine), t, chunk_tokens=5)
        loss.backward()
        grads = {n: parallel.full_tensor(p.grad) for n, p in student.named_parameters() if p.grad is not None}
        mean = torch.tensor([loss.item()])
        dist.all_reduce(mean)
        if rank == 0:
            worst = max(float((grads[n] - p.grad).norm() / p.grad.norm()) for n, p in whole.named_parameters())
            torch.save({"refused": refused, "loss": mean.item() / world, "ref": ref.item(), "worst": worst,
                        "same_keys": set(grads) == {n for n, _ in whole.named_parameters()}}, out)


def test_head_inputs_under_fsdp2_equal_one_process(tmp_path):
    """2 gloo ranks, student and teacher sharded (FSDP2) with their roots kept unsharded until the
    backward: the chunked KD on head inputs gives the whole model's loss and every parameter's
    gradient (the head's weight's reduce-scattered like the rest). Without that setting
    `head_input` refuses with the fix in its message."""
    import torch.multiprocessing as mp

    from star_elastic import parallel

    if not parallel.available():
        pytest.skip("this torch has no FSDP2")
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["refused"] and got["same_keys"]
    assert got["loss"] == pytest.approx(got["ref"], rel=1e-5) and got["worst"] < 1e-5


def test_decode_step_bench_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_decode_step.py --smoke: without the kernel both settings run the recurrence,
    so the logits and tokens agree exactly; the JSON has what the GPU run will fill in."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_decode_step

    out = tmp_path / "d.json"
    result = bench_decode_step.main(["--smoke", "--device", "cpu", "--json", str(out)])
    assert out.exists() and [r["batch"] for r in result["update"]] == [1, 4]
    assert all(r["recurrence_us"] > 0 and "triton_us" not in r for r in result["update"])
    d = result["decode"]
    assert not d["uses_triton_step"] and d["logits_rel_err"] == 0 and d["greedy_equal"]


def test_head_gradient_accumulates_in_one_gemm_where_the_device_has_it(monkeypatch):
    """The LM head's gradient adds each chunk's product into its fp32 sum in one GEMM (`torch.addmm` with
    out_dtype, CUDA) where the device has it, instead of writing the product in bf16 and adding it apart (about
    10 ms of a 254 ms step at Nano, docs/RESULTS.md §12). No CPU kernel: a stand-in that records its calls
    and adds in fp32 checks what the fused loss hands it; the gradients equal the plain path's."""
    from star_elastic.elastic import losses

    h, W = _head(0)
    ht, Wt = _head(1)
    teacher = HeadInput(ht, Wt)

    def grads(dtype=torch.bfloat16):
        a_h, a_W = h.clone().requires_grad_(), W.clone().requires_grad_()
        kd_loss(HeadInput(a_h, a_W, dtype), teacher, chunk_tokens=10).backward()
        return a_h.grad, a_W.grad

    exact_w = grads(torch.float64)[1]
    plain_h, plain_w = grads()  # on the CPU: no such GEMM, the product then the add
    assert not losses._accumulating_gemm(torch.device("cpu"), torch.bfloat16)
    calls = []

    def addmm(acc, a, b, beta=1, out_dtype=None, out=None):
        calls.append((a.dtype, b.dtype, out_dtype, out is acc, beta))
        return out.copy_(a.float() @ b.float()) if beta == 0 else out.add_(a.float() @ b.float())

    beta0 = [True]  # whether the device's GEMM writes a product alone (beta 0)
    monkeypatch.setattr(losses, "_accumulating_gemm", lambda device, dtype, beta=1: bool(beta) or beta0[0])
    monkeypatch.setattr(losses.torch, "addmm", addmm)
    fast_h, fast_w = grads()
    assert len(calls) == 5 and {c[:4] for c in calls} == {(torch.bfloat16, torch.bfloat16, torch.float32, True)}
    assert [c[4] for c in calls] == [0, 1, 1, 1, 1]  # 46 rows / 10: the first chunk's product written, not added
    beta0[0] = False  # without that GEMM: the first product added to zeros, the same gradient
    calls.clear()
    assert torch.equal(grads()[1], fast_w) and [c[4] for c in calls] == [1] * 5
    assert torch.equal(fast_h, plain_h)  # the hidden states' gradient does not take this path
    # the same sums, the products added in fp32 rather than rounded to bf16 first: nearer the exact gradient
    assert (fast_w - exact_w).norm() < (plain_w - exact_w).norm() < 0.02 * exact_w.norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-accumulating GEMM is CUDA's")
def test_head_gradient_gemm_on_cuda_equals_the_product_then_the_add():
    """On a GPU (`run.sh` runs this file there): the one-GEMM path is found and gives the plain path's
    gradient to bf16 rounding, at the shapes of a real head's chunk."""
    from star_elastic.elastic import losses

    dev = torch.device("cuda")
    assert losses._accumulating_gemm(dev, torch.bfloat16) and losses._accumulating_gemm(dev, torch.bfloat16, 0)
    g = torch.randn(1024, 8192, device=dev, dtype=torch.bfloat16)
    x = torch.randn(1024, 512, device=dev, dtype=torch.bfloat16)
    acc, ref = (torch.randn(8192, 512, device=dev) for _ in range(2))
    ref.copy_(acc)
    losses._add_product(acc, g.t(), x)
    ref.add_(g.t() @ x)
    assert torch.allclose(acc, ref, rtol=2e-2, atol=0.5)  # the reference rounds its product to bf16
    fresh = torch.full_like(acc, float("nan"))  # a first chunk: the product written, acc's values never read
    losses._add_product(fresh, g.t(), x, first=True)
    assert torch.allclose(fresh, (g.t() @ x).float(), rtol=2e-2, atol=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's fused KD chunk on CUDA (run.sh GPUTESTS)")
def test_inductor_kd_chunks_on_cuda_give_the_eager_loss_with_and_without_gradients(monkeypatch):
    """On a GPU, at a head's width: under compiled_kd("inductor") the KD in its large chunks (with gradients,
    and without, as the router's baseline runs it) gives the eager chunks' loss and gradients, bf16 logits
    both ways."""
    from star_elastic.elastic import losses

    dev, V, D, n = torch.device("cuda"), 32768, 256, 3000
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 512 * V)  # eager: 512 tokens a chunk
    monkeypatch.setattr(losses, "FUSED_CHUNK_ELEMENTS", 1024 * V)  # compiled: 1024, two and a rest of 952
    g = torch.Generator(device=dev).manual_seed(0)
    h, ht = (torch.randn(n, D, device=dev, generator=g) for _ in range(2))
    W, Wt = (torch.randn(V, D, device=dev, generator=g) * 0.05 for _ in range(2))
    teacher = HeadInput(ht, Wt.bfloat16(), torch.bfloat16)
    out = []
    for backend in (None, "inductor"):
        a_h, a_W = h.clone().requires_grad_(), W.clone().requires_grad_()
        with losses.compiled_kd(backend):
            with torch.no_grad():
                value = kd_loss(HeadInput(h, W, torch.bfloat16), teacher)
            loss = kd_loss(HeadInput(a_h, a_W, torch.bfloat16), teacher)
            loss.backward()
        out.append((value, loss.detach(), a_h.grad, a_W.grad))
    (v0, l0, gh0, gw0), (v1, l1, gh1, gw1) = out
    assert v1.item() == pytest.approx(v0.item(), rel=1e-3) and l1.item() == pytest.approx(l0.item(), rel=1e-3)
    assert v1.item() == pytest.approx(l1.item(), rel=1e-3)
    for a, b in ((gh1, gh0), (gw1, gw0)):
        assert (a - b).norm() < 1e-2 * b.norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grouped GEMM's backward is CUDA's")
def test_grouped_experts_on_cuda_give_the_per_expert_paths_gradients():
    """On a GPU: the experts as one grouped GEMM in bf16 (the routing weights scaling the activations before
    the down projection, the copies summed back by a gather) give the per-expert path's output and
    gradients, that path run in fp32, to bf16 rounding."""
    from star_elastic.model import Experts, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=256, n_routed_experts=16, moe_intermediate_size=128, num_experts_per_tok=4)
    ex = Experts(cfg).cuda()
    T = 512
    x = torch.randn(T, 256, device="cuda", requires_grad=True)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(T)]).cuda()
    w = torch.rand(T, 4, device="cuda", requires_grad=True)
    g = torch.randn(T, 256, device="cuda")
    grads = []
    for dt in (torch.bfloat16, torch.float32):  # bf16: the grouped GEMM; fp32: a matmul pair per expert
        with torch.autocast("cuda", torch.bfloat16, enabled=dt == torch.bfloat16):
            out = ex(x, idx, w)
        assert (out.dtype == torch.bfloat16) == (dt == torch.bfloat16)
        grads.append((out.float(), *torch.autograd.grad((out.float() * g).sum(), (x, w, ex.up_proj, ex.down_proj))))
    for got, want in zip(*grads):
        assert (got - want).norm() < 0.02 * want.norm()


@pytest.mark.skipif(not torch.cuda.is_available() or kernels._load_conv()[0] is None,
                    reason="causal_conv1d's CUDA kernel (run.sh: HFK_PATH=.devcarry/causal_conv1d_built GPUTESTS -k causal_conv)")
def test_causal_conv_kernel_on_cuda_gives_the_pytorch_convs_output_and_gradients():
    """On a GPU with causal_conv1d built: `kernels.causal_conv` on the conv input as the model passes it (a
    channels-last view of in_proj's output, bf16) gives `causal_conv_silu`'s output and gradients, the PyTorch conv
    run in fp32 on the same values, to within the error of the PyTorch conv run in bf16: the check that would make
    the kernel the default for a prefill."""
    from star_elastic.model import causal_conv_silu

    torch.manual_seed(0)
    b, t, channels, k = 2, 777, 1280, 4
    proj = torch.randn(b, t, channels + 64, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(channels, 1, k, device="cuda") / k).requires_grad_()
    bias = (torch.randn(channels, device="cuda") / 10).requires_grad_()
    g = torch.randn(b, channels, t, device="cuda")

    def run(fn, dtype):
        x = proj[..., 32:32 + channels].detach().to(dtype).requires_grad_()
        out = fn(x.transpose(1, 2), weight.to(dtype), bias.to(dtype))  # (b, channels, t), channels stride 1
        return (out.float(), *torch.autograd.grad((out.float() * g).sum(), (x, weight, bias)))

    want = run(causal_conv_silu, torch.float32)
    kernel = run(lambda x, w, bias_: kernels.causal_conv(x, w[:, 0], bias_), torch.bfloat16)
    plain = run(causal_conv_silu, torch.bfloat16)
    for name, got, ref, bf16 in zip(("output", "d input", "d weight", "d bias"), kernel, want, plain):
        err, floor = ((got.float() - ref).norm() / ref.norm()).item(), ((bf16.float() - ref).norm() / ref.norm()).item()
        assert err <= 2 * floor + 1e-3, f"{name}: the kernel off by {err:.2e}, PyTorch's bf16 conv by {floor:.2e}"


INTERPRETED_KERNEL = """
import torch, torch.nn.functional as F
from star_elastic.decode_kernel import state_update
from star_elastic.model import recurrence_step
for b, h, g, p, n in [(3, 8, 2, 64, 128), (2, 6, 6, 3, 5), (2, 4, 1, 16, 16)]:
    gen = torch.Generator().manual_seed(b * h + n)
    x = torch.randn(b, h, 2 * p, generator=gen).to(torch.bfloat16)[..., ::2]
    dt, A = F.softplus(torch.randn(b, h, generator=gen)), -torch.rand(h, generator=gen) - 0.1
    B, C = (torch.randn(b, g, n, generator=gen).to(torch.bfloat16) for _ in range(2))
    state = torch.randn(b, h, p, n, generator=gen)
    ref_state = state.clone()
    ref = recurrence_step(x, dt, A, B, C, ref_state)
    y = state_update(x, dt, A, B, C, state)
    print(b, h, g, p, n, float((y - ref).norm() / ref.norm()), float((state - ref_state).norm() / ref_state.norm()))
"""

# a hybrid's decode step through our kernel (forced on: the CPU is not CUDA), eager and under torch.compile
# (fullgraph: the operator is traced, no break; it writes the cache's state in place), against the recurrence
INTERPRETED_DECODE = """
import torch
from star_elastic import kernels
from star_elastic.model import Model, ModelConfig
from star_elastic.serve.order import use_serving_order
cfg = ModelConfig(vocab_size=97, hidden_size=64, layer_types="M*M", num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=32, n_groups=2, chunk_size=8)
torch.manual_seed(0)
ids = torch.randint(0, 97, (3, 8))
for order in (False, True):
    model = Model(cfg).eval()
    if order:
        use_serving_order(model)
    runs = []
    for own, compiled in ((False, False), (True, False), (True, True)):
        kernels.uses_own_step = (lambda x: True) if own else (lambda x: False)
        torch._dynamo.reset()
        step = torch.compile(model, fullgraph=True) if compiled else model
        cache = model.make_cache(3, 16)
        with torch.no_grad():
            model(ids[:, :5], cache, torch.arange(5))
            out = [step(ids[:, i:i + 1], cache, torch.tensor([i]))[:, -1] for i in range(5, 8)]
        runs.append((torch.cat(out), torch.cat([c.ssm.flatten() for c in cache if hasattr(c, "ssm")])))
    (ref, ref_state), *got = runs
    for logits, state in got:
        print(order, float((logits - ref).norm() / ref.norm()), float((state - ref_state).norm() / ref_state.norm()))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed (a CPU install has none)")
def test_our_decode_kernel_in_tritons_interpreter_is_the_recurrence():
    """Our Triton decode update run by Triton's interpreter on the CPU (TRITON_INTERPRET=1, its own process: the flag is
    read when the kernel is defined) gives recurrence_step's y and state: per group and per head, a strided bf16 x,
    sizes that are not powers of two (masked blocks). Runs wherever Triton imports (GPU machines; CPU with it added)."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", INTERPRETED_KERNEL], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert len(rows) == 3 and all(float(r[5]) < 1e-5 and float(r[6]) < 1e-6 for r in rows), run.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed (a CPU install has none)")
def test_a_decode_step_through_our_kernel_compiles_whole_and_gives_the_recurrences_logits_and_state():
    """A hybrid's decode step with our kernel (Triton's interpreter on the CPU), eager and under torch.compile with
    fullgraph (the operator traced, not a graph break), in group-major and serving head order: the logits of three
    steps and the caches' states as the recurrence leaves them."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", INTERPRETED_DECODE], capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert len(rows) == 4 and all(float(r[1]) < 1e-5 and float(r[2]) < 1e-5 for r in rows), run.stdout


OWN_STEP_ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available() or kernels._load_own_update()[0] is None,
                                      reason="our Triton decode update on CUDA (run.sh GPUTESTS)")


@OWN_STEP_ON_CUDA
@pytest.mark.parametrize("b,h,g,p,n", [(3, 8, 2, 64, 128), (2, 6, 6, 3, 5), (32, 64, 8, 64, 128)])
def test_our_decode_kernel_on_cuda_is_the_recurrence_eager_compiled_and_in_a_cuda_graph(b, h, g, p, n):
    """On a GPU: decode_kernel.state_update against recurrence_step in fp32 (y and the state in place), with B and C
    per group or per head, x a strided view in bf16, odd sizes (masked blocks); then the same inside
    torch.compile(fullgraph=True) (no graph break: inductor traces the kernel) replayed from a CUDA graph."""
    from star_elastic.decode_kernel import state_update
    from star_elastic.model import recurrence_step

    gen = torch.Generator(device="cuda").manual_seed(b * h + n)
    x = torch.randn(b, h, 2 * p, device="cuda", generator=gen).to(torch.bfloat16)[..., ::2]  # strided last dim
    dt = F.softplus(torch.randn(b, h, device="cuda", generator=gen))
    A = -torch.rand(h, device="cuda", generator=gen) - 0.1
    B, C = (torch.randn(b, g, n, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    state = torch.randn(b, h, p, n, device="cuda", generator=gen)
    ref_state = state.clone()
    ref = recurrence_step(x, dt, A, B, C, ref_state)
    got_state = state.clone()
    got = state_update(x, dt, A, B, C, got_state)
    assert (got - ref).norm() / ref.norm() < 1e-5 and (got_state - ref_state).norm() / ref_state.norm() < 1e-6

    def two_steps(s):  # two tokens, so the second reads what the first wrote
        return state_update(x, dt, A, B, C, s) + state_update(x, dt, A, B, C, s)

    step = torch.compile(two_steps, fullgraph=True)
    ref_state = state.clone()
    ref = recurrence_step(x, dt, A, B, C, ref_state) + recurrence_step(x, dt, A, B, C, ref_state)
    s = state.clone()
    step(s.clone())  # compiled and warmed outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(s)
    s.copy_(state)
    graph.replay()
    assert (out - ref).norm() / ref.norm() < 1e-5 and (s - ref_state).norm() / ref_state.norm() < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (run.sh GPUTESTS)")
@pytest.mark.parametrize("kernel", ["own", "mamba_ssm"])
@pytest.mark.parametrize("serving_order", [False, True])
def test_decode_on_cuda_through_either_kernel_gives_the_recurrences_logits(monkeypatch, serving_order, kernel):
    """On a GPU: a bf16 hybrid decoding through our kernel or mamba_ssm's state update (B and C per group, or per head
    in fp32 in serving order), eager and the step compiled, against the decode on the PyTorch recurrence, logits at
    every step."""
    from star_elastic.serve.order import use_serving_order

    if (kernels._load_own_update if kernel == "own" else kernels._load_update)()[0] is None:
        pytest.skip(f"{kernel}'s decode update does not import here (carry .devcarry/mamba for mamba_ssm's)")
    torch.manual_seed(0)
    model = Model(CFG).cuda().to(torch.bfloat16).eval()
    if serving_order:
        use_serving_order(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), device="cuda")
    runs = []
    for chosen, compiled in ((kernel, False), (kernel, True), ("torch", False)):
        monkeypatch.setenv(kernels.ENV_STEP_KERNEL, chosen)
        torch._dynamo.reset()  # the kernel's choice is read once a compile
        assert kernels.active_step_kernel() == chosen
        step = torch.compile(model) if compiled else model
        with torch.no_grad():
            cache = model.make_cache(2, 16)
            out = [model(ids[:, :6], cache, torch.arange(6, device="cuda"))]
            for i in range(6, 9):
                out.append(step(ids[:, i:i + 1], cache, torch.tensor([i], device="cuda")))
        runs.append(torch.cat([o[:, -1].float() for o in out]))
    *got, want = runs
    for g in got:
        assert (g - want).norm() / want.norm() < 2e-2
