"""A third-party plugin package used by the tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bench.api import Attack, Defended, Defense, Param, batch_statistics


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


class RandomNoiseDefense(Defense):
    """Toy randomized defense: Gaussian noise on the input at every forward (EOT attacks needed)."""

    PARAMS = {"sigma": Param(0.05, "noise level", above=0),
              "declare": Param(False, "declare randomized=True (by default it hides it)")}

    def build(self, ctx) -> Defended:
        model = torch.nn.Sequential(_Noise(self.params.sigma), ctx.base("standard")).eval()
        return Defended(model=model, randomized=self.params.declare)


class _Noise(torch.nn.Module):
    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        return x + self.sigma * torch.randn_like(x)


class RoundingDefense(Defense):
    """Toy gradient masking: inputs quantised to 1/4 steps before the standard model (zero gradients)."""

    def build(self, ctx) -> Defended:
        return Defended(model=torch.nn.Sequential(_Round(), ctx.base("standard")).eval())


class _Round(torch.nn.Module):
    def forward(self, x):
        return torch.round(x * 4) / 4


class UndeclaredBatchStats(Defense):
    """Toy that normalises with batch statistics at inference but does not declare batch_dependent."""

    def build(self, ctx) -> Defended:
        base = ctx.base("standard")

        class BatchStats(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = base

            def forward(self, x):
                with batch_statistics(self.net):
                    return self.net(x)

        return Defended(model=BatchStats().eval())


class BlockingAttack(Attack):
    """Toy attack that returns x unchanged; with BENCH_TOY_BLOCK=FILE it writes FILE and hangs (kill tests)."""

    PARAMS = {"eps": Param(0.1, "budget", above=0, preset="eps")}

    def perturb(self, model, x, y):
        marker = os.environ.get("BENCH_TOY_BLOCK")
        if marker:
            Path(marker).write_text(str(os.getpid()))
            time.sleep(3600)
        return x.clone()
