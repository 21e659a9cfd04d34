"""Triton integer GEMM of DDQ_SPEC.md Section 5 with LUT-decoded packed weights.

The reference is ddq.deploy.int_gemm.int_gemm_numpy (bit-exact). Two paths, chosen by M (the size
heuristic of `default_config`, overridable through `TileConfig`):

- **In-load decode (M below DECODE_ONCE_MIN_M = 1024, or NIBBLE_DECODE_ONCE_MIN_M = 64; memory bound).**
  Packed weights (1/2/4/8-bit containers, spec §5 layout) are unpacked and looked up in their per-channel
  LUT in registers as each tile is loaded, so the 4-bit weights cross DRAM once. K is split over `split_k`
  programs per output tile so that a GEMV fills every SM; their int32 partial sums meet through
  `tl.atomic_add` (integer addition is associative: the result is exact and independent of the order) and a
  small kernel applies the epilogue. M = 1 uses no tensor cores (`block_m = 1`); M > 1 uses int8 `tl.dot`,
  except 1 < M ≤ 16 over 4-bit words on CUDA, which takes the CUDA C kernel of ddq_kernels/nibble_mma_gemv.py
  (DECODE_NIBBLE_MMA: decoded straight into mma.sync fragments, 70 % of copy bandwidth against 48 %).
  Activations are decoded once per call into the order the weight decode produces them in.
- **Decode once (M from DECODE_ONCE_MIN_M, compute bound).** Weights are decoded through their LUT once per
  call into int8 [N, K] (plus Σ_k w per column when needed), activations into int8 [M, K]; a plain tiled
  int8 `tl.dot` GEMM (grouped order, software pipelined, optionally TMA loads) with the int64 epilogue
  fused. Decoding costs N·K bytes written and read once, against re-decoding every weight tile for each of
  the M / block_m row tiles in the in-load path.

Weight decode (`TileConfig.decode`): 4-bit containers whose rows are whole int32 words (3- and 4-bit layers
whose K is 0 or 7 mod 8) take DECODE_NIBBLE_PTX in every path: eight codes per `prmt` group
(ddq_kernels/nibble_ptx.py), `dp4a` in the GEMV. There, padding codes decode to real levels and meet
activations that are the raw zero (x_base − x_base in the tensor-core paths), so no K mask is needed. Other
widths look each code up (DECODE_LOAD, DECODE_GATHER, DECODE_BYTES).

uint8 activation tables (0..255) do not fit int8: in the tensor-core paths they enter the dot as x − 128
and the kernel adds 128·Σ_k w per output column, which is exact. The epilogue requantises in int64.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.compiler.errors import CompilationError

from ddq_kernels import nibble_mma_gemv
from ddq_kernels.nibble_ptx import decode_nibble_words, dot_nibble_words, signed_byte_sum, word_slots

CONTAINER_BITS = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
DECODE_LOAD = 0
DECODE_GATHER = 1
DECODE_BYTES = 2
DECODE_NIBBLE_PTX = 3
DECODE_NIBBLE_MMA = 4
DECODE_ONCE_MIN_M = 1024
NIBBLE_DECODE_ONCE_MIN_M = 64
PROGRAMS_PER_SM = 32


@dataclass(frozen=True)
class TileConfig:
    """block_kb: bytes of the weight operand per K step (packed bytes in-load, int8 codes decode-once).
    block_m = 1: the tensor-core-free GEMV kernel. split_k > 1: K split over that many programs per tile.
    decode: how the in-load path looks weights up (DECODE_LOAD: L1-cached gather from global memory,
    DECODE_GATHER: tl.gather from the column's LUT held in registers); in the decode-once path DECODE_BYTES
    decodes the weights a packed byte at a time (`decode_weights`), any other value a weight
    at a time. DECODE_NIBBLE_PTX (4-bit containers, rows of whole int32 words): a packed word of 8 codes at a
    time through ddq_kernels/nibble_ptx.py (emulated under the interpreter), in every path; block_kb is then a
    multiple of 4.
    DECODE_NIBBLE_MMA (same weights, M ≤ 16, CUDA with NVRTC): the CUDA C kernel of
    ddq_kernels/nibble_mma_gemv.py, which decodes words straight into mma.sync fragments: each warp owns
    16 × row_tiles rows, block_n rows per block (block_n / (16 × row_tiles) warps on different rows, the
    rest of num_warps interleaving K over the same rows), block_kb = 64, num_stages its cp.async ring depth,
    split_k its blocks along K.
    tma: decode-once loads through tensor descriptors. weights_as_a (DECODE_NIBBLE_PTX, block_m > 1): the
    decoded weights are the dot's first operand (accᵀ = w · xᵀ)."""

    block_m: int
    block_n: int
    block_kb: int
    num_warps: int = 4
    num_stages: int = 3
    decode: int = DECODE_LOAD
    group_m: int = 8
    split_k: int = 1
    decode_once: bool = False
    tma: bool = False
    weights_as_a: bool = False
    row_tiles: int = 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _requantize(acc, mult, offset, i_min, half, shift):
    """Spec §5 epilogue on broadcastable int32 acc / int64 constants → the 8-bit index i (int64)."""
    z = acc.to(tl.int64) * mult + offset
    index = tl.where(z < -half, 0, tl.minimum((z + half) >> shift, 255))
    return tl.maximum(index, i_min)


@triton.jit
def _store_tile(acc, rows, cols, M, N, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr, half, shift, drop_bits,
                ATOMIC: tl.constexpr):
    """Adds a partial tile into acc (split K) or stores acc and the output codes of a finished tile."""
    col_ok = cols < N
    out_offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    out_mask = (rows < M)[:, None] & col_ok[None, :]
    if ATOMIC:
        tl.atomic_add(acc_ptr + out_offsets, acc, mask=out_mask, sem="relaxed")
    else:
        mult = tl.load(mult_ptr + cols, mask=col_ok, other=0).to(tl.int64)
        offset = tl.load(offset_ptr + cols, mask=col_ok, other=0)
        i_min = tl.load(i_min_ptr + cols, mask=col_ok, other=0).to(tl.int64)
        index = _requantize(acc, mult[None, :], offset[None, :], i_min[None, :], half, shift)
        tl.store(acc_ptr + out_offsets, acc, mask=out_mask)
        tl.store(codes_ptr + out_offsets, (index >> drop_bits).to(tl.uint8), mask=out_mask)


@triton.jit
def _lookup_weights(code, cols, col_ok, lut_w_ptr, lut_tile, LUT_W: tl.constexpr, DECODE: tl.constexpr):
    if DECODE == 1:
        return tl.gather(lut_tile, code, axis=0)
    return tl.load(lut_w_ptr + cols[None, :] * LUT_W + code, mask=col_ok[None, :], other=0)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles share each weight tile while it is in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size
    return pid_m, pid_n


@triton.jit
def _gemv_kernel(x_ptr, lut_x_ptr, w_ptr, lut_w_ptr, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr,
                 M, N, K, row_bytes, x_row, slot_len, half, shift, drop_bits,
                 X_DECODED: tl.constexpr, WIDTH: tl.constexpr, LUT_W: tl.constexpr, DECODE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_STEPS: tl.constexpr, ATOMIC: tl.constexpr):
    """One activation row per program (grid: M·N tiles × K splits): int32 multiply-accumulate, no dot."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    CODE_MASK: tl.constexpr = (1 << WIDTH) - 1
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tiles_n
    row = (tl.program_id(0) // tiles_n).to(tl.int64)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    byte_range = tl.arange(0, BLOCK_KB)
    lut_tile = tl.zeros((LUT_W, BLOCK_N), dtype=tl.int8)
    if DECODE == 1:
        lut_tile = tl.load(lut_w_ptr + cols[None, :] * LUT_W + tl.arange(0, LUT_W)[:, None], mask=col_ok[None, :],
                           other=0)
    # Elementwise partial products; one reduction over K at the end instead of one per step.
    partial = tl.zeros((BLOCK_KB, BLOCK_N), dtype=tl.int32)
    # Step counts are constexpr because the interpreter cannot iterate over a runtime scalar with NumPy ≥ 2.4.
    for step in range(SPLIT_STEPS):
        byte = (pid_k * SPLIT_STEPS + step) * BLOCK_KB + byte_range
        packed = tl.load(w_ptr + cols[None, :].to(tl.int64) * row_bytes + byte[:, None],
                         mask=(byte < row_bytes)[:, None] & col_ok[None, :], other=0)
        for slot in tl.static_range(PER_BYTE):
            code = ((packed >> (slot * WIDTH)) & CODE_MASK).to(tl.int32)
            w = _lookup_weights(code, cols, col_ok, lut_w_ptr, lut_tile, LUT_W, DECODE).to(tl.int32)
            if X_DECODED:
                x = tl.load(x_ptr + row * x_row + slot * slot_len + byte)
            else:
                k = byte * PER_BYTE + slot
                x_code = tl.load(x_ptr + row * K + k, mask=k < K, other=0).to(tl.int32)
                x = tl.where(k < K, tl.load(lut_x_ptr + x_code).to(tl.int32), 0)
            partial += w * x[:, None]
    acc = tl.sum(partial, axis=0)
    rows = row + tl.arange(0, 1)
    _store_tile(acc[None, :], rows, cols, M, N, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr, half, shift,
                drop_bits, ATOMIC)


@triton.jit
def _inload_dot_kernel(x_ptr, lut_x_ptr, w_ptr, lut_w_ptr, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr,
                       M, N, K, row_bytes, x_row, slot_len, half, shift, drop_bits,
                       X_DECODED: tl.constexpr, X_BASE: tl.constexpr, WIDTH: tl.constexpr, LUT_W: tl.constexpr,
                       DECODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
                       SPLIT_STEPS: tl.constexpr, GROUP_M: tl.constexpr, ATOMIC: tl.constexpr):
    """Weights decoded in the tile load, int8 tl.dot per container slot (grid: output tiles × K splits)."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    CODE_MASK: tl.constexpr = (1 << WIDTH) - 1
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    byte_range = tl.arange(0, BLOCK_KB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    weight_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    lut_tile = tl.zeros((LUT_W, BLOCK_N), dtype=tl.int8)
    if DECODE == 1:
        lut_tile = tl.load(lut_w_ptr + cols[None, :] * LUT_W + tl.arange(0, LUT_W)[:, None], mask=col_ok[None, :],
                           other=0)
    for step in range(SPLIT_STEPS):
        byte = (pid_k * SPLIT_STEPS + step) * BLOCK_KB + byte_range
        packed = tl.load(w_ptr + cols[None, :].to(tl.int64) * row_bytes + byte[:, None],
                         mask=(byte < row_bytes)[:, None] & col_ok[None, :], other=0)
        step_sum = tl.zeros((BLOCK_KB, BLOCK_N), dtype=tl.int32)
        for slot in tl.static_range(PER_BYTE):
            k = byte * PER_BYTE + slot
            code = ((packed >> (slot * WIDTH)) & CODE_MASK).to(tl.int32)
            w = _lookup_weights(code, cols, col_ok, lut_w_ptr, lut_tile, LUT_W, DECODE)
            if X_DECODED:
                x = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_row + slot * slot_len + byte[None, :],
                            mask=row_ok[:, None], other=0)
            else:
                x_mask = row_ok[:, None] & (k < K)[None, :]
                x_code = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=x_mask, other=0)
                x = tl.where(x_mask, tl.load(lut_x_ptr + x_code.to(tl.int32)).to(tl.int32) - X_BASE, 0).to(tl.int8)
            # x is 0 past K, so the padded codes of the last byte need no mask in the dot.
            acc = tl.dot(x, w.to(tl.int8), acc, out_dtype=tl.int32)
            if X_BASE != 0:
                step_sum += tl.where((k < K)[:, None], w.to(tl.int32), 0)
        if X_BASE != 0:
            weight_sum += tl.sum(step_sum, axis=0)
    if X_BASE != 0:
        acc += X_BASE * weight_sum[None, :]
    _store_tile(acc, rows, cols, M, N, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr, half, shift, drop_bits,
                ATOMIC)


