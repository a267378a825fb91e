"""PGD attacks on the shared PGD loop of `bench.pgd` (best iterate, one forward+backward per step)."""

from __future__ import annotations

import torch

from bench import state
from bench.api import Attack, Param
from bench.pgd import pgd


class PGD10(Attack):
    """PGD-10, L-inf, step eps/4 (2/255 at 8/255), uniform random start; returns the best iterate."""

    PARAMS = {
        "eps": Param(8 / 255, "L-inf budget", above=0, high=1, preset="eps"),
        "alpha": Param(None, "step size; default eps/4", kind=float, above=0),
        "steps": Param(10, "iterations", low=1),
        "restarts": Param(1, "random restarts; the best iterate over all is kept", low=1),
    }
    order = 20

    def setup(self, ctx, defended) -> None:
        self.generator = ctx.generator(f"attack:{self.name}")

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        alpha = p.alpha if p.alpha is not None else p.eps / 4
        # A defense may run BN in batch-statistics mode at inference; its buffers are put back after.
        with state.preserved(model):
            return pgd(model, x, y, eps=p.eps, alpha=alpha, steps=p.steps, restarts=p.restarts,
                       generator=getattr(self, "generator", None))
