"""A third-party plugin package used by the tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bench.api import Attack, Defended, Defense, Param


class ToyDefense(Defense):
    """Toy third-party defense: the standard base model with its logits scaled (same predictions)."""

    PARAMS = {"scale": Param(2.0, "logit scale", above=0)}

    def build(self, ctx) -> Defended:
        base = ctx.base("standard")
        model = torch.nn.Sequential(base, _Scale(self.params.scale)).eval()
        return Defended(model=model, info={"scale": self.params.scale, "plugin": "bench-toy-plugin"})


class _Scale(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class BlockingAttack(Attack):
    """Toy attack that returns x unchanged; with BENCH_TOY_BLOCK=FILE it writes FILE and hangs (kill tests)."""

    PARAMS = {"eps": Param(0.1, "budget", above=0, preset="eps")}

    def perturb(self, model, x, y):
        marker = os.environ.get("BENCH_TOY_BLOCK")
        if marker:
            Path(marker).write_text(str(os.getpid()))
            time.sleep(3600)
        return x.clone()
