"""Leaderboards from the results database: one per dataset x architecture x preset, as markdown, a
self-contained web page, LaTeX tables, or one CSV/JSON record per (run, cell).

Rows are configurations (defense + parameters); several seeds of one configuration are one row (mean +-
std). The main table holds nine columns (rank, defense, clean, the preset's worst case, its delta against
the `pgd_at` base, AutoAttack, flags, n, run); every attack is in the per-threat-model detail tables and every
command under Reproduce. Every accuracy carries its n and a 95% Wilson interval, every delta a paired exact
McNemar p-value on the same samples (pooled over the seeds both have); a row's rank counts the rows that beat
it significantly (RANK_RULE), and failed or warning sanity checks show as flags linked to their details.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import re
import shlex
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import checks as sanity, latex, registry, webpage
from bench.config import META_FIELDS, default_surrogate, harness_info, training_scope
from bench.contract import ADAPTIVE, PAPER, surrogate_of
from bench.errors import BenchError, file_safe, os_reason
from bench.markdown_reader import anchor as safe_anchor, code as md_code, escape as md
from bench.models import file_label
from bench.params import exact_text
from bench.report_markdown import Markdown, table as markdown_table
from bench.stats import interval_text, intervals_overlap, mcnemar, mean_std, robust_cells, wilson, worst_case
from bench.store import Store, require_writable

BASE_DEFENSE = "pgd_at"
KEY = ("dataset", "arch", "preset")  # one file per value of these run fields
CLEAN = "clean"
N_SEEDS = "n, seeds"  # test images per seed, and the seed ids


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
            # The adaptive worst case is the defense's own: every cell is scored on the defense, so a sample
            # that an attack crafted on a surrogate fools is not robust either. A paper protocol's worst case
            # stays its own (the number non-adaptive papers report).
            scope = None if protocol == ADAPTIVE else protocol
            return None if r.clean is None else worst_case(r.clean, r.cells.values(), label[len("worst:"):], scope)
        cell = r.cells.get((label, protocol))
        return cell["flags"] if cell is not None else None


def load(store: Store) -> list[Config]:
    configs: dict[str, Config] = {}
    for run in store.runs():
        cells = robust_cells(store.cells(run["run_id"]))
        clean = next((c["flags"] for c in cells if c["attack"] == CLEAN), None)
        by = {(c["attack"], c["protocol"]): c for c in cells if c["attack"] != CLEAN}
        ident = dict(run["config"])
        ident.pop("seed", None)
        key = json.dumps(ident, sort_keys=True)
        cfg = configs.setdefault(key, Config(run["defense"], run["params"]))
        cfg.runs.append(Run(run, clean, by, current_checks(store, run, cells),
                            missing_cells(store, run["run_id"], cells)))
    for cfg in configs.values():
        cfg.runs.sort(key=lambda r: r.run["seed"])
    return list(configs.values())


def current_checks(store: Store, run: dict, cells: list[dict]) -> list[dict]:
    """A run's stored checks, those computed from cells (1, 2, 7-10) judged again by today's rules: older
    code judged raw verdicts, not robust accuracy as the board counts it. A check that never ran is not
    added."""
    fresh = {name: {"status": status, "detail": detail, "flag": flag}
             for name, status, detail, flag in (c.row() for c in sanity.from_cells(run, cells))}
    return [{**c, **fresh.get(c["name"], {})} for c in store.checks(run["run_id"])]


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


def paired(mine: dict[int, np.ndarray], base: dict[int, np.ndarray]):
    """The exact McNemar comparison of `mine` against `base` on the seeds both have (None: no common
    samples)."""
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return None
    a = np.concatenate([base[s] for s in seeds])
    b = np.concatenate([mine[s] for s in seeds])
    return mcnemar(a, b) if a.shape == b.shape else None


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
        return f"{100 * mean:.1f} {interval_text(low, high)}", mean, (low, high)
    return f"{100 * mean:.1f} ± {100 * std:.1f}", mean, (low, high)


def delta_text(mine: dict[int, np.ndarray], base: dict[int, np.ndarray]) -> str:
    """Δ in points with the exact McNemar p-value on the paired samples of the seeds both have; with several
    such seeds, each seed's own Δ after it, so the seed-to-seed spread shows beside the pooled test."""
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return "—"
    test = paired(mine, base)
    if test is None:
        return "— (other samples)"
    if test.a_only == test.b_only == 0:
        return f"{100 * test.delta:+.1f} (identical)"
    spread = ""
    if len(seeds) > 1:
        spread = "; seeds " + ", ".join(f"{100 * (mine[s].mean() - base[s].mean()):+.1f}" for s in seeds)
    mark = f"p={test.p_value:.2g}" if test.significant else f"ns, p={test.p_value:.2f}"
    return f"{100 * test.delta:+.1f} ({mark}{spread})"


def threat_text(threat: str) -> str:
    """'Linf eps=8/255' -> 'L∞ ε=8/255', 'L1 eps=12' -> 'L1 ε=12' (the stored budget is already exact:
    params.exact_text)."""
    norm, sep, eps = threat.partition(" eps=")
    return f"{norm_text(norm)} ε={eps}" if sep else threat


def norm_text(norm: str) -> str:
    return "L∞" if norm == "Linf" else norm


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items())) or "—"


def distinguishing(cfg: Config, configs: list[Config]) -> str:
    """The parameters in which `cfg` differs from the other configurations of its defense ('—' if none)."""
    siblings = [c for c in configs if c.defense == cfg.defense]
    keys = sorted({k for c in siblings for k in c.params if any(o.params.get(k) != c.params.get(k) for o in siblings)})
    return ", ".join(f"{k}={_short(cfg.params.get(k))}" for k in keys) or "—"


