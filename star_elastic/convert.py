"""Whole checkpoints to another dtype, FP8 above all: `convert(src, out, "fp8")`, or
`python -m star_elastic.convert SRC --out DST [--dtype fp8|bfloat16|float16|float32]`.

The copy of a checkpoint directory, plain Hugging Face or elastic, streamed one tensor at a time
(`stream_slice` of the whole model with that dtype). FP8 is the format of fp8.py (transformers'
fine-grained FP8 with one scale per output row); a floating-point dtype casts (and dequantises an
FP8 source). Of an elastic checkpoint, the router, importance scores, tokenizer and manifest come
along (checksums and sizes rewritten, the conversion recorded under "quantization" / "dtype"): every
budget of the FP8 copy then slices out of it in FP8 with its own scales (`star-elastic slice OUT
--budget NAME`), exactly what `slice SRC --budget NAME --dtype fp8` writes, and eval / generate /
serve / validate read it (dequantised on load).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from . import fp8
from .errors import StarElasticError


DTYPES = ("fp8", "bfloat16", "float16", "float32")


def convert(src, out, dtype: str = "fp8", *, progress: bool = True, log=print) -> Path:
    """Write the copy of checkpoint directory `src` (plain or elastic) in `dtype` (one of DTYPES) to
    `out`. Every check a load runs comes first (an elastic checkpoint's manifest too); atomic: written
    into a temporary directory beside `out`, renamed into place (an existing `out` is replaced: the
    command line refuses that without --force)."""
    import torch
    from .elastic.manifest import ROUTER_FILE, has_manifest, read_manifest, sha256
    from .elastic.spec import ElasticSpec
    from .elastic.stream import stream_slice
    from .hf import check_checkpoint, staging

    if dtype not in DTYPES:
        raise StarElasticError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    torch_dtype = fp8.fp8_dtype() if dtype == "fp8" else getattr(torch, dtype)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise StarElasticError(f"{src}: expected a checkpoint directory (config.json + safetensors)")
    s, d = src.resolve(), out.resolve()
    if d == s or d in s.parents or s in d.parents:
        raise StarElasticError(f"{out}: the output would overwrite or sit inside the checkpoint {src}")
    check_checkpoint(src)  # what every load checks, from config.json and the headers
    elastic = has_manifest(src)
    manifest = read_manifest(src) if elastic else None
    with staging(out) as tmp:
        stream_slice(src, ElasticSpec(), tmp / "model", dtype=torch_dtype, progress=progress)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        if elastic:
            for name in manifest["files"]:  # router, importance scores: not model weights
                if not (tmp / name).exists():
                    shutil.copyfile(src / name, tmp / name)
            skip = {"manifest.json", "model.safetensors.index.json"}
            for extra in sorted(src.iterdir()):  # the rest of the directory (chat template, ...)
                if extra.is_file() and extra.name not in skip and extra.suffix != ".safetensors" \
                        and not (tmp / extra.name).exists():
                    shutil.copyfile(extra, tmp / extra.name)
            weights = sorted(p.name for p in tmp.glob("*.safetensors"))
            if ROUTER_FILE not in weights:
                raise StarElasticError(f"{src}: no {ROUTER_FILE}")
            record = {"source": str(src), "source_bytes": sum(manifest.get("sizes", {}).values())}
            manifest = {k: v for k, v in manifest.items() if k not in ("quantization", "dtype")}
            manifest.update(files={n: sha256(tmp / n) for n in weights},
                            sizes={n: (tmp / n).stat().st_size for n in weights})
            if dtype == "fp8":
                manifest["quantization"] = {"method": fp8.QUANT_METHOD, "format": fp8.DESCRIPTION, **record}
            else:
                manifest["dtype"] = {"dtype": dtype, **record}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    log(f"wrote {out}: {'FP8' if dtype == 'fp8' else dtype} {'elastic checkpoint' if elastic else 'checkpoint'}, "
        f"{total / 2**20:.1f} MiB of weight files")
    return out


def convert_fp8(src, out, *, progress: bool = True, log=print) -> Path:
    """`convert(src, out, "fp8")`: linear weights float8_e4m3fn with one scale per row (fp8.py)."""
    return convert(src, out, "fp8", progress=progress, log=log)


def main(argv=None) -> int:
    """`python -m star_elastic.convert SRC --out DST [--force]`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m star_elastic.convert",
                                description="copy of a checkpoint directory, plain or elastic, in FP8 (every budget of "
                                            "an elastic one then slices in FP8 with its own scales) or another dtype")
    p.add_argument("src", help="checkpoint directory (config.json + safetensors), plain or elastic")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=DTYPES, default="fp8",
                   help="fp8 (default): linear weights float8_e4m3fn with one scale per row, the rest bfloat16; or a "
                        "floating-point dtype (an FP8 source is dequantised)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    from .runtime import check_output

    try:
        convert(args.src, check_output(args.out, args.force), args.dtype)
    except StarElasticError as e:
        print(f"star-elastic: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
