"""Writes of several steps are one transaction: a merge is committed whole or not at all (a SIGKILL at any
moment leaves the target as before or complete), a cell is stored only once the files it owns are on disk
(a full disk never leaves a stored cell without its `--save-adversarial` images, and a re-run saves those
missing), and a results database whose rows hold the wrong JSON or types is refused by its readers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import merge as merge_mod, runner
from bench.errors import BenchError
from bench.evaluator import CellResult
from bench.store import DB_NAME, Store
from conftest import REPO, bench_subprocess, file_digest
from test_storage_safety import _cells

# ----------------------------------------------------------------------------------------------------
# results databases made row by row (no training): many runs and cells in seconds


def fill(out, prefix: str, runs: int, attacks: int = 3, n: int = 64, seed: int = 0) -> None:
    """`runs` runs of `attacks` FGSM budgets each (plus clean), with requests, a probe check and some
    failures, stored as `bench run` stores them."""
    rng = np.random.default_rng(seed)
    store = Store(out)
    try:
        with store.transaction():
            for i in range(runs):
                run_id = f"{prefix}{i:06d}".ljust(64, "0")
                store.put_run({"run_id": run_id, "defense": "pgd_at", "params": {"i": i}, "preset": "smoke",
                               "dataset": "digits", "arch": "tiny_cnn", "seed": i, "precision": "fp32",
                               "config": {"defense": "pgd_at", "params": [["i", i]], "preset": {"eps": 0.1},
                                          "dataset": "digits", "seed": i, "data": "f00d"},
                               "command": "bench run", "code_version": "test", "batch_dependent": 0,
                               "randomized": 0, "has_surrogate": 0, "info": {}, "build_seconds": 1.0,
                               "created": 1000.0 + i})
                clean = rng.random(n) < 0.9
                store.put_cell(run_id, attack="clean", protocol="-", name="clean", params={}, norm="-", eps=0.0,
                               threat="-", flags=clean, seconds=0.1, extra={})
                requested = [("clean", "-", "-")]
                for k in range(1, attacks + 1):
                    label, threat = f"fgsm[eps={k}/255]", f"Linf eps={k}/255"
                    store.put_cell(run_id, attack=label, protocol="adaptive", name="fgsm", params={"eps": k / 255},
                                   norm="Linf", eps=k / 255, threat=threat, flags=clean & (rng.random(n) < 0.6),
                                   seconds=0.2, extra={"state_changed": False})
                    requested.append((label, "adaptive", threat))
                store.put_requests(run_id, requested + [("pgd10", "adaptive", "Linf eps=1/255")])
                store.put_checks(run_id, [("determinism", "pass", "same predictions twice", "")])
                if i % 10 == 0:
                    store.put_failure(run_id, cell="pgd10", protocol="adaptive", plugin="attack 'pgd10'",
                                      error="RuntimeError: boom", defense="pgd_at")
    finally:
        store.close()


KEYS = {"runs": "run_id", "cells": "run_id, attack, protocol", "requests": "run_id, attack, protocol",
        "checks": "run_id, name", "failures": "run_id, cell, protocol"}


def rows(db, *, timeless: bool = False) -> dict:
    """Every row of every table (opening it rolls back what a killed writer left in its journal). `timeless`:
    without the times a merge sets when it writes a row (a run keeps its own)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        out = {}
        for table, key in KEYS.items():
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")
                       if not (timeless and table != "runs" and r[1] == "created")]
            out[table] = conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}").fetchall()
    return out


def runs_without_cells(db) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs WHERE run_id NOT IN (SELECT run_id FROM cells)").fetchone()[0]


def _one_line_exit_2(res, *fragments):
    assert res.code == 2, (res.code, res.err)
    assert res.err.startswith("bench: error: ") and res.err.count("\n") == 1, res.err
    for fragment in fragments:
        assert fragment in res.err, res.err


# ----------------------------------------------------------------------------------------------------
# M1: a merge is one transaction


