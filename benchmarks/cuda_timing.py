"""CUDA-event timing shared by the benchmarks: the median of many runs, recorded with the card's details."""

from __future__ import annotations

import platform
from typing import Callable

import torch


def cuda_median_ms(fn: Callable[[], object], warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median time of fn in milliseconds from CUDA events (triton.testing.do_bench flushes L2 between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def captured(fn: Callable[[], object]) -> Callable[[], None]:
    """The replay of fn captured in one CUDA graph (warmed up on a side stream first, as torch.cuda.graph
    asks): fn's GPU work without its host launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def device_info() -> dict:
    import triton

    return {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def record(benchmark, fn: Callable[[], object], **info) -> float:
    """Time fn with CUDA events, store the median and `info` in the pytest-benchmark record, return it."""
    median = cuda_median_ms(fn)

    def synchronized():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized, rounds=3, iterations=1)
    benchmark.extra_info.update(device_info(), cuda_median_ms=median, **info)
    return median
