"""The CIFAR-10 experiment end to end on CPU with tiny generated shards and tiny networks: phases, files,
resume, time budget, augmentation, data errors, and the two networks at full size."""

import json

import numpy as np
import pytest
import torch

import ddq
from ddq.experiments import cifar10, shards
from ddq.models import MobileNetV2Cifar, ResNet20

TINY = ["--resnet-width", "4", "--mobilenet-width", "0.1", "--batch-size", "4", "--pretrain-epochs", "1", "--epochs", "1",
        "--no-progress", "--device", "cpu"]


def write_shards(folder, train=(4, 4), test=(8,), seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, counts in (("train", train), ("test", test)):
        for number, count in enumerate(counts):
            np.savez_compressed(folder / f"{split}_{number:02d}.npz", x=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                                y=rng.integers(0, 10, count).astype(np.uint8), idx=np.arange(count, dtype=np.uint16))
    return folder


def arguments(tmp_path, *extra):
    return ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), *TINY, *extra]


def test_protocol_writes_results_table_plots_and_resumes(tmp_path, capsys):
    write_shards(tmp_path / "data")
    argv = arguments(tmp_path, "--models", "resnet20", "--runs", "fp,lsq_w2a2,ddq_mixed4", "--seeds", "2")
    status = cifar10.main(argv)
    assert status["complete"] and not status["pending"]
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["models"]) == {"resnet20"}
    table = saved["models"]["resnet20"]["table"]
    assert list(table) == ["fp", "lsq_w2a2", "ddq_mixed4"]
    assert table["fp"]["seeds"] == [0] and table["lsq_w2a2"]["seeds"] == [0, 1] and table["ddq_mixed4"]["seeds"] == [0, 1]
    assert table["fp"]["avg_weight_bits"] == 32.0 and table["lsq_w2a2"]["weight_kib"] < table["fp"]["weight_kib"] / 4
    assert 2.0 < table["lsq_w2a2"]["avg_weight_bits"] < 8.0, "inner layers at 2 bits, first and last at 8"
    assert saved["models"]["resnet20"]["paired"] == {}, "no reference run to pair with"
    run = json.loads((out / "runs" / "resnet20" / "ddq_mixed4_seed1.json").read_text())
    for key in ("top1", "top1_at_init", "test_loss", "curve", "layers", "avg_weight_bits", "avg_act_bits", "weight_kib",
                "budget", "protocol", "environment"):
        assert key in run, key
    assert 0.0 <= run["top1"] <= 100.0 and len(run["curve"]) == 1 and run["environment"]["card"]
    assert {"test_top1", "train_loss", "img_s", "avg_weight_bits", "resource_strength"} <= set(run["curve"][0])
    assert saved["pretrain"]["resnet20"]["curve"][0]["epoch"] == 1 and (tmp_path / "work" / "fp_resnet20.pt").exists()
    assert "| ddq_mixed4 | 2 |" in (out / "table.md").read_text()
    for name in ("bits_resnet20.png", "curves_resnet20.png"):
        assert (out / name).stat().st_size > 5000, name
    assert not list((tmp_path / "work" / "partial").iterdir()), "finished runs leave no partial state"

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*.json")}
    capsys.readouterr()
    again = cifar10.main(argv)
    assert again["complete"]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*.json")} == stamps, "finished runs are skipped"
    assert capsys.readouterr().out.count("done earlier") == len(stamps) + 1
    assert len(json.loads((out / "results.json").read_text())["commands"]) == 2

    with pytest.raises(SystemExit, match="other settings"):
        cifar10.main(argv[:-2] + ["--epochs", "2"])


