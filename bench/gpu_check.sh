#!/usr/bin/env bash
# The budgeted GPU proof: build, correctness, kernel table, training, inference in ~8 minutes on
# one H100/H200 (a session has 15 device-minutes, <= 10 per command: run it, fix, rerun what failed;
# the first H200 run, 2026-11-27, took 470 s and still cut the batch-8 training and AOTI rows).
#
#   bash bench/gpu_check.sh OUTDIR                 # on the GPU machine, from the repo root
#   bash bench/gpu_check.sh OUTDIR --dry-run       # the same stages at tiny sizes on the CPU
#   bash bench/gpu_check.sh OUTDIR --stages 3,5    # rerun some stages (1 = build + environment)
#   bash bench/gpu_check.sh OUTDIR --skip-build    # reuse fastcgan._C as installed
#   GPU_CHECK_TRAIN_BATCHES=8 bash bench/gpu_check.sh OUTDIR --stages 1,4   # one batch size
#   bash bench/gpu_check.sh /tmp/gc --bundle $OUT/gc.tgz   # through the device tool (<= 8 files back)
#   python bench/gpu_check.py merge --out OUTDIR   # back home: append to bench/results/<device>.json
#
# Stages, in priority order, each under its own `timeout` (GPU_CHECK_T_<STAGE>=secs overrides one,
# e.g. GPU_CHECK_T_TRAIN=240, GPU_CHECK_T_CORRECT_TRITON_NCHW=200):
#   1 build    fastcgan._C for this GPU's architecture only; versions; available_backends()
#   2 correct  pytest -m cuda, trimmed (triton in 4 processes | native CUDA + CUDA-graph replay,
#              in parallel); in the background meanwhile: the AOTInductor bf16 package is compiled
#              and then loaded in a fresh process (correct-aoti), and stages 4 and 5's compiles
#              warm Inductor's caches (train-warm-b<N>, infer-warm; 4 compile threads each)
#   3 kernels  instance_norm_act fwd+bwd at the ResNet-9 256² shapes, batch 1/8, fp32/bf16; then
#              (kernels-one-pass-off) the channels_last bf16 64²/128² rows with FASTCGAN_ONE_PASS=0
#   4 train    official eager fp32 step vs fastcgan's fastest configuration, batch 1 and 8, the
#              eager extras, CUT / FastCUT, pix2pix (120 s); memory: one steady step's peak, the
#              warm-up's (cuDNN autotuning scratch) apart
#   5 infer    ResNet-9 256², batch 1 and 32: eager fp32, compiled + CUDA graphs bf16, AOTInductor
#   then       train-no-cudnn-benchmark (the eager step without cuDNN autotuning, its own process)
#              and train-late: the cold-compiling training variant (native CUDA kernels forced), in
#              whatever is left of the budget (with stage 4 selected)
# Every measured row lands in OUTDIR/rows.jsonl as soon as it exists, each stage's log in
# OUTDIR/<stage>.log and its exit status in OUTDIR/stages.jsonl, so a kill at any point keeps
# every finished stage. The last step (report) writes OUTDIR/<device>.json and prints the targets.
# Environment: PYTHON (default python3); GPU_CHECK_COMMIT (the device copy has no .git: pass
# the commit that was copied); GPU_CHECK_WORK (scratch for the AOTI package, default
# /tmp/fastcgan-gpu-check-work); GPU_CHECK_BUDGET_S (the whole run, default 540 s: leaves room in
# 15 device-minutes for start-up and a rerun); FASTCGAN_CUDA_ARCHS (default: this GPU's);
# GPU_CHECK_DRY_AOTI=1 (the dry run also builds the AOTInductor package: +30 s on a small CPU);
# GPU_CHECK_BG_COMPILE_THREADS (Inductor compile workers of each background compile, default 4).
set -uo pipefail

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in
  -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
  -*) echo "gpu_check: OUTDIR comes first (got $1)" >&2; usage ;;
esac
OUT=$1; shift
DRY=0; SKIP_BUILD=0; STAGES=1,2,3,4,5; BUNDLE=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --bundle) [ $# -ge 2 ] || usage; BUNDLE=$2; shift ;;
    --skip-build) SKIP_BUILD=1 ;;
    --stages) [ $# -ge 2 ] || usage; STAGES=$2; shift ;;
    --stages=*) STAGES=${1#--stages=} ;;
    *) usage ;;
  esac
  shift
done

