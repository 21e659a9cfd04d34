"""`torch.ops.ddq.quantized_linear`: DDQLinear's quantize-and-matmul as one custom op (DDQ_SPEC.md §2–3).

y = Q_x(x) · Q_w(W)ᵀ + bias with a per-tensor activation quantizer and a per-output-channel weight
quantizer, each given by its raw range parameters (the op computes lo and hi, and their gradients, inside
its kernels: a compiled layer then runs no kernels of its own on them). The op also returns W_q
(weight-sized, computed anyway), the activation's per-code level table (1, 256) and the (lo, hi) bounds of
both quantizers so that backward reuses them; those three carry no gradient (W_q's would need the weight
quantizer's own backward: differentiate `ddq_quantize` for it). x is saved as float training saves it, and x_q is recomputed
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
from ddq.functional import (FLOAT_INPUT_DTYPES, autocast_off, autocast_operands, check_parameter_values,
                            empty_in_storage_order, quantize_reference, validate_arguments)


@torch.library.custom_op("ddq::quantized_linear", mutates_args=())
def quantized_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    act_bottom: Tensor, act_top: Tensor, act_residuals: Tensor, act_logits: Tensor,
    weight_bottom: Tensor, weight_top: Tensor, weight_residuals: Tensor, weight_logits: Tensor,
    act_min_bits: int, weight_min_bits: int, act_grad_scale: bool, weight_grad_scale: bool,
    act_mode: int, weight_mode: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Spec §2: (y = Q_x(x)·W_qᵀ + bias, W_q, the activation's level table, the bounds) for x (M, K), weight (N, K).

    Each quantizer is given by its range parameters (bottom, top), read in `RANGE_PARAMETERIZATIONS[mode]`
    (`quantizer_math.range_bounds`; mode 0 takes them as lo and hi), its residuals and gate logits. The op
    computes (lo, hi) itself, so a compiled layer spends no kernels on them; the bounds output is (2, 1 + N)
    float32, row 0 lo and row 1 hi, column 0 the activation's and 1 + n output channel n's. The table is
    `level_table`'s layout: (1, 256) float32, V[c] in column c < 2^b, zeros after. Backward takes both
    instead of building them again.
    """
    check_linear_arguments(x, weight, bias, (act_bottom, act_top, act_residuals, act_logits),
                           (weight_bottom, weight_top, weight_residuals, weight_logits), act_min_bits, weight_min_bits,
                           act_mode, weight_mode)
    return quantized_linear_reference(x, weight, bias, act_bottom, act_top, act_residuals, act_logits, weight_bottom,
                                      weight_top, weight_residuals, weight_logits, act_min_bits, weight_min_bits, act_mode,
                                      weight_mode)


def quantized_linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], act_bottom: Tensor, act_top: Tensor,
                               act_residuals: Tensor, act_logits: Tensor, weight_bottom: Tensor, weight_top: Tensor,
                               weight_residuals: Tensor, weight_logits: Tensor, act_min_bits: int, weight_min_bits: int,
                               act_mode: int, weight_mode: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ddq::quantized_linear's plain-PyTorch body on any device (the CUDA body's too for an empty x or weight)."""
    act_lo, act_hi = op_bounds(act_mode, act_bottom, act_top, act_logits, act_min_bits)
    weight_lo, weight_hi = op_bounds(weight_mode, weight_bottom, weight_top, weight_logits, weight_min_bits)
    check_parameter_values(act_lo, act_hi, act_residuals, act_logits)
    check_parameter_values(weight_lo, weight_hi, weight_residuals, weight_logits)
    w_q = quantize_reference(weight, weight_lo, weight_hi, weight_residuals, weight_logits, weight_min_bits)
    x_q = quantize_reference(x, act_lo, act_hi, act_residuals, act_logits, act_min_bits)
    bounds = torch.stack((torch.cat((act_lo, weight_lo)), torch.cat((act_hi, weight_hi))))
    with autocast_off(x.device):
        y = F.linear(x_q, w_q, bias)
    return y, w_q, act_level_table(act_lo, act_hi, act_residuals, act_logits, act_min_bits), bounds


def check_linear_arguments(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: tuple[Tensor, ...],
                           weight_params: tuple[Tensor, ...], act_min_bits: int, weight_min_bits: int, act_mode: int,
                           weight_mode: int) -> None:
    """Clear errors for what the op's bodies and fake kernels assume: x (M, K) and weight (N, K) of one float dtype
    on one device, a bias (N,) of that dtype, each quantizer's parameters as `ddq_quantize` takes them (a
    per-tensor activation, a per-output-channel weight), known range modes, and unsigned grids of ≥ 1 bit."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"quantized_linear: needs x (M, K) and weight (N, K), got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if x.dtype not in FLOAT_INPUT_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"quantized_linear: x and weight must share one of {FLOAT_INPUT_DTYPES}, got {x.dtype} and {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"quantized_linear: weight is on {weight.device} but x is on {x.device}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"quantized_linear: bias must be ({weight.shape[0]},) {x.dtype} on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    check_range_modes(act_mode, weight_mode)
    check_range_shapes(act[0], act[1], weight_params[0], weight_params[1], weight.shape[0])
    validate_arguments(x, *act, None, act_min_bits)
    validate_arguments(weight, *weight_params, 0, weight_min_bits)
    for name, mode, min_bits in (("activation", act_mode, act_min_bits), ("weight", weight_mode, weight_min_bits)):
        if mode == qm.UNSIGNED and min_bits < 1:
            raise ValueError(f"quantized_linear: the {name} quantizer's unsigned range needs min_bits >= 1 (spec §2), "
                             f"got {min_bits}")


