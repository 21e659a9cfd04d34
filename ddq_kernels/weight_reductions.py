"""The weight quantizer's backward element pass over ∂W_q given as partial sums (DDQ_SPEC.md Section 3).

The fused backward GEMM (`linear_backward_input_cuda.linear_backward_shared_parts`) leaves ∂W_q = dYᵀ·x_q as
P partial sums, one per group of rows of x, that must be added in a fixed order. Adding them with
`parts.sum(0)` and then running the weight quantizer's element pass (`quantize_backward.quantize_reductions`)
is two launches and one more round trip of ∂W_q through memory; on the small CNN GEMMs they cost 8.0 and
4.4 µs of a ~105 µs step (run 13, docs/kernels.md). The `SUMMED_CONFIGS` candidates do both in one Triton
kernel (7.0 µs in that step, run 14): each program adds its tile of the parts in a fixed order, rounds the sum
to the weight's dtype (the dtype of the gradient of W_q, as the reference's autograd has it) and computes
∂W = v·in, the histogram of v over fine cells and the sums Σv·u·in and Σv·(1 − in) of its rows.
Reference: `ddq.functional.reductions_reference(parts.sum(0), W, lo, hi)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import cast_rounded, fine_cell, fine_position, grid_scalars, inside_range
from ddq_kernels.launch import fastest_config, interpreting, size_class
from ddq_kernels.quantize_backward import Bins, quantize_reductions, reduction_outputs

# Tile shapes (elements of W a program, parts added per load, warps): the first is the interpreter's. The sum
# is bound by load latency (the parts were just written and sit in L2): the wide ones keep most of them in flight.
SUMMED_CONFIGS = tuple({"summed": True, "elements": elements, "parts_block": parts_block, "warps": warps}
                       for elements, parts_block, warps in ((128, 16, 4), (16, 256, 8), (32, 128, 8), (64, 64, 8),
                                                           (256, 16, 8)))
SUM_THEN_REDUCE = {"summed": False}


@triton.jit
def summed_weight_reductions_kernel(parts_ptr, weight_ptr, grad_w_ptr, lo_ptr, hi_ptr, hist_ptr, sums_ptr,
                                    PARTS, N, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                                    PARTS_BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    columns = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_in = rows < N
    in_weight = row_in[:, None] & (columns < K)[None, :]
    offsets = rows[:, None] * K + columns[None, :]
    # Added element-wise across the loads and reduced over the parts block once, at the end. Reducing inside the
    # loop made every iteration wait for its loads and then exchange sums across warps through shared memory
    # (9 times a program on 100352×192×32; 21 µs under ncu, with 16-way bank conflicts in the exchange).
    partial = tl.zeros((PARTS_BLOCK, ROWS, BLOCK_K), dtype=tl.float32)
    for first in range(0, PARTS, PARTS_BLOCK):
        part = first + tl.arange(0, PARTS_BLOCK)
        pointers = parts_ptr + part[:, None, None].to(tl.int64) * N * K + offsets[None, :, :]
        partial += tl.load(pointers, mask=(part < PARTS)[:, None, None] & in_weight[None, :, :], other=0.0)
    v = cast_rounded(tl.sum(partial, axis=0), weight_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    # Rows past N read the last channel's scalars; nothing of theirs is stored.
    lo, inv_delta = grid_scalars(lo_ptr, hi_ptr, tl.minimum(rows, N - 1))
    x = tl.load(weight_ptr + offsets, mask=in_weight, other=0.0).to(tl.float32)
    u = fine_position(x, lo[:, None], inv_delta[:, None])
    inside = inside_range(u)
    tl.store(grad_w_ptr + offsets, tl.where(inside, v, 0.0).to(grad_w_ptr.dtype.element_ty), mask=in_weight)
    # K elements a channel spread over 256 bins: per-element atomics collide rarely, and a channel's
    # histogram as a one-hot product would cost 256 compares an element.
    tl.atomic_add(hist_ptr + rows[:, None] * 256 + fine_cell(u), v, mask=in_weight)
    tl.atomic_add(sums_ptr + rows * 2, tl.sum(tl.where(inside, v * u, 0.0), axis=1), mask=row_in)
    tl.atomic_add(sums_ptr + rows * 2 + 1, tl.sum(tl.where(inside, 0.0, v), axis=1), mask=row_in)


def check_call(parts: torch.Tensor, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """A clear error for arguments outside the pass's contract."""
    if weight.dim() != 2 or parts.dim() != 3 or parts.shape[1:] != weight.shape or parts.shape[0] < 1:
        raise ValueError(f"weight_reductions: parts must be (P ≥ 1, N, K) for a weight (N, K); got parts "
                         f"{tuple(parts.shape)}, weight {tuple(weight.shape)}")
    if parts.dtype != torch.float32:
        raise TypeError(f"weight_reductions: parts must be float32 (the GEMM's accumulators), got {parts.dtype}")
    if lo.shape != (weight.shape[0],) or hi.shape != lo.shape:
        raise ValueError(f"weight_reductions: lo and hi must be per output channel, shape ({weight.shape[0]},); got "
                         f"{tuple(lo.shape)} and {tuple(hi.shape)}")
    if len({parts.device, weight.device, lo.device, hi.device}) != 1:
        raise ValueError("weight_reductions: parts, weight, lo and hi must be on one device")
    if weight.numel() >= 2**31:
        raise ValueError(f"weight_reductions: the weight must have fewer than 2^31 elements, got {weight.numel()}")


