"""`bench sweep FILE.toml`: a grid of runs -- the inputs of the papers' tables -- run locally.

    preset = "mini"                       # any `bench run` setting, for every cell
    data_dir = "../shared/data/cifar10-mini"
    attacks = ["pgd10", "fgsm"]
    seeds = [0]
    protocols = ["adaptive"]
    set = { n_test = 500 }

    [[cells]]
    defense = "rift_bn"
    grid = { k = [1, 2, 3, 4, 5] }        # one run per combination of the listed values
    params = { bn_perturb = "affine" }    # fixed parameters
    attacks = ["pgd10", "autoattack"]     # a cell may override any top-level setting

Every job is validated before the first one runs; each run resumes its finished cells, so a sweep that
is interrupted and started again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import config as config_mod
from bench.errors import BenchError, os_reason

# The run settings a sweep file takes (config.SETTINGS, `sweep`), and its own keys: the axes (one run per
# value) and the grid's structure.
AXES = {"seeds": config_mod.SEEDS, "protocols": config_mod.NAMES}
TOP_KEYS = {**{s.toml_key: s.kind for s in config_mod.SETTINGS if "top" in s.sweep}, **AXES,
            "cells": config_mod.CELLS}
CELL_KEYS = {**{s.toml_key: s.kind for s in config_mod.SETTINGS if "cell" in s.sweep}, **AXES,
             "grid": config_mod.GRID}


@dataclass
class Job:
    request: object  # runner.Request
    label: str


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


MAX_JOBS = 100_000  # far beyond any sweep that can run; a grid past it is a typo, and expanding it fills the memory


def jobs(path: str | Path, *, out: str | None = None, quiet: bool = True) -> list[Job]:
    from bench.runner import Request

    conf = config_mod.read_toml(path)
    config_mod.validate_toml(conf, TOP_KEYS, str(path))
    cells = conf.get("cells")
    if not cells:
        raise BenchError(f"{path}: no [[cells]] to run")
    if out is not None and not out.strip():
        raise BenchError("--out must not be empty")
    out_dir = out or conf.get("out", config_mod.SETTING["out"].default)
    result = []
    total = 0
    for i, cell in enumerate(cells, start=1):
        where = f"{path}, cell {i}"
        config_mod.validate_toml(cell, CELL_KEYS, where)
        if "defense" not in cell:
            raise BenchError(f"{where}: no defense")
        merged = {**{k: v for k, v in conf.items() if k != "cells"}, **cell}
        axes = [(k, _as_list(v)) for k, v in cell.get("grid", {}).items()]
        seeds = [config_mod.validate_seed(s, f"{where}: each of seeds")
                 for s in _as_list(merged.get("seeds", config_mod.SETTING["seed"].default))]
        protocols = _as_list(merged.get("protocols", config_mod.SETTING["protocol"].default))
        for what, values in [("seeds", seeds), ("protocols", protocols)] + [(f"grid.{k}", v) for k, v in axes]:
            if not values:  # an empty list would silently drop every run of this cell
                raise BenchError(f"{where}: {what} is an empty list")
        sizes = [len(v) for _, v in axes] + [len(seeds), len(protocols)]
        total += math.prod(sizes)
        if total > MAX_JOBS:  # counted from the lists' lengths, before a single job is built
            raise BenchError(f"{where}: cells 1-{i} make {total:,} runs (this cell "
                             f"{' x '.join(map(str, sizes))} = {math.prod(sizes):,}: grid values x seeds x protocols); "
                             f"at most {MAX_JOBS:,} per file")
        settings = config_mod.toml_settings(merged)
        if isinstance(settings.get("attacks"), list):  # one string, as on the command line
            settings["attacks"] = ",".join(settings["attacks"])
        for combo in itertools.product(*[vals for _, vals in axes]) if axes else [()]:
            params = {**cell.get("params", {}), **{k: v for (k, _), v in zip(axes, combo)}}
            for seed in seeds:
                for protocol in protocols:
                    req = Request(**{**settings, "params": dict(params), "seed": seed, "protocol": protocol,
                                     "out": out_dir, "quiet": quiet})
                    req.command = equivalent_command(req)
                    label = f"{cell['defense']}" + "".join(f" {k}={v}" for k, v in params.items()) + \
                            f" seed={seed}" + (f" {protocol}" if protocol != "adaptive" else "")
                    result.append(Job(req, label))
    return result


def equivalent_command(req) -> str:
    """The `bench run` command that computes this job (stored with the run, printed in leaderboards): each
    setting of a run's TOML file (config.SETTINGS) that is not at its default, or is pinned, in table order."""
    args = ["bench", "run"]
    for s in config_mod.SETTINGS:
        value = getattr(req, s.name)
        if s.kind is None or not s.flags or value is None or value == {} or (value == s.default and not s.pinned):
            continue
        if s.switch:
            args.append(s.flags[0])
        elif isinstance(value, dict):  # --param k=v, --attack-param fgsm.eps=v, --base-checkpoint recipe=path
            for k, v in value.items():
                pairs = [(f"{k}.{k2}", v2) for k2, v2 in v.items()] if isinstance(v, dict) else [(k, v)]
                for key, item in pairs:
                    args += [s.flags[0], f"{key}={_value(item)}"]
        else:
            args += [s.flags[0], str(value)]
    return shlex.join(args)


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): the second of eight slices (1-based, as a Slurm array --array=1-8 numbers them)."""
    try:
        i, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise BenchError(f"--shard must be I/N, e.g. 1/4 (the first of four slices), got '{text}'") from None
    if not 1 <= i <= n:
        raise BenchError(f"--shard {text}: I must be between 1 and N")
    return i, n


def select(todo: list[Job], shard: str | None) -> list[Job]:
    """The jobs of one shard: every N-th job from the I-th on, so slices of a grid of cells alike are alike."""
    if shard is None:
        return todo
    i, n = parse_shard(shard)
    return todo[i - 1::n]


def _prepare(todo: list[Job], executor: str, *, read_only: bool = False) -> list:
    """Every job validated and prepared (`read_only`: to read its state, not to run it)."""
    from bench import runner

    out = []
    for job in todo:
        req = job.request
        if executor == "ray" and str(req.device).startswith("cuda"):
            # the driver may have no GPU: validate here on the CPU (the device is outside a run's identity)
            req = dataclasses.replace(req, device="cpu")
        try:
            out.append(runner.prepare(req, read_only=read_only))
        except OSError as exc:  # a path of the job's that cannot be used: found before any job ran
            where = f" ({exc.filename})" if exc.filename else ""
            raise BenchError(f"sweep job '{job.label}': {os_reason(exc)}{where}; nothing has run") from None
    return out


def run(path: str | Path, *, out: str | None = None, quiet: bool = False, dry_run: bool = False,
        executor: str = "local", address: str | None = None, shard: str | None = None,
        cpus_per_job: float = 1, gpus_per_job: float = 1, on_start: Callable[[], None] | None = None) -> list[dict]:
    """Validate every job, then run them (in order here, or as Ray tasks) with one progress bar for the grid.
    `on_start` is called once every job is validated, as the first one starts."""
    from tqdm.auto import tqdm

    from bench import cluster, runner

    if executor not in ("local", "ray"):
        raise BenchError(f"--executor must be local or ray, got '{executor}'")
    if address is not None and executor != "ray":
        raise BenchError("--address is for --executor ray")
    if address is not None:
        cluster.parse_address(address)
        if not dry_run:  # in seconds, not after preparing every job (nor after Ray's minutes of retries)
            cluster.require_reachable(address)
    if not cpus_per_job > 0:
        raise BenchError(f"--cpus-per-job must be > 0, got {cpus_per_job}")
    if not (0 < gpus_per_job <= 1 or float(gpus_per_job).is_integer()):  # Ray's rule for fractional GPUs
        raise BenchError(f"--gpus-per-job must be a fraction in (0, 1] or a whole number, got {gpus_per_job}")
    todo = select(jobs(path, out=out), shard)
    prepared = _prepare(todo, executor)  # every mistake surfaces before any work
    if dry_run:
        return [{"label": j.label, "command": j.request.command, "run_id": p.config.run_id} for j, p in zip(todo, prepared)]
    if not todo:
        return []
    if on_start is not None:
        on_start()
    if executor == "ray":
        return cluster.run(todo, prepared, prepared[0].config.out, address=address, cpus_per_job=cpus_per_job,
                           gpus_per_job=gpus_per_job, quiet=quiet)
    results = []
    bar = tqdm(list(zip(todo, prepared)), desc="sweep", disable=quiet, dynamic_ncols=True)
    for job, prep in bar:
        bar.set_postfix_str(job.label[:60])
        # a job whose plugin fails is stored as failed and the grid goes on (the CLI exits 1 at the end)
        summary = runner.execute(prep, quiet=True)
        results.append({"label": job.label, "run_id": prep.config.run_id, "summary": summary,
                        "out": prep.config.out})
    return results


def status(path: str | Path, *, out: str | None = None, shard: str | None = None) -> list[dict]:
    """Each job's state in the results database: done, partial (cells finished of wanted), failed, not started."""
    from bench import runner
    from bench.store import DB_NAME, Store

    todo = select(jobs(path, out=out), shard)
    prepared = _prepare(todo, "ray", read_only=True)  # read-only results can be looked at, as reported
    rows = []
    db = Path(prepared[0].config.out) / DB_NAME if prepared else None
    store = Store(db.parent, create=False) if db is not None and db.is_file() else None
    try:
        for job, prep in zip(todo, prepared):
            wanted, done, failed = runner.job_state(prep, store) if store is not None else (0, 0, 0)
            state = ("failed" if failed else "done" if wanted and done == wanted else
                     "partial" if done else "not started")
            rows.append({"label": job.label, "run_id": prep.config.run_id, "state": state, "cells": done,
                         "wanted": wanted})
    finally:
        if store is not None:
            store.close()
    return rows
