"""Text files to token tensors: documents, a held-out split, packed windows and batches.

Held-out = a fixed, seeded selection of whole documents, never split mid-document, so no
held-out text leaks into training through a window that straddles the boundary.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from star_elastic.assets import resolve_text
from star_elastic.errors import StarElasticError

# Below this many documents a progress bar is just noise.
_PROGRESS_MIN_DOCS = 2000
_TOKENIZE_CHUNK = 1000


# --------------------------------------------------------------------------- reading

def _text_field(obj: dict, where: str):
    """The `text` field of a JSON object, else its first string-valued field.

    Returns None for a present-but-empty `text` (the record is skipped).
    """
    if "text" in obj:
        text = obj["text"]
        if text is None or isinstance(text, str):
            return text
        raise StarElasticError(f"{where}: field 'text' is {type(text).__name__}, not a string")
    for value in obj.values():
        if isinstance(value, str):
            return value
    raise StarElasticError(f"{where}: object has no string field (expected 'text')")


def _json_item_text(item, where: str):
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return _text_field(item, where)
    raise StarElasticError(f"{where}: expected a string or an object, got {type(item).__name__}")


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a text file.

    `.jsonl`: one JSON object (or string) per line, field `text` or the first string field.
    `.json`: a list of strings/objects, or an object whose values are strings/objects.
    Anything else: plain text, documents separated by blank lines.
    """
    path = Path(path)
    if not path.exists():
        raise StarElasticError(f"no such file: {path}")
    if not path.is_file():
        raise StarElasticError(f"{path} is not a regular file")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise StarElasticError(f"{path} looks like a binary file, not text")
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise StarElasticError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from e
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise StarElasticError(f"{path}:{lineno}: bad JSON: {e.msg} (column {e.colno})") from e
            docs.append(_json_item_text(item, f"{path}:{lineno}"))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise StarElasticError(
                f"{path}:{e.lineno}: bad JSON: {e.msg} (column {e.colno})") from e
        if isinstance(data, list):
            items = list(enumerate(data))
        elif isinstance(data, dict):
            items = list(data.items())
        else:
            raise StarElasticError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
        docs = [_json_item_text(item, f"{path}: item {key!r}") for key, item in items]
    else:
        # Whitespace-only lines count as blank: editors leave them around.
        docs = re.split(r"\n[ \t]*\n", text)

    docs = [d.strip() for d in docs if d is not None]
    docs = [d for d in docs if d]
    if not docs:
        raise StarElasticError(f"{path} contains no text")
    return docs


# --------------------------------------------------------------------------- tokenizing

def document_separator(tokenizer) -> int | None:
    """The pretraining document boundary token, when the tokenizer has one apart from BOS/EOS.

    Chat models such as SmolLM2-Instruct report their chat markers (<|im_start|>, <|im_end|>)
    as BOS/EOS; their pretraining text was separated by <|endoftext|> instead.
    """
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


def tokenize_documents(docs: list[str], tokenizer, add_bos: bool = True,
                       add_eos: bool = True, separator: int | None = None) -> torch.Tensor:
    """One 1-D LongTensor: each document's tokens, with BOS before and EOS after when the
    tokenizer has them (and add_bos / add_eos ask for them). A `separator` token id replaces
    both: it goes before every document."""
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    if separator is not None:
        bos, eos = separator, None
    quiet = len(docs) < _PROGRESS_MIN_DOCS or bool(os.environ.get("STAR_ELASTIC_QUIET"))

    ids: list[int] = []
    with tqdm(total=len(docs), desc="tokenizing", unit="doc", disable=quiet) as bar:
        for start in range(0, len(docs), _TOKENIZE_CHUNK):
            chunk = list(docs[start:start + _TOKENIZE_CHUNK])
            # verbose=False: long documents are fine here (we pack them into windows later);
            # without it transformers warns about exceeding model_max_length.
            encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            for doc_ids in encoded:
                if bos is not None:
                    ids.append(bos)
                ids.extend(doc_ids)
                if eos is not None:
                    ids.append(eos)
            bar.update(len(chunk))
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- splitting

