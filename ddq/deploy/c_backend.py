"""backend="c": arm_ref (the C library of DDQ_SPEC.md Section 5) through ctypes."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from ddq.deploy.int_gemm import GemmArgs, check_requantization
from ddq.deploy.packing import pack

PATHS = {"auto": 0, "scalar": 1, "neon": 2, "avx512": 3, "amx": 4}


class GemmArgsStruct(ctypes.Structure):
    """Mirror of arm_ref_gemm_args in arm_ref/include/arm_ref.h (field order matters)."""

    _fields_ = [
        ("codes_x", ctypes.c_void_p),
        ("lut_x", ctypes.c_void_p),
        ("packed_w", ctypes.c_void_p),
        ("lut_w", ctypes.c_void_p),
        ("mult", ctypes.c_void_p),
        ("offset", ctypes.c_void_p),
        ("i_min", ctypes.c_void_p),
        ("m", ctypes.c_size_t),
        ("n", ctypes.c_size_t),
        ("k", ctypes.c_size_t),
        ("packed_size", ctypes.c_size_t),
        ("bits_x", ctypes.c_int32),
        ("lut_x_signed", ctypes.c_int32),
        ("bits_w", ctypes.c_int32),
        ("shift", ctypes.c_int32),
        ("bits_out", ctypes.c_int32),
    ]


class TensorStruct(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_char * 8), ("ndim", ctypes.c_int32), ("shape", ctypes.c_uint64 * 8),
                ("data", ctypes.c_void_p), ("nbytes", ctypes.c_size_t)]


class FileStruct(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_size_t), ("header_size", ctypes.c_size_t),
                ("tensor_count", ctypes.c_size_t)]


class ArmRefError(ValueError):
    """arm_ref rejected its arguments; the message is the library's own status text."""


def library_path() -> Path:
    """The arm_ref shared library that `pip install` builds next to this file."""
    candidates = sorted(Path(__file__).parent.glob("_arm_ref*.so"))
    if not candidates:
        raise RuntimeError(
            "backend 'c' needs the arm_ref shared library (ddq/deploy/_arm_ref*.so), which is missing: "
            "build it with `pip install -e .` (needs a C compiler)")
    return candidates[0]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.arm_ref_status_string.restype = ctypes.c_char_p
    lib.arm_ref_path_name.restype = ctypes.c_char_p
    lib.arm_ref_workspace_bytes.restype = ctypes.c_size_t
    lib.arm_ref_workspace_bytes.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    lib.arm_ref_int_gemm.argtypes = [ctypes.POINTER(GemmArgsStruct), ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                                     ctypes.c_void_p, ctypes.c_void_p]
    lib.arm_ref_prepared_weights_bytes.restype = ctypes.c_size_t
    lib.arm_ref_prepared_weights_bytes.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
    lib.arm_ref_prepare_weights.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.arm_ref_int_gemm_prepared.argtypes = [ctypes.POINTER(GemmArgsStruct), ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                              ctypes.c_void_p]
    lib.arm_ref_file_parse.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(FileStruct)]
    lib.arm_ref_file_tensor.argtypes = [ctypes.POINTER(FileStruct), ctypes.c_char_p, ctypes.POINTER(TensorStruct)]
    return lib


def status_text(status: int) -> str:
    return library().arm_ref_status_string(status).decode()


def available_paths() -> list[str]:
    """Kernel paths this CPU can run ("scalar" always; "avx512", "amx" or "neon" where supported)."""
    lib = library()
    return [name for name, code in PATHS.items() if name != "auto" and lib.arm_ref_path_available(code)]


def best_path() -> str:
    return library().arm_ref_path_name(library().arm_ref_best_path()).decode()


def auto_path(m: int) -> str:
    """The path that "auto" runs for M activation rows."""
    lib = library()
    lib.arm_ref_auto_path.argtypes = [ctypes.c_size_t]
    return lib.arm_ref_path_name(lib.arm_ref_auto_path(m)).decode()


def _pointer(array: np.ndarray) -> int:
    return array.ctypes.data


