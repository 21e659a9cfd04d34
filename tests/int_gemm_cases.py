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


def packed_arguments(case: list, bits_w: int, device) -> list:
    """`ddq_kernels.int_gemm.int_gemm_packed`'s arguments before bits_w for a case as `random_case` lays it out,
    its weight codes packed, on `device`."""
    import torch

    from ddq.deploy.packing import pack

    codes_x, lut_x, codes_w, lut_w, mult, offset, shift, i_min, bits_out = case
    tensors = [torch.from_numpy(a).to(device) for a in (codes_x, lut_x, pack(codes_w, bits_w), lut_w, mult, offset)]
    return [*tensors, shift, torch.from_numpy(i_min).to(device), bits_out]


def interpreter_paths() -> dict:
    """The in-load and decode-once tiles the interpreter tests force (test_int_gemm_backends.py), by name."""
    from ddq_kernels.int_gemm import DECODE_BYTES, DECODE_GATHER, TileConfig

    return {"gemv split-K": TileConfig(1, 16, 32, split_k=3),
            "gemv register LUT": TileConfig(1, 32, 32, decode=DECODE_GATHER),
            "dot split-K": TileConfig(16, 16, 32, split_k=2),
            "dot split-K register LUT": TileConfig(16, 32, 32, split_k=4, decode=DECODE_GATHER),
            "decode once": TileConfig(32, 32, 32, num_stages=1, decode_once=True),
            "decode once by byte": TileConfig(32, 32, 32, num_stages=1, decode_once=True, decode=DECODE_BYTES),
            "decode once TMA": TileConfig(32, 16, 64, num_stages=1, decode_once=True, tma=True)}


def interpreter_nibble_paths() -> dict:
    """The DECODE_NIBBLE_PTX tiles the interpreter tests force, by name: (M, config)."""
    from ddq_kernels.int_gemm import DECODE_NIBBLE_PTX, TileConfig

    return {"nibble gemv split-K": (1, TileConfig(1, 16, 32, split_k=3, decode=DECODE_NIBBLE_PTX)),
            "nibble dot split-K": (5, TileConfig(16, 16, 32, split_k=2, decode=DECODE_NIBBLE_PTX)),
            "nibble dot, weights as A": (5, TileConfig(16, 16, 32, decode=DECODE_NIBBLE_PTX, weights_as_a=True)),
            "nibble decode once": (7, TileConfig(16, 16, 32, num_stages=1, decode_once=True, decode=DECODE_NIBBLE_PTX))}


def register_lut_tile(decode: int):
    """The 16 × 16 × 32 in-load tile of test_triton_decode_variants, with the given weight decode."""
    from ddq_kernels.int_gemm import TileConfig

    return TileConfig(16, 16, 32, decode=decode)


def gpu_uncompilable_tiles() -> dict:
    """The forced tiles above that Triton 3.6 does not compile for the GPU (run 26, H200): the register-LUT gather
    of 1-bit containers in these narrow tiles fails in its pass manager; the nibble dots' int8 products need
    K ≥ 32. The default configs never pick them there; on a GPU the interpreter tests skip them and
    test_int_gemm_gpu.py checks that they get a clear error."""
    from ddq_kernels.int_gemm import DECODE_GATHER

    paths, nibble = interpreter_paths(), interpreter_nibble_paths()
    return {"gemv register LUT": paths["gemv register LUT"],
            "dot split-K register LUT": paths["dot split-K register LUT"],
            "dot register LUT": register_lut_tile(DECODE_GATHER),
            "nibble dot split-K": nibble["nibble dot split-K"][1],
            "nibble dot, weights as A": nibble["nibble dot, weights as A"][1]}
