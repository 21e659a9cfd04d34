"""Fused quantize-and-matmul kernels (DDQLinear, 1×1 DDQConv2d) vs the reference op bodies.

The CUDA bodies of ddq::quantized_linear(_backward) (ddq_kernels.registration) run the Triton GEMMs
with the activation quantizer fused into their operand loads and the quantizer reductions fused into
the backward-input epilogue. They are compared with the ops' plain-PyTorch bodies on CPU, on fresh
random inputs with M, N, K that are multiples of no block size. Tolerances (relative, in norm) follow
the operand dtype: float32 GEMMs differ only in summation order (1e-5); 16-bit results are rounded to
the dtype after float32 accumulation, so a different summation order can move an element by one unit
in the last place of the 16-bit value (bf16 1e-2, fp16 2e-3). Quantized weights must match exactly
except elements within rounding distance of a cell boundary.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddq import quantizer_math as qm
from ddq.functional import quantize_reference
from kernel_cases import (DEVICE, DTYPES, ambiguous, clear_of_boundaries, levels_differ, on_cpu, quantizer_params,
                          relative_error, sample_input)

import ddq_kernels.registration as cuda_bodies  # noqa: E402  (the Triton bodies, callable on CPU in the interpreter)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_NAMES = ("x", "weight", "bias", "act lo", "act hi", "act residuals", "act logits",
              "weight lo", "weight hi", "weight residuals", "weight logits")


def linear_case(M: int, K: int, N: int, dtype: torch.dtype, act_mode: str, act_bits: int, weight_bits: int):
    act_min = min(act_bits, 1)
    weight_min = min(weight_bits, 2)
    act = quantizer_params(act_mode, 1, act_bits, act_min)
    weight_params = quantizer_params("symmetric", N, weight_bits, weight_min)
    x = sample_input((M, K), act[0], act[1], dtype, 1)
    weight = sample_input((N, K), weight_params[0], weight_params[1], dtype, N)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    # Range mode 0 ("bounds"): the op takes (lo, hi) as the range parameters; the other modes are tested below.
    return (x, weight, bias, *act, *weight_params, act_min, weight_min, True, True, qm.BOUNDS, qm.BOUNDS)


def range_term_scale(v: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Per group Σ|v| times the spec's range-gradient scale 1/√(numel·(2^b − 1)): a bound on the terms of ∂lo
    and ∂hi, so their float32 rounding, whatever the summation order, is a small multiple of it."""
    return v.abs().reshape(groups, -1).sum(dim=1) / math.sqrt(v.numel() // groups * max(2**bits - 1, 1))


def check_linear(M, K, N, dtype, act_mode, act_bits, weight_bits):
    args = linear_case(M, K, N, dtype, act_mode, act_bits, weight_bits)
    x, weight, bias = args[:3]
    tolerance = TOLERANCE[dtype]
    y, w_q, table, bounds = cuda_bodies.quantized_linear_cuda(*args)
    want_y, want_w_q, want_table, want_bounds = torch.ops.ddq.quantized_linear(*on_cpu(args))
    assert torch.equal(bounds.cpu(), want_bounds)
    # The forward's activation level table (saved for backward): block sums of residuals in another order, and
    # zeros past 2^b in both (an op output must be defined whole).
    level_scale = float(want_table.abs().max())
    torch.testing.assert_close(table.cpu(), want_table, rtol=1e-5, atol=1e-5 * level_scale)
    differ = levels_differ(w_q, want_w_q, args[7], args[8])
    assert not (differ & ~ambiguous(weight, args[7], args[8])).any()
    assert y.shape == (M, N) and y.dtype == dtype
    # A row holding an activation within rounding distance of a cell boundary (sample_input plants some) may
    # take the neighbouring level there (arithmetic order): such rows are left out here. A long row of
    # 16-bit values often holds one (at K = 1029 in fp16, half the rows do), so every row is compared below.
    # Likewise a weight on a boundary may take the neighbouring level: its output column is left out.
    clean = ~ambiguous(x, args[3], args[4]).any(dim=1).to(y.device)
    clean_columns = ~differ.any(dim=1).to(y.device)
    if clean.any() and clean_columns.any():
        assert relative_error(y[clean][:, clean_columns], want_y.float()[clean.cpu()][:, clean_columns.cpu()]) <= tolerance

    # Every row, and the gradients (sums over every element), on inputs with no element on a boundary.
    x, weight = clear_of_boundaries(x, args[3], args[4]), clear_of_boundaries(weight, args[7], args[8])
    y, w_q, table, bounds = cuda_bodies.quantized_linear_cuda(x, weight, *args[2:])
    want_y, *_ = torch.ops.ddq.quantized_linear(*on_cpu((x, weight, *args[2:])))
    assert relative_error(y, want_y.float()) <= tolerance
    grad_y = torch.randn(M, N, device=x.device).to(dtype)
    backward_args = (grad_y, x, weight, w_q, table, bounds, *args[3:], True)
    got = cuda_bodies.quantized_linear_backward_cuda(*backward_args)
    want = torch.ops.ddq.quantized_linear_backward(*on_cpu(backward_args))
    # Gate gradients are differences of sums over every element: their rounding scales with Σ|v|·max|level|.
    cpu = on_cpu(backward_args[:4] + backward_args[6:])  # without the table and bounds: the parameters' indices
    x_q = quantize_reference(cpu[1], *cpu[4:8], cpu[12])
    v_act, v_weight = cpu[0].float() @ cpu[3].float(), cpu[0].float().t() @ x_q.float()
    gate_scale = {
        "act logits": v_act.abs().sum() * torch.maximum(cpu[4].abs(), cpu[5].abs()).max(),
        "weight logits": v_weight.abs().sum() * torch.maximum(cpu[8].abs(), cpu[9].abs()).max(),
    }
    # ∂lo and ∂hi are differences of Σv·t and Σv·u (spec §3): their rounding scales with the terms.
    act_terms, weight_terms = range_term_scale(v_act, 1, act_bits), range_term_scale(v_weight, N, weight_bits)
    range_scale = {"act lo": act_terms, "act hi": act_terms, "weight lo": weight_terms, "weight hi": weight_terms}
    for name, g, w in zip(GRAD_NAMES, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if name in gate_scale:
            assert (g.cpu() - w).abs().max() <= tolerance * gate_scale[name], name
        elif name in range_scale:
            assert ((g.cpu() - w).abs() <= 10 * tolerance * range_scale[name]).all(), name
        else:
            assert relative_error(g, w) <= 10 * tolerance if name not in ("x", "weight", "bias") else tolerance, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_mode", ("symmetric", "unsigned", "affine"))
def test_quantized_linear_matches_reference(dtype, act_mode):
    check_linear(37, 45, 19, dtype, act_mode, act_bits=4, weight_bits=3)


@pytest.mark.parametrize("act_bits,weight_bits", [(1, 2), (8, 8), (2, 5)])
def test_quantized_linear_bitwidths(act_bits, weight_bits):
    check_linear(21, 33, 17, torch.float32, "affine", act_bits, weight_bits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_mode", ("symmetric", "unsigned", "affine"))
@pytest.mark.parametrize("M,K,N", [(1031, 577, 67), (4099, 33, 195), (259, 1029, 517)])
def test_quantized_linear_odd_shapes_on_gpu(M, K, N, dtype, act_mode):
    check_linear(M, K, N, dtype, act_mode, act_bits=4, weight_bits=4)


@pytest.mark.gpu
@pytest.mark.parametrize("act_bits,weight_bits", [(2, 2), (3, 5), (8, 8)])
def test_quantized_linear_bitwidths_on_gpu(act_bits, weight_bits):
    check_linear(1031, 257, 129, torch.bfloat16, "unsigned", act_bits, weight_bits)


@pytest.mark.gpu
def test_layers_use_fused_op_and_match_cpu():
    """DDQLinear and a channels_last 1×1 DDQConv2d on CUDA (fused op) agree with the CPU path, grads included."""
    from ddq.nn import DDQConv2d, DDQLinear

    torch.manual_seed(0)
    for make, shape in ((lambda: DDQLinear(45, 19), (5, 7, 45)), (lambda: DDQConv2d(24, 40, 1), (3, 24, 9, 11))):
        cpu_layer = make()
        gpu_layer = make().cuda()
        gpu_layer.load_state_dict(cpu_layer.state_dict())
        x = torch.randn(shape).relu()
        x_gpu = x.cuda()
        if x.dim() == 4:
            x_gpu = x_gpu.to(memory_format=torch.channels_last)
        cpu_layer(x)
        gpu_layer(x_gpu)  # initialise both quantizers from the same batch
        # A range initialised at a batch's or the weights' maximum puts that element on the clipping boundary,
        # where the two paths' arithmetic may disagree about the clip mask: shrink the weights, draw a new batch.
        with torch.no_grad():
            cpu_layer.weight.mul_(0.97)
            gpu_layer.weight.mul_(0.97)
        x = 0.97 * torch.randn(shape).relu()
        x_gpu = x.cuda()
        if x.dim() == 4:
            x_gpu = x_gpu.to(memory_format=torch.channels_last)
        y_cpu = cpu_layer(x)
        y_gpu = gpu_layer(x_gpu)
        assert relative_error(y_gpu, y_cpu) < 1e-5
        y_cpu.square().sum().backward()
        y_gpu.square().sum().backward()
        for (name, p_cpu), p_gpu in zip(cpu_layer.named_parameters(), gpu_layer.parameters()):
            if p_cpu.grad is not None:
                assert relative_error(p_gpu.grad, p_cpu.grad) < 1e-4, name


@pytest.mark.gpu
def test_compiled_model_has_no_graph_breaks_on_gpu():
    from ddq.nn import DDQConv2d, DDQLinear

    model = torch.nn.Sequential(DDQConv2d(8, 16, 1), torch.nn.ReLU(), DDQConv2d(16, 16, 3, padding=1), torch.nn.Flatten(),
                                DDQLinear(16 * 25, 10)).cuda()
    x = torch.randn(4, 8, 5, 5, device="cuda").to(memory_format=torch.channels_last)
    model(x)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).sum().backward()


@pytest.mark.gpu
def test_opcheck_quantized_linear_on_gpu():
    args = linear_case(67, 45, 19, torch.float32, "affine", 4, 4)
    torch.library.opcheck(torch.ops.ddq.quantized_linear.default, args)


def test_opcheck_quantized_linear_on_cpu():
    args = on_cpu(linear_case(13, 9, 5, torch.float32, "unsigned", 3, 4))
    torch.library.opcheck(torch.ops.ddq.quantized_linear.default, args)


def test_unfused_strategies_match_fused():
    """Each GEMM's UNFUSED candidate (quantize passes around cuBLAS) computes what the fused kernel does."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward_input import linear_backward_input
    from ddq_kernels.linear_backward_weight import linear_backward_weight
    from ddq_kernels.linear_forward import UNFUSED, forward_configs, linear_forward

    x, weight, bias, lo, hi, residuals, logits, *_ = linear_case(35, 41, 23, torch.float32, "affine", 4, 4)
    grad_y = torch.randn(35, 23, device=DEVICE)
    table = level_table(lo, hi, residuals, logits, 1)
    fused = forward_configs(35, 23, 41)[0]
    assert relative_error(linear_forward(x, weight, bias, lo, hi, table, logits, 1, UNFUSED),
                          linear_forward(x, weight, bias, lo, hi, table, logits, 1, fused)) <= 1e-5
    unfused = linear_backward_input(grad_y, weight, x, lo, hi, UNFUSED)
    fused_input = linear_backward_input(grad_y, weight, x, lo, hi)
    for got, want in zip(unfused[:2], fused_input[:2]):  # ∂x and the histogram
        assert relative_error(got, want) <= 1e-5
    # Σv·u·in and Σv·(1 − in): one sum each over all elements, whose terms may cancel (a relative error of 8e-5 in
    # one of 60 seeded draws), so the bound is float32 rounding of the terms' magnitudes, |v|·u with u ≤ 256.
    magnitude = 256 * (grad_y @ weight).abs().sum().item()
    for got, want in zip(unfused[2:], fused_input[2:]):
        assert (got - want).abs().max().item() <= 1e-5 * magnitude
    assert relative_error(linear_backward_weight(grad_y, x, lo, hi, table, logits, 1, config=UNFUSED),
                          linear_backward_weight(grad_y, x, lo, hi, table, logits, 1)) <= 1e-5


@pytest.mark.parametrize("with_bias", [True, False])
def test_op_autograd_matches_separate_quantizers_on_cpu(with_bias):
    """The op's autograd (reference bodies) gives the gradients of F.linear(Q_x(x), Q_w(W)) + bias."""
    from ddq.functional import ddq_quantize

    args = list(on_cpu(linear_case(13, 9, 5, torch.float32, "affine", 3, 4)))
    if not with_bias:
        args[2] = None
    leaves = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    y, *_ = torch.ops.ddq.quantized_linear(*leaves)
    grad_y = torch.randn_like(y)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    got = torch.autograd.grad(y, tensors, grad_y)

    plain = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    x, weight, bias, a_lo, a_hi, a_res, a_log, w_lo, w_hi, w_res, w_log, a_min, w_min, a_gs, w_gs, *_ = plain
    want_y = torch.nn.functional.linear(ddq_quantize(x, a_lo, a_hi, a_res, a_log, None, a_min, a_gs),
                                        ddq_quantize(weight, w_lo, w_hi, w_res, w_log, 0, w_min, w_gs), bias)
    want = torch.autograd.grad(want_y, [a for a in plain if isinstance(a, torch.Tensor)], grad_y)
    torch.testing.assert_close(y, want_y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad_table", [torch.zeros(1, 128), torch.zeros(1, 256, dtype=torch.float64), torch.zeros(256)])
def test_backward_rejects_a_table_that_is_not_the_forwards(bad_table):
    args = on_cpu(linear_case(9, 8, 5, torch.float32, "affine", 3, 4))
    x, weight = args[:2]
    bounds = torch.zeros(2, 6)
    backward_args = (torch.randn(9, 5), x, weight, weight.clone(), bad_table, bounds, *args[3:], True)
    with pytest.raises(ValueError, match="act_table must be the forward's"):
        torch.ops.ddq.quantized_linear_backward(*backward_args)


def test_opcheck_quantized_linear_without_bias_on_cpu():
    args = list(on_cpu(linear_case(11, 7, 6, torch.float32, "symmetric", 4, 3)))
    args[2] = None
    torch.library.opcheck(torch.ops.ddq.quantized_linear.default, tuple(args))


def test_op_compiles_fullgraph_on_cpu():
    """No graph break around the op, forward and backward (aot_eager traces the fake and autograd)."""
    args = list(on_cpu(linear_case(9, 7, 5, torch.float32, "unsigned", 4, 4)))
    x = args[0].clone().requires_grad_(True)

    def step(x):
        y, *_ = torch.ops.ddq.quantized_linear(x, *args[1:])
        return y.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(x), [x])
    (want,) = torch.autograd.grad(step(x), [x])
    torch.testing.assert_close(grad, want)


def test_fused_wrapper_casts_like_autocast_on_cpu():
    """Under autocast, quantized_linear casts x, weight and bias to the autocast dtype before quantizing (the
    custom op itself is opaque to autocast): fp32 parameters, bf16 activations, the weight quantized from
    its bf16 copy, gradients back to the fp32 parameters."""
    from torch.nn import functional as F

    from ddq.nn import DDQLinear
    from ddq_kernels.linear_op import quantized_linear

    torch.manual_seed(0)
    layer = DDQLinear(24, 10)
    x = torch.randn(6, 24).to(torch.bfloat16)
    layer(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantized_linear(x, layer.weight, layer.bias, layer.input_quantizer, layer.weight_quantizer)
    with torch.no_grad():
        want = F.linear(layer.input_quantizer(x), layer.weight_quantizer(layer.weight.to(torch.bfloat16)),
                        layer.bias.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), want.float()) < 1e-2  # the same bf16 operands; bf16 output rounding
    y.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert layer.input_quantizer.range_top.grad is not None and layer.bias.grad.dtype == torch.float32


@pytest.mark.gpu
def test_layers_under_autocast_on_gpu():
    """DDQLinear and a channels_last 1×1 DDQConv2d on CUDA under bf16 autocast (fp32 parameters) run the
    fused op and return bf16; elements near a weight cell boundary may take the neighbouring level (the
    weight is quantized from its bf16 copy), hence the loose bound."""
    from ddq.nn import DDQConv2d, DDQLinear

    torch.manual_seed(0)
    for layer, shape in ((DDQLinear(45, 19).cuda(), (5, 7, 45)), (DDQConv2d(24, 40, 1).cuda(), (3, 24, 9, 11))):
        x = torch.randn(shape, device="cuda").relu()
        if x.dim() == 4:
            x = x.to(memory_format=torch.channels_last)
        want = layer(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        assert relative_error(y.float(), want) < 5e-2
        y.float().square().sum().backward()
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("act_mode", ("unsigned", "affine"))
@pytest.mark.parametrize("M,K,N", [(1031, 200, 40), (259, 72, 256), (4099, 16, 8), (130, 1032, 64), (7, 8, 24)])
def test_shared_epilogue_backward_input_on_gpu(M, K, N, dtype, act_mode):
    """The CUDA C backward-input GEMM with the histogram in its epilogue (odd M, partial tiles in M and K,
    contractions not multiples of 16; one and two load buffers) against float64 v = dY·W_q rounded to x's
    dtype and the reference reductions. Its v differs from that only by float32 summation order, and its
    integer bins round each v by at most 2^-18 of the largest |v| of the chunks sharing their scale: each
    element of ∂x by at most one unit in the last place of x's dtype, the histogram by the 16-bit tolerance in
    norm, each sum by at most that unit on every term (scale Σ|v|, times 255 for Σv·u). x is cleared of cell
    boundaries so that the cells agree."""
    from ddq.functional import reductions_reference
    from ddq_kernels.linear_backward_input import SHARED_EPILOGUE, linear_backward_input
    from ddq_kernels.linear_backward_input_cuda import linear_backward_input_shared, supports

    x, weight, _, lo, hi, *_ = linear_case(M, K, N, dtype, act_mode, 4, 4)
    x = clear_of_boundaries(x, lo, hi)
    grad_y = torch.randn(M, N, device=DEVICE).to(dtype)
    assert supports(grad_y, weight, x)
    v = (grad_y.double() @ weight.double()).to(dtype)
    want = reductions_reference(v, x, lo, hi)
    unit = torch.finfo(dtype).eps
    magnitude = v.double().abs()
    runs = [linear_backward_input_shared(grad_y, weight, x, lo, hi, stages=1),
            linear_backward_input_shared(grad_y, weight, x, lo, hi, stages=2),
            linear_backward_input(grad_y, weight, x, lo, hi, SHARED_EPILOGUE)]
    for got in runs:
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(got[0].double(), want[0].double(), rtol=unit, atol=1e-5 * magnitude.max().item())
        assert relative_error(got[1], want[1]) <= TOLERANCE[dtype]
        assert abs(got[2] - want[2]).item() <= unit * 255 * magnitude.sum().item()
        assert abs(got[3] - want[3]).item() <= unit * magnitude.sum().item()
        outside = (x.float() < lo) | (x.float() > hi)
        assert (got[0][outside] == 0).all()
    # ∂x does not depend on the order of the atomics or on the load buffers.
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][0], runs[2][0])


def test_shared_epilogue_rejects_what_it_cannot_run():
    from ddq_kernels.linear_backward_input_cuda import linear_backward_input_shared, supports

    cases = [(torch.float32, 64, 64), (torch.bfloat16, 264, 64), (torch.bfloat16, 60, 64), (torch.bfloat16, 64, 60)]
    for dtype, N, K in cases:
        x = torch.randn(33, K, device=DEVICE).to(dtype)
        weight = torch.randn(N, K, device=DEVICE).to(dtype)
        grad_y = torch.randn(33, N, device=DEVICE).to(dtype)
        lo, hi = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
        assert not supports(grad_y, weight, x)
        with pytest.raises(ValueError, match="N ≤ 256 and N, K multiples of 8"):
            linear_backward_input_shared(grad_y, weight, x, lo, hi)
    if torch.cuda.is_available():
        x, weight, grad_y = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) for shape in ((33, 64), (64, 64), (33, 64)))
        if supports(grad_y, weight, x):
            with pytest.raises(ValueError, match="stages must be 1 or 2, got 3"):
                linear_backward_input_shared(grad_y, weight, x, lo, hi, stages=3)


