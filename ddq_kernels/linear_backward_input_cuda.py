"""DDQLinear backward-input GEMM with the activation reductions in its epilogue, in CUDA C (NVRTC).

The same op as `linear_backward_input` (reference: `ddq.functional.reductions_reference` of dY·W_q and x,
DDQ_SPEC.md §3): v = dY·W_q is computed on the tensor cores (mma.sync m16n8k16, float32 accumulation) and
never stored. The epilogue rounds v to x's dtype, reads x, writes ∂x = v·in and adds v to its warp's
shared-memory histogram with `shared_histogram`'s element math. Against cuBLAS followed by the SHARED pass
it saves a write and a read of v (M×K elements each); the Triton epilogue cannot do this because Triton
has no shared-memory atomics.

Scope: 16-bit x (bfloat16 or float16) with dY and W_q of the same dtype, the contraction N a multiple of 8
and at most MAX_CONTRACTION (the whole of a block's dY rows and W_q columns sit in shared memory: the CNN
GEMMs of issue 3 have N ≤ 256), K a multiple of 8, dense rows. `supports` says whether a call qualifies;
the launcher in `linear_backward_input` offers it as one more candidate to `fastest_config`.

Layout: a persistent grid; each block takes output tiles of BLOCK_M × BLOCK_K (64 × 64), column tiles
fastest so that neighbouring blocks share dY rows in L2. Eight warps, 4 along M × 2 along K, each 16 × 32.
dY rows, W_q columns and the x block are staged with cp.async; ∂x is written back through the x block, so
global memory sees only whole 16-byte vectors. Shared-memory rows are padded by 16 bytes, so that the
fragment loads of 8 rows × 4 lanes hit 32 distinct banks. The histogram is flushed to global memory once
per block, not once per tile.

Speed (H100, bf16, GPU time from the profiler, `benchmarks/bench_linear.py::test_backward_input_strategy`
for wall time): the element math's shared-memory atomics bound it, so it runs as fast as it has resident
warps. 128-row tiles (16 warps an SM) took 1.27 ms on 401408×576×64, double-buffering the loads changed
that by 4 %; 64-row tiles at 64 registers (32 warps) took 0.78 ms, level with cuBLAS + SHARED (0.19 +
0.60 ms), and 64 µs against 74 on 100352×192×32. It loses where K = 32 (half of each tile idle) and at
N = 256 (two blocks an SM). `fastest_config` keeps whichever is faster per shape class; where it wins it
also saves the M×K buffer of v.
"""

from __future__ import annotations

import functools

import torch

from ddq_kernels.cuda_tiles import TILE_HELPERS, defines, mma_type, prefer_shared_memory
from ddq_kernels.shared_histogram import ELEMENT_MATH, available as nvrtc_available, element_math_header

THREADS = 256
BLOCK_M = 64
MIN_BLOCKS = 4  # per SM: 32 warps, registers capped at 64 a thread
BLOCK_K = 64
MAX_CONTRACTION = 256
ROW_PAD = 8  # elements: 16 bytes

KERNEL = r"""
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
ddq_backward_input_shared(const X_T* __restrict__ grad_y, const X_T* __restrict__ w_t, const X_T* __restrict__ x,
                          X_T* __restrict__ grad_x, const float* __restrict__ lo_ptr, const float* __restrict__ hi_ptr,
                          float* __restrict__ histogram, float* __restrict__ sums, int M, int N, int K) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    X_T* dy_tile = reinterpret_cast<X_T*>(shared_bytes);
    X_T* w_tile = dy_tile + BLOCK_M * ROW;
    X_T* x_tile = w_tile + BLOCK_K * ROW;  // x in, ∂x out: both cross global memory as whole 16-byte vectors
    float (*bins)[256] = reinterpret_cast<float (*)[256]>(x_tile + BLOCK_M * X_ROW);
    __shared__ float partial[WARPS][3];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int warp_m = (warp % 4) * (16 * M_TILES), warp_k = (warp / 4) * 32;
    const float lo = lo_ptr[0];
    const float inv_delta = 1.0f / ((hi_ptr[0] - lo) / 255.0f);
    for (int i = threadIdx.x; i < WARPS * 256; i += THREADS) (&bins[0][0])[i] = 0.0f;
    Accumulators acc;
    start(acc, bins[warp], lo, inv_delta);
    const int tiles_k = (K + BLOCK_K - 1) / BLOCK_K;
    const long long tiles = (long long)((M + BLOCK_M - 1) / BLOCK_M) * tiles_k;
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int row0 = (int)(tile / tiles_k) * BLOCK_M;
        const int col0 = (int)(tile % tiles_k) * BLOCK_K;
        __syncthreads();  // every thread is done with the previous tile; the bins are zeroed
        stage(dy_tile, ROW, grad_y, row0, 0, BLOCK_M, N_PAD, M, N);
        stage(w_tile, ROW, w_t, col0, 0, BLOCK_K, N_PAD, K, N);
        stage(x_tile, X_ROW, x, row0, col0, BLOCK_M, BLOCK_K, M, K);
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        float c[M_TILES][4][4];
#pragma unroll
        for (int i = 0; i < M_TILES; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) c[i][j][e] = 0.0f;
#pragma unroll 4
        for (int kk = 0; kk < N_PAD; kk += 16) {
            unsigned int a[M_TILES][4], b[4][2];
#pragma unroll
            for (int i = 0; i < M_TILES; ++i) {
                const X_T* top = dy_tile + (warp_m + i * 16 + g) * ROW + kk + 2 * t;
                a[i][0] = shared_word(top, 0);
                a[i][1] = shared_word(top, 8 * ROW);
                a[i][2] = shared_word(top, 8);
                a[i][3] = shared_word(top, 8 * ROW + 8);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const X_T* column = w_tile + (warp_k + j * 8 + g) * ROW + kk + 2 * t;
                b[j][0] = shared_word(column, 0);
                b[j][1] = shared_word(column, 8);
            }
#pragma unroll
            for (int i = 0; i < M_TILES; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_16816(c[i][j], a[i], b[j][0], b[j][1]);
        }
        // Accumulator (i, j): rows g and g + 8 of the 16-row slice i, columns 2t and 2t + 1 of the 8-column slice j.
#pragma unroll
        for (int i = 0; i < M_TILES; ++i)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = row0 + warp_m + i * 16 + g + 8 * half;
                if (row >= M) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int col = col0 + warp_k + j * 8 + 2 * t;
                    if (col >= K) continue;
                    unsigned int* pair = reinterpret_cast<unsigned int*>(x_tile + (row - row0) * X_ROW + col - col0);
                    const X_T x0 = (X_T)(*pair & 0xFFFFu), x1 = (X_T)(*pair >> 16);
                    const unsigned int d0 = element(x0, c[i][j][2 * half], lo, inv_delta, acc);
                    const unsigned int d1 = element(x1, c[i][j][2 * half + 1], lo, inv_delta, acc);
                    *pair = d0 | (d1 << 16);
                }
            }
        __syncthreads();
        for (int i = threadIdx.x; i < BLOCK_M * (BLOCK_K / 8); i += THREADS) {
            const int r = i / (BLOCK_K / 8), c = (i % (BLOCK_K / 8)) * 8;
            if (row0 + r < M && col0 + c < K)
                *reinterpret_cast<uint4*>(grad_x + (long long)(row0 + r) * K + col0 + c) =
                    *reinterpret_cast<const uint4*>(x_tile + r * X_ROW + c);
        }
    }
    __syncthreads();
    flush(acc, bins, partial, histogram, sums);
}
"""


