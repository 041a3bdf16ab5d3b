"""Sharded data parallelism (FSDP2) for elastic training, applied from outside the model, torchtitan
style: the model code knows nothing of it (docs/METHOD.md §9).

`shard_model` wraps every decoder block, then the root (embeddings, final norm, LM head), with
`torch.distributed.fsdp.fully_shard`: each rank keeps 1/N of every parameter (a `DTensor`, sharded
on dim 0), and so 1/N of the optimiser state built over them; a block's parameters are all-gathered
just before its forward (and again for its backward) and freed after; gradients are reduce-scattered
(averaged over the ranks) in the backward. The rest of this module moves whole tensors in and out
of sharded modules: `full_state_dict` gathers them tensor by tensor (every rank takes part, one rank
may keep them), `load_full_state_dict` copies whole tensors into the shards, `unsharded_copy`
rebuilds a plain model.

A parent too big for one device is never built whole: `meta_sharded` builds it on the meta device,
shards it as `shard_model` does and allocates only each rank's own shards; `local_rows` says which
rows of a whole tensor a rank holds, so that they can be read straight from a checkpoint
(sharded_load.py) or initialised as the constructor would (`init_sharded_`).

Masks (elastic/masking.py) are hooks and in-place class swaps of the modules, holding no parameters:
FSDP does not manage them, and they work on a sharded model as on a whole one.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from .model import Block, LlamaLayer, Model, ModelConfig, RMSNorm, rope_frequencies

try:  # torch >= 2.6 exports these publicly
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - a torch without FSDP2
    FSDPModule = MixedPrecisionPolicy = fully_shard = DTensor = distribute_tensor = None


def available() -> bool:
    return fully_shard is not None and dist.is_available()


def mixed_precision_policy(mixed_precision: bool):
    """A decoder block's: bf16 compute (parameters all-gathered in bf16), fp32 master weights and
    gradient reductions; or the stored dtype everywhere. Forward inputs are never cast: the residual
    stream keeps the dtype the embeddings give it (see `shard_model`)."""
    if not mixed_precision:
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def device_mesh(device: torch.device):
    """The 1-D mesh of all ranks on `device`'s type (cuda: one GPU per rank; cpu: gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: Model, *, mixed_precision: bool, reshard_after_forward: bool = True, mesh=None) -> Model:
    """Shard `model` in place over all ranks: each decoder block is one FSDP unit, the root holds the
    embeddings, the final norm and the LM head (tied ones too). Frozen parameters (a teacher's) stay
    frozen: FSDP shards them and no optimiser sees them. Create optimisers after this call.

    `mixed_precision` (for a GPU, with the trainer's bf16 autocast): the blocks' parameters are
    gathered in bf16 and their gradients reduced in fp32, while the root's are gathered in their
    stored dtype. So the embeddings of an fp32 student give an fp32 residual stream, which the blocks
    add their (autocast bf16) updates to, as the replicated path does; the LM head's matmul runs in
    bf16 under autocast either way. `reshard_after_forward`: free each block's gathered parameters
    after its forward (gather again for the backward), the least memory; False keeps them until the
    backward. A model built sharded (`meta_sharded`) is returned as it is, if sharded with this policy."""
    if not available():
        raise RuntimeError("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    if not dist.is_initialized():
        raise RuntimeError("sharding needs torch.distributed initialised (launch with torchrun)")
    if is_sharded(model):  # built sharded (meta_sharded, sharded_load.load_sharded): keep it if it matches
        if getattr(model, "fsdp_mixed_precision", mixed_precision) != mixed_precision:
            raise RuntimeError(f"the model is already sharded with mixed_precision={model.fsdp_mixed_precision}, "
                               f"not {mixed_precision}")
        return model
    # A hard-dropped layer (elastic/masking.py, depth 0) returns its input, which FSDP's forward hooks
    # have made a view: FSDP warns that an in-place op on it would skip its backward hook. The model
    # never changes a block's output in place (gradients equal the unsharded model's, tests/test_fsdp.py).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(Block|LlamaLayer)\) returned a view")
    policy = mixed_precision_policy(mixed_precision)
    if mesh is None:
        mesh = device_mesh(next(model.parameters()).device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    root = MixedPrecisionPolicy(reduce_dtype=torch.float32 if mixed_precision else None, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root, reshard_after_forward=reshard_after_forward)
    model.fsdp_mixed_precision = mixed_precision  # for a second call (the trainer's, on a model built sharded)
    return model


def world() -> tuple[int, int]:
    """(this rank, the number of ranks): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(module: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(module, FSDPModule)


def reshard(model: nn.Module) -> nn.Module:
    """Every FSDP2 unit of `model` back to its shards (no communication). The root stays gathered after a
    forward (the trainer's `reshard_after_forward=False`), its parameters then whole tensors that a later
    state_dict frees: code that holds parameters across such a call (FullDelta.merged) reshards first."""
    for m in model.modules():
        if is_sharded(m):
            m.reshard()
    return model


def compute_autocast(model: nn.Module):
    """The autocast a forward outside the trainer needs on `model`: bf16 where it was sharded with
    mixed precision (its blocks' parameters are gathered in bf16 while the residual stream keeps the
    stored dtype, so a plain forward would multiply fp32 activations by bf16 weights), else none."""
    mixed = is_sharded(model) and getattr(model, "fsdp_mixed_precision", False)
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=mixed)


def is_dtensor(t) -> bool:
    """Whether `t` is a shard (DTensor) of a whole tensor, which only a collective can gather."""
    return DTensor is not None and isinstance(t, DTensor)


def all_ok(ok: bool, like: torch.Tensor) -> bool:
    """Whether `ok` holds on every rank of the mesh `like` (a DTensor) is sharded over: a collective,
    so that a rank that failed alone does not leave the others waiting in the next one."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=like.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=like.device_mesh.get_group())
    return bool(flag.item())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no communication; in-place changes reach the DTensor), or `t`."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it), or `t` itself."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor that every rank holds) as a tensor placed like `like`: this rank's
    shard of it when `like` is a DTensor (no communication), else `full` on like's device."""
    if DTensor is not None and isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.device)


