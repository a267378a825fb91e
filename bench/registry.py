"""Plugin discovery through entry points; the core never imports `defenses` or `attacks` directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from bench.config import PRESETS
from bench.contract import Attack, Defense
from bench.errors import BenchError, did_you_mean, unknown

GROUPS = {"defense": "bench.defenses", "attack": "bench.attacks", "report": "bench.reports", "model": "bench.models",
          "dataset": "bench.datasets"}
BASES = {"defense": Defense, "attack": Attack}


class PluginLoadError(BenchError):
    """A registered plugin that cannot be imported or is not a plugin class: `bench list` shows it as broken
    and `--attacks all` skips it; naming it explicitly is still a user error."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Provider:
    name: str
    value: str  # "module:Class"
    entry: EntryPoint = field(compare=False, repr=False)

    @property
    def dist(self) -> str:
        """The distribution that declares it. Read only when shown: parsing every distribution's metadata on
        each lookup was most of a command's start-up time."""
        return _dist_name(self.entry)

    def __str__(self) -> str:
        return f"{self.value} (from {self.dist})"


def providers(kind: str) -> dict[str, Provider]:
    """All registered plugins of one kind, by name. Two distributions claiming one name is an error."""
    found: dict[str, Provider] = {}
    for ep in entry_points(group=GROUPS[kind]):
        prov = Provider(ep.name, ep.value, ep)
        other = found.get(ep.name)
        # The same distribution can be visible twice (an editable install plus its build dir); that is
        # one provider, not a clash.
        if other is not None and other.value != prov.value:
            raise BenchError(f"two plugins register the {kind} name '{ep.name}': {other} and {prov}; "
                             f"uninstall one of them")
        found[ep.name] = prov
    return found


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "unknown distribution"


def load(kind: str, name: str) -> type:
    """The plugin class (a report's or a model's function) registered as `name`, with a did-you-mean error
    for unknown names."""
    table = providers(kind)
    if name not in table:
        raise unknown(kind, name, table)
    prov = table[name]
    module, _, attr = prov.value.partition(":")
    try:
        obj = __import__(module, fromlist=[attr.split(".")[0]] if attr else [])
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # a broken third-party plugin must not look like our crash
        reason = one_line(exc)
        raise PluginLoadError(f"could not load {kind} '{name}' from {prov}: {reason}", reason) from exc
    # functions: a report (ReportContext) -> ..., a model factory (num_classes, spec), a loader (DataRequest)
    if kind in ("report", "model", "dataset"):
        if not callable(obj):
            raise PluginLoadError(f"{kind} '{name}' ({prov}) is not callable", "not callable")
        return obj
    if not (isinstance(obj, type) and issubclass(obj, BASES[kind])):
        reason = f"not a subclass of bench.api.{BASES[kind].__name__}"
        raise PluginLoadError(f"{kind} '{name}' ({prov}) is {reason}", reason)
    _check_presets(kind, name, prov, obj)
    obj.name = name
    return obj


def _check_presets(kind: str, name: str, prov: Provider, cls: type) -> None:
    """A `per_preset` entry for a preset that does not exist (a typo) would silently leave its parameter at
    the default: the plugin is broken, naming the entry."""
    for pname, spec in cls.PARAMS.items():
        stray = [p for p in getattr(spec, "per_preset", None) or () if p not in PRESETS]
        if stray:
            reason = (f"parameter '{pname}' declares a value for unknown preset '{stray[0]}'"
                      f"{did_you_mean(stray[0], PRESETS)}; presets: {', '.join(PRESETS)}")
            raise PluginLoadError(f"{kind} '{name}' ({prov}): {reason}", reason)


def declared(kind: str, name: str) -> type | None:
    """The plugin class registered as `name`, or None when none loads under that name (a label with
    parameters, an uninstalled or broken plugin): what reads a stored cell's declarations (checks,
    exports) uses this, so such a cell simply takes part in nothing."""
    try:
        return load(kind, name)
    except BenchError:
        return None


def names(kind: str) -> list[str]:
    return sorted(providers(kind))


def load_all(kind: str) -> tuple[dict[str, type], dict[str, PluginLoadError]]:
    """Every loadable plugin of one kind by name, and the broken ones with their errors: one broken
    third-party package must not take the others down with it."""
    loaded, broken = {}, {}
    for name in names(kind):
        try:
            loaded[name] = load(kind, name)
        except PluginLoadError as exc:
            broken[name] = exc
    return loaded, broken


def who(kind: str, name: str) -> str:
    """"attack 'x' (module:Class from dist)": how failures name the plugin at fault."""
    prov = providers(kind).get(name)
    return f"{kind} '{name}'" + (f" ({prov.value} from {prov.dist})" if prov else "")


def one_line(exc: BaseException) -> str:
    """'ExcType: message' on one line (a plugin's multi-line message would break the one-line contract)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
