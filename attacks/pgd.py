"""The PGD family on the shared loop of `bench.projected_gradient` (best iterate over steps and restarts;
one forward and one input-gradient backward per step, on the whole batch, so batch-dependent defenses are
attacked in their own composition).

- `pgd10`: L-inf, 10 steps of eps/4 (2/255 at 8/255), uniform random start.
- `pgd50`: 50 steps, 5 restarts: the stronger budget for monotonicity checks.
- `cw_inf`: PGD on the CW margin loss, kappa = 50, 30 steps: what AT papers call CW-inf (L-inf only: its
  L2 counterpart is `cw_l2`).

`pgd10` and `pgd50` take `norm=L2` (normalised-gradient steps, a random start inside the ball); the budget's
default follows the norm (the preset's eps_l2), and so does the step: eps/4 for both norms, which at 10 steps
is also the 2.5 eps / steps of Madry et al.'s robustness library (one rule for every norm and step count).
L1 needs a sparse step and the L1-and-box projection: `apgd[norm=L1]`.
"""

from __future__ import annotations

import torch

from bench.api import Attack, Param, ce_loss, cw_loss, pgd, preserved, threat_params


EPS = Param(8 / 255, "L-inf budget", above=0, high=1, preset="eps")
THREAT = threat_params(("Linf", "L2"))  # norm and eps, the budget's default following the norm
ALPHA = Param(None, "step size; default eps/4", kind=float, above=0)
EOT = Param(0, "gradient samples per step (0: 20 against a randomized defense, else 1)", low=0)


class _PGDFamily(Attack):
    access = "white-box"

    def loss(self):
        return ce_loss

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        alpha = p.alpha if p.alpha is not None else p.eps / 4
        # A defense may run BN on batch statistics at inference; its buffers are put back afterwards.
        eot = p.eot or (20 if self.randomized else 1)
        with preserved(model):
            return pgd(model, x, y, eps=p.eps, alpha=alpha, steps=p.steps, norm=self.norm, restarts=p.restarts,
                       loss=self.loss(), generator=self.generator, eot=eot)


class PGD10(_PGDFamily):
    """PGD-10, L-inf (or L2: norm=L2), step eps/4 (2/255 at 8/255), random start; returns the best iterate."""

    PARAMS = {**THREAT, "alpha": ALPHA, "steps": Param(10, "iterations", low=1),
              "restarts": Param(1, "random restarts; the best iterate over all is kept", low=1), "eot": EOT}
    order = 20
    stronger_than = ("fgsm",)  # iterated FGSM with a random start
    in_check = True
    in_default = True


class PGD50(_PGDFamily):
    """PGD-50 with 5 random restarts, L-inf (or L2): the larger budget for budget-monotonicity checks."""

    PARAMS = {**THREAT, "alpha": ALPHA, "steps": Param(50, "iterations", low=1),
              "restarts": Param(5, "random restarts; the best iterate over all is kept", low=1), "eot": EOT}
    order = 40
    stronger_than = ("pgd10",)  # more steps and restarts at the same budget
    in_check = True


class CWInf(_PGDFamily):
    """CW-inf: PGD on the Carlini-Wagner margin loss (kappa 50), 30 steps, L-inf."""

    PARAMS = {"eps": EPS, "alpha": ALPHA, "steps": Param(30, "iterations", low=1),
              "restarts": Param(1, "random restarts", low=1),
              "kappa": Param(50.0, "confidence margin of the CW loss", low=0.0), "eot": EOT}
    order = 30

    def loss(self):
        return cw_loss(self.params.kappa)
