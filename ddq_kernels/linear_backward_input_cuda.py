"""DDQLinear backward-input GEMM with the activation reductions in its epilogue, optionally with the
backward-weight GEMM in the same pass, in CUDA C (NVRTC).

The same op as `linear_backward_input` (reference: `ddq.functional.reductions_reference` of dY·W_q and x,
DDQ_SPEC.md §3): v = dY·W_q is computed on the tensor cores (mma.sync m16n8k16, float32 accumulation) and
never stored. The epilogue rounds v to x's dtype, reads x, writes ∂x = v·in and adds v to its warp's
shared-memory histogram with `shared_histogram`'s element math. Against cuBLAS followed by the SHARED pass
it saves a write and a read of v (M×K elements each); the Triton epilogue cannot do this because Triton
has no shared-memory atomics.

With the weight gradient (`linear_backward_shared`, any N in scope), the same pass also computes
∂W_q = dYᵀ·Q_x(x): the epilogue writes x_q of each element (the level of the fine cell its reductions
found, plus x·0, as `cuda_tiles.quantize_tile` computes it) into a shared-memory tile, and the block adds
dYᵀ·x_q for the tile's rows to its N × 64 float32 accumulators (ldmatrix.trans for both operands). The
eight warps split them (`weight_gradient_layout`): two or four warps along N, each holding one to four
16-row slices of it, so a thread holds N/4 of them (64 at N = 256; two blocks an SM beyond N = 64, three up
to it). Each block writes its share to a (row groups, N, K) buffer that one sum reduces in a fixed order. x
and dY cross global memory once for both GEMMs. `linear_backward.linear_backward_activation` chooses it,
the two separate GEMMs or cuBLAS around the SHARED pass per shape class. Up to run 11 it took N ≤ 64 only;
on 100352×32×192 it now takes 0.057 ms of GPU time against 0.061 for the other two (run 12).

Scope: 16-bit x (bfloat16 or float16) with dY and W_q of the same dtype, the contraction N a multiple of 8
and at most MAX_CONTRACTION (the whole of a block's dY rows and W_q columns sit in shared memory: the CNN
GEMMs of issue 3 have N ≤ 256), K a multiple of 8, dense rows. `supports` says whether a call qualifies;
the launcher in `linear_backward_input` offers it as one more candidate to `fastest_config`.

Layout: a persistent grid of as many blocks as fit at once, a multiple of the column tiles: each block
keeps one column tile of BLOCK_K columns, stages its W_q columns once, and walks the row tiles of BLOCK_M
rows; blocks next to each other take the same rows, so they share dY rows in L2. Eight warps, 4 along M × 2
along K. The wide tile is 64 × 64 (warps of 16 × 32); with ∂W_q, where K ≤ 32 and N > 32, the narrow tile is
128 × 32 (warps of 32 × 16), so that no v products or ∂W_q accumulators are spent on columns past K
(`column_tile`; on 100352×32×192 half of a wide tile is past K). dY rows and the x block are staged with
cp.async into one of STAGES buffers: with two (N ≤ 128, or N ≤ 64 with the narrow tile; three blocks an SM)
the next tile's loads are in flight while this one is computed. ∂x is written back through the x block, so
global memory sees only whole 16-byte vectors.
Shared-memory rows are padded by 16 bytes, so that the fragment loads of 8 rows × 4 lanes hit 32 distinct
banks. Each tile gives every lane 16 values of v, one chunk of the element math's integer bins; the
histogram is flushed to global memory once per block, not once per tile.

Speed (H100, bf16, CUDA-event medians, `benchmarks/probe_backward_input.py`; docs/kernels.md, run 9): with
∂W_q, 0.85 ms on 401408×576×64 against 1.03 ms for this kernel then the CUDA C dW GEMM. Without it, on
401408×576×64 0.90 ms with float bins and column-fastest tiles, 0.73 ms with the integer bins, 0.69 ms with
one column tile a block (one buffer, four blocks an SM) and 0.68 ms with two buffers (three blocks); cuBLAS
plus the SHARED pass take 0.19 + 0.50 ms. 25088×1024×256: 0.23 → 0.16–0.22 ms (host-bound). Nsight
Compute (run 9): 57 instructions an element, issued on 65 % of cycles, at 44 % of DRAM bandwidth; about
half of them are outside the element math (staging, bounds checks, fragments, write-back: SASS of the
kernel). Run 7 measured 128-row tiles (16 warps an SM) at 1.27 ms. `fastest_config` keeps whichever
candidate is faster per shape class; where this one wins it also saves the M×K buffer of v.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ddq_kernels.cuda_tiles import QUANTIZE_TILE, TILE_HELPERS, defines, mma_type, prefer_shared_memory
from ddq_kernels.quantize_backward import Bins, output_bins
from ddq_kernels.shared_histogram import ELEMENT_MATH, WARP_BINS_BYTES, available as nvrtc_available, element_math_header

THREADS = 256
MIN_BLOCKS = 4  # per SM: 32 warps, registers capped at 64 a thread
WEIGHT_GRADIENT_MIN_BLOCKS = 3  # with ∂W_q's accumulators for N ≤ 64: 80 registers a thread
WIDE_WEIGHT_GRADIENT_MIN_BLOCKS = 2  # for 64 < N ≤ 256: up to 64 of them a thread, 128 registers
MAX_CONTRACTION = 256


class ColumnTile(NamedTuple):
    """A block's tile: BLOCK_M rows × BLOCK_K columns of x, over eight warps, four along M and two along K; each
    warp holds M_TILES 16-row slices × J_TILES 8-column slices of v (16 values a lane, one chunk of the bins)."""
    block_m: int
    block_k: int

    @property
    def m_tiles(self) -> int:
        return self.block_m // 64

    @property
    def j_tiles(self) -> int:
        return self.block_k // 16


WIDE_TILE = ColumnTile(64, 64)
# For K ≤ 32 with ∂W_q: the wide tile would spend half its v products and ∂W_q accumulators on padding columns.
NARROW_TILE = ColumnTile(128, 32)
ROW_PAD = 8  # elements: 16 bytes

KERNEL = r"""
// Calls f(e, row, column) for each element pair of a lane's chunk: its index e in v (elements e and e + 1) and
// its row and column in the block's tile. Accumulator (i, j) holds rows g and g + 8 of the warp's 16-row slice i,
// columns 2t and 2t + 1 of its 8-column slice j.
template <typename F>
__device__ __forceinline__ void for_each_pair(int warp_m, int warp_k, F&& f) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < M_TILES; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < J_TILES; ++j) f((i * J_TILES + j) * 4 + 2 * half, warp_m + i * 16 + g + 8 * half, warp_k + j * 8 + 2 * t);
}

