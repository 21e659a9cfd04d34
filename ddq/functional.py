"""The DDQ quantizer as a differentiable custom op (DDQ_SPEC.md Sections 2 and 3).

`ddq_quantize` validates its arguments and calls `torch.ops.ddq.quantize`. The op's CPU body (and the
body on any device without a faster kernel) is the plain-PyTorch reference below; `ddq_kernels`
registers Triton bodies for CUDA. The backward op recomputes the fine indices from x and reduces the
upstream gradient to the spec's per-group sums (a weighted histogram over the 256 fine cells, Σv·u
over in-range elements and Σv over clipped ones); `ddq.quantizer_math` turns those into parameter
gradients. Being opaque custom ops, both compile under `torch.compile(fullgraph=True)`.

Non-finite inputs: an x element that is NaN or ±inf quantizes to NaN (never to a silent level), so
the loss turns NaN where it would otherwise train on garbage. Parameters must be finite with hi > lo:
checked on CPU tensors always, on other devices when the environment sets DDQ_CHECK_VALUES=1 (the
check reads values back to the host, which would stall an asynchronous device every step).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ddq import quantizer_math as qm

FLOAT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ddq_quantize(
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    residuals: Tensor,
    gate_logits: Tensor,
    axis: Optional[int] = None,
    min_bits: int = 2,
    grad_scale: bool = True,
) -> Tensor:
    """Spec §2 forward and §3 gradients: quantize x with fine grid [lo, hi], residuals and gates.

    axis=None quantizes per tensor (lo, hi of shape (1,), residuals (1, 256)); axis=0 per slice along
    dim 0 (lo, hi of shape (G,), residuals (G, 256) with G = x.shape[0]). gate_logits has shape (8,).
    Returns x_q in x's dtype; gradients flow to every tensor argument.
    """
    validate_arguments(x, lo, hi, residuals, gate_logits, axis, min_bits)
    if not isinstance(grad_scale, bool):
        raise TypeError(f"ddq_quantize: grad_scale must be a bool, got {grad_scale!r}")
    return torch.ops.ddq.quantize(x, lo, hi, residuals, gate_logits, min_bits, grad_scale)


def autocast_operands(device_type: str, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The tensors cast as autocast casts a matmul's or a convolution's operands (a custom op is opaque to
    autocast, so its callers cast); unchanged outside autocast. None stays None."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


def validate_arguments(
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    residuals: Tensor,
    gate_logits: Tensor,
    axis: Optional[int],
    min_bits: int,
) -> None:
    """Metadata checks (dtype, device, shape, bits): cheap, and valid under torch.compile."""
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_INPUT_DTYPES:
        raise TypeError(f"ddq_quantize: x must be a float32, float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    named = {"lo": lo, "hi": hi, "residuals": residuals, "gate_logits": gate_logits}
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor) or tensor.dtype != torch.float32:
            raise TypeError(f"ddq_quantize: {name} must be a float32 tensor, got {getattr(tensor, 'dtype', type(tensor))}")
        if tensor.device != x.device:
            raise ValueError(f"ddq_quantize: {name} is on {tensor.device} but x is on {x.device}")
    if isinstance(min_bits, bool) or not isinstance(min_bits, int) or not 0 <= min_bits <= qm.FINEST_BITS:
        raise ValueError(f"ddq_quantize: min_bits must be an int in [0, {qm.FINEST_BITS}], got {min_bits!r}")
    if axis is None:
        groups = 1
    elif axis == 0:
        if x.dim() == 0:
            raise ValueError("ddq_quantize: axis=0 needs x with at least one dimension")
        groups = x.shape[0]
    else:
        raise ValueError(f"ddq_quantize: axis must be None (per tensor) or 0 (per output channel), got {axis!r}")
    expected = {"lo": (groups,), "hi": (groups,), "residuals": (groups, qm.FINE_CELLS), "gate_logits": (qm.FINEST_BITS,)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"ddq_quantize: {name} must have shape {shape} for axis={axis} and x of shape {tuple(x.shape)}, "
                f"got {tuple(named[name].shape)}"
            )


def op_axis(lo: Tensor) -> Optional[int]:
    """The axis `ddq_quantize` would have been given for the op's G = lo.shape[0] groups."""
    return None if lo.dim() == 1 and lo.shape[0] == 1 else 0


