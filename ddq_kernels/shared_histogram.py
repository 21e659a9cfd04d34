"""The spec §3 backward element pass with the histogram in shared memory (CUDA C, compiled by NVRTC).

The same pass as `quantize_backward.quantize_backward_kernel` (reference: `ddq.functional.reductions_reference`):
one read of v and x, one write of ∂x = v·in, and per group the histogram of v over the 256 fine cells,
Σ v·u over in-range elements and Σ v over clipped ones. Triton has no shared-memory atomics, so its
histograms cost ~32 compare/selects and operand shuffles per element (docs/kernels.md); here each element
is one `red.shared.add.f32` into its warp's private copy of the 256 bins (per-warp copies keep warps from
contending), and each block adds its bins to the global histogram once. The cell of x = 0, which holds
most of a ReLU activation's elements, is accumulated in a register instead, so that a warp's lanes do not
serialise on one shared address. The element math is fine_grid's: u = (x − lo)·(1/Δ), i = clamp(floor(u + 0.5), 0, 255),
NaN in cell 0, v rounded to x's dtype first.

Compiled with `torch.cuda._compile_kernel` (NVRTC, which ships with PyTorch's CUDA wheels) once per
(x dtype, v dtype); `available()` says whether this process can. CUDA only: the Triton strategies serve
the interpreter, and the tests compare all of them with the reference on the GPU.
"""

from __future__ import annotations

import functools
import warnings

import torch

THREADS = 256
VECTOR = 8  # elements per 16-byte load of a 16-bit tensor (two loads for float32)
BLOCKS_PER_SM = 4  # with __launch_bounds__(THREADS, 4): 1024 resident threads, each with 4 loads in flight

_TYPES = {torch.float32: ("float", "f32"), torch.float16: ("unsigned short", "f16"), torch.bfloat16: ("unsigned short", "bf16")}

ELEMENT_MATH = r"""
#define WARPS (THREADS / 32)

__device__ __forceinline__ float widen_f32(float f) { return f; }
__device__ __forceinline__ float widen_f16(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float widen_bf16(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ float narrow_f32(float f) { return f; }
__device__ __forceinline__ unsigned short narrow_f16(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ unsigned short narrow_bf16(float f) { unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

// i = clamp(floor(u + 0.5), 0, 255) in one flooring convert and an integer clamp: the convert gives 0 for NaN
// and saturates ±inf and |u| ≥ 2^31, so every u lands where the float clamp would put it.
__device__ __forceinline__ int fine_cell(float u) { return min(max(__float2int_rd(u + 0.5f), 0), 255); }

struct Accumulators {
    float* warp_bins;
    int hot_cell;
    float hot_sum, sum_vu, sum_clipped;
};

__device__ __forceinline__ void start(Accumulators& acc, float* warp_bins, float lo, float inv_delta) {
    acc.warp_bins = warp_bins;
    acc.hot_cell = fine_cell((0.0f - lo) * inv_delta);
    acc.hot_sum = acc.sum_vu = acc.sum_clipped = 0.0f;
}

__device__ __forceinline__ X_T element(X_T x_raw, V_T v_raw, float lo, float inv_delta, Accumulators& acc) {
    // v as the reference sees it: the gradient of x_q, which has x's dtype.
    const float v = X_WIDEN(X_NARROW(V_WIDEN(v_raw)));
    const float u = (X_WIDEN(x_raw) - lo) * inv_delta;
    const bool inside = (u >= 0.0f) && (u <= 255.0f);
    const int cell = fine_cell(u);
    if (cell == acc.hot_cell) acc.hot_sum += v; else atomicAdd(acc.warp_bins + cell, v);
    acc.sum_vu += inside ? v * u : 0.0f;
    acc.sum_clipped += inside ? 0.0f : v;
    return X_NARROW(inside ? v : 0.0f);
}

// The block's per-warp bins and register sums into the group's global histogram and sums (one atomic each).
__device__ __forceinline__ void flush(Accumulators& acc, float (*bins)[256], float (*partial)[3], float* histogram, float* sums) {
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
        for (int w = 0; w < WARPS; ++w) total += bins[w][cell];
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

SOURCE = ELEMENT_MATH + r"""
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

extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)
ddq_shared_reductions(const V_T* __restrict__ grad, const X_T* __restrict__ x, X_T* __restrict__ grad_x,
                      const float* __restrict__ lo_ptr, const float* __restrict__ hi_ptr,
                      float* __restrict__ histogram, float* __restrict__ sums, int numel_low, int numel_high, int vectorized) {
    // The launcher passes Python ints as 32-bit C ints: the element count comes in two 31-bit halves.
    const long long group_numel = ((long long)numel_high << 31) | numel_low;
    const int group = blockIdx.y;
    __shared__ float bins[WARPS][256];
    __shared__ float partial[WARPS][3];
    const int warp = threadIdx.x / 32;
    const float lo = lo_ptr[group];
    const float inv_delta = 1.0f / ((hi_ptr[group] - lo) / 255.0f);
    for (int i = threadIdx.x; i < WARPS * 256; i += THREADS) (&bins[0][0])[i] = 0.0f;
    __syncthreads();
    Accumulators acc;
    start(acc, bins[warp], lo, inv_delta);
    const long long base = (long long)group * group_numel;
    const V_T* g = grad + base;
    const X_T* xs = x + base;
    X_T* out = grad_x + base;
    const long long first = (long long)blockIdx.x * THREADS + threadIdx.x;
    const long long stride = (long long)gridDim.x * THREADS;
    const long long vectors = vectorized ? group_numel / VECTOR : 0;
    // Two vectors per thread and step: their four loads are in flight together.
    for (long long j = first; j < vectors; j += 2 * stride) {
        const bool second = j + stride < vectors;
        X_T x_values[2][VECTOR], dx[VECTOR];
        V_T v_values[2][VECTOR];
        load_vector(xs + j * VECTOR, x_values[0]);
        load_vector(g + j * VECTOR, v_values[0]);
        if (second) {
            load_vector(xs + (j + stride) * VECTOR, x_values[1]);
            load_vector(g + (j + stride) * VECTOR, v_values[1]);
        }
#pragma unroll
        for (int e = 0; e < VECTOR; ++e) dx[e] = element(x_values[0][e], v_values[0][e], lo, inv_delta, acc);
        store_vector(out + j * VECTOR, dx);
        if (second) {
#pragma unroll
            for (int e = 0; e < VECTOR; ++e) dx[e] = element(x_values[1][e], v_values[1][e], lo, inv_delta, acc);
            store_vector(out + (j + stride) * VECTOR, dx);
        }
    }
    for (long long i = vectors * VECTOR + first; i < group_numel; i += stride) out[i] = element(xs[i], g[i], lo, inv_delta, acc);
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
        compiled_kernel(torch.bfloat16, torch.bfloat16, torch.cuda.current_device())
    except Exception as error:  # NVRTC missing or refusing: any failure means "use Triton instead"
        warnings.warn(f"ddq_kernels.shared_histogram: NVRTC kernel unavailable ({error}); using the Triton histograms")
        return False
    return True


def element_math_header(x_dtype: torch.dtype, v_dtype: torch.dtype, threads: int) -> str:
    """The #defines that ELEMENT_MATH needs: x's and v's storage types and conversions, the block size."""
    x_type, x_kind = _TYPES[x_dtype]
    v_type, v_kind = _TYPES[v_dtype]
    return (f"#define THREADS {threads}\n#define X_T {x_type}\n#define V_T {v_type}\n"
            f"#define X_WIDEN widen_{x_kind}\n#define X_NARROW narrow_{x_kind}\n#define V_WIDEN widen_{v_kind}\n")


@functools.lru_cache(maxsize=None)
def compiled_kernel(x_dtype: torch.dtype, v_dtype: torch.dtype, device_index: int):
    """The kernel for (x dtype, v dtype), loaded on one device (a CUDA module belongs to one context)."""
    header = element_math_header(x_dtype, v_dtype, THREADS) + f"#define BLOCKS_PER_SM {BLOCKS_PER_SM}\n#define VECTOR {VECTOR}\n"
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(header + SOURCE, "ddq_shared_reductions")


def reductions_shared(grad: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grad_x: torch.Tensor,
                      histogram: torch.Tensor, sums: torch.Tensor) -> None:
    """Spec §3 element pass into given outputs: ∂x (x's shape and dtype), histogram (G, 256) and sums (G, 2)
    = (Σv·u·in, Σv·(1 − in)), the last two zeroed. x, grad and grad_x contiguous on one CUDA device, x
    float32/float16/bfloat16, grad any of those.
    """
    groups = lo.shape[0]
    group_numel = x.numel() // groups
    if group_numel == 0:
        return
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    per_group = max(1, min(-(-group_numel // (THREADS * VECTOR)), -(-BLOCKS_PER_SM * sms // groups)))
    # Whole 16-byte vectors only where every group starts on one.
    vectorized = all(t.data_ptr() % 16 == 0 for t in (grad, x, grad_x)) and (groups == 1 or group_numel % VECTOR == 0)
    kernel = compiled_kernel(x.dtype, grad.dtype, x.device.index)
    with torch.cuda.device(x.device):  # the launcher uses the current device's current stream
        kernel(grid=(per_group, groups, 1), block=(THREADS, 1, 1),
               args=[grad, x, grad_x, lo.contiguous(), hi.contiguous(), histogram, sums, group_numel & (2**31 - 1),
                     group_numel >> 31, int(vectorized)])
