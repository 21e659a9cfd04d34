"""The integer layer of DDQ_SPEC.md Section 5: validation, the NumPy golden, and backend dispatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ddq.deploy.packing import container_bits

MAX_K = 65536
MAX_MULT = 1 << 30
MAX_OFFSET = 1 << 61
MAX_SHIFT = 61
BACKENDS = ("numpy", "c", "triton", "cupy")


@dataclass(frozen=True)
class GemmArgs:
    """Validated int_gemm arguments (contiguous NumPy arrays) and the bitwidths they imply."""

    codes_x: np.ndarray
    lut_x: np.ndarray
    codes_w: np.ndarray
    lut_w: np.ndarray
    mult: np.ndarray
    offset: np.ndarray
    shift: int
    i_min: np.ndarray
    bits_out: int
    bits_x: int
    bits_w: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.codes_x.shape[0], self.codes_w.shape[0], self.codes_x.shape[1]


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


def _array(name: str, value: Any, dtypes: tuple[type, ...], ndim: int) -> np.ndarray:
    array = _as_numpy(name, value)
    if array.dtype not in [np.dtype(d) for d in dtypes]:
        wanted = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {wanted}, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    return np.ascontiguousarray(array)


def _int_scalar(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {int(value)}")
    return int(value)


def _lut_bits(name: str, entries: int) -> int:
    bits = entries.bit_length() - 1
    if entries < 2 or entries > 256 or entries != 1 << bits:
        raise ValueError(f"{name} must have 2^b entries for b in 1..8, got {entries}")
    return bits


def check_int_gemm_args(codes_x, lut_x, codes_w, lut_w, mult, offset, shift, i_min, bits_out) -> GemmArgs:
    """Spec §5's argument contract: dtypes, shapes, K ≤ 65536, code and constant ranges. Raises on violation."""
    codes_x = _array("codes_x", codes_x, (np.uint8,), 2)
    lut_x = _array("lut_x", lut_x, (np.int8, np.uint8), 1)
    codes_w = _array("codes_w", codes_w, (np.uint8,), 2)
    lut_w = _array("lut_w", lut_w, (np.int8,), 2)
    mult = _array("mult", mult, (np.int32,), 1)
    offset = _array("offset", offset, (np.int64,), 1)
    i_min = _array("i_min", i_min, (np.int32,), 1)
    m, k = codes_x.shape
    n = codes_w.shape[0]
    if codes_w.shape[1] != k:
        raise ValueError(f"codes_w must be [N, K] with K = {k} (from codes_x), got shape {codes_w.shape}")
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"M, N and K must be positive, got M={m}, N={n}, K={k}")
    if k > MAX_K:
        raise ValueError(f"K = {k} exceeds the int32 accumulator limit K ≤ {MAX_K}")
    bits_x = _lut_bits("lut_x", lut_x.shape[0])
    if lut_w.shape[0] != n:
        raise ValueError(f"lut_w must be [N, 2^b_w] with N = {n}, got shape {lut_w.shape}")
    bits_w = _lut_bits("lut_w", lut_w.shape[1])
    container_bits(bits_w)
    for name, array in (("mult", mult), ("offset", offset), ("i_min", i_min)):
        if array.shape != (n,):
            raise ValueError(f"{name} must have shape [N] = ({n},), got {array.shape}")
    if int(codes_x.max()) >= 1 << bits_x:
        raise ValueError(f"codes_x out of range: code {int(codes_x.max())} ≥ 2^{bits_x} (lut_x has {1 << bits_x} entries)")
    if int(codes_w.max()) >= 1 << bits_w:
        raise ValueError(f"codes_w out of range: code {int(codes_w.max())} ≥ 2^{bits_w} (lut_w has {1 << bits_w} entries)")
    shift, bits_out = check_requantization(mult, offset, shift, i_min, bits_out)
    return GemmArgs(codes_x, lut_x, codes_w, lut_w, mult, offset, shift, i_min, bits_out, bits_x, bits_w)


