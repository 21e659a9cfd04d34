"""Spec §5 small-M GEMV (M ≤ 16) over 4-bit packed weights, decoded straight into mma fragments (CUDA C).

The in-load Triton kernel (`int_gemm._inload_nibble_dot_kernel`) decodes a packed word into two words of
four int8 levels (ddq_kernels/nibble_ptx.py), but then has to transpose bytes across four words before
`tl.dot` takes them (~25 integer instructions per 8 weights, 48 % of copy bandwidth at M = 16 on H100,
docs/deploy.md). Here the weights are the A operand of `mma.sync.m16n8k32` (int8 × int8 or uint8 → int32),
whose fragment gives thread t of a quad the bytes k = 4t..4t+3 (registers a0/a1) and 16 + 4t..16 + 4t + 3
(a2/a3) of rows g and g + 8. A dot product does not care which k meets which as long as weights and
activations agree, so the kernel relabels k: in a step of 128 codes, sub-step i of thread t takes as its
"fragment k" 4t..4t+3 the natural k = 32t + 8i .. + 3 and as 16 + 4t.. the next four. Then one packed
int32 word (codes 32t + 8i .. + 7, spec §5 nibble order) decodes by three-`prmt` groups straight into a0 and
a2 (codes 0-3 and 4-7 of the word): no transpose. Each thread streams 16 contiguous bytes of each of its rows
per step (lanes t = 0..3 of a quad: 64 contiguous bytes) and the 32 contiguous activation bytes k = 32t ..
32t + 31 that meet them.

Work split: a warp owns 16·ROW_TILES weight rows. A block has WARPS_N warps on different rows that walk the
same K steps, so their activation loads hit L1 after the first, and WARPS_K warps per row
group that interleave K steps and add their partial sums in shared memory. Blocks split K further where the
row blocks alone do not fill the GPU (then int32 atomics, exact in any order, and `int_gemm`'s
requantisation kernel; otherwise the spec §5 epilogue runs here, in int64). Weights and activations run
STAGES steps ahead through a per-thread cp.async ring in shared memory: each thread reads back only what it
copied itself, so the ring needs no barrier. The activations are copied with cp.async.ca, which keeps them
in L1 for the other warps of the SM: measured on H100 (docs/deploy.md), cp.async.cg (L1 bypassed) made the
kernel L2-bound (124 µs against 74 µs). The defaults are the fastest of the variants measured there.

Inputs: packed weights uint8 [N, row_bytes] with row_bytes a multiple of 4 (codes past K in the last word,
and words past row_bytes in the last step, meet zero activations), the LUT as int32 words [N, 4]
(`int_gemm.nibble_lut_words`), activations already decoded (lut_x[codes_x], int8 or uint8, zero from K to
the padded row length `padded_row(K)`). Compiled by NVRTC (`torch.cuda._compile_kernel`) per variant;
`available()` says whether this process can. Reference: `ddq.deploy.int_gemm.int_gemm_numpy` (bit-exact;
tests/test_int_gemm_gpu.py).
"""

from __future__ import annotations

import functools
import warnings

import torch

ROW_TILES = 2  # 16-row mma tiles per warp: 32 rows share each activation fragment
WARPS_N = 1  # warps of a block on different rows (same K steps: their activation loads hit L1)
WARPS_K = 8  # warps of a block on the same rows, interleaving K steps (partial sums added in shared memory)
STAGES = 2  # steps in flight per warp (cp.async ring)
L2_PREFETCH = 256  # bytes the L2 fetches per weight miss (cp.async's .L2::128B / .L2::256B hint; 0: none)
STEP_CODES = 128  # codes of a row per warp step (4 mma sub-steps of 32)

