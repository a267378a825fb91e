"""`bench merge SOURCE... --out OUT`: the results databases of a sweep's shards (`bench sweep --shard i/n`,
one per machine of a Slurm array) merged into one.

A cell stored in two databases must be the same evaluation: same attack parameters, budget and per-sample
verdicts. If any differs, nothing is written and the conflicts are named (two shards trained different base
models, or ran different code). Merging is idempotent: a source merged twice adds nothing.

A merge is one transaction: its runs, cells, requests, checks and failures are committed together, so a
merge that fails or is killed at any moment leaves the target as it was (never a run without some of its
cells, which would show a worst case over fewer attacks than ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import checks as checks_mod
from bench.config import harness_info
from bench.errors import BenchError
from bench.store import DB_NAME, Store, pack

# what makes two stored cells the same evaluation (not when or how fast it ran)
CELL_CONTENT = ("name", "params", "norm", "eps", "threat", "n", "correct")


@dataclass
class _Source:
    """Everything a source database holds, read (and so checked) before the target is opened."""

    path: Path
    runs: list[dict]
    cells: list[dict]
    requests: dict[str, list[dict]]  # run id -> its rows
    checks: dict[str, list[dict]]
    failures: list[dict]


def _read_source(source: str) -> _Source:
    path = Path(source)
    if path.is_file():
        if path.name != DB_NAME:
            raise BenchError(f"{source}: a results database is named {DB_NAME} (give it or its folder)")
        path = path.parent
    store = Store(path, create=False)
    try:
        runs = store.runs()
        return _Source(store.path, runs, store.cells(), {r["run_id"]: store.requests(r["run_id"]) for r in runs},
                       {r["run_id"]: store.checks(r["run_id"]) for r in runs}, store.failures())
    finally:
        store.close()


def _content(cell: dict) -> tuple:
    return tuple(cell[k] if k != "params" else sorted(cell[k].items()) for k in CELL_CONTENT) + (pack(cell["flags"]),)


def merge(sources: list[str], out: str) -> dict:
    """Merge `sources` into the database in `out` (created if needed); returns counts of what was added."""
    if not sources:
        raise BenchError("bench merge needs at least one results database to merge")
    target_db = (Path(out) / DB_NAME).resolve()
    read = []
    for source in sources:  # a source that cannot be read (corrupt, foreign) is refused before the target is made
        shard = _read_source(source)
        if shard.path.resolve() == target_db:
            raise BenchError(f"{source} is the database merged into (--out {out}); give the other ones")
        read.append(shard)
    target = Store(out)
    try:
        with target.transaction():  # read under the write lock: no other bench writes in between
            return _merge(read, target)
    finally:
        target.close()


def _merge(sources: list[_Source], target: Store) -> dict:
    # every conflict is found before anything is written
    have = {(c["run_id"], c["attack"], c["protocol"]): (c, str(target.path)) for c in target.cells()}
    incoming = []
    conflicts = []
    for shard in sources:
        for cell in shard.cells:
            key = (cell["run_id"], cell["attack"], cell["protocol"])
            if key in have:
                if _content(have[key][0]) != _content(cell):
                    conflicts.append(f"run {key[0][:10]} cell {key[1]} ({key[2]}): {have[key][1]} and {shard.path} "
                                     f"differ ({have[key][0]['correct']}/{have[key][0]['n']} vs "
                                     f"{cell['correct']}/{cell['n']} correct)")
                continue
            have[key] = (cell, str(shard.path))
            incoming.append(cell)
    if conflicts:
        more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
        raise BenchError(f"not merged, {len(conflicts)} conflicting cell(s): {'; '.join(conflicts[:3])}{more}; "
                         f"nothing was written")
    runs = {r["run_id"]: r for r in target.runs()}
    _same_cached_files([(target.path, list(runs.values()))] + [(s.path, s.runs) for s in sources])

    added_runs = 0
    for shard in sources:
        for run in shard.runs:
            if run["run_id"] not in runs:
                target.put_run(run)
                runs[run["run_id"]] = run
                added_runs += 1
    for cell in incoming:
        target.put_cell(cell["run_id"], attack=cell["attack"], protocol=cell["protocol"], name=cell["name"],
                        params=cell["params"], norm=cell["norm"], eps=cell["eps"], threat=cell["threat"],
                        flags=cell["flags"], seconds=cell["seconds"], extra=cell["extra"])
    stored = set(have)  # every cell the target holds now: its own and those just added
    checked = set()
    for shard in sources:
        for run_id in dict.fromkeys(r["run_id"] for r in shard.runs):
            target.put_requests(run_id, [(r["attack"], r["protocol"], r["threat"]) for r in shard.requests[run_id]])
            present = {c["name"] for c in target.checks(run_id)}
            rows = [c for c in shard.checks[run_id] if c["name"] not in present]  # the probes, taken at the build
            target.put_checks(run_id, [(c["name"], c["status"], c["detail"], c["flag"]) for c in rows])
            if rows or present:
                checked.add(run_id)
        for f in shard.failures:  # a failure another shard has since stored the cell of is over
            if (f["run_id"], f["cell"], f["protocol"]) not in stored:
                target.put_failure(f["run_id"], cell=f["cell"], protocol=f["protocol"], plugin=f["plugin"],
                                   error=f["error"], defense=f["defense"])
    # the checks computed from cells see every cell now, as after a run that computed them all
    for run_id in sorted(checked):
        target.put_checks(run_id, [c.row() for c in checks_mod.from_cells(runs[run_id], target.cells(run_id))])
    return {"runs": added_runs, "cells": len(incoming), "sources": len(sources)}


def _same_cached_files(databases: list[tuple[Path, list[dict]]]) -> None:
    """Refuse runs built on different copies of one cached model: two shards that each trained the same base
    (on different hardware, say) would put a defense and the base it is compared with on different models.
    `databases`: (path, its runs)."""
    seen: dict[str, tuple[str, str]] = {}  # cached file -> (sha256, first database using it)
    for path, runs in databases:
        for run in runs:
            used = harness_info(run).get("cached_files") or {}
            if not isinstance(used, dict):
                raise BenchError(f"results database {path} is corrupt: the cached files of run {run['run_id']!r:.40} "
                                 f"are not a JSON object; move it away")
            for name, digest in used.items():
                first = seen.setdefault(name, (digest, str(path)))
                if first[0] != digest:
                    raise BenchError(
                        f"not merged: {first[1]} and {path} built runs on different copies of the cached "
                        f"{name} (sha256 {first[0][:12]} vs {digest[:12]}), so their results do not share a base; "
                        f"train it once and copy its cache folder to every shard (README, Sweeps on a cluster). "
                        f"Nothing was written")
