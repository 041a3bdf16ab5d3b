"""What every benchmark shares: the device set-up, the machine's name, a clock that waits for the
GPU, a median timer on that clock, JSON written whole, and what model FLOP utilisation is counted
against (the H200's bf16 peak and HBM bandwidth, Nemotron 3 Nano's widths, the parameters a token multiplies through). Benchmarks import it as `common` (run
from anywhere as `python benchmarks/NAME.py`: Python puts the script's folder on the path)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from star_elastic.model import Model, ModelConfig

BF16_PEAK = 790e12  # H200 dense bf16 matmul, as measured on the device machines (an 8192^3 matmul on random data)
HBM_GBS = 4800.0  # H200 HBM3e bandwidth, GB/s: the bound a memory-bound decode step is held against
HBM_GBS_BY_CARD = {"H100": 3350.0, "H200": 4800.0}  # SXM cards' HBM bandwidth, GB/s, by a word of their name


# Nemotron 3 Nano's 52 layers (its hybrid_override_pattern): 23 Mamba, 23 MoE, 6 attention; with nano_config
# 31.58B parameters, 3.23B active (issue 14's parent)
NANO_LAYERS = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def nano_config(layers: str = NANO_LAYERS) -> ModelConfig:
    """Nemotron 3 Nano's widths (hidden 2688, 128 experts top-6, 64 Mamba heads x 64, state 128, 32 / 2
    attention heads x 128, vocabulary 131,072) with the layers `layers` (M Mamba, E MoE, * attention)."""
    return ModelConfig(vocab_size=131072, hidden_size=2688, layer_types=layers, num_attention_heads=32,
                       num_key_value_heads=2, head_dim=128, mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128,
                       n_groups=8, chunk_size=128, n_routed_experts=128, num_experts_per_tok=6,
                       moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5)


def smollm2_config() -> ModelConfig:
    """SmolLM2-135M's shapes (random weights when built): the parent of bench_elastic.py's part A."""
    return ModelConfig(family="llama", vocab_size=49152, hidden_size=576, layer_types="*" * 30, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, intermediate_size=1536, mlp_gated=True, mlp_act="silu",
                       rope_theta=100000.0, tie_word_embeddings=True)


def scaled_normal_(model: Model) -> Model:
    """Every matrix of `model` (and every higher-dimensional tensor) drawn from N(0, 1 / its last dim): O(1)
    activations everywhere, like a trained model's, for benchmarks on random weights."""
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return model


def active_params(cfg: ModelConfig, model: Model) -> float:
    """Parameters one token multiplies through: all but the embedding table (a lookup) and the
    unchosen experts (an untied LM head counts)."""
    routed = sum(p.numel() for k, p in model.named_parameters() if ".experts." in k and "shared" not in k)
    total = sum(p.numel() for p in model.parameters())
    embed = 0 if cfg.tied else model.embed.weight.numel()  # tied: the table is the LM head, counted once
    return total - embed - routed * (1 - cfg.num_experts_per_tok / max(1, cfg.n_routed_experts))


def step_weight_bytes(cfg: ModelConfig, model: Model, batch: int = 1) -> float:
    """Bytes of weights one decode step over `batch` sequences reads, each weight once: every parameter but the
    embedding table (a lookup; tied, it is the LM head, read once), and of each MoE layer's E routed experts the
    share that `batch` tokens choosing top-k reach, 1 - (1 - k / E) ** batch if routing is uniform (k / E at
    batch 1, as `active_params` counts). E is read from each layer's expert tensors, so a budget's view counts
    the experts it keeps. The memory-bandwidth bound of a decode step is this over the HBM bandwidth."""
    from star_elastic.model import Experts

    total = sum(p.numel() for p in model.parameters())
    embed = 0 if cfg.tied else model.embed.weight.numel()
    routed = read = 0.0
    for m in model.modules():
        if isinstance(m, Experts):
            n, e = m.up_proj.numel() + m.down_proj.numel(), m.up_proj.shape[0]
            routed += n
            read += n * (1 - (1 - min(cfg.num_experts_per_tok, e) / e) ** batch)
    return (total - embed - routed + read) * model.lm_head.weight.element_size()


