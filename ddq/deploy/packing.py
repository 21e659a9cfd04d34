"""Weight packing of DDQ_SPEC.md Section 5: codes in 1/2/4/8-bit containers, rows on byte boundaries."""

from __future__ import annotations

import numpy as np

CONTAINER_BITS = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}


def container_bits(bits: int) -> int:
    """Spec §5: the container width w for b-bit codes (b = 3 uses 4, b = 5..7 use 8)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in CONTAINER_BITS:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return CONTAINER_BITS[int(bits)]


def packed_row_bytes(k: int, bits: int) -> int:
    """Spec §5: bytes of one packed row of k codes, ceil(k·w/8)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"K must be a non-negative integer, got {k!r}")
    return (int(k) * container_bits(bits) + 7) // 8


def _require_uint8_matrix(name: str, array: np.ndarray) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise TypeError(f"{name} must have dtype uint8, got {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {array.shape}")
    return np.ascontiguousarray(array)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Spec §5: uint8[N, K] codes in [0, 2^bits) → uint8[N, ceil(K·w/8)], element k in the lowest bits first."""
    codes = _require_uint8_matrix("codes", codes)
    width = container_bits(bits)
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes out of range: max code {int(codes.max())} does not fit {bits} bits")
    n, k = codes.shape
    per_byte = 8 // width
    padded = np.zeros((n, packed_row_bytes(k, bits) * per_byte), dtype=np.uint8)
    padded[:, :k] = codes
    slots = padded.reshape(n, -1, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * width)[None, None, :]
    return (slots << shifts).sum(axis=2, dtype=np.uint16).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Spec §5: the inverse of `pack`. Rejects a wrong row length, codes ≥ 2^bits and non-zero padding."""
    packed = _require_uint8_matrix("packed", packed)
    width = container_bits(bits)
    expected = packed_row_bytes(k, bits)
    if packed.shape[1] != expected:
        raise ValueError(f"packed rows have {packed.shape[1]} bytes, expected ceil(K·{width}/8) = {expected} for K = {k}")
    per_byte = 8 // width
    shifts = (np.arange(per_byte, dtype=np.uint8) * width)[None, None, :]
    slots = (packed[:, :, None] >> shifts) & np.uint8((1 << width) - 1)
    slots = slots.reshape(packed.shape[0], -1)
    if slots[:, k:].any():
        raise ValueError("corrupt packed weights: padding bits at the end of a row are not zero")
    codes = np.ascontiguousarray(slots[:, :k])
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"corrupt packed weights: code {int(codes.max())} does not fit {bits} bits")
    return codes
