"""The NVRTC-compiled CUDA kernels' sources compile, on a machine without a GPU.

On a GPU the kernels are compiled by `torch.cuda._compile_kernel` (NVRTC) at their first call, and a source
NVRTC rejects (it lacks parts of the host compiler's C++, e.g. `offsetof`) makes the GPU paths fall back to
Triton or fail their tests. Here every kernel family is compiled for sm_90 with the options that wrapper
passes, through the NVRTC library of the `nvidia-cuda-nvrtc` wheel (the `test` extra on x86-64 Linux), so a
CPU-only CI run catches such a source before it reaches the device.
"""

import ctypes
import glob
import os

import pytest
import torch

from ddq_kernels import (linear_backward_input_cuda, linear_backward_weight_cuda, linear_forward_cuda,
                         linear_forward_wgmma, nibble_mma_gemv, shared_histogram)

# What torch.cuda._compile_kernel adds to the architecture: torch.utils.cpp_extension.COMMON_NVCC_FLAGS
# less the one NVRTC does not take (--expt-relaxed-constexpr).
TORCH_NVRTC_OPTIONS = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                       "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
ARCHITECTURE = "--gpu-architecture=sm_90"  # the kernels' target (H100/H200); sm_90 SASS also checks ptxas
WGMMA_ARCHITECTURE = "--gpu-architecture=sm_90a"  # wgmma needs the architecture-specific target


def load_nvrtc() -> ctypes.CDLL | None:
    """The NVRTC library of an installed `nvidia-cuda-nvrtc` wheel, its builtins loaded first (NVRTC opens
    them by name, and a wheel's directory is not on the loader's path)."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for library in sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*"))):
            for builtins in glob.glob(os.path.join(os.path.dirname(library), "libnvrtc-builtins.so.*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(library)
    return None


NVRTC = load_nvrtc()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason="no NVRTC library (pip install nvidia-cuda-nvrtc)")


def compile_for_sm90(source: str, architecture: str = ARCHITECTURE) -> tuple[bool, str]:
    """(compiled, NVRTC's log) for one source, compiled to sm_90 (or sm_90a) SASS as on the device."""
    options = [option.encode() for option in (architecture, *TORCH_NVRTC_OPTIONS)]
    program = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernel.cu", 0, None, None) == 0
    try:
        status = NVRTC.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetProgramLog(program, log)
        if status == 0:
            NVRTC.nvrtcGetCUBINSize(program, ctypes.byref(size))
            assert size.value > 0, "NVRTC compiled the source but produced no sm_90 code"
        return status == 0, log.value.decode(errors="replace")
    finally:
        NVRTC.nvrtcDestroyProgram(ctypes.byref(program))


def fused_source(dtype: torch.dtype, n: int, k: int, weight_gradient: bool) -> str:
    """The FUSED kernel's source as `linear_backward_input_cuda` builds it for W_q (n, k)."""
    contraction = linear_backward_input_cuda.padded_contraction(n, weight_gradient)
    tile = linear_backward_input_cuda.column_tile(k, n, weight_gradient)
    stages = linear_backward_input_cuda.default_stages(n, tile)
    return linear_backward_input_cuda.kernel_source(dtype, contraction, stages, weight_gradient, tile)


def forward_source(dtype: torch.dtype, n: int) -> str:
    return linear_forward_cuda.kernel_source(dtype, tuple(linear_forward_cuda.layout(n).items()))


def weight_source(dtype: torch.dtype, n: int) -> str:
    return linear_backward_weight_cuda.kernel_source(dtype, tuple(linear_backward_weight_cuda.layout(n).items()))


def gemv_source(m_tiles: int, signed_x: bool) -> str:
    module = nibble_mma_gemv
    return module.kernel_source(m_tiles, signed_x, module.ROW_TILES, module.WARPS_N, module.WARPS_K, module.STAGES,
                                module.L2_PREFETCH)


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# One case per compile-time switch of each family: dtype, ∂W_q or not, wide/narrow tile, one or two load
# buffers, small and largest N; integer or float bins and x_q written or not; signed or unsigned x.
SOURCES = {
    "fused-bf16-N64-dW-K576": lambda: fused_source(BF16, 64, 576, True),
    "fused-fp16-N64-K576": lambda: fused_source(FP16, 64, 576, False),
    "fused-bf16-N192-dW-K32-narrow": lambda: fused_source(BF16, 192, 32, True),
    "fused-fp16-N256-dW-K576": lambda: fused_source(FP16, 256, 576, True),
    "fused-bf16-N200-K32": lambda: fused_source(BF16, 200, 32, False),
    "fused-bf16-N8-dW-K32": lambda: fused_source(BF16, 8, 32, True),
    "forward-bf16-N64": lambda: forward_source(BF16, 64),
    "forward-fp16-N200": lambda: forward_source(FP16, 200),
    "forward-bf16-N8": lambda: forward_source(BF16, 8),
    "weight-bf16-N64": lambda: weight_source(BF16, 64),
    "weight-fp16-N248": lambda: weight_source(FP16, 248),
    "shared-bf16-integer-bins": lambda: shared_histogram.kernel_source(BF16, BF16, True),
    "shared-bf16-integer-bins-x_q": lambda: shared_histogram.kernel_source(BF16, BF16, True, True),
    "shared-bf16-float-bins": lambda: shared_histogram.kernel_source(BF16, BF16, False),
    "shared-fp16-float-bins-x_q": lambda: shared_histogram.kernel_source(FP16, FP16, False, True),
    "shared-fp32-float-bins": lambda: shared_histogram.kernel_source(FP32, FP32, False),
    "gemv-int8-M16": lambda: gemv_source(2, True),
    "gemv-uint8-M8": lambda: gemv_source(1, False),
}


@needs_nvrtc
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_kernel_source_compiles_for_sm90(name):
    compiled, log = compile_for_sm90(SOURCES[name]())
    assert compiled, f"{name} does not compile under NVRTC:\n{log}"


WGMMA_SOURCES = {
    "wgmma-bf16-N256": lambda: linear_forward_wgmma.kernel_source(BF16, 256),
    "wgmma-fp16-N96": lambda: linear_forward_wgmma.kernel_source(FP16, 96),
    "wgmma-bf16-N8": lambda: linear_forward_wgmma.kernel_source(BF16, 8),
    "wgmma-bf16-N200": lambda: linear_forward_wgmma.kernel_source(BF16, 200),
}


@needs_nvrtc
@pytest.mark.parametrize("name", sorted(WGMMA_SOURCES))
def test_wgmma_source_compiles_for_sm90a(name):
    """The wgmma forward compiles for sm_90a without a ptxas note that its products are serialized (C7514/C7515:
    an instruction other than wgmma touching the accumulators between a product and its wait)."""
    compiled, log = compile_for_sm90(WGMMA_SOURCES[name](), WGMMA_ARCHITECTURE)
    assert compiled, f"{name} does not compile under NVRTC:\n{log}"
    assert "serialized" not in log, log


@needs_nvrtc
def test_compile_check_reports_what_nvrtc_rejects():
    """The check above can fail: NVRTC has no offsetof builtin, which nvcc accepts."""
    source = ('struct Bins { unsigned int counts[256]; float scale; };\n'
              'constexpr unsigned int SCALE_OFFSET = __builtin_offsetof(Bins, scale);\n'
              'extern "C" __global__ void kernel(unsigned int* out) { *out = SCALE_OFFSET; }\n')
    compiled, log = compile_for_sm90(source)
    assert not compiled and "__builtin_offsetof" in log