def check_quantize_op_arguments(x: Tensor, lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor, min_bits: int,
                                grad: Optional[Tensor] = None) -> None:
    """`validate_arguments` for the ddq::quantize(_backward) ops themselves, called directly or through
    `ddq_quantize`: in their fake kernels too, since the dispatcher runs those when any one argument is on
    'meta', and they would otherwise hand back an uninitialised tensor on x's device."""
    validate_arguments(x, lo, hi, residuals, gate_logits, op_axis(lo), min_bits)
    if grad is not None and (grad.shape != x.shape or grad.device != x.device):
        raise ValueError(f"ddq quantize_backward: the gradient must have x's shape {tuple(x.shape)} on {x.device}, got "
                         f"{tuple(grad.shape)} on {grad.device}")


def autocast_off(device: torch.device):
    """A custom op's body runs under the caller's autocast (the op has no autocast rule), where its matmuls and
    convolutions would change dtype in eager mode only: the fake kernels, and so compiled graphs, keep the
    operands' dtypes. The callers cast the operands as autocast would (`autocast_operands`) before the op."""
    return torch.autocast(device.type, enabled=False)


def values_are_checked(device: torch.device) -> bool:
    return device.type == "cpu" or os.environ.get("DDQ_CHECK_VALUES", "0") == "1"


def check_parameter_values(lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor) -> None:
    """Spec §2: valid parameters are finite with hi > lo (a NaN logit would silently close its gate)."""
    if not values_are_checked(lo.device):
        return
    for name, tensor in (("lo", lo), ("hi", hi), ("residuals", residuals), ("gate_logits", gate_logits)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"ddq_quantize: {name} contains non-finite values")
    if not bool((hi > lo).all()):
        bad = int((hi <= lo).nonzero()[0, 0])
        raise ValueError(f"ddq_quantize: needs hi > lo in every group; group {bad} has lo={lo[bad].item()} hi={hi[bad].item()}")
    if not bool(torch.isfinite(hi - lo).all()):
        bad = int((~torch.isfinite(hi - lo)).nonzero()[0, 0])
        raise ValueError(f"ddq_quantize: hi − lo overflows float32 in group {bad} (lo={lo[bad].item()} hi={hi[bad].item()}), "
                         "so its fine grid has no finite step")


def storage_order(x: Tensor, groups: int) -> list[int]:
    """x's dims from outermost to innermost in memory (dim 0 first when it holds groups > 1 groups), if x
    permuted that way is contiguous; the identity otherwise.

    The element-wise passes run over x's storage in this order, so a channels_last activation or weight
    stays channels_last (its output too) instead of being copied to NCHW, which would send every
    following convolution and BatchNorm down PyTorch's slower NCHW kernels. A group is still one
    consecutive slice: dim 0 outermost.
    """
    dims = list(range(x.dim()))
    inner = dims[1:] if groups > 1 else dims
    order = ([0] if groups > 1 else []) + sorted(inner, key=lambda d: -x.stride(d))
    return order if x.permute(order).is_contiguous() else dims


def restored(t: Tensor, order: list[int]) -> Tensor:
    """Undo `x.permute(order)`: back to x's dim order, with x's strides when t is contiguous."""
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return t.permute(inverse)


def empty_in_storage_order(x: Tensor, groups: int) -> Tensor:
    """An uninitialised tensor of x's shape and dtype laid out as the element-wise passes write it."""
    order = storage_order(x, groups)
    return restored(x.new_empty([x.shape[d] for d in order]), order)


