"""Spec §5: every int_gemm backend (and every arm_ref path) bit-exact with the NumPy golden."""

from __future__ import annotations

import numpy as np
import pytest

from ddq.deploy import int_gemm
from ddq.deploy.int_gemm import check_int_gemm_args, int_gemm_numpy
from int_gemm_cases import (gpu_uncompilable_tiles, interpreter_nibble_paths, interpreter_paths, packed_arguments,
                            random_case, register_lut_tile)
from kernel_cases import DEVICE

c_backend = pytest.importorskip("ddq.deploy.c_backend")


def c_paths() -> list[str]:
    try:
        return c_backend.available_paths()
    except RuntimeError:
        return []


def run_all(*args) -> tuple[np.ndarray, np.ndarray]:
    """The golden result, after checking that C (every path, per-call and prepared weights) and Triton give the same bits."""
    checked = check_int_gemm_args(*args)
    want_acc, want_codes = int_gemm_numpy(checked)
    results = {f"c/{path}": c_backend.int_gemm_c(checked, path) for path in c_paths()}
    if c_paths():
        prepared = c_backend.PreparedWeights(checked.codes_w, checked.lut_w)
        results |= {f"c/{path}/prepared": c_backend.int_gemm_prepared(checked, prepared, path) for path in c_paths()}
    results["triton"] = int_gemm(*args, backend="triton")
    for name, (acc, codes) in results.items():
        np.testing.assert_array_equal(acc, want_acc, err_msg=f"{name} acc")
        np.testing.assert_array_equal(codes, want_codes, err_msg=f"{name} codes")
    return want_acc, want_codes


@pytest.mark.parametrize("seed", range(6))
def test_random_cases(seed):
    rng = np.random.default_rng(seed)
    for _ in range(6):
        bits_x, bits_w = (int(b) for b in rng.integers(1, 9, 2))
        m, n, k = int(rng.integers(1, 24)), int(rng.integers(1, 24)), int(rng.integers(1, 700))
        run_all(*random_case(rng, m, n, k, bits_x, bits_w, bool(rng.integers(2)), realistic=bool(rng.integers(2))))


def test_every_bitwidth_and_bits_out_with_odd_shapes():
    rng = np.random.default_rng(7)
    for bits_x in range(1, 9):
        for bits_w in range(1, 9):
            case = random_case(rng, 7, 13, int(rng.integers(1, 300)), bits_x, bits_w, bits_x % 2 == 0)
            case[8] = (bits_x + bits_w) % 8 + 1
            case[7][:5] = [1, 17, 100, 200, 255]
            run_all(*case)


def test_rounding_ties_and_the_clamp_edge():
    """Row 0 has acc = 0, so z = offset: ties (z + 2^(s−1) = j·2^s) round up, z < −2^(s−1) gives 0."""
    for shift in (1, 2, 7, 30, 53):
        half, scale = 1 << (shift - 1), 1 << shift
        targets = [-half - 1, -half, -half + 1, scale - half, 7 * scale - half, 255 * scale - half, 256 * scale - half,
                   3 * scale - half - 1]
        expected = [0, 0, 0, 1, 7, 255, 255, 2]
        n = len(targets)
        codes_x = np.array([[0], [1]], dtype=np.uint8)
        lut_x = np.array([0, 1], dtype=np.int8)
        codes_w = np.zeros((n, 1), dtype=np.uint8)
        lut_w = np.ones((n, 2), dtype=np.int8)
        mult = np.full(n, 1 if shift < 30 else 0, dtype=np.int32)
        offset = np.array(targets, dtype=np.int64)
        _, codes = run_all(codes_x, lut_x, codes_w, lut_w, mult, offset, shift, np.zeros(n, np.int32), 8)
        np.testing.assert_array_equal(codes[0], expected)


@pytest.mark.parametrize("signed_x", [False, True])
@pytest.mark.parametrize("weight", [-128, 127, -127])
def test_maximum_magnitude_at_the_k_limit(signed_x, weight):
    k = 65536
    codes_x = np.zeros((2, k), dtype=np.uint8)
    lut_x = np.array([-128, 127], dtype=np.int8) if signed_x else np.array([255, 0], dtype=np.uint8)
    codes_w = np.full((3, k), 15, dtype=np.uint8)
    lut_w = np.full((3, 16), weight, dtype=np.int8)
    mult = np.full(3, (1 << 30) - 1, dtype=np.int32)
    offset = np.array([(1 << 61) - 1, -(1 << 61) + 1, 0], dtype=np.int64)
    acc, _ = run_all(codes_x, lut_x, codes_w, lut_w, mult, offset, 61, np.array([0, 100, 255], np.int32), 8)
    assert acc[0, 0] == weight * int(lut_x.astype(np.int64)[0]) * k


