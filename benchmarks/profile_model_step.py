"""Where a whole-network training step spends its GPU time (torch.profiler), for docs/kernels.md.

Usage: python benchmarks/profile_model_step.py MODEL VARIANT [MODEL VARIANT ...]
(MODEL: mobilenet_v2 or resnet18; VARIANT: fp, lsq_compiled, ddq_eager, ddq_compiled or ddq_cudagraphs, as in
bench_models.py). Prints, per pair, the step time from CUDA events, the GPU kernel time per step, and the
kernels grouped by name with their share of it.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_models import BATCH, batch, build_model, training_step

PROFILED_STEPS = 3


def profile_pair(model_name: str, variant: str) -> None:
    x, labels = batch()
    start = time.time()
    step = training_step(build_model(model_name, variant, x), variant, x, labels)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm_s = time.time() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(PROFILED_STEPS):
        step()
    end.record()
    torch.cuda.synchronize()
    step_ms = begin.elapsed_time(end) / PROFILED_STEPS
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels) / PROFILED_STEPS
    print(f"\n## {model_name} {variant}: {step_ms:.2f} ms/step ({BATCH / step_ms * 1e3:.0f} img/s), "
          f"GPU kernels {total_us / 1e3:.2f} ms/step, set-up and warm-up {warm_s:.0f} s")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
        per_step = e.self_device_time_total / PROFILED_STEPS
        print(f"{per_step / 1e3:8.3f} ms {100 * per_step / total_us:5.1f}% {e.count // PROFILED_STEPS:5d}x  {e.key[:110]}")


def main(arguments: list[str]) -> None:
    for model_name, variant in zip(arguments[::2], arguments[1::2]):
        profile_pair(model_name, variant)
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
