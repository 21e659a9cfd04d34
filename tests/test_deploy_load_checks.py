"""`load` checks the values of an export file (spec §5's ranges, finite logit constants, the zero padding
code), not only its fields, dtypes and shapes: a tampered file fails at load with ExportFileError naming
the field and the layer."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from deploy_fixtures import rewrite_metadata, tiny_mlp  # noqa: E402

from ddq.nn import DDQConv2d, DDQLinear  # noqa: E402

export = importlib.import_module("ddq.deploy.export")  # the package re-exports a function of that name


@pytest.fixture(scope="module")
def exported() -> bytes:
    return export.export_bytes(tiny_mlp())


def replace_tensors(data: bytes, changes: dict[str, np.ndarray]) -> bytes:
    """The export file with some tensors replaced (same names, metadata kept)."""
    from safetensors.numpy import load as load_tensors
    from safetensors.numpy import save

    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8: 8 + header_length])["__metadata__"]
    tensors = load_tensors(data) | changes
    return save(tensors, metadata=metadata)


TAMPERED = [
    ("mult=-1", {"layers.0.mult": np.full(5, -1, np.int32)}, r"layer 0 \('0'\): mult must be in \[0, 2\^30\)"),
    ("mult=2^30", {"layers.0.mult": np.full(5, 1 << 30, np.int32)}, r"layer 0 \('0'\): mult must be in"),
    ("i_min=1000", {"layers.0.i_min": np.full(5, 1000, np.int32)}, r"layer 0 \('0'\): i_min must be in \[0, 255\]"),
    ("i_min=-1", {"layers.0.i_min": np.full(5, -1, np.int32)}, r"layer 0 \('0'\): i_min must be in"),
    ("offset=2^62", {"layers.0.offset": np.full(5, 1 << 62, np.int64)}, r"layer 0 \('0'\): offset must satisfy"),
    ("offset=-2^62", {"layers.0.offset": np.full(5, -(1 << 62), np.int64)}, r"layer 0 \('0'\): offset must satisfy"),
    ("offset=int64 min", {"layers.0.offset": np.full(5, np.iinfo(np.int64).min, np.int64)}, "offset must satisfy"),
    ("last mult=-1", {"layers.1.mult": np.full(3, -1, np.int32)}, r"layer 1 \('2'\): mult must be in"),
    ("scale=nan", {"layers.1.scale": np.full(3, np.nan)}, r"layer 1 \('2'\): scale must be finite and positive"),
    ("scale=inf", {"layers.1.scale": np.array([1e-5, np.inf, 1e-5])}, r"layer 1 \('2'\): scale must be finite"),
    ("scale=0", {"layers.1.scale": np.array([1e-5, 0.0, 1e-5])}, r"layer 1 \('2'\): scale must be finite and positive"),
    ("bias=inf", {"layers.1.bias": np.full(3, np.inf)}, r"layer 1 \('2'\): bias has non-finite values"),
    ("bias=nan", {"layers.1.bias": np.array([0.0, np.nan, 0.0])}, r"layer 1 \('2'\): bias has non-finite values"),
]


@pytest.mark.parametrize("changes, message", [case[1:] for case in TAMPERED], ids=[case[0] for case in TAMPERED])
def test_out_of_range_values_are_rejected_at_load(exported, changes, message):
    tampered = replace_tensors(exported, changes)
    with pytest.raises(export.ExportFileError, match=message):
        export.load_bytes(tampered)


def test_the_untampered_file_loads(exported):
    assert len(export.load_bytes(replace_tensors(exported, {})).layers) == 2


def test_a_pad_code_on_a_non_zero_level_is_rejected():
    torch.manual_seed(0)
    model = nn.Sequential(DDQConv2d(2, 3, 3, padding=1, weight_bits=4, act_bits=4), nn.ReLU(),
                          DDQConv2d(3, 2, 3, padding=1, weight_bits=4, act_bits=4), nn.Flatten(),
                          DDQLinear(2 * 5 * 5, 2, weight_bits=4, act_bits=4))
    with torch.no_grad():
        model(torch.rand(4, 2, 5, 5))
    data = export.export_bytes(model.eval())
    second = export.load_bytes(data).layers[1]
    assert second.lut_x[second.pad_code] == 0
    non_zero = int(np.flatnonzero(second.lut_x)[0])

    def point_at_a_non_zero_level(description, header):
        description["layers"][1]["pad_code"] = non_zero

    with pytest.raises(export.ExportFileError, match=rf"layer 1 \('2'\): pad_code {non_zero} selects lut_x entry"):
        export.load_bytes(rewrite_metadata(data, point_at_a_non_zero_level))
