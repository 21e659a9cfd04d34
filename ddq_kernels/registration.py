"""CUDA bodies (Triton) for the ddq custom ops; imported by `ddq.functional` when CUDA and Triton exist.

- ddq::quantize → `level_table` + `quantize` (one pass over x).
- ddq::quantize_backward → `quantize_reductions` (one pass over v and x) + `parameter_grads` on the
  (G, 256) tables (one launch, whose last programs sum a per-channel quantizer's gate terms with done counters
  zeroed with the bins; `ddq.quantizer_math.parameter_grads` is its reference).
- ddq::quantized_linear → both quantizers' bounds from their range parameters, W_q (once per step) and
  the activation's level table in one launch (`weight_and_tables`; on large weights `range_bounds`,
  `level_tables`, then `quantize`), y by the GEMM with the activation quantizer in its A-operand load;
  W_q, the activation's table and the bounds are returned for backward.
- ddq::quantized_linear_backward → ∂x, the activation reductions and ∂W_q by `linear_backward`: the
  backward-input GEMM (reductions in its epilogue) then the backward-weight GEMM (x re-quantized on load),
  one CUDA C pass for both, or cuBLAS around one SHARED pass that also writes x_q; then the weight
  quantizer's reductions over ∂W_q (`weight_reductions`, which adds the fused pass's partial sums of ∂W_q);
  both quantizers' parameter gradients in one launch (`two_parameter_grads`, which also takes ∂lo and ∂hi
  on to the range parameters, and sums the weight's gate terms in its last programs). Both quantizers' bins
  are rows of one buffer, zeroed by one fill with that launch's done counters.
Each GEMM and reduction launcher picks, per shape class, the faster of its fused kernel and the
quantize kernels around cuBLAS (`ddq_kernels.launch.fastest_config`).

Host syncs: none in the forward; every kernel reads the bitwidth from the gate logits on the device.
The backward syncs only where `torch.bincount` is the chosen histogram strategy (it reads its largest
bin), which happens only where NVRTC cannot compile the SHARED strategy: so a whole training step can be
captured as CUDA graphs (`torch.compile(mode="reduce-overhead")`, docs/kernels.md).
ddq::quantize(_backward) run over x in `ddq.functional.storage_order`, keeping a channels_last x's layout.
"""

import torch

from ddq.functional import (autocast_off, check_parameter_values, check_quantize_op_arguments, quantize_backward_reference,
                            quantize_op_reference, restored, storage_order)
# linear_op also defines ddq::quantized_linear(_backward) before their CUDA bodies are registered here.
from ddq_kernels.linear_op import (bias_grad, check_linear_arguments, check_linear_backward_arguments,
                                   quantized_linear_backward_reference, quantized_linear_reference)
from ddq_kernels.linear_backward import linear_backward_activation
from ddq_kernels.linear_forward import linear_forward
from ddq_kernels.parameter_grads import gate_sum_counters, parameter_grads, two_parameter_grads
from ddq_kernels.quantize import quantize
from ddq_kernels.quantize_backward import quantize_reductions, zeroed_bins_with_counters
from ddq_kernels.weight_and_tables import bound_views, weight_and_act_table
from ddq_kernels.weight_reductions import weight_reductions


MAX_GROUPS = 65535  # CUDA's limit on a grid's y extent, where the element kernels put the groups


def check_groups(lo: torch.Tensor, what: str = "x") -> None:
    """A clear error instead of a failed launch for per-channel tensors with more than 65535 channels."""
    if lo.shape[0] > MAX_GROUPS:
        raise ValueError(f"ddq CUDA kernels: {what} has {lo.shape[0]} quantizer groups (channels); at most {MAX_GROUPS} "
                         "are supported on CUDA (per-tensor quantization, or the CPU reference, has no limit)")


def parameter_grad_arguments(reductions, x, lo, hi, residuals, gate_logits, min_bits, grad_scale) -> tuple:
    """`parameter_grads`' arguments from a quantizer's reductions (∂x, histogram, Σv·u·in, Σv·(1 − in))."""
    _, histogram, sum_vu, sum_clipped = reductions
    return histogram, sum_vu, sum_clipped, lo, hi, residuals, gate_logits, min_bits, grad_scale, x.numel() // lo.shape[0]


@torch.library.register_kernel("ddq::quantize", "cuda")
def quantize_cuda(x, lo, hi, residuals, gate_logits, min_bits, grad_scale):
    check_quantize_op_arguments(x, lo, hi, residuals, gate_logits, min_bits)
    if x.numel() == 0:  # the launchers size their grids by x; the reference handles an empty x
        return quantize_op_reference(x, lo, hi, residuals, gate_logits, min_bits)
    check_groups(lo)
    check_parameter_values(lo, hi, residuals, gate_logits)
    order = storage_order(x, lo.shape[0])
    return restored(quantize(x.permute(order), lo, hi, residuals, gate_logits, min_bits), order)


@torch.library.register_kernel("ddq::quantize_backward", "cuda")
def quantize_backward_cuda(grad, x, lo, hi, residuals, gate_logits, min_bits, grad_scale):
    check_quantize_op_arguments(x, lo, hi, residuals, gate_logits, min_bits, grad)
    if x.numel() == 0:
        return quantize_backward_reference(grad, x, lo, hi, residuals, gate_logits, min_bits, grad_scale)
    check_groups(lo)
    order = storage_order(x, lo.shape[0])
    # The gate terms' done counters ride in the bins' buffer, zeroed by its one fill.
    histogram, sums, done_counters = zeroed_bins_with_counters(lo.shape[0], x.device, gate_sum_counters(lo.shape[0]))
    grad_x, *group_sums = quantize_reductions(grad.permute(order), x.permute(order), lo, hi, bins=(histogram, sums))
    arguments = parameter_grad_arguments((grad_x, *group_sums), x, lo, hi, residuals, gate_logits, min_bits, grad_scale)
    return (restored(grad_x, order), *parameter_grads(*arguments, done_counters=done_counters))


