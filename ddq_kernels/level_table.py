"""Per-code level table V (DDQ_SPEC.md Section 2 steps 3–4), built on the device.

V[g, c] = lo_g + Δ_g·(c·s + (s − 1)/2 + Σ_{j in block c} r[g, j]) for c < 2^b, s = 2^(8 − b), written
into a (G, 256) float32 buffer (entries c ≥ 2^b are unused). The bitwidth comes from the gate logits
inside the kernel, so building the table needs no host sync. s·mean(r) equals Σ r exactly up to
summation order because s is a power of two. Reference: `ddq.quantizer_math.block_levels`.
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import bitwidth_from_logits


@triton.jit
def level_table_kernel(lo_ptr, hi_ptr, residuals_ptr, logits_ptr, table_ptr, MIN_BITS: tl.constexpr):
    group = tl.program_id(0)
    shift = 8 - bitwidth_from_logits(logits_ptr, MIN_BITS)
    lo = tl.load(lo_ptr + group)
    delta = (tl.load(hi_ptr + group) - lo) / 255.0
    residuals = tl.load(residuals_ptr + group * 256 + tl.arange(0, 256))
    # The block size is a run-time value; build the table for every candidate and keep the right one.
    for candidate in tl.static_range(9):
        store_levels(table_ptr + group * 256, residuals, lo, delta, shift == candidate, candidate)


@triton.jit
def store_levels(table_row_ptr, residuals, lo, delta, selected, SHIFT: tl.constexpr):
    BLOCK: tl.constexpr = 1 << SHIFT
    CODES: tl.constexpr = 256 >> SHIFT
    block_sums = tl.sum(tl.reshape(residuals, (CODES, BLOCK)), axis=1)
    code = tl.arange(0, CODES)
    position = code.to(tl.float32) * BLOCK + (BLOCK - 1) / 2 + block_sums
    tl.store(table_row_ptr + code, lo + delta * position, mask=(code < CODES) & selected)


def level_table(lo: torch.Tensor, hi: torch.Tensor, residuals: torch.Tensor, gate_logits: torch.Tensor, min_bits: int) -> torch.Tensor:
    """Spec §2: the (G, 256) float32 per-code level table (first 2^b columns valid)."""
    groups = lo.shape[0]
    table = torch.empty(groups, 256, device=lo.device, dtype=torch.float32)
    level_table_kernel[(groups,)](
        lo.contiguous(), hi.contiguous(), residuals.contiguous(), gate_logits.contiguous(), table, MIN_BITS=min_bits
    )
    return table
