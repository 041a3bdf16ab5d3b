"""A parent checkpoint loaded importance-sorted, straight into FSDP2 shards (issue 11): the function-
preserving sort (elastic/sort.py) without the whole model on any rank.

`sort_model` permutes whole tensors in place; a parent too big for one device cannot be whole
anywhere. Here the permutation is applied while reading: each rank reads from the safetensors files
only the source rows its shard of the *sorted* tensor comes from (`index_plan`'s dim 0, in any
order: consecutive rows are read together), then permutes the other dims of those rows. What comes
out equals `hf.load` + `sort_model` + `parallel.shard_model`, bit for bit, having read about 1/N of
the checkpoint per rank (tests/test_sharded_importance.py; one process: tests/test_sharded_sort.py). The loading itself is `sharded_load.load_sharded`'s:
the same checks, the same model built on the meta device, the same tied embeddings and buffers.
Without torch.distributed the same code loads one plain, sorted model.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from . import fp8, parallel
from .elastic.sort import apply_plan, check_permutations, index_plan, permutations
from .errors import StarElasticError
from .model import Model, ModelConfig, rope_frequencies
from .sharded_load import fill_on_every_rank, open_checkpoint


def load_sorted(path, *, scores: dict | None = None, perms: dict | None = None, experts_key: str = "experts",
                dtype: torch.dtype | None = None, device=None, mixed_precision: bool = False,
                reshard_after_forward: bool = True, mesh=None) -> tuple[Model, dict[str, torch.Tensor]]:
    """Load the checkpoint directory `path` sorted by importance `scores` (as `sort_model` takes them,
    with `experts_key`) or by the permutations `perms` (as `sort_model` returns them): give one.
    Returns (model, the permutations applied).

    Under torch.distributed it is a collective (every rank calls it, with the same scores) and the
    model comes sharded by FSDP2, as `sharded_load.load_sharded` gives it (the sharding arguments are
    its); without, one plain model on `device`. dtype None: the dtype the embeddings are stored in."""
    if (scores is None) == (perms is None):
        raise StarElasticError("load_sorted takes importance scores or permutations: give exactly one")
    path = Path(path)
    raw, cfg, meta, where, dtype = open_checkpoint(path, dtype, "sorted")
    if scores is not None:
        perms = permutations(cfg, scores, experts_key)
    else:
        perms = {k: torch.as_tensor(v).detach().cpu() for k, v in perms.items()}
    check_permutations(cfg, perms)
    perms = {k: v.long() for k, v in perms.items()}
    if not (dist.is_available() and dist.is_initialized()):
        model = _meta_plain(cfg, dtype, device)
        fill_sorted(model, where, perms)
    else:
        if not parallel.available():
            raise StarElasticError("loading sharded needs a torch with FSDP2")
        model = parallel.meta_sharded(cfg, dtype, device, mixed_precision=mixed_precision,
                                      reshard_after_forward=reshard_after_forward, mesh=mesh)
        fill_on_every_rank(model, lambda: fill_sorted(model, where, perms), path)
    model.hf_config = fp8.saved_config(raw, dtype)
    model.source = str(path)
    return model.eval(), perms


def _meta_plain(cfg: ModelConfig, dtype: torch.dtype, device) -> Model:
    """`Model(cfg).to(dtype)` on `device`, uninitialised (for `fill_sorted`), as `parallel.meta_sharded`
    builds it but unsharded."""
    device = torch.device(device) if device is not None else parallel.default_device()
    with torch.device("meta"):
        model = Model(cfg)
    model.to(dtype)  # the MoE router stays float32
    model.to_empty(device=device)
    if cfg.tied:  # to_empty gives each module its own new tensor: tie the LM head again
        model.lm_head.weight = model.embed.weight
    if model.inv_freq is not None:  # non-persistent: in no checkpoint
        model.inv_freq = rope_frequencies(cfg).to(device=device, dtype=dtype)
    return model


def _read_rows(handle, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (of dim 0, in that order) of one stored tensor (`safe_open(...).get_slice(name)`),
    reading each run of consecutive rows with one slice: only the rows asked for are read."""
    order = rows.argsort(stable=True)
    s = rows[order].tolist()
    pieces, start = [], 0
    for k in range(1, len(s) + 1):
        if k == len(s) or s[k] != s[k - 1] + 1:  # a run ends
            pieces.append(handle[s[start]:s[k - 1] + 1])
            start = k
    return torch.cat(pieces)[order.argsort()]  # back into the order asked for


@torch.no_grad()
def fill_sorted(model: Model, where: dict, perms: dict[str, torch.Tensor]) -> None:
    """Copy into every parameter and persistent buffer of a model built on the meta device and
    allocated (sharded or not) the rows this rank holds of the parent's tensors sorted by `perms`,
    read from the files (`where`: `sharded_load.locations`): one tensor at a time, only the source
    rows of this rank's rows, then their other dims permuted (`elastic.sort.apply_plan`)."""
    cfg = model.config
    with ExitStack() as stack:
        opened = {}

        def read(entry, rows: torch.Tensor | None) -> torch.Tensor:  # rows None: the whole tensor
            f, name, _ = entry
            try:
                if f not in opened:
                    opened[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                if rows is None:
                    return opened[f].get_tensor(name)
                return _read_rows(opened[f].get_slice(name), rows)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise StarElasticError(f"{f}: cannot read tensor {name} ({str(e).splitlines()[0]})") from None

        persistent = model.state_dict().keys()
        for name, t in [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in persistent)]:
            sl = parallel.rows_of(t)
            mine = torch.arange(t.shape[0])[sl]  # this rank's rows of the sorted tensor
            if not len(mine):
                continue  # this rank's shard is empty (a short tensor over many ranks)
            plan = index_plan(name, cfg, perms)
            source = plan[0][mine] if 0 in plan else mine  # the parent rows they come from
            entries = where[name]
            if len(entries) == 1:
                data = read(entries[0], source)
            else:  # an expert stack stored one tensor per expert: this rank's experts, each whole
                data = torch.stack([read(entries[j], None) for j in source.tolist()])
            parallel.copy_rows_(t, apply_plan(data, plan, rows=source))
