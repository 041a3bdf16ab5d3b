"""A Hugging Face checkpoint loaded straight into FSDP2 shards: the parent is never whole on any
device or host (issue 11). The model is built on the meta device and sharded (parallel.meta_sharded),
then each rank reads from the safetensors files only the rows of every tensor that its shards hold
(`safe_open(...).get_slice(name)[start:stop]`), in the requested dtype.

What comes out equals `hf.load(path, dtype, device)` followed by `parallel.shard_model`, tensor for
tensor: the same names (transformers' own, so every tensor has one place on disk), the same tied
embeddings, the same buffers. One difference: loaded into a lower precision than stored, the MoE
router (kept in float32) takes the stored values, where `Model.to` rounds it through that precision
first. Before any data is read, the same checks as `hf.load` run on the config and the headers
(missing, unexpected or misshapen tensors, truncated files): one line each.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from . import fp8, hf, parallel
from .errors import StarElasticError
from .hf_files import _weight_files, safetensors_header
from .model import Model, ModelConfig

# safetensors' dtype codes of the floating-point dtypes a model is stored in
STORED = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_sharded(path, dtype: torch.dtype | None = None, device=None, *, mixed_precision: bool = False,
                 reshard_after_forward: bool = True, mesh=None) -> Model:
    """Load the checkpoint directory `path` sharded over all ranks (a collective: every rank calls
    it, under torch.distributed) into `dtype` (None: the dtype the embeddings are stored in) on
    `device` (None: this rank's GPU, else the CPU). The sharding arguments are `shard_model`'s; the
    trainer takes the model as it is when they match its own (TrainConfig.shard="fsdp")."""
    path = Path(path)
    raw, cfg, meta, where, dtype = open_checkpoint(path, dtype, "sharded")
    if not (parallel.available() and dist.is_initialized()):
        raise StarElasticError("loading sharded needs torch.distributed initialised (torchrun) and a torch with FSDP2")
    model = parallel.meta_sharded(cfg, dtype, device, mixed_precision=mixed_precision,
                                  reshard_after_forward=reshard_after_forward, mesh=mesh)
    fill_on_every_rank(model, lambda: fill(model, where), path)
    model.hf_config = fp8.saved_config(raw, dtype)
    model.source = str(path)
    return model.eval()


def open_checkpoint(path: Path, dtype: torch.dtype | None, how: str):
    """(raw config, ModelConfig, meta model, tensor locations, dtype) of the checkpoint directory
    `path`, after `hf.load`'s checks on the config and headers, before any data is read. `dtype` None:
    the dtype the embeddings are stored in. `how` ("sharded", "sorted") names the load in errors."""
    if not path.is_dir():
        raise StarElasticError(f"{path}: expected a checkpoint directory (config.json + safetensors); "
                               "GGUF files are loaded whole, by hf.load")
    raw, cfg, headers, meta = hf._open(path, hf.header_tensors)  # names and shapes from the headers alone
    if fp8.is_fp8_config(raw):
        raise StarElasticError(f"{path}: FP8 checkpoints are not loaded {how} yet; convert it first "
                               "(star-elastic convert CKPT --dtype bfloat16 --out DIR)")
    hf.check_shapes(meta, headers, str(path))
    where = locations(_weight_files(path), cfg)
    if dtype is None:
        dtype = stored_dtype(where, meta, str(path))
    if fp8.is_fp8_dtype(dtype):
        raise StarElasticError(f"FP8 is a storage format: load {how} into the dtype the model computes in")
    return raw, cfg, meta, where, dtype


def fill_on_every_rank(model: Model, fill_rows, path: Path) -> None:
    """`fill_rows()` on this rank; if any rank could not read its rows, every rank raises (that rank its
    own error, the others one line), so none is left waiting in the next collective."""
    error = None
    try:
        fill_rows()
    except StarElasticError as e:
        error = e
    ok = parallel.all_ok(error is None, next(model.parameters()))
    if error is not None:
        raise error
    if not ok:
        raise StarElasticError(f"{path}: another rank could not read its shards of the weights (see its error)")


def locations(files: list[Path], cfg: ModelConfig) -> dict[str, list[tuple[Path, str, str]]]:
    """Where each of our tensors lies on disk: our name -> [(file, name in the file, dtype code)]: one
    entry, or for a NemotronH expert stack (E, ...) one per expert in order (hf.from_disk_layout's
    renaming: `backbone.` -> `model.`, `experts.{j}.up_proj.weight` -> row j of `experts.up_proj`)."""
    out, experts = {}, {}
    for f in files:
        for name, v in safetensors_header(f).items():
            if name.startswith("mtp."):  # multi-token prediction heads: not part of the model
                continue
            ours, m = name, None
            if cfg.family == "nemotron_h":
                ours = "model." + name[len("backbone."):] if name.startswith("backbone.") else name
                m = hf.EXPERT_KEY.match(ours)
            if m:
                experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = (f, name, v["dtype"])
            else:
                out[ours] = [(f, name, v["dtype"])]
    out.update({k: [parts[j] for j in sorted(parts)] for k, parts in experts.items()})
    return out


def stored_dtype(where: dict, model: Model, source: str) -> torch.dtype:
    """The dtype the embedding matrix is stored in: what the rest of an unquantised checkpoint is
    stored in too (but for a float32 router, which Model.to keeps in float32 anyway)."""
    code = where[f"model.{model.model.embed_name}.weight"][0][2]
    if code not in STORED:
        raise StarElasticError(f"{source}: embeddings stored as {code}: give the dtype to load into")
    return STORED[code]


@torch.no_grad()
def fill(model: Model, where: dict) -> None:
    """Copy into every parameter and persistent buffer of a `meta_sharded` model the rows that this
    rank holds, read from the files: each file opened once, a tensor's rows read alone (a tied LM
    head is the embeddings' parameter: named once, filled once)."""
    with ExitStack() as stack:
        opened = {}

        def rows(entry, sl: slice) -> torch.Tensor:
            f, name, _ = entry
            try:
                if f not in opened:
                    opened[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                return opened[f].get_slice(name)[sl] if sl is not None else opened[f].get_tensor(name)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise StarElasticError(f"{f}: cannot read tensor {name} ({str(e).splitlines()[0]})") from None

        persistent = model.state_dict().keys()
        for name, t in [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in persistent)]:
            sl = parallel.rows_of(t)
            if sl.stop is not None and sl.start == sl.stop:
                continue  # this rank's shard is empty (a short tensor over many ranks)
            entries = where[name]
            if len(entries) == 1:
                data = rows(entries[0], sl)
            else:  # an expert stack: this rank's experts, each whole
                data = torch.stack([rows(e, None) for e in entries[sl]])
            parallel.copy_rows_(t, data)
