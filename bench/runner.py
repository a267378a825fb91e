"""`bench run`: validate everything a user can get wrong, then build the defense and evaluate each cell.

All validation (names, parameters, data, checkpoints, output directory) happens before the results
database is opened, so a mistake never touches stored results.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import sqlite3
import subprocess
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import checkpoints, checks, config as config_mod, data as data_mod, models, registry
from bench.as_is import AsIs
from bench.context import Context
from bench.crafted import CraftedCache
from bench.contract import ADAPTIVE, PAPER, Attack, Defended, Defense, Surrogate, surrogate_of
from bench.params import added_at_default, parse_item, resolve_params
from bench.config import RUN_INFO, AttackSpec, RunConfig
from bench.errors import BenchError, os_reason
from bench.evaluator import CellResult, attack_cell, clean_cell
from bench.stats import robust_cells, worst_case
from bench.store import Store, require_writable
from bench.train import configure_backends, resolve_precision

log = logging.getLogger("bench")
CLEAN = "clean"
NO_PROTOCOL = "-"  # clean accuracy does not depend on the protocol


def _request_field(setting: config_mod.Setting) -> Any:
    if isinstance(setting.default, dict):
        return field(default_factory=lambda: dict(setting.default))
    return field(default=setting.default)


# One field per run setting, declared (with its default) in config.SETTINGS, and the command that asked.
Request = make_dataclass("Request", [(s.name, Any, _request_field(s)) for s in config_mod.SETTINGS] +
                         [("command", str, field(default=""))])
Request.__module__ = __name__
Request.__doc__ = "What the user asked for, merged from TOML and CLI (CLI wins), still unvalidated."


@dataclass
class Prepared:
    config: RunConfig
    defense: Defense
    attacks: list[tuple[AttackSpec, Attack]]
    data: data_mod.Dataset
    device: torch.device


# ----------------------------------------------------------------------------------------------------
# validation


def split_attacks(attacks: Any) -> list[str]:
    """'pgd10,pgd10[eps=4/255;steps=20],fgsm' -> items (commas inside brackets belong to the item)."""
    if not isinstance(attacks, str):
        return [str(a).strip() for a in attacks if str(a).strip()]
    items, depth, current = [], 0, ""
    for ch in attacks:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    items.append(current.strip())
    return [i for i in items if i]


def parse_attack(item: str) -> tuple[str, dict[str, str]]:
    """'pgd10[eps=4/255;steps=20]' -> ('pgd10', {'eps': '4/255', 'steps': '20'})."""
    return parse_item(item, "attack")


def attack_names(attacks: Any) -> list[str]:
    return list(dict.fromkeys(parse_attack(i)[0] for i in attack_items(attacks)))


_warned_broken: set[str] = set()  # a sweep prepares many jobs: say it once per process


def attack_items(attacks: Any) -> list[str]:
    items = split_attacks(attacks)
    if not items:
        raise BenchError("no attacks given (use --attacks default, --attacks all or attack names)")
    # keyword -> the declaration that puts an attack in it: every attack of the suite, or those run when
    # --attacks is not given; either may come with extra items (e.g. all,pgd10[eps=4/255])
    for keyword, declaration in (("all", "in_all"), ("default", "in_default")):
        if keyword in items:
            at = items.index(keyword)
            items = items[:at] + _declaring(declaration, keyword) + items[at + 1:]
    return list(dict.fromkeys(items))


def _declaring(declaration: str, keyword: str) -> list[str]:
    """The attacks whose class sets `declaration`, cheap first (their `order`)."""
    classes, broken = registry.load_all("attack")
    for name, exc in broken.items():  # one broken package must not stop everyone's suite
        if name not in _warned_broken:
            _warned_broken.add(name)
            log.warning("bench: warning: --attacks %s skips %s", keyword, exc)
    chosen = [n for n, cls in classes.items() if getattr(cls, declaration)]
    if not chosen:
        raise BenchError(f"no installed attack declares {declaration} (--attacks {keyword}); name attacks instead")
    return sorted(chosen, key=lambda n: (classes[n].order, n))


def attack_norms(cls: type) -> tuple[str, ...]:
    """The norms an attack class attacks under: the choices of its `norm` parameter, else its fixed norm."""
    spec = cls.PARAMS.get("norm")
    if spec is not None:
        return tuple(spec.choices) or (spec.default,)
    return (cls.norm,)


def _named(attacks: Any) -> set[str]:
    """The attacks a user named, as opposed to those the keywords all/default brought in."""
    return {parse_attack(i)[0] for i in split_attacks(attacks) if i not in ("all", "default")}


def under_threat(items: list[tuple[str, dict]], classes: dict[str, type], norm: str,
                 explicit: set[str]) -> list[tuple[str, dict]]:
    """The attack items run under `norm`: each given that norm where it takes it as a parameter; an attack
    that cannot attack under it is left out when a keyword brought it in, and refused when named."""
    out = []
    for name, inline in items:
        cls = classes[name]
        norms = attack_norms(cls)
        if norm not in norms:
            if name in explicit:
                raise BenchError(f"attack '{name}' attacks under {', '.join(norms)}, not the threat model's {norm}")
            log.info("--threat %s: %s left out (it attacks under %s)", norm, name, ", ".join(norms))
            continue
        if "norm" in inline and inline["norm"] != norm:
            raise BenchError(f"attack '{name}' is given norm={inline['norm']} but the threat model is {norm}")
        if "norm" in cls.PARAMS and cls.PARAMS["norm"].default != norm:
            inline = {**inline, "norm": norm}
        out.append((name, inline))
    if not out:
        raise BenchError(f"none of the attacks given attacks under {norm}")
    return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise BenchError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device '{device}' requested but CUDA is not available here")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise BenchError(f"device '{device}' requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(device)


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "bnbench " + version("bnbench")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=4)
def _load_data(dataset: str, data_dir: str | None, n_train, n_val, n_test) -> data_mod.Dataset:
    # a sweep prepares dozens of runs on the same data: read it once (tensors are never modified)
    return data_mod.load(dataset, data_dir, n_train=n_train, n_val=n_val, n_test=n_test)


def prepare(req: Request, *, read_only: bool = False) -> Prepared:
    """Validate a request and load what it needs; `read_only`: only to read results (`bench sweep --status`),
    so the output directory need not be writable."""
    # a model given without a defense is evaluated as it is
    defense_name = req.defense or ("as_is" if req.arch else None)
    if not defense_name:
        raise BenchError("no defense given (use --defense NAME, `bench list` shows them; or --model NAME "
                         "--checkpoint PATH to evaluate a model as it is)")
    defense_cls = registry.load("defense", defense_name)
    protocol = resolve_protocol(req.protocol, defense_name, defense_cls)
    items = [parse_attack(i) for i in attack_items(req.attacks)]
    names = list(dict.fromkeys(n for n, _ in items))
    attack_classes = {n: registry.load("attack", n) for n in names}
    for name in req.attack_params:
        if name not in attack_classes:
            raise BenchError(f"--attack-param names attack '{name}', which is not among --attacks "
                             f"({', '.join(names)})")
    sets = dict(req.sets)
    threat = config_mod.parse_threat(req.threat) if req.threat else None
    if threat is not None:
        norm, eps = threat
        items = under_threat(items, attack_classes, norm, explicit=_named(req.attacks))
        budget_field = config_mod.NORM_BUDGET[norm]
        if budget_field in sets:
            raise BenchError(f"--threat {req.threat} sets the preset's {budget_field}: do not --set it as well")
        sets[budget_field] = eps
    preset = config_mod.get_preset(req.preset)
    # the label the run stores (name[options], options written exactly); unknown names and options fail here
    dataset = data_mod.resolve(req.dataset or preset.dataset).label
    # `--set` of a parameter of this run's defense or attacks is a slip: say which option sets it
    plugin_params = {k: (f"attack '{n}'", f"--attack-param {n}.", f"attack_params.{n}.")
                     for n, c in attack_classes.items() for k in c.PARAMS}
    plugin_params.update({k: (f"defense '{defense_name}'", "--param ", "params.") for k in defense_cls.PARAMS})
    preset = config_mod.override_preset(preset, sets, plugin_params)
    arch = req.arch or preset.arch
    model_source = models.source_digest(arch)  # imports the model's module: a bad name or path fails here
    device = resolve_device(req.device)
    precision = resolve_precision(req.precision, device)
    config_mod.validate_seed(req.seed)
    # the data decides the spec (classes, channels, size, standard budgets) the rest is checked against
    data = _load_data(dataset, None if req.data_dir is None else str(req.data_dir), preset.n_train, preset.n_val,
                      preset.n_test)
    preset = config_mod.concrete(preset, data.spec)
    normalize = models.parse_normalize(req.normalize, data.spec.channels, data_mod.DATASETS)

    params = resolve_params(f"defense '{defense_name}'", defense_cls.PARAMS, req.params, preset)
    defense = defense_cls(**params)
    attacks, labels = [], set()
    for name, inline in items:
        cls = attack_classes[name]
        given = {**req.attack_params.get(name, {}), **inline}
        full = resolve_params(f"attack '{name}'", cls.PARAMS, given, preset)
        if threat is not None and "eps" in cls.PARAMS and "eps" not in given and full["eps"] != threat[1]:
            # an attack whose budget does not follow the preset's: the threat model still decides it
            given["eps"] = threat[1]
            full = resolve_params(f"attack '{name}'", cls.PARAMS, given, preset)
        user = {k: full[k] for k in given}
        attack = cls(**full)
        attack.validate(data.spec)
        spec = AttackSpec(name, tuple(sorted(user.items())))
        if spec.label in labels:  # e.g. pgd10 and pgd10[eps=8/255] at the default budget
            continue
        labels.add(spec.label)
        attacks.append((spec, attack))

    out = Path(req.out).expanduser() if read_only else require_writable(req.out)
    if req.base_checkpoints or not models.is_builtin(arch):
        # the user's factory runs and its model answers a batch as a classifier of this data, or we say why
        probe = models.build_model(arch, data.spec, normalize)
        if not models.is_builtin(arch):
            models.check_outputs(probe, arch, data.spec)
    bases = []
    for recipe, path in sorted(req.base_checkpoints.items()):
        if recipe not in checkpoints.RECIPES:
            raise BenchError(f"--checkpoint names unknown recipe '{recipe}'; "
                             f"choose from: {', '.join(checkpoints.RECIPES)}")
        checkpoints.load_into(probe, checkpoints.load(Path(path), require_digest=False), path, arch=arch,
                              dataset=dataset)
        bases.append((recipe, str(Path(path).resolve()), checkpoints.file_sha256(Path(path))))
    if defense_cls is AsIs:  # (the core's own defense) what it cannot serve is refused before anything runs
        AsIs.checkpoint_recipe(arch, req.base_checkpoints, params["recipe"])

    cfg = RunConfig(defense=defense_name, params=tuple(sorted(params.items())), attacks=tuple(a for a, _ in attacks),
                    preset=preset, dataset=dataset, arch=arch, seed=req.seed, data_dir=req.data_dir,
                    device=str(device), precision=precision, compile=bool(req.compile), protocol=protocol,
                    out=str(out),
                    base_checkpoints=tuple(bases), checks=req.checks, data_fingerprint=data.fingerprint,
                    command=req.command, normalize=normalize, model_source=model_source,
                    save_adversarial=bool(req.save_adversarial), meta=config_mod.validate_meta(req.meta),
                    standard=tuple((n, getattr(data.spec, n)) for n in config_mod.ADDED_FIELDS),
                    added_at_default=added_at_default(defense_cls.PARAMS, params, preset))
    return Prepared(cfg, defense, attacks, data, device)


# ----------------------------------------------------------------------------------------------------
# execution


def _seed_all(*parts) -> None:
    torch.manual_seed(config_mod.derived_seed(*parts))


def substitute(attacks: list[tuple[AttackSpec, Attack]], randomized: bool | None, preset) -> list[tuple[AttackSpec, Attack]]:
    """Against a randomized defense, each attack that declares a `randomized_variant` (AutoAttack ->
    its EOT version) is replaced by it, with the user's parameters that the variant also has."""
    if not randomized:
        return attacks
    out = []
    for spec, attack in attacks:
        variant = getattr(attack, "randomized_variant", "")
        if variant:
            cls = registry.load("attack", variant)
            given = {k: v for k, v in spec.params if k in cls.PARAMS}
            full = resolve_params(f"attack '{variant}'", cls.PARAMS, given, preset)
            spec, attack = AttackSpec(variant, tuple(sorted(given.items()))), cls(**full)
        out.append((spec, attack))
    return out


