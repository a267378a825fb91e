"""Architectures. Input normalisation is the model's first layer, so attacks work in [0,1] pixel space.

Module paths follow the usual CIFAR code (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.shortcut.0`,
`linear`) because RiFT and the layer-type defenses address modules by exact path.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import unknown


class Normalize(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        # Not persistent: checkpoints hold learned state only, and the constants come from the dataset.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TinyCNN(nn.Module):
    """Two conv layers with BN: the smoke preset's model (tests)."""

    def __init__(self, channels: int, num_classes: int, mean, std, width: int = 16) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class SmallCNN(nn.Module):
    """Three conv layers with BN, for 8x8 digits (the quick preset)."""

    def __init__(self, channels: int, num_classes: int, mean, std) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.linear = nn.Linear(128, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection shortcut (conv + BN): both are RiFT candidates
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class ResNet(nn.Module):
    """CIFAR ResNets: 3x3 stem without max-pool. ResNet-20 (16/32/64, 3 blocks per stage) and
    ResNet-18 / PreActResNet-18 (64..512, 2 blocks per stage)."""

    def __init__(self, block: type, stages: list[tuple[int, int]], channels: int, num_classes: int,
                 mean, std, preact: bool = False) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        width = stages[0][0]
        self.preact = preact
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, (cout, blocks) in enumerate(stages, start=1):
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 1 and j == 0) else 1
                layers.append(block(cin, cout, stride))
                cin = cout
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.num_stages = len(stages)
        if preact:
            self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        for i in range(1, self.num_stages + 1):
            out = getattr(self, f"layer{i}")(out)
        if self.preact:
            out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideResNet(nn.Module):
    """WRN-34-10 as in TRADES / RiFT's code (pre-activation blocks, (34-4)/6 = 5 blocks per stage)."""

    def __init__(self, channels: int, num_classes: int, mean, std, depth: int = 34, widen: int = 10):
        super().__init__()
        self.normalize = Normalize(mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
        cin = widths[0]
        for i, cout in enumerate(widths[1:], start=1):
            stride = 1 if i == 1 else 2
            blocks = [PreActBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"block{i}", nn.Sequential(*blocks))
            cin = cout
        self.bn1 = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "tiny_cnn": lambda c, k, m, s: TinyCNN(c, k, m, s),
    "small_cnn": lambda c, k, m, s: SmallCNN(c, k, m, s),
    "resnet20": lambda c, k, m, s: ResNet(BasicBlock, [(16, 3), (32, 3), (64, 3)], c, k, m, s),
    "resnet18": lambda c, k, m, s: ResNet(BasicBlock, [(64, 2), (128, 2), (256, 2), (512, 2)], c, k, m, s),
    "preact_resnet18": lambda c, k, m, s: ResNet(PreActBlock, [(64, 2), (128, 2), (256, 2), (512, 2)],
                                                 c, k, m, s, preact=True),
    "wrn34_10": lambda c, k, m, s: WideResNet(c, k, m, s, 34, 10),
}


def build_model(arch: str, spec) -> nn.Module:
    """A fresh model for a dataset spec (channels, classes, normalisation constants)."""
    if arch not in ARCHS:
        raise unknown("architecture", arch, ARCHS)
    return ARCHS[arch](spec.channels, spec.num_classes, spec.mean, spec.std)
