"""Triton integer GEMM of DDQ_SPEC.md Section 5 with LUT-decoded packed weights.

Weights arrive packed (1/2/4/8-bit containers, spec §5 layout) and are unpacked and looked up in
their per-channel LUT in registers as each tile is loaded; activations are decoded through lut_x
(in the tile load, or once per GEMM for large M); int8 × int8 tl.dot accumulates in int32; the
epilogue requantises in int64. The reference is ddq.deploy.int_gemm.int_gemm_numpy (bit-exact).

uint8 activation tables (0..255) do not fit int8: they enter the dot as x − 128 and the kernel adds
128·Σ_k w back per output column, which is exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

CONTAINER_BITS = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
DECODE_LOAD = 0
DECODE_GATHER = 1
PREDECODE_MIN_M = 256


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_kb: int
    num_warps: int = 4
    num_stages: int = 3
    decode: int = DECODE_LOAD
    group_m: int = 8


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _int_gemm_kernel(x_ptr, lut_x_ptr, w_ptr, lut_w_ptr, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr,
                     M, N, K, row_bytes, shift, drop_bits,
                     X_DECODED: tl.constexpr, X_BASE: tl.constexpr, WIDTH: tl.constexpr, LUT_W: tl.constexpr,
                     DECODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
                     K_STEPS: tl.constexpr, GROUP_M: tl.constexpr):
    PER_BYTE: tl.constexpr = 8 // WIDTH
    CODE_MASK: tl.constexpr = (1 << WIDTH) - 1
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share each weight tile while it is in L2.
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    byte_range = tl.arange(0, BLOCK_KB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    weight_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    if DECODE == 1:
        lut_tile = tl.load(lut_w_ptr + cols[None, :] * LUT_W + tl.arange(0, LUT_W)[:, None], mask=col_ok[None, :],
                           other=0)
    # K_STEPS is a constexpr because the interpreter cannot iterate over a runtime scalar with NumPy ≥ 2.4.
    for step in range(K_STEPS):
        byte = step * BLOCK_KB + byte_range
        packed = tl.load(w_ptr + cols[None, :].to(tl.int64) * row_bytes + byte[:, None],
                         mask=(byte < row_bytes)[:, None] & col_ok[None, :], other=0)
        for slot in tl.static_range(PER_BYTE):
            k = byte * PER_BYTE + slot
            k_ok = k < K
            code = ((packed >> (slot * WIDTH)) & CODE_MASK).to(tl.int32)
            if DECODE == 1:
                w = tl.gather(lut_tile, code, axis=0)
            else:
                w = tl.load(lut_w_ptr + cols[None, :] * LUT_W + code, mask=col_ok[None, :], other=0)
            w = tl.where(k_ok[:, None], w, 0).to(tl.int8)
            x_mask = row_ok[:, None] & k_ok[None, :]
            x_offsets = rows[:, None].to(tl.int64) * K + k[None, :]
            if X_DECODED:
                x = tl.load(x_ptr + x_offsets, mask=x_mask, other=0)
            else:
                x_code = tl.load(x_ptr + x_offsets, mask=x_mask, other=0).to(tl.int32)
                x = tl.where(x_mask, tl.load(lut_x_ptr + x_code) - X_BASE, 0).to(tl.int8)
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
            if X_BASE != 0:
                weight_sum += tl.sum(w.to(tl.int32), axis=0)
    if X_BASE != 0:
        acc += X_BASE * weight_sum[None, :]

    mult = tl.load(mult_ptr + cols, mask=col_ok, other=0).to(tl.int64)
    offset = tl.load(offset_ptr + cols, mask=col_ok, other=0)
    i_min = tl.load(i_min_ptr + cols, mask=col_ok, other=0).to(tl.int64)
    z = acc.to(tl.int64) * mult[None, :] + offset[None, :]
    half = tl.full((BLOCK_M, BLOCK_N), 1, tl.int64) << (shift - 1)
    index = tl.where(z < -half, 0, tl.minimum((z + half) >> shift, 255))
    index = tl.maximum(index, i_min[None, :])
    out_offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(acc_ptr + out_offsets, acc, mask=out_mask)
    tl.store(codes_ptr + out_offsets, (index >> drop_bits).to(tl.uint8), mask=out_mask)


@triton.jit
def _decode_activations_kernel(codes_ptr, lut_x_ptr, out_ptr, numel, X_BASE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    code = tl.load(codes_ptr + offsets, mask=inside, other=0).to(tl.int32)
    tl.store(out_ptr + offsets, (tl.load(lut_x_ptr + code) - X_BASE).to(tl.int8), mask=inside)


def decode_activations(codes_x: Tensor, lut_x32: Tensor, x_base: int) -> Tensor:
    """lut_x[codes_x] − x_base as int8, once per GEMM (the large-M path)."""
    out = torch.empty(codes_x.shape, dtype=torch.int8, device=codes_x.device)
    block = 4096
    _decode_activations_kernel[(triton.cdiv(codes_x.numel(), block),)](codes_x, lut_x32, out, codes_x.numel(),
                                                                       X_BASE=x_base, BLOCK=block)
    return out


def default_config(m: int, n: int, width: int, row_bytes: int) -> TileConfig:
    """Tiles for the interpreter (few, large programs) or the GPU (GEMV-shaped or GEMM-shaped)."""
    if interpreting():
        block_kb = min(512, max(32, triton.next_power_of_2(row_bytes)))
        return TileConfig(block_m=16 if m <= 16 else 64 if m <= 64 else 128, block_n=32 if n <= 32 else 64,
                          block_kb=block_kb, num_warps=4, num_stages=1)
    if m <= 16:  # best of the H100 sweep in benchmarks/results/bench_int_gemm_gpu.log
        return TileConfig(block_m=16, block_n=64, block_kb=256, num_warps=4, num_stages=3)
    if m <= 128:
        return TileConfig(block_m=64, block_n=64, block_kb=64 if width == 8 else 128 // (8 // width) * 2,
                          num_warps=4, num_stages=3)
    return TileConfig(block_m=128, block_n=256, block_kb=32, num_warps=8, num_stages=3)


def int_gemm_packed(codes_x: Tensor, lut_x: Tensor, packed_w: Tensor, lut_w: Tensor, mult: Tensor, offset: Tensor,
                    shift: int, i_min: Tensor, bits_out: int, bits_w: int, k: int,
                    config: Optional[TileConfig] = None, predecode: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """Spec §5 on one device: codes_x uint8[M, K], lut_x int8/uint8[2^b_a], packed_w uint8[N, ceil(K·w/8)],
    lut_w int8[N, 2^b_w], mult int32[N], offset int64[N], i_min int32[N] → (acc int32[M, N], codes uint8[M, N]).

    Arguments are assumed valid (ddq.deploy.int_gemm checks them); this checks devices and dtypes only.
    predecode: decode activations once per GEMM (default: for M ≥ 256) instead of in every N tile.
    """
    tensors = {"codes_x": codes_x, "lut_x": lut_x, "packed_w": packed_w, "lut_w": lut_w, "mult": mult,
               "offset": offset, "i_min": i_min}
    device = codes_x.device
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(f"int_gemm_packed: {name} is on {tensor.device}, codes_x on {device}")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError("int_gemm_packed: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    expected = {"codes_x": (torch.uint8,), "lut_x": (torch.int8, torch.uint8), "packed_w": (torch.uint8,),
                "lut_w": (torch.int8,), "mult": (torch.int32,), "offset": (torch.int64,), "i_min": (torch.int32,)}
    for name, dtypes in expected.items():
        if tensors[name].dtype not in dtypes:
            raise TypeError(f"int_gemm_packed: {name} must be {dtypes}, got {tensors[name].dtype}")
    width = CONTAINER_BITS[bits_w]
    m, n = codes_x.shape[0], packed_w.shape[0]
    row_bytes = packed_w.shape[1]
    config = config or default_config(m, n, width, row_bytes)
    x_base = 128 if lut_x.dtype == torch.uint8 else 0
    lut_x32 = lut_x.to(torch.int32)
    predecode = m >= PREDECODE_MIN_M if predecode is None else predecode
    codes_x = codes_x.contiguous()
    x = decode_activations(codes_x, lut_x32, x_base) if predecode else codes_x
    acc = torch.empty((m, n), dtype=torch.int32, device=device)
    codes = torch.empty((m, n), dtype=torch.uint8, device=device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _int_gemm_kernel[grid](
        x, lut_x32, packed_w.contiguous(), lut_w.contiguous(), mult.contiguous(), offset.contiguous(),
        i_min.contiguous(), acc, codes, m, n, k, row_bytes, shift, 8 - bits_out,
        X_DECODED=predecode, X_BASE=x_base, WIDTH=width, LUT_W=lut_w.shape[1], DECODE=config.decode,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_KB=config.block_kb, K_STEPS=triton.cdiv(row_bytes, config.block_kb), GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return acc, codes
