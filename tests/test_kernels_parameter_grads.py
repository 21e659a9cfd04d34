"""ddq_kernels.parameter_grads (Triton) vs ddq.quantizer_math.parameter_grads (DDQ_SPEC.md §3).

Random per-group reductions and parameters for every bitwidth and min_bits, per tensor and per
channel. Both compute in float32 from the same tables in a different order: 1e-5 relative to the size
of the sums each output is a difference of (range gradients: Σ|H|·N + |Σvu| + N·|Σv_clipped|, over N;
gate gradients: Σ|H|·max|level|; residuals: Δ·Σ|H| of a group).
"""

from __future__ import annotations

import pytest
import torch

from ddq import quantizer_math as qm
from kernel_cases import DEVICE, logits_for_bits

from ddq_kernels.parameter_grads import KernelOperands, parameter_grads, two_parameter_grads


@pytest.mark.parametrize("groups", [1, 5])
@pytest.mark.parametrize("min_bits", [0, 2])
@pytest.mark.parametrize("bits", range(9))
def test_parameter_grads_match_reference(bits, min_bits, groups):
    if bits < min_bits:
        pytest.skip("the bitwidth is at least min_bits")
    check_against_reference(bits, min_bits, groups)


@pytest.mark.gpu
def test_gate_terms_of_more_groups_than_one_reduction_block_on_gpu():
    """The gate terms of 1100 per-channel groups are summed in five chunks of up to 256 rows (gate_logit_grads_kernel),
    end to end (in the interpreter, 1100 programs of kernel 1 take over a minute: the next test covers kernel 2)."""
    check_against_reference(3, 2, 1100)


def test_kernel_two_sums_more_groups_than_one_reduction_block():
    """Kernel 2 alone, through its launcher: the gate terms of 1100 groups, summed in five chunks, then
    the logit gradients, against the reference on the sum (float32, another order: 1e-5 of Σ|terms|)."""
    operands = KernelOperands(random_reductions(3, 2, 1100))
    terms = torch.randn(1100, 8, device=DEVICE)
    assert operands.gate_terms.shape == (1100 + 5, 8)  # a row for each chunk's sum after the groups' rows
    operands.gate_terms[:1100].copy_(terms)
    got = operands.finished()[3]
    want = qm.gate_logit_grads(terms.sum(dim=0), operands.gate_logits, 2)
    assert (got - want).abs().max() <= 1e-5 * terms.abs().sum(dim=0).max()


def random_reductions(bits: int, min_bits: int, groups: int, numel_per_group: int = 1001) -> tuple:
    """`parameter_grads`' arguments: random reductions and parameters of a quantizer at `bits`."""
    histogram = torch.randn(groups, 256, device=DEVICE)
    sum_vu, sum_clipped = torch.randn(groups, device=DEVICE), torch.randn(groups, device=DEVICE)
    lo = -torch.rand(groups, device=DEVICE) - 0.5
    hi = torch.rand(groups, device=DEVICE) + 0.5
    residuals = torch.randn(groups, 256, device=DEVICE) * 0.3
    logits = logits_for_bits(bits, min_bits).to(DEVICE)
    grad_scale = bits % 2 == 0  # both settings of LSQ's gradient scale across the bitwidths
    return histogram, sum_vu, sum_clipped, lo, hi, residuals, logits, min_bits, grad_scale, numel_per_group


