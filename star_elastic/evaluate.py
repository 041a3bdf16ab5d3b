"""Perplexity on a token stream.

How text is scored: documents are tokenized one by one, each followed by the document
separator (see `data.tokenize_documents`), and concatenated. The stream is cut into
non-overlapping windows of `seq_len` tokens (the last, shorter window is kept). No BOS is
inserted at window starts; inside each window every token but the first is predicted from the
tokens before it in that window. So `tokens` = stream length minus the number of windows.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _logits(model, ids):
    out = model(ids)
    return out if torch.is_tensor(out) else out.logits


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int = 1024, batch_size: int = 4,
               max_tokens: int | None = None, progress: bool = True, device=None) -> dict:
    """Perplexity of `model` (ours, or any callable returning logits / an object with .logits)."""
    if stream.dim() != 1 or stream.numel() < 2:
        raise ValueError("perplexity needs a 1-D stream of at least 2 tokens")
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if device is None:
        device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    n_full = stream.numel() // seq_len
    windows = [stream[: n_full * seq_len].view(n_full, seq_len)] if n_full else []
    if stream.numel() % seq_len > 1:
        windows.append(stream[n_full * seq_len:][None])
    batches = [w[i: i + batch_size] for w in windows for i in range(0, w.shape[0], batch_size)]
    nll, count = 0.0, 0
    bar = tqdm(batches, desc="perplexity", unit="batch",
               disable=not progress or bool(os.environ.get("STAR_ELASTIC_QUIET")))
    for ids in bar:
        ids = ids.to(device)
        logits = _logits(model, ids)[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": sum(w.shape[0] for w in windows), "seq_len": seq_len}
