"""Tilings of the CUDA C forward and backward-weight GEMMs (`linear_forward_cuda`, `linear_backward_weight_cuda`)
on the CNN shapes, for choosing their `layout` defaults (docs/kernels.md, runs 8 and 29): GPU time a call as
`fastest_config` measures it (`launch.graph_times`: CUDA-graph replays with L2 flushed; bf16, ReLU x, W4A4), each
variant checked against the default tiling's result. Variants that the card cannot run (shared memory, a
compile error) are reported and skipped.
Usage on a CUDA machine: python benchmarks/probe_cuda_tiles.py [--weights] [M K N ...]
"""

from __future__ import annotations

import argparse

import torch

from bench_linear import gemm_operands
from ddq_kernels.launch import graph_times
from ddq_kernels.level_table import level_table
from ddq_kernels.linear_backward_weight_cuda import layout as weight_layout, linear_backward_weight_cuda, shared_bytes as weight_bytes
from ddq_kernels.linear_forward_cuda import layout as forward_layout, linear_forward_cuda, shared_bytes as forward_bytes

SHAPES = [(100352, 192, 32), (401408, 576, 64), (200704, 144, 32), (50176, 384, 64), (50176, 576, 96),
          (200704, 64, 128), (12544, 960, 160), (25088, 1024, 256), (100352, 32, 192)]
# More resident blocks an SM (run 29): each compiles without spills under nvcc for sm_90 (MIN_BLOCKS caps the
# registers at 65536 / (THREADS · MIN_BLOCKS)).
FORWARD_TILINGS = {
    "narrow": [{}, {"MIN_BLOCKS": 4}, {"M_TILES": 1, "MIN_BLOCKS": 4}, {"M_TILES": 1, "MIN_BLOCKS": 5},
               {"WARPS_N": 1, "M_TILES": 1, "MIN_BLOCKS": 8}, {"WARPS_N": 1, "WARPS_M": 8, "M_TILES": 1, "MIN_BLOCKS": 4},
               {"BLOCK_K": 128, "M_TILES": 1, "MIN_BLOCKS": 4}, {"BLOCK_K": 32, "STAGES": 3}],
    "middle": [{}, {"MIN_BLOCKS": 4}],
    "wide": [{}, {"MIN_BLOCKS": 3}],
}
WEIGHT_TILINGS = [{}, {"STAGES": 3}, {"STAGES": 4}, {"STAGES": 4, "BLOCK_M": 32}, {"STAGES": 3, "BLOCK_K": 128, "MIN_BLOCKS": 2},
                  {"STAGES": 3, "MIN_BLOCKS": 3}]
SHARED_LIMIT = 227 * 1024


def forward_tilings(n: int) -> list[dict]:
    return FORWARD_TILINGS["narrow" if n <= 64 else "middle" if n <= 128 else "wide"]


def probe(label: str, tilings: list[dict], fits, run, reference, same) -> None:
    runnable = []
    for tiling in tilings:
        if not fits(tiling):
            print(f"{label} {str(tiling):60s} skipped: more than {SHARED_LIMIT} bytes of shared memory")
            continue
        try:
            result = run(tiling)
        except Exception as error:  # a compile or launch failure of one variant must not end the probe
            print(f"{label} {str(tiling):60s} failed: {type(error).__name__}: {str(error)[:120]}")
            continue
        runnable.append((tiling, same(result, reference)))
    times = graph_times([tiling for tiling, _ in runnable], run)
    for (tiling, agrees), ms in zip(runnable, times):
        print(f"{label} {str(tiling):60s} {1000 * ms:8.1f} us  agrees: {agrees}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", action="store_true", help="also the backward-weight GEMM's tilings")
    parser.add_argument("shape", nargs="*", type=int, help="M K N triples (default: SHAPES)")
    args = parser.parse_args()
    shapes = [tuple(args.shape[i:i + 3]) for i in range(0, len(args.shape), 3)] or SHAPES
    print(torch.cuda.get_device_name())
    logits = torch.tensor([3.0] * 4 + [-3.0] * 4, device="cuda")
    for M, K, N in shapes:
        x, w_q, grad_y, lo, hi = gemm_operands(M, K, N)
        table = level_table(lo, hi, torch.zeros(1, 256, device="cuda"), logits, 2)
        label = f"{M}×{K}×{N} forward"
        probe(label, forward_tilings(N), lambda t: forward_bytes(forward_layout(N, **t)) <= SHARED_LIMIT,
              lambda t: linear_forward_cuda(x, w_q, None, lo, hi, table, logits, 2, t),
              linear_forward_cuda(x, w_q, None, lo, hi, table, logits, 2), torch.equal)  # same summation order
        if args.weights:
            probe(f"{M}×{K}×{N} dW     ", WEIGHT_TILINGS, lambda t: weight_bytes(weight_layout(N, **t)) <= SHARED_LIMIT,
                  lambda t: linear_backward_weight_cuda(grad_y, x, lo, hi, table, logits, 2, t),
                  linear_backward_weight_cuda(grad_y, x, lo, hi, table, logits, 2),
                  lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-3))  # splits change the float32 order


if __name__ == "__main__":
    main()
