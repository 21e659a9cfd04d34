"""CUDA C building blocks of the NVRTC GEMMs (DDQ_SPEC.md §2): tile staging, fragments, the quantizer on a tile.

Shared by `linear_forward_cuda`, `linear_backward_weight_cuda` and `linear_backward_input_cuda`:
- `for_each_vector`: a thread's 16-byte vectors of a tile whose shape is a compile-time constant;
- `stage`: a ROWS × COLUMNS block of a row-major matrix into padded shared-memory rows with cp.async
  (16-byte vectors, zero outside the matrix: `copy_vector`);
- `ldmatrix`, `load_a`, `ldmatrix_transposed`, `mma_16816`: operand fragments of mma.sync m16n8k16 and the
  product itself (float32 accumulation); `narrow_pair`: two float32 values into one word of 16-bit values;
- `load_levels`, `quantize_vector` and `quantize_tile`: spec §2 for a per-tensor activation quantizer applied
  in place to a staged tile; `load_vectors` and `store_quantized`: the same on a tile's way from global memory
  through registers into shared memory (run 22). The bitwidth comes from the gate logits on the device, and
  `level_table`'s V is laid out in shared memory once per block, so quantizing an element costs one
  shared-memory load (of V[i >> (8 − b)]) besides its arithmetic. Triton's quantize-in-load gathers the level from global memory (L1) instead,
  which made its fused forward 2.8× slower than its bytes allow.
  The element math is `fine_grid`'s: u = (x − lo)·(1/Δ), i = clamp(floor(u + 0.5), 0, 255) with NaN in
  cell 0, x_q = V + x·0 (NaN for a non-finite x), rounded to x's dtype for the tensor cores. `quantize_vector`
  finds the code i >> (8 − b) in one scaled flooring convert (`coarse_code`) and adds x·0 to a pair of
  rounded levels in one packed fma (`pair_levels`): about 7 instructions an element, 9 before (run 18).
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

// One 16-byte cp.async into shared memory, or 16 zero bytes where `inside` is false: the source is then ignored
// (cp.async's ignore-src operand), so its address may lie past the matrix and needs no select.
__device__ __forceinline__ void copy_vector(unsigned int target, unsigned long long source, bool inside) {
    asm volatile("{\n\t.reg .pred outside;\n\tsetp.eq.u32 outside, %2, 0;\n\t"
                 "cp.async.cg.shared.global [%0], [%1], 16, outside;\n\t}"
                 :: "r"(target), "l"(source), "r"((unsigned int)inside));
}

// A ROWS × COLUMNS block at (first_row, first_column) of a (total_rows, row_length) row-major matrix into
// shared rows of `pitch` elements, zero outside the matrix; asynchronous (cp.async, 16 bytes). row_length
// and first_column are multiples of 8. Where a row's vectors divide THREADS, a thread's vectors lie a constant
// number of rows apart: one address, one row bound and one column test a call, and then an add and a compare
// a vector (each vector's own 64-bit address and bounds cost ~20 instructions, a fifth of the forward's
// instructions: Nsight Compute, run 18).
template <int ROWS, int COLUMNS>
__device__ __forceinline__ void stage(X_T* shared, int pitch, const X_T* __restrict__ global, long long first_row,
                                      int first_column, long long total_rows, int row_length) {
    constexpr int VECTORS_PER_ROW = COLUMNS / 8;
    if constexpr (THREADS % VECTORS_PER_ROW == 0) {
        constexpr int ROWS_PER_PASS = THREADS / VECTORS_PER_ROW;
        const unsigned long long corner = (unsigned long long)global + (first_row * row_length + first_column) * sizeof(X_T);
        const unsigned int shared_corner = (unsigned int)__cvta_generic_to_shared(shared);
        const int r = threadIdx.x / VECTORS_PER_ROW, c = (threadIdx.x % VECTORS_PER_ROW) * 8;
        // This thread's rows r + row are inside the matrix for row < rows_inside.
        const int rows_inside = (int)min(total_rows - first_row - r, (long long)ROWS);
        const bool column_inside = first_column + c < row_length;
        unsigned long long source = corner + ((long long)r * row_length + c) * sizeof(X_T);
        const unsigned long long pass_bytes = (unsigned long long)ROWS_PER_PASS * row_length * sizeof(X_T);
        const unsigned int target = shared_corner + (r * pitch + c) * sizeof(X_T);
#pragma unroll
        for (int row = 0; row < ROWS; row += ROWS_PER_PASS) {
            if (ROWS % ROWS_PER_PASS == 0 || r + row < ROWS)
                copy_vector(target + row * pitch * sizeof(X_T), source, column_inside && row < rows_inside);
            source += pass_bytes;
        }
    } else {
        // The address computed only where inside keeps FUSED within 64 registers at N = 80 (ptxas spills 4 bytes
        // when every vector's address is computed).
        for_each_vector<ROWS, COLUMNS>([&](int r, int c) {
            const bool inside = first_row + r < total_rows && first_column + c < row_length;
            copy_vector((unsigned int)__cvta_generic_to_shared(shared + r * pitch + c),
                        (unsigned long long)(inside ? global + first_row * row_length + first_column + (long long)r * row_length + c
                                                    : global),
                        inside);
        });
    }
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
    float code_scale;  // 2^−shift
};

// The quantizer's level table V (256 entries, zeros past 2^b) into `levels`, and the shift of b = the number of
// leading open gates (forced open below min_bits), as fine_grid.bitwidth_from_logits reads it. Entries past
// 2^b − 1 repeat the top level, for `coarse_code`'s saturation at 255.
__device__ __forceinline__ Levels load_levels(float* levels, const float* __restrict__ table,
                                              const float* __restrict__ logits, int min_bits) {
    int bits = 8;
    for (int k = 7; k >= 0; --k)
        if (!(logits[k] > 0.0f || k < min_bits)) bits = k;
    for (int code = threadIdx.x; code < 256; code += THREADS) levels[code] = table[min(code, (1 << bits) - 1)];
    return {levels, 8 - bits, __int_as_float((127 - 8 + bits) << 23)};
}

// The level of fine cell `cell`, V[cell >> (8 − b)].
__device__ __forceinline__ float level_of_cell(Levels levels, int cell) { return levels.levels[cell >> levels.shift]; }

// x_q of an element x in fine cell `cell`: its level, plus x·0 so that a non-finite x gives NaN (spec §2).
__device__ __forceinline__ float cell_level(Levels levels, int cell, float x) { return level_of_cell(levels, cell) + x * 0.0f; }
"""

