"""The results database: one SQLite file per results directory.

A run is one (defense, params, preset, data, seed) configuration; a cell is one (run, attack, protocol)
evaluation. Each finished cell is committed in its own transaction, so a killed run loses only the cell
in progress and a re-run skips every finished one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bench.errors import BenchError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    defense TEXT NOT NULL,
    params TEXT NOT NULL,
    preset TEXT NOT NULL,
    dataset TEXT NOT NULL,
    arch TEXT NOT NULL,
    seed INTEGER NOT NULL,
    precision TEXT NOT NULL,
    config TEXT NOT NULL,
    command TEXT NOT NULL,
    code_version TEXT NOT NULL,
    batch_dependent INTEGER NOT NULL,
    randomized INTEGER NOT NULL,
    has_surrogate INTEGER NOT NULL,
    info TEXT NOT NULL,
    build_seconds REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    attack TEXT NOT NULL,
    protocol TEXT NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    threat TEXT NOT NULL,
    n INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    flags BLOB NOT NULL,
    seconds REAL NOT NULL,
    extra TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, attack, protocol)
);
CREATE TABLE IF NOT EXISTS checks (
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    flag TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS requests (
    run_id TEXT NOT NULL,
    attack TEXT NOT NULL,
    protocol TEXT NOT NULL,
    threat TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, attack, protocol)
);
CREATE TABLE IF NOT EXISTS failures (
    run_id TEXT NOT NULL,
    cell TEXT NOT NULL,
    protocol TEXT NOT NULL,
    plugin TEXT NOT NULL,
    error TEXT NOT NULL,
    defense TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, cell, protocol)
);
"""

DB_NAME = "results.sqlite"


def pack(flags: np.ndarray) -> bytes:
    return np.packbits(np.asarray(flags, dtype=bool)).tobytes()


def unpack(blob: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=n).astype(bool)


class Store:
    def __init__(self, out_dir: str | Path, *, create: bool = True) -> None:
        self.path = Path(out_dir) / DB_NAME
        if not create and not self.path.is_file():
            raise BenchError(f"no results in {Path(out_dir)} (no {DB_NAME}); run `bench run` first")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=60)
            self.conn.row_factory = sqlite3.Row
            if create:
                with self.conn:
                    self.conn.executescript(SCHEMA)
                    columns = {r[1] for r in self.conn.execute("PRAGMA table_info(checks)")}
                    if "flag" not in columns:  # databases written before checks had flags
                        self.conn.execute("ALTER TABLE checks ADD COLUMN flag TEXT NOT NULL DEFAULT ''")
            else:
                self.conn.execute("SELECT 1 FROM cells LIMIT 1")
        except sqlite3.DatabaseError as exc:
            raise BenchError(f"results database {self.path} is unreadable ({exc})") from None
        except OSError as exc:
            raise BenchError(f"output directory {self.path.parent} is not writable ({exc.strerror or exc})") from None

    def close(self) -> None:
        self.conn.close()

    # -- writing -------------------------------------------------------------------------------------

    def put_run(self, row: dict[str, Any]) -> None:
        row = dict(row)
        for key in ("params", "config", "info"):
            row[key] = json.dumps(row[key], sort_keys=True, default=_jsonable)
        row.setdefault("created", time.time())
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        # a re-run rebuilds from caches in seconds: keep the build time of the run that computed it
        updates = ", ".join(f"{k}=MAX({k}, excluded.{k})" if k == "build_seconds" else f"{k}=excluded.{k}"
                            for k in row if k not in ("run_id", "created"))
        with self.conn:
            self.conn.execute(f"INSERT INTO runs ({cols}) VALUES ({marks}) "
                              f"ON CONFLICT(run_id) DO UPDATE SET {updates}", list(row.values()))

    def put_cell(self, run_id: str, *, attack: str, protocol: str, name: str, params: dict, norm: str,
                 eps: float, threat: str, flags: np.ndarray, seconds: float, extra: dict) -> None:
        flags = np.asarray(flags, dtype=bool)
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO cells (run_id, attack, protocol, name, params, norm, eps, threat, n, "
                "correct, flags, seconds, extra, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, attack, protocol, name, json.dumps(params, sort_keys=True, default=_jsonable), norm,
                 float(eps), threat, int(flags.size), int(flags.sum()), pack(flags), float(seconds),
                 json.dumps(extra, sort_keys=True, default=_jsonable), time.time()))
            # a later success of a cell that failed clears its failure
            self.conn.execute("DELETE FROM failures WHERE run_id=? AND cell=? AND protocol=?",
                              (run_id, attack, protocol))

    def put_requests(self, run_id: str, cells: Iterable[tuple[str, str, str]]) -> None:
        """(attack, protocol, threat) cells a run was asked for: a cell requested but never stored (a run
        killed mid-way, or a failed plugin) marks the run incomplete instead of leaving it looking whole."""
        with self.conn:
            self.conn.executemany(
                "INSERT OR IGNORE INTO requests (run_id, attack, protocol, threat, created) VALUES (?,?,?,?,?)",
                [(run_id, attack, protocol, threat, time.time()) for attack, protocol, threat in cells])

    def put_failure(self, run_id: str, *, cell: str, protocol: str, plugin: str, error: str, defense: str) -> None:
        """A plugin that raised on this cell (or BUILD_FAILED: on the defense); cleared when the cell is stored."""
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO failures (run_id, cell, protocol, plugin, error, defense, created) "
                "VALUES (?,?,?,?,?,?,?)", (run_id, cell, protocol, plugin, error, defense, time.time()))

    def clear_failure(self, run_id: str, cell: str, protocol: str) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM failures WHERE run_id=? AND cell=? AND protocol=?", (run_id, cell, protocol))

    def put_checks(self, run_id: str, results: Iterable[tuple[str, str, str, str]]) -> None:
        """(name, status, detail, flag) rows; a check stored again replaces its earlier result."""
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO checks (run_id, name, status, detail, flag, created) VALUES (?,?,?,?,?,?)",
                [(run_id, name, status, detail, flag, time.time()) for name, status, detail, flag in results])

    # -- reading -------------------------------------------------------------------------------------

    def finished(self, run_id: str) -> set[tuple[str, str]]:
        rows = self.conn.execute("SELECT attack, protocol FROM cells WHERE run_id=?", (run_id,))
        return {(r["attack"], r["protocol"]) for r in rows}

    def runs(self) -> list[dict]:
        out = []
        for r in self.conn.execute("SELECT * FROM runs ORDER BY created"):
            d = dict(r)
            for key in ("params", "config", "info"):
                d[key] = json.loads(d[key])
            out.append(d)
        return out

    def cells(self, run_id: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM cells", ()
        if run_id is not None:
            query, args = query + " WHERE run_id=?", (run_id,)
        out = []
        with closing(self.conn.execute(query + " ORDER BY created", args)) as cur:
            for r in cur:
                d = dict(r)
                d["params"], d["extra"] = json.loads(d["params"]), json.loads(d["extra"])
                d["flags"] = unpack(d["flags"], d["n"])
                out.append(d)
        return out

    def requests(self, run_id: str) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM requests WHERE run_id=? ORDER BY created, attack",
                                                   (run_id,))]

    def failures(self, run_id: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM failures", ()
        if run_id is not None:
            query, args = query + " WHERE run_id=?", (run_id,)
        return [dict(r) for r in self.conn.execute(query + " ORDER BY created", args)]

    def checks(self, run_id: str) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM checks WHERE run_id=? ORDER BY name",
                                                   (run_id,))]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # torch tensors
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
