"""`bench run`: validate everything a user can get wrong, then build the defense and evaluate each cell.

All validation (names, parameters, data, checkpoints, output directory) happens before the results
database is opened, so a mistake never touches stored results.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import checkpoints, config as config_mod, data as data_mod, registry
from bench.api import Attack, Context, Defended, Defense, resolve_params
from bench.config import AttackSpec, RunConfig, stable_hash
from bench.errors import BenchError
from bench.evaluate import CellResult, attack_cell, clean_cell
from bench.store import Store
from bench.train import resolve_precision

log = logging.getLogger("bench")
CLEAN = "clean"
NO_PROTOCOL = "-"  # clean accuracy does not depend on the protocol


@dataclass
class Request:
    """What the user asked for, merged from TOML and CLI (CLI wins), still unvalidated."""

    defense: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    attacks: Any = "pgd10,fgsm"
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    preset: str = config_mod.DEFAULT_PRESET
    dataset: str | None = None
    data_dir: str | None = None
    arch: str | None = None
    device: str = "auto"
    seed: int = 0
    out: str = "results"
    precision: str = "auto"
    protocol: str = "adaptive"
    sets: dict[str, Any] = field(default_factory=dict)
    base_checkpoints: dict[str, str] = field(default_factory=dict)
    checks: bool = True
    quiet: bool = False
    command: str = ""


@dataclass
class Prepared:
    config: RunConfig
    defense: Defense
    attacks: list[tuple[AttackSpec, Attack]]
    data: data_mod.Dataset
    device: torch.device


# ----------------------------------------------------------------------------------------------------
# validation


def parse_assignments(items, what: str) -> dict[str, str]:
    """['k=v', ...] -> {'k': 'v'}; a malformed item is a user error."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"malformed {what} '{item}': expected key=value")
        out[key.strip()] = value.strip()
    return out


def parse_attack_params(items) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in parse_assignments(items, "--attack-param").items():
        name, dot, param = key.partition(".")
        if not dot or not param:
            raise BenchError(f"malformed --attack-param '{key}={value}': expected attack.key=value")
        out.setdefault(name, {})[param] = value
    return out


def attack_names(attacks: Any) -> list[str]:
    names = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise BenchError("no attacks given (use --attacks pgd10,fgsm or --attacks all)")
    if names == ["all"]:
        classes = {n: registry.load("attack", n) for n in registry.names("attack")}
        return sorted(classes, key=lambda n: (getattr(classes[n], "order", 50), n))
    seen = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BenchError(f"device must be cpu or cuda, got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device '{device}' requested but CUDA is not available here")
    return torch.device(device)


def check_writable(out: str) -> Path:
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise BenchError(f"output directory {path} is not writable ({exc.strerror or exc})") from None
    return path


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