# N > 64 (two to four 16-row slices of ∂W_q a warp): 72 pads to 128, 200 to 256.
FUSED_BACKWARD_SHAPES = [(1031, 200, 40), (4099, 16, 8), (130, 1032, 64), (7, 8, 24), (515, 136, 32), (515, 40, 192),
                         (300, 136, 256), (259, 72, 200), (130, 24, 72), (1031, 32, 192), (259, 16, 64)]


def check_fused_backward(got, x, weight, grad_y, lo, hi, residuals, logits, min_bits, dtype):
    """One fused backward against float64: the four reductions as in the backward-input test, ∂W_q within
    2e-5 of the sum of its terms' magnitudes (float32 order and the row groups' partial sums), plus a unit in
    the last place of x's dtype where a separate path returned it in that dtype (cuBLAS)."""
    from ddq.functional import reductions_reference

    (grad_x, histogram, sum_vu, sum_clipped), grad_w_q = got
    v = (grad_y.double() @ weight.double()).to(dtype)
    want = reductions_reference(v, x, lo, hi)
    unit = torch.finfo(dtype).eps
    magnitude = v.double().abs()
    torch.testing.assert_close(grad_x.double(), want[0].double(), rtol=unit, atol=1e-5 * magnitude.max().item())
    assert relative_error(histogram, want[1]) <= TOLERANCE[dtype]
    assert abs(sum_vu - want[2]).item() <= unit * 255 * magnitude.sum().item()
    assert abs(sum_clipped - want[3]).item() <= unit * magnitude.sum().item()
    x_q = quantize_reference(x, lo, hi, residuals, logits, min_bits).double()
    assert grad_w_q.shape == weight.shape and grad_w_q.dtype in (torch.float32, dtype)
    want_w = grad_y.double().t() @ x_q
    rounding = torch.finfo(grad_w_q.dtype).eps * want_w.abs() if grad_w_q.dtype == dtype else 0.0
    bound = grad_y.double().abs().t() @ x_q.abs()
    assert ((grad_w_q.double() - want_w).abs() <= 2e-5 * bound + rounding + 1e-30).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("act_mode", ("unsigned", "affine"))
