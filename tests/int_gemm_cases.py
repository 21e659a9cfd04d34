"""Random spec §5 int_gemm arguments shared by the integer-backend tests (tests/test_int_gemm_*.py)."""

from __future__ import annotations

import numpy as np


def random_case(rng: np.random.Generator, m: int, n: int, k: int, bits_x: int, bits_w: int, signed_x: bool,
                realistic: bool = True) -> list:
    """[codes_x, lut_x, codes_w, lut_w, mult, offset, shift, i_min, bits_out]: realistic requantisation
    constants (small mult and offset, as export makes them) or the contract's whole range."""
    codes_x = rng.integers(0, 1 << bits_x, (m, k), dtype=np.uint8)
    codes_w = rng.integers(0, 1 << bits_w, (n, k), dtype=np.uint8)
    lut_x = (rng.integers(-128, 128, 1 << bits_x).astype(np.int8) if signed_x
             else rng.integers(0, 256, 1 << bits_x).astype(np.uint8))
    lut_w = rng.integers(-128, 128, (n, 1 << bits_w)).astype(np.int8)
    if realistic:
        shift = int(rng.integers(10, 24))
        mult = rng.integers(0, 1 << 8, n).astype(np.int32)
        offset = rng.integers(-(1 << 28), 1 << 28, n).astype(np.int64)
    else:
        shift = int(rng.integers(1, 62))
        mult = rng.integers(0, 1 << 30, n).astype(np.int32)
        offset = rng.integers(-(1 << 61) + 1, 1 << 61, n).astype(np.int64)
    i_min = np.where(rng.random(n) < 0.3, rng.integers(0, 256, n), 0).astype(np.int32)
    return [codes_x, lut_x, codes_w, lut_w, mult, offset, shift, i_min, int(rng.integers(1, 9))]
