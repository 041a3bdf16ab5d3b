"""Activation memory: the bytes each kind of layer keeps for its backward, per token, eager and compiled.

Issue 16 asks for plain training "at no more memory" than transformers on its kernels, and our step used more
(34.6 GiB compiled against 28.8 at the 539M config, batch 4 x 2048). Peak memory on a GPU says how much, not
where: this counts every tensor autograd keeps for the backward pass (`saved_tensors_hooks`, each storage once,
parameters left out) for each kind of layer of the 539M config (`bench_speed.py`'s) or of Nemotron 3 Nano's
widths, in bf16: a model of two such layers less a model of one, so that the count holds under torch.compile.

On a GPU the real kernels run when they import. On the CPU, `--kernels stand-in` puts stand-ins in their place
that keep for backward what the kernels keep (read from their `save_for_backward` calls:
`mamba_chunk_scan_combined` keeps its output, x, dt, dA_cumsum (b, heads, t) in fp32, A, B and C;
`causal_conv1d_fn` keeps its input, weight and bias), and runs the experts on the grouped GEMM (its forward
runs on the CPU), so that the CPU counts what a GPU step keeps.
Beside ours it prints what `mamba_ssm`'s fused Mamba layer (`mamba_split_conv1d_scan_combined`, the one
transformers runs with its kernels) keeps, from the same list: in_proj's output zxbcdt, out_x (b, t, heads x
head_dim) in the input's dtype and the norm's rstd, plus the in_proj input that the layer's linear keeps.

`--conv-scan` counts with Mamba's conv, scan and skip as one function (kernels.conv_scan, the library's default on
a GPU since the thirty-sixth session; without the flag they run apart, as before; its stand-in is the scan's forward
and backward in PyTorch, `ScanOpsStandIn`, which the tests also use).

    python benchmarks/bench_saved.py --kernels stand-in --compile --json docs/results/saved_cpu.json
    python benchmarks/bench_saved.py --model nano --kernels stand-in --compile
"""

from __future__ import annotations

import argparse
import datetime
import sys
from contextlib import ExitStack
from unittest import mock

import torch

import common
from star_elastic import kernels
from star_elastic import model as model_module
from star_elastic.elastic.delta import FullDelta
from star_elastic.elastic.masking import masked
from star_elastic.elastic.spec import ElasticSpec
from star_elastic.hf import config_from_hf
from star_elastic.model import Model, TopkRouter

KINDS = {"M": "Mamba", "E": "MoE", "*": "attention", "-": "MLP"}


class ScanStandIn(torch.autograd.Function):
    """mamba_chunk_scan_combined's forward on CPU (the einsum scan's arithmetic) keeping what it keeps."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, initial_states):
        from star_elastic.model import ssd_scan

        with torch.no_grad():
            y, final = ssd_scan(x, dt, A, B, C, chunk_size, initial_states)
        y = y.to(x.dtype)  # the kernel writes y in x's dtype
        b, t, h, _ = x.shape
        dA_cumsum = torch.zeros(b, h, t, dtype=torch.float32, device=x.device)
        ctx.save_for_backward(y, x, dt, dA_cumsum, A, B, C)
        return y, final

    @staticmethod
    def backward(ctx, gy, gfinal):  # not run: the bench counts what the forward keeps
        return (None,) * 7


def stand_in_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                  dt_softplus=False, return_final_states=True, **_):
    return ScanStandIn.apply(x, dt, A, B, C, chunk_size, initial_states)


class ConvStandIn(torch.autograd.Function):
    """causal_conv1d_fn(x, weight, bias, activation="silu") on CPU keeping its input, weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        k = weight.shape[-1]
        with torch.no_grad():
            y = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (k - 1, 0)), weight[:, None], bias,
                                           groups=x.shape[1])
        ctx.save_for_backward(x, weight, bias)
        return torch.nn.functional.silu(y)

    @staticmethod
    def backward(ctx, gy):
        return None, None, None


def stand_in_conv(x, weight, bias=None, activation=None):
    return ConvStandIn.apply(x, weight, bias)


