"""The forward's small launch of a DDQLinear: W_q and the activation's level table (DDQ_SPEC.md Section 2).

Before, the forward spent two launches on the quantizers' parameters: `level_tables` (both tables, 1.9 µs on
100352×32×192) and `quantize` of the weight with its table (2.1 µs), plus a launch gap each in a CUDA graph.
Here one launch does both: program g < N builds the weight's table row g (`level_table.group_levels`, the
same code as `level_table`, so the same values bit for bit) into a scratch row, waits at a barrier, and
quantizes weight row g through it (`fine_grid.quantized_values`, as `quantize`); program N builds the
activation's table. Per output channel only, and only for weights up to `MERGED_WEIGHT_LIMIT` elements, where
the launch, not the bytes, is the cost: one program a row would spread a large weight over too few warps, so
`weight_and_act_table` keeps the two launches there. References: `quantize_reference`, `block_levels`.
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import bitwidth_from_logits, cast_rounded, grid_scalars, quantized_values
from ddq_kernels.launch import interpreting
from ddq_kernels.level_table import ONE_WARP, QuantizerArguments, group_levels, level_tables
from ddq_kernels.quantize import quantize

# Elements of one load a program: 32 a lane with one warp.
ROW_BLOCK = 1024
# The small CNN layers this launch is for hold 2k–300k weights; 8192×4096×4096's 16.8M keep two launches.
MERGED_WEIGHT_LIMIT = 1 << 20


@triton.jit
def weight_and_tables_kernel(weight_ptr, w_q_ptr, weight_lo_ptr, weight_hi_ptr, weight_residuals_ptr, weight_logits_ptr,
                             weight_table_ptr, K, rows, act_lo_ptr, act_hi_ptr, act_residuals_ptr, act_logits_ptr,
                             act_table_ptr, WEIGHT_MIN_BITS: tl.constexpr, ACT_MIN_BITS: tl.constexpr,
                             BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0)
    if row < rows:
        group_levels(weight_lo_ptr, weight_hi_ptr, weight_residuals_ptr, weight_logits_ptr, weight_table_ptr, row,
                     WEIGHT_MIN_BITS)
        # The row's levels were stored by other lanes: the barrier orders those stores before the loads below.
        tl.debug_barrier()
        shift = 8 - bitwidth_from_logits(weight_logits_ptr, WEIGHT_MIN_BITS)
        lo, inv_delta = grid_scalars(weight_lo_ptr, weight_hi_ptr, row)
        base = row.to(tl.int64) * K
        for start in range(0, K, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            in_row = offsets < K
            w = tl.load(weight_ptr + base + offsets, mask=in_row, other=0.0).to(tl.float32)
            w_q = quantized_values(w, lo, inv_delta, shift, weight_table_ptr + row * 256)
            tl.store(w_q_ptr + base + offsets, cast_rounded(w_q, w_q_ptr.dtype.element_ty, INTERPRET), mask=in_row)
    else:
        group_levels(act_lo_ptr, act_hi_ptr, act_residuals_ptr, act_logits_ptr, act_table_ptr, 0, ACT_MIN_BITS)


def merged(weight: torch.Tensor, weight_lo: torch.Tensor, act_lo: torch.Tensor) -> bool:
    """Whether `weight_and_act_table` takes the one launch: a 2-D weight quantized per output channel, up to
    `MERGED_WEIGHT_LIMIT` elements, and a per-tensor activation quantizer."""
    return (weight.dim() == 2 and weight_lo.shape == (weight.shape[0],) and act_lo.shape == (1,)
            and 0 < weight.numel() <= MERGED_WEIGHT_LIMIT)


def weight_and_act_table(weight: torch.Tensor, weight_quantizer: QuantizerArguments, act_quantizer: QuantizerArguments
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §2: (W_q in the weight's dtype and shape, the activation's (1, 256) float32 level table, zeros past
    2^b), each quantizer given as (lo, hi, residuals, gate_logits, min_bits). One launch where `merged`;
    otherwise `level_tables` then `quantize`, the same values."""
    weight_lo, weight_hi, weight_residuals, weight_logits, weight_min_bits = weight_quantizer
    act_lo, act_hi, act_residuals, act_logits, act_min_bits = act_quantizer
    if not merged(weight, weight_lo, act_lo):
        weight_table, act_table = level_tables(weight_quantizer, act_quantizer)
        return quantize(weight, weight_lo, weight_hi, None, weight_logits, weight_min_bits, table=weight_table), act_table
    rows, K = weight.shape
    weight = weight.contiguous()
    w_q = torch.empty_like(weight)
    weight_table = torch.empty(rows, 256, device=weight.device, dtype=torch.float32)
    act_table = torch.empty(1, 256, device=weight.device, dtype=torch.float32)
    weight_and_tables_kernel[(rows + 1,)](
        weight, w_q, weight_lo.contiguous(), weight_hi.contiguous(), weight_residuals.contiguous(),
        weight_logits.contiguous(), weight_table, K, rows, act_lo.contiguous(), act_hi.contiguous(),
        act_residuals.contiguous(), act_logits.contiguous(), act_table, WEIGHT_MIN_BITS=weight_min_bits,
        ACT_MIN_BITS=act_min_bits, BLOCK=ROW_BLOCK, INTERPRET=interpreting(), num_warps=ONE_WARP)
    return w_q, act_table
