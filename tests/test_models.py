"""Architectures: shapes, normalisation as the first layer, module paths RiFT relies on."""

from __future__ import annotations

import pytest
import torch

from bench import data, models
from bench.errors import BenchError

CIFAR = data.DATASETS["cifar10"]


@pytest.mark.parametrize("arch, params_m", [("resnet20", 0.27), ("resnet18", 11.2), ("preact_resnet18", 11.2),
                                            ("wrn34_10", 46.2), ("small_cnn", 0.095), ("tiny_cnn", 0.0055)])
def test_architectures_forward_and_size(arch, params_m):
    model = models.build_model(arch, CIFAR).eval()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(params_m, rel=0.1)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_normalisation_is_the_first_layer():
    model = models.build_model("resnet20", CIFAR).eval()
    first = next(iter(model.named_children()))
    assert first[0] == "normalize"
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR.std).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), (x - mean) / std)
    assert "normalize.mean" not in model.state_dict()  # constants, not checkpoint state


def test_resnet20_module_paths():
    names = dict(models.build_model("resnet20", CIFAR).named_modules())
    for path in ("conv1", "bn1", "layer1.0.conv1", "layer2.0.shortcut.0", "layer2.0.shortcut.1",
                 "layer3.2.bn2", "linear"):
        assert path in names, path
    assert isinstance(names["layer2.0.shortcut.0"], torch.nn.Conv2d)


def test_unknown_architecture():
    with pytest.raises(BenchError, match="did you mean 'resnet20'"):
        models.build_model("resnet2O", CIFAR)