SOURCE = r"""
#define WARPS (WARPS_N * WARPS_K)
#define ROWS_PER_WARP (16 * ROW_TILES)
#define ROWS_PER_BLOCK (ROWS_PER_WARP * WARPS_N)
#define W_SLOTS (ROW_TILES * 2)  // ring slots (16 bytes per lane) of one step's weights
#define SLOTS (W_SLOTS + M_TILES * 2)  // and of its activations

__device__ __forceinline__ unsigned int prmt(unsigned int a, unsigned int b, unsigned int select) {
    // PTX prmt rather than __byte_perm: the intrinsic masks every selector to 3 bits first (extra LOP3s per
    // word in the SASS); these selectors never have bit 3 set.
    unsigned int d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(select));
    return d;
}

__device__ __forceinline__ void decode_word(unsigned int word, const unsigned int (&lut)[4],
                                            unsigned int& low, unsigned int& high) {
    // Levels of codes 0-3 (low) and 4-7 (high) of one packed word; prmt reads the low 16 bits of a selector.
    const unsigned int select = word & 0x77777777u;
    const unsigned int pick = ((word >> 1) & 0x44444444u) | 0x32103210u;
    low = prmt(prmt(lut[0], lut[1], select), prmt(lut[2], lut[3], select), pick);
    high = prmt(prmt(lut[0], lut[1], select >> 16), prmt(lut[2], lut[3], select >> 16), pick >> 16);
}

__device__ __forceinline__ void mma(int (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2, unsigned int a3,
                                    unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8." X_TYPE ".s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned int word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void copy_async(unsigned int target, const unsigned char* source) {
    asm volatile("cp.async.cg.shared.global" L2_PREFETCH " [%0], [%1], 16;" :: "r"(target), "l"(source) : "memory");
}

__device__ __forceinline__ void copy_tail_async(unsigned int target, const unsigned char* row, int byte, int row_bytes,
                                                int aligned) {
    // One thread's 16 bytes of a row in the last step: bytes past the row's end are zero-filled (a size below
    // the copy's reads only that many bytes).
    if (aligned) {  // rows of whole 16-byte vectors: a vector is all in or all out
        const int size = byte + 16 <= row_bytes ? 16 : 0;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(target), "l"(size ? row + byte : row), "r"(size)
                     : "memory");
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int size = byte + 4 * i + 4 <= row_bytes ? 4 : 0;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(target + 4 * i), "l"(size ? row + byte + 4 * i : row),
                     "r"(size) : "memory");
    }
}

__device__ __forceinline__ void issue_step(unsigned int slots, const unsigned char* const (&rows)[ROW_TILES][2],
                                           const unsigned char* const (&x_rows)[M_TILES], int step, int t,
                                           int row_bytes, int aligned) {
    // slots: the shared address of this lane's first slot of the step (slots are 32 lanes × 16 bytes apart).
    const int byte = step * (STEP_CODES / 2) + 16 * t;
    if (aligned && (step + 1) * (STEP_CODES / 2) <= row_bytes) {  // every lane's 16 bytes lie inside the rows
#pragma unroll
        for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h) copy_async(slots + (2 * r + h) * 512, rows[r][h] + byte);
    } else {
#pragma unroll
        for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h) copy_tail_async(slots + (2 * r + h) * 512, rows[r][h], byte, row_bytes, aligned);
    }
    // Activations through L1 (cp.async.ca): the other warps of the SM read the same bytes. (Through
    // cp.async.cg, which bypasses L1, the kernel was L2-bound: docs/deploy.md.)
    const int x_byte = step * STEP_CODES + 32 * t;
#pragma unroll
    for (int c = 0; c < M_TILES; ++c)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            asm volatile("cp.async.ca.shared.global [%0], [%1], 16;"
                         :: "r"(slots + (W_SLOTS + 2 * c + j) * 512), "l"(x_rows[c] + x_byte + 16 * j) : "memory");
}

__device__ __forceinline__ void multiply_step(const uint4* slots, const unsigned int (&lut)[ROW_TILES][2][4],
                                              int (&acc)[ROW_TILES][M_TILES][4]) {
    uint4 x[M_TILES][2];
#pragma unroll
    for (int c = 0; c < M_TILES; ++c)
#pragma unroll
        for (int j = 0; j < 2; ++j) x[c][j] = slots[(W_SLOTS + 2 * c + j) * 32];
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r) {
        const uint4 row_g = slots[(2 * r) * 32], row_g8 = slots[(2 * r + 1) * 32];
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // sub-step i: this thread's activation bytes 8i .. 8i + 7
            unsigned int low_g, high_g, low_g8, high_g8;
            decode_word(word_of(row_g, i), lut[r][0], low_g, high_g);
            decode_word(word_of(row_g8, i), lut[r][1], low_g8, high_g8);
#pragma unroll
            for (int c = 0; c < M_TILES; ++c) {
                const uint4& xs = x[c][i >> 1];
                mma(acc[r][c], low_g, low_g8, high_g, high_g8, (i & 1) ? xs.z : xs.x, (i & 1) ? xs.w : xs.y);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
ddq_nibble_mma_gemv(const unsigned char* __restrict__ weights, const unsigned int* __restrict__ lut_words,
                    const unsigned char* __restrict__ x, const int* __restrict__ mult,
                    const long long* __restrict__ offset, const int* __restrict__ i_min,
                    int* __restrict__ acc_out, unsigned char* __restrict__ codes_out,
                    int M, int N, int row_bytes, int x_row, int steps, int steps_per_split,
                    int shift, int drop_bits, int atomic) {
    extern __shared__ uint4 shared[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int warp_n = warp % WARPS_N, warp_k = warp / WARPS_N;
    const int g = lane >> 2, t = lane & 3;
    const int first_row = blockIdx.x * ROWS_PER_BLOCK + warp_n * ROWS_PER_WARP;
    const int aligned = (row_bytes % 16 == 0) && ((unsigned long long)weights % 16 == 0);

    const unsigned char* rows[ROW_TILES][2];
    unsigned int lut[ROW_TILES][2][4];
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = min(first_row + 16 * r + 8 * h + g, N - 1);  // rows past N are read, never stored
            rows[r][h] = weights + (long long)n * row_bytes;
#pragma unroll
            for (int q = 0; q < 4; ++q) lut[r][h][q] = __ldg(lut_words + 4 * n + q);
        }
    const unsigned char* x_rows[M_TILES];
#pragma unroll
    for (int c = 0; c < M_TILES; ++c) x_rows[c] = x + (long long)min(8 * c + g, M - 1) * x_row;

    int acc[ROW_TILES][M_TILES][4];
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
        for (int c = 0; c < M_TILES; ++c)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[r][c][q] = 0;

    const int begin = blockIdx.y * steps_per_split + warp_k;
    const int end = min(steps, (blockIdx.y + 1) * steps_per_split);
    const int count = begin < end ? (end - begin + WARPS_K - 1) / WARPS_K : 0;
    // Each thread streams its own 16-byte pieces of weights and activations through a STAGES-deep ring
    // (cp.async) and reads back only what it copied itself, so the ring needs no barrier.
    uint4* ring = shared + warp * STAGES * SLOTS * 32 + lane;
    const unsigned int ring_shared = (unsigned int)__cvta_generic_to_shared(ring);
#pragma unroll
    for (int p = 0; p < STAGES; ++p) {
        if (p < count) issue_step(ring_shared + p * SLOTS * 512, rows, x_rows, begin + p * WARPS_K, t, row_bytes, aligned);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    int slot = 0;
    for (int i = 0; i < count; ++i) {
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
        multiply_step(ring + slot * SLOTS * 32, lut, acc);
        if (i + STAGES < count)
            issue_step(ring_shared + slot * SLOTS * 512, rows, x_rows, begin + (i + STAGES) * WARPS_K, t, row_bytes, aligned);
        asm volatile("cp.async.commit_group;" ::: "memory");
        slot = slot + 1 == STAGES ? 0 : slot + 1;
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();  // the rings are reused for the partial sums

    // The WARPS_K warps of a row group add their partial sums in shared memory; each then finishes every
    // WARPS_K-th entry.
    constexpr int ENTRIES = ROW_TILES * M_TILES * 4;
    int (*partial)[ENTRIES][32] = reinterpret_cast<int (*)[ENTRIES][32]>(shared);
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r)
#pragma unroll
        for (int c = 0; c < M_TILES; ++c)
#pragma unroll
            for (int q = 0; q < 4; ++q) partial[warp][(r * M_TILES + c) * 4 + q][lane] = acc[r][c][q];
    __syncthreads();
    const long long half = 1ll << (shift - 1);
    for (int e = warp_k; e < ENTRIES; e += WARPS_K) {
        int sum = 0;
        for (int k = 0; k < WARPS_K; ++k) sum += partial[k * WARPS_N + warp_n][e][lane];
        const int r = e / (M_TILES * 4), c = (e / 4) % M_TILES, q = e % 4;
        // mma accumulator layout: q = 0, 1 row g, columns 2t, 2t + 1; q = 2, 3 row g + 8.
        const int n = first_row + 16 * r + g + 8 * (q >> 1);
        const int m = 8 * c + 2 * t + (q & 1);
        if (n >= N || m >= M) continue;
        const long long out = (long long)m * N + n;
        if (atomic) { atomicAdd(acc_out + out, sum); continue; }
        const long long z = (long long)sum * mult[n] + offset[n];
        long long index = z < -half ? 0 : min((z + half) >> shift, 255ll);
        index = max(index, (long long)i_min[n]);
        acc_out[out] = sum;
        codes_out[out] = (unsigned char)(index >> drop_bits);
    }
}
"""


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this process can compile and run the kernel: a CUDA device of compute capability ≥ 8.0 (int8
    mma.sync, cp.async) and PyTorch's NVRTC wrapper; otherwise the Triton kernels serve."""
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")):
        return False
    if torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        compiled_kernel(2, True, ROW_TILES, WARPS_N, WARPS_K, STAGES, L2_PREFETCH, torch.cuda.current_device())
    except Exception as error:  # NVRTC missing or refusing: any failure means "use Triton instead"
        warnings.warn(f"ddq_kernels.nibble_mma_gemv: NVRTC kernel unavailable ({error}); using the Triton kernels")
        return False
    return True


