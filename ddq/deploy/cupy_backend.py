"""backend="cupy": arm_ref's portable scalar kernel (arm_ref/src/int_gemm_scalar.h, unchanged) compiled
for the GPU with CuPy's RawModule, one thread per output (DDQ_SPEC.md Section 5).

It exists to cross-check the Triton kernel on millions of random cases with an independent GPU
implementation that is literally the C reference.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ddq.deploy.int_gemm import GemmArgs
from ddq.deploy.packing import container_bits, pack

# The one source is arm_ref/src/int_gemm_scalar.h; setup.py's build_py copies it into this package, because an
# installed wheel has no arm_ref/ beside it. A checkout (or an editable install) reads the original.
PACKAGED_SCALAR_SOURCE = Path(__file__).resolve().with_name("int_gemm_scalar.h")
CHECKOUT_SCALAR_SOURCE = Path(__file__).resolve().parents[2] / "arm_ref" / "src" / "int_gemm_scalar.h"
THREADS = 256

# NVRTC has no <stdint.h>: the header takes its integer types and function qualifier from here.
PRELUDE = r"""
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
#define ARM_REF_NO_STDINT
#define ARM_REF_FN __device__ __forceinline__ static
"""

KERNEL = r"""
extern "C" __global__ void int_gemm_scalar(const uint8_t *codes_x, const uint8_t *lut_x, int lut_x_signed,
                                           const uint8_t *packed_w, const int8_t *lut_w, const int32_t *mult,
                                           const int64_t *offset, const int32_t *i_min, long long m, long long n,
                                           int k, long long row_bytes, int bits_w, int width, int shift,
                                           int bits_out, int32_t *acc, uint8_t *codes)
{
    long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= m * n)
        return;
    long long row = index / n, col = index % n;
    int32_t sum = arm_ref_dot_scalar(codes_x + row * k, lut_x, lut_x_signed, packed_w + col * row_bytes,
                                     lut_w + (col << bits_w), 0u, (uint32_t)k, (uint32_t)width);
    acc[index] = sum;
    codes[index] = arm_ref_requantize(sum, mult[col], offset[col], shift, i_min[col], bits_out);
}
"""


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError(f"backend 'cupy' needs CuPy with a CUDA GPU ({error})") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as error:  # CuPy raises its own CUDA error types when no driver/GPU is present
        raise RuntimeError(f"backend 'cupy' needs a CUDA GPU, and CuPy sees none ({error})") from None
    return cupy


def scalar_source() -> Path:
    """The arm_ref scalar kernel (spec §5's reference) this backend compiles: the installed package's copy,
    else the checkout's."""
    for path in (PACKAGED_SCALAR_SOURCE, CHECKOUT_SCALAR_SOURCE):
        if path.is_file():
            return path
    raise RuntimeError(f"backend 'cupy' compiles arm_ref's scalar kernel, which is missing: neither "
                       f"{PACKAGED_SCALAR_SOURCE} (installed package) nor {CHECKOUT_SCALAR_SOURCE} (checkout) exists")


@functools.lru_cache(maxsize=1)
def kernel() -> Any:
    cupy = _cupy()
    source = PRELUDE + scalar_source().read_text() + KERNEL
    return cupy.RawModule(code=source, options=("--std=c++14",)).get_function("int_gemm_scalar")


def int_gemm_cupy_packed(codes_x: Any, lut_x: Any, lut_x_signed: bool, packed_w: Any, lut_w: Any, mult: Any,
                         offset: Any, shift: int, i_min: Any, bits_out: int, bits_w: int, k: int) -> tuple[Any, Any]:
    """Spec §5 on CUDA arrays (CuPy arrays or anything exposing __cuda_array_interface__, e.g. torch CUDA
    tensors); lut_x passed as its bytes (uint8 view). Returns CuPy (acc int32[M, N], codes uint8[M, N])."""
    cupy = _cupy()
    arrays = [cupy.ascontiguousarray(cupy.asarray(a)) for a in (codes_x, lut_x, packed_w, lut_w, mult, offset, i_min)]
    codes_x, lut_x, packed_w, lut_w, mult, offset, i_min = arrays
    m, n = codes_x.shape[0], packed_w.shape[0]
    acc = cupy.empty((m, n), dtype=cupy.int32)
    codes = cupy.empty((m, n), dtype=cupy.uint8)
    blocks = (m * n + THREADS - 1) // THREADS
    kernel()((blocks,), (THREADS,), (codes_x, lut_x.view(cupy.uint8), np.int32(lut_x_signed), packed_w, lut_w, mult,
                                     offset, i_min, np.int64(m), np.int64(n), np.int32(k),
                                     np.int64(packed_w.shape[1]), np.int32(bits_w), np.int32(container_bits(bits_w)),
                                     np.int32(shift), np.int32(bits_out), acc, codes))
    return acc, codes


def int_gemm_cupy(args: GemmArgs) -> tuple[np.ndarray, np.ndarray]:
    """Spec §5 through the GPU-compiled scalar C on validated arguments (weights packed here)."""
    cupy = _cupy()
    acc, codes = int_gemm_cupy_packed(cupy.asarray(args.codes_x), cupy.asarray(args.lut_x), args.lut_x.dtype == np.int8,
                                      cupy.asarray(pack(args.codes_w, args.bits_w)), cupy.asarray(args.lut_w),
                                      cupy.asarray(args.mult), cupy.asarray(args.offset), args.shift,
                                      cupy.asarray(args.i_min), args.bits_out, args.bits_w, args.shape[2])
    return cupy.asnumpy(acc), cupy.asnumpy(codes)
