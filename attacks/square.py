"""Square Attack (Andriushchenko et al. 2020), black-box, L-inf, via torchattacks."""

from __future__ import annotations

from attacks import torchattacks_adapter as ta

from bench.api import Attack, Param, finish


class Square(Attack):
    """Square Attack: score-based black-box random search, 5000 queries, L-inf (torchattacks)."""

    PARAMS = {
        "eps": Param(8 / 255, "L-inf budget", above=0, high=1, preset="eps"),
        "queries": Param(5000, "query budget per sample", low=1),
        "p_init": Param(0.8, "initial fraction of pixels changed", above=0, high=1),
        "restarts": Param(1, "restarts", low=1),
    }
    order = 60
    access = "black-box"
    in_check = True

    def perturb(self, model, x, y):
        p = self.params
        lib = ta.torchattacks()
        make = lambda m: lib.Square(m, norm="Linf", eps=p.eps, n_queries=p.queries, n_restarts=p.restarts,
                                    p_init=p.p_init, loss="margin", resc_schedule=True, seed=self.seed)
        # Square queries only the not-yet-fooled samples: a batch-dependent target is rebuilt around them.
        wrapped = self.composed(model, x, y)
        return finish(wrapped, ta.run(make, wrapped, x, y))