@triton.jit
def _lut_words(lut_ptr, cols, col_ok):
    """A column's 16-entry int8 LUT as four int32 words (nibble_lut_words layout), each [1, BLOCK_N]-broadcastable."""
    words = lut_ptr + cols * 4
    return (tl.load(words, mask=col_ok, other=0), tl.load(words + 1, mask=col_ok, other=0),
            tl.load(words + 2, mask=col_ok, other=0), tl.load(words + 3, mask=col_ok, other=0))


@triton.jit
def _load_words(pointers, mask, EVEN: tl.constexpr):
    """Packed weight words; EVEN: the launch covers exactly N × row_words, so no mask (fewer instructions
    per word in a kernel that is close to instruction bound)."""
    if EVEN:
        return tl.load(pointers)
    return tl.load(pointers, mask=mask, other=0)


@triton.jit
def _gemv_nibble_kernel(x_ptr, lut_ptr, w_ptr, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr,
                        M, N, row_words, x_row_words, half, shift, drop_bits, X_UNSIGNED: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_STEPS: tl.constexpr,
                        ATOMIC: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN: tl.constexpr):
    """_gemv_kernel for 4-bit containers: a packed int32 word (8 codes) meets an int64 word of 8 decoded
    activations in nibble_ptx.dot_nibble_words (decode by prmt, two dp4a). NUM_STAGES > 1 software-pipelines
    the weight loads (cp.async), which a loop without tl.dot does not get by default."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tiles_n
    row = (tl.program_id(0) // tiles_n).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    lut0, lut1, lut2, lut3 = _lut_words(lut_ptr, cols, col_ok)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
    for step in tl.range(SPLIT_STEPS, num_stages=NUM_STAGES):
        word = (tl.program_id(1) * SPLIT_STEPS + step) * BLOCK_W + tl.arange(0, BLOCK_W)
        words = _load_words(w_ptr + cols[:, None].to(tl.int64) * row_words + word[None, :],
                            col_ok[:, None] & (word < row_words)[None, :], EVEN)
        # The activation buffer spans every word of every split (zero past K): no mask.
        x = tl.load(x_ptr + row * x_row_words + word)
        acc = dot_nibble_words(words, lut0[:, None], lut1[:, None], lut2[:, None], lut3[:, None],
                               x.to(tl.int32)[None, :], (x >> 32).to(tl.int32)[None, :], acc, X_UNSIGNED)
    total = tl.sum(acc, axis=1)
    _store_tile(total[None, :], row + tl.arange(0, 1), cols, M, N, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr,
                half, shift, drop_bits, ATOMIC)


@triton.jit
def _inload_nibble_dot_kernel(x_ptr, lut_ptr, w_ptr, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr,
                              M, N, row_words, x_row, slot_len, half, shift, drop_bits, X_BASE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                              SPLIT_STEPS: tl.constexpr, GROUP_M: tl.constexpr, ATOMIC: tl.constexpr,
                              WEIGHTS_AS_A: tl.constexpr, EVEN: tl.constexpr):
    """_inload_dot_kernel for 4-bit containers: each packed word decoded by prmt into two words of four int8
    levels, split into 8 byte slots by nibble_ptx.word_slots and fed to int8 tl.dot against the slot-major
    activations (slot s of word j is k = 8j + s). WEIGHTS_AS_A computes accᵀ = w · xᵀ, the decoded weights
    being the A operand (the faster orientation at M = 16 on H100)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    lut0, lut1, lut2, lut3 = _lut_words(lut_ptr, cols, col_ok)
    if WEIGHTS_AS_A:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    weight_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for step in range(SPLIT_STEPS):
        word = (tl.program_id(1) * SPLIT_STEPS + step) * BLOCK_W + tl.arange(0, BLOCK_W)
        words = _load_words(w_ptr + cols[:, None].to(tl.int64) * row_words + word[None, :],
                            col_ok[:, None] & (word < row_words)[None, :], EVEN)
        low, high = decode_nibble_words(words, lut0[:, None], lut1[:, None], lut2[:, None], lut3[:, None])
        for part in tl.static_range(2):
            slots = word_slots(low if part == 0 else high)
            for byte in tl.static_range(4):
                x_slot = x_ptr + (4 * part + byte) * slot_len
                if WEIGHTS_AS_A:
                    x = tl.load(x_slot + rows[None, :].to(tl.int64) * x_row + word[:, None], mask=row_ok[None, :],
                                other=0)
                    acc = tl.dot(slots[byte], x, acc, out_dtype=tl.int32)
                else:
                    x = tl.load(x_slot + rows[:, None].to(tl.int64) * x_row + word[None, :], mask=row_ok[:, None],
                                other=0)
                    acc = tl.dot(x, tl.trans(slots[byte]), acc, out_dtype=tl.int32)
        if X_BASE != 0:
            weight_sum += tl.sum(signed_byte_sum(low) + signed_byte_sum(high), axis=1)
    if WEIGHTS_AS_A:
        acc = tl.trans(acc)
    if X_BASE != 0:
        acc += X_BASE * weight_sum[None, :]
    _store_tile(acc, rows, cols, M, N, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr, half, shift, drop_bits,
                ATOMIC)