def resolve_protocol(text: Any, defense_name: str, defense_cls: type) -> str:
    """adaptive, paper, or paper:NAME of a surrogate the defense declares (paper:FIRST is paper itself: the
    first declared surrogate is the default one, stored under one name)."""
    name = surrogate_of(text) if isinstance(text, str) else None
    if name is None and text != ADAPTIVE:
        raise BenchError(f"protocol must be adaptive, paper or paper:SURROGATE, got {text!r}")
    if name:
        names = list(defense_cls.SURROGATES)
        if name not in names:
            raise BenchError(f"defense '{defense_name}' has no surrogate '{name}' (its surrogates: "
                             f"{', '.join(names) or 'none'})")
        return PAPER if name == names[0] else text
    return text


def _protocol_for(cfg: RunConfig, has_surrogate: bool | None) -> str:
    # Without a surrogate the paper protocol is the adaptive one: store it once, under 'adaptive'. A named
    # surrogate is declared by the defense's class, so its build has one.
    if cfg.protocol == PAPER:
        return PAPER if has_surrogate else ADAPTIVE
    return cfg.protocol


BUILD = "(build)"  # the failures-table cell of a defense whose build failed: the whole job
# Faults of the machine, not of a plugin: they end the command (the CLI says so in one line), as before.
ENVIRONMENT_FAULTS = (OSError, sqlite3.Error)
CORE = Path(__file__).resolve().parent


