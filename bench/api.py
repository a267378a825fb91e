"""The plugin contract: Defense, Attack, Defended, Context, and the Param declarations they share.

Third-party packages subclass `Defense` / `Attack`, declare their keyword parameters in `PARAMS` or as
keyword arguments of their `__init__`, and register the class under the entry-point groups
`bench.defenses` / `bench.attacks`. README.md's "Writing a plugin" is the contract in prose.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch

from bench.errors import BenchError, did_you_mean

# ----------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a plugin.

    `default` is the paper-scale value. `preset` names a preset field whose value replaces the default at
    the run's scale (e.g. fine-tuning epochs), so presets scale budgets without touching the algorithm.
    `kind` is inferred from the default when omitted: int, float, bool, str, or tuple (comma-separated).
    """

    default: Any
    help: str
    kind: type | None = None
    choices: tuple = ()
    low: float | None = None  # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    above: float | None = None  # exclusive lower bound (e.g. eps > 0)
    preset: str | None = None
    item: type = float  # element type of tuple parameters

    @property
    def type(self) -> type:
        if self.kind is not None:
            return self.kind
        if self.default is None:
            return str
        return type(self.default)

    def describe(self) -> str:
        default = f"{self.default:.4g}" if isinstance(self.default, float) else repr(self.default)
        bits = [f"default {default}"]
        if self.preset:
            bits.append(f"scaled by preset field '{self.preset}'")
        if self.choices:
            bits.append("one of " + "|".join(map(str, self.choices)))
        return f"{self.help} ({'; '.join(bits)})"


def _parse_number(text: str, kind: type) -> Any:
    text = text.strip()
    if kind is float and "/" in text:  # budgets are written as 8/255 in every paper
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return kind(text)