def shared_bytes(m_tiles: int, row_tiles: int, warps: int, stages: int) -> int:
    """Dynamic shared memory: the rings, reused afterwards for the warps' partial sums."""
    return warps * max(stages * (row_tiles + m_tiles) * 2 * 32 * 16, row_tiles * m_tiles * 4 * 32 * 4)


def kernel_source(m_tiles: int, signed_x: bool, row_tiles: int, warps_n: int, warps_k: int, stages: int,
                  l2_prefetch: int) -> str:
    """The CUDA source of the kernel for M ≤ 8·m_tiles and int8 (signed_x) or uint8 activations."""
    min_blocks = max(1, 16 // (warps_n * warps_k))  # 16 warps per SM: at most 128 registers a thread
    header = (f"#define M_TILES {m_tiles}\n#define ROW_TILES {row_tiles}\n#define WARPS_N {warps_n}\n"
              f"#define WARPS_K {warps_k}\n#define STAGES {stages}\n#define STEP_CODES {STEP_CODES}\n"
              f"#define MIN_BLOCKS {min_blocks}\n#define X_TYPE \"{'s8' if signed_x else 'u8'}\"\n"
              f"#define L2_PREFETCH \"{f'.L2::{l2_prefetch}B' if l2_prefetch else ''}\"\n")
    return header + SOURCE


@functools.lru_cache(maxsize=None)
def compiled_kernel(m_tiles: int, signed_x: bool, row_tiles: int, warps_n: int, warps_k: int, stages: int,
                    l2_prefetch: int, device_index: int):
    """`kernel_source`'s kernel loaded on one device."""
    source = kernel_source(m_tiles, signed_x, row_tiles, warps_n, warps_k, stages, l2_prefetch)
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(source, "ddq_nibble_mma_gemv")
        size = shared_bytes(m_tiles, row_tiles, warps_n * warps_k, stages)
        if size >= 48 * 1024:
            kernel.set_shared_memory_config(size)
    return kernel


def padded_row(k: int) -> int:
    """The activation row length the kernel reads: K rounded up to whole steps."""
    return -(-k // STEP_CODES) * STEP_CODES


def splits_for(n: int, steps: int, device: torch.device, row_tiles: int = ROW_TILES, warps_n: int = WARPS_N,
               warps_k: int = WARPS_K) -> int:
    """K splits across blocks: 1 where the row blocks alone fill the resident slots (16 warps per SM; then
    the epilogue runs in the kernel), else enough to fill them (atomics and a requantisation pass)."""
    row_blocks = -(-n // (16 * row_tiles * warps_n))
    slots = max(1, 16 // (warps_n * warps_k)) * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-steps // warps_k), round(slots / row_blocks)))


def nibble_mma_gemv(x: torch.Tensor, lut_words: torch.Tensor, packed_w: torch.Tensor, mult: torch.Tensor,
                    offset: torch.Tensor, i_min: torch.Tensor, acc: torch.Tensor, codes: torch.Tensor,
                    shift: int, drop_bits: int, splits: int, row_tiles: int = ROW_TILES, warps_n: int = WARPS_N,
                    warps_k: int = WARPS_K, stages: int = STAGES, l2_prefetch: int = L2_PREFETCH) -> None:
    """Spec §5 acc = Σ_k x·w into acc int32 [M, N] and, with splits == 1, the output codes into codes; with
    splits > 1 acc must be zeroed and the caller requantises (`int_gemm._requantize_split_sums`).

    x: decoded activations int8/uint8 [M, padded_row(K)], zero past K; lut_words int32 [N, 4];
    packed_w uint8 [N, row_bytes] with row_bytes % 4 == 0; all contiguous on one CUDA device, M ≤ 16.
    """
    m, x_row = x.shape
    n, row_bytes = packed_w.shape
    if not 1 <= m <= 16 or x_row % STEP_CODES or row_bytes % 4 or x.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"nibble_mma_gemv: needs 1 <= M <= 16 (got {m}), an int8/uint8 activation row of whole "
                         f"{STEP_CODES}-code steps (got {x_row}, {x.dtype}) and packed rows of whole words "
                         f"(got {row_bytes} bytes)")
    steps = -(-row_bytes * 2 // STEP_CODES)
    if steps * STEP_CODES > x_row:
        raise ValueError(f"nibble_mma_gemv: the activation row ({x_row}) is shorter than the weights' {steps} steps")
    steps_per_split = -(-steps // splits)
    splits = -(-steps // steps_per_split)
    m_tiles = 1 if m <= 8 else 2
    kernel = compiled_kernel(m_tiles, x.dtype == torch.int8, row_tiles, warps_n, warps_k, stages, l2_prefetch,
                             x.device.index)
    with torch.cuda.device(x.device):  # the launcher uses the current device's current stream
        kernel(grid=(-(-n // (16 * row_tiles * warps_n)), splits, 1), block=(32 * warps_n * warps_k, 1, 1),
               args=[packed_w, lut_words, x, mult, offset, i_min, acc, codes, m, n, row_bytes, x_row, steps,
                     steps_per_split, shift, drop_bits, int(splits > 1)],
               shared_mem=shared_bytes(m_tiles, row_tiles, warps_n * warps_k, stages))
