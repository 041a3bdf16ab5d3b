"""Autoregressive generation with static caches: prefill once, then one token per step.

On a GPU the one-token step is captured once as a CUDA graph and replayed (gpt-fast's trick
without a compiler): every step runs the same kernels on the same buffers, so the launch cost
of a few hundred small kernels per token disappears.
"""

from __future__ import annotations

import torch

from .errors import StarElasticError
from .model import Model


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """logits (b, vocab) -> token ids (b,). temperature 0 is greedy; top_p < 1 keeps the nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def capture_graph(run, capture_error_mode: str = "global"):
    """(CUDA graph, its output) of `run()`: two warm-up calls on a side stream (allocator and library
    handles), then the capture. Whatever `run` writes, warm-up and capture write too."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        out = run()
    return graph, out


# inductor's options for a one-token step of one row (what `compile=True` compiles at batch 1, or `compile="gemv"` at
# any): under coordinate descent tuning it writes each product with one row (M = 1) as a multiply-and-sum reduction
# that it tunes, where by default it calls a cuBLAS GEMV (inductor's own note on it: "our matrix vector multiplies
# only achieve peak bandwidth with coordinate descent tuning"), and the MoE decode's expert gather
# (model.Experts.gathered) folds into that reduction rather than copying the chosen experts first. gpt-fast decodes
# this way. Measured on an H100 at Nano width, batch 1: the full model's decode steps at 70% of the HBM bound, 1.33x
# inductor's defaults (52%); compiling takes longer (each kernel timed in a few configurations). docs/RESULTS.md,
# "Batch-1 decode at the bandwidth bound".
GEMV_OPTIONS = {"coordinate_descent_tuning": True}


def compile_options(compile: bool | str, batch: int = 1) -> dict | None:
    """torch.compile's inductor options for a decode step of `batch` rows under generate's `compile`: True,
    GEMV_OPTIONS at batch 1 (one-row products) and inductor's defaults above; "gemv" GEMV_OPTIONS at any batch;
    "default" inductor's defaults at any batch; anything else is a one-line error."""
    if compile is True:
        return GEMV_OPTIONS if batch == 1 else None
    if compile == "gemv":
        return GEMV_OPTIONS
    if compile == "default":
        return None
    raise StarElasticError(f"compile={compile!r}: use True (GEMVs tuned at batch 1), 'gemv' (tuned at any batch) "
                           "or 'default' (inductor's defaults)")


class DecodeStep:
    """model(token, cache, pos) for one token, replayed from a CUDA graph when on a GPU."""

    def __init__(self, model: Model, cache, batch: int, use_graph: bool | None = None, compile: bool | str = False):
        self.model, self.cache = model, cache
        # torch.compile fuses the many small elementwise kernels of a one-token step; the CUDA
        # graph (ours, below) then removes the launch cost of what remains.
        if compile:
            # Blocks share one forward code object; each kind/shape/mode is a dynamo cache entry, and
            # the default limit of 8 (shared with any training compile) would silently fall back to eager.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.forward = torch.compile(model, dynamic=False, options=compile_options(compile, batch)) if compile else model
        device = model.lm_head.weight.device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        if use_graph is None:
            use_graph = device.type == "cuda"
        if use_graph:
            self._capture()

    def _run(self):
        return self.forward(self.token, self.cache, self.pos, last_only=True)

    def _capture(self):
        # warm-up and capture write into the cache, which is zeroed afterwards, before the caller's prefill
        self.graph, self.logits = capture_graph(self._run)
        for buf in self.cache.buffers():  # forget what warm-up and capture wrote
            buf.zero_()

    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        self.token.copy_(token.view(-1, 1))
        self.pos.fill_(pos)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


def forget_decode_steps(model: Model):
    """Drop `model`'s captured decode steps (and their caches). A graph replays the kernels, modules
    and tensors it was captured with: whatever changes how the model computes (masks applied or
    removed, elastic/masking.py; the serving head order, serve/order.py) calls this."""
    model.__dict__.pop("_decode_steps", None)


EOS_CHECK_EVERY = 8  # generate's steps between reads of whether every row is done


