"""`torch.ops.ddq.quantized_linear`: DDQLinear's quantize-and-matmul as one custom op (DDQ_SPEC.md §2–3).

y = Q_x(x) · Q_w(W)ᵀ + bias with a per-tensor activation quantizer and a per-output-channel weight
quantizer. The op also returns W_q (weight-sized, computed anyway) and the activation's per-code level
table (1, 256) so that backward reuses them; x is saved as float training saves it, and x_q is recomputed
where backward needs it, so activation memory stays at float training's level. The bodies here are the
plain-PyTorch reference (any device); `ddq_kernels.registration` adds the fused Triton bodies for CUDA.
Importing this module needs no Triton.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from ddq import quantizer_math as qm
from ddq.functional import autocast_operands, quantize_reference


@torch.library.custom_op("ddq::quantized_linear", mutates_args=())
def quantized_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    act_lo: Tensor, act_hi: Tensor, act_residuals: Tensor, act_logits: Tensor,
    weight_lo: Tensor, weight_hi: Tensor, weight_residuals: Tensor, weight_logits: Tensor,
    act_min_bits: int, weight_min_bits: int, act_grad_scale: bool, weight_grad_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Spec §2: (y = Q_x(x)·W_qᵀ + bias, W_q, the activation's level table) for x (M, K) and weight (N, K).

    The table is `level_table`'s layout: (1, 256) float32, V[c] in column c < 2^b; the reference zero-fills
    the rest (so does the CUDA body). It is saved for backward, which would otherwise build it again.
    """
    w_q = quantize_reference(weight, weight_lo, weight_hi, weight_residuals, weight_logits, weight_min_bits)
    x_q = quantize_reference(x, act_lo, act_hi, act_residuals, act_logits, act_min_bits)
    return F.linear(x_q, w_q, bias), w_q, act_level_table(act_lo, act_hi, act_residuals, act_logits, act_min_bits)


def act_level_table(lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor, min_bits: int) -> Tensor:
    """Spec §2 step 4: the per-code levels V of a per-tensor quantizer, zero-padded to (1, 256) float32."""
    bits = qm.bitwidth_int(gate_logits, min_bits)
    return F.pad(qm.block_levels(lo, hi, residuals, bits), (0, qm.FINE_CELLS - 2**bits))


@quantized_linear_op.register_fake
def _quantized_linear_fake(x, weight, bias, act_lo, *params_and_flags):
    table = torch.empty(1, 256, device=act_lo.device, dtype=torch.float32)
    return x.new_empty(x.shape[0], weight.shape[0]), torch.empty_like(weight), table


