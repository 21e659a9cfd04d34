"""The spec §3 backward element pass with the histogram in shared memory (CUDA C, compiled by NVRTC).

The same pass as `quantize_backward.quantize_backward_kernel` (reference: `ddq.functional.reductions_reference`):
one read of v and x, one write of ∂x = v·in, and per group the histogram of v over the 256 fine cells,
Σ v·u over in-range elements and Σ v over clipped ones. Triton has no shared-memory atomics, so its
histograms cost ~32 compare/selects and operand shuffles per element (docs/kernels.md); here each element
is one shared-memory atomic into its warp's private copy of the 256 bins (per-warp copies keep warps from
contending), and each block adds its bins to the global histogram once. The cell of x = 0, which holds
most of a ReLU activation's elements, is accumulated in a register instead, so that a warp's lanes do not
serialise on one shared address. The element math is fine_grid's: u = (x − lo)·(1/Δ), i = clamp(floor(u + 0.5), 0, 255),
NaN in cell 0, v rounded to x's dtype first.

Integer bins (16-bit x, per tensor): sm_90 adds a float into shared memory with a compare-and-swap loop
(LDS, FADD, ATOMS.CAST.SPIN and a branch, inside a convergence region) but an integer with one ATOMS.ADD.
So a warp takes its elements in chunks of 16 a lane; a chunk's largest |v| sets a power-of-two scale that
puts it below 2^18, every v is added to an integer bin as round(v·scale), and up to three later chunks share
that scale while their largest |v| stays below 2^19 there; then the integer bins are added to float totals
(2^30 bounds a bin of 4 · 512 elements: no overflow). Each v thus enters the histogram within 2^-18 of the
largest |v| of the chunks sharing its scale (rounding that v to bf16 or fp16 alone moves it by up to 2^-9 or
2^-12 of itself), and the tests bound the histogram by that. Float32 x,
per-channel groups, the elements after the last 16-byte vector, and a chunk that holds ±inf or NaN go
through the float totals directly (a non-finite v still reaches its bin). Measured on an H100 (401408×576
bf16, run 9): 0.61 → 0.50 ms on a ReLU x, 0.70 → 0.50 ms on a spread-out one, ~2.8 TB/s, near the card's
bandwidth; per channel (float bins, five blocks an SM) as before.

With WRITE_XQ compiled in, the pass also writes x_q = V[i >> (8 − b)] from the fine cell i it found (`level_table`'s
table V staged in shared memory), so that a caller needing both the
reductions and x_q (`linear_backward.AROUND_CUBLAS`) reads x once.

Compiled with `torch.cuda._compile_kernel` (NVRTC, which ships with PyTorch's CUDA wheels) once per
(x dtype, v dtype, integer bins or not, x_q or not); `available()` says whether this process can. CUDA only: the
Triton strategies serve the interpreter, and the tests compare all of them with the reference on the GPU.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ddq_kernels.cuda_tiles import LEVEL_LOOKUP

THREADS = 256
VECTOR = 8  # elements per 16-byte load of a 16-bit tensor (two loads for float32)
BLOCKS_PER_SM = 4  # with __launch_bounds__(THREADS, 4): 1024 resident threads, each with 4 loads in flight
FLOAT_BINS_BLOCKS_PER_SM = 5  # a 16-bit x without the integer bins fits 48 registers: 1280 resident threads
WARP_BINS_BYTES = 2192  # a warp's WarpBins: 256 integer bins, 256 float totals, 32 sink slots, the bins' scale

_TYPES = {torch.float32: ("float", "f32"), torch.float16: ("unsigned short", "f16"), torch.bfloat16: ("unsigned short", "bf16")}

ELEMENT_MATH = r"""
#define WARPS (THREADS / 32)
#define CHUNK 16  // elements per lane between two flushes of the integer bins: 512 a warp, so |bin| < 2^30

