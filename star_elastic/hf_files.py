"""The files of a Hugging Face checkpoint directory, the one place that knows safetensors on disk:
which files hold the weights, each file's header checked against its length, how tensors are
grouped into shards and what the shards and their index are called, and JSON files read with
one-line errors. Below hf.py, elastic/stream.py and elastic/manifest.py, which all use it; hf.py
re-exports every name.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import StarElasticError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on the JSON header


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise StarElasticError(f"{index}: not a safetensors index ({e})") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise StarElasticError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise StarElasticError(f"{path}: weights are in pickle format ({pickles[0]}); refusing to unpickle — "
                               "convert them to safetensors")
    raise StarElasticError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_json(f: Path):
    """A JSON file's content; a one-line error naming the file when it is not JSON."""
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise StarElasticError(f"{f}: not valid JSON ({e})") from None


def safetensors_header(f: Path) -> dict:
    """The JSON header of a safetensors file ({name: {"dtype", "shape", "data_offsets"}}), after the
    cheap checks that catch damage without reading the data: the header parses, and the file is
    exactly as long as the header says (a truncated copy or appended bytes fail here, by name)."""
    f = Path(f)
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            prefix = fh.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise StarElasticError(f"{f}: not a safetensors file, or truncated ({size} bytes; "
                                       "no complete safetensors header)")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise StarElasticError(f"{f}: cannot read it ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError):
        raise StarElasticError(f"{f}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise StarElasticError(f"{f}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise StarElasticError(f"{f}: not a safetensors file (malformed tensor entries in its header)") from None
    expected = 8 + n + end
    if size < expected:
        raise StarElasticError(f"{f}: truncated ({size:,} bytes, its header describes {expected:,})")
    if size > expected:
        raise StarElasticError(f"{f}: {size - expected:,} unexpected bytes after the tensor data "
                               f"({size:,} bytes, its header describes {expected:,})")
    return header


def shard_groups(names: list, nbytes, max_shard_bytes: int) -> list[list]:
    """`names` in order, grouped into files of at most `max_shard_bytes` (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for name in names:
        n = nbytes(name)
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    """transformers' names for n weight files."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json of a sharded checkpoint."""
    (Path(out) / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
