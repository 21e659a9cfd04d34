"""Resource constraint and bit report (DDQ_SPEC.md Section 4)."""

from __future__ import annotations

import math

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ddq import quantizer_math as qm
from ddq.convert import quantized_layers
from ddq.quantizer import DDQQuantizer, graded_gate_logits


class LayerBits(NamedTuple):
    """One row of `model_bits_report`: MACs per sample are None until the layer has run once."""

    name: str
    params: int
    macs: Optional[int]
    weight_bits: int
    act_bits: int


def differentiable_bits(quantizer: nn.Module) -> Tensor:
    """Spec §4: b = Σ g_k with ∂b/∂g_k = 1, reaching free gate logits straight through (∂h/∂θ = 1)."""
    if not isinstance(quantizer, DDQQuantizer) or not quantizer.gate_logits.requires_grad:
        return torch.tensor(float(quantizer.bits))
    logits = quantizer.effective_gate_logits()
    free = torch.arange(qm.FINEST_BITS, device=logits.device) >= quantizer.min_bits
    hard = qm.hard_gates(logits, quantizer.min_bits)
    gates = hard + torch.where(free, logits - logits.detach(), torch.zeros_like(logits))
    return torch.cumprod(gates, dim=0).sum()


class ResourceLoss(nn.Module):
    """Spec §4: λ·max(0, size/(weight_bits·Σparams) − 1) [+ λ·max(0, BitOps/(bitops·ΣMACs) − 1)].

    Covers every quantized layer of `model`; fixed-bit layers count as constants. `bitops` is a target
    average of b_w·b_a per MAC (16 for W4A4) and needs one forward pass first (MACs come from it).
    """

    def __init__(self, model: nn.Module, weight_bits: float = 4.0, bitops: Optional[float] = None, strength: float = 1.0) -> None:
        super().__init__()
        self.layers = quantized_layers(model)
        if not self.layers:
            raise ValueError("ResourceLoss: the model has no quantized layer (run ddq.quantize_model first)")
        targets = {"weight_bits": weight_bits} | ({"bitops": bitops} if bitops is not None else {})
        for name, target in targets.items():
            if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
                raise ValueError(f"ResourceLoss: {name} must be a finite positive number, got {target!r}")
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
            raise ValueError(f"ResourceLoss: strength must be a finite non-negative number, got {strength!r}")
        self.weight_bits = weight_bits
        self.bitops = bitops
        self.strength = strength

    def average_weight_bits(self) -> Tensor:
        params = [layer.weight.numel() for _, layer in self.layers]
        size = sum(p * differentiable_bits(layer.weight_quantizer).to(layer.weight.device) for p, (_, layer) in zip(params, self.layers))
        return size / sum(params)

    def average_bitops(self) -> Tensor:
        macs = [layer.macs for _, layer in self.layers]
        if any(m is None for m in macs):
            raise RuntimeError("ResourceLoss: BitOps need every layer's MACs; run one forward pass of the model first")
        total = sum(
            m * differentiable_bits(layer.weight_quantizer).to(layer.weight.device) * differentiable_bits(layer.input_quantizer).to(layer.weight.device)
            for m, (_, layer) in zip(macs, self.layers)
        )
        return total / sum(macs)

    def over_budget(self) -> float:
        """The largest relative excess over a target (0 when every target is met), without gradients."""
        with torch.no_grad():
            excess = float(self.average_weight_bits()) / self.weight_bits - 1
            if self.bitops is not None:
                excess = max(excess, float(self.average_bitops()) / self.bitops - 1)
        return excess

    def adapt_strength(self, rate: float = 0.05, floor: float = 1e-4, ceiling: float = 1e3) -> float:
        """Dual ascent on λ by its sign: multiply it by e^rate while the model is over budget and by e^−rate
        while it is within (docs/method.md: the rule e^(rate·excess) grew λ too slowly just over budget).

        λ grows while the model is over budget and shrinks while it is under, so the budget is met
        without hand-tuning λ; layers whose task gradient outweighs λ·cost keep their bits longest,
        which is what makes the allocation non-uniform. Call once per optimizer step. Returns λ.
        """
        direction = 1.0 if self.over_budget() > 0 else -1.0
        self.strength = min(max(self.strength * math.exp(rate * direction), floor), ceiling)
        return self.strength

    def forward(self) -> Tensor:
        loss = self.strength * torch.relu(self.average_weight_bits() / self.weight_bits - 1)
        if self.bitops is not None:
            loss = loss + self.strength * torch.relu(self.average_bitops() / self.bitops - 1)
        return loss


def model_bits_report(model: nn.Module) -> list[LayerBits]:
    """Spec §4: per quantized layer (name, params, MACs per sample, b_w, b_a)."""
    return [
        LayerBits(name, layer.weight.numel(), layer.macs, layer.weight_quantizer.bits, layer.input_quantizer.bits)
        for name, layer in quantized_layers(model)
    ]


def summarize_bits(model: nn.Module) -> dict[str, float]:
    """Parameter-weighted average weight bits, MAC-weighted activation bits, and quantized weight size."""
    rows = model_bits_report(model)
    params = sum(r.params for r in rows)
    weight_bits = sum(r.params * r.weight_bits for r in rows) / params
    with_macs = [r for r in rows if r.macs is not None]
    act_bits = sum(r.macs * r.act_bits for r in with_macs) / sum(r.macs for r in with_macs) if with_macs else float("nan")
    return {"avg_weight_bits": weight_bits, "avg_act_bits": act_bits, "weight_kib": weight_bits * params / 8 / 1024}


def budget_at(model: nn.Module, learned_bits: int) -> tuple[float, float]:
    """Spec §4 targets for a mixed-precision run: (average weight bits, average b_w·b_a per MAC) over all
    quantized layers if the learned-bit layers sat at `learned_bits` (fixed-bit layers count as they are).
    The result is the weight size and BitOps of the WkAk model. Needs one forward pass (for the MACs)."""
    rows = model_bits_report(model)
    learned = [layer.weight_quantizer.gate_logits.requires_grad for _, layer in quantized_layers(model)]
    w_bits = [learned_bits if is_learned else r.weight_bits for r, is_learned in zip(rows, learned)]
    a_bits = [learned_bits if is_learned else r.act_bits for r, is_learned in zip(rows, learned)]
    weight = sum(r.params * b for r, b in zip(rows, w_bits)) / sum(r.params for r in rows)
    bitops = sum(r.macs * bw * ba for r, bw, ba in zip(rows, w_bits, a_bits)) / sum(r.macs for r in rows)
    return weight, bitops


def set_learned_bits(model: nn.Module, bits: int) -> None:
    """Learned-bit quantizers restart at `bits` with spec §2's graded logits, to descend to the budget."""
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            for quantizer in (layer.weight_quantizer, layer.input_quantizer):
                if quantizer.gate_logits.requires_grad:
                    quantizer.gate_logits.copy_(graded_gate_logits(min(bits, quantizer.max_bits)))