__device__ __forceinline__ float widen_f32(float f) { return f; }
__device__ __forceinline__ float widen_f16(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float widen_bf16(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ float narrow_f32(float f) { return f; }
__device__ __forceinline__ unsigned short narrow_f16(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ unsigned short narrow_bf16(float f) { unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
// The same for a value that x's dtype holds exactly (no rounding to do): bfloat16 is the top half of its
// float32, so a shift replaces the conversion, which runs on the SM's narrow conversion pipe.
__device__ __forceinline__ float narrow_exact_f32(float f) { return f; }
__device__ __forceinline__ unsigned short narrow_exact_f16(float f) { return narrow_f16(f); }
__device__ __forceinline__ unsigned short narrow_exact_bf16(float f) { return (unsigned short)(__float_as_uint(f) >> 16); }

// i = clamp(floor(u + 0.5), 0, 255) in one flooring convert to u8 (SASS F2I.U8): it saturates to [0, 255], ±inf
// and every out-of-range u included, and gives 0 for NaN, so every u lands where the float clamp would put it.
// A convert to int32 and two integer clamps took three instructions of the ~11 that quantize an element.
__device__ __forceinline__ int floor_to_u8(float f) {
    unsigned int floor;
    asm("cvt.rmi.u8.f32 %0, %1;" : "=r"(floor) : "f"(f));
    return (int)floor;
}

__device__ __forceinline__ int fine_cell(float u) { return floor_to_u8(u + 0.5f); }

// v as the reference sees it: the gradient of x_q, which has x's dtype.
__device__ __forceinline__ float x_gradient(float v) {
#if V_IS_X
    return v;
#else
    return X_WIDEN(X_NARROW(v));
#endif
}

__device__ __forceinline__ float max_keeping_nan(float a, float b) { float m; asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b)); return m; }
// A lane's running bound over its chunk: the largest |v|, or NaN once any v is NaN.
__device__ __forceinline__ float chunk_bound(float bound, float v) { return max_keeping_nan(bound, fabsf(v)); }

// A warp's 256 histogram bins: integers in fixed point within a chunk (sm_90 adds integers into shared memory
// in one instruction, floats in a compare-and-swap loop), float totals across chunks; and a slot a lane, never
// read, that takes the adds of elements in the hot cell (`element`).
struct WarpBins {
    unsigned int counts[256];
    float totals[256];
    unsigned int sink[32];
    float scale;  // the integer bins' scale, kept here so that no register holds it outside the chunks
    unsigned int padding[3];
};

// Bytes from a WarpBins to its scale. NVRTC has no offsetof; the members before `scale` are arrays of 4-byte
// words, so there is no padding to account for.
constexpr unsigned int SCALE_OFFSET = sizeof(WarpBins::counts) + sizeof(WarpBins::totals) + sizeof(WarpBins::sink);

struct Accumulators {
    unsigned int bins;  // shared-window address of the warp's WarpBins
    unsigned int sink;  // shared-window address of this lane's sink slot
    int hot_cell;
    bool fixed;         // this chunk goes through the integer bins (warp-uniform)
    float scale;
    float hot_sum, sum_vu, sum_clipped;
};

__device__ __forceinline__ void start(Accumulators& acc, WarpBins* warp_bins, float lo, float inv_delta) {
    acc.bins = (unsigned int)__cvta_generic_to_shared(warp_bins);
    acc.sink = (unsigned int)__cvta_generic_to_shared(&warp_bins->sink[threadIdx.x % 32]);
    acc.hot_cell = fine_cell((0.0f - lo) * inv_delta);
    acc.hot_sum = acc.sum_vu = acc.sum_clipped = 0.0f;
    // 2^126: the first chunk with integer bins sets its own scale. Every lane stores the same value.
    asm volatile("st.shared.f32 [%0], %1;" :: "r"(acc.bins + SCALE_OFFSET), "f"(__int_as_float(253 << 23)) : "memory");
}

// Called by all 32 lanes after a run of chunks: the integer bins into the float totals at the bins' scale, 8 bins
// a lane, 32-bit accesses of consecutive words (one wavefront each; 16-byte accesses take as many wavefronts
// and more live registers: with them the SHARED pass with integer bins and x_q spills 4 bytes under its
// 64-register cap). The additions are volatile asm without a memory clobber, so that the compiler may
// interleave a chunk's elements; __syncwarp orders them before these loads.
__device__ __forceinline__ void empty_bins(Accumulators& acc) {
    if (!INTEGER_BINS) return;  // a kernel without them never zeroes or writes their words
    __syncwarp();
    const unsigned int lane = threadIdx.x % 32;
    float scale;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(scale) : "r"(acc.bins + SCALE_OFFSET) : "memory");
    const float inv_scale = __uint_as_float((254u << 23) - __float_as_uint(scale));  // 2^−s from 2^s, both normal
#pragma unroll
    for (int step = 0; step < 8; ++step) {
        const unsigned int counts = acc.bins + 4 * lane + 128 * step, totals = counts + 1024;
        unsigned int c;
        float t;
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(c) : "r"(counts) : "memory");
        asm volatile("ld.shared.f32 %0, [%1];" : "=f"(t) : "r"(totals) : "memory");
        asm volatile("st.shared.f32 [%0], %1;" :: "r"(totals), "f"(fmaf((float)(int)c, inv_scale, t)) : "memory");
        asm volatile("st.shared.u32 [%0], %1;" :: "r"(counts), "r"(0u) : "memory");
    }
    __syncwarp();
}

