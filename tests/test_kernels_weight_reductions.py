"""ddq_kernels.weight_reductions (Triton) vs `reductions_reference` of the summed parts (DDQ_SPEC.md §3).

The kernel adds the P partial sums of ∂W_q in its own fixed order. Tests with dyadic parts (small integers
times 2^-4, whose sums are exact in float32 and in every dtype here, in any order) compare ∂W bit for bit and
the reductions within float32 summation error (1e-5 of Σ|terms|); random parts, whose rounding to a 16-bit
dtype may differ by one unit in the last place between summation orders, compare ∂W within that unit.
Weights are cleared of cell boundaries (`clear_of_boundaries`), where either order may take the neighbouring cell.
"""

from __future__ import annotations

import pytest
import torch

from ddq import quantizer_math as qm
from ddq.functional import reductions_reference
from kernel_cases import DEVICE, DTYPES, clear_of_boundaries, quantizer_params, sample_input

from ddq_kernels.weight_reductions import SUM_THEN_REDUCE, SUMMED_CONFIGS, weight_reductions

SUM_TOLERANCE = 1e-5


def weight_case(parts: int, N: int, K: int, dtype: torch.dtype, mode: str = "symmetric", dyadic: bool = True):
    lo, hi, *_ = quantizer_params(mode, N, 4, 2)
    weight = clear_of_boundaries(sample_input((N, K), lo, hi, dtype, N), lo, hi)
    if dyadic:
        terms = torch.randint(-8, 9, (parts, N, K), device=DEVICE).float() / 16
    else:
        terms = torch.randn(parts, N, K, device=DEVICE)
    return terms, weight, lo, hi