def weight_reductions(parts: torch.Tensor, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      config: dict | None = None, bins: Bins | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §3 element pass of a per-output-channel weight quantizer with v = Σ_p parts[p] (added in a fixed
    order, rounded to the weight's dtype): (∂W like weight, histogram (N, 256), Σv·u·in (N,),
    Σv·(1 − in) (N,)).

    parts (P, N, K) float32, weight (N, K), lo and hi (N,), on one device (CUDA, or the CPU in the Triton
    interpreter). A whole ∂W_q (N, K) of any float dtype goes straight to `quantize_reductions`. `config`
    picks one pass (a tile shape of `SUMMED_CONFIGS`) or SUM_THEN_REDUCE (`parts.sum(0)`, then
    `quantize_reductions`); by default the faster on this shape class (`fastest_config`). The one pass's
    histogram bins are float32 atomic sums, so their order, not their terms, varies from run to run, as in
    `quantize_reductions`. `bins` (zeroed, see `quantize_backward.output_bins`) receives the histogram and the
    sums instead of new tensors.
    """
    if parts.dim() == 2:
        return quantize_reductions(parts, weight, lo, hi, bins=bins)
    check_call(parts, weight, lo, hi)
    weight, lo, hi = weight.contiguous(), lo.contiguous(), hi.contiguous()
    if config is None:
        key = (size_class(weight.numel()), size_class(parts.shape[0]), weight.shape[1], weight.dtype)

        def run(candidate):
            return weight_reductions(parts, weight, lo, hi, candidate)

        config = fastest_config("weight_reductions", key, SUMMED_CONFIGS + (SUM_THEN_REDUCE,), run)
    if not config["summed"]:
        return quantize_reductions(parts.sum(0) if parts.shape[0] > 1 else parts[0], weight, lo, hi, bins=bins)
    return summed_reductions(parts.contiguous(), weight, lo, hi, config, bins)


def summed_reductions(parts: torch.Tensor, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, config: dict,
                      bins: Bins | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K = weight.shape
    grad_w, histogram, sums = reduction_outputs(weight, N, bins)
    if weight.numel() > 0:
        block_k = min(triton.next_power_of_2(K), config["elements"])
        rows = config["elements"] // block_k
        grid = (triton.cdiv(N, rows), triton.cdiv(K, block_k))
        summed_weight_reductions_kernel[grid](parts, weight, grad_w, lo, hi, histogram, sums, parts.shape[0], N, K,
                                              ROWS=rows, BLOCK_K=block_k, PARTS_BLOCK=config["parts_block"],
                                              INTERPRET=interpreting(), num_warps=config["warps"])
    return grad_w, histogram, sums[:, 0], sums[:, 1]
