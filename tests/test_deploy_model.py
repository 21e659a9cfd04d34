"""Spec §5 end to end: export a trained DDQ SmallCNN, reload it, run it with integer layers on every
backend, and compare with the float QAT model; corrupt files get clear errors in Python and in C."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from deploy_fixtures import rewrite_metadata, single_threaded, trained_ddq_cnn  # noqa: E402

from ddq.deploy import export, integer_accuracy, load  # noqa: E402
from ddq.deploy.export import ExportFileError, export_bytes, float_agreement, load_bytes  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return single_threaded(trained_ddq_cnn)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, _, _ = trained
    path = tmp_path_factory.mktemp("export") / "cnn.safetensors"
    export(model, path)
    return path


def test_file_round_trip_and_layer_graph(trained, exported):
    model, images, _ = trained
    integer = load(exported)
    assert [layer.kind for layer in integer.layers] == ["conv2d", "conv2d", "conv2d", "linear"]
    assert [layer.pool for layer in integer.layers] == [2, 2, 2, 0]
    assert [layer.relu for layer in integer.layers] == [True, True, True, False]
    assert [layer.bits_w for layer in integer.layers] == [8, 4, 4, 8]
    direct = load_bytes(export_bytes(model))
    np.testing.assert_array_equal(integer.run(images[:8]).logits, direct.run(images[:8]).logits)


def test_input_codes_match_the_first_quantizer(trained, exported):
    model, images, _ = trained
    integer = load(exported)
    want = model.features[0].input_quantizer.codes(images[:16]).numpy()
    np.testing.assert_array_equal(integer.input_codes(images[:16]), want)


def test_integer_model_agrees_with_the_float_qat_model(trained, exported):
    model, images, labels = trained
    agreement = float_agreement(model, images, backend="c")
    assert agreement >= 0.995, f"integer argmax agrees with float QAT on only {agreement:.2%} of test digits"
    with torch.no_grad():
        float_accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert abs(integer_accuracy(exported, images, labels, backend="c") - float_accuracy) <= 0.005


def test_backends_give_identical_codes_at_every_layer(exported, trained):
    _, images, _ = trained
    integer = load(exported)
    golden = integer.run(images[:64], backend="numpy")
    runs = {"c": integer.run(images[:64], backend="c"), "triton": integer.run(images[:3], backend="triton")}
    for name, run in runs.items():
        batch = run.logits.shape[0]
        for layer, (got, want) in enumerate(zip(run.codes, golden.codes)):
            np.testing.assert_array_equal(got, want[:batch], err_msg=f"{name} layer {layer}")
        np.testing.assert_array_equal(run.acc, golden.acc[:batch])
        np.testing.assert_array_equal(run.logits, golden.logits[:batch])


def test_truncated_and_corrupt_files_get_clear_errors(exported, tmp_path):
    from ddq.deploy import c_backend

    data = exported.read_bytes()
    names = [f"layers.{i}.{field}" for i in range(4) for field in ("packed_w", "lut_w", "mult")]
    header_length = int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8, 8 + header_length // 2, 8 + header_length, len(data) - 1):
        with pytest.raises(ExportFileError, match="truncated or corrupt"):
            load_bytes(data[:cut])
        with pytest.raises(c_backend.ArmRefError, match="truncated|corrupt"):
            c_backend.check_file(data[:cut], names)
    rng = np.random.default_rng(0)
    for _ in range(200):
        corrupt = bytearray(data)
        for position in rng.integers(0, 8 + header_length, 3):
            corrupt[position] = int(rng.integers(0, 256))
        for reader in (lambda blob: load_bytes(blob), lambda blob: c_backend.check_file(blob, names)):
            try:
                reader(bytes(corrupt))
            except (ExportFileError, c_backend.ArmRefError):
                pass


@pytest.mark.parametrize("edit, message", [
    (lambda d, h: d.update(format="other"), "not a ddq-integer export"),
    (lambda d, h: d.update(version=99), "unsupported version"),
    (lambda d, h: d["layers"][1].update(bits_x=9), "bits_x"),
    (lambda d, h: d["layers"][1].update(bits_w=2), "packed_w"),
    (lambda d, h: d["layers"][2].update(k=10), "packed_w|K"),
    (lambda d, h: d["layers"][3].update(last=False), "last"),
    (lambda d, h: d["layers"][0].update(lut_x_dtype="float32"), "lut_x dtype"),
    (lambda d, h: h.update({"renamed": h.pop("layers.0.mult")}), "missing tensor 'layers.0.mult'"),
    (lambda d, h: h["layers.0.lut_w"].update(dtype="U8"), "lut_w"),
])
def test_inconsistent_files_get_clear_errors(exported, edit, message):
    with pytest.raises(ExportFileError, match=message):
        load_bytes(rewrite_metadata(exported.read_bytes(), edit))


def test_unsupported_models_are_rejected():
    from ddq.nn import DDQLinear

    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unsupported layer"):
        export_bytes(plain)
    fresh = torch.nn.Sequential(DDQLinear(4, 4))
    with pytest.raises(ValueError, match="never run on data"):
        export_bytes(fresh)