def step_state_bytes(model: Model, batch: int) -> float:
    """Bytes of Mamba's fp32 SSM state one decode step over `batch` sequences must move at least: each Mamba
    layer's (batch, heads, head_dim, state) read once and written once. A budget's view counts its kept heads.
    At Nano's widths and B = 32, 134 MB a layer: a few percent of a step's weights, but what a step that reads the
    state more than once loses (docs/RESULTS.md, the batch-32 step kernel by kernel)."""
    from star_elastic.model import Mamba2

    return float(sum(2 * batch * m.num_heads * m.head_dim * m.state_size * 4
                     for m in model.modules() if isinstance(m, Mamba2)))


@contextmanager
def environment(values: dict[str, str]):
    """The environment variables `values` set for the block, then put back as they were (star_elastic's kernel
    switches are read from the environment at each call)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def setup(device: str | None, seed: int = 0, deterministic: bool = True) -> torch.device:
    """The device asked for (default: CUDA when there is one), seeded; on a GPU deterministic
    algorithms are requested (warn-only) with the cuBLAS workspace they need, unless `deterministic`
    is False: speed benchmarks time what training and serving run (and mamba_ssm picks its Triton
    configurations by that flag when imported)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before first use
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    return dev


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def hbm_gbs(device: torch.device) -> float:
    """The peak memory bandwidth (GB/s) of `device`'s card, by its name (an H100 3,350, an H200 4,800), else
    HBM_GBS: a decode step's share of the bound is held against the card it ran on."""
    name = machine(device) if device.type == "cuda" else ""
    return next((gbs for card, gbs in HBM_GBS_BY_CARD.items() if card in name), HBM_GBS)


def bandwidth_share(nbytes: float, seconds: float, gbs: float) -> float:
    """The share of a card's memory bandwidth (`gbs`, GB/s) that moving `nbytes` in `seconds` uses: a
    memory-bound step's distance from its bound."""
    return nbytes / seconds / (gbs * 1e9)


def clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn, device: torch.device, warmup: int = 0, iters: int = 1) -> float:
    """Median seconds of one call of `fn` (the upper middle of an even count) after `warmup` untimed
    calls, each call timed on `clock` (the GPU's queued work included)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = clock(device)
        fn()
        times.append(clock(device) - t0)
    return sorted(times)[len(times) // 2]


# what a compute-operator count leaves out: no kernel behind these (allocations, aliases, reading a scalar)
NO_KERNEL = {"empty", "empty_strided", "resize_", "detach", "lift_fresh", "alias", "_unsafe_view",
             "_local_scalar_dense"}


def decode_ops(model: Model, ids: torch.Tensor) -> Counter:
    """The operators that compute (no views, no allocations) in one decode token of `generate` (eager, no CUDA graph:
    a graph's replay hides them), by name: a count of the kernels a step launches where each operator is one (on
    CUDA; on the CPU torch's rms_norm is written out). The difference of three and two new tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from star_elastic.generate import generate

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if not func.is_view and name not in NO_KERNEL:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (2, 3):
        with Count() as c:
            generate(model, ids, n, use_graph=False)
        counts.append(c.ops)
    return counts[1] - counts[0]


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the process exits, however it exits: a benchmark that builds a Nano-sized
    checkpoint and its slices writes ~13 GB there, and a few left behind filled the GPU machine's disk."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def write_json(path, data: dict, indent: int = 2, default=None) -> None:
    """`data` as indented JSON at `path` (folders made), written to a temporary file and renamed.
    `default` is json.dumps's: what to write for values JSON has no type for (e.g. `str`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=default) + "\n")
    tmp.replace(path)


def write_safetensors(path, tensors: dict) -> None:
    """`tensors` as safetensors at `path` (folders made), written to a temporary file of this process's and
    renamed (two runs side by side writing the same file leave one whole copy)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def fingerprint(tokens) -> str:
    """A short hash of token ids: a (n,) or (rows, n) tensor, or chat transcripts ((ids, prompt_len) each). Two
    runs whose held-out (or anchor) fingerprints differ read different text, whatever their seeds say."""
    h = hashlib.sha256()
    for ids, start in (tokens if isinstance(tokens, list) else [(tokens, 0)]):
        h.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        h.update(str(start).encode())
    return h.hexdigest()[:16]


def free_port() -> int:
    """A free TCP port on localhost: a server's, or a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
