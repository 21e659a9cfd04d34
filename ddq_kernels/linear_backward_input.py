"""DDQLinear backward-input GEMM with the activation quantizer's backward fused into its epilogue.

dX_pre[M, K] = dY[M, N] · W_q[N, K] is the gradient v of x_q (DDQ_SPEC.md §3). The epilogue rounds v to
x's dtype (as the reference's gradient of x_q is), applies the straight-through mask ∂L/∂x = v·in, and
reduces v over x's fine cells (per-tensor histogram, Σ v·u·in, Σ v·(1 − in)) with one atomic add per
bin per program. It walks the output tile in row chunks so the one-hot histogram stays small: v is
stored once, re-read by chunk after a barrier (from L1/L2) and overwritten with the masked value.
x is read once and nothing else of size M×K is written. Reference: `ddq.functional.reductions_reference`
of (dY · W_q) and x. `linear_backward_input` times this kernel's tiles against UNFUSED (cuBLAS, then
`quantize_reductions`) once per shape class and runs the faster.
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import cast_rounded, cell_histogram, fine_cell, fine_position, grid_scalars, inside_range
from ddq_kernels.gemm_tiles import grouped_tile
from ddq_kernels.launch import fastest_config, interpreting, size_class
from ddq_kernels.linear_backward_input_cuda import linear_backward_input_shared, supports as shared_epilogue_supports
from ddq_kernels.linear_forward import UNFUSED, block_size, dot_precision
from ddq_kernels.quantize_backward import Bins, accumulate_reductions, output_bins, quantize_reductions


@triton.jit
def linear_backward_input_kernel(dy_ptr, w_ptr, x_ptr, dx_ptr, lo_ptr, hi_ptr, hist_ptr, sums_ptr,
                                 M, N, K, stride_dym, stride_wn, stride_xm,
                                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                                 GROUP_M: tl.constexpr, CHUNK_M: tl.constexpr, BATCHES: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    V_FITS_TF32: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    tile_m, tile_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    inner = tl.arange(0, BLOCK_N)
    dy_ptrs = dy_ptr + rows[:, None].to(tl.int64) * stride_dym + inner[None, :]
    w_ptrs = w_ptr + inner[:, None].to(tl.int64) * stride_wn + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_valid = (n0 + inner) < N
        dy = tl.load(dy_ptrs, mask=(rows < M)[:, None] & n_valid[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_valid[:, None] & (cols < K)[None, :], other=0.0)
        if INTERPRET:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
    out_mask = (rows < M)[:, None] & (cols < K)[None, :]
    dx_ptrs = dx_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :]
    tl.store(dx_ptrs, cast_rounded(acc, dx_ptr.dtype.element_ty, INTERPRET), mask=out_mask)
    tl.debug_barrier()

    lo, inv_delta = grid_scalars(lo_ptr, hi_ptr, 0)
    histogram = tl.zeros((16, 16), dtype=tl.float32)
    sum_vu = 0.0
    sum_clipped = 0.0
    chunk_rows = tl.arange(0, CHUNK_M)
    for c0 in range(0, BLOCK_M, CHUNK_M):
        r = tile_m * BLOCK_M + c0 + chunk_rows
        chunk_mask = (r < M)[:, None] & (cols < K)[None, :]
        offsets = r[:, None].to(tl.int64) * stride_xm + cols[None, :]
        v = tl.load(dx_ptr + offsets, mask=chunk_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=chunk_mask, other=0.0).to(tl.float32)
        u = fine_position(x, lo, inv_delta)
        inside = inside_range(u)
        tl.store(dx_ptr + offsets, tl.where(inside, v, 0.0).to(dx_ptr.dtype.element_ty), mask=chunk_mask)
        cells = fine_cell(u)
        histogram += cell_histogram(cells, v, BATCHES, V_FITS_TF32)
        sum_vu += tl.sum(tl.sum(tl.where(inside, v * u, 0.0), axis=1), axis=0)
        sum_clipped += tl.sum(tl.sum(tl.where(inside, 0.0, v), axis=1), axis=0)
    accumulate_reductions(hist_ptr, sums_ptr, 0, histogram, sum_vu, sum_clipped)


SHARED_EPILOGUE = {"shared_epilogue": True}


def backward_input_configs(M: int, N: int, K: int, shared_epilogue: bool = False) -> list[dict]:
    """Candidate tiles for the backward-input GEMM (output block_m × block_k, contraction block_n).

    Then, where it `supports` the call, SHARED_EPILOGUE: the CUDA C GEMM with the histogram in shared
    memory (`linear_backward_input_cuda`). The last candidate, UNFUSED, is cuBLAS for dY·W_q followed by
    the `quantize_reductions` pass.
    """
    candidates = []
    for block_m, block_k, num_warps in ((128, 128, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4), (128, 64, 8)):
        config = dict(block_m=block_m if M >= block_m else block_size(M, 64), block_k=block_size(K, block_k),
                      block_n=block_size(N, 64), num_warps=num_warps, num_stages=3)
        if config not in candidates:
            candidates.append(config)
    return candidates + ([SHARED_EPILOGUE] if shared_epilogue else []) + [UNFUSED]


def linear_backward_input(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor,
                          hi: torch.Tensor, config: dict | None = None, bins: Bins | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §3 for the activation: (∂x = (dY·W_q)·in, histogram (1, 256), Σv·u·in (1,), Σv·(1 − in) (1,));
    the last three in `bins` where given (zeroed, see `quantize_backward.output_bins`)."""
    M, K = x.shape
    N = w_q.shape[0]
    if config is None:
        def run(candidate):
            return linear_backward_input(grad_y, w_q, x, lo, hi, candidate)
        key = (size_class(M), N, K, x.dtype)
        shared_epilogue = shared_epilogue_supports(grad_y, w_q, x)
        candidates = backward_input_configs(M, N, K, shared_epilogue)
        config = fastest_config("linear_backward_input", key + (shared_epilogue,), candidates, run)
    if config.get("shared_epilogue"):
        return linear_backward_input_shared(grad_y, w_q, x, lo, hi, bins=bins)
    if config.get("unfused"):
        return quantize_reductions(grad_y @ w_q, x, lo, hi, bins=bins)
    block_m, block_k, block_n = config["block_m"], config["block_k"], config["block_n"]
    chunk_m = max(1, min(block_m, 512 // block_k))
    dx = torch.empty_like(x)
    histogram, sums = output_bins(1, x.device, bins)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(K, block_k),)
    linear_backward_input_kernel[grid](
        grad_y, w_q, x, dx, lo, hi, histogram, sums, M, N, K, grad_y.stride(0), w_q.stride(0), x.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, GROUP_M=8, CHUNK_M=chunk_m,
        BATCHES=min(8, chunk_m * block_k // 16),
        DOT_PRECISION=dot_precision(x.dtype), INTERPRET=interpreting(),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dx, histogram, sums[:, 0], sums[:, 1]
