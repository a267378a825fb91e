"""Markdown leaderboards from the results database: one file per dataset x architecture x preset.

Rows are configurations (defense + parameters); several seeds of one configuration are one row (mean +-
std). Every accuracy carries its n and a 95% Wilson interval, every delta against the `pgd_at` base a
paired exact McNemar p-value on the same samples (pooled over the seeds both have), rows whose intervals
overlap rank as ties, and failed or warning sanity checks show as flags linked to their details.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import registry
from bench.errors import BenchError, os_reason, require_safe_name
from bench.stats import intervals_overlap, mcnemar, mean_std, wilson, worst_case
from bench.store import Store, require_writable

BASE_DEFENSE = "pgd_at"
KEY = ("dataset", "arch", "preset")  # one file per value of these run fields
CLEAN = "clean"


@dataclass
class Run:
    run: dict
    clean: np.ndarray | None
    cells: dict[tuple[str, str], dict]  # (label, protocol) -> cell
    checks: list[dict]
    # requested cells that are not stored (killed mid-way, or failed): attack, protocol, threat, error|None
    missing: list[dict] = field(default_factory=list)


@dataclass
class Config:
    """One defense with one parameter set, over one or more seeds."""

    defense: str
    params: dict
    runs: list[Run] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.runs[0].run["run_id"][:10]

    @property
    def seeds(self) -> list[int]:
        return [r.run["seed"] for r in self.runs]

    def flags(self, label: str, protocol: str = "adaptive") -> dict[int, np.ndarray]:
        """Per seed: per-sample correctness (clean, one attack, or a worst case)."""
        out = {}
        for r in self.runs:
            f = self._flags(r, label, protocol)
            if f is not None:
                out[r.run["seed"]] = f
        return out

    @staticmethod
    def _flags(r: Run, label: str, protocol: str):
        if label == CLEAN:
            return r.clean
        if label.startswith("worst:"):  # never over the attacks alone: a worst case includes clean errors
            return None if r.clean is None else worst_case(r.clean, r.cells.values(), label[len("worst:"):], protocol)
        cell = r.cells.get((label, protocol))
        return cell["flags"] if cell is not None else None


def load(store: Store) -> list[Config]:
    configs: dict[str, Config] = {}
    for run in store.runs():
        cells = store.cells(run["run_id"])
        clean = next((c["flags"] for c in cells if c["attack"] == CLEAN), None)
        by = {(c["attack"], c["protocol"]): c for c in cells if c["attack"] != CLEAN}
        ident = dict(run["config"])
        ident.pop("seed", None)
        key = json.dumps(ident, sort_keys=True)
        cfg = configs.setdefault(key, Config(run["defense"], run["params"]))
        cfg.runs.append(Run(run, clean, by, store.checks(run["run_id"]), missing_cells(store, run["run_id"], cells)))
    for cfg in configs.values():
        cfg.runs.sort(key=lambda r: r.run["seed"])
    return list(configs.values())


def missing_cells(store: Store, run_id: str, cells: list[dict]) -> list[dict]:
    """The cells `bench run` was asked for on this run that are not stored, with the error of a failed one."""
    have = {(c["attack"], c["protocol"]) for c in cells}
    failed = {(f["cell"], f["protocol"]): f["error"] for f in store.failures(run_id)}
    return [{"attack": r["attack"], "protocol": r["protocol"], "threat": r["threat"],
             "error": failed.get((r["attack"], r["protocol"]))}
            for r in store.requests(run_id) if (r["attack"], r["protocol"]) not in have]


def unplaced_failures(store: Store) -> list[str]:
    """Failures of runs that stored nothing (their defense failed to build): no leaderboard row shows them."""
    known = {r["run_id"] for r in store.runs()}
    return [f"run {f['run_id'][:10]}: {f['plugin']} failed: {f['error']}" for f in store.failures()
            if f["run_id"] not in known]


# ----------------------------------------------------------------------------------------------------
# formatting


def accuracy_text(per_seed: dict[int, np.ndarray]) -> tuple[str, float, tuple[float, float]]:
    """'53.2 [50.1, 56.3]' for one seed, '53.2 ± 0.8' for several; with the mean and the Wilson interval
    of the pooled samples (used for ranking)."""
    if not per_seed:
        return "—", float("nan"), (float("nan"), float("nan"))
    accs = [float(f.mean()) for f in per_seed.values()]
    pooled = np.concatenate(list(per_seed.values()))
    low, high = wilson(int(pooled.sum()), int(pooled.size))
    mean, std = mean_std(accs)
    if len(accs) == 1:
        return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]", mean, (low, high)
    return f"{100 * mean:.1f} ± {100 * std:.1f}", mean, (low, high)


def delta_text(mine: dict[int, np.ndarray], base: dict[int, np.ndarray]) -> str:
    """Δ in points with the exact McNemar p-value on the paired samples of the seeds both have."""
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return "—"
    a = np.concatenate([base[s] for s in seeds])
    b = np.concatenate([mine[s] for s in seeds])
    if a.shape != b.shape:
        return "— (other samples)"
    test = mcnemar(a, b)
    if test.a_only == test.b_only == 0:
        return f"{100 * test.delta:+.1f} (identical)"
    mark = f"p={test.p_value:.2g}" if test.significant else f"ns, p={test.p_value:.2f}"
    return f"{100 * test.delta:+.1f} ({mark})"


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items())) or "—"


def distinguishing(cfg: Config, configs: list[Config]) -> str:
    """The parameters in which `cfg` differs from the other configurations of its defense ('—' if none)."""
    siblings = [c for c in configs if c.defense == cfg.defense]
    keys = sorted({k for c in siblings for k in c.params if any(o.params.get(k) != c.params.get(k) for o in siblings)})
    return ", ".join(f"{k}={_short(cfg.params.get(k))}" for k in keys) or "—"


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "(" + ",".join(_short(x) for x in v) + ")" if len(v) <= 4 else f"({len(v)} values)"
    return str(v)


def anchor(cfg: Config) -> str:
    return f"checks-{cfg.defense}-{cfg.key}".lower().replace("_", "-")


def flags_text(cfg: Config) -> str:
    seen = []
    for r in cfg.runs:
        for c in r.checks:
            if c["status"] in ("warn", "fail") and c.get("flag") and c["flag"] not in seen:
                seen.append(c["flag"])
    return " ".join(f"[{f}](#{anchor(cfg)})" for f in seen)


# ----------------------------------------------------------------------------------------------------
# the main table


def base_config(configs: list[Config]) -> Config | None:
    """The pgd_at row the deltas refer to (its default parameters: the first one run)."""
    cands = [c for c in configs if c.defense == BASE_DEFENSE]
    return cands[0] if cands else None


def attack_labels(configs: list[Config]) -> tuple[list[str], list[str], list[str]]:
    labels, paper, threats = [], [], []
    for cfg in configs:
        for r in cfg.runs:
            for (label, protocol), c in r.cells.items():
                target = labels if protocol == "adaptive" else paper
                if label not in target:
                    target.append(label)
                if c["threat"] not in threats:
                    threats.append(c["threat"])
    return labels, paper, threats


def _batch_dependent_only(label: str) -> bool:
    # an attack whose plugin is no longer installed declares nothing: it counts as missing
    return bool(getattr(registry.declared("attack", label.split("[", 1)[0]), "batch_dependent_only", False))


def adaptive_attacks(configs: list[Config], threat: str) -> list[str]:
    """The adaptive attacks of `threat` that any of `configs` ran, in the order first seen."""
    out: list[str] = []
    for cfg in configs:
        for r in cfg.runs:
            for (label, protocol), c in r.cells.items():
                if protocol == "adaptive" and c["threat"] == threat and label not in out:
                    out.append(label)
    return out


def fewer_attacks_mark(cfg: Config, attacks: list[str]) -> str:
    """' † without X, Y' when `cfg` lacks some of `attacks` that apply to it, else ''.

    A worst case over fewer attacks than its neighbours' overstates robustness against them. An attack
    that only adds something against batch-dependent defenses is not missing from the others.
    """
    missing = [lab for lab in attacks if not cfg.flags(lab)
               and (cfg.runs[0].run["batch_dependent"] or not _batch_dependent_only(lab))]
    return f" † without {', '.join(missing)}" if missing else ""


def incomplete(cfg: Config, threat: str | None = None, protocol: str | None = None) -> list[str]:
    """'autoattack missing', 'pgd10 failed (seed 1)': the requested cells `cfg` lacks (those a worst case
    over `threat` and `protocol` lacks, clean included, when given)."""
    out = []
    for r in cfg.runs:
        for m in r.missing:
            if threat is not None and m["attack"] != CLEAN and (m["threat"], m["protocol"]) != (threat, protocol):
                continue
            text = m["attack"] + (" (paper)" if m["protocol"] == "paper" else "")
            text += " failed" if m["error"] else " missing"
            out.append(text + (f" (seed {r.run['seed']})" if len(cfg.runs) > 1 else ""))
    return list(dict.fromkeys(out))


def incomplete_mark(cfg: Config, threat: str | None = None, protocol: str | None = None) -> str:
    """' ‡ incomplete: autoattack missing' when `cfg` lacks requested cells (of that worst case), else ''.

    A run killed or failed before all its attacks finished has a worst case over fewer attacks than it was
    asked for: it must never look complete.
    """
    lacking = incomplete(cfg, threat, protocol)
    return f" ‡ incomplete: {', '.join(lacking)}" if lacking else ""


def main_table(configs: list[Config]) -> pd.DataFrame:
    labels, paper_labels, threats = attack_labels(configs)
    base = base_config(configs)
    threat_labels = {threat: adaptive_attacks(configs, threat) for threat in threats}
    rows = []
    for cfg in configs:
        row = {"Defense": cfg.defense, "Params": distinguishing(cfg, configs)}
        text, _, _ = accuracy_text(cfg.flags(CLEAN))
        row["Clean"] = text
        for label in labels:
            row[label] = accuracy_text(cfg.flags(label))[0]
            if label in paper_labels:
                row[f"{label} (paper)"] = accuracy_text(cfg.flags(label, "paper"))[0]
        sort_key = None
        for threat in threats:
            text, mean, interval = accuracy_text(cfg.flags(f"worst:{threat}"))
            if text != "—":
                text += fewer_attacks_mark(cfg, threat_labels[threat])
            row[f"Worst ({threat})"] = text + incomplete_mark(cfg, threat, "adaptive")
            if sort_key is None:
                sort_key = (mean, interval)
            if paper_labels:
                row[f"Worst ({threat}, paper)"] = accuracy_text(cfg.flags(f"worst:{threat}", "paper"))[0] + \
                    incomplete_mark(cfg, threat, "paper")
            if base is not None:
                row[f"Δ worst ({threat})"] = delta_text(cfg.flags(f"worst:{threat}"), base.flags(f"worst:{threat}"))
        if base is not None:
            row["Δ clean"] = delta_text(cfg.flags(CLEAN), base.flags(CLEAN))
        row["Flags"] = " ".join(t for t in (incomplete_mark(cfg).strip(), flags_text(cfg)) if t)
        clean = cfg.flags(CLEAN)
        row["n"] = str(next(iter(clean.values())).size) if clean else "0"
        row["Seeds"] = ",".join(map(str, cfg.seeds))
        row["Config"] = cfg.key
        row["Command"] = f"`{cfg.runs[0].run['command']}`" if cfg.runs[0].run["command"] else "—"
        row["_sort"] = sort_key if sort_key else (float("-inf"), (float("nan"), float("nan")))
        rows.append(row)
    rows.sort(key=lambda r: -r["_sort"][0] if r["_sort"][0] == r["_sort"][0] else float("inf"))
    rank_rows(rows)
    for r in rows:
        r.pop("_sort")
    frame = pd.DataFrame(rows)
    return frame[["Rank"] + [c for c in frame.columns if c != "Rank"]] if len(frame) else frame


def rank_rows(rows: list[dict]) -> None:
    """1, 2, ... by worst-case accuracy; a row whose interval overlaps its group leader's ties with it."""
    leader = None
    for i, row in enumerate(rows, start=1):
        mean, interval = row["_sort"]
        if mean != mean:
            row["Rank"] = "—"
            continue
        if leader is not None and intervals_overlap(interval, leader[1]):
            row["Rank"] = f"={leader[0]}"
            rows[leader[2]]["Rank"] = f"={leader[0]}"
        else:
            leader = (i, interval, i - 1)
            row["Rank"] = str(i)


