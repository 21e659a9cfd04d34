"""`DDQQuantizer(lut_levels=True)`: every level on spec §5's integer level table, straight-through.

The exported integer model replaces each level V by round(V/s)·s (int8 with s = max|V|/127, uint8 with
s = max V/255 when all levels are ≥ 0); with lut_levels the float model uses those very levels, so the
two compute the same thing up to float32 rounding (docs/deploy.md, tests/test_deploy_agreement.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddq.quantizer import DDQQuantizer

MODES = ("symmetric", "unsigned", "affine")


def quantizer_with_residuals(mode: str, channels, bits: int, lut_levels: bool, seed: int = 0) -> DDQQuantizer:
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn((channels or 1, 40), generator=generator) * torch.linspace(0.5, 2.0, channels or 1)[:, None]
    first = first.abs() if mode == "unsigned" else first + (0.7 if mode == "affine" else 0.0)
    quantizer = DDQQuantizer(mode, channels=channels, init_bits=bits, min_bits=1, learn_bits=False, lut_levels=lut_levels)
    quantizer(first if channels else first.reshape(-1))
    with torch.no_grad():
        quantizer.residuals.copy_(torch.randn(quantizer.residuals.shape, generator=generator) * 0.3)
    return quantizer


def table_scale(levels: np.ndarray, per_channel: bool) -> tuple[np.ndarray, bool]:
    """Spec §5's s for each group's levels (float64), and whether the table is unsigned: weights (per
    channel) always int8, activations (per tensor) uint8 when every level is ≥ 0."""
    top = np.abs(levels).max(axis=1)
    unsigned = not per_channel and bool((levels >= -1e-6 * top[:, None]).all())
    return (levels.max(axis=1) / 255 if unsigned else top / 127), unsigned


@pytest.mark.parametrize("channels", (None, 3), ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", (1, 2, 3, 4, 7, 8))
def test_levels_lie_on_the_integer_table(bits, mode, channels):
    quantizer = quantizer_with_residuals(mode, channels, bits, lut_levels=True, seed=bits)
    levels = quantizer.levels().double().numpy()
    scale, unsigned = table_scale(levels, per_channel=channels is not None)
    ratio = levels / scale[:, None]
    # Float32 puts a level within ~1e-5 table steps of the integer; the table's own rounding is up to 0.5.
    np.testing.assert_allclose(ratio, np.round(ratio), rtol=0, atol=1e-3)
    assert np.abs(ratio).max() <= (255 if unsigned else 127) + 1e-3
    if mode == "unsigned":
        assert unsigned or channels is not None
        assert (np.abs(levels[:, 0]) <= 1e-6 * quantizer.range_top.detach().numpy()).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", (2, 4))
def test_correction_is_straight_through(bits, mode):
    """Same outputs and parameter gradients as a plain quantizer holding the corrected residuals: the
    correction is a constant per block, so it moves the levels without changing any gradient formula."""
    snapped = quantizer_with_residuals(mode, 3, bits, lut_levels=True, seed=bits)
    plain = quantizer_with_residuals(mode, 3, bits, lut_levels=False, seed=bits)
    with torch.no_grad():
        plain.residuals.copy_(snapped.residuals + snapped.lut_level_correction(snapped._zero_anchored_residuals()))
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 1.5
    v = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    outputs = []
    for quantizer in (snapped, plain):
        out = quantizer(x)
        out.backward(v)
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)
    for name in ("range_top", "residuals"):
        torch.testing.assert_close(getattr(snapped, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-6)


def test_off_by_default_and_leaves_the_residuals_alone():
    quantizer = quantizer_with_residuals("symmetric", 2, 3, lut_levels=False)
    assert not DDQQuantizer().lut_levels
    torch.testing.assert_close(quantizer.effective_residuals(), quantizer.residuals, rtol=0, atol=0)


def test_compiles_fullgraph_and_follows_the_bitwidth():
    """No graph break and no recompile when the learned bitwidth changes: the correction reads the
    bitwidth as a tensor (no host sync)."""
    quantizer = quantizer_with_residuals("unsigned", None, 4, lut_levels=True)
    quantizer.gate_logits.requires_grad_(True)
    x = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 2
    compiled = torch.compile(quantizer, fullgraph=True, backend="aot_eager")
    for bits in (4, 2):
        with torch.no_grad():
            quantizer.gate_logits.copy_(torch.arange(8, 0, -1, dtype=torch.float32) - (8 - bits) - 0.5)
        with torch._dynamo.config.patch(error_on_recompile=bits == 2):
            got = compiled(x)
        torch.testing.assert_close(got, quantizer(x), rtol=0, atol=0)
        levels = quantizer.levels().double().numpy()[0]
        assert len(levels) == 2**bits
        np.testing.assert_allclose(levels / (levels.max() / 255), np.round(levels / (levels.max() / 255)), rtol=0, atol=1e-3)