def prepare(req: Request) -> Prepared:
    if not req.defense:
        raise BenchError("no defense given (use --defense NAME; `bench list` shows them)")
    if req.protocol not in ("adaptive", "paper"):
        raise BenchError(f"protocol must be adaptive or paper, got '{req.protocol}'")
    defense_cls = registry.load("defense", req.defense)
    names = attack_names(req.attacks)
    attack_classes = {n: registry.load("attack", n) for n in names}
    for name in req.attack_params:
        if name not in attack_classes:
            raise BenchError(f"--attack-param names attack '{name}', which is not among --attacks "
                             f"({', '.join(names)})")
    preset = config_mod.get_preset(req.preset)
    dataset = req.dataset or preset.dataset
    if dataset not in data_mod.DATASETS:
        from bench.errors import unknown

        raise unknown("dataset", dataset, data_mod.DATASETS)
    preset = config_mod.override_preset(preset, req.sets)
    preset = config_mod.concrete(preset, data_mod.DATASETS[dataset])
    arch = req.arch or preset.arch
    from bench import models

    if arch not in models.ARCHS:
        from bench.errors import unknown

        raise unknown("architecture", arch, models.ARCHS)
    device = resolve_device(req.device)
    precision = resolve_precision(req.precision, device)
    if not isinstance(req.seed, int) or req.seed < 0:
        raise BenchError(f"seed must be a non-negative integer, got {req.seed!r}")

    params = resolve_params(f"defense '{req.defense}'", defense_cls.PARAMS, req.params, preset)
    defense = defense_cls(**params)
    attacks = []
    for name in names:
        cls = attack_classes[name]
        given = req.attack_params.get(name, {})
        full = resolve_params(f"attack '{name}'", cls.PARAMS, given, preset)
        user = {k: full[k] for k in given}
        attacks.append((AttackSpec(name, tuple(sorted(user.items()))), cls(**full)))

    out = check_writable(req.out)
    data = data_mod.load(dataset, req.data_dir, n_train=preset.n_train, n_val=preset.n_val,
                         n_test=preset.n_test)
    bases = []
    for recipe, path in sorted(req.base_checkpoints.items()):
        if recipe not in checkpoints.RECIPES:
            raise BenchError(f"--base-checkpoint names unknown recipe '{recipe}'; "
                             f"choose from: {', '.join(checkpoints.RECIPES)}")
        probe = models.build(arch, data.spec)
        checkpoints.load_into(probe, checkpoints.load(Path(path), require_digest=False), path, arch=arch,
                              dataset=dataset)
        bases.append((recipe, str(Path(path).resolve()), checkpoints.file_sha256(Path(path))))

    cfg = RunConfig(defense=req.defense, params=tuple(sorted(params.items())), attacks=tuple(a for a, _ in attacks),
                    preset=preset, dataset=dataset, arch=arch, seed=req.seed, data_dir=req.data_dir,
                    device=str(device), precision=precision, protocol=req.protocol, out=str(out),
                    base_checkpoints=tuple(bases), checks=req.checks, data_fingerprint=data.fingerprint,
                    command=req.command)
    return Prepared(cfg, defense, attacks, data, device)


# ----------------------------------------------------------------------------------------------------
# execution


def _seed_all(*parts) -> None:
    torch.manual_seed(int(stable_hash(list(parts))[:8], 16))


def _protocol_for(cfg: RunConfig, has_surrogate: bool | None) -> str:
    # Without a surrogate the paper protocol is the adaptive one: store it once, under 'adaptive'.
    return "paper" if (cfg.protocol == "paper" and has_surrogate) else "adaptive"


def execute(prep: Prepared, *, quiet: bool = False) -> dict:
    """Build the defense (unless every cell is finished) and evaluate the unfinished cells."""
    cfg = prep.config
    run_id = cfg.run_id
    store = Store(cfg.out)
    try:
        finished = store.finished(run_id)
        known = {r["run_id"]: r for r in store.runs() if r["run_id"] == run_id}
        has_surrogate = bool(known[run_id]["has_surrogate"]) if run_id in known else None
        protocol = _protocol_for(cfg, has_surrogate)
        wanted = [(CLEAN, NO_PROTOCOL)] + [(spec.label, protocol) for spec, _ in prep.attacks]
        todo = [cell for cell in wanted if cell not in finished]
        done_before = len(wanted) - len(todo)
        if done_before:
            log.info("run %s: %d of %d cells already finished, skipped", run_id[:10], done_before, len(wanted))
        if todo:
            _evaluate(prep, store, run_id, finished, quiet)
        return summary(store, run_id, [spec.label for spec, _ in prep.attacks], cfg)
    finally:
        store.close()


