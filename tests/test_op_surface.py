"""The ddq custom ops called directly (not through ddq_quantize or the layers): clear errors for arguments the
bodies and fake kernels cannot serve, the same dtypes in eager and compiled mode under autocast, which outputs
carry gradients, and empty inputs through the device bodies (in the Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from ddq import quantizer_math as qm
from ddq.quantizer import graded_gate_logits
from kernel_cases import DEVICE

import ddq_kernels.registration as cuda_bodies  # noqa: E402  (the Triton bodies, callable on CPU in the interpreter)


def quantizer(groups: int = 1, bits: int = 4):
    return [torch.full((groups,), -1.0), torch.full((groups,), 1.0), torch.zeros(groups, 256), graded_gate_logits(bits)]


def linear_arguments(M: int = 3, K: int = 4, N: int = 2, dtype=torch.float32, device="cpu"):
    tensors = [torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype),
               *quantizer(1), *quantizer(N)]
    return [t.to(device) for t in tensors] + [2, 2, True, True, qm.BOUNDS, qm.BOUNDS]


def conv_arguments(dtype=torch.float32):
    return [torch.randn(2, 3, 5, 5, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype), torch.randn(4, dtype=dtype),
            *quantizer(1), [1, 1], [1, 1], [1, 1], 2, True]


@pytest.mark.parametrize("position", [1, 4])
def test_an_argument_on_meta_is_a_device_error_not_uninitialised_memory(position):
    """The dispatcher runs an op's fake kernel when any one argument is on 'meta'."""
    x = torch.linspace(-1, 1, 6)
    params = quantizer()
    quantize_args = [x, *params, 2, True]
    quantize_args[position] = quantize_args[position].to("meta")
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        torch.ops.ddq.quantize(*quantize_args)
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        torch.ops.ddq.quantize_backward(torch.ones(6), *quantize_args)
    linear = linear_arguments()
    linear[position + 6] = linear[position + 6].to("meta")
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        torch.ops.ddq.quantized_linear(*linear)
    conv = conv_arguments()
    conv[1] = conv[1].to("meta")
    with pytest.raises(ValueError, match="w_q must be torch.float32 on cpu like x"):
        torch.ops.ddq.quantized_conv2d(*conv)


def test_quantize_op_checks_what_ddq_quantize_checks():
    with pytest.raises(TypeError, match="x must be a float32, float16 or bfloat16 tensor"):
        torch.ops.ddq.quantize(torch.arange(3, dtype=torch.int32), *quantizer(), 2, True)
    with pytest.raises(ValueError, match=r"min_bits must be an int in \[0, 8\]"):
        torch.ops.ddq.quantize(torch.zeros(3), *quantizer(), 12, True)
    with pytest.raises(ValueError, match="gradient must have x's shape"):
        torch.ops.ddq.quantize_backward(torch.ones(4), torch.zeros(3), *quantizer(), 2, True)


def test_quantized_linear_rejects_what_its_bodies_cannot_serve():
    arguments = linear_arguments()
    three_d = [torch.randn(2, 3, 4)] + arguments[1:]
    with pytest.raises(ValueError, match=r"needs x \(M, K\) and weight \(N, K\)"):
        torch.ops.ddq.quantized_linear(*three_d)
    wide_bounds = list(arguments)
    wide_bounds[3] = wide_bounds[3].double()
    with pytest.raises(TypeError, match="lo must be a float32 tensor"):
        torch.ops.ddq.quantized_linear(*wide_bounds)
    unsigned = arguments[:11] + [0, 2, True, True, qm.UNSIGNED, qm.BOUNDS]
    with pytest.raises(ValueError, match="activation quantizer's unsigned range needs min_bits >= 1"):
        torch.ops.ddq.quantized_linear(*unsigned)
    reversed_range = list(arguments)
    reversed_range[3], reversed_range[4] = torch.ones(1), -torch.ones(1)
    with pytest.raises(ValueError, match="needs hi > lo in every group"):
        torch.ops.ddq.quantized_linear(*reversed_range)
    other_bias = list(arguments)
    other_bias[2] = other_bias[2].double()
    with pytest.raises(ValueError, match=r"bias must be \(2,\) torch.float32"):
        torch.ops.ddq.quantized_linear(*other_bias)


def test_quantized_linear_w_q_output_carries_no_gradient():
    """W_q's gradient would need the weight quantizer's own backward (its in-range mask and parameter terms):
    the op's W_q is for reuse, and ddq_quantize gives that gradient."""
    arguments = linear_arguments()
    for tensor in arguments[:11]:
        tensor.requires_grad_()
    y, w_q, table, bounds = torch.ops.ddq.quantized_linear(*arguments)
    assert y.requires_grad and not (w_q.requires_grad or table.requires_grad or bounds.requires_grad)
    y.sum().backward()
    assert arguments[1].grad is not None and arguments[10].grad is not None


def test_opcheck_with_a_dense_transposed_weight():
    """The fake kernels give W_q and ∂W the real bodies' (contiguous) layout, so Inductor's stride asserts hold."""
    arguments = linear_arguments()
    arguments[1] = torch.randn(4, 2).t()
    for tensor in arguments[:11]:
        tensor.requires_grad_()
    torch.library.opcheck(torch.ops.ddq.quantized_linear, tuple(arguments))
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in arguments]
    y, w_q, table, bounds = torch.ops.ddq.quantized_linear(*detached)
    backward_args = (torch.randn_like(y), detached[0], detached[1], w_q, table, bounds, *detached[3:], True)
    torch.library.opcheck(torch.ops.ddq.quantized_linear_backward, backward_args)


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_autocast_leaves_the_ops_dtypes_as_compiled_graphs_see_them(op):
    """Under autocast the op bodies compute in their operands' dtype, as their fake kernels say: eager and
    compiled agree, and backward runs (the layers cast the operands before the op, as autocast would)."""
    if op == "linear":
        arguments = linear_arguments()
        call = lambda *a: torch.ops.ddq.quantized_linear(*a)[0]  # noqa: E731
    else:
        arguments = conv_arguments()
        call = lambda *a: torch.ops.ddq.quantized_conv2d(*a)  # noqa: E731
    arguments[0].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = call(*arguments)
        compiled = torch.compile(call, backend="aot_eager", fullgraph=True)(*arguments)
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(eager, compiled)
    eager.sum().backward()
    assert arguments[0].grad.dtype == torch.float32


def test_empty_inputs_through_the_device_bodies():
    """The Triton launchers size their grids by the extents: an empty batch (or weight) takes the reference."""
    arguments = linear_arguments(M=0, device=DEVICE)
    y, w_q, table, bounds = cuda_bodies.quantized_linear_cuda(*arguments)
    assert y.shape == (0, 2)
    grads = cuda_bodies.quantized_linear_backward_cuda(torch.zeros(0, 2, device=DEVICE), arguments[0], arguments[1], w_q,
                                                       table, bounds, *arguments[3:], True)
    assert grads[0].shape == (0, 4) and torch.equal(grads[1], torch.zeros_like(grads[1]))
    empty_k = linear_arguments(K=0, device=DEVICE)
    assert cuda_bodies.quantized_linear_cuda(*empty_k)[0].shape == (3, 2)
    params = [t.to(DEVICE) for t in quantizer(0)]
    x = torch.zeros(0, 5, device=DEVICE)
    assert cuda_bodies.quantize_cuda(x, *params, 2, True).shape == (0, 5)
    grads = cuda_bodies.quantize_backward_cuda(torch.zeros_like(x), x, *params, 2, True)
    assert grads[0].shape == (0, 5) and grads[3].shape == (0, 256)

