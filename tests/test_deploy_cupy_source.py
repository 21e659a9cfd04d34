"""backend="cupy" compiles arm_ref's scalar kernel, arm_ref/src/int_gemm_scalar.h, from its text: a checkout
reads it there, and an installed wheel (which has no arm_ref/) reads the copy setup.py's build_py puts
into ddq/deploy. CPU only: the GPU is needed to compile the kernel, not to find its source."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from ddq.deploy import cupy_backend

ROOT = Path(__file__).resolve().parents[1]
SCALAR_KERNEL = ROOT / "arm_ref" / "src" / "int_gemm_scalar.h"


def test_the_checkout_reads_arm_refs_scalar_kernel():
    assert cupy_backend.scalar_source().read_text() == SCALAR_KERNEL.read_text()


def test_the_built_package_carries_the_scalar_kernel_and_reads_its_own_copy(tmp_path):
    build_lib = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build_lib)], cwd=ROOT, check=True,
                   capture_output=True)
    packaged = build_lib / "ddq" / "deploy" / "int_gemm_scalar.h"
    assert packaged.read_text() == SCALAR_KERNEL.read_text()
    module = build_lib / "ddq" / "deploy" / "cupy_backend.py"
    spec = importlib.util.spec_from_file_location("installed_cupy_backend", module)
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert not installed.CHECKOUT_SCALAR_SOURCE.exists()  # as in site-packages: no arm_ref/ beside the package
    assert installed.scalar_source() == packaged.resolve()
