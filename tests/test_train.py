"""`python -m ddq.train` on CPU: a generated ImageFolder, 1 and 2 ranks (torchrun + gloo), exact resume after
--stop-after-steps and after a rank is SIGKILLed mid-run, replicas in sync, output files, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddq import train
from ddq.imagefolder import ImageFolder, ResumableDistributedSampler
from ddq.models import SmallCNN

TRAIN_IMAGES_PER_CLASS, VAL_IMAGES_PER_CLASS = 24, 6
COMMON = ["--model", "small_cnn", "--width", "8", "--image-size", "16", "--epochs", "2", "--workers", "0",
          "--optimizer", "adamw", "--lr", "1e-3", "--gate-lr", "5", "--resource-strength", "1", "--learn-bits", "--device", "cpu",
          "--log-every", "2", "--no-progress", "--batch-size", "8"]
FIXED_BITS = [arg for arg in COMMON if arg != "--learn-bits"]


def make_image_folder(root: Path, per_class: int, seed: int, classes: int = 2) -> None:
    """Noise images (20×24, so crops and resizes do real work) with one colour channel raised per class."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 80, (20, 24, 3), dtype=np.uint8)
            pixels[..., label % 3] += 150
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    make_image_folder(root / "train", TRAIN_IMAGES_PER_CLASS, seed=0)
    make_image_folder(root / "val", VAL_IMAGES_PER_CLASS, seed=1)
    return root


def data_args(data: Path) -> list[str]:
    return ["--train-dir", str(data / "train"), "--val-dir", str(data / "val")]


def events(out: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["event"] == kind]


def assert_same(a, b, path: str = "checkpoint") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{index}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, (path, a, b)


def assert_same_checkpoints(first: Path, second: Path) -> dict:
    """Everything a continuation depends on: model (quantizers included), optimizer, schedule, λ, step, RNG."""
    a, b = (torch.load(path / "checkpoint.pt", weights_only=False) for path in (first, second))
    for key in a:
        if key != "config":
            assert_same(a[key], b[key], key)
    return a


@pytest.fixture
def one_thread():
    """Tiny steps on shared cores: one intra-op thread avoids OpenMP oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compiled_training_matches_eager(data, tmp_path, one_thread):
    """--compile (torch.compile of the model after quantizer initialisation) trains the same steps as eager:
    the quantizers are custom ops, so the graph has no break, and the losses agree to float tolerance.
    With --compile-mode reduce-overhead (CUDA graphs on a GPU; on CPU Inductor compiles as usual)."""
    assert train.parse_args(["--train-dir", "t", "--val-dir", "v", "--model", "small_cnn"]).compile_mode == "default"
    args = COMMON + data_args(data) + ["--stop-after-steps", "3", "--log-every", "1"]
    eager = train.main(args + ["--out", str(tmp_path / "eager")])
    compiled = train.main(args + ["--out", str(tmp_path / "compiled"), "--compile", "--compile-mode", "reduce-overhead"])
    assert eager == compiled == {"step": 3, "stopped": True}
    eager_losses = [e["loss"] for e in events(tmp_path / "eager", "train")]
    compiled_losses = [e["loss"] for e in events(tmp_path / "compiled", "train")]
    assert len(eager_losses) == 3 and np.allclose(compiled_losses, eager_losses, rtol=1e-3, atol=1e-4)


def test_one_process_stop_and_resume_continues_exactly(data, tmp_path, one_thread):
    args = COMMON + data_args(data) + ["--batch-size", "8"]
    full = train.main(args + ["--out", str(tmp_path / "full")])
    assert full == {"step": 12, "stopped": False, "best_top1": full["best_top1"]}
    stopped = train.main(args + ["--out", str(tmp_path / "split"), "--stop-after-steps", "9"])
    assert stopped == {"step": 9, "stopped": True}
    resumed = train.main(args + ["--out", str(tmp_path / "split"), "--resume", "auto"])
    assert resumed["step"] == 12
    final = assert_same_checkpoints(tmp_path / "full", tmp_path / "split")
    assert final["step"] == 12 and final["resource"]["strength"] != 1.0, "λ adapted and was carried over"

    out = tmp_path / "full"
    assert [e["epoch"] for e in events(out, "epoch")] == [0, 1]
    assert all(0 <= e["top1"] <= 100 and e["val_images"] == 2 * VAL_IMAGES_PER_CLASS for e in events(out, "epoch"))
    assert {"loss", "lr", "img_s", "data_wait_fraction", "resource_strength"} <= set(events(out, "train")[0])
    for epoch in (1, 2):
        assert (out / f"bits_epoch{epoch:03d}.png").stat().st_size > 1000
        assert "average weight bits" in (out / f"bits_epoch{epoch:03d}.txt").read_text()
    assert not [p for p in out.iterdir() if ".tmp" in p.name], "no temporary checkpoint file left behind"
    split_epochs = events(tmp_path / "split", "epoch")
    assert [e["top1"] for e in split_epochs] == [e["top1"] for e in events(out, "epoch")]


def torchrun(args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddq.train", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# A guard against hangs, not a speed check: two ranks on a loaded 2-core machine took over 120 s once.
HANG_TIMEOUT_S = 300


def communicate(process: subprocess.Popen, timeout: float = HANG_TIMEOUT_S) -> str:
    """The process's output; on a hang, kill it and fail with what it printed (where it stopped)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"torchrun still running after {timeout} s; its output:\n{output[-6000:]}")
    return output


