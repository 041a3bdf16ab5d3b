"""Streaming slicer: cut a sub-checkpoint out of a safetensors parent on disk without loading it.

    from star_elastic.elastic.stream import stream_slice
    stream_slice("parent/", ElasticSpec(n_routed_experts=64, hidden_size=2048), "child/")

The output is what `export(slice_model(load(parent), spec), out_dir)` writes (same config.json,
same tensor names, values and shards), but the parent is never loaded: every output tensor is cut
from its parent tensor opened lazily with `safe_open`, reading only the box of rows/columns that
holds the kept units (`get_slice`), and written straight into the output file, whose header is
planned from the shapes before any data is read. Memory stays about one tensor whatever the
checkpoint or shard size; tensors of dropped layers and of dropped experts (NemotronH stores one
tensor per expert) are never read.

Streaming does not sort. Slicing keeps the *first* units of every axis, so the parent must already
be importance-sorted (`sort_model` then `save_pretrained`): that sorted parent is what an elastic
checkpoint stores, and every submodel is streamed out of it (`star-elastic slice CKPT --budget`,
`zero_shot.slice_budget`).

The index logic is `slicing.take` itself: it runs once on a stand-in tensor that records which
indices each dimension keeps (the read plan and the output shape), then applies to the data read.

An elastic checkpoint trained with a full budget's delta (delta.py) stores the full budget merged,
W + B A: a smaller budget's linear weight is then its kept block of that minus the kept rows of B times
the kept columns of A (`_without_delta`), A and B read once from `full_delta.safetensors` (small). Where
the full budget keeps embeddings or norms of its own, a smaller budget's come from that file too (`.shared`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from star_elastic import fp8, hf
from star_elastic.errors import StarElasticError
from star_elastic.hf_files import safetensors_header, shard_groups, shard_names, write_index
from star_elastic.model import Model, ModelConfig

from .slicing import per_layer_note, star_elastic_config, take
from .spec import ElasticSpec

# bytes read through one safe_open handle before it is reopened: the pages of its memory map that
# were read count in the process's resident set until the map is closed
READ_WINDOW = 64 * 1024**2

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
               torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
DTYPE_OF = {code: dt for dt, code in TORCH_DTYPE.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
EXPERT_STACK = (".mixer.experts.up_proj", ".mixer.experts.down_proj")


# ----------------------------------------------------------------------------- the parent on disk

@dataclass(frozen=True)
class _Source:
    """One tensor of the parent: where it is and what its header says."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset of its data in the file

    def rows(self, lo: int, hi: int) -> tuple[int, int]:
        """File byte range of rows lo..hi (first dimension)."""
        row = DTYPE_BYTES[self.dtype] * math.prod(self.shape[1:])
        return self.start + lo * row, self.start + hi * row