def check_reductions(got, terms, weight, lo, hi, exact: bool):
    v = terms.double().sum(0).float().to(weight.dtype)
    want_w, want_hist, want_vu, want_clipped = reductions_reference(v, weight, lo, hi)
    grad_w, histogram, sum_vu, sum_clipped = got
    assert grad_w.dtype == weight.dtype and grad_w.shape == weight.shape
    assert histogram.shape == (weight.shape[0], qm.FINE_CELLS) and sum_vu.shape == sum_clipped.shape == lo.shape
    if exact:
        assert torch.equal(grad_w, want_w)
    else:
        ulp = torch.finfo(weight.dtype).eps if weight.dtype != torch.float32 else 1e-6
        assert ((grad_w.float() - want_w.float()).abs() <= ulp * want_w.float().abs() + 1e-6).all()
    v32 = v.float()
    u, _ = qm.fine_index(weight, lo, hi)
    slack = 0.0 if exact else torch.finfo(weight.dtype).eps
    scale_v = v32.abs().sum(1, keepdim=True) * (SUM_TOLERANCE + slack) + 1e-6
    scale_vu = torch.nan_to_num(v32 * u).abs().sum(1) * (SUM_TOLERANCE + slack) + 1e-6
    assert ((histogram - want_hist).abs() <= scale_v).all()
    assert ((sum_vu - want_vu).abs() <= scale_vu).all()
    assert ((sum_clipped - want_clipped).abs() <= scale_v[:, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts,N,K", [(1, 1, 1), (5, 7, 13), (37, 3, 300), (2, 33, 3), (17, 19, 64)])
def test_summed_pass_matches_reference(parts, N, K, dtype):
    """Odd N and K (partial tiles; K = 300 spans three column programs; K = 3 puts 32 rows in a program), P not a
    multiple of any parts block (37), every dtype."""
    terms, weight, lo, hi = weight_case(parts, N, K, dtype)
    check_reductions(weight_reductions(terms, weight, lo, hi, SUMMED_CONFIGS[0]), terms, weight, lo, hi, exact=True)


@pytest.mark.parametrize("config", SUMMED_CONFIGS + (SUM_THEN_REDUCE,))
def test_every_candidate_matches_reference(config):
    terms, weight, lo, hi = weight_case(9, 11, 40, torch.bfloat16, mode="affine")
    check_reductions(weight_reductions(terms, weight, lo, hi, config), terms, weight, lo, hi, exact=True)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_random_parts_round_once_to_the_weight_dtype(dtype):
    """Float32 sums of random parts, rounded once to the weight's dtype (round to nearest even on every backend)."""
    terms, weight, lo, hi = weight_case(6, 5, 24, dtype, dyadic=False)
    check_reductions(weight_reductions(terms, weight, lo, hi, SUMMED_CONFIGS[0]), terms, weight, lo, hi, exact=False)


def test_whole_weight_gradient_goes_to_the_element_pass():
    """A (N, K) ∂W_q (what the GEMMs other than the fused pass return) is reduced as it is."""
    terms, weight, lo, hi = weight_case(1, 6, 16, torch.float16)
    grad_w_q = terms[0].to(torch.float16)
    check_reductions(weight_reductions(grad_w_q, weight, lo, hi), terms, weight, lo, hi, exact=True)


def test_non_finite_weight_is_clipped():
    """A NaN or ±inf weight lies outside the range: ∂W = 0 there and its v counts in Σv·(1 − in)."""
    terms, weight, lo, hi = weight_case(3, 4, 8, torch.float32)
    weight[0, 1], weight[2, 5], weight[3, 0] = float("nan"), float("inf"), -float("inf")
    grad_w, _, _, sum_clipped = weight_reductions(terms, weight, lo, hi, SUMMED_CONFIGS[0])
    assert grad_w[0, 1] == 0 and grad_w[2, 5] == 0 and grad_w[3, 0] == 0
    _, _, _, want_clipped = reductions_reference(terms.sum(0), weight, lo, hi)
    assert torch.allclose(sum_clipped, want_clipped, atol=1e-5)


def test_bad_arguments_are_clear_errors():
    terms, weight, lo, hi = weight_case(2, 4, 8, torch.float32)
    with pytest.raises(ValueError, match=r"parts must be \(P ≥ 1, N, K\)"):
        weight_reductions(terms[:, :3], weight, lo, hi)
    with pytest.raises(ValueError, match=r"parts must be \(P ≥ 1, N, K\)"):
        weight_reductions(terms[:0], weight, lo, hi)
    with pytest.raises(TypeError, match="parts must be float32"):
        weight_reductions(terms.half(), weight, lo, hi)
    with pytest.raises(ValueError, match="per output channel"):
        weight_reductions(terms, weight, lo[:1], hi[:1])


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(1031, 200, 40), (259, 72, 256), (4099, 16, 8), (300, 32, 192)])
def test_fused_backward_parts_reduce_as_their_sum_on_gpu(M, K, N):
    """The fused backward pass's partial sums of ∂W_q, reduced by every candidate, against the element pass over
    the sum `linear_backward_shared` returns (the same terms in another order: the float32 tolerance above)."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward_input_cuda import linear_backward_shared_parts
    from ddq_kernels.quantize_backward import quantize_reductions

    dtype = torch.bfloat16
    lo, hi, residuals, logits = quantizer_params("unsigned", 1, 4, 1)
    x = clear_of_boundaries(sample_input((M, K), lo, hi, dtype, 1), lo, hi)
    w_lo, w_hi, *_ = quantizer_params("symmetric", N, 4, 2)
    weight = clear_of_boundaries(sample_input((N, K), w_lo, w_hi, dtype, N), w_lo, w_hi)
    grad_y = torch.randn(M, N, device=DEVICE).to(dtype)
    table = level_table(lo, hi, residuals, logits, 1)
    *_, parts = linear_backward_shared_parts(grad_y, weight, x, lo, hi, table, logits, 1)
    assert parts.dim() == 3 and parts.shape[1:] == (N, K) and parts.dtype == torch.float32
    for config in SUMMED_CONFIGS + (SUM_THEN_REDUCE, None):
        got = weight_reductions(parts, weight, w_lo, w_hi, config)
        want = quantize_reductions(parts.sum(0), weight, w_lo, w_hi)
        assert ((got[0].float() - want[0].float()).abs()
                <= torch.finfo(dtype).eps * want[0].float().abs() + 1e-6).all()
        scale = parts.sum(0).abs().sum(1) * (SUM_TOLERANCE + torch.finfo(dtype).eps) + 1e-6
        assert ((got[1] - want[1]).abs() <= scale[:, None]).all()
        assert ((got[3] - want[3]).abs() <= scale).all()