def shared_bytes(contraction: int) -> int:
    """Dynamic shared memory of one block: the dY, W_q and x tiles (padded rows) and the per-warp bins."""
    row = padded_contraction(contraction) + ROW_PAD
    return ((BLOCK_M + BLOCK_K) * row + BLOCK_M * (BLOCK_K + ROW_PAD)) * 2 + (THREADS // 32) * 256 * 4


def padded_contraction(contraction: int) -> int:
    return -(-contraction // 16) * 16


def supports(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether this kernel can run the call (see the module docstring for the scope)."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and grad_y.dtype == w_q.dtype == x.dtype):
        return False
    M, K = x.shape
    N = w_q.shape[0]
    dense = all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (grad_y, x))
    fits_int32 = M < 2**31 and K < 2**31  # the kernel takes M, N, K as C ints
    return (dense and fits_int32 and 0 < N <= MAX_CONTRACTION and N % 8 == 0 and K % 8 == 0 and M > 0
            and nvrtc_available())


@functools.lru_cache(maxsize=None)
def compiled_kernel(dtype: torch.dtype, contraction: int, device_index: int):
    """The kernel for one dtype and padded contraction, loaded on one device, its shared memory opted in."""
    header = element_math_header(dtype, torch.float32, THREADS) + defines(
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, M_TILES=BLOCK_M // 64, MIN_BLOCKS=MIN_BLOCKS, N_PAD=contraction,
        ROW=contraction + ROW_PAD, X_ROW=BLOCK_K + ROW_PAD, MMA_TYPE=mma_type(dtype))
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(header + ELEMENT_MATH + TILE_HELPERS + KERNEL, "ddq_backward_input_shared")
        kernel.set_shared_memory_config(shared_bytes(contraction))
        prefer_shared_memory(kernel)
    return kernel


def linear_backward_input_shared(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor,
                                 hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §3 for the activation: (∂x = (dY·W_q)·in, histogram (1, 256), Σv·u·in (1,), Σv·(1 − in) (1,)).

    x (M, K), dY (M, N), W_q (N, K) on one CUDA device, within `supports`.
    """
    if not supports(grad_y, w_q, x):
        raise ValueError(f"linear_backward_input_shared: unsupported call (dtypes {grad_y.dtype}, {w_q.dtype}, {x.dtype}; "
                         f"x {tuple(x.shape)}, W_q {tuple(w_q.shape)}; needs 16-bit CUDA tensors of one dtype, "
                         f"N ≤ {MAX_CONTRACTION} and N, K multiples of 8, dense 16-byte aligned rows, M and K < 2^31)")
    M, K = x.shape
    N = w_q.shape[0]
    grad_x = torch.empty_like(x)
    histogram = torch.zeros(1, 256, device=x.device, dtype=torch.float32)
    sums = torch.zeros(1, 2, device=x.device, dtype=torch.float32)
    w_t = w_q.t().contiguous()
    kernel = compiled_kernel(x.dtype, padded_contraction(N), x.device.index)
    tiles = -(-M // BLOCK_M) * -(-K // BLOCK_K)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    with torch.cuda.device(x.device):
        kernel(grid=(min(tiles, MIN_BLOCKS * sms), 1, 1), block=(THREADS, 1, 1), shared_mem=shared_bytes(N),
               args=[grad_y, w_t, x, grad_x, lo.contiguous(), hi.contiguous(), histogram, sums, M, N, K])
    return grad_x, histogram, sums[:, 0], sums[:, 1]
