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
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

timeout -s INT "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -W ignore ${TEST_FILTER:+-k "$TEST_FILTER"} \
  tests/test_kernels_launch.py tests/test_kernels_quantize.py tests/test_kernels_linear.py tests/test_kernels_parameter_grads.py \
  tests/test_stem_padding.py tests/test_quantized_conv.py 2>&1 | tee "$OUT/tests.log" | tail -40

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