@triton.jit
def _decoded_gemm_kernel(x_src, w_src, weight_sum_ptr, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr,
                         M, N, k_pad, half, shift, drop_bits, X_BASE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr, GROUP_M: tl.constexpr,
                         TMA: tl.constexpr):
    """int8 x[M, k_pad] · int8 w[N, k_pad]ᵀ (both decoded, zero past K) with the §5 epilogue fused."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if TMA:
        for step in range(K_STEPS):
            x = x_src.load([pid_m * BLOCK_M, step * BLOCK_K])
            w = w_src.load([pid_n * BLOCK_N, step * BLOCK_K])
            acc = tl.dot(x, w.T, acc, out_dtype=tl.int32)
    else:
        # Wrapped row/column indices keep the loads unmasked (the extra rows are never stored).
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_src + (rows % M)[:, None].to(tl.int64) * k_pad + ks[None, :]
        w_ptrs = w_src + (cols % N)[:, None].to(tl.int64) * k_pad + ks[None, :]
        for _ in range(K_STEPS):
            acc = tl.dot(tl.load(x_ptrs), tl.trans(tl.load(w_ptrs)), acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    if X_BASE != 0:
        acc += X_BASE * tl.load(weight_sum_ptr + cols, mask=cols < N, other=0)[None, :]
    _store_tile(acc, rows, cols, M, N, mult_ptr, offset_ptr, i_min_ptr, acc_ptr, codes_ptr, half, shift, drop_bits,
                False)


@triton.jit
def _requantize_kernel(acc_ptr, mult_ptr, offset_ptr, i_min_ptr, codes_ptr, N, half, shift, drop_bits,
                       BLOCK: tl.constexpr):
    """Epilogue of the split-K paths, on the summed acc (grid: rows × column blocks)."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < N
    offsets = tl.program_id(0).to(tl.int64) * N + cols
    acc = tl.load(acc_ptr + offsets, mask=inside, other=0)
    mult = tl.load(mult_ptr + cols, mask=inside, other=0).to(tl.int64)
    offset = tl.load(offset_ptr + cols, mask=inside, other=0)
    i_min = tl.load(i_min_ptr + cols, mask=inside, other=0).to(tl.int64)
    index = _requantize(acc, mult, offset, i_min, half, shift)
    tl.store(codes_ptr + offsets, (index >> drop_bits).to(tl.uint8), mask=inside)