def _plugin_fault(exc: Exception) -> bool:
    """Whether `exc` is the plugin's failure. A BenchError raised by bench's own code on a plugin's behalf (a
    corrupt cached base model, missing data) is the user's to fix, as before: exit 2, not a failed cell."""
    if isinstance(exc, ENVIRONMENT_FAULTS):
        return False
    if not isinstance(exc, BenchError):
        return True
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return not Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(CORE)


class PluginFailed(Exception):
    """`bench check` stores nothing: a defense that fails to build ends it, named, with exit 1."""

    def __init__(self, failure: "Failure") -> None:
        super().__init__(failure.line())
        self.failure = failure


@dataclass
class Failure:
    """A plugin that raised at run time: that cell (or, for the defense, that job) failed, the rest went on."""

    plugin: str  # registry.who(): "attack 'x' (module:Class from dist)"
    cell: str
    protocol: str
    error: str  # "ExcType: message", one line

    def line(self) -> str:
        """What the user reads: one line whatever the plugin's name or message hold (a sweep job's label, an
        error from a worker, are quoted as given)."""
        from bench.errors import one_line

        return one_line(f"bench: {self.plugin} failed: {self.error}")


def execute(prep: Prepared, *, quiet: bool = False, store: Store | None = None) -> dict:
    """Build the defense (unless every cell is finished) and evaluate the unfinished cells. A plugin that
    raises fails its cell (an attack) or this job (the defense): stored, named in the result's
    `failures`, never raised. `store`: where results go (default: the database in the run's `out`; a sweep
    on a cluster gives one that sends each cell to the driver's database)."""
    cfg = prep.config
    run_id = cfg.run_id
    own_store = store is None
    store = Store(cfg.out) if own_store else store
    failures: list[Failure] = []
    try:
        known = {r["run_id"]: r for r in store.runs() if r["run_id"] == run_id}
        attacks, protocol, wanted = cells_wanted(prep, known.get(run_id))
        if run_id in known:  # a new run records its request once it exists (after the build, in _evaluate)
            store.put_requests(run_id, requested(attacks, protocol))
        finished, missing = finished_cells(prep, store, wanted)
        if missing:
            log.info("run %s: %d finished cell(s) have no saved adversarial images (%s): attacking them again "
                     "to save them", run_id[:10], len(missing), ", ".join(f"{a} ({p})" for a, p in missing))
        todo = [cell for cell in wanted if cell not in finished]
        done_before = len(wanted) - len(todo)
        if done_before:
            log.info("run %s: %d of %d cells already finished, skipped", run_id[:10], done_before, len(wanted))
        if todo:
            _evaluate(prep, store, run_id, finished, quiet, failures)
        elif cfg.meta:  # a finished run takes the model-card fields given now
            store.put_meta(run_id, RUN_INFO, dict(cfg.meta))
        run = next((r for r in store.runs() if r["run_id"] == run_id), None)
        if cfg.checks and run is not None:
            store.put_checks(run_id, [c.row() for c in checks.from_cells(run, store.cells(run_id))])
        attacks = substitute(prep.attacks, bool(run["randomized"]) if run else None, cfg.preset)
        result = summary(store, run_id, [spec.label for spec, _ in attacks], cfg)
        result["failures"] = failures
        return result
    finally:
        if own_store:
            store.close()