def grouped(x: Tensor, groups: int) -> Tensor:
    """x as a contiguous (groups, numel / groups): group g is the g-th consecutive slice (empty x included).

    The ops pass x in `storage_order`, so this copies only an x that is not dense.
    """
    return x.contiguous().reshape(groups, x.numel() // groups if groups else 0)


def quantize_reference(x: Tensor, lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor, min_bits: int) -> Tensor:
    """Spec §2 steps 1–4 in plain PyTorch: a gather from the (G, 256) table of block-mean levels."""
    groups = lo.shape[0]
    flat = grouped(x, groups)
    bits = qm.bitwidth_int(gate_logits, min_bits)
    _, index = qm.fine_index(flat, lo, hi)
    table = qm.fine_table(qm.block_levels(lo, hi, residuals, bits), bits)
    # x·0 is 0 for finite x and NaN for NaN or ±inf: non-finite inputs come out as NaN, not as a level.
    quantized = table.gather(1, index) + flat.to(torch.float32) * 0
    return quantized.to(x.dtype).reshape(x.shape)


def reductions_reference(grad: Tensor, x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Spec §3 element-wise pass: (∂L/∂x = v·in, histogram of v over fine cells, Σ v·u·in, Σ v·(1 − in))."""
    groups = lo.shape[0]
    flat = grouped(x, groups)
    v = grouped(grad, groups).to(torch.float32)
    u, index = qm.fine_index(flat, lo, hi)
    inside = (u >= 0) & (u <= qm.FINE_MAX)
    grad_x = torch.where(inside, v, 0.0).to(x.dtype).reshape(x.shape)
    histogram = torch.zeros(groups, qm.FINE_CELLS, dtype=torch.float32, device=x.device).scatter_add_(1, index, v)
    sum_vu_inside = torch.where(inside, v * u, 0.0).sum(dim=1)
    sum_v_clipped = torch.where(inside, 0.0, v).sum(dim=1)
    return grad_x, histogram, sum_vu_inside, sum_v_clipped


@torch.library.custom_op("ddq::quantize", mutates_args=())
def quantize_op(
    x: Tensor, lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor, min_bits: int, grad_scale: bool
) -> Tensor:
    """Spec §2 forward; groups = lo.shape[0] consecutive slices of x. `grad_scale` is used by backward.

    Every body returns x_q laid out as `empty_in_storage_order` says: x's strides when x is dense.
    """
    check_quantize_op_arguments(x, lo, hi, residuals, gate_logits, min_bits)
    return quantize_op_reference(x, lo, hi, residuals, gate_logits, min_bits)


def quantize_op_reference(x: Tensor, lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor, min_bits: int) -> Tensor:
    """ddq::quantize's plain-PyTorch body on any device (the CUDA body's too for an empty x)."""
    check_parameter_values(lo, hi, residuals, gate_logits)
    order = storage_order(x, lo.shape[0])
    return restored(quantize_reference(x.permute(order), lo, hi, residuals, gate_logits, min_bits), order)


@quantize_op.register_fake
def _quantize_fake(x, lo, hi, residuals, gate_logits, min_bits, grad_scale):
    check_quantize_op_arguments(x, lo, hi, residuals, gate_logits, min_bits)
    return empty_in_storage_order(x, lo.shape[0])


@torch.library.custom_op("ddq::quantize_backward", mutates_args=())
def quantize_backward_op(
    grad: Tensor,
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    residuals: Tensor,
    gate_logits: Tensor,
    min_bits: int,
    grad_scale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Spec §3: (∂x, ∂lo, ∂hi, ∂residuals, ∂gate_logits) from the upstream gradient; ∂x laid out as x_q."""
    check_quantize_op_arguments(x, lo, hi, residuals, gate_logits, min_bits, grad)
    return quantize_backward_reference(grad, x, lo, hi, residuals, gate_logits, min_bits, grad_scale)


def quantize_backward_reference(grad: Tensor, x: Tensor, lo: Tensor, hi: Tensor, residuals: Tensor, gate_logits: Tensor,
                                min_bits: int, grad_scale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ddq::quantize_backward's plain-PyTorch body on any device (the CUDA body's too for an empty x)."""
    order = storage_order(x, lo.shape[0])
    grad_x, histogram, sum_vu, sum_clipped = reductions_reference(grad.permute(order), x.permute(order), lo, hi)
    numel_per_group = x.numel() // max(lo.shape[0], 1)
    grads = qm.parameter_grads(histogram, sum_vu, sum_clipped, lo, hi, residuals, gate_logits, min_bits, grad_scale, numel_per_group)
    return (restored(grad_x, order), *grads)


@quantize_backward_op.register_fake
def _quantize_backward_fake(grad, x, lo, hi, residuals, gate_logits, min_bits, grad_scale):
    check_quantize_op_arguments(x, lo, hi, residuals, gate_logits, min_bits, grad)
    return (empty_in_storage_order(x, lo.shape[0]), lo.new_empty(lo.shape), hi.new_empty(hi.shape),
            residuals.new_empty(residuals.shape), gate_logits.new_empty(gate_logits.shape))


def _setup_context(ctx, inputs, output):
    x, lo, hi, residuals, gate_logits, min_bits, grad_scale = inputs
    ctx.save_for_backward(x, lo, hi, residuals, gate_logits)
    ctx.min_bits = min_bits
    ctx.grad_scale = grad_scale


def _backward(ctx, grad):
    x, lo, hi, residuals, gate_logits = ctx.saved_tensors
    grads = torch.ops.ddq.quantize_backward(grad, x, lo, hi, residuals, gate_logits, ctx.min_bits, ctx.grad_scale)
    return (*grads, None, None)


quantize_op.register_autograd(_backward, setup_context=_setup_context)


# Triton bodies for CUDA tensors (ddq_kernels.registration); the reference above serves every other device.
if torch.cuda.is_available():
    try:
        import ddq_kernels.registration  # noqa: F401
    except ImportError:
        pass