@triton.jit
def _decode_activations_kernel(codes_ptr, lut_x_ptr, out_ptr, K, out_row, slot_len, X_BASE: tl.constexpr,
                               PAD: tl.constexpr, PER_BYTE: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, slot·slot_len + byte] = lut_x[codes[m, byte·PER_BYTE + slot]] − X_BASE; PAD past K
    (grid: rows × byte blocks × slots; no integer division)."""
    row = tl.program_id(0).to(tl.int64)
    byte = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.program_id(2)
    k = byte * PER_BYTE + slot
    valid = k < K
    code = tl.load(codes_ptr + row * K + k, mask=valid, other=0).to(tl.int32)
    value = tl.where(valid, tl.load(lut_x_ptr + code).to(tl.int32) - X_BASE, PAD)
    tl.store(out_ptr + row * out_row + slot * slot_len + byte, value.to(out_ptr.dtype.element_ty),
             mask=byte < slot_len)


@triton.jit
def _decode_weights_kernel(w_ptr, lut_w_ptr, out_ptr, weight_sum_ptr, N, K, row_bytes, k_pad,
                           WIDTH: tl.constexpr, LUT_W: tl.constexpr, WITH_SUM: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = lut_w[n, code(n, k)] as int8 [N, k_pad] (0 past K); Σ_k out[n, k] into weight_sum.
    One output per element (contiguous stores; per-slot strided stores measured 3.7× slower on H100)."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    CODE_MASK: tl.constexpr = (1 << WIDTH) - 1
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    k_ok = k < K
    packed = tl.load(w_ptr + rows[:, None].to(tl.int64) * row_bytes + (k // PER_BYTE)[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0)
    code = ((packed >> ((k % PER_BYTE) * WIDTH)[None, :]) & CODE_MASK).to(tl.int32)
    w = tl.load(lut_w_ptr + rows[:, None] * LUT_W + code, mask=row_ok[:, None], other=0)
    w = tl.where(k_ok[None, :], w, 0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * k_pad + k[None, :], w,
             mask=row_ok[:, None] & (k < k_pad)[None, :])
    if WITH_SUM:
        tl.atomic_add(weight_sum_ptr + rows, tl.sum(w.to(tl.int32), axis=1), mask=row_ok, sem="relaxed")


@triton.jit
def _slot_weights(packed, slot: tl.constexpr, rows, row_ok, lut_w_ptr, WIDTH: tl.constexpr, LUT_W: tl.constexpr):
    code = ((packed >> (slot * WIDTH)) & ((1 << WIDTH) - 1)).to(tl.int32)
    return tl.load(lut_w_ptr + rows[:, None] * LUT_W + code, mask=row_ok[:, None], other=0)


@triton.jit
def _decode_weight_bytes_kernel(w_ptr, lut_w_ptr, out_ptr, weight_sum_ptr, N, K, row_bytes, k_pad,
                                WIDTH: tl.constexpr, LUT_W: tl.constexpr, WITH_SUM: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """_decode_weights_kernel reading each packed byte once: its slots are looked up separately and
    interleaved back into K order with tl.join (slot j of byte b is k = b·per_byte + j), so the stores
    stay contiguous."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    packed = tl.load(w_ptr + rows[:, None].to(tl.int64) * row_bytes + byte[None, :],
                     mask=row_ok[:, None] & (byte < row_bytes)[None, :], other=0)
    args = (rows, row_ok, lut_w_ptr, WIDTH, LUT_W)
    if PER_BYTE == 1:
        w = _slot_weights(packed, 0, *args)
    elif PER_BYTE == 2:
        w = tl.join(_slot_weights(packed, 0, *args), _slot_weights(packed, 1, *args))
    elif PER_BYTE == 4:
        w = tl.join(tl.join(_slot_weights(packed, 0, *args), _slot_weights(packed, 2, *args)),
                    tl.join(_slot_weights(packed, 1, *args), _slot_weights(packed, 3, *args)))
    else:
        w = tl.join(tl.join(tl.join(_slot_weights(packed, 0, *args), _slot_weights(packed, 4, *args)),
                            tl.join(_slot_weights(packed, 2, *args), _slot_weights(packed, 6, *args))),
                    tl.join(tl.join(_slot_weights(packed, 1, *args), _slot_weights(packed, 5, *args)),
                            tl.join(_slot_weights(packed, 3, *args), _slot_weights(packed, 7, *args))))
    w = tl.reshape(w, (BLOCK_N, BLOCK_B * PER_BYTE))
    k = tl.program_id(1) * (BLOCK_B * PER_BYTE) + tl.arange(0, BLOCK_B * PER_BYTE)
    w = tl.where((k < K)[None, :], w, 0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * k_pad + k[None, :], w,
             mask=row_ok[:, None] & (k < k_pad)[None, :])
    if WITH_SUM:
        tl.atomic_add(weight_sum_ptr + rows, tl.sum(w.to(tl.int32), axis=1), mask=row_ok, sem="relaxed")