def split_documents(docs: list[str], heldout_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """(train_docs, heldout_docs), both in their original order.

    Held-out = a fixed, seeded selection of whole documents, never split mid-document: the
    same documents, seed and fraction always give the same split. With two or more documents
    and a positive fraction at least one document is held out (and at least one kept).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise StarElasticError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
    n = len(docs)
    if n < 2 or heldout_fraction == 0.0:
        return list(docs), []
    n_held = min(max(1, round(n * heldout_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    train = [d for i, d in enumerate(docs) if i not in held]
    heldout = [d for i, d in enumerate(docs) if i in held]
    return train, heldout


# --------------------------------------------------------------------------- packing, batches

def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n, seq_len) contiguous, non-overlapping windows of a 1-D stream; the tail is dropped."""
    if seq_len < 1:
        raise StarElasticError(f"sequence length must be at least 1, got {seq_len}")
    if stream.dim() != 1:
        raise StarElasticError(f"expected a 1-D token stream, got shape {tuple(stream.shape)}")
    n = stream.numel() // seq_len
    if n == 0:
        raise StarElasticError(
            f"the text has {stream.numel()} tokens, fewer than one sequence of {seq_len}: "
            "use more text or a shorter sequence length")
    return stream[: n * seq_len].view(n, seq_len)


class TokenBatches:
    """Endless random batches (batch_size, seq_len) of rows of a packed tensor.

    Each epoch visits this rank's rows in a fresh order derived from (seed, epoch) alone, so
    the state is just (seed, epoch, position) and a resumed run yields exactly the batches
    the interrupted one would have. With world_size > 1 rank r owns rows r, r+W, r+2W, ...:
    ranks never share a row, and all own the same number so they step in lockstep.
    Rows left over after the last full batch of an epoch are skipped in that epoch.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if rows.dim() != 2:
            raise StarElasticError(f"expected packed rows (n, seq_len), got shape {tuple(rows.shape)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise StarElasticError(f"bad rank {rank} for world size {world_size}")
        per_rank = rows.shape[0] // world_size
        if batch_size < 1 or per_rank < batch_size:
            raise StarElasticError(
                f"{rows.shape[0]} sequences ({per_rank} per rank) are too few for a batch of "
                f"{batch_size}: use more text, a shorter sequence length or a smaller batch")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.my_rows = torch.arange(rank, per_rank * world_size, world_size)
        self.epoch = 0
        self.position = 0  # rows of this epoch's order already handed out
        self._order_epoch = None
        self._order = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.my_rows) // self.batch_size

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
            self._order = self.my_rows[torch.randperm(len(self.my_rows), generator=g)]
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.my_rows):
            self.epoch += 1
            self.position = 0
        idx = self._epoch_order()[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return self.rows[idx]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_rows": int(self.rows.shape[0]), "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        # A different row count means different text or sequence length: the saved position
        # would point at other data, so refuse rather than resume silently wrong.
        if state.get("num_rows", self.rows.shape[0]) != self.rows.shape[0]:
            raise StarElasticError(
                f"cannot resume data order: checkpoint had {state['num_rows']} sequences, "
                f"this data has {self.rows.shape[0]} (different text or sequence length?)")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_epoch = None


# --------------------------------------------------------------------------- all together

def parse_mixture(text_arg) -> list[tuple[str, float]] | None:
    """`wiki:0.6,shakespeare:0.2,bible:0.2` (or `wiki,bible`: equal weights) -> [(source, weight)],
    weights summing to 1; None for a single source (an existing path is always one source)."""
    text = str(text_arg)
    if "," not in text or os.path.exists(text):
        return None
    parts = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            raise StarElasticError(f"data mixture {text!r} has an empty entry")
        name, _, weight = item.rpartition(":") if ":" in item and not os.path.exists(item) else (item, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise StarElasticError(f"data mixture {text!r}: weight {weight!r} of {name!r} is not a number") from None
        if not w > 0 or w == float("inf"):
            raise StarElasticError(f"data mixture {text!r}: weight of {name!r} must be positive")
        parts.append((name, w))
    if len({n for n, _ in parts}) != len(parts):
        raise StarElasticError(f"data mixture {text!r} names a source twice")
    total = sum(w for _, w in parts)
    return [(n, w / total) for n, w in parts]


def load_corpus_tokens(text_arg, tokenizer, heldout_fraction: float = 0.1, seed: int = 0,
                       max_docs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_stream, heldout_stream) for a file path or corpus name, or a mixture of them
    (`wiki:0.6,shakespeare:0.2,bible:0.2`, see `parse_mixture`).

    A mixture takes from each source its weight's share of the tokens, as many as the sources allow
    without repeating any (the scarcest source, relative to its weight, sets the total); its train and
    held-out streams are the sources' in the order given (packed rows are shuffled by TokenBatches).
    max_docs keeps the first N documents of each source (before the split), for quick runs.
    """
    mixture = parse_mixture(text_arg)
    if mixture is not None:
        loaded = [load_corpus_tokens(name, tokenizer, heldout_fraction, seed, max_docs) for name, _ in mixture]
        parts = {}
        for k in (0, 1):
            total = min(tok[k].numel() / w for tok, (_, w) in zip(loaded, mixture))
            parts[k] = torch.cat([tok[k][:int(total * w)] for tok, (_, w) in zip(loaded, mixture)])
        return parts[0], parts[1]
    if max_docs is not None and max_docs < 1:
        raise StarElasticError(f"max_docs must be at least 1, got {max_docs}")
    docs = read_documents(resolve_text(text_arg))
    if max_docs is not None:
        docs = docs[:max_docs]
    train_docs, heldout_docs = split_documents(docs, heldout_fraction, seed)
    sep = document_separator(tokenizer)
    train = tokenize_documents(train_docs, tokenizer, separator=sep)
    heldout = tokenize_documents(heldout_docs, tokenizer, separator=sep)
    return train, heldout
