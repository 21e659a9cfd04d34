"""Tilings of the CUDA C forward and backward-weight GEMMs (`linear_forward_cuda`, `linear_backward_weight_cuda`)
on the CNN shapes, for choosing their `layout` defaults (docs/kernels.md, run 8): GPU time per call (CUDA events
over 20 back-to-back calls, bf16, ReLU x, W4A4), each variant checked against the default tiling's result.
Usage on a CUDA machine: python benchmarks/probe_cuda_tiles.py
"""

from __future__ import annotations

import torch

from bench_linear import gemm_operands
from ddq_kernels.level_table import level_table
from ddq_kernels.linear_backward_weight_cuda import layout as weight_layout, linear_backward_weight_cuda, shared_bytes as weight_bytes
from ddq_kernels.linear_forward_cuda import layout as forward_layout, linear_forward_cuda, shared_bytes as forward_bytes

SHAPES = [(401408, 576, 64), (100352, 192, 32), (25088, 1024, 256), (100352, 32, 192)]
FORWARD_TILINGS = [{}, {"STAGES": 3}, {"WARPS_M": 4, "WARPS_N": 2, "M_TILES": 1}, {"WARPS_M": 2, "WARPS_N": 4, "M_TILES": 2},
                   {"WARPS_M": 8, "WARPS_N": 1, "M_TILES": 2, "MIN_BLOCKS": 2}, {"WARPS_M": 4, "WARPS_N": 1, "M_TILES": 2, "MIN_BLOCKS": 3},
                   {"STAGES": 3, "MIN_BLOCKS": 1}]
WEIGHT_TILINGS = [{}, {"STAGES": 3}, {"STAGES": 4}, {"STAGES": 4, "BLOCK_M": 32}, {"STAGES": 3, "BLOCK_K": 128, "MIN_BLOCKS": 2},
                  {"STAGES": 3, "MIN_BLOCKS": 3}]
SHARED_LIMIT = 227 * 1024


def gpu_ms(fn) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


def main() -> None:
    print(torch.cuda.get_device_name())
    logits = torch.tensor([3.0] * 4 + [-3.0] * 4, device="cuda")
    for M, K, N in SHAPES:
        x, w_q, grad_y, lo, hi = gemm_operands(M, K, N)
        table = level_table(lo, hi, torch.zeros(1, 256, device="cuda"), logits, 2)
        reference_y = linear_forward_cuda(x, w_q, None, lo, hi, table, logits, 2)
        reference_dw = linear_backward_weight_cuda(grad_y, x, lo, hi, table, logits, 2)
        for tiling in FORWARD_TILINGS:
            if forward_bytes(forward_layout(N, **tiling)) > SHARED_LIMIT:
                continue
            run = lambda: linear_forward_cuda(x, w_q, None, lo, hi, table, logits, 2, tiling)
            same = torch.equal(run(), reference_y)  # every tiling sums each output in the same order
            print(f"{M}×{K}×{N} forward {str(tiling):55s} {gpu_ms(run):.4f} ms  same result: {same}")
        for tiling in WEIGHT_TILINGS:
            if weight_bytes(weight_layout(N, **tiling)) > SHARED_LIMIT:
                continue
            run = lambda: linear_backward_weight_cuda(grad_y, x, lo, hi, table, logits, 2, tiling)
            close = torch.allclose(run(), reference_dw, rtol=1e-4, atol=1e-3)
            print(f"{M}×{K}×{N} dW      {str(tiling):55s} {gpu_ms(run):.4f} ms  close: {close}")


if __name__ == "__main__":
    main()