@triton.jit
def _decode_nibble_weights_kernel(w_ptr, lut_ptr, out_ptr, weight_sum_ptr, N, row_words, out_words,
                                  WITH_SUM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """_decode_weights_kernel for 4-bit containers: each packed word → two int32 words of int8 levels
    (out viewed as int32 [N, k_pad / 4]); codes past K decode to real levels (activations are the raw zero
    there) and count in weight_sum."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    word = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    words = tl.load(w_ptr + rows[:, None].to(tl.int64) * row_words + word[None, :],
                    mask=row_ok[:, None] & (word < row_words)[None, :], other=0)
    lut0, lut1, lut2, lut3 = _lut_words(lut_ptr, rows, row_ok)
    low, high = decode_nibble_words(words, lut0[:, None], lut1[:, None], lut2[:, None], lut3[:, None])
    out_word = tl.program_id(1) * (2 * BLOCK_W) + tl.arange(0, 2 * BLOCK_W)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * out_words + out_word[None, :],
             tl.reshape(tl.join(low, high), (BLOCK_N, 2 * BLOCK_W)),
             mask=row_ok[:, None] & (out_word < out_words)[None, :])
    if WITH_SUM:
        # Only the words that reach the output (k < k_pad) meet activations.
        in_output = (word < out_words // 2)[None, :]
        word_sums = tl.where(in_output, signed_byte_sum(low) + signed_byte_sum(high), 0)
        tl.atomic_add(weight_sum_ptr + rows, tl.sum(word_sums, axis=1), mask=row_ok, sem="relaxed")


def nibble_lut_words(lut_w: Tensor) -> Tensor:
    """lut_w int8 [N, ≤ 16] zero-padded to 16 entries and viewed as int32 [N, 4] (entries 4i..4i+3 in word i,
    entry 4i in the lowest byte), the register form nibble_ptx.py picks bytes from."""
    if lut_w.shape[1] == 16:
        return lut_w.contiguous().view(torch.int32)
    return torch.nn.functional.pad(lut_w, (0, 16 - lut_w.shape[1])).view(torch.int32)


def nibble_ptx_eligible(width: int, packed_w: Tensor) -> bool:
    """Whether DECODE_NIBBLE_PTX can run: 4-bit containers in rows of whole, aligned int32 words (under the
    interpreter, nibble_ptx.py emulates the PTX)."""
    return width == 4 and packed_w.shape[1] % 4 == 0 and packed_w.data_ptr() % 4 == 0


def decode_activations(codes_x: Tensor, lut_x: Tensor, x_base: int, dtype: torch.dtype, per_byte: int,
                       slot_len: int, pad: int = 0) -> Tensor:
    """lut_x[codes_x] − x_base once per GEMM, as [M, per_byte·slot_len] in slot-major order (per_byte = 1:
    plain [M, slot_len]); `pad` past K."""
    m, k = codes_x.shape
    out = torch.empty((m, per_byte * slot_len), dtype=dtype, device=codes_x.device)
    block = 1024
    _decode_activations_kernel[(m, triton.cdiv(slot_len, block), per_byte)](
        codes_x, lut_x, out, k, out.shape[1], slot_len, X_BASE=x_base, PAD=pad, PER_BYTE=per_byte, BLOCK=block)
    return out


def decode_weights(packed_w: Tensor, lut_w: Tensor, width: int, k: int, k_pad: int,
                   with_sum: bool, decode: int = DECODE_LOAD) -> tuple[Tensor, Tensor]:
    """Unpacked, LUT-decoded int8 weights [N, k_pad] and their int32 row sums.

    decode: DECODE_BYTES reads each packed byte once and interleaves its slots (`_decode_weight_bytes_kernel`),
    DECODE_NIBBLE_PTX decodes a packed word at a time (codes past K then hold real levels, counted in the sums:
    pair them with activations padded by the raw zero), any other value one load per weight (zero past K).
    All are swept by benchmarks/bench_int_gemm_gpu.py."""
    n, row_bytes = packed_w.shape
    out = torch.empty((n, k_pad), dtype=torch.int8, device=packed_w.device)
    weight_sum = torch.zeros(n, dtype=torch.int32, device=packed_w.device)
    block_n, block_k = (16, 256) if interpreting() else (32, 512)
    if decode == DECODE_NIBBLE_PTX:
        block_w = block_k // 8
        _decode_nibble_weights_kernel[(triton.cdiv(n, block_n), triton.cdiv(k_pad, block_k))](
            packed_w.view(torch.int32), nibble_lut_words(lut_w), out.view(torch.int32), weight_sum, n,
            row_bytes // 4, k_pad // 4, WITH_SUM=with_sum, BLOCK_N=block_n, BLOCK_W=block_w)
        return out, weight_sum
    if decode == DECODE_BYTES:
        block_b = block_k // (8 // width)
        _decode_weight_bytes_kernel[(triton.cdiv(n, block_n), triton.cdiv(k_pad, block_k))](
            packed_w, lut_w, out, weight_sum, n, k, row_bytes, k_pad, WIDTH=width, LUT_W=lut_w.shape[1],
            WITH_SUM=with_sum, BLOCK_N=block_n, BLOCK_B=block_b)
        return out, weight_sum
    _decode_weights_kernel[(triton.cdiv(n, block_n), triton.cdiv(k_pad, block_k))](
        packed_w, lut_w, out, weight_sum, n, k, row_bytes, k_pad, WIDTH=width, LUT_W=lut_w.shape[1],
        WITH_SUM=with_sum, BLOCK_N=block_n, BLOCK_K=block_k)
    return out, weight_sum


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_for(tiles: int, k_steps: int, device: torch.device) -> int:
    """K splits that give about PROGRAMS_PER_SM programs per SM (1 under the interpreter)."""
    if device.type != "cuda":
        return 1
    target = PROGRAMS_PER_SM * _multiprocessors(device.index or 0)
    return max(1, min(k_steps, triton.cdiv(target, tiles)))


def default_config(m: int, n: int, width: int, row_bytes: int, device: Optional[torch.device] = None,
                   nibble_ptx: bool = False) -> TileConfig:
    """The size heuristic: decode once for M ≥ DECODE_ONCE_MIN_M (NIBBLE_DECODE_ONCE_MIN_M with `nibble_ptx`,
    see nibble_ptx_eligible; compute bound), else decode in the load (memory bound) with split K; M = 1
    without tensor cores. GPU tiles: best of the H100 sweeps in benchmarks/results/bench_int_gemm_gpu.log.
    The interpreter gets few, large programs."""
    device = device or torch.device("cpu")
    if m >= (NIBBLE_DECODE_ONCE_MIN_M if nibble_ptx else DECODE_ONCE_MIN_M):
        if interpreting():
            return TileConfig(64, 64, 64, num_stages=1, decode_once=True)
        if nibble_ptx:
            return TileConfig(128, 128, 256, num_warps=8, num_stages=3, group_m=8, decode_once=True, tma=True,
                              decode=DECODE_NIBBLE_PTX)
        return TileConfig(128, 128, 128, num_warps=8, num_stages=4, group_m=8, decode_once=True, tma=True)
    if interpreting():
        block_kb = min(512, max(32, triton.next_power_of_2(row_bytes)))
        block_m = 1 if m == 1 else 16 if m <= 16 else 64
        return TileConfig(block_m, 32 if n <= 32 else 64, block_kb, num_stages=1)
    if nibble_ptx and 1 < m <= 16 and device.type == "cuda" and nibble_mma_gemv.available():
        mma = nibble_mma_gemv
        steps = triton.cdiv(row_bytes * 2, mma.STEP_CODES)
        return TileConfig(16, 16 * mma.ROW_TILES * mma.WARPS_N, mma.STEP_CODES // 2, num_warps=mma.WARPS_N * mma.WARPS_K,
                          num_stages=mma.STAGES, decode=DECODE_NIBBLE_MMA, row_tiles=mma.ROW_TILES,
                          split_k=mma.splits_for(n, steps, device))
    if nibble_ptx:
        block_m, block_n, block_kb = (1, 32, 256) if m == 1 else (16, 64, 128) if m <= 16 else (64, 64, 128)
        decode = DECODE_NIBBLE_PTX
    else:
        # The 16-row tile with 1-bit containers fails to compile (Triton 3.6 on H100,
        # TritonGPUOptimizeThreadLocality); the 64-row register-LUT tile compiles and matches the golden.
        small_m = m <= 16 and width > 1
        block_m, block_n, block_kb = (1, 32, 256) if m == 1 else (16, 32, 256) if small_m else (64, 64, 128)
        decode = DECODE_GATHER if m > 1 else DECODE_LOAD
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = split_for(tiles, triton.cdiv(row_bytes, block_kb), device)
    return TileConfig(block_m, block_n, block_kb, num_warps=4, num_stages=3, group_m=1 if block_m == 16 else 8,
                      split_k=split, decode=decode, weights_as_a=nibble_ptx and m > 1)


def int_gemm_packed(codes_x: Tensor, lut_x: Tensor, packed_w: Tensor, lut_w: Tensor, mult: Tensor, offset: Tensor,
                    shift: int, i_min: Tensor, bits_out: int, bits_w: int, k: int,
                    config: Optional[TileConfig] = None, predecode: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """Spec §5 on one device: codes_x uint8[M, K], lut_x int8/uint8[2^b_a], packed_w uint8[N, ceil(K·w/8)],
    lut_w int8[N, 2^b_w], mult int32[N], offset int64[N], i_min int32[N] → (acc int32[M, N], codes uint8[M, N]).

    Arguments are assumed valid (ddq.deploy.int_gemm checks them); this checks devices and dtypes only.
    config: tiles and path (default: `default_config`'s size heuristic). predecode (in-load paths): decode
    activations once per GEMM (default) instead of gathering them through lut_x in every tile; the
    decode-once path always decodes them once.
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
    codes_x, lut_x, packed_w, lut_w = (t.contiguous() for t in (codes_x, lut_x, packed_w, lut_w))
    config = config or default_config(m, n, width, row_bytes, device, nibble_ptx_eligible(width, packed_w))
    if config.decode == DECODE_NIBBLE_MMA:
        _check_nibble_mma(width, packed_w, m, device, config)
    if config.decode == DECODE_NIBBLE_PTX and not (nibble_ptx_eligible(width, packed_w) and config.block_kb % 4 == 0):
        raise ValueError(f"int_gemm_packed: DECODE_NIBBLE_PTX needs 4-bit containers (got {width}-bit), packed "
                         f"rows of whole int32 words (got {row_bytes} bytes) and block_kb a multiple of 4 "
                         f"(got {config.block_kb})")
    epilogue = (mult.contiguous(), offset.contiguous(), i_min.contiguous())
    x_base = 128 if lut_x.dtype == torch.uint8 else 0
    scalars = (1 << (shift - 1), shift, 8 - bits_out)
    codes = torch.empty((m, n), dtype=torch.uint8, device=device)
    try:
        if config.decode_once:
            return _decode_once(codes_x, lut_x, packed_w, lut_w, epilogue, scalars, codes, width, k, x_base, config)
        return _decode_in_load(codes_x, lut_x, packed_w, lut_w, epilogue, scalars, codes, width, k, x_base, config,
                               True if predecode is None else predecode)
    except (CompilationError, RuntimeError) as error:
        if not (isinstance(error, CompilationError) or "PassManager::run failed" in str(error)):
            raise
        # Some tiles the interpreter runs do not compile for a GPU (Triton 3.6: the register-LUT gather in narrow
        # tiles, int8 dots with K < 32); say which config, not only the compiler's internals.
        reason = str(error).strip().splitlines()[-1]
        raise ValueError(f"int_gemm_packed: Triton cannot compile the kernel of {config} for {device} ({reason}); "
                         "choose other tiles, or config=None for default_config's") from error


def _check_nibble_mma(width: int, packed_w: Tensor, m: int, device: torch.device, config: TileConfig) -> None:
    if not (nibble_ptx_eligible(width, packed_w) and 1 <= m <= 16):
        raise ValueError(f"int_gemm_packed: DECODE_NIBBLE_MMA needs 4-bit containers (got {width}-bit), packed rows "
                         f"of whole int32 words (got {packed_w.shape[1]} bytes) and M <= 16 (got {m})")
    warps_n, warps_k = _mma_warps(config)
    if (warps_n == 0 or warps_n * warps_k != config.num_warps or config.block_n != 16 * config.row_tiles * warps_n
            or config.block_kb != nibble_mma_gemv.STEP_CODES // 2 or config.num_stages < 1):
        raise ValueError(f"int_gemm_packed: DECODE_NIBBLE_MMA needs block_n a multiple of 16 × row_tiles "
                         f"(got {config.block_n}, row_tiles {config.row_tiles}) whose warps divide num_warps "
                         f"(got {config.num_warps}), block_kb = {nibble_mma_gemv.STEP_CODES // 2} (got {config.block_kb}) "
                         f"and num_stages >= 1 (got {config.num_stages})")
    if device.type != "cuda" or not nibble_mma_gemv.available():
        raise RuntimeError("int_gemm_packed: DECODE_NIBBLE_MMA is a CUDA C kernel compiled by NVRTC; it cannot run "
                           f"on {device} here (the Triton decodes, e.g. DECODE_NIBBLE_PTX, run everywhere)")


def _mma_warps(config: TileConfig) -> tuple[int, int]:
    """DECODE_NIBBLE_MMA's warps per block on different rows and on K, from block_n, row_tiles and num_warps."""
    warps_n = config.block_n // (16 * config.row_tiles)
    return warps_n, config.num_warps // max(warps_n, 1)


def _decode_once(codes_x, lut_x, packed_w, lut_w, epilogue, scalars, codes, width, k, x_base, config):
    m, n = codes.shape
    k_pad = triton.cdiv(k, config.block_kb) * config.block_kb
    # Nibble-decoded weights hold real levels past K: the activations there are the raw zero.
    pad = -x_base if config.decode == DECODE_NIBBLE_PTX else 0
    x = decode_activations(codes_x, lut_x, x_base, torch.int8, 1, k_pad, pad)
    w, weight_sum = decode_weights(packed_w, lut_w, width, k, k_pad, x_base != 0, config.decode)
    acc = torch.empty((m, n), dtype=torch.int32, device=codes.device)
    x_src, w_src = x, w
    if config.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_src = TensorDescriptor.from_tensor(x, [config.block_m, config.block_kb])
        w_src = TensorDescriptor.from_tensor(w, [config.block_n, config.block_kb])
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _decoded_gemm_kernel[grid](
        x_src, w_src, weight_sum, *epilogue, acc, codes, m, n, k_pad, *scalars, X_BASE=x_base,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_kb, K_STEPS=k_pad // config.block_kb,
        GROUP_M=config.group_m, TMA=config.tma, num_warps=config.num_warps, num_stages=config.num_stages)
    return acc, codes


def _split(steps: int, split_k: int) -> tuple[int, int]:
    """K steps per program and the number of programs that covers `steps` when asking for `split_k`."""
    split_steps = triton.cdiv(steps, split_k)
    return split_steps, triton.cdiv(steps, split_steps)


def _requantize_split_sums(acc: Tensor, epilogue, codes: Tensor, scalars) -> None:
    m, n = codes.shape
    block = 1024
    _requantize_kernel[(m, triton.cdiv(n, block))](acc, *epilogue, codes, n, *scalars, BLOCK=block)


def _decode_in_load(codes_x, lut_x, packed_w, lut_w, epilogue, scalars, codes, width, k, x_base, config, predecode):
    if config.decode == DECODE_NIBBLE_MMA:
        return _decode_nibbles_into_fragments(codes_x, lut_x, packed_w, lut_w, epilogue, scalars, codes, config)
    if config.decode == DECODE_NIBBLE_PTX:
        if not predecode:
            raise ValueError("int_gemm_packed: DECODE_NIBBLE_PTX decodes the activations once (predecode=True)")
        return _decode_nibbles_in_load(codes_x, lut_x, packed_w, lut_w, epilogue, scalars, codes, x_base, config)
    m, n = codes.shape
    row_bytes = packed_w.shape[1]
    per_byte = 8 // width
    k_steps = triton.cdiv(row_bytes, config.block_kb)
    split_steps, splits = _split(k_steps, config.split_k)
    slot_len = splits * split_steps * config.block_kb
    gemv = config.block_m == 1
    x = codes_x
    if predecode:
        # The tensor-core path needs int8 (x − 128 for uint8 tables); the GEMV multiplies in int32.
        x = decode_activations(codes_x, lut_x, 0 if gemv else x_base, torch.int32 if gemv else torch.int8,
                               per_byte, slot_len)
    atomic = splits > 1
    acc = (torch.zeros if atomic else torch.empty)((m, n), dtype=torch.int32, device=codes.device)
    common = (x, lut_x, packed_w, lut_w, *epilogue, acc, codes, m, n, k, row_bytes, per_byte * slot_len, slot_len,
              *scalars)
    if gemv:
        _gemv_kernel[(triton.cdiv(n, config.block_n) * m, splits)](
            *common, X_DECODED=predecode, WIDTH=width, LUT_W=lut_w.shape[1], DECODE=config.decode,
            BLOCK_N=config.block_n, BLOCK_KB=config.block_kb, SPLIT_STEPS=split_steps, ATOMIC=atomic,
            num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), splits)
        _inload_dot_kernel[grid](
            *common, X_DECODED=predecode, X_BASE=x_base, WIDTH=width, LUT_W=lut_w.shape[1], DECODE=config.decode,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_KB=config.block_kb, SPLIT_STEPS=split_steps,
            GROUP_M=config.group_m, ATOMIC=atomic, num_warps=config.num_warps, num_stages=config.num_stages)
    if atomic:
        _requantize_split_sums(acc, epilogue, codes, scalars)
    return acc, codes


def _decode_nibbles_in_load(codes_x, lut_x, packed_w, lut_w, epilogue, scalars, codes, x_base, config):
    """_decode_in_load with DECODE_NIBBLE_PTX: K counted in packed int32 words of 8 codes."""
    m, n = codes.shape
    row_words = packed_w.shape[1] // 4
    block_w = config.block_kb // 4
    w_steps = triton.cdiv(row_words, block_w)
    split_steps, splits = _split(w_steps, config.split_k)
    words = splits * split_steps * block_w
    even = words == row_words and n % config.block_n == 0
    atomic = splits > 1
    acc = (torch.zeros if atomic else torch.empty)((m, n), dtype=torch.int32, device=codes.device)
    weights = (nibble_lut_words(lut_w), packed_w.view(torch.int32))
    if config.block_m == 1:
        # dp4a takes uint8 activations as they are; 8 of them per int64 word, zero past K.
        x = decode_activations(codes_x, lut_x, 0, lut_x.dtype, 1, 8 * words).view(torch.int64)
        _gemv_nibble_kernel[(triton.cdiv(n, config.block_n) * m, splits)](
            x, *weights, *epilogue, acc, codes, m, n, row_words, words, *scalars, X_UNSIGNED=lut_x.dtype == torch.uint8,
            BLOCK_N=config.block_n, BLOCK_W=block_w, SPLIT_STEPS=split_steps, ATOMIC=atomic,
            NUM_STAGES=config.num_stages, EVEN=even, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        x = decode_activations(codes_x, lut_x, x_base, torch.int8, 8, words, pad=-x_base)
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), splits)
        _inload_nibble_dot_kernel[grid](
            x, *weights, *epilogue, acc, codes, m, n, row_words, 8 * words, words, *scalars, X_BASE=x_base,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_W=block_w, SPLIT_STEPS=split_steps,
            GROUP_M=config.group_m, ATOMIC=atomic, WEIGHTS_AS_A=config.weights_as_a, EVEN=even,
            num_warps=config.num_warps, num_stages=config.num_stages)
    if atomic:
        _requantize_split_sums(acc, epilogue, codes, scalars)
    return acc, codes


def _decode_nibbles_into_fragments(codes_x, lut_x, packed_w, lut_w, epilogue, scalars, codes, config):
    """DECODE_NIBBLE_MMA: activations decoded once (int8 or uint8 as the table is, zero past K: the mma takes
    uint8 as it is), then ddq_kernels/nibble_mma_gemv.py; its K splits meet through atomics."""
    m, n = codes.shape
    x = decode_activations(codes_x, lut_x, 0, lut_x.dtype, 1, nibble_mma_gemv.padded_row(codes_x.shape[1]))
    atomic = config.split_k > 1
    acc = (torch.zeros if atomic else torch.empty)((m, n), dtype=torch.int32, device=codes.device)
    _, shift, drop_bits = scalars
    warps_n, warps_k = _mma_warps(config)
    nibble_mma_gemv.nibble_mma_gemv(x, nibble_lut_words(lut_w), packed_w, *epilogue, acc, codes, shift, drop_bits,
                                    config.split_k, row_tiles=config.row_tiles, warps_n=warps_n, warps_k=warps_k,
                                    stages=config.num_stages)
    if atomic:
        _requantize_split_sums(acc, epilogue, codes, scalars)
    return acc, codes