// Called by all 32 lanes with their chunk_bound, before the chunk's adds. The integer bins keep one scale 2^s
// for up to CHUNKS_PER_SCALE chunks: set by the chunk that finds them empty so that its largest |v| lies below
// 2^18, and kept while each later chunk's largest |v| stays below 2^19 there, so that a bin's 4 · 512 adds
// stay below 2^30 in magnitude. Each v thus enters its bin within 2^-18 of the largest |v| of the chunks that
// share the scale. Emptying the bins into the float totals after every chunk was a sixth of FUSED's
// shared-memory wavefronts (Nsight Compute, run 18). Float x, and a chunk holding ±inf or NaN, go through the
// float totals instead.
#define CHUNKS_PER_SCALE 4
// `fresh`: the caller's chunk count is a multiple of CHUNKS_PER_SCALE (warp-uniform), so that the bins are
// emptied at least every CHUNKS_PER_SCALE chunks. The warp's largest |v| counts only through its exponent, so
// votes (every lane's bound finite; any lane's outgrowing the scale) and, where a scale is set, one integer
// maximum (`redux.sync`) stand for a five-step shuffle maximum of the bounds, whose dependent steps were a run
// of stalls in FUSED (Nsight Compute, run 19).
__device__ __forceinline__ void begin_chunk(Accumulators& acc, float bound, bool fresh) {
    acc.fixed = sizeof(X_T) == 2 && __all_sync(0xffffffffu, bound <= 3.402823466e38f);
    // A lane's bound < 2^(exponent − 126), and the bins' scale is 2^(biased − 127): the lane's elements fit
    // below 2^19 there where exponent + biased ≤ 272. (Without `fixed` an exponent may be a non-finite one's;
    // unused.)
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(acc.scale) : "r"(acc.bins + SCALE_OFFSET) : "memory");
    const unsigned int exponent = __float_as_uint(bound) >> 23;
    const int biased = (int)(__float_as_uint(acc.scale) >> 23);
    const bool rescale = acc.fixed && __any_sync(0xffffffffu, (int)exponent + biased > 272);
    if (fresh || rescale) empty_bins(acc);
    if (acc.fixed && (fresh || rescale)) {
        acc.scale = __int_as_float((127 + min(144 - (int)__reduce_max_sync(0xffffffffu, exponent), 126)) << 23);
        asm volatile("st.shared.f32 [%0], %1;" :: "r"(acc.bins + SCALE_OFFSET), "f"(acc.scale) : "memory");
    }
}

// round(v·scale) to the nearest integer, ties to even, as __float2int_rn(v * scale), wherever |v·scale| < 2^22
// (begin_chunk's scale keeps it below 2^19): adding 1.5·2^23 within the same rounding leaves the integer in the
// low mantissa bits. A fused multiply-add and an integer add instead of a multiply and a conversion: the
// conversions ran the narrow conversion pipe at 30 % of its peak in FUSED (Nsight Compute, run 16).
__device__ __forceinline__ int fixed_point(float v, float scale) { return __float_as_int(fmaf(v, scale, 12582912.0f)) - 0x4B400000; }

