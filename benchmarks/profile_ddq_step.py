"""Where a DDQ forward+backward step spends its time (torch.profiler), for docs/kernels.md.

Usage: python benchmarks/profile_ddq_step.py M K N [VARIANT]  (bf16, W4A4; VARIANT a bench_linear variant,
default "ddq": the DDQLinear layer on CUDA; "ddq_compiled" and "cublas" are the others worth profiling).
Prints the GPU kernels of one step in launch order with their durations, then the totals of five steps.
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
    print_kernel_sequence(step, f"{variant} {M}x{K}x{N}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def print_kernel_sequence(step, title: str) -> None:
    """The GPU kernels of one step in launch order: on the small GEMMs each costs a launch in a CUDA graph too."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    total = sum(e.time_range.elapsed_us() for e in kernels)
    print(f"== {title}: {len(kernels)} kernels, sum {total:.1f} us")
    for e in kernels:
        print(f"  {e.time_range.elapsed_us():8.1f} us  {e.name[:110]}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]), *sys.argv[4:5])
