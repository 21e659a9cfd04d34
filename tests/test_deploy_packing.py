"""Spec §5 weight packing: layout, round trips, and corrupt input."""

from __future__ import annotations

import numpy as np
import pytest

from ddq.deploy import container_bits, pack, packed_row_bytes, unpack


def test_layout_is_little_endian_within_bytes_with_rows_on_byte_boundaries():
    codes = np.array([[1, 2, 3], [3, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(pack(codes, 2), [[0b111001], [0b010011]])
    np.testing.assert_array_equal(pack(codes, 4), [[0x21, 0x03], [0x03, 0x01]])
    np.testing.assert_array_equal(pack(np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1]], np.uint8), 1), [[0b1101, 1]])
    np.testing.assert_array_equal(pack(codes, 6), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip(bits):
    rng = np.random.default_rng(bits)
    for k in (1, 7, 8, 9, 64, 333):
        codes = rng.integers(0, 1 << bits, (5, k), dtype=np.uint8)
        packed = pack(codes, bits)
        assert packed.shape == (5, packed_row_bytes(k, bits)) == (5, (k * container_bits(bits) + 7) // 8)
        np.testing.assert_array_equal(unpack(packed, bits, k), codes)


def test_bad_input_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="out of range"):
        pack(np.array([[8]], np.uint8), 3)
    with pytest.raises(TypeError, match="uint8"):
        pack(np.array([[1]], np.int32), 3)
    with pytest.raises(ValueError, match="bits"):
        pack(np.array([[1]], np.uint8), 9)
    with pytest.raises(ValueError, match="padding"):
        unpack(np.array([[0x10]], np.uint8), 4, 1)
    with pytest.raises(ValueError, match="does not fit 3 bits"):
        unpack(np.array([[0x08]], np.uint8), 3, 2)
    with pytest.raises(ValueError, match="expected"):
        unpack(np.zeros((1, 3), np.uint8), 4, 4)


@pytest.mark.parametrize("k", [-5, -1, 2.0, True, "8", None])
def test_packed_row_bytes_rejects_a_k_that_is_not_a_count(k):
    with pytest.raises(ValueError, match="K must be a non-negative integer"):
        packed_row_bytes(k, 4)


def test_packed_row_bytes_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        packed_row_bytes(8, 0)
    assert packed_row_bytes(np.int64(0), 4) == 0
