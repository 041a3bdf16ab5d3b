"""The files of a Hugging Face checkpoint directory: which safetensors files hold its weights, and
its JSON files read with one-line errors. Below hf.py and elastic/manifest.py (which both use them)
so that neither imports the other; hf.py re-exports every name.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import StarElasticError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
