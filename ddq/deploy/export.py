"""Export of a trained DDQ model to integer layers and their execution (DDQ_SPEC.md Section 5).

Supported layer graph: the model's leaf modules, in registration order, form a chain of DDQConv2d /
DDQLinear layers, each optionally followed by ReLU and/or MaxPool2d (kernel = stride, no padding);
Flatten, Dropout and Identity are allowed and a convolution feeding a linear layer is flattened in
NCHW order (as `SmallCNN` does). Layer l requantises onto the fine grid of layer l + 1's input
quantizer; its ReLU is folded into i_min and a max-pool runs on codes (both are monotone maps, so
they commute with the code map). The last layer returns acc and float logits acc·s_w·s_x + bias per
output channel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ddq import quantizer_math as qm
from ddq.atomic_file import write_atomically
from ddq.deploy.int_gemm import (MAX_K, MAX_MULT, MAX_OFFSET, MAX_SHIFT, GemmArgs, check_int_gemm_args,
                                  check_requantization, int_gemm)
from ddq.deploy.packing import pack, packed_row_bytes, unpack
from ddq.nn import DDQConv2d, DDQLinear
from ddq.quantizer import DDQQuantizer

FORMAT = "ddq-integer"
VERSION = 1
METADATA_KEY = "ddq_deploy"
PASSIVE_LAYERS = (nn.Flatten, nn.Dropout, nn.Identity)
LAYER_TENSORS = ("packed_w", "lut_w", "lut_x", "mult", "offset", "i_min")
LAST_LAYER_TENSORS = ("scale", "bias")


def round_half_away(values: np.ndarray) -> np.ndarray:
    """Spec §5's rounding of exported constants: half away from zero, in float64, exactly
    (`quantizer_math.round_half_away`, which the float model's lut levels use too)."""
    return qm.round_half_away(torch.from_numpy(np.asarray(values, dtype=np.float64))).numpy()


@dataclass
class ExportedLayer:
    """One integer layer: its geometry, bitwidths and the spec §5 constants (weights unpacked)."""

    kind: str
    name: str
    out_features: int
    k: int
    bits_x: int
    bits_w: int
    bits_out: int
    shift: int
    relu: bool
    pool: int
    last: bool
    codes_w: np.ndarray
    lut_w: np.ndarray
    lut_x: np.ndarray
    mult: np.ndarray
    offset: np.ndarray
    i_min: np.ndarray
    conv: dict[str, Any] = field(default_factory=dict)
    pad_code: int = 0
    scale: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    # backend "c": arm_ref prepared weights per output-column slice (conv groups), made on first use and
    # kept with the weights they were made from, so a changed codes_w / lut_w is prepared again.
    prepared_c: dict = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        keys = ("kind", "name", "out_features", "k", "bits_x", "bits_w", "bits_out", "shift", "relu", "pool", "last",
                "conv", "pad_code")
        return {key: getattr(self, key) for key in keys} | {"lut_x_dtype": self.lut_x.dtype.name}


# ---------------------------------------------------------------------------------------------- export

def use_lut_levels(model: nn.Module, enabled: bool = True) -> int:
    """Put every DDQ quantizer's levels on spec §5's integer level tables (`DDQQuantizer.lut_levels`), so
    that the float QAT model computes what its integer export computes; call it before QAT (or at least
    before evaluating the float model). Returns the number of quantizers switched. Why: docs/deploy.md."""
    quantizers = [module for module in model.modules() if isinstance(module, DDQQuantizer)]
    for quantizer in quantizers:
        quantizer.lut_levels = enabled
    return len(quantizers)


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's leaves in registration order, checked against the supported layer graph."""
    chain = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()) and not isinstance(module, (DDQConv2d, DDQLinear)):
            continue
        if isinstance(module, DDQQuantizer):
            continue
        if isinstance(module, (DDQConv2d, DDQLinear, nn.ReLU, nn.MaxPool2d)):
            chain.append((name, module))
        elif not isinstance(module, PASSIVE_LAYERS):
            raise ValueError(f"integer export: unsupported layer {name!r} ({type(module).__name__}); supported: "
                             "DDQConv2d, DDQLinear, ReLU, MaxPool2d, Flatten, Dropout, Identity")
    if not chain or not isinstance(chain[0][1], (DDQConv2d, DDQLinear)):
        raise ValueError("integer export: the model must start with a DDQConv2d or DDQLinear layer")
    return chain


