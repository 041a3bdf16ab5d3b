#!/bin/bash
# causal_conv1d 1.7.0 (transformers' NemotronH wants it for its fast Mamba path: issue 16's anchor) compiled on the
# CPU machine for the GPU machine, so that no call spends ~6 minutes of device time building it (run.sh HFKBUILD):
# the GPU machine's Python 3.12 and torch 2.11.0+cu130, sm_90 only, CUDA 13.0's nvcc and headers from PyPI wheels.
# Writes .devcarry/causal_conv1d_built/ (13 MB: the package and its stripped extension), carried by run.sh HFKPRE.
# About 2 GB of downloads into $WORK (default /tmp/ccbuild, 5 GB), about 5 minutes of compiling on 2 cores.
# Needs benchmarks/device/prepare.sh's .devcarry/causal_conv1d (the sdist, trimmed to sm_90) and a Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD; W=${WORK:-/tmp/ccbuild}; PY312=${PY312:-python3.12}
mkdir -p $W
[ -d $W/venv ] || $PY312 -m venv $W/venv
V=$W/venv/bin
# torch for its headers and libraries (PyPI's 2.11.0 is the cu130 build), CUDA 13.0's compiler and headers
$V/pip install -q "torch==2.11.0" "cuda-toolkit[nvcc,cccl,crt,cudart,nvvm,cublas,cusparse,cusolver,curand,cufft,nvtx,cupti,nvrtc,nvjitlink]==13.0.2" \
  ninja wheel "setuptools<82" packaging
$V/python -c "import torch; assert torch.version.cuda == '13.0', torch.version.cuda; print('torch', torch.__version__)"
# a CUDA_HOME in the layout torch's cpp_extension expects: the cu13 wheels keep bin/include/lib side by side
NV=$($V/python -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
mkdir -p $W/cuda/lib64
for d in bin include nvvm; do ln -sfn $NV/$d $W/cuda/$d; done
for f in $NV/lib/*; do ln -sfn $f $W/cuda/lib64/$(basename $f); done
ln -sfn $NV/lib/libcudart.so.13 $W/cuda/lib64/libcudart.so
$W/cuda/bin/nvcc --version | tail -n 2
rm -rf $W/src $W/out && cp -r $REPO/.devcarry/causal_conv1d $W/src && rm -rf $W/src/wheels
# the device code compressed for size: under 30 MB to carry (CUDA 13's drivers read it)
grep -q -- "--compress-mode=size" $W/src/setup.py || \
  sed -i 's/"--use_fast_math",/"--use_fast_math", "--compress-mode=size",/' $W/src/setup.py
grep -q -- "--compress-mode=size" $W/src/setup.py
(cd $W/src && PATH=$V:$W/cuda/bin:$PATH CUDA_HOME=$W/cuda CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 \
  MAX_JOBS=${MAX_JOBS:-2} $V/pip install -q --no-build-isolation --no-deps --no-index --target $W/out .)
D=$REPO/.devcarry/causal_conv1d_built; rm -rf $D.tmp && mkdir -p $D.tmp
cp -r $W/out/causal_conv1d $D.tmp/
for so in $W/out/causal_conv1d_cuda*.so; do strip --strip-debug -o $D.tmp/$(basename $so) $so; done
rm -rf $D.tmp/causal_conv1d/__pycache__ && rm -rf $D && mv $D.tmp $D
# the symbols resolve against this torch (the kernels themselves need the GPU)
(cd /tmp && LD_BIND_NOW=1 PYTHONPATH=$D $V/python -c "import torch, causal_conv1d, causal_conv1d_cuda; print('imports')")
du -sh $D
