"""Builds arm_ref (the C integer kernels, DDQ_SPEC.md Section 5) as a shared library inside ddq.deploy.

Metadata lives in pyproject.toml; this file only adds the C library, and the scalar kernel's source for
the CuPy backend. The library is a plain shared object loaded with ctypes (ddq.deploy.c_backend),
compiled without -march flags: the vector paths are selected at run time, so the same build runs on any
x86-64 or aarch64 CPU.
"""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ARM_REF_SOURCES = ["arm_ref/src/arm_ref.c", "arm_ref/src/prepared.c", "arm_ref/src/kernel_avx512.c", "arm_ref/src/kernel_neon.c",
                   "arm_ref/src/file.c"]
SCALAR_KERNEL = "arm_ref/src/int_gemm_scalar.h"
ARM_REF_HEADERS = ["arm_ref/include/arm_ref.h", "arm_ref/src/arm_ref_internal.h", SCALAR_KERNEL]


class BuildPyWithScalarKernel(build_py):
    """Also puts arm_ref's scalar kernel into ddq/deploy: the CuPy backend compiles it at run time
    (ddq.deploy.cupy_backend.scalar_source), and an installed wheel has no arm_ref/ beside the package."""

    def run(self):
        super().run()
        if self.editable_mode:  # builds nothing: an editable install reads the checkout's arm_ref/
            return
        self.copy_file(SCALAR_KERNEL, str(Path(self.build_lib) / "ddq" / "deploy" / Path(SCALAR_KERNEL).name))


setup(
    cmdclass={"build_py": BuildPyWithScalarKernel},
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