def check_against_reference(bits: int, min_bits: int, groups: int) -> None:
    args = random_reductions(bits, min_bits, groups)
    histogram, sum_vu, sum_clipped, lo, hi = args[:5]
    # Gate gradients are differences of sums over every cell: their rounding scales with Σ|H|·max|level|.
    gate_scale = histogram.abs().sum() * torch.maximum(lo.abs().max(), hi.abs().max())
    # ∂lo and ∂hi are (Σ H·T − Σvu + N·Σv_clipped)/N-style differences: their rounding scales with the terms.
    range_scale = ((histogram.abs().sum(dim=1) * qm.FINE_MAX + sum_vu.abs() + qm.FINE_MAX * sum_clipped.abs()) / qm.FINE_MAX).max()
    # ∂r = Δ·(a block's histogram sum): its rounding scales with Δ·Σ|H| over the block, which at 0 bits (one block
    # of 256 random bins) can be 1000× the sum itself (seed 19 failed a bound of the result's own magnitude).
    residual_scale = ((hi - lo) / qm.FINE_MAX * histogram.abs().sum(dim=1)).max()
    for name, got, want in zip(("lo", "hi", "residuals", "logits"), parameter_grads(*args), qm.parameter_grads(*args)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = {"logits": gate_scale, "lo": range_scale, "hi": range_scale, "residuals": residual_scale}[name]
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


@pytest.mark.parametrize("first,second", [((4, 0, 1, 777), (3, 2, 5, 32)), ((8, 2, 3, 9), (1, 0, 1, 50000)),
                                          ((2, 2, 1, 100), (5, 1, 1, 64)), ((0, 0, 4, 10), (6, 2, 7, 3))])
def test_two_quantizers_in_one_launch_equal_two_launches(first, second):
    """two_parameter_grads (one launch of kernel 1 for both quantizers) computes each program's float32 math as
    parameter_grads does, so the results are equal bit for bit; any mix of per-tensor and per-channel
    quantizers, bitwidths, min_bits and LSQ scaling (first, second: bits, min_bits, groups, numel per group)."""
    args_1, args_2 = random_reductions(*first), random_reductions(*second)
    got_1, got_2 = two_parameter_grads(args_1, args_2)
    for got, want in zip(got_1 + got_2, parameter_grads(*args_1) + parameter_grads(*args_2)):
        assert torch.equal(got, want)


def check_last_program_sums(second: tuple) -> None:
    """With done counters, the second quantizer's programs that finish last sum its gate terms (kernel 2 in kernel
    1's launch) in kernel 2's order: equal bit for bit to two launches, and the counters count every program of
    each chunk and, where there are several, every chunk. The same for one quantizer (`parameter_grads`)."""
    from ddq_kernels.parameter_grads import gate_sum_counters
    from ddq_kernels.quantize_backward import zeroed_bins_with_counters

    args_1, args_2 = random_reductions(3, 1, 1), random_reductions(*second)
    want_1, want_2 = parameter_grads(*args_1), parameter_grads(*args_2)
    counters = zeroed_bins_with_counters(2, DEVICE, gate_sum_counters(second[2]))[2]
    got_1, got_2 = two_parameter_grads(args_1, args_2, done_counters=counters)
    for got, want in zip(got_1 + got_2, want_1 + want_2):
        assert torch.equal(got, want)
    check_done_counters(counters, second[2])
    counters.zero_()
    for got, want in zip(parameter_grads(*args_2, done_counters=counters), want_2):
        assert torch.equal(got, want)
    check_done_counters(counters, second[2])


def check_done_counters(counters: torch.Tensor, groups: int) -> None:
    from ddq_kernels.parameter_grads import gate_sum_chunks

    chunk, chunks = gate_sum_chunks(groups)
    per_chunk = [min(chunk, groups - first) for first in range(0, groups, chunk)] if groups > 1 else [0]
    assert counters.dtype == torch.int32
    assert counters.tolist() == per_chunk + ([chunks] if chunks > 1 else [])


@pytest.mark.parametrize("second", [(4, 2, 5, 32), (2, 0, 37, 9), (5, 1, 1, 64)])
def test_last_program_sums_the_gate_terms(second):
    check_last_program_sums(second)


@pytest.mark.parametrize("groups", [9, 16])
def test_last_programs_sum_the_gate_terms_in_chunks(monkeypatch, groups):
    """Chunks of 4 groups here (256 on the device), so that the interpreter runs the two levels on a few programs:
    the last program of each chunk sums it, the last chunk the chunks' sums (a partial last chunk of 9)."""
    from ddq_kernels import parameter_grads as kernels

    monkeypatch.setattr(kernels, "MAX_CHUNK", 4)
    check_last_program_sums((4, 2, groups, 100))


def test_too_few_done_counters_are_rejected():
    from ddq_kernels.parameter_grads import gate_sum_counters

    args_1, args_2 = random_reductions(3, 1, 1), random_reductions(4, 2, 300)
    counters = torch.zeros(gate_sum_counters(300) - 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="done_counters must hold 3 int32 for 300 groups"):
        two_parameter_grads(args_1, args_2, done_counters=counters)
    with pytest.raises(ValueError, match="done_counters must hold 3 int32"):
        parameter_grads(*args_2, done_counters=counters.float())


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [2, 192, 1100, 4096])
def test_last_program_sums_the_gate_terms_on_gpu(groups):
    """Many programs finishing at once: the last of a chunk must see the chunk's terms, the last chunk every
    chunk's sum (1100 and 4096 groups: 5 and 16 chunks)."""
    for _ in range(20):
        check_last_program_sums((4, 2, groups, 100))
