"""DDQConv2d over 3-channel images adds a zero fourth channel on CUDA (`DDQConv2d.pads_input_channels`):
cuDNN's input gradient is twice as fast with it. The padded convolution must give the same output and the
same gradients for the input, the weight, the bias and both quantizers' parameters. Tolerance: float32 up to
summation order (relative 1e-5 in norm); the appended channel contributes exact zeros.
"""

from __future__ import annotations

import pytest
import torch

from ddq.nn import DDQConv2d
from kernel_cases import layer_output_and_grads, relative_error


def stem(**kwargs) -> DDQConv2d:
    torch.manual_seed(0)
    layer = DDQConv2d(3, 8, 7, stride=2, padding=3, act_bits=4, weight_bits=3, learn_bits=True, **kwargs)
    layer(torch.randn(2, 3, 19, 23))  # initialise both quantizers
    return layer


def output_and_grads(layer: DDQConv2d, x: torch.Tensor, padded: bool):
    def forward(x):
        x_q, w_q = layer.input_quantizer(x), layer.weight_quantizer(layer.weight)
        return layer.conv_with_padded_channels(x_q, w_q) if padded else layer._conv_forward(x_q, w_q, layer.bias)
    return layer_output_and_grads(layer, x, forward)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_padded_channel_changes_neither_output_nor_gradients(padding_mode):
    layer = stem(padding_mode=padding_mode)
    x = torch.randn(3, 3, 17, 21)
    y, grads = output_and_grads(layer, x, padded=False)
    y_padded, grads_padded = output_and_grads(layer, x, padded=True)
    assert y_padded.shape == y.shape and relative_error(y_padded, y) < 1e-5
    assert grads_padded.keys() == grads.keys() and len(grads) == 1 + sum(p.requires_grad for p in layer.parameters())
    for name, grad in grads.items():
        assert grads_padded[name].shape == grad.shape, name
        assert relative_error(grads_padded[name], grad) < 1e-5, name


def test_only_dense_three_channel_convolutions_pad():
    assert DDQConv2d(3, 8, 3).pads_input_channels()
    assert not DDQConv2d(4, 8, 3).pads_input_channels()
    assert not DDQConv2d(1, 8, 3).pads_input_channels()
    assert not DDQConv2d(3, 3, 3, groups=3).pads_input_channels()


@pytest.mark.gpu
def test_cuda_stem_takes_the_padded_path_and_matches_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu_layer = stem()
    gpu_layer = stem().cuda()
    calls = []
    original = DDQConv2d.conv_with_padded_channels
    monkeypatch.setattr(DDQConv2d, "conv_with_padded_channels", lambda self, *a: calls.append(1) or original(self, *a))
    # The ranges were initialised at the weights' and a batch's maxima, which sit on the clipping boundary where
    # the two devices' arithmetic may disagree about the clip mask: shrink the weights.
    with torch.no_grad():
        cpu_layer.weight.mul_(0.97)
        gpu_layer.weight.mul_(0.97)
    x = torch.randn(4, 3, 33, 29)
    y_cpu = cpu_layer(x)
    y_gpu = gpu_layer(x.cuda().to(memory_format=torch.channels_last).requires_grad_())
    assert calls, "the CUDA layer did not pad its input channels"
    assert relative_error(y_gpu, y_cpu) < 1e-5
    y_cpu.square().sum().backward()
    y_gpu.square().sum().backward()
    for (name, p_cpu), p_gpu in zip(cpu_layer.named_parameters(), gpu_layer.parameters()):
        assert (p_gpu.grad is None) == (p_cpu.grad is None) == (not p_cpu.requires_grad), name
        if p_cpu.grad is not None:
            assert relative_error(p_gpu.grad, p_cpu.grad) < 1e-4, name
