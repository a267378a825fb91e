"""AutoAttack (Croce & Hein 2020) from pyautoattack: the standard version, and the randomized-defense
version with EOT.

pyautoattack re-batches survivors between its attacks and inside them; against a batch-dependent defense
every call is rebuilt inside the evaluator's whole batch (bench.composition.BatchComposition), and the
harness's verdict is one forward of the full adversarial batch, never AutoAttack's own bookkeeping.
"""

from __future__ import annotations

import logging

import torch

from bench.api import Attack, BenchError, FixedModes, Param, finish, preserved


class AutoAttack(Attack):
    """AutoAttack, standard: APGD-CE, APGD-T, FAB-T, Square (5000 queries), via pyautoattack."""

    PARAMS = {
        "eps": Param(8 / 255, "L-inf budget", above=0, high=1, preset="eps"),
        "n_target_classes": Param(9, "target classes of APGD-T and FAB-T", low=1),
    }
    version = "standard"
    order = 70
    randomized_variant = "autoattack_rand"
    reported_as = "AutoAttack"
    # access stays "": its gradient stages end in Square, so it is neither side of the black-box check

    def validate(self, spec) -> None:
        if spec.num_classes < 4:  # the targeted DLR loss reads the 4th-largest logit
            raise BenchError(f"attack '{self.name}' needs at least 4 classes (DLR loss); the data has {spec.num_classes}")
        if self.version == "standard" and self.params.n_target_classes > spec.num_classes - 1:
            raise BenchError(f"attack '{self.name}': {self.params.n_target_classes} target classes but the data "
                             f"has {spec.num_classes} classes (at most {spec.num_classes - 1} targets)")

    def adversary(self, model: torch.nn.Module, device):
        from pyautoattack import AutoAttack as Reference

        aa = Reference(model, norm="Linf", eps=self.params.eps, version=self.version, seed=self.seed, device=device)
        if self.version == "standard":
            aa.apgd_targeted.n_target_classes = self.params.n_target_classes
            aa.fab.n_target_classes = self.params.n_target_classes
        aa.verbose = False
        return aa

    def perturb(self, model, x, y):
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        with preserved(model):
            wrapped = self.composed(model, x, y)
            x_adv, _ = self.adversary(FixedModes(wrapped), x.device).run_standard_evaluation(
                x, y, batch_size=len(x))
            return finish(wrapped, x_adv)


class AutoAttackRand(AutoAttack):
    """AutoAttack for randomized defenses: APGD-CE and APGD-DLR with EOT over 20 draws (pyautoattack 'rand')."""

    PARAMS = {"eps": Param(8 / 255, "L-inf budget", above=0, high=1, preset="eps")}
    version = "rand"
    order = 71
    in_all = False  # run instead of autoattack against randomized defenses
    randomized_variant = ""