def checks_section(configs: list[Config]) -> list[str]:
    lines = ["## Sanity checks", "",
             "Checks of METHODS.md's evaluation protocol, run with every `bench run`; rows with a warning or "
             "failure are flagged in the table above.", ""]
    for cfg in configs:
        rows = []
        for r in cfg.runs:
            for c in r.checks:
                rows.append([f"seed {r.run['seed']}" if len(cfg.runs) > 1 else "", c["name"], c["status"],
                             c["detail"].replace("|", "/")])
        if not rows:
            continue
        lines += [f'<a id="{anchor(cfg)}"></a>', f"### {cfg.defense} ({distinguishing(cfg, configs)}, config {cfg.key})", ""]
        frame = pd.DataFrame(rows, columns=["Seed", "Check", "Status", "Detail"])
        if len(cfg.runs) == 1:
            frame = frame.drop(columns="Seed")
        lines += [frame.to_markdown(index=False), ""]
    return lines


# ----------------------------------------------------------------------------------------------------
# robust accuracy vs eps (any attack run at three or more budgets)


def eps_figure(rc) -> list[str]:
    from bench import figures

    curves: dict[str, dict[str, tuple]] = {}
    for cfg in rc.configs:
        points: dict[str, dict[float, float]] = defaultdict(dict)
        for r in cfg.runs[:1]:
            for (label, protocol), cell in r.cells.items():
                if protocol == "adaptive":
                    points[cell["name"]][cell["eps"]] = 100 * cell["correct"] / cell["n"]
        for name, by_eps in points.items():
            if len(by_eps) >= 3:
                xs = sorted(by_eps)
                params = distinguishing(cfg, rc.configs)
                label = cfg.defense + (f" ({params})" if params != "—" else "")
                curves.setdefault(name, {})[label] = ([255 * x for x in xs], [by_eps[x] for x in xs])
    lines = []
    for name, series in curves.items():
        path = figures.lines(rc.figure(f"eps-{name}"), [{"series": series, "xlabel": "eps (x/255)",
                                                          "ylabel": "accuracy %", "title": f"{name}: accuracy vs budget"}])
        lines += [f"## Robust accuracy vs ε ({name})", ""] + figures.embed(path, f"{name} accuracy vs eps")
    return lines