def finish(process: subprocess.Popen, timeout: float = HANG_TIMEOUT_S) -> str:
    output = communicate(process, timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def test_two_ranks_gloo_stay_in_sync_and_resume_exactly_after_sigkill(data, tmp_path):
    args = COMMON + data_args(data) + ["--batch-size", "4"]  # 48 images / 2 ranks / 4 = 6 steps per epoch
    full = tmp_path / "full"
    finish(torchrun(args + ["--out", str(full), "--workers", "1"]))

    init = events(full, "quantizer_init")[0]["ranks"]
    assert init[0]["before_sync"] != init[1]["before_sync"], "each rank initialised its ranges from its own batch"
    assert init[0]["after_sync"] == init[1]["after_sync"] == init[0]["before_sync"], "rank 0's quantizer state everywhere"
    checks = events(full, "sync_check")
    assert len(checks) == 2 and all(check["in_sync"] for check in checks)
    for check in checks:
        first, second = check["ranks"]
        assert first["bits"] == second["bits"] and first["state_sha256"] == second["state_sha256"]
    learned = [bits for layer in checks[-1]["ranks"][0]["bits"][1:-1] for bits in layer]
    assert min(learned) < 8, "learned bits moved (the check compares decisions that changed)"

    # Rank 1 SIGKILLs itself after step 8's update (mid-epoch 2); torchrun then ends rank 0. The last
    # complete checkpoint is step 7's: the work of step 8 is lost and must be redone identically.
    killed = tmp_path / "killed"
    process = torchrun(args + ["--out", str(killed), "--save-every-steps", "1"], extra_env={"DDQ_TRAIN_FAULT_STEP": "8"})
    output = communicate(process)
    assert process.returncode != 0 and "SIGKILL" in output, output[-3000:]
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["step"] == 7
    assert not [p for p in killed.iterdir() if ".tmp" in p.name]
    finish(torchrun(args + ["--out", str(killed), "--resume", "auto", "--workers", "2"]))
    assert events(killed, "resumed")[-1]["step"] == 7
    assert assert_same_checkpoints(full, killed)["step"] == 12
    assert events(killed, "sync_check")[-1]["ranks"] == checks[-1]["ranks"]


def test_sampler_resumes_mid_epoch_and_augmentation_depends_only_on_the_seed(data):
    dataset = ImageFolder(data / "train", 16, train=True)
    sampler = ResumableDistributedSampler(dataset, num_replicas=2, rank=1, seed=3)
    sampler.set_position(epoch=2)
    whole = list(sampler)
    sampler.set_position(epoch=2, start=5)
    assert list(sampler) == whole[5:] and len(sampler) == len(whole) - 5
    sampler.set_position(epoch=3)
    assert list(sampler) != whole, "another epoch, another order and other augmentations"
    key = whole[0]
    image, label = dataset[key]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label in (0, 1)
    assert torch.equal(dataset[key][0], image)
    assert torch.equal(ImageFolder(data / "train", 16, train=False)[key[0]][0], dataset.load(key[0])[0])


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train.atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        train.atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def run_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as raised:
        train.main(argv)
    code = raised.value.code
    return code if isinstance(code, str) else capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--weight-bits", "9"], "--weight-bits must be in"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--first-last-bits", "x"], "--first-last-bits must be"),
    (["--method", "lsq"], "--learn-bits needs --method ddq"),
    (["--warmup-epochs", "2"], "--warmup-epochs must be in"),
    (["--pretrained", "/nonexistent.pt"], "does not exist"),
    (["--resume", "/nonexistent.pt"], "no such checkpoint"),
    (["--batch-size", "100"], "fewer than one batch"),
])
def test_bad_arguments_are_named(data, tmp_path, capsys, extra, message):
    assert message in run_error(COMMON + data_args(data) + ["--out", str(tmp_path)] + extra, capsys)


