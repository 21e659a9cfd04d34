"""DDQLinear backward-weight GEMM with the activation re-quantized in its operand staging, in CUDA C (NVRTC).

The same op as `linear_backward_weight` (spec §2–3; reference: dYᵀ · quantize_reference(x), float32):
the forward saved x, not x_q, and this kernel quantizes each staged x chunk in place
(`cuda_tiles.quantize_tile`, the level table in shared memory) instead of a separate quantize pass
writing x_q for cuBLAS. Block (k, s) owns the N × BLOCK_K slice k of ∂W_q and the s-th run of
`rows_per_split` rows of the contraction over M: dY and x move through STAGES shared-memory slots of
BLOCK_M rows (cp.async), both operands reach the tensor cores transposed by ldmatrix.trans, and eight
warps (WARPS_N along N × WARPS_K along K) accumulate in float32. Each block writes its partial slice to a
(splits, N, K) buffer that one sum reduces in a fixed order: no atomics, the same result every run.

Scope: 16-bit dY and x of one dtype, N ≤ MAX_N, N and K multiples of 8, dense 16-byte aligned rows, M
and K < 2^31 (`supports`): the CNN GEMMs of issue 3. `linear_backward_weight` offers it as one more
candidate to `fastest_config`.
"""

from __future__ import annotations

import functools

import torch

from ddq_kernels.cuda_tiles import QUANTIZE_TILE, TILE_HELPERS, defines, mma_type, prefer_shared_memory
from ddq_kernels.shared_histogram import ELEMENT_MATH, available as nvrtc_available, element_math_header

THREADS = 256
MAX_N = 256
ROW_PAD = 8  # elements: 16 bytes, so that the 8 rows of an ldmatrix block hit distinct banks

KERNEL = r"""
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
ddq_linear_backward_weight(const X_T* __restrict__ grad_y, const X_T* __restrict__ x, float* __restrict__ partial,
                           const float* __restrict__ lo_ptr, const float* __restrict__ hi_ptr,
                           const float* __restrict__ table, const float* __restrict__ logits,
                           int M, int N, int K, int rows_per_split, int min_bits) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    X_T* dy_stages = reinterpret_cast<X_T*>(shared_bytes);
    X_T* x_stages = dy_stages + STAGES * BLOCK_M * DY_ROW;
    float* levels = reinterpret_cast<float*>(x_stages + STAGES * BLOCK_M * X_ROW);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int warp_n = (warp % WARPS_N) * (16 * N_TILES), warp_k = (warp / WARPS_N) * (8 * K_TILES);
    // ldmatrix rows of this lane: block q = lane / 8 of each x4 load, row lane % 8 of that block.
    const int block = lane / 8, block_row = lane % 8;
    const int col0 = blockIdx.x * BLOCK_K;
    const long long first_row = (long long)blockIdx.y * rows_per_split;
    const long long last_row = first_row + rows_per_split < M ? first_row + rows_per_split : (long long)M;
    const float lo = lo_ptr[0];
    const float inv_delta = 1.0f / ((hi_ptr[0] - lo) / 255.0f);
    const Levels lookup = load_levels(levels, table, logits, min_bits);
    const int chunks = (int)((last_row - first_row + BLOCK_M - 1) / BLOCK_M);
    // One commit group a chunk, empty past the last, so that wait_group counts the same in every iteration.
    const auto stage_chunk = [&](int chunk) {
        if (chunk < chunks) {
            const int slot = chunk % STAGES;
            const long long rows = first_row + (long long)chunk * BLOCK_M;
            stage<BLOCK_M, N_PAD>(dy_stages + slot * BLOCK_M * DY_ROW, DY_ROW, grad_y, rows, 0, last_row, N);
            stage<BLOCK_M, BLOCK_K>(x_stages + slot * BLOCK_M * X_ROW, X_ROW, x, rows, col0, last_row, K);
        }
        asm volatile("cp.async.commit_group;");
    };
#pragma unroll
    for (int ahead = 0; ahead < STAGES - 1; ++ahead) stage_chunk(ahead);
    float c[N_TILES][K_TILES][4];
#pragma unroll
    for (int i = 0; i < N_TILES; ++i)
#pragma unroll
        for (int j = 0; j < K_TILES; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) c[i][j][e] = 0.0f;
    for (int chunk = 0; chunk < chunks; ++chunk) {
        const int s = chunk % STAGES;
        stage_chunk(chunk + STAGES - 1);  // later rows load while these are quantized and multiplied
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
        __syncthreads();
        const X_T* dy_tile = dy_stages + s * BLOCK_M * DY_ROW;
        X_T* x_tile = x_stages + s * BLOCK_M * X_ROW;
        quantize_tile<BLOCK_M, BLOCK_K>(x_tile, X_ROW, lookup, lo, inv_delta);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BLOCK_M; kk += 16) {
            // A = dYᵀ (rows n, columns m): blocks (m kk, n), (kk, n + 8), (kk + 8, n), (kk + 8, n + 8).
            unsigned int a[N_TILES][4];
#pragma unroll
            for (int i = 0; i < N_TILES; ++i)
                ldmatrix_transposed(a[i], dy_tile + (kk + block_row + 8 * (block >> 1)) * DY_ROW
                                              + warp_n + 16 * i + 8 * (block & 1));
            // B = x_q (rows m, columns k), two 8-column slices a load: blocks (kk, k), (kk + 8, k), (kk, k + 8), (kk + 8, k + 8).
#pragma unroll
            for (int j = 0; j < K_TILES; j += 2) {
                unsigned int b[4];
                ldmatrix_transposed(b, x_tile + (kk + block_row + 8 * (block & 1)) * X_ROW + warp_k + 8 * j + 8 * (block >> 1));
#pragma unroll
                for (int i = 0; i < N_TILES; ++i) {
                    mma_16816(c[i][j], a[i], b[0], b[1]);
                    mma_16816(c[i][j + 1], a[i], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with slot s before a later iteration refills it
    }
    // Accumulator (i, j): rows g and g + 8 of the warp's 16-row slice i of N, columns 2t, 2t + 1 of its 8-column slice j.
    float* out = partial + (long long)blockIdx.y * N * K;
#pragma unroll
    for (int i = 0; i < N_TILES; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int n = warp_n + 16 * i + g + 8 * half;
            if (n >= N) continue;
#pragma unroll
            for (int j = 0; j < K_TILES; ++j) {
                const int k = col0 + warp_k + 8 * j + 2 * t;
                if (k < K) *reinterpret_cast<float2*>(out + (long long)n * K + k) = make_float2(c[i][j][2 * half], c[i][j][2 * half + 1]);
            }
        }
}
"""


