#!/bin/bash
# Builds .devcarry/ (git-ignored) on the CPU machine: what a GPU machine without network needs for the
# benchmarks. Carry it in two calls (the device tool takes 64 MiB a call; the SmolLM2 GGUF is 98 MB):
#   call 1: bash benchmarks/device/run.sh SETUP   carry .devcarry/{smol.part00,corpora.tar.xz,gguf-0.19.0-py3-none-any.whl,run.sh}
#   call 2 (within 30 s, the machine still warm): bash .devcarry/run.sh RUNS NAME "ARGS" ...  carry .devcarry/{smol.part01,smol.sha,tok,run.sh}
#   (the tokenizer travels with either call; with part00 and the corpora it put call 1 past the limit)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.devcarry/' >> .git/info/exclude; }
D=.devcarry; mkdir -p $D
python3 - <<'PY'
from star_elastic.assets import corpus, smollm2_gguf
for name in ("wiki", "shakespeare", "bible", "wiki-fr"):
    corpus(name)
print(smollm2_gguf())
PY
CACHE=${STAR_ELASTIC_CACHE:-$HOME/.cache/star_elastic}
tar -C "$CACHE" -cJf $D/corpora.tar.xz corpora
GGUF=$(python3 -c "from star_elastic.assets import smollm2_gguf; print(smollm2_gguf())")
(cd $D && rm -f smol.part* && split -n 2 -d "$GGUF" smol.part && sha256sum "$GGUF" | cut -d' ' -f1 > smol.sha)
python3 -m pip download -q --no-deps gguf==0.19.0 -d $D
[ -d $D/tok ] || python3 -c "from star_elastic.hf import load_tokenizer; load_tokenizer('$GGUF').save_pretrained('$D/tok')"
if [ ! -d $D/mamba/mamba_ssm ]; then  # the Triton SSD kernels of mamba_ssm, without its CUDA extensions
  tmp=$(mktemp -d)
  MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip download -q --no-deps --no-build-isolation --no-binary=:all: \
    mamba-ssm==2.3.2.post1 -d "$tmp"
  tar -C "$tmp" -xzf "$tmp"/mamba_ssm-2.3.2.post1.tar.gz
  mkdir -p $D/mamba/mamba_ssm-2.3.2.post1.dist-info
  cp -r "$tmp"/mamba_ssm-2.3.2.post1/mamba_ssm $D/mamba/
  # Mamba-3's kernels (550 KB) are not used here, and without them the model's first part fits one call's 64 MiB
  rm -rf $D/mamba/mamba_ssm/ops/tilelang $D/mamba/mamba_ssm/ops/cute $D/mamba/mamba_ssm/ops/triton/mamba3
  echo '__version__ = "2.3.2.post1"' > $D/mamba/mamba_ssm/__init__.py
  printf 'Metadata-Version: 2.1\nName: mamba_ssm\nVersion: 2.3.2.post1\n' > $D/mamba/mamba_ssm-2.3.2.post1.dist-info/METADATA
  rm -rf "$tmp"
fi
if [ ! -d $D/causal_conv1d ]; then  # transformers' other kernel (issue 16's anchor): its source, built on the GPU
  # machine for sm_90 alone by run.sh HFKBUILD (about 6 minutes), with the build's own tools as wheels, or here by
  # benchmarks/device/cross_build_causal_conv1d.sh (about 5 minutes on 2 cores, no device time; run.sh HFKPRE)
  tmp=$(mktemp -d)
  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE python3 -m pip download -q --no-deps --no-build-isolation --no-binary=:all: \
    causal-conv1d==1.7.0 -d "$tmp"
  tar -C "$tmp" -xzf "$tmp"/causal_conv1d-1.7.0.tar.gz
  cp -r "$tmp"/causal_conv1d-1.7.0 $D/causal_conv1d && rm -rf $D/causal_conv1d/tests "$tmp"
  python3 - $D/causal_conv1d/setup.py <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
a = s.index('        cc_flag.append("-gencode")\n        cc_flag.append("arch=compute_75')
b = s.index('arch=compute_121,code=sm_121")') + len('arch=compute_121,code=sm_121")')
open(p, "w").write(s[:a] + '        cc_flag += ["-gencode", "arch=compute_90,code=sm_90"]  # H100 / H200 only' + s[b:])
PY
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 wheel ninja -d $D/causal_conv1d/wheels
fi
# the OpenAI-compatible server's packages for bench_load (LOAD), for the GPU machine's Python 3.12
[ -d $D/serve_wheels ] || python3 -m pip download -q fastapi uvicorn httpx py-spy --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp -d $D/serve_wheels
cp benchmarks/device/run.sh $D/run.sh
du -sh $D/*