def row_name(cfg: Config, configs: list[Config]) -> str:
    """'rift_bn k=5': the defense with the parameters that tell its row from its siblings'."""
    params = distinguishing(cfg, configs)
    return cfg.defense if params == "—" else f"{cfg.defense} {params}"


def _short(v) -> str:
    if isinstance(v, float):
        text = exact_text(v)  # 8/255 for a budget, else a round-trip repr: shortened where that is long
        return text if len(text) <= 8 else f"{v:.4g}"
    if isinstance(v, list):
        return "(" + ",".join(_short(x) for x in v) + ")" if len(v) <= 4 else f"({len(v)} values)"
    return str(v)


def anchor(cfg: Config) -> str:
    """The id of `cfg`'s sanity checks (safe whatever the defense's name and run id hold)."""
    return safe_anchor(f"checks-{cfg.defense}-{cfg.key}".lower().replace("_", "-"))


def run_anchor(cfg: Config) -> str:
    return safe_anchor(f"run-{cfg.key}")


def check_flags(cfg: Config) -> list[str]:
    """The flags of the warning or failed sanity checks of `cfg`'s runs, each once."""
    seen: list[str] = []
    for r in cfg.runs:
        for c in r.checks:
            if c["status"] in ("warn", "fail") and c.get("flag") and c["flag"] not in seen:
                seen.append(c["flag"])
    return seen


def flags_text(cfg: Config) -> str:
    """The check flags of `cfg` as markdown links to its checks."""
    return " ".join(f"[{md(f)}](#{anchor(cfg)})" for f in check_flags(cfg))


# ----------------------------------------------------------------------------------------------------
# which attacks, which worst case


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


def protocols_of(configs: list[Config]) -> list[str]:
    """The protocols any of `configs` was attacked under: adaptive, then paper, then paper:NAME as first seen."""
    seen = [p for cfg in configs for r in cfg.runs for (_, p) in r.cells] + \
           [m["protocol"] for cfg in configs for r in cfg.runs for m in r.missing if m["attack"] != CLEAN]
    ordered = list(dict.fromkeys(seen))
    return sorted(ordered, key=lambda p: (p != ADAPTIVE, p != PAPER, ordered.index(p)))


def surrogate_name(configs: list[Config], protocol: str) -> str:
    """The surrogate a paper protocol attacks, by the name its defense declares ('' for the default surrogate
    of a defense that names none)."""
    name = surrogate_of(protocol)
    if name:
        return name
    return next((default_surrogate(r.run) for cfg in configs for r in cfg.runs
                 if default_surrogate(r.run) and any(p == protocol for (_, p) in r.cells)), "")


def protocol_title(configs: list[Config], protocol: str) -> str:
    if protocol == ADAPTIVE:
        return "adaptive attacks"
    name = surrogate_name(configs, protocol)
    return f"paper protocol, surrogate {name} (attacks on it)" if name else "paper protocol (attacks on the surrogate)"


def primary_threat(configs: list[Config]) -> str | None:
    """The threat model of the main table: the preset's own L∞ budget where any row was attacked at it,
    else the one most rows were attacked under."""
    threats = attack_labels(configs)[2]
    eps = (configs[0].runs[0].run.get("config") or {}).get("preset", {}).get("eps") if configs else None
    if isinstance(eps, float) and f"Linf eps={exact_text(eps)}" in threats:
        return f"Linf eps={exact_text(eps)}"
    counts = {t: sum(any(c["threat"] == t for r in cfg.runs for c in r.cells.values()) for cfg in configs)
              for t in threats}
    return max(threats, key=lambda t: counts[t]) if threats else None


@functools.lru_cache(maxsize=None)  # asked per configuration and label; an unknown name reads every entry point
def _batch_dependent_only(label: str) -> bool:
    # an attack whose plugin is no longer installed declares nothing: it counts as missing
    return bool(getattr(registry.declared("attack", label.split("[", 1)[0]), "batch_dependent_only", False))


def adaptive_attacks(configs: list[Config], threat: str) -> list[str]:
    """The adaptive attacks of `threat` that any of `configs` ran, in the order first seen."""
    return attacks_of(configs, threat, "adaptive")


def attacks_of(configs: list[Config], threat: str, protocol: str, requested: bool = False) -> list[str]:
    """The attacks of `threat` under `protocol` that any of `configs` ran (or, with `requested`, was asked to
    run and lacks), in the order first seen."""
    out: list[str] = []
    for cfg in configs:
        for r in cfg.runs:
            for (label, proto), c in r.cells.items():
                if proto == protocol and c["threat"] == threat and label not in out:
                    out.append(label)
            for m in r.missing if requested else []:
                if m["protocol"] == protocol and m["threat"] == threat and m["attack"] not in out + [CLEAN]:
                    out.append(m["attack"])
    return out


def fewer_attacks(cfg: Config, attacks: list[str]) -> list[str]:
    """Those of `attacks` that apply to `cfg` but it lacks (an attack that only adds something against
    batch-dependent defenses is not missing from the others)."""
    return [lab for lab in attacks if not cfg.flags(lab)
            and (cfg.runs[0].run["batch_dependent"] or not _batch_dependent_only(lab))]


def fewer_attacks_mark(cfg: Config, attacks: list[str]) -> str:
    """' † without X, Y' when `cfg` lacks some of `attacks` that apply to it, else ''.

    A worst case over fewer attacks than its neighbours' overstates robustness against them.
    """
    missing = fewer_attacks(cfg, attacks)
    return f" † without {', '.join(missing)}" if missing else ""