class ScanOpsStandIn:
    """`_mamba_chunk_scan_combined_fwd` and `_bwd` (what `kernels.conv_scan` calls) in PyTorch: their
    signatures, the asserts on shapes and strides that `kernels.ConvScan` must pass, the einsum scan's
    arithmetic (the backward by autograd through it), and a record of the calls. Keeps nothing itself: the
    autograd function around it keeps what it keeps."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _check(x, dt, A, B, C, D):
        b, t, h, _ = x.shape
        assert dt.shape == (b, t, h) and A.shape == (h,) and B.shape[:2] == (b, t) and C.shape == B.shape
        assert D is None or D.shape == (h,)
        assert x.stride(-1) == 1 or x.stride(1) == 1  # the kernel's: either M or K contiguous

    def fwd(self, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
            cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
        from star_elastic.model import ssd_scan, with_skip

        self._check(x, dt, A, B, C, D)
        self.calls.append(("fwd", dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial=initial_states)))
        with torch.no_grad():
            y, final = ssd_scan(x, dt, A, B, C, chunk_size, initial_states)
            out = (y if D is None else with_skip(y, x, D)).to(x.dtype)
        return out, None, dt, None, None, final

    def bwd(self, dout, x, dt, A, B, C, out, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
            dfinal_states=None, seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf")), dx=None, ddt=None,
            dB=None, dC=None, dz=None, recompute_output=False):
        from star_elastic.model import ssd_scan, with_skip

        self._check(x, dt, A, B, C, D)
        assert out.shape == x.shape and dout.shape == x.shape and dout.stride(-1) == 1
        self.calls.append(("bwd", dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial=initial_states)))
        leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C, *(() if D is None else (D,)))]
        with torch.enable_grad():
            y = ssd_scan(*leaves[:5], chunk_size, initial_states)[0]
            y = y if D is None else with_skip(y, leaves[0], leaves[5])
            grads = torch.autograd.grad(y.to(x.dtype), leaves, dout)
        dD = grads[5] if D is not None else None
        return (*grads[:5], dD, None, None, None)


def kernels_in(stack: ExitStack, how: str, device: torch.device, conv: bool, conv_scan: bool = False):
    """Put the kernels named by `how` in place for the runs in `stack`: 'none' (the PyTorch paths), 'real'
    (the imported kernels, on a GPU), 'stand-in' (the stand-ins above, on any device). `conv`: the conv on
    causal_conv1d's kernel; `conv_scan`: conv, scan and skip as one function (kernels.conv_scan)."""
    env = {kernels.ENV_ENABLE: "1" if how != "none" else "0", kernels.ENV_CONV: "1" if conv and how != "none" else "0",
           kernels.ENV_CONV_SCAN: "1" if conv_scan and how != "none" else "0"}
    if how == "none":
        env[kernels.ENV_DISABLE] = "1"
    stack.enter_context(common.environment(env))
    if how == "stand-in":
        ops = ScanOpsStandIn()
        stack.enter_context(mock.patch.multiple(
            kernels, _load=lambda: (stand_in_scan, None), _load_conv=lambda: (stand_in_conv, None),
            _load_conv_scan=lambda: ((ops.fwd, ops.bwd), None),
            uses_triton=lambda x: x.dtype in kernels._DTYPES,
            uses_causal_conv=lambda x: conv and x.dtype in kernels._DTYPES,
            uses_conv_scan=lambda x: conv_scan and x.dtype in kernels._DTYPES))
        # and the experts on the grouped GEMM, as on a GPU (its forward runs on the CPU; only the backward does not)
        stack.enter_context(mock.patch.object(model_module, "uses_grouped_mm", lambda x, dt: dt == torch.bfloat16))
    elif how == "real" and kernels.unavailable_reason():
        raise SystemExit(f"--kernels real: {kernels.unavailable_reason()}")