@pytest.mark.parametrize("M,K,N", FUSED_BACKWARD_SHAPES)
def test_fused_backward_on_gpu(M, K, N, dtype, act_mode):
    """The CUDA C backward pass that computes ∂x, the activation reductions and ∂W_q from one staging of dY and
    x (x_q from the reductions' own fine cells), with one and two load buffers and through
    `linear_backward_activation` (both candidates); odd M, partial tiles, N not a multiple of 32. Its ∂x is
    the backward-input kernel's, bit for bit. x is cleared of cell boundaries so that the cells agree."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward import AROUND_CUBLAS, FUSED, SEPARATE, linear_backward_activation
    from ddq_kernels.linear_backward_input_cuda import NARROW_TILE, WIDE_TILE, column_tile, linear_backward_input_shared
    from ddq_kernels.linear_backward_input_cuda import linear_backward_shared, supports

    x, weight, _, lo, hi, residuals, logits, *_ = linear_case(M, K, N, dtype, act_mode, 4, 4)
    x = clear_of_boundaries(x, lo, hi)
    grad_y = torch.randn(M, N, device=DEVICE).to(dtype)
    assert supports(grad_y, weight, x)
    table = level_table(lo, hi, residuals, logits, 1)
    for stages in (1, 2):
        *reductions, grad_w_q = linear_backward_shared(grad_y, weight, x, lo, hi, table, logits, 1, stages=stages)
        assert grad_w_q.dtype == torch.float32
        check_fused_backward((reductions, grad_w_q), x, weight, grad_y, lo, hi, residuals, logits, 1, dtype)
        assert torch.equal(reductions[0], linear_backward_input_shared(grad_y, weight, x, lo, hi, stages=stages)[0])
    for config in (FUSED, SEPARATE, AROUND_CUBLAS, None):
        got = linear_backward_activation(grad_y, weight, x, lo, hi, table, logits, 1, config)
        check_fused_backward(got, x, weight, grad_y, lo, hi, residuals, logits, 1, dtype)
    if column_tile(K, N, True) == NARROW_TILE:
        # Both tiles: v is the same product in the same order, so ∂x agrees bit for bit.
        grads_x = []
        for tile in (WIDE_TILE, NARROW_TILE):
            *reductions, grad_w_q = linear_backward_shared(grad_y, weight, x, lo, hi, table, logits, 1, tile=tile)
            check_fused_backward((reductions, grad_w_q), x, weight, grad_y, lo, hi, residuals, logits, 1, dtype)
            grads_x.append(reductions[0])
        assert torch.equal(*grads_x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1031, 200, 96), (130, 1032, 257), (7, 8, 24)])
def test_backward_around_cublas_on_gpu(M, K, N, dtype):
    """AROUND_CUBLAS (cuBLAS GEMMs around one SHARED pass that writes ∂x, the reductions and x_q) on shapes
    FUSED does not take (N > 64, float32); a NaN or ±inf activation quantizes
    to NaN, so its column of ∂W_q is NaN, while its ∂x is 0 (clipped)."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward import AROUND_CUBLAS, linear_backward_activation, supports_around_cublas

    x, weight, _, lo, hi, residuals, logits, *_ = linear_case(M, K, N, dtype, "unsigned", 4, 4)
    if not supports_around_cublas(x):
        pytest.skip("the SHARED pass needs NVRTC")
    x = clear_of_boundaries(x, lo, hi)
    grad_y = torch.randn(M, N, device=DEVICE).to(dtype)
    table = level_table(lo, hi, residuals, logits, 1)
    got = linear_backward_activation(grad_y, weight, x, lo, hi, table, logits, 1, AROUND_CUBLAS)
    check_fused_backward(got, x, weight, grad_y, lo, hi, residuals, logits, 1, dtype)
    if M < 2:
        return
    x[0, 1], x[1, 0] = float("nan"), float("inf")
    (grad_x, *_), grad_w_q = linear_backward_activation(grad_y, weight, x, lo, hi, table, logits, 1, AROUND_CUBLAS)
    assert grad_w_q[:, :2].isnan().all() and torch.isfinite(grad_w_q[:, 2:]).all()
    assert grad_x[0, 1] == 0 and grad_x[1, 0] == 0