// x's position on the fine grid, u = (x − lo)/Δ; its fine cell is fine_cell(u).
__device__ __forceinline__ float grid_position(X_T x_raw, float lo, float inv_delta) { return (X_WIDEN(x_raw) - lo) * inv_delta; }

// ∂x of one element at grid position u in fine cell `cell` (its callers look the cell's level up before the
// add, see element_and_level), its v added to the reductions. v is exactly representable in x's dtype
// (x_gradient rounded it, or it was read in that dtype), so ∂x needs no rounding.
template <bool FIXED>
__device__ __forceinline__ X_T element(float u, int cell, float v, Accumulators& acc) {
    const bool inside = (u >= 0.0f) && (u <= 255.0f);
    // The cell of x = 0, which holds most of a ReLU activation's elements, sums in a register, so that a
    // warp's lanes do not serialise on one shared address. Its lanes still add, into their own sink slots: a
    // predicated add became a branch with a convergence barrier around every element (ptxas, sm_90).
    const bool cold = cell != acc.hot_cell;
    if (!cold) acc.hot_sum += v;
    if (FIXED) {
        asm volatile("red.shared.add.u32 [%0], %1;" :: "r"(cold ? acc.bins + 4 * cell : acc.sink), "r"(fixed_point(v, acc.scale)));
    } else {
        asm volatile("red.shared.add.f32 [%0], %1;" :: "r"(cold ? acc.bins + 1024 + 4 * cell : acc.sink), "f"(v));
    }
    if (inside) acc.sum_vu = fmaf(v, u, acc.sum_vu); else acc.sum_clipped += v;
    return X_NARROW_EXACT(inside ? v : 0.0f);
}

// The block's per-warp totals and register sums into the group's global histogram and sums (one atomic each).
__device__ __forceinline__ void flush(Accumulators& acc, WarpBins* bins, float (*partial)[3], float* histogram, float* sums) {
    empty_bins(acc);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int offset = 16; offset > 0; offset /= 2) {
        acc.hot_sum += __shfl_xor_sync(0xffffffffu, acc.hot_sum, offset);
        acc.sum_vu += __shfl_xor_sync(0xffffffffu, acc.sum_vu, offset);
        acc.sum_clipped += __shfl_xor_sync(0xffffffffu, acc.sum_clipped, offset);
    }
    if (lane == 0) { partial[warp][0] = acc.hot_sum; partial[warp][1] = acc.sum_vu; partial[warp][2] = acc.sum_clipped; }
    __syncthreads();
    for (int cell = threadIdx.x; cell < 256; cell += THREADS) {
        float total = 0.0f;
        for (int w = 0; w < WARPS; ++w) total += bins[w].totals[cell];
        if (cell == acc.hot_cell) for (int w = 0; w < WARPS; ++w) total += partial[w][0];
        if (total != 0.0f) atomicAdd(histogram + cell, total);
    }
    if (threadIdx.x < 2) {
        float total = 0.0f;
        for (int w = 0; w < WARPS; ++w) total += partial[w][1 + threadIdx.x];
        atomicAdd(sums + threadIdx.x, total);
    }
}
"""

SOURCE = ELEMENT_MATH + LEVEL_LOOKUP + r"""
template <typename T> __device__ __forceinline__ void load_vector(const T* source, T (&values)[VECTOR]) {
    const uint4* from = reinterpret_cast<const uint4*>(source);
    uint4* to = reinterpret_cast<uint4*>(values);
#pragma unroll
    for (int j = 0; j < (int)(VECTOR * sizeof(T) / 16); ++j) to[j] = from[j];
}

template <typename T> __device__ __forceinline__ void store_vector(T* target, const T (&values)[VECTOR]) {
    const uint4* from = reinterpret_cast<const uint4*>(values);
    uint4* to = reinterpret_cast<uint4*>(target);
#pragma unroll
    for (int j = 0; j < (int)(VECTOR * sizeof(T) / 16); ++j) to[j] = from[j];
}

