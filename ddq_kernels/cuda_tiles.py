"""CUDA C building blocks of the NVRTC GEMMs (DDQ_SPEC.md §2): tile staging, fragments, the quantizer on a tile.

Shared by `linear_forward_cuda`, `linear_backward_weight_cuda` and `linear_backward_input_cuda`:
- `for_each_vector`: a thread's 16-byte vectors of a tile whose shape is a compile-time constant;
- `stage`: a ROWS × COLUMNS block of a row-major matrix into padded shared-memory rows with cp.async
  (16-byte vectors, zero outside the matrix);
- `ldmatrix`, `load_a`, `ldmatrix_transposed`, `mma_16816`: operand fragments of mma.sync m16n8k16 and the
  product itself (float32 accumulation); `narrow_pair`: two float32 values into one word of 16-bit values;
- `load_levels` and `quantize_tile`: spec §2 for a per-tensor activation quantizer applied in place to a
  staged tile. The bitwidth comes from the gate logits on the device, and `level_table`'s V is laid out in
  shared memory once per block, so quantizing an element costs one shared-memory load (of V[i >> (8 − b)])
  besides its arithmetic. Triton's quantize-in-load gathers the level from global memory (L1) instead,
  which made its fused forward 2.8× slower than its bytes allow.
  The element math is `fine_grid`'s: u = (x − lo)·(1/Δ), i = clamp(floor(u + 0.5), 0, 255) with NaN in
  cell 0, x_q = V + x·0 (NaN for a non-finite x), rounded to x's dtype for the tensor cores.
The source needs `element_math_header`'s #defines and `shared_histogram.ELEMENT_MATH`'s conversions.
"""

from __future__ import annotations

TILE_HELPERS = r"""
// Calls f(row, column) for each 16-byte vector of a ROWS × COLUMNS tile (COLUMNS a multiple of 8) that this
// thread handles, the vectors in row-major order, THREADS apart. Where a row's vectors divide THREADS, a
// thread's vectors share one column and lie whole rows apart, so their addresses differ by constants: computing
// row and column from each vector's index in a loop cost ~39 instructions a staged vector, a quarter of the
// forward's instructions (Nsight Compute, run 17).
template <int ROWS, int COLUMNS, typename F>
__device__ __forceinline__ void for_each_vector(F&& f) {
    constexpr int VECTORS_PER_ROW = COLUMNS / 8;
    if constexpr (THREADS % VECTORS_PER_ROW == 0) {
        constexpr int ROWS_PER_PASS = THREADS / VECTORS_PER_ROW;
        const int r = threadIdx.x / VECTORS_PER_ROW, c = (threadIdx.x % VECTORS_PER_ROW) * 8;
#pragma unroll
        for (int row = 0; row < ROWS; row += ROWS_PER_PASS)
            if (ROWS % ROWS_PER_PASS == 0 || r + row < ROWS) f(r + row, c);
    } else {
#pragma unroll
        for (int i = threadIdx.x; i < ROWS * VECTORS_PER_ROW; i += THREADS) f(i / VECTORS_PER_ROW, (i % VECTORS_PER_ROW) * 8);
    }
}

// A ROWS × COLUMNS block at (first_row, first_column) of a (total_rows, row_length) row-major matrix into
// shared rows of `pitch` elements, zero outside the matrix; asynchronous (cp.async, 16 bytes). row_length
// and first_column are multiples of 8.
template <int ROWS, int COLUMNS>
__device__ __forceinline__ void stage(X_T* shared, int pitch, const X_T* __restrict__ global, long long first_row,
                                      int first_column, long long total_rows, int row_length) {
    const X_T* corner = global + first_row * row_length + first_column;
    for_each_vector<ROWS, COLUMNS>([&](int r, int c) {
        const bool inside = first_row + r < total_rows && first_column + c < row_length;
        const unsigned int target = (unsigned int)__cvta_generic_to_shared(shared + r * pitch + c);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                     :: "r"(target), "l"(inside ? corner + (long long)r * row_length + c : global), "r"(inside ? 16 : 0));
    });
}

// Four (x4) or two (x2) 8 × 8 blocks of 16-bit values as they lie: lanes 8q..8q+7 give the rows of block q, and
// lane (g, t) receives elements (g, 2t) and (g, 2t + 1) of each block. One load for what took four (two) 32-bit
// loads a lane: the shared-memory wavefronts are the same, the instructions a quarter.
__device__ __forceinline__ void ldmatrix(unsigned int (&fragment)[4], const X_T* row) {
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3]) : "r"(address));
}

__device__ __forceinline__ void ldmatrix(unsigned int (&fragment)[2], const X_T* row) {
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(fragment[0]), "=r"(fragment[1]) : "r"(address));
}

// The A fragment of mma m16n8k16 for the 16 × 16 block of a row-major tile at `corner` (rows `pitch` apart).
__device__ __forceinline__ void load_a(unsigned int (&a)[4], const X_T* corner, int pitch) {
    const int lane = threadIdx.x % 32;
    ldmatrix(a, corner + (lane % 16) * pitch + (lane / 16) * 8);
}

// Four 8 × 8 blocks of 16-bit values, transposed: lanes 8q..8q+7 give the rows of block q, and lane
// (g, t) receives elements (2t, g) and (2t + 1, g) of each block.
__device__ __forceinline__ void ldmatrix_transposed(unsigned int (&fragment)[4], const X_T* row) {
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3]) : "r"(address));
}

// Two float32 values rounded to nearest even into one word of 16-bit values, `low` in the low half.
__device__ __forceinline__ unsigned int narrow_pair(float low, float high) {
    unsigned int packed;
    asm("cvt.rn." MMA_TYPE "x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
    return packed;
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
"""