def test_k_equal_one_and_i_min_above_zero():
    rng = np.random.default_rng(3)
    for bits_out in range(1, 9):
        case = random_case(rng, 5, 9, 1, 8, 8, False)
        case[7] = np.full(9, 37 * bits_out % 256, dtype=np.int32)
        case[8] = bits_out
        run_all(*case)


@pytest.mark.parametrize("decode", [0, 1])
@pytest.mark.parametrize("predecode", [False, True])
def test_triton_decode_variants(decode, predecode):
    """Both weight-decode variants (global LUT gather, tl.gather) and both activation modes agree."""
    if decode == 1:
        skip_on_gpu_if_interpreter_only("dot register LUT")
    rng = np.random.default_rng(11)
    for bits_w in (1, 2, 3, 4):
        case = random_case(rng, 19, 21, 333, 4, bits_w, bits_w % 2 == 1)
        want_acc, want_codes = int_gemm_numpy(check_int_gemm_args(*case))
        acc, codes = _triton_run(case, bits_w, register_lut_tile(decode), predecode)
        np.testing.assert_array_equal(acc, want_acc)
        np.testing.assert_array_equal(codes, want_codes)


def _triton_run(case, bits_w, config, predecode=True):
    from ddq_kernels.int_gemm import int_gemm_packed

    acc, codes = int_gemm_packed(*packed_arguments(case, bits_w, DEVICE), bits_w, case[0].shape[1], config=config,
                                 predecode=predecode)
    return acc.cpu().numpy(), codes.cpu().numpy()


def skip_on_gpu_if_interpreter_only(path: str) -> None:
    if DEVICE == "cuda" and path in gpu_uncompilable_tiles():
        pytest.skip(f"{path}: an interpreter tile that Triton does not compile for the GPU")


@pytest.mark.parametrize("path", list(interpreter_paths()))
def test_triton_paths_every_weight_bitwidth(path):
    """Each kernel path, forced by its config, on odd shapes, both activation table types, i_min > 0."""
    skip_on_gpu_if_interpreter_only(path)
    rng = np.random.default_rng(list(interpreter_paths()).index(path))
    config = interpreter_paths()[path]
    for bits_w in range(1, 9):
        m = 1 if config.block_m == 1 and bits_w % 3 == 0 else int(rng.integers(2, 20))
        k = int(rng.integers(1, 400))
        case = random_case(rng, m, int(rng.integers(2, 40)), k, int(rng.integers(1, 9)), bits_w, bits_w % 2 == 0,
                           realistic=bits_w % 4 != 0)
        case[7][:2] = [3, 250]
        want = int_gemm_numpy(check_int_gemm_args(*case))
        got = _triton_run(case, bits_w, config, predecode=bits_w != 5)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{path} acc, bits_w={bits_w}, k={k}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"{path} codes, bits_w={bits_w}, k={k}")


@pytest.mark.parametrize("path", list(interpreter_paths()))
def test_triton_paths_k_edges(path):
    """K of one code, a partial last byte, exactly one tile, one past a tile and a split boundary."""
    skip_on_gpu_if_interpreter_only(path)
    rng = np.random.default_rng(5)
    config = interpreter_paths()[path]
    for k, bits_w, signed_x in ((1, 1, False), (7, 2, True), (63, 3, False), (64, 8, True), (65, 8, False),
                                (129, 1, True), (193, 4, False)):
        case = random_case(rng, 3, 5, k, 8, bits_w, signed_x)
        want = int_gemm_numpy(check_int_gemm_args(*case))
        got = _triton_run(case, bits_w, config)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{path} acc, k={k}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"{path} codes, k={k}")


def test_default_config_size_heuristic():
    """Decode once from DECODE_ONCE_MIN_M (NIBBLE_DECODE_ONCE_MIN_M for nibble-decodable weights);
    tensor-core-free GEMV for M = 1; in-load decode in between."""
    from ddq_kernels.int_gemm import DECODE_ONCE_MIN_M, NIBBLE_DECODE_ONCE_MIN_M, default_config

    assert default_config(DECODE_ONCE_MIN_M, 64, 4, 32).decode_once
    assert not default_config(DECODE_ONCE_MIN_M - 1, 64, 4, 32).decode_once
    assert default_config(1, 64, 4, 32).block_m == 1
    assert default_config(16, 64, 4, 32).block_m > 1
    assert default_config(NIBBLE_DECODE_ONCE_MIN_M, 64, 4, 32, nibble_ptx=True).decode_once
    assert not default_config(NIBBLE_DECODE_ONCE_MIN_M - 1, 64, 4, 32, nibble_ptx=True).decode_once