# ----------------------------------------------------------------------------------------------------
# machine-readable forms


@functools.lru_cache(maxsize=None)  # an export asks once per configuration and label; each asks the entry points
def _reported_as(label: str) -> str:
    """What the attack registered as `label` declares itself reported as ('' for a label with parameters)."""
    return getattr(registry.declared("attack", label), "reported_as", "")


def numbers(cfg: Config, threats: list[str], labels: list[str]) -> dict:
    def pct(label, protocol="adaptive"):
        per_seed = cfg.flags(label, protocol)
        return round(100 * float(np.mean([f.mean() for f in per_seed.values()])), 4) if per_seed else None

    run = cfg.runs[0].run
    eps = next((c["eps"] for r in cfg.runs for c in r.cells.values() if c["norm"] == "Linf"), None)
    # RobustBench's autoattack_acc: the first cell, at its attack's defaults, of an attack reported as it
    aa = next((lab for lab in labels if _reported_as(lab) == "AutoAttack"), None)
    return {
        "name": cfg.defense, "params": cfg.params, "dataset": run["dataset"], "architecture": run["arch"],
        "preset": run["preset"], "threat_model": "Linf", "eps": eps, "clean_acc": pct(CLEAN),
        "autoattack_acc": pct(aa) if aa else None, "additional_data": False,
        "number_forward_passes": 1, "seeds": cfg.seeds,
        "n": int(next(iter(cfg.flags(CLEAN).values())).size) if cfg.flags(CLEAN) else 0,
        "attacks": {lab: pct(lab) for lab in labels if cfg.flags(lab)},
        "worst_case": {t: pct(f"worst:{t}") for t in threats},
        "config": cfg.key, "command": run["command"], "code_version": run["code_version"],
        # requested cells not stored: the worst cases above are over fewer attacks than asked for
        "incomplete": "; ".join(incomplete(cfg)),
        "missing_cells": [{**m, "seed": r.run["seed"]} for r in cfg.runs for m in r.missing],
    }


