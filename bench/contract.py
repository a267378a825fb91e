"""The plugin contract: `Defense`, `Attack` and `Defended`, the classes every plugin (the built-ins too)
subclasses or returns. It sits at the bottom of the core and imports nothing of the engine: the runner,
the evaluator and the registry import it. Plugins import all of it through `bench.api`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bench.composition import NORMS, composed
from bench.errors import BenchError
from bench.params import Param, ParamValues, _accepted, _keyword_params, _known_names, convert, exact_text, resolve_params


class _PluginType(abc.ABCMeta):
    """Constructs every plugin the same way, whatever its own __init__ does or forgets to do: parameters
    are in place before __init__ runs and complete after it, even without a super().__init__() call;
    then the class checks what __init__ set (an attack's eps and norm). A failing __init__ is a BenchError
    that names the plugin, not a traceback from inside it."""

    def __call__(cls, *args: Any, **params: Any) -> Any:
        obj = cls.__new__(cls)
        # Every declared parameter's value as given to the constructor (the runner gives them all),
        # whether or not __init__ passes them on to super().__init__().
        obj.params = ParamValues(resolve_params(cls._owner(), cls.PARAMS,
                                                {k: v for k, v in params.items() if k in cls.PARAMS}))
        try:
            obj.__init__(*args, **_accepted(obj.__init__, params, cls.PARAMS))
        except BenchError:
            raise
        except Exception as exc:
            raise BenchError(f"{cls._owner()} could not be created: {type(exc).__name__}: {exc}") from exc
        obj._settle()
        return obj


class _Plugin(metaclass=_PluginType):
    """Shared by Defense and Attack: declared parameters, resolved at construction.

    Parameters are the `PARAMS` table plus the keyword arguments (with defaults) of the class's own
    __init__; the runner passes each one's value, given or default, as a keyword argument."""

    PARAMS: ClassVar[dict[str, Param]] = {}
    name: ClassVar[str] = ""  # set by the registry to the entry-point name
    _kind: ClassVar[str] = "plugin"  # for messages

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            inferred = _keyword_params(cls.__dict__["__init__"], cls.PARAMS)
            if inferred:
                cls.PARAMS = {**cls.PARAMS, **inferred}

    @classmethod
    def _owner(cls) -> str:
        return f"{cls._kind} '{cls.name}'" if cls.name else cls.__name__

    def __init__(self, **params: Any) -> None:
        # self.params already holds every parameter (see _PluginType); these are values a subclass
        # passes on, possibly changed
        _known_names(self._owner(), self.PARAMS, params)
        values = {**self.params, **params}
        self.params.update({k: convert(k, self.PARAMS[k].case(values), v) for k, v in params.items()})

    def _settle(self) -> None:
        """Check what __init__ set; called once it has returned."""

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0].strip() if doc else ""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


# ----------------------------------------------------------------------------------------------------
# Defenses


ADAPTIVE, PAPER = "adaptive", "paper"
SURROGATE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def surrogate_of(protocol: str) -> str | None:
    """'paper:test_batch' -> 'test_batch'; 'paper' (the defense's default surrogate) -> ''; adaptive -> None."""
    if protocol == PAPER:
        return ""
    head, colon, name = protocol.partition(":")
    return name if head == PAPER and colon else None


@dataclass
class Surrogate:
    """A model a non-adaptive attacker differentiates instead of the defense (protocol `paper:NAME`)."""

    model: torch.nn.Module
    batch_dependent: bool = False  # True: it normalises with its input batch (attacks then compose the batch)


@dataclass
class Defended:
    """What a defense hands to the evaluator."""

    model: torch.nn.Module  # images in [0,1] -> logits: the defense's whole inference procedure
    surrogate: torch.nn.Module | None = None  # what a non-adaptive attacker differentiates (paper protocol)
    batch_dependent: bool = False  # True: predictions depend on the batch (e.g. norm shaping)
    randomized: bool = False  # True: forward passes are stochastic (use EOT attacks)
    info: dict = field(default_factory=dict)  # selected layers, MRC table, alpha, curves: stored, reported
    # forward passes of the network per prediction, RobustBench's number_forward_passes (an ensemble of 3, or
    # a prediction that runs extra images beside each test image, declares its count)
    forward_passes: int = 1
    # the other surrogates the class declares in SURROGATES (all but the first, which is `surrogate`)
    surrogates: dict[str, Surrogate] = field(default_factory=dict)

    def attacked_under(self, protocol: str) -> "Defended":
        """What an attack differentiates under `protocol`: this defense (adaptive), its surrogate (paper) or
        the named one (paper:NAME); the verdict is always this defense's."""
        name = surrogate_of(protocol)
        if name is None or (name == "" and self.surrogate is None):
            return self
        chosen = Surrogate(self.surrogate) if name == "" else self.surrogates[name]
        return Defended(model=chosen.model, batch_dependent=chosen.batch_dependent, randomized=self.randomized,
                        info=self.info)