@pytest.mark.parametrize("path", list(interpreter_nibble_paths()))
def test_triton_nibble_ptx_paths(path):
    """The prmt/dp4a paths (nibble_ptx.py, emulated under the interpreter): 3- and 4-bit weights, both table
    types, K with padding codes inside the last int32 word (K mod 8 = 7) or none, i_min > 0."""
    skip_on_gpu_if_interpreter_only(path)
    m, config = interpreter_nibble_paths()[path]
    rng = np.random.default_rng(13)
    # (n, k) = (16, 128): tiles cover the weights exactly (the unmasked EVEN loads).
    for bits_w, signed_x, n, k in ((4, False, 19, 183), (3, True, 19, 183), (4, True, 19, 64), (3, False, 16, 128)):
        case = random_case(rng, m, n, k, 5, bits_w, signed_x)
        want = int_gemm_numpy(check_int_gemm_args(*case))
        got = _triton_run(case, bits_w, config)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{path} acc, bits_w={bits_w} k={k}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"{path} codes, bits_w={bits_w} k={k}")


def test_compiler_failures_name_the_config_and_other_errors_pass_through(monkeypatch):
    """int_gemm_packed turns Triton's compile failures (a pass-manager failure, a CompilationError) into a
    ValueError naming the TileConfig, and lets every other error of a launch through unchanged."""
    from ddq_kernels import int_gemm as module

    case = random_case(np.random.default_rng(16), 3, 5, 64, 4, 4, True)
    config = module.TileConfig(16, 16, 32)
    for raised, expected, message in ((RuntimeError("PassManager::run failed"), ValueError, "cannot compile the kernel of TileConfig"),
                                      (RuntimeError("CUDA error: an illegal memory access"), RuntimeError, "illegal memory access")):
        def failing_launch(*args, error=raised):
            raise error

        monkeypatch.setattr(module, "_decode_in_load", failing_launch)
        with pytest.raises(expected, match=message):
            module.int_gemm_packed(*packed_arguments(case, 4, DEVICE), 4, 64, config=config)


def test_nibble_ptx_decode_is_refused_where_it_cannot_run():
    """DECODE_NIBBLE_PTX reads int32 words of 4-bit codes: 2-bit containers, or rows that are not whole words,
    are a clear error when asked for (the default config never picks it there)."""
    from ddq_kernels.int_gemm import DECODE_NIBBLE_PTX, TileConfig, int_gemm_packed

    rng = np.random.default_rng(12)
    for bits_w, k in ((2, 64), (4, 60)):
        case = random_case(rng, 3, 5, k, 4, bits_w, True)
        with pytest.raises(ValueError, match="DECODE_NIBBLE_PTX needs 4-bit containers"):
            int_gemm_packed(*packed_arguments(case, bits_w, DEVICE), bits_w, k, config=TileConfig(16, 16, 32, decode=DECODE_NIBBLE_PTX))


def test_nibble_mma_decode_is_refused_where_it_cannot_run():
    """DECODE_NIBBLE_MMA is CUDA C (NVRTC) for M <= 16 over 4-bit words: asked for elsewhere (M = 17, 2-bit
    containers, or the CPU interpreter where there is no GPU) it is a clear error, never a wrong result."""
    from ddq_kernels.int_gemm import DECODE_NIBBLE_MMA, TileConfig, int_gemm_packed

    rng = np.random.default_rng(15)
    config = TileConfig(16, 64, 64, decode=DECODE_NIBBLE_MMA)
    cases = [(17, 4, ValueError, "M <= 16"), (3, 2, ValueError, "4-bit containers")]
    if DEVICE == "cpu":
        cases.append((3, 4, RuntimeError, "CUDA C kernel compiled by NVRTC"))
    for m, bits_w, error, message in cases:
        case = random_case(rng, m, 5, 64, 4, bits_w, True)
        with pytest.raises(error, match=message):
            int_gemm_packed(*packed_arguments(case, bits_w, DEVICE), bits_w, 64, config=config)


def test_triton_backend_pads_nibble_rows_to_whole_words():
    """backend="triton" packs 4-bit containers in rows of whole int32 words (zero codes past K) so every 3-
    and 4-bit layer can take the nibble decode; other widths keep the spec layout. The padded rows still
    unpack to the codes, and the backend still equals the golden on such K."""
    from ddq.deploy.packing import pack, unpack
    from ddq.deploy.triton_backend import packed_for_triton

    rng = np.random.default_rng(14)
    for bits_w, k in ((4, 61), (3, 9), (4, 64), (2, 61), (8, 61)):
        codes = rng.integers(0, 1 << bits_w, (5, k), dtype=np.uint8)
        packed = packed_for_triton(codes, bits_w)
        spec = pack(codes, bits_w)
        if bits_w in (3, 4):
            assert packed.shape[1] % 4 == 0 and packed.shape[1] - spec.shape[1] < 4
            assert not packed[:, spec.shape[1]:].any()
        else:
            assert packed.shape == spec.shape
        np.testing.assert_array_equal(unpack(packed[:, :spec.shape[1]], bits_w, k), codes)
    for m in (1, 5, 70):
        case = random_case(rng, m, 13, 61, 4, 4, m % 2 == 0)
        want = int_gemm_numpy(check_int_gemm_args(*case))
        got = int_gemm(*case, backend="triton")
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
