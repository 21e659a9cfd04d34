"""`torch.ops.ddq.quantized_conv2d`: a dense convolution of DDQ-quantized input as one custom op (DDQ_SPEC.md §2–3).

y = conv(Q_x(x), W_q) + bias with a per-tensor input quantizer; W_q comes in already quantized (the weight
quantizer's own op and autograd). Autograd through the two separate ops saves both x (for the quantizer's
backward) and x_q (for the convolution's weight gradient): two activation-sized tensors where float
training saves one. This op saves x alone and recomputes x_q = Q_x(x) in its backward, one memory-bound
pass, so a DDQ network's activation memory stays at float training's level. The bodies call
`torch.ops.ddq.quantize(_backward)` (Triton on CUDA, the reference elsewhere) and ATen's convolution.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ddq.functional import autocast_off, autocast_operands, check_quantize_op_arguments, empty_in_storage_order


def check_conv_arguments(x: Tensor, w_q: Tensor, bias: Optional[Tensor], lo: Tensor, hi: Tensor, residuals: Tensor,
                         gate_logits: Tensor, min_bits: int) -> None:
    """The input quantizer's arguments as `ddq_quantize` takes them (per tensor), and W_q and the bias on x's device
    and of x's dtype: in the fake kernels too, which the dispatcher runs when any one argument is on 'meta'."""
    check_quantize_op_arguments(x, lo, hi, residuals, gate_logits, min_bits)
    if lo.shape != (1,):
        raise ValueError(f"quantized_conv2d: needs a per-tensor input quantizer (lo of shape (1,)), got {tuple(lo.shape)}")
    for name, tensor in (("w_q", w_q), ("bias", bias)):
        if tensor is not None and (tensor.device != x.device or tensor.dtype != x.dtype):
            raise ValueError(f"quantized_conv2d: {name} must be {x.dtype} on {x.device} like x, got {tensor.dtype} on "
                             f"{tensor.device}")


@torch.library.custom_op("ddq::quantized_conv2d", mutates_args=())
def quantized_conv2d_op(
    x: Tensor, w_q: Tensor, bias: Optional[Tensor], lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor,
    stride: list[int], padding: list[int], dilation: list[int], min_bits: int, grad_scale: bool,
) -> Tensor:
    """Spec §2: conv2d(Q_x(x), W_q, bias) for x (N, C, H, W) and W_q (C_out, C, kH, kW), groups = 1."""
    check_conv_arguments(x, w_q, bias, lo, hi, residuals, gate_logits, min_bits)
    x_q = torch.ops.ddq.quantize(x, lo, hi, residuals, gate_logits, min_bits, grad_scale)
    with autocast_off(x.device):
        return F.conv2d(x_q, w_q, bias, stride, padding, dilation)


@quantized_conv2d_op.register_fake
def _quantized_conv2d_fake(x, w_q, bias, lo, hi, residuals, gate_logits, stride, padding, dilation, min_bits, grad_scale):
    check_conv_arguments(x, w_q, bias, lo, hi, residuals, gate_logits, min_bits)
    return F.conv2d(empty_in_storage_order(x, 1), w_q, bias, stride, padding, dilation)


@torch.library.custom_op("ddq::quantized_conv2d_backward", mutates_args=())
def quantized_conv2d_backward_op(
    grad_y: Tensor, x: Tensor, w_q: Tensor, lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor,
    stride: list[int], padding: list[int], dilation: list[int], min_bits: int, grad_scale: bool, has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Spec §3: (∂x, ∂W_q, ∂bias, ∂lo, ∂hi, ∂residuals, ∂gate_logits), x_q recomputed from x.

    ∂bias is an empty tensor when the layer has no bias.
    """
    check_conv_arguments(x, w_q, None, lo, hi, residuals, gate_logits, min_bits)
    x_q = torch.ops.ddq.quantize(x, lo, hi, residuals, gate_logits, min_bits, grad_scale)
    with autocast_off(x.device):
        grad_x_q, grad_w_q, grad_bias = torch.ops.aten.convolution_backward(
            grad_y, x_q, w_q, [w_q.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0], 1,
            [True, True, has_bias])
    grads = torch.ops.ddq.quantize_backward(grad_x_q, x, lo, hi, residuals, gate_logits, min_bits, grad_scale)
    # cuDNN returns a channels_last weight's gradient contiguous: lay it out as W_q (a weight-sized copy).
    grad_w_q = torch.empty_like(w_q).copy_(grad_w_q)
    return grads[0], grad_w_q, grad_bias if has_bias else grad_y.new_empty(0), *grads[1:]


@quantized_conv2d_backward_op.register_fake
def _quantized_conv2d_backward_fake(grad_y, x, w_q, lo, hi, residuals, gate_logits, stride, padding, dilation,
                                    min_bits, grad_scale, has_bias):
    check_conv_arguments(x, w_q, None, lo, hi, residuals, gate_logits, min_bits)
    return (empty_in_storage_order(x, 1), torch.empty_like(w_q), grad_y.new_empty(w_q.shape[0] if has_bias else 0),
            torch.empty_like(lo), torch.empty_like(hi), torch.empty_like(residuals), torch.empty_like(gate_logits))


def _setup_context(ctx, inputs, output):
    x, w_q, bias, lo, hi, residuals, gate_logits, *flags = inputs
    ctx.save_for_backward(x, w_q, lo, hi, residuals, gate_logits)
    ctx.flags = flags
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    grad_x, grad_w_q, grad_bias, *param_grads = torch.ops.ddq.quantized_conv2d_backward(
        grad_y, *ctx.saved_tensors, *ctx.flags, ctx.has_bias)
    return (grad_x, grad_w_q, grad_bias if ctx.has_bias else None, *param_grads, None, None, None, None, None)


quantized_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def recomputes_quantized_input(layer: nn.Conv2d) -> bool:
    """Whether `quantized_conv2d` serves the layer: a dense (groups = 1) convolution with numeric zero padding."""
    return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def quantized_conv2d(layer: nn.Conv2d, x: Tensor, w_q: Tensor) -> Tensor:
    """Spec §2: the layer's convolution of Q_x(x) (its `input_quantizer`, a per-tensor DDQQuantizer, initialised
    on first use as its own forward would) and W_q through `torch.ops.ddq.quantized_conv2d`."""
    quantizer = layer.input_quantizer
    if quantizer.axis is not None or not recomputes_quantized_input(layer):
        raise ValueError("quantized_conv2d: needs a per-tensor input quantizer and a dense convolution with zero padding")
    x, w_q, bias = autocast_operands(x.device.type, x, w_q, layer.bias)
    return torch.ops.ddq.quantized_conv2d(x, w_q, bias, *quantizer.op_arguments(x), list(layer.stride),
                                          list(layer.padding), list(layer.dilation), quantizer.min_bits, quantizer.grad_scale)