// ∂x and the reductions of one tile's chunk; with WEIGHT_GRADIENT also x_q (from the same fine cells) into xq_tile.
// No bounds checks: elements past M or K hold x = 0 (staged zeros) and v = 0 (`zero_outside`), so they add
// nothing to the reductions, their ∂x is not written back, and their x_q meets only zero dY rows (past M) or
// lands in ∂W_q columns that are never written (past K).
//
// ptxas keeps a shared-memory load after an earlier shared-memory add whose address it cannot tell apart (the
// bins' red.shared), so a pair's x and levels loaded where they are used waited out their latency after the
// previous pair's adds (Nsight Compute, run 19: the largest short-scoreboard stalls). So x comes first, all of
// the lane's pairs in two ldmatrix (each 8 × 8 block of the tile is one pair a lane, in the accumulators'
// layout), and a pair's levels are looked up before its adds.
template <bool FIXED>
__device__ __forceinline__ void tile_elements(const float (&v)[CHUNK], X_T* x_tile, X_T* xq_tile, Levels levels,
                                              int warp_m, int warp_k, float lo, float inv_delta, Accumulators& acc) {
    unsigned int raws[CHUNK / 2];  // pair e / 2: rows of block (i, half), columns of slice j, as for_each_pair
    const int lane = threadIdx.x % 32;
    auto load_pairs = [&](int load) {
        const int pair = 4 * load + lane / 8, half = pair % 2, j = pair / 2 % J_TILES, i = pair / 2 / J_TILES;
        ldmatrix(*reinterpret_cast<unsigned int(*)[4]>(raws + 4 * load),
                 x_tile + (warp_m + i * 16 + 8 * half + lane % 8) * X_ROW + warp_k + j * 8);
    };
    load_pairs(0);
    for_each_pair(warp_m, warp_k, [&](int e, int row, int column) {
        // Pairs 4–7 before the adds of pair 2, which for_each_pair takes second in either tile, ahead of them
        // all: loading all eight at once held 8 more registers, and fp16 without ∂W_q spilled under its
        // 64-register cap.
        if (e == 4) load_pairs(1);
        const int offset = row * X_ROW + column;
        const unsigned int raw = raws[e / 2];
        const X_T x0 = (X_T)(raw & 0xFFFFu), x1 = (X_T)(raw >> 16);
        const float u0 = grid_position(x0, lo, inv_delta), u1 = grid_position(x1, lo, inv_delta);
        const int cell0 = fine_cell(u0), cell1 = fine_cell(u1);
        const float level0 = WEIGHT_GRADIENT ? level_of_cell(levels, cell0) : 0.0f;
        const float level1 = WEIGHT_GRADIENT ? level_of_cell(levels, cell1) : 0.0f;
        const unsigned int d0 = element<FIXED>(u0, cell0, v[e], acc);
        const unsigned int d1 = element<FIXED>(u1, cell1, v[e + 1], acc);
        *reinterpret_cast<unsigned int*>(x_tile + offset) = d0 | (d1 << 16);
        if (WEIGHT_GRADIENT) *reinterpret_cast<unsigned int*>(xq_tile + offset) = pair_levels(level0, level1, raw);
    });
}