def test_time_budget_stops_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    base = arguments(tmp_path, "--models", "resnet20", "--runs", "lsq_w4a4", "--pretrain-epochs", "2")
    reference = arguments(tmp_path, "--models", "resnet20", "--runs", "lsq_w4a4", "--pretrain-epochs", "2")
    reference[reference.index("--out") + 1] = str(tmp_path / "reference")
    reference[reference.index("--work-dir") + 1] = str(tmp_path / "reference_work")
    assert cifar10.main(reference)["complete"]

    real_check = cifar10.Deadline.check
    calls = {"n": 0}
    def stop_after_first_epoch(self, needed_s=0.0):
        if needed_s > 0:  # asked before every epoch but the first: pretend the next epoch would not fit
            raise cifar10.OutOfTime
        calls["n"] += 1
        return real_check(self, needed_s)
    monkeypatch.setattr(cifar10.Deadline, "check", stop_after_first_epoch)
    stopped = cifar10.main(base + ["--time-budget-s", "1000"])
    assert not stopped["complete"] and stopped["pending"] == ["resnet20/lsq_w4a4_seed0"] and calls["n"] > 0
    assert (tmp_path / "work" / "partial" / "resnet20_pretrain.pt").exists()
    monkeypatch.setattr(cifar10.Deadline, "check", real_check)
    assert cifar10.main(base)["complete"]
    resumed = json.loads((tmp_path / "out" / "pretrain" / "resnet20.json").read_text())
    straight = json.loads((tmp_path / "reference" / "pretrain" / "resnet20.json").read_text())
    assert [r["train_loss"] for r in resumed["curve"]] == [r["train_loss"] for r in straight["curve"]]
    assert resumed["top1"] == straight["top1"]
    qat = json.loads((tmp_path / "out" / "runs" / "resnet20" / "lsq_w4a4_seed0.json").read_text())
    assert qat["top1"] == json.loads((tmp_path / "reference" / "runs" / "resnet20" / "lsq_w4a4_seed0.json").read_text())["top1"]


def test_augmentation_crops_and_flips_per_image_deterministically():
    x = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3) % 251
    images = shards.DeviceImages(x.astype(np.uint8), np.array([3, 7]), torch.device("cpu"), pad=4)
    index = torch.tensor([0, 1, 0, 1] * 8)
    first, labels = images.augmented_batch(index, torch.Generator().manual_seed(5), channels_last=False)
    second, _ = images.augmented_batch(index, torch.Generator().manual_seed(5), channels_last=False)
    assert torch.equal(first, second) and first.shape == (32, 3, 32, 32) and labels.tolist() == [3, 7] * 16
    centre, _ = images.batch(torch.tensor([0]), channels_last=False)
    raw = torch.from_numpy(x[0]).permute(2, 0, 1).float()
    assert torch.allclose(centre[0] * torch.tensor(shards.STD)[:, None, None] + torch.tensor(shards.MEAN)[:, None, None], raw, atol=1e-3)
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    views = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
    views += [v.flip(-1) for v in views]
    unnormalised = first * torch.tensor(shards.STD)[:, None, None] + torch.tensor(shards.MEAN)[:, None, None]
    for image in unnormalised[::2]:
        assert any(torch.allclose(image, v, atol=1e-3) for v in views), "every image is a padded crop, maybe flipped"
    assert len({tuple(image.flatten()[:64].round().tolist()) for image in unnormalised[::2]}) > 1, "crops differ per image"


