"""Throughput and peak memory of the streaming slicer (`star_elastic.elastic.stream.stream_slice`).

Makes a random bf16 parent of about --size-gb (NemotronH with per-expert tensors as transformers
writes them, or Llama), itself written tensor by tensor so that making it never holds the model
either; then, with the parent's pages in the page cache ("warm") and evicted with
posix_fadvise(DONTNEED) ("cold"), times:

    slice     stream_slice to a ~50% spec, in a fresh subprocess (peak RSS: VmHWM / ru_maxrss); the time
              is the call's, after the libraries' imports and set-up (the whole process: "process s")
    cp -r     a copy of the whole parent directory
    cp bytes  a copy of as many bytes as the slice writes (whole parent files, then `head -c`)

each followed by `sync` (timed separately: "op" excludes it, "op+sync" includes it), median of
--repeats runs. Prints a table and writes JSON (--json). Everything is removed at the end unless
--keep.

    python benchmarks/bench_stream_slice.py                       # ~3 GB NemotronH parent
    python benchmarks/bench_stream_slice.py --size-gb 1 --json docs/results/stream_slice_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
from star_elastic import hf
from star_elastic.elastic import ElasticSpec, count_parameters
from star_elastic.elastic.spec import applies
from star_elastic.elastic.stream import DTYPE_BYTES, output_bytes
from star_elastic.model import Model, ModelConfig

PATTERN = "MEM*EM-E"  # NemotronH layers, repeated (and cut) to reach the size asked for


def make_config(family: str, size_gb: float) -> ModelConfig:
    """A config of about `size_gb` GB in bf16, grown one layer at a time."""
    if family == "llama":
        base = dict(family="llama", vocab_size=32768, hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                    head_dim=128, intermediate_size=5632, mlp_gated=True, mlp_act="silu", rope_theta=10000.0,
                    tie_word_embeddings=False)
        unit = "*"
    else:
        base = dict(family="nemotron_h", vocab_size=32768, hidden_size=2048, num_attention_heads=16,
                    num_key_value_heads=4, head_dim=128, intermediate_size=8192, mamba_num_heads=64,
                    mamba_head_dim=32, ssm_state_size=128, n_groups=8, chunk_size=128, n_routed_experts=32,
                    num_experts_per_tok=4, moe_intermediate_size=1024, moe_shared_expert_intermediate_size=2048,
                    n_group=1, topk_group=1, norm_topk_prob=True)
        unit = PATTERN
    target, n = size_gb * 1e9 / 2, 1
    while True:
        cfg = ModelConfig(**base, layer_types=(unit * (n // len(unit) + 1))[:n])
        if count_parameters(cfg) >= target:
            return cfg
        n += 1


def half_spec(cfg: ModelConfig) -> ElasticSpec:
    """Every width axis halved (experts, FFNs, Mamba and query heads), then the embedding width (a
    multiple of 128) that brings the parameters closest to half the parent's."""
    halves = dict(intermediate_size=cfg.intermediate_size // 2, num_attention_heads=cfg.num_attention_heads // 2)
    if cfg.family == "nemotron_h":
        halves.update(n_routed_experts=cfg.n_routed_experts // 2, mamba_num_heads=cfg.mamba_num_heads // 2,
                      moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size // 2)
    kw = {a: v for a, v in halves.items() if any(applies(cfg, k, a) for k in cfg.layer_types)}
    total = count_parameters(cfg)
    best = min(range(128, cfg.hidden_size + 1, 128),
               key=lambda h: abs(ElasticSpec(hidden_size=h, **kw).num_parameters(cfg) - total / 2))
    return ElasticSpec(hidden_size=best, **kw)


def write_parent(cfg: ModelConfig, out: Path, shard_bytes: int) -> None:
    """A random bf16 checkpoint in the layout `save_pretrained` writes, one tensor in memory at a time:
    the safetensors headers are planned from the shapes, then each tensor is generated and appended."""
    with torch.device("meta"):
        state = Model(cfg).state_dict()
    if cfg.tied:
        state.pop("lm_head.weight")
    if cfg.family == "nemotron_h":
        state = hf.to_disk_layout(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    shards = hf.shard_groups(list(shapes), lambda k: 2 * int(torch.Size(shapes[k]).numel()), shard_bytes)
    names = hf.shard_names(len(shards))
    out.mkdir(parents=True)
    (out / "config.json").write_text(hf.config_json(hf.config_to_hf(cfg)))
    g = torch.Generator().manual_seed(0)
    for fname, keys in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for k in keys:
            n = 2 * int(torch.Size(shapes[k]).numel())
            header[k] = {"dtype": "BF16", "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        with open(out / fname, "wb") as fh:
            fh.write(len(text).to_bytes(8, "little"))
            fh.write(text)
            for k in keys:
                t = torch.empty(shapes[k], dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
            fh.flush()
            os.fsync(fh.fileno())
    if len(shards) > 1:
        hf.write_index(out, {k: fname for fname, keys in zip(names, shards) for k in keys},
                       sum(2 * torch.Size(s).numel() for s in shapes.values()))


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def evict(d: Path) -> None:
    """Drop the directory's pages from the page cache (no root needed: they are clean after fsync)."""
    for p in d.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(d: Path) -> None:
    for p in weight_files(d):
        with open(p, "rb") as fh:
            while fh.read(64 << 20):
                pass


SLICER = r"""
import json, os, resource, sys, time
import tqdm.auto, transformers  # imported before the baseline: they are not the slicer's working memory
from transformers import LlamaConfig, NemotronHConfig, PretrainedConfig
from star_elastic.elastic import ElasticSpec
from star_elastic.elastic.stream import stream_slice

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch
from star_elastic.model import Model, ModelConfig
with torch.device("meta"):  # torch's one-time set-up for building modules (~2 s), not the slicer's work
    Model(ModelConfig(family="llama", vocab_size=8, hidden_size=8, layer_types="*", num_attention_heads=1,
                      num_key_value_heads=1, head_dim=8, intermediate_size=8, mlp_gated=True, mlp_act="silu",
                      rope_theta=1e4))
parent, out, spec = sys.argv[1], sys.argv[2], ElasticSpec.from_json(sys.argv[3])
base = hwm()
t = time.perf_counter()
stream_slice(parent, spec, out, progress=False)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "baseline_hwm": base, "vm_hwm": hwm(),
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def timed_shell(cmd: str) -> tuple[float, float]:
    t = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True)
    op = time.perf_counter() - t
    subprocess.run(["sync"], check=True)
    return op, time.perf_counter() - t


def run_slice(parent: Path, out: Path, spec: ElasticSpec) -> dict:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", SLICER, str(parent), str(out), spec.to_json()],
                         check=True, capture_output=True, text=True)
    process = time.perf_counter() - t
    subprocess.run(["sync"], check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["process_seconds"] = process
    r["op_sync_seconds"] = r["seconds"] + (time.perf_counter() - t - process)
    return r


def copy_bytes_cmd(parent: Path, dst: Path, nbytes: int) -> str:
    """cp whole parent files, then `head -c` the rest, until `nbytes` are copied."""
    cmds, left = [f"mkdir -p '{dst}'"], nbytes
    for p in weight_files(parent):
        if left <= 0:
            break
        size = p.stat().st_size
        cmds.append(f"cp '{p}' '{dst}/'" if size <= left else f"head -c {left} '{p}' > '{dst}/{p.name}'")
        left -= size
    return " && ".join(cmds)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    import safetensors
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 1e9, 1), "python": platform.python_version(),
            "torch": torch.__version__, "safetensors": safetensors.__version__, "platform": platform.platform()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=3.0, help="parent size in GB (bf16)")
    ap.add_argument("--family", choices=["nemotron_h", "llama"], default="nemotron_h")
    ap.add_argument("--workdir", help="where to write the parent and the outputs (default: a temp dir)")
    ap.add_argument("--shard-gb", type=float, default=hf.SHARD_BYTES / 1e9, help="parent shard size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="warm,cold", help="page cache states to measure: warm, cold")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the parent and outputs")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_stream_slice.", dir=args.workdir))
    try:
        cfg = make_config(args.family, args.size_gb)
        spec = half_spec(cfg)
        parent = root / "parent"
        t = time.perf_counter()
        write_parent(cfg, parent, int(args.shard_gb * 1e9))
        made = time.perf_counter() - t
        parent_bytes, weights = dir_bytes(parent), sum(p.stat().st_size for p in weight_files(parent))
        out_bytes = output_bytes(parent, spec)
        largest = 0
        from star_elastic.elastic.stream import _header
        for p in weight_files(parent):
            for v in _header(p).values():
                largest = max(largest, DTYPE_BYTES[v["dtype"]] * int(torch.Size(v["shape"]).numel()))
        print(f"parent: {args.family}, {count_parameters(cfg) / 1e9:.2f}B parameters, {parent_bytes / 1e9:.2f} GB in "
              f"{len(weight_files(parent))} file(s), made in {made:.1f} s; largest tensor {largest / 1e6:.0f} MB; "
              f"spec {spec.to_dict()} keeps {spec.num_parameters(cfg) / count_parameters(cfg):.1%} of the parameters, "
              f"{out_bytes / 1e9:.2f} GB", file=sys.stderr)

        results = {}
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            runs = {"slice": [], "cp_r": [], "cp_bytes": []}
            for _ in range(args.repeats):
                for op in runs:
                    dst = root / f"out-{op}"
                    subprocess.run(["sync"], check=True)
                    (evict if mode == "cold" else warm)(parent)
                    if op == "slice":
                        r = run_slice(parent, dst, spec)
                        runs[op].append(r)
                    else:
                        cmd = (f"cp -r '{parent}' '{dst}'" if op == "cp_r" else copy_bytes_cmd(parent, dst, out_bytes))
                        o, s = timed_shell(cmd)
                        runs[op].append({"seconds": o, "op_sync_seconds": s})
                    shutil.rmtree(dst)
            res = {}
            for op, rs in runs.items():
                nbytes = {"slice": out_bytes, "cp_r": parent_bytes, "cp_bytes": out_bytes}[op]
                sec = statistics.median(r["seconds"] for r in rs)
                sec_sync = statistics.median(r["op_sync_seconds"] for r in rs)
                res[op] = {"bytes_written": nbytes, "seconds": sec, "op_sync_seconds": sec_sync,
                           "written_MB_s": nbytes / sec / 1e6, "written_MB_s_with_sync": nbytes / sec_sync / 1e6,
                           "parent_MB_s": parent_bytes / sec / 1e6, "runs": rs}
            s = res["slice"]
            s["process_seconds"] = statistics.median(r["process_seconds"] for r in runs["slice"])
            s["peak_rss_bytes"] = max(r["vm_hwm"] for r in runs["slice"])
            s["ru_maxrss_bytes"] = max(r["ru_maxrss"] for r in runs["slice"])
            s["baseline_rss_bytes"] = max(r["baseline_hwm"] for r in runs["slice"])
            res["ratios"] = {"slice_over_cp_r": s["seconds"] / res["cp_r"]["seconds"],
                             "slice_over_cp_bytes": s["seconds"] / res["cp_bytes"]["seconds"],
                             "slice_over_cp_r_with_sync": s["op_sync_seconds"] / res["cp_r"]["op_sync_seconds"],
                             "slice_over_cp_bytes_with_sync": s["op_sync_seconds"] / res["cp_bytes"]["op_sync_seconds"]}
            results[mode] = res

        report = {
            "benchmark": "stream_slice", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "machine": machine(), "workdir_filesystem": subprocess.run(
                ["df", "-hT", str(root)], capture_output=True, text=True).stdout.strip().splitlines()[-1],
            "family": args.family, "layer_types": cfg.layer_types, "parent_parameters": count_parameters(cfg),
            "parent_bytes": parent_bytes, "parent_weight_bytes": weights, "parent_files": len(weight_files(parent)),
            "largest_tensor_bytes": largest, "spec": spec.to_dict(),
            "kept_parameter_fraction": spec.num_parameters(cfg) / count_parameters(cfg),
            "output_bytes": out_bytes, "repeats": args.repeats, "results": results,
        }
        print_table(report)
        if args.json:
            common.write_json(args.json, report, indent=1)
        return report
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def print_table(r: dict) -> None:
    gb = 1e9
    print(f"\nstream_slice benchmark — {r['machine']['cpu']} ({r['machine']['cores']} cores, "
          f"{r['machine']['memory_gb']} GB RAM), {r['workdir_filesystem'].split()[1]} filesystem")
    print(f"parent {r['family']} {r['parent_parameters'] / 1e9:.2f}B params, {r['parent_bytes'] / gb:.2f} GB bf16 in "
          f"{r['parent_files']} file(s); output {r['output_bytes'] / gb:.2f} GB "
          f"({r['kept_parameter_fraction']:.1%} of the parameters); median of {r['repeats']}")
    print(f"{'cache':6} {'operation':10} {'GB written':>10} {'s':>7} {'MB/s':>8} {'s+sync':>7} {'MB/s+sync':>9}")
    for mode, res in r["results"].items():
        for op, label in (("slice", "slice"), ("cp_r", "cp -r"), ("cp_bytes", "cp bytes")):
            x = res[op]
            print(f"{mode:6} {label:10} {x['bytes_written'] / gb:10.2f} {x['seconds']:7.2f} {x['written_MB_s']:8.0f} "
                  f"{x['op_sync_seconds']:7.2f} {x['written_MB_s_with_sync']:9.0f}")
        q = res["ratios"]
        s = res["slice"]
        print(f"{mode:6} time ratio slice / cp -r {q['slice_over_cp_r']:.2f} ({q['slice_over_cp_r_with_sync']:.2f} "
              f"with sync), slice / cp bytes {q['slice_over_cp_bytes']:.2f} ({q['slice_over_cp_bytes_with_sync']:.2f} "
              f"with sync); slicer process {s['process_seconds']:.2f} s")
        grew = (s["peak_rss_bytes"] - s["baseline_rss_bytes"]) / 1e6
        print(f"{mode:6} slicer peak RSS (VmHWM) {s['peak_rss_bytes'] / 1e6:.0f} MB = after-import baseline "
              f"{s['baseline_rss_bytes'] / 1e6:.0f} MB + {grew:.0f} MB "
              f"while slicing; parent {r['parent_bytes'] / 1e6:.0f} MB, largest tensor "
              f"{r['largest_tensor_bytes'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