def _header(f: Path) -> dict:
    """The safetensors header of `f` (checked against the file's length by `safetensors_header`),
    each tensor with its shape as a tuple and `start`, its first byte in the file."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
    tensors = safetensors_header(f)
    for k, v in tensors.items():
        if v.get("dtype") not in DTYPE_BYTES:
            raise StarElasticError(f"{f}: tensor {k} has unsupported dtype {v.get('dtype')!r}")
        v["shape"] = tuple(int(s) for s in v["shape"])
        v["start"] = 8 + n + int(v["data_offsets"][0])
    return tensors


def _parent_config(path: Path) -> tuple[dict, ModelConfig]:
    """config.json of a checkpoint directory, raw and as our config (per-layer sizes included), as `load` reads it."""
    if not path.exists():
        raise StarElasticError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise StarElasticError(f"{path}: expected a checkpoint directory (config.json + safetensors)")
    return hf.read_config(path)


def _parent_tensors(path: Path, cfg: ModelConfig, scales: dict | None = None
                    ) -> tuple[dict[str, _Source], dict[str, dict[int, _Source]]]:
    """The parent's tensors under their in-memory names (`model.`), from the headers alone:
    (plain tensors, per-expert tensors by stacked name and expert), checked against the config
    as `load` checks them (no missing, unexpected or misshapen tensor). An FP8 parent's scales
    (fp8.py) are checked against their weights and go into `scales` (by file key), not the result."""
    plain, experts = {}, {}
    for f in hf._weight_files(path):
        for key, h in _header(f).items():
            if key.startswith("mtp."):  # multi-token-prediction heads: `load` skips them too
                continue
            src = _Source(f, key, h["dtype"], h["shape"], h["start"])
            name = "model." + key[len("backbone."):] if key.startswith("backbone.") else key
            m = hf.EXPERT_KEY.match(name)
            if m:
                slot = experts.setdefault(f"{m[1]}.{m[3]}", {})
                j = int(m[2])
            else:
                slot, j = plain, name
            if j in slot:
                raise StarElasticError(f"{path}: tensor {key} is stored twice ({slot[j].file.name}, {f.name})")
            slot[j] = src
    found = _split_scales(path, plain, experts)
    if scales is not None:
        scales.update(found)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Model(cfg).state_dict().items()}
    if cfg.tied:
        expected.pop("lm_head.weight")
        plain.pop("lm_head.weight", None)
    both = sorted(set(plain) & set(experts))
    if both:
        raise StarElasticError(f"{path}: {both[0]} is stored both stacked and one tensor per expert")
    hf.check_names(expected, set(plain) | set(experts), str(path))
    for name, src in plain.items():
        if src.shape != expected[name]:
            raise StarElasticError(f"{path}: tensor {name} has shape {src.shape}, the config implies {expected[name]}")
    for name, parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise StarElasticError(f"{path}: experts of {name} are not numbered 0..{len(parts) - 1}")
        shape = (len(parts),) + parts[0].shape
        if shape != expected[name] or any(p.shape != parts[0].shape for p in parts.values()):
            raise StarElasticError(f"{path}: tensor {name} has shape {shape}, the config implies {expected[name]}")
    return plain, experts


def _split_scales(path: Path, plain: dict, experts: dict) -> dict[str, _Source]:
    """Take an FP8 parent's `*_scale_inv` (and activation scales, unused) out of `plain`: its scales
    by file key, each checked to be one per row of an FP8 weight (the only scales that slice exactly),
    and every FP8 weight to have one."""
    found = {}
    for name in [n for n in plain if n.endswith((fp8.SCALE_SUFFIX, "activation_scale"))]:
        src = plain.pop(name)
        if name.endswith(fp8.SCALE_SUFFIX):
            found[src.key] = src
    weights = {src.key: src for src in plain.values()}
    weights.update({src.key: src for parts in experts.values() for src in parts.values()})
    for key, s in found.items():
        w = weights.get(key[:-len(fp8.SCALE_SUFFIX)])
        if w is None:
            raise StarElasticError(f"{path}: {key} has no tensor {key[:-len(fp8.SCALE_SUFFIX)]} to scale")
        if w.dtype not in ("F8_E4M3", "F8_E5M2"):
            raise StarElasticError(f"{path}: {w.key} has a {fp8.SCALE_SUFFIX} but is stored in {w.dtype}, not FP8")
        if s.shape != w.shape[:-1] + (1,):
            raise StarElasticError(f"{path}: {key} has shape {s.shape}, not one scale per row {w.shape[:-1] + (1,)}: "
                                   "only per-row FP8 scales slice exactly; load this checkpoint instead "
                                   "(star_elastic.load dequantises any block size)")
    bare = sorted(k for k, w in weights.items() if w.dtype in ("F8_E4M3", "F8_E5M2") and k + fp8.SCALE_SUFFIX not in found)
    if bare:
        raise StarElasticError(f"{path}: FP8 tensor {bare[0]} has no {fp8.SCALE_SUFFIX} beside it")
    return found


# ----------------------------------------------------------------------------- planning

class _Selection:
    """Stands in for a parent tensor in `take`: records the indices every dimension keeps instead of
    copying data. Any other tensor operation fails (AttributeError), and the tensor is read whole."""

    device = torch.device("cpu")

    def __init__(self, shape, keep=None):
        self.shape = torch.Size(shape)
        self.keep = list(keep) if keep is not None else [None] * len(self.shape)

    def index_select(self, dim: int, index: torch.Tensor) -> "_Selection":
        dim = dim % len(self.shape)
        index = index.long()
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.shape[dim]):
            raise IndexError(f"index out of range for dimension {dim} of size {self.shape[dim]}")
        keep, shape = list(self.keep), list(self.shape)
        keep[dim] = index if keep[dim] is None else keep[dim][index]
        shape[dim] = index.numel()
        return _Selection(shape, keep)


@dataclass
class _Item:
    """One output tensor: its name, its parent source, and how to cut it."""

    out: str
    src: _Source
    name: str  # the parent's in-memory name, for `take`
    idx: dict  # `take`'s indices (for an expert: without the expert axis)
    mode: str  # "plain"; "expert" (a per-expert parent tensor); "row" (row `row` of a stacked parent tensor)
    row: int | None  # the expert's index in the parent's stack ("expert" and "row"); None: plain
    take_shape: tuple[int, ...]  # the parent tensor as `take` sees it (experts: a stack of one)
    keep: list | None  # per `take` dimension, the indices kept (None: all); None: read whole and run `take`
    shape: tuple[int, ...]  # the output tensor's shape
    cast: tuple[str, ...] = ()  # dtypes the tensor is cast through, in order, as loading would (none: as stored)
    # FP8 (fp8.py): "copy" an FP8 weight as stored; "scale" its per-row scales (`of`: the weight);
    # "quantize" a weight, its scales from the parent's whole rows, and "scale-q" those scales (`of`:
    # the weight); "dequantize" an FP8 weight (`of`: its scales' item). "": none of these.
    kind: str = ""
    of: "_Item | None" = None

    @property
    def dtype(self) -> str:
        """The output tensor's dtype (safetensors code)."""
        return self.cast[-1] if self.cast else self.src.dtype

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n