def cells_wanted(prep: Prepared, run: dict | None) -> tuple[list, str, list[tuple[str, str]]]:
    """The attacks (substituted for a randomized defense), protocol and (cell, protocol) keys a job asks of
    its run; `run` is the stored run, whose build told whether it has a surrogate and is randomized."""
    cfg = prep.config
    has_surrogate = bool(run["has_surrogate"]) if run is not None else None
    randomized = bool(run["randomized"]) if run is not None else None
    protocol = _protocol_for(cfg, has_surrogate)
    attacks = substitute(prep.attacks, randomized, cfg.preset)
    return attacks, protocol, [(CLEAN, NO_PROTOCOL)] + [(spec.label, protocol) for spec, _ in attacks]


def finished_cells(prep: Prepared, store: Store, wanted: list[tuple[str, str]]) -> tuple[set, list]:
    """The stored cells of the job's run, less those of `wanted` whose `--save-adversarial` images are missing
    (deleted, or stored before the option was given): those are attacked again to save them, and returned
    too."""
    finished = store.finished(prep.config.run_id)
    if not prep.config.save_adversarial:
        return finished, []
    missing = unsaved(store, prep.config.run_id, [cell for cell in wanted if cell in finished])
    return finished - set(missing), missing


def job_state(prep: Prepared, store: Store) -> tuple[int, int, int]:
    """(cells wanted, finished, failed) of a job in `store`: what `bench sweep --status` shows."""
    run_id = prep.config.run_id
    run = next((r for r in store.runs() if r["run_id"] == run_id), None)
    _, _, wanted = cells_wanted(prep, run)
    finished, _ = finished_cells(prep, store, wanted)
    failed = {(f["cell"], f["protocol"]) for f in store.failures(run_id)}
    done = sum(cell in finished for cell in wanted)
    broken = (BUILD, NO_PROTOCOL) in failed or any(cell in failed for cell in wanted if cell not in finished)
    return len(wanted), done, int(broken)