def test_settings_that_used_to_fail_late_are_named_up_front(data, tmp_path, capsys):
    """Each of these passed validation and then raised a traceback (or, for one class, trained to a
    meaningless 100 %)."""
    fixed_bits = FIXED_BITS + data_args(data) + ["--out", str(tmp_path / "out")]
    assert "--method lsq needs --weight-bits >= 2" in run_error(fixed_bits + ["--method", "lsq", "--weight-bits", "1"], capsys)
    assert "--method lsq needs --act-bits >= 2" in run_error(fixed_bits + ["--method", "lsq", "--act-bits", "1"], capsys)
    assert "is not a file" in run_error(fixed_bits + ["--pretrained", str(tmp_path)], capsys)
    (tmp_path / "taken").write_text("")
    assert "is a file, not a folder" in run_error(fixed_bits + ["--out", str(tmp_path / "taken")], capsys)
    assert "Not a directory" in run_error(fixed_bits + ["--out", str(tmp_path / "taken" / "run")], capsys)
    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA device is visible" in run_error(fixed_bits + ["--device", "cuda"], capsys)
    make_image_folder(tmp_path / "one" / "train", 16, seed=0, classes=1)
    make_image_folder(tmp_path / "one" / "val", 2, seed=1, classes=1)
    one_class = ["--train-dir", str(tmp_path / "one" / "train"), "--val-dir", str(tmp_path / "one" / "val")]
    assert "needs at least 2 classes" in run_error(COMMON + one_class + ["--out", str(tmp_path / "out")], capsys)


def test_torchvision_model_without_torchvision_says_so(data, tmp_path, capsys):
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed here; the GPU benchmark covers its models")
    except ImportError:
        pass
    argv = COMMON + data_args(data) + ["--out", str(tmp_path), "--model", "mobilenet_v2"]
    assert "needs torchvision" in run_error(argv, capsys)