def budget_masks(cfg) -> dict[str, torch.Tensor]:
    """Soft masks of a smaller budget, as the router's draws give them in training (values in (0, 1], with a
    gradient): half of every layer's Mamba heads, attention heads and expert neurons, three quarters of the
    experts and of the embedding channels."""
    half, kinds = (lambda n: max(1, n // 2)), set(cfg.layer_types)  # noqa: E731
    sizes = {"hidden_size": cfg.hidden_size * 3 // 4}
    if "M" in kinds:
        sizes["mamba_num_heads"] = max(cfg.n_groups, cfg.mamba_num_heads // 2 // cfg.n_groups * cfg.n_groups)
    if "*" in kinds:
        sizes["num_key_value_heads"] = half(cfg.num_key_value_heads)
    if "E" in kinds:
        sizes.update(n_routed_experts=max(cfg.num_experts_per_tok, cfg.n_routed_experts * 3 // 4),
                     moe_intermediate_size=half(cfg.moe_intermediate_size),
                     moe_shared_expert_intermediate_size=half(cfg.moe_shared_expert_intermediate_size))
    spec = ElasticSpec(**sizes)
    return {k: (0.5 + 0.5 * m.float()).requires_grad_() for k, m in spec.masks(cfg).items()}


def kept(model: Model, x: torch.Tensor, compiled: bool, masks: bool = False, keep_full: bool = False
         ) -> list[tuple[int, str, tuple]]:
    """(bytes, dtype, shape) of every tensor one forward keeps for backward, each storage once, the model's
    parameters apart; `masks`: under a smaller budget's soft masks (`budget_masks`), as training's masked steps
    run; `keep_full`: as the full anchor's pass runs under elastify --keep-full, with the full budget's delta
    (rank 64) and its own norm weights (`FullDelta`). The masks' and the delta's own tensors are apart too."""
    with ExitStack() as stack:
        apart = []
        if masks:
            soft = budget_masks(model.config)
            apart += soft.values()
            stack.enter_context(masked(model, soft))
        if keep_full:
            delta = FullDelta(model, 64).keep(model, {n: p.detach() for n, p in model.named_parameters()
                                                       if n.endswith("norm.weight")})
            for t in delta.rest.values():
                t.requires_grad_()
            apart += [*delta.parameters(), *delta.rest.values()]
            stack.enter_context(delta.applied(model))
        return _kept(model, x, compiled, apart)


def _kept(model: Model, x: torch.Tensor, compiled: bool, apart=()) -> list[tuple[int, str, tuple]]:
    run = torch.compile(model) if compiled else model
    if compiled:
        run(x)  # compile outside the count
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *apart]}
    seen = {}

    def keep(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key[0] not in params and key not in seen:
            seen[key] = (t.untyped_storage().nbytes(), str(t.dtype).replace("torch.", ""), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        run(x)
    if compiled:
        torch._dynamo.reset()
    return sorted(seen.values(), key=lambda r: -r[0])


def per_layer(build, kind: str, x, compiled: bool, masks: bool = False, keep_full: bool = False
              ) -> tuple[float, float, list]:
    """Bytes one `kind` layer keeps, and the rest (embedding, final norm, LM head): a model of two such layers
    less a model of one, which holds under torch.compile too (a compiled graph saves its tensors when it
    returns, so hooks at layer boundaries cannot say which layer saved them). Also the two-layer model's
    largest kept tensors."""
    one, two = (kept(build(kind * n), x, compiled, masks, keep_full) for n in (1, 2))
    layer = sum(r[0] for r in two) - sum(r[0] for r in one)
    return layer, sum(r[0] for r in one) - layer, two


def fused_mamba_bytes(cfg) -> float:
    """Bytes a token that mamba_ssm's fused Mamba layer keeps (its save_for_backward, bf16): zxbcdt, out_x and
    rstd (one fp32 a group), and in_proj's input, kept by the linear before it."""
    d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    zxbcdt = 2 * d_inner + 2 * cfg.n_groups * cfg.ssm_state_size + cfg.mamba_num_heads
    return 2 * (zxbcdt + d_inner + cfg.hidden_size) + 4 * cfg.n_groups


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("539m", "nano", "tiny"), default="539m",
                    help="539m: bench_speed.py's config (hidden 1024, 32 Mamba heads); nano: Nemotron 3 Nano's "
                         "widths; tiny: bench_speed.py's --tiny config, for a smoke run")
    ap.add_argument("--layers", default="M*E", help="the kinds of layer to count (M Mamba, E MoE, * attention)")
    ap.add_argument("--tokens", type=int, default=512, help="sequence length of the one-row batch")
    ap.add_argument("--kernels", choices=("none", "real", "stand-in"), default="stand-in",
                    help="the Mamba scan and conv: PyTorch's, the kernels (GPU), or stand-ins keeping what they keep")
    ap.add_argument("--conv-kernel", action="store_true",
                    help="the conv on causal_conv1d's kernel (or its stand-in), opt-in as in the library")
    ap.add_argument("--conv-scan", action="store_true",
                    help="conv, scan and skip as one function (kernels.conv_scan, the library's default on a GPU); "
                         "without it they run apart")
    ap.add_argument("--masked", action="store_true",
                    help="count under a smaller budget's soft masks, as training's masked steps run (budget_masks)")
    ap.add_argument("--keep-full", action="store_true",
                    help="count the full anchor's pass as elastify --keep-full runs it: the full budget's delta "
                         "(rank 64) and its own norm weights")
    ap.add_argument("--compile", action="store_true", help="also count with the model under torch.compile")
    ap.add_argument("--device")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    device = common.setup(args.device)
    if args.model in ("539m", "tiny"):
        import bench_speed

        def build(layers):
            hc = bench_speed.hf_config(args.model == "tiny")
            hc.layers_block_type = [bench_speed._hf(c) for c in layers]
            hc.num_hidden_layers = len(layers)
            return config_from_hf(hc.to_dict())

        pattern = bench_speed.PATTERN
    else:
        build, pattern = common.nano_config, common.NANO_LAYERS

    def model_of(layers):
        """The model built in bf16 on `device` (built in fp32 and cast, two Nano MoE layers need 13 GB at once;
        with the compile that ran the CPU machine out of memory), the router's weight back in fp32 as a cast
        leaves it (model.TopkRouter)."""
        torch.manual_seed(0)
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = Model(build(layers))
        finally:
            torch.set_default_dtype(dtype)
        for m in model.modules():
            if isinstance(m, TopkRouter):
                m.float()
        return model

    cfg = build(args.layers[0])
    x = torch.randint(0, cfg.vocab_size, (1, args.tokens), device=device)
    res = {"benchmark": "bench_saved", "command": "python benchmarks/bench_saved.py " + " ".join(
               sys.argv[1:] if argv is None else argv),
           "date": datetime.date.today().isoformat(), "machine": common.machine(device), "model": args.model,
           "layers": args.layers, "tokens": args.tokens, "kernels": args.kernels, "conv_kernel": args.conv_kernel,
           "conv_scan": args.conv_scan, "masked": args.masked,
           "keep_full": args.keep_full,
           "torch": torch.__version__, "fused_mamba_kb_per_token": fused_mamba_bytes(cfg) / 1024, "modes": {}}
    print(f"{args.model} (layers {args.layers}), {args.tokens} tokens, bf16 on {res['machine']}, kernels: "
          f"{args.kernels}{' (conv too)' if args.conv_kernel else ''}{', conv + scan as one' if args.conv_scan else ''}"
          f"{', under a smaller budget' + chr(39) + 's soft masks' if args.masked else ''}"
          f"{', the full budget with its delta and own norms' if args.keep_full else ''}")
    kb = lambda n: n / args.tokens / 1024  # noqa: E731
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        rows, rest = {}, []
        for c in args.layers:
            with ExitStack() as stack:
                kernels_in(stack, args.kernels, device, conv=args.conv_kernel, conv_scan=args.conv_scan)
                layer, other, largest = per_layer(model_of, c, x, mode == "compiled", args.masked, args.keep_full)
            rest.append(kb(other))
            rows[KINDS[c]] = {"kb_per_token": kb(layer), "largest_in_two_layers": [
                {"kb_per_token": kb(n), "dtype": d, "shape": list(sh)} for n, d, sh in largest[:12]]}
        # the whole model: as many layers of each kind as the full pattern has, and the rest once
        whole = sum(rows[KINDS[c]]["kb_per_token"] for c in pattern if KINDS[c] in rows) + sum(rest) / len(rest)
        res["modes"][mode] = {"layers": rows, "rest_kb_per_token": sum(rest) / len(rest),
                              "whole_model_kb_per_token": whole, "whole_model_counts_every_kind":
                              set(pattern) <= set(args.layers)}
        print(f"{mode}: " + ", ".join(f"{k} {r['kb_per_token']:.1f}" for k, r in rows.items()) +
              f", embedding + head {sum(rest) / len(rest):.1f} KB a token; {len(pattern)} layers ({pattern}): "
              f"{whole:.0f} KB a token, {whole * 1024 * 8192 / 2**30:.2f} GiB at 4 x 2048"
              + ("" if set(pattern) <= set(args.layers) else " (the kinds not in --layers left out)"))
        for k, r in rows.items():
            for t in r["largest_in_two_layers"][:6]:
                print(f"    {k:10s} {t['kb_per_token']:6.2f} KB  {t['dtype']:9s} {tuple(t['shape'])}")
    print(f"mamba_ssm's fused Mamba layer keeps {res['fused_mamba_kb_per_token']:.1f} KB a token "
          "(zxbcdt, out_x, rstd, in_proj's input)")
    if args.json:
        common.write_json(args.json, res)


if __name__ == "__main__":
    main()
