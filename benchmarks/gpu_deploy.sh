#!/usr/bin/env bash
# One device call for the integer deployment work: GPU tests (pytest -m gpu on the deploy/int_gemm test
# files), then the GPU benchmarks; JSON and logs go to $OUT (copied into benchmarks/results/ afterwards).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
pip install -e . --no-deps --no-build-isolation -q > "$OUT/install.log" 2>&1 || echo "pip install failed" >> "$OUT/install.log"
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 130 python -m pytest -m gpu -q -x tests/test_int_gemm_gpu.py tests/test_int_gemm_backends.py \
    tests/test_deploy_model.py -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
PYTHONPATH=$PWD timeout 220 python benchmarks/bench_int_gemm_gpu.py --out "$OUT/bench_int_gemm_gpu.json" 2>&1 | tail -150 > "$OUT/bench.log"
tail -40 "$OUT/bench.log"