def incomplete(cfg: Config, threat: str | None = None, protocol: str | None = None) -> list[str]:
    """'autoattack missing', 'pgd10 failed (seed 1)': the requested cells `cfg` lacks (those a worst case
    over `threat` and `protocol` lacks, clean included, when given)."""
    out = []
    for r in cfg.runs:
        for m in r.missing:
            # the adaptive worst case spans every protocol (Config.flags): a missing paper cell leaves it short too
            if threat is not None and m["attack"] != CLEAN and (
                    m["threat"] != threat or protocol not in (ADAPTIVE, m["protocol"])):
                continue
            text = m["attack"] + (f" ({m['protocol']})" if m["protocol"] not in (ADAPTIVE, "-") else "")
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


# Parameters a label may set and still be the standard evaluation its attack is reported as: they choose its
# threat model (autoattack[norm=L2] is AutoAttack under L2), which the cell's threat says.
THREAT_PARAMS = ("norm", "eps")


@functools.lru_cache(maxsize=None)  # an export asks once per configuration and label; each asks the entry points
def _reported_as(label: str) -> str:
    """What the attack of `label` declares itself reported as ('' for a label with other parameters than its
    threat model's)."""
    name, bracket, inner = label.partition("[")
    if bracket and any(item.partition("=")[0] not in THREAT_PARAMS for item in inner.rstrip("]").split(",")):
        return ""
    return getattr(registry.declared("attack", name), "reported_as", "")


# ----------------------------------------------------------------------------------------------------
# tables: text for markdown and LaTeX, numbers for the web page to sort by


@dataclass
class Table:
    """One table of a leaderboard in every output format."""

    title: str
    frame: pd.DataFrame  # the cells as plain text
    values: pd.DataFrame | None = None  # per cell the number it sorts by (NaN: sort by its text)
    configs: list[Config] = field(default_factory=list)  # the configuration of each row (for links)
    # the cells as markdown: names and labels escaped (markdown_reader.escape), links added
    markdown: pd.DataFrame | None = None
    anchor: str = ""


def rank_rows(worst: list[dict[int, np.ndarray]]) -> list[int | None]:
    """RANK_RULE: rank = 1 + the rows whose worst case is significantly higher (None: no worst case)."""
    stats = [accuracy_text(w) for w in worst]
    ranks: list[int | None] = []
    for i, (_, mean, interval) in enumerate(stats):
        if mean != mean:
            ranks.append(None)
            continue
        better = 0
        for j, (_, other, other_interval) in enumerate(stats):
            if j == i or not other > mean:
                continue
            test = paired(worst[j], worst[i])
            better += test.significant if test is not None else not intervals_overlap(interval, other_interval)
        ranks.append(1 + better)
    return ranks


RANK_RULE = ("Rank = 1 + the number of rows whose worst case is significantly higher (exact McNemar test on "
             "the paired samples, p < 0.05; rows on different samples: disjoint 95% intervals), so a row ranks "
             "below only rows that beat it beyond the noise; equal ranks are marked =.")


def main_table(configs: list[Config]) -> Table:
    """At most nine columns: rank, defense, clean, the primary threat model's worst case, its Δ against the
    base, AutoAttack, flags, n and seed ids, run. Everything else is in the detail tables and Reproduce."""
    threat = primary_threat(configs)
    base = base_config(configs)
    worst_label = f"worst:{threat}" if threat else ""
    peers = adaptive_attacks(configs, threat) if threat else []
    aa_labels = [lab for lab in peers if _reported_as(lab) == "AutoAttack"]
    worst = [cfg.flags(worst_label) if threat else {} for cfg in configs]
    ranks = rank_rows(worst)
    order = sorted(range(len(configs)), key=lambda i: (ranks[i] is None, ranks[i] or 0, -accuracy_text(worst[i])[1]
                                                       if worst[i] else 0))
    counts = defaultdict(int)
    for r in ranks:
        counts[r] += 1
    worst_col = f"Worst {threat_text(threat)}" if threat else "Worst"
    delta_col = f"Δ worst vs {BASE_DEFENSE}"
    text_rows, md_rows, value_rows = [], [], []
    for i in order:
        cfg, rank = configs[i], ranks[i]
        clean_text, clean_mean, _ = accuracy_text(cfg.flags(CLEAN))
        worst_text, worst_mean, _ = accuracy_text(worst[i])
        lacking = incomplete(cfg, threat, "adaptive") if threat else []
        without = fewer_attacks(cfg, peers) if worst[i] else []
        if worst[i]:
            worst_text += " †" * bool(without)
        worst_text += " ‡" * bool(lacking)
        test = paired(worst[i], base.flags(worst_label)) if base is not None and worst[i] else None
        aa = next((lab for lab in aa_labels if cfg.flags(lab)), None)
        aa_text, aa_mean, _ = accuracy_text(cfg.flags(aa) if aa else {})
        marks = ([f"† without {', '.join(without)}"] if without else []) + \
            ([f"‡ incomplete: {', '.join(incomplete(cfg))}"] if incomplete(cfg) else [])
        clean = cfg.flags(CLEAN)
        n = next(iter(clean.values())).size if clean else 0
        row = {"Rank": "—" if rank is None else ("=" * (counts[rank] > 1)) + str(rank),
               "Defense": row_name(cfg, configs), "Clean": clean_text, worst_col: worst_text,
               delta_col: delta_text(worst[i], base.flags(worst_label)) if base is not None and worst[i] else "—",
               "AutoAttack": aa_text, "Flags": " ".join(marks + check_flags(cfg)),
               N_SEEDS: f"{n}, seed{'s' * (len(cfg.seeds) > 1)} {','.join(map(str, cfg.seeds))}", "Run": cfg.key}
        text_rows.append(row)
        # the markdown: text from the database and plugins escaped, the links the leaderboard's own
        md_rows.append({**row, "Defense": md(row["Defense"]),
                        "Flags": " ".join([md(m) for m in marks] + ([flags_text(cfg)] if check_flags(cfg) else [])),
                        "Run": f"[{md(cfg.key)}](#{run_anchor(cfg)})"})
        value_rows.append({"Rank": float("inf") if rank is None else rank, "Clean": 100 * clean_mean,
                           worst_col: 100 * worst_mean, delta_col: 100 * test.delta if test else float("nan"),
                           "AutoAttack": 100 * aa_mean, N_SEEDS: n})
    columns = ["Rank", "Defense", "Clean", worst_col, delta_col, "AutoAttack", "Flags", N_SEEDS, "Run"]
    frame = pd.DataFrame(text_rows, columns=columns)
    markdown = pd.DataFrame(md_rows, columns=columns).rename(columns={worst_col: md(worst_col)})
    return Table("Leaderboard", frame, pd.DataFrame(value_rows, columns=columns).astype(float),
                 [configs[i] for i in order], markdown, "leaderboard")