def full_state_dict(model: nn.Module, rank0_only: bool = True, cpu: bool = True) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with whole tensors, gathered one at a time (every rank must call it).
    With `rank0_only`, the other ranks drop each tensor once gathered and get {}; `cpu` moves the
    kept tensors to the host as they come, so the whole model is never on one GPU."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for k, v in model.state_dict().items():
        v = full_tensor(v.detach())
        if rank0_only and rank != 0:
            continue
        out[k] = v.contiguous().cpu() if cpu else v
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Copy whole tensors (every rank holds all of `weights`) into `model`, sharded or not: a sharded
    parameter takes its own shard. Strict: the keys must be the model's."""
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in own.items():
        t.copy_(shard_like(weights[k].to(t.dtype), t))


def unsharded_copy(model: Model) -> Model:
    """A plain `Model` (same config, device and dtype) holding the whole weights of a sharded one;
    every rank gets one (a collective). The sharded model is left as it is."""
    p = next(model.parameters())
    device = p.device
    weights = full_state_dict(model, rank0_only=False, cpu=False)
    with torch.device(device):
        plain = Model(model.config)
    plain.to(p.dtype)
    plain.load_state_dict(weights)
    return plain.train(model.training)


# ----------------------------------------------------------------------------- built sharded

def default_device() -> torch.device:
    """This rank's device as train.init_distributed picks it: its GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def meta_sharded(cfg: ModelConfig, dtype: torch.dtype, device=None, *, mixed_precision: bool = False,
                 reshard_after_forward: bool = True, mesh=None) -> Model:
    """`Model(cfg).to(dtype)` sharded by `shard_model`, without ever existing whole: built on the meta
    device, sharded there, then each rank allocates its own shards (and the small unsharded buffers)
    on `device`, uninitialised: fill them with `copy_rows_` (from a checkpoint: sharded_load.py) or
    `init_sharded_`. The rotary `inv_freq`, the one buffer that no checkpoint holds, is rebuilt here
    as `hf.load` builds it."""
    device = torch.device(device) if device is not None else default_device()
    with torch.device("meta"):
        model = Model(cfg)
    model.to(dtype)  # as Model.to casts it: the MoE router stays float32 (model.TopkRouter._apply)
    unknown = {n for n, _ in model.named_buffers()} - set(model.state_dict()) - {"inv_freq"}
    if unknown:  # a new non-persistent buffer would come out as uninitialised memory: say so
        raise RuntimeError(f"meta_sharded does not know how to rebuild the buffer(s) {sorted(unknown)}")
    # the mesh comes from `device`: the model's own parameters are on the meta device
    shard_model(model, mixed_precision=mixed_precision, reshard_after_forward=reshard_after_forward,
                mesh=mesh if mesh is not None else device_mesh(device))
    model.to_empty(device=device)  # FSDP2 re-pads each rank's shard into its new storage; ties survive
    if model.inv_freq is not None:
        model.inv_freq = rope_frequencies(cfg).to(device=device, dtype=dtype)
    return model


def local_rows(n: int, ranks: int, rank: int) -> slice:
    """The rows of dim 0 (of n) that `rank` of `ranks` holds under Shard(0): torch.chunk's split, as
    FSDP2 and `distribute_tensor` cut it (chunks of ceil(n / ranks) rows; the last ranks may hold
    fewer, or none, and FSDP2 pads them)."""
    size = -(-n // ranks)
    start = min(rank * size, n)
    return slice(start, min(start + size, n))


def rows_of(t: torch.Tensor) -> slice:
    """The rows of the whole tensor that this rank holds of `t`: its shard's for a DTensor (sharded
    on dim 0 over a 1-D mesh, as `shard_model` shards), all of them for a plain tensor."""
    if DTensor is None or not isinstance(t, DTensor):
        return slice(None)
    (placement,) = t.placements
    if not (placement.is_shard() and placement.dim == 0):
        raise RuntimeError(f"expected a DTensor sharded on dim 0, got placement {placement}")
    mesh = t.device_mesh
    return local_rows(t.shape[0], mesh.size(), mesh.get_local_rank())


@torch.no_grad()
def copy_rows_(t: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy `rows` (the rows `rows_of(t)` of the whole tensor, any dtype) into this rank's part of
    `t`, cast to t's dtype."""
    part = local(t)
    if part.shape != rows.shape:
        raise RuntimeError(f"a shard of shape {tuple(part.shape)} cannot take rows of shape {tuple(rows.shape)}")
    part.copy_(rows)