class Defense(_Plugin):
    """Base class of defense plugins. Keyword parameters come from `--param key=value` or a TOML file."""

    _kind: ClassVar[str] = "defense"
    # The surrogates a non-adaptive attacker may differentiate, name -> what it is. The first names
    # `Defended.surrogate` (protocol `paper`, or `paper:FIRST`); build() returns the others in
    # `Defended.surrogates` (protocol `paper:NAME`).
    SURROGATES: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = cls.SURROGATES
        if not (isinstance(table, dict) and all(isinstance(n, str) and SURROGATE_NAME.fullmatch(n)
                                                 and isinstance(d, str) for n, d in table.items())):
            raise BenchError(f"defense class {cls.__name__}: SURROGATES must map names (lower case, digits, _) "
                             f"to descriptions, got {table!r}")

    def build(self, ctx: "Context") -> Defended:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------
# Attacks


class Attack(_Plugin):
    """Base class of attack plugins.

    `perturb` must return x_adv in [0,1] within (norm, eps) -- the best iterate found, not the last -- and
    leave the model's parameters, buffers and per-module train/eval flags exactly as it found them.
    """

    _kind: ClassVar[str] = "attack"
    norm: str = "Linf"  # one of NORMS
    # eps: float -- the budget, stored in params["eps"]; a class attribute `eps = 0.5`, an assignment
    # `self.eps = ...` in __init__ and a PARAMS entry all declare it, and each makes it a parameter.

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _validate_declarations(cls)
        value = cls.__dict__.get("eps")
        if value is not None and not isinstance(value, property):
            # A plain class attribute would hide the property below: it becomes the default of the
            # parameter `eps` instead, as if declared in PARAMS.
            spec = cls.PARAMS.get("eps") or Param(value, "budget")
            spec = dataclasses.replace(spec, default=value, preset=None, per_preset=None, follows=None, cases=None)
            cls.PARAMS = {**cls.PARAMS, "eps": spec}
            delattr(cls, "eps")
        spec = cls.PARAMS.get("eps")
        if spec is not None and spec.type is int:  # `eps = 1` still takes 0.5 from the command line
            cls.PARAMS = {**cls.PARAMS, "eps": dataclasses.replace(spec, kind=float)}

    @property
    def eps(self) -> float:
        try:
            return self.params["eps"]
        except KeyError:
            raise AttributeError(f"{self._owner()} has no eps yet") from None

    @eps.setter
    def eps(self, value: float) -> None:
        self.params["eps"] = _budget(self._owner(), value)

    def _settle(self) -> None:
        if "norm" in self.params and "norm" not in self.__dict__:
            self.norm = self.params["norm"]
        if self.norm not in NORMS:
            raise BenchError(f"{self._owner()}: attack norm must be {', '.join(NORMS)}, got {self.norm!r}")
        if "norm" in self.params:
            self.params["norm"] = self.norm
        if type(self).eps is not Attack.eps:  # a subclass's own property derives it
            _budget(self._owner(), self.eps)
        elif "eps" not in self.params:
            raise BenchError(f"{self._owner()} declares no eps: give it a class attribute `eps = ...`, "
                             f"assign `self.eps` in __init__, or declare PARAMS['eps']")
        else:
            self.eps = self.params["eps"]  # the setter's check
        self.validate_params()

    @property
    def threat(self) -> str:
        """The threat model this attack reports under; worst cases are taken per threat model."""
        return f"{self.norm} eps={exact_text(self.eps)}"  # exact: worst cases are grouped by this text

    order: ClassVar[int] = 50  # position in `--attacks all` (cheap first)
    in_all: ClassVar[bool] = True  # part of `--attacks all`
    in_default: ClassVar[bool] = False  # run when `--attacks` is not given (`--attacks default`)
    randomized_variant: ClassVar[str] = ""  # attack to run instead against a randomized defense
    # True for an attack that only adds something against batch-dependent defenses (elsewhere it reduces to
    # attacks of the suite): a leaderboard does not count it missing from other defenses' worst cases.
    batch_dependent_only: ClassVar[bool] = False
    # What the sanity checks and the reports read of an attack; they describe it at its default parameters
    # (a cell run with parameters of the user's, `name[key=value]`, takes part in neither check 7 nor 8).
    # "white-box" (differentiates the model) or "black-box" (queries its outputs only): check 8 fails when a
    # black-box attack beats the best white-box one of its threat model. "": neither (e.g. an ensemble of both).
    access: ClassVar[str] = ""
    # Names of attacks (same threat model, default parameters) this one must never leave more accuracy than:
    # check 7 compares each such pair that ran, beyond noise (e.g. PGD with more steps names the one with fewer).
    stronger_than: ClassVar[tuple[str, ...]] = ()
    # The standard evaluation this attack implements, under which exports show it: "AutoAttack" fills the
    # RobustBench export's autoattack_acc.
    reported_as: ClassVar[str] = ""
    # Run by `bench check`, whose checks 7 and 8 need a weaker/stronger pair and a black-box attack.
    in_check: ClassVar[bool] = False

    batch_dependent = False
    randomized = False
    seed = 0
    generator: torch.Generator | None = None

    def validate_params(self) -> None:
        """Raise BenchError for parameter combinations the declarations cannot express."""
        self.check()

    def check(self) -> None:
        """The former name of `validate_params`: a plugin that overrides it is still called."""

    def validate(self, spec) -> None:
        """Raise BenchError if the attack cannot run on this dataset (e.g. more target classes than the
        data has); called before any work starts. `spec` has num_classes, channels, size."""

    def setup(self, ctx: "Context", defended: Defended) -> None:
        """Called once per cell before the first batch. `defended` describes the model the attack will
        differentiate (under a paper protocol: the surrogate, batch-dependent only if it normalises with its
        input batch).
        Subclasses that override this call super().setup(ctx, defended)."""
        self.batch_dependent = defended.batch_dependent
        self.randomized = defended.randomized
        self.seed = ctx.seed
        self.generator = ctx.generator(f"attack:{self.name}")

    def composed(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
        """The model to give a library that re-batches survivors: for a batch-dependent target every call
        is rebuilt inside this whole batch (see bench.composition.BatchComposition). Pass the library's
        result through `bench.api.finish(wrapped, x_adv)`."""
        return composed(model, x, y, self.batch_dependent, self.norm, self.eps)

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra(self) -> dict:
        """Attack-specific figures for the stored result (e.g. DeepFool's median perturbation norm)."""
        return {}


ACCESS = ("", "white-box", "black-box")


def _validate_declarations(cls: type) -> None:
    """A misspelt declaration would silently keep an attack out of the checks: refuse it when the class is
    defined (the registry then reports the plugin as broken, naming the reason)."""
    if isinstance(cls.stronger_than, str):  # a single name needs no tuple
        cls.stronger_than = (cls.stronger_than,)
    if cls.access not in ACCESS:
        raise BenchError(f"attack class {cls.__name__}: access must be 'white-box', 'black-box' or '', "
                         f"got {cls.access!r}")
    if not (isinstance(cls.stronger_than, tuple) and all(isinstance(n, str) and n for n in cls.stronger_than)):
        raise BenchError(f"attack class {cls.__name__}: stronger_than must be attack names, got {cls.stronger_than!r}")
    if not isinstance(cls.reported_as, str):
        raise BenchError(f"attack class {cls.__name__}: reported_as must be a string, got {cls.reported_as!r}")
    for flag in ("in_check", "in_default", "in_all"):
        if not isinstance(getattr(cls, flag), bool):
            raise BenchError(f"attack class {cls.__name__}: {flag} must be True or False, got {getattr(cls, flag)!r}")


def _budget(owner: str, value: Any) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise BenchError(f"{owner}: eps must be a finite number > 0, got {value!r}")
    return float(value)


# The standard budget of each norm, and the preset field that scales it per dataset (bench.config.Preset).
STANDARD_BUDGETS = {"Linf": (8 / 255, "eps"), "L2": (0.5, "eps_l2"), "L1": (12.0, "eps_l1")}


def threat_params(norms: tuple[str, ...] = NORMS, help: str = "") -> dict[str, Param]:
    """The parameters `norm` and `eps` of an attack that runs under several threat models
    (`PARAMS = {**threat_params(("Linf", "L2")), ...}`): the budget's default follows the norm -- the
    preset's eps, eps_l2 or eps_l1 (the dataset's standard), else 8/255, 0.5 or 12."""
    first = norms[0]

    def case(norm: str) -> dict:
        default, field_name = STANDARD_BUDGETS[norm]
        return dict(default=default, preset=field_name, high=1 if norm == "Linf" else None)

    return {"norm": Param(first, help or "threat model", choices=tuple(norms)),
            "eps": Param(**case(first), above=0, help="budget (default: the preset's for the norm)",
                         follows="norm", cases={n: case(n) for n in norms if n != first})}
