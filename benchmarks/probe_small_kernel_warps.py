"""GPU time of the quantizer-parameter kernels for 1, 2, 4 and 8 warps a program (docs/kernels.md run 13).

`parameter_grads`' kernel 1 and `level_table`'s kernel run one program per quantizer group, each a chain of small
reductions over 256 cells; this times one launch of each inside a CUDA graph of 20 (no launch cost), per tensor
and for 192 groups. Usage: python benchmarks/probe_small_kernel_warps.py
"""

from __future__ import annotations

import torch

from cuda_timing import captured, cuda_median_ms
from ddq_kernels.level_table import level_table_kernel
from ddq_kernels.parameter_grads import KernelOperands, range_residual_gate_kernel

LAUNCHES_A_GRAPH = 20


def microseconds_a_launch(launch) -> float:
    replay = captured(lambda: [launch() for _ in range(LAUNCHES_A_GRAPH)])
    return cuda_median_ms(replay) * 1000 / LAUNCHES_A_GRAPH


def main() -> None:
    logits = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1], device="cuda")  # 4 bits
    for groups in (1, 192):
        lo, hi = -torch.rand(groups, device="cuda") - 0.5, torch.rand(groups, device="cuda") + 0.5
        residuals = torch.randn(groups, 256, device="cuda") * 0.1
        sums = torch.randn(groups, 2, device="cuda")
        operands = KernelOperands((torch.randn(groups, 256, device="cuda"), sums[:, 0], sums[:, 1], lo, hi, residuals,
                                   logits, 2, True, 1000))
        table = torch.empty(groups, 256, device="cuda")
        for warps in (1, 2, 4, 8):
            grads = microseconds_a_launch(lambda: range_residual_gate_kernel[(groups,)](
                *operands.pointers, **operands.constants(""), num_warps=warps))
            levels = microseconds_a_launch(lambda: level_table_kernel[(groups,)](
                lo, hi, residuals, logits, table, MIN_BITS=2, num_warps=warps))
            print(f"groups {groups} num_warps {warps}: range_residual_gate {grads:.2f} us, level_table {levels:.2f} us")


if __name__ == "__main__":
    main()
