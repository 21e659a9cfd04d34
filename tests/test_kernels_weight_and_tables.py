"""ddq_kernels.weight_and_tables: W_q and the activation's level table in one launch (DDQ_SPEC.md §2).

The merged launch builds each table with `level_table`'s own code and quantizes with `quantize`'s, so its
results are compared bit for bit with the two launches it replaces (`level_tables`, then `quantize`), which
the other kernel tests compare with the reference; one case also checks W_q against `quantize_reference`
away from cell boundaries.
"""

from __future__ import annotations

import pytest
import torch

from ddq import quantizer_math as qm
from ddq.functional import quantize_reference
from kernel_cases import DEVICE, DTYPES, ambiguous, levels_differ, quantizer_params, sample_input

from ddq_kernels import weight_and_tables
from ddq_kernels.level_table import level_table, level_tables
from ddq_kernels.quantize import quantize
from ddq_kernels.weight_and_tables import merged, weight_and_act_table


def layer_quantizers(N: int, K: int, dtype: torch.dtype, weight_bits: int, act_bits: int, act_mode: str = "unsigned"):
    weight_params = quantizer_params("symmetric", N, weight_bits, 1)
    act_params = quantizer_params(act_mode, 1, act_bits, 1)
    weight = sample_input((N, K), weight_params[0], weight_params[1], dtype, N)
    return weight, (*weight_params, 1, qm.BOUNDS), (*act_params, 1, qm.BOUNDS)


def two_launches(weight, weight_quantizer, act_quantizer):
    weight_table, act_table = level_tables(weight_quantizer[:5], act_quantizer[:5])
    lo, hi, _, logits, min_bits, _ = weight_quantizer
    return quantize(weight, lo, hi, None, logits, min_bits, table=weight_table), act_table


def check_same_as_two_launches(weight, weight_quantizer, act_quantizer):
    assert merged(weight, weight_quantizer[0], act_quantizer[0])
    w_q, act_table, bounds = weight_and_act_table(weight, weight_quantizer, act_quantizer)
    want_w_q, want_table = two_launches(weight, weight_quantizer, act_quantizer)
    # Range mode 0: the bounds are the (lo, hi) given, activation first (test_kernels_range_bounds has the others).
    assert torch.equal(bounds, torch.stack([torch.cat((act_quantizer[i], weight_quantizer[i])) for i in (0, 1)]))
    assert w_q.dtype == weight.dtype and w_q.shape == weight.shape
    assert torch.equal(w_q, want_w_q) and torch.equal(act_table, want_table)
    return w_q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (3, 1031), (24, 40)])
def test_one_launch_equals_two(N, K, dtype):
    """Odd rows and columns; K = 1031 takes two loads of a row, one partial."""
    weight, weight_quantizer, act_quantizer = layer_quantizers(N, K, dtype, 4, 4)
    check_same_as_two_launches(weight, weight_quantizer, act_quantizer)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_bitwidth(bits):
    """Weight and activation at every bitwidth (the table's block size is read on the device); W_q against
    the reference away from cell boundaries."""
    weight, weight_quantizer, act_quantizer = layer_quantizers(5, 37, torch.float32, bits, 9 - bits, "affine")
    w_q = check_same_as_two_launches(weight, weight_quantizer, act_quantizer)
    lo, hi, residuals, logits, min_bits, _ = weight_quantizer
    differ = levels_differ(w_q, quantize_reference(weight, lo, hi, residuals, logits, min_bits), lo, hi)
    assert not (differ & ~ambiguous(weight, lo, hi)).any()
    assert torch.equal(weight_and_act_table(weight, weight_quantizer, act_quantizer)[1],
                       level_table(*act_quantizer[:4], act_quantizer[4]))


def test_non_finite_weights_as_quantize():
    """NaN stays NaN, ±inf take the end levels: what `quantize` does (spec §2, docs/kernels.md)."""
    weight, weight_quantizer, act_quantizer = layer_quantizers(4, 9, torch.bfloat16, 3, 4)
    weight[0, 0], weight[1, 3], weight[3, 8] = float("nan"), float("inf"), -float("inf")
    w_q, act_table, _ = weight_and_act_table(weight, weight_quantizer, act_quantizer)
    want_w_q, want_table = two_launches(weight, weight_quantizer, act_quantizer)
    assert torch.equal(w_q.isnan(), want_w_q.isnan()) and w_q.isnan()[0, 0]
    assert torch.equal(w_q.nan_to_num(), want_w_q.nan_to_num()) and torch.equal(act_table, want_table)


def test_other_weights_keep_two_launches(monkeypatch):
    """A per-tensor weight quantizer, a weight above the size limit and an empty weight take the two launches,
    with the same results."""
    weight, (lo, hi, residuals, logits, min_bits, mode), act_quantizer = layer_quantizers(6, 8, torch.float16, 4, 4)
    per_tensor = (lo[:1], hi[:1], residuals[:1], logits, min_bits, mode)
    assert not merged(weight, per_tensor[0], act_quantizer[0])
    w_q, act_table, _ = weight_and_act_table(weight, per_tensor, act_quantizer)
    want_w_q, want_table = two_launches(weight, per_tensor, act_quantizer)
    assert torch.equal(w_q, want_w_q) and torch.equal(act_table, want_table)

    weight_quantizer = (lo, hi, residuals, logits, min_bits, mode)
    monkeypatch.setattr(weight_and_tables, "MERGED_WEIGHT_LIMIT", weight.numel() - 1)
    assert not merged(weight, lo, act_quantizer[0])
    assert torch.equal(weight_and_act_table(weight, weight_quantizer, act_quantizer)[0],
                       two_launches(weight, weight_quantizer, act_quantizer)[0])
    empty = torch.empty(6, 0, device=DEVICE, dtype=torch.float16)
    assert not merged(empty, lo, act_quantizer[0])
    assert weight_and_act_table(empty, weight_quantizer, act_quantizer)[0].shape == (6, 0)