// v = 0 for the elements of a tile past M or K. Their products are already 0 unless W_q holds a non-finite
// value (0·inf); this keeps such a v out of the reductions, as the reference has no such elements. K is a
// multiple of 8, so an element pair lies wholly inside or outside.
__device__ __forceinline__ void zero_outside(float (&v)[CHUNK], int row0, int col0, int warp_m, int warp_k, int M, int K) {
    for_each_pair(warp_m, warp_k, [&](int e, int row, int column) {
        if (row0 + row >= M || col0 + column >= K) v[e] = v[e + 1] = 0.0f;
    });
}

// dW[:, this column tile] += dYᵀ · x_q over the tile's rows; warps split N (N_SLICES slices of 16 rows each) × the
// columns (C_TILES slices of 8).
__device__ __forceinline__ void add_weight_gradient(float (&dw)[N_SLICES][C_TILES][4], const X_T* dy_tile, const X_T* xq_tile) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int block = lane / 8, block_row = lane % 8;
    const int warp_n = (warp % WARPS_N) * (16 * N_SLICES), warp_c = (warp / WARPS_N) * (8 * C_TILES);
#pragma unroll
    for (int kk = 0; kk < BLOCK_M; kk += 16) {
        unsigned int b[C_TILES / 2][4];  // B = x_q, two 8-column slices a load
#pragma unroll
        for (int j = 0; j < C_TILES; j += 2)
            ldmatrix_transposed(b[j / 2], xq_tile + (kk + block_row + 8 * (block & 1)) * X_ROW + warp_c + 8 * j + 8 * (block >> 1));
#pragma unroll
        for (int s = 0; s < N_SLICES; ++s) {
            unsigned int a[4];  // A = dYᵀ: blocks (rows kk, n), (kk, n + 8), (kk + 8, n), (kk + 8, n + 8)
            ldmatrix_transposed(a, dy_tile + (kk + block_row + 8 * (block >> 1)) * ROW + warp_n + 16 * s + 8 * (block & 1));
#pragma unroll
            for (int j = 0; j < C_TILES; j += 2) {
                mma_16816(dw[s][j], a, b[j / 2][0], b[j / 2][1]);
                mma_16816(dw[s][j + 1], a, b[j / 2][2], b[j / 2][3]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
ddq_backward_input_shared(const X_T* __restrict__ grad_y, const X_T* __restrict__ w_q, const X_T* __restrict__ x,
                          X_T* __restrict__ grad_x, const float* __restrict__ lo_ptr, const float* __restrict__ hi_ptr,
                          float* __restrict__ histogram, float* __restrict__ sums, const float* __restrict__ table,
                          const float* __restrict__ logits, float* __restrict__ partial, int M, int N, int K, int min_bits) {
    static_assert(M_TILES * J_TILES * 4 == CHUNK, "a tile gives each lane one chunk of v");
    static_assert(BLOCK_M * BLOCK_K % (8 * THREADS) == 0, "a tile's 16-byte vectors split evenly over the threads");
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    // The block's W_q columns, STAGES buffers of dY rows and x (x in, ∂x out: both cross global memory as whole
    // 16-byte vectors), the per-warp bins; with WEIGHT_GRADIENT the x_q tile and the quantizer's 256-entry level table.
    X_T* w_tile = reinterpret_cast<X_T*>(shared_bytes);  // W_q[:, column tile]: N_PAD rows of X_ROW
    X_T* buffers = w_tile + N_PAD * X_ROW;
    constexpr int BUFFER = BLOCK_M * ROW + BLOCK_M * X_ROW;
    WarpBins* bins = reinterpret_cast<WarpBins*>(buffers + STAGES * BUFFER);
    X_T* xq_tile = reinterpret_cast<X_T*>(bins + WARPS);
    float* levels = reinterpret_cast<float*>(xq_tile + BLOCK_M * X_ROW);
    __shared__ float partial_sums[WARPS][3];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int block_q = lane / 8, block_row = lane % 8;
    const int warp_m = (warp % 4) * (16 * M_TILES), warp_k = (warp / 4) * (8 * J_TILES);
    const float lo = lo_ptr[0];
    const float inv_delta = 1.0f / ((hi_ptr[0] - lo) / 255.0f);
    for (int i = threadIdx.x; i < WARPS * 512; i += THREADS) reinterpret_cast<unsigned int*>(&bins[i / 512])[i % 512] = 0u;
    Levels lookup = {levels, 0};
    if (WEIGHT_GRADIENT) lookup = load_levels(levels, table, logits, min_bits);
    Accumulators acc;
    start(acc, bins + warp, lo, inv_delta);
    float dw[N_SLICES][C_TILES][4];
#pragma unroll
    for (int e = 0; e < N_SLICES * C_TILES * 4; ++e) (&dw[0][0][0])[e] = 0.0f;
    // The launcher makes the grid a multiple of the column tiles: a block keeps one column tile, so it stages
    // its W_q columns once, and walks the row tiles; neighbouring blocks share dY rows in L2.
    const int tiles_k = (K + BLOCK_K - 1) / BLOCK_K;
    const int col0 = (int)(blockIdx.x % tiles_k) * BLOCK_K;
    const long long row_tiles = (M + BLOCK_M - 1) / BLOCK_M, row_step = gridDim.x / tiles_k;
    long long row_tile = blockIdx.x / tiles_k;
    stage<N_PAD, BLOCK_K>(w_tile, X_ROW, w_q, 0, col0, N, K);
    if (row_tile < row_tiles) {
        stage<BLOCK_M, N_PAD>(buffers, ROW, grad_y, row_tile * BLOCK_M, 0, M, N);
        stage<BLOCK_M, BLOCK_K>(buffers + BLOCK_M * ROW, X_ROW, x, row_tile * BLOCK_M, col0, M, K);
    }
    asm volatile("cp.async.commit_group;");
    // One chunk of the bins (`begin_chunk`) a tile; the tile count also picks the load buffer.
    for (int tiles = 0; row_tile < row_tiles; row_tile += row_step, ++tiles) {
        const int slot = tiles % STAGES;
        const int row0 = (int)(row_tile * BLOCK_M);
        X_T* dy_tile = buffers + slot * BUFFER;
        X_T* x_tile = dy_tile + BLOCK_M * ROW;
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();  // this tile has landed; every thread is done with the other buffer and with xq_tile
        const long long next = row_tile + row_step;
        if (STAGES == 2 && next < row_tiles) {
            X_T* next_dy = buffers + (1 - slot) * BUFFER;
            stage<BLOCK_M, N_PAD>(next_dy, ROW, grad_y, next * BLOCK_M, 0, M, N);
            stage<BLOCK_M, BLOCK_K>(next_dy + BLOCK_M * ROW, X_ROW, x, next * BLOCK_M, col0, M, K);
        }
        asm volatile("cp.async.commit_group;");
        float c[M_TILES][J_TILES][4];
#pragma unroll
        for (int i = 0; i < M_TILES; ++i)
#pragma unroll
            for (int j = 0; j < J_TILES; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) c[i][j][e] = 0.0f;
#pragma unroll 4
        for (int kk = 0; kk < N_PAD; kk += 16) {
            unsigned int a[M_TILES][4], b[J_TILES / 2][4];
#pragma unroll
            for (int i = 0; i < M_TILES; ++i) load_a(a[i], dy_tile + (warp_m + i * 16) * ROW + kk, ROW);
            // B = W_q rows kk.. of the warp's 8·J_TILES columns, transposed by ldmatrix: two 8-column slices a load.
#pragma unroll
            for (int j = 0; j < J_TILES; j += 2)
                ldmatrix_transposed(b[j / 2], w_tile + (kk + block_row + 8 * (block_q & 1)) * X_ROW + warp_k + 8 * j + 8 * (block_q >> 1));
#pragma unroll
            for (int i = 0; i < M_TILES; ++i)
#pragma unroll
                for (int j = 0; j < J_TILES; j += 2) {
                    mma_16816(c[i][j], a[i], b[j / 2][0], b[j / 2][1]);
                    mma_16816(c[i][j + 1], a[i], b[j / 2][2], b[j / 2][3]);
                }
        }
        // v rounded to x's dtype (two values a conversion, as x_gradient rounds them), 0 past M and K (a
        // block-uniform branch: only edge tiles check their elements).
        float v[CHUNK];
#pragma unroll
        for (int e = 0; e < CHUNK; e += 2) {
            const unsigned int pair = narrow_pair((&c[0][0][0])[e], (&c[0][0][0])[e + 1]);
            v[e] = X_WIDEN((X_T)(pair & 0xFFFFu));
            v[e + 1] = X_WIDEN((X_T)(pair >> 16));
        }
        if (row0 + BLOCK_M > M || col0 + BLOCK_K > K) zero_outside(v, row0, col0, warp_m, warp_k, M, K);
        float bound = 0.0f;
#pragma unroll
        for (int e = 0; e < CHUNK; ++e) bound = chunk_bound(bound, v[e]);
        begin_chunk(acc, bound, tiles % CHUNKS_PER_SCALE == 0);
        if (acc.fixed) tile_elements<true>(v, x_tile, xq_tile, lookup, warp_m, warp_k, lo, inv_delta, acc);
        else tile_elements<false>(v, x_tile, xq_tile, lookup, warp_m, warp_k, lo, inv_delta, acc);
        __syncthreads();
        // ∂x out: the lane's vectors all read before the first store, so that their reads overlap (each store
        // waited on its own read, Nsight Compute, run 19); only edge tiles test their vectors.
        uint4 dx[BLOCK_M * BLOCK_K / 8 / THREADS];
        int vector = 0;
        for_each_vector<BLOCK_M, BLOCK_K>([&](int r, int c) { dx[vector++] = *reinterpret_cast<const uint4*>(x_tile + r * X_ROW + c); });
        const bool edge = row0 + BLOCK_M > M || col0 + BLOCK_K > K;
        vector = 0;
        for_each_vector<BLOCK_M, BLOCK_K>([&](int r, int c) {
            if (!edge || (row0 + r < M && col0 + c < K)) *reinterpret_cast<uint4*>(grad_x + (long long)(row0 + r) * K + col0 + c) = dx[vector];
            ++vector;
        });
        if (WEIGHT_GRADIENT) add_weight_gradient(dw, dy_tile, xq_tile);
        if (STAGES == 1 && next < row_tiles) {
            __syncthreads();
            stage<BLOCK_M, N_PAD>(dy_tile, ROW, grad_y, next * BLOCK_M, 0, M, N);
            stage<BLOCK_M, BLOCK_K>(x_tile, X_ROW, x, next * BLOCK_M, col0, M, K);
            asm volatile("cp.async.commit_group;");
        }
    }
    __syncthreads();
    flush(acc, bins, partial_sums, histogram, sums);
    if (WEIGHT_GRADIENT) {
        // This block's rows' share of dW[:, column tile] into its slice of the (row groups, N, K) partials.
        // Accumulator (s, j): rows g and g + 8 of the warp's 16-row slice s of N, columns 2t, 2t + 1 of its 8-column slice j.
        float* out = partial + (long long)(blockIdx.x / tiles_k) * N * K;
        const int warp_n = (warp % WARPS_N) * (16 * N_SLICES), warp_c = (warp / WARPS_N) * (8 * C_TILES);
#pragma unroll
        for (int s = 0; s < N_SLICES; ++s)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int n = warp_n + 16 * s + g + 8 * half;
                if (n >= N) continue;
#pragma unroll
                for (int j = 0; j < C_TILES; ++j) {
                    const int k = col0 + warp_c + 8 * j + 2 * t;
                    if (k < K)
                        *reinterpret_cast<float2*>(out + (long long)n * K + k) = make_float2(dw[s][j][2 * half], dw[s][j][2 * half + 1]);
                }
            }
    }
}
"""


def shared_bytes(contraction: int, stages: int, weight_gradient: bool = False, tile: ColumnTile = WIDE_TILE) -> int:
    """Dynamic shared memory of one block: the W_q columns, `stages` buffers of dY rows and x (padded rows),
    the per-warp bins; with the weight gradient the x_q tile and the level table."""
    row = padded_contraction(contraction, weight_gradient) + ROW_PAD
    w_rows = row - ROW_PAD
    x_row = tile.block_k + ROW_PAD
    tiles = (w_rows * x_row + stages * tile.block_m * (row + x_row)) * 2 + (THREADS // 32) * WARP_BINS_BYTES
    return tiles + (tile.block_m * x_row * 2 + 256 * 4 if weight_gradient else 0)


def default_stages(contraction: int, tile: ColumnTile = WIDE_TILE) -> int:
    """Double-buffer the loads where two buffers still leave room for three blocks an SM (N ≤ 128; N ≤ 64 with
    the narrow tile's 128-row buffers)."""
    return 2 if padded_contraction(contraction) * tile.block_m <= 128 * 64 else 1


def column_tile(K: int, contraction: int, weight_gradient: bool) -> ColumnTile:
    """NARROW_TILE for the pass with ∂W_q where K ≤ 32 and its accumulators split into even column slices
    (N > 32: four warps along N), WIDE_TILE otherwise."""
    narrow = weight_gradient and K <= NARROW_TILE.block_k and padded_contraction(contraction, True) >= 64
    return NARROW_TILE if narrow else WIDE_TILE


def padded_contraction(contraction: int, weight_gradient: bool = False) -> int:
    """N rounded up to the v product's 16-deep steps or, with the weight gradient, to whole 16-row slices of N
    for every warp along N: two warps up to N = 32, four beyond (`weight_gradient_layout`)."""
    multiple = (32 if contraction <= 32 else 64) if weight_gradient else 16
    return -(-contraction // multiple) * multiple


def weight_gradient_layout(contraction: int, block_k: int = WIDE_TILE.block_k) -> tuple[int, int, int]:
    """(warps along N, 16-row slices of N a warp, 8-column slices a warp) of a block's ∂W_q accumulators for a
    padded contraction: N × block_k float32 over the block's eight warps."""
    warps_n = min(contraction // 16, 4)
    return warps_n, contraction // (16 * warps_n), block_k // 8 // (THREADS // 32 // warps_n)


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


def min_blocks(weight_gradient: bool, contraction: int) -> int:
    """Resident blocks an SM the launch bounds ask for, which the persistent grid is sized by: fewer where a
    thread holds more of ∂W_q (N/4 float32 accumulators)."""
    if not weight_gradient:
        return MIN_BLOCKS
    return WEIGHT_GRADIENT_MIN_BLOCKS if contraction <= 64 else WIDE_WEIGHT_GRADIENT_MIN_BLOCKS


def kernel_source(dtype: torch.dtype, contraction: int, stages: int, weight_gradient: bool,
                  tile: ColumnTile = WIDE_TILE) -> str:
    """The CUDA source of the kernel for one dtype, padded contraction, number of load buffers, with or without
    the weight gradient and one column tile."""
    # Without the weight gradient the layout is unused; N = 64's keeps its (compiled, never called) code valid.
    warps_n, n_slices, c_tiles = weight_gradient_layout(contraction if weight_gradient else 64, tile.block_k)
    header = element_math_header(dtype, torch.float32, THREADS, integer_bins=True) + defines(
        BLOCK_M=tile.block_m, BLOCK_K=tile.block_k, M_TILES=tile.m_tiles, J_TILES=tile.j_tiles,
        MIN_BLOCKS=min_blocks(weight_gradient, contraction), N_PAD=contraction, ROW=contraction + ROW_PAD,
        X_ROW=tile.block_k + ROW_PAD, STAGES=stages, WEIGHT_GRADIENT=int(weight_gradient), WARPS_N=warps_n,
        N_SLICES=n_slices, C_TILES=c_tiles, MMA_TYPE=mma_type(dtype))
    return header + ELEMENT_MATH + TILE_HELPERS + QUANTIZE_TILE + KERNEL


@functools.lru_cache(maxsize=None)
def compiled_kernel(dtype: torch.dtype, contraction: int, stages: int, weight_gradient: bool, device_index: int,
                    tile: ColumnTile = WIDE_TILE):
    """`kernel_source`'s kernel loaded on one device, its shared memory opted in."""
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(kernel_source(dtype, contraction, stages, weight_gradient, tile),
                                            "ddq_backward_input_shared")
        kernel.set_shared_memory_config(shared_bytes(contraction, stages, weight_gradient, tile))
        prefer_shared_memory(kernel)
    return kernel


def resident_grid(M: int, K: int, block_bytes: int, blocks_per_sm: int, device: torch.device,
                  tile: ColumnTile = WIDE_TILE) -> int:
    """A persistent grid: as many blocks as fit on the card at once (registers allow `blocks_per_sm`, shared
    memory may allow fewer), rounded down to a multiple of the column tiles, at most one block a row tile."""
    properties = torch.cuda.get_device_properties(device)
    per_sm_bytes = getattr(properties, "shared_memory_per_multiprocessor", 0)
    per_sm = min(blocks_per_sm, per_sm_bytes // (block_bytes + 1024)) if per_sm_bytes else blocks_per_sm
    tiles_k = -(-K // tile.block_k)
    return max(1, min(-(-M // tile.block_m), max(1, per_sm) * properties.multi_processor_count // tiles_k)) * tiles_k


def check_call(name: str, grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, stages: int | None,
               tile: ColumnTile) -> int:
    """A clear error for a call outside the kernel's scope; the number of load buffers to use."""
    if not supports(grad_y, w_q, x):
        raise ValueError(f"{name}: unsupported call (dtypes {grad_y.dtype}, {w_q.dtype}, {x.dtype}; "
                         f"x {tuple(x.shape)}, W_q {tuple(w_q.shape)}; needs 16-bit CUDA tensors of one dtype, "
                         f"N ≤ {MAX_CONTRACTION} and N, K multiples of 8, dense 16-byte aligned rows, M and K < 2^31)")
    stages = default_stages(w_q.shape[0], tile) if stages is None else stages
    if stages not in (1, 2):
        raise ValueError(f"{name}: stages must be 1 or 2, got {stages}")
    return stages


def launch(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, stages: int,
           weight_gradient: tuple | None, tile: ColumnTile, bins: Bins | None) -> tuple[torch.Tensor, ...]:
    M, K = x.shape
    N = w_q.shape[0]
    grad_x = torch.empty_like(x)
    histogram, sums = output_bins(1, x.device, bins)
    with_weight_gradient = weight_gradient is not None
    contraction = padded_contraction(N, with_weight_gradient)
    kernel = compiled_kernel(x.dtype, contraction, stages, with_weight_gradient, x.device.index, tile)
    block_bytes = shared_bytes(N, stages, with_weight_gradient, tile)
    grid = resident_grid(M, K, block_bytes, min_blocks(with_weight_gradient, contraction), x.device, tile)
    if not with_weight_gradient:
        table, logits, min_bits, partial = histogram, histogram, 0, histogram  # not read by this variant
    else:
        table, logits, min_bits = weight_gradient
        table, logits = table.contiguous(), logits.contiguous()
        partial = torch.empty(grid // -(-K // tile.block_k), N, K, device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device):
        kernel(grid=(grid, 1, 1), block=(THREADS, 1, 1), shared_mem=block_bytes,
               args=[grad_y, w_q.contiguous(), x, grad_x, lo.contiguous(), hi.contiguous(), histogram, sums, table,
                     logits, partial, M, N, K, min_bits])
    grads = (grad_x, histogram, sums[:, 0], sums[:, 1])
    return grads + (partial,) if with_weight_gradient else grads


def linear_backward_input_shared(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor,
                                 hi: torch.Tensor, stages: int | None = None, bins: Bins | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §3 for the activation: (∂x = (dY·W_q)·in, histogram (1, 256), Σv·u·in (1,), Σv·(1 − in) (1,)).

    x (M, K), dY (M, N), W_q (N, K) on one CUDA device, within `supports`. `stages` (1 or 2 load buffers)
    overrides `default_stages`, for the probes. `bins` (zeroed, see `quantize_backward.output_bins`) receives
    the histogram and the sums instead of new tensors.
    """
    stages = check_call("linear_backward_input_shared", grad_y, w_q, x, stages, WIDE_TILE)
    return launch(grad_y, w_q, x, lo, hi, stages, None, WIDE_TILE, bins)


def linear_backward_shared(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                           table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int, stages: int | None = None,
                           tile: ColumnTile | None = None, bins: Bins | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`linear_backward_input_shared`'s four results and ∂W_q = dYᵀ·Q_x(x) (N, K) float32 from the same pass
    over x (spec §2 for Q_x, with `level_table`'s table; the x_q of `linear_backward_weight_cuda`).

    Within `supports`. ∂W_q is summed over the grid's row groups in a fixed order. `tile` overrides
    `column_tile`'s choice, for the tests and probes.
    """
    *reductions, parts = linear_backward_shared_parts(grad_y, w_q, x, lo, hi, table, gate_logits, min_bits, stages,
                                                      tile, bins)
    return (*reductions, parts.sum(0))


def linear_backward_shared_parts(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor,
                                 hi: torch.Tensor, table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int,
                                 stages: int | None = None, tile: ColumnTile | None = None, bins: Bins | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`linear_backward_shared` with ∂W_q left as the grid's row groups' partial sums, (P, N, K) float32, for
    `weight_reductions` to add in a fixed order within the weight quantizer's element pass."""
    tile = column_tile(x.shape[1], w_q.shape[0], True) if tile is None else tile
    if tile == NARROW_TILE and padded_contraction(w_q.shape[0], True) < 64:
        raise ValueError("linear_backward_shared: the narrow tile needs N > 32 (four warps along N)")
    stages = check_call("linear_backward_shared", grad_y, w_q, x, stages, tile)
    return launch(grad_y, w_q, x, lo, hi, stages, (table, gate_logits, min_bits), tile, bins)
