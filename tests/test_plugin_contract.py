"""The plugin contract as the README states it: every documented way of writing a plugin works, and every
way of getting it wrong is one clear error (BenchError, exit 2), never an AttributeError traceback."""

from __future__ import annotations

import math

import pytest
import torch

from bench.api import Attack, Context, Defended, Defense, Param, resolve_params
from bench.errors import BenchError


def build(cls, **given):
    """What the runner does: complete the given parameters from the class's declarations, construct."""
    return cls(**resolve_params(cls.__name__, cls.PARAMS, given))


class _Step(Attack):
    def perturb(self, model, x, y):
        return x.clone()


# ------------------------------------------------------------------------------------ attack: eps, norm


class ClassAttributes(_Step):
    norm = "L2"
    eps = 0.5


class AssignsAfterSuper(_Step):
    norm = "L2"

    def __init__(self, eps=8 / 255, **kw):
        super().__init__(**kw)
        self.eps = eps


class AssignsBeforeSuper(_Step):
    def __init__(self, eps=0.25, steps=3):
        self.eps = eps
        self.steps = steps
        super().__init__()


class NoSuperCall(_Step):
    def __init__(self, eps=0.2, norm="L2"):
        self.eps = eps
        self.norm = norm


class ClassAttributeAndInit(_Step):
    eps = 0.3

    def __init__(self, steps=3):  # takes no eps: the parameter is not passed to it
        super().__init__()
        self.steps = steps


class Declared(_Step):
    PARAMS = {"eps": Param(0.1, "budget", above=0), "steps": Param(5, "steps", low=1)}


@pytest.mark.parametrize("cls, norm, eps", [
    (ClassAttributes, "L2", 0.5), (AssignsAfterSuper, "L2", 8 / 255), (AssignsBeforeSuper, "Linf", 0.25),
    (NoSuperCall, "L2", 0.2), (ClassAttributeAndInit, "Linf", 0.3), (Declared, "Linf", 0.1)])
def test_every_documented_form_of_eps_and_norm_works(cls, norm, eps):
    attack = build(cls)
    assert (attack.norm, attack.eps) == (norm, pytest.approx(eps))
    assert attack.params["eps"] == pytest.approx(eps)  # what the runner stores with the cell
    assert attack.threat.startswith(f"{norm} eps=")
    # and the budget is a parameter like any other: --attack-param NAME.eps=... / NAME[eps=...]
    changed = build(cls, eps="1/255")
    assert changed.eps == pytest.approx(1 / 255) and changed.params["eps"] == pytest.approx(1 / 255)


def test_keyword_arguments_of_init_are_parameters():
    attack = build(AssignsBeforeSuper, steps="7")
    assert attack.steps == 7 and attack.params["steps"] == 7
    with pytest.raises(BenchError, match="has no parameter 'stepz'.*did you mean 'steps'"):
        build(AssignsBeforeSuper, stepz=7)


class DerivedEps(_Step):
    PARAMS = {"radius": Param(4.0, "budget in 1/255 steps")}

    @property
    def eps(self):
        return self.params.radius / 255


def test_an_eps_property_of_the_plugins_own_is_checked_too():
    assert build(DerivedEps).eps == pytest.approx(4 / 255)
    with pytest.raises(BenchError, match="eps must be a finite number > 0, got -0.0"):
        build(DerivedEps, radius=-1)


def test_eps_assigned_later_updates_the_stored_parameters():
    attack = build(Declared)
    attack.eps = 0.3
    assert attack.params["eps"] == 0.3 and attack.params.eps == 0.3


class NoEps(_Step):
    pass


class NegativeEps(_Step):
    eps = -0.1


class NanEps(_Step):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.eps = math.nan


class TextEps(_Step):
    def __init__(self):
        super().__init__()
        self.eps = "8/255"


class UnknownNorm(_Step):
    norm = "L1"
    eps = 0.1


@pytest.mark.parametrize("cls, message", [
    (NoEps, "declares no eps"), (NegativeEps, "eps must be a finite number > 0, got -0.1"),
    (NanEps, "eps must be a finite number > 0, got nan"), (TextEps, "eps must be a finite number > 0"),
    (UnknownNorm, "norm must be Linf or L2, got 'L1'")])
def test_a_bad_budget_is_one_clear_error(cls, message):
    with pytest.raises(BenchError, match=message):
        build(cls)


def test_a_negative_eps_given_on_the_command_line_is_refused():
    with pytest.raises(BenchError, match="eps must be a finite number > 0"):
        build(ClassAttributes, eps="-1")


class Crashes(_Step):
    eps = 0.1

    def __init__(self, **kw):
        super().__init__(**kw)
        raise ValueError("no GPU")


def test_a_plugin_whose_init_raises_is_named_in_a_bench_error():
    with pytest.raises(BenchError, match="Crashes could not be created: ValueError: no GPU"):
        build(Crashes)


# ------------------------------------------------------------------------------------ defenses


class Bare(Defense):
    def build(self, ctx):
        return Defended(model=ctx.base("standard"))


class WithKeywords(Defense):
    def __init__(self, temperature=1.0, layers=("conv1",)):
        super().__init__()
        self.temperature = temperature
        self.layers = layers

    def build(self, ctx):
        return Defended(model=ctx.base("standard"))


class WithoutSuper(Defense):
    def __init__(self, temperature=2.0):
        self.temperature = temperature

    def build(self, ctx):
        return Defended(model=ctx.base("standard"))


def test_defense_without_params_table_or_super_call_works():
    assert build(Bare).params == {}
    d = build(WithKeywords, temperature="0.5", layers="conv1,fc")
    assert (d.temperature, d.layers) == (0.5, ("conv1", "fc"))
    assert d.params == {"temperature": 0.5, "layers": ("conv1", "fc")}  # the run is keyed by these
    d = build(WithoutSuper)
    assert d.temperature == 2.0 and d.params == {"temperature": 2.0} and "WithoutSuper" in repr(d)

