"""Small models of the project's own, for the demo, tests and CPU training runs."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Three conv3×3–ReLU–maxpool2 stages and a linear classifier (no BatchNorm, so it exports to integers).

    For 28×28 inputs the feature map shrinks 28 → 14 → 7 → 3; for 32×32, 32 → 16 → 8 → 4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 28) -> None:
        super().__init__()
        channels = (in_channels, width, 2 * width, 4 * width)
        stages = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*stages)
        side = image_size // 8
        self.classifier = nn.Linear(channels[-1] * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))
