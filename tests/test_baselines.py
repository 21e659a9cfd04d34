"""The LSQ baseline: values on its grid, LSQ's gradients and gradient scale, initialisation."""

import pytest
import torch

from ddq.baselines import LSQQuantizer


def test_forward_rounds_to_the_grid_and_clips():
    q = LSQQuantizer(bits=3, signedness="signed")
    x = torch.randn(1000) * 3
    q.initialize(x)
    step = q.step.item()
    y = q(x)
    codes = y / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)
    assert codes.round().min() >= -4 and codes.round().max() <= 3  # y/step carries float rounding (3.0000002)
    assert q.levels().shape == (1, 8)


def test_unsigned_auto_and_per_channel_init():
    q = LSQQuantizer(bits=4, signedness="auto")
    x = torch.rand(64)
    q.initialize(x)
    assert q.signedness == "unsigned" and q.bounds == (0, 15)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / 15**0.5, rel=1e-5)
    w = torch.randn(5, 7)
    qw = LSQQuantizer(bits=4, signedness="signed", channels=5)
    qw.initialize(w)
    torch.testing.assert_close(qw.step, 2 * w.abs().mean(dim=1) / 7**0.5)


def test_step_gradient_is_lsq_with_gradient_scale():
    q = LSQQuantizer(bits=2, signedness="signed")
    q.initialize(torch.ones(4))
    with torch.no_grad():
        q.step.fill_(1.0)
    x = torch.tensor([0.4, 1.6, -3.0, 5.0])
    q(x).sum().backward()
    # LSQ: ∂x_q/∂s = round(x/s) − x/s inside, −Q_n or Q_p when clipped (Q_n = 2, Q_p = 1 here);
    # gradient scale 1/√(numel·Q_p) = 1/2. Only 0.4 is inside; 1.6 and 5 clip high, −3 clips low.
    expected = ((0 - 0.4) + 1 + 1 - 2) / 2
    assert q.step.grad.item() == pytest.approx(expected, abs=1e-6)


def test_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(bits=0)
    with pytest.raises(ValueError, match="signed grid"):
        LSQQuantizer(bits=1, signedness="signed")


def test_bad_input_gets_the_same_clear_errors_as_ddq():
    with pytest.raises(ValueError, match="empty batch"):
        LSQQuantizer(4)(torch.zeros(0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        LSQQuantizer(4)(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="per-channel quantizer of 4 channels got x of shape"):
        LSQQuantizer(4, channels=4)(torch.randn(3, 5))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        LSQQuantizer(4)(torch.arange(4))
    quantizer = LSQQuantizer(4)
    quantizer(torch.randn(8))
    assert quantizer(torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="per-channel"):
        weights = LSQQuantizer(4, channels=2)
        weights(torch.randn(2, 3))
        weights(torch.randn(3, 3))


@pytest.mark.parametrize("bits", (4.5, True, "4", None))
def test_bits_must_be_an_int(bits):
    with pytest.raises(ValueError, match="bits must be an int in"):
        LSQQuantizer(bits)
