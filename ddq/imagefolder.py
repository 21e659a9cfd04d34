"""ImageNet-style data for `ddq.train`: an ImageFolder reader, its augmentations and a resumable sampler.

Works without torchvision (PIL only). Every random choice of an augmentation comes from a generator
seeded by (seed, epoch, sample index), never from a global or per-worker RNG: a sample looks the same
whichever worker loads it and whether or not the run was interrupted, which is what exact resume needs.
Images leave the workers as uint8 CHW tensors; normalisation happens on the training device.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SampleKey = Union[int, tuple[int, int]]


class DataError(ValueError):
    """A data directory that cannot serve as an ImageFolder (no classes, empty classes, other classes)."""


class ImageReadError(DataError):
    """An image file that PIL cannot read (not an image, truncated, gone).

    DataLoader re-raises a worker's exception in the main process as its type built from one string, the
    worker's whole traceback; the constructor keeps the original message (the traceback's last line), so
    the error reads the same whichever process loaded the image."""

    def __init__(self, message: str) -> None:
        last_line = message.rstrip().splitlines()[-1]
        super().__init__(last_line.removeprefix(f"{__name__}.{type(self).__qualname__}: "))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch."""
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def find_classes(root: Path, what: str) -> list[str]:
    if not root.exists():
        raise FileNotFoundError(f"{what} directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} directory {str(root)!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{what} directory {str(root)!r} has no class subfolders (expected root/<class>/<image>)")
    return classes


def list_images(folder: Path) -> list[str]:
    """Image files under `folder`, subfolders included (os.walk: one directory read per folder, no stat per
    file, which matters for ImageNet's 1.28 M files)."""
    found = []
    for directory, _, files in os.walk(folder, followlinks=True):
        found += [os.path.join(directory, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


class ImageFolder(Dataset):
    """torchvision-compatible layout: root/<class>/**/<image>, classes sorted by name, labels 0..C−1.

    Indexing takes a sample index (deterministic center view, for evaluation) or (index, seed) from
    `ResumableDistributedSampler` (random-resized crop and flip drawn from that seed). Returns
    (uint8 tensor 3×size×size, label).
    """

    def __init__(self, root: Union[str, Path], size: int, train: bool, resize: Optional[int] = None,
                 classes: Optional[list[str]] = None, what: str = "data") -> None:
        self.root = Path(root)
        self.size = size
        self.train = train
        self.resize = resize or int(math.floor(size / 0.875))
        found = find_classes(self.root, what)
        if classes is not None and found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise DataError(f"{what} directory {str(self.root)!r} has other classes than the training data "
                             f"(missing {missing[:5]}, extra {extra[:5]})")
        self.classes = found
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, name in enumerate(self.classes):
            images = list_images(self.root / name)
            if not images:
                empty.append(name)
            self.samples += [(path, label) for path in images]
        if empty:
            raise DataError(f"{what} directory {str(self.root)!r}: class folder(s) {empty[:5]} hold no image "
                             f"({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, int]:
        index, seed = (key, None) if isinstance(key, int) else key
        return self.load(index, seed if self.train else None)

    def load(self, index: int, seed: Optional[int] = None) -> tuple[Tensor, int]:
        """Sample `index`: random-resized crop and flip drawn from `seed`, or the centre view without one."""
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if seed is not None:
                    image = random_resized_crop_flip(image, self.size, torch.Generator().manual_seed(seed))
                else:
                    image = resize_center_crop(image, self.resize, self.size)
        except OSError as error:  # PIL.UnidentifiedImageError and truncated files are OSErrors too
            raise ImageReadError(f"cannot read image {path!r}: {error}") from error
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), label


def random_resized_crop_flip(image, size: int, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop (bilinear) then RandomHorizontalFlip(0.5), with an explicit generator."""
    from PIL import Image

    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        draws = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            box = (left, top, left + w, top + h)
            break
    if box is None:  # fall back to a central crop of the allowed aspect ratio
        in_ratio = width / height
        w, h = (width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else \
            ((int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height))
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    image = image.resize((size, size), Image.BILINEAR, box=box)
    if float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def resize_center_crop(image, resize: int, size: int):
    """Resize the shorter side to `resize` (bilinear), then crop the central size×size square."""
    from PIL import Image

    width, height = image.size
    scale = resize / min(width, height)
    new_w, new_h = max(size, int(round(width * scale))), max(size, int(round(height * scale)))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


class ResumableDistributedSampler(DistributedSampler):
    """`DistributedSampler` (same shuffle, padding and sharding) that yields (index, augmentation seed)
    and can start part-way through an epoch: `set_position(epoch, start)` skips this rank's first
    `start` samples of that epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"sampler start {start} is outside this rank's {self.num_samples} samples")
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def normalize(images: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """uint8 NCHW → float32, (x/255 − mean)/std per channel, on the images' device."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean_t) / std_t
