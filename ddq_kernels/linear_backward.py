"""The activation side of DDQLinear's backward on the device: ∂x with the activation reductions and
∂W_q = dYᵀ·Q_x(x) (DDQ_SPEC.md §3; references `ddq.functional.reductions_reference` of dY·W_q and x, and
dYᵀ·`quantize_reference(x)`).

Two candidates, timed once per shape class by `fastest_config`:
- FUSED: `linear_backward_input_cuda.linear_backward_shared`, one CUDA C pass that stages dY and x once
  and computes both GEMMs, quantizing x from the fine cells its reductions already found (16-bit x, N ≤ 64);
- SEPARATE: `linear_backward_input`, then `linear_backward_weight`, each choosing its own kernels.
"""

from __future__ import annotations

import torch

from ddq_kernels.launch import fastest_config, size_class
from ddq_kernels.linear_backward_input import linear_backward_input
from ddq_kernels.linear_backward_input_cuda import linear_backward_shared, supports_weight_gradient
from ddq_kernels.linear_backward_weight import linear_backward_weight

FUSED = {"fused": True}
SEPARATE = {"fused": False}


def linear_backward_activation(grad_y: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, lo: torch.Tensor,
                               hi: torch.Tensor, table: torch.Tensor, gate_logits: torch.Tensor, min_bits: int,
                               config: dict | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """((∂x, histogram (1, 256), Σv·u·in (1,), Σv·(1 − in) (1,)), ∂W_q (N, K)) for x (M, K), dY (M, N),
    W_q (N, K) and the activation quantizer (per tensor; `table` from `level_table`)."""
    if config is None:
        M, K = x.shape
        fused = supports_weight_gradient(grad_y, w_q, x)
        key = (size_class(M), w_q.shape[0], K, x.dtype, fused)

        def run(candidate):
            return linear_backward_activation(grad_y, w_q, x, lo, hi, table, gate_logits, min_bits, candidate)

        config = fastest_config("linear_backward_activation", key, [FUSED, SEPARATE] if fused else [SEPARATE], run)
    if config["fused"]:
        *reductions, grad_w_q = linear_backward_shared(grad_y, w_q, x, lo, hi, table, gate_logits, min_bits)
        return tuple(reductions), grad_w_q
    return (linear_backward_input(grad_y, w_q, x, lo, hi),
            linear_backward_weight(grad_y, x, lo, hi, table, gate_logits, min_bits))
