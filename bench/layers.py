"""Layer bookkeeping shared by the fine-tuning defenses: which modules exist, their exact parameters,
BN in batch-statistics mode without buffer updates, and state-dict interpolation."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from bench.errors import BenchError, did_you_mean

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
WEIGHT_TYPES = (nn.Conv2d, nn.Linear)


def module_kind(module: nn.Module) -> str:
    """'bn', 'conv', 'linear', or the class name of any other module: the kinds RiFT and the fine-tuning
    defenses choose layers by."""
    if isinstance(module, BN_TYPES):
        return "bn"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__


def bn_modules(model: nn.Module, needed_by: str = "") -> list[tuple[str, nn.Module]]:
    """(path, module) of every batch-norm layer, in definition order. `needed_by` (e.g. "ft_bn") makes a model
    without any (a user's model) a clear error naming what needs them."""
    return _required([(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)], needed_by,
                     "batch-norm layers (BatchNorm1d/2d/3d)")


def weight_modules(model: nn.Module, needed_by: str = "") -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers in definition order (stem, shortcuts and classifier included); `needed_by`
    as for `bn_modules`."""
    return _required([(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)], needed_by,
                     "Conv2d or Linear layers")


def _required(found: list, needed_by: str, what: str) -> list:
    if needed_by and not found:
        raise BenchError(f"{needed_by} needs {what}, and this model has none")
    return found


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module at exactly `path` ('conv1' is never 'layer1.0.conv1')."""
    table = dict(model.named_modules())
    if path not in table or path == "":
        raise BenchError(f"model has no module '{path}'{did_you_mean(path, [n for n in table if n])}")
    return table[path]


def own_parameters(model: nn.Module, path: str) -> list[nn.Parameter]:
    """The parameters that belong to the module at `path` itself (not its children)."""
    return list(module_at(model, path).parameters(recurse=False))


def parameter_names(model: nn.Module, paths) -> set[str]:
    paths = set(paths)
    return {name for name, _ in model.named_parameters() if name.rpartition(".")[0] in paths}


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Every BN layer normalises with the current batch's statistics and leaves its buffers untouched
    (train-mode BN without running-statistics updates), whatever the model's modes are."""
    saved = [(m, m.training, m.track_running_stats) for _, m in bn_modules(model)]
    try:
        for m, _, _ in saved:
            m.training = True
            m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            m.track_running_stats = track


def interpolate_weights(theta_a: dict, theta_b: dict, alpha: float) -> dict:
    """alpha * theta_b + (1 - alpha) * theta_a over the whole state dict, buffers included.

    Entries equal in both are copied unchanged (alpha*w + (1-alpha)*w is not bit-exactly w), so
    frozen parameters stay bit-identical; integer buffers (BN batch counters) are taken from theta_b.
    """
    out = {}
    for key, a in theta_a.items():
        b = theta_b[key]
        if torch.equal(a, b) or not a.is_floating_point():
            out[key] = (b if alpha > 0 else a).clone()
        else:
            out[key] = alpha * b + (1 - alpha) * a
    return out
