"""Models of the project's own: SmallCNN for the demo, tests and CPU runs; ResNet-20 and MobileNetV2 for 32×32 CIFAR."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


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


class CifarBasicBlock(nn.Module):
    """Two conv3×3–BN layers with a parameter-free shortcut ("option A" of He et al. 2016, §4.2): a strided
    block subsamples its input and zero-pads the new channels, so the shortcut adds no layer to quantize."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, self.extra_channels // 2, self.extra_channels - self.extra_channels // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32×32 images (He et al. 2016, §4.2): conv3×3, three stages of three basic blocks at
    width, 2·width, 4·width channels (32×32, 16×16, 8×8), global average pool, linear. 0.27M parameters at width 16."""

    def __init__(self, num_classes: int = 10, width: int = 16, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, channels = [], width
        for stage in range(3):
            out_channels = width * 2**stage
            for index in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(channels, out_channels, 2 if stage > 0 and index == 0 else 1))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _divisible(value: float, divisor: int = 8) -> int:
    """Channel counts rounded to a multiple of `divisor`, never below 90 % of `value` (MobileNetV2's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expansion (skipped at ratio 1), depthwise 3×3, linear 1×1 projection; a residual
    connection when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) for 32×32 images: the ImageNet block table with the stem and the
    second stage at stride 1 instead of 2, so the feature maps go 32 → 16 → 8 → 4 (total stride 8, not 32).
    `width_mult` scales every stage (the 1280-channel head only grows); no dropout."""

    # (expansion t, channels c, blocks n, stride s of the first block)
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        channels = _divisible(32 * width_mult)
        head = _divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU6(inplace=True)]
        for expansion, base, count, stride in self.STAGES:
            out_channels = _divisible(base * width_mult)
            for index in range(count):
                layers.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion))
                channels = out_channels
        layers += [nn.Conv2d(channels, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(head, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))