def requested(attacks: list[tuple[AttackSpec, Attack]], protocol: str) -> list[tuple[str, str, str]]:
    """The (cell, protocol, threat) a run is asked for: clean and each attack."""
    return [(CLEAN, NO_PROTOCOL, "-")] + [(spec.label, protocol, attack.threat) for spec, attack in attacks]


def _failed(store: Store, prep: Prepared, failures: list[Failure], kind: str, name: str, cell: str,
            protocol: str, exc: Exception) -> None:
    """Record a plugin's failure: one line in the database and the result, the traceback in failures.log."""
    import time
    import traceback

    cfg = prep.config
    failure = Failure(registry.who(kind, name), cell, protocol, registry.one_line(exc))
    failures.append(failure)
    store.put_failure(cfg.run_id, cell=cell, protocol=protocol, plugin=failure.plugin, error=failure.error,
                      defense=cfg.defense)
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log.debug("%s", trace)
    try:  # for the plugin's author; the user sees one line
        store.append_text(FAILURE_LOG, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} run {cfg.run_id[:10]} cell "
                                       f"{cell} ({protocol}): {failure.plugin}\n{trace}\n")
    except OSError:
        pass


FAILURE_LOG = "failures.log"


def _context(prep: Prepared, quiet: bool) -> Context:
    cfg = prep.config
    configure_backends(prep.device)
    return Context(data=prep.data, arch=cfg.arch, device=prep.device, seed=cfg.seed, preset=cfg.preset,
                   cache_dir=Path(cfg.out) / "cache", precision=cfg.precision, compile=cfg.compile, quiet=quiet,
                   base_checkpoints={r: p for r, p, _ in cfg.base_checkpoints}, log=log,
                   scope=config_mod.training_scope(cfg.identity(), prep.data.train_fingerprint),
                   normalize=cfg.normalize, model_source=cfg.model_source)


def _build(prep: Prepared, ctx: Context) -> tuple[Defended, float]:
    import time

    cfg = prep.config
    _seed_all(cfg.seed, "defense", cfg.defense)
    start = time.perf_counter()
    defended = prep.defense.build(ctx)
    if not isinstance(defended, Defended) or not isinstance(defended.model, torch.nn.Module):
        raise TypeError(f"build() returned {type(defended).__name__}, not bench.api.Defended")
    passes = defended.forward_passes
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise TypeError(f"build() returned Defended(forward_passes={passes!r}): it must be an integer >= 1")
    _check_surrogates(type(prep.defense), defended)
    return defended, time.perf_counter() - start


def _check_surrogates(cls: type, defended: Defended) -> None:
    """build() returns the surrogates its class declares: the first as `surrogate`, the others by name."""
    declared = list(cls.SURROGATES)
    if declared and not isinstance(defended.surrogate, torch.nn.Module):
        raise TypeError(f"build() returned no surrogate, but the class declares SURROGATES ({declared[0]} first)")
    named = defended.surrogates
    if not isinstance(named, dict) or sorted(named) != sorted(declared[1:]):
        raise TypeError(f"build() returned surrogates {sorted(named) if isinstance(named, dict) else named!r}; "
                        f"the class declares {declared[1:]} besides its default")
    for name, s in named.items():
        if not (isinstance(s, Surrogate) and isinstance(s.model, torch.nn.Module)):
            raise TypeError(f"build() returned surrogates['{name}'] = {type(s).__name__}, not bench.api.Surrogate")


def _build_and_probe(prep: Prepared, ctx: Context, n: int, stored: list[checks.CheckResult] | None = None
                     ) -> tuple[Defended, float, list[checks.CheckResult]]:
    """Build the defense and take checks 3-6 on the first `n` test images (none when n is 0), or reuse
    `stored`, a resumed run's probes taken on this same model and batch (on a large batch-dependent
    composition they cost minutes, as much as an attack). They come before any attack because they can
    change how it is attacked: a defense found randomized is attacked as randomized."""
    defended, seconds = _build(prep, ctx)
    if stored is not None:
        probes = stored
    elif n:
        first = prep.data.test.subset(slice(0, n))
        probes = checks.probe(defended, first.x.to(prep.device), first.y.to(prep.device), prep.config.preset.eps,
                              ctx.generator("checks:large-eps"))
    else:
        probes = []
    if any(c.found_randomness for c in probes):
        defended.randomized = True
    return defended, seconds, probes