def test_missing_or_empty_data_directories(data, tmp_path, capsys):
    base = COMMON + ["--out", str(tmp_path / "out")]
    assert "does not exist" in run_error(base + ["--train-dir", str(tmp_path / "nope"), "--val-dir", str(data / "val")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no class subfolders" in run_error(base + ["--train-dir", str(tmp_path / "empty"), "--val-dir", str(data / "val")], capsys)
    (tmp_path / "hollow" / "class0").mkdir(parents=True)
    assert "hold no image" in run_error(base + ["--train-dir", str(tmp_path / "hollow"), "--val-dir", str(data / "val")], capsys)
    make_image_folder(tmp_path / "three", 2, seed=2, classes=3)
    assert "other classes" in run_error(base + ["--train-dir", str(data / "train"), "--val-dir", str(tmp_path / "three")], capsys)


def test_checkpoints_of_another_model_are_refused(data, tmp_path, capsys):
    wide = tmp_path / "wide.pt"
    torch.save(SmallCNN(in_channels=3, num_classes=2, width=4, image_size=16).state_dict(), wide)
    argv = COMMON + data_args(data) + ["--out", str(tmp_path / "a"), "--pretrained", str(wide)]
    assert "does not fit --model small_cnn" in run_error(argv, capsys)

    good = tmp_path / "good.pt"
    torch.save({"model": SmallCNN(in_channels=3, num_classes=2, width=8, image_size=16).state_dict()}, good)
    train.main(COMMON + data_args(data) + ["--out", str(tmp_path / "b"), "--pretrained", str(good), "--batch-size", "16",
                                            "--stop-after-steps", "1"])
    other = COMMON + data_args(data) + ["--out", str(tmp_path / "c"), "--batch-size", "16", "--width", "4",
                                        "--resume", str(tmp_path / "b" / "checkpoint.pt")]
    assert "width: checkpoint 8, now 4" in run_error(other, capsys)
    checkpoint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    del checkpoint["config"]["range_lr_scale"]  # as written before the setting existed: made at "width"
    torch.save(checkpoint, tmp_path / "before.pt")
    steps = COMMON + data_args(data) + ["--out", str(tmp_path / "e"), "--batch-size", "16", "--range-lr-scale", "steps",
                                        "--resume", str(tmp_path / "before.pt")]
    assert "range_lr_scale: checkpoint 'width', now 'steps'" in run_error(steps, capsys)
    not_ours = COMMON + data_args(data) + ["--out", str(tmp_path / "d"), "--resume", str(good)]
    assert "not a ddq.train checkpoint" in run_error(not_ours, capsys)


def test_resume_from_another_number_of_training_images_is_refused(data, tmp_path, capsys, one_thread):
    """Fewer images used to end the run at once (the checkpoint's step past the new total), more to continue
    on another schedule (cosine length, bit-freezing step, sampler order)."""
    args = COMMON + ["--val-dir", str(data / "val"), "--out", str(tmp_path / "run")]
    train.main(args + ["--train-dir", str(data / "train"), "--stop-after-steps", "2"])
    for per_class in (12, 36):
        folder = tmp_path / f"train{per_class}"
        make_image_folder(folder, per_class, seed=0)
        message = run_error(args + ["--train-dir", str(folder), "--resume", "auto"], capsys)
        assert f"train_images: checkpoint {2 * TRAIN_IMAGES_PER_CLASS}, now {2 * per_class}" in message


def test_a_trainer_checkpoint_serves_as_pretrained_weights(data, tmp_path, one_thread):
    """An FP run's checkpoint.pt loads with weights_only=True (its RNG states are tensors, tuples and numbers)
    and starts a DDQ run; read_state_dict takes its 'model' entry."""
    fp = tmp_path / "fp"
    train.main(FIXED_BITS + data_args(data) + ["--method", "fp", "--stop-after-steps", "2", "--out", str(fp)])
    checkpoint = torch.load(fp / "checkpoint.pt", weights_only=True)
    assert train.read_state_dict(str(fp / "checkpoint.pt")).keys() == checkpoint["model"].keys()
    ddq_run = train.main(COMMON + data_args(data) + ["--pretrained", str(fp / "checkpoint.pt"), "--stop-after-steps", "1",
                                                    "--out", str(tmp_path / "ddq")])
    assert ddq_run == {"step": 1, "stopped": True}


def test_an_unreadable_image_is_named_and_a_failed_evaluation_loses_no_training(data, tmp_path, capsys, one_thread):
    """A corrupt --val-dir image used to raise PIL's traceback after a whole epoch, before the epoch's
    checkpoint: now the checkpoint comes first, the error names the file, and a resume evaluates first."""
    import shutil

    val = tmp_path / "val"
    shutil.copytree(data / "val", val)
    corrupt = val / "class1" / "zz_corrupt.png"
    corrupt.write_bytes(b"not an image")
    out = tmp_path / "run"
    argv = COMMON + ["--train-dir", str(data / "train"), "--val-dir", str(val), "--out", str(out)]
    message = run_error(argv, capsys)
    assert f"cannot read image {str(corrupt)!r}" in message and "Traceback" not in message
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 6 and saved["evaluation_pending"], "the epoch's training was kept"

    corrupt.unlink()
    assert train.main(argv + ["--resume", "auto"])["step"] == 12
    epochs = events(out, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1], "the pending evaluation ran on resume"
    final = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not final["evaluation_pending"] and final["best_top1"] == max(e["top1"] for e in epochs)


def test_an_unreadable_training_image_is_named_from_a_loader_worker(data, tmp_path, capsys):
    """The loader worker's traceback is not the message: the main process reports the file."""
    import shutil

    train_dir = tmp_path / "train"
    shutil.copytree(data / "train", train_dir)
    corrupt = train_dir / "class0" / "zz_truncated.png"
    corrupt.write_bytes((data / "train" / "class0" / "000.png").read_bytes()[:60])
    argv = FIXED_BITS + ["--method", "fp", "--workers", "1", "--train-dir", str(train_dir), "--val-dir", str(data / "val"),
                         "--out", str(tmp_path / "run")]
    message = run_error(argv, capsys)
    assert message.startswith(f"python -m ddq.train: error: cannot read image {str(corrupt)!r}: "), message
    assert "Traceback" not in message and "\n" not in message


def test_quantizer_init_batch_mixes_classes_and_is_disjoint_across_ranks(tmp_path):
    """The folder's order is by class, so its first images are all of class 0: the init batch is each rank's
    first training batch instead (a seeded permutation, the same on every rank, sliced disjointly)."""
    from types import SimpleNamespace

    make_image_folder(tmp_path / "train", 8, seed=0, classes=3)
    dataset = ImageFolder(tmp_path / "train", 16, train=True)
    for world_size in (1, 2):
        chosen = []
        for rank in range(world_size):
            sampler = ResumableDistributedSampler(dataset, world_size, rank, seed=0)
            trainer = SimpleNamespace(config=SimpleNamespace(batch_size=8), sampler=sampler)
            indices = train.Trainer.init_indices(trainer)
            assert len(indices) == 8 and indices == train.Trainer.init_indices(trainer), "deterministic"
            assert len({dataset.samples[i][1] for i in indices}) >= 2, (world_size, rank, indices)
            chosen += indices
        assert len(set(chosen)) == len(chosen), "ranks take different images"


def test_a_run_resumed_at_its_stop_step_trains_no_further(data, tmp_path, one_thread):
    """Each such resume used to train one more step."""
    argv = COMMON + data_args(data) + ["--out", str(tmp_path / "run"), "--stop-after-steps", "3"]
    assert train.main(argv) == {"step": 3, "stopped": True}
    for _ in range(2):
        assert train.main(argv + ["--resume", "auto"]) == {"step": 3, "stopped": True}
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3
