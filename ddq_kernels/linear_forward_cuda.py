"""DDQLinear forward GEMM with the activation quantizer in its operand staging, in CUDA C (NVRTC).

The same op as `linear_forward` (spec §2; reference: F.linear(quantize_reference(x), W_q, bias)): each
block owns BLOCK_M rows of y (`layout`) and every one of its N ≤ MAX_N columns, so each element of x is read and
quantized once. W_q moves in BLOCK_K-deep chunks through STAGES shared-memory slots (cp.async); x moves
through registers, each chunk's loads in flight while the block multiplies the one before, and is quantized on its
way into one of two shared-memory slots (`cuda_tiles.load_vectors` and `store_quantized`, the level of each fine
cell in shared memory; run 22: 224.5 → 216.4 µs on 401408×576×64 against quantizing the staged chunk in place
behind a second barrier). Eight warps (`layout`) multiply it on the tensor cores (mma.sync m16n8k16, float32
accumulation). Output rounded to x's dtype after the float32 bias add, as the Triton kernel does.

Scope: 16-bit x and W_q of one dtype, N ≤ MAX_N, N and K multiples of 8, dense 16-byte aligned rows, M and
K < 2^31 (`supports`). The CNN GEMMs of issue 3 (N ≤ 256, M ≈ 10⁵) are memory-bound: this reads x once
at a cost of one shared-memory load and ~7 instructions an element, where Triton's kernel gathers every
level from global memory. `linear_forward` offers it as one more candidate to `fastest_config`.
"""

from __future__ import annotations

import functools

import torch

from ddq_kernels.cuda_tiles import QUANTIZE_TILE, TILE_HELPERS, defines, mma_type, prefer_shared_memory
from ddq_kernels.shared_histogram import ELEMENT_MATH, available as nvrtc_available, element_math_header

MAX_N = 256
ROW_PAD = 8  # elements: 16 bytes, so that 8 rows × 4 lanes of fragment loads hit 32 distinct banks

