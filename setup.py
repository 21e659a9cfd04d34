"""Builds arm_ref (the C integer kernels, DDQ_SPEC.md Section 5) as a shared library inside ddq.deploy.

Metadata lives in pyproject.toml; this file only adds the C library. It is a plain shared object
loaded with ctypes (ddq.deploy.c_backend), compiled without -march flags: the vector paths are
selected at run time, so the same build runs on any x86-64 or aarch64 CPU.
"""

from setuptools import Extension, setup

ARM_REF_SOURCES = ["arm_ref/src/arm_ref.c", "arm_ref/src/prepared.c", "arm_ref/src/kernel_avx512.c", "arm_ref/src/kernel_neon.c",
                   "arm_ref/src/file.c"]
ARM_REF_HEADERS = ["arm_ref/include/arm_ref.h", "arm_ref/src/arm_ref_internal.h", "arm_ref/src/int_gemm_scalar.h"]

setup(
    ext_modules=[
        Extension(
            "ddq.deploy._arm_ref",
            sources=ARM_REF_SOURCES,
            depends=ARM_REF_HEADERS,
            include_dirs=["arm_ref/include", "arm_ref/src"],
            extra_compile_args=["-std=c11", "-O2"],
        )
    ]
)
