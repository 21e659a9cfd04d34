"""The forward's small launch of a DDQLinear: W_q and the activation's level table (DDQ_SPEC.md Section 2).

Before, the forward spent two launches on the quantizers' parameters: `level_tables` (both tables, 1.9 µs on
100352×32×192) and `quantize` of the weight with its table (2.1 µs), plus a launch gap each in a CUDA graph.
Here one launch does both: program g < N builds the weight's table row g (`level_table.group_levels`, the
same code as `level_table`, so the same values bit for bit) into a scratch row, waits at a barrier, and
quantizes weight row g through it (`fine_grid.quantized_values`, as `quantize`); program N builds the
activation's table. Per output channel only, and only for weights up to `MERGED_WEIGHT_LIMIT` elements, where
the launch, not the bytes, is the cost: one program a row would spread a large weight over too few warps, so
`weight_and_act_table` keeps the two launches there (and one more for the bounds, `range_bounds`). Each
program first computes its group's bounds (lo, hi) from the quantizer's range parameters
(`range_bounds.group_bounds`) and stores them in the op's bounds output, which the GEMMs and the backward
read: a compiled layer no longer runs Inductor kernels for them. References: `quantize_reference`,
`block_levels`, `quantizer_math.range_bounds`.
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import bitwidth_from_logits, cast_rounded, inverse_cell_width, quantized_values
from ddq_kernels.launch import interpreting
from ddq_kernels.level_table import ONE_WARP, group_levels, level_tables
from ddq_kernels.quantize import quantize
from ddq_kernels.range_bounds import group_bounds, range_bounds

# Elements of one load a program: 32 a lane with one warp.
ROW_BLOCK = 1024
# The small CNN layers this launch is for hold 2k–300k weights; 8192×4096×4096's 16.8M keep two launches.
MERGED_WEIGHT_LIMIT = 1 << 20

# (bottom, top, residuals, gate_logits, min_bits, mode) of one quantizer (`ddq::quantized_linear`'s arguments).
RangedQuantizer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]


@triton.jit
def weight_and_tables_kernel(weight_ptr, w_q_ptr, weight_bottom_ptr, weight_top_ptr, weight_residuals_ptr,
                             weight_logits_ptr, weight_table_ptr, K, rows, act_bottom_ptr, act_top_ptr, act_residuals_ptr,
                             act_logits_ptr, act_table_ptr, lo_ptr, hi_ptr, WEIGHT_MIN_BITS: tl.constexpr,
                             ACT_MIN_BITS: tl.constexpr, WEIGHT_MODE: tl.constexpr, ACT_MODE: tl.constexpr,
                             BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0)
    if row < rows:
        lo, hi = group_bounds(weight_bottom_ptr, weight_top_ptr, row, weight_logits_ptr, WEIGHT_MIN_BITS, WEIGHT_MODE)
        tl.store(lo_ptr + 1 + row, lo)
        tl.store(hi_ptr + 1 + row, hi)
        group_levels(lo, hi, weight_residuals_ptr, weight_logits_ptr, weight_table_ptr, row, WEIGHT_MIN_BITS)
        # The row's levels were stored by other lanes: the barrier orders those stores before the loads below.
        tl.debug_barrier()
        shift = 8 - bitwidth_from_logits(weight_logits_ptr, WEIGHT_MIN_BITS)
        inv_delta = inverse_cell_width(lo, hi)
        base = row.to(tl.int64) * K
        for start in range(0, K, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            in_row = offsets < K
            w = tl.load(weight_ptr + base + offsets, mask=in_row, other=0.0).to(tl.float32)
            w_q = quantized_values(w, lo, inv_delta, shift, weight_table_ptr + row * 256)
            tl.store(w_q_ptr + base + offsets, cast_rounded(w_q, w_q_ptr.dtype.element_ty, INTERPRET), mask=in_row)
    else:
        lo, hi = group_bounds(act_bottom_ptr, act_top_ptr, 0, act_logits_ptr, ACT_MIN_BITS, ACT_MODE)
        tl.store(lo_ptr, lo)
        tl.store(hi_ptr, hi)
        group_levels(lo, hi, act_residuals_ptr, act_logits_ptr, act_table_ptr, 0, ACT_MIN_BITS)


def merged(weight: torch.Tensor, weight_top: torch.Tensor, act_top: torch.Tensor) -> bool:
    """Whether `weight_and_act_table` takes the one launch: a 2-D weight quantized per output channel, up to
    `MERGED_WEIGHT_LIMIT` elements, and a per-tensor activation quantizer."""
    return (weight.dim() == 2 and weight_top.shape == (weight.shape[0],) and act_top.shape == (1,)
            and 0 < weight.numel() <= MERGED_WEIGHT_LIMIT)


def weight_and_act_table(weight: torch.Tensor, weight_quantizer: RangedQuantizer, act_quantizer: RangedQuantizer
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §2: (W_q in the weight's dtype and shape, the activation's (1, 256) float32 level table with zeros
    past 2^b, the bounds (2, 1 + N): row 0 lo, row 1 hi, column 0 the activation's), each quantizer given as
    (bottom, top, residuals, gate_logits, min_bits, mode) with its range parameters read as
    `range_bounds.group_bounds` reads them. One launch where `merged`; otherwise `range_bounds`, then
    `level_tables`, then `quantize`: the same values."""
    weight_bottom, weight_top, weight_residuals, weight_logits, weight_min_bits, weight_mode = weight_quantizer
    act_bottom, act_top, act_residuals, act_logits, act_min_bits, act_mode = act_quantizer
    if not merged(weight, weight_top, act_top):
        bounds = range_bounds((act_bottom, act_top, act_logits, act_min_bits, act_mode),
                              (weight_bottom, weight_top, weight_logits, weight_min_bits, weight_mode))
        act_lo, act_hi, weight_lo, weight_hi = bound_views(bounds)
        weight_table, act_table = level_tables((weight_lo, weight_hi, weight_residuals, weight_logits, weight_min_bits),
                                               (act_lo, act_hi, act_residuals, act_logits, act_min_bits))
        w_q = quantize(weight, weight_lo, weight_hi, None, weight_logits, weight_min_bits, table=weight_table)
        return w_q, act_table, bounds
    rows, K = weight.shape
    weight = weight.contiguous()
    w_q = torch.empty_like(weight)
    weight_table = torch.empty(rows, 256, device=weight.device, dtype=torch.float32)
    act_table = torch.empty(1, 256, device=weight.device, dtype=torch.float32)
    bounds = torch.empty(2, 1 + rows, device=weight.device, dtype=torch.float32)
    weight_and_tables_kernel[(rows + 1,)](
        weight, w_q, weight_bottom.contiguous(), weight_top.contiguous(), weight_residuals.contiguous(),
        weight_logits.contiguous(), weight_table, K, rows, act_bottom.contiguous(), act_top.contiguous(),
        act_residuals.contiguous(), act_logits.contiguous(), act_table, bounds[0], bounds[1],
        WEIGHT_MIN_BITS=weight_min_bits, ACT_MIN_BITS=act_min_bits, WEIGHT_MODE=weight_mode, ACT_MODE=act_mode,
        BLOCK=ROW_BLOCK, INTERPRET=interpreting(), num_warps=ONE_WARP)
    return w_q, act_table, bounds


def bound_views(bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(act lo, act hi, weight lo, weight hi) as views of a (2, 1 + N) bounds tensor: no copies."""
    return bounds[0, :1], bounds[1, :1], bounds[0, 1:], bounds[1, 1:]