def op_bounds(mode: int, bottom: Tensor, top: Tensor, gate_logits: Tensor, min_bits: int) -> tuple[Tensor, Tensor]:
    """`quantizer_math.range_bounds` with the bitwidth from the gate logits where the mode needs it."""
    return qm.range_bounds(mode, bottom, top, bits_for_range(mode, gate_logits, min_bits))


def bits_for_range(mode: int, gate_logits: Tensor, min_bits: int) -> Optional[Tensor]:
    """The bitwidth where the range depends on it (unsigned mode), else None: no kernels spent on it."""
    return qm.bitwidth(gate_logits, min_bits) if mode == qm.UNSIGNED else None


def check_range_shapes(act_bottom: Tensor, act_top: Tensor, weight_bottom: Tensor, weight_top: Tensor,
                       out_features: int) -> None:
    """A clear error unless the activation's range parameters have shape (1,) and the weight's (N,)."""
    for name, tensor, groups in (("act_bottom", act_bottom, 1), ("act_top", act_top, 1),
                                 ("weight_bottom", weight_bottom, out_features), ("weight_top", weight_top, out_features)):
        if tuple(tensor.shape) != (groups,):
            raise ValueError(f"quantized_linear: {name} must have shape ({groups},) (a per-tensor activation and a "
                             f"per-output-channel weight quantizer), got {tuple(tensor.shape)}")


def check_range_modes(*modes: int) -> None:
    """A clear error for a mode code that is not one of `RANGE_PARAMETERIZATIONS`' indices."""
    for mode in modes:
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < len(qm.RANGE_PARAMETERIZATIONS):
            raise ValueError(f"quantized_linear: a range mode must be an int in [0, {len(qm.RANGE_PARAMETERIZATIONS) - 1}] "
                             f"{qm.RANGE_PARAMETERIZATIONS}, got {mode!r}")


def act_level_table(lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor, min_bits: int) -> Tensor:
    """Spec §2 step 4: the per-code levels V of a per-tensor quantizer, zero-padded to (1, 256) float32."""
    bits = qm.bitwidth_int(gate_logits, min_bits)
    return F.pad(qm.block_levels(lo, hi, residuals, bits), (0, qm.FINE_CELLS - 2**bits))


@quantized_linear_op.register_fake
def _quantized_linear_fake(x, weight, bias, act_bottom, act_top, act_residuals, act_logits, weight_bottom, weight_top,
                           weight_residuals, weight_logits, act_min_bits, weight_min_bits, act_grad_scale,
                           weight_grad_scale, act_mode, weight_mode):
    check_linear_arguments(x, weight, bias, (act_bottom, act_top, act_residuals, act_logits),
                           (weight_bottom, weight_top, weight_residuals, weight_logits), act_min_bits, weight_min_bits,
                           act_mode, weight_mode)
    table = torch.empty(1, 256, device=x.device, dtype=torch.float32)
    bounds = torch.empty(2, 1 + weight.shape[0], device=x.device, dtype=torch.float32)
    return x.new_empty(x.shape[0], weight.shape[0]), weight.new_empty(weight.shape), table, bounds