KERNEL = r"""
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
ddq_linear_forward(const X_T* __restrict__ x, const X_T* __restrict__ w_q, const float* __restrict__ bias,
                   X_T* __restrict__ y, const float* __restrict__ lo_ptr, const float* __restrict__ hi_ptr,
                   const float* __restrict__ table, const float* __restrict__ logits,
                   int M, int N, int K, int min_bits, int has_bias) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    X_T* x_stages = reinterpret_cast<X_T*>(shared_bytes);
    X_T* w_stages = x_stages + 2 * BLOCK_M * ROW;
    float* levels = reinterpret_cast<float*>(w_stages + STAGES * N_PAD * ROW);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int warp_m = (warp % WARPS_M) * (16 * M_TILES), warp_n = (warp / WARPS_M) * (8 * N_TILES);
    const long long row0 = (long long)blockIdx.x * BLOCK_M;
    const float lo = lo_ptr[0];
    const float inv_delta = 1.0f / ((hi_ptr[0] - lo) / 255.0f);
    const Levels lookup = load_levels(levels, table, logits, min_bits);
    const int chunks = (K + BLOCK_K - 1) / BLOCK_K;
    // W_q moves by cp.async through STAGES slots, one commit group a chunk, empty past the last, so that
    // wait_group counts the same in every iteration. x moves through registers into two slots, quantized on
    // the way (`load_vectors`, `store_quantized`): chunk c + 1 is stored while chunk c is multiplied, and chunk
    // c + 2 is loaded meanwhile, so one barrier a chunk orders both slots.
    const auto stage_weights = [&](int chunk) {
        if (chunk < chunks) stage<N_PAD, BLOCK_K>(w_stages + (chunk % STAGES) * N_PAD * ROW, ROW, w_q, 0, chunk * BLOCK_K, N, K);
        asm volatile("cp.async.commit_group;");
    };
    TileVectors<BLOCK_M, BLOCK_K> x_ahead;
    const auto load_x = [&](int chunk) {
        if (chunk < chunks) load_vectors(x_ahead, x, row0, chunk * BLOCK_K, M, K);
    };
#pragma unroll
    for (int ahead = 0; ahead < STAGES - 1; ++ahead) stage_weights(ahead);
    load_x(0);
    __syncthreads();  // the level table
    store_quantized(x_stages, ROW, x_ahead, lookup, lo, inv_delta);
    load_x(1);
    float c[M_TILES][N_TILES][4];
#pragma unroll
    for (int i = 0; i < M_TILES; ++i)
#pragma unroll
        for (int j = 0; j < N_TILES; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) c[i][j][e] = 0.0f;
    for (int chunk = 0; chunk < chunks; ++chunk) {
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");
        // Every warp has stored chunk `chunk` and is done with chunk − 1's slots, which are refilled next.
        __syncthreads();
        stage_weights(chunk + STAGES - 1);
        if (chunk + 1 < chunks) store_quantized(x_stages + (chunk + 1) % 2 * BLOCK_M * ROW, ROW, x_ahead, lookup, lo, inv_delta);
        load_x(chunk + 2);
        const X_T* x_tile = x_stages + chunk % 2 * BLOCK_M * ROW;
        const X_T* w_tile = w_stages + chunk % STAGES * N_PAD * ROW;
#pragma unroll
        for (int kk = 0; kk < BLOCK_K; kk += 16) {
            unsigned int a[M_TILES][4];
#pragma unroll
            for (int i = 0; i < M_TILES; ++i) load_a(a[i], x_tile + (warp_m + 16 * i) * ROW + kk, ROW);
            // B of two 8-column slices a load: W_q rows n (lanes 0-7: slice j, k; 8-15: slice j, k + 8; 16-31 the
            // same for slice j + 1), as mma's column-major B wants them; each pair is used by all of the warp's
            // row slices right away, so that only one pair's registers are live.
#pragma unroll
            for (int j = 0; j < N_TILES; j += 2) {
                const X_T* rows = w_tile + (warp_n + j * 8 + lane % 8 + (lane / 16) * 8) * ROW + kk + (lane / 8 % 2) * 8;
                unsigned int b[4], single[2];
                if (j + 1 < N_TILES) {
                    ldmatrix(b, rows);
                } else {
                    ldmatrix(single, rows);
                    b[0] = single[0], b[1] = single[1];
                }
#pragma unroll
                for (int i = 0; i < M_TILES; ++i) {
                    mma_16816(c[i][j], a[i], b[0], b[1]);
                    if (j + 1 < N_TILES) mma_16816(c[i][j + 1], a[i], b[2], b[3]);
                }
            }
        }
    }
    // Accumulator (i, j): rows g and g + 8 of the warp's 16-row slice i, columns 2t and 2t + 1 of its 8-column slice j.
#pragma unroll
    for (int j = 0; j < N_TILES; ++j) {
        const int col = warp_n + j * 8 + 2 * t;
        if (col >= N) continue;
        const float bias0 = has_bias ? bias[col] : 0.0f, bias1 = has_bias ? bias[col + 1] : 0.0f;
#pragma unroll
        for (int i = 0; i < M_TILES; ++i)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const long long row = row0 + warp_m + 16 * i + g + 8 * half;
                if (row < M)
                    *reinterpret_cast<unsigned int*>(y + row * N + col) =
                        narrow_pair(c[i][j][2 * half] + bias0, c[i][j][2 * half + 1] + bias1);
            }
    }
}
"""


