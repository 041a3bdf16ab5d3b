"""FP8 weights whose scales nest: one FP8 elastic checkpoint, and every budget cut out of it with
its own scales, exactly. The format and the numbers; below hf.py (which reads and writes FP8
through it), elastic/stream.py (which slices FP8 from disk) and convert.py (whole checkpoints).

The format on disk is transformers' fine-grained FP8 (`quant_method: "fp8"`), which stock
transformers reads without extra packages (on a CPU it dequantises on load):

- the weight of every linear layer inside the decoder layers (attention q/k/v/o, MLP gate/up/down,
  Mamba in_proj / out_proj, MoE experts, shared experts, latent projections) is `float8_e4m3fn`,
  beside `<name>_scale_inv`: float32, one scale per output row, shape (..., out, 1), with
  weight = q * scale and scale = max |row| / 448 (448: e4m3's largest finite value);
- everything else stays in full precision: embeddings, lm_head, norms, the MoE router's gate and
  correction bias, Mamba's A_log / D / dt_bias / conv, biases (bfloat16; float32 where the model
  keeps it, the router);
- config.json: `quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic",
  "weight_block_size": [1, K], "modules_to_not_convert": ["lm_head"]}`, K the widest input of a
  quantised layer, so that transformers' scale grid (ceil(out / 1), ceil(in / K)) is one scale per
  row for every layer.

Why one scale per output row: slicing a budget (`slicing.take`) cuts rows (output units) and
columns (input units) of linear weights, whole experts and heads. A row's scale belongs to that row
alone: cutting rows keeps the kept rows' scales, cutting columns leaves every kept row's scale as it
was. So slicing the quantised tensor and its scales (`stream.take_quantized`) dequantises to exactly the
slice of the dequantised parent: an FP8 budget *is* the FP8 parent's prefix, with its own scales,
and `slice FP8CKPT --budget B` equals `slice CKPT --budget B --dtype fp8`. Where only rows are cut
it is also exactly what quantising the sliced tensor gives; where columns are cut, a kept row keeps
its parent scale (its max may sit in a dropped column), so it is not. 128 x 128 blocks would not
nest: a kept head of 64 rows shares a block with a dropped one, and kept units of different blocks
do not line up into whole blocks.

Our loader (`hf.load`, hence eval / generate / serve / validate) dequantises on load
(`dequantize_tensors`; any `weight_block_size`, per tensor or per block, is read). FP8 matmuls are
applied from outside, after loading, the way gpt-fast swaps in quantised modules: `use_fp8_matmuls`
replaces each decoder linear layer by an `FP8Linear` holding its per-row FP8 weight and scales and
multiplying with `torch._scaled_mm` (activations quantised per token on the fly; H100/H200 run it on
their FP8 tensor cores, and the CPU has the same op). Loaded in float32, an FP8 checkpoint's weights
requantise to exactly the stored FP8 values and scales (the row maximum is 448 x scale). `eval`,
`generate` and `serve` take `--fp8-matmul`; in serving (`use_fp8_matmuls(parent, views=...)`) every budget view
multiplies by a prefix of the parent's one FP8 copy, which the per-row scales make exact. Stacked MoE
experts keep the dequantised grouped GEMM.

`star-elastic convert SRC --dtype fp8 --out DST` (convert.py) writes the FP8 copy of a checkpoint
directory, plain or elastic (router, importance scores and tokenizer copied, the manifest's
checksums rewritten).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from .errors import StarElasticError

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
QUANT_METHOD = "fp8"
SCALE_SUFFIX = "_scale_inv"  # transformers' name: `x.weight` -> `x.weight_scale_inv` (it multiplies)
FP8_CODE = "F8_E4M3"  # safetensors' name of float8_e4m3fn
# linear weights inside decoder layers, in either layout (model. / backbone., stacked or per-expert)
_LINEAR = re.compile(r"^(model|backbone)\.layers\.\d+\.(.+\.)?"
                     r"(q|k|v|o|gate|up|down|in|out|fc1_latent|fc2_latent)_proj(\.weight)?$")
DESCRIPTION = ("float8_e4m3fn linear weights with one float32 scale per output row (transformers' fine-grained "
               "FP8, weight_block_size [1, K]); embeddings, lm_head, norms, router, Mamba A_log / D / dt_bias / "
               "conv and biases in bfloat16 (the router in float32)")


# ----------------------------------------------------------------------------- dtypes and names

def fp8_dtype() -> torch.dtype:
    """torch.float8_e4m3fn, or a one-line error on a torch without float8 dtypes."""
    dt = getattr(torch, "float8_e4m3fn", None)
    if dt is None:
        raise StarElasticError(f"FP8 needs a torch with float8 dtypes (torch.float8_e4m3fn, torch >= 2.1); "
                               f"this torch {torch.__version__} has none")
    return dt


def is_fp8_dtype(dtype) -> bool:
    """Whether `dtype` asks for FP8 output (torch.float8_e4m3fn, or the string "fp8")."""
    if isinstance(dtype, str):
        return dtype.lower() in ("fp8", "float8", "float8_e4m3fn")
    return isinstance(dtype, torch.dtype) and dtype == getattr(torch, "float8_e4m3fn", None)


def is_quantized(name: str) -> bool:
    """Whether tensor `name` (our or transformers' names, stacked or per-expert) is stored in FP8."""
    return bool(_LINEAR.match(name))


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


# ----------------------------------------------------------------------------- the numbers

def quantize(w: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a weight (..., out, in): scale = max |row| / 448 per output row, float32, shape
    (..., out, 1) (1 for an all-zero row); q = w / scale rounded to float8_e4m3fn (nearest even)."""
    dt = fp8_dtype()
    w = w.detach().float()
    amax = w.abs().amax(-1, keepdim=True)
    if not torch.isfinite(amax).all():
        raise StarElasticError(f"{name}: non-finite weights cannot be quantised to FP8")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(dt), scale


def _block(q_shape, s_shape, block, name: str) -> tuple[int, int] | None:
    """(rows, columns) of weight that one scale covers; None: one scale for the whole tensor."""
    rows, cols = q_shape[-2:] if len(q_shape) >= 2 else (1, q_shape[-1] if q_shape else 1)
    if math.prod(s_shape) == 1 and (block is None or len(s_shape) < 2):
        return None
    if block is not None:
        b0, b1 = int(block[0]), int(block[1])
        if tuple(s_shape) == tuple(q_shape[:-2]) + (-(-rows // b0), -(-cols // b1)):
            return b0, b1
    # as transformers does when the grid does not match its config: the block from the grid
    if len(s_shape) == len(q_shape) and tuple(s_shape[:-2]) == tuple(q_shape[:-2]) and s_shape[-2] and s_shape[-1] \
            and rows % s_shape[-2] == 0 and cols % s_shape[-1] == 0:
        return rows // s_shape[-2], cols // s_shape[-1]
    raise StarElasticError(f"{name}: FP8 scales of shape {tuple(s_shape)} do not fit a weight of shape "
                           f"{tuple(q_shape)} (weight_block_size {block})")


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, block=None,
               name: str = "tensor") -> torch.Tensor:
    """q * scale in `dtype` (computed in float32, as transformers does): per row (our scales), per
    block of `block` = (rows, columns), or one scale for the tensor."""
    w, s = q.float(), scale.float()
    b = _block(q.shape, s.shape, block, name)
    if b is None:
        return (w * s.reshape(())).to(dtype)
    rows, cols = q.shape[-2:]
    if b[1] < cols:  # expand across columns only where a row has several scales
        s = s.repeat_interleave(b[1], dim=-1)[..., :cols]
    if b[0] > 1:
        s = s.repeat_interleave(b[0], dim=-2)[..., :rows, :]
    return (w * s).to(dtype)


# ----------------------------------------------------------------------------- config.json

def quantization_config(max_in: int) -> dict:
    """config.json's `quantization_config` for per-row scales over layers at most `max_in` wide."""
    return {"quant_method": QUANT_METHOD, "activation_scheme": "dynamic", "weight_block_size": [1, int(max_in)],
            "modules_to_not_convert": ["lm_head"]}


def is_fp8_config(raw: dict | None) -> bool:
    q = (raw or {}).get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def check_quantization(raw: dict, source) -> None:
    """A config.json we can read: not quantised, or FP8 (fine-grained, float scales, FP8 experts).
    Anything else is one line naming the method."""
    q = raw.get("quantization_config")
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != QUANT_METHOD:
        raise StarElasticError(f"{source}: quantization method {method!r} is not supported (star-elastic reads "
                               "transformers' fine-grained FP8, quant_method 'fp8', and unquantised checkpoints)")
    block = q.get("weight_block_size")
    if block is not None and (not isinstance(block, (list, tuple)) or len(block) != 2
                              or not all(isinstance(b, int) and b > 0 for b in block)):
        raise StarElasticError(f"{source}: quantization_config.weight_block_size must be two positive integers, "
                               f"got {block!r}")
    for key, ok in (("scale_fmt", "float"), ("expert_dtype", "fp8")):
        if q.get(key, ok) != ok:
            raise StarElasticError(f"{source}: FP8 with {key}={q[key]!r} is not supported (only {ok!r})")
    if q.get("modules_to_convert"):
        raise StarElasticError(f"{source}: FP8 embeddings (quantization_config.modules_to_convert) are not supported")


def saved_config(raw: dict, dtype) -> dict:
    """The config a model loaded from `raw` with `dtype` saves under (`model.hf_config`): FP8 when
    asked (`dtype` float8) or when loaded as stored from an FP8 checkpoint (as transformers re-quantises
    on save); without quantization when loaded with a floating-point dtype."""
    if is_fp8_dtype(dtype):
        return {**raw, "quantization_config": quantization_config(1)}  # the real K is set when saving
    if dtype is not None and "quantization_config" in raw:
        return {k: v for k, v in raw.items() if k != "quantization_config"}
    return raw


# ----------------------------------------------------------------------------- whole state dicts

def dequantize_tensors(tensors: dict[str, torch.Tensor], raw: dict, source, dtype=None) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (as read from disk, or meta tensors from the headers) with every FP8
    weight and its `_scale_inv` replaced by the dequantised weight, in `dtype` (None: the dtype the
    checkpoint keeps its unquantised weights in, bfloat16 if none). Unquantised checkpoints come back
    as they are, after checking they hold no FP8 tensors or scales. Meta tensors: shapes checked only."""
    fp8 = getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)
    scales = {n[:-len(SCALE_SUFFIX)]: t for n, t in tensors.items() if n.endswith(SCALE_SUFFIX)}
    raw_fp8 = sorted(n for n, t in tensors.items() if t.dtype in fp8 and n not in scales)
    if not is_fp8_config(raw):
        stray = [scale_name(n) for n in sorted(scales)] + raw_fp8
        if stray:
            raise StarElasticError(f"{source}: FP8 tensors (e.g. {stray[0]}) but config.json has no FP8 "
                                   "quantization_config")
        return tensors
    if raw_fp8:
        raise StarElasticError(f"{source}: FP8 tensor {raw_fp8[0]} has no {SCALE_SUFFIX} beside it")
    out = {n: t for n, t in tensors.items() if not n.endswith(SCALE_SUFFIX) and not n.endswith("activation_scale")}
    for n in scales:
        if n not in out:
            raise StarElasticError(f"{source}: {scale_name(n)} has no tensor {n} to scale")
    if dtype is None:
        counts: dict = {}
        for n, t in out.items():
            if n not in scales and t.is_floating_point() and t.dtype not in fp8 and not t.is_meta:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        dtype = max(counts, key=counts.get) if counts else torch.bfloat16
    block = raw["quantization_config"].get("weight_block_size")
    for n, s in scales.items():
        q = out[n]
        if q.is_meta or s.is_meta:
            _block(q.shape, s.shape, block, f"{source}: {n}")
            out[n] = torch.empty(q.shape, dtype=dtype, device="meta")
        else:
            if q.dtype not in fp8:
                raise StarElasticError(f"{source}: {n} has a {SCALE_SUFFIX} but is stored in {q.dtype}, not FP8")
            out[n] = dequantize(q, s, dtype, block, f"{source}: {n}")
    return out


def cast_unquantized(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """An in-memory state dict (our names) with what FP8 leaves unquantised cast as a bfloat16 model
    holds it (bfloat16; the router's gate and correction bias through bfloat16 back to float32):
    what `stream_slice(..., dtype=fp8)` writes for them. The quantised weights are left as they are."""
    from .model import Model

    with torch.device("meta"):
        held = {k: v.dtype for k, v in Model(cfg).to(torch.bfloat16).state_dict().items()}
    out = {}
    for k, t in state.items():
        if t.is_floating_point() and not (is_quantized(k) and t.dim() >= 2):
            t = t.to(torch.bfloat16).to(held.get(k, torch.bfloat16))
        out[k] = t
    return out


def quantize_state(state: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config.json) in FP8: each linear weight (`is_quantized`) quantised with its per-row
    scales (each scale right after its weight), the config's quantization_config set for them."""
    out, widest = {}, 1
    for k, t in state.items():
        if is_quantized(k) and t.dim() >= 2 and t.is_floating_point():
            q, s = quantize(t, k)
            out[k], out[scale_name(k)] = q, s
            widest = max(widest, t.shape[-1])
        else:
            out[k] = t
    return out, {**config, "quantization_config": quantization_config(widest)}


# ----------------------------------------------------------------------------- FP8 matmuls

FP8_MATMUL_MULTIPLE = 16  # torch._scaled_mm on GPUs: both dimensions of the weight a multiple of 16


class FP8Linear(nn.Module):
    """`x @ (q * scale).T + bias` with the product in FP8: the weight q (out, in) float8_e4m3fn with one
    float32 scale per output row (this module's `weight_scale_inv`, (1, out)), each token of x quantised
    to e4m3 with its own scale, then `torch._scaled_mm` with both row-wise scales, out in bfloat16 (what
    GPUs support for row-wise scales), returned in x's dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale_inv", scale.float().reshape(1, -1))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        amax = flat.abs().amax(-1, keepdim=True).float()
        sx = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        xq = (flat.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(self.weight.dtype)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale_inv,
                             out_dtype=torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_fp8_matmuls(model: nn.Module, dtype: torch.dtype | None = None, views: list[nn.Module] = ()) -> dict:
    """Swap every linear layer that FP8 checkpoints quantise (`is_quantized`: attention, MLP, Mamba
    in/out, shared experts, latent projections) for an `FP8Linear` of its weight quantised per row
    (`quantize`), in place; then cast everything else of `model` to `dtype` (None: left as it is). A
    layer whose sizes are not multiples of 16 (what GPUs' FP8 matmul takes) stays as it is. Inference
    only: the model can no longer be trained, masked or saved.

    `views`: budget views of `model` (serve/views.py), which keep their share of its weights: a view's
    layer whose weight is a prefix of one of `model`'s (a view into the same storage) becomes an
    `FP8Linear` over the same prefix of that layer's FP8 weight and of its scales, no copy: rows cut
    keep their own scales and columns cut leave every kept row's scale as it was (the nesting of this
    module's doc). A view's own copies (`view.copied`) are quantised on their own. The model's
    full-precision linear weights are then referenced by nothing that was swapped.
    Returns {"swapped", "shared" (view layers over the model's FP8 weights), "kept" (the model's
    layers left as they were), "bytes" (of FP8 weights and scales)}."""
    fp8_dtype()
    if not hasattr(torch, "_scaled_mm"):
        raise StarElasticError(f"FP8 matmuls need torch._scaled_mm, which torch {torch.__version__} lacks")

    def linears(m):
        for name, module in list(m.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if type(child) is nn.Linear and is_quantized(f"{full}.weight"):
                    yield module, child_name, full, child

    def aligned(lin):
        return lin.in_features % FP8_MATMUL_MULTIPLE == 0 and lin.out_features % FP8_MATMUL_MULTIPLE == 0

    by_storage: dict[int, list] = {}
    layers, out = [], {"swapped": 0, "shared": 0, "kept": [], "bytes": 0}
    for module, child_name, full, lin in linears(model):
        if not aligned(lin):
            out["kept"].append(full)
            continue
        q, scale = quantize(lin.weight, full)
        by_storage.setdefault(lin.weight.untyped_storage().data_ptr(), []).append((lin.weight, q, scale))
        layers.append((module, child_name, FP8Linear(q, scale, lin.bias)))
        out["bytes"] += q.numel() + 4 * scale.numel()

    def prefix_of_model(w):
        """(q, scale) slices of the model's layer `w` is a prefix view of, or None."""
        for pw, q, scale in by_storage.get(w.untyped_storage().data_ptr(), []):
            off = w.storage_offset() - pw.storage_offset()
            if w.dim() != 2 or not 0 <= off < pw.numel() or w.stride() != pw.stride():
                continue
            r0, c0 = divmod(off, pw.shape[1])
            if r0 + w.shape[0] <= pw.shape[0] and c0 + w.shape[1] <= pw.shape[1]:
                return q[r0:r0 + w.shape[0], c0:c0 + w.shape[1]], scale[r0:r0 + w.shape[0]]
        return None

    for view in views:  # before the model's own swap: their weights still point into its storage
        if view is model:
            continue
        for module, child_name, full, lin in linears(view):
            if not aligned(lin):
                continue
            shared = prefix_of_model(lin.weight)
            if shared is None:  # a copy of its own (view.copied): quantised on its own
                shared = quantize(lin.weight, full)
                out["bytes"] += shared[0].numel() + 4 * shared[1].numel()
            else:
                out["shared"] += 1
            setattr(module, child_name, FP8Linear(*shared, lin.bias))
            out["swapped"] += 1
    for module, child_name, layer in layers:
        setattr(module, child_name, layer)
        out["swapped"] += 1
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, FP8Linear):
                if module.bias is not None:
                    module.bias.data = module.bias.data.to(dtype)
                continue
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if t.is_floating_point():
                    t.data = t.data.to(dtype)
    for m in [model, *views]:
        m.fp8_matmuls = True  # what was swapped cannot be saved back as it was
    return out
