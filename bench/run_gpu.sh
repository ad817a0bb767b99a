#!/usr/bin/env bash
# Everything on a GPU, unbudgeted: build, the full `pytest -m cuda`, every benchmark, then the
# 2000-step quality trainings (tens of minutes). A session with 15 device-minutes runs
# bench/gpu_check.sh instead (the same proof trimmed to ~6 minutes).
# Usage (from the repo root on a CUDA machine): bash bench/run_gpu.sh [OUTDIR]
# Logs go to OUTDIR (default bench/results/logs); benchmark rows are appended to
# bench/results/<device>.json by bench/conftest.py -- commit those with the device named.
set -uo pipefail
out=${1:-bench/results/logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# This GPU's architecture only (the default builds sm_80 and sm_90).
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
export FASTCGAN_CUDA_ARCHS=${FASTCGAN_CUDA_ARCHS:-$cap}
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python3 -c "import fastcgan.ops as o; [print(f'{k:7s}', v.available, v.reason) for k, v in o.available_backends().items()]" | tee "$out/backends.log"
# Correctness first: kernels that are wrong are not worth timing.
python3 -m pytest tests -m cuda -q -x --timeout=600 2>&1 | tee "$out/test_cuda.log" | tail -30
# GPU rows only (device time is scarce; the CPU rows are measured on CPU machines). The
# quality comparison (two 2000-step trainings) goes last.
python3 -m pytest bench -m cuda -q -s --timeout=900 -k "not quality" 2>&1 | tee "$out/bench.log" | tail -80
python3 -m pytest bench/test_train_quality.py -m cuda -q -s --timeout=900 2>&1 | tee "$out/bench_quality.log" | tail -20