def layout(n: int, **overrides: int) -> dict:
    """The tiling for N (keyword overrides for `benchmarks/probe_cuda_tiles.py`): eight warps, WARPS_M along M ×
    WARPS_N along N, each owning M_TILES 16-row slices × N_TILES 8-column slices; N is padded to whole slices
    for every warp column. Where N ≤ 64 a block owns 128 rows (4 × 2 warps of 32 × N/2), so that each staged
    W_q chunk serves twice the rows (0.345 → 0.307 ms on 401408×576×64, run 8); where N ≤ 128, 64 rows, the
    accumulators of a warp's wider N slice needing the registers; above, 64 rows as 2 × 4 warps of 32 × N/4,
    whose squarer warp tiles load fewer fragments a product (25088×1024×256: 78.7 → 72.0 µs, run 22). W_q
    moves in BLOCK_K-deep chunks through STAGES shared-memory slots, x through two."""
    wide = n > 128
    warps_n = overrides.get("WARPS_N", 4 if wide else 2)
    n_pad = -(-n // (8 * warps_n)) * 8 * warps_n
    shape = dict(N_PAD=n_pad, M_TILES=2 if n <= 64 or wide else 1, WARPS_M=2 if wide else 4, WARPS_N=warps_n,
                 BLOCK_K=64, STAGES=2, MIN_BLOCKS=2 if wide else 3)
    shape.update(overrides)
    shape["N_TILES"] = n_pad // (8 * warps_n)
    shape["BLOCK_M"] = shape["WARPS_M"] * 16 * shape["M_TILES"]
    shape["THREADS"] = 32 * shape["WARPS_M"] * warps_n
    return shape


def shared_bytes(shape: dict) -> int:
    """Two slots of the x chunk and STAGES of the W_q chunk (padded rows), and the 256-entry level table."""
    return (2 * shape["BLOCK_M"] + shape["STAGES"] * shape["N_PAD"]) * (shape["BLOCK_K"] + ROW_PAD) * 2 + 256 * 4


def supports(x: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether this kernel can run the call (see the module docstring for the scope)."""
    if not (x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and w_q.dtype == x.dtype):
        return False
    M, K = x.shape
    N = w_q.shape[0]
    dense = all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (x, w_q))
    return (dense and 0 < M < 2**31 and 0 < K < 2**31 and K % 8 == 0 and 0 < N <= MAX_N and N % 8 == 0
            and w_q.shape[1] == K and nvrtc_available())


def kernel_source(dtype: torch.dtype, shape_items: tuple) -> str:
    """The CUDA source of the kernel for one dtype and tiling (`layout`'s items)."""
    shape = dict(shape_items)
    threads = shape.pop("THREADS")
    header = element_math_header(dtype, dtype, threads) + defines(
        ROW=shape["BLOCK_K"] + ROW_PAD, MMA_TYPE=mma_type(dtype), **shape)
    return header + ELEMENT_MATH + TILE_HELPERS + QUANTIZE_TILE + KERNEL


@functools.lru_cache(maxsize=None)
def compiled_kernel(dtype: torch.dtype, shape_items: tuple, device_index: int):
    """`kernel_source`'s kernel loaded on one device, its shared memory opted in."""
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(kernel_source(dtype, shape_items), "ddq_linear_forward")
        kernel.set_shared_memory_config(shared_bytes(dict(shape_items)))
        prefer_shared_memory(kernel)
    return kernel


def linear_forward_cuda(x: torch.Tensor, w_q: torch.Tensor, bias: torch.Tensor | None, lo: torch.Tensor,
                        hi: torch.Tensor, table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int,
                        tiling: dict | None = None) -> torch.Tensor:
    """Spec §2: y = Q_x(x) · W_qᵀ + bias for x (M, K), W_q (N, K), per-tensor activation parameters and
    `level_table`'s (1, 256) table, on one CUDA device, within `supports`. `tiling`: `layout` overrides."""
    if not supports(x, w_q):
        raise ValueError(f"linear_forward_cuda: unsupported call (x {x.dtype} {tuple(x.shape)}, W_q {w_q.dtype} "
                         f"{tuple(w_q.shape)}; needs 16-bit CUDA tensors of one dtype, N ≤ {MAX_N} and N, K multiples "
                         "of 8, dense 16-byte aligned rows, M and K < 2^31)")
    M, K = x.shape
    N = w_q.shape[0]
    shape = layout(N, **(tiling or {}))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bias_values = bias.float().contiguous() if bias is not None else table
    kernel = compiled_kernel(x.dtype, tuple(shape.items()), x.device.index)
    with torch.cuda.device(x.device):
        kernel(grid=(-(-M // shape["BLOCK_M"]), 1, 1), block=(shape["THREADS"], 1, 1), shared_mem=shared_bytes(shape),
               args=[x, w_q, bias_values, y, lo.contiguous(), hi.contiguous(), table.contiguous(),
                     gate_logits.contiguous(), M, N, K, min_bits, int(bias is not None)])
    return y
