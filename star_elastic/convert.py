"""Whole checkpoints to another dtype, FP8 above all, and exported Llama slices to the DeciLM format.

`convert(src, out, "fp8")` (`star-elastic convert SRC --dtype fp8 --out DST`): the copy of a
checkpoint directory, plain Hugging Face or elastic, streamed one tensor at a time (`stream_slice`
of the whole model with that dtype). FP8 is the format of fp8.py (transformers' fine-grained FP8
with one scale per output row); a floating-point dtype casts (and dequantises an FP8 source). Of an
elastic checkpoint, the router, importance scores, tokenizer and manifest come along (checksums and
sizes rewritten, the conversion recorded under "quantization" / "dtype"): every budget of the FP8
copy then slices out of it in FP8 with its own scales (`star-elastic slice OUT --budget NAME`),
exactly what `slice SRC --budget NAME --dtype fp8` writes, and eval / generate / serve / validate
read it (dequantised on load).

`write_decilm(out, write)` (`star-elastic slice ... --format decilm`): whatever `write` exports (a
Llama slice in transformers' format or star-elastic's per-layer one: `zero_shot.slice_budget`,
`zero_shot_slice`) rewritten as a DeciLM / Nemotron-NAS `block_configs` checkpoint (decilm.py): the
same weight files, which already carry Llama's names, a new config.json and the config class it
names. `prepare_decilm` and `check_decilm` refuse, before any work, what the format cannot hold.

Everything is written into a temporary directory beside the output and renamed into place: never a
half-written output. `python -m star_elastic.convert` is kept as an alias of `star-elastic convert`
for scripts written before that subcommand (its --dtype defaults to fp8).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from . import decilm, fp8
from .errors import StarElasticError


DTYPES = ("fp8", "bfloat16", "float16", "float32")
FORMATS = ("hf", "decilm")
SLICE_RECORD = "star_elastic_slice.json"  # zero_shot's record of a slice


# ----------------------------------------------------------------------------- whole checkpoints

def check_source(src, out=None) -> Path:
    """`src` is an existing checkpoint directory and `out` (if given) neither it, nor inside it, nor
    around it: one-line errors, before anything is read or written."""
    src = Path(src)
    if not src.exists():
        raise StarElasticError(f"{src}: no such file or directory")
    if not src.is_dir():
        what = "a GGUF file" if src.suffix == ".gguf" else "a file"
        raise StarElasticError(f"{src} is {what}: expected a checkpoint directory (config.json + safetensors)")
    if out is not None:
        s, d = src.resolve(), Path(out).resolve()
        if d == s or d in s.parents or s in d.parents:
            raise StarElasticError(f"{out}: the output would overwrite or sit inside the checkpoint {src}")
    return src


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
    src, out = check_source(src, out), Path(out)
    check_checkpoint(src)  # what every load checks, from config.json and the headers
    elastic = has_manifest(src)
    manifest = read_manifest(src) if elastic else None
    if elastic and manifest.get("full_delta") and dtype == "fp8":
        raise StarElasticError(f"{src}: FP8 copies of a checkpoint with a full budget's delta (full_delta.safetensors) "
                               "are not built; convert it to bfloat16, or slice a budget and convert that")
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
    budgets = f" ({len(manifest['budgets'])} budgets, manifest kept)" if elastic else ""
    log(f"wrote {out}: {'FP8' if dtype == 'fp8' else dtype} {'elastic checkpoint' if elastic else 'checkpoint'}"
        f"{budgets}, {total / 2**20:.1f} MiB of weight files")
    return out


def convert_fp8(src, out, *, progress: bool = True, log=print) -> Path:
    """`convert(src, out, "fp8")`: linear weights float8_e4m3fn with one scale per row (fp8.py)."""
    return convert(src, out, "fp8", progress=progress, log=log)


# ----------------------------------------------------------------------------- DeciLM

def check_decilm(cfg, spec=None) -> None:
    """A one-line StarElasticError when no budget of the parent `cfg` (a ModelConfig) can be written
    as DeciLM (not a Llama with gated SiLU MLPs), or when `spec`'s budget, if given, cannot."""
    decilm.check_parent(cfg)
    if spec is not None:
        decilm.block_configs(spec.config(cfg))