@pytest.mark.gpu
def test_fused_backward_every_bitwidth_and_non_finite_x_on_gpu():
    """The fused pass reads the bitwidth from the gate logits on the device (b = 1..8); a NaN or ±inf
    activation quantizes to NaN, so its column of ∂W_q is NaN, while its ∂x is 0 (clipped)."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward_input_cuda import linear_backward_shared

    for bits in range(1, 9):
        x, weight, _, lo, hi, residuals, logits, *_ = linear_case(515, 136, 64, torch.bfloat16, "unsigned", bits, 4)
        min_bits = min(bits, 1)
        x = clear_of_boundaries(x, lo, hi)
        grad_y = torch.randn(515, 64, device=DEVICE).to(torch.bfloat16)
        table = level_table(lo, hi, residuals, logits, min_bits)
        *reductions, grad_w_q = linear_backward_shared(grad_y, weight, x, lo, hi, table, logits, min_bits)
        check_fused_backward((reductions, grad_w_q), x, weight, grad_y, lo, hi, residuals, logits, min_bits,
                             torch.bfloat16)
    x[3, 5], x[40, 0], x[514, 135] = float("nan"), float("inf"), -float("inf")
    grad_x, *_, grad_w_q = linear_backward_shared(grad_y, weight, x, lo, hi, table, logits, min_bits)
    bad = torch.zeros(136, dtype=torch.bool, device=DEVICE)
    bad[[5, 0, 135]] = True
    assert grad_w_q[:, bad].isnan().all() and torch.isfinite(grad_w_q[:, ~bad]).all()
    assert grad_x[3, 5] == 0 and grad_x[40, 0] == 0 and grad_x[514, 135] == 0


@pytest.mark.gpu
def test_fused_backward_keeps_tile_padding_out_of_the_reductions_on_gpu():
    """The fused pass has no per-element bounds checks: elements of a partial tile past M or K get v = 0
    (`zero_outside`), so they add nothing even where W_q holds inf and their product 0·inf would be NaN. Only the
    bin that the reference makes non-finite is non-finite: here x's column 7 lies in the last fine cell, far from
    the cell of the padding's x = 0."""
    from ddq.functional import reductions_reference
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward_input_cuda import linear_backward_shared

    x, weight, _, lo, hi, residuals, logits, *_ = linear_case(515, 136, 64, torch.bfloat16, "unsigned", 4, 4)
    x = clear_of_boundaries(x, lo, hi)
    x[:, 7] = hi.to(x.dtype)
    weight[3, 7] = float("inf")
    grad_y = torch.randn(515, 64, device=DEVICE).to(torch.bfloat16)
    table = level_table(lo, hi, residuals, logits, 1)
    _, histogram, *_ = linear_backward_shared(grad_y, weight, x, lo, hi, table, logits, 1)
    want = reductions_reference((grad_y.double() @ weight.double()).to(torch.bfloat16), x, lo, hi)[1]
    finite = torch.isfinite(want)
    assert not finite.all() and torch.equal(torch.isfinite(histogram), finite)
    assert relative_error(histogram[finite], want[finite]) <= TOLERANCE[torch.bfloat16]