for s in ${STAGES//,/ }; do
  case $s in 1|2|3|4|5) ;; *) echo "gpu_check: --stages $STAGES: stages are 1 to 5" >&2; exit 2 ;; esac
done
# Every path is checked before anything is written: an OUTDIR that is a file left OUT empty and
# the logs went to / and the repository root.
if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then echo "gpu_check: OUTDIR $OUT is not a folder" >&2; exit 2; fi
if [ -n "$BUNDLE" ]; then
  case $(realpath -m "$BUNDLE")/ in
    "$(realpath -m "$OUT")"/*) echo "gpu_check: --bundle $BUNDLE is inside OUTDIR (it would pack itself)" >&2; exit 2 ;;
  esac
  BDIR=$(dirname "$BUNDLE")
  if [ -e "$BDIR" ] && [ ! -d "$BDIR" ]; then echo "gpu_check: --bundle $BUNDLE: $BDIR is not a folder" >&2; exit 2; fi
  mkdir -p "$BDIR" && BUNDLE=$(cd "$BDIR" && pwd)/$(basename "$BUNDLE") || exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check: cannot make OUTDIR $OUT" >&2; exit 2; }
cd "$(dirname "$0")/.."
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/fastcgan-gpu-check-work}
mkdir -p "$WORK"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
DRYFLAG=()
if [ "$DRY" = 1 ]; then
  DRYFLAG=(--dry-run)
  # Tiny tensors gain nothing from threads; on a shared small CPU a second OpenMP thread per
  # process makes every step several times slower.
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
fi
LOG=$OUT/gpu_check.log
T_START=$(date +%s)
if [ "$DRY" = 0 ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: $PY sees no CUDA GPU (torch.cuda.is_available() is False); on a CPU use --dry-run" >&2
  exit 2
fi

want() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "[gpu_check +$(( $(date +%s) - T_START ))s] $*" | tee -a "$LOG"; }

# Stages stop short of the device tool's 10-minute limit per command: every stage's timeout is cut
# to what is left of GPU_CHECK_BUDGET_S (default 540) less a reserve for the report, and a stage
# with under 20 s left is skipped (recorded as rc 125).
BUDGET=${GPU_CHECK_BUDGET_S:-540}

# run_stage NAME TIMEOUT_S CMD...: CMD's output to OUTDIR/NAME.log, its status to stages.jsonl.
run_stage() {
  local name=$1 limit=$2; shift 2
  local var="GPU_CHECK_T_${name^^}"; var=${var//-/_}
  limit=${!var:-$limit}
  local left=$(( T_START + BUDGET - 15 - $(date +%s) ))
  if [ $left -lt 20 ]; then
    say "stage $name: SKIPPED (${left}s of the ${BUDGET}s budget left)"
    printf '{"stage": "%s", "rc": 125, "timed_out": false, "skipped": true, "seconds": 0.0, "timeout_s": 0}\n' \
      "$name" >>"$OUT/stages.jsonl"
    return 125
  fi
  [ $left -lt $limit ] && limit=$left
  local t0; t0=$(date +%s%N)
  say "stage $name: start (timeout ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  local to=false; { [ $rc = 124 ] || [ $rc = 137 ]; } && to=true
  printf '{"stage": "%s", "rc": %d, "timed_out": %s, "seconds": %d.%d, "timeout_s": %d}\n' \
    "$name" "$rc" "$to" $((ms / 1000)) $(((ms % 1000) / 100)) "$limit" >>"$OUT/stages.jsonl"
  say "stage $name: rc $rc$([ $to = true ] && echo ' (TIMED OUT)') in $((ms / 1000))s"
  if [ $rc != 0 ]; then tail -n 15 "$OUT/$name.log" | sed "s/^/  $name| /"; fi
  bundle
  return $rc
}

# --bundle FILE.tgz: OUTDIR as one archive, renewed after every stage (the device tool brings
# back at most 8 files; a kill keeps the last archive).
bundle() {
  [ -n "$BUNDLE" ] || return 0
  tar czf "$BUNDLE.$BASHPID.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>/dev/null \
    && mv -f "$BUNDLE.$BASHPID.tmp" "$BUNDLE"
}

gpu_info() {  # driver and the architecture to build for, from nvidia-smi (torch as the fallback)
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>/dev/null | head -1
  fi
}

# ---------------------------------------------------------------------------------------- 1
if want 1; then
  if [ "$DRY" = 0 ]; then
    info=$(gpu_info)
    say "GPU: ${info:-nvidia-smi unavailable}"
    export GPU_CHECK_DRIVER=$(echo "$info" | cut -d, -f2 | tr -d ' ')
    cap=$(echo "$info" | cut -d, -f3 | tr -d ' .')
    [ -n "$cap" ] || cap=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    export FASTCGAN_CUDA_ARCHS=${FASTCGAN_CUDA_ARCHS:-$cap}
    export GPU_CHECK_CUDA_ARCHS=$FASTCGAN_CUDA_ARCHS
    export GPU_CHECK_NVCC=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
    if [ "$SKIP_BUILD" = 0 ]; then
      if ! run_stage build 150 $PY -m pip install --no-build-isolation --no-deps -e .; then
        # Without fastcgan installed nothing runs: install it without the native library, so
        # the Triton and PyTorch rows still come (the cuda backend then reports unavailable).
        say "native build failed (OUTDIR/build.log): installing without fastcgan._C"
        FASTCGAN_BUILD_NATIVE=OFF run_stage build-python-only 60 \
          $PY -m pip install --no-build-isolation --no-deps -e . || exit 1
      fi
    fi
  fi
  run_stage env 45 $PY bench/gpu_check.py env --out "$OUT" "${DRYFLAG[@]}"
  cat "$OUT/env.log" 2>/dev/null | grep -v '^\[gpu_check\]'
fi

# Background compiles share 16 cores with stage 2's five pytest processes: each Inductor process
# would otherwise start min(32, cores) compile workers.
BG_ENV=(env TORCHINDUCTOR_COMPILE_THREADS=${GPU_CHECK_BG_COMPILE_THREADS:-4})
# The AOTInductor package compiles on the CPU (Inductor codegen + C++) while stage 2's tests run,
# then loads in a fresh process (correct-aoti: a correctness check, so it may overlap the tests;
# after them it cost the first H200 run 48 s). Without stage 2 it is built just before stage 5,
# so that no compile competes with the timed stages for the CPU.
aoti_build() {  # [env VAR=value ...]: the prefix of the build command
  run_stage aoti-build 240 "$@" $PY bench/gpu_check.py aoti-build --out "$OUT" --work "$WORK" "${DRYFLAG[@]}"
}
AOTI_PID=
if want 2; then
  { aoti_build "${BG_ENV[@]}"
    run_stage correct-aoti 60 $PY bench/gpu_check.py aoti-check --out "$OUT" --work "$WORK" "${DRYFLAG[@]}"; } &
  AOTI_PID=$!
fi
# Stage 4's step compiles (120 s of 143 s at batch 1 on the first H200 run) and stage 5's compile
# likewise go to the background now, one process per batch size and one for inference: stages 4
# and 5 then find Inductor's caches warm. Waited for before stage 3, so that no compile runs while
# anything is timed.
WARM_PIDS=()
if want 4 && want 2; then
  IFS=, read -ra TB <<<"${GPU_CHECK_TRAIN_BATCHES:-$([ "$DRY" = 1 ] && echo 2 || echo 1,8)}"
  for b in "${TB[@]}"; do
    run_stage "train-warm-b$b" 240 "${BG_ENV[@]}" $PY bench/gpu_check.py train-warm --batch "$b" --out "$OUT" \
      "${DRYFLAG[@]}" &
    WARM_PIDS+=($!)
  done
fi
if want 5 && want 2; then
  run_stage infer-warm 240 "${BG_ENV[@]}" $PY bench/gpu_check.py infer-warm --out "$OUT" "${DRYFLAG[@]}" &
  WARM_PIDS+=($!)
fi

# ---------------------------------------------------------------------------------------- 2
if want 2; then
  # -p live_failures: a traceback as soon as a test fails (a timed-out stage prints no summary).
  PYTEST=(env PYTHONPATH="bench${PYTHONPATH:+:$PYTHONPATH}" $PY -m pytest -q -rfE --tb=short --maxfail=40
          -p no:cacheprovider -p live_failures --durations=10 -m cuda)
  $PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=150)
  # Triton: every backend test except the two full 180-binary option sweeps of the 3x5 plane
  # (JIT time; bash bench/run_gpu.sh runs them): the layer's real option sets on every named
  # shape, all dtypes and layouts, and the real 256² shapes. JIT compiling is single-threaded per
  # process and dominates these tests: with the one-pass kernels (one binary per plane-size class)
  # each layout needs ~215 distinct binaries (counted on the CPU, 2026-11-28), ~70 per dtype, so
  # the Triton tests run as four processes of <= ~150 binaries: NCHW fp32+fp16 | NCHW bf16 |
  # NHWC fp32+fp16 | NHWC bf16 and the other Triton tests (tests/test_gpu_check.py checks that
  # these filters split the Triton tests without gap or overlap).
  run_stage correct-triton-nchw 150 "${PYTEST[@]}" tests/test_instance_norm_act.py \
    -k "triton and nchw and not bf16 and not nchw-3x5-triton-fp32" &
  P1=$!
  run_stage correct-triton-nchw-bf16 150 "${PYTEST[@]}" tests/test_instance_norm_act.py \
    -k "triton and nchw and bf16" &
  P1B=$!
  run_stage correct-triton-nhwc 150 "${PYTEST[@]}" tests/test_instance_norm_act.py \
    -k "triton and nhwc and not bf16" &
  P2=$!
  run_stage correct-triton-other 150 "${PYTEST[@]}" tests/test_instance_norm_act.py \
    -k "triton and not nchw and not (nhwc and not bf16) and not nhwc-3x5-triton-bf16" &
  P2B=$!
  # Native CUDA (no JIT: every option on every shape), the whole-step CUDA-graph capture, then
  # the other GPU tests (no host sync in the step, pool and losses; device data bank; official
  # checkpoints on the GPU; onnxruntime/TensorRT skip or say what is missing; the memory floors).
  # The whole-step tests first: they compile, and a kernel sweep must not starve them of time.
  # test_native sweeps only the shapes test_instance_norm_act does not (ch40, large).
  run_stage correct-cuda 150 "${PYTEST[@]}" tests/test_cuda_graphs.py tests/test_train.py \
    tests/test_image_pool.py tests/test_losses.py tests/test_data.py tests/test_official_checkpoint.py \
    tests/test_deploy.py tests/test_colorization.py tests/test_step_memory.py tests/test_native.py \
    tests/test_instance_norm_act.py -k "not triton and not all_options[1x1- and not all_options[3x5- and not all_options[7x257- and not all_options[1x1024- and not all_options[batch3-" &
  P3=$!
  wait $P1; wait $P1B; wait $P2; wait $P2B; wait $P3
  if [ -n "$AOTI_PID" ]; then wait $AOTI_PID; fi  # aoti-build, then correct-aoti
fi

# ---------------------------------------------------------------------------------------- 3-5
for p in "${WARM_PIDS[@]}"; do wait "$p"; done
if want 3; then
  run_stage kernels 110 $PY bench/gpu_check.py kernels --out "$OUT" "${DRYFLAG[@]}"
  # Both backends read FASTCGAN_ONE_PASS once per process: the one-pass-off rows are a process.
  run_stage kernels-one-pass-off 40 env FASTCGAN_ONE_PASS=0 $PY bench/gpu_check.py kernels-one-pass-off \
    --out "$OUT" "${DRYFLAG[@]}"
fi
# 120 s: with warm caches the priority rows (official and fastest, batch 1 and 8) take ~90 s;
# what does not fit is cut, and stage 5 keeps its time.
want 4 && run_stage train 120 $PY bench/gpu_check.py train --out "$OUT" "${DRYFLAG[@]}"
if want 5; then
  if [ -z "$AOTI_PID" ]; then aoti_build; fi
  run_stage infer 120 $PY bench/gpu_check.py infer --out "$OUT" --work "$WORK" "${DRYFLAG[@]}"
fi
# A process of its own: cuDNN's plan cache would hand this row the plans stage 4 autotuned.
want 4 && run_stage train-no-cudnn-benchmark 45 $PY bench/gpu_check.py train-no-cudnn-benchmark --out "$OUT" \
  "${DRYFLAG[@]}"
want 4 && run_stage train-late 240 $PY bench/gpu_check.py train-late --out "$OUT" "${DRYFLAG[@]}"

# ---------------------------------------------------------------------------------------- report
wait
$PY bench/gpu_check.py report --out "$OUT" 2>&1 | grep -v '^\[gpu_check\]' | tee "$OUT/report.txt"
REPORT_RC=${PIPESTATUS[0]}
say "done in $(( $(date +%s) - T_START ))s; results: $OUT"
bundle
# Non-zero when a stage's latest run failed or timed out (a rerun into OUTDIR replaces a stage's
# earlier record), or the report could not be made; the report above says which.
exit "$REPORT_RC"