def _plan(name: str, shape: tuple, cfg: ModelConfig, idx: dict) -> tuple[tuple, list | None]:
    """(output shape, kept indices per dimension) of `take(name, <tensor of shape>, cfg, idx)`."""
    try:
        sel = take(name, _Selection(shape), cfg, idx)
        if isinstance(sel, _Selection):
            return tuple(sel.shape), sel.keep
    except (AttributeError, TypeError):  # take did more than pick indices: read it whole, run take itself
        pass
    return tuple(take(name, torch.empty(shape, device="meta"), cfg, idx).shape), None


def _disk_name(family: str, name: str, expert: int | None = None) -> str:
    """The output's name for in-memory tensor `name` (expert `expert` of a stack), as `save_pretrained` writes it."""
    if family != "nemotron_h":
        return name
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    if expert is None:
        return name
    prefix, proj = name.rsplit(".", 1)
    return f"{prefix}.{expert}.{proj}.weight"


def _items(parent: ModelConfig, sub: ModelConfig, spec: ElasticSpec, plain: dict, experts: dict) -> list[_Item]:
    """Every output tensor, in the order `save_pretrained` writes the sliced model's."""
    idx = spec.indices(parent)
    old_of = dict(enumerate(spec.kept_layers(parent)))
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in Model(sub).state_dict().items()}
    if sub.tied:
        wanted.pop("lm_head.weight")
    items = []
    for new_name, want in wanted.items():
        m = re.match(r"model\.layers\.(\d+)\.", new_name)
        name = new_name if m is None else f"model.layers.{old_of[int(m[1])]}.{new_name[m.end():]}"
        if not (parent.family == "nemotron_h" and name.endswith(EXPERT_STACK)):
            src = plain[name]
            out_shape, keep = _plan(name, src.shape, parent, idx)
            items.append(_Item(_disk_name(parent.family, new_name), src, name, idx, "plain", None, src.shape, keep,
                               out_shape))
            got = out_shape
        else:  # one output tensor per kept expert, cut from that expert's parent tensor alone
            i = old_of[int(m[1])]
            kept = idx.get(f"layers.{i}.experts")
            local = {k: v for k, v in idx.items() if k != f"layers.{i}.experts"}
            per_expert_ffn = local.get(f"layers.{i}.expert_ffn")
            got = None
            for k in range(want[0]):
                j = k if kept is None else int(kept[k])
                loc = local
                if per_expert_ffn is not None and per_expert_ffn.dim() == 2:  # neurons chosen per parent expert
                    loc = {**local, f"layers.{i}.expert_ffn": per_expert_ffn[j:j + 1]}
                if name in experts:  # `row`: the expert's index in the parent's stack (its delta's, stream_slice)
                    src, mode, row = experts[name][j], "expert", j
                    take_shape = (1,) + src.shape
                else:
                    src, mode, row = plain[name], "row", j
                    take_shape = (1,) + src.shape[1:]
                out_shape, keep = _plan(name, take_shape, parent, loc)
                items.append(_Item(_disk_name(parent.family, new_name, k), src, name, loc, mode, row, take_shape,
                                   keep, out_shape[1:]))
                got = (want[0],) + out_shape[1:]
        if got != want:  # slicing's index logic and the spec's config disagree: a bug, not a user error
            raise RuntimeError(f"stream_slice: {new_name} would be {got}, the sliced config implies {want}")
    return items


