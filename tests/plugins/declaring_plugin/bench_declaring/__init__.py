"""Third-party attacks that declare themselves to the checks and exports: the core knows none by name.

They return x unchanged (the checks read only their stored cells); what matters is what they declare.
"""

from __future__ import annotations

from bench.api import Attack, Param


class _Unchanged(Attack):
    PARAMS = {"eps": Param(8 / 255, "L-inf budget", above=0, high=1, preset="eps"),
              "queries": Param(10, "unused: a parameter a user can set", low=1)}
    in_all = False  # keep `--attacks all` of other tests as it was

    def perturb(self, model, x, y):
        return x.clone()


class ToyGradient(_Unchanged):
    """Toy white-box attack that declares itself stronger than pgd10 (check 7) and white-box (check 8)."""

    access = "white-box"
    stronger_than = "pgd10"  # one name is enough
    in_default = True  # run when --attacks is not given


class ToyQuery(_Unchanged):
    """Toy black-box attack (check 8), run by `bench check`."""

    access = "black-box"
    in_check = True


class ToyStandard(_Unchanged):
    """Toy attack reported as the standard AutoAttack evaluation in exports."""

    reported_as = "AutoAttack"
