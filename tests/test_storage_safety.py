"""The results database and the files bnbench writes are safe: a foreign, newer or corrupt database is
refused before it is touched, every I/O failure ends with one line and exit 2 without losing a finished
cell, and names read from a database never make a path outside --dest."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from bench.config import stable_hash
from bench.store import SCHEMA, SCHEMA_VERSION, Store
from conftest import file_digest

RUN = ["run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--quiet"]


@pytest.fixture(scope="module")
def populated(tmp_path_factory, smoke_cache):
    """A results directory with one finished smoke run (clean + fgsm); tests work on copies of it."""
    from bench.cli import main

    out = tmp_path_factory.mktemp("populated")
    shutil.copytree(smoke_cache / "cache", out / "cache")
    main([*RUN, "--out", str(out)])
    return out


@pytest.fixture
def results(populated, tmp_path):
    out = tmp_path / "results"
    shutil.copytree(populated, out)
    return out


def _one_line_exit_2(res, *fragments):
    assert res.code == 2, (res.code, res.err)
    assert res.err.startswith("bench: error: ") and res.err.count("\n") == 1, res.err
    assert "Traceback" not in res.err
    for fragment in fragments:
        assert fragment in res.err, res.err


def _sql(path, *statements):
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement in statements:
            conn.execute(statement)
        conn.commit()


def _cells(out) -> dict:
    store = Store(out, create=False)
    try:
        return {(c["attack"], c["protocol"]): c for c in store.cells()}
    finally:
        store.close()


@contextlib.contextmanager
def read_only(path):
    """`path` made unwritable for this process: by its mode, or as root (who ignores modes) by the
    immutable attribute; skips where neither can make it so."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root, which ignores file modes, and chattr +i is unavailable here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# ----------------------------------------------------------------------------------------------------
# a database that is not ours, or not this version's


