"""Running torchattacks attacks without letting them change the model.

torchattacks calls `.eval()` (and `.train()` afterwards) on the whole model, which loses mixed per-module
modes and would attack a different function than the defense's inference procedure. The model is wrapped
so each forward runs in the modes it had, and modes and buffers are restored afterwards.
"""

from __future__ import annotations

from typing import Callable

import torch

from bench.api import BenchError, FixedModes, preserved


def torchattacks():
    try:
        import torchattacks as ta
    except ImportError as exc:  # installed without dependencies on purpose, see README
        raise BenchError("torchattacks is not installed: pip install --no-deps torchattacks==3.5.1 "
                         f"({exc})") from None
    return ta


def run(make: Callable[[torch.nn.Module], object], model: torch.nn.Module, x: torch.Tensor,
        y: torch.Tensor) -> torch.Tensor:
    """`make(wrapped_model)` builds a torchattacks attack; it runs on (x, y) with the model untouched."""
    with preserved(model):
        attack = make(FixedModes(model))
        x_adv = attack(x, y)
    return x_adv.detach()
