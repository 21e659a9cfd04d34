"""arm_ref prepared weights (docs/deploy.md, DDQ_SPEC.md Section 5): bit-identical with the golden on
every path and weight width, and clear errors for bad arguments or a mismatched buffer."""

from __future__ import annotations

import numpy as np
import pytest

from ddq.deploy.int_gemm import check_int_gemm_args, int_gemm_numpy
from int_gemm_cases import random_case

c_backend = pytest.importorskip("ddq.deploy.c_backend")


def _paths() -> list[str]:
    try:
        return c_backend.available_paths() + ["auto"]
    except RuntimeError:
        pytest.skip("arm_ref shared library not built")


def _case(rng, m, n, k, bits_x, bits_w, signed_x):
    return check_int_gemm_args(*random_case(rng, m, n, k, bits_x, bits_w, signed_x))


def _assert_golden(args, prepared, paths):
    want_acc, want_codes = int_gemm_numpy(args)
    for path in paths:
        acc, codes = c_backend.int_gemm_prepared(args, prepared, path)
        np.testing.assert_array_equal(acc, want_acc, err_msg=f"prepared {path} acc")
        np.testing.assert_array_equal(codes, want_codes, err_msg=f"prepared {path} codes")


@pytest.mark.parametrize("bits_w", range(1, 9))
def test_prepared_matches_golden_partial_tiles_and_groups(bits_w):
    """Odd M/N/K around the 16-column tile, the 64-column AMX group, 16-row activation blocks and 64-position
    steps; one preparation serves several activation batches."""
    rng = np.random.default_rng(bits_w)
    paths = _paths()
    for m, n, k in ((1, 1, 1), (3, 17, 65), (17, 65, 130), (5, 63, 1000), (16, 48, 64)):
        args = _case(rng, m, n, k, int(rng.integers(1, 9)), bits_w, bool(rng.integers(2)))
        prepared = c_backend.PreparedWeights(args.codes_w, args.lut_w)
        _assert_golden(args, prepared, paths)
        other = check_int_gemm_args(rng.integers(0, 2, (m + 2, k), dtype=np.uint8),
                                    np.array([-3, 7], dtype=np.int8), args.codes_w, args.lut_w, args.mult,
                                    args.offset, args.shift, args.i_min, args.bits_out)
        _assert_golden(other, prepared, paths)


@pytest.mark.parametrize("signed_x", [False, True])
def test_prepared_maximum_magnitude_at_the_k_limit(signed_x):
    k = 65536
    codes_x = np.zeros((17, k), dtype=np.uint8)
    lut_x = np.array([-128, 127], dtype=np.int8) if signed_x else np.array([255, 0], dtype=np.uint8)
    codes_w = np.full((3, k), 255, dtype=np.uint8)
    lut_w = np.full((3, 256), -128, dtype=np.int8)
    args = check_int_gemm_args(codes_x, lut_x, codes_w, lut_w, np.full(3, (1 << 30) - 1, np.int32),
                               np.array([(1 << 61) - 1, -(1 << 61) + 1, 0], np.int64), 61,
                               np.array([0, 100, 255], np.int32), 8)
    paths = _paths()  # skips first where the arm_ref library is not built
    _assert_golden(args, c_backend.PreparedWeights(codes_w, lut_w), paths)


def test_prepared_errors():
    _paths()
    rng = np.random.default_rng(7)
    args = _case(rng, 2, 5, 40, 4, 8, False)
    prepared = c_backend.PreparedWeights(args.codes_w, args.lut_w)
    with pytest.raises(ValueError, match="K = 40"):
        prepared.run(args.codes_x[:, :39], args.lut_x, args.mult, args.offset, args.shift, args.i_min, 8)
    with pytest.raises(ValueError, match=r"mult must have shape \[N\]"):
        prepared.run(args.codes_x, args.lut_x, args.mult[:4], args.offset, args.shift, args.i_min, 8)
    with pytest.raises(TypeError, match="offset must be"):
        prepared.run(args.codes_x, args.lut_x, args.mult, args.offset.astype(np.int32), args.shift, args.i_min, 8)
    with pytest.raises(ValueError, match=r"shift must be in \[1, 61\], got 62"):
        prepared.run(args.codes_x, args.lut_x, args.mult, args.offset, 62, args.i_min, 8)
    with pytest.raises(c_backend.ArmRefError, match="activation code"):
        prepared.run(args.codes_x + 16, args.lut_x, args.mult, args.offset, args.shift, args.i_min, 8)
    with pytest.raises(ValueError, match="codes out of range"):
        c_backend.PreparedWeights(np.full((2, 3), 8, np.uint8), np.zeros((2, 8), np.int8))
    with pytest.raises(ValueError, match="lut_w must be"):
        c_backend.PreparedWeights(np.zeros((2, 3), np.uint8), np.zeros((3, 8), np.int8))
    with pytest.raises(TypeError, match="lut_w must be an int8"):
        c_backend.PreparedWeights(np.zeros((2, 3), np.uint8), np.zeros((2, 8), np.uint8))
    # A buffer prepared for other weights: the C header check rejects it, never misreads it.
    mismatched = c_backend.PreparedWeights(args.codes_w[:, :32], args.lut_w)
    mismatched.k = 40
    with pytest.raises(c_backend.ArmRefError, match="prepared weights do not match"):
        mismatched.run(args.codes_x, args.lut_x, args.mult, args.offset, args.shift, args.i_min, 8)
    prepared.buffer[3] ^= 1
    with pytest.raises(c_backend.ArmRefError, match="not a valid arm_ref prepared-weights buffer"):
        prepared.run(args.codes_x, args.lut_x, args.mult, args.offset, args.shift, args.i_min, 8)


