"""Element-wise DDQ math shared by every Triton kernel (DDQ_SPEC.md Sections 2 and 3).

Each kernel reads the quantizer's parameters straight from device memory: the bitwidth from the gate
logits (so no kernel launch waits for a host sync), lo and hi per group, and the per-code level table
built by `ddq_kernels.level_table`. These helpers are inlined into the kernels.

Two deliberate departures from the reference's operation order, both allowed by spec §2 ("fused
multiply-add and any summation order are allowed"): u is (x − lo)·(1/Δ) instead of (x − lo)/Δ (one
multiply per element instead of a division), and sums run in tile order. Both move u by at most a few
ulp, so an element can land in the neighbouring fine cell only when u + 0.5 lies within a few ulp of
an integer; tests count such elements instead of requiring them equal.
"""

import triton
import triton.language as tl

FINEST_BITS = 8
FINE_CELLS = 256


@triton.jit
def bitwidth_from_logits(logits_ptr, MIN_BITS: tl.constexpr):
    """Spec §2: b = Σ_k h_1·…·h_k = the number of leading open gates (forced open for k ≤ min_bits)."""
    k = tl.arange(0, 8)
    logits = tl.load(logits_ptr + k)
    is_open = (logits > 0) | (k < MIN_BITS)
    return tl.min(tl.where(is_open, 8, k), axis=0)


@triton.jit
def grid_scalars(lo_ptr, hi_ptr, group):
    """(lo, 1/Δ) of one group, Δ = (hi − lo)/255 (spec §2)."""
    lo = tl.load(lo_ptr + group)
    return lo, inverse_cell_width(lo, tl.load(hi_ptr + group))


@triton.jit
def inverse_cell_width(lo, hi):
    """1/Δ, Δ = (hi − lo)/255 (spec §2)."""
    delta = (hi - lo) / 255.0
    return 1.0 / delta


@triton.jit
def fine_position(x, lo, inv_delta):
    """Spec §2 step 1: u = (x − lo)/Δ in float32."""
    return (x - lo) * inv_delta


@triton.jit
def fine_cell(u):
    """Spec §2 step 1: i = clamp(floor(u + 0.5), 0, 255) as int32; NaN lands in cell 0.

    The final mask keeps the index in bounds on every backend: float→int casts of NaN differ between
    the GPU (0) and the interpreter (a wrapped value).
    """
    clamped = tl.minimum(tl.maximum(tl.floor(u + 0.5), 0.0), 255.0)
    return clamped.to(tl.int32) & 255


@triton.jit
def quantized_values(x, lo, inv_delta, shift, table_row_ptr):
    """Spec §2 steps 1–4: x_q = V[i >> (8 − b)] from the per-code level table; NaN for non-finite x."""
    cell = fine_cell(fine_position(x, lo, inv_delta))
    level = tl.load(table_row_ptr + (cell >> shift))
    return level + x * 0.0


@triton.jit
def inside_range(u):
    """Spec §3: in = 1[0 ≤ u ≤ 2^K − 1] on the float32 u."""
    return (u >= 0.0) & (u <= 255.0)


@triton.jit
def cell_histogram(cell, v, BATCHES: tl.constexpr, V_FITS_TF32: tl.constexpr):
    """Σ v per fine cell of a block of elements (any shape) as a (16, 16) tile (bin = 16·row + column).

    The histogram is a matrix product of one-hot codes, [cell >> 4 == row]ᵀ · (v·[cell & 15 == col]):
    32 compares per element and one small tensor-core product instead of 256 per-element atomics.
    The block is cut into BATCHES rows and multiplied as a batched product, so that each warp holds
    only its slice of the contraction (one long contraction would sit whole in every warp's registers).
    The one-hot side is exact in tf32. So is v when it holds bf16 or fp16 values (V_FITS_TF32: at most
    10 mantissa bits); a float32 v is split into a tf32 head and the remainder, two products that keep
    22 bits (relative error 2^-22 per element).
    """
    DEPTH: tl.constexpr = cell.numel // BATCHES
    cell = tl.reshape(cell, (BATCHES, DEPTH))
    v = tl.reshape(v, (BATCHES, DEPTH))
    bins = tl.arange(0, 16)[None, None, :]
    high = tl.permute(((cell[:, :, None] >> 4) == bins).to(tl.float32), (0, 2, 1))
    in_column = (cell[:, :, None] & 15) == bins
    if V_FITS_TF32:
        histogram = tl.dot(high, tl.where(in_column, v[:, :, None], 0.0), input_precision="tf32")
    else:
        head = (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        histogram = tl.dot(high, tl.where(in_column, head[:, :, None], 0.0), input_precision="tf32")
        histogram = tl.dot(high, tl.where(in_column, (v - head)[:, :, None], 0.0), histogram, input_precision="tf32")
    return tl.sum(histogram, axis=0)


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even on every backend.

    The GPU rounds float32 → bfloat16 to nearest even; the interpreter truncates, so there the
    rounding is done on the bits first (exact for finite values, keeps NaN and ±inf).
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