// ∂x of one element as `element` computes it; with WRITE_XQ, `quantized` receives x_q = V[i >> (8 − b)] from
// the fine cell the reductions found.
// The level is looked up before the element's add: ptxas keeps a shared-memory load after an earlier
// red.shared whose address it cannot tell apart, so looked up after it, the load waited out its latency there.
template <bool FIXED>
__device__ __forceinline__ X_T element_and_level(X_T x_raw, float v, float lo, float inv_delta, Levels levels,
                                                 Accumulators& acc, X_T& quantized) {
    const float u = grid_position(x_raw, lo, inv_delta);
    const int cell = fine_cell(u);
    if (WRITE_XQ) quantized = X_NARROW(cell_level(levels, cell, X_WIDEN(x_raw)));
    return element<FIXED>(u, cell, v, acc);
}

template <bool FIXED>
__device__ __forceinline__ void chunk_elements(X_T (&x)[CHUNK], X_T (&q)[CHUNK], const V_T (&v)[CHUNK], float lo,
                                               float inv_delta, Levels levels, Accumulators& acc) {
#pragma unroll
    for (int e = 0; e < CHUNK; ++e) x[e] = element_and_level<FIXED>(x[e], x_gradient(V_WIDEN(v[e])), lo, inv_delta, levels, acc, q[e]);
}

// One chunk of a lane's elements, every lane of the warp: x in, ∂x out (and x_q into q with WRITE_XQ). Elements a lane lacks are v = 0,
// x = 0: they add nothing. v is widened twice rather than held as floats: registers are what limits the
// resident warps.
__device__ __forceinline__ void chunk(X_T (&x)[CHUNK], X_T (&q)[CHUNK], const V_T (&v)[CHUNK], float lo, float inv_delta,
                                      Levels levels, Accumulators& acc, bool fresh) {
    float bound = 0.0f;
#pragma unroll
    for (int e = 0; e < CHUNK; ++e) bound = chunk_bound(bound, x_gradient(V_WIDEN(v[e])));
    begin_chunk(acc, bound, fresh);
    if (acc.fixed) chunk_elements<true>(x, q, v, lo, inv_delta, levels, acc);
    else chunk_elements<false>(x, q, v, lo, inv_delta, levels, acc);
}

extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)
ddq_shared_reductions(const V_T* __restrict__ grad, const X_T* __restrict__ x, X_T* __restrict__ grad_x,
                      const float* __restrict__ lo_ptr, const float* __restrict__ hi_ptr,
                      float* __restrict__ histogram, float* __restrict__ sums, int numel_low, int numel_high, int vectorized,
                      const float* __restrict__ table, const float* __restrict__ logits, int min_bits, X_T* __restrict__ x_q) {
    // The launcher passes Python ints as 32-bit C ints: the element count comes in two 31-bit halves.
    const long long group_numel = ((long long)numel_high << 31) | numel_low;
    const int group = blockIdx.y;
    __shared__ __align__(16) WarpBins bins[WARPS];
    __shared__ float partial[WARPS][3];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float lo = lo_ptr[group];
    const float inv_delta = 1.0f / ((hi_ptr[group] - lo) / 255.0f);
    for (int i = threadIdx.x; i < WARPS * 256; i += THREADS) {
        bins[i / 256].totals[i % 256] = 0.0f;
        if (INTEGER_BINS) bins[i / 256].counts[i % 256] = 0u;
    }
    __shared__ float levels[WRITE_XQ ? 256 : 1];
    Levels lookup = {levels, 0};
    if (WRITE_XQ) lookup = load_levels(levels, table + group * 256, logits, min_bits);
    __syncthreads();
    Accumulators acc;
    start(acc, bins + warp, lo, inv_delta);
    const long long base = (long long)group * group_numel;
    const V_T* g = grad + base;
    const X_T* xs = x + base;
    X_T* out = grad_x + base;
    X_T* quantized_out = WRITE_XQ ? x_q + base : x_q;
    const long long first = (long long)blockIdx.x * THREADS + threadIdx.x;
    const long long stride = (long long)gridDim.x * THREADS;
    const long long vectors = vectorized ? group_numel / VECTOR : 0;
    constexpr int PER_CHUNK = CHUNK / VECTOR;
    // A chunk is PER_CHUNK vectors a lane, `stride` apart; the warp runs while its first lane has one, so
    // the chunk's collective steps see all 32 lanes. The vectors' loads are in flight together.
    int chunks = 0;
    for (long long j = first; j - lane < vectors; j += PER_CHUNK * stride, ++chunks) {
        X_T x_values[CHUNK];
        X_T q_values[CHUNK];
        V_T v_values[CHUNK];
#pragma unroll
        for (int k = 0; k < PER_CHUNK; ++k) {
            X_T x_vector[VECTOR];
            V_T v_vector[VECTOR];
            if (j + k * stride < vectors) {
                load_vector(xs + (j + k * stride) * VECTOR, x_vector);
                load_vector(g + (j + k * stride) * VECTOR, v_vector);
            } else {
#pragma unroll
                for (int e = 0; e < VECTOR; ++e) { x_vector[e] = (X_T)0; v_vector[e] = (V_T)0; }
            }
#pragma unroll
            for (int e = 0; e < VECTOR; ++e) { x_values[k * VECTOR + e] = x_vector[e]; v_values[k * VECTOR + e] = v_vector[e]; }
        }
        if (INTEGER_BINS) chunk(x_values, q_values, v_values, lo, inv_delta, lookup, acc, chunks % CHUNKS_PER_SCALE == 0);
        else chunk_elements<false>(x_values, q_values, v_values, lo, inv_delta, lookup, acc);
#pragma unroll
        for (int k = 0; k < PER_CHUNK; ++k)
            if (j + k * stride < vectors) {
                X_T vector[VECTOR];
#pragma unroll
                for (int e = 0; e < VECTOR; ++e) vector[e] = x_values[k * VECTOR + e];
                store_vector(out + (j + k * stride) * VECTOR, vector);
                if (WRITE_XQ) {
#pragma unroll
                    for (int e = 0; e < VECTOR; ++e) vector[e] = q_values[k * VECTOR + e];
                    store_vector(quantized_out + (j + k * stride) * VECTOR, vector);
                }
            }
    }
    // The elements after the last whole vector (all of them where rows are not 16-byte aligned) go one at a
    // time through the float totals: no chunk, so no collective steps.
    for (long long i = vectors * VECTOR + first; i < group_numel; i += stride) {
        X_T quantized;
        out[i] = element_and_level<false>(xs[i], x_gradient(V_WIDEN(g[i])), lo, inv_delta, lookup, acc, quantized);
        if (WRITE_XQ) quantized_out[i] = quantized;
    }
    __syncthreads();
    flush(acc, bins, partial, histogram + group * 256, sums + group * 2);
}
"""


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this process can compile and run the kernel: a CUDA device and PyTorch's NVRTC wrapper that
    compiles it (a CUDA wheel without NVRTC, or a private API that moved, leaves the Triton strategies)."""
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")):
        return False
    try:
        compiled_kernel(torch.bfloat16, torch.bfloat16, True, torch.cuda.current_device())
    except Exception as error:  # NVRTC missing or refusing: any failure means "use Triton instead"
        warnings.warn(f"ddq_kernels.shared_histogram: NVRTC kernel unavailable ({error}); using the Triton histograms")
        return False
    return True


def element_math_header(x_dtype: torch.dtype, v_dtype: torch.dtype, threads: int, integer_bins: bool = False) -> str:
    """The #defines that ELEMENT_MATH needs: x's and v's storage types and conversions, the block size, and
    whether the kernel's histogram has integer bins (16-bit x only)."""
    x_type, x_kind = _TYPES[x_dtype]
    v_type, v_kind = _TYPES[v_dtype]
    return (f"#define THREADS {threads}\n#define X_T {x_type}\n#define V_T {v_type}\n#define V_IS_X {int(x_dtype == v_dtype)}\n"
            f"#define X_WIDEN widen_{x_kind}\n#define X_NARROW narrow_{x_kind}\n#define X_NARROW_EXACT narrow_exact_{x_kind}\n"
            f"#define V_WIDEN widen_{v_kind}\n#define INTEGER_BINS {int(integer_bins)}\n")