def path_code(path: str) -> int:
    """The arm_ref_path value (spec §5's C library) of a kernel path name, a key of PATHS; for any other
    name a ValueError listing the valid ones."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    return PATHS[path]


def call_int_gemm(codes_x: np.ndarray, lut_x: np.ndarray, packed_w: np.ndarray, lut_w: np.ndarray, mult: np.ndarray,
                  offset: np.ndarray, i_min: np.ndarray, *, m: int, n: int, k: int, bits_x: int, lut_x_signed: bool,
                  bits_w: int, shift: int, bits_out: int, path: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """arm_ref_int_gemm on packed weights, with only the C library's own checks (raises ArmRefError)."""
    code = path_code(path)
    arrays = [np.ascontiguousarray(a) for a in (codes_x, lut_x, packed_w, lut_w, mult, offset, i_min)]
    args = GemmArgsStruct(*[_pointer(a) for a in arrays], m, n, k, arrays[2].nbytes, bits_x, int(lut_x_signed),
                          bits_w, shift, bits_out)
    lib = library()
    workspace_size = lib.arm_ref_workspace_bytes(m, k)
    sized = workspace_size <= arrays[0].nbytes + (1 << 20) * (max(m, 1) + 16)
    workspace = np.empty(workspace_size if sized else 1, dtype=np.uint8)
    acc = np.empty((m, n), dtype=np.int32)
    codes = np.empty((m, n), dtype=np.uint8)
    status = lib.arm_ref_int_gemm(ctypes.byref(args), code, _pointer(workspace), workspace_size if sized else 0,
                                  _pointer(acc), _pointer(codes))
    if status != 0:
        raise ArmRefError(f"arm_ref: {status_text(status)}")
    return acc, codes


