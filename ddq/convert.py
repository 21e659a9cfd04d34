"""`quantize_model`: swap a model's nn.Linear / nn.Conv2d for quantized layers (DDQ or the LSQ baseline)."""

from __future__ import annotations

import copy
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ddq.nn import DDQConv2d, DDQLinear

FLOAT_LAYERS = (nn.Linear, nn.Conv2d)


def _quantizable_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) in FLOAT_LAYERS]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    weight_bits: int = 4,
    act_bits: int = 4,
    method: str = "ddq",
    learn_bits: Union[bool, str] = False,
    learn_levels: bool = True,
    min_bits: int = 2,
    first_last_bits: Optional[int] = 8,
    act_mode: str = "auto",
    range_init: str = "mse",
    weight_max_bits: int = 8,
    skip: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d (grouped and depthwise too) with `DDQLinear` / `DDQConv2d`.

    Spec §2 granularity: weights per output channel, activations per tensor. The first and last
    quantizable layers (in module order) get `first_last_bits` fixed bits (default 8; None treats them
    like the rest). `skip` names layers left in float. method="lsq" builds the LSQ baseline instead.
    learn_bits: True learns every other layer's weight and activation bits, "weights" or "activations"
    only those. range_init="mse" (default) shrinks each initial range to the least-error fraction of the
    spec's max/percentile range at the layer's bits; "spec" keeps the spec §2 range (docs/method.md).
    weight_max_bits caps DDQ weight bits (first/last layers included); 7 makes every layer exportable
    bit-exactly under spec §5's int8 weight LUT, which cannot hold an 8-bit symmetric grid.
    Quantizer ranges initialise on the first batch: run one eager forward before `torch.compile`.
    """
    if not inplace:
        model = copy.deepcopy(model)
    names = [name for name in _quantizable_names(model) if name not in set(skip)]
    if not names:
        raise ValueError("quantize_model: the model has no nn.Linear or nn.Conv2d layer to quantize")
    edge = {names[0], names[-1]} if first_last_bits is not None else set()
    for name in names:
        layer = model.get_submodule(name)
        if name in edge:
            edge_weight_bits = first_last_bits if method == "lsq" else min(first_last_bits, weight_max_bits)
            config = dict(weight_bits=edge_weight_bits, act_bits=first_last_bits, learn_bits=False)
        else:
            config = dict(weight_bits=weight_bits, act_bits=act_bits, learn_bits=learn_bits)
        config.update(method=method, learn_levels=learn_levels, min_bits=min(min_bits, config["weight_bits"], config["act_bits"]), act_mode=act_mode, range_init=range_init,
                      weight_max_bits=weight_max_bits)
        if method == "lsq":
            config = {key: config[key] for key in ("weight_bits", "act_bits", "method", "act_mode")}
        quantized_class = DDQLinear if isinstance(layer, nn.Linear) else DDQConv2d
        _set_submodule(model, name, quantized_class.from_float(layer, **config))
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every quantized layer, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (DDQLinear, DDQConv2d))]


@torch.no_grad()
def initialize_quantizers(model: nn.Module, batch: Tensor) -> None:
    """Run one eager forward so every quantizer initialises its range (needed before torch.compile).

    The pass runs in training mode, so BatchNorm normalises with the batch's own statistics: the quantizers
    see the activations that QAT will feed them (running statistics of an untrained model would scale
    them arbitrarily, and every later activation would clip). BatchNorm's running statistics are restored
    afterwards, so the pass leaves no trace but the quantizers' ranges. A model with BatchNorm needs a batch of
    at least two samples (training-mode BatchNorm of one sample fails where a feature map is 1 × 1, and the
    ranges of one sample are a poor calibration anyway).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and batch.shape[0] < 2:
        raise ValueError(f"initialize_quantizers: the batch has {batch.shape[0]} sample(s), and the model's BatchNorm "
                         "layers normalise by batch statistics in this pass: give at least 2 (a few dozen calibrate "
                         "the ranges better)")
    saved = [{name: buffer.clone() for name, buffer in m.named_buffers(recurse=False)} for m in norms]
    was_training = model.training
    model.train()
    try:
        model(batch)
    finally:
        model.train(was_training)
        for module, buffers in zip(norms, saved):
            for name, value in buffers.items():
                getattr(module, name).copy_(value)
