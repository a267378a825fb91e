"""Model state bookkeeping: per-module train/eval flags, buffers, and a digest of everything.

Attacks must leave a model exactly as they found it. `model.eval()`/`model.train()` lose mixed modes
(e.g. a defense that keeps some BN layers in batch-statistics mode), so modes are saved per module.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def restore_modes(model: nn.Module, saved: dict[str, bool]) -> None:
    for name, m in model.named_modules():
        if name in saved:
            m.training = saved[name]


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    saved = modes(model)
    try:
        yield
    finally:
        restore_modes(model, saved)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """BN in eval mode for the block (as when crafting PGD-AT examples), then the exact previous modes."""
    with kept_modes(model):
        model.eval()
        yield


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore per-module modes and every buffer (e.g. BN running statistics) after the block."""
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    with kept_modes(model):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), saved_buffers):
                    b.copy_(saved)


def digest(model: nn.Module) -> str:
    """sha256 of parameters, buffers and per-module modes: equal digests mean an untouched model."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for name, training in modes(model).items():
        h.update(f"{name}:{int(training)};".encode())
    return h.hexdigest()


class FixedModes(nn.Module):
    """Wraps a model so that every forward runs in the per-module modes it had when wrapped.

    Libraries that call `.eval()` on the model they attack (torchattacks) would otherwise attack a
    different function than the defense's inference procedure.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.saved = modes(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        restore_modes(self.inner, self.saved)
        return self.inner(x)