def int_gemm_c(args: GemmArgs, path: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Spec §5 through arm_ref on validated arguments (weights packed here)."""
    m, n, k = args.shape
    return call_int_gemm(args.codes_x, args.lut_x, pack(args.codes_w, args.bits_w), args.lut_w, args.mult,
                         args.offset, args.i_min, m=m, n=n, k=k, bits_x=args.bits_x,
                         lut_x_signed=args.lut_x.dtype == np.int8, bits_w=args.bits_w, shift=args.shift,
                         bits_out=args.bits_out, path=path)


PREPARED_ALIGN = 64


class PreparedWeights:
    """One layer's weights prepared once for arm_ref (`arm_ref_prepare_weights`, docs/deploy.md: for 8-bit
    containers the LUT-decoded int8 weights in the kernels' tile order, else the packed codes), then run
    many times with `run` (DDQ_SPEC.md Section 5, bit-identical with every backend). The weights are
    checked here exactly as a per-call `int_gemm` checks them."""

    def __init__(self, codes_w: np.ndarray, lut_w: np.ndarray):
        codes_w = np.ascontiguousarray(codes_w)
        lut_w = np.ascontiguousarray(lut_w)
        if not isinstance(lut_w, np.ndarray) or lut_w.dtype != np.int8 or lut_w.ndim != 2:
            raise TypeError(f"lut_w must be an int8 [N, 2^b_w] array, got {getattr(lut_w, 'dtype', type(lut_w))} "
                            f"of shape {getattr(lut_w, 'shape', None)}")
        entries = lut_w.shape[1]
        bits_w = entries.bit_length() - 1
        if entries < 2 or entries > 256 or entries != 1 << bits_w:
            raise ValueError(f"lut_w must have 2^b entries for b in 1..8, got {entries}")
        packed = pack(codes_w, bits_w)
        self.n, self.k = codes_w.shape
        if lut_w.shape[0] != self.n:
            raise ValueError(f"lut_w must be [N, 2^b_w] with N = {self.n}, got shape {lut_w.shape}")
        self.bits_w = bits_w
        lib = library()
        self.nbytes = lib.arm_ref_prepared_weights_bytes(self.n, self.k, bits_w)
        if self.nbytes == 0:
            raise ValueError(f"cannot prepare weights of shape {codes_w.shape} at {bits_w} bits (K ≤ 65536)")
        # The C library wants the buffer on a 64-byte boundary (tile loads): over-allocate and slice.
        self._storage = np.empty(self.nbytes + PREPARED_ALIGN, dtype=np.uint8)
        start = -self._storage.ctypes.data % PREPARED_ALIGN
        self.buffer = self._storage[start:start + self.nbytes]
        status = lib.arm_ref_prepare_weights(_pointer(packed), packed.nbytes, _pointer(lut_w), self.n, self.k, bits_w,
                                             _pointer(self.buffer), self.nbytes)
        if status != 0:
            raise ArmRefError(f"arm_ref: {status_text(status)}")

    def run(self, codes_x: np.ndarray, lut_x: np.ndarray, mult: np.ndarray, offset: np.ndarray, shift: int,
            i_min: np.ndarray, bits_out: int, path: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Spec §5 on these weights: (acc int32[M, N], codes_out uint8[M, N]). The array shapes and dtypes, and
        the requantisation constants' ranges (as `int_gemm` checks them: shift and bits_out would wrap in the C
        struct's int32 fields), are checked here; the codes by the C library (ArmRefError with its status text)."""
        code = path_code(path)
        codes_x, lut_x, mult, offset, i_min = (np.ascontiguousarray(a) for a in (codes_x, lut_x, mult, offset, i_min))
        expected = {"codes_x": (codes_x, (np.uint8,), 2), "lut_x": (lut_x, (np.int8, np.uint8), 1),
                    "mult": (mult, (np.int32,), 1), "offset": (offset, (np.int64,), 1), "i_min": (i_min, (np.int32,), 1)}
        for name, (array, dtypes, ndim) in expected.items():
            if array.dtype not in dtypes or array.ndim != ndim:
                raise TypeError(f"{name} must be a {ndim}-D {' or '.join(np.dtype(d).name for d in dtypes)} array, "
                                f"got {array.dtype} of shape {array.shape}")
        if codes_x.shape[1] != self.k:
            raise ValueError(f"codes_x must be [M, K] with K = {self.k} (the prepared weights'), got {codes_x.shape}")
        for name, array in (("mult", mult), ("offset", offset), ("i_min", i_min)):
            if array.shape != (self.n,):
                raise ValueError(f"{name} must have shape [N] = ({self.n},), got {array.shape}")
        entries = lut_x.shape[0]
        bits_x = entries.bit_length() - 1
        if entries < 2 or entries > 256 or entries != 1 << bits_x:
            raise ValueError(f"lut_x must have 2^b entries for b in 1..8, got {entries}")
        shift, bits_out = check_requantization(mult, offset, shift, i_min, bits_out)
        m = codes_x.shape[0]
        args = GemmArgsStruct(_pointer(codes_x), _pointer(lut_x), None, None, _pointer(mult), _pointer(offset),
                              _pointer(i_min), m, self.n, self.k, 0, bits_x, int(lut_x.dtype == np.int8), self.bits_w,
                              shift, bits_out)
        lib = library()
        workspace_size = lib.arm_ref_workspace_bytes(m, self.k)
        sized = workspace_size <= codes_x.nbytes + (1 << 20) * (max(m, 1) + 16)
        workspace = np.empty(workspace_size if sized else 1, dtype=np.uint8)
        acc = np.empty((m, self.n), dtype=np.int32)
        codes = np.empty((m, self.n), dtype=np.uint8)
        status = lib.arm_ref_int_gemm_prepared(ctypes.byref(args), _pointer(self.buffer), self.nbytes, code,
                                               _pointer(workspace), workspace_size if sized else 0, _pointer(acc),
                                               _pointer(codes))
        if status != 0:
            raise ArmRefError(f"arm_ref: {status_text(status)}")
        return acc, codes


def int_gemm_prepared(args: GemmArgs, prepared: PreparedWeights, path: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Spec §5 through arm_ref on validated arguments whose weights `prepared` holds (prepared from
    args.codes_w and args.lut_w: the caller keeps them together)."""
    return prepared.run(args.codes_x, args.lut_x, args.mult, args.offset, args.shift, args.i_min, args.bits_out, path)


def check_file(data: bytes, names: list[str]) -> None:
    """Parse an exported file with arm_ref's C reader and look up `names`; raises ArmRefError when corrupt."""
    lib = library()
    buffer = np.frombuffer(data, dtype=np.uint8) if data else np.zeros(1, dtype=np.uint8)
    parsed = FileStruct()
    status = lib.arm_ref_file_parse(_pointer(buffer), len(data), ctypes.byref(parsed))
    if status != 0:
        raise ArmRefError(f"arm_ref: {status_text(status)}")
    for name in names:
        tensor = TensorStruct()
        status = lib.arm_ref_file_tensor(ctypes.byref(parsed), name.encode(), ctypes.byref(tensor))
        if status != 0:
            raise ArmRefError(f"arm_ref: {status_text(status)} ({name})")
