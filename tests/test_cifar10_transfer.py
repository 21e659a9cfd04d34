"""benchmarks/gpu_cifar10.sh moves the CIFAR-10 protocol's data and state within the device tool's limits
(docs/cifar10.md): parts that each fit one call, the receiving side, and what comes back (at most 8 files of
16 MiB, no deeper than two folders) restored exactly by `collect`."""

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_cifar10.sh"
RETURNED_FILES, RETURNED_FILE_BYTES = 8, 16 * 1024 * 1024


def script(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **{k: str(v) for k, v in env.items()}},
                          capture_output=True, text=True)


def random_file(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def fake_source(folder: Path) -> Path:
    names = [f"train_{i:02d}.npz" for i in range(10)] + ["test_00.npz", "test_01.npz"]
    for seed, name in enumerate(names):
        random_file(folder / name, 30_000 + 2_000 * seed, seed)
    return folder


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stage_fills_parts_within_the_limit_and_receive_rebuilds_data_and_checkpoints(tmp_path):
    source = fake_source(tmp_path / "source")
    here = tmp_path / "here"
    checkpoints = [random_file(here / "work" / name, size, 99 + i)
                   for i, (name, size) in enumerate((("fp_resnet20.pt", 12_000), ("fp_mobilenetv2.pt", 60_000)))]
    staged = script("stage", CIFAR10_ROOT=here, CIFAR10_SOURCE=source, PART_BYTES=130_000)
    assert staged.returncode == 0, staged.stderr
    parts = sorted((here / "parts").iterdir())
    assert len(parts) >= 4
    for part in parts:
        assert sum(f.stat().st_size for f in part.iterdir()) <= 130_000
    staged_names = sorted(f.name for part in parts for f in part.iterdir())
    assert staged_names == sorted([p.name for p in source.iterdir()] + [c.name for c in checkpoints] + ["SHA256SUMS"])
    assert f"call {len(parts)}: carry" in staged.stdout

    device = tmp_path / "device"
    for number, part in enumerate(parts):  # one call per part, the machine keeping what earlier calls moved
        (device / "parts").mkdir(parents=True, exist_ok=True)
        os.rename(part, device / "parts" / part.name)
        received = script("receive", CIFAR10_ROOT=device)
        assert received.returncode == 0, received.stderr
        assert ("all 12 shards verified" in received.stdout) == (number == len(parts) - 1)
    assert tree(device / "data") == {**tree(source), "SHA256SUMS": (device / "data" / "SHA256SUMS").read_bytes()}
    assert tree(device / "work") == {c.name: c.read_bytes() for c in checkpoints}


def test_a_file_larger_than_a_part_is_refused_by_name(tmp_path):
    source = fake_source(tmp_path / "source")
    staged = script("stage", CIFAR10_ROOT=tmp_path / "here", CIFAR10_SOURCE=source, PART_BYTES=40_000)
    assert staged.returncode != 0
    assert "exceeds a part's 40000 bytes" in staged.stderr and ".npz" in staged.stderr


def test_a_corrupted_shard_fails_the_check(tmp_path):
    source = fake_source(tmp_path / "source")
    here = tmp_path / "here"
    assert script("stage", CIFAR10_ROOT=here, CIFAR10_SOURCE=source, PART_BYTES=10**7).returncode == 0
    shard = next((here / "parts" / "part0").glob("train_*.npz"))
    shard.write_bytes(b"not the shard")
    received = script("receive", CIFAR10_ROOT=here)
    assert received.returncode != 0 and "all 12 shards verified" not in received.stdout


@pytest.mark.parametrize("state_bytes", [0, 40 * 1024 * 1024])
def test_what_comes_back_fits_the_limits_and_collect_restores_it(tmp_path, state_bytes):
    device = tmp_path / "device"
    results = device / "ablation"
    (results / "runs" / "resnet20").mkdir(parents=True)
    (results / "runs" / "resnet20" / "ddq_w4a4_seed0.json").write_text('{"top1": 87.2}')
    (results / "table.md").write_text("| run | top-1 |\n")
    random_file(device / "work" / "fp_resnet20.pt", 1_100_000, 1)
    if state_bytes:  # unfinished runs' model and optimizer state: more than one returned file can hold
        random_file(device / "work" / "partial" / "mobilenetv2_ddq_w4a4_seed0.pt", state_bytes, 2)
    out = tmp_path / "out"
    out.mkdir()
    packed = script("pack", CIFAR10_ROOT=device, RESULTS="ablation", OUT=out)
    assert packed.returncode == 0, packed.stderr
    returned = list(out.iterdir())
    assert 0 < len(returned) <= RETURNED_FILES
    for path in returned:
        assert path.is_file() and path.stat().st_size <= RETURNED_FILE_BYTES
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name)

    here = tmp_path / "here"
    collected = script("collect", str(out), CIFAR10_ROOT=here, RESULTS="ablation", RESULTS_DIR=tmp_path / "committed")
    assert collected.returncode == 0, collected.stderr
    assert tree(here / "ablation") == tree(results)
    assert tree(here / "work") == tree(device / "work")
    assert tree(tmp_path / "committed") == tree(results)


def test_collect_without_results_says_what_is_missing(tmp_path):
    collected = script("collect", str(tmp_path), CIFAR10_ROOT=tmp_path / "here", RESULTS_DIR=tmp_path / "committed")
    assert collected.returncode != 0 and "no cifar10_results.tgz" in collected.stderr
