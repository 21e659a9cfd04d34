"""Fused DDQ quantize forward (DDQ_SPEC.md Section 2): one read of x, one write of x_q.

x is viewed as G groups of n consecutive elements (G = 1 per tensor, G = C_out per channel). Each
program quantizes BLOCK elements of one group: x_q = V[g, i >> (8 − b)] with V from `level_table`.
Reference: `ddq.functional.quantize_reference`.
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import bitwidth_from_logits, cast_rounded, grid_scalars, quantized_values
from ddq_kernels.launch import interpreting
from ddq_kernels.level_table import level_table

QUANTIZE_BLOCK = 4096


@triton.jit
def quantize_kernel(x_ptr, out_ptr, lo_ptr, hi_ptr, table_ptr, logits_ptr, group_numel,
                    MIN_BITS: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    shift = 8 - bitwidth_from_logits(logits_ptr, MIN_BITS)
    lo, inv_delta = grid_scalars(lo_ptr, hi_ptr, group)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    in_group = offsets < group_numel
    base = group.to(tl.int64) * group_numel
    x = tl.load(x_ptr + base + offsets, mask=in_group, other=0.0).to(tl.float32)
    x_q = quantized_values(x, lo, inv_delta, shift, table_ptr + group * 256)
    tl.store(out_ptr + base + offsets, cast_rounded(x_q, out_ptr.dtype.element_ty, INTERPRET), mask=in_group)


def quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, residuals: torch.Tensor | None, gate_logits: torch.Tensor,
             min_bits: int, table: torch.Tensor | None = None, block: int = QUANTIZE_BLOCK) -> torch.Tensor:
    """Spec §2 forward of `torch.ops.ddq.quantize` on the device: x_q in x's dtype and shape.

    `table` (from `level_table`) may be given instead of being built from the residuals.
    """
    groups = lo.shape[0]
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    if table is None:
        table = level_table(lo, hi, residuals, gate_logits, min_bits)
    group_numel = x.numel() // groups
    grid = (triton.cdiv(group_numel, block), groups)
    quantize_kernel[grid](x, out, lo.contiguous(), hi.contiguous(), table, gate_logits.contiguous(), group_numel,
                          MIN_BITS=min_bits, BLOCK=block, INTERPRET=interpreting(), num_warps=8)
    return out
