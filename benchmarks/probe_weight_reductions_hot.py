"""GPU time of each `weight_reductions` candidate on the fused backward pass's partial sums of ∂W_q, timed as
`fastest_config` times them (`launch.graph_times`: the L2 flushed before every call) and with the parts hot in L2,
as they are in a layer step right after the pass that wrote them (docs/kernels.md, run 27). Each call also runs
its bins' zero fill. Prints one line per (shape, candidate).

Usage on a CUDA machine, from the repository root: python benchmarks/probe_weight_reductions_hot.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_cases import quantizer_params  # noqa: E402

from ddq_kernels.launch import graph_times  # noqa: E402
from ddq_kernels.level_table import level_table  # noqa: E402
from ddq_kernels.linear_backward_input_cuda import linear_backward_shared_parts  # noqa: E402
from ddq_kernels.weight_reductions import SUM_THEN_REDUCE, SUMMED_CONFIGS, weight_reductions  # noqa: E402

SHAPES = ((100352, 192, 32), (100352, 32, 192), (401408, 576, 64))
CALLS = 10


def hot_ms(run) -> float:
    """GPU time a call (ms) of CALLS back-to-back calls in one CUDA graph, without flushing the L2."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            run()
    return float(do_bench(graph.replay, warmup=5, rep=25, return_mode="median")) / CALLS


def main() -> None:
    for M, K, N in SHAPES:
        dtype = torch.bfloat16
        lo, hi, residuals, logits = quantizer_params("unsigned", 1, 4, 1)
        x = (torch.rand(M, K, device="cuda") * 2).to(dtype)
        w_lo, w_hi, *_ = quantizer_params("symmetric", N, 4, 2)
        weight = (torch.randn(N, K, device="cuda") * 0.5).to(dtype)
        grad_y = torch.randn(M, N, device="cuda").to(dtype)
        *_, parts = linear_backward_shared_parts(grad_y, weight, x, lo, hi, level_table(lo, hi, residuals, logits, 1),
                                                 logits, 1)
        candidates = SUMMED_CONFIGS + (SUM_THEN_REDUCE,)

        def run(config):
            return weight_reductions(parts, weight, w_lo, w_hi, config)

        for config in candidates:
            run(config)  # compiles outside the captures
        torch.cuda.synchronize()
        cold = graph_times(candidates, run)
        print(f"{M}x{K}x{N} parts {tuple(parts.shape)}")
        for config, cold_ms in zip(candidates, cold):
            print(f"  {str(config):80s} cold {cold_ms * 1e3:6.1f} us  hot {hot_ms(lambda: run(config)) * 1e3:6.1f} us")


if __name__ == "__main__":
    main()