def _column_name(label: str, threat: str) -> str:
    """'pgd10[eps=16/255]' in the 16/255 table is plain 'pgd10': the table's title names the budget."""
    name, bracket, inner = label.partition("[")
    if not bracket or not label.endswith("]"):
        return label
    eps = threat.partition(" eps=")[2]
    rest = [item for item in inner[:-1].split(",") if item != f"eps={eps}"]
    return name + (f"[{','.join(rest)}]" if rest else "")


def detail_tables(configs: list[Config], order: list[Config]) -> list[Table]:
    """Per threat model and protocol: every attack's accuracy, the worst case with its marks, and (adaptive)
    its Δ against the base. Rows in the main table's order; only rows attacked under that threat model."""
    base = base_config(configs)
    threats = attack_labels(configs)[2]
    primary = primary_threat(configs)
    tables = []
    for threat in sorted(threats, key=lambda t: t != primary):
        for protocol in protocols_of(configs):
            attacks = attacks_of(configs, threat, protocol, requested=True)
            if not attacks:
                continue
            names = [_column_name(a, threat) for a in attacks]
            if len(set(names)) < len(names):
                names = attacks
            worst_label = f"worst:{threat}"
            rows, md_rows, values = [], [], []
            for cfg in order:
                if not any(cfg.flags(a, protocol) for a in attacks) and not incomplete(cfg, threat, protocol):
                    continue
                row = {"Defense": row_name(cfg, configs)}
                value = {}
                for attack, name in zip(attacks, names):
                    row[name], mean, _ = accuracy_text(cfg.flags(attack, protocol))
                    value[name] = 100 * mean
                text, mean, _ = accuracy_text(cfg.flags(worst_label, protocol))
                marks = fewer_attacks_mark(cfg, adaptive_attacks(configs, threat)) \
                    if protocol == "adaptive" and text != "—" else ""
                marks += incomplete_mark(cfg, threat, protocol)
                row["Worst"], value["Worst"] = text + marks, 100 * mean
                if protocol == "adaptive" and base is not None:
                    row[f"Δ worst vs {BASE_DEFENSE}"] = delta_text(cfg.flags(worst_label), base.flags(worst_label))
                rows.append(row)
                md_rows.append({**row, "Defense": md(row["Defense"]), "Worst": text + md(marks)})
                values.append(value)
            kind = protocol_title(configs, protocol)
            frame = pd.DataFrame(rows)
            markdown = pd.DataFrame(md_rows, columns=frame.columns)
            markdown.columns = [md(c) for c in frame.columns]
            slug = safe_anchor(re.sub(r"[^a-z0-9_-]+", "-",
                                      f"detail-{threat}-{protocol}".lower().replace(" eps=", "-")))
            tables.append(Table(f"{threat_text(threat)}, {kind}", frame,
                                pd.DataFrame(values, columns=frame.columns).astype(float), markdown=markdown,
                                anchor=slug))
    return tables


def reproduce_section(configs: list[Config], order: list[Config]) -> list[str]:
    lines = ["## Reproduce", "",
             "The `bench run` command of every row (its **Run** column links here); a `bench sweep` grid stores "
             "the same commands.", ""]
    for cfg in order:
        commands = list(dict.fromkeys(r.run["command"] for r in cfg.runs if r.run["command"]))
        text = "; ".join(md_code(c) for c in commands) or "(no command stored)"
        lines.append(f'- <a id="{run_anchor(cfg)}"></a>{md_code(cfg.key)} {md(row_name(cfg, configs))}: {text}')
    return lines + [""]


def check_summary(cfg: Config, run: Run) -> str:
    """'✗ budget fail, ⚠ gradient_health warn' or 'all 9 passed (1 skipped)'."""
    bad = [f"{'✗' if c['status'] == 'fail' else '⚠'} {c['name']} {c['status']}" for c in run.checks
           if c["status"] in ("warn", "fail")]
    if bad:
        return ", ".join(bad)
    passed = sum(c["status"] == "pass" for c in run.checks)
    skipped = sum(c["status"] == "skip" for c in run.checks)
    return f"all {passed} passed" + (f" ({skipped} skipped)" if skipped else "") if run.checks else "no checks ran"