def check_requantization(mult: np.ndarray, offset: np.ndarray, shift: Any, i_min: np.ndarray,
                         bits_out: Any) -> tuple[int, int]:
    """Spec §5's ranges of the requantisation constants (mult int32, offset int64, i_min int32 arrays of
    one length N ≥ 1): mult in [0, 2^30), |offset| < 2^61, 1 ≤ shift ≤ 61, i_min in [0, 255], 1 ≤ bits_out ≤ 8,
    so that z + 2^(shift−1) cannot overflow int64. Returns (shift, bits_out) as Python ints."""
    if int(mult.min()) < 0 or int(mult.max()) >= MAX_MULT:
        raise ValueError(f"mult must be in [0, 2^30), got range [{int(mult.min())}, {int(mult.max())}]")
    if int(offset.max()) >= MAX_OFFSET or int(offset.min()) <= -MAX_OFFSET:
        raise ValueError(f"offset must satisfy |offset| < 2^61, got range [{int(offset.min())}, {int(offset.max())}]")
    if int(i_min.min()) < 0 or int(i_min.max()) > 255:
        raise ValueError(f"i_min must be in [0, 255], got range [{int(i_min.min())}, {int(i_min.max())}]")
    return _int_scalar("shift", shift, 1, MAX_SHIFT), _int_scalar("bits_out", bits_out, 1, 8)


def requantize_numpy(acc: np.ndarray, mult: np.ndarray, offset: np.ndarray, shift: int, i_min: np.ndarray,
                     bits_out: int) -> np.ndarray:
    """Spec §5 epilogue in int64: single rounding (ties toward +∞), clamp to [i_min, 255], drop 8 − bits_out bits."""
    z = acc.astype(np.int64) * mult.astype(np.int64)[None, :] + offset[None, :]
    half = np.int64(1) << np.int64(shift - 1)
    index = np.where(z < -half, 0, np.minimum((z + half) >> np.int64(shift), 255))
    index = np.maximum(index, i_min.astype(np.int64)[None, :])
    return (index >> (8 - bits_out)).astype(np.uint8)


def int_gemm_numpy(args: GemmArgs) -> tuple[np.ndarray, np.ndarray]:
    """Spec §5, the golden: exact int64 arithmetic in NumPy."""
    x = args.lut_x.astype(np.int64)[args.codes_x]
    w = np.take_along_axis(args.lut_w.astype(np.int64), args.codes_w.astype(np.intp), axis=1)
    acc = x @ w.T
    codes = requantize_numpy(acc, args.mult, args.offset, args.shift, args.i_min, args.bits_out)
    return acc.astype(np.int32), codes


def int_gemm(codes_x, lut_x, codes_w, lut_w, mult, offset, shift, i_min, bits_out,
             backend: str = "numpy") -> tuple[np.ndarray, np.ndarray]:
    """DDQ_SPEC.md Section 5: one integer layer, acc = Σ lut_w·lut_x and the requantised output codes.

    Returns (acc int32[M, N], codes_out uint8[M, N]) as NumPy arrays. backend: "numpy" (the golden),
    "c" (arm_ref via ctypes), "triton" (GPU, or the interpreter with TRITON_INTERPRET=1), "cupy"
    (arm_ref's scalar C compiled for the GPU). Every backend gives identical results; one that cannot
    run here raises RuntimeError saying why.
    """
    args = check_int_gemm_args(codes_x, lut_x, codes_w, lut_w, mult, offset, shift, i_min, bits_out)
    if backend == "numpy":
        return int_gemm_numpy(args)
    if backend == "c":
        from ddq.deploy import c_backend

        return c_backend.int_gemm_c(args)
    if backend == "triton":
        from ddq.deploy import triton_backend

        return triton_backend.int_gemm_triton(args)
    if backend == "cupy":
        from ddq.deploy import cupy_backend

        return cupy_backend.int_gemm_cupy(args)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
