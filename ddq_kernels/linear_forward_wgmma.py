"""DDQLinear forward GEMM on Hopper's warpgroup MMA (wgmma), the activation quantizer in its operand staging.

The same op as `linear_forward` and `linear_forward_cuda` (spec §2; reference: F.linear(quantize_reference(x),
W_q, bias)), for sm_90 (H100, H200). `linear_forward_cuda` multiplies with mma.sync, whose operands every warp
loads from shared memory into registers (ldmatrix) before each product; on 25088×1024×256 it ran at ~180 TFLOP/s
where cuBLAS's sm_90 kernel runs at ~580 (run 22). Here the tensor cores read both operands from shared memory
themselves (`wgmma.mma_async`, asynchronous): each block owns BLOCK_M = 128 rows of y and all its N ≤ MAX_N
columns, as two warpgroups of 64 rows × N; x moves through registers (`cuda_tiles.load_vectors`) and is quantized
on its way into one of X_SLOTS shared-memory slots, W_q moves by cp.async through W_SLOTS; both lie in the
128-byte-swizzled layout that wgmma reads (rows of BLOCK_K = 64 16-bit elements; the 16-byte vector c of row r
at position c ^ (r mod 8), so that the eight vectors a quarter-warp stores into one row hit distinct banks).

A chunk's products run while the block stores the next x chunk and loads the one after: the x slot a store
overwrites was read by the products of two chunks before, which each warpgroup has waited for
(`wgmma.wait_group 1`) before the barrier that precedes the store; W_q is staged two chunks ahead into the slot
of chunk − 2 for the same reason. Writes by ordinary stores and cp.async reach wgmma's (async) proxy through
`fence.proxy.async` before that barrier. The float32 sums run in another order than mma.sync's, so y can differ
from `linear_forward_cuda`'s by one unit in its last place after rounding to x's dtype.

Measured (H200, GPU time, run 25, docs/kernels.md): 50176×576×96 (MobileNetV2's 576 → 96 projection at batch 256)
36 µs against 42 for `linear_forward_cuda` and 51 for UNFUSED; within 6 % of the better of those on 100352×192×32,
401408×576×64 and 12544×960×160; on 25088×1024×256 63 µs against UNFUSED's 51. There, without W_q's copies,
x's DRAM reads and the products all at once, it still took 38 µs (`benchmarks/probe_wgmma_ablations.py`): at
N = 256 a thread holds 128 accumulators, one block of 8 warps fits an SM, and quantizing a chunk into the tiles is
bound by latency on them. Two ways round that measured slower (run 26): splitting the columns between more
warpgroups, and producer/consumer warp specialization. ptxas allocates the whole kernel's registers within the
launch bounds, so at N = 256 (154 registers a consumer thread) one producer warpgroup of 4 warps fits beside the
two consumers, fewer quantizing warps than here.

Scope: `linear_forward_cuda`'s (16-bit x and W_q of one dtype, N ≤ 256, N and K multiples of 8, dense 16-byte
aligned rows, M and K < 2^31) on a device of compute capability 9.0, compiled for sm_90a (`supports`).
`linear_forward` offers it as one more candidate to `fastest_config`.
"""

from __future__ import annotations

import functools

import torch

from ddq_kernels.cuda_tiles import QUANTIZE_TILE, TILE_HELPERS, defines, mma_type, prefer_shared_memory
from ddq_kernels.linear_forward_cuda import MAX_N, supports as cuda_tiles_supports
from ddq_kernels.shared_histogram import ELEMENT_MATH, element_math_header

BLOCK_M = 128  # two warpgroups of 64 rows
BLOCK_K = 64  # 128 bytes of 16-bit values: one swizzle row
THREADS = 256
X_SLOTS = 3
W_SLOTS = 4
ALIGNMENT = 1024  # bytes: a swizzle atom (8 rows of 128 bytes) starts on it

