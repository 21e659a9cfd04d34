"""DDQ modules under torch.compile(fullgraph=True) on CPU, after one eager batch initialised the quantizers.

fullgraph=True fails on any graph break, so these tests prove the forward and backward trace whole
(the quantizer ops are opaque custom ops). Compiled results must equal eager ones, a change of
bitwidth during training must neither break nor recompile the graph, and the op's CPU value checks
still run inside a compiled graph. Quantizers and single layers use the aot_eager backend (the same
Dynamo + AOTAutograd trace, without Inductor's C++ build); the small model, which holds both layer
kinds, goes through Inductor once (a cold Inductor start costs ~25 s of CPU, so only once).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddq.models import SmallCNN
from ddq.nn import DDQConv2d, DDQLinear
from ddq.quantizer import DDQQuantizer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run_and_grads(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = module(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return out.detach(), grads


def assert_compiled_matches_eager(
    module: nn.Module, batches: list[torch.Tensor], backend: str = "inductor", compiled_before: bool = False
) -> None:
    """Eager and compiled forward + backward agree on every batch; no batch after the first recompiles
    (none at all when the module was compiled before)."""
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    for index, x in enumerate(batches):
        with torch._dynamo.config.patch(error_on_recompile=compiled_before or index > 0):
            got, got_grads = run_and_grads(compiled, x)
        want, want_grads = run_and_grads(module, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def change_bitwidth(quantizer: DDQQuantizer, bits: int) -> None:
    """Move the gate logits as training would, to a new bitwidth."""
    with torch.no_grad():
        quantizer.gate_logits.copy_(torch.arange(8, 0, -1, dtype=torch.float32) - (8 - bits) - 0.5)
    assert quantizer.bits == bits


@pytest.mark.parametrize(
    "mode, channels, first",
    [("auto", None, torch.rand(6, 9)), ("symmetric", 4, torch.randn(4, 3, 5)), ("affine", None, torch.randn(31) + 1)],
    ids=["auto_unsigned_per_tensor", "symmetric_per_channel", "affine_per_tensor"],
)
def test_quantizer_compiles_fullgraph(mode, channels, first):
    torch.manual_seed(0)
    quantizer = DDQQuantizer(mode, channels=channels, init_bits=5, min_bits=2)
    quantizer(first)
    batches = [first * 1.3, first * 0.7 - 0.1]
    assert_compiled_matches_eager(quantizer, batches, backend="aot_eager")
    change_bitwidth(quantizer, 3)
    assert_compiled_matches_eager(quantizer, [first * 1.1], backend="aot_eager", compiled_before=True)
    with torch.no_grad():
        quantizer.range_top.fill_(float("nan"))
    with pytest.raises(ValueError, match="contains non-finite values"):
        torch.compile(quantizer, fullgraph=True, backend="aot_eager")(first)


def test_linear_compiles_fullgraph():
    torch.manual_seed(1)
    layer = DDQLinear(13, 7, weight_bits=4, act_bits=4, learn_bits=True)
    first = torch.relu(torch.randn(5, 13))
    layer(first)
    assert layer.input_quantizer.mode == "unsigned"
    assert_compiled_matches_eager(layer, [torch.relu(torch.randn(5, 13)), torch.relu(torch.randn(5, 13))], backend="aot_eager")


def test_conv2d_compiles_fullgraph():
    torch.manual_seed(2)
    layer = DDQConv2d(3, 6, 3, padding=1, weight_bits=3, act_bits=5, learn_bits=True)
    first = torch.randn(2, 3, 9, 9)
    layer(first)
    assert layer.input_quantizer.mode == "symmetric"
    assert_compiled_matches_eager(layer, [torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9, 9)], backend="aot_eager")


def quantized_small_cnn() -> nn.Module:
    """SmallCNN with every Conv2d / Linear replaced by its DDQ layer (learned bits).

    Its max-pooling becomes average pooling: quantized activations tie exactly within a pooling
    window, and Inductor's max-pool backward breaks such ties differently from eager (measured:
    identical forward, input gradients 0.7 % apart), a difference that has nothing to do with DDQ.
    """
    model = SmallCNN(in_channels=1, num_classes=10, width=4, image_size=16)
    quant = dict(weight_bits=4, act_bits=4, learn_bits=True)
    for stage in range(0, len(model.features), 3):
        model.features[stage] = DDQConv2d.from_float(model.features[stage], **quant)
        model.features[stage + 2] = nn.AvgPool2d(2)
    model.classifier = DDQLinear.from_float(model.classifier, **quant)
    return model


def test_small_model_compiles_fullgraph():
    """A quantized SmallCNN: compiled forward/backward equal eager, also after bitwidths changed (with
    no recompile: the bitwidth lives in tensors, not in Python values the graph guards on)."""
    torch.manual_seed(3)
    model = quantized_small_cnn()
    model(torch.randn(4, 1, 16, 16))
    assert_compiled_matches_eager(model, [torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)])
    change_bitwidth(model.features[3].input_quantizer, 2)
    change_bitwidth(model.classifier.weight_quantizer, 6)
    assert_compiled_matches_eager(model, [torch.randn(4, 1, 16, 16)], compiled_before=True)


def test_small_model_trains_under_compile_like_eager():
    """SGD steps on two identical copies, one compiled (after one eager batch), keep them identical."""
    torch.manual_seed(4)
    images, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 3, 7, 9])
    model = quantized_small_cnn()
    model(images)
    twin = quantized_small_cnn()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        twin(images)
    compiled = torch.compile(twin, fullgraph=True)
    for net in (model, compiled):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        for step in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(images + step), labels).backward()
            optimizer.step()
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_layer_restored_from_a_checkpoint_compiles_without_an_eager_batch():
    """Quantizers restored from a state_dict are initialised, so a checkpoint should compile directly."""
    source = DDQLinear(6, 3)
    source(torch.randn(2, 6))
    restored = DDQLinear(6, 3)
    restored.load_state_dict(source.state_dict())
    compiled = torch.compile(restored, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6)
    torch.testing.assert_close(compiled(x), source(x))