def test_fused_backward_column_tile():
    """The narrow tile (128 × 32) where K ≤ 32 and N > 32 with ∂W_q; the wide one (64 × 64) elsewhere; asking for the
    narrow one with N ≤ 32 is a clear error."""
    from ddq_kernels.linear_backward_input_cuda import NARROW_TILE, WIDE_TILE, column_tile, linear_backward_shared

    assert column_tile(32, 192, True) == NARROW_TILE and column_tile(16, 40, True) == NARROW_TILE
    assert column_tile(40, 192, True) == WIDE_TILE and column_tile(32, 32, True) == WIDE_TILE
    assert column_tile(32, 192, False) == WIDE_TILE
    x, weight, grad_y = torch.zeros(9, 16), torch.zeros(24, 16), torch.zeros(9, 24)
    lo, hi, table, logits = torch.zeros(1), torch.ones(1), torch.zeros(1, 256), torch.ones(8)
    with pytest.raises(ValueError, match="narrow tile needs N > 32"):
        linear_backward_shared(grad_y, weight, x, lo, hi, table, logits, 1, tile=NARROW_TILE)


def test_backward_fills_given_rows_of_one_bins_buffer():
    """The op's backward zeroes both quantizers' bins in one fill (`registration`): the activation side, through
    every candidate that runs here, and the weight side fill rows of one buffer in place, with the values of
    their own new bins (bit for bit in the interpreter; on a GPU within float32 atomic order)."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward import backward_activation_configs, linear_backward_activation
    from ddq_kernels.quantize_backward import zeroed_bins
    from ddq_kernels.weight_reductions import weight_reductions

    M, K, N = 37, 24, 40
    x, weight, _, lo, hi, residuals, logits, w_lo, w_hi, *_ = linear_case(M, K, N, torch.float16, "unsigned", 4, 4)
    grad_y = torch.randn(M, N, device=DEVICE).to(torch.float16)
    table = level_table(lo, hi, residuals, logits, 1)
    for config in backward_activation_configs(grad_y, weight, x):
        histogram, sums = zeroed_bins(1 + N, x.device)
        reductions, grad_w_q = linear_backward_activation(grad_y, weight, x, lo, hi, table, logits, 1, config, True,
                                                          bins=(histogram[:1], sums[:1]))
        weight_grads = weight_reductions(grad_w_q, weight, w_lo, w_hi, bins=(histogram[1:], sums[1:]))
        assert reductions[1].data_ptr() == histogram.data_ptr() and reductions[2].data_ptr() == sums.data_ptr()
        assert weight_grads[1].data_ptr() == histogram[1].data_ptr()
        assert weight_grads[2].data_ptr() == sums[1].data_ptr()
        want, want_grad_w_q = linear_backward_activation(grad_y, weight, x, lo, hi, table, logits, 1, config, True)
        want_weight = weight_reductions(want_grad_w_q, weight, w_lo, w_hi)
        assert torch.equal(reductions[0], want[0]) and torch.equal(weight_grads[0], want_weight[0])
        act_scale = (grad_y.float() @ weight.float()).abs().sum() * 1e-5 if x.is_cuda else 0.0
        weight_scale = want_grad_w_q.float().abs().sum() * 1e-5 if x.is_cuda else 0.0
        for got_term, want_term in zip(reductions[1:], want[1:]):
            torch.testing.assert_close(got_term, want_term, rtol=0, atol=act_scale)
        for got_term, want_term in zip(weight_grads[1:], want_weight[1:]):
            torch.testing.assert_close(got_term, want_term, rtol=0, atol=weight_scale)


def test_given_bins_of_the_wrong_kind_are_clear_errors():
    from ddq_kernels.quantize_backward import output_bins, zeroed_bins

    device = torch.device(DEVICE)
    histogram, sums = zeroed_bins(3, device)
    with pytest.raises(ValueError, match=r"histogram must be float32 \(4, 256\)"):
        output_bins(4, device, (histogram, sums))
    with pytest.raises(ValueError, match=r"sums must be float32 \(3, 2\)"):
        output_bins(3, device, (histogram, sums.double()))
    with pytest.raises(ValueError, match="histogram rows must be contiguous"):
        output_bins(3, device, (torch.zeros(3, 512, device=device)[:, :256], sums))
    with pytest.raises(ValueError, match="histogram must be float32 .* on meta"):
        output_bins(3, torch.device("meta"), (histogram, sums))
    assert output_bins(1, device, (histogram[2:], sums[:1]))[0].data_ptr() == histogram[2].data_ptr()
    assert output_bins(3, histogram.device, (histogram, sums))[1] is sums


def test_fused_backward_rejects_what_it_cannot_run():
    from ddq_kernels.linear_backward_input_cuda import linear_backward_shared, supports

    lo, hi = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    table, logits = torch.zeros(256, device=DEVICE), torch.ones(8, device=DEVICE)
    for dtype, N, K in [(torch.float32, 64, 64), (torch.bfloat16, 264, 64), (torch.bfloat16, 60, 64), (torch.bfloat16, 64, 60)]:
        x, weight, grad_y = (torch.randn(shape, device=DEVICE).to(dtype) for shape in ((33, K), (N, K), (33, N)))
        assert not supports(grad_y, weight, x)
        with pytest.raises(ValueError, match="N ≤ 256 and N, K multiples of 8"):
            linear_backward_shared(grad_y, weight, x, lo, hi, table, logits, 1)


CUDA_TILE_SHAPES = [(1031, 200, 40), (259, 72, 256), (4099, 16, 8), (130, 1032, 64), (7, 8, 24), (300, 32, 192)]


def assert_forward_matches_reference(kernel, config: dict, x, weight, bias, lo, hi, residuals, logits):
    """A forward GEMM kernel, called directly and through `linear_forward` with `config`, with and without bias,
    against float64 products of the reference x_q: y differs from them only by float32 summation order before
    rounding to x's dtype, at most one unit in its last place. Returns the level table and x_q."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_forward import linear_forward

    table = level_table(lo, hi, residuals, logits, 1)
    x_q = quantize_reference(x, lo, hi, residuals, logits, 1).double()
    unit = torch.finfo(x.dtype).eps
    want_y = x_q @ weight.double().t() + bias.double()
    for got in (kernel(x, weight, bias, lo, hi, table, logits, 1),
                linear_forward(x, weight, bias, lo, hi, table, logits, 1, config)):
        assert got.shape == want_y.shape and got.dtype == x.dtype
        torch.testing.assert_close(got.double(), want_y, rtol=unit, atol=1e-6 * want_y.abs().max().item())
    no_bias = kernel(x, weight, None, lo, hi, table, logits, 1)
    torch.testing.assert_close(no_bias.double(), x_q @ weight.double().t(), rtol=unit,
                               atol=1e-6 * want_y.abs().max().item())
    return table, x_q


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("act_mode", ("unsigned", "affine"))
@pytest.mark.parametrize("M,K,N", CUDA_TILE_SHAPES)
def test_cuda_tiles_forward_and_weight_gradient_on_gpu(M, K, N, dtype, act_mode):
    """The CUDA C forward and backward-weight GEMMs (x quantized in shared memory; odd M, partial tiles in M,
    N and K) against float64 products of the reference x_q. The forward's y differs from that only by float32
    summation order before rounding to x's dtype: at most one unit in its last place. ∂W_q is float32: each
    element within 2e-5 of the sum of its terms' magnitudes, far below one wrong term (M ≤ 4099 terms). x is
    cleared of cell boundaries so that the cells agree; both kernels are also called through their launchers."""
    from ddq_kernels.linear_backward_weight import linear_backward_weight
    from ddq_kernels.linear_backward_weight_cuda import linear_backward_weight_cuda, supports as weight_supports
    from ddq_kernels.linear_forward import CUDA_TILES
    from ddq_kernels.linear_forward_cuda import linear_forward_cuda, supports as forward_supports

    x, weight, bias, lo, hi, residuals, logits, *_ = linear_case(M, K, N, dtype, act_mode, 4, 4)
    x = clear_of_boundaries(x, lo, hi)
    grad_y = torch.randn(M, N, device=DEVICE).to(dtype)
    assert forward_supports(x, weight) and weight_supports(grad_y, x)
    table, x_q = assert_forward_matches_reference(linear_forward_cuda, CUDA_TILES, x, weight, bias, lo, hi, residuals,
                                                  logits)
    want_dw = grad_y.double().t() @ x_q
    bound = grad_y.double().abs().t() @ x_q.abs()
    for got in (linear_backward_weight_cuda(grad_y, x, lo, hi, table, logits, 1),
                linear_backward_weight(grad_y, x, lo, hi, table, logits, 1, config=CUDA_TILES)):
        assert got.shape == (N, K) and got.dtype == torch.float32
        assert ((got.double() - want_dw).abs() <= 2e-5 * bound + 1e-30).all()


