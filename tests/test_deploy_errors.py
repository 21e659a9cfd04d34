"""Spec §5 argument contract: bad arguments get clear errors from Python and from arm_ref itself."""

from __future__ import annotations

import numpy as np
import pytest

from ddq.deploy import int_gemm
from ddq.deploy.packing import pack

c_backend = pytest.importorskip("ddq.deploy.c_backend")


def valid_args(k: int = 5, n: int = 3) -> dict:
    return dict(codes_x=np.zeros((2, k), np.uint8), lut_x=np.arange(16, dtype=np.int8),
                codes_w=np.zeros((n, k), np.uint8), lut_w=np.ones((n, 4), np.int8), mult=np.ones(n, np.int32),
                offset=np.zeros(n, np.int64), shift=4, i_min=np.zeros(n, np.int32), bits_out=8)


BAD_ARGUMENTS = [
    ({"codes_x": np.zeros((2, 5), np.int8)}, TypeError, "codes_x must have dtype uint8"),
    ({"lut_x": np.arange(16, dtype=np.int16)}, TypeError, "lut_x must have dtype"),
    ({"lut_w": np.ones((3, 4), np.uint8)}, TypeError, "lut_w must have dtype int8"),
    ({"mult": np.ones(3, np.int64)}, TypeError, "mult must have dtype int32"),
    ({"offset": np.zeros(3, np.int32)}, TypeError, "offset must have dtype int64"),
    ({"codes_x": np.zeros(5, np.uint8)}, ValueError, "codes_x must be 2-D"),
    ({"codes_w": np.zeros((3, 6), np.uint8)}, ValueError, "codes_w must be"),
    ({"lut_x": np.arange(12, dtype=np.int8)}, ValueError, "2\\^b entries"),
    ({"lut_w": np.ones((2, 4), np.int8)}, ValueError, "lut_w must be"),
    ({"mult": np.ones(4, np.int32)}, ValueError, "mult must have shape"),
    ({"codes_x": np.full((2, 5), 16, np.uint8)}, ValueError, "codes_x out of range"),
    ({"codes_w": np.full((3, 5), 4, np.uint8)}, ValueError, "codes_w out of range"),
    ({"mult": np.full(3, 1 << 30, np.int32)}, ValueError, "mult must be in"),
    ({"mult": np.full(3, -1, np.int32)}, ValueError, "mult must be in"),
    ({"offset": np.full(3, 1 << 61, np.int64)}, ValueError, "offset"),
    ({"offset": np.full(3, np.iinfo(np.int64).min, np.int64)}, ValueError, "offset"),
    ({"i_min": np.full(3, 256, np.int32)}, ValueError, "i_min"),
    ({"shift": 0}, ValueError, "shift"),
    ({"shift": 62}, ValueError, "shift"),
    ({"shift": 4.0}, TypeError, "shift must be an integer"),
    ({"bits_out": 9}, ValueError, "bits_out"),
    ({"codes_x": [[0]]}, TypeError, "numpy array or torch tensor"),
]


@pytest.mark.parametrize("change, error, message", BAD_ARGUMENTS)
@pytest.mark.parametrize("backend", ["numpy", "c", "triton"])
def test_bad_arguments(change, error, message, backend):
    with pytest.raises(error, match=message):
        int_gemm(**(valid_args() | change), backend=backend)


def test_k_limit():
    args = valid_args(k=65537)
    with pytest.raises(ValueError, match="K = 65537 exceeds"):
        int_gemm(**args)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        int_gemm(**valid_args(), backend="fortran")


def raw_c_call(**change):
    """arm_ref_int_gemm with only the C library's own checks."""
    args = valid_args()
    fields = dict(m=2, n=3, k=5, bits_x=4, lut_x_signed=True, bits_w=2, shift=4, bits_out=8) | change
    packed = change.pop("packed", pack(args["codes_w"], 2))
    return c_backend.call_int_gemm(args["codes_x"], args["lut_x"], packed, args["lut_w"], args["mult"],
                                   args["offset"], args["i_min"], **{k: v for k, v in fields.items() if k != "packed"})


@pytest.mark.parametrize("change, message", [
    ({"k": 65537}, "K exceeds 65536"),
    ({"bits_x": 9}, "bits_x, bits_w and bits_out"),
    ({"bits_out": 0}, "bits_x, bits_w and bits_out"),
    ({"shift": 62}, "shift must be in 1..61"),
    ({"bits_x": 3, "k": 2}, "packed weight size"),
    ({"packed": np.full((3, 2), 0xFF, np.uint8)}, "padding bits"),
    ({"path": "neon" if "avx512" in c_backend.available_paths() else "avx512"}, "path"),
])
def test_arm_ref_rejects_bad_arguments_itself(change, message):
    with pytest.raises(c_backend.ArmRefError, match=message):
        raw_c_call(**change)


def test_arm_ref_rejects_out_of_range_codes_itself():
    args = valid_args()
    codes_x = np.full((2, 5), 9, np.uint8)
    with pytest.raises(c_backend.ArmRefError, match="activation code"):
        c_backend.call_int_gemm(codes_x, args["lut_x"][:8], pack(args["codes_w"], 2), args["lut_w"], args["mult"],
                                args["offset"], args["i_min"], m=2, n=3, k=5, bits_x=3, lut_x_signed=True, bits_w=2,
                                shift=4, bits_out=8)
    packed3 = np.array([[0x88, 0x00, 0x00]] * 3, np.uint8)
    with pytest.raises(c_backend.ArmRefError, match="weight code"):
        c_backend.call_int_gemm(args["codes_x"], args["lut_x"], packed3, np.ones((3, 8), np.int8), args["mult"],
                                args["offset"], args["i_min"], m=2, n=3, k=5, bits_x=4, lut_x_signed=True, bits_w=3,
                                shift=4, bits_out=8)


def test_unknown_c_path_names_the_valid_ones():
    message = "path must be one of auto, scalar, neon, avx512, amx, got 'AVX512'"
    with pytest.raises(ValueError, match=message):
        raw_c_call(path="AVX512")
    from ddq.deploy.int_gemm import check_int_gemm_args

    with pytest.raises(ValueError, match=message):
        c_backend.int_gemm_c(check_int_gemm_args(**valid_args()), path="AVX512")
