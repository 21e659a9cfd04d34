"""Launch-time choices shared by the launchers: interpreter detection and tile selection."""

from __future__ import annotations

import os
import warnings
from typing import Callable, Hashable, Sequence

import triton

_FASTEST: dict = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def size_class(extent: int) -> int:
    """A power-of-two bucket, so that tile choices are shared between nearby sizes (batch sizes vary)."""
    return triton.next_power_of_2(max(extent, 1))


def fastest_config(kernel: str, key: Hashable, candidates: Sequence[dict], run: Callable[[dict], object]) -> dict:
    """The fastest of `candidates` for (kernel, key) by GPU time, timed once on the device and cached.

    `run(config)` launches the kernel on scratch outputs. The first candidate is the heuristic
    choice; it is the only one used in the interpreter or when there is a single candidate.

    GPU time, not launch-to-finish time: on small shapes one Python launch costs more than the kernel
    (run 10, docs/kernels.md: 100352×192×32's CUDA C forward took 0.100 ms a launch, 0.027 ms of GPU), so
    timing launches picked by host cost, at random among candidates within the launch floor, and left
    networks under CUDA graphs (where no launch costs host time) with kernels up to 4× slower. A candidate
    that syncs with the host (cannot be captured) makes the whole set fall back to launch timing.
    """
    if interpreting() or len(candidates) == 1:
        return candidates[0]
    cache_key = (kernel, key)
    if cache_key not in _FASTEST:
        runnable = []
        for config in candidates:
            try:
                run(config)  # compiles, and settles any nested choice outside a graph capture
                runnable.append(config)
            except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
                continue  # a tile too large for this dtype or card
        if not runnable:
            raise RuntimeError(f"{kernel}: no candidate tile could run for {key}")
        times = candidate_times(runnable, run)
        _FASTEST[cache_key] = runnable[times.index(min(times))]
    return _FASTEST[cache_key]


def candidate_times(candidates: Sequence[dict], run: Callable[[dict], object]) -> list[float]:
    """Each candidate's GPU time a call (ms), from CUDA graph replays; launch timing where one syncs with the host.

    A sync cannot be captured, and a capture that fails leaves the CUDA random generator unusable for the
    rest of the process, so syncs are found before any capture, by one run with sync debugging on."""
    from triton.testing import do_bench

    if any(syncs_with_host(config, run) for config in candidates):
        return [do_bench(lambda: run(config), warmup=5, rep=25, return_mode="median") for config in candidates]
    return graph_times(candidates, run)


def syncs_with_host(config: dict, run: Callable[[dict], object]) -> bool:
    """Whether `run(config)` waits for the device (an .item(), a copy to the host): a run with
    torch.cuda's sync debug mode at "error". The mode is process-wide, so another thread's sync during
    this one run raises too; it runs once per candidate and shape class, in the first steps."""
    import torch

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Synchronization debug mode is a prototype")
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(config)
        except RuntimeError:
            return True
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return False


L2_FLUSH_BYTES = 256 << 20  # as triton.testing.do_bench: more than any card's L2, so each call starts cold
GRAPH_CALLS = 10


def graph_times(candidates: Sequence[dict], run: Callable[[dict], object]) -> list[float]:
    """GPU time a call (ms) of each candidate with a cold L2: a CUDA graph of GRAPH_CALLS (L2 flush, call)
    pairs, less a graph of the flushes alone, replayed and timed by CUDA events (medians)."""
    import torch
    from triton.testing import do_bench

    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def replay_ms(body: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                flush.zero_()
                body()
        return float(do_bench(graph.replay, warmup=5, rep=25, return_mode="median"))

    flushes_ms = replay_ms(lambda: None)
    return [max(replay_ms(lambda: run(config)) - flushes_ms, 0.0) / GRAPH_CALLS for config in candidates]
