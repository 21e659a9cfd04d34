"""CPU benchmark of arm_ref (DDQ_SPEC.md Section 5) against ONNX Runtime's MatMulInteger, one thread each,
in the same process: GEMV 1×4096×4096 and 16×4096×4096 with 8-bit and 4-bit LUT weights.

MatMulInteger (uint8 activations × int8 weights → int32, weights a prepacked initializer) is the
baseline for both weight widths; arm_ref additionally decodes weight codes through per-channel LUTs
and requantises. arm_ref runs twice: per call on packed codes (the LUT decode inside every call), and
on prepared weights (`arm_ref_prepare_weights`, run once before timing, as ONNX Runtime prepacks its
weights once at session creation; neither preparation is timed). Needs `pip install onnxruntime onnx` (benchmark-only). Run as a script (JSON) or with
`pytest benchmarks --benchmark-only`.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import platform
import time

import numpy as np
import pytest

from ddq.deploy import c_backend
from ddq.deploy.packing import pack

K = N = 4096
ROUNDS = 5


def arm_ref_call(m: int, bits_w: int, path: str = "auto", prepared: bool = False):
    """A zero-overhead closure over one arm_ref_int_gemm call, or arm_ref_int_gemm_prepared on weights
    prepared here, outside the timed call (arguments and workspace built once)."""
    rng = np.random.default_rng(0)
    codes_x = rng.integers(0, 16, (m, K), dtype=np.uint8)
    lut_x = rng.integers(0, 256, 16).astype(np.uint8)
    codes_w = rng.integers(0, 1 << bits_w, (N, K), dtype=np.uint8)
    packed = pack(codes_w, bits_w)
    lut_w = rng.integers(-127, 128, (N, 1 << bits_w)).astype(np.int8)
    mult = rng.integers(0, 1 << 10, N).astype(np.int32)
    offset = rng.integers(-(1 << 30), 1 << 30, N).astype(np.int64)
    i_min = np.zeros(N, np.int32)
    keep = [codes_x, lut_x, packed, lut_w, mult, offset, i_min]
    args = c_backend.GemmArgsStruct(*[a.ctypes.data for a in keep], m, N, K, packed.nbytes, 4, 0, bits_w, 20, 4)
    lib = c_backend.library()
    workspace = np.empty(lib.arm_ref_workspace_bytes(m, K), np.uint8)
    acc = np.empty((m, N), np.int32)
    codes = np.empty((m, N), np.uint8)
    path_code, args_ref = c_backend.PATHS[path], ctypes.byref(args)
    pointers = (workspace.ctypes.data, workspace.nbytes, acc.ctypes.data, codes.ctypes.data)
    if prepared:
        weights = c_backend.PreparedWeights(codes_w, lut_w)
        keep.append(weights)
        function = functools.partial(lib.arm_ref_int_gemm_prepared, args_ref, weights.buffer.ctypes.data,
                                     weights.nbytes, path_code)
    else:
        function = functools.partial(lib.arm_ref_int_gemm, args_ref, path_code)

    def call():
        status = function(*pointers)
        if status:
            raise RuntimeError(c_backend.status_text(status))

    call.keep = (keep, workspace, acc, codes, args)
    return call


def onnxruntime_call(m: int):
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, (K, N)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "gemv",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, N])],
        initializer=[numpy_helper.from_array(weights, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.integers(0, 256, (m, K), dtype=np.uint8)}
    return lambda: session.run(None, feed)


def median_seconds(call, seconds: float = 1.0) -> float:
    for _ in range(5):
        call()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return float(np.median(times)) / 1e9


def cpu_description() -> tuple[str, list[str]]:
    """CPU model name and the /proc/cpuinfo flags the x86 paths test for (Linux; else the platform name)."""
    wanted = {"avx512f", "avx512bw", "avx512_vnni", "avx512vbmi", "amx_tile", "amx_int8"}
    try:
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model or platform.machine(), sorted(wanted.intersection(flags))


def run_all() -> dict:
    import onnxruntime

    model, flags = cpu_description()
    results = {"machine": platform.machine(), "cpu": model, "cpu_flags_used": flags,
               "arm_ref_best_path": c_backend.best_path(), "onnxruntime": onnxruntime.__version__, "threads": 1}
    # The contenders alternate over several rounds and each keeps its best median, so that load from
    # other processes on a shared machine hits all of them alike.
    for m in (1, 16):
        calls = {"ort": onnxruntime_call(m), 8: arm_ref_call(m, 8), 4: arm_ref_call(m, 4),
                 "8p": arm_ref_call(m, 8, prepared=True), "4p": arm_ref_call(m, 4, prepared=True)}
        best = {name: float("inf") for name in calls}
        for _ in range(ROUNDS):
            for name, call in calls.items():
                best[name] = min(best[name], median_seconds(call, 0.3))
        results[f"arm_ref_path_m{m}"] = c_backend.auto_path(m)
        results[f"ort_matmulinteger_m{m}_us"] = best["ort"] * 1e6
        for bits_w in (8, 4):
            results[f"arm_ref_{bits_w}bit_m{m}_us"] = best[bits_w] * 1e6
            results[f"speedup_{bits_w}bit_m{m}"] = best["ort"] / best[bits_w]
            results[f"arm_ref_prepared_{bits_w}bit_m{m}_us"] = best[f"{bits_w}p"] * 1e6
            results[f"speedup_prepared_{bits_w}bit_m{m}"] = best["ort"] / best[f"{bits_w}p"]
    return results


onnxruntime = pytest.importorskip("onnxruntime") if __name__ != "__main__" else None


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("bits_w", [8, 4])
@pytest.mark.parametrize("prepared", [False, True])
def test_bench_arm_ref(benchmark, m, bits_w, prepared):
    benchmark(arm_ref_call(m, bits_w, prepared=prepared))


@pytest.mark.parametrize("m", [1, 16])
def test_bench_onnxruntime_matmulinteger(benchmark, m):
    benchmark(onnxruntime_call(m))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    results = run_all()
    with open(parser.parse_args().out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
