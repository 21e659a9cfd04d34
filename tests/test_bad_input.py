"""Bad input to `ddq_quantize` and `DDQQuantizer`: a clear error naming the problem, never a crash or a
silent level.

What happens, by kind of input:
- wrong dtype (x not float32/float16/bfloat16, a parameter not float32): TypeError naming the tensor;
- a parameter on another device than x: ValueError naming both devices ('meta' stands in for a GPU);
- wrong parameter shapes, axis other than None/0: ValueError with the expected and the actual shape;
- min_bits / init_bits outside their range or not an int: ValueError;
- non-finite x (NaN, ±inf): those elements quantize to NaN, the others are unaffected, and their
  input gradient is 0 (spec §3: in = 0 for them);
- non-finite parameters, hi <= lo in a group, or hi − lo beyond float32: ValueError on CPU tensors (on a GPU
  only with DDQ_CHECK_VALUES=1, since the check reads values back to the host);
- grad_scale, or a quantizer's learn_bits / learn_levels / lut_levels, not a bool: TypeError;
- an empty x: an empty result and zero parameter gradients;
- a first batch that cannot initialise a quantizer (non-finite, empty, wrong channel count): an error,
  and the quantizer stays uninitialised.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddq import functional
from ddq.functional import ddq_quantize
from ddq.quantizer import DDQQuantizer, graded_gate_logits


def parameters(groups: int = 1, bits: int = 4):
    return [torch.full((groups,), -1.0), torch.full((groups,), 1.0), torch.zeros(groups, 256), graded_gate_logits(bits)]


@pytest.mark.parametrize("dtype", (torch.float64, torch.int32, torch.uint8, torch.bool, torch.complex64))
def test_x_of_a_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"x must be a float32, float16 or bfloat16 tensor, got torch\."):
        ddq_quantize(torch.zeros(4, dtype=dtype), *parameters())


def test_x_that_is_not_a_tensor():
    with pytest.raises(TypeError, match="x must be"):
        ddq_quantize([0.0, 1.0], *parameters())


@pytest.mark.parametrize("index, name", [(0, "lo"), (1, "hi"), (2, "residuals"), (3, "gate_logits")])
@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16, torch.int64))
def test_parameter_of_a_wrong_dtype(index, name, dtype):
    args = parameters()
    args[index] = args[index].to(dtype)
    with pytest.raises(TypeError, match=rf"{name} must be a float32 tensor, got {dtype}"):
        ddq_quantize(torch.zeros(4), *args)


@pytest.mark.parametrize("index, name", [(0, "lo"), (1, "hi"), (2, "residuals"), (3, "gate_logits")])
def test_parameter_on_another_device(index, name):
    args = parameters()
    args[index] = args[index].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        ddq_quantize(torch.zeros(4), *args)


def test_x_on_another_device_than_the_parameters():
    with pytest.raises(ValueError, match="lo is on cpu but x is on meta"):
        ddq_quantize(torch.zeros(4, device="meta"), *parameters())


def test_everything_on_one_other_device_propagates_shapes():
    """On 'meta' (no data) the op runs its fake kernel: shapes and dtypes, and no value check."""
    out = ddq_quantize(torch.zeros(3, 5, device="meta", dtype=torch.bfloat16), *[p.to("meta") for p in parameters(3)], axis=0)
    assert out.device.type == "meta" and out.shape == (3, 5) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "axis, x_shape, index, bad_shape",
    [
        (None, (4, 5), 0, (2,)),
        (None, (4, 5), 1, ()),
        (None, (4, 5), 2, (1, 255)),
        (None, (4, 5), 2, (256,)),
        (None, (4, 5), 3, (7,)),
        (0, (4, 5), 0, (5,)),
        (0, (4, 5), 1, (1,)),
        (0, (4, 5), 2, (1, 256)),
    ],
)
def test_parameter_of_a_wrong_shape(axis, x_shape, index, bad_shape):
    groups = 1 if axis is None else x_shape[0]
    args = parameters(groups)
    args[index] = torch.zeros(bad_shape)
    name = ("lo", "hi", "residuals", "gate_logits")[index]
    with pytest.raises(ValueError, match=rf"{name} must have shape .* got {tuple(bad_shape)}".replace("(", r"\(").replace(")", r"\)")):
        ddq_quantize(torch.zeros(x_shape), *args, axis=axis)


@pytest.mark.parametrize("axis", (1, -1, "0"))
def test_unsupported_axis(axis):
    with pytest.raises(ValueError, match="axis must be None"):
        ddq_quantize(torch.zeros(4, 5), *parameters(4), axis=axis)


def test_per_channel_on_a_scalar():
    with pytest.raises(ValueError, match="axis=0 needs x with at least one dimension"):
        ddq_quantize(torch.tensor(0.5), *parameters(1), axis=0)


@pytest.mark.parametrize("min_bits", (-1, 9, 2.0, True, "2", None))
def test_min_bits_outside_the_allowed_range(min_bits):
    with pytest.raises(ValueError, match=r"min_bits must be an int in \[0, 8\]"):
        ddq_quantize(torch.zeros(4), *parameters(), min_bits=min_bits)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("axis", (None, 0))
def test_non_finite_x_gives_nan_never_a_level(dtype, axis):
    x = torch.tensor([[0.3, math.nan, -0.7], [math.inf, 0.1, -math.inf]], dtype=dtype, requires_grad=True)
    groups = 1 if axis is None else 2
    args = [p.requires_grad_() for p in parameters(groups)]
    out = ddq_quantize(x, *args, axis=axis)
    non_finite = ~torch.isfinite(x.detach())
    assert torch.isnan(out[non_finite]).all()
    assert torch.isfinite(out[~non_finite]).all()
    finite_only = ddq_quantize(torch.where(non_finite, 0.0, x.detach()), *parameters(groups), axis=axis)
    assert torch.equal(out[~non_finite], finite_only[~non_finite])
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad[non_finite], torch.zeros(3, dtype=dtype))
    assert torch.equal(x.grad[~non_finite], torch.ones(3, dtype=dtype))


@pytest.mark.parametrize("index, name", [(0, "lo"), (1, "hi"), (2, "residuals"), (3, "gate_logits")])
@pytest.mark.parametrize("value", (math.nan, math.inf, -math.inf))
def test_non_finite_parameters(index, name, value):
    args = parameters(3)
    args[index].view(-1)[1] = value
    with pytest.raises(ValueError, match=rf"{name} contains non-finite values"):
        ddq_quantize(torch.zeros(3, 4), *args, axis=0)


@pytest.mark.parametrize("lo, hi", [(1.0, 1.0), (1.0, -1.0), (0.0, -0.0)])
def test_hi_not_above_lo(lo, hi):
    args = parameters(3)
    args[0][2], args[1][2] = lo, hi
    with pytest.raises(ValueError, match="needs hi > lo in every group; group 2 has"):
        ddq_quantize(torch.zeros(3, 4), *args, axis=0)


def test_value_checks_run_on_cpu_and_elsewhere_only_on_request(monkeypatch):
    monkeypatch.delenv("DDQ_CHECK_VALUES", raising=False)
    assert functional.values_are_checked(torch.device("cpu"))
    assert not functional.values_are_checked(torch.device("meta"))
    monkeypatch.setenv("DDQ_CHECK_VALUES", "1")
    assert functional.values_are_checked(torch.device("meta"))


@pytest.mark.parametrize("axis, shape", [(None, (0, 3)), (0, (0, 3)), (None, (2, 0))])
def test_empty_x(axis, shape):
    groups = 1 if axis is None else shape[0]
    x = torch.zeros(shape, requires_grad=True)
    args = [p.requires_grad_() for p in parameters(groups)]
    out = ddq_quantize(x, *args, axis=axis)
    assert out.shape == shape
    out.sum().backward()
    for p in args:
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="signed"), "mode must be one of"),
        (dict(min_bits=9), "min_bits must be an int in"),
        (dict(min_bits=-1), "min_bits must be an int in"),
        (dict(min_bits=2.5), "min_bits must be an int in"),
        (dict(init_bits=9), "init_bits must be an int in"),
        (dict(init_bits=1, min_bits=2), "init_bits must be an int in"),
        (dict(init_bits=True), "init_bits must be an int in"),
        (dict(mode="unsigned", min_bits=0, init_bits=4), "unsigned mode needs min_bits >= 1"),
        (dict(mode="auto", min_bits=0, init_bits=4), "unsigned mode needs min_bits >= 1"),
        (dict(channels=0), "channels must be None or a positive int"),
        (dict(channels=2.0), "channels must be None or a positive int"),
    ],
)
def test_quantizer_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDQQuantizer(**kwargs)


@pytest.mark.parametrize(
    "channels, first, error, message",
    [
        (None, torch.tensor([0.5, math.nan]), ValueError, "NaN or infinite"),
        (None, torch.tensor([0.5, math.inf]), ValueError, "NaN or infinite"),
        (None, torch.zeros(0), ValueError, "empty batch"),
        (None, torch.zeros(4, dtype=torch.int64), TypeError, "x must be a float32"),
        (4, torch.zeros(2, 8), ValueError, "per-channel quantizer of 4 channels got x of shape"),
        (4, torch.tensor(1.0), ValueError, "per-channel quantizer of 4 channels"),
    ],
)
def test_quantizer_rejects_a_first_batch_it_cannot_initialise_from(channels, first, error, message):
    quantizer = DDQQuantizer("auto", channels=channels)
    with pytest.raises(error, match=message):
        quantizer(first)
    assert not quantizer._initialized and not bool(quantizer.initialized) and quantizer.mode == "auto"


def test_quantizer_on_a_tensor_of_another_device():
    quantizer = DDQQuantizer("symmetric", channels=2)
    quantizer(torch.randn(2, 3))
    with pytest.raises(ValueError, match="is on cpu but x is on meta"):
        quantizer(torch.randn(2, 3, device="meta"))


def test_quantizer_after_initialisation_still_checks_channels():
    quantizer = DDQQuantizer("symmetric", channels=2)
    quantizer(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"lo must have shape \(3,\)"):
        quantizer(torch.randn(3, 2))


@pytest.mark.parametrize("grad_scale", (None, 1, "yes"))
def test_grad_scale_must_be_a_bool(grad_scale):
    with pytest.raises(TypeError, match="grad_scale must be a bool"):
        ddq_quantize(torch.zeros(4), *parameters(), grad_scale=grad_scale)
    with pytest.raises(TypeError, match="grad_scale must be a bool"):
        DDQQuantizer(grad_scale=grad_scale)


@pytest.mark.parametrize("flag", ("learn_bits", "learn_levels", "lut_levels"))
def test_quantizer_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        DDQQuantizer(**{flag: None})


def test_a_range_wider_than_float32_is_rejected():
    lo, hi, residuals, logits = parameters()
    with pytest.raises(ValueError, match="hi − lo overflows float32 in group 0"):
        ddq_quantize(torch.zeros(4), torch.full((1,), -3e38), torch.full((1,), 3e38), residuals, logits)
