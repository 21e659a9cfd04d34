"""Quantized layers: `DDQLinear` and `DDQConv2d` (DDQ_SPEC.md Section 2 granularity).

Each holds a per-output-channel symmetric weight quantizer and a per-tensor input quantizer and
computes the float layer on the quantized weight and input (fake quantization for QAT).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ddq.baselines import LSQQuantizer
from ddq.quantized_conv import quantized_conv2d, recomputes_quantized_input
from ddq.quantizer import DDQQuantizer, is_int

try:  # the fused quantize-and-matmul op; its CUDA body needs Triton (ddq_kernels.registration)
    from ddq_kernels.linear_op import quantized_linear as fused_quantized_linear
except ImportError:
    fused_quantized_linear = None


METHODS = ("ddq", "lsq")
LEARN_BITS = (False, True, "weights", "activations")


def _recorded(layer: nn.Module, output: Tensor) -> Tensor:
    """A layer's MACs per sample are known once its output shape is: note them on the first forward."""
    if layer.macs is None:
        layer.macs = macs_per_sample(layer, output)
    return output


def make_quantizers(
    out_channels: int,
    weight_bits: int = 4,
    act_bits: int = 4,
    act_mode: str = "auto",
    learn_bits: Union[bool, str] = False,
    learn_levels: bool = True,
    min_bits: int = 2,
    grad_scale: bool = True,
    method: str = "ddq",
    range_init: str = "mse",
    weight_max_bits: int = 8,
) -> tuple[nn.Module, nn.Module]:
    """The (weight, input) quantizer pair of a layer: weights per output channel and symmetric.

    method="ddq" builds `DDQQuantizer`s (spec §2); method="lsq" the LSQ baseline at fixed bits, so that
    comparisons run through the same layers. learn_bits: True (both quantizers), "weights" or
    "activations" (that one only; the other stays at its bits), False. min_bits floors each quantizer's
    learned bits, capped at that quantizer's own initial bits (weight_bits=1 gives its weights a floor of 1,
    and leaves the activations' floor at min_bits).
    """
    if learn_bits not in LEARN_BITS or not isinstance(learn_bits, (bool, str)):
        raise ValueError(f"learn_bits must be one of {LEARN_BITS}, got {learn_bits!r}")
    if method == "lsq":
        signedness = {"auto": "auto", "unsigned": "unsigned"}.get(act_mode, "signed")
        return LSQQuantizer(weight_bits, "signed", channels=out_channels), LSQQuantizer(act_bits, signedness)
    if method != "ddq":
        raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")
    common = dict(learn_levels=learn_levels, grad_scale=grad_scale, range_init=range_init)
    weight = DDQQuantizer("symmetric", channels=out_channels, init_bits=weight_bits, max_bits=weight_max_bits,
                          min_bits=_floor(min_bits, weight_bits), learn_bits=learn_bits in (True, "weights"), **common)
    act = DDQQuantizer(act_mode, channels=None, init_bits=act_bits, min_bits=_floor(min_bits, act_bits),
                       learn_bits=learn_bits in (True, "activations"), **common)
    return weight, act


def _floor(min_bits: int, init_bits: int) -> int:
    """min_bits capped at a quantizer's initial bits; other values pass through for DDQQuantizer's checks to name."""
    return min(min_bits, init_bits) if is_int(min_bits) and is_int(init_bits) and 0 <= init_bits else min_bits


