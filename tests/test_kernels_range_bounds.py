"""`ddq::quantized_linear` with the quantizers' range parameters: (lo, hi) and their gradients inside the op.

References: `quantizer_math.range_bounds` (the quantizer's `range()`) and autograd through it. The Triton
bounds (`range_bounds.group_bounds`, in `weight_and_tables` and in `range_bounds` for large weights) repeat
its float32 operations in its order, so they must be equal bit for bit; the gradients (`group_bound_grads`
in the parameter-gradient kernel) may differ by a fused multiply-add, so they are compared in float32
tolerance. Edge cases: |top| at and below MIN_RANGE (the clamp), top = 0 (sign 0), and affine ranges whose
width is exactly the minimum width (torch.maximum's tie, which splits the gradient).
"""

from __future__ import annotations

import pytest
import torch

from ddq import quantizer_math as qm
from kernel_cases import DEVICE, clear_of_boundaries, levels_differ, logits_for_bits, on_cpu, relative_error, sample_input

import ddq_kernels.registration as cuda_bodies  # noqa: E402  (the Triton bodies, callable on CPU in the interpreter)

MODES = {"symmetric": qm.SYMMETRIC, "unsigned": qm.UNSIGNED, "affine": qm.AFFINE, "bounds": qm.BOUNDS}


def range_parameters(mode: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bottom, top) as a quantizer in `mode` holds them; top of either sign (|top| is the range)."""
    top = (torch.rand(groups) * 2 + 0.5) * torch.where(torch.rand(groups) < 0.5, -1.0, 1.0)
    if mode == qm.AFFINE:
        bottom = torch.randn(groups)
        return bottom, bottom + top.abs()
    if mode == qm.BOUNDS:
        return -top.abs(), top.abs()
    return torch.zeros(groups), top


def edge_parameters(mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups on the edges of `range_bounds`: |top| at, below and above MIN_RANGE, top = 0, and (affine) widths
    equal to the minimum width on either side."""
    tiny = torch.tensor([qm.MIN_RANGE, -qm.MIN_RANGE, qm.MIN_RANGE / 2, 0.0, 2 * qm.MIN_RANGE, 1.5])
    if mode != qm.AFFINE:
        return torch.zeros_like(tiny), tiny
    bottom = torch.tensor([0.75, -3.0, 0.0, 2.0, 1.0, -0.5])
    min_width = bottom.abs() * qm.AFFINE_MIN_RELATIVE_WIDTH + qm.MIN_RANGE
    top = bottom + torch.tensor([1.0, -1.0, 1.0, 0.5, 0.0, 1.0]) * min_width
    return bottom, top


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("edges", [False, True])
def test_range_bounds_grads_are_autograds(mode, edges):
    """`range_bounds_grads` (what the kernels compute) is autograd's gradient of `range_bounds`."""
    torch.manual_seed(mode)
    bottom, top = edge_parameters(mode) if edges else range_parameters(mode, 7)
    bits = torch.tensor(3)
    bottom, top = bottom.requires_grad_(mode in (qm.AFFINE, qm.BOUNDS)), top.requires_grad_()
    lo, hi = qm.range_bounds(mode, bottom, top, bits)
    grad_lo, grad_hi = torch.randn_like(lo), torch.randn_like(hi)
    leaves = [t for t in (bottom, top) if t.requires_grad]
    want = torch.autograd.grad((lo, hi), leaves, (grad_lo, grad_hi), allow_unused=True)
    got_bottom, got_top = qm.range_bounds_grads(mode, bottom.detach(), top.detach(), bits, grad_lo, grad_hi)
    if bottom.requires_grad:
        torch.testing.assert_close(got_bottom, want[0], rtol=1e-6, atol=0)
    else:
        assert not got_bottom.any()
    torch.testing.assert_close(got_top, want[-1], rtol=1e-6, atol=0)


def ranged_case(M: int, K: int, N: int, dtype: torch.dtype, act_mode: int, weight_mode: int, bits: int = 4):
    """`ddq::quantized_linear`'s arguments with range parameters, and each quantizer's (lo, hi) (the reference's)."""
    act_min, weight_min = 1, 2
    act_logits, weight_logits = logits_for_bits(bits, act_min), logits_for_bits(bits, weight_min)
    act_range, weight_range = range_parameters(act_mode, 1), range_parameters(weight_mode, N)
    act_bounds = qm.range_bounds(act_mode, *act_range, qm.bitwidth(act_logits, act_min))
    weight_bounds = qm.range_bounds(weight_mode, *weight_range, qm.bitwidth(weight_logits, weight_min))
    x = clear_of_boundaries(sample_input((M, K), *act_bounds, dtype, 1), *act_bounds)
    weight = clear_of_boundaries(sample_input((N, K), *weight_bounds, dtype, N), *weight_bounds)
    act = (*act_range, torch.randn(1, qm.FINE_CELLS) * 0.3, act_logits)
    wgt = (*weight_range, torch.randn(N, qm.FINE_CELLS) * 0.3, weight_logits)
    args = (x, weight, torch.randn(N).to(dtype), *act, *wgt, act_min, weight_min, True, True, act_mode, weight_mode)
    on_device = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    return on_device, act_bounds, weight_bounds