def _decoder(model: Model, batch: int, length: int, use_graph: bool | None, compile: bool | str = False):
    """Caches and a captured decode step, kept on the model and reused by later calls of the same
    batch size and length bucket (capturing costs a few forward passes; replaying is free) until
    `forget_decode_steps`."""
    max_len = -(-length // 256) * 256
    steps = model.__dict__.setdefault("_decode_steps", {})
    key = (batch, max_len, use_graph, compile, model.lm_head.weight.dtype, model.lm_head.weight.device)
    if key not in steps:
        while len(steps) >= 2:  # bound the memory held by idle caches
            steps.pop(next(iter(steps)))
        steps[key] = DecodeStep(model, model.make_cache(batch, max_len), batch, use_graph, compile)
    step = steps[key]
    for buf in step.cache.buffers():  # a fresh sequence: empty Mamba states (stale KV is masked anyway)
        buf.zero_()
    return step.cache, step


@torch.no_grad()
def generate(model: Model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id=None, generator: torch.Generator | None = None,
             use_graph: bool | None = None, compile: bool | str = False, on_token=None) -> torch.Tensor:
    """Continue `input_ids` (b, t) by up to `max_new_tokens`; returns (b, t + n) with the prompt.

    Stops early once every row has produced an EOS token (rows that finish first are padded with
    EOS). `on_token(ids)` is called with each new (b,) tensor, for streaming; if it returns True,
    generation stops after that token (a stop string or marker seen). `compile` fuses the
    decode step with torch.compile (worth it for long or repeated generation on a GPU): True with
    its one-row products tuned as reductions at batch 1 (GEMV_OPTIONS) and inductor's defaults above,
    "gemv" tuned at any batch, "default" inductor's defaults at any batch."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    if t == 0:
        raise ValueError("generate: the prompt has no tokens (give at least one, e.g. the BOS token)")
    if max_new_tokens <= 0:
        return input_ids
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       dtype=torch.long, device=device)
    cache, step = _decoder(model, b, t + max_new_tokens, use_graph, compile)
    logits = model(input_ids, cache, torch.arange(t, device=device), last_only=True)
    out, done = [input_ids], torch.zeros(b, dtype=torch.bool, device=device)
    finished = []  # done.all() after each token, read EOS_CHECK_EVERY at a time (below)
    for i in range(max_new_tokens):
        token = sample(logits[:, -1], temperature, top_p, generator)
        if len(eos):
            token = torch.where(done, eos[0], token)
            done = done | torch.isin(token, eos)
        out.append(token[:, None])
        if on_token is not None and on_token(token):
            break
        if i == max_new_tokens - 1:
            break
        if len(eos):
            # Reading whether every row is done waits for the step that made this token, and the device
            # then idles while the host queues the next one. Streaming (on_token) has waited for the token
            # already, so it reads it now; otherwise the flags are read a few steps at a time and the rows'
            # EOS padding computed past the end is cut: the same output, one wait in EOS_CHECK_EVERY.
            finished.append(done.all())
            if on_token is not None or len(finished) == EOS_CHECK_EVERY:
                flags = torch.stack(finished).tolist()
                finished.clear()
                if any(flags):
                    del out[len(out) - len(flags) + flags.index(True) + 1:]
                    break
        logits = step(token, t + i)
    if finished:  # the last flags not yet read (the token limit came first)
        flags = torch.stack(finished).tolist()
        if any(flags):
            del out[len(out) - 1 - len(flags) + flags.index(True) + 1:]
    return torch.cat(out, dim=1)


@torch.no_grad()
def sample_rows(model: Model, rows: int, length: int, batch_size: int = 64, temperature: float = 1.0,
                seed: int = 0, progress: bool = False, prefix: list[int] | None = None,
                use_graph: bool | None = None) -> torch.Tensor:
    """(rows, length) token ids sampled from `model` itself, each row from a first token drawn uniformly
    from the vocabulary, then at `temperature` (LLM-QAT's data-free recipe, Liu et al. 2023): text from
    the model's own distribution, on whatever it knows, for distilling it where no such text is at hand
    (`elastify --anchor-data self`). With `prefix`, every row opens with those tokens instead (a chat
    template's opening: conversations in the model's own words, `--anchor-data chat`). Sampling runs past
    end-of-text tokens, as packed rows do."""
    from tqdm.auto import tqdm

    device = model.lm_head.weight.device
    first = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    out = []
    for lo in tqdm(range(0, rows, batch_size), desc="sampling anchor text", unit="batch", disable=not progress):
        n = min(batch_size, rows - lo)
        start = (torch.tensor([prefix] * n, dtype=torch.long) if prefix else
                 torch.randint(model.config.vocab_size, (n, 1), generator=first))
        out.append(generate(model, start, length - start.shape[1], temperature=temperature, generator=noise,
                            use_graph=use_graph).cpu())
    return torch.cat(out) if out else torch.empty(0, length, dtype=torch.long)
