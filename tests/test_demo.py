"""The demo end to end on a small slice of the real MNIST digits: every run, the table, JSON and plot."""

import json

import numpy as np
import pytest
import torch

from ddq import demo
from ddq.data import load_dataset, mnist_5k


def test_mnist_split_is_fixed_and_balanced_enough():
    train_x, train_y, test_x, test_y = mnist_5k()
    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)
    assert train_x.dtype == np.uint8 and set(np.unique(test_y)) == set(range(10))
    again = mnist_5k()
    assert np.array_equal(again[3], test_y)


def reject_non_standard_json(constant: str):
    raise ValueError(f"{constant} is not standard JSON")


def test_demo_runs_every_configuration(tmp_path, monkeypatch):
    train_x, train_y, test_x, test_y = mnist_5k()
    monkeypatch.setattr(demo, "load_dataset", lambda name, data_dir=None: (train_x[:1000], train_y[:1000], test_x[:200], test_y[:200]))
    settings = demo.parse_args(["--fp-epochs", "2", "--qat-epochs", "1", "--seeds", "2", "--out", str(tmp_path), "--no-progress"])
    report = demo.run_demo(settings)
    table = report["summary"]["table"]
    assert set(table) == set(demo.RUNS)
    assert table["ddq_w2a2"]["avg_weight_bits"] == 2.0 and table["lsq_w4a4"]["avg_act_bits"] < 8
    assert set(report["summary"]["paired"]) == {"ddq_w4a4 - lsq_w4a4", "ddq_w2a2 - lsq_w2a2", "ddq_mixed - ddq_w4a4"}
    assert all(0.0 <= r["accuracy"] <= 100.0 for r in report["results"])
    assert table["fp"]["accuracy_mean"] > 50.0, "two epochs on 1,000 digits learn something"
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=reject_non_standard_json)
    assert len(saved["results"]) == 2 * len(demo.RUNS)
    integer = {name: row["integer_accuracy_mean"] for name, row in saved["summary"]["table"].items()}
    assert integer["fp"] is None and integer["lsq_w4a4"] is None, "no integer model: null, not NaN"
    assert all(0.0 <= integer[name] <= 100.0 for name in ("ddq_w4a4", "ddq_mixed", "ddq_w2a2"))
    assert (tmp_path / "bits_per_layer.png").stat().st_size > 1000


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="data-dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_dataset("cifar10", "/nonexistent")


def test_range_lr_scale_flag_reaches_the_settings_and_rejects_unknown_values(capsys):
    assert demo.parse_args([]).range_lr_scale == "width", "the measured tables' default"
    assert demo.parse_args(["--range-lr-scale", "steps"]).range_lr_scale == "steps"
    with pytest.raises(SystemExit):
        demo.parse_args(["--range-lr-scale", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--qat-epochs", "0"], "--qat-epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--fp-epochs", "-1"], "--fp-epochs must be at least 0, got -1"),
    (["--qat-epochs", "-2"], "--qat-epochs must be at least 1, got -2"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--runs", ""], "--runs must name at least one of"),
    (["--runs", "fp,bogus"], "--runs: unknown run(s) bogus; choose from"),
    (["--runs", "fp,lsq_w4a4,fp"], "--runs names fp more than once"),
    (["--data", "cifar10"], "--data cifar10 needs --data-dir"),
    (["--data", "fashion-mnist", "--data-dir", "/nonexistent"], "--data-dir '/nonexistent' is not a folder"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_settings_are_parser_errors(capsys, argv, message):
    """0 epochs or batch size used to become the defaults silently, negative values ran, and the rest were
    tracebacks or an empty table."""
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cuda_without_a_device_and_missing_data_files_are_named(tmp_path, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            demo.parse_args(["--device", "cuda"])
        assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="python -m ddq.demo: error: Fashion-MNIST files missing under"):
        demo.main(["--data", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit, match="--out .* cannot be a folder"):
        demo.main(["--out", str(tmp_path / "taken"), "--no-progress"])
    assert not (tmp_path / "out").exists(), "nothing written before the data is there"


def test_zero_fp_epochs_fine_tune_the_untrained_network(tmp_path, monkeypatch):
    """--fp-epochs 0 is kept (it used to become the default): every run starts from the seed's untrained CNN."""
    train_x, train_y, test_x, test_y = mnist_5k()
    split = (train_x[:200], train_y[:200], test_x[:100], test_y[:100])
    monkeypatch.setattr(demo, "load_dataset", lambda name, data_dir=None: split)
    settings = demo.parse_args(["--fp-epochs", "0", "--qat-epochs", "1", "--runs", "fp", "--out", str(tmp_path), "--no-progress"])
    assert settings.fp_epochs == 0
    data = demo.Dataset(split, torch.device("cpu"))
    torch.manual_seed(0)
    untrained = demo.SmallCNN(data.channels, 10, settings.width, data.image_size)
    report = demo.run_demo(settings)
    assert report["results"][0]["accuracy_at_init"] == demo.accuracy(untrained, data.test_x, data.test_y)


def test_non_finite_numbers_become_null_in_the_results_file():
    """A diverged loss is NaN; results.json holds null there (standard JSON has no NaN)."""
    report = {"loss": float("nan"), "losses": [1.0, float("inf")], "rows": ({"accuracy": 12.5},), "run": "fp"}
    assert demo.json_ready(report) == {"loss": None, "losses": [1.0, None], "rows": [{"accuracy": 12.5}], "run": "fp"}
    assert demo.mean_or_none([80.0, None]) is None and demo.mean_or_none([80.0, 90.0]) == 85.0
    assert demo.format_or_dash(None) == "-" and demo.format_or_dash(85.0) == "85.00"
