"""Export refuses what spec §5 cannot represent, naming the layer, before anything is written: non-finite
weights, biases or quantizer state, K beyond the int32 accumulator's limit; and `export` never leaves a
partial or invalid file."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from deploy_fixtures import tiny_mlp  # noqa: E402

from ddq.deploy import MAX_K, export, load  # noqa: E402
from ddq.nn import DDQLinear  # noqa: E402

export_module = importlib.import_module("ddq.deploy.export")  # the package re-exports a function of that name
NAN, INF = float("nan"), float("inf")


def set_weight(value):
    return lambda model: model[0].weight.__setitem__((1, 2), value)


NON_FINITE_STATE = [
    ("NaN weight", set_weight(NAN), "'0'", "weight"),
    ("inf weight", set_weight(INF), "'0'", "weight"),
    ("-inf weight", set_weight(-INF), "'0'", "weight"),
    ("NaN weight range", lambda m: m[0].weight_quantizer.range_top.__setitem__(0, NAN), "'0'",
     "weight_quantizer.range_top"),
    ("inf weight range", lambda m: m[0].weight_quantizer.range_top.__setitem__(0, INF), "'0'",
     "weight_quantizer.range_top"),
    ("NaN weight residual", lambda m: m[0].weight_quantizer.residuals.__setitem__((0, 5), NAN), "'0'",
     "weight_quantizer.residuals"),
    ("NaN activation residual", lambda m: m[2].input_quantizer.residuals.__setitem__((0, 9), NAN), "'2'",
     "input_quantizer.residuals"),
    ("NaN gate logit", lambda m: m[0].weight_quantizer.gate_logits.__setitem__(7, NAN), "'0'",
     "weight_quantizer.gate_logits"),
    ("NaN hidden bias", lambda m: m[0].bias.__setitem__(0, NAN), "'0'", "bias"),
    ("NaN last bias", lambda m: m[2].bias.__setitem__(1, NAN), "'2'", "bias"),
    ("inf last bias", lambda m: m[2].bias.__setitem__(1, -INF), "'2'", "bias"),
    ("NaN next-quantizer range", lambda m: m[2].input_quantizer.range_top.fill_(NAN), "'2'",
     "input_quantizer.range_top"),
    ("inf input range", lambda m: m[0].input_quantizer.range_top.fill_(INF), "'0'", "input_quantizer.range_top"),
    ("range overflowing float32", lambda m: m[0].input_quantizer.range_top.fill_(3e38), "'0'",
     "input_quantizer levels"),
]


@pytest.mark.parametrize("mutate, layer, tensor", [case[1:] for case in NON_FINITE_STATE],
                         ids=[case[0] for case in NON_FINITE_STATE])
def test_non_finite_state_is_rejected_naming_layer_and_tensor(mutate, layer, tensor, tmp_path):
    model = tiny_mlp()
    with torch.no_grad():
        mutate(model)
    message = rf"layer {layer}: {tensor} has non-finite values"
    with pytest.raises(ValueError, match=message):
        export_module.IntegerModel.from_model(model)
    with pytest.raises(ValueError, match=message):
        export_module.export_bytes(model)
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match=message):
        export(model, path)
    assert list(tmp_path.iterdir()) == []


def wide_model(k: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), DDQLinear(k, 2, weight_bits=4, act_bits=4))
    with torch.no_grad():
        model(torch.randn(4, k))
    return model.eval()


def test_k_beyond_the_accumulator_limit_is_rejected_before_writing(tmp_path):
    model = wide_model(MAX_K + 1)
    message = rf"layer '1' sums K = {MAX_K + 1} products per output.*K ≤ {MAX_K}"
    with pytest.raises(ValueError, match=message):
        export_module.IntegerModel.from_model(model)
    with pytest.raises(ValueError, match=message):
        export_module.export_bytes(model)
    path = tmp_path / "wide.safetensors"
    with pytest.raises(ValueError, match=message):
        export(model, path)
    assert list(tmp_path.iterdir()) == []


def test_k_at_the_limit_exports():
    integer = export_module.load_bytes(export_module.export_bytes(wide_model(MAX_K)))
    assert integer.layers[0].k == MAX_K


def test_a_failed_export_leaves_the_previous_file_untouched(tmp_path):
    path = tmp_path / "model.safetensors"
    export(tiny_mlp(), path)
    before = path.read_bytes()
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = NAN
    with pytest.raises(ValueError, match="non-finite"):
        export(model, path)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]


def test_an_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(tiny_mlp(), path)
    assert path.read_bytes() == b"previous"
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]


def test_export_writes_a_file_that_loads(tmp_path):
    path = tmp_path / "model.safetensors"
    returned = export(tiny_mlp(), path)
    x = torch.rand(3, 6)
    assert (load(path).run(x).logits == returned.run(x).logits).all()
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]