def _held_dtypes(cfg: ModelConfig, plain: dict, experts: dict, dtype: torch.dtype) -> dict[str, str]:
    """The dtype of every parent tensor (in-memory name) in `load(parent, dtype=dtype)`: floating-point
    tensors cast to `dtype`, except what the modules' `_apply` then keeps in float32 whatever the
    rest is (the MoE router's gate, its stored values unrounded). Worked out on a model on
    the meta device holding the stored dtypes: no data is read."""
    stored = {name: src.dtype for name, src in plain.items()}
    stored.update({name: parts[0].dtype for name, parts in experts.items()})
    with torch.device("meta"):
        model = Model(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict({k: torch.empty(shapes[k], dtype=DTYPE_OF[c], device="meta") for k, c in stored.items()},
                          strict=False, assign=True)
    model.to(dtype=dtype)
    held = {k: TORCH_DTYPE[v.dtype] for k, v in model.state_dict().items()}
    return {k: held[k] for k in stored}


def _check_dtype(dtype) -> None:
    if isinstance(dtype, torch.dtype) and fp8.is_fp8_dtype(dtype):
        return  # FP8 weights with per-row scales (fp8.py)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype in TORCH_DTYPE
                                  and DTYPE_BYTES[TORCH_DTYPE[dtype]] >= 2):
        raise StarElasticError(f"dtype {dtype}: expected a floating-point torch dtype (torch.bfloat16, ..., or "
                               "torch.float8_e4m3fn for FP8 weights with per-row scales)")


def _plan_items(parent_dir: Path, parent: ModelConfig, spec: ElasticSpec, dtype, raw: dict | None = None
                ) -> list[_Item]:
    """Every output tensor of `spec`, each with the casts that give the values and dtype `export`
    writes after `load(parent_dir, dtype=dtype)`: to `dtype` (floating point), then to what the model
    holds (`_held_dtypes`). No dtype: as stored, no casts. FP8 (`_fp8_items`): dtype float8 writes
    linear weights in FP8 (the rest as a bfloat16 model holds it); an FP8 parent is sliced as stored
    (no dtype, or float8) or dequantised (a floating-point dtype). `raw`: the parent's config.json."""
    scales: dict = {}
    plain, experts = _parent_tensors(parent_dir, parent, scales)
    if scales and raw is not None and not fp8.is_fp8_config(raw):
        raise StarElasticError(f"{parent_dir}: FP8 tensors (e.g. {next(iter(scales))}) but config.json has no FP8 "
                               "quantization_config")
    spec.validate(parent)
    items = _items(parent, spec.config(parent), spec, plain, experts)
    to_fp8 = fp8.is_fp8_dtype(dtype)
    work = torch.bfloat16 if to_fp8 else dtype  # what the unquantised tensors become
    if work is not None:
        held = _held_dtypes(parent, plain, experts, work)
        for it in items:
            steps, now = [], it.src.dtype
            # what the model keeps in its own dtype (the MoE router's gate, float32) is cast straight to it
            through = DTYPE_OF[now].is_floating_point and held[it.name] == TORCH_DTYPE[work]
            for want in ([TORCH_DTYPE[work]] if through else []) + [held[it.name]]:
                if want != now:
                    steps.append(want)
                    now = want
            it.cast = tuple(steps)
    if scales or to_fp8:
        items = _fp8_items(items, scales, to_fp8, keep=to_fp8 or dtype is None)
    return items


def _fp8_items(items: list[_Item], scales: dict, to_fp8: bool, keep: bool) -> list[_Item]:
    """`items` with FP8 weights and their scales planned (fp8.py): a weight that has scales in the
    parent is copied as stored with its kept rows' scales (`keep`) or dequantised; with `to_fp8`, an
    unquantised linear weight is quantised with the scales of the parent's whole rows (so that the
    slice is the FP8 parent's slice, whatever the budget). Each scale right after its weight."""
    out = []
    for it in items:
        s = scales.get(it.src.key + fp8.SCALE_SUFFIX)
        quantize = s is None and to_fp8 and fp8.is_quantized(it.name) and len(it.shape) >= 2 \
            and DTYPE_OF[it.src.dtype].is_floating_point
        if s is None and not quantize:
            out.append(it)
            continue
        scale = _Item(it.out + fp8.SCALE_SUFFIX, s if s is not None else it.src, it.name, it.idx, it.mode, it.row,
                      it.take_shape[:-1] + (1,), None if it.keep is None else it.keep[:-1] + [None],
                      it.shape[:-1] + (1,), kind="scale" if s is not None else "scale-q", of=it)
        if quantize:
            it.kind, it.cast = "quantize", (fp8.FP8_CODE,)
            scale.cast = ("F32",)
        elif keep:
            it.kind, it.cast = "copy", ()
        else:
            it.kind, it.of = "dequantize", scale
            out.append(it)
            continue
        out += [it, scale]
    return out