def test_quick_subset_and_bad_data_give_clear_errors(tmp_path):
    data = write_shards(tmp_path / "data", train=(16, 16, 16))
    train_x, train_y, test_x, _ = shards.load_shards(data, train_shards=2)
    assert train_x.shape == (32, 32, 32, 3) and train_y.dtype == np.int64 and len(test_x) == 8
    with pytest.raises(shards.DataError, match="not a folder"):
        shards.load_shards(tmp_path / "missing")
    with pytest.raises(shards.DataError, match="--train-shards"):
        shards.load_shards(data, train_shards=4)
    (data / "test_00.npz").unlink()
    with pytest.raises(shards.DataError, match="no test_NN.npz"):
        shards.load_shards(data)
    np.savez(data / "test_00.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.uint8))
    with pytest.raises(shards.DataError, match=r"uint8 \[n, 32, 32, 3\]"):
        shards.load_shards(data)
    np.savez(data / "test_00.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(shards.DataError, match="lacks the key"):
        shards.load_shards(data)
    (data / "test_00.npz").write_bytes(b"not a zip")
    with pytest.raises(shards.DataError, match="cannot read shard"):
        shards.load_shards(data)
    with pytest.raises(SystemExit, match="not a folder"):
        cifar10.main(["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w"), *TINY])
    with pytest.raises(SystemExit):
        cifar10.parse_args(["--data-dir", str(data), "--runs", "ddq_w1a1"])


def test_networks_at_full_size():
    resnet, mobilenet = ResNet20(), MobileNetV2Cifar()
    assert sum(p.numel() for p in resnet.parameters()) == 269_722  # He et al. 2016: 0.27M
    x = torch.randn(2, 3, 32, 32)
    assert resnet(x).shape == (2, 10) and mobilenet(x).shape == (2, 10)
    quantized = ddq.quantize_model(mobilenet, 4, 4)
    layers = ddq.quantized_layers(quantized)
    depthwise = [layer for _, layer in layers if isinstance(layer, ddq.nn.DDQConv2d) and layer.groups == layer.in_channels > 1]
    assert len(layers) == 53 and len(depthwise) == 17
    assert [layer.weight_quantizer.bits for _, layer in (layers[0], layers[-1])] == [8, 8]
    assert isinstance(layers[-1][1], ddq.nn.DDQLinear) and quantized(x).shape == (2, 10)


def test_workers_run_the_same_protocol_in_parallel_processes(tmp_path):
    """Two worker processes (on the CPU here, one GPU each on a GPU machine) compute exactly what one process
    computes: each task is the same deterministic run, only scheduled elsewhere; QAT runs wait for their
    network's pretraining."""
    write_shards(tmp_path / "data")
    runs = ["--models", "resnet20,mobilenetv2", "--runs", "fp,ddq_w2a2", "--seeds", "1"]
    sequential = arguments(tmp_path, *runs)
    sequential[sequential.index("--out") + 1] = str(tmp_path / "sequential")
    sequential[sequential.index("--work-dir") + 1] = str(tmp_path / "sequential_work")
    assert cifar10.main(sequential)["complete"]
    status = cifar10.main(arguments(tmp_path, *runs, "--workers", "2"))
    assert status["complete"] and not status["pending"]
    for model in ("resnet20", "mobilenetv2"):
        for run in ("fp_seed0", "ddq_w2a2_seed0"):
            parallel = json.loads((tmp_path / "out" / "runs" / model / f"{run}.json").read_text())
            alone = json.loads((tmp_path / "sequential" / "runs" / model / f"{run}.json").read_text())
            assert [r["train_loss"] for r in parallel["curve"]] == [r["train_loss"] for r in alone["curve"]], (model, run)
            assert (parallel["top1"], parallel["top1_at_init"]) == (alone["top1"], alone["top1_at_init"])
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())["models"]) == {"resnet20", "mobilenetv2"}


def test_parallel_tasks_put_pretraining_first_and_make_qat_wait_for_it():
    settings = cifar10.parse_args(["--data-dir", "unused", "--models", "resnet20,mobilenetv2", "--runs", "fp,lsq_w2a2,ddq_mixed4",
                                   "--seeds", "1"])
    tasks = cifar10.parallel_tasks(settings)
    assert [t.name for t in tasks[:2]] == ["mobilenetv2/pretrain", "resnet20/pretrain"]
    assert [t.name for t in tasks[2:5]] == ["mobilenetv2/ddq_mixed4_seed0", "mobilenetv2/lsq_w2a2_seed0", "mobilenetv2/fp_seed0"]
    assert all(t.after == t.name.split("/")[0] + "/pretrain" for t in tasks[2:])
    qat_only = cifar10.parallel_tasks(cifar10.parse_args(["--data-dir", "unused", "--phase", "qat", "--runs", "fp", "--seeds", "1"]))
    assert [(t.name, t.after) for t in qat_only] == [("mobilenetv2/fp_seed0", None), ("resnet20/fp_seed0", None)]


