"""Spec §5's rounding of exported constants, half away from zero, computed exactly: floor(|v| + 0.5)
rounds the sum first and is off by one just below 0.5 and above 2^52 (float64) or 2^23 (float32).
The export (NumPy, float64) and the float model's lut levels (torch, `quantizer_math.round_half_away`)
use the same rule; the integer kernels only see its integers."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from ddq import quantizer_math as qm

export = importlib.import_module("ddq.deploy.export")  # the package re-exports a function of that name

BELOW_HALF_64 = np.nextafter(0.5, 0.0)  # 0.49999999999999994
CASES_64 = [
    (BELOW_HALF_64, 0.0), (-BELOW_HALF_64, 0.0), (2.0**52 + 1, 2.0**52 + 1), (-(2.0**52 + 1), -(2.0**52 + 1)),
    (0.5, 1.0), (-0.5, -1.0), (1.5, 2.0), (-2.5, -3.0), (np.nextafter(2.5, 0.0), 2.0), (2.5000000000000004, 3.0),
    (126.49999999999999, 126.0), (126.5, 127.0), (0.0, 0.0), (2.0**60, 2.0**60), (1e300, 1e300),
]
BELOW_HALF_32 = float(np.nextafter(np.float32(0.5), np.float32(0.0)))  # 0.49999997
CASES_32 = [
    (BELOW_HALF_32, 0.0), (-BELOW_HALF_32, 0.0), (2.0**23 + 1, 2.0**23 + 1), (-(2.0**23 + 1), -(2.0**23 + 1)),
    (0.5, 1.0), (-0.5, -1.0), (254.5, 255.0), (float(np.nextafter(np.float32(254.5), np.float32(0))), 254.0),
]


def test_export_rounding_is_exact_half_away_from_zero():
    values, want = (np.array(column) for column in zip(*CASES_64))
    np.testing.assert_array_equal(export.round_half_away(values), want)


def test_export_rounding_of_the_audit_values():
    np.testing.assert_array_equal(export.round_half_away(np.array([0.49999999999999994, 2**52 + 1])),
                                  [0, 4503599627370497])


def test_export_rounding_matches_python_decimal_rounding_on_random_values():
    from decimal import ROUND_HALF_UP, Decimal

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-300, 300, 2000), np.round(rng.uniform(-300, 300, 500)) + 0.5,
                             rng.uniform(-1, 1, 500) * 2.0**rng.integers(0, 62, 500)])
    want = [float(Decimal(v).quantize(Decimal(1), rounding=ROUND_HALF_UP)) for v in values.tolist()]
    np.testing.assert_array_equal(export.round_half_away(values), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lut_level_rounding_is_exact_half_away_from_zero(dtype):
    cases = CASES_32 if dtype == torch.float32 else CASES_64
    values, want = (torch.tensor(column, dtype=dtype) for column in zip(*cases))
    got = qm.round_half_away(values)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_lut_level_correction_uses_the_exact_rounding(monkeypatch):
    """The quantizer's table snapping goes through quantizer_math.round_half_away (the one tested above)."""
    from ddq.quantizer import DDQQuantizer

    calls = []
    original = qm.round_half_away
    monkeypatch.setattr(qm, "round_half_away", lambda x: calls.append(x.shape) or original(x))
    quantizer = DDQQuantizer("symmetric", channels=3, init_bits=4, lut_levels=True)
    quantizer(torch.randn(3, 10))
    quantizer.levels()
    assert calls