def kernel_source(x_dtype: torch.dtype, v_dtype: torch.dtype, integer_bins: bool, write_x_q: bool = False) -> str:
    """The CUDA source of the kernel for (x dtype, v dtype), with or without the integer bins, writing x_q
    or not."""
    header = element_math_header(x_dtype, v_dtype, THREADS, integer_bins) + (
        f"#define BLOCKS_PER_SM {blocks_per_sm(integer_bins, x_dtype)}\n#define VECTOR {VECTOR}\n"
        f"#define WRITE_XQ {int(write_x_q)}\n")
    return header + SOURCE


@functools.lru_cache(maxsize=None)
def compiled_kernel(x_dtype: torch.dtype, v_dtype: torch.dtype, integer_bins: bool, device_index: int,
                    write_x_q: bool = False):
    """`kernel_source`'s kernel loaded on one device (a CUDA module belongs to one context)."""
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(kernel_source(x_dtype, v_dtype, integer_bins, write_x_q),
                                          "ddq_shared_reductions")


def blocks_per_sm(integer_bins: bool, x_dtype: torch.dtype) -> int:
    """Resident blocks the launch bounds ask for. Measured per channel on an H100 (run 9): 4096 groups of 4096
    bf16 elements 0.076 ms at 4 blocks, 0.068 at 5; 512 groups of 4608 0.051 and 0.025 ms. A float32 x keeps
    4 (at 5 it spills, and 8192×4096 took 0.161 against 0.157 ms)."""
    return FLOAT_BINS_BLOCKS_PER_SM if not integer_bins and x_dtype != torch.float32 else BLOCKS_PER_SM


def reductions_shared(grad: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grad_x: torch.Tensor,
                      histogram: torch.Tensor, sums: torch.Tensor,
                      quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None) -> None:
    """Spec §3 element pass into given outputs: ∂x (x's shape and dtype), histogram (G, 256) and sums (G, 2)
    = (Σv·u·in, Σv·(1 − in)), the last two zeroed. x, grad and grad_x contiguous on one CUDA device, x
    float32/float16/bfloat16, grad any of those.

    `quantized` = (x_q, table, gate_logits, min_bits): the pass also writes x_q (spec §2, like x, with the
    level table of `level_table`) from the fine cells it finds anyway, instead of a second pass over x.
    """
    groups = lo.shape[0]
    group_numel = x.numel() // groups
    if group_numel == 0:
        return
    # Integer bins for a 16-bit x per tensor only: a per-channel group gets a block or two, which make one pass
    # each, so resident blocks count more there than instructions (the float bins fit 48 registers).
    integer_bins = groups == 1 and x.element_size() == 2
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    per_group = max(1, min(-(-group_numel // (THREADS * VECTOR)), -(-blocks_per_sm(integer_bins, x.dtype) * sms // groups)))
    # Whole 16-byte vectors only where every group starts on one.
    vectorized = all(t.data_ptr() % 16 == 0 for t in (grad, x, grad_x)) and (groups == 1 or group_numel % VECTOR == 0)
    if quantized is None:
        x_q, table, gate_logits, min_bits = grad_x, histogram, histogram, 0  # not read without WRITE_XQ
    else:
        x_q, table, gate_logits, min_bits = quantized
        vectorized = vectorized and x_q.data_ptr() % 16 == 0
    kernel = compiled_kernel(x.dtype, grad.dtype, integer_bins, x.device.index, quantized is not None)
    with torch.cuda.device(x.device):  # the launcher uses the current device's current stream
        kernel(grid=(per_group, groups, 1), block=(THREADS, 1, 1),
               args=[grad, x, grad_x, lo.contiguous(), hi.contiguous(), histogram, sums, group_numel & (2**31 - 1),
                     group_numel >> 31, int(vectorized), table.contiguous(), gate_logits.contiguous(), min_bits, x_q])