def constructor_units(cfg: ModelConfig):
    """(prefix, build) of each piece of `Model(cfg)`, in the order its constructor builds them and so
    draws its random numbers: embeddings, every layer, the final norm, the LM head."""
    llama = cfg.family == "llama"
    yield ("model.embed_tokens." if llama else "model.embeddings."), lambda: nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    for i, kind in enumerate(cfg.layer_types):
        yield f"model.layers.{i}.", (lambda i=i, kind=kind: LlamaLayer(cfg.layer(i)) if llama
                                     else Block(cfg.layer(i), kind))
    yield ("model.norm." if llama else "model.norm_f."), lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps)
    yield "lm_head.", lambda: nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


@torch.no_grad()
def init_sharded_(model: Model, seed: int, build_device=None) -> Model:
    """Fill a `meta_sharded` model with the weights `torch.manual_seed(seed)` then `Model(cfg)` on
    `build_device` gives (default: the shards' device), exactly: each piece is built whole in the
    constructor's order, one at a time (the largest, a layer, is the most ever whole), and each rank
    keeps its own rows. Every rank draws the same numbers, so the shards are of one model."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())  # a tied LM head: the embeddings' name only
    device = build_device or next(model.parameters()).device
    torch.manual_seed(seed)
    for prefix, build in constructor_units(model.config):
        with torch.device(device):
            unit = build()
        for name, v in unit.state_dict().items():
            t = own.get(prefix + name)
            if t is not None:
                copy_rows_(t, v[rows_of(t)])
        del unit
    return model
