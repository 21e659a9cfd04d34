"""`IntegerModel.run` (spec §5): a convolution as the last layer gives per-channel logits that match the
float model, and non-finite input is an error instead of confident logits."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from deploy_fixtures import tiny_mlp  # noqa: E402

from ddq.nn import DDQConv2d  # noqa: E402

export = importlib.import_module("ddq.deploy.export")  # the package re-exports a function of that name


def conv_head_model() -> nn.Module:
    """Conv(2→4, 3×3)-ReLU-Conv(4→3, 1×1): the last layer is a convolution with N = 3 output channels."""
    torch.manual_seed(0)
    model = nn.Sequential(DDQConv2d(2, 4, 3, weight_bits=5, act_bits=6), nn.ReLU(),
                          DDQConv2d(4, 3, 1, weight_bits=5, act_bits=6))
    export.use_lut_levels(model)
    with torch.no_grad():
        model(torch.rand(8, 2, 9, 9))
    return model.eval()


@pytest.mark.parametrize("height, width", [(5, 3), (4, 4), (6, 7)], ids=["W=N", "W≠N-square", "W≠N"])
@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_conv_last_layer_logits_are_per_output_channel(height, width, backend):
    if backend == "c":
        pytest.importorskip("ddq.deploy.c_backend").library_path()
    model = conv_head_model()
    x = torch.rand(2, 2, height + 2, width + 2)
    with torch.no_grad():
        want = model(x).numpy()
    run = export.IntegerModel.from_model(model).run(x, backend=backend)
    assert run.logits.shape == want.shape == (2, 3, height, width)
    # Levels on the integer tables: the two models differ only by float32 rounding (docs/deploy.md).
    np.testing.assert_allclose(run.logits, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_non_finite_input_is_an_error(value, as_tensor):
    integer = export.load_bytes(export.export_bytes(tiny_mlp()))
    x = np.zeros((4, 6), np.float32)
    x[2, 3] = value
    x = torch.from_numpy(x) if as_tensor else x
    message = r"input has 1 non-finite values \(NaN or ±inf\), the first at index \(2, 3\)"
    with pytest.raises(ValueError, match=message):
        integer.run(x)
    with pytest.raises(ValueError, match="non-finite"):
        integer.input_codes(x)
