"""Plugin discovery through entry points; the core never imports `defenses` or `attacks` directly."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from bench.api import Attack, Defense
from bench.errors import BenchError, unknown

GROUPS = {"defense": "bench.defenses", "attack": "bench.attacks", "report": "bench.reports"}
BASES = {"defense": Defense, "attack": Attack}


@dataclass(frozen=True)
class Provider:
    name: str
    value: str  # "module:Class"
    dist: str  # distribution that declares it

    def __str__(self) -> str:
        return f"{self.value} (from {self.dist})"


def providers(kind: str) -> dict[str, Provider]:
    """All registered plugins of one kind, by name. Two distributions claiming one name is an error."""
    found: dict[str, Provider] = {}
    for ep in entry_points(group=GROUPS[kind]):
        prov = Provider(ep.name, ep.value, _dist_name(ep))
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
    """The plugin class registered as `name`, with a did-you-mean error for unknown names."""
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
        raise BenchError(f"could not load {kind} '{name}' from {prov}: {type(exc).__name__}: {exc}") from exc
    if kind == "report":
        if not callable(obj):
            raise BenchError(f"report '{name}' ({prov}) is not callable")
        return obj
    if not (isinstance(obj, type) and issubclass(obj, BASES[kind])):
        raise BenchError(f"{kind} '{name}' ({prov}) is not a subclass of bench.api.{BASES[kind].__name__}")
    obj.name = name
    return obj


def names(kind: str) -> list[str]:
    return sorted(providers(kind))
