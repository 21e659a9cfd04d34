"""Fused quantize kernel bandwidth vs a plain copy on a 1 GiB bf16 tensor (issue 3 target: ≥ 80 %).

Bytes moved count one read and one write of the tensor (plus one more read of v for the backward
pass); bandwidth = bytes / CUDA-event median. The backward runs each histogram strategy
(ddq_kernels.quantize_backward) on Gaussian data and on a ReLU output (half its elements 0, one cell).
"""

from __future__ import annotations

import pytest
import torch

from cuda_timing import record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NUMEL = (1 << 30) // 2  # 1 GiB of bfloat16


BACKWARD_OPS = [f"{data}quantize_backward_{strategy}" for data in ("", "relu_") for strategy in ("shared", "one_hot", "bincount")]


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("op", ["copy", "quantize"] + BACKWARD_OPS)
def test_quantize_bandwidth(benchmark, op, granularity):
    from ddq_kernels.level_table import level_table
    from ddq_kernels.quantize import quantize
    from ddq_kernels.quantize_backward import quantize_reductions, strategies

    if granularity == "per_channel" and (op == "copy" or op.startswith("relu")):
        pytest.skip("a copy has no granularity; activations (ReLU outputs) are quantized per tensor")
    strategy = {"histogram": op.split("backward_")[1]} if "backward" in op else None
    if strategy is not None and strategy not in strategies():
        pytest.skip(f"{strategy} cannot run here")
    torch.manual_seed(0)
    groups = 1 if granularity == "per_tensor" else 4096
    x = torch.randn(groups, NUMEL // groups, device="cuda", dtype=torch.bfloat16)
    if op.startswith("relu"):
        x = x.relu_()
    lo = -torch.full((groups,), 3.0, device="cuda")
    hi = torch.full((groups,), 3.0, device="cuda")
    residuals = torch.randn(groups, 256, device="cuda") * 0.1
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0], device="cuda")
    out = torch.empty_like(x)
    if op == "copy":
        step, bytes_moved = (lambda: out.copy_(x)), 2 * x.numel() * 2
    elif op == "quantize":
        table = level_table(lo, hi, residuals, logits, 2)
        step, bytes_moved = (lambda: quantize(x, lo, hi, residuals, logits, 2, table=table)), 2 * x.numel() * 2
    else:
        v = torch.randn_like(x)
        step, bytes_moved = (lambda: quantize_reductions(v, x, lo, hi, None, strategy)), 3 * x.numel() * 2
    step()
    median = record(benchmark, step, op=op, granularity=granularity, bytes=bytes_moved)
    benchmark.extra_info["gb_per_s"] = bytes_moved / median / 1e6


@pytest.mark.parametrize("groups", [1, 4096])
def test_parameter_grads_time(benchmark, groups):
    """The quantizer's parameter gradients from its reductions as the quantize op runs them: one launch whose
    last programs sum the gate terms, and the fill of their done counters (which the op shares with its bins);
    constant in the tensor's size but linear in the groups (a per-channel weight quantizer of a 4096-row GEMM
    has 4096)."""
    from ddq_kernels.parameter_grads import gate_sum_counters, parameter_grads

    torch.manual_seed(0)
    histogram = torch.rand(groups, 256, device="cuda")
    sum_vu, sum_clipped = torch.rand(groups, device="cuda"), torch.rand(groups, device="cuda")
    lo, hi = -torch.ones(groups, device="cuda"), torch.ones(groups, device="cuda")
    residuals = torch.randn(groups, 256, device="cuda") * 0.1
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0], device="cuda")
    counters = torch.zeros(gate_sum_counters(groups), device="cuda", dtype=torch.int32)

    def step():
        counters.zero_()
        return parameter_grads(histogram, sum_vu, sum_clipped, lo, hi, residuals, logits, 2, True, 4096,
                               done_counters=counters)

    step()
    record(benchmark, step, kernel="parameter_grads", case=f"{groups} groups")
