"""Spec §4: ResourceLoss values and gradients, the bit report, and the dual ascent on λ."""

import pytest
import torch

import ddq
from ddq.models import SmallCNN
from ddq.quantizer import graded_gate_logits
from ddq.resource import differentiable_bits


def quantized_cnn(**kwargs):
    model = ddq.quantize_model(SmallCNN(), learn_bits=True, **kwargs)
    ddq.initialize_quantizers(model, torch.randn(2, 1, 28, 28))
    return model


def test_report_rows():
    rows = ddq.model_bits_report(quantized_cnn())
    assert [r.name for r in rows] == ["features.0", "features.3", "features.6", "classifier"]
    assert [r.params for r in rows] == [144, 4608, 18432, 5760]
    assert rows[1].macs == 16 * 9 * 32 * 14 * 14 and rows[3].macs == 5760
    assert [(r.weight_bits, r.act_bits) for r in rows] == [(8, 8), (4, 4), (4, 4), (8, 8)]


def test_loss_value_follows_the_spec_formula():
    model = quantized_cnn()
    rows = ddq.model_bits_report(model)
    params = sum(r.params for r in rows)
    size = sum(r.params * r.weight_bits for r in rows)
    bitops = sum(r.macs * r.weight_bits * r.act_bits for r in rows) / sum(r.macs for r in rows)
    loss = ddq.ResourceLoss(model, weight_bits=3.0, bitops=10.0, strength=0.7)()
    expected = 0.7 * (max(0, size / (3.0 * params) - 1) + max(0, bitops / 10.0 - 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert ddq.ResourceLoss(model, weight_bits=8.0, strength=0.7)().item() == 0.0


def test_gradient_reaches_gate_logits_through_the_nesting():
    quantizer = ddq.DDQQuantizer(init_bits=5, min_bits=2)
    differentiable_bits(quantizer).backward()
    # ∂b/∂θ_j = Σ_{k≥j} Π_{l≤k, l≠j} h_l: kept gates 3..5 see (b − j + 1); gate 6 (first closed) sees 1.
    assert quantizer.gate_logits.grad.tolist() == [0, 0, 3, 2, 1, 1, 0, 0]


def test_fixed_bit_layers_are_constants_and_gradients_are_proportional_to_cost():
    model = quantized_cnn()
    ddq.ResourceLoss(model, weight_bits=2.0, strength=1.0)().backward()
    layers = dict(ddq.quantized_layers(model))
    assert layers["features.0"].weight_quantizer.gate_logits.grad is None
    small = layers["features.3"].weight_quantizer.gate_logits.grad[3]
    large = layers["features.6"].weight_quantizer.gate_logits.grad[3]
    assert large / small == pytest.approx(18432 / 4608)


def test_dual_ascent_raises_strength_over_budget_and_lowers_it_under():
    model = quantized_cnn()
    over = ddq.ResourceLoss(model, weight_bits=2.0, strength=1e-2)
    assert over.adapt_strength(0.1) > 1e-2
    under = ddq.ResourceLoss(model, weight_bits=8.0, strength=1e-2)
    assert under.adapt_strength(0.1) < 1e-2


def test_bitops_need_a_forward_pass_and_bad_targets_are_rejected():
    model = ddq.quantize_model(SmallCNN(), learn_bits=True)
    with pytest.raises(RuntimeError, match="forward pass"):
        ddq.ResourceLoss(model, bitops=16.0)()
    with pytest.raises(ValueError, match="positive"):
        ddq.ResourceLoss(model, weight_bits=0.0)
    with pytest.raises(ValueError, match="no quantized layer"):
        ddq.ResourceLoss(SmallCNN())


def test_resource_loss_lowers_bits_under_adam():
    torch.manual_seed(0)
    model = quantized_cnn()
    for _, layer in ddq.quantized_layers(model)[1:3]:
        with torch.no_grad():
            layer.weight_quantizer.gate_logits.copy_(graded_gate_logits(8))
    loss = ddq.ResourceLoss(model, weight_bits=4.0, strength=1.0)
    gates = [p for n, p in model.named_parameters() if n.endswith("gate_logits") and p.requires_grad]
    optimizer = torch.optim.Adam(gates, lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert ddq.summarize_bits(model)["avg_weight_bits"] <= 4.0 + 1e-6
    assert all(layer.weight_quantizer.bits >= 2 for _, layer in ddq.quantized_layers(model))
