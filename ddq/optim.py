"""Optimizer parameter groups for QAT: weights, quantizer ranges and levels, and gate logits apart.

RESEARCH_NOTES: a range parameter is ~(2^b − 1)× larger than a step and its gradient ~(2^b − 1)×
smaller, so SGD barely moves it; per-parameter normalised updates (Adam) suit ranges, residuals and
gate logits, each with its own learning rate and no weight decay.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ddq.baselines import LSQQuantizer
from ddq.quantizer import DDQQuantizer

QUANTIZER_TYPES = (DDQQuantizer, LSQQuantizer)


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by role: "weights", "quant_range" (range and residuals), "gates"."""
    roles: dict[str, list[nn.Parameter]] = {"weights": [], "quant_range": [], "gates": []}
    quantizer_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, QUANTIZER_TYPES):
            for name, param in module.named_parameters(recurse=False):
                quantizer_params.add(id(param))
                if param.requires_grad:
                    roles["gates" if name == "gate_logits" else "quant_range"].append(param)
    roles["weights"] = [p for p in model.parameters() if p.requires_grad and id(p) not in quantizer_params]
    return roles


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, quant_lr: float | None = None,
                     gate_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: weights at (lr, weight_decay); quantizer ranges/levels at quant_lr and gate
    logits at gate_lr (both default to lr), never decayed. Empty groups are left out."""
    roles = split_parameters(model)
    groups = [
        {"params": roles["weights"], "lr": lr, "weight_decay": weight_decay, "role": "weights"},
        {"params": roles["quant_range"], "lr": quant_lr or lr, "weight_decay": 0.0, "role": "quant_range"},
        {"params": roles["gates"], "lr": gate_lr or lr, "weight_decay": 0.0, "role": "gates"},
    ]
    return [g for g in groups if g["params"]]