@torch.library.register_kernel("ddq::quantized_linear", "cuda")
def quantized_linear_cuda(x, weight, bias, act_bottom, act_top, act_residuals, act_logits,
                          weight_bottom, weight_top, weight_residuals, weight_logits,
                          act_min_bits, weight_min_bits, act_grad_scale, weight_grad_scale, act_mode, weight_mode):
    check_linear_arguments(x, weight, bias, (act_bottom, act_top, act_residuals, act_logits),
                           (weight_bottom, weight_top, weight_residuals, weight_logits), act_min_bits, weight_min_bits,
                           act_mode, weight_mode)
    if x.numel() == 0 or weight.numel() == 0:  # the launchers size their grids by M, N and K
        return quantized_linear_reference(x, weight, bias, act_bottom, act_top, act_residuals, act_logits, weight_bottom,
                                          weight_top, weight_residuals, weight_logits, act_min_bits, weight_min_bits,
                                          act_mode, weight_mode)
    check_groups(weight_top, "the weight")
    weight = weight.contiguous()
    w_q, table, bounds = weight_and_act_table(
        weight, (weight_bottom, weight_top, weight_residuals, weight_logits, weight_min_bits, weight_mode),
        (act_bottom, act_top, act_residuals, act_logits, act_min_bits, act_mode))
    act_lo, act_hi, weight_lo, weight_hi = bound_views(bounds)
    check_parameter_values(act_lo, act_hi, act_residuals, act_logits)
    check_parameter_values(weight_lo, weight_hi, weight_residuals, weight_logits)
    with autocast_off(x.device):
        y = linear_forward(x.contiguous(), w_q, bias, act_lo, act_hi, table, act_logits.contiguous(), act_min_bits)
    return y, w_q, table, bounds


@torch.library.register_kernel("ddq::quantized_linear_backward", "cuda")
def quantized_linear_backward_cuda(grad_y, x, weight, w_q, act_table, bounds, act_bottom, act_top, act_residuals,
                                   act_logits, weight_bottom, weight_top, weight_residuals, weight_logits,
                                   act_min_bits, weight_min_bits, act_grad_scale, weight_grad_scale, act_mode,
                                   weight_mode, has_bias):
    check_linear_backward_arguments(grad_y, x, weight, w_q, act_table, bounds, (act_bottom, act_top, act_residuals, act_logits),
                                    (weight_bottom, weight_top, weight_residuals, weight_logits), act_min_bits,
                                    weight_min_bits, act_mode, weight_mode)
    if x.numel() == 0 or weight.numel() == 0:
        return quantized_linear_backward_reference(grad_y, x, weight, w_q, act_bottom, act_top, act_residuals, act_logits,
                                                   weight_bottom, weight_top, weight_residuals, weight_logits, act_min_bits,
                                                   weight_min_bits, act_grad_scale, weight_grad_scale, act_mode, weight_mode,
                                                   has_bias)
    with autocast_off(x.device):
        return _linear_backward_kernels(grad_y, x, weight.contiguous(), w_q, act_table, bounds, act_bottom, act_top,
                                        act_residuals, act_logits, weight_bottom, weight_top, weight_residuals,
                                        weight_logits, act_min_bits, weight_min_bits, act_grad_scale, weight_grad_scale,
                                        act_mode, weight_mode, has_bias)


def _linear_backward_kernels(grad_y, x, weight, w_q, act_table, bounds, act_bottom, act_top, act_residuals, act_logits,
                             weight_bottom, weight_top, weight_residuals, weight_logits, act_min_bits, weight_min_bits,
                             act_grad_scale, weight_grad_scale, act_mode, weight_mode, has_bias):
    grad_y = grad_y.contiguous()
    act_lo, act_hi, weight_lo, weight_hi = bound_views(bounds)
    act_logits = act_logits.contiguous()
    # Both quantizers' bins are rows of one buffer: one fill kernel for the step instead of two.
    histogram, sums, done_counters = zeroed_bins_with_counters(1 + weight_lo.shape[0], x.device,
                                                               gate_sum_counters(weight_lo.shape[0]))
    reductions, grad_w_q = linear_backward_activation(grad_y, w_q, x, act_lo, act_hi, act_table, act_logits,
                                                      act_min_bits, weight_gradient_parts=True,
                                                      bins=(histogram[:1], sums[:1]))
    weight_grads = weight_reductions(grad_w_q, weight, weight_lo, weight_hi, bins=(histogram[1:], sums[1:]))
    act, wgt = two_parameter_grads(
        parameter_grad_arguments(reductions, x, act_lo, act_hi, act_residuals, act_logits, act_min_bits, act_grad_scale),
        parameter_grad_arguments(weight_grads, weight, weight_lo, weight_hi, weight_residuals, weight_logits,
                                 weight_min_bits, weight_grad_scale),
        ranges=((act_mode, act_bottom, act_top), (weight_mode, weight_bottom, weight_top)), done_counters=done_counters)
    return reductions[0], weight_grads[0], bias_grad(grad_y, has_bias), *act, *wgt
