"""Optimizer parameter groups for QAT: weights, quantizer ranges and levels, and gate logits apart.

RESEARCH_NOTES: a range parameter is ~(2^b − 1)× larger than a step and its gradient ~(2^b − 1)×
smaller, so SGD barely moves it; per-parameter normalised updates (Adam) suit ranges, residuals and
gate logits, each with its own learning rate and no weight decay. Adam moves a parameter by about its
learning rate per step whatever the gradient's scale, so a DDQ range (α, h, lo/hi: 2^b − 1 steps wide)
moves (2^b − 1)× slower, relative to its size, than an LSQ step at the same learning rate. With
`scale_range_lr` the DDQ range parameters get quant_lr·(2^b − 1), b = the quantizer's init_bits (the
bits it was built for, also when learned bits start higher): the same relative speed as LSQ's step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ddq.baselines import LSQQuantizer
from ddq.quantizer import DDQQuantizer

QUANTIZER_TYPES = (DDQQuantizer, LSQQuantizer)


def range_lr_multiplier(module: nn.Module, name: str) -> int:
    """2^init_bits − 1 for a DDQ range parameter (it spans that many steps), 1 for everything else."""
    return 2**module.init_bits - 1 if isinstance(module, DDQQuantizer) and name.startswith("range_") else 1


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, quant_lr: float | None = None,
                     gate_lr: float | None = None, scale_range_lr: bool = True) -> list[dict[str, Any]]:
    """Optimizer groups: weights at (lr, weight_decay); quantizer ranges/levels at quant_lr (DDQ ranges
    scaled by 2^init_bits − 1 when `scale_range_lr`) and gate logits at gate_lr (both default to lr), never
    decayed. Empty groups are left out."""
    quant_lr = quant_lr or lr
    quantizer_params: set[int] = set()
    range_params: dict[int, list[nn.Parameter]] = {}
    gates: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, QUANTIZER_TYPES):
            continue
        for name, param in module.named_parameters(recurse=False):
            quantizer_params.add(id(param))
            if not param.requires_grad:
                continue
            if name == "gate_logits":
                gates.append(param)
            else:
                multiplier = range_lr_multiplier(module, name) if scale_range_lr else 1
                range_params.setdefault(multiplier, []).append(param)
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quantizer_params]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "role": "weights"}]
    for multiplier, params in sorted(range_params.items()):
        groups.append({"params": params, "lr": quant_lr * multiplier, "weight_decay": 0.0, "role": "quant_range"})
    groups.append({"params": gates, "lr": gate_lr or lr, "weight_decay": 0.0, "role": "gates"})
    return [g for g in groups if g["params"]]
