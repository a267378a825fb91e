"""A user's own models, as a researcher writes them: no input normalisation of their own, their own module
names, a factory `(num_classes, input_spec) -> nn.Module`."""

import torch.nn as nn


class ToyNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear: a small net with BN (so BN defenses apply)."""

    def __init__(self, channels: int, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def toy_net(num_classes, spec):
    """ToyNet: one conv with BN and a linear head (a test model)."""
    return ToyNet(spec.channels, num_classes)


def plain_mlp(num_classes, spec):
    """A Sequential MLP without BN."""
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.size * spec.size, 32), nn.ReLU(),
                         nn.Linear(32, num_classes))


def wrong_classes(num_classes, spec):
    """Ignores num_classes: a mistake the harness reports before running."""
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.size * spec.size, num_classes + 1))