def checks_section(configs: list[Config], order: list[Config] | None = None) -> list[str]:
    order = order or configs
    lines = ["## Sanity checks", "",
             "Checks of METHODS.md's evaluation protocol, run with every `bench run`: one line per run with the "
             "checks that did not pass (their flags are in the table's Flags column); every check's detail is "
             "folded below.", ""]
    details = []
    for cfg in order:
        if not any(r.checks for r in cfg.runs):
            continue
        for j, r in enumerate(cfg.runs):
            seed = md(f", seed {r.run['seed']}") if len(cfg.runs) > 1 else ""
            tag = f'<a id="{anchor(cfg)}"></a>' if j == 0 else ""
            name = f"{md(row_name(cfg, configs))} ({md_code(cfg.key)}{seed})"
            lines.append(f"- {tag}{name}: {md(check_summary(cfg, r))}")
            rows = [[md(c["name"]), md(c["status"]), md(c["detail"])] for c in r.checks]
            details += [f"#### {name}", "", pd.DataFrame(rows, columns=["Check", "Status", "Detail"]).to_markdown(
                index=False, disable_numparse=True), ""]
    if details:
        lines += ["", "<details><summary>Every check's detail, per run</summary>", ""] + details + ["</details>"]
    return lines + [""]


# ----------------------------------------------------------------------------------------------------
# robust accuracy vs eps (any attack run at three or more budgets)


def eps_figure(rc) -> list[str]:
    from bench import figures  # matplotlib: loaded only when a leaderboard draws

    curves: dict[str, dict[str, tuple]] = {}
    for cfg in rc.configs:
        points: dict[tuple[str, str], dict[float, tuple[int, int]]] = defaultdict(dict)
        for r in cfg.runs[:1]:
            for (label, protocol), cell in r.cells.items():
                if protocol == "adaptive":
                    points[cell["name"], cell["norm"]][cell["eps"]] = (cell["correct"], cell["n"])
        for key, by_eps in points.items():
            if len(by_eps) >= 3:
                xs = sorted(by_eps)
                bounds = [wilson(*by_eps[x]) for x in xs]  # each point's 95% interval, drawn as a band
                curves.setdefault(key, {})[row_name(cfg, rc.configs)] = (
                    xs, [100 * by_eps[x][0] / by_eps[x][1] for x in xs],
                    ([100 * lo for lo, _ in bounds], [100 * hi for _, hi in bounds]))
    lines = []
    for (name, norm), series in curves.items():
        budgets = [x for xs, *_ in series.values() for x in xs]
        # L-inf budgets of k/255 (CIFAR's 4/255, 8/255, 16/255) read best in units of 1/255; others as they are
        per_255 = norm == "Linf" and all(abs(255 * x - round(255 * x)) < 1e-6 for x in budgets)
        if per_255:
            series = {label: ([round(255 * x) for x in xs], *rest) for label, (xs, *rest) in series.items()}
        stem = f"eps-{name}" if norm == "Linf" else f"eps-{name}-{norm}"  # (the L-inf figure keeps its name)
        shown = norm_text(norm)
        path = figures.lines(rc.figure(stem), [{
            "series": series, "xlabel": f"{shown} budget ε" + (" (in units of 1/255)" if per_255 else ""),
            "ylabel": "accuracy (%)", "title": f"{name}: accuracy vs {shown} budget"}])
        title = name if norm == "Linf" else f"{name}, {shown}"
        lines += [f"## Robust accuracy vs ε ({md(title)})", ""] + figures.embed(path, f"{title} accuracy vs eps")
    return lines


# ----------------------------------------------------------------------------------------------------
# machine-readable forms


def numbers(cfg: Config, threats: list[str], labels: list[str], threat: str | None = None) -> dict:
    """RobustBench's model_info fields (and ours) of one configuration under one threat model (norm and ε; by
    default its first L∞ one): a RobustBench claim is one file per threat model, so a configuration attacked
    under several gives one record for each (`model_infos`). `eps` is the string RobustBench writes ("8/255",
    "0.5", "12"), `number_forward_passes` the defense's declaration, and link, authors, venue, reported,
    footnote, additional_data the run's --meta fields (None where not given)."""
    def pct(label, protocol="adaptive"):
        per_seed = cfg.flags(label, protocol)
        return round(100 * float(np.mean([f.mean() for f in per_seed.values()])), 4) if per_seed else None

    run = cfg.runs[0].run
    cells = [c for r in cfg.runs for c in r.cells.values()]
    if threat is None:
        own = list(dict.fromkeys(c["threat"] for c in cells))
        threat = next((t for t in own if t.startswith("Linf ")), own[0] if own else None)
    cell = next((c for c in cells if c["threat"] == threat), None)
    # RobustBench's autoattack_acc: the first cell of this threat model of an attack reported as it
    aa = next((lab for lab in labels if _reported_as(lab) == "AutoAttack"
               and any(r.cells.get((lab, "adaptive"), {}).get("threat") == threat for r in cfg.runs)), None)
    declared = [harness_info(r.run) for r in cfg.runs]
    meta: dict = {}
    for d in declared:  # several seeds: each run's fields, the later seeds' winning
        meta.update(d.get("meta") or {})
    norm = cell["norm"] if cell is not None else None
    card = {key: meta.get(f"{key}:{norm}", meta.get(key)) for key in META_FIELDS}
    extra_data = card.pop("additional_data")
    return {
        "name": cfg.defense, "params": cfg.params, "dataset": run["dataset"], "architecture": run["arch"],
        "preset": run["preset"], "threat_model": norm, "eps": exact_text(float(cell["eps"])) if cell else None,
        "clean_acc": pct(CLEAN), "autoattack_acc": pct(aa) if aa else None,
        "robust_acc": pct(f"worst:{threat}") if threat else None,  # the worst case over every attack of it
        "additional_data": str(extra_data).strip().lower() in ("1", "true", "yes") if extra_data else False,
        "number_forward_passes": max((int(d.get("forward_passes", 1)) for d in declared), default=1),
        **card, "seeds": cfg.seeds,
        "n": int(next(iter(cfg.flags(CLEAN).values())).size) if cfg.flags(CLEAN) else 0,
        "attacks": {lab: pct(lab) for lab in labels if cfg.flags(lab)},
        "worst_case": {t: pct(f"worst:{t}") for t in threats},
        "config": cfg.key, "command": run["command"], "code_version": run["code_version"],
        # requested cells not stored: the worst cases above are over fewer attacks than asked for
        "incomplete": "; ".join(incomplete(cfg)),
        "missing_cells": [{**m, "seed": r.run["seed"]} for r in cfg.runs for m in r.missing],
    }