QUANTIZE_TILE = LEVEL_LOOKUP + r"""
// The code i >> (8 − b) of a value's fine cell i = floor(u + 0.5), in one flooring convert: scaling u + 0.5 by
// 2^−(8−b) is exact, so the scaled floor is the shifted one; past the top code the convert saturates at 255 and
// load_levels repeats the top level there. `scaled_inv_delta` and `scaled_half` are 1/Δ and 0.5 times 2^−(8−b).
__device__ __forceinline__ int coarse_code(float value, float lo, float scaled_inv_delta, float scaled_half) {
    return floor_to_u8(fmaf(value - lo, scaled_inv_delta, scaled_half));
}

// x_q of two 16-bit elements (`raw`, the low element in the low half) from their float32 levels: the levels
// rounded to x's dtype plus x·0 in one packed fma. x·0 is ±0 for a finite x, and V + ±0 rounds alike in x's
// dtype and in float32 (−0 included), so this equals narrowing V + x·0; a non-finite x gives NaN (spec §2).
__device__ __forceinline__ unsigned int pair_levels(float low_level, float high_level, unsigned int raw) {
    unsigned int quantized;
    asm("fma.rn." MMA_TYPE "x2 %0, %1, %2, %3;" : "=r"(quantized) : "r"(raw), "r"(0u), "r"(narrow_pair(low_level, high_level)));
    return quantized;
}

// Eight 16-bit elements (one 16-byte vector) quantized.
__device__ __forceinline__ uint4 quantize_vector(uint4 words, Levels levels, float lo, float inv_delta) {
    const float scaled_inv_delta = inv_delta * levels.code_scale, scaled_half = 0.5f * levels.code_scale;
    const auto level = [&](unsigned int raw) {
        return levels.levels[coarse_code(X_WIDEN((X_T)raw), lo, scaled_inv_delta, scaled_half)];
    };
    unsigned int* word = reinterpret_cast<unsigned int*>(&words);
#pragma unroll
    for (int w = 0; w < 4; ++w) word[w] = pair_levels(level(word[w] & 0xFFFFu), level(word[w] >> 16), word[w]);
    return words;
}

// Every element of a staged ROWS × COLUMNS tile replaced by its quantized value (COLUMNS a multiple of 8).
template <int ROWS, int COLUMNS>
__device__ __forceinline__ void quantize_tile(X_T* tile, int pitch, Levels levels, float lo, float inv_delta) {
    for_each_vector<ROWS, COLUMNS>([&](int r, int c) {
        uint4* vector = reinterpret_cast<uint4*>(tile + r * pitch + c);
        *vector = quantize_vector(*vector, levels, lo, inv_delta);
    });
}

// A thread's 16-byte vectors of a ROWS × COLUMNS block at (first_row, first_column) of a (total_rows, row_length)
// row-major matrix, read into registers (zero outside the matrix), for `store_quantized` to quantize on their way
// into shared memory: the loads stay in flight while the block multiplies the previous chunk, and the tile is
// written once, where `stage` then `quantize_tile` read and wrote it again behind a barrier. A row's vectors
// divide THREADS, and a pass of THREADS vectors covers whole rows that divide ROWS.
template <int ROWS, int COLUMNS> struct TileVectors {
    static constexpr int PER_ROW = COLUMNS / 8, ROWS_PER_PASS = THREADS / PER_ROW, COUNT = ROWS / ROWS_PER_PASS;
    static_assert(THREADS % PER_ROW == 0 && ROWS % ROWS_PER_PASS == 0, "a pass of vectors covers whole rows of the tile");
    uint4 words[COUNT];
};

template <int ROWS, int COLUMNS>
__device__ __forceinline__ void load_vectors(TileVectors<ROWS, COLUMNS>& tile, const X_T* __restrict__ global,
                                             long long first_row, int first_column, long long total_rows, int row_length) {
    using Tile = TileVectors<ROWS, COLUMNS>;
    const int r = threadIdx.x / Tile::PER_ROW, c = (threadIdx.x % Tile::PER_ROW) * 8;
    const int rows_inside = (int)min(total_rows - first_row - r, (long long)ROWS);
    const bool column_inside = first_column + c < row_length;
    const uint4* source = reinterpret_cast<const uint4*>(global + (first_row + r) * row_length + first_column + c);
    const long long pass = (long long)Tile::ROWS_PER_PASS * row_length / 8;
#pragma unroll
    for (int i = 0; i < Tile::COUNT; ++i)
        tile.words[i] = column_inside && i * Tile::ROWS_PER_PASS < rows_inside ? __ldg(source + i * pass) : make_uint4(0, 0, 0, 0);
}

// `load_vectors`' tile quantized into shared rows of `pitch` elements, as `quantize_tile` quantizes it.
template <int ROWS, int COLUMNS>
__device__ __forceinline__ void store_quantized(X_T* shared, int pitch, const TileVectors<ROWS, COLUMNS>& tile,
                                                Levels levels, float lo, float inv_delta) {
    using Tile = TileVectors<ROWS, COLUMNS>;
    const int r = threadIdx.x / Tile::PER_ROW, c = (threadIdx.x % Tile::PER_ROW) * 8;
#pragma unroll
    for (int i = 0; i < Tile::COUNT; ++i)
        *reinterpret_cast<uint4*>(shared + (r + i * Tile::ROWS_PER_PASS) * pitch + c) =
            quantize_vector(tile.words[i], levels, lo, inv_delta);
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
