"""The adaptive attack on norm shaping: differentiate the defense's real inference batch.

PGD-10 and APGD-CE run through the batch the defense actually computes -- the shaping samples plus the
whole test chunk -- and the stronger of the two is kept per sample (judged in the defense's own
composition). `knowledge=exact`: the attacker uses the defense's own shaping samples.
`knowledge=dataset`: the attacker knows the training data but not which samples were drawn, and uses
other clean training samples of the same number (the slides' "slightly weaker" attack); the result is
still scored on the real defense.

The attacked model must offer `with_shaping(samples)` (as norm shaping's does) for `dataset` knowledge.
Against a defense that is not batch-dependent there is nothing to shape: the attack is plain PGD-10 +
APGD-CE and `extra()` says so.
"""

from __future__ import annotations

import logging

import torch

from bench.api import Attack, FixedModes, Param, best_of, finish, pgd, preserved


class Shaping(Attack):
    """Adaptive attack on norm shaping: PGD-10 + APGD-CE through the exact inference batch."""

    PARAMS = {
        "eps": Param(8 / 255, "L-inf budget", above=0, high=1, preset="eps"),
        "knowledge": Param("exact", "shaping samples known exactly, or only the training data",
                           choices=("exact", "dataset")),
        "apgd_iters": Param(100, "APGD-CE iterations (0: PGD-10 only)", low=0),
    }
    order = 50
    access = "white-box"
    batch_dependent_only = True  # plain PGD-10 + APGD-CE otherwise, which AutoAttack subsumes

    def setup(self, ctx, defended) -> None:
        super().setup(ctx, defended)
        self.note = ""
        self.surrogate_model = None
        if not defended.batch_dependent:
            self.note = "defense is not batch-dependent: shaping equals PGD-10 + APGD-CE"
            return
        if self.params.knowledge == "dataset":
            if not hasattr(defended.model, "with_shaping"):
                self.note = "defense exposes no with_shaping(): dataset knowledge fell back to exact"
                return
            own = len(getattr(defended.model, "shaping", ()))
            gen = ctx.generator("attack:shaping:dataset-samples")
            idx = torch.randperm(len(ctx.data.train), generator=gen)[:own]
            self.surrogate_model = defended.model.with_shaping(ctx.data.train.x[idx])

    def perturb(self, model, x, y):
        attacked = self.surrogate_model if self.surrogate_model is not None else model
        with preserved(model), preserved(attacked):
            eps = self.params.eps
            candidates = [pgd(attacked, x, y, eps=eps, alpha=eps / 4, steps=10, generator=self.generator)]
            if self.params.apgd_iters:
                from pyautoattack.autopgd_base import APGDAttack

                logging.getLogger("auto-attack").setLevel(logging.WARNING)
                wrapped = self.composed(attacked, x, y)
                apgd = APGDAttack(FixedModes(wrapped), n_iter=self.params.apgd_iters, norm="Linf", eps=eps,
                                  loss="ce", n_restarts=1, seed=self.seed, device=x.device, verbose=False)
                candidates.append(finish(wrapped, apgd.perturb(x, y)))
            # per sample, the candidate the real defense gets wrong (else the higher loss), each judged by a
            # full-batch forward in the defense's own composition
            return best_of(model, y, candidates)

    def extra(self) -> dict:
        return {"note": self.note} if getattr(self, "note", "") else {}
