"""GPU benchmarks of the Triton integer kernel (DDQ_SPEC.md Section 5) on the shapes of issue 6.

- packed 4-bit GEMV, 16384×16384 weights, M = 1 and 16: weight bytes per second against the copy
  bandwidth of the same card (copy counts read + write);
- int GEMM 8192×4096×4096 with 4-bit LUT weights against torch._int_mm (int8 × int8 → int32).
Each shape sweeps a few tile configurations and reports the best; results are checked for equality
with the default configuration. Run as a script (writes JSON) or with `pytest benchmarks --benchmark-only`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import pytest
import torch

GEMV_N = GEMV_K = 16384
GEMM_M, GEMM_N, GEMM_K = 8192, 4096, 4096


def bench(fn, repeats: int = 50) -> float:
    """Median seconds per call (triton.testing.do_bench flushes L2 between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=repeats, return_mode="median") / 1e3


def layer(m: int, n: int, k: int, bits_w: int = 4):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randint(low, high, shape, dtype):
        return torch.randint(low, high, shape, generator=g, device="cuda", dtype=torch.int64).to(dtype)

    width = {1: 1, 2: 2, 4: 4, 8: 8}[bits_w]
    codes_x = randint(0, 16, (m, k), torch.uint8)
    lut_x = randint(0, 256, (16,), torch.uint8)
    per_byte = 8 // width
    packed = randint(0, 256, (n, k // per_byte), torch.uint8)
    lut_w = randint(-127, 128, (n, 1 << bits_w), torch.int8)
    mult = randint(0, 1 << 10, (n,), torch.int32)
    offset = randint(-(1 << 30), 1 << 30, (n,), torch.int64)
    i_min = torch.zeros(n, dtype=torch.int32, device="cuda")
    return codes_x, lut_x, packed, lut_w, mult, offset, 20, i_min, 4, bits_w, k


def copy_bandwidth() -> float:
    source = torch.empty(GEMV_N * GEMV_K // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds = bench(lambda: target.copy_(source))
    return 2 * source.numel() / seconds


def sweep(args, configs, predecode=None) -> tuple[float, object]:
    from ddq_kernels.int_gemm import int_gemm_packed

    reference = int_gemm_packed(*args, predecode=predecode)
    best = (float("inf"), None)
    for config in configs:
        try:
            result = int_gemm_packed(*args, config=config, predecode=predecode)
        except Exception as error:  # a config the compiler rejects (e.g. shared memory) is skipped
            print(f"  skip {config}: {type(error).__name__}: {str(error)[:120]}", flush=True)
            continue
        assert torch.equal(result[0], reference[0]) and torch.equal(result[1], reference[1]), config
        seconds = bench(lambda: int_gemm_packed(*args, config=config, predecode=predecode))
        print(f"  {config}: {seconds * 1e6:.1f} us", flush=True)
        best = min(best, (seconds, config), key=lambda item: item[0])
    return best


def gemv_configs():
    from ddq_kernels.int_gemm import TileConfig

    for block_n, block_kb, decode, warps in itertools.product((16, 32, 64), (256, 512), (0, 1), (4,)):
        yield TileConfig(16, block_n, block_kb, num_warps=warps, num_stages=3, decode=decode, group_m=1)


def gemm_configs():
    from ddq_kernels.int_gemm import TileConfig

    for (bm, bn), block_kb, decode, stages in itertools.product(((128, 128), (128, 256)), (32, 64), (0, 1), (3,)):
        yield TileConfig(bm, bn, block_kb, num_warps=8, num_stages=stages, decode=decode, group_m=8)


def run_all(save=lambda results: None) -> dict:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    copy = copy_bandwidth()
    results["copy_bandwidth_bytes_per_s"] = copy
    weight_bytes = GEMV_N * GEMV_K // 2
    for m in (1, 16):
        print(f"GEMV M={m}", flush=True)
        seconds, config = sweep(layer(m, GEMV_N, GEMV_K), list(gemv_configs()))
        bandwidth = weight_bytes / seconds
        results[f"gemv_4bit_m{m}"] = {"seconds": seconds, "weight_bytes_per_s": bandwidth,
                                      "fraction_of_copy": bandwidth / copy, "config": repr(config)}
        save(results)
    print("GEMM", flush=True)
    a = torch.randint(-128, 127, (GEMM_M, GEMM_K), dtype=torch.int8, device="cuda")
    # cuBLASLt's fast int8 layout: the second operand column-major (a transposed (N, K) tensor).
    b = torch.randint(-128, 127, (GEMM_N, GEMM_K), dtype=torch.int8, device="cuda").t()
    int_mm = min(bench(lambda: torch._int_mm(a, b)), bench(lambda: torch._int_mm(a, b.contiguous())))
    args = layer(GEMM_M, GEMM_N, GEMM_K)
    seconds, config = sweep(args, list(gemm_configs()), predecode=True)
    ops = 2 * GEMM_M * GEMM_N * GEMM_K
    results["gemm_4bit"] = {"seconds": seconds, "tops": ops / seconds / 1e12, "int_mm_seconds": int_mm,
                            "int_mm_tops": ops / int_mm / 1e12, "ratio_to_int_mm": int_mm / seconds,
                            "config": repr(config)}
    return results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_gemv_4bit_m1(benchmark):
    from ddq_kernels.int_gemm import int_gemm_packed

    args = layer(1, GEMV_N, GEMV_K)
    benchmark(lambda: (int_gemm_packed(*args), torch.cuda.synchronize()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    start = time.time()

    def save(results: dict) -> None:
        results["wall_seconds"] = time.time() - start
        with open(options.out, "w") as handle:
            json.dump(results, handle, indent=2)

    results = run_all(save)
    save(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