def _stored_meta(store: Store, run_id: str) -> dict:
    """The --meta fields a stored run already has (a resumed run without --meta keeps them)."""
    run = next((r for r in store.runs() if r["run_id"] == run_id), None)
    return dict(config_mod.harness_info(run).get("meta") or {})


def _evaluate(prep: Prepared, store: Store, run_id: str, finished: set, quiet: bool,
              failures: list[Failure]) -> None:
    cfg = prep.config
    ctx = _context(prep, quiet)
    stored = {c["name"]: c for c in store.checks(run_id)}
    reuse = cfg.checks and all(name in stored for name in checks.PROBES)
    try:
        defended, build_seconds, probes = _build_and_probe(
            prep, ctx, cfg.preset.eval_batch_size if cfg.checks else 0,
            [checks.CheckResult.from_row(stored[name]) for name in checks.PROBES] if reuse else None)
    except Exception as exc:  # (a fault of the environment or the user still ends the command)
        if not _plugin_fault(exc):
            raise
        # the defense plugin (or its model, probed) raised: this job fails, others go on
        _failed(store, prep, failures, "defense", cfg.defense, BUILD, NO_PROTOCOL, exc)
        return
    store.clear_failure(run_id, BUILD, NO_PROTOCOL)
    for c in probes:
        if c.status in ("warn", "fail"):
            log.warning("check %s: %s: %s", c.name, c.status, c.detail)
    store.put_run({
        "run_id": run_id, "defense": cfg.defense, "params": dict(cfg.params), "preset": cfg.preset.name,
        "dataset": cfg.dataset, "arch": cfg.arch, "seed": cfg.seed, "precision": cfg.precision,
        "config": cfg.identity(), "command": cfg.command, "code_version": code_version(),
        "batch_dependent": int(defended.batch_dependent), "randomized": int(defended.randomized),
        "has_surrogate": int(defended.surrogate is not None),
        "info": {**defended.info, RUN_INFO: {"forward_passes": defended.forward_passes,
                                             "train_data": prep.data.train_fingerprint,
                                             **({"surrogates": dict(type(prep.defense).SURROGATES)}
                                                if type(prep.defense).SURROGATES else {}),
                                             "cached_files": dict(sorted(ctx.cached_files.items())),
                                             "meta": {**_stored_meta(store, run_id), **dict(cfg.meta)}}},
        "build_seconds": build_seconds,
    })
    if probes and not reuse:
        store.put_checks(run_id, [c.row() for c in probes])
    protocol = _protocol_for(cfg, defended.surrogate is not None)
    attacks = substitute(prep.attacks, defended.randomized, cfg.preset)
    store.put_requests(run_id, requested(attacks, protocol))
    test = prep.data.test
    batch = cfg.preset.eval_batch_size
    if (CLEAN, NO_PROTOCOL) not in finished:
        try:
            res = clean_cell(defended, test, batch, prep.device, progress=ctx.progress)
        except Exception as exc:  # (a fault of the environment or the user still ends the command)
            if not _plugin_fault(exc):
                raise
            # the defended model itself fails: every attack would too
            _failed(store, prep, failures, "defense", cfg.defense, CLEAN, NO_PROTOCOL, exc)
            return
        store.put_cell(run_id, attack=CLEAN, protocol=NO_PROTOCOL, name=CLEAN, params={}, norm="-", eps=0.0,
                       threat="-", flags=res.flags, seconds=res.seconds, extra=res.extra)
        log.info("clean: %.2f%% of %d (%.1fs)", 100 * res.accuracy, len(res.flags), res.seconds)
    # Under a paper protocol the attack differentiates a surrogate, whose images other runs may have crafted
    target = defended.attacked_under(protocol)
    crafted = None if protocol == ADAPTIVE else CraftedCache(store, target, protocol, cfg.seed, batch, test,
                                                             prep.device)
    for spec, attack in attacks:
        if (spec.label, protocol) in finished:
            continue
        _seed_all(cfg.seed, "attack", spec.label)
        try:
            attack.setup(ctx, target)
            key = reuse = None
            if crafted is not None:
                key = crafted.key(spec.label, attack)
                reuse = crafted.load(key, test)
            res: CellResult = attack_cell(attack, defended, test, batch_size=batch, device=prep.device,
                                          protocol=protocol, progress=ctx.progress, desc=spec.label,
                                          keep=cfg.save_adversarial or (crafted is not None and reuse is None),
                                          reuse=reuse)
        except Exception as exc:  # (a fault of the environment or the user still ends the command)
            if not _plugin_fault(exc):
                raise
            # this cell fails, the next attacks still run
            _failed(store, prep, failures, "attack", spec.name, spec.label, protocol, exc)
            continue
        if cfg.save_adversarial:  # the cell's file first: a stored cell of this run always has its images
            save_adversarial(store, run_id, spec.label, protocol, res, test.y)
        store.put_cell(run_id, attack=spec.label, protocol=protocol, name=spec.name, params=dict(attack.params),
                       norm=attack.norm, eps=attack.eps, threat=attack.threat, flags=res.flags,
                       seconds=res.seconds, extra=res.extra)
        log.info("%s (%s): %.2f%% of %d (%.1fs%s)", spec.label, protocol, 100 * res.accuracy, len(res.flags),
                 res.seconds, f", images crafted by run {reuse.run_id[:10]}" if reuse is not None else "")
        if crafted is not None and reuse is None and res.adversarial is not None:
            crafted.save(key, res.adversarial, res.attack_extra, res.extra["state_changed"], res.seconds, run_id)