needs_sm90 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                                reason="wgmma needs a compute capability 9.0 device")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("act_mode", ("unsigned", "affine"))
@pytest.mark.parametrize("M,K,N", CUDA_TILE_SHAPES + [(517, 1000, 256), (333, 136, 96), (130, 1032, 8)])
def test_wgmma_forward_on_gpu(M, K, N, dtype, act_mode):
    """The wgmma forward GEMM as the CUDA C forward is checked (x cleared of cell boundaries); chunks of K: one
    (K ≤ 64) to seventeen."""
    from ddq_kernels.linear_forward import WGMMA
    from ddq_kernels.linear_forward_wgmma import linear_forward_wgmma, supports

    x, weight, bias, lo, hi, residuals, logits, *_ = linear_case(M, K, N, dtype, act_mode, 4, 4)
    x = clear_of_boundaries(x, lo, hi)
    assert supports(x, weight)
    assert_forward_matches_reference(linear_forward_wgmma, WGMMA, x, weight, bias, lo, hi, residuals, logits)


@pytest.mark.gpu
@needs_sm90
def test_wgmma_forward_sums_small_integers_exactly_on_gpu():
    """Integer x (an 8-bit grid of unit cells from 0, so x_q = x) and W_q whose products and sums are exact in
    float32 and in fp16: y must equal the integer product element for element, which pins the operand layouts
    (swizzle, descriptors, the accumulators' rows and columns) where a rounding tolerance could hide a swap."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_forward_wgmma import linear_forward_wgmma

    lo, hi = torch.zeros(1, device=DEVICE), torch.full((1,), 255.0, device=DEVICE)
    logits = torch.full((8,), 3.0, device=DEVICE)
    table = level_table(lo, hi, torch.zeros(1, 256, device=DEVICE), logits, 2)
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    for M, K, N in ((129, 40, 24), (1000, 136, 200), (517, 1000, 256), (2049, 72, 128), (64, 520, 8)):
        x = torch.randint(0, 4, (M, K), device=DEVICE, generator=generator).half()
        weight = torch.randint(-2, 3, (N, K), device=DEVICE, generator=generator).half()
        want = (x.float() @ weight.float().t()).half()
        assert torch.equal(linear_forward_wgmma(x, weight, None, lo, hi, table, logits, 2), want), (M, K, N)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", range(1, 9))
def test_cuda_tiles_every_bitwidth_on_gpu(bits):
    """The CUDA C GEMMs (and the wgmma forward on an sm_90 device) read the bitwidth from the gate logits on
    the device, like the Triton kernels."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward_weight_cuda import linear_backward_weight_cuda
    from ddq_kernels.linear_forward_cuda import linear_forward_cuda
    from ddq_kernels.linear_forward_wgmma import linear_forward_wgmma, supports as wgmma_supports

    x, weight, bias, lo, hi, residuals, logits, *_ = linear_case(515, 136, 72, torch.bfloat16, "unsigned", bits, 4)
    min_bits = min(bits, 1)
    x = clear_of_boundaries(x, lo, hi)
    grad_y = torch.randn(515, 72, device=DEVICE).to(torch.bfloat16)
    table = level_table(lo, hi, residuals, logits, min_bits)
    x_q = quantize_reference(x, lo, hi, residuals, logits, min_bits).double()
    want_y = x_q @ weight.double().t() + bias.double()
    forwards = [linear_forward_cuda] + ([linear_forward_wgmma] if wgmma_supports(x, weight) else [])
    for forward in forwards:
        got_y = forward(x, weight, bias, lo, hi, table, logits, min_bits)
        torch.testing.assert_close(got_y.double(), want_y, rtol=torch.finfo(torch.bfloat16).eps,
                                   atol=1e-6 * want_y.abs().max().item())
    got_dw = linear_backward_weight_cuda(grad_y, x, lo, hi, table, logits, min_bits).double()
    assert ((got_dw - grad_y.double().t() @ x_q).abs() <= 2e-5 * (grad_y.double().abs().t() @ x_q.abs()) + 1e-30).all()