def test_a_failing_worker_task_is_reported_and_stops_new_tasks(tmp_path):
    write_shards(tmp_path / "data")
    (tmp_path / "work").mkdir()
    with pytest.raises(SystemExit, match="resnet20/fp_seed0 failed"):
        cifar10.main(arguments(tmp_path, "--phase", "qat", "--models", "resnet20", "--runs", "fp", "--seeds", "1", "--workers", "2"))


def test_results_saved_before_a_protocol_key_existed_count_at_its_old_value(tmp_path):
    write_shards(tmp_path / "data")
    argv = arguments(tmp_path, "--models", "resnet20", "--runs", "ddq_w4a4", "--seeds", "1")
    assert cifar10.main(argv)["complete"]
    result = tmp_path / "out" / "runs" / "resnet20" / "ddq_w4a4_seed0.json"
    saved = json.loads(result.read_text())
    assert saved["protocol"]["range_lr_scale"] == "width"
    del saved["protocol"]["range_lr_scale"]  # as written before the key existed
    result.write_text(json.dumps(saved))
    stamp = result.stat().st_mtime_ns
    assert cifar10.main(argv)["complete"] and result.stat().st_mtime_ns == stamp, "still this protocol's result"
    with pytest.raises(SystemExit, match="range_lr_scale: saved 'width', now 'steps'"):
        cifar10.main(argv + ["--range-lr-scale", "steps"])


def test_worker_slots_take_the_visible_gpus_and_refuse_more_workers_than_gpus(monkeypatch):
    from ddq.experiments import workers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert workers.slot_devices(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,6")
    assert workers.slot_devices(2) == ["3", "5"]
    with pytest.raises(ValueError, match="4 workers need 4 GPUs; this machine shows 3 \\(3, 5, 6\\)"):
        workers.slot_devices(4)


def test_qat_refuses_an_fp_checkpoint_pretrained_under_other_settings(tmp_path):
    """fp_<model>.pt records its pretraining settings: --phase qat under others is refused naming them (a width
    used to fail in load_state_dict with a traceback, the rest silently mixed protocols)."""
    write_shards(tmp_path / "data")
    base = arguments(tmp_path, "--models", "resnet20", "--runs", "fp", "--seeds", "1")
    assert cifar10.main(base + ["--phase", "pretrain"])["complete"]

    def qat(out, *extra):
        argv = base + ["--phase", "qat", *extra]
        argv[argv.index("--out") + 1] = str(tmp_path / out)
        return cifar10.main(argv)

    with pytest.raises(SystemExit, match=r"pretrained with other settings \(pretrain_epochs: saved 1, now 2\)"):
        qat("more_pretraining", "--pretrain-epochs", "2")
    with pytest.raises(SystemExit, match=r"pretrained with other settings \(resnet_width: saved 4, now 8\)"):
        qat("wider", "--resnet-width", "8")
    assert qat("longer_qat", "--epochs", "2")["complete"], "QAT's own settings do not define the checkpoint"
    assert qat("other_network_width", "--mobilenet-width", "0.2")["complete"], "nor does another network's width"

    checkpoint = tmp_path / "work" / "fp_resnet20.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["model"], checkpoint)  # as written before settings were recorded
    with pytest.raises(SystemExit, match="does not record the settings it was pretrained under"):
        qat("no_pretraining_result")
    with pytest.raises(SystemExit, match=r"pretrain_epochs: saved 1, now 2"):
        cifar10.main(base + ["--phase", "qat", "--pretrain-epochs", "2"])
    assert cifar10.main(base + ["--phase", "qat"])["complete"], "checked against the pretraining result beside it"


def test_a_partial_state_of_other_settings_is_refused_naming_them(tmp_path):
    settings = cifar10.parse_args(["--data-dir", "unused", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    cifar10.Store(settings).save_partial("resnet20/pretrain", {"epoch": 1})
    settings.pretrain_epochs, settings.lr = 3, 0.5
    with pytest.raises(shards.DataError) as refused:
        cifar10.Store(settings).load_partial("resnet20/pretrain")
    message = str(refused.value)
    assert "pretrain_epochs: saved 200, now 3; lr: saved 0.01, now 0.5" in message and "quant_lr" not in message