def write(store: Store, dest: str | Path, source: str, version: str, fmt: str = "md") -> list[Path]:
    """Write one file per (dataset, arch, preset) present in the store, with its figures."""
    if fmt not in ("md", "csv", "json"):
        raise BenchError(f"format must be md, csv or json, got '{fmt}'")
    dest = require_writable(dest, "--dest", writes=())
    groups: dict[tuple, list[Config]] = defaultdict(list)
    for cfg in load(store):
        run = cfg.runs[0].run
        # file names are made of these: a hostile database must not name a path outside dest
        key = tuple(require_safe_name(run[k], f"results database {store.path}: run {run['run_id'][:10]}: {k}") for k in KEY)
        groups[key].append(cfg)
    if not groups:
        raise BenchError(f"no runs in {store.path}; nothing written (run `bench run` first)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        return _write_groups(groups, dest, source, version, fmt)
    except OSError as exc:
        raise BenchError(f"cannot write the leaderboard to {dest} ({os_reason(exc)}: {exc.filename or dest})") from None


def _replace_file(content: str | pd.DataFrame, path: Path) -> None:
    """Write `content` (text, or a table as CSV) to `path` whole or not at all: a write that fails (full
    disk) leaves the previous file as it was."""
    text = content.to_csv(index=False) if isinstance(content, pd.DataFrame) else content
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_groups(groups: dict[tuple, list[Config]], dest: Path, source: str, version: str, fmt: str) -> list[Path]:
    written = []
    for (dataset, arch, preset), configs in sorted(groups.items()):
        stem = f"{dataset}-{arch}-{preset}"
        labels, _, threats = attack_labels(configs)
        if fmt == "csv":
            path = dest / f"{stem}.csv"
            pd.DataFrame([{**{k: v for k, v in numbers(c, threats, labels).items() if not isinstance(v, (dict, list))},
                           **{f"acc_{k}": v for k, v in numbers(c, threats, labels)["attacks"].items()},
                           **{f"worst_{k}": v for k, v in numbers(c, threats, labels)["worst_case"].items()},
                           "params": params_text(c.params)} for c in configs]).pipe(_replace_file, path)
            written.append(path)
            continue
        if fmt == "json":
            path = dest / f"{stem}.json"
            _replace_file(json.dumps([numbers(c, threats, labels) for c in configs], indent=1), path)
            written.append(path)
            continue
        path = dest / f"{stem}.md"
        run0 = configs[0].runs[0].run
        today = dt.date.today().isoformat()
        n = main_table(configs)
        text = [f"# {dataset} / {arch} / preset `{preset}`", "",
                f"- Regenerate: `bench leaderboard --out {source} --dest {dest}` (the command of every row is in "
                f"its Command column).",
                f"- Preset `{preset}`, data {dataset} (fingerprint {run0['config'].get('data', '?')}, "
                f"{n['n'].iloc[0] if len(n) else 0} test images), code {version}, generated {today}.", "",
                "Accuracies in %, with a 95% Wilson interval for one seed or mean ± std over seeds. "
                "Adaptive protocol (attacks differentiate the defense's whole inference procedure); columns "
                "marked (paper) attack the defense's surrogate instead and are scored on the defense, as "
                "non-adaptive papers did. Worst case = correct under every attack of the threat model (and "
                f"clean); † marks a worst case over fewer attacks than other rows ran, which overstates it against "
                "them; ‡ marks a row whose run lacks cells it was asked for (killed before they finished, or failed), "
                f"named after the mark. Δ in points against `{BASE_DEFENSE}` with an exact McNemar test on the same samples "
                "(ns: inside the noise, p ≥ 0.05). Rank ties (=k): overlapping intervals.", "",
                n.to_markdown(index=False, disable_numparse=True), ""]
        rc = ReportContext(configs=configs, dataset=dataset, arch=arch, preset=preset, dest=dest, stem=stem)
        text += eps_figure(rc)
        for name in registry.names("report"):
            try:
                text += registry.load("report", name)(rc) or []
            except OSError:  # a full disk is not the report's fault
                raise
            except Exception as exc:  # one broken report plugin must not take everyone's leaderboard down
                failure = f"{registry.who('report', name)} failed on {stem}: {registry.one_line(exc)}"
                logging.getLogger("bench").warning("bench: warning: %s", failure)
                text += [f"## Report '{name}' failed", "", failure.replace("|", "/"), ""]
        text += checks_section(configs)
        _replace_file("\n".join(text), path)
        written.append(path)
        written += rc.figures
    return written


# ----------------------------------------------------------------------------------------------------
# What report plugins see (paper tables and figures, one function per defense family, entry-point group
# bench.reports): a leaderboard group's configurations and the leaderboard's own helpers.


@dataclass
class ReportContext:
    """What a report plugin sees when `bench leaderboard` writes one (dataset, arch, preset) file.

    A report is a function `report(rc: ReportContext) -> list[str]` returning markdown lines (nothing
    when its defenses were not run); it may write figures with `rc.figure(name)`.
    """

    configs: list  # Config: .defense, .params, .seeds, .runs[i].run["info"], .flags(label)
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
        text, mean, _ = accuracy_text(cfg.flags(label, protocol))
        return text, mean

    def delta(self, cfg, base, label: str = "clean", protocol: str = "adaptive") -> str:
        """Δ in points against `base` with the exact McNemar p-value on the same samples."""
        return delta_text(cfg.flags(label, protocol), base.flags(label, protocol))

    def fewer_attacks_mark(self, cfg, peers: list, threat: str) -> str:
        """' † without X' when `cfg`'s worst case over `threat` lacks adaptive attacks one of `peers` ran,
        and ' ‡ incomplete: Y missing' when its run lacks requested cells of that worst case."""
        return fewer_attacks_mark(cfg, adaptive_attacks(peers, threat)) + incomplete_mark(cfg, threat, "adaptive")

    def incomplete_mark(self, cfg, threat: str | None = None, protocol: str = "adaptive") -> str:
        """' ‡ incomplete: X missing, Y failed' for the requested cells `cfg`'s runs lack (of the worst case
        over `threat` when given), else ''. Any table showing a worst case should carry it."""
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
        path = self.dest / f"{self.stem}-{require_safe_name(name, 'figure name')}.png"
        self.figures.append(path)
        return path