KERNEL = r"""
// Byte offset of the 16-byte vector at (row, column) in a tile of 128-byte rows, 128-byte swizzled.
__device__ __forceinline__ unsigned int swizzled(int row, int column) {
    return row * 128 + ((((column >> 3) ^ row) & 7) << 4);
}

// The shared-memory matrix descriptor of a K-major tile at `address` (1024-byte aligned, plus 32 bytes per
// k16 step into it) in the 128-byte swizzle mode: 8-row groups 1024 bytes apart.
__device__ __forceinline__ unsigned long long tile_descriptor(unsigned int address) {
    return (unsigned long long)((address & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32)
           | (1ull << 62);
}

// The fragment registers must not move while a wgmma that writes them is in flight.
__device__ __forceinline__ void fence_accumulators(float (&acc)[ACCUMULATORS]) {
#pragma unroll
    for (int i = 0; i < ACCUMULATORS; ++i) asm volatile("" : "+f"(acc[i]) :: "memory");
}

// A ROWS × 64 block at (first_row, first_column) of a (total_rows, row_length) row-major matrix into a swizzled
// tile by cp.async, zero outside the matrix; a row's eight vectors go to eight consecutive threads.
template <int ROWS>
__device__ __forceinline__ void stage_swizzled(unsigned int tile, const X_T* __restrict__ global, long long first_row,
                                               int first_column, long long total_rows, int row_length) {
    const int r = threadIdx.x / 8, c = (threadIdx.x % 8) * 8;
    const bool column_inside = first_column + c < row_length;
#pragma unroll
    for (int row = r; row < ROWS; row += THREADS / 8) {
        const bool inside = column_inside && first_row + row < total_rows;
        copy_vector(tile + swizzled(row, c),
                    (unsigned long long)(inside ? global + (first_row + row) * row_length + first_column + c : global), inside);
    }
}

// `load_vectors`' BLOCK_M × 64 chunk of x quantized into a swizzled tile.
__device__ __forceinline__ void store_quantized_swizzled(unsigned char* tile, const TileVectors<BLOCK_M, BLOCK_K>& chunk,
                                                         Levels levels, float lo, float inv_delta) {
    using Tile = TileVectors<BLOCK_M, BLOCK_K>;
    const int r = threadIdx.x / Tile::PER_ROW, c = (threadIdx.x % Tile::PER_ROW) * 8;
#pragma unroll
    for (int i = 0; i < Tile::COUNT; ++i)
        *reinterpret_cast<uint4*>(tile + swizzled(r + i * Tile::ROWS_PER_PASS, c)) =
            quantize_vector(chunk.words[i], levels, lo, inv_delta);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
ddq_linear_forward_wgmma(const X_T* __restrict__ x, const X_T* __restrict__ w_q, const float* __restrict__ bias,
                         X_T* __restrict__ y, const float* __restrict__ lo_ptr, const float* __restrict__ hi_ptr,
                         const float* __restrict__ table, const float* __restrict__ logits,
                         int M, int N, int K, int min_bits, int has_bias) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    const unsigned int unaligned = (unsigned int)__cvta_generic_to_shared(shared_bytes);
    unsigned char* base = shared_bytes + ((ALIGNMENT - unaligned % ALIGNMENT) % ALIGNMENT);
    unsigned char* x_slots = base;
    unsigned char* w_slots = x_slots + X_SLOTS * X_SLOT_BYTES;
    float* levels = reinterpret_cast<float*>(w_slots + W_SLOTS * W_SLOT_BYTES);
    const unsigned int x_address = (unsigned int)__cvta_generic_to_shared(x_slots);
    const unsigned int w_address = (unsigned int)__cvta_generic_to_shared(w_slots);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warpgroup = warp / 4, g = lane / 4, t = lane % 4;
    const long long row0 = (long long)blockIdx.x * BLOCK_M;
    const float lo = lo_ptr[0];
    const float inv_delta = 1.0f / ((hi_ptr[0] - lo) / 255.0f);
    const Levels lookup = load_levels(levels, table, logits, min_bits);
    const int chunks = (K + BLOCK_K - 1) / BLOCK_K;
    const auto stage_weights = [&](int chunk) {
        if (chunk < chunks) stage_swizzled<N_PAD>(w_address + (chunk % W_SLOTS) * W_SLOT_BYTES, w_q, 0, chunk * BLOCK_K, N, K);
        asm volatile("cp.async.commit_group;");
    };
    TileVectors<BLOCK_M, BLOCK_K> x_ahead;
    const auto load_x = [&](int chunk) {
        if (chunk < chunks) load_vectors(x_ahead, x, row0, chunk * BLOCK_K, M, K);
    };
    stage_weights(0);
    stage_weights(1);
    load_x(0);
    __syncthreads();  // the level table
    store_quantized_swizzled(x_slots, x_ahead, lookup, lo, inv_delta);
    load_x(1);
    // No instruction but wgmma writes the accumulators (ptxas serializes the products otherwise): the first
    // product overwrites them.
    float acc[ACCUMULATORS];
    for (int chunk = 0; chunk < chunks; ++chunk) {
        // W_q's chunk has landed and this thread's stores of x's chunk reach the async proxy; after the barrier
        // every thread's do, and both warpgroups are done with chunk − 2's products.
        asm volatile("cp.async.wait_group 1;\n\tfence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        // Into the slot of chunk − 2.
        stage_weights(chunk + 2);
        const unsigned long long a = tile_descriptor(x_address + (chunk % X_SLOTS) * X_SLOT_BYTES + warpgroup * 64 * 128);
        const unsigned long long b = tile_descriptor(w_address + (chunk % W_SLOTS) * W_SLOT_BYTES);
        fence_accumulators(acc);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int step = 0; step < BLOCK_K / 16; ++step) wgmma_k16(acc, a + 2 * step, b + 2 * step, chunk > 0 || step > 0);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        fence_accumulators(acc);
        // Into the slot of chunk − 2, while the products run.
        if (chunk + 1 < chunks)
            store_quantized_swizzled(x_slots + (chunk + 1) % X_SLOTS * X_SLOT_BYTES, x_ahead, lookup, lo, inv_delta);
        load_x(chunk + 2);
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        fence_accumulators(acc);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_accumulators(acc);
    // Accumulator 4j + e: rows g (e < 2) and g + 8 of the warp's 16 rows, columns 8j + 2t + e % 2.
    const long long warp_row = row0 + warpgroup * 64 + (warp % 4) * 16 + g;
#pragma unroll
    for (int j = 0; j < N_PAD / 8; ++j) {
        const int col = j * 8 + 2 * t;
        if (col >= N) continue;
        const float bias0 = has_bias ? bias[col] : 0.0f, bias1 = has_bias ? bias[col + 1] : 0.0f;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const long long row = warp_row + 8 * half;
            if (row < M)
                *reinterpret_cast<unsigned int*>(y + row * N + col) =
                    narrow_pair(acc[4 * j + 2 * half] + bias0, acc[4 * j + 2 * half + 1] + bias1);
        }
    }
}
"""