def model_infos(cfg: Config, threats: list[str], labels: list[str]) -> list[dict]:
    """One RobustBench record per threat model (norm, ε) `cfg` was attacked under (one, without a threat
    model, for a configuration with clean accuracy only)."""
    own = [t for t in threats if any(c["threat"] == t for r in cfg.runs for c in r.cells.values())]
    return [numbers(cfg, threats, labels, t) for t in own] or [numbers(cfg, threats, labels)]


def cell_records(configs: list[Config]) -> list[dict]:
    """One record per (run, cell): clean, each attack under each protocol, each worst case, and each requested
    cell that is missing or failed; accuracies in % (None where nothing was measured)."""
    records = []
    for cfg in configs:
        threats = list(dict.fromkeys(c["threat"] for r in cfg.runs for c in r.cells.values()))
        for r in cfg.runs:
            run = r.run
            common = {"dataset": run["dataset"], "arch": run["arch"], "preset": run["preset"],
                      "defense": cfg.defense, "params": cfg.params, "config": cfg.key, "run_id": run["run_id"],
                      "seed": run["seed"], "code_version": run["code_version"], "command": run["command"]}

            def record(cell, protocol, flags, status="done", **extra):
                n, correct = (int(flags.size), int(flags.sum())) if flags is not None else (None, None)
                low, high = wilson(correct, n) if n else (None, None)
                return {**common, "cell": cell, "protocol": protocol, "status": status, "n": n, "correct": correct,
                        "accuracy": round(100 * correct / n, 4) if n else None,
                        "ci_low": round(100 * low, 4) if n else None, "ci_high": round(100 * high, 4) if n else None,
                        "attack": None, "threat": None, "norm": None, "eps": None, "seconds": None,
                        "incomplete": "", "without": "", "error": None, **extra}

            records.append(record(CLEAN, "adaptive", r.clean))
            for (label, protocol), c in r.cells.items():
                records.append(record(label, protocol, c["flags"], attack=c["name"], threat=c["threat"],
                                      norm=c["norm"], eps=float(c["eps"]), seconds=float(c["seconds"])))
            for m in r.missing:
                records.append(record(m["attack"], m["protocol"], None, "failed" if m["error"] else "missing",
                                      threat=m["threat"], error=m["error"]))
            for threat in threats:
                for protocol in protocols_of([cfg]):
                    flags = Config._flags(r, f"worst:{threat}", protocol)
                    if flags is None:
                        continue
                    lacking = [f"{m['attack']} {'failed' if m['error'] else 'missing'}" for m in r.missing
                               if m["attack"] == CLEAN or (m["threat"], m["protocol"]) == (threat, protocol)]
                    without = fewer_attacks(cfg, adaptive_attacks(configs, threat)) if protocol == "adaptive" else []
                    cell = next(c for c in r.cells.values() if c["threat"] == threat)
                    records.append(record(f"worst:{threat}", protocol, flags, "worst case", threat=threat,
                                          norm=cell["norm"], eps=float(cell["eps"]), incomplete=", ".join(lacking),
                                          without=", ".join(without)))
    return records


# ----------------------------------------------------------------------------------------------------
# writing


FORMATS = ("md", "html", "latex", "csv", "json")


def _file_part(value) -> str:
    """A dataset label with options as a file-name part: imagefolder[mode=RGB;size=64] ->
    imagefolder.mode-RGB.size-64 (file_stem makes the whole safe)."""
    if not isinstance(value, str) or not value.endswith("]") or "[" not in value:
        return str(value)
    name, _, options = value[:-1].partition("[")
    for old, new in ((";", "."), ("=", "-"), (",", "_"), ("/", "_")):
        options = options.replace(old, new)
    return f"{name}.{options}"


def file_stem(dataset, arch, preset) -> str:
    """The file name (less its suffix) of one leaderboard: 'digits-tiny_cnn-smoke'. Whatever a results
    database holds, a safe name (errors.file_safe: a name that is not one becomes one with a digest of it), so
    that no file lands outside --dest and one odd name costs nobody their leaderboard."""
    arch = file_label(arch) if isinstance(arch, str) else arch
    return file_safe(f"{_file_part(dataset)}-{arch}-{preset}")


def write(store: Store, dest: str | Path, source: str, version: str, fmt: str = "md") -> list[Path]:
    """Write one file per (dataset, arch, preset) present in the store, with its figures."""
    if fmt not in FORMATS:
        raise BenchError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    dest = require_writable(dest, "--dest", writes=())
    groups: dict[tuple, list[Config]] = defaultdict(list)
    for cfg in load(store):
        run = cfg.runs[0].run
        groups[tuple(run[k] for k in KEY)].append(cfg)
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


