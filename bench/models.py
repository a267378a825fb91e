"""Models: the built-in architectures, and how a model name (built-in, third-party, import path, or an
in-process instance) becomes a network. Input normalisation is the built-ins' first layer, so attacks work
in [0,1] pixel space; `--normalize` puts it in front of a model that lacks it.

Module paths follow the usual CIFAR code (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.shortcut.0`,
`linear`) because RiFT and the layer-type defenses address modules by exact path.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import math
import os
import re
import sys
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import BenchError, did_you_mean, file_safe, unknown


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


# ----------------------------------------------------------------------------------------------------
# Model factories: `(num_classes, input_spec) -> nn.Module`, images in [0,1] in, logits out. `input_spec`
# is the run's dataset spec (channels, size, mean, std: the dataset's standard constants). The built-ins
# below are registered in the `bench.models` entry-point group of pyproject.toml, exactly as a third-party
# package registers its own.


def tiny_cnn(num_classes: int, spec) -> nn.Module:
    """Two conv layers with BN (the smoke preset's model, for tests)."""
    return TinyCNN(spec.channels, num_classes, spec.mean, spec.std)


def small_cnn(num_classes: int, spec) -> nn.Module:
    """Three conv layers with BN (the quick preset's model, for 8x8 digits)."""
    return SmallCNN(spec.channels, num_classes, spec.mean, spec.std)


def resnet20(num_classes: int, spec) -> nn.Module:
    """CIFAR ResNet-20 (16/32/64 channels, 0.27M parameters)."""
    return ResNet(BasicBlock, [(16, 3), (32, 3), (64, 3)], spec.channels, num_classes, spec.mean, spec.std)


def resnet18(num_classes: int, spec) -> nn.Module:
    """CIFAR ResNet-18 (3x3 stem, no max-pool; 11.2M parameters)."""
    return ResNet(BasicBlock, [(64, 2), (128, 2), (256, 2), (512, 2)], spec.channels, num_classes, spec.mean,
                  spec.std)


def preact_resnet18(num_classes: int, spec) -> nn.Module:
    """Pre-activation ResNet-18 (11.2M parameters)."""
    return ResNet(PreActBlock, [(64, 2), (128, 2), (256, 2), (512, 2)], spec.channels, num_classes, spec.mean,
                  spec.std, preact=True)


def wrn34_10(num_classes: int, spec) -> nn.Module:
    """WideResNet-34-10 as in TRADES / RiFT (46.2M parameters)."""
    return WideResNet(spec.channels, num_classes, spec.mean, spec.std, 34, 10)


# ----------------------------------------------------------------------------------------------------
# Naming a model: an entry-point name (`bench list`), an import path `pkg.module:factory`, or the name
# `register_instance` gave an in-process model.

IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_INSTANCES: dict[str, nn.Module] = {}


def is_import_path(name: str) -> bool:
    return bool(IMPORT_PATH.fullmatch(name))


def factory_of(name: str) -> Callable[[int, Any], nn.Module]:
    """The factory a model name stands for; a name that resolves to none is one clear BenchError."""
    if not isinstance(name, str) or not name.strip():
        raise BenchError("a model name must be a non-empty string")
    if name in _INSTANCES:
        instance = _INSTANCES[name]
        return lambda num_classes, spec: copy.deepcopy(instance)
    if ":" in name:
        if not is_import_path(name):
            raise BenchError(f"model '{name}' is not an import path: expected pkg.module:factory (a module "
                             f"importable by Python, then the name of a function in it)")
        return _imported(name)
    from bench import registry  # (registry imports the plugin contract; models stays below it)

    if name not in registry.providers("model"):
        raise BenchError(str(unknown("model", name, registry.providers("model"))) +
                         "; or name your own factory as pkg.module:function")
    return registry.load("model", name)


def _imported(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    # `bench run --model mymodel:factory` beside mymodel.py works as `python -c "import mymodel"` would
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: its own error, on one line
        raise BenchError(f"model '{path}': cannot import {module_name}: {_one_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise BenchError(f"model '{path}': {module_name} has no attribute '{attr}'{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BenchError(f"model '{path}': {attr} is a {type(obj).__name__}, not a factory function")
    return obj


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


INSTANCE_NAME = re.compile(r"[\w.<>]+@[0-9a-f]{16}")  # what register_instance returns


def file_label(name: str) -> str:
    """A model name as a file-name part (leaderboard and cache files): an import path or an instance name
    made safe (`errors.file_safe`); any other name as it is, for the caller to check (a hostile results
    database must still be refused, not renamed)."""
    return file_safe(name) if is_import_path(name) or INSTANCE_NAME.fullmatch(name) else name


def _module_of(name: str) -> str:
    """The module that defines a model's factory ("" for an instance or an unknown name)."""
    if name in _INSTANCES:
        return ""
    if is_import_path(name):
        return name.partition(":")[0]
    from bench import registry

    prov = registry.providers("model").get(name)
    return prov.value.partition(":")[0] if prov else ""


def is_instance(name: str) -> bool:
    """Whether `name` stands for a model object given in this process (register_instance), weights and all."""
    return name in _INSTANCES


def is_builtin(name: str) -> bool:
    """Whether `name` is one of bnbench's own architectures (which never load weights themselves)."""
    return _module_of(name) == __name__


def source_digest(name: str) -> str:
    """sha256 of the source file of the module that defines a model's factory, for a model from outside
    bnbench (an import path, a third-party entry point): part of the run identity, so editing the model's
    code makes a new run instead of reusing stored results. "" for the built-ins (bnbench's own code
    version is recorded with each run) and for registered instances (named by their weights)."""
    module_name = _module_of(name)
    if not module_name or module_name == "bench" or module_name.startswith("bench."):
        return ""
    factory_of(name)  # imported, or a clear error
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def state_digest(model: nn.Module) -> str:
    """sha256 of a model's state dict: names, dtypes, shapes and bytes of every entry, in key order."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def register_instance(model: nn.Module) -> str:
    """A model name for an in-process `model` (images in [0,1] -> logits), for APIs that take a model
    object rather than a factory: `build_model(name, spec)` then returns a deepcopy of the model as it was
    when registered (a snapshot: later changes to `model` do not change what the name means).

    The name is `module.ClassQualname@<first 16 hex digits of the state dict's sha256>`, so the same class
    with the same weights gets the same name in any process, and a resumed run finds its stored results.
    It lives in this process only: register the model again (same weights, same name) in a new one."""
    if not isinstance(model, nn.Module):
        raise BenchError(f"register_instance takes a torch.nn.Module, got {type(model).__name__}")
    cls = type(model)
    name = f"{cls.__module__}.{cls.__qualname__}@{state_digest(model)[:16]}"
    _INSTANCES[name] = copy.deepcopy(model)
    return name


def build_model(name: str, spec, normalize: tuple | None = None) -> nn.Module:
    """A fresh model for a dataset spec (channels, size, classes, normalisation constants), by model name
    (see `factory_of`). `normalize` = (means, stds), one per channel: input normalisation put in front of
    the model (`add_input_normalization`) for a model trained on normalised inputs."""
    factory = factory_of(name)
    try:
        model = factory(spec.num_classes, spec)
    except BenchError:
        raise
    except Exception as exc:  # the model's own code: its error on one line, as the user's to fix
        raise BenchError(f"model '{name}' could not be built: {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise BenchError(f"model '{name}': its factory returned {type(model).__name__}, not a torch.nn.Module")
    if normalize is not None:
        add_input_normalization(model, *normalize)
    return model


def check_outputs(model: nn.Module, name: str, spec) -> None:
    """A model of the run's data answers two images (in eval mode) with (2, num_classes) finite logits, or
    this says what it does instead, on one line."""
    x = torch.rand(2, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:
        raise BenchError(f"model '{name}' fails on a batch of images of shape {tuple(x.shape)}: "
                         f"{_one_line(exc)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes) or not out.is_floating_point():
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise BenchError(f"model '{name}' must return logits of shape (batch, {spec.num_classes}) for this data, "
                         f"got {got}")
    if not bool(torch.isfinite(out).all()):  # every prediction would be argmax(NaN): class 0, read as accuracy
        raise BenchError(f"model '{name}' returns non-finite logits (NaN or inf) for a batch of images of shape "
                         f"{tuple(x.shape)}; its predictions would mean nothing")


# ----------------------------------------------------------------------------------------------------
# Input normalisation of a model trained on normalised inputs: attacks still work in [0,1].

_MEAN, _STD = "bench_input_mean", "bench_input_std"


def _normalize_input(module: nn.Module, args: tuple):
    x = args[0]
    return ((x - getattr(module, _MEAN)) / getattr(module, _STD),) + tuple(args[1:])


def add_input_normalization(model: nn.Module, mean, std) -> nn.Module:
    """`model(x)` computes model((x - mean) / std), one mean and std per channel. State-dict keys and
    module paths stay as they were (RiFT and checkpoint loading address modules by path): the constants are
    non-persistent buffers of the model itself (so `.to(device)` and deepcopy carry them, and checkpoints
    do not), and a forward pre-hook, which reads them from the module it is called on, applies them."""
    if hasattr(model, _MEAN):
        raise BenchError("the model already has bench's input normalisation")
    model.register_buffer(_MEAN, torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    model.register_buffer(_STD, torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    model.register_forward_pre_hook(_normalize_input)
    return model


def parse_normalize(text: str | None, channels: int, datasets: dict) -> tuple | None:
    """`--normalize`: none; MEAN,STD (every channel); C means then C stds; or a dataset name (its standard
    constants). Returns (means, stds), one per channel, or None."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    text = text.strip()
    if text in datasets:
        mean, std = tuple(datasets[text].mean), tuple(datasets[text].std)
        if len(mean) != channels:
            raise BenchError(f"--normalize {text}: that dataset has {len(mean)} channel(s), this one {channels}")
    else:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise BenchError(f"--normalize expects none, MEAN,STD, {channels} means then {channels} stds, or a "
                             f"dataset name ({', '.join(sorted(datasets))}); got '{text}'") from None
        if len(values) == 2:
            mean, std = (values[0],) * channels, (values[1],) * channels
        elif len(values) == 2 * channels:
            mean, std = tuple(values[:channels]), tuple(values[channels:])
        else:
            more = f" or {2 * channels} ({channels} means, then {channels} stds)" if channels > 1 else ""
            raise BenchError(f"--normalize takes 2 values (one mean, one std){more} for these {channels}-channel "
                             f"images, got {len(values)}")
    if not all(math.isfinite(v) for v in mean + std):
        raise BenchError(f"--normalize values must be finite numbers, got '{text}'")
    if min(std) <= 0:
        raise BenchError(f"--normalize: every std must be > 0, got {', '.join(map(str, std))}")
    return mean, std