LEVEL_LOOKUP = r"""
// A quantizer's levels in shared memory: the level of fine cell i is levels[i >> shift], shift = 8 − b. Lanes
// whose cells share a code read one address (a broadcast), so for b ≤ 5 a warp's 32 lookups take one
// shared-memory wavefront; a table of the 256 fine cells' levels took three on average (Nsight Compute, run 16).
struct Levels {
    const float* levels;
    int shift;
};

// The quantizer's level table V (256 entries, zeros past 2^b) into `levels`, and the shift of b = the number of
// leading open gates (forced open below min_bits), as fine_grid.bitwidth_from_logits reads it.
__device__ __forceinline__ Levels load_levels(float* levels, const float* __restrict__ table,
                                              const float* __restrict__ logits, int min_bits) {
    int bits = 8;
    for (int k = 7; k >= 0; --k)
        if (!(logits[k] > 0.0f || k < min_bits)) bits = k;
    for (int code = threadIdx.x; code < 256; code += THREADS) levels[code] = table[code];
    return {levels, 8 - bits};
}

// x_q of an element x in fine cell `cell`: its level, plus x·0 so that a non-finite x gives NaN (spec §2).
__device__ __forceinline__ float cell_level(Levels levels, int cell, float x) { return levels.levels[cell >> levels.shift] + x * 0.0f; }
"""

QUANTIZE_TILE = LEVEL_LOOKUP + r"""
__device__ __forceinline__ float quantized(unsigned int raw, Levels levels, float lo, float inv_delta) {
    const float value = X_WIDEN((X_T)raw);
    const float u = (value - lo) * inv_delta;
    return cell_level(levels, fine_cell(u), value);
}

// Every element of a staged ROWS × COLUMNS tile replaced by its quantized value (COLUMNS a multiple of 8).
template <int ROWS, int COLUMNS>
__device__ __forceinline__ void quantize_tile(X_T* tile, int pitch, Levels levels, float lo, float inv_delta) {
    for_each_vector<ROWS, COLUMNS>([&](int r, int c) {
        uint4* vector = reinterpret_cast<uint4*>(tile + r * pitch + c);
        uint4 words = *vector;
        unsigned int* word = reinterpret_cast<unsigned int*>(&words);
#pragma unroll
        for (int w = 0; w < 4; ++w)
            word[w] = narrow_pair(quantized(word[w] & 0xFFFFu, levels, lo, inv_delta),
                                  quantized(word[w] >> 16, levels, lo, inv_delta));
        *vector = words;
    });
}
"""


def mma_type(dtype) -> str:
    """The mma.sync operand type name of a 16-bit torch dtype, as a C string literal."""
    import torch

    return '"bf16"' if dtype == torch.bfloat16 else '"f16"'


def defines(**values) -> str:
    return "".join(f"#define {name} {value}\n" for name, value in values.items())


def prefer_shared_memory(kernel) -> None:
    """Ask the driver for the largest shared-memory carveout, so that the blocks a kernel's launch bounds
    promise fit an SM (the driver may otherwise size the carveout for fewer)."""
    from torch.cuda._utils import _get_gpu_runtime_library

    preferred_carveout = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, in percent of the maximum
    _get_gpu_runtime_library().cuFuncSetAttribute(kernel.func, preferred_carveout, 100)
