"""`quantize_model`: swap a model's nn.Linear / nn.Conv2d for quantized layers (DDQ or the LSQ baseline)."""

from __future__ import annotations

import copy
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ddq.nn import QUANTIZED_LAYERS, DDQConv2d, DDQLinear

FLOAT_LAYERS = (nn.Linear, nn.Conv2d)


def _float_layers(model: nn.Module) -> list[tuple[list[str], nn.Module]]:
    """Each distinct nn.Linear / nn.Conv2d of the model with every name it is registered under, in module
    order: a module used at two places is one layer, so that it stays one (shared) module when quantized."""
    layers: dict[int, tuple[list[str], nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in FLOAT_LAYERS:
            layers.setdefault(id(module), ([], module))[0].append(name)
    return list(layers.values())


def _check_layers_left_in_float(model: nn.Module) -> None:
    """A lazy layer has no shape to quantize yet (an error); a subclass of nn.Linear / nn.Conv2d may compute its
    output its own way (nn.MultiheadAttention's out_proj is one), so it is left in float, with a warning."""
    for name, module in model.named_modules():
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"quantize_model: layer {name!r} ({type(module).__name__}) has not seen an input yet, so "
                             "its shape is unknown: run one forward pass before quantize_model")
    subclasses = [f"{name} ({type(module).__name__})" for name, module in model.named_modules()
                  if isinstance(module, FLOAT_LAYERS) and type(module) not in FLOAT_LAYERS
                  and not isinstance(module, QUANTIZED_LAYERS)]
    if subclasses:
        warnings.warn(f"quantize_model: left in float, as subclasses of nn.Linear / nn.Conv2d that may compute their "
                      f"output differently: {', '.join(subclasses)}", stacklevel=3)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _skipped_layers(skip: Union[str, Iterable[str]], layers: list[tuple[list[str], nn.Module]]) -> set[str]:
    """`skip` as a set of layer names, each of which must name a layer of the model."""
    skipped = {skip} if isinstance(skip, str) else set(skip)
    known = [name for names, _ in layers for name in names]
    unknown = sorted(skipped - set(known))
    if unknown:
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise ValueError(f"quantize_model: skip names no nn.Linear / nn.Conv2d of the model: {unknown}; its layers are {shown}")
    return skipped


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
    skip: Union[str, Iterable[str]] = (),
    inplace: bool = False,
) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d (grouped and depthwise too) with `DDQLinear` / `DDQConv2d`.

    Spec §2 granularity: weights per output channel, activations per tensor. The first and last
    quantizable layers (in module order) get `first_last_bits` fixed bits (default 8; None treats them
    like the rest). `skip` names layers left in float (a name or several; each must name a layer). A layer
    registered under several names becomes one quantized layer at all of them (skipped if any name is), and the
    quantized layers keep the float layers' parameters (tied weights and requires_grad flags stay as they were).
    Subclasses of nn.Linear / nn.Conv2d stay float, with a warning; a model that is itself one layer is returned
    as a new quantized layer, even with inplace=True. method="lsq" builds the LSQ baseline instead.
    learn_bits: True learns every other layer's weight and activation bits, "weights" or "activations"
    only those. range_init="mse" (default) shrinks each initial range to the least-error fraction of the
    spec's max/percentile range at the layer's bits; "spec" keeps the spec §2 range (docs/method.md).
    weight_max_bits caps DDQ weight bits (first/last layers included); 7 makes every layer exportable
    bit-exactly under spec §5's int8 weight LUT, which cannot hold an 8-bit symmetric grid.
    Quantizer ranges initialise on the first batch: run one eager forward before `torch.compile`.
    """
    if not inplace:
        model = copy.deepcopy(model)
    _check_layers_left_in_float(model)
    layers = _float_layers(model)
    skipped = _skipped_layers(skip, layers)
    layers = [(names, layer) for names, layer in layers if not skipped.intersection(names)]
    if not layers:
        raise ValueError("quantize_model: the model has no nn.Linear or nn.Conv2d layer to quantize")
    edge = {id(layers[0][1]), id(layers[-1][1])} if first_last_bits is not None else set()
    for names, layer in layers:
        if id(layer) in edge:
            edge_weight_bits = first_last_bits if method == "lsq" else min(first_last_bits, weight_max_bits)
            config = dict(weight_bits=edge_weight_bits, act_bits=first_last_bits, learn_bits=False)
        else:
            config = dict(weight_bits=weight_bits, act_bits=act_bits, learn_bits=learn_bits)
        config.update(method=method, learn_levels=learn_levels, min_bits=min_bits, act_mode=act_mode, range_init=range_init,
                      weight_max_bits=weight_max_bits)
        if method == "lsq":
            config = {key: config[key] for key in ("weight_bits", "act_bits", "method", "act_mode")}
        quantized_class = DDQLinear if isinstance(layer, nn.Linear) else DDQConv2d
        quantized = quantized_class.from_float(layer, **config)
        if names == [""]:
            return quantized  # the model is this one layer
        for name in names:
            _set_submodule(model, name, quantized)
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