@pytest.mark.gpu
def test_cuda_tiles_forward_keeps_non_finite_inputs_on_gpu():
    """A NaN or ±inf activation quantizes to NaN (spec: never a silent level), so its output row is NaN (the
    wgmma forward's too on an sm_90 device)."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_forward_cuda import linear_forward_cuda
    from ddq_kernels.linear_forward_wgmma import linear_forward_wgmma, supports as wgmma_supports

    x, weight, bias, lo, hi, residuals, logits, *_ = linear_case(70, 24, 16, torch.bfloat16, "affine", 4, 4)
    x[3, 5], x[40, 0], x[69, 23] = float("nan"), float("inf"), -float("inf")
    table = level_table(lo, hi, residuals, logits, 1)
    bad = torch.zeros(70, dtype=torch.bool, device=DEVICE)
    bad[[3, 40, 69]] = True
    for forward in [linear_forward_cuda] + ([linear_forward_wgmma] if wgmma_supports(x, weight) else []):
        y = forward(x, weight, bias, lo, hi, table, logits, 1)
        assert y[bad].isnan().all() and torch.isfinite(y[~bad]).all()


def test_cuda_tiles_reject_what_they_cannot_run():
    from ddq_kernels.linear_backward_weight_cuda import linear_backward_weight_cuda, supports as weight_supports
    from ddq_kernels.linear_forward_cuda import linear_forward_cuda, supports as forward_supports
    from ddq_kernels.linear_forward_wgmma import linear_forward_wgmma, supports as wgmma_supports

    cases = [(torch.float32, 64, 64), (torch.bfloat16, 264, 64), (torch.bfloat16, 60, 64), (torch.bfloat16, 64, 60)]
    lo, hi = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    table, logits = torch.zeros(1, 256, device=DEVICE), torch.ones(8, device=DEVICE)
    for dtype, N, K in cases:
        x = torch.randn(33, K, device=DEVICE).to(dtype)
        weight = torch.randn(N, K, device=DEVICE).to(dtype)
        grad_y = torch.randn(33, N, device=DEVICE).to(dtype)
        assert not forward_supports(x, weight) and not weight_supports(grad_y, x) and not wgmma_supports(x, weight)
        with pytest.raises(ValueError, match="N ≤ 256 and N, K multiples of 8"):
            linear_forward_cuda(x, weight, None, lo, hi, table, logits, 1)
        with pytest.raises(ValueError, match="N ≤ 256 and N, K multiples of 8"):
            linear_forward_wgmma(x, weight, None, lo, hi, table, logits, 1)
        with pytest.raises(ValueError, match="N ≤ 256 and N, K multiples of 8"):
            linear_backward_weight_cuda(grad_y, x, lo, hi, table, logits, 1)
