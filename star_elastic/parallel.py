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

Masks (elastic/masking.py) are hooks and in-place class swaps of the modules, holding no parameters:
FSDP does not manage them, and they work on a sharded model as on a whole one.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from .model import Model

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
    backward."""
    if not available():
        raise RuntimeError("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    if not dist.is_initialized():
        raise RuntimeError("sharding needs torch.distributed initialised (launch with torchrun)")
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
    return model


def is_sharded(module: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(module, FSDPModule)


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