def convert(name: str, spec: Param, value: Any, what: str = "parameter") -> Any:
    """Turn a CLI string (or a TOML/Python value) into the parameter's type and check its range. `what`
    names the kind of setting in errors (a plugin parameter, a preset field)."""
    if value is None and spec.default is None:  # "not set": the plugin derives it (e.g. alpha = eps/4)
        return None
    kind = spec.type
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = low in ("1", "true", "yes", "on")
            else:
                value = bool(value)
        elif kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            if spec.item is str:
                value = tuple(str(v).strip() for v in items if str(v).strip())
            else:
                value = tuple(_parse_number(v, spec.item) if isinstance(v, str) else spec.item(v)
                              for v in items if not (isinstance(v, str) and not v.strip()))
        elif kind in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, str):
                value = _parse_number(value, kind)
            elif kind is int:
                if float(value) != int(value):
                    raise ValueError(value)
                value = int(value)
            else:
                value = float(value)
        elif value is not None:
            value = kind(value)
            if kind is str and not value.strip():  # `--param key=` is a slip, not a name
                raise ValueError(value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):  # OverflowError: int(inf) from TOML
        raise BenchError(f"{what} '{name}' expects {'a non-empty ' if kind is str else ''}{kind.__name__}, "
                         f"got {value!r}") from None
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if spec.choices and v not in spec.choices:
            raise BenchError(f"{what} '{name}' must be one of {', '.join(map(str, spec.choices))}, "
                             f"got {v!r}{did_you_mean(str(v), map(str, spec.choices))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and not math.isfinite(v):
                raise BenchError(f"{what} '{name}' must be finite, got {v}")
            if spec.above is not None and not v > spec.above:
                raise BenchError(f"{what} '{name}' must be > {spec.above}, got {v}")
            if spec.low is not None and v < spec.low:
                raise BenchError(f"{what} '{name}' must be >= {spec.low}, got {v}")
            if spec.high is not None and v > spec.high:
                raise BenchError(f"{what} '{name}' must be <= {spec.high}, got {v}")
    return value


def resolve_params(owner: str, specs: dict[str, Param], given: dict[str, Any],
                   preset: Any = None) -> dict[str, Any]:
    """Complete `given` with defaults (preset-scaled where declared), converted and range-checked."""
    _known_names(owner, specs, given)
    out = {}
    for name, spec in specs.items():
        if name in given:
            out[name] = convert(name, spec, given[name])
        elif spec.preset and preset is not None and getattr(preset, spec.preset, None) is not None:
            out[name] = convert(name, spec, getattr(preset, spec.preset))
        else:
            out[name] = spec.default if spec.default is None else convert(name, spec, spec.default)
    return out


def _known_names(owner: str, specs: dict[str, Param], given: dict[str, Any]) -> None:
    for name in given:
        if name not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise BenchError(f"{owner} has no parameter '{name}'{did_you_mean(name, specs)}; "
                             f"its parameters: {known}")


def _keyword_params(init: Callable, declared: dict[str, Param]) -> dict[str, Param]:
    """The keyword arguments of a plugin's own __init__ whose defaults a command line can express, as
    Params: a plugin without a PARAMS table is configured like one that has it."""
    out = {}
    for arg in inspect.signature(init).parameters.values():
        if arg.name in declared or arg.kind not in (arg.POSITIONAL_OR_KEYWORD, arg.KEYWORD_ONLY):
            continue
        value = arg.default
        if value is arg.empty or not (value is None or isinstance(value, (bool, int, float, str, tuple))):
            continue
        if isinstance(value, tuple):
            item = type(value[0]) if value and isinstance(value[0], (int, float, str)) else float
            out[arg.name] = Param(value, "keyword argument", item=item)
        else:
            out[arg.name] = Param(value, "keyword argument")
    return out


class ParamValues(dict):
    """Resolved parameter values; `p.epochs` reads like `p["epochs"]`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _accepted(init: Callable, params: dict[str, Any], declared: dict[str, Param]) -> dict[str, Any]:
    """`params` less the declared parameters that `init` has no argument for (e.g. the parameter `eps`
    that a class attribute declares, given to an __init__ that takes only `steps`): they are in
    self.params already."""
    args = inspect.signature(init).parameters
    if any(a.kind is a.VAR_KEYWORD for a in args.values()):
        return params
    return {k: v for k, v in params.items() if k in args or k not in declared}


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
        self.params.update({k: convert(k, self.PARAMS[k], v) for k, v in params.items()})

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


@dataclass
class Defended:
    """What a defense hands to the evaluator."""

    model: torch.nn.Module  # images in [0,1] -> logits: the defense's whole inference procedure
    surrogate: torch.nn.Module | None = None  # what a non-adaptive attacker differentiates (paper protocol)
    batch_dependent: bool = False  # True: predictions depend on the batch (e.g. norm shaping)
    randomized: bool = False  # True: forward passes are stochastic (use EOT attacks)
    info: dict = field(default_factory=dict)  # selected layers, MRC table, alpha, curves: stored, reported


class Defense(_Plugin):
    """Base class of defense plugins. Keyword parameters come from `--param key=value` or a TOML file."""

    _kind: ClassVar[str] = "defense"

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
    norm: str = "Linf"  # "Linf" or "L2"
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
            cls.PARAMS = {**cls.PARAMS, "eps": dataclasses.replace(spec, default=value, preset=None)}
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
        if self.norm not in ("Linf", "L2"):
            raise BenchError(f"{self._owner()}: attack norm must be Linf or L2, got {self.norm!r}")
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
        from bench.config import exact_text

        return f"{self.norm} eps={exact_text(self.eps)}"  # exact: worst cases are grouped by this text

    order: ClassVar[int] = 50  # position in `--attacks all` (cheap first)
    in_all: ClassVar[bool] = True  # part of `--attacks all`
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
        differentiate (under the paper protocol: the surrogate, which is never batch-dependent).
        Subclasses that override this call super().setup(ctx, defended)."""
        self.batch_dependent = defended.batch_dependent
        self.randomized = defended.randomized
        self.seed = ctx.seed
        self.generator = ctx.generator(f"attack:{self.name}")

    def composed(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
        """The model to give a library that re-batches survivors: for a batch-dependent target every call
        is rebuilt inside this whole batch (see bench.evaluate.BatchComposition). Pass the library's
        result through `bench.evaluate.finish(wrapped, x_adv)`."""
        from bench.evaluate import composed

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
    if not isinstance(cls.in_check, bool):
        raise BenchError(f"attack class {cls.__name__}: in_check must be True or False, got {cls.in_check!r}")


def _budget(owner: str, value: Any) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise BenchError(f"{owner}: eps must be a finite number > 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------
# Reports (paper tables and figures, one function per defense family, entry-point group bench.reports)


@dataclass
class ReportContext:
    """What a report plugin sees when `bench leaderboard` writes one (dataset, arch, preset) file.

    A report is a function `report(rc: ReportContext) -> list[str]` returning markdown lines (nothing
    when its defenses were not run); it may write figures with `rc.figure(name)`.
    """

    configs: list  # bench.leaderboard.Config: .defense, .params, .seeds, .runs[i].run["info"], .flags(label)
    dataset: str
    arch: str
    preset: str
    dest: Path
    stem: str
    figures: list = field(default_factory=list)  # paths written, for the caller's listing

    def find(self, defense: str, **params) -> list:
        """Configurations of `defense` whose parameters include `params`, in the order they were first run."""
        hits = [c for c in self.configs if c.defense == defense
                and all(c.params.get(k) == v for k, v in params.items())]
        return hits

    def accuracy(self, cfg, label: str = "clean", protocol: str = "adaptive") -> tuple[str, float]:
        """(text with interval or mean +- std, mean as a fraction) of clean, an attack, or "worst:THREAT"."""
        from bench.leaderboard import accuracy_text

        text, mean, _ = accuracy_text(cfg.flags(label, protocol))
        return text, mean

    def delta(self, cfg, base, label: str = "clean", protocol: str = "adaptive") -> str:
        """Δ in points against `base` with the exact McNemar p-value on the same samples."""
        from bench.leaderboard import delta_text

        return delta_text(cfg.flags(label, protocol), base.flags(label, protocol))

    def fewer_attacks_mark(self, cfg, peers: list, threat: str) -> str:
        """' † without X' when `cfg`'s worst case over `threat` lacks adaptive attacks one of `peers` ran,
        and ' ‡ incomplete: Y missing' when its run lacks requested cells of that worst case."""
        from bench.leaderboard import adaptive_attacks, fewer_attacks_mark, incomplete_mark

        return fewer_attacks_mark(cfg, adaptive_attacks(peers, threat)) + incomplete_mark(cfg, threat, "adaptive")

    def incomplete_mark(self, cfg, threat: str | None = None, protocol: str = "adaptive") -> str:
        """' ‡ incomplete: X missing, Y failed' for the requested cells `cfg`'s runs lack (of the worst case
        over `threat` when given), else ''. Any table showing a worst case should carry it."""
        from bench.leaderboard import incomplete_mark

        return incomplete_mark(cfg, threat, protocol if threat is not None else None)

    def threats(self) -> list[str]:
        out = []
        for c in self.configs:
            for r in c.runs:
                for cell in r.cells.values():
                    if cell["threat"] not in out:
                        out.append(cell["threat"])
        return out

    def figure(self, name: str) -> Path:
        from bench.errors import require_safe_name

        path = self.dest / f"{self.stem}-{require_safe_name(name, 'figure name')}.png"
        self.figures.append(path)
        return path


# ----------------------------------------------------------------------------------------------------
# Context


class Context:
    """What a defense sees of the run: data, device, seed, preset budgets, base models, progress, log."""

    def __init__(self, *, data, arch: str, device: torch.device, seed: int, preset, cache_dir: Path,
                 precision: str = "fp32", quiet: bool = False, base_checkpoints: dict | None = None,
                 log: logging.Logger | None = None, scope: dict | None = None) -> None:
        self.data = data
        self.arch = arch
        self.device = torch.device(device)
        self.seed = seed
        self.preset = preset
        self.cache_dir = Path(cache_dir)
        self.precision = precision
        self.quiet = quiet
        self.base_checkpoints = dict(base_checkpoints or {})
        self.log = log or logging.getLogger("bench")
        # What every cached training result of this run depends on besides the defense's own parameters:
        # not the test images, unless the defense reads them (split("test")).
        if scope is None:
            from bench.config import training_scope

            scope = training_scope({
                "arch": arch, "seed": seed, "precision": precision,
                "preset": dataclasses.asdict(preset) if dataclasses.is_dataclass(preset) else str(preset),
                "base_checkpoints": sorted(self.base_checkpoints.items())}, getattr(data, "train_fingerprint", ""))
        self.scope = scope

    def split(self, which: str):
        """The split a defense selects or monitors on: "val" or "test". Reading the test split puts the
        test images into the scope of this run's later caches, so a result selected on them never serves
        a run with other test images. (A plugin that reads `data.test` directly must do the same.)"""
        if which == "test":
            self.scope = {**self.scope, "test_data": getattr(self.data, "fingerprint", "")}
            return self.data.test
        if which == "val":
            return self.data.val
        raise BenchError(f"split must be 'val' or 'test', got '{which}'")

    def base(self, recipe: str = "pgd_at") -> torch.nn.Module:
        """The cached base model trained with `recipe` (trained on first use), in eval mode."""
        from bench.checkpoints import base_model

        return base_model(self, recipe)

    def cached_model(self, kind: str, identity: dict, model: torch.nn.Module,
                     train: Callable[[], dict]) -> dict:
        """Run `train()` (which trains `model` in place and returns JSON-able info) unless the cache holds
        its result for `identity` within this run's scope (data, preset, seed, ... -- every setting but the
        number of test images); on a hit, load the weights and return the info.
        A defense that trains uses this so sweeps and resumed runs never train the same thing twice."""
        from bench.checkpoints import cached_model

        return cached_model(self, kind, identity, model, train)

    def memo(self, kind: str, identity: dict, compute: Callable[[], Any]) -> Any:
        """JSON-able `compute()` cached for `identity` within this run's scope (e.g. RiFT's MRC values,
        shared by every top-k run)."""
        from bench.checkpoints import memo

        return memo(self, kind, identity, compute)

    def progress(self, iterable: Iterable, desc: str, total: int | None = None, leave: bool = False):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, disable=self.quiet, leave=leave,
                    dynamic_ncols=True, mininterval=0.5)

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator seeded from the run seed and a purpose, so each random stream is reproducible
        on its own (adding an attack never shifts another one's random start)."""
        digest = hashlib.sha256(f"{self.seed}:{purpose}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