@torch.library.custom_op("ddq::quantized_linear_backward", mutates_args=())
def quantized_linear_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, w_q: Tensor, act_table: Tensor, bounds: Tensor,
    act_bottom: Tensor, act_top: Tensor, act_residuals: Tensor, act_logits: Tensor,
    weight_bottom: Tensor, weight_top: Tensor, weight_residuals: Tensor, weight_logits: Tensor,
    act_min_bits: int, weight_min_bits: int, act_grad_scale: bool, weight_grad_scale: bool,
    act_mode: int, weight_mode: int, has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Spec §3: (∂x, ∂W, ∂bias, ∂act bottom/top/residuals/logits, ∂weight bottom/top/residuals/logits).

    ∂bias is an empty tensor when the layer has no bias (a reduction over dY saved). `act_table` and `bounds`
    are the forward's third and fourth outputs; this reference recomputes them, and x_q, from the parameters.
    """
    check_linear_backward_arguments(grad_y, x, weight, w_q, act_table, bounds, (act_bottom, act_top, act_residuals, act_logits),
                                    (weight_bottom, weight_top, weight_residuals, weight_logits), act_min_bits,
                                    weight_min_bits, act_mode, weight_mode)
    return quantized_linear_backward_reference(grad_y, x, weight, w_q, act_bottom, act_top, act_residuals, act_logits,
                                               weight_bottom, weight_top, weight_residuals, weight_logits, act_min_bits,
                                               weight_min_bits, act_grad_scale, weight_grad_scale, act_mode, weight_mode,
                                               has_bias)


def quantized_linear_backward_reference(
        grad_y: Tensor, x: Tensor, weight: Tensor, w_q: Tensor, act_bottom: Tensor, act_top: Tensor, act_residuals: Tensor,
        act_logits: Tensor, weight_bottom: Tensor, weight_top: Tensor, weight_residuals: Tensor, weight_logits: Tensor,
        act_min_bits: int, weight_min_bits: int, act_grad_scale: bool, weight_grad_scale: bool, act_mode: int,
        weight_mode: int, has_bias: bool) -> tuple[Tensor, ...]:
    """ddq::quantized_linear_backward's plain-PyTorch body on any device (the CUDA body's too for an empty x or
    weight)."""
    act_lo, act_hi = op_bounds(act_mode, act_bottom, act_top, act_logits, act_min_bits)
    weight_lo, weight_hi = op_bounds(weight_mode, weight_bottom, weight_top, weight_logits, weight_min_bits)
    x_q = quantize_reference(x, act_lo, act_hi, act_residuals, act_logits, act_min_bits)
    with autocast_off(x.device):
        grad_x_q = grad_y @ w_q
        grad_w_q = grad_y.t() @ x_q
    act = torch.ops.ddq.quantize_backward(grad_x_q, x, act_lo, act_hi, act_residuals, act_logits, act_min_bits, act_grad_scale)
    wgt = torch.ops.ddq.quantize_backward(grad_w_q, weight, weight_lo, weight_hi, weight_residuals, weight_logits,
                                          weight_min_bits, weight_grad_scale)
    act_range = op_bounds_grads(act_mode, act_bottom, act_top, act_logits, act_min_bits, *act[1:3])
    weight_range = op_bounds_grads(weight_mode, weight_bottom, weight_top, weight_logits, weight_min_bits, *wgt[1:3])
    return act[0], wgt[0], bias_grad(grad_y, has_bias), *act_range, *act[3:], *weight_range, *wgt[3:]


def op_bounds_grads(mode: int, bottom: Tensor, top: Tensor, gate_logits: Tensor, min_bits: int, grad_lo: Tensor,
                    grad_hi: Tensor) -> tuple[Tensor, Tensor]:
    """`quantizer_math.range_bounds_grads` with the bitwidth from the gate logits where the mode needs it."""
    return qm.range_bounds_grads(mode, bottom, top, bits_for_range(mode, gate_logits, min_bits), grad_lo, grad_hi)


def check_linear_backward_arguments(grad_y: Tensor, x: Tensor, weight: Tensor, w_q: Tensor, act_table: Tensor,
                                    bounds: Tensor, act: tuple[Tensor, ...], weight_params: tuple[Tensor, ...],
                                    act_min_bits: int, weight_min_bits: int, act_mode: int, weight_mode: int) -> None:
    """`check_linear_arguments` for the backward op, with dY (M, N) and W_q, the table and the bounds as the
    forward returned them."""
    check_linear_arguments(x, weight, None, act, weight_params, act_min_bits, weight_min_bits, act_mode, weight_mode)
    expected = (x.shape[0], weight.shape[0])
    if tuple(grad_y.shape) != expected or grad_y.dtype != x.dtype or grad_y.device != x.device:
        raise ValueError(f"quantized_linear_backward: dY must be {expected} {x.dtype} on {x.device}, got "
                         f"{tuple(grad_y.shape)} {grad_y.dtype} on {grad_y.device}")
    if w_q.shape != weight.shape or w_q.dtype != weight.dtype or w_q.device != x.device:
        raise ValueError(f"quantized_linear_backward: W_q must be the forward's {tuple(weight.shape)} {weight.dtype} "
                         f"tensor on {x.device}, got {tuple(w_q.shape)} {w_q.dtype} on {w_q.device}")
    check_act_table(act_table, x.device)
    check_bounds(bounds, weight.shape[0], x.device)


def check_act_table(act_table: Tensor, device: torch.device) -> None:
    """A clear error for a level table that is not the forward's: (1, 256) float32 on x's device."""
    if act_table.shape != (1, qm.FINE_CELLS) or act_table.dtype != torch.float32 or act_table.device != device:
        raise ValueError(f"quantized_linear_backward: act_table must be the forward's (1, 256) float32 level table on "
                         f"{device}, got {tuple(act_table.shape)} {act_table.dtype} on {act_table.device}")


def check_bounds(bounds: Tensor, out_features: int, device: torch.device) -> None:
    """A clear error for bounds that are not the forward's: (2, 1 + N) float32 on x's device, contiguous."""
    if (bounds.shape != (2, 1 + out_features) or bounds.dtype != torch.float32 or bounds.device != device
            or not bounds.is_contiguous()):
        raise ValueError(f"quantized_linear_backward: bounds must be the forward's contiguous (2, {1 + out_features}) "
                         f"float32 tensor on {device}, got {tuple(bounds.shape)} {bounds.dtype} on {bounds.device}")


def bias_grad(grad_y: Tensor, has_bias: bool) -> Tensor:
    """Σ_m dY[m, :] accumulated in float32, or an empty tensor without a bias."""
    if not has_bias:
        return grad_y.new_empty(0)
    return grad_y.sum(dim=0, dtype=torch.float32).to(grad_y.dtype)


@quantized_linear_backward_op.register_fake
def _quantized_linear_backward_fake(grad_y, x, weight, w_q, act_table, bounds, act_bottom, act_top, act_residuals,
                                    act_logits, weight_bottom, weight_top, weight_residuals, weight_logits, act_min_bits,
                                    weight_min_bits, act_grad_scale, weight_grad_scale, act_mode, weight_mode, has_bias):
    check_linear_backward_arguments(grad_y, x, weight, w_q, act_table, bounds, (act_bottom, act_top, act_residuals, act_logits),
                                    (weight_bottom, weight_top, weight_residuals, weight_logits), act_min_bits,
                                    weight_min_bits, act_mode, weight_mode)
    return (torch.empty_like(x), empty_in_storage_order(weight, weight.shape[0]),
            grad_y.new_empty(grad_y.shape[1] if has_bias else 0),
            torch.empty_like(act_bottom), torch.empty_like(act_top), torch.empty_like(act_residuals),
            torch.empty_like(act_logits), torch.empty_like(weight_bottom), torch.empty_like(weight_top),
            torch.empty_like(weight_residuals), torch.empty_like(weight_logits))


def _setup_context(ctx, inputs, output):
    x, weight, bias, *params = inputs[:11]
    ctx.flags = inputs[11:]
    # Only y is differentiable, so backward always gets dY; the others' gradients stay None instead of zeros
    # (W_q's would be weight-sized).
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    ctx.save_for_backward(x, weight, output[1], output[2], output[3], *params)


def _backward(ctx, grad_y, _grad_w_q, _grad_table, _grad_bounds):
    x, weight, w_q, act_table, bounds, *params = ctx.saved_tensors
    grads = torch.ops.ddq.quantized_linear_backward(grad_y.contiguous(), x, weight, w_q, act_table, bounds, *params,
                                                    *ctx.flags, ctx.has_bias)
    grad_x, grad_weight, grad_bias, *param_grads = grads
    return (grad_x, grad_weight, grad_bias if ctx.has_bias else None, *param_grads, *(None,) * len(ctx.flags))


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
    y, *_ = torch.ops.ddq.quantized_linear(
        flat.contiguous(), weight.contiguous(), bias, *act_quantizer.range_op_arguments(flat),
        *weight_quantizer.range_op_arguments(weight),
        act_quantizer.min_bits, weight_quantizer.min_bits, act_quantizer.grad_scale, weight_quantizer.grad_scale,
        act_quantizer.range_mode_code, weight_quantizer.range_mode_code,
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])
