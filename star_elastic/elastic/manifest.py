"""An elastic checkpoint's manifest.json: reading it, and the checks every load runs on it
(`check_cheap`, called from `hf.load`) or runs on request (`verify_files`). See checkpoint.py for the
format. Below both hf.py and checkpoint.py (which re-exports every name): it imports neither.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import StarElasticError
from ..hf_files import PICKLE_SUFFIXES, _weight_files, read_json
from ..model import ModelConfig
from .spec import ElasticSpec, count_parameters

FORMAT = "star-elastic-checkpoint"
VERSION = 1
ROUTER_FILE = "router.safetensors"
DELTA_FILE = "full_delta.safetensors"  # the full budget's own low-rank delta (delta.py), when trained with one
INDEX_FILE = "model.safetensors.index.json"  # a sharded parent's shard map (read by loaders: it is checked too)


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def has_manifest(path) -> bool:
    """Whether `path` holds a manifest.json of ours, damaged ones included (a foreign, valid JSON
    manifest.json beside a plain HF checkpoint is not our business)."""
    f = Path(path) / "manifest.json"
    if not f.is_file():
        return False
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return True  # unreadable: read_manifest says so, naming the file
    return not isinstance(d, dict) or d.get("format") == FORMAT


def read_manifest(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise StarElasticError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise StarElasticError(f"{path}: not a star-elastic checkpoint (not a directory)")
    f = path / "manifest.json"
    if not f.is_file():
        raise StarElasticError(f"{path}: not a star-elastic checkpoint (no manifest.json)")
    manifest = read_json(f)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StarElasticError(f"{f}: not a star-elastic manifest")
    if manifest.get("version", 0) > VERSION:
        raise StarElasticError(f"{f}: written by a newer star-elastic (format version {manifest['version']})")
    _check_structure(manifest, f)
    return manifest


def _check_structure(manifest: dict, f: Path) -> None:
    """The fields every reader relies on, with the right types: one line naming the first bad one."""
    def bad(what):
        return StarElasticError(f"{f}: malformed manifest ({what})")

    budgets, files = manifest.get("budgets"), manifest.get("files")
    if not isinstance(budgets, list) or not budgets:
        raise bad("'budgets' must be a non-empty list")
    for i, b in enumerate(budgets):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not isinstance(b.get("spec"), dict):
            raise bad(f"budget {i} needs a 'name' and a 'spec'")
        for key in ("params", "active_params", "memory_bytes"):
            if not isinstance(b.get(key), int):
                raise bad(f"budget {b['name']!r}: '{key}' must be an integer")
    names = [b["name"] for b in budgets]
    if len(set(names)) != len(names):
        raise bad(f"budget names repeat: {names}")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise bad("'files' must map every weight file to its sha256")
    for name in files:
        if Path(name).name != name or Path(name).suffix in PICKLE_SUFFIXES or not (
                name.endswith(".safetensors") or name == INDEX_FILE):
            raise bad(f"lists {name!r}: only safetensors files in the checkpoint directory are read, "
                      "never pickles")
    sizes = manifest.get("sizes", {})
    if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
        raise bad("'sizes' must map files to byte counts")
    router = manifest.get("router")
    if not isinstance(router, dict) or not all(k in router for k in ("config", "budgets", "layer_order")):
        raise bad("'router' needs 'config', 'budgets' and 'layer_order'")
    if not isinstance(manifest.get("parent"), dict) or not isinstance(manifest["parent"].get("params"), int):
        raise bad("'parent' needs 'params'")


def check_files(path, manifest: dict, full: bool = False, progress: bool = False) -> None:
    """Every file the manifest lists is there with its recorded size (and, `full`, its sha256), and
    every weight file a load would read is listed (else it could be swapped unnoticed)."""
    path = Path(path)
    files, sizes = manifest["files"], manifest.get("sizes", {})
    for name in files:
        f = path / name
        if not f.is_file():
            raise StarElasticError(f"{f}: listed in the manifest but missing")
        if name in sizes and f.stat().st_size != sizes[name]:
            raise StarElasticError(f"{f}: {f.stat().st_size:,} bytes, the manifest records {sizes[name]:,} "
                                   "(truncated or replaced)")
    index = [path / INDEX_FILE] if (path / INDEX_FILE).exists() else []
    delta = [path / DELTA_FILE] if manifest.get("full_delta") else []
    for f in _weight_files(path) + [path / ROUTER_FILE] + index + delta:
        if f.name not in files:
            raise StarElasticError(f"{f}: not listed in the manifest (its checksum is unknown)")
    if full:
        verify_files(path, manifest, progress)


def verify_files(path, manifest: dict, progress: bool = False) -> list[str]:
    """The full sha256 of every listed file against the manifest; the names checked."""
    from tqdm.auto import tqdm

    path = Path(path)
    for name in tqdm(list(manifest["files"]), desc="sha256", unit="file", disable=not progress):
        f = path / name
        if not f.is_file():
            raise StarElasticError(f"{f}: listed in the manifest but missing")
        if sha256(f) != manifest["files"][name]:
            raise StarElasticError(f"{f}: checksum does not match the manifest (damaged or replaced)")
    return list(manifest["files"])


def check_budgets(manifest: dict, cfg: ModelConfig, source) -> None:
    """The manifest describes this config: family, parameter count, and every budget's spec is a
    valid sub-architecture of it with the parameter count recorded."""
    if manifest.get("family") not in (None, cfg.family):
        raise StarElasticError(f"{source}: manifest is for a {manifest['family']} model, config.json "
                               f"describes {cfg.family}")
    params = count_parameters(cfg)
    if manifest["parent"]["params"] != params:
        raise StarElasticError(f"{source}: manifest records {manifest['parent']['params']:,} parent parameters, "
                               f"config.json describes {params:,} (manifest and weights do not match)")
    for b in manifest["budgets"]:
        try:
            spec = ElasticSpec.from_dict(b["spec"])
            n = spec.num_parameters(cfg)  # validates the spec against the config
        except StarElasticError as e:
            raise StarElasticError(f"{source}: budget {b['name']!r} does not fit config.json ({e})") from None
        if n != b["params"]:
            raise StarElasticError(f"{source}: budget {b['name']!r} records {b['params']:,} parameters, its spec "
                                   f"has {n:,} on this config (manifest and weights do not match)")


def check_cheap(path, manifest: dict, cfg: ModelConfig) -> None:
    """The checks every load runs: files (sizes, listing) and budgets against the config."""
    path = Path(path)
    check_files(path, manifest)
    check_budgets(manifest, cfg, path / "manifest.json")