def test_exported_layer_prepares_once_and_again_after_its_weights_change():
    import importlib
    from types import SimpleNamespace

    export = importlib.import_module("ddq.deploy.export")  # the package re-exports a function of that name

    _paths()
    rng = np.random.default_rng(11)
    args = _case(rng, 3, 20, 70, 4, 8, True)
    layer = SimpleNamespace(prepared_c={})
    first = export._prepared_c(layer, args, slice(None))
    assert export._prepared_c(layer, args, slice(None)) is first
    codes_w = args.codes_w.copy()
    codes_w[0, 0] ^= 1
    changed = check_int_gemm_args(args.codes_x, args.lut_x, codes_w, args.lut_w, args.mult, args.offset, args.shift,
                                  args.i_min, args.bits_out)
    second = export._prepared_c(layer, changed, slice(None))
    assert second is not first
    _assert_golden(changed, second, ["auto"])


@pytest.mark.parametrize("shift, bits_out, message", [
    (2**32 + 16, 8, r"shift must be in \[1, 61\], got 4294967312"),
    (-(2**32) + 16, 8, r"shift must be in \[1, 61\], got -4294967280"),
    (0, 8, r"shift must be in \[1, 61\], got 0"),
    (16, 2**32 + 8, r"bits_out must be in \[1, 8\], got 4294967304"),
    (16, 0, r"bits_out must be in \[1, 8\], got 0"),
    (16, 9, r"bits_out must be in \[1, 8\], got 9"),
])
def test_prepared_rejects_scalars_the_c_struct_would_wrap(shift, bits_out, message):
    """shift and bits_out travel in int32 struct fields: 2^32 + 16 would arrive as 16. Checked as int_gemm does."""
    _paths()
    args = _case(np.random.default_rng(3), 2, 3, 40, 4, 4, False)
    prepared = c_backend.PreparedWeights(args.codes_w, args.lut_w)
    for call in (lambda: prepared.run(args.codes_x, args.lut_x, args.mult, args.offset, shift, args.i_min, bits_out),
                 lambda: check_int_gemm_args(args.codes_x, args.lut_x, args.codes_w, args.lut_w, args.mult, args.offset,
                                             shift, args.i_min, bits_out)):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("array, value, message", [
    ("mult", -1, r"mult must be in \[0, 2\^30\)"),
    ("offset", 1 << 62, "offset must satisfy"),
    ("i_min", 256, r"i_min must be in \[0, 255\]"),
])
def test_prepared_checks_the_requantisation_ranges_as_int_gemm_does(array, value, message):
    """int_gemm's own message (a ValueError from check_requantization), not the C library's ArmRefError."""
    _paths()
    args = _case(np.random.default_rng(4), 2, 3, 40, 4, 4, False)
    constants = {"mult": args.mult.copy(), "offset": args.offset.copy(), "i_min": args.i_min.copy()}
    constants[array][1] = value
    prepared = c_backend.PreparedWeights(args.codes_w, args.lut_w)
    with pytest.raises(ValueError, match=message) as raised:
        prepared.run(args.codes_x, args.lut_x, constants["mult"], constants["offset"], args.shift,
                     constants["i_min"], 8)
    assert raised.type is ValueError


def test_prepared_rejects_an_unknown_path_name():
    _paths()
    args = _case(np.random.default_rng(5), 2, 3, 40, 4, 4, False)
    prepared = c_backend.PreparedWeights(args.codes_w, args.lut_w)
    with pytest.raises(ValueError, match="path must be one of auto, scalar, neon, avx512, amx, got 'AVX512'"):
        prepared.run(args.codes_x, args.lut_x, args.mult, args.offset, args.shift, args.i_min, 8, path="AVX512")