def check_ranged_op(M: int, K: int, N: int, dtype: torch.dtype, act_mode: int, weight_mode: int) -> None:
    torch.manual_seed(10 * act_mode + weight_mode)
    args, act_bounds, weight_bounds = ranged_case(M, K, N, dtype, act_mode, weight_mode)
    y, w_q, table, bounds = cuda_bodies.quantized_linear_cuda(*args)
    want_y, want_w_q, want_table, want_bounds = torch.ops.ddq.quantized_linear(*on_cpu(args))
    assert torch.equal(want_bounds, torch.stack((torch.cat((act_bounds[0], weight_bounds[0])),
                                                 torch.cat((act_bounds[1], weight_bounds[1])))))
    assert torch.equal(bounds.cpu(), want_bounds)
    assert not levels_differ(w_q, want_w_q, *weight_bounds).any()
    assert relative_error(y, want_y.float()) <= {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    grad_y = torch.randn(M, N, device=DEVICE).to(dtype)
    backward_args = (grad_y, *args[:2], w_q, table, bounds, *args[3:], True)
    got = cuda_bodies.quantized_linear_backward_cuda(*backward_args)
    want = torch.ops.ddq.quantized_linear_backward(*on_cpu(backward_args))
    # ∂bottom and ∂top: the histogram sums of the range gradients in another order (as ∂lo and ∂hi in
    # test_kernels_linear), then the chain rule, to a relative 1e-3 of the largest one of the quantizer.
    for index, name in ((3, "act bottom"), (4, "act top"), (7, "weight bottom"), (8, "weight top")):
        scale = max(float(want[index].abs().max()), float(want[index + (1 if index in (3, 7) else -1)].abs().max()))
        assert got[index].shape == want[index].shape, name
        assert (got[index].cpu() - want[index]).abs().max() <= 1e-3 * scale + 1e-12, name


@pytest.mark.parametrize("act_mode,weight_mode", [(qm.SYMMETRIC, qm.SYMMETRIC), (qm.UNSIGNED, qm.AFFINE),
                                                  (qm.AFFINE, qm.SYMMETRIC), (qm.UNSIGNED, qm.UNSIGNED)])
def test_op_computes_bounds_and_their_gradients(act_mode, weight_mode):
    check_ranged_op(37, 45, 19, torch.float32, act_mode, weight_mode)


def test_op_computes_bounds_beside_large_weights(monkeypatch):
    """Weights over MERGED_WEIGHT_LIMIT take `range_bounds`' launch, then the level tables and the quantize pass."""
    import ddq_kernels.weight_and_tables as weight_and_tables

    monkeypatch.setattr(weight_and_tables, "MERGED_WEIGHT_LIMIT", 0)
    check_ranged_op(21, 33, 17, torch.float32, qm.UNSIGNED, qm.AFFINE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("act_mode,weight_mode", [(qm.SYMMETRIC, qm.SYMMETRIC), (qm.UNSIGNED, qm.AFFINE),
                                                  (qm.AFFINE, qm.UNSIGNED)])
@pytest.mark.parametrize("M,K,N", [(1031, 577, 67), (4099, 33, 195)])
def test_op_computes_bounds_and_their_gradients_on_gpu(M, K, N, dtype, act_mode, weight_mode):
    check_ranged_op(M, K, N, dtype, act_mode, weight_mode)


@pytest.mark.parametrize("mode", [qm.SYMMETRIC, qm.UNSIGNED, qm.AFFINE])
def test_kernel_range_grads_at_the_edges(mode):
    """The parameter-gradient kernel's (∂bottom, ∂top) on `edge_parameters` against `range_bounds_grads` of its
    own (∂lo, ∂hi): the clamp at MIN_RANGE, sign(0) = 0 and torch.maximum's tie."""
    from ddq_kernels.parameter_grads import two_parameter_grads

    bottom, top = (t.to(DEVICE) for t in edge_parameters(mode))
    groups = top.shape[0]
    bits, min_bits = 3, 1
    logits = logits_for_bits(bits, min_bits).to(DEVICE)
    lo, hi = qm.range_bounds(mode, bottom, top, qm.bitwidth(logits, min_bits))
    sums = torch.randn(groups, 2, device=DEVICE)
    reductions = (torch.randn(groups, 256, device=DEVICE), sums[:, 0], sums[:, 1], lo, hi,
                  torch.randn(groups, 256, device=DEVICE) * 0.3, logits, min_bits, True, 1001)
    per_tensor = (torch.randn(1, 256, device=DEVICE), sums[:1, 0], sums[:1, 1], lo[:1], hi[:1],
                  torch.zeros(1, 256, device=DEVICE), logits, min_bits, False, 5)
    (_, ranged), (_, plain) = (two_parameter_grads(per_tensor, reductions, ranges=(None, (mode, bottom, top))),
                               two_parameter_grads(per_tensor, reductions))
    want = qm.range_bounds_grads(mode, bottom, top, qm.bitwidth(logits, min_bits), plain[0], plain[1])
    for got, expected in zip(ranged[:2], want):
        # AFFINE's ∂bottom = ∂lo + ∂hi − ∂top rounds once more in another order (on the GPU the kernel's product
        # and sum fuse into an fma): a float32 rounding of |∂lo| + |∂hi| (3.9e-6 relative seen there, run 26).
        bound = 1e-6 * expected.abs() + 2 * torch.finfo(torch.float32).eps * (plain[0].abs() + plain[1].abs())
        assert ((got - expected).abs() <= bound).all(), (got, expected)
    torch.testing.assert_close(ranged[2], plain[2], rtol=0, atol=0)


def test_bad_range_arguments_are_rejected():
    args, _, _ = ranged_case(9, 8, 5, torch.float32, qm.SYMMETRIC, qm.SYMMETRIC)
    args = on_cpu(args)
    with pytest.raises(ValueError, match="range mode must be an int"):
        torch.ops.ddq.quantized_linear(*args[:-1], 4)
    with pytest.raises(ValueError, match="weight_top must have shape"):
        torch.ops.ddq.quantized_linear(*args[:8], args[8][:3], *args[9:])
    y, w_q, table, bounds = torch.ops.ddq.quantized_linear(*args)
    backward_args = (torch.randn_like(y), *args[:2], w_q, table, bounds[:, :4].contiguous(), *args[3:], True)
    with pytest.raises(ValueError, match="bounds must be the forward's"):
        torch.ops.ddq.quantized_linear_backward(*backward_args)


def test_layer_runs_no_range_math_outside_the_op():
    """Compiled, DDQLinear's forward and backward graphs around the op hold no range arithmetic (clamp, abs):
    the op takes the range parameters themselves."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    from ddq.nn import DDQLinear
    from ddq_kernels.linear_op import quantized_linear

    torch.manual_seed(0)
    layer = DDQLinear(12, 6)
    x = torch.randn(5, 12)
    layer(x)
    backend = AotEagerAndRecordGraphs()

    def step(x):
        return quantized_linear(x, layer.weight, layer.bias, layer.input_quantizer, layer.weight_quantizer)

    torch.compile(step, backend=backend, fullgraph=True)(x).sum().backward()
    code = "".join(graph.code for graph in backend.fw_graphs + backend.bw_graphs)
    assert "ddq.quantized_linear" in code
    assert "clamp" not in code and "abs" not in code


@pytest.mark.parametrize("act_mode", ["unsigned", "affine", "symmetric"])
def test_op_gradients_match_the_layers_autograd_on_cpu(act_mode):
    """Every parameter gradient through the op (reference bodies, range gradients by `range_bounds_grads`)
    equals autograd through the layer's plain path (`range()`, the quantizers, F.linear)."""
    from ddq.nn import DDQLinear
    from ddq_kernels.linear_op import quantized_linear

    torch.manual_seed(1)
    layer = DDQLinear(24, 10, act_mode=act_mode)
    x = torch.randn(16, 24)
    layer(x)
    grads = []
    for forward in (layer, lambda x: quantized_linear(x, layer.weight, layer.bias, layer.input_quantizer,
                                                      layer.weight_quantizer)):
        layer.zero_grad()
        (forward(x) * torch.linspace(-1, 1, 160).reshape(16, 10)).sum().backward()
        grads.append({name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "input_quantizer.range_top" in grads[0]
    assert ("input_quantizer.range_bottom" in grads[0]) == (act_mode == "affine")
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-6, msg=name)