def layout(n: int, **overrides: int) -> dict:
    """The tiling for N (keyword overrides for `benchmarks/probe_cuda_tiles.py`). N is padded to whole 32-row
    pairs of 16-row slices, so that WARPS_N ∈ {2, 4} and each warp's K_TILES (8-column slices of BLOCK_K) is
    even, for the two-slice ldmatrix loads. dY and x move in BLOCK_M-row chunks through STAGES shared-memory
    slots. (128 columns a block, halving the re-staging of dY, measured no faster on 401408×576×64: 0.357
    against 0.354 ms, run 8.)"""
    n_pad = -(-n // 32) * 32
    warps_n = 4 if (n_pad // 16) % 4 == 0 else 2
    shape = dict(N_PAD=n_pad, BLOCK_M=64, BLOCK_K=64, STAGES=2, WARPS_N=warps_n, N_TILES=n_pad // 16 // warps_n,
                 MIN_BLOCKS=4 if n_pad <= 64 else 3 if n_pad <= 128 else 2)
    shape.update(overrides)
    shape["K_TILES"] = shape["BLOCK_K"] // 8 // (8 // warps_n)
    return shape


def shared_bytes(shape: dict) -> int:
    """STAGES slots of the dY and x chunks (padded rows) and the 256-entry level table."""
    return (shape["STAGES"] * shape["BLOCK_M"] * ((shape["N_PAD"] + ROW_PAD) + (shape["BLOCK_K"] + ROW_PAD)) * 2
            + 256 * 4)


def supports(grad_y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether this kernel can run the call (see the module docstring for the scope)."""
    if not (x.is_cuda and x.dim() == 2 and grad_y.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16)
            and grad_y.dtype == x.dtype):
        return False
    M, K = x.shape
    N = grad_y.shape[1]
    dense = all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (grad_y, x))
    return (dense and grad_y.shape[0] == M and 0 < M < 2**31 and 0 < K < 2**31 and K % 8 == 0
            and 0 < N <= MAX_N and N % 8 == 0 and nvrtc_available())


def kernel_source(dtype: torch.dtype, shape_items: tuple) -> str:
    """The CUDA source of the kernel for one dtype and tiling (`layout`'s items)."""
    shape = dict(shape_items)
    header = element_math_header(dtype, dtype, THREADS) + defines(
        DY_ROW=shape["N_PAD"] + ROW_PAD, X_ROW=shape["BLOCK_K"] + ROW_PAD,
        MMA_TYPE=mma_type(dtype), **shape)
    return header + ELEMENT_MATH + TILE_HELPERS + QUANTIZE_TILE + KERNEL


@functools.lru_cache(maxsize=None)
def compiled_kernel(dtype: torch.dtype, shape_items: tuple, device_index: int):
    """`kernel_source`'s kernel loaded on one device, its shared memory opted in."""
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(kernel_source(dtype, shape_items), "ddq_linear_backward_weight")
        kernel.set_shared_memory_config(shared_bytes(dict(shape_items)))
        prefer_shared_memory(kernel)
    return kernel


def linear_backward_weight_cuda(grad_y: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                                table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int,
                                tiling: dict | None = None) -> torch.Tensor:
    """∂L/∂W_q = dYᵀ · Q_x(x), (N, K) float32, for x (M, K) and dY (M, N) on one CUDA device within `supports`.
    `tiling`: `layout` overrides."""
    if not supports(grad_y, x):
        raise ValueError(f"linear_backward_weight_cuda: unsupported call (dY {grad_y.dtype} {tuple(grad_y.shape)}, "
                         f"x {x.dtype} {tuple(x.shape)}; needs 16-bit CUDA tensors of one dtype, N ≤ {MAX_N} and N, K "
                         "multiples of 8, dense 16-byte aligned rows, M and K < 2^31)")
    M, K = x.shape
    N = grad_y.shape[1]
    shape = layout(N, **(tiling or {}))
    tiles_k = -(-K // shape["BLOCK_K"])
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    chunk = shape["BLOCK_M"]
    splits = max(1, min(-(-M // chunk), shape["MIN_BLOCKS"] * sms // tiles_k))
    rows_per_split = -(-(-(-M // splits)) // chunk) * chunk
    splits = -(-M // rows_per_split)
    partial = torch.empty(splits, N, K, device=x.device, dtype=torch.float32)
    kernel = compiled_kernel(x.dtype, tuple(shape.items()), x.device.index)
    with torch.cuda.device(x.device):
        kernel(grid=(tiles_k, splits, 1), block=(THREADS, 1, 1), shared_mem=shared_bytes(shape),
               args=[grad_y, x, partial, lo.contiguous(), hi.contiguous(), table.contiguous(),
                     gate_logits.contiguous(), M, N, K, rows_per_split, min_bits])
    return partial[0] if splits == 1 else partial.sum(dim=0)