@dataclass
class Board:
    """Everything one leaderboard file shows, before it is written in a format."""

    dataset: str
    arch: str
    preset: str
    configs: list[Config]
    main: Table
    details: list[Table]
    header: list[str]  # markdown lines: title, provenance, how to read the tables
    reports: list[str]  # markdown lines: the ε figure and the report plugins' sections
    figures: list[Path]
    # per configuration (Config.key): its anchor, row name, parameters and check summary, for the views
    # (bench.webpage, bench.latex), which read the board and import nothing of the leaderboard
    rows: dict = field(default_factory=dict)
    rank_rule: str = ""
    stem: str = ""  # the file name, a safe one (file_stem): LaTeX labels are made of it


def reading_guide(main: Table) -> list[str]:
    return [
        "Accuracies in %, with a 95% Wilson interval for one seed or mean ± std over seeds; n test images per "
        "seed. An attack's accuracy counts a sample only if it is also right clean (the clean image is inside "
        "every ball). Worst = correct on the clean image and under every attack of the threat model that ran "
        "on the defense: the adaptive attacks (they differentiate the defense's whole inference procedure) and, where "
        "it ran, the paper protocol (attacks on the defense's surrogate, scored on the defense, as non-adaptive "
        "papers did: a sample they fool is not robust either). The detail tables below give every attack, the "
        "paper protocol's own worst case (the papers' number) and the other budgets.",
        "",
        f"- {RANK_RULE}",
        f"- Δ in points against `{BASE_DEFENSE}` with an exact McNemar test on the same samples (ns: inside "
        "the noise, p ≥ 0.05), pooled over the seeds both rows have; with several, each seed's own Δ follows.",
        "- † marks a worst case over fewer attacks than other rows ran, which overstates it against them; ‡ marks "
        "a row whose run lacks cells it was asked for (killed before they finished, or failed). Flags says which, "
        "and names the sanity checks that warned or failed ([Sanity checks](#sanity-checks)).",
        "",
    ]


def build(configs: list[Config], dataset: str, arch: str, preset: str, dest: Path, source: str, version: str,
          stem: str, figure_dir: Path) -> Board:
    """The tables, the header and the report plugins' sections of one leaderboard; figures go to `figure_dir`."""
    main = main_table(configs)
    details = detail_tables(configs, main.configs)
    run0 = configs[0].runs[0].run
    n = main.values[N_SEEDS].max() if len(main.frame) else 0
    fingerprint = run0["config"].get("data", "?") if isinstance(run0.get("config"), dict) else "?"
    regenerate = md_code(f"bench leaderboard --out {shlex.quote(str(source))} --dest {shlex.quote(str(dest))}")
    # every name, path and field below is escaped (md, md_code): only the leaderboard's own text is markup
    header = [f"# {md(dataset)} / {md(arch)} / preset {md_code(preset)}", "",
              f"- Regenerate: {regenerate} (the command of every row is under "
              f"[Reproduce](#reproduce), linked from its Run column).",
              f"- Preset {md_code(preset)}, data {md(dataset)} (fingerprint {md(fingerprint)}, "
              f"{int(n) if n == n else 0} test images), code {md(version)}, generated {dt.date.today().isoformat()}.",
              ""] + reading_guide(main)
    rc = ReportContext(configs=configs, dataset=dataset, arch=arch, preset=preset, dest=figure_dir, stem=stem)
    reports = eps_figure(rc)
    for name in registry.names("report"):
        try:
            reports += registry.load("report", name)(rc) or []
        except OSError:  # a full disk is not the report's fault
            raise
        except Exception as exc:  # one broken report plugin must not take everyone's leaderboard down
            failure = f"{registry.who('report', name)} failed on {stem}: {registry.one_line(exc)}"
            logging.getLogger("bench").warning("bench: warning: %s", failure)
            reports += [f"## Report '{md(name)}' failed", "", md(failure), ""]
    rows = {cfg.key: {"anchor": run_anchor(cfg), "name": row_name(cfg, configs), "params": params_text(cfg.params),
                      "checks": "; ".join(check_summary(cfg, r) for r in cfg.runs)} for cfg in configs}
    return Board(dataset, arch, preset, configs, main, details, header, reports, list(rc.figures), rows, RANK_RULE,
                 stem)


def markdown(board: Board) -> str:
    frame = board.main.markdown if board.main.markdown is not None else board.main.frame
    text = board.header + [frame.to_markdown(index=False, disable_numparse=True), ""]
    if board.details:
        text += ["## Every attack, by threat model", "",
                 "Rows in the leaderboard's order, only those attacked under the threat model.", ""]
        for table in board.details:
            cells = table.markdown if table.markdown is not None else table.frame
            text += [f"### {md(table.title)}", "", cells.to_markdown(index=False, disable_numparse=True), ""]
    text += board.reports
    text += reproduce_section(board.configs, board.main.configs)
    text += checks_section(board.configs, board.main.configs)
    return "\n".join(text)