# Forks `bench.cli.main(ARGS)` with everything imported (a fresh interpreter spends seconds importing torch,
# longer than the merge) and SIGKILLs the child after `kill_after` seconds unless it ended first. The server
# kills and reaps its own child, so the pid it kills is never another process's.
FORK_SERVER = r"""
import json, os, signal, sys, time
from bench.cli import main

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        code = 0
        try:
            main(job["args"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        os._exit(code)
    start, killed, journal = time.perf_counter(), False, []
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        now = time.perf_counter() - start
        if done:
            break
        if job["watch"] and os.path.exists(job["watch"]):
            journal.append(now)
        if job["kill_after"] is not None and now >= job["kill_after"]:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = True
            break
        time.sleep(0.001)
    print(json.dumps({"killed": killed, "at": now, "code": os.waitstatus_to_exitcode(status),
                      "journal": [journal[0], journal[-1]] if journal else None}), flush=True)
"""


@contextlib.contextmanager
def fork_server():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)

    def run(args, kill_after=None, watch=None) -> dict:
        proc.stdin.write(json.dumps({"args": [str(a) for a in args], "kill_after": kill_after,
                                     "watch": str(watch) if watch else None}) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    try:
        yield run
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


KILLS = 20
SWEEP_RUNS = 500


def test_a_merge_killed_at_any_moment_leaves_the_target_as_before_or_complete(tmp_path):
    src, before_dir = tmp_path / "shard", tmp_path / "before"
    fill(src, "b", SWEEP_RUNS)  # 500 runs: 2,000 cells, 2,500 requests, 500 checks, 50 failures
    fill(before_dir, "a", 20, seed=1)  # the target already holds other runs
    db_before = before_dir / DB_NAME
    before, before_digest = rows(db_before), file_digest(db_before)

    outcomes = []
    with fork_server() as run:  # (it imports while the command below runs)
        # the complete merge, by the command itself
        shutil.copytree(before_dir, tmp_path / "complete")
        res = bench_subprocess("merge", src, "--out", tmp_path / "complete")
        assert res.returncode == 0, res.stderr
        assert f"{SWEEP_RUNS} run(s) and {SWEEP_RUNS * 4} cell(s) added" in res.stdout
        complete = rows(tmp_path / "complete" / DB_NAME, timeless=True)
        assert len(complete["runs"]) == SWEEP_RUNS + 20 and len(complete["cells"]) == (SWEEP_RUNS + 20) * 4

        target = tmp_path / "target"
        journal = target / (DB_NAME + "-journal")  # exists while a write transaction has changed pages
        shutil.copytree(before_dir, target)
        timing = run(["merge", src, "--out", target], watch=journal)
        assert timing["code"] == 0 and timing["journal"] is not None, timing
        assert rows(target / DB_NAME, timeless=True) == complete
        duration, (write_start, write_end) = timing["at"], timing["journal"]

        for k in range(KILLS):  # spread over the merge's whole duration, and a little past its end
            shutil.rmtree(target)
            shutil.copytree(before_dir, target)
            kill_after = 1.25 * duration * (k + 0.5) / KILLS
            got = run(["merge", src, "--out", target], kill_after=kill_after)
            mid_write = journal.exists()  # a hot journal: the kill hit a transaction that had written
            after = rows(target / DB_NAME)
            if after == before:
                state = "before"
                assert file_digest(target / DB_NAME) == before_digest  # byte for byte, once rolled back
            else:
                assert rows(target / DB_NAME, timeless=True) == complete, (k, kill_after, got)
                state = "complete"
                assert not mid_write
            assert runs_without_cells(target / DB_NAME) == 0
            assert got["killed"] or state == "complete", got
            outcomes.append((round(kill_after, 3), got["killed"], mid_write, state))

        # a killed merge, run again, completes
        assert run(["merge", src, "--out", target])["code"] == 0
        assert rows(target / DB_NAME, timeless=True) == complete

    print(f"\nmerge of {SWEEP_RUNS} runs / {SWEEP_RUNS * 4} cells: {duration:.3f}s, writing (journal seen) from "
          f"{write_start:.3f}s to {write_end:.3f}s")
    for kill_after, killed, mid_write, state in outcomes:
        print(f"  kill at {kill_after:.3f}s: {'killed' if killed else 'had ended'}"
              f"{', mid-write (hot journal rolled back)' if mid_write else ''} -> {state}")
    landed = [o for o in outcomes if o[2]]
    assert landed, "no kill landed while the merge was writing"
    assert any(o[1] and not o[2] and o[3] == "before" for o in outcomes)  # and some before it wrote


@pytest.fixture
def shard_and_target(tmp_path):
    fill(tmp_path / "shard", "b", 60)
    fill(tmp_path / "target", "a", 5, seed=1)
    return tmp_path / "shard", tmp_path / "target"


def test_a_merge_failing_midway_writes_nothing(shard_and_target, monkeypatch):
    """The disk fills up (SQLite's page limit stands in for it, as in test_storage_safety) after the merge
    has written some of its rows: every one of them is rolled back."""
    shard, target = shard_and_target
    db = target / DB_NAME
    before, digest = rows(db), file_digest(db)
    opened, put_cell = Store._open, Store.put_cell
    written = []

    def little_room(self, *, writing):
        opened(self, writing=writing)
        if writing:
            pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
            self.conn.execute(f"PRAGMA max_page_count={pages + 36}")  # about half the merge

    def counted(self, *args, **kwargs):
        put_cell(self, *args, **kwargs)
        written.append(args[0])

    monkeypatch.setattr(Store, "_open", little_room)
    monkeypatch.setattr(Store, "put_cell", counted)
    with pytest.raises(BenchError, match="disk full"):
        merge_mod.merge([str(shard)], str(target))
    assert written  # cells were written (and then rolled back) before the disk was full
    assert rows(db) == before and file_digest(db) == digest

    monkeypatch.setattr(Store, "_open", opened)  # space freed: the same merge completes
    assert merge_mod.merge([str(shard)], str(target)) == {"runs": 60, "cells": 240, "sources": 1}
    assert runs_without_cells(db) == 0


def test_store_transaction_commits_together_and_rolls_back_on_error(tmp_path):
    fill(tmp_path, "a", 1)
    store = Store(tmp_path)
    try:
        run_id = "a000000".ljust(64, "0")
        with pytest.raises(RuntimeError), store.transaction():
            store.put_checks(run_id, [("large_eps", "pass", "x", "")])
            with store.transaction():  # nested: part of the outer one
                store.put_failure(run_id, cell="x", protocol="adaptive", plugin="p", error="e", defense="d")
            with contextlib.closing(sqlite3.connect(store.path, timeout=0.1)) as other:  # not yet visible
                assert other.execute("SELECT COUNT(*) FROM failures WHERE cell='x'").fetchone()[0] == 0
            raise RuntimeError("after two writes")
        assert [c["name"] for c in store.checks(run_id)] == ["determinism"]
        assert not [f for f in store.failures(run_id) if f["cell"] == "x"]
        store.put_checks(run_id, [("large_eps", "pass", "x", "")])  # outside one: committed at once
        with contextlib.closing(sqlite3.connect(store.path)) as other:
            assert other.execute("SELECT COUNT(*) FROM checks").fetchone()[0] == 2
    finally:
        store.close()


# ----------------------------------------------------------------------------------------------------
# S1: rows of the wrong JSON shape or type are refused by the readers, and by merge before it writes


CORRUPT_ROWS = {
    "config is a list": "UPDATE runs SET config='[]'",
    "config is a string": "UPDATE runs SET config='\"x\"'",
    "config is null": "UPDATE runs SET config='null'",
    "config is a number": "UPDATE runs SET config='5'",
    "config data is a number": "UPDATE runs SET config='{\"data\": 5}'",
    "config preset is a list": "UPDATE runs SET config='{\"preset\": []}'",
    "config seed is text": "UPDATE runs SET config='{\"seed\": \"0\"}'",
    "config params is an object": "UPDATE runs SET config='{\"params\": {}}'",
    "config is bytes": "UPDATE runs SET config=x'7b7d'",
    "run params is a list": "UPDATE runs SET params='[]'",
    "run info is null": "UPDATE runs SET info='null'",
    "run seed is text": "UPDATE runs SET seed='zero'",
    "cell params is a list": "UPDATE cells SET params='[1]' WHERE attack='fgsm[eps=1/255]'",
    "cell extra is a string": "UPDATE cells SET extra='\"x\"' WHERE attack='fgsm[eps=1/255]'",
    "cell eps is text": "UPDATE cells SET eps='wide' WHERE attack='fgsm[eps=1/255]'",
    "request threat is bytes": "UPDATE requests SET threat=x'00'",
    "failure error is bytes": "UPDATE failures SET error=x'01'",
}


@pytest.fixture
def small_shard_and_target(tmp_path):
    fill(tmp_path / "shard", "b", 11)  # (every tenth run has a failure)
    fill(tmp_path / "target", "a", 2, seed=1)
    return tmp_path / "shard", tmp_path / "target"


@pytest.mark.parametrize("damage", CORRUPT_ROWS)
def test_rows_of_the_wrong_shape_are_refused_and_not_merged(damage, bench, small_shard_and_target, tmp_path):
    shard, target = small_shard_and_target
    assert bench("leaderboard", "--out", shard, "--dest", tmp_path / "lb0").code == 0  # as made, it is fine
    with contextlib.closing(sqlite3.connect(shard / DB_NAME)) as conn:
        conn.execute(CORRUPT_ROWS[damage])
        conn.commit()
    where = f"results database {shard / DB_NAME} is corrupt: "
    _one_line_exit_2(bench("leaderboard", "--out", shard, "--dest", tmp_path / "lb"), where)
    digest = file_digest(target / DB_NAME)
    _one_line_exit_2(bench("merge", shard, "--out", target), where)
    assert file_digest(target / DB_NAME) == digest
    _one_line_exit_2(bench("merge", shard, "--out", tmp_path / "new"), where)
    assert not (tmp_path / "new").exists()  # refused before the target was made


def test_a_hostile_run_id_in_a_message_stays_one_line(bench, small_shard_and_target, tmp_path):
    shard, _ = small_shard_and_target
    with contextlib.closing(sqlite3.connect(shard / DB_NAME)) as conn:
        conn.execute("UPDATE runs SET run_id='x\n\x1b[31mbench: ok', config='[]' WHERE run_id LIKE 'b000001%'")
        conn.commit()
    res = bench("leaderboard", "--out", shard, "--dest", tmp_path / "lb")
    _one_line_exit_2(res, "runs.config of run 'x\\n\\x1b[31mbench: o", "is a list, not a JSON object")
    assert "\x1b" not in res.err


# ----------------------------------------------------------------------------------------------------
# A1: a cell and its --save-adversarial file


RUN = ["run", "--preset", "smoke", "--defense", "pgd_at", "--save-adversarial"]


def _run_id(out) -> str:
    store = Store(out, create=False)
    try:
        (run,) = store.runs()
        return run["run_id"]
    finally:
        store.close()


def _saved(out, label) -> np.ndarray | None:
    path = runner.adversarial_path(out, _run_id(out), label, "adaptive")
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return npz["correct"]


def test_disk_full_while_saving_images_stores_no_cell_and_the_rerun_saves_them(bench, out_dir, monkeypatch):
    real_fsync = os.fsync

    def full(fd):  # the disk fills while the .npz is written: its data cannot reach the disk
        if "/adversarial/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    res = bench(*RUN, "--attacks", "fgsm,pgd10", "--out", out_dir, "--quiet")
    _one_line_exit_2(res, "cannot save the adversarial images of cell fgsm (adaptive)", "disk full",
                     "the cell was not stored")
    assert set(_cells(out_dir)) == {("clean", "-")}  # fgsm was attacked, but is not stored without its file
    assert not [p for p in (out_dir / "adversarial").rglob("*") if p.is_file()]  # nor half a file

    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    res = bench(*RUN, "--attacks", "fgsm,pgd10", "--out", out_dir)
    assert res.code == 0, res.err
    assert "1 of 3 cells already finished, skipped" in res.err
    cells = _cells(out_dir)
    for label in ("fgsm", "pgd10"):
        assert _saved(out_dir, label).tolist() == cells[(label, "adaptive")]["flags"].tolist()


def test_finished_cells_without_their_images_are_attacked_again_to_save_them(bench, out_dir):
    res = bench(*RUN[:-1], "--attacks", "fgsm,pgd10", "--out", out_dir)  # without --save-adversarial
    assert res.code == 0, res.err
    assert _saved(out_dir, "fgsm") is None

    res = bench(*RUN, "--attacks", "fgsm,pgd10", "--out", out_dir)
    assert res.code == 0, res.err
    assert "3 of 3 cells already finished" not in res.err
    assert "2 finished cell(s) have no saved adversarial images (fgsm (adaptive), pgd10 (adaptive))" in res.err
    first = _cells(out_dir)
    for label in ("fgsm", "pgd10"):
        assert _saved(out_dir, label).tolist() == first[(label, "adaptive")]["flags"].tolist()

    runner.adversarial_path(out_dir, _run_id(out_dir), "pgd10", "adaptive").unlink()  # lost, say
    res = bench(*RUN, "--attacks", "fgsm,pgd10", "--out", out_dir)
    assert res.code == 0, res.err
    assert "2 of 3 cells already finished, skipped" in res.err
    again = _cells(out_dir)
    assert _saved(out_dir, "pgd10").tolist() == again[("pgd10", "adaptive")]["flags"].tolist()
    assert again[("fgsm", "adaptive")]["created"] == first[("fgsm", "adaptive")]["created"]  # not redone

    res = bench(*RUN, "--attacks", "fgsm,pgd10", "--out", out_dir)  # everything saved: nothing to do
    assert res.code == 0 and "3 of 3 cells already finished, skipped" in res.err


def test_a_label_too_long_for_a_file_name_is_saved_and_read_back(tmp_path):
    run_id = "c" * 64
    labels = [f"pgd10[note={'x' * 300}{end}]" for end in "ab"]  # differ only past the 255th byte
    paths = [runner.adversarial_path(tmp_path, run_id, label, "paper:teacher") for label in labels]
    assert paths[0] != paths[1] and all(len(os.fsencode(p.name)) <= 255 for p in paths)
    assert runner.adversarial_path(tmp_path, run_id, "fgsm", "adaptive").name == "fgsm.adaptive.npz"
    similar = [runner.adversarial_path(tmp_path, run_id, f"pgd10[note={n}]", "adaptive") for n in ("a b", "a_b")]
    assert similar[0] != similar[1]  # both would read pgd10_note=a_b_ once the space is replaced
    store = Store(tmp_path)
    try:
        flags = np.array([True, False, True])
        res = CellResult(flags, 1.0, {}, torch.rand(3, 1, 2, 2))
        assert runner.unsaved(store, run_id, [(labels[0], "paper:teacher")]) == [(labels[0], "paper:teacher")]
        runner.save_adversarial(store, run_id, labels[0], "paper:teacher", res, torch.tensor([1, 2, 3]))
        assert runner.unsaved(store, run_id, [(labels[0], "paper:teacher"), ("clean", "-")]) == []
    finally:
        store.close()
    with np.load(paths[0], allow_pickle=False) as npz:  # where bench.evaluate reads it (adversarial_path)
        assert str(npz["attack"]) == labels[0] and npz["correct"].tolist() == flags.tolist()
    assert not paths[1].exists()
