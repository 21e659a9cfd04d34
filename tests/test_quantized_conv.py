"""`torch.ops.ddq.quantized_conv2d`: the convolution of quantized input that saves x alone and recomputes x_q in
its backward. It must compute what the separate quantizer op and F.conv2d compute, output and every gradient
(float32, same convolution kernels: relative 1e-5 in norm for summation order), be opcheck clean and compile
without graph breaks; on CUDA, DDQConv2d uses it for dense convolutions.
"""

from __future__ import annotations

import pytest
import torch

from ddq.nn import DDQConv2d
from ddq.quantized_conv import quantized_conv2d, recomputes_quantized_input
from kernel_cases import layer_output_and_grads, relative_error


def layer_and_input(device: str = "cpu", **kwargs):
    torch.manual_seed(0)
    layer = DDQConv2d(6, 10, 3, stride=2, padding=1, act_bits=4, weight_bits=3, learn_bits=True, **kwargs).to(device)
    x = torch.randn(3, 6, 13, 11, device=device).relu()
    layer.input_quantizer(x)
    layer.weight_quantizer(layer.weight)  # initialise both quantizers
    return layer, torch.randn(3, 6, 13, 11, device=device).relu()


def output_and_grads(layer: DDQConv2d, x: torch.Tensor, through_op: bool):
    def forward(x):
        w_q = layer.weight_quantizer(layer.weight)
        if through_op:
            return quantized_conv2d(layer, x, w_q)
        return layer._conv_forward(layer.input_quantizer(x), w_q, layer.bias)
    return layer_output_and_grads(layer, x, forward)


@pytest.mark.parametrize("bias", [True, False])
def test_op_matches_separate_quantizer_and_convolution(bias):
    layer, x = layer_and_input(bias=bias)
    y, grads = output_and_grads(layer, x, through_op=False)
    y_op, grads_op = output_and_grads(layer, x, through_op=True)
    assert relative_error(y_op, y) < 1e-5
    assert grads_op.keys() == grads.keys() and len(grads) == 1 + sum(p.requires_grad for p in layer.parameters())
    for name, grad in grads.items():
        assert relative_error(grads_op[name], grad) < 1e-5, name


def op_args(layer: DDQConv2d, x: torch.Tensor):
    q = layer.input_quantizer
    lo, hi = q.range()
    w_q = layer.weight_quantizer(layer.weight).detach().requires_grad_()
    params = [t.detach().requires_grad_() for t in (lo, hi, q.effective_residuals(), q.effective_gate_logits())]
    return (x.requires_grad_(), w_q, layer.bias.detach().requires_grad_(), *params, [2, 2], [1, 1], [1, 1], q.min_bits, True)


def test_opcheck_quantized_conv2d():
    layer, x = layer_and_input()
    torch.library.opcheck(torch.ops.ddq.quantized_conv2d.default, op_args(layer, x))
    grad_y = torch.randn(3, 10, 7, 6)
    args = op_args(layer, x)
    backward_args = (grad_y, args[0].detach(), args[1].detach(), *(a.detach() for a in args[3:7]), *args[7:], True)
    torch.library.opcheck(torch.ops.ddq.quantized_conv2d_backward.default, backward_args)


def test_op_compiles_fullgraph():
    layer, x = layer_and_input()
    compiled = torch.compile(lambda inp: quantized_conv2d(layer, inp, layer.weight_quantizer(layer.weight)), fullgraph=True)
    y = compiled(x)
    assert relative_error(y, quantized_conv2d(layer, x, layer.weight_quantizer(layer.weight))) < 1e-6


def test_scope_and_bad_layers():
    assert recomputes_quantized_input(DDQConv2d(4, 8, 3))
    assert not recomputes_quantized_input(DDQConv2d(4, 8, 3, groups=4))
    assert not recomputes_quantized_input(DDQConv2d(4, 8, 3, padding=1, padding_mode="reflect"))
    assert not recomputes_quantized_input(DDQConv2d(4, 8, 3, padding="same"))
    layer = DDQConv2d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="dense convolution"):
        quantized_conv2d(layer, torch.randn(1, 4, 5, 5), layer.weight)


@pytest.mark.gpu
def test_cuda_layer_uses_the_op_and_matches_cpu(monkeypatch):
    import ddq.nn

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    calls = []
    monkeypatch.setattr(ddq.nn, "quantized_conv2d", lambda *a: calls.append(1) or quantized_conv2d(*a))
    cpu_layer, x = layer_and_input()
    gpu_layer, _ = layer_and_input("cuda")
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    # The ranges were initialised at the weights' and a batch's maxima, which sit on the clipping boundary where
    # the two devices' arithmetic may disagree about the clip mask: shrink the weights and the input.
    with torch.no_grad():
        cpu_layer.weight.mul_(0.97)
        gpu_layer.weight.mul_(0.97)
    x = 0.97 * x
    y_cpu = cpu_layer(x)
    y_gpu = gpu_layer(x.cuda().to(memory_format=torch.channels_last))
    assert calls, "the CUDA layer did not use ddq::quantized_conv2d"
    assert relative_error(y_gpu, y_cpu) < 1e-5
    y_cpu.square().sum().backward()
    y_gpu.square().sum().backward()
    for (name, p_cpu), p_gpu in zip(cpu_layer.named_parameters(), gpu_layer.parameters()):
        assert (p_gpu.grad is None) == (p_cpu.grad is None), name
        if p_cpu.grad is not None:
            assert relative_error(p_gpu.grad, p_cpu.grad) < 1e-4, name
