"""Where a DDQ forward+backward step spends its time (torch.profiler), for docs/kernels.md.

Usage: python benchmarks/profile_ddq_step.py M K N [VARIANT]  (bf16, W4A4; VARIANT a bench_linear variant,
default "ddq": the DDQLinear layer on CUDA)
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench_linear import build_step


def main(M: int, K: int, N: int, variant: str = "ddq") -> None:
    step = build_step(variant, M, K, N, backward=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]), *sys.argv[4:5])
