"""FGSM (Goodfellow et al.), via torchattacks."""

from __future__ import annotations

import torch

from attacks import torchattacks_adapter as ta

from bench.api import Attack, Param, finish


class FGSM(Attack):
    """FGSM: one signed-gradient step of size eps on the cross-entropy (torchattacks)."""

    PARAMS = {"eps": Param(8 / 255, "L-inf budget (the norm-shaping slides used 16/255)", above=0, high=1,
                           preset="eps")}
    order = 10
    access = "white-box"
    in_check = True
    in_default = True

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lib = ta.torchattacks()
        wrapped = self.composed(model, x, y)
        return finish(wrapped, ta.run(lambda m: lib.FGSM(m, eps=self.params.eps), wrapped, x, y))
