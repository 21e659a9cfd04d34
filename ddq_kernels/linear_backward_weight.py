"""DDQLinear backward-weight GEMM with the activation re-quantized in its operand load (DDQ_SPEC.md §2–3).

dW_q[N, K] = dY[M, N]ᵀ · Q_x(x)[M, K]: the forward saves x (as float training does), not x_q, and this
kernel quantizes each x tile again on load, so QAT keeps float training's activation memory. The
reduction over M is split across programs when the output has few tiles (CNN shapes: N, K ≤ 1024,
M ≈ 10⁵), each adding its partial sum atomically into a float32 result.
Reference: grad_yᵀ · quantize_reference(x). `linear_backward_weight` times this kernel's tiles against
UNFUSED (quantize pass, then cuBLAS) once per shape class and runs the faster.
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import bitwidth_from_logits, grid_scalars, quantized_values
from ddq_kernels.gemm_tiles import dot_operand
from ddq_kernels.launch import fastest_config, interpreting, size_class
from ddq_kernels.linear_backward_weight_cuda import linear_backward_weight_cuda, supports as cuda_tiles_supports
from ddq_kernels.linear_forward import CUDA_TILES, UNFUSED, block_size, dot_precision
from ddq_kernels.quantize import quantize


@triton.jit
def linear_backward_weight_kernel(dy_ptr, x_ptr, dw_ptr, lo_ptr, hi_ptr, table_ptr, logits_ptr,
                                  M, N, K, stride_dym, stride_xm, rows_per_split,
                                  MIN_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  BLOCK_M: tl.constexpr, ATOMIC: tl.constexpr,
                                  DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    tiles_k = tl.cdiv(K, BLOCK_K)
    tile_n = tl.program_id(0) // tiles_k
    tile_k = tl.program_id(0) % tiles_k
    shift = 8 - bitwidth_from_logits(logits_ptr, MIN_BITS)
    lo, inv_delta = grid_scalars(lo_ptr, hi_ptr, 0)
    outs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    first_row = tl.program_id(1) * rows_per_split
    last_row = tl.minimum(M, first_row + rows_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(first_row, last_row, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_valid = rows < last_row
        dy_t = tl.load(dy_ptr + rows[None, :].to(tl.int64) * stride_dym + outs[:, None],
                       mask=row_valid[None, :] & (outs < N)[:, None], other=0.0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
                    mask=row_valid[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
        x_q = dot_operand(quantized_values(x, lo, inv_delta, shift, table_ptr), x_ptr.dtype.element_ty, INTERPRET)
        if INTERPRET:
            dy_t = dy_t.to(tl.float32)
        acc = tl.dot(dy_t, x_q, acc, input_precision=DOT_PRECISION)
    dw_ptrs = dw_ptr + outs[:, None].to(tl.int64) * K + cols[None, :]
    out_mask = (outs < N)[:, None] & (cols < K)[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptrs, acc, mask=out_mask)
    else:
        tl.store(dw_ptrs, acc, mask=out_mask)


def backward_weight_configs(M: int, N: int, K: int, cuda_tiles: bool = False) -> list[dict]:
    """Candidate tiles for the backward-weight GEMM (output block_n × block_k, contraction block_m).

    Then, where it `supports` the call, CUDA_TILES: the CUDA C GEMM that quantizes x in shared memory
    (`linear_backward_weight_cuda`; N ≤ 256, 16-bit). The last candidate, UNFUSED, quantizes x in its own
    pass (a transient x_q) and multiplies with cuBLAS.
    """
    candidates = []
    for block_n, block_k, block_m, num_warps in ((128, 128, 64, 8), (64, 128, 64, 4), (128, 64, 64, 4),
                                                 (64, 64, 128, 4), (128, 128, 32, 8)):
        config = dict(block_n=block_size(N, block_n), block_k=block_size(K, block_k), block_m=block_m,
                      num_warps=num_warps, num_stages=3)
        if config not in candidates:
            candidates.append(config)
    return candidates + ([CUDA_TILES] if cuda_tiles else []) + [UNFUSED]


def linear_backward_weight(grad_y: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, table: torch.Tensor,
                           gate_logits: torch.Tensor, min_bits: int, target_programs: int = 528,
                           config: dict | None = None) -> torch.Tensor:
    """∂L/∂W_q = dYᵀ · Q_x(x), (N, K) in float32 (x's dtype on the unfused path); the caller reduces it
    through the weight quantizer."""
    M, K = x.shape
    N = grad_y.shape[1]
    if config is None:
        def run(candidate):
            return linear_backward_weight(grad_y, x, lo, hi, table, gate_logits, min_bits, target_programs, candidate)
        cuda_tiles = cuda_tiles_supports(grad_y, x)
        key = (size_class(M), N, K, x.dtype, cuda_tiles)
        config = fastest_config("linear_backward_weight", key, backward_weight_configs(M, N, K, cuda_tiles), run)
    if config.get("cuda_tiles"):
        return linear_backward_weight_cuda(grad_y, x, lo, hi, table, gate_logits, min_bits)
    if config.get("unfused"):
        return grad_y.t() @ quantize(x, lo, hi, None, gate_logits, min_bits, table=table)
    block_n, block_k, block_m = config["block_n"], config["block_k"], config["block_m"]
    tiles = triton.cdiv(N, block_n) * triton.cdiv(K, block_k)
    splits = max(1, min(triton.cdiv(M, 4 * block_m), target_programs // tiles))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    dw = (torch.zeros if splits > 1 else torch.empty)(N, K, device=x.device, dtype=torch.float32)
    linear_backward_weight_kernel[(tiles, splits)](
        grad_y, x, dw, lo, hi, table, gate_logits, M, N, K, grad_y.stride(0), x.stride(0), rows_per_split,
        MIN_BITS=min_bits, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, ATOMIC=splits > 1,
        DOT_PRECISION=dot_precision(x.dtype), INTERPRET=interpreting(),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return dw