ADVERSARIAL = "adversarial"
NAME_MAX = 255  # bytes in a file name (ext4, xfs, btrfs, APFS, NTFS)


def adversarial_path(out: Path, run_id: str, label: str, protocol: str) -> Path:
    """Where `--save-adversarial` keeps a cell's images: OUT/adversarial/<run id>/<label>.<protocol>.npz.
    What a file name cannot hold becomes '_'; since two labels can then read the same (`a[note=a b]`,
    `a[note=a_b]`), such a name ends with a digest of the label and protocol, and so does one cut to fit
    a file name's 255 bytes: every cell has a file of its own."""
    safe, kind = (re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text) for text in (label, protocol))
    if (safe, kind) == (label, protocol) and len(f"{safe}.{kind}.npz") <= NAME_MAX:
        return Path(out) / ADVERSARIAL / run_id[:16] / f"{safe}.{kind}.npz"
    digest = hashlib.sha256(f"{label}\0{protocol}".encode()).hexdigest()[:16]
    stem = f"{safe}.{kind}"[:NAME_MAX - len(digest) - len("-.npz")]  # (ASCII only: one byte a character)
    return Path(out) / ADVERSARIAL / run_id[:16] / f"{stem}-{digest}.npz"


def unsaved(store: Store, run_id: str, cells: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The attacked cells among `cells` whose `--save-adversarial` file is missing (deleted, or stored
    before the option was given): they are attacked again to save it."""
    return [(label, protocol) for label, protocol in cells if label != CLEAN
            and not store.has_file(str(adversarial_path(Path("."), run_id, label, protocol)))]


def save_adversarial(store: Store, run_id: str, label: str, protocol: str, res: CellResult, y: torch.Tensor) -> None:
    """The cell's adversarial images (float32, exactly as attacked), labels, the attack's own per-sample verdicts
    (`correct`, as the cell stores them) and the clean cell's (`clean_correct`, same order: a sample counts as
    robust when both hold), in one compressed npz that the store writes completely or not at all, before the
    cell is stored. The clean verdicts come from the store: a run stores its clean cell before it attacks (a
    run whose clean cell fails attacks nothing), so only a caller that saves a cell of a run without one gets
    a file without `clean_correct`."""
    import io

    relpath = str(adversarial_path(Path("."), run_id, label, protocol))
    if res.adversarial is None:  # (an attack over no images) nothing to save: say so rather than store it
        raise BenchError(f"cell {label} ({protocol}): no adversarial images came back to save in {relpath}; "
                         f"the cell was not stored")
    clean = next((c["flags"] for c in store.cells(run_id) if c["attack"] == CLEAN), None)
    if clean is not None and clean.shape != res.flags.shape:
        raise BenchError(f"cell {label} ({protocol}): {res.flags.size} verdicts but the run's clean cell has "
                         f"{clean.size}; the cell was not stored")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x_adv=res.adversarial.float().numpy(), y=y.cpu().numpy(), correct=res.flags,
                        **({"clean_correct": clean} if clean is not None else {}),
                        attack=np.array(label), protocol=np.array(protocol))
    try:
        store.write_file(relpath, buffer.getvalue())
    except OSError as exc:
        where = getattr(store, "path", None)  # (a worker's store is the driver's: its path is there)
        raise BenchError(f"cannot save the adversarial images of cell {label} ({protocol}) to "
                         f"{where.parent / relpath if where is not None else relpath}: {os_reason(exc)}; the "
                         f"cell was not stored (re-run the command once it can be written: it is attacked "
                         f"again)") from None


def check_attacks() -> list[str]:
    """The attacks `bench check` runs: those declaring `in_check`, in `--attacks all` order (cheap first)."""
    classes, broken = registry.load_all("attack")
    for exc in broken.values():  # `bench list` shows it broken; a defense's check must not stop for it
        log.info("bench check skips %s", exc)
    return sorted((n for n, cls in classes.items() if cls.in_check), key=lambda n: (classes[n].order, n))


def check(prep: Prepared, n: int, quiet: bool = False) -> list[checks.CheckResult]:
    """`bench check`: checks 3-8 on the first `n` test images with the prepared attacks at their defaults
    (`bench check` prepares `check_attacks()`), storing nothing but the cached models."""
    cfg = prep.config
    ctx = _context(prep, quiet)
    try:
        defended, _, results = _build_and_probe(prep, ctx, n)
    except Exception as exc:
        if not _plugin_fault(exc):
            raise
        # as in `bench run`: the defense plugin (or its model, probed) raised
        raise PluginFailed(Failure(registry.who("defense", cfg.defense), BUILD, NO_PROTOCOL,
                                   registry.one_line(exc))) from exc
    subset = prep.data.test.subset(slice(0, n))
    cells = {}
    for spec, _ in prep.attacks:
        name = spec.name
        cls = registry.load("attack", name)
        attack = cls(**resolve_params(f"attack '{name}'", cls.PARAMS, {}, cfg.preset))
        _seed_all(cfg.seed, "attack", name)
        attack.setup(ctx, defended)
        res = attack_cell(attack, defended, subset, batch_size=cfg.preset.eval_batch_size, device=prep.device,
                          progress=ctx.progress, desc=f"check {name}")
        cells[name] = {"attack": name, "name": name, "threat": attack.threat, "n": len(res.flags),
                       "correct": int(res.flags.sum()), "flags": res.flags}
    results += [checks.budget_monotonicity(cells), checks.blackbox_whitebox(cells)]
    return results


def summary(store: Store, run_id: str, labels: list[str], cfg: RunConfig) -> dict:
    """This run's accuracies: clean, each requested attack, and the worst case per threat model; a
    requested cell that is not stored shows as missing (or failed, with its error), and the worst case of
    its threat model says that it lacks it."""
    from bench.leaderboard import missing_cells

    cells = {(c["attack"], c["protocol"]): c for c in robust_cells(store.cells(run_id))}
    absent = [m for m in missing_cells(store, run_id, list(cells.values())) if m["attack"] in labels or m["attack"] == CLEAN]
    rows = []
    clean = cells.get((CLEAN, NO_PROTOCOL))
    if clean is not None:
        rows.append({"attack": CLEAN, "protocol": NO_PROTOCOL, "threat": "-", "n": clean["n"],
                     "accuracy": clean["correct"] / clean["n"], "seconds": clean["seconds"]})
    attacked = [c for (label, _), c in cells.items() if label != CLEAN and label in labels]
    for c in attacked:
        rows.append({"attack": c["attack"], "protocol": c["protocol"], "threat": c["threat"], "n": c["n"],
                     "accuracy": c["correct"] / c["n"], "seconds": c["seconds"]})
    worst = {key: worst_case(clean["flags"] if clean is not None else None, attacked, *key)
             for key in dict.fromkeys((c["threat"], c["protocol"]) for c in attacked)}
    for r in absent:
        rows.append({"attack": r["attack"], "protocol": r["protocol"], "threat": r["threat"], "n": 0,
                     "accuracy": float("nan"), "seconds": float("nan"),
                     "status": f"failed: {r['error']}" if r["error"] else "missing"})
    for (threat, protocol) in list(worst) + [(r["threat"], r["protocol"]) for r in absent if r["threat"] != "-"]:
        if (threat, protocol) in [(w["threat"], w["protocol"]) for w in rows if w["attack"] == "worst case"]:
            continue
        flags = worst.get((threat, protocol))
        lacking = [r["attack"] + (" failed" if r["error"] else " missing")
                   for r in absent if r["attack"] == CLEAN or (r["threat"], r["protocol"]) == (threat, protocol)]
        rows.append({"attack": "worst case", "protocol": protocol, "threat": threat,
                     "n": int(flags.size) if flags is not None else 0,
                     "accuracy": float(flags.mean()) if flags is not None else float("nan"),
                     "seconds": float("nan"), "incomplete": lacking})
    return {"run_id": run_id, "defense": cfg.defense, "rows": rows, "checks": store.checks(run_id),
            "build_failure": next((f for f in store.failures(run_id) if (f["cell"], f["protocol"]) == (BUILD, NO_PROTOCOL)),
                                  None)}