class DDQLinear(nn.Linear):
    """nn.Linear with DDQ-quantized weight (per output channel) and input (per tensor)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, **quant: Any) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_quantizer, self.input_quantizer = make_quantizers(out_features, **quant)
        self.to(self.weight.device)
        self.macs: Optional[int] = None

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant: Any) -> "DDQLinear":
        """The quantized layer of `linear`, sharing its weight and bias (as torch.ao's QAT layers do), so that
        tied weights stay tied and frozen ones frozen."""
        return _sharing_parameters(cls(linear.in_features, linear.out_features, linear.bias is not None, **quant), linear)

    def forward(self, x: Tensor) -> Tensor:
        return _recorded(self, self._quantized_forward(x))

    def _quantized_forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and uses_fused_matmul(self):
            return fused_quantized_linear(x, self.weight, self.bias, self.input_quantizer, self.weight_quantizer)
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class DDQConv2d(nn.Conv2d):
    """nn.Conv2d (any groups, depthwise included) with DDQ-quantized weight and input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, **quant: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self.weight_quantizer, self.input_quantizer = make_quantizers(out_channels, **quant)
        self.to(self.weight.device)
        self.macs: Optional[int] = None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant: Any) -> "DDQConv2d":
        """The quantized layer of `conv`, sharing its weight and bias (see `DDQLinear.from_float`)."""
        return _sharing_parameters(cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                       conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, **quant), conv)

    def forward(self, x: Tensor) -> Tensor:
        return _recorded(self, self._quantized_forward(x))

    def _quantized_forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and self.is_pointwise() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                and uses_fused_matmul(self):
            # A 1×1 convolution on channels_last input is DDQLinear's GEMM over the (N·H·W, C) view.
            weight = self.weight.reshape(self.out_channels, self.in_channels)
            y = fused_quantized_linear(x.permute(0, 2, 3, 1), weight, self.bias, self.input_quantizer, self.weight_quantizer)
            return y.permute(0, 3, 1, 2)
        if x.is_cuda and not self.pads_input_channels() and recomputes_quantized_input(self) and uses_ddq_quantizers(self):
            # x is all the backward keeps, as in float training; x_q is recomputed there.
            return quantized_conv2d(self, x, self.weight_quantizer(self.weight))
        x_q, w_q = self.input_quantizer(x), self.weight_quantizer(self.weight)
        if x_q.is_cuda and self.pads_input_channels() and torch.is_grad_enabled() and x_q.requires_grad:
            return self.conv_with_padded_channels(x_q, w_q)
        return self._conv_forward(x_q, w_q, self.bias)

    def pads_input_channels(self) -> bool:
        """A dense convolution over RGB images (a network's stem), whose input gradient cuDNN computes slowly.

        FP training never needs that gradient; DDQ does (the image quantizer's range and levels). With 3
        input channels cuDNN's dgrad took 3.44 ms on ResNet18's stem (batch 256, bf16, channels_last, H100),
        1.79 ms with a fourth, zero channel; the forward and weight gradient are as fast with it
        (`benchmarks/probe_stem_dgrad.py`).
        """
        return self.in_channels == 3 and self.groups == 1

    def conv_with_padded_channels(self, x_q: Tensor, w_q: Tensor) -> Tensor:
        """The convolution of x_q and w_q with a zero channel appended to both: the same output, and
        autograd slices the padded channel's gradient off again."""
        return self._conv_forward(F.pad(x_q, (0, 0, 0, 0, 0, 1)), F.pad(w_q, (0, 0, 0, 0, 0, 1)), self.bias)

    def is_pointwise(self) -> bool:
        """A 1×1, stride-1, unpadded, ungrouped convolution: a plain GEMM over pixels."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and self.padding in ((0, 0), "valid"))


QUANTIZED_LAYERS = (DDQLinear, DDQConv2d)


def _sharing_parameters(layer: nn.Module, float_layer: nn.Module) -> nn.Module:
    """`layer` on float_layer's device with float_layer's own weight and bias in place of its fresh ones."""
    layer.to(device=float_layer.weight.device)
    layer.weight = float_layer.weight
    layer.bias = float_layer.bias
    return layer


def uses_ddq_quantizers(layer: nn.Module) -> bool:
    """Whether both of a layer's quantizers are DDQQuantizers (not the LSQ baseline)."""
    return isinstance(layer.input_quantizer, DDQQuantizer) and isinstance(layer.weight_quantizer, DDQQuantizer)


def uses_fused_matmul(layer: nn.Module) -> bool:
    """Whether a layer's GEMM runs through `torch.ops.ddq.quantized_linear` (DDQ quantizers, op importable)."""
    return fused_quantized_linear is not None and uses_ddq_quantizers(layer)


def macs_per_sample(layer: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates of one sample through a Linear/Conv2d given its output (spec §4 BitOps).

    The output's first dim is the batch where it has one (Linear: 2-D or more, Conv2d: 4-D); an unbatched
    output (Linear: 1-D, Conv2d: 3-D) is one sample. From the shape alone, so an empty batch counts too."""
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features * math.prod(output.shape[1:-1])
    per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return per_output * layer.out_channels * math.prod(output.shape[-2:])
