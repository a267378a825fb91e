"""The results database: one SQLite file per results directory.

A run is one (defense, params, preset, data, seed) configuration; a cell is one (run, attack, protocol)
evaluation. Each finished cell is committed in its own transaction, so a killed run loses only the cell
in progress and a re-run skips every finished one; a write of several rows that belong together (a merge)
is one `Store.transaction()`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bench.config import to_json
from bench.params import exact_text
from bench.errors import BenchError, os_reason

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
# PRAGMA user_version of a database this code writes: bump it with every table or column added to SCHEMA
# (a new column also goes into ADDED_COLUMNS), so that an older bnbench refuses the newer file instead of
# misreading it. Databases from before versioning (user_version 0: runs, cells, checks) are upgraded.
# Version 2: run ids without the preset fields that became plugin parameters (MOVED_PRESET_FIELDS).
SCHEMA_VERSION = 2
APPLICATION_ID = 0x626E6231  # "bnb1" in the file header: this SQLite file is a bnbench results database
# columns that databases of an earlier version may lack, and how to add them
ADDED_COLUMNS = {("checks", "flag"): "ALTER TABLE checks ADD COLUMN flag TEXT NOT NULL DEFAULT ''"}


def require_writable(out: str, what: str = "output directory", writes: tuple[str, ...] = (DB_NAME, "cache")) -> Path:
    """Fail early, before any work, on an output directory that cannot take what the command writes:
    the directory itself (without creating it: a command that stops on a later mistake, a sweep's second
    job say, must leave no empty folder behind), and `writes`, the files and folders under it that
    already exist (a folder: every folder inside it)."""
    if not str(out).strip():
        raise BenchError(f"{what} must not be empty (\"\" would be the current directory); give a path")
    path = Path(out).expanduser()
    try:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise BenchError(f"{what} {path} is not writable ({existing} is not a directory)")
        # the files written under it must fit in a path: leave room for one more file name
        if len(os.fsencode(path.absolute())) + 255 >= os.pathconf(existing, "PC_PATH_MAX"):
            raise BenchError(f"{what} {path} is not writable (path too long for the files it will hold)")
        targets = [existing]
        for target in (path / rel for rel in writes if existing == path):
            if target.is_dir():
                targets += [Path(root) for root, _, _ in os.walk(target)]
            elif target.exists():
                if not target.is_file():
                    raise BenchError(f"{what} {path} is not writable ({target} is not a file)")
                targets.append(target)
    except OSError as exc:
        raise BenchError(f"{what} {path} is not usable ({os_reason(exc)})") from None
    for target in targets:
        if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
            raise BenchError(f"{what} {path} is not writable (permission denied on {target})")
    return path


def pack(flags: np.ndarray) -> bytes:
    return np.packbits(np.asarray(flags, dtype=bool)).tobytes()


def unpack(blob: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=n).astype(bool)


class Store:
    def __init__(self, out_dir: str | Path, *, create: bool = True) -> None:
        if not str(out_dir).strip():
            raise BenchError("--out must not be empty (\"\" would be the current directory); give a path")
        self.path = Path(out_dir) / DB_NAME
        if not create and not self.path.is_file():
            raise BenchError(f"no results in {Path(out_dir)} (no {DB_NAME}); run `bench run` first")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60)
        except sqlite3.Error as exc:
            raise db_error(self.path, exc) from None
        except OSError as exc:
            raise BenchError(f"output directory {self.path.parent} is not writable ({os_reason(exc)})") from None
        conn.row_factory = sqlite3.Row
        self.conn = _Guarded(conn, self.path)
        self._in_transaction = False  # inside transaction(): the put_* methods do not commit
        try:
            self._open(writing=create)
        except BenchError:
            conn.close()
            raise

    def _open(self, *, writing: bool) -> None:
        """Refuse a corrupt or foreign database before touching it; bring one of ours up to SCHEMA_VERSION
        (a writer also proves here, before any work, that it can write)."""
        problem = self.conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            problem = " ".join(problem.replace("*** in database main ***", "").split())
            raise BenchError(f"results database {self.path} is corrupt ({problem}); nothing was written to it. "
                             f"Move it away (`sqlite3 {self.path} .recover` may save its intact rows)")
        if not self._validate_schema():
            if writing:  # a write that is rolled back: fails now on a read-only file, directory or disk
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                finally:
                    self.conn.rollback()
            return
        if not writing and not all(os.access(p, os.W_OK) for p in (self.path, self.path.parent)):
            return  # a reader may not upgrade a read-only older database: it reads it as it is
        with self.conn:  # upgrade; re-checked under the write lock against a concurrent bench
            self.conn.execute("BEGIN IMMEDIATE")
            if self._validate_schema():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                tables = _tables(self.conn)
                for (table, column), ddl in ADDED_COLUMNS.items():
                    if column not in tables[table]:
                        self.conn.execute(ddl)
                version = self.conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    _exact_labels(self.conn)
                if version < 2:
                    _without_moved_preset_fields(self.conn)
                self.conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _validate_schema(self) -> bool:
        """Raise unless this is a bnbench database this code can read; True if it needs an upgrade."""
        where = f"results database {self.path}"
        app = self.conn.execute("PRAGMA application_id").fetchone()[0]
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if app not in (0, APPLICATION_ID):
            raise BenchError(f"{where} belongs to another application (application_id {app}); "
                             f"nothing was changed. Use another --out")
        if version > SCHEMA_VERSION:
            raise BenchError(f"{where} was written by a newer bnbench (schema version {version}, this one "
                             f"reads up to {SCHEMA_VERSION}); nothing was changed. Upgrade bnbench")
        ours, objects = _expected_schema()
        tables = _tables(self.conn)
        extra = sorted(f"{kind} '{name}'" for kind, name in _objects(self.conn) - objects)
        if extra:
            raise BenchError(f"{where} is not a bnbench results database (it has {', '.join(extra)}); "
                             f"nothing was changed. Use another --out")
        for table, columns in tables.items():
            foreign = [c for c in columns if c not in ours[table] or ours[table][c] != columns[c]]
            lacking = [c for c in ours[table] if c not in columns and (table, c) not in ADDED_COLUMNS]
            if foreign or lacking:
                what = (f"has column(s) {', '.join(foreign)} that bnbench's has not" if foreign
                        else f"lacks column(s) {', '.join(lacking)}")
                raise BenchError(f"{where} is not a bnbench results database (its table '{table}' {what}); "
                                 f"nothing was changed. Use another --out")
        return (version < SCHEMA_VERSION or app != APPLICATION_ID or set(tables) != set(ours)
                or any(set(tables[t]) != set(ours[t]) for t in tables))

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def transaction(self):
        """Every write inside is committed together when the block ends, or none is: an exception rolls
        them back, and a kill (SIGKILL, power loss) leaves a journal that SQLite rolls back on the next
        open. The write lock is taken first, so what the block reads stays true until its commit."""
        if self._in_transaction:  # part of the enclosing one
            yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield self
            self.conn.commit()
        finally:
            self._in_transaction = False
            if self.conn.in_transaction:  # the block raised (or the commit failed): none of it is kept
                with contextlib.suppress(BenchError):
                    self.conn.rollback()

    @contextlib.contextmanager
    def _writing(self):
        """One put_* call: its own transaction, or its part of the enclosing `transaction()`."""
        if self._in_transaction:
            yield
        else:
            with self.conn:
                yield

    # -- writing -------------------------------------------------------------------------------------

    def put_run(self, row: dict[str, Any]) -> None:
        row = dict(row)
        for key in ("params", "config", "info"):
            row[key] = json.dumps(row[key], sort_keys=True, default=to_json)
        row.setdefault("created", time.time())
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        # a re-run rebuilds from caches in seconds: keep the build time of the run that computed it
        updates = ", ".join(f"{k}=MAX({k}, excluded.{k})" if k == "build_seconds" else f"{k}=excluded.{k}"
                            for k in row if k not in ("run_id", "created"))
        with self._writing():
            self.conn.execute(f"INSERT INTO runs ({cols}) VALUES ({marks}) "
                              f"ON CONFLICT(run_id) DO UPDATE SET {updates}", list(row.values()))

    def put_meta(self, run_id: str, key: str, meta: dict) -> None:
        """Update the --meta fields kept in a stored run's info[key] (they are not part of its identity)."""
        row = self.conn.execute("SELECT info FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            return
        info = _json_object(self.path, row[0], f"runs.info of run {_run_shown(run_id)}")
        info.setdefault(key, {}).setdefault("meta", {}).update(meta)
        with self._writing():
            self.conn.execute("UPDATE runs SET info=? WHERE run_id=?",
                              (json.dumps(info, sort_keys=True, default=to_json), run_id))

    def put_cell(self, run_id: str, *, attack: str, protocol: str, name: str, params: dict, norm: str,
                 eps: float, threat: str, flags: np.ndarray, seconds: float, extra: dict) -> None:
        flags = np.asarray(flags, dtype=bool)
        with self._writing():
            self.conn.execute(
                "INSERT OR REPLACE INTO cells (run_id, attack, protocol, name, params, norm, eps, threat, n, "
                "correct, flags, seconds, extra, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, attack, protocol, name, json.dumps(params, sort_keys=True, default=to_json), norm,
                 float(eps), threat, int(flags.size), int(flags.sum()), pack(flags), float(seconds),
                 json.dumps(extra, sort_keys=True, default=to_json), time.time()))
            # a later success of a cell that failed clears its failure
            self.conn.execute("DELETE FROM failures WHERE run_id=? AND cell=? AND protocol=?",
                              (run_id, attack, protocol))

    def put_requests(self, run_id: str, cells: Iterable[tuple[str, str, str]]) -> None:
        """(attack, protocol, threat) cells a run was asked for: a cell requested but never stored (a run
        killed mid-way, or a failed plugin) marks the run incomplete instead of leaving it looking whole."""
        with self._writing():
            self.conn.executemany(
                "INSERT OR IGNORE INTO requests (run_id, attack, protocol, threat, created) VALUES (?,?,?,?,?)",
                [(run_id, attack, protocol, threat, time.time()) for attack, protocol, threat in cells])

    def put_failure(self, run_id: str, *, cell: str, protocol: str, plugin: str, error: str, defense: str) -> None:
        """A plugin that raised on this cell (or BUILD_FAILED: on the defense); cleared when the cell is stored."""
        with self._writing():
            self.conn.execute(
                "INSERT OR REPLACE INTO failures (run_id, cell, protocol, plugin, error, defense, created) "
                "VALUES (?,?,?,?,?,?,?)", (run_id, cell, protocol, plugin, error, defense, time.time()))

    def clear_failure(self, run_id: str, cell: str, protocol: str) -> None:
        with self._writing():
            self.conn.execute("DELETE FROM failures WHERE run_id=? AND cell=? AND protocol=?", (run_id, cell, protocol))

    def put_checks(self, run_id: str, results: Iterable[tuple[str, str, str, str]]) -> None:
        """(name, status, detail, flag) rows; a check stored again replaces its earlier result."""
        with self._writing():
            self.conn.executemany(
                "INSERT OR REPLACE INTO checks (run_id, name, status, detail, flag, created) VALUES (?,?,?,?,?,?)",
                [(run_id, name, status, detail, flag, time.time()) for name, status, detail, flag in results])

    def write_file(self, relpath: str, data: bytes) -> None:
        """A file that belongs with the results (a cell's adversarial images): written under a temporary name,
        flushed to the disk and renamed, so a file that exists is complete, even after a crash; a failed
        write (a full disk) leaves no partial file behind. Runs on another machine send it here."""
        path = self._inside(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a short temporary name: the file's own may already take the 255 bytes a name can have
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(path.parent)  # the rename itself reaches the disk before the cell that owns it is stored

    def has_file(self, relpath: str) -> bool:
        """Whether `write_file` wrote `relpath` (without reading it)."""
        return self._inside(relpath).is_file()

    def read_file(self, relpath: str) -> bytes | None:
        """A file `write_file` wrote (None if absent): runs on another machine read it through here too."""
        path = self._inside(relpath)
        return path.read_bytes() if path.is_file() else None

    def append_text(self, relpath: str, text: str) -> None:
        """Append to a text file beside the database (failures.log: the tracebacks a user does not see)."""
        with open(self._inside(relpath), "a", encoding="utf-8") as f:
            f.write(text)

    def _inside(self, relpath: str) -> Path:
        root = self.path.parent.resolve()
        path = (root / relpath).resolve()
        if not path.is_relative_to(root) or path == root:
            raise BenchError(f"refusing to write {relpath!r} outside the results directory {root}")
        return path

    # -- reading -------------------------------------------------------------------------------------

    def finished(self, run_id: str) -> set[tuple[str, str]]:
        rows = self.conn.execute("SELECT attack, protocol FROM cells WHERE run_id=?", (run_id,))
        return {(r["attack"], r["protocol"]) for r in rows}

    def runs(self) -> list[dict]:
        out = []
        for r in self.conn.execute("SELECT * FROM runs ORDER BY created"):
            d = _typed(self.path, "runs", dict(r))
            where = f"run {_run_shown(d['run_id'])}"
            for key in ("params", "config", "info"):
                d[key] = _json_object(self.path, d[key], f"runs.{key} of {where}")
            _check_identity(self.path, d["config"], f"runs.config of {where}")
            out.append(d)
        return out

    def cells(self, run_id: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM cells", ()
        if run_id is not None:
            query, args = query + " WHERE run_id=?", (run_id,)
        out = []
        with closing(self.conn.execute(query + " ORDER BY created", args)) as cur:
            for r in cur:
                d = _typed(self.path, "cells", dict(r))
                where = f"cell {_shown(d['attack'])} of run {_run_shown(d['run_id'])}"
                for key in ("params", "extra"):
                    d[key] = _json_object(self.path, d[key], f"cells.{key} of {where}")
                d["flags"] = _unpack_checked(self.path, d, where)
                out.append(d)
        return out

    def requests(self, run_id: str) -> list[dict]:
        return [_typed(self.path, "requests", dict(r)) for r in self.conn.execute(
            "SELECT * FROM requests WHERE run_id=? ORDER BY created, attack", (run_id,))]

    def failures(self, run_id: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM failures", ()
        if run_id is not None:
            query, args = query + " WHERE run_id=?", (run_id,)
        return [_typed(self.path, "failures", dict(r)) for r in self.conn.execute(query + " ORDER BY created", args)]

    def checks(self, run_id: str) -> list[dict]:
        return [_typed(self.path, "checks", dict(r)) for r in self.conn.execute(
            "SELECT * FROM checks WHERE run_id=? ORDER BY name", (run_id,))]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # (a file system that cannot sync a folder)
            raise
    finally:
        os.close(fd)


def _exact_labels(conn) -> None:
    """Databases from before versioning keyed cells and threat models by budgets rounded to 4 significant
    digits (`pgd10[eps=0.01569]`, `Linf eps=0.03137`); today's code writes them exactly (`4/255`). Rewrite
    them from each cell's stored values, so a resumed run neither recomputes a finished cell nor splits
    one budget's worst case into two groups (each over fewer attacks, so more robust than it is)."""
    rows = conn.execute("SELECT rowid, attack, params, norm, eps, threat FROM cells").fetchall()
    for rowid, attack, params, norm, eps, threat in rows:
        if threat != "-":
            threat = f"{norm} eps={exact_text(float(eps))}"
        name, bracket, inner = attack.partition("[")
        if bracket and inner.endswith("]"):
            stored = json.loads(params) if params else {}
            items = re.findall(r"(\w+)=((?:(?!,\w+=).)*)", inner[:-1])  # values may hold commas: (1, 2)
            attack = name + "[" + ",".join(
                f"{k}={exact_text(stored[k]) if isinstance(stored.get(k), float) else v}" for k, v in items) + "]"
        conn.execute("UPDATE OR IGNORE cells SET attack=?, threat=? WHERE rowid=?", (attack, threat, rowid))


# Preset fields that a plugin now declares as its own parameters' per-preset values (schema version 2). A
# plugin that read one took it into its parameters, which stay in the run's identity.
MOVED_PRESET_FIELDS = ("mrc_samples", "mrc_passes")
RUN_TABLES = ("cells", "checks", "requests", "failures")  # every table keyed by run_id besides runs


def _without_moved_preset_fields(conn) -> None:
    """Give each stored run the id today's code computes for it: its stored identity without the moved
    preset fields, hashed by the runner's own function. Otherwise a resumed run would compute every cell
    again under a new id, beside the old run. Two runs that differed only in a moved field (which their
    defense's parameters did not take) are one configuration now: the earlier one keeps its rows, the
    later one adds the cells and requests the earlier lacks."""
    from bench.config import run_id_of

    for old, text in conn.execute("SELECT run_id, config FROM runs ORDER BY created").fetchall():
        try:
            identity = json.loads(text)
        except (TypeError, ValueError):
            continue  # left as it is: reading it reports the corrupt row
        preset = identity.get("preset") if isinstance(identity, dict) else None
        if not isinstance(preset, dict) or not any(k in preset for k in MOVED_PRESET_FIELDS):
            continue
        identity["preset"] = {k: v for k, v in preset.items() if k not in MOVED_PRESET_FIELDS}
        new = run_id_of(identity)
        if new == old:
            continue
        if conn.execute("SELECT 1 FROM runs WHERE run_id=?", (new,)).fetchone() is None:
            conn.execute("UPDATE runs SET run_id=?, config=? WHERE run_id=?",
                         (new, json.dumps(identity, sort_keys=True, default=to_json), old))
        else:
            conn.execute("DELETE FROM runs WHERE run_id=?", (old,))
        for table in RUN_TABLES:
            conn.execute(f"UPDATE OR IGNORE {table} SET run_id=? WHERE run_id=?", (new, old))
            conn.execute(f"DELETE FROM {table} WHERE run_id=?", (old,))  # rows the kept run already had
        # a stored cell supersedes a failure of it (as put_cell does)
        conn.execute("DELETE FROM failures WHERE run_id=? AND EXISTS (SELECT 1 FROM cells WHERE cells.run_id="
                     "failures.run_id AND cells.attack=failures.cell AND cells.protocol=failures.protocol)", (new,))


def _tables(conn) -> dict[str, dict[str, str]]:
    """table -> {column: declared type} of every table in the database."""
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                        "AND name NOT LIKE 'sqlite_%'").fetchall()]
    return {t: {r[1]: r[2].upper() for r in conn.execute(f"PRAGMA table_info('{t}')").fetchall()} for t in names}


def _objects(conn) -> set[tuple[str, str]]:
    """(type, name) of every table, index, view and trigger but SQLite's own."""
    return {(r[0], r[1]) for r in conn.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
            .fetchall()}


@functools.lru_cache(maxsize=1)
def _expected_schema() -> tuple[dict[str, dict[str, str]], set[tuple[str, str]]]:
    """The tables and objects of a database made by SCHEMA, read back from one made in memory."""
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.executescript(SCHEMA)
        return _tables(conn), _objects(conn)


_DB_REASONS = [  # (SQLite result code, its message before Python 3.11 named codes, what to tell the user)
    ("SQLITE_FULL", "is full", "disk full; free space and re-run the command (finished cells are kept)"),
    ("SQLITE_READONLY", "readonly", "read-only; make the file and its directory writable"),
    ("SQLITE_BUSY", "is locked", "locked by another process; re-run when it is done"),
    ("SQLITE_LOCKED", "is locked", "locked by another process; re-run when it is done"),
    ("SQLITE_CORRUPT", "malformed", "corrupt; move it away (`sqlite3 FILE .recover` may save its intact rows)"),
    ("SQLITE_NOTADB", "not a database", "not an SQLite database; move it away or use another --out"),
    ("SQLITE_CANTOPEN", "unable to open", "cannot be opened; check that it is a file in a writable directory"),
    ("SQLITE_IOERR", "I/O error", "I/O error while reading or writing it"),
    ("SQLITE_PERM", "access permission denied", "permission denied"),
]


def db_error(path: Path, exc: sqlite3.Error) -> BenchError:
    """One line naming the file and what to do, for any error SQLite reports on it."""
    code = getattr(exc, "sqlite_errorname", None)
    reason = next((r for name, text, r in _DB_REASONS
                   if (code.startswith(name) if code else text in str(exc))), "failed")
    if reason.startswith(("I/O", "cannot")) and not all(os.access(p, os.W_OK) for p in (path, path.parent)
                                                         if p.exists()):
        reason = _DB_REASONS[1][2]  # a write refused by the OS, not a broken disk: say read-only
    return BenchError(f"results database {path}: {reason.replace('FILE', str(path))} ({exc})")


class _Guarded:
    """The sqlite3 connection of a Store, with every SQLite or OS error turned into db_error's one line:
    every query and commit of every Store method goes through it, and a failed write is rolled back, so
    a full disk or a read-only file costs only the cell being written."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn, self._path = conn, path

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            raise db_error(self._path, exc) from None
        except OSError as exc:
            raise BenchError(f"results database {self._path}: {os_reason(exc)} ({exc})") from None

    def execute(self, *args) -> "_GuardedCursor":
        return _GuardedCursor(self._call(self._conn.execute, *args), self)

    def executemany(self, *args) -> "_GuardedCursor":
        return _GuardedCursor(self._call(self._conn.executemany, *args), self)

    def commit(self) -> None:
        self._call(self._conn.commit)

    def rollback(self) -> None:
        self._call(self._conn.rollback)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "_Guarded":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self.commit()
        finally:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.rollback()

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


class _GuardedCursor:
    def __init__(self, cursor: sqlite3.Cursor, guard: _Guarded) -> None:
        self._cursor, self._guard = cursor, guard

    def __iter__(self):
        return self

    def __next__(self):
        return self._guard._call(self._cursor.__next__)

    def fetchone(self):
        return self._guard._call(self._cursor.fetchone)

    def fetchall(self):
        return self._guard._call(self._cursor.fetchall)

    def close(self) -> None:
        self._cursor.close()

    def __getattr__(self, name: str):  # rowcount, lastrowid, description
        return getattr(self._cursor, name)


def _unpack_checked(path: Path, cell: dict, where: str) -> np.ndarray:
    """The cell's flags, refusing a blob that does not hold exactly its n flags, `correct` of them true."""
    blob, n = cell["flags"], cell["n"]
    if not isinstance(blob, bytes) or not isinstance(n, int) or len(blob) != (n + 7) // 8:
        raise BenchError(f"results database {path} is corrupt: the flags of {where} do not hold its n={n!r} "
                         f"samples; move it away")
    flags = unpack(blob, n)
    if int(flags.sum()) != cell["correct"]:
        raise BenchError(f"results database {path} is corrupt: the flags of {where} disagree with its "
                         f"count of correct samples; move it away")
    return flags


def _loads(path: Path, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise BenchError(f"results database {path} is corrupt: {where} is not JSON; move it away") from None


def _corrupt(path: Path, what: str) -> BenchError:
    return BenchError(f"results database {path} is corrupt: {what}; move it away")


def _shown(value: Any) -> str:
    """A stored value in a one-line message: quoted, escaped (a newline or a terminal escape in it is shown,
    not obeyed), shortened."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _run_shown(run_id: Any) -> str:
    """A run named in a message: the start of its id (64 hex digits) is enough."""
    return _shown(run_id[:16] if isinstance(run_id, str) else run_id)


# what a value read from a column of each declared type must be: SQLite keeps any value in any column
_COLUMN_TYPES = {"TEXT": ((str,), "text"), "INTEGER": ((int,), "an integer"), "REAL": ((int, float), "a number"),
                 "BLOB": ((bytes,), "bytes")}
_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}
# the fields of a run's identity (RunConfig.identity) that the readers of a run use, and their JSON type; a
# run stored by earlier code may lack some
IDENTITY_FIELDS = {"defense": str, "params": list, "preset": dict, "dataset": str, "arch": str, "seed": int,
                   "precision": str, "data": str, "base_checkpoints": list, "model_source": str, "normalize": list}


def _is(value: Any, kind) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is int)


_ROW_NAMES = (("run_id", "run"), ("attack", "cell"), ("cell", "cell"), ("name", "check"))  # what names a row


def _typed(path: Path, table: str, row: dict) -> dict:
    """`row` as read from `table`, refusing a value whose type is not its column's."""
    kinds = _column_types(table)
    for column, value in row.items():
        if column in kinds and type(value) not in kinds[column][0]:  # (exactly: SQLite gives no subclasses)
            of = next((f" of {what} {(_run_shown if k == 'run_id' else _shown)(row[k])}" for k, what in _ROW_NAMES
                       if k in row and k != column), "")
            raise _corrupt(path, f"{table}.{column}{of} is {_shown(value)}, not {kinds[column][1]}")
    return row


@functools.lru_cache(maxsize=None)
def _column_types(table: str) -> dict[str, tuple[tuple[type, ...], str]]:
    return {column: _COLUMN_TYPES[declared] for column, declared in _expected_schema()[0][table].items()
            if declared in _COLUMN_TYPES}


def _json_object(path: Path, text: str, where: str) -> dict:
    """A stored JSON object (runs.params, runs.config...): any other JSON (`[]`, `null`, `5`) is as corrupt as no
    JSON, and would fail its readers."""
    value = _loads(path, text, where)
    if not isinstance(value, dict):
        raise _corrupt(path, f"{where} is {_JSON_KINDS.get(type(value), 'not an object')}, not a JSON object")
    return value


def _check_identity(path: Path, identity: dict, where: str) -> None:
    """Refuse a run identity whose fields are not of the types RunConfig.identity() writes."""
    for field, kind in IDENTITY_FIELDS.items():
        if field in identity and not _is(identity[field], kind):
            raise _corrupt(path, f"{where} has {field} = {_shown(identity[field])}, not "
                                 f"{_JSON_KINDS[kind]}")