@torch.library.custom_op("ddq::quantized_linear_backward", mutates_args=())
def quantized_linear_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, w_q: Tensor, act_table: Tensor,
    act_lo: Tensor, act_hi: Tensor, act_residuals: Tensor, act_logits: Tensor,
    weight_lo: Tensor, weight_hi: Tensor, weight_residuals: Tensor, weight_logits: Tensor,
    act_min_bits: int, weight_min_bits: int, act_grad_scale: bool, weight_grad_scale: bool, has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Spec §3: (∂x, ∂W, ∂bias, ∂act lo/hi/residuals/logits, ∂weight lo/hi/residuals/logits).

    ∂bias is an empty tensor when the layer has no bias (a reduction over dY saved). `act_table` is the
    forward's third output; this reference recomputes x_q from the parameters instead.
    """
    check_act_table(act_table, x.device)
    x_q = quantize_reference(x, act_lo, act_hi, act_residuals, act_logits, act_min_bits)
    grad_x_q = grad_y @ w_q
    grad_w_q = grad_y.t() @ x_q
    act = torch.ops.ddq.quantize_backward(grad_x_q, x, act_lo, act_hi, act_residuals, act_logits, act_min_bits, act_grad_scale)
    wgt = torch.ops.ddq.quantize_backward(grad_w_q, weight, weight_lo, weight_hi, weight_residuals, weight_logits,
                                          weight_min_bits, weight_grad_scale)
    return act[0], wgt[0], bias_grad(grad_y, has_bias), *act[1:], *wgt[1:]


def check_act_table(act_table: Tensor, device: torch.device) -> None:
    """A clear error for a level table that is not the forward's: (1, 256) float32 on x's device."""
    if act_table.shape != (1, qm.FINE_CELLS) or act_table.dtype != torch.float32 or act_table.device != device:
        raise ValueError(f"quantized_linear_backward: act_table must be the forward's (1, 256) float32 level table on "
                         f"{device}, got {tuple(act_table.shape)} {act_table.dtype} on {act_table.device}")


def bias_grad(grad_y: Tensor, has_bias: bool) -> Tensor:
    """Σ_m dY[m, :] accumulated in float32, or an empty tensor without a bias."""
    if not has_bias:
        return grad_y.new_empty(0)
    return grad_y.sum(dim=0, dtype=torch.float32).to(grad_y.dtype)


@quantized_linear_backward_op.register_fake
def _quantized_linear_backward_fake(grad_y, x, weight, w_q, act_table, act_lo, act_hi, act_residuals, act_logits,
                                    weight_lo, weight_hi, weight_residuals, weight_logits, *flags):
    has_bias = flags[-1]
    return (torch.empty_like(x), torch.empty_like(weight), grad_y.new_empty(grad_y.shape[1] if has_bias else 0),
            torch.empty_like(act_lo), torch.empty_like(act_hi), torch.empty_like(act_residuals), torch.empty_like(act_logits),
            torch.empty_like(weight_lo), torch.empty_like(weight_hi), torch.empty_like(weight_residuals),
            torch.empty_like(weight_logits))


def _setup_context(ctx, inputs, output):
    x, weight, bias, *params = inputs[:11]
    ctx.flags = inputs[11:]
    # W_q is rarely used by the caller: its gradient stays None instead of a weight-sized tensor of zeros.
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(x, weight, output[1], output[2], *params)


def _backward(ctx, grad_y, grad_w_q, _grad_table):
    x, weight, w_q, act_table, *params = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    grads = torch.ops.ddq.quantized_linear_backward(grad_y.contiguous(), x, weight, w_q, act_table, *params, *ctx.flags,
                                                    ctx.has_bias)
    grad_x, grad_weight, grad_bias, *param_grads = grads
    if grad_w_q is not None:
        grad_weight = grad_weight + grad_w_q
    return (grad_x, grad_weight, grad_bias if ctx.has_bias else None, *param_grads, None, None, None, None)


quantized_linear_op.register_autograd(_backward, setup_context=_setup_context)


def quantized_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act_quantizer, weight_quantizer) -> Tensor:
    """Spec §2: DDQLinear's forward through `torch.ops.ddq.quantized_linear` for x of shape (..., K).

    act_quantizer must be per tensor and weight_quantizer per output channel (the layers' layout);
    both are initialised on first use, as their own forward would.
    """
    if act_quantizer.axis is not None or weight_quantizer.axis != 0:
        raise ValueError("quantized_linear: needs a per-tensor input quantizer and a per-channel weight quantizer")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quantized_linear: x has {x.shape[-1]} features but the weight expects {weight.shape[1]}")
    x, weight, bias = autocast_operands(x.device.type, x, weight, bias)
    if x.dtype != weight.dtype:
        raise TypeError(f"quantized_linear: x is {x.dtype} but the weight is {weight.dtype}")
    flat = x.reshape(-1, x.shape[-1])
    y, _, _ = torch.ops.ddq.quantized_linear(
        flat.contiguous(), weight.contiguous(), bias, *act_quantizer.op_arguments(flat),
        *weight_quantizer.op_arguments(weight),
        act_quantizer.min_bits, weight_quantizer.min_bits, act_quantizer.grad_scale, weight_quantizer.grad_scale,
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])