def _stages(model: nn.Module) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = []
    for name, module in _chain(model):
        if isinstance(module, (DDQConv2d, DDQLinear)):
            stages.append({"name": name, "layer": module, "relu": False, "pool": 0})
        elif isinstance(module, nn.ReLU):
            stages[-1]["relu"] = True
        else:
            kernel, stride = module.kernel_size, module.stride
            if (module.padding not in (0, (0, 0)) or module.dilation not in (1, (1, 1)) or module.ceil_mode
                    or kernel != stride or not isinstance(kernel, int) or stages[-1]["pool"]):
                raise ValueError(f"integer export: MaxPool2d {name!r} must have kernel = stride (int), no padding, "
                                 "dilation 1, floor mode, one per layer")
            stages[-1]["pool"] = kernel
    return stages


def _check_exportable(stage: dict[str, Any]) -> None:
    """Spec §5's preconditions on one layer, checked before any constant is computed: K within the int32
    accumulator's limit, both quantizers initialised, and every tensor the export reads finite (a NaN would
    otherwise become a code, a table entry or a constant that looks valid)."""
    name, layer = stage["name"], stage["layer"]
    k = layer.weight[0].numel()
    if k > MAX_K:
        raise ValueError(f"integer export: layer {name!r} sums K = {k} products per output, more than spec §5's "
                         f"int32 accumulator allows (K ≤ {MAX_K})")
    tensors = {"weight": layer.weight, "bias": layer.bias}
    for role in ("weight_quantizer", "input_quantizer"):
        quantizer = getattr(layer, role)
        if not quantizer._initialized:
            raise ValueError(f"integer export: layer {name!r}: {role} was never run on data; run the model on a "
                             "batch first")
        tensors |= {f"{role}.{parameter}": value for parameter, value in quantizer.named_parameters()}
        lo, hi = quantizer.range()
        tensors |= {f"{role} range lo": lo, f"{role} range hi": hi, f"{role} levels": quantizer.levels()}
    for tensor_name, value in tensors.items():
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(f"integer export: layer {name!r}: {tensor_name} has non-finite values (NaN or ±inf)")


def _levels64(quantizer: DDQQuantizer) -> np.ndarray:
    return quantizer.levels().detach().cpu().to(torch.float64).numpy()


def _activation_lut(quantizer: DDQQuantizer) -> tuple[np.ndarray, float]:
    """Spec §5: lut_x = round(V_x/s_x), uint8 with s_x = max V_x/255 when all levels are ≥ 0, else int8."""
    levels = _levels64(quantizer)[0]
    top = float(np.abs(levels).max())
    # An unsigned grid's zero level can come out of float32 arithmetic as −1e−9·h; it is 0.
    if bool((levels >= -1e-6 * top).all()):
        scale = float(levels.max()) / 255 if levels.max() > 0 else 1.0
        return round_half_away(np.maximum(levels, 0) / scale).astype(np.uint8), scale
    scale = top / 127
    return round_half_away(levels / scale).astype(np.int8), scale


