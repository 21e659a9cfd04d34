"""Launch-time choices shared by the launchers: interpreter detection and tile selection."""

from __future__ import annotations

import math
import os
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
    """The fastest of `candidates` for (kernel, key), timed once on the device and cached.

    `run(config)` launches the kernel on scratch outputs. The first candidate is the heuristic
    choice; it is the only one used in the interpreter or when there is a single candidate.
    """
    if interpreting() or len(candidates) == 1:
        return candidates[0]
    cache_key = (kernel, key)
    if cache_key not in _FASTEST:
        from triton.testing import do_bench

        times = []
        for config in candidates:
            try:
                times.append(do_bench(lambda: run(config), warmup=5, rep=25, return_mode="median"))
            except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
                times.append(math.inf)  # a tile too large for this dtype or card
        if min(times) == math.inf:
            raise RuntimeError(f"{kernel}: no candidate tile could run for {key}")
        _FASTEST[cache_key] = candidates[times.index(min(times))]
    return _FASTEST[cache_key]
