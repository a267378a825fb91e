"""AutoAttack (Croce & Hein 2020) from pyautoattack: the standard version, and the randomized-defense
version with EOT; and APGD (its first stage) alone.

Every one takes `norm` (Linf, L2 or L1, as pyautoattack does), the budget's default following it (the
preset's eps, eps_l2, eps_l1). For L1 pyautoattack's standard version runs APGD with 5 restarts and a
decreasing-budget schedule (3, 2, 1 x eps: `use_largereps`), APGD-T on 5 target classes, FAB-T and L1 Square
(Croce & Hein 2021, "Mind the box"); unless the user sets `n_target_classes`, the library's choice stands,
so that the verdicts are its own.

pyautoattack re-batches survivors between its attacks and inside them; against a batch-dependent defense
every call is rebuilt inside the evaluator's whole batch (bench.composition.BatchComposition), and the
harness's verdict is one forward of the full adversarial batch, never AutoAttack's own bookkeeping.
"""

from __future__ import annotations

import logging

import torch

from bench.api import Attack, BenchError, FixedModes, Param, finish, preserved, threat_params

# pyautoattack's own target counts in its standard version: APGD-T (5 for L1) and FAB-T
LIBRARY_TARGETS = {"Linf": (9, 9), "L2": (9, 9), "L1": (5, 9)}


class _PyAutoAttack(Attack):
    """Runs a pyautoattack attack on the model seen through the whole batch (`Attack.composed`)."""

    def adversary(self, model: torch.nn.Module, device):
        raise NotImplementedError

    def run(self, adversary, x, y) -> torch.Tensor:
        raise NotImplementedError

    def perturb(self, model, x, y):
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        with preserved(model):
            wrapped = self.composed(model, x, y)
            return finish(wrapped, self.run(self.adversary(FixedModes(wrapped), x.device), x, y))


class AutoAttack(_PyAutoAttack):
    """AutoAttack, standard: APGD-CE, APGD-T, FAB-T, Square (5000 queries), via pyautoattack; L-inf, L2 or L1."""

    PARAMS = {
        **threat_params(),
        "n_target_classes": Param(None, "target classes of APGD-T and FAB-T (default: pyautoattack's, 9; "
                                  "APGD-T 5 for L1)", kind=int, low=1),
    }
    version = "standard"
    order = 70
    randomized_variant = "autoattack_rand"
    reported_as = "AutoAttack"
    # access stays "": its gradient stages end in Square, so it is neither side of the black-box check

    def targets(self) -> tuple[int, int]:
        """(APGD-T, FAB-T) target classes."""
        given = self.params.get("n_target_classes")
        return (given, given) if given is not None else LIBRARY_TARGETS[self.norm]

    def validate(self, spec) -> None:
        if spec.num_classes < 4:  # the targeted DLR loss reads the 4th-largest logit
            raise BenchError(f"attack '{self.name}' needs at least 4 classes (DLR loss); the data has {spec.num_classes}")
        if self.version == "standard" and max(self.targets()) > spec.num_classes - 1:
            raise BenchError(f"attack '{self.name}': {max(self.targets())} target classes but the data "
                             f"has {spec.num_classes} classes (at most {spec.num_classes - 1} targets)")

    def adversary(self, model: torch.nn.Module, device):
        from pyautoattack import AutoAttack as Reference

        aa = Reference(model, norm=self.norm, eps=self.params.eps, version=self.version, seed=self.seed,
                       device=device)
        if self.version == "standard":
            aa.apgd_targeted.n_target_classes, aa.fab.n_target_classes = self.targets()
        aa.verbose = False
        return aa

    def run(self, adversary, x, y):
        return adversary.run_standard_evaluation(x, y, batch_size=len(x))[0]


class AutoAttackRand(AutoAttack):
    """AutoAttack for randomized defenses: APGD-CE and APGD-DLR with EOT over 20 draws (pyautoattack 'rand')."""

    PARAMS = threat_params()
    version = "rand"
    order = 71
    in_all = False  # run instead of autoattack against randomized defenses
    randomized_variant = ""


class APGD(_PyAutoAttack):
    """APGD (pyautoattack), L-inf, L2 or L1: AutoAttack's first stage alone, e.g. `apgd[norm=L1]`."""

    PARAMS = {
        **threat_params(),
        "loss": Param("ce", "ce or dlr (the DLR loss needs 3 classes)", choices=("ce", "dlr")),
        "iters": Param(100, "iterations per restart", low=1),
        # AutoAttack's standard version: 1 restart for L-inf and L2, 5 for L1 (whose steps are sparse)
        "restarts": Param(1, "restarts (default: AutoAttack's, 1; 5 for L1)", low=1, follows="norm",
                          cases={"L1": dict(default=5)}),
        "eot": Param(0, "gradient samples per step (0: 20 against a randomized defense, else 1)", low=0),
    }
    order = 60
    access = "white-box"
    in_all = False  # AutoAttack runs it first; name it to run it alone (the suite's L1 attack: apgd[norm=L1])

    def validate(self, spec) -> None:
        if self.params.loss == "dlr" and spec.num_classes < 3:
            raise BenchError(f"attack '{self.name}': the DLR loss needs at least 3 classes; the data has "
                             f"{spec.num_classes}")

    def adversary(self, model: torch.nn.Module, device):
        from pyautoattack.autopgd_base import APGDAttack

        p = self.params
        # L1: the decreasing-budget schedule of AutoAttack's L1 version (pyautoattack allows it for L1 only)
        return APGDAttack(model, n_iter=p.iters, norm=self.norm, n_restarts=p.restarts, eps=p.eps, loss=p.loss,
                          eot_iter=p.eot or (20 if self.randomized else 1), seed=self.seed, device=device,
                          verbose=False, use_largereps=self.norm == "L1")

    def run(self, adversary, x, y):
        return adversary.perturb(x, y)
