"""Per-code level table V (DDQ_SPEC.md Section 2 steps 3–4), built on the device.

V[g, c] = lo_g + Δ_g·(c·s + (s − 1)/2 + Σ_{j in block c} r[g, j]) for c < 2^b, s = 2^(8 − b), written
into a (G, 256) float32 buffer; entries c ≥ 2^b are zero. The bitwidth comes from the gate logits
inside the kernel, so building the table needs no host sync. s·mean(r) equals Σ r exactly up to
summation order because s is a power of two. Reference: `ddq.quantizer_math.block_levels`.
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import bitwidth_from_logits


# A program's few reductions over 256 residuals need no barriers in one warp: 1.44 µs a launch per tensor
# against 1.84 µs with four warps, 1.86 against 2.22 µs for 192 groups (H100 GPU time, run 13).
ONE_WARP = 1


@triton.jit
def level_table_kernel(lo_ptr, hi_ptr, residuals_ptr, logits_ptr, table_ptr, MIN_BITS: tl.constexpr):
    group = tl.program_id(0)
    group_levels(tl.load(lo_ptr + group), tl.load(hi_ptr + group), residuals_ptr, logits_ptr, table_ptr, group, MIN_BITS)


@triton.jit
def two_level_tables_kernel(first_lo_ptr, first_hi_ptr, first_residuals_ptr, first_logits_ptr, first_table_ptr,
                            first_groups, second_lo_ptr, second_hi_ptr, second_residuals_ptr, second_logits_ptr,
                            second_table_ptr, FIRST_MIN_BITS: tl.constexpr, SECOND_MIN_BITS: tl.constexpr):
    program = tl.program_id(0)
    if program < first_groups:
        group_levels(tl.load(first_lo_ptr + program), tl.load(first_hi_ptr + program), first_residuals_ptr,
                     first_logits_ptr, first_table_ptr, program, FIRST_MIN_BITS)
    else:
        group = program - first_groups
        group_levels(tl.load(second_lo_ptr + group), tl.load(second_hi_ptr + group), second_residuals_ptr,
                     second_logits_ptr, second_table_ptr, group, SECOND_MIN_BITS)


@triton.jit
def group_levels(lo, hi, residuals_ptr, logits_ptr, table_ptr, group, MIN_BITS: tl.constexpr):
    """Table row `group` from the group's bounds (lo, hi) and its residuals."""
    shift = 8 - bitwidth_from_logits(logits_ptr, MIN_BITS)
    delta = (hi - lo) / 255.0
    residuals = tl.load(residuals_ptr + group * 256 + tl.arange(0, 256))
    # The block size is a run-time value; build the table for every candidate and keep the right one.
    for candidate in tl.static_range(9):
        store_levels(table_ptr + group * 256, residuals, lo, delta, shift == candidate, candidate)
    # Codes past 2^b are zero, as in the reference: the table is an op output (`ddq::quantized_linear`), and
    # opcheck compares whole outputs. These addresses are disjoint from the levels', so no barrier is needed.
    code = tl.arange(0, 256)
    tl.store(table_ptr + group * 256 + code, tl.zeros((256,), dtype=tl.float32), mask=code >= (256 >> shift))


@triton.jit
def store_levels(table_row_ptr, residuals, lo, delta, selected, SHIFT: tl.constexpr):
    BLOCK: tl.constexpr = 1 << SHIFT
    CODES: tl.constexpr = 256 >> SHIFT
    block_sums = tl.sum(tl.reshape(residuals, (CODES, BLOCK)), axis=1)
    code = tl.arange(0, CODES)
    position = code.to(tl.float32) * BLOCK + (BLOCK - 1) / 2 + block_sums
    tl.store(table_row_ptr + code, lo + delta * position, mask=(code < CODES) & selected)


def level_table(lo: torch.Tensor, hi: torch.Tensor, residuals: torch.Tensor, gate_logits: torch.Tensor, min_bits: int) -> torch.Tensor:
    """Spec §2: the (G, 256) float32 per-code level table (the first 2^b columns; zeros after them)."""
    groups = lo.shape[0]
    table = torch.empty(groups, 256, device=lo.device, dtype=torch.float32)
    level_table_kernel[(groups,)](
        lo.contiguous(), hi.contiguous(), residuals.contiguous(), gate_logits.contiguous(), table, MIN_BITS=min_bits,
        num_warps=ONE_WARP,
    )
    return table


QuantizerArguments = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


def level_tables(first: QuantizerArguments, second: QuantizerArguments) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §2: `level_table` of two quantizers, each (lo, hi, residuals, gate_logits, min_bits), in one launch
    (a layer's weight and activation tables: on the small CNN GEMMs each launch costs a few µs of a step)."""
    (lo1, hi1, residuals1, logits1, min_bits1), (lo2, hi2, residuals2, logits2, min_bits2) = first, second
    table1 = torch.empty(lo1.shape[0], 256, device=lo1.device, dtype=torch.float32)
    table2 = torch.empty(lo2.shape[0], 256, device=lo2.device, dtype=torch.float32)
    two_level_tables_kernel[(lo1.shape[0] + lo2.shape[0],)](
        lo1.contiguous(), hi1.contiguous(), residuals1.contiguous(), logits1.contiguous(), table1, lo1.shape[0],
        lo2.contiguous(), hi2.contiguous(), residuals2.contiguous(), logits2.contiguous(), table2,
        FIRST_MIN_BITS=min_bits1, SECOND_MIN_BITS=min_bits2, num_warps=ONE_WARP,
    )
    return table1, table2
