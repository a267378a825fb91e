"""Carlini-Wagner L2 (torchattacks), counted as a success only within the L2 budget.

torchattacks' CW returns, per sample, the successful iterate of smallest L2 norm (or the clean image).
Perturbations larger than eps are scaled back onto the eps-sphere (decision, METHODS.md: success only
within ||delta||_2 <= 0.5), so the returned batch respects the budget.
"""

from __future__ import annotations

from attacks import torchattacks_adapter as ta
from attacks.found_norms import FoundNorms

from bench.api import Attack, Param, project


class CWL2(Attack):
    """Carlini-Wagner L2 (torchattacks, Adam on tanh-space), success only within ||delta||_2 <= eps."""

    PARAMS = {
        "eps": Param(0.5, "L2 budget", above=0, preset="eps_l2"),
        "c": Param(1.0, "weight of the margin term", above=0),
        "kappa": Param(0.0, "confidence", low=0.0),
        "steps": Param(50, "Adam steps", low=1),
        "lr": Param(0.01, "Adam learning rate", above=0),
    }
    norm = "L2"
    order = 45
    access = "white-box"

    def __init__(self, **params):
        super().__init__(**params)
        self._found = FoundNorms()

    def perturb(self, model, x, y):
        p = self.params
        lib = ta.torchattacks()
        wrapped = self.composed(model, x, y)
        x_cw = ta.run(lambda m: lib.CW(m, c=p.c, kappa=p.kappa, steps=p.steps, lr=p.lr), wrapped, x, y)
        norms = (x_cw - x).flatten(1).norm(dim=1)
        self._found.add(norms[norms > 0])
        return project(x_cw, x, p.eps, "L2")

    def extra(self) -> dict:
        return self._found.summary("median_found_l2", "found")