def padded_n(n: int) -> int:
    """N rounded up to a multiple of 8, the wgmma shape's column step."""
    return -(-n // 8) * 8


def wgmma_product(n_pad: int, dtype: torch.dtype) -> str:
    """`wgmma_k16`: one m64 × n_pad × k16 product of two shared-memory tiles added to the float32 accumulators, or
    written over them where `accumulate` is 0."""
    count = n_pad // 2
    registers = ", ".join(f"%{i}" for i in range(count))
    outputs = ", ".join(f'"+f"(acc[{i}])' for i in range(count))
    kind = mma_type(dtype).strip('"')
    return (
        "__device__ __forceinline__ void wgmma_k16(float (&acc)[ACCUMULATORS], unsigned long long a, unsigned long long b,\n"
        "                                          int accumulate) {\n"
        f'    asm volatile("{{\\n\\t.reg .pred accumulate;\\n\\tsetp.ne.b32 accumulate, %{count + 2}, 0;\\n\\t"\n'
        f'                 "wgmma.mma_async.sync.aligned.m64n{n_pad}k16.f32.{kind}.{kind} "\n'
        f'                 "{{{registers}}}, %{count}, %{count + 1}, accumulate, 1, 1, 0, 0;\\n\\t}}"\n'
        f'                 : {outputs}\n'
        '                 : "l"(a), "l"(b), "r"(accumulate));\n'
        "}\n")


def shared_bytes(n: int) -> int:
    """X_SLOTS x chunks, W_SLOTS W_q chunks, the 256-entry level table, and the slack to align the first tile."""
    return X_SLOTS * BLOCK_M * 128 + W_SLOTS * padded_n(n) * 128 + 256 * 4 + ALIGNMENT


def supports(x: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether this kernel can run the call (see the module docstring for the scope)."""
    return cuda_tiles_supports(x, w_q) and has_wgmma(x.device)


def has_wgmma(device: torch.device) -> bool:
    """Whether the CUDA device is one this kernel is compiled for (compute capability 9.0, sm_90a)."""
    return torch.cuda.get_device_capability(device) == (9, 0)


def kernel_source(dtype: torch.dtype, n: int) -> str:
    """The CUDA source of the kernel for one dtype and N."""
    n_pad = padded_n(n)
    header = element_math_header(dtype, dtype, THREADS) + defines(
        MMA_TYPE=mma_type(dtype), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, N_PAD=n_pad, ACCUMULATORS=n_pad // 2,
        X_SLOTS=X_SLOTS, W_SLOTS=W_SLOTS, X_SLOT_BYTES=BLOCK_M * 128, W_SLOT_BYTES=n_pad * 128, ALIGNMENT=ALIGNMENT)
    return header + ELEMENT_MATH + TILE_HELPERS + QUANTIZE_TILE + wgmma_product(n_pad, dtype) + KERNEL


@functools.lru_cache(maxsize=None)
def compiled_kernel(dtype: torch.dtype, n: int, device_index: int):
    """`kernel_source`'s kernel loaded on one device, for sm_90a (wgmma), its shared memory opted in."""
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(kernel_source(dtype, n), "ddq_linear_forward_wgmma", compute_capability="90a")
        kernel.set_shared_memory_config(shared_bytes(n))
        prefer_shared_memory(kernel)
    return kernel


def linear_forward_wgmma(x: torch.Tensor, w_q: torch.Tensor, bias: torch.Tensor | None, lo: torch.Tensor,
                         hi: torch.Tensor, table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int) -> torch.Tensor:
    """Spec §2: y = Q_x(x) · W_qᵀ + bias for x (M, K), W_q (N, K), per-tensor activation parameters and
    `level_table`'s (1, 256) table, on one CUDA device of compute capability 9.0, within `supports`."""
    if not supports(x, w_q):
        raise ValueError(f"linear_forward_wgmma: unsupported call (x {x.dtype} {tuple(x.shape)} on {x.device}, W_q "
                         f"{w_q.dtype} {tuple(w_q.shape)}; needs 16-bit CUDA tensors of one dtype on a compute "
                         f"capability 9.0 device, N ≤ {MAX_N} and N, K multiples of 8, dense 16-byte aligned rows, "
                         "M and K < 2^31)")
    M, K = x.shape
    N = w_q.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bias_values = bias.float().contiguous() if bias is not None else table
    kernel = compiled_kernel(x.dtype, N, x.device.index)
    with torch.cuda.device(x.device):
        kernel(grid=(-(-M // BLOCK_M), 1, 1), block=(THREADS, 1, 1), shared_mem=shared_bytes(N),
               args=[x, w_q, bias_values, y, lo.contiguous(), hi.contiguous(), table.contiguous(),
                     gate_logits.contiguous(), M, N, K, min_bits, int(bias is not None)])
    return y
