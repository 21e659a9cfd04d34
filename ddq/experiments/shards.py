"""CIFAR-10 numpy shards held on the training device as uint8, with per-batch augmentation by tensor ops.

Shard layout (`../shared/data/cifar10/README.md`): `train_NN.npz` and `test_NN.npz`, each with `x` uint8
[n, 32, 32, 3] (HWC, RGB) and `y` [n] labels 0–9. The images stay uint8 NHWC on the device (50,000 padded
training images take 240 MB); a batch is gathered, cropped and flipped in one indexing operation, then
normalised to float in channels_last layout (NHWC memory is exactly what the gather produces).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

SHARD_PATTERN = re.compile(r"^(train|test)_(\d+)\.npz$")
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
PAD = 4
# Per-channel mean and standard deviation of this copy's 50,000 training images, on the 0–255 scale.
MEAN = (125.269, 122.933, 113.863)
STD = (62.534, 61.909, 66.460)


class DataError(ValueError):
    """The data folder is missing, incomplete or holds files that are not CIFAR-10 shards."""


def find_shards(data_dir: str | Path, train_shards: Optional[int] = None) -> tuple[list[Path], list[Path]]:
    """(train shard paths, test shard paths) sorted by number; the first `train_shards` train shards only."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {str(root)!r} is not a folder (expected train_NN.npz and test_NN.npz shards)")
    found: dict[str, list[tuple[int, Path]]] = {"train": [], "test": []}
    for path in root.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match:
            found[match.group(1)].append((int(match.group(2)), path))
    train, test = ([p for _, p in sorted(found[split])] for split in ("train", "test"))
    if not train or not test:
        missing = [split for split, paths in (("train", train), ("test", test)) if not paths]
        raise DataError(f"--data-dir {str(root)!r} has no {' and no '.join(f'{s}_NN.npz' for s in missing)} shards "
                        f"(did every part of the data arrive? see docs/cifar10.md)")
    if train_shards is not None:
        if not 1 <= train_shards <= len(train):
            raise DataError(f"--train-shards must be in [1, {len(train)}] (shards found under {str(root)!r}), got {train_shards}")
        train = train[:train_shards]
    return train, test


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One shard's (x uint8 [n,32,32,3], y int64 [n]), checked."""
    try:
        with np.load(path) as shard:
            missing = {"x", "y"} - set(shard.files)
            if missing:
                raise DataError(f"shard {str(path)!r} lacks the key(s) {sorted(missing)} (has {shard.files})")
            x, y = shard["x"], shard["y"]
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read shard {str(path)!r}: {error} (truncated copy?)") from error
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"shard {str(path)!r}: x must be uint8 [n, 32, 32, 3], got {x.dtype} {list(x.shape)}")
    if y.shape != (len(x),):
        raise DataError(f"shard {str(path)!r}: y must have shape [{len(x)}], got {list(y.shape)}")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"shard {str(path)!r}: labels must be in [0, {NUM_CLASSES}), got [{y.min()}, {y.max()}]")
    return x, y


def load_shards(data_dir: str | Path, train_shards: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): NHWC uint8 images and int64 labels from the shard folder."""
    train, test = find_shards(data_dir, train_shards)
    def concat(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_shard(p) for p in paths]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    return (*concat(train), *concat(test))


class DeviceImages:
    """A CIFAR split on the device: uint8 NHWC images (train ones zero-padded by 4 pixels) and labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device, pad: int = 0) -> None:
        images = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        if pad:
            images = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
        self.images, self.labels, self.pad = images, torch.from_numpy(y).to(device), pad
        self.mean = torch.tensor(MEAN, device=device)
        self.inv_std = 1.0 / torch.tensor(STD, device=device)

    def __len__(self) -> int:
        return len(self.labels)

    def to_float(self, nhwc: Tensor, channels_last: bool) -> Tensor:
        """uint8 NHWC → normalised float32 NCHW (a channels_last view of the NHWC memory)."""
        nchw = ((nhwc.float() - self.mean) * self.inv_std).permute(0, 3, 1, 2)
        return nchw if channels_last else nchw.contiguous()

    def batch(self, index: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
        """The images at `index` without augmentation (the centre of padded images)."""
        side = IMAGE_SHAPE[0]
        images = self.images[index, self.pad : self.pad + side, self.pad : self.pad + side]
        return self.to_float(images, channels_last), self.labels[index]

    def augmented_batch(self, index: Tensor, generator: torch.Generator, channels_last: bool) -> tuple[Tensor, Tensor]:
        """Random 32×32 crop of the zero-padded image (offsets 0..2·pad) and a random horizontal flip, per image,
        as one gather: rows = dy + i, columns = dx + j, or dx + 31 − j where the flip mask is set."""
        if self.pad == 0:
            raise ValueError("augmented_batch needs images stored with padding (pad > 0)")
        side, count, device = IMAGE_SHAPE[0], len(index), self.images.device
        offsets = torch.randint(0, 2 * self.pad + 1, (2, count), device=device, generator=generator)
        flip = torch.rand(count, device=device, generator=generator) < 0.5
        steps = torch.arange(side, device=device)
        rows = offsets[0, :, None] + steps
        cols = offsets[1, :, None] + torch.where(flip[:, None], side - 1 - steps, steps)
        images = self.images[index[:, None, None], rows[:, :, None], cols[:, None, :]]
        return self.to_float(images, channels_last), self.labels[index]