FOREIGN = {
    "unrelated table": (["CREATE TABLE people (name TEXT, email TEXT)"], "it has table 'people'"),
    "conflicting cells table": (["CREATE TABLE cells (id INTEGER PRIMARY KEY, body TEXT)"],
                                "its table 'cells' has column(s) id, body"),
    "our tables and one more": ([*filter(str.strip, SCHEMA.split(";")), "CREATE TABLE notes (x)"],
                                "it has table 'notes'"),
    "newer schema version": ([*filter(str.strip, SCHEMA.split(";")), f"PRAGMA user_version={SCHEMA_VERSION + 1}"],
                             f"schema version {SCHEMA_VERSION + 1}"),
    "another application": (["PRAGMA application_id=1234", "CREATE TABLE runs (x)"], "another application"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_foreign_database_is_refused_untouched(case, bench, tmp_path):
    statements, message = FOREIGN[case]
    out = tmp_path / "r"
    out.mkdir()
    db = out / "results.sqlite"
    _sql(db, *statements)
    before = file_digest(db)
    for args in (["run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--out", out, "--quiet"],
                 ["leaderboard", "--out", out, "--dest", tmp_path / "lb"]):
        res = bench(*args)
        _one_line_exit_2(res, str(db), message, "nothing was changed")
        assert file_digest(db) == before
    assert not (tmp_path / "lb").exists()


def test_database_of_earlier_code_is_upgraded_and_kept(bench, results):
    """A database from before versioning (user_version 0, checks without its flag column) opens, is
    upgraded in place, and its finished cells are reused."""
    db = results / "results.sqlite"
    _sql(db, "ALTER TABLE checks DROP COLUMN flag", "PRAGMA user_version=0", "PRAGMA application_id=0")
    with read_only(db):  # a reader that cannot upgrade it reads it as it is
        assert bench("leaderboard", "--out", results, "--dest", results / "lb").code == 0
    before = _cells(results)
    res = bench(*RUN, "--out", results)
    assert res.code == 0, res.err
    assert _cells(results).keys() == before.keys()
    assert all(_cells(results)[k]["created"] == before[k]["created"] for k in before)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "flag" in {r[1] for r in conn.execute("PRAGMA table_info(checks)")}
    assert bench("leaderboard", "--out", results, "--dest", results / "lb").code == 0


def test_rounded_labels_of_earlier_code_are_made_exact_on_upgrade(bench, results):
    """Before versioning, labels and threat models carried budgets rounded to 4 digits. The upgrade rewrites
    them from the stored values: the finished cell is reused under its exact label, and its worst case is
    not split from the cells computed afterwards (a split worst case ran over fewer attacks)."""
    res = bench(*RUN, "--attacks", "fgsm[eps=1/30]", "--out", results)
    assert res.code == 0, res.err
    exact = {k: c for k, c in _cells(results).items() if k[0].startswith("fgsm[")}
    assert list(exact) == [("fgsm[eps=0.03333333333333333]", "adaptive")]
    db = results / "results.sqlite"
    _sql(db, "UPDATE cells SET attack='fgsm[eps=0.03333]', threat='Linf eps=0.03333' WHERE attack LIKE 'fgsm[%'",
         "UPDATE cells SET threat='Linf eps=0.1' WHERE attack='fgsm'", "PRAGMA user_version=0")
    res = bench(*RUN, "--attacks", "fgsm,fgsm[eps=1/30],pgd10[eps=1/30]", "--out", results)
    assert res.code == 0, res.err
    cells = _cells(results)
    again = cells[("fgsm[eps=0.03333333333333333]", "adaptive")]
    assert again["created"] == exact[("fgsm[eps=0.03333333333333333]", "adaptive")]["created"]  # not recomputed
    assert ("fgsm[eps=0.03333]", "adaptive") not in cells
    assert again["threat"] == cells[("pgd10[eps=0.03333333333333333]", "adaptive")]["threat"] == \
        "Linf eps=0.03333333333333333"
    assert cells[("fgsm", "adaptive")]["threat"] == "Linf eps=0.1"


def _as_schema_1(db, run_id: str, **moved) -> str:
    """Make the stored run `run_id` as version-1 code stored it: its identity's preset held `moved` (the
    fields that are plugin parameters now) and its id, in every table, hashed that identity. The old id."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (text,) = conn.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone()
        identity = json.loads(text)
        identity["preset"].update(moved)
        old = stable_hash(identity)  # what RunConfig.run_id was: the hash of the identity
        conn.execute("UPDATE runs SET run_id=?, config=? WHERE run_id=?", (old, json.dumps(identity), run_id))
        for table in ("cells", "checks", "requests", "failures"):
            conn.execute(f"UPDATE {table} SET run_id=? WHERE run_id=?", (old, run_id))
        conn.execute("PRAGMA user_version=1")
        conn.commit()
    return old


def _rows(db, table: str) -> list:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return sorted(conn.execute(f"SELECT * FROM {table}").fetchall())


def test_run_ids_of_schema_1_are_recomputed_and_a_resumed_run_computes_nothing(bench, results):
    """Version 1 hashed preset fields that became a plugin's own parameters into every run id. Opening the
    database gives each run the id a fresh `bench run` of its command computes, in every table; a resumed run
    reuses every cell and adds no second run."""
    from bench.runner import Request, prepare

    db = results / "results.sqlite"
    fresh = prepare(Request(defense="pgd_at", attacks="fgsm", preset="smoke", out=str(results))).config.run_id
    assert [r["run_id"] for r in Store(results, create=False).runs()] == [fresh]
    _sql(db, "INSERT INTO failures (run_id, cell, protocol, plugin, error, defense, created) "
         f"VALUES ('{fresh}', 'pgd10', 'adaptive', 'attack pgd10', 'RuntimeError: x', 'pgd_at', 0)")
    before = {t: _rows(db, t) for t in ("cells", "checks", "requests", "failures")}
    assert all(before.values())
    old = _as_schema_1(db, fresh, mrc_samples=64, mrc_passes=3)  # the smoke preset's values in version 1
    assert old != fresh and _rows(db, "cells") != before["cells"]

    store = Store(results)
    (run,) = store.runs()
    store.close()
    assert run["run_id"] == fresh and "mrc_samples" not in run["config"]["preset"]
    assert {t: _rows(db, t) for t in before} == before  # cells (flags, created), checks, requests, failures
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    res = bench(*RUN, "--out", results)
    assert res.code == 0, res.err
    assert f"run {fresh[:10]}" in res.out
    assert _rows(db, "cells") == before["cells"]  # nothing computed again
    assert [r["run_id"] for r in Store(results, create=False).runs()] == [fresh]


RUN_COLUMNS = ("defense, params, preset, dataset, arch, seed, precision, command, code_version, batch_dependent, "
               "randomized, has_surrogate, info, build_seconds")
CELL_COLUMNS = "protocol, name, params, norm, eps, threat, n, correct, flags, seconds, extra"


def test_runs_that_differed_only_in_a_moved_preset_field_become_one(results):
    """Two version-1 runs that differed only in a moved field (`--set mrc_samples=16` on a defense without that
    parameter) computed one configuration: they merge, the earlier run's cells kept, the later one's others
    added."""
    db = results / "results.sqlite"
    (fresh,) = [r["run_id"] for r in Store(results, create=False).runs()]
    first = _as_schema_1(db, fresh, mrc_samples=64, mrc_passes=3)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        identity = json.loads(conn.execute("SELECT config FROM runs").fetchone()[0])
        identity["preset"]["mrc_samples"] = 16
        second = stable_hash(identity)
        conn.execute(f"INSERT INTO runs (run_id, config, created, {RUN_COLUMNS}) SELECT ?, ?, created + 1, "
                     f"{RUN_COLUMNS} FROM runs WHERE run_id=?", (second, json.dumps(identity), first))
        for attack, label in (("clean", "clean"), ("fgsm", "fgsm[eps=0.05]")):  # one cell both have, one its own
            conn.execute(f"INSERT INTO cells (run_id, attack, created, {CELL_COLUMNS}) SELECT ?, ?, created + 100, "
                         f"{CELL_COLUMNS} FROM cells WHERE run_id=? AND attack=?", (second, label, first, attack))
        conn.commit()
    kept = {c[1]: c for c in _rows(db, "cells") if c[0] == first}

    store = Store(results)
    assert [r["run_id"] for r in store.runs()] == [fresh]
    cells = {c["attack"]: c["created"] for c in store.cells()}
    store.close()
    assert set(cells) == {"clean", "fgsm", "fgsm[eps=0.05]"} and {r[0] for r in _rows(db, "cells")} == {fresh}
    assert all(cells[a] == kept[a][-1] for a in kept)  # the earlier run's cells, not the later copies


# ----------------------------------------------------------------------------------------------------
# corruption


def _corrupt_cells_page(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='cells'").fetchone()[0]
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:  # garbage over the header of the cells table's page, mid-file
        f.seek((root - 1) * page)
        f.write(b"\xff" * 64)


def test_page_corrupted_database_is_named_and_not_written(bench, results, tmp_path):
    db = results / "results.sqlite"
    _corrupt_cells_page(db)
    before = file_digest(db)
    _one_line_exit_2(bench("leaderboard", "--out", results, "--dest", tmp_path / "lb"), str(db), "is corrupt")
    _one_line_exit_2(bench(*RUN, "--attacks", "fgsm,pgd10", "--out", results), str(db), "is corrupt")
    assert file_digest(db) == before


@pytest.mark.parametrize("damage", ["params not JSON", "flags too short", "flags disagree with correct"])
def test_corrupt_values_are_refused_by_the_reader(damage, bench, results, tmp_path):
    db = results / "results.sqlite"
    _sql(db, {"params not JSON": "UPDATE runs SET params='{not json'",
              "flags too short": "UPDATE cells SET flags=x'00' WHERE attack='fgsm'",
              "flags disagree with correct": "UPDATE cells SET correct=correct+1 WHERE attack='fgsm'"}[damage])
    _one_line_exit_2(bench("leaderboard", "--out", results, "--dest", tmp_path / "lb"), str(db), "is corrupt")


# ----------------------------------------------------------------------------------------------------
# faults while writing


def test_disk_full_mid_run_keeps_finished_cells_and_rerun_completes(bench, results, monkeypatch):
    """SQLite's own page limit stands in for a full disk: it fails the write the same way (SQLITE_FULL)."""
    from bench import store

    attacks = ",".join(f"fgsm[eps={i}/255]" for i in range(1, 31))
    opened = store.Store._open

    def no_room_to_grow(self, *, writing):
        opened(self, writing=writing)
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA max_page_count={pages}")

    monkeypatch.setattr(store.Store, "_open", no_room_to_grow)
    res = bench(*RUN, "--attacks", attacks, "--out", results)
    _one_line_exit_2(res, str(results / "results.sqlite"), "disk full", "finished cells are kept")
    kept = _cells(results)
    assert 2 < len(kept) < 32  # some of the 30 new cells finished before the disk filled up

    monkeypatch.setattr(store.Store, "_open", opened)  # space freed
    res = bench(*RUN, "--attacks", attacks, "--out", results)
    assert res.code == 0, res.err
    after = _cells(results)
    assert len(after) == 32  # clean, fgsm and the 30 new ones
    assert all(after[k]["created"] == kept[k]["created"] for k in kept)


def test_database_turning_read_only_mid_run_is_one_line(bench, results, monkeypatch):
    """The connection is reopened read-only after the first stored cell, as SQLite itself opens a file
    it may not write; the next write fails, the first cell stays."""
    from bench import store

    put_cell = store.Store.put_cell

    def then_read_only(self, *args, **kw):
        put_cell(self, *args, **kw)
        self.conn.close()
        self.conn = store._Guarded(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True), self.path)

    monkeypatch.setattr(store.Store, "put_cell", then_read_only)
    res = bench(*RUN, "--attacks", "fgsm,pgd10,fgsm[eps=2/255]", "--out", results)
    _one_line_exit_2(res, str(results / "results.sqlite"), "read-only")
    cells = _cells(results)
    assert ("pgd10", "adaptive") in cells and ("fgsm[eps=2/255]", "adaptive") not in cells


@pytest.mark.parametrize("target", ["database file", "results directory"])
def test_read_only_results_are_refused_before_work(target, bench, results):
    db = results / "results.sqlite"
    before = file_digest(db)
    with read_only(db if target == "database file" else results):
        res = bench(*RUN, "--attacks", "fgsm,pgd10", "--out", results)
        report = bench("leaderboard", "--out", results, "--dest", results.parent / "lb")
    _one_line_exit_2(res, "is not writable")
    assert report.code == 0, report.err  # read-only results can still be reported
    assert file_digest(db) == before


def test_read_only_cache_is_refused_before_work(bench, results):
    with read_only(results / "cache" / "base"):
        res = bench(*RUN, "--attacks", "fgsm,pgd10", "--out", results)
    _one_line_exit_2(res, "is not writable", str(results / "cache" / "base"))


def test_output_path_longer_than_the_os_allows(bench, results, tmp_path):
    for out in (tmp_path / ("x" * 300), tmp_path / "/".join(["y" * 200] * 20)):
        _one_line_exit_2(bench(*RUN, "--out", out), "too long")
        _one_line_exit_2(bench("leaderboard", "--out", results, "--dest", out), "too long")


def test_empty_output_paths_are_refused(bench, results, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(bench(*RUN, "--out", ""), "must not be empty")
    _one_line_exit_2(bench("leaderboard", "--out", "", "--dest", tmp_path / "lb"), "must not be empty")
    _one_line_exit_2(bench("leaderboard", "--out", results, "--dest", ""), "must not be empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


# ----------------------------------------------------------------------------------------------------
# bench leaderboard


def test_leaderboard_dest_that_cannot_be_written(bench, results, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_line_exit_2(bench("leaderboard", "--out", results, "--dest", blocker), "is not a directory")
    _one_line_exit_2(bench("leaderboard", "--out", results, "--dest", blocker / "lb"), "is not a directory")
    dest = tmp_path / "lb"
    dest.mkdir()
    with read_only(dest):
        _one_line_exit_2(bench("leaderboard", "--out", results, "--dest", dest), "is not writable")
    assert blocker.read_text() == "x" and not any(dest.iterdir())


def test_leaderboard_write_failure_keeps_the_previous_file(bench, results, tmp_path):
    """A file-size limit makes the write fail as a full disk would; the earlier leaderboard survives."""
    import resource

    dest = tmp_path / "lb"
    assert bench("leaderboard", "--out", results, "--dest", dest).code == 0
    (board,) = dest.glob("*.md")
    before = board.read_text()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        res = bench("leaderboard", "--out", results, "--dest", dest)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _one_line_exit_2(res, f"cannot write the leaderboard to {dest}", "file too large")
    assert board.read_text() == before and sorted(p.name for p in dest.iterdir()) == [board.name]


def test_not_a_database_file(bench, results, tmp_path):
    db = results / "results.sqlite"
    db.write_bytes(b"not a database at all " * 100)
    for args in (RUN, ["leaderboard", "--dest", tmp_path / "lb"]):
        _one_line_exit_2(bench(*args, "--out", results), str(db), "not an SQLite database")
    assert db.read_bytes() == b"not a database at all " * 100


def test_leaderboard_of_a_database_without_runs(bench, tmp_path):
    Store(tmp_path / "r").close()
    _one_line_exit_2(bench("leaderboard", "--out", tmp_path / "r", "--dest", tmp_path / "lb"),
                     "no runs in", "nothing written")
    assert not (tmp_path / "lb").exists()


@pytest.mark.parametrize("column,value", [("dataset", "../../escaped"), ("arch", "a/b"), ("preset", "/tmp"),
                                          ("dataset", ".hidden"), ("preset", ""), ("arch", "pgd+eot"),
                                          ("dataset", "x" * 300)])
def test_leaderboard_names_its_files_safely_whatever_the_database_holds(column, value, bench, results, tmp_path):
    """A name from the database that is no file name (a path, a dot file, nothing, too long) gets a safe file
    name made of it inside --dest, not a refusal of the board; the name itself is shown in the board's title."""
    _sql(results / "results.sqlite", f"UPDATE runs SET {column}=?".replace("?", "'" + value + "'"))
    dest = tmp_path / "deep" / "lb"
    res = bench("leaderboard", "--out", results, "--dest", dest)
    assert res.code == 0, res.err
    (board,) = dest.glob("*.md")
    assert [Path(p) for p in res.out.split()][0] == board
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,150}", p.name) for p in dest.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "results"]  # nothing outside --dest
    from bench.markdown_reader import code, escape

    title = board.read_text().split("\n", 1)[0]
    assert (code(value) if column == "preset" else escape(value)) in title


def test_report_figure_names_become_safe_file_names(tmp_path):
    """L1: a figure named after an attack that is no file name (`pgd+eot`) is drawn under a safe name made
    of it, one file per name, inside the leaderboard's folder."""
    from bench.api import ReportContext

    rc = ReportContext(configs=[], dataset="digits", arch="tiny_cnn", preset="smoke", dest=tmp_path,
                       stem="digits-tiny_cnn-smoke")
    assert rc.figure("eps-pgd10") == tmp_path / "digits-tiny_cnn-smoke-eps-pgd10.png"
    names = ["eps-pgd+eot", "eps-pgd eot", "../../x", "a/b", ".x", "", "x" * 300]
    paths = [rc.figure(name) for name in names]
    assert len(set(paths)) == len(names) and rc.figure("eps-pgd+eot") == paths[0]
    assert all(p.parent == tmp_path and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.png", p.name) for p in paths)
    assert paths[0].name.startswith("digits-tiny_cnn-smoke-eps-pgd_eot-")


def test_disk_full_while_caching_a_model_is_one_line_and_a_rerun_completes(bench, tmp_path, monkeypatch):
    """An OSError outside the database (here: the disk fills while the trained base is cached) ends the
    command with one line naming the cause, not a traceback; once there is space the same command runs."""
    import errno

    import torch

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    command = ["run", "--preset", "smoke", "--defense", "standard", "--attacks", "fgsm", "--quiet",
               "--set", "epochs_standard=1", "--out", tmp_path / "results"]
    _one_line_exit_2(bench(*command), "disk full", "re-run the command")
    monkeypatch.setattr(torch, "save", real_save)
    res = bench(*command)
    assert res.code == 0, res.err
    assert ("fgsm", "adaptive") in _cells(tmp_path / "results")
