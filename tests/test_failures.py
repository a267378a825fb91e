"""Results completeness and plugin failures: a requested cell that is not stored never looks complete, a
plugin that raises fails its cell (or its job) only, and a plugin that cannot be imported disables nothing
but itself."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pandas as pd
import pytest

from bench.store import Store
from conftest import PLUGINS, bench_subprocess, make_distribution

PROVIDER = "bench-faulty-plugin"


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    """The faulty plugin package installed on sys.path (for in-process runs); returns its site folder."""
    site = make_distribution(PLUGINS / "faulty_plugin", tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("BENCH_FAULTY_FIXED", raising=False)
    return site


def _store(out):
    return Store(out, create=False)


# ----------------------------------------------------------------------------------------------------
# a plugin that cannot be imported


def test_list_shows_an_unimportable_plugin_as_broken_and_lists_the_rest(tmp_path):
    site = make_distribution(PLUGINS / "faulty_plugin", tmp_path / "site")
    res = bench_subprocess("list", env={"PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.split()[:1] == ["faulty_import"])
    assert "BROKEN" in line and f"bench_faulty.unimportable:Never (from {PROVIDER})" in line
    assert "ModuleNotFoundError" in line and "bench_faulty_missing_dependency" in line
    listed = {ln.split()[0] for ln in res.stdout.splitlines() if ln.startswith("  ") and ln.split()}
    assert {"pgd_at", "pgd10", "fgsm", "faulty_perturb", "faulty_build"} <= listed


def test_attacks_all_skips_an_unimportable_plugin_with_one_warning(faulty, capsys):
    from bench import runner
    from bench.cli import _setup_logging

    _setup_logging(True)
    runner._warned_broken.discard("faulty_import")
    items = runner.attack_items("all")
    runner.attack_items("all")  # a sweep prepares many jobs: still one warning
    assert "faulty_import" not in items and {"pgd10", "fgsm", "faulty_perturb"} <= set(items)
    err = capsys.readouterr().err
    assert err.count("faulty_import") == 1
    assert f"bench_faulty.unimportable:Never (from {PROVIDER})" in err and "ModuleNotFoundError" in err


def test_naming_an_unimportable_attack_stays_a_user_error(faulty, bench, tmp_path):
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm,faulty_import",
                "--out", tmp_path / "results", "--quiet")
    assert res.code == 2
    assert res.err.count("\n") == 1 and "Traceback" not in res.err
    assert "faulty_import" in res.err and "bench_faulty_missing_dependency" in res.err
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------------
# a plugin that raises at run time


def test_failing_attacks_fail_only_their_cells_and_a_fixed_rerun_clears_them(faulty, bench, out_dir, smoke_cache,
                                                                              monkeypatch, tmp_path):
    args = ["run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "faulty_perturb,faulty_setup,fgsm",
            "--out", out_dir, "--quiet"]
    res = bench(*args)
    assert res.code == 1
    assert "Traceback" not in res.err
    assert (f"bench: attack 'faulty_perturb' (bench_faulty:FailingPerturb from {PROVIDER}) failed: "
            f"ValueError: perturb exploded") in res.err.splitlines()
    # a BenchError raised by a plugin at run time is its failure, not the user's mistake (exit 1, not 2)
    assert (f"bench: attack 'faulty_setup' (bench_faulty:FailingSetup from {PROVIDER}) failed: "
            f"BenchError: setup needs a surrogate") in res.err.splitlines()
    assert "ValueError: perturb exploded" in (out_dir / "failures.log").read_text()  # the traceback
    # the summary shows both as failed, and the worst case as lacking them
    assert any(ln.startswith("faulty_perturb") and "failed: ValueError" in ln for ln in res.out.splitlines())
    worst = next(ln for ln in res.out.splitlines() if ln.startswith("worst case"))
    assert "‡ incomplete: faulty_perturb failed, faulty_setup failed" in worst

    store = _store(out_dir)
    (run,) = store.runs()
    cells = {c["attack"]: c for c in store.cells(run["run_id"])}
    failures = {f["cell"]: f for f in store.failures(run["run_id"])}
    store.close()
    assert set(cells) == {"clean", "fgsm"}  # the attack after the failures ran
    assert set(failures) == {"faulty_perturb", "faulty_setup"}
    assert failures["faulty_perturb"]["error"] == "ValueError: perturb exploded"
    # the failing attack changed the model's weights before raising: undone, fgsm scores the same model
    # as the session's plain pgd_at/fgsm run
    reference = _store(smoke_cache)
    ref = next(c for r in reference.runs() if r["defense"] == "pgd_at" for c in reference.cells(r["run_id"])
               if c["attack"] == "fgsm")
    reference.close()
    assert np.array_equal(cells["fgsm"]["flags"], ref["flags"])

    board = tmp_path / "board"
    assert bench("leaderboard", "--out", out_dir, "--dest", board).code == 0
    (md,) = board.glob("*.md")
    row = next(ln for ln in md.read_text().splitlines() if ln.startswith("| ") and "| pgd_at " in ln)
    assert "‡ incomplete: faulty_perturb failed, faulty_setup failed" in row

    monkeypatch.setenv("BENCH_FAULTY_FIXED", "1")  # the plugin is fixed: the re-run computes the failed cells
    res = bench(*args)
    assert res.code == 0, res.err
    assert "‡" not in res.out
    store = _store(out_dir)
    assert store.failures() == [] and {c["attack"] for c in store.cells()} == {"clean", "fgsm", "faulty_perturb",
                                                                              "faulty_setup"}
    store.close()
    assert bench("leaderboard", "--out", out_dir, "--dest", board).code == 0
    assert "‡ incomplete" not in md.read_text().split("## ", 1)[0].split("‡ marks", 1)[1]


def test_failing_defense_build_fails_its_job_and_the_sweep_goes_on(faulty, bench, out_dir, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('preset = "smoke"\nattacks = ["fgsm"]\n\n[[cells]]\ndefense = "faulty_build"\n\n'
                    '[[cells]]\ndefense = "pgd_at"\n')
    res = bench("sweep", grid, "--out", out_dir, "--quiet")
    assert res.code == 1
    assert "Traceback" not in res.err
    # one line, even for a plugin's multi-line message
    assert (f"bench: defense 'faulty_build' (bench_faulty:FailingBuild from {PROVIDER}) failed: "
            f"RuntimeError: no weights for this defense second line of the message") in res.err.splitlines()
    assert "build failed" in res.out
    store = _store(out_dir)
    runs = store.runs()
    failures = store.failures()
    store.close()
    assert [r["defense"] for r in runs] == ["pgd_at"]  # the job after the failed one ran
    assert [(f["cell"], f["defense"]) for f in failures] == [("(build)", "faulty_build")]
    lb = bench("leaderboard", "--out", out_dir, "--dest", tmp_path / "board")
    assert lb.code == 0 and "faulty_build" in lb.err and "RuntimeError: no weights" in lb.err


# ----------------------------------------------------------------------------------------------------
# a run killed before all its cells finished


def test_a_run_missing_a_requested_cell_is_marked_incomplete_everywhere(bench, smoke_cache, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(smoke_cache / "results.sqlite", out / "results.sqlite")
    store = _store(out)
    run_id = next(r["run_id"] for r in store.runs() if r["defense"] == "pgd_at")
    store.close()
    # what a run killed during its last attack leaves: the request and every other cell, not that one
    with sqlite3.connect(out / "results.sqlite") as conn:
        conn.execute("INSERT INTO requests (run_id, attack, protocol, threat, created) "
                     "SELECT run_id, 'pgd10', 'adaptive', threat, created FROM cells "
                     "WHERE run_id=? AND attack='fgsm'", (run_id,))
    conn.close()

    board = tmp_path / "board"
    assert bench("leaderboard", "--out", out, "--dest", board).code == 0
    (md,) = board.glob("*.md")
    text = md.read_text()
    main = "| Rank" + text.split("| Rank", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in main.splitlines()]
    header = rows[0]
    pgd_at = next(r for r in rows if r[1] == "pgd_at")
    standard = next(r for r in rows if r[1] == "standard")
    worst = pgd_at[next(i for i, h in enumerate(header) if h.startswith("Worst "))]
    assert worst[0].isdigit() and worst.endswith(" ‡")
    assert "‡ incomplete: pgd10 missing" in pgd_at[header.index("Flags")]
    assert "‡" not in "".join(standard)
    detail = text.split("### L∞ ε=0.1, adaptive attacks", 1)[1].split("\n\n", 2)[1]
    table = [[c.strip() for c in ln.strip("|").split("|")] for ln in detail.splitlines()]
    row = next(r for r in table if r[0] == "pgd_at")
    assert row[table[0].index("pgd10")] == "—" and row[table[0].index("Worst")].endswith("‡ incomplete: pgd10 missing")

    assert bench("leaderboard", "--out", out, "--dest", board, "--format", "csv").code == 0
    frame = pd.read_csv(next(board.glob("*.csv")))
    cells = frame.set_index(["defense", "cell", "protocol"])
    assert cells.loc[("pgd_at", "pgd10", "adaptive"), "status"] == "missing"
    assert cells.loc[("pgd_at", "pgd10", "adaptive"), "accuracy"] != cells.loc[("pgd_at", "pgd10", "adaptive"), "accuracy"]
    assert cells.loc[("pgd_at", "worst:Linf eps=0.1", "adaptive"), "incomplete"] == "pgd10 missing"
    standard_worst = cells.loc[("standard", "worst:Linf eps=0.1", "adaptive"), "incomplete"]
    assert standard_worst != standard_worst  # empty: NaN

    assert bench("leaderboard", "--out", out, "--dest", board, "--format", "json").code == 0
    exported = json.loads(next(board.glob("*.json")).read_text())
    entries = {e["name"]: e for e in exported["models"]}
    assert entries["pgd_at"]["missing_cells"] == [{"attack": "pgd10", "protocol": "adaptive", "threat": "Linf eps=0.1",
                                                   "error": None, "seed": 0}]
    assert entries["standard"]["incomplete"] == "" and entries["standard"]["missing_cells"] == []
    missing = [c for c in exported["cells"] if c["status"] == "missing"]
    assert [(c["defense"], c["cell"], c["accuracy"]) for c in missing] == [("pgd_at", "pgd10", None)]


def test_ctrl_c_inside_a_plugin_is_still_an_interrupt_not_a_failure(faulty, bench, out_dir, monkeypatch):
    monkeypatch.setenv("BENCH_FAULTY_INTERRUPT", "1")
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm,faulty_perturb,pgd10",
                "--out", out_dir, "--quiet")
    assert res.code == 130 and "failed" not in res.err
    store = _store(out_dir)
    assert store.failures() == []
    assert {c["attack"] for c in store.cells()} == {"clean", "fgsm"}  # stopped there: pgd10 never ran
    store.close()


def test_check_names_a_defense_whose_build_fails(faulty, bench, out_dir):
    res = bench("check", "--preset", "smoke", "--defense", "faulty_build", "--out", out_dir, "--quiet")
    assert res.code == 1 and "Traceback" not in res.err
    assert res.err.strip() == (f"bench: defense 'faulty_build' (bench_faulty:FailingBuild from {PROVIDER}) failed: "
                               f"RuntimeError: no weights for this defense second line of the message")


def test_a_failing_report_plugin_leaves_the_rest_of_the_leaderboard(faulty, bench, smoke_cache, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(smoke_cache / "results.sqlite", out / "results.sqlite")
    res = bench("leaderboard", "--out", out, "--dest", tmp_path / "board")
    assert res.code == 0, res.err
    assert f"report 'faulty_report' (bench_faulty:failing_report from {PROVIDER}) failed" in res.err
    (md,) = (tmp_path / "board").glob("*.md")
    text = md.read_text()
    assert "| pgd_at " in text and "## Sanity checks" in text  # the table and the sections after the report
    assert "## Report 'faulty_report' failed" in text and "KeyError: 'no such table'" in text


@pytest.mark.parametrize("defense, checks, cell, error", [
    ("faulty_model", "--no-checks", "clean", "RuntimeError: kernel not available"),  # fails on the clean cell
    ("faulty_model", None, "(build)", "RuntimeError: kernel not available"),  # ... or already on the probes
    ("faulty_none", None, "(build)", "TypeError: build() returned NoneType, not bench.api.Defended"),
])
def test_a_defense_whose_model_fails_fails_its_run_named(faulty, bench, tmp_path, defense, checks, cell, error):
    out = tmp_path / "results"
    res = bench("run", "--preset", "smoke", "--defense", defense, "--attacks", "fgsm", "--out", out, "--quiet",
                *([checks] if checks else []))
    assert res.code == 1 and "Traceback" not in res.err
    cls = {"faulty_model": "FailingModel", "faulty_none": "ReturnsNothing"}[defense]
    assert f"bench: defense '{defense}' (bench_faulty:{cls} from {PROVIDER}) failed: {error}" in res.err.splitlines()
    store = _store(out)
    assert [(f["cell"], f["error"]) for f in store.failures()] == [(cell, error)]
    store.close()
