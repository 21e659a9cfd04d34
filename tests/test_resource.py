"""Spec §4: ResourceLoss values and gradients, the bit report, and the dual ascent on λ."""

import math

import pytest
import torch

import ddq
from ddq.models import SmallCNN
from ddq.resource import differentiable_bits, set_learned_bits


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


def test_resource_loss_lowers_bits_one_at_a_time_and_largest_layer_most_under_gate_sgd():
    """With ddq.optim's plain-SGD gate optimizer and the squared graded logits, bits leave one at a time
    (no collapse to min_bits), the budget is met, and the 4×-larger layer gives up more bits."""
    from ddq.optim import gate_optimizer

    torch.manual_seed(0)
    model = quantized_cnn()
    set_learned_bits(model, 8)
    layers = [layer for _, layer in ddq.quantized_layers(model)[1:3]]
    loss = ddq.ResourceLoss(model, weight_bits=4.0, strength=1.0)
    optimizer = gate_optimizer(model, lr=1.0)
    history = [[layer.weight_quantizer.bits for layer in layers]]
    for _ in range(400):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        history.append([layer.weight_quantizer.bits for layer in layers])
        if loss.over_budget() <= 0:
            break
    assert loss.over_budget() <= 0
    steps = [[before - after for before, after in zip(a, b)] for a, b in zip(history, history[1:])]
    assert all(0 <= drop <= 1 for step in steps for drop in step)
    small, large = history[-1]
    assert large < small and large >= 2


def test_freeze_bits_waits_for_the_budget_then_holds_through_a_state_dict_round_trip():
    from ddq.optim import freeze_bits_once_within_budget, gate_optimizer

    model = quantized_cnn()
    set_learned_bits(model, 8)
    loss = ddq.ResourceLoss(model, weight_bits=4.0, strength=1.0)
    optimizer = gate_optimizer(model, lr=1.0)
    assert loss.over_budget() > 0 and not freeze_bits_once_within_budget(optimizer, loss)
    assert all(group["lr"] == 1.0 for group in optimizer.param_groups)
    while loss.over_budget() > 0:
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert freeze_bits_once_within_budget(optimizer, loss)
    restored = gate_optimizer(model, lr=1.0)
    restored.load_state_dict(optimizer.state_dict())
    bits = [layer.weight_quantizer.bits for _, layer in ddq.quantized_layers(model)]
    restored.zero_grad()
    (loss() - 100 * sum(differentiable_bits(layer.weight_quantizer) for _, layer in ddq.quantized_layers(model))).backward()
    restored.step()
    assert [layer.weight_quantizer.bits for _, layer in ddq.quantized_layers(model)] == bits
    assert gate_optimizer(ddq.quantize_model(SmallCNN()), lr=1.0) is None


def test_dual_ascent_moves_lambda_by_the_same_factor_either_way():
    model = quantized_cnn()
    loss = ddq.ResourceLoss(model, weight_bits=2.0, strength=1.0)
    assert loss.adapt_strength(0.1) == pytest.approx(math.exp(0.1))
    loss.weight_bits = 8.0
    assert loss.adapt_strength(0.1) == pytest.approx(1.0)


def test_macs_per_sample_of_unbatched_and_empty_batches():
    from ddq.nn import DDQConv2d, DDQLinear

    for x in (torch.randn(6), torch.randn(5, 6), torch.randn(0, 6)):
        layer = DDQLinear(6, 5)
        if x.numel():
            layer(x)
        else:
            layer(torch.randn(2, 6))  # the range initialises from a non-empty batch first
            layer.macs = None
            layer(x)
        assert layer.macs == 30
    sequence = DDQLinear(6, 5)
    sequence(torch.randn(2, 7, 6))
    assert sequence.macs == 30 * 7
    for x in (torch.randn(3, 8, 6), torch.randn(2, 3, 8, 6)):
        conv = DDQConv2d(3, 4, 3, padding=1)
        conv(x)
        assert conv.macs == 3 * 9 * 4 * 8 * 6


def test_targets_and_strength_must_be_finite():
    model = ddq.quantize_model(SmallCNN(), learn_bits=True)
    for arguments, name in ((dict(weight_bits=float("nan")), "weight_bits"), (dict(bitops=float("inf")), "bitops"),
                            (dict(strength=float("nan")), "strength"), (dict(weight_bits=-1.0), "weight_bits")):
        with pytest.raises(ValueError, match=f"{name} must be a finite"):
            ddq.ResourceLoss(model, **arguments)
