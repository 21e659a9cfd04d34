"""The exported integer model computes what the float QAT model computes (spec §5), layer by layer.

A W2A2 SmallCNN with learned levels, trained with `use_lut_levels` (the demo's ddq_w2a2 configuration,
shortened): fed the float model's codes, each integer layer must return the float model's codes except
where the float value lies within float32 rounding of a code boundary, and the argmaxes must agree.
Without lut levels the int8 tables' rounding error, shared by every weight with the same code, moves
pre-activations by 0.2–0.9 fine steps and flips ~0.1–0.8 % of the codes per layer (docs/deploy.md).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from deploy_fixtures import single_threaded, trained_w2a2_cnn  # noqa: E402

from ddq.nn import DDQConv2d, DDQLinear  # noqa: E402

export = importlib.import_module("ddq.deploy.export")
FLOAT_ROUNDING_FINE_STEPS = 2e-3  # float32 conv/linear error measured ≤ 4e-4 fine steps on this model


@pytest.fixture(scope="module")
def trained():
    return single_threaded(trained_w2a2_cnn)


@pytest.fixture(scope="module")
def float_run(trained):
    """The float model's logits, and the tensor entering each layer's input quantizer."""
    model, images, _ = trained
    layers = [m for m in model.modules() if isinstance(m, (DDQConv2d, DDQLinear))]
    inputs = []
    hooks = [layer.input_quantizer.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for layer in layers]
    with torch.no_grad():
        logits = model(images)
    for hook in hooks:
        hook.remove()
    return layers, inputs, logits


def test_exported_tables_hold_the_float_levels(trained):
    model, _, _ = trained
    for layer in (m for m in model.modules() if isinstance(m, (DDQConv2d, DDQLinear))):
        lut_w, s_w = export._weight_lut(layer.weight_quantizer)
        lut_x, s_x = export._activation_lut(layer.input_quantizer)
        np.testing.assert_allclose(lut_w * s_w[:, None], export._levels64(layer.weight_quantizer), rtol=0,
                                   atol=1e-4 * s_w.max())
        np.testing.assert_allclose(lut_x * s_x, export._levels64(layer.input_quantizer)[0], rtol=0, atol=1e-4 * s_x)


def boundary_distance(x: torch.Tensor, quantizer) -> np.ndarray:
    """Float64 distance, in fine steps, from x's fine position to the nearest code boundary."""
    lo, hi = (t.detach().double().numpy()[0] for t in quantizer.range())
    position = (x.double().numpy() - lo) / ((hi - lo) / 255) + 0.5
    block = 2 ** (8 - quantizer.bits)
    return np.abs(position - block * np.clip(np.round(position / block), 1, 2**quantizer.bits - 1))


def test_each_integer_layer_reproduces_the_float_codes(trained, float_run):
    model, _, _ = trained
    layers, inputs, _ = float_run
    integer = export.IntegerModel.from_model(model)
    for index, (layer, exported) in enumerate(zip(layers[:-1], integer.layers)):
        codes_in = layer.input_quantizer.codes(inputs[index]).numpy()
        _, codes_out = export._run_layer(exported, codes_in, "numpy")
        following = layers[index + 1].input_quantizer
        want = following.codes(inputs[index + 1]).numpy()
        differ = codes_out.reshape(want.shape) != want
        near = boundary_distance(inputs[index + 1], following) < FLOAT_ROUNDING_FINE_STEPS
        assert not (differ & ~near).any(), (f"layer {index}: {int((differ & ~near).sum())} of {want.size} codes differ "
                                            "away from any code boundary")
        assert differ.sum() <= max(2, 1e-5 * want.size)


def test_integer_model_matches_the_float_model(trained, float_run):
    _, images, _ = trained
    layers, inputs, logits = float_run
    model = trained[0]
    run = export.IntegerModel.from_model(model).run(images, backend="numpy")
    for index, (layer, x) in enumerate(zip(layers, inputs)):
        differ = run.codes[index].reshape(x.shape) != layer.input_quantizer.codes(x).numpy()
        assert differ.mean() <= 1e-5, f"codes entering layer {index}: {differ.mean():.2e} differ"
    agreement = (run.logits.argmax(axis=1) == logits.argmax(dim=1).numpy()).mean()
    assert agreement >= 0.999, f"integer argmax agrees with the float model on only {agreement:.1%}"
    assert np.abs(run.logits - logits.numpy()).max() <= 1e-4 * np.abs(logits.numpy()).max()