def prepare_decilm(source, dtype=None, spec=None):
    """Before a DeciLM slice of `source` (a checkpoint directory, or a file whose config is only known
    once loaded: then `check_decilm` on the loaded model) is cut: refuses FP8 output (DeciLM exports are
    unquantised: no engine is known to run block_configs with these per-row scales), and from the
    directory's config.json alone a parent, or a budget `spec`, the format cannot hold. Returns the
    dtype to load or slice in: `dtype`; for an FP8 source with none, bfloat16 (dequantised)."""
    import torch

    if fp8.is_fp8_dtype(dtype):
        raise StarElasticError("DeciLM checkpoints are written unquantised (FP8 is transformers' format only): "
                               "drop --dtype fp8, or slice with --format hf")
    source = Path(source)
    if not source.is_dir():
        return dtype
    from .hf import read_config

    raw, cfg = read_config(source)
    check_decilm(cfg, spec)
    return torch.bfloat16 if dtype is None and fp8.is_fp8_config(raw) else dtype


def rewrite_as_decilm(directory) -> dict:
    """Rewrite in place the unquantised Llama checkpoint `directory` (as `export` or `stream_slice`
    write it: stock LlamaForCausalLM, or star-elastic's per-layer format) as DeciLM: config.json with
    per-layer `block_configs` (`decilm.decilm_config`, what `export(..., format="decilm")` writes) and
    the config class it names; the weight files, named as Llama's, stay. Returns the new config.
    A budget the format cannot hold exactly: a one-line StarElasticError, the directory untouched."""
    from .hf import check_checkpoint, config_json, config_to_hf

    directory = Path(directory)
    raw, cfg = check_checkpoint(directory)  # config.json and the safetensors headers agree
    if fp8.is_fp8_config(raw):
        raise StarElasticError(f"{directory}: FP8 weights; DeciLM checkpoints are written unquantised (convert it "
                               "with --dtype bfloat16 first)")
    decilm.block_configs(cfg)  # refuses first, on the sizes alone
    llama = config_to_hf(decilm.first_layer_config(cfg), raw)
    config = decilm.decilm_config(cfg, llama)
    (directory / f"{decilm.CONFIG_MODULE}.py").write_text(decilm.CONFIGURATION_SOURCE)
    (directory / "config.json").write_text(config_json(config))
    return config


def write_decilm(out, write, *, hint: str = "", log=print):
    """`write(directory, log)` exports a Llama slice into `directory` (transformers' or star-elastic's
    per-layer format, with its tokenizer and slice record: e.g. `zero_shot.slice_budget`); this
    rewrites it as DeciLM (`rewrite_as_decilm`) and renames it into `out`, all inside one temporary
    directory: `out` appears complete or not at all (an existing `out` is replaced: the command line
    refuses that without --force). The slice record (star_elastic_slice.json) gets `"format":
    "decilm"`. `hint`: appended to a refusal of the budget's sizes. Returns what `write` returned."""
    from .elastic.slicing import no_per_layer_note
    from .hf import staging

    out = Path(out)

    def writer_log(msg):  # the writer's "wrote <directory>" names the temporary directory: ours follows
        if not str(msg).startswith("wrote "):
            log(msg)

    with staging(out) as tmp, no_per_layer_note():  # the intermediate export's format is rewritten below
        result = write(tmp / "export", writer_log)
        try:
            config = rewrite_as_decilm(tmp / "export")
        except StarElasticError as e:
            raise StarElasticError(f"{e}{hint}") from None
        for f in (tmp / "export").iterdir():
            f.rename(tmp / f.name)
        (tmp / "export").rmdir()
        if isinstance(result, dict):
            result["format"] = "decilm"
        if (tmp / SLICE_RECORD).is_file():
            record = json.loads((tmp / SLICE_RECORD).read_text())
            record["format"] = "decilm"
            (tmp / SLICE_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    tokenizer = ", with the tokenizer" if (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file() \
        else ""
    log(f"wrote {out}: DeciLM / Nemotron-NAS block_configs, {config['num_hidden_layers']} layers (DeciLMForCausalLM: "
        f"vllm serve {out} --trust-remote-code; star_elastic.load reads it){tokenizer}")
    return result


# ----------------------------------------------------------------------------- python -m star_elastic.convert

def main(argv=None) -> int:
    """`python -m star_elastic.convert SRC --out DST [--dtype fp8] [--force]`: the same as `star-elastic
    convert` (whose --dtype has no default), kept for older scripts."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m star_elastic.convert",
                                description="same as `star-elastic convert`: the copy of a checkpoint directory, "
                                            "plain or elastic, in FP8 or another dtype")
    p.add_argument("src", help="checkpoint directory (config.json + safetensors), plain or elastic")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=DTYPES, default="fp8", help="default: fp8")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    from .runtime import check_output

    try:
        check_source(args.src, args.out)
        convert(args.src, check_output(args.out, args.force), args.dtype)
    except StarElasticError as e:
        print(f"star-elastic: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
