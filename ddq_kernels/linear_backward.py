"""The activation side of DDQLinear's backward on the device: ∂x with the activation reductions and
∂W_q = dYᵀ·Q_x(x) (DDQ_SPEC.md §3; references `ddq.functional.reductions_reference` of dY·W_q and x, and
dYᵀ·`quantize_reference(x)`).

Three candidates, timed once per shape class by `fastest_config`:
- FUSED: `linear_backward_input_cuda.linear_backward_shared`, one CUDA C pass that stages dY and x once
  and computes both GEMMs, quantizing x from the fine cells its reductions already found (16-bit x, N ≤ 256);
- SEPARATE: `linear_backward_input`, then `linear_backward_weight`, each choosing its own kernels;
- AROUND_CUBLAS: cuBLAS for both GEMMs around one SHARED element pass (`shared_histogram`) that writes
  ∂x, the reductions and x_q together, so that x is read once where SEPARATE's cuBLAS paths read it twice
  (once for the reductions, once to quantize it for ∂W_q). Where NVRTC runs.
"""

from __future__ import annotations

import torch

from ddq_kernels import shared_histogram
from ddq_kernels.launch import fastest_config, interpreting, size_class
from ddq_kernels.linear_backward_input import linear_backward_input
from ddq_kernels.linear_backward_input_cuda import linear_backward_shared, linear_backward_shared_parts, supports
from ddq_kernels.linear_backward_weight import linear_backward_weight
from ddq_kernels.quantize_backward import Bins, reduction_outputs

FUSED = {"fused": True}
SEPARATE = {"fused": False}
AROUND_CUBLAS = {"fused": False, "around_cublas": True}


def linear_backward_activation(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor,
                               hi: torch.Tensor, table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int,
                               config: dict | None = None, weight_gradient_parts: bool = False,
                               bins: Bins | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """((∂x, histogram (1, 256), Σv·u·in (1,), Σv·(1 − in) (1,)), ∂W_q (N, K)) for x (M, K), dY (M, N),
    W_q (N, K) and the activation quantizer (per tensor; `table` from `level_table`).

    With `weight_gradient_parts`, FUSED leaves ∂W_q as its (P, N, K) float32 partial sums, which
    `weight_reductions.weight_reductions` adds within the weight quantizer's pass (the other candidates
    return ∂W_q whole either way). `bins` (zeroed, see `quantize_backward.output_bins`) receives the histogram
    and the sums instead of new tensors."""
    if config is None:
        M, K = x.shape
        candidates = backward_activation_configs(grad_y, w_q, x)
        key = (size_class(M), w_q.shape[0], K, x.dtype, FUSED in candidates, AROUND_CUBLAS in candidates,
               weight_gradient_parts)

        def run(candidate):
            return linear_backward_activation(grad_y, w_q, x, lo, hi, table, gate_logits, min_bits, candidate,
                                              weight_gradient_parts)

        config = fastest_config("linear_backward_activation", key, candidates, run)
    if config.get("around_cublas"):
        return backward_around_cublas(grad_y, w_q, x, lo, hi, table, gate_logits, min_bits, bins)
    if config["fused"]:
        fused = linear_backward_shared_parts if weight_gradient_parts else linear_backward_shared
        *reductions, grad_w_q = fused(grad_y, w_q, x, lo, hi, table, gate_logits, min_bits, bins=bins)
        return tuple(reductions), grad_w_q
    return (linear_backward_input(grad_y, w_q, x, lo, hi, bins=bins),
            linear_backward_weight(grad_y, x, lo, hi, table, gate_logits, min_bits))


def backward_activation_configs(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor) -> list[dict]:
    """The candidates for a call: FUSED where the CUDA C pass `supports` it, SEPARATE, and AROUND_CUBLAS where
    the SHARED pass runs."""
    return (([FUSED] if supports(grad_y, w_q, x) else []) + [SEPARATE]
            + ([AROUND_CUBLAS] if supports_around_cublas(x) else []))


def supports_around_cublas(x: torch.Tensor) -> bool:
    """AROUND_CUBLAS needs the SHARED pass: a CUDA x (not the interpreter) where NVRTC compiles it."""
    return x.is_cuda and not interpreting() and shared_histogram.available()


def backward_around_cublas(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                           table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int, bins: Bins | None = None
                           ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """`linear_backward_activation`'s results from dY·W_q and dYᵀ·x_q by cuBLAS, with ∂x, the reductions and
    x_q from one SHARED pass over (dY·W_q, x) between them."""
    x = x.contiguous()
    grad_x, histogram, sums = reduction_outputs(x, 1, bins)
    x_q = torch.empty_like(x)
    shared_histogram.reductions_shared(grad_y @ w_q, x, lo, hi, grad_x, histogram, sums, (x_q, table, gate_logits, min_bits))
    return (grad_x, histogram, sums[:, 0], sums[:, 1]), grad_y.t() @ x_q
