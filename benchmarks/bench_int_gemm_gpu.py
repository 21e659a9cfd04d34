"""GPU benchmarks of the Triton integer kernel (DDQ_SPEC.md Section 5) on the shapes of issue 6.

- packed 4-bit GEMV, 16384×16384 weights, M = 1 and 16: weight bytes per second against the copy
  bandwidth of the same card (copy counts read + write);
- int GEMM 8192×4096×4096 with 4-bit LUT weights against torch._int_mm (int8 × int8 → int32).
Each shape sweeps tile configurations (split K, tile sizes, decode variants; decode-once tiles and TMA for
the GEMM) and reports the best. Every configuration's acc and codes must equal an independent torch
reference (float64 matmul for the GEMV, torch._int_mm for the GEMM, int64 epilogue in torch).
Times are GPU times of a CUDA-graph replay with L2 flushed first (bench_graph), copy and torch._int_mm
timed the same way; the eager time (do_bench, host launch overhead included) is logged beside each.
Run as a script (writes JSON) or with `pytest benchmarks --benchmark-only`.
"""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from cuda_timing import captured

GEMV_N = GEMV_K = 16384
GEMM_M, GEMM_N, GEMM_K = 8192, 4096, 4096


def bench(fn, repeats: int = 40) -> float:
    """Median seconds per call, host included (triton.testing.do_bench flushes L2 between calls). A call of
    several short kernels is host-bound here: see bench_graph."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=repeats, return_mode="median") / 1e3


def bench_graph(fn, repeats: int = 40) -> float:
    """Median seconds of one replay of fn captured as a CUDA graph, L2 flushed before each replay (outside the
    timed events): the GPU time of the call without Python launch overhead (each Triton launch costs the
    host tens of µs, more than the GEMV's kernels take on the GPU)."""
    replay = captured(fn)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


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


def decoded_weights_torch(packed, lut_w, bits_w, k, rows):
    width = {1: 1, 2: 2, 4: 4, 8: 8}[bits_w]
    part = packed[rows].to(torch.int32)
    codes = torch.stack([(part >> (s * width)) & ((1 << width) - 1) for s in range(8 // width)], dim=-1)
    codes = codes.reshape(part.shape[0], -1)[:, :k].long()
    return torch.gather(lut_w[rows], 1, codes)


def reference(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §5 in torch ops only: exact float64 (|acc| < 2^53) for M ≤ 16, torch._int_mm otherwise."""
    codes_x, lut_x, packed, lut_w, mult, offset, shift, i_min, bits_out, bits_w, k = args
    m, n = codes_x.shape[0], packed.shape[0]
    x = lut_x.to(torch.int32)[codes_x.long()]
    acc = torch.empty((m, n), dtype=torch.int32, device="cuda")
    for start in range(0, n, 2048):
        rows = slice(start, min(n, start + 2048))
        w = decoded_weights_torch(packed, lut_w, bits_w, k, rows)
        if m <= 16:
            acc[:, rows] = (x.double() @ w.double().T).to(torch.int32)
        else:
            shifted = (x - 128).to(torch.int8)
            acc[:, rows] = torch._int_mm(shifted, w.T.contiguous()) + 128 * w.to(torch.int32).sum(1)[None, :]
    z = acc.long() * mult.long()[None, :] + offset[None, :]
    half = 1 << (shift - 1)
    index = torch.where(z < -half, torch.zeros_like(z), torch.clamp((z + half) >> shift, max=255))
    index = torch.maximum(index, i_min.long()[None, :])
    return acc, (index >> (8 - bits_out)).to(torch.uint8)


def copy_bandwidth() -> float:
    source = torch.empty(GEMV_N * GEMV_K // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds = bench_graph(lambda: target.copy_(source))
    return 2 * source.numel() / seconds


def sweep(args, configs, log) -> tuple[float, object]:
    from ddq_kernels.int_gemm import int_gemm_packed

    want = reference(args)
    best = (float("inf"), None)
    for config, predecode in configs:
        label = f"{config} predecode={predecode}"
        try:
            result = int_gemm_packed(*args, config=config, predecode=predecode)
        except Exception as error:  # a config the compiler rejects (e.g. shared memory) is skipped
            print(f"  skip {label}: {type(error).__name__}: {str(error)[:160]}", flush=True)
            continue
        equal = torch.equal(result[0], want[0]) and torch.equal(result[1], want[1])
        call = lambda: int_gemm_packed(*args, config=config, predecode=predecode)  # noqa: E731
        seconds, eager = bench_graph(call), bench(call)
        print(f"  {label}: {seconds * 1e6:.1f} us (eager {eager * 1e6:.1f} us){'' if equal else '  MISMATCH'}",
              flush=True)
        log.append({"config": label, "seconds": seconds, "eager_seconds": eager, "equal": equal})
        if equal:
            best = min(best, (seconds, label), key=lambda item: item[0])
    return best


def gemv_configs(m: int):
    from ddq_kernels.int_gemm import DECODE_GATHER, DECODE_NIBBLE_MMA, DECODE_NIBBLE_PTX, TileConfig, default_config

    yield default_config(m, GEMV_N, 4, GEMV_K // 2, torch.device("cuda"), nibble_ptx=True), None
    yield default_config(m, GEMV_N, 4, GEMV_K // 2, torch.device("cuda")), None
    if m == 1:
        variants = ((32, 256, 8, DECODE_NIBBLE_PTX, 4, 1), (16, 512, 8, DECODE_NIBBLE_PTX, 4, 3),
                    (32, 512, 4, DECODE_NIBBLE_PTX, 4, 3), (16, 256, 8, 0, 4, 3))
    else:
        variants = ((32, 256, 8, DECODE_GATHER, 4, 3),)
    for block_n, block_kb, split, decode, warps, stages in variants:
        yield TileConfig(1 if m == 1 else 16, block_n, block_kb, num_warps=warps, num_stages=stages, decode=decode,
                         group_m=1, split_k=split), True
    if m > 1:
        # The CUDA C fragment decode (nibble_mma_gemv.py): 16-row tiles per warp, warps on rows, warps on K,
        # cp.async ring stages, K splits.
        for row_tiles, warps_n, warps_k, stages, split in ((2, 1, 8, 2, 1), (2, 1, 8, 3, 1), (2, 1, 4, 2, 1),
                                                           (2, 2, 4, 2, 1), (1, 1, 8, 2, 1), (2, 4, 2, 2, 2)):
            yield TileConfig(16, 16 * row_tiles * warps_n, 64, num_warps=warps_n * warps_k, num_stages=stages,
                             decode=DECODE_NIBBLE_MMA, split_k=split, row_tiles=row_tiles), True
        for block_n, block_kb, split, warps, stages, as_a in ((64, 128, 8, 4, 3, True), (64, 128, 8, 4, 4, True),
                                                               (64, 128, 16, 4, 3, True), (128, 128, 8, 8, 3, True),
                                                               (64, 256, 4, 4, 3, False)):
            yield TileConfig(16, block_n, block_kb, num_warps=warps, num_stages=stages, decode=DECODE_NIBBLE_PTX,
                             group_m=1, split_k=split, weights_as_a=as_a), True


def gemm_configs():
    from ddq_kernels.int_gemm import DECODE_LOAD, DECODE_NIBBLE_PTX, TileConfig

    for bm, bn, bk, warps, stages, decode in ((128, 128, 128, 8, 4, DECODE_LOAD),
                                              (128, 128, 128, 8, 4, DECODE_NIBBLE_PTX),
                                              (128, 128, 256, 8, 3, DECODE_NIBBLE_PTX),
                                              (256, 128, 128, 8, 3, DECODE_NIBBLE_PTX)):
        yield TileConfig(bm, bn, bk, num_warps=warps, num_stages=stages, group_m=8, decode_once=True, tma=True,
                         decode=decode), None


def run_all(save=lambda results: None) -> dict:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    copy = copy_bandwidth()
    results["copy_bandwidth_bytes_per_s"] = copy
    weight_bytes = GEMV_N * GEMV_K // 2
    for m in (1, 16):
        print(f"GEMV M={m}", flush=True)
        log = []
        seconds, config = sweep(layer(m, GEMV_N, GEMV_K), list(gemv_configs(m)), log)
        bandwidth = weight_bytes / seconds
        results[f"gemv_4bit_m{m}"] = {"seconds": seconds, "weight_bytes_per_s": bandwidth,
                                      "fraction_of_copy": bandwidth / copy, "config": config, "sweep": log}
        save(results)
    print("GEMM", flush=True)
    a = torch.randint(-128, 127, (GEMM_M, GEMM_K), dtype=torch.int8, device="cuda")
    # cuBLASLt's fast int8 layout: the second operand column-major (a transposed (N, K) tensor).
    b = torch.randint(-128, 127, (GEMM_N, GEMM_K), dtype=torch.int8, device="cuda").t()
    int_mm = min(bench_graph(lambda: torch._int_mm(a, b)), bench_graph(lambda: torch._int_mm(a, b.contiguous())))
    args = layer(GEMM_M, GEMM_N, GEMM_K)
    log = []
    seconds, config = sweep(args, list(gemm_configs()), log)
    ops = 2 * GEMM_M * GEMM_N * GEMM_K
    results["gemm_4bit"] = {"seconds": seconds, "tops": ops / seconds / 1e12, "int_mm_seconds": int_mm,
                            "int_mm_tops": ops / int_mm / 1e12, "ratio_to_int_mm": int_mm / seconds,
                            "config": config, "sweep": log, "parts": gemm_parts(args)}
    save(results)
    results["crossover_4096x4096"] = crossover()
    return results


def crossover() -> dict:
    """In-load decode (forced, whatever default_config's threshold) against decode-once, N = K = 4096."""
    from ddq_kernels.int_gemm import DECODE_NIBBLE_PTX, TileConfig, default_config, int_gemm_packed, split_for

    times = {}
    for m in (16, 64, 128, 256, 1024):
        args = layer(m, 4096, 4096)
        block_m = 16 if m <= 16 else 64
        tiles = triton_cdiv(4096, 64) * triton_cdiv(m, block_m)
        in_load = TileConfig(block_m, 64, 128, split_k=split_for(tiles, 16, torch.device("cuda")),
                             group_m=1 if block_m == 16 else 8, decode=DECODE_NIBBLE_PTX, weights_as_a=True)
        decode_once = default_config(4096, 4096, 4, 2048, torch.device("cuda"), nibble_ptx=True)
        for name, config in (("in_load", in_load), ("decode_once", decode_once)):
            times[f"m{m}_{name}"] = bench_graph(lambda: int_gemm_packed(*args, config=config))
        print(f"  M={m}: in-load {times[f'm{m}_in_load'] * 1e6:.1f} us, decode once "
              f"{times[f'm{m}_decode_once'] * 1e6:.1f} us", flush=True)
    return times


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_parts(args) -> dict:
    """Seconds of the decode-once stages alone: activation decode, weight decode (each variant)."""
    from ddq_kernels.int_gemm import DECODE_BYTES, DECODE_NIBBLE_PTX, decode_activations, decode_weights

    codes_x, lut_x, packed, lut_w = args[:4]
    return {"decode_activations": bench_graph(lambda: decode_activations(codes_x, lut_x, 128, torch.int8, 1, GEMM_K)),
            "decode_weights": bench_graph(lambda: decode_weights(packed, lut_w, 4, GEMM_K, GEMM_K, True)),
            "decode_weights_by_byte": bench_graph(
                lambda: decode_weights(packed, lut_w, 4, GEMM_K, GEMM_K, True, DECODE_BYTES)),
            "decode_weights_nibble_ptx": bench_graph(
                lambda: decode_weights(packed, lut_w, 4, GEMM_K, GEMM_K, True, DECODE_NIBBLE_PTX))}


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
    print(json.dumps({key: value for key, value in results.items() if not isinstance(value, dict)}, indent=2))
    for key, value in results.items():
        if isinstance(value, dict):
            print(key, {name: item for name, item in value.items() if name != "sweep"})


if __name__ == "__main__":
    main()
