"""(lo, hi) from a quantizer's range parameters, and their gradients, on the device (DDQ_SPEC.md Section 2).

The Triton form of `ddq.quantizer_math.range_bounds` and `range_bounds_grads` (the references: the same
float32 operations in the same order, so the bounds are equal bit for bit). `ddq::quantized_linear` takes the
range parameters themselves and computes the bounds inside its first kernel (`weight_and_tables`), and their
gradients inside the parameter-gradient kernel: a compiled layer used to spend four launches a step on that
math (Inductor's clamps for both quantizers, then their gradients). `range_bounds` is the one launch for the
path that does not inline them (weights over `weight_and_tables.MERGED_WEIGHT_LIMIT`).
"""

import torch
import triton
import triton.language as tl

from ddq import quantizer_math as qm
from ddq_kernels.fine_grid import bitwidth_from_logits

BOUNDS: tl.constexpr = tl.constexpr(qm.BOUNDS)
SYMMETRIC: tl.constexpr = tl.constexpr(qm.SYMMETRIC)
AFFINE: tl.constexpr = tl.constexpr(qm.AFFINE)
MIN_RANGE: tl.constexpr = tl.constexpr(qm.MIN_RANGE)
AFFINE_MIN_RELATIVE_WIDTH: tl.constexpr = tl.constexpr(qm.AFFINE_MIN_RELATIVE_WIDTH)


@triton.jit
def unsigned_coefficients(bits):
    """Spec §2 `unsigned` mode: (a_s, b_s) for the bitwidth b, s = 2^(8−b) (`unsigned_range_coefficients`)."""
    block = (256 >> bits).to(tl.float32)
    a_s = (block - 1.0) / (2.0 * (256.0 - block))
    b_s = (255.0 - (block - 1.0) / 2.0) / (256.0 - block)
    return a_s, b_s


@triton.jit
def group_bounds(bottom_ptr, top_ptr, group, logits_ptr, MIN_BITS: tl.constexpr, MODE: tl.constexpr):
    """(lo, hi) of one group from its range parameters in `RANGE_PARAMETERIZATIONS[MODE]`."""
    top = tl.load(top_ptr + group)
    if MODE == BOUNDS:
        lo = tl.load(bottom_ptr + group)
        hi = top
    elif MODE == AFFINE:
        lo = tl.load(bottom_ptr + group)
        min_width = tl.abs(lo) * AFFINE_MIN_RELATIVE_WIDTH + MIN_RANGE
        hi = lo + tl.maximum(tl.abs(top - lo), min_width, propagate_nan=tl.PropagateNan.ALL)
    else:
        magnitude = tl.maximum(tl.abs(top), MIN_RANGE, propagate_nan=tl.PropagateNan.ALL)
        if MODE == SYMMETRIC:
            lo = -magnitude
            hi = magnitude
        else:
            a_s, b_s = unsigned_coefficients(bitwidth_from_logits(logits_ptr, MIN_BITS))
            lo = -a_s * magnitude
            hi = b_s * magnitude
    return lo, hi


@triton.jit
def sign(value):
    return (value > 0).to(tl.float32) - (value < 0).to(tl.float32)


@triton.jit
def load_range_parameters(bottom_ptr, top_ptr, group, MODE: tl.constexpr):
    """(bottom, top) of one group where `group_bound_grads` reads them in MODE (0 where it does not): loaded
    ahead of the gradient math, so that their latency overlaps the other loads'."""
    bottom = 0.0
    top = 0.0
    if MODE != BOUNDS:
        top = tl.load(top_ptr + group)
    if MODE == AFFINE:
        bottom = tl.load(bottom_ptr + group)
    return bottom, top


@triton.jit
def group_bound_grads(bottom, top, bits, grad_lo, grad_hi, MODE: tl.constexpr):
    """(∂bottom, ∂top) of one group from its (∂lo, ∂hi), as autograd differentiates `range_bounds`; bottom and top
    from `load_range_parameters`."""
    if MODE == BOUNDS:
        grad_bottom = grad_lo
        grad_top = grad_hi
    elif MODE == AFFINE:
        difference = top - bottom
        min_width = tl.abs(bottom) * AFFINE_MIN_RELATIVE_WIDTH + MIN_RANGE
        # torch.maximum gives each side half the gradient at a tie.
        share = tl.where(tl.abs(difference) > min_width, 1.0, tl.where(tl.abs(difference) == min_width, 0.5, 0.0))
        grad_top = grad_hi * share * sign(difference)
        grad_bottom = grad_lo + grad_hi - grad_top
    else:
        if MODE == SYMMETRIC:
            grad_magnitude = grad_hi - grad_lo
        else:
            a_s, b_s = unsigned_coefficients(bits)
            grad_magnitude = grad_lo * -a_s + grad_hi * b_s
        grad_top = tl.where(tl.abs(top) >= MIN_RANGE, grad_magnitude, 0.0) * sign(top)
        grad_bottom = tl.zeros_like(grad_top)
    return grad_bottom, grad_top


@triton.jit
def two_range_bounds_kernel(lo_ptr, hi_ptr, first_bottom_ptr, first_top_ptr, first_logits_ptr, second_bottom_ptr,
                            second_top_ptr, second_logits_ptr, first_groups, FIRST_MIN_BITS: tl.constexpr,
                            FIRST_MODE: tl.constexpr, SECOND_MIN_BITS: tl.constexpr, SECOND_MODE: tl.constexpr):
    column = tl.program_id(0)
    if column < first_groups:
        lo, hi = group_bounds(first_bottom_ptr, first_top_ptr, column, first_logits_ptr, FIRST_MIN_BITS, FIRST_MODE)
    else:
        lo, hi = group_bounds(second_bottom_ptr, second_top_ptr, column - first_groups, second_logits_ptr,
                              SECOND_MIN_BITS, SECOND_MODE)
    tl.store(lo_ptr + column, lo)
    tl.store(hi_ptr + column, hi)


# (bottom, top, gate_logits, min_bits, mode) of one quantizer.
RangeArguments = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]


def range_bounds(first: RangeArguments, second: RangeArguments) -> torch.Tensor:
    """Spec §2: the bounds of two quantizers in one launch, as a (2, G₁ + G₂) float32 tensor: row 0 lo, row 1
    hi, the first quantizer's groups first (`ddq::quantized_linear`'s bounds output: activation, then weight)."""
    (bottom_1, top_1, logits_1, min_bits_1, mode_1), (bottom_2, top_2, logits_2, min_bits_2, mode_2) = first, second
    groups_1 = top_1.shape[0]
    bounds = torch.empty(2, groups_1 + top_2.shape[0], device=top_1.device, dtype=torch.float32)
    two_range_bounds_kernel[(bounds.shape[1],)](
        bounds[0], bounds[1], bottom_1.contiguous(), top_1.contiguous(), logits_1.contiguous(), bottom_2.contiguous(),
        top_2.contiguous(), logits_2.contiguous(), groups_1, FIRST_MIN_BITS=min_bits_1, FIRST_MODE=mode_1,
        SECOND_MIN_BITS=min_bits_2, SECOND_MODE=mode_2, num_warps=1)
    return bounds
