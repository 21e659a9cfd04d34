#!/usr/bin/env bash
# One device call for the integer deployment work: the GPU benchmarks of ddq_kernels/int_gemm.py (every
# swept config checked against a torch reference), then the GPU tests (pytest -m gpu); JSON and logs go to
# $OUT (copied into benchmarks/results/ afterwards). Timeouts keep the call inside a short device lease.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${BENCH_TIMEOUT:-150}" python benchmarks/bench_int_gemm_gpu.py --out "$OUT/bench_int_gemm_gpu.json" \
    > "$OUT/bench_int_gemm_gpu.log" 2>&1
tail -12 "$OUT/bench_int_gemm_gpu.log"
[ "${SKIP_TESTS:-0}" = 1 ] || timeout "${TEST_TIMEOUT:-80}" python -m pytest -m gpu -v -x ${TEST_PATHS:-tests/test_int_gemm_gpu.py} \
    -p no:cacheprovider --durations=8 --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
tail -25 "$OUT/gpu_tests.log"
