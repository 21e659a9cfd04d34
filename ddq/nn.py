"""Quantized layers: `DDQLinear` and `DDQConv2d` (DDQ_SPEC.md Section 2 granularity).

Each holds a per-output-channel symmetric weight quantizer and a per-tensor input quantizer and
computes the float layer on the quantized weight and input (fake quantization for QAT).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ddq.quantizer import DDQQuantizer


def make_quantizers(
    out_channels: int,
    weight_bits: int = 4,
    act_bits: int = 4,
    act_mode: str = "auto",
    learn_bits: bool = False,
    learn_levels: bool = True,
    min_bits: int = 2,
    grad_scale: bool = True,
) -> tuple[DDQQuantizer, DDQQuantizer]:
    """The (weight, input) quantizer pair of a layer: weights per output channel and symmetric."""
    common = dict(min_bits=min_bits, learn_bits=learn_bits, learn_levels=learn_levels, grad_scale=grad_scale)
    weight = DDQQuantizer("symmetric", channels=out_channels, init_bits=weight_bits, **common)
    act = DDQQuantizer(act_mode, channels=None, init_bits=act_bits, **common)
    return weight, act


class DDQLinear(nn.Linear):
    """nn.Linear with DDQ-quantized weight (per output channel) and input (per tensor)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, **quant: Any) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_quantizer, self.input_quantizer = make_quantizers(out_features, **quant)
        self.to(self.weight.device)

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant: Any) -> "DDQLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **quant)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class DDQConv2d(nn.Conv2d):
    """nn.Conv2d (any groups, depthwise included) with DDQ-quantized weight and input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, **quant: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self.weight_quantizer, self.input_quantizer = make_quantizers(out_channels, **quant)
        self.to(self.weight.device)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant: Any) -> "DDQConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, **quant)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


QUANTIZED_LAYERS = (DDQLinear, DDQConv2d)


def macs_per_sample(layer: nn.Module, output_shape: Optional[torch.Size]) -> int:
    """Multiply-accumulates of one sample through a Linear/Conv2d, given its output shape (spec §4 BitOps)."""
    if isinstance(layer, nn.Linear):
        positions = 1 if output_shape is None else int(torch.tensor(output_shape[1:-1]).prod().item()) if len(output_shape) > 2 else 1
        return layer.in_features * layer.out_features * positions
    if isinstance(layer, nn.Conv2d):
        if output_shape is None:
            raise ValueError("macs_per_sample: a convolution needs its output shape")
        per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        return per_output * layer.out_channels * int(output_shape[-1]) * int(output_shape[-2])
    raise TypeError(f"macs_per_sample: unsupported layer {type(layer).__name__}")
