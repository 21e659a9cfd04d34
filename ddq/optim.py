"""Optimizer parameter groups for QAT: weights, quantizer ranges and levels, and gate logits apart.

RESEARCH_NOTES: a range parameter is ~(2^b − 1)× larger than a step and its gradient ~(2^b − 1)×
smaller, so SGD barely moves it; per-parameter normalised updates (Adam) suit ranges and residuals,
each with its own learning rate and no weight decay. Adam moves a parameter by about its learning rate
per step whatever the gradient's scale, so a DDQ range parameter moves slower, relative to its size, than
an LSQ step at the same learning rate, by the number of grid steps it spans. `range_lr_scale` sets the
DDQ range parameters' rate to quant_lr times (b = the quantizer's init_bits, the bits it was built for,
also when learned bits start higher):
- "width" (the default, every measured table): 2^b − 1, the steps across the whole grid, for every mode;
- "steps": the steps the parameter itself spans: 2^b − 1 for an unsigned top h and affine ends lo/hi, but
  (2^b − 1)/2 for a symmetric α (a half-width), so every range moves at exactly an LSQ step's relative speed
  ("width" moves a symmetric α twice as fast; measured on MobileNetV2/CIFAR-10, "steps" gained nothing:
  docs/method.md);
- "none": 1.

Gate logits are the exception to normalised updates: Adam moves every layer's gates at the same speed
whatever the layer's share of the resource cost, so all layers end at identical bits (uniform precision
in disguise). Plain SGD keeps the spec §4 gradient's per-layer scale (λ·params_l or λ·MACs_l):
`gate_optimizer` gives the gates their own SGD, and `freeze_bits_once_within_budget` ends bit learning
on a feasible allocation (docs/method.md).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ddq.baselines import LSQQuantizer
from ddq.quantizer import DDQQuantizer

QUANTIZER_TYPES = (DDQQuantizer, LSQQuantizer)
GATE_LR = 0.1
FREEZE_BITS_AT = 0.75


RANGE_LR_SCALES = ("width", "steps", "none")
RANGE_LR_SCALE_HELP = "DDQ range lr factor (ddq.optim): width = 2^b-1 for every mode; steps = (2^b-1)/2 for a symmetric range"


def check_range_lr_scale(scale: str) -> None:
    if scale not in RANGE_LR_SCALES:
        raise ValueError(f"range_lr_scale must be one of {RANGE_LR_SCALES}, got {scale!r}")


def range_lr_multiplier(module: nn.Module, name: str, scale: str = "width") -> float:
    """The factor on quant_lr of a DDQ range parameter under `scale` (module docstring); 1 for the rest.
    "steps" reads the quantizer's mode: build the optimizer after the quantizers saw their first batch
    (an unresolved "auto" mode counts as unsigned)."""
    check_range_lr_scale(scale)
    if scale == "none" or not (isinstance(module, DDQQuantizer) and name.startswith("range_")):
        return 1.0
    width = 2.0**module.init_bits - 1
    return width / 2 if scale == "steps" and module.mode == "symmetric" else width


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, quant_lr: float | None = None,
                     gate_lr: float | None = None, range_lr_scale: str = "width", include_gates: bool = True) -> list[dict[str, Any]]:
    """Optimizer groups: weights at (lr, weight_decay); quantizer ranges/levels at quant_lr (DDQ ranges
    times `range_lr_multiplier`) and gate logits at gate_lr (both default to lr when None; 0 freezes them),
    never decayed.
    `include_gates=False` leaves the gates out (for `gate_optimizer`). Empty groups are left out."""
    check_range_lr_scale(range_lr_scale)
    quant_lr = lr if quant_lr is None else quant_lr
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
                multiplier = range_lr_multiplier(module, name, range_lr_scale)
                range_params.setdefault(multiplier, []).append(param)
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quantizer_params]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "role": "weights"}]
    for multiplier, params in sorted(range_params.items()):
        groups.append({"params": params, "lr": quant_lr * multiplier, "weight_decay": 0.0, "role": "quant_range"})
    if include_gates:
        groups.append({"params": gates, "lr": lr if gate_lr is None else gate_lr, "weight_decay": 0.0, "role": "gates"})
    return [g for g in groups if g["params"]]


def learned_gate_logits(model: nn.Module) -> list[nn.Parameter]:
    """The gate logits of every DDQ quantizer whose bits are learned."""
    return [m.gate_logits for m in model.modules() if isinstance(m, DDQQuantizer) and m.gate_logits.requires_grad]


def gate_optimizer(model: nn.Module, lr: float) -> Optional[torch.optim.SGD]:
    """Plain SGD (no momentum) over the learned gate logits, or None when no bits are learned.

    SGD keeps each layer's share of the spec §4 cost in its gates' step, so the layers that cost most
    per unit of task loss give up bits first (RESEARCH_NOTES: Adam here ended every layer at the same bits).
    """
    gates = learned_gate_logits(model)
    return torch.optim.SGD(gates, lr=lr, momentum=0.0) if gates else None


def freeze_bits_once_within_budget(optimizer: torch.optim.Optimizer, resource: Optional[Any]) -> bool:
    """End bit learning for good once `resource` (a ResourceLoss, or None) is within its budget: the gate
    optimizer's learning rate becomes 0 (kept in its state_dict, so a resumed run stays frozen).

    Call it every step from where bit learning should end (e.g. FREEZE_BITS_AT of the steps): the hinge
    of spec §4 pushes only while over budget, so bits hover at the budget's edge while they learn; freezing
    at a step that meets the budget ends training on a feasible allocation, with the remaining steps to
    adapt the weights to it. Returns whether the bits are frozen.
    """
    if all(group["lr"] == 0 for group in optimizer.param_groups):
        return True
    if resource is not None and resource.over_budget() > 0:
        return False
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    return True
