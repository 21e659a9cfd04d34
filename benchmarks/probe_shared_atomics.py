"""How fast a block can add weighted values into per-warp 256-bin histograms in shared memory (docs/kernels.md,
run 8): float atomics (what SHARED and the fused ∂x epilogue do), float atomics with the x = 0 cell summed in a
register, integer atomics on fixed-point values, integer atomics whose bins are flushed into float bins every
16 elements a lane (the scale chosen from the warp's largest |v| of those 512, so no bin can overflow), and no
histogram at all (the loads alone). Three cell distributions: uniform, half of the elements in cell 0 (a ReLU
output), and 16 adjacent cells. Usage on a CUDA machine: python benchmarks/probe_shared_atomics.py
"""

from __future__ import annotations

import torch

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256, 4)
probe(const unsigned char* __restrict__ cells, const float* __restrict__ v, float* __restrict__ out, int n, int mode) {
    __shared__ float float_bins[8][256];
    __shared__ int int_bins[8][256];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = threadIdx.x; i < 8 * 256; i += 256) { (&float_bins[0][0])[i] = 0.0f; (&int_bins[0][0])[i] = 0; }
    __syncthreads();
    float hot = 0.0f;
    const int stride = gridDim.x * 256;
    for (int base = blockIdx.x * 256; base < n; base += 16 * stride) {
        float values[16];
        int bins[16];
        float largest = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int i = base + j * stride + threadIdx.x;
            values[j] = i < n ? v[i] : 0.0f;
            bins[j] = i < n ? cells[i] : 0;
            largest = fmaxf(largest, fabsf(values[j]));
        }
        if (mode == 3) {
            for (int offset = 16; offset > 0; offset /= 2) largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
        }
        // 512 values of at most 2^21 each cannot overflow a 32-bit bin.
        const int exponent = largest > 0.0f ? 20 - ilogbf(largest) : 0;
        const float scale = ldexpf(1.0f, exponent);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            if (mode == 0) atomicAdd(&float_bins[warp][bins[j]], values[j]);
            else if (mode == 1) { if (bins[j] == 0) hot += values[j]; else atomicAdd(&float_bins[warp][bins[j]], values[j]); }
            else if (mode == 2) atomicAdd(&int_bins[warp][bins[j]], __float2int_rn(values[j] * 1048576.0f));
            else if (mode == 3) atomicAdd(&int_bins[warp][bins[j]], __float2int_rn(values[j] * scale));
            else hot += values[j];
        }
        if (mode == 3) {
            __syncwarp();
            const float unscale = ldexpf(1.0f, -exponent);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int c = lane + 32 * j;
                const int count = int_bins[warp][c];
                if (count != 0) { float_bins[warp][c] += (float)count * unscale; int_bins[warp][c] = 0; }
            }
            __syncwarp();
        }
    }
    __syncthreads();
    float total = hot;
    for (int w = 0; w < 8; ++w) total += float_bins[w][threadIdx.x] + (float)int_bins[w][threadIdx.x];
    atomicAdd(out + threadIdx.x, total);
}
"""

MODES = ("float atomics", "float atomics, cell 0 in a register", "int atomics", "int atomics, flushed", "no histogram")


def main() -> None:
    kernel = torch.cuda._compile_kernel(SOURCE, "probe")
    n = 1 << 28
    v = torch.randn(n, device="cuda")
    uniform = torch.randint(0, 256, (n,), device="cuda")
    distributions = {
        "uniform": uniform,
        "half in cell 0": torch.where(torch.rand(n, device="cuda") < 0.5, 0, uniform),
        "16 cells": torch.randint(120, 136, (n,), device="cuda"),
    }
    out = torch.zeros(256, device="cuda")
    blocks = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), f"{n} elements (float32 v, uint8 cell), {blocks} blocks of 256 threads")
    for name, cells in distributions.items():
        cells = cells.to(torch.uint8)
        for mode, label in enumerate(MODES):
            def run():
                kernel(grid=(blocks, 1, 1), block=(256, 1, 1), args=[cells, v, out, n, mode])
            run()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                run()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 10
            print(f"{name:15s} {label:36s} {ms:6.3f} ms {n / ms / 1e6:5.0f} G elements/s")


if __name__ == "__main__":
    main()
