#!/usr/bin/env bash
# The GPU check for one 15-minute lease (written for an H200 with its own python3: torch 2.11, Triton 3.6).
#   OUT=DIR bash bench/gpu_check.sh                          on the GPU machine (PYTHON=... picks the interpreter)
#   GPU_CHECK_DRY_RUN=1 OUT=DIR bash bench/gpu_check.sh      the same plumbing on the CPU: Triton interpreter,
#                                                            tiny shapes, CUDA-only steps reported as SKIPPED
# Steps, by value (each with its own limit, all under one deadline of GPU_CHECK_BUDGET seconds: default 345,
# 235 for the dry run; GPU_CHECK_TIMEOUT_SCALE multiplies the step limits):
#   device info, and the CUDA extension's build started in the background; Triton first light
#   (bench/gpu_checks.py: kernels and CEMLoss vs float64, no host sync, CUDA graphs, timings, full covariance,
#   refit); the same for the cuda backend once built; tests/gpu (verbose, JUnit); the kernel grid; the
#   training step (with a validate=False row); inference with and without CEM; the first torch.compile.
# Logs go to $OUT (8 files at most), the summary (<= 40 lines) is printed last and written to $OUT/summary.txt.
# Compiler caches live in .gpu_cache/ (git-ignored), so an immediate second run is warm.
# A failing step never stops the next. Exit status: 1 when a step failed or timed out or a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder for the logs}
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/summary.txt "$OUT"/junit.xml
DRY=${GPU_CHECK_DRY_RUN:-0}
export GPU_CHECK_DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-$((DRY ? 235 : 345))} ))
CACHE="$PWD/.gpu_cache"
export TRITON_CACHE_DIR="$CACHE/triton"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  export CEM_FAST_CACHE="${CEM_FAST_CACHE:-$CACHE/cem_fast}"   # the caller's C++ build, if any, stays usable
  DEV=cpu; TINY=--tiny
else
  unset TRITON_INTERPRET
  export CEM_FAST_CACHE="$CACHE/cem_fast"
  DEV=cuda; TINY=
fi
mkdir -p "$TRITON_CACHE_DIR" "$CEM_FAST_CACHE"
RUN=("$PY" bench/gpu_check_runner.py step)
LOG_DEV="$OUT/00_device.log"; LOG_BUILD="$OUT/01_cuda_build.log"; LOG_TRI="$OUT/10_triton.log"
LOG_CUDA="$OUT/20_cuda.log"; LOG_TEST="$OUT/30_tests_gpu.log"; LOG_BENCH="$OUT/40_bench.log"

# 0. the machine, and the CUDA build in the background (60-100 s there; nothing else waits for it)
if [ "$DRY" = 1 ]; then
  "${RUN[@]}" --name cuda-build --log "$LOG_BUILD" --timeout 10 --skipped-if-ok "dry run: no CUDA" -- true
else
  "${RUN[@]}" --name cuda-build --log "$LOG_BUILD" --timeout 240 -- "$PY" -m cem_fast.build --check --cuda &
  BUILD_PID=$!
fi
"${RUN[@]}" --name device --log "$LOG_DEV" --timeout 30 -- "$PY" bench/harness.py

# 1. Triton first light (the refit runs here only: it does not depend on the backend)
"${RUN[@]}" --name triton --log "$LOG_TRI" --timeout 150 --restart -- \
  "$PY" bench/gpu_checks.py --backend triton --device $DEV $TINY

# 2. the cuda backend, once built
if [ "$DRY" = 1 ]; then
  "${RUN[@]}" --name cuda --log "$LOG_CUDA" --timeout 10 --skipped-if-ok "dry run: no CUDA" -- true
else
  wait "$BUILD_PID"
  "${RUN[@]}" --name cuda --log "$LOG_CUDA" --timeout 100 --restart -- "$PY" bench/gpu_checks.py --backend cuda \
    --device cuda --checks kernels,loss,nosync,graph-step,graph-paper-diag,graph-official-trained-diag,timings,fullcov
fi

# 3. tests/gpu, verbose, with a JUnit file (on the CPU: collected and skipped)
TEST_FLAGS=()
[ "$DRY" = 1 ] && TEST_FLAGS=(--skipped-if-ok "dry run: collected, all skipped without CUDA")
"${RUN[@]}" --name tests-gpu --log "$LOG_TEST" --timeout 100 "${TEST_FLAGS[@]}" \
  -- "$PY" -m pytest -v -rs -p no:cacheprovider tests/gpu --junitxml="$OUT/junit.xml"

# 4. benchmarks: the kernel grid, the training step, inference with and without CEM, the first compile
if [ "$DRY" = 1 ]; then
  GRID=(--device cpu --quick --batches 16 --dims 48 --backends torch triton --refit-dims 32 --refit-runs 1 --threads 2)
  STEP=(--device cpu --quick --batch 4 --backends triton --variants paper --threads 2)
  INFER=(--device cpu --quick --models resnet20-c5-32 --threads 2)
else
  GRID=(--device cuda --quick --batches 128 1024 8192 --dims 512 2048 --no-refit --variants paper official-trained)
  STEP=(--device cuda --warmup 3 --steps 20 --rounds 1)
  INFER=(--device cuda --models vgg11-c4-32 --train-steps 3 --rounds 2 --min-run-time 0.2)
fi
"${RUN[@]}" --name kernel-grid --log "$LOG_BENCH" --timeout 60 -- "$PY" bench/bench_kernels.py "${GRID[@]}"
"${RUN[@]}" --name train-step --log "$LOG_BENCH" --timeout $((DRY ? 120 : 60)) -- "$PY" bench/train_step.py "${STEP[@]}"
"${RUN[@]}" --name inference --log "$LOG_BENCH" --timeout $((DRY ? 90 : 75)) -- \
  "$PY" bench/inference_overhead.py "${INFER[@]}"
if [ "$DRY" = 1 ]; then
  "${RUN[@]}" --name first-compile --log "$LOG_BENCH" --timeout 10 --skipped-if-ok "dry run: minutes on this CPU" -- true
else
  "${RUN[@]}" --name first-compile --log "$LOG_BENCH" --timeout 90 -- \
    "$PY" bench/train_step.py --device cuda --quick --backends triton --compile
fi

"$PY" bench/gpu_check_runner.py summary --out "$OUT"
