"""Parameter declarations of plugins and presets: `Param`, the conversion of a command-line, TOML or
Python value to a parameter's type and range, and the exact text of a value. The bottom of the core: it
imports nothing of the engine."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping

from bench.errors import BenchError, did_you_mean

@dataclass(frozen=True)
class Param:
    """One keyword parameter of a plugin.

    `default` is the paper-scale value. `per_preset` is the plugin's own value at each scale, by preset name
    ({"smoke": 64, "quick": 200}); presets it does not name use `default`. `preset` names a field of the core's
    preset whose value replaces the default at the run's scale (shared budgets such as fine-tuning epochs).
    Either way presets scale budgets without touching the algorithm, and a value the user gives wins.
    `kind` is inferred from the default when omitted: int, float, bool, str, or tuple (comma-separated).
    `follows` names another parameter whose value picks a case: `cases` maps that value to the fields that
    differ from this declaration (an attack's budget follows its norm: {"L2": dict(default=0.5,
    preset="eps_l2", high=None)}); values it does not name use this declaration as it is.
    `added`: declared after results were stored. At its default the parameter is left out of a run's identity,
    so the runs stored before it existed keep their ids (and stay finished for a resumed sweep); set to
    another value, it is part of it.
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
    per_preset: Mapping[str, Any] | None = field(default=None, hash=False)
    follows: str | None = None
    cases: Mapping[Any, Mapping[str, Any]] | None = field(default=None, hash=False)
    added: bool = False

    def __post_init__(self) -> None:
        # read-only copies: a declaration never changes after the class is made
        if self.per_preset is not None:
            object.__setattr__(self, "per_preset", MappingProxyType(dict(self.per_preset)))
        if self.cases is not None:
            object.__setattr__(self, "cases", MappingProxyType({k: MappingProxyType(dict(v))
                                                                for k, v in self.cases.items()}))

    def case(self, values: Mapping[str, Any]) -> "Param":
        """The declaration that applies when the other parameters have `values` (itself unless it follows one)."""
        if self.follows is None:
            return self
        return replace(self, follows=None, cases=None, **(self.cases or {}).get(values.get(self.follows), {}))

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
        if self.per_preset:
            bits.append("scaled per preset: " + ", ".join(f"{k} {v!r}" for k, v in self.per_preset.items()))
        if self.preset:
            bits.append(f"scaled by preset field '{self.preset}'")
        if self.choices:
            bits.append("one of " + "|".join(map(str, self.choices)))
        for value, changes in (self.cases or {}).items():
            case = self.case({self.follows: value})
            bits.append(f"{self.follows} {value}: default {case.default:.4g}" if isinstance(case.default, float)
                        else f"{self.follows} {value}: default {case.default!r}")
            if "preset" in changes:
                bits[-1] += f", preset field '{case.preset}'"
        return f"{self.help} ({'; '.join(bits)})"


def _parse_number(text: str, kind: type) -> Any:
    text = text.strip()
    if kind is float and "/" in text:  # budgets are written as 8/255 in every paper
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return kind(text)


def _number(value: Any, kind: type) -> int | float:
    """An int or float from command-line text or a TOML/Python number: never a bool, never truncated (2.5 is
    no int). Raises ValueError, TypeError or OverflowError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str):
        return _parse_number(value, kind)
    if kind is int:
        if float(value) != int(value):
            raise ValueError(value)
        return int(value)
    return float(value)


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
            else:  # each item by the rules of a number (a TOML [true, 2.5] is no tuple of ints)
                value = tuple(_number(v, spec.item) for v in items if not (isinstance(v, str) and not v.strip()))
        elif kind in (int, float):
            value = _number(value, kind)
        elif value is not None:
            value = kind(value)
            if kind is str and not value.strip():  # `--param key=` is a slip, not a name
                raise ValueError(value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):  # OverflowError: int(inf) from TOML
        shown = f"tuple of {spec.item.__name__}" if kind is tuple else kind.__name__  # (comma-separated)
        raise BenchError(f"{what} '{name}' expects {'a non-empty ' if kind is str else ''}{shown}, "
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
    """Complete `given` with defaults (preset-scaled where declared), converted and range-checked. A value
    given wins, then the parameter's `per_preset` value for this preset, then the preset field it names,
    then its default."""
    _known_names(owner, specs, given)
    scale = getattr(preset, "name", None)
    out = {}
    # a parameter that follows another is resolved after it, with the declaration of its case
    for name in sorted(specs, key=lambda n: specs[n].follows is not None):
        spec = specs[name].case(out)
        declared = _per_preset(owner, name, spec)
        if name in given:
            out[name] = convert(name, spec, given[name])
        elif scale in declared:
            out[name] = declared[scale]
        elif spec.preset and preset is not None and getattr(preset, spec.preset, None) is not None:
            out[name] = convert(name, spec, getattr(preset, spec.preset))
        else:
            out[name] = spec.default if spec.default is None else convert(name, spec, spec.default)
    return {name: out[name] for name in specs}


def added_at_default(specs: dict[str, Param], values: dict[str, Any], preset: Any = None) -> tuple[str, ...]:
    """The `added` parameters whose value in `values` is their default at this preset: what a run's identity
    leaves out."""
    defaults = resolve_params("", specs, {}, preset)
    return tuple(sorted(k for k, spec in specs.items() if spec.added and values.get(k) == defaults[k]))


def _per_preset(owner: str, name: str, spec: Param) -> dict[str, Any]:
    """The declared per-preset values, converted and range-checked like a value given (a wrong one is the
    plugin's mistake, named, whichever preset runs)."""
    out = {}
    for scale, value in (spec.per_preset or {}).items():
        try:
            out[scale] = convert(name, spec, value)
        except BenchError as exc:
            raise BenchError(f"{owner} declares an invalid value for preset '{scale}': {exc}") from None
    return out


def _known_names(owner: str, specs: dict[str, Param], given: dict[str, Any]) -> None:
    for name in given:
        if name not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise BenchError(f"{owner} has no parameter {name!r}{did_you_mean(name, specs)}; "
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


def exact_text(value: Any) -> str:
    """Text that reads back as exactly `value`: cells are keyed by it and worst cases grouped by it, so two
    budgets that differ in any digit never share a result. A float is written k/255 when it is exactly that
    and shorter (8/255, not 0.03137254901960784), a whole number without '.0', else as Python's
    shortest round-trip repr (0.050004)."""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    text = str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)  # 3, not 3.0
    scaled = value * 255
    k = round(scaled) if math.isfinite(scaled) else 0  # (above 7e305 the product overflows)
    if k and k / 255 == value and len(f"{k}/255") < len(text):
        return f"{k}/255"
    return text


# ----------------------------------------------------------------------------------------------------
# option text: how the command line writes values and items with options


def parse_assignments(items, what: str) -> dict[str, str]:
    """['k=v', ...] -> {'k': 'v'}; a malformed item is a user error."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"malformed {what} {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def parse_item(item: str, kind: str) -> tuple[str, dict[str, str]]:
    """'name[key=value;...]' -> ('name', {'key': 'value', ...}): how an attack or a dataset takes options."""
    name, bracket, rest = item.partition("[")
    if not bracket:
        return item.strip(), {}
    if not rest.endswith("]"):
        raise BenchError(f"malformed {kind} {item!r}: expected name[key=value;...]")
    return name.strip(), parse_assignments([p for p in rest[:-1].split(";") if p.strip()], f"{kind} {item!r}")