def _weight_lut(quantizer: DDQQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """Spec §5: lut_w[n, c] = round(V_w[n, c]/s_w[n]) with s_w[n] = max_c |V_w[n, c]|/127."""
    levels = _levels64(quantizer)
    scale = np.abs(levels).max(axis=1) / 127
    scale = np.where(scale > 0, scale, 1.0)
    return round_half_away(levels / scale[:, None]).astype(np.int8), scale


def _fine_index_of_zero(quantizer: DDQQuantizer) -> int:
    """The next quantizer's fine index of 0.0, computed as the float path computes it (float32)."""
    lo, hi = quantizer.range()
    zero = torch.zeros(1, 1, device=lo.device)
    return int(qm.fine_index(zero, lo.detach(), hi.detach())[1].item())


def _requantization(name: str, ratio: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Spec §5: the largest shift ≤ 61 keeping every mult < 2^30 and every |offset| < 2^61."""
    for shift in range(MAX_SHIFT, 0, -1):
        mult = round_half_away(ratio * 2.0**shift)
        scaled_offset = round_half_away(offset * 2.0**shift)
        if mult.max() < MAX_MULT and np.abs(scaled_offset).max() < MAX_OFFSET:
            return mult.astype(np.int32), scaled_offset.astype(np.int64), shift
    raise ValueError(f"integer export: layer {name!r}: no shift in 1..61 keeps mult < 2^30 and |offset| < 2^61 "
                     f"(largest ratio {ratio.max():.3g}, largest offset {np.abs(offset).max():.3g} fine steps)")


def _conv_geometry(layer: DDQConv2d) -> dict[str, Any]:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ValueError(f"integer export: only numeric zero padding is supported, got {layer.padding!r}/"
                         f"{layer.padding_mode!r}")
    return {"in_channels": layer.in_channels, "kernel": list(layer.kernel_size), "stride": list(layer.stride),
            "padding": list(layer.padding), "dilation": list(layer.dilation), "groups": layer.groups}


def _export_layer(stage: dict[str, Any], next_quantizer: Optional[DDQQuantizer]) -> ExportedLayer:
    layer = stage["layer"]
    lut_w, s_w = _weight_lut(layer.weight_quantizer)
    lut_x, s_x = _activation_lut(layer.input_quantizer)
    codes_w = layer.weight_quantizer.codes(layer.weight.detach()).reshape(layer.weight.shape[0], -1).cpu().numpy()
    n, k = codes_w.shape
    bias = (layer.bias.detach().cpu().to(torch.float64).numpy() if layer.bias is not None else np.zeros(n))
    is_conv = isinstance(layer, DDQConv2d)
    pad_code = 0
    if is_conv and any(layer.padding):
        zero_codes = np.flatnonzero(lut_x.astype(np.int32) == 0)
        if zero_codes.size == 0:
            raise ValueError(f"integer export: {stage['name']!r} pads with zeros but 0 is not an activation level "
                             "of its input quantizer (use an unsigned/auto quantizer after a ReLU)")
        pad_code = int(zero_codes[0])
    common = dict(kind="conv2d" if is_conv else "linear", name=stage["name"], out_features=n, k=k,
                  bits_x=layer.input_quantizer.bits, bits_w=layer.weight_quantizer.bits, relu=stage["relu"],
                  pool=stage["pool"], codes_w=codes_w, lut_w=lut_w, lut_x=lut_x,
                  conv=_conv_geometry(layer) if is_conv else {}, pad_code=pad_code)
    if next_quantizer is None:
        if stage["relu"] or stage["pool"]:
            raise ValueError("integer export: the last layer must produce logits (no ReLU or pooling after it)")
        zeros = np.zeros(n)
        return ExportedLayer(**common, bits_out=8, shift=1, last=True, mult=zeros.astype(np.int32),
                             offset=zeros.astype(np.int64), i_min=zeros.astype(np.int32), scale=s_w * s_x, bias=bias)
    lo, hi = (t.detach().cpu().to(torch.float64).numpy()[0] for t in next_quantizer.range())
    delta = (hi - lo) / qm.FINE_MAX
    mult, offset, shift = _requantization(stage["name"], s_w * s_x / delta, (bias - lo) / delta)
    i_min = _fine_index_of_zero(next_quantizer) if stage["relu"] else 0
    return ExportedLayer(**common, bits_out=next_quantizer.bits, shift=shift, last=False, mult=mult, offset=offset,
                         i_min=np.full(n, i_min, dtype=np.int32))


@dataclass
class IntegerModel:
    """An exported model: input quantizer constants and integer layers (spec §5)."""

    input_lo: np.ndarray
    input_hi: np.ndarray
    input_bits: int
    layers: list[ExportedLayer]

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module) -> "IntegerModel":
        stages = _stages(model)
        for stage in stages:
            _check_exportable(stage)
        quantizers = [stage["layer"].input_quantizer for stage in stages]
        layers = [_export_layer(stage, quantizers[i + 1] if i + 1 < len(stages) else None)
                  for i, stage in enumerate(stages)]
        lo, hi = (t.detach().cpu().to(torch.float32).numpy() for t in quantizers[0].range())
        return cls(lo, hi, quantizers[0].bits, layers)

    def input_codes(self, x: Union[Tensor, np.ndarray]) -> np.ndarray:
        """Spec §2 steps 1–2 of the first quantizer on the host (float32, as the QAT model computes them).

        Raises ValueError for NaN or ±inf input: the fine index sends them to an end code, which the integer
        layers would turn into finite, confident logits where the float model gives NaN."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x).detach().cpu()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            first = tuple(int(i) for i in torch.nonzero(~finite)[0])
            raise ValueError(f"integer model input has {int((~finite).sum())} non-finite values (NaN or ±inf), "
                             f"the first at index {first} of shape {tuple(x.shape)}")
        _, index = qm.fine_index(x.to(torch.float32).reshape(1, -1), torch.from_numpy(self.input_lo),
                                 torch.from_numpy(self.input_hi))
        return (index >> (qm.FINEST_BITS - self.input_bits)).to(torch.uint8).reshape(x.shape).numpy()

    def run(self, x: Union[Tensor, np.ndarray], backend: str = "numpy") -> "IntegerRun":
        """Float input → input codes → integer layers → float logits, with every layer's output codes."""
        codes = self.input_codes(x)
        layer_codes = [codes]
        acc = np.zeros(0, dtype=np.int32)
        for layer in self.layers:
            acc, codes = _run_layer(layer, codes, backend)
            if not layer.last:
                layer_codes.append(codes)
        return IntegerRun(_logits(self.layers[-1], acc), layer_codes, acc)


def _logits(last: ExportedLayer, acc: np.ndarray) -> np.ndarray:
    """Spec §5: logits = acc·s_w·s_x + bias per output channel, on axis 1 of a linear (B, N) or a conv
    (B, N, H, W) acc."""
    per_channel = (1, -1) + (1,) * (acc.ndim - 2)
    logits = acc.astype(np.float64) * last.scale.reshape(per_channel) + last.bias.reshape(per_channel)
    return logits.astype(np.float32)


@dataclass
class IntegerRun:
    """What `IntegerModel.run` returns: logits, the codes entering each layer, and the last layer's acc."""

    logits: np.ndarray
    codes: list[np.ndarray]
    acc: np.ndarray


# ------------------------------------------------------------------------------------------ execution

def im2col(codes: np.ndarray, conv: dict[str, Any], pad_code: int) -> tuple[np.ndarray, int, int]:
    """Codes (B, C, H, W) → (B·OH·OW, C·kh·kw) in the weight's (c, i, j) order; padding uses pad_code."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv["kernel"], conv["stride"], conv["padding"], conv["dilation"]
    padded = np.pad(codes, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_code)
    batch, channels, height, width = padded.shape
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"input of spatial size {codes.shape[2:]} is smaller than the convolution kernel")
    cols = np.empty((batch, out_h, out_w, channels, kh, kw), dtype=codes.dtype)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
            cols[:, :, :, :, i, j] = window.transpose(0, 2, 3, 1)
    return cols.reshape(batch * out_h * out_w, channels * kh * kw), out_h, out_w


def max_pool_codes(codes: np.ndarray, size: int) -> np.ndarray:
    """MaxPool2d(size) (floor mode) on codes: commutes with the monotone code map."""
    batch, channels, height, width = codes.shape
    cropped = codes[:, :, : height // size * size, : width // size * size]
    return cropped.reshape(batch, channels, height // size, size, width // size, size).max(axis=(3, 5))


def _prepared_c(layer: ExportedLayer, args: GemmArgs, cols: slice):
    from ddq.deploy import c_backend

    key = (cols.start, cols.stop)
    cached = layer.prepared_c.get(key)
    if cached is None or not (np.array_equal(cached[0], args.codes_w) and np.array_equal(cached[1], args.lut_w)):
        cached = (args.codes_w.copy(), args.lut_w.copy(), c_backend.PreparedWeights(args.codes_w, args.lut_w))
        layer.prepared_c[key] = cached
    return cached[2]


def _gemm(layer: ExportedLayer, rows: np.ndarray, cols: slice, backend: str) -> tuple[np.ndarray, np.ndarray]:
    if backend == "c":
        from ddq.deploy import c_backend

        args = check_int_gemm_args(rows, layer.lut_x, layer.codes_w[cols], layer.lut_w[cols], layer.mult[cols],
                                   layer.offset[cols], layer.shift, layer.i_min[cols], layer.bits_out)
        return c_backend.int_gemm_prepared(args, _prepared_c(layer, args, cols))
    return int_gemm(rows, layer.lut_x, layer.codes_w[cols], layer.lut_w[cols], layer.mult[cols], layer.offset[cols],
                    layer.shift, layer.i_min[cols], layer.bits_out, backend=backend)


def _run_layer(layer: ExportedLayer, codes: np.ndarray, backend: str) -> tuple[np.ndarray, np.ndarray]:
    if layer.kind == "linear":
        rows = np.ascontiguousarray(codes.reshape(codes.shape[0], -1))
        if rows.shape[1] != layer.k:
            raise ValueError(f"layer {layer.name!r} expects {layer.k} input features, got {rows.shape[1]}")
        return _gemm(layer, rows, slice(None), backend)
    if codes.ndim != 4 or codes.shape[1] != layer.conv["in_channels"]:
        raise ValueError(f"layer {layer.name!r} expects (B, {layer.conv['in_channels']}, H, W) input, got {codes.shape}")
    groups = layer.conv["groups"]
    in_per_group = codes.shape[1] // groups
    out_per_group = layer.out_features // groups
    accs, outs = [], []
    for g in range(groups):
        cols, out_h, out_w = im2col(codes[:, g * in_per_group:(g + 1) * in_per_group], layer.conv, layer.pad_code)
        acc, out = _gemm(layer, cols, slice(g * out_per_group, (g + 1) * out_per_group), backend)
        accs.append(acc)
        outs.append(out)
    batch = codes.shape[0]
    acc = np.concatenate(accs, axis=1).reshape(batch, out_h, out_w, -1).transpose(0, 3, 1, 2)
    out = np.concatenate(outs, axis=1).reshape(batch, out_h, out_w, -1).transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out)
    if layer.pool:
        out = max_pool_codes(out, layer.pool)
    return acc, out


# ------------------------------------------------------------------------------------------ file format

def _to_tensors(model: IntegerModel) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors = {"input.lo": model.input_lo.astype(np.float32), "input.hi": model.input_hi.astype(np.float32)}
    for i, layer in enumerate(model.layers):
        tensors |= {f"layers.{i}.packed_w": pack(layer.codes_w, layer.bits_w), f"layers.{i}.lut_w": layer.lut_w,
                    f"layers.{i}.lut_x": layer.lut_x, f"layers.{i}.mult": layer.mult,
                    f"layers.{i}.offset": layer.offset, f"layers.{i}.i_min": layer.i_min}
        if layer.last:
            tensors |= {f"layers.{i}.scale": layer.scale, f"layers.{i}.bias": layer.bias}
    description = {"format": FORMAT, "version": VERSION, "input_bits": model.input_bits,
                   "layers": [layer.describe() for layer in model.layers]}
    return tensors, {METADATA_KEY: json.dumps(description)}


def export_bytes(model: nn.Module) -> bytes:
    """The export file's bytes (see `export`)."""
    from safetensors.numpy import save

    tensors, metadata = _to_tensors(IntegerModel.from_model(model))
    return save(tensors, metadata=metadata)


def export(model: nn.Module, path: Union[str, Path]) -> IntegerModel:
    """Spec §5: write a trained DDQ model as a safetensors file (packed weight codes, LUTs, scales,
    requantisation constants; layer graph and bits in the JSON metadata). Returns the integer model.

    The bytes are checked by `load_bytes` before anything is written, and written atomically: a model
    that cannot be exported raises and leaves path as it was, never a partial or invalid file."""
    data = export_bytes(model)
    integer = load_bytes(data, str(path))
    write_atomically(Path(path), lambda handle: handle.write(data))
    return integer


class ExportFileError(ValueError):
    """An export file is truncated, corrupt or inconsistent."""


def _expect(tensors: dict[str, np.ndarray], name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise ExportFileError(f"missing tensor {name!r}")
    array = tensors[name]
    if array.dtype.name not in dtypes or array.shape != shape:
        raise ExportFileError(f"tensor {name!r} is {array.dtype}{list(array.shape)}, expected "
                              f"{'/'.join(dtypes)}{list(shape)}")
    return array


def _int_field(entry: dict[str, Any], key: str, low: int, high: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ExportFileError(f"layer field {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _conv_field(entry: dict[str, Any], out_features: int) -> dict[str, Any]:
    conv = entry.get("conv")
    if not isinstance(conv, dict):
        raise ExportFileError("conv2d layer without its geometry")
    for key in ("kernel", "stride", "padding", "dilation"):
        pair = conv.get(key)
        low = 0 if key == "padding" else 1
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and low <= v <= 1024 for v in pair)):
            raise ExportFileError(f"conv field {key!r} must be two integers ≥ {low}, got {pair!r}")
    groups = _int_field(conv, "groups", 1, 1 << 20)
    in_channels = _int_field(conv, "in_channels", 1, 1 << 20)
    if in_channels % groups or out_features % groups:
        raise ExportFileError("conv groups must divide in_channels and out_features")
    return conv


def _layer_from(entry: Any, index: int, tensors: dict[str, np.ndarray], last_index: int) -> ExportedLayer:
    if not isinstance(entry, dict) or entry.get("kind") not in ("conv2d", "linear"):
        raise ExportFileError(f"layer {index}: not a conv2d/linear description")
    n = _int_field(entry, "out_features", 1, 1 << 24)
    k = _int_field(entry, "k", 1, MAX_K)
    bits_x, bits_w = _int_field(entry, "bits_x", 1, 8), _int_field(entry, "bits_w", 1, 8)
    bits_out, shift = _int_field(entry, "bits_out", 1, 8), _int_field(entry, "shift", 1, MAX_SHIFT)
    pool = _int_field(entry, "pool", 0, 1024)
    last = entry.get("last") is True
    if last != (index == last_index):
        raise ExportFileError(f"layer {index}: only the final layer may (and must) be marked last")
    prefix = f"layers.{index}."
    packed = _expect(tensors, prefix + "packed_w", ("uint8",), (n, packed_row_bytes(k, bits_w)))
    lut_x_dtype = entry.get("lut_x_dtype")
    if lut_x_dtype not in ("int8", "uint8"):
        raise ExportFileError(f"layer {index}: lut_x dtype must be int8 or uint8, got {lut_x_dtype!r}")
    layer = ExportedLayer(
        kind=entry["kind"], name=str(entry.get("name", index)), out_features=n, k=k, bits_x=bits_x, bits_w=bits_w,
        bits_out=bits_out, shift=shift, relu=entry.get("relu") is True, pool=pool, last=last,
        codes_w=unpack(packed, bits_w, k),
        lut_w=_expect(tensors, prefix + "lut_w", ("int8",), (n, 1 << bits_w)),
        lut_x=_expect(tensors, prefix + "lut_x", (lut_x_dtype,), (1 << bits_x,)),
        mult=_expect(tensors, prefix + "mult", ("int32",), (n,)),
        offset=_expect(tensors, prefix + "offset", ("int64",), (n,)),
        i_min=_expect(tensors, prefix + "i_min", ("int32",), (n,)),
        conv=_conv_field(entry, n) if entry["kind"] == "conv2d" else {},
        pad_code=_int_field(entry, "pad_code", 0, (1 << bits_x) - 1),
    )
    if layer.kind == "conv2d":
        conv = layer.conv
        if k != conv["in_channels"] // conv["groups"] * conv["kernel"][0] * conv["kernel"][1]:
            raise ExportFileError(f"layer {index}: K = {k} does not match the convolution geometry")
    if last:
        layer.scale = _expect(tensors, prefix + "scale", ("float64",), (n,))
        layer.bias = _expect(tensors, prefix + "bias", ("float64",), (n,))
    _check_values(layer, index)
    return layer


def _check_values(layer: ExportedLayer, index: int) -> None:
    """Spec §5's value ranges, so that a tampered file fails here and not later (or never) in `run`: the
    requantisation constants as `int_gemm` checks them, positive finite logit scales, finite biases, and a
    padded convolution's pad_code on a zero activation level."""
    where = f"layer {index} ({layer.name!r})"
    try:
        check_requantization(layer.mult, layer.offset, layer.shift, layer.i_min, layer.bits_out)
    except ValueError as error:
        raise ExportFileError(f"{where}: {error}") from None
    if layer.last and not (np.isfinite(layer.scale).all() and (layer.scale > 0).all()):
        raise ExportFileError(f"{where}: scale must be finite and positive (s_w·s_x), got {layer.scale}")
    if layer.last and not np.isfinite(layer.bias).all():
        raise ExportFileError(f"{where}: bias has non-finite values (NaN or ±inf): {layer.bias}")
    if layer.kind == "conv2d" and any(layer.conv["padding"]) and layer.lut_x[layer.pad_code] != 0:
        raise ExportFileError(f"{where}: pad_code {layer.pad_code} selects lut_x entry {layer.lut_x[layer.pad_code]}, "
                              "but zero padding needs the code of the activation level 0")


def load_bytes(data: bytes, source: str = "<bytes>") -> IntegerModel:
    """Parse an export file's bytes; every inconsistency raises ExportFileError naming the problem."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_tensors

    try:
        tensors = load_tensors(data)
        header_length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + header_length])
        description = json.loads(header.get("__metadata__", {}).get(METADATA_KEY, "null"))
    except (SafetensorError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise ExportFileError(f"{source}: truncated or corrupt export file ({error})") from None
    try:
        if not isinstance(description, dict) or description.get("format") != FORMAT:
            raise ExportFileError(f"not a {FORMAT} export (metadata key {METADATA_KEY!r} missing or wrong)")
        if description.get("version") != VERSION:
            raise ExportFileError(f"unsupported version {description.get('version')!r} (this reader knows {VERSION})")
        entries = description.get("layers")
        if not isinstance(entries, list) or not entries:
            raise ExportFileError("no layers")
        layers = [_layer_from(entry, i, tensors, len(entries) - 1) for i, entry in enumerate(entries)]
        for before, after in zip(layers, layers[1:]):
            if before.bits_out != after.bits_x:
                raise ExportFileError(f"layer {after.name!r} reads {after.bits_x}-bit codes but receives {before.bits_out}")
        input_bits = _int_field(description, "input_bits", 1, 8)
        if input_bits != layers[0].bits_x:
            raise ExportFileError("input bits differ from the first layer's activation bits")
        lo = _expect(tensors, "input.lo", ("float32",), (1,))
        hi = _expect(tensors, "input.hi", ("float32",), (1,))
        if not (np.isfinite(lo).all() and np.isfinite(hi).all() and hi[0] > lo[0]):
            raise ExportFileError("input range must be finite with hi > lo")
    except ExportFileError as error:
        raise ExportFileError(f"{source}: {error}") from None
    except ValueError as error:
        raise ExportFileError(f"{source}: corrupt export file ({error})") from None
    return IntegerModel(lo, hi, input_bits, layers)


def load(path: Union[str, Path]) -> IntegerModel:
    """Read an export file written by `export`; raises ExportFileError when it is truncated or corrupt."""
    return load_bytes(Path(path).read_bytes(), str(path))


def _as_integer_model(model_or_path: Union[nn.Module, IntegerModel, str, Path]) -> IntegerModel:
    if isinstance(model_or_path, IntegerModel):
        return model_or_path
    if isinstance(model_or_path, nn.Module):
        return load_bytes(export_bytes(model_or_path))
    return load(model_or_path)


def _batches(images: Any, batch_size: int):
    images = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        yield start, images[start: start + batch_size]


def integer_predictions(model_or_path: Union[nn.Module, IntegerModel, str, Path], images: Any, backend: str = "c",
                        batch_size: int = 500) -> np.ndarray:
    """Argmax of the integer model's logits for every image."""
    model = _as_integer_model(model_or_path)
    return np.concatenate([model.run(batch, backend=backend).logits.argmax(axis=1)
                           for _, batch in _batches(images, batch_size)])


def integer_accuracy(model_or_path: Union[nn.Module, IntegerModel, str, Path], images: Any, labels: Any,
                     backend: str = "c", batch_size: int = 500) -> float:
    """Accuracy of the exported integer model (spec §5) on (images, labels): a DDQ model (exported in
    memory), an IntegerModel, or the path of an export file."""
    labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    predictions = integer_predictions(model_or_path, images, backend, batch_size)
    return float((predictions == labels.reshape(-1)).mean())


@torch.no_grad()
def float_agreement(model: nn.Module, images: Any, backend: str = "c", batch_size: int = 500) -> float:
    """Fraction of images on which the integer model's argmax equals the float QAT model's."""
    model.eval()
    device = next(model.parameters()).device
    integer = integer_predictions(model, images, backend, batch_size)
    floats = np.concatenate([model(torch.from_numpy(batch).to(device)).argmax(dim=1).cpu().numpy()
                             for _, batch in _batches(images, batch_size)])
    return float((integer == floats).mean())