def _write_groups(groups: dict[tuple, list[Config]], dest: Path, source: str, version: str, fmt: str) -> list[Path]:
    written, stems = [], set()
    for stem, (dataset, arch, preset), configs in sorted(((file_stem(*key), key, c) for key, c in groups.items()),
                                                         key=lambda group: group[0]):
        if stem in stems:  # two groups whose names join alike ('a-b', 'c' and 'a', 'b-c'): each its own file
            stem = file_safe(f"{stem}-{json.dumps([dataset, arch, preset], default=str)}")
        stems.add(stem)
        if fmt in ("csv", "json"):
            records = cell_records(configs)
            path = dest / f"{stem}.{fmt}"
            if fmt == "csv":
                frame = pd.DataFrame([{**r, "params": json.dumps(r["params"], sort_keys=True)} for r in records])
                # counts stay integers where a missing cell has none (pandas would make the column float)
                _replace_file(frame.astype({"n": "Int64", "correct": "Int64", "seed": "Int64"}), path)
            else:
                labels, _, threats = attack_labels(configs)
                models = [info for c in configs for info in model_infos(c, threats, labels)]
                _replace_file(json.dumps({"cells": records, "models": models}, indent=1), path)
            written.append(path)
            continue
        if fmt == "md":
            board = build(configs, dataset, arch, preset, dest, source, version, stem, figure_dir=dest)
            path = dest / f"{stem}.md"
            _replace_file(markdown(board), path)
            written += [path, *board.figures]
            continue
        # the web page inlines its figures and the LaTeX file has none: they are drawn where nothing stays
        with tempfile.TemporaryDirectory(prefix="bench-figures-") as scratch:
            board = build(configs, dataset, arch, preset, dest, source, version, stem, figure_dir=Path(scratch))
            if fmt == "latex":
                path = dest / f"{stem}.tex"
                _replace_file(latex.document(board), path)
            else:
                path = dest / f"{stem}.html"
                _replace_file(webpage.page(board), path)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------
# What report plugins see (paper tables and figures, one function per defense family, entry-point group
# bench.reports): a leaderboard group's configurations and the leaderboard's own helpers.


@dataclass
class ReportContext:
    """What a report plugin sees when `bench leaderboard` writes one (dataset, arch, preset) file.

    A report is a function `report(rc: ReportContext) -> list[str]` returning markdown lines (nothing
    when its defenses were not run); it may write figures with `rc.figure(name)`. Names it shows (defenses,
    parameter values, attack labels, threats, surrogates, module names) are plain text: its tables go through
    `rc.table`, which escapes every cell but `Markdown`, and its other lines put them in with `markdown_text`.
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

    def evaluated(self, cfg, label: str, protocol: str = "adaptive"):
        """`cfg` if its runs have `label`, else the configuration that differs from it only in the number of
        test images and has it (a sweep runs a costly attack on fewer images: AutoAttack on the first 500
        beside PGD-10 on 2,000), else None. Its flags are its own images': pair it only with another
        configuration `evaluated` on the same label."""
        if cfg.flags(label, protocol):
            return cfg

        def shape(c) -> str:  # what the defended model depends on (training_scope: not the test images)
            run = c.runs[0].run
            ident = {k: v for k, v in run["config"].items() if k != "seed"}
            scope = training_scope(ident, harness_info(run).get("train_data"))
            return json.dumps([ident.get("defense"), ident.get("params"), scope], sort_keys=True, default=str)

        want = shape(cfg)
        return next((c for c in self.configs if c is not cfg and c.defense == cfg.defense and shape(c) == want
                     and c.flags(label, protocol)), None)

    def accuracy(self, cfg, label: str = "clean", protocol: str = "adaptive") -> tuple[str, float]:
        """(text with interval or mean +- std, mean as a fraction) of clean, an attack, or "worst:THREAT"; the
        text as `Markdown` (numbers only: it reads as it is)."""
        text, mean, _ = accuracy_text(cfg.flags(label, protocol))
        return Markdown(text), mean

    def delta(self, cfg, base, label: str = "clean", protocol: str = "adaptive") -> str:
        """Δ in points against `base` with the exact McNemar p-value on the same samples, as `Markdown`."""
        return Markdown(delta_text(cfg.flags(label, protocol), base.flags(label, protocol)))

    def fewer_attacks_mark(self, cfg, peers: list, threat: str) -> str:
        """' † without X' when `cfg`'s worst case over `threat` lacks adaptive attacks one of `peers` ran,
        and ' ‡ incomplete: Y missing' when its run lacks requested cells of that worst case; as markdown (the
        attacks' labels escaped: `Markdown`)."""
        return Markdown(md(fewer_attacks_mark(cfg, adaptive_attacks(peers, threat))
                           + incomplete_mark(cfg, threat, "adaptive")))

    def incomplete_mark(self, cfg, threat: str | None = None, protocol: str = "adaptive") -> str:
        """' ‡ incomplete: X missing, Y failed' for the requested cells `cfg`'s runs lack (of the worst case
        over `threat` when given), else ''; as `Markdown`. Any table showing a worst case should carry it."""
        return Markdown(md(incomplete_mark(cfg, threat, protocol if threat is not None else None)))

    @staticmethod
    def table(columns: list, rows: list[list]) -> Markdown:
        """A markdown table of `rows` under `columns`, each header and cell plain text (escaped: a name with
        '|', a newline or markup shows as it is, in its own cell) or `Markdown` (kept); a cell of several
        pieces is a list of them (`[f"{error:.1f}", rc.fewer_attacks_mark(cfg, peers, threat)]`)."""
        return markdown_table(columns, rows)

    def protocols(self, configs: list | None = None) -> list[str]:
        """The protocols `configs` (default: all) were attacked under: adaptive, paper, then paper:NAME."""
        return protocols_of(self.configs if configs is None else configs)

    def surrogate(self, protocol: str, configs: list | None = None) -> str:
        """The name of the surrogate a paper protocol attacks ('' when its defense names none)."""
        return surrogate_name(self.configs if configs is None else configs, protocol)

    def threats(self) -> list[str]:
        out = []
        for c in self.configs:
            for r in c.runs:
                for cell in r.cells.values():
                    if cell["threat"] not in out:
                        out.append(cell["threat"])
        return out

    def figure(self, name: str) -> Path:
        """The path of the figure `name` beside the leaderboard: `name` where it is a safe file name, else a
        safe name made of it (errors.file_safe), one per name."""
        path = self.dest / f"{self.stem}-{file_safe(str(name))}.png"
        self.figures.append(path)
        return path