# ----------------------------------------------------------------------------- reading

class _Reader:
    """Lazy safe_open handles, one per parent file, each reopened after READ_WINDOW bytes were read
    through it so that the parent's pages leave the resident set as the slicer moves on. Before a
    box is read through the memory map, its byte range is announced to the kernel
    (posix_fadvise WILLNEED): one large read-ahead instead of a page fault per 4 KB from disk."""

    def __init__(self, window: int = READ_WINDOW):
        self.window, self.handles, self.read, self.fds = window, {}, {}, {}

    def _handle(self, f: Path):
        if f not in self.handles:
            try:
                self.handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise StarElasticError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
            self.read[f] = 0
        return self.handles[f]

    @staticmethod
    def _box(item: _Item) -> tuple[list[slice], list]:
        """The slices of the parent tensor on disk that hold the kept units, and the kept indices
        relative to that box along each of `take`'s dimensions (None: all of the box)."""
        keep = item.keep if item.keep is not None else [None] * len(item.take_shape)
        box, rel = [], []
        for k in keep:
            if k is None or k.numel() == 0:
                box.append(slice(None) if k is None else slice(0, 0))
                rel.append(None)
                continue
            lo, hi = int(k.min()), int(k.max()) + 1
            r = k - lo
            box.append(slice(lo, hi))
            rel.append(None if torch.equal(r, torch.arange(hi - lo)) else r)
        if item.mode == "expert":  # the parent's tensor of this one expert: `take` sees a stack of one
            return box[1:], rel
        if item.mode == "row":  # row `row` of the parent's stacked experts
            return [slice(item.row, item.row + 1)] + box[1:], rel
        return box, rel

    def _rows(self, item: _Item, disk: list[slice]) -> tuple[int, int]:
        """File byte range the box spans (whole rows of its first dimension)."""
        if not item.src.shape:
            return item.src.start, item.src.start + DTYPE_BYTES[item.src.dtype]
        lo, hi, _ = disk[0].indices(item.src.shape[0])
        return item.src.rows(lo, max(lo, hi))

    def prefetch(self, item: _Item) -> None:
        """Ask the kernel to start reading the box of `item` into the page cache (returns at once)."""
        if not hasattr(os, "posix_fadvise"):
            return
        start, end = self._rows(item, self._box(item)[0])
        f = item.src.file
        try:
            if f not in self.fds:
                self.fds[f] = os.open(f, os.O_RDONLY)
            os.posix_fadvise(self.fds[f], start, end - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint

    def tensor(self, item: _Item, cfg: ModelConfig) -> torch.Tensor:
        """The output tensor of `item`: the box holding its kept rows/columns, read with `get_slice`,
        then the kept indices inside the box (or `take` on the whole tensor)."""
        disk, rel = self._box(item)
        src = item.src
        try:
            t = self._handle(src.file).get_slice(src.key)[tuple(disk)]
        except SafetensorError as e:
            raise StarElasticError(f"{src.file}: cannot read tensor {src.key} ({str(e).splitlines()[0]})") from None
        if item.mode == "expert":
            t = t.unsqueeze(0)
        if item.keep is None:
            t = take(item.name, t, cfg, item.idx)
        else:
            for dim, r in enumerate(rel):
                if r is not None:
                    t = t.index_select(dim, r)
        if item.mode != "plain":
            t = t[0]
        start, end = self._rows(item, disk)  # what the box made the process touch
        self.read[src.file] += end - start
        return t.contiguous()

    def whole(self, item: _Item) -> torch.Tensor:
        """The parent tensor of `item` whole, as `take` sees it (an expert's: a stack of one)."""
        src = item.src
        box = [slice(None)] * len(src.shape)
        if item.mode == "row":
            box[0] = slice(item.row, item.row + 1)
        try:
            t = self._handle(src.file).get_slice(src.key)[tuple(box)] if box else self._handle(src.file).get_tensor(src.key)
        except SafetensorError as e:
            raise StarElasticError(f"{src.file}: cannot read tensor {src.key} ({str(e).splitlines()[0]})") from None
        start, end = self._rows(item, box)
        self.read[src.file] += end - start
        return t.unsqueeze(0) if item.mode == "expert" else t

    def recycle(self):
        """Close the handles that have read a window's worth (call with no tensor of theirs in use)."""
        for f in [f for f, n in self.read.items() if n >= self.window and f in self.handles]:
            self.handles.pop(f).__exit__(None, None, None)
            self.read[f] = 0

    def close(self):
        for h in self.handles.values():
            h.__exit__(None, None, None)
        self.handles.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def take_quantized(name: str, q: torch.Tensor, scale: torch.Tensor, cfg: ModelConfig, idx: dict
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`take` of an FP8 tensor and its per-row scales (fp8.py): the same rows and columns of q, and
    the kept rows' scales (a column cut leaves them as they are). Dequantised, it is exactly `take`
    of the dequantised tensor."""
    qs = take(name, q.view(torch.uint8), cfg, idx).view(q.dtype)  # index ops on the bytes: any torch
    ss = take(name, scale.expand(q.shape), cfg, idx)[..., :1]
    return qs.contiguous(), ss.contiguous()


def _fp8_tensor(reader: _Reader, it: _Item, cfg: ModelConfig) -> torch.Tensor:
    """The output tensor of an FP8 item (`_Item.kind`)."""
    if it.kind == "copy":
        if it.keep is None:  # take does more than pick indices: on the bytes, which any torch can gather
            q = reader.whole(it)
            q = take(it.name, q.view(torch.uint8), cfg, it.idx).view(q.dtype)
            return (q if it.mode == "plain" else q[0]).contiguous()
        return reader.tensor(it, cfg)
    if it.kind == "scale":
        return _scales(reader, it, cfg)
    if it.kind == "dequantize":
        q = _fp8_tensor(reader, replace(it, kind="copy", cast=()), cfg)
        return fp8.dequantize(q, _scales(reader, it.of, cfg), DTYPE_OF[it.dtype], name=it.out)
    weight = it if it.kind == "quantize" else it.of
    q, s = _quantized(reader, weight, cfg)
    return q if it.kind == "quantize" else s


def _scales(reader: _Reader, it: _Item, cfg: ModelConfig) -> torch.Tensor:
    """The kept rows' scales of a weight stored in FP8 (`it`: a "scale" item)."""
    if it.keep is not None:
        return reader.tensor(it, cfg)
    s = reader.whole(it)
    s = take(it.name, s.expand(it.of.take_shape), cfg, it.idx)[..., :1]
    return (s if it.mode == "plain" else s[0]).contiguous()


def _quantized(reader: _Reader, it: _Item, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, scales) of an unquantised parent weight's output `it`: the kept rows quantised
    with scales over the parent's whole rows, then the kept columns. This is the slice of the whole
    tensor quantised (`take_quantized`), so any budget comes out as the FP8 parent's slice."""
    if it.keep is not None:
        t = reader.tensor(replace(it, keep=it.keep[:-1] + [None], kind="", cast=()), cfg)  # every column
        q, s = fp8.quantize(t, it.out)
        if it.keep[-1] is not None:
            q = q.index_select(-1, it.keep[-1])
    else:
        q, s = fp8.quantize(reader.whole(it), it.out)
        q, s = take_quantized(it.name, q, s, cfg, it.idx)
        if it.mode != "plain":
            q, s = q[0], s[0]
    return q.contiguous(), s.contiguous()


# ----------------------------------------------------------------------------- writing

def _write_tensor(fh, t: torch.Tensor) -> None:
    """Append a contiguous tensor's bytes to an open output file."""
    fh.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _write_shard(path: Path, items: list[_Item], produce, done, prefetch=lambda item: None) -> None:
    """One safetensors file whose header is written first (from the planned shapes), then each
    tensor as it is produced: one tensor in memory at a time. Tensors are laid out by decreasing
    element size (as safetensors does) so that every tensor is aligned in the file."""
    order = sorted(items, key=lambda it: -DTYPE_BYTES[it.dtype])  # stable
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for it in order:
        header[it.out] = {"dtype": it.dtype, "shape": list(it.shape), "data_offsets": [offset, offset + it.nbytes]}
        offset += it.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for n, it in enumerate(order):
            if n == 0:
                prefetch(it)
            if n + 1 < len(order):  # the next box is read from disk while this one is cut and written
                prefetch(order[n + 1])
            t = produce(it)
            if tuple(t.shape) != it.shape or TORCH_DTYPE.get(t.dtype) != it.dtype:
                raise RuntimeError(f"stream_slice: {it.out} came out {tuple(t.shape)} {t.dtype}, "
                                   f"planned {it.shape} {it.dtype}")
            _write_tensor(fh, t)
            del t
            done()


# ----------------------------------------------------------------------------- the slicer

def stream_slice(parent_dir, spec: ElasticSpec | dict, out_dir, *, dtype: torch.dtype | None = None,
                 progress: bool = True, max_shard_bytes: int = hf.SHARD_BYTES) -> Path:
    """Write the submodel `spec` of the safetensors checkpoint `parent_dir` to `out_dir`, reading one
    parent tensor at a time (only the rows/columns it keeps where the layout allows).

    `parent_dir`: a NemotronH or Llama checkpoint directory (config.json + model.safetensors or
    shards with an index), NemotronH in the on-disk layout (`backbone.`, one tensor per expert) or
    the in-memory one (`model.`, stacked experts). It must be importance-sorted already: slicing keeps
    the first units of every axis and streaming does not sort.
    The output is `export`'s: a stock Hugging Face checkpoint for one size per axis, star-elastic's
    per-layer format otherwise (with a note on stderr); tokenizer files are copied. It is written
    into a temporary directory beside `out_dir`, renamed into place at the end.
    `dtype`: the output is then `export(slice_model(load(parent_dir, dtype=dtype), spec))`'s:
    floating-point tensors are cast as they are written (what the model keeps in float32, the MoE
    router's gate, is written in float32 with its stored values). None: every tensor as stored.
    FP8 (fp8.py): `dtype=torch.float8_e4m3fn` writes every linear weight in FP8 with one scale per
    row, computed over the parent's whole row (the kept columns are then cut), so that any budget is
    exactly the slice of the FP8 parent; the rest as `dtype=torch.bfloat16` would. An FP8 parent
    slices as stored (its kept rows' scales) with no dtype or float8, and is dequantised with a
    floating-point dtype.
    """
    parent_dir, out_dir = Path(parent_dir), Path(out_dir)
    if isinstance(spec, dict):
        spec = ElasticSpec.from_dict(spec)
    _check_dtype(dtype)
    raw, parent = _parent_config(parent_dir)
    src, dst = parent_dir.resolve(), out_dir.resolve()
    if dst == src or dst in src.parents:
        raise StarElasticError(f"{out_dir}: the output would replace the parent checkpoint {parent_dir}")
    items = _plan_items(parent_dir, parent, spec, dtype, raw)
    delta, shared = _full_delta(parent_dir, parent, spec)
    if (delta or shared) and any(it.kind and (it.name in delta or it.name in shared) for it in items):
        raise StarElasticError(f"{parent_dir}: FP8 slices of a checkpoint with a full budget's delta are not built; "
                               "slice it in a floating-point dtype")
    sub = spec.config(parent)
    per_layer = bool(sub.layer_sizes and any(sub.layer_sizes))
    # config.json keeps infinities as {"__float__": "Infinity"}; transformers' config classes want floats
    from transformers import PretrainedConfig

    base = PretrainedConfig._decode_special_floats(raw)
    try:
        config = star_elastic_config(sub, base) if per_layer else hf.config_to_hf(sub, base)
    except StarElasticError:
        raise
    except Exception as e:  # transformers validates the sizes (e.g. hidden_size a multiple of the heads)
        reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        raise StarElasticError(f"elastic spec: transformers rejects the sliced model's config ({reason})") from None
    config.pop("quantization_config", None)  # FP8 out or not is the items' business; K is the slice's own
    quantized = [it for it in items if it.kind in ("copy", "quantize")]
    if quantized:
        config["quantization_config"] = fp8.quantization_config(max(it.shape[-1] for it in quantized))
    shards = shard_groups(items, lambda it: it.nbytes, max_shard_bytes)  # the rule of hf.write_safetensors
    names = shard_names(len(shards))
    if per_layer:
        per_layer_note()

    from tqdm.auto import tqdm

    reader = _Reader()
    bar = tqdm(total=len(items), desc=f"slicing {parent_dir.name}", unit="tensor",
               disable=not progress or bool(os.environ.get("STAR_ELASTIC_QUIET")))
    try:
        with hf.staging(out_dir) as tmp:
            (tmp / "config.json").write_text(hf.config_json(config))

            def produce(it):
                if it.kind:
                    return _fp8_tensor(reader, it, parent)
                if it.name in shared:  # the smaller budgets' own embeddings / norms, not the full budget's
                    t = take(it.name, shared[it.name].to(DTYPE_OF[it.src.dtype]), parent, it.idx).contiguous()
                elif it.name in delta:
                    t = _without_delta(reader, it, parent, delta[it.name])
                else:
                    t = reader.tensor(it, parent)
                for code in it.cast:
                    t = t.to(DTYPE_OF[code])
                return t

            def done():
                reader.recycle()
                bar.update()

            for fname, shard in zip(names, shards):
                _write_shard(tmp / fname, shard, produce, done, reader.prefetch)
            if len(shards) > 1:
                write_index(tmp, {it.out: fname for fname, shard in zip(names, shards) for it in shard},
                            sum(it.nbytes for it in items))
            for name in TOKENIZER_FILES:
                if (parent_dir / name).is_file():
                    shutil.copyfile(parent_dir / name, tmp / name)
    finally:
        reader.close()
        bar.close()
    return out_dir


def _full_delta(parent_dir: Path, parent: ModelConfig, spec: ElasticSpec) -> tuple[dict[str, tuple], dict]:
    """{linear weight's in-memory name: (A, B, its rounded rest as stored: (packed codes, scales, bits), or None)}
    of an elastic checkpoint trained with a full budget's delta,
    and {in-memory name: tensor} of the smaller budgets' own embeddings and norms where the full budget keeps
    the parent's (delta.py), for a spec smaller than the parent; ({}, {}) otherwise (the full budget is the
    stored weights as they are)."""
    from .delta import ROUNDED, ROUNDED_SCALE, SHARED, read_delta_file, stored_pairs
    from .manifest import DELTA_FILE, read_manifest

    if not (parent_dir / "manifest.json").is_file() or spec.keeps_parent(parent):
        return {}, {}
    if not read_manifest(parent_dir).get("full_delta"):
        return {}, {}
    stored, _, bits = read_delta_file(parent_dir / DELTA_FILE)
    shared = {k.removesuffix(SHARED): t for k, t in stored.items() if k.endswith(SHARED)}
    # packed as stored (a few bits a weight), made dense one tensor at a time as the slicer writes it
    rests = {k.removesuffix(ROUNDED): (t, stored[k.removesuffix(ROUNDED) + ROUNDED_SCALE], bits)
             for k, t in stored.items() if k.endswith(ROUNDED)}
    # a linear layer's under its weight's name; the routed experts' (A (E, r, in)) under their tensors' own
    return {name if pair[0].dim() == 3 else f"{name}.weight": (*pair, rests.get(name))
            for name, pair in stored_pairs(stored).items()}, shared


def _without_delta(reader: "_Reader", it: _Item, cfg: ModelConfig, delta: tuple) -> torch.Tensor:
    """`it`'s output tensor from the stored W + B A (+ R, the rounded rest): the kept block minus B's kept rows
    times A's kept columns (and R's kept block), in float32, back in the stored dtype (the whole tensor when `take`
    does more than pick). An expert's tensor: its own A and B, row `it.row` of the stacked ones."""
    from .rounding import rest_dense, unpack_codes

    down, up, rest = delta
    if rest is not None:  # linear layers alone have one
        packed, scales, bits = rest
        rest = rest_dense(unpack_codes(packed, bits), scales.float(), bits)
    if it.mode != "plain":  # as `take` sees the expert: a stack of one
        down, up = down[it.row:it.row + 1], up[it.row:it.row + 1]
    if it.keep is None:
        whole = reader.whole(it)
        own = up.float() @ down.float() + (0 if rest is None else rest)
        t = take(it.name, (whole.float() - own).to(whole.dtype), cfg, it.idx)
        return (t if it.mode == "plain" else t[0]).contiguous()
    t = reader.tensor(it, cfg)
    rows, cols = it.keep[-2:]
    up = up if rows is None else up[..., rows, :]
    down = down if cols is None else down[..., cols]
    bd = up.float() @ down.float()
    if rest is not None:
        bd = bd + (rest if rows is None else rest[rows])[:, cols if cols is not None else slice(None)]
    return (t.float() - (bd if it.mode == "plain" else bd[0])).to(t.dtype)


def output_bytes(parent_dir, spec: ElasticSpec | dict, dtype: torch.dtype | None = None) -> int:
    """Bytes of tensor data `stream_slice` would write for `spec` (from the headers alone)."""
    parent_dir = Path(parent_dir)
    if isinstance(spec, dict):
        spec = ElasticSpec.from_dict(spec)
    _check_dtype(dtype)
    raw, parent = _parent_config(parent_dir)
    return sum(it.nbytes for it in _plan_items(parent_dir, parent, spec, dtype, raw))


__all__ = ["output_bytes", "stream_slice", "take_quantized"]
