"""ddq_kernels.parameter_grads (Triton) vs ddq.quantizer_math.parameter_grads (DDQ_SPEC.md §3).

Random per-group reductions and parameters for every bitwidth and min_bits, per tensor and per
channel. Both compute in float32 from the same tables in a different order: 1e-5 relative to the size
of the sums each output is a difference of (range gradients: Σ|H|·N + |Σvu| + N·|Σv_clipped|, over N;
gate gradients: Σ|H|·max|level|; residuals: their largest magnitude).
"""

from __future__ import annotations

import pytest
import torch

from ddq import quantizer_math as qm
from kernel_cases import DEVICE, logits_for_bits

from ddq_kernels.parameter_grads import parameter_grads


@pytest.mark.parametrize("groups", [1, 5])
@pytest.mark.parametrize("min_bits", [0, 2])
@pytest.mark.parametrize("bits", range(9))
def test_parameter_grads_match_reference(bits, min_bits, groups):
    if bits < min_bits:
        pytest.skip("the bitwidth is at least min_bits")
    check_against_reference(bits, min_bits, groups)


def test_gate_terms_of_more_groups_than_one_reduction_block():
    """The gate terms of 1100 per-channel groups are summed in two blocks of 1024 rows (gate_logit_grads_kernel)."""
    check_against_reference(3, 2, 1100)


def check_against_reference(bits: int, min_bits: int, groups: int) -> None:
    histogram = torch.randn(groups, 256, device=DEVICE)
    sum_vu, sum_clipped = torch.randn(groups, device=DEVICE), torch.randn(groups, device=DEVICE)
    lo = -torch.rand(groups, device=DEVICE) - 0.5
    hi = torch.rand(groups, device=DEVICE) + 0.5
    residuals = torch.randn(groups, 256, device=DEVICE) * 0.3
    logits = logits_for_bits(bits, min_bits).to(DEVICE)
    grad_scale = bits % 2 == 0  # both settings of LSQ's gradient scale across the bitwidths
    args = (histogram, sum_vu, sum_clipped, lo, hi, residuals, logits, min_bits, grad_scale, 1001)
    # Gate gradients are differences of sums over every cell: their rounding scales with Σ|H|·max|level|.
    gate_scale = histogram.abs().sum() * torch.maximum(lo.abs().max(), hi.abs().max())
    # ∂lo and ∂hi are (Σ H·T − Σvu + N·Σv_clipped)/N-style differences: their rounding scales with the terms.
    range_scale = ((histogram.abs().sum(dim=1) * qm.FINE_MAX + sum_vu.abs() + qm.FINE_MAX * sum_clipped.abs()) / qm.FINE_MAX).max()
    for name, got, want in zip(("lo", "hi", "residuals", "logits"), parameter_grads(*args), qm.parameter_grads(*args)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = {"logits": gate_scale, "lo": range_scale, "hi": range_scale}.get(name, want.abs().max().clamp_min(1e-6))
        assert (got - want).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize("groups", [1, 3])
def test_sums_read_in_place_from_strided_views(groups):
    """The reductions return Σv·u·in and Σv·(1 − in) as the columns of one (G, 2) buffer; read in place."""
    sums = torch.randn(groups, 2, device=DEVICE)
    strided = (torch.randn(groups, 256, device=DEVICE), sums[:, 0], sums[:, 1], -torch.ones(groups, device=DEVICE),
               torch.ones(groups, device=DEVICE), torch.zeros(groups, 256, device=DEVICE), logits_for_bits(3, 2).to(DEVICE),
               2, True, 77)
    contiguous = strided[:1] + (sums[:, 0].clone(), sums[:, 1].clone()) + strided[3:]
    for got, want in zip(parameter_grads(*strided), parameter_grads(*contiguous)):
        assert torch.equal(got, want)