def _evaluate(prep: Prepared, store: Store, run_id: str, finished: set, quiet: bool) -> None:
    cfg = prep.config
    cache = Path(cfg.out) / "cache"
    ctx = Context(data=prep.data, arch=cfg.arch, device=prep.device, seed=cfg.seed, preset=cfg.preset,
                  cache_dir=cache, precision=cfg.precision, quiet=quiet,
                  base_checkpoints={r: p for r, p, _ in cfg.base_checkpoints}, log=log,
                  scope={k: v for k, v in cfg.identity().items() if k not in ("defense", "params")})
    _seed_all(cfg.seed, "defense", cfg.defense)
    import time

    start = time.perf_counter()
    defended = prep.defense.build(ctx)
    build_seconds = time.perf_counter() - start
    if not isinstance(defended, Defended) or not isinstance(defended.model, torch.nn.Module):
        raise BenchError(f"defense '{cfg.defense}' returned {type(defended).__name__}, not bench.api.Defended")
    store.put_run({
        "run_id": run_id, "defense": cfg.defense, "params": dict(cfg.params), "preset": cfg.preset.name,
        "dataset": cfg.dataset, "arch": cfg.arch, "seed": cfg.seed, "precision": cfg.precision,
        "config": cfg.identity(), "command": cfg.command, "code_version": code_version(),
        "batch_dependent": int(defended.batch_dependent), "randomized": int(defended.randomized),
        "has_surrogate": int(defended.surrogate is not None), "info": defended.info,
        "build_seconds": build_seconds,
    })
    protocol = _protocol_for(cfg, defended.surrogate is not None)
    test = prep.data.test
    batch = cfg.preset.eval_batch_size
    if (CLEAN, NO_PROTOCOL) not in finished:
        res = clean_cell(defended, test, batch, prep.device, progress=ctx.progress)
        store.put_cell(run_id, attack=CLEAN, protocol=NO_PROTOCOL, name=CLEAN, params={}, norm="-", eps=0.0,
                       threat="-", flags=res.flags, seconds=res.seconds, extra={})
        log.info("clean: %.2f%% of %d (%.1fs)", 100 * res.accuracy, len(res.flags), res.seconds)
    for spec, attack in prep.attacks:
        if (spec.label, protocol) in finished:
            continue
        _seed_all(cfg.seed, "attack", spec.label)
        attack.setup(ctx, defended)
        res: CellResult = attack_cell(attack, defended, test, batch_size=batch, device=prep.device,
                                      protocol=protocol, progress=ctx.progress, desc=spec.label)
        store.put_cell(run_id, attack=spec.label, protocol=protocol, name=spec.name, params=dict(attack.params),
                       norm=attack.norm, eps=attack.eps, threat=attack.threat, flags=res.flags,
                       seconds=res.seconds, extra=res.extra)
        log.info("%s (%s): %.2f%% of %d (%.1fs)", spec.label, protocol, 100 * res.accuracy, len(res.flags),
                 res.seconds)


def summary(store: Store, run_id: str, labels: list[str], cfg: RunConfig) -> dict:
    """This run's accuracies: clean, each requested attack, and the worst case per threat model."""
    cells = {(c["attack"], c["protocol"]): c for c in store.cells(run_id)}
    rows = []
    clean = cells.get((CLEAN, NO_PROTOCOL))
    if clean is not None:
        rows.append({"attack": CLEAN, "protocol": NO_PROTOCOL, "threat": "-", "n": clean["n"],
                     "accuracy": clean["correct"] / clean["n"], "seconds": clean["seconds"]})
    worst: dict[tuple[str, str], np.ndarray] = {}
    for (label, protocol), c in cells.items():
        if label == CLEAN or label not in labels:
            continue
        rows.append({"attack": label, "protocol": protocol, "threat": c["threat"], "n": c["n"],
                     "accuracy": c["correct"] / c["n"], "seconds": c["seconds"]})
        key = (c["threat"], protocol)
        base = worst.get(key, clean["flags"] if clean is not None else np.ones(c["n"], bool))
        worst[key] = base & c["flags"]
    for (threat, protocol), flags in worst.items():
        rows.append({"attack": "worst case", "protocol": protocol, "threat": threat, "n": int(flags.size),
                     "accuracy": float(flags.mean()), "seconds": float("nan")})
    return {"run_id": run_id, "defense": cfg.defense, "rows": rows}
