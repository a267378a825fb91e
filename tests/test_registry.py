"""Plugin discovery: built-ins and third-party packages through the same entry-point groups."""

from __future__ import annotations

import os

import pytest

from bench import registry
from bench.errors import BenchError
from conftest import PLUGINS, bench_subprocess, make_distribution

BUILTIN_DEFENSES = {"standard", "pgd_at", "trades", "fgsm_rs"}
BUILTIN_ATTACKS = {"pgd10", "fgsm"}


def test_list_shows_every_builtin_with_a_description(bench):
    res = bench("list")
    assert res.code == 0
    lines = {line.split()[0]: line for line in res.out.splitlines() if line.startswith("  ") and line.split()}
    for name in BUILTIN_DEFENSES | BUILTIN_ATTACKS:
        assert name in lines, name
        assert len(lines[name].split(None, 1)[1]) > 10, f"{name} has no description"
    # the attacks run when --attacks is not given are marked, as their classes declare
    assert sorted(n for n, line in lines.items() if line.endswith("[default]")) == ["fgsm", "pgd10"]


def test_list_verbose_shows_parameters_and_defaults(bench):
    res = bench("list", "--verbose")
    assert res.code == 0
    assert "steps: iterations (default 10)" in res.out
    assert "scaled by preset field 'eps'" in res.out
    assert "provided by attacks.pgd:PGD10 (from bnbench)" in res.out


def test_builtins_come_from_entry_points_not_imports():
    found = registry.providers("defense")
    assert BUILTIN_DEFENSES <= set(found)
    assert all(found[n].dist == "bnbench" for n in BUILTIN_DEFENSES)


def test_third_party_plugin_is_listed_and_runs(tmp_path, smoke_cache):
    site = make_distribution(PLUGINS / "toy_plugin", tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listed = bench_subprocess("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "toy_defense" in listed.stdout and "Toy third-party defense" in listed.stdout
    assert "toy_block" in listed.stdout

    out = tmp_path / "results"
    import shutil

    shutil.copytree(smoke_cache / "cache", out / "cache")
    ran = bench_subprocess("run", "--preset", "smoke", "--defense", "toy_defense", "--param", "scale=3",
                           "--attacks", "fgsm,toy_block", "--out", out, "--quiet", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "defense toy_defense" in ran.stdout
    from bench.store import Store

    store = Store(out, create=False)
    (run,) = store.runs()
    assert run["defense"] == "toy_defense" and run["info"]["plugin"] == "bench-toy-plugin"
    assert run["params"] == {"scale": 3.0}
    cells = {c["attack"]: c for c in store.cells(run["run_id"])}
    # toy_block returns x unchanged: its accuracy is the clean accuracy, sample by sample
    assert (cells["toy_block"]["flags"] == cells["clean"]["flags"]).all()
    assert cells["fgsm"]["correct"] < cells["clean"]["correct"]


def test_duplicate_name_is_an_error_naming_both_providers(tmp_path, monkeypatch):
    site = make_distribution(PLUGINS / "clashing_plugin", tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(BenchError) as err:
        registry.providers("defense")
    msg = str(err.value)
    assert "'pgd_at'" in msg
    assert "defenses.baselines:PGDAT (from bnbench)" in msg
    assert "bench_clash:Impostor (from bench-clash)" in msg


def test_duplicate_name_through_the_cli_exits_2(tmp_path):
    site = make_distribution(PLUGINS / "clashing_plugin", tmp_path / "site")
    res = bench_subprocess("list", env={"PYTHONPATH": str(site)})
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "bench-clash" in res.stderr and "Traceback" not in res.stderr


def test_unknown_names_suggest_the_closest():
    with pytest.raises(BenchError, match="did you mean 'pgd_at'"):
        registry.load("defense", "pgd_att")
    with pytest.raises(BenchError, match="did you mean 'pgd10'"):
        registry.load("attack", "pgd1O")
