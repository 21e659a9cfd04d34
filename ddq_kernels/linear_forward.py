"""DDQLinear forward GEMM with the activation quantizer fused into the A-operand load (DDQ_SPEC.md §2).

y[M, N] = Q_x(x)[M, K] · W_q[N, K]ᵀ + bias: each A tile is loaded in x's dtype, quantized in registers
(per-tensor grid, per-code level table, bitwidth read from the gate logits) and fed to the tensor
cores; x_q never exists in memory. W_q is quantized once per step by `ddq_kernels.quantize`.
Accumulation in float32; output in x's dtype. Reference: F.linear(quantize_reference(x), W_q, bias).
`linear_forward` times this kernel's tiles against UNFUSED (quantize pass + cuBLAS) once per shape
class and runs the faster (docs/kernels.md has the measurements).
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import bitwidth_from_logits, cast_rounded, grid_scalars, quantized_values
from ddq_kernels.gemm_tiles import dot_operand, grouped_tile
from ddq_kernels.launch import fastest_config, interpreting, size_class
from ddq_kernels.linear_forward_cuda import linear_forward_cuda, supports as cuda_tiles_supports
from ddq_kernels.linear_forward_wgmma import has_wgmma, linear_forward_wgmma
from ddq_kernels.quantize import quantize


@triton.jit
def linear_forward_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, lo_ptr, hi_ptr, table_ptr, logits_ptr,
                          M, N, K, stride_xm, stride_wn, stride_ym,
                          HAS_BIAS: tl.constexpr, MIN_BITS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    shift = 8 - bitwidth_from_logits(logits_ptr, MIN_BITS)
    lo, inv_delta = grid_scalars(lo_ptr, hi_ptr, 0)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + depth[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + depth[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = (k0 + depth) < K
        x = tl.load(x_ptrs, mask=(rows < M)[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
        x_q = quantized_values(x, lo, inv_delta, shift, table_ptr)
        a = dot_operand(x_q, x_ptr.dtype.element_ty, INTERPRET)
        w = tl.load(w_ptrs, mask=k_valid[:, None] & (cols < N)[None, :], other=0.0)
        if INTERPRET:
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(y_ptrs, cast_rounded(acc, y_ptr.dtype.element_ty, INTERPRET), mask=(rows < M)[:, None] & (cols < N)[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands follow PyTorch's matmul setting (tf32 only when allowed); 16-bit ones are exact."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def block_size(extent: int, cap: int) -> int:
    """The power-of-two tile edge covering `extent`, between 16 (the smallest tl.dot edge) and `cap`."""
    return max(16, min(cap, triton.next_power_of_2(extent)))


UNFUSED = {"unfused": True}
CUDA_TILES = {"cuda_tiles": True}
WGMMA = {"wgmma": True}


def forward_configs(M: int, N: int, K: int, cuda_tiles: bool = False, wgmma: bool = False) -> list[dict]:
    """Candidate tiles for the forward GEMM (block_m × block_n output, block_k deep), heuristic first.

    Then, where it `supports` the call, CUDA_TILES: the CUDA C GEMM that quantizes x in shared memory with
    the level table beside it (`linear_forward_cuda`; N ≤ 256, 16-bit); and where the device is an sm_90
    one, WGMMA: the same staging feeding Hopper's warpgroup MMA (`linear_forward_wgmma`). The last candidate,
    UNFUSED, quantizes x in its own pass and multiplies with cuBLAS: where the GEMM is large (N in the thousands) a
    separate memory-bound pass costs less than re-quantizing each A tile for every column of tiles; the
    timing in `fastest_config` decides per shape class.
    """
    block_m = 128 if M >= 128 else block_size(M, 64)
    candidates = []
    for block_n, block_k, num_warps in ((256, 64, 8), (128, 64, 8), (128, 64, 4), (64, 64, 4), (128, 32, 4), (256, 32, 8)):
        config = dict(block_m=block_m, block_n=block_size(N, block_n), block_k=block_size(K, block_k),
                      num_warps=num_warps, num_stages=3)
        if config not in candidates:
            candidates.append(config)
    return candidates + ([CUDA_TILES] if cuda_tiles else []) + ([WGMMA] if wgmma else []) + [UNFUSED]


def linear_forward(x: torch.Tensor, w_q: torch.Tensor, bias: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor,
                   table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int, config: dict | None = None) -> torch.Tensor:
    """Spec §2: y = Q_x(x) · W_qᵀ + bias for x (M, K), W_q (N, K), per-tensor activation parameters."""
    M, K = x.shape
    N = w_q.shape[0]
    if config is None:
        def run(candidate):
            return linear_forward(x, w_q, bias, lo, hi, table, gate_logits, min_bits, candidate)
        cuda_tiles = cuda_tiles_supports(x, w_q)
        wgmma = cuda_tiles and has_wgmma(x.device)  # the wgmma kernel's scope is the CUDA C one's on sm_90
        key = (size_class(M), N, K, x.dtype, bias is not None, cuda_tiles, wgmma)
        config = fastest_config("linear_forward", key, forward_configs(M, N, K, cuda_tiles, wgmma), run)
    if config.get("cuda_tiles"):
        return linear_forward_cuda(x, w_q, bias, lo, hi, table, gate_logits, min_bits)
    if config.get("wgmma"):
        return linear_forward_wgmma(x, w_q, bias, lo, hi, table, gate_logits, min_bits)
    if config.get("unfused"):
        x_q = quantize(x, lo, hi, None, gate_logits, min_bits, table=table)
        return torch.addmm(bias, x_q, w_q.t()) if bias is not None else x_q @ w_q.t()
    block_m, block_n, block_k = config["block_m"], config["block_n"], config["block_k"]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    linear_forward_kernel[grid](
        x, w_q, bias if bias is not None else y, y, lo, hi, table, gate_logits,
        M, N, K, x.stride(0), w_q.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, MIN_BITS=min_bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        DOT_PRECISION=dot_precision(x.dtype), INTERPRET=interpreting(),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y
