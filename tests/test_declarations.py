"""The core knows no attack by name: checks 7 and 8, `bench check` and the RobustBench export read what
attacks declare, so a third-party attack takes part exactly as the built-ins do."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from bench import checks, leaderboard
from bench.api import Attack
from bench.errors import BenchError
from conftest import PLUGINS, bench_subprocess, make_distribution

THREAT = "Linf eps=8/255"


@pytest.fixture
def declaring(tmp_path, monkeypatch):
    """bench-declaring-plugin installed in this process: toy_grad (white-box, stronger than pgd10),
    toy_query (black-box, run by `bench check`), toy_standard (reported as AutoAttack)."""
    site = make_distribution(PLUGINS / "declaring_plugin", tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    return site


def _cell(label, flags, name=None, threat=THREAT):
    flags = np.asarray(flags, dtype=bool)
    return {"attack": label, "name": name or label, "threat": threat, "n": flags.size,
            "correct": int(flags.sum()), "flags": flags, "extra": {}}


def test_a_third_party_black_box_attack_that_beats_the_white_box_ones_is_flagged(declaring):
    flags, better = np.arange(1000) < 400, np.arange(1000) < 396  # 0.4 pt below pgd10
    result = checks.blackbox_whitebox({"pgd10": _cell("pgd10", flags), "toy_query": _cell("toy_query", better)})
    assert result.status == "fail" and result.flag == "⚠ black-box beats white-box"
    assert "toy_query 39.60% vs best white-box pgd10 40.00%" in result.detail
    # beside Square, each black-box attack is compared with the best white-box one
    both = checks.blackbox_whitebox({"pgd10": _cell("pgd10", flags), "square": _cell("square", flags),
                                     "toy_query": _cell("toy_query", better)})
    assert both.status == "fail" and "square 40.00% vs best white-box pgd10" in both.detail
    # another threat model: nothing to compare with
    other = checks.blackbox_whitebox({"pgd10": _cell("pgd10", flags),
                                      "toy_query": _cell("toy_query", better, threat="Linf eps=4/255")})
    assert other.status == "skip"


def test_a_third_party_white_box_attack_can_be_the_best_white_box_one(declaring):
    flags, lower = np.arange(1000) < 400, np.arange(1000) < 390
    result = checks.blackbox_whitebox({"pgd10": _cell("pgd10", flags), "toy_grad": _cell("toy_grad", lower),
                                       "square": _cell("square", np.arange(1000) < 396)})
    assert result.status == "pass" and "square 39.60% vs best white-box toy_grad 39.00%" in result.detail
    # run with a parameter of the user's, its cell is not the attack as declared: it takes part in neither side
    tuned = checks.blackbox_whitebox({"pgd10": _cell("pgd10", flags),
                                      "toy_grad[queries=3]": _cell("toy_grad[queries=3]", lower, name="toy_grad"),
                                      "square": _cell("square", np.arange(1000) < 396)})
    assert tuned.status == "fail" and "best white-box pgd10" in tuned.detail


def test_a_third_party_attack_declared_stronger_enters_budget_monotonicity(declaring):
    rng = np.random.default_rng(0)
    base = rng.random(500) < 0.5
    same = checks.budget_monotonicity({"pgd10": _cell("pgd10", base), "toy_grad": _cell("toy_grad", base)})
    assert same.status == "pass" and same.detail == f"toy_grad {base.mean():.1%} vs pgd10 {base.mean():.1%} (p=1)"
    weaker = checks.budget_monotonicity({"pgd10": _cell("pgd10", base),
                                         "toy_grad": _cell("toy_grad", base | (rng.random(500) < 0.3))})
    assert weaker.status == "fail" and "toy_grad leaves more accuracy than pgd10" in weaker.detail
    # beside the built-in chain, the strongest attack's pair comes first
    chain = checks.budget_monotonicity({n: _cell(n, base) for n in ("fgsm", "pgd10", "pgd50", "toy_grad")})
    assert chain.status == "pass"
    assert [note.split()[0] for note in chain.detail.split("; ")] == ["pgd50", "toy_grad", "pgd10"]
    alone = checks.budget_monotonicity({"toy_grad": _cell("toy_grad", base)})
    assert alone.status == "skip" and "needs pgd10 beside toy_grad" in alone.detail


def test_an_attack_reported_as_autoattack_fills_the_robustbench_export(declaring):
    flags = np.arange(100) < 40
    run = {"run_id": "0123456789abcdef", "dataset": "digits", "arch": "tiny_cnn", "preset": "smoke", "seed": 0,
           "command": "bench run", "code_version": "test"}
    cells = {(lab, "adaptive"): {**_cell(lab, flags), "protocol": "adaptive", "norm": "Linf", "eps": 8 / 255}
             for lab in ("pgd10", "toy_standard")}
    cfg = leaderboard.Config("toy", {}, [leaderboard.Run(run, np.ones(100, bool), cells, [])])
    numbers = leaderboard.numbers(cfg, [THREAT], ["pgd10", "toy_standard"])
    assert numbers["autoattack_acc"] == 40.0
    assert leaderboard.numbers(cfg, [THREAT], ["pgd10"])["autoattack_acc"] is None


def test_bench_check_runs_third_party_attacks_that_ask_for_it(tmp_path, out_dir):
    site = make_distribution(PLUGINS / "declaring_plugin", tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    res = bench_subprocess("check", "--preset", "smoke", "--defense", "standard", "--out", out_dir, "--n", "32",
                           "--quiet", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    # toy_query leaves every sample as it was: compared with the best white-box attack, it does not beat it
    text = " ".join(res.stdout.split())  # the detail column wraps
    assert re.search(r"toy_query \d+\.\d\d% vs best white-box", text), res.stdout


def test_the_default_attacks_are_those_that_declare_in_default(monkeypatch, tmp_path):
    from bench import runner

    builtin = runner.attack_items("default")
    assert builtin == ["fgsm", "pgd10"]  # the built-ins declaring it, cheap first
    assert runner.attack_items("default,pgd10[eps=4/255]") == builtin + ["pgd10[eps=4/255]"]
    site = make_distribution(PLUGINS / "declaring_plugin", tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    assert runner.attack_items("default") == builtin + ["toy_grad"]  # a third-party attack joins by declaring
    assert "toy_grad" not in runner.attack_items("all")  # in_all = False: the two declarations are independent


def test_a_misspelt_declaration_is_refused_when_the_attack_is_defined():
    with pytest.raises(BenchError, match="access must be 'white-box', 'black-box' or ''"):
        type("Typo", (Attack,), {"access": "whitebox", "eps": 0.1})
    with pytest.raises(BenchError, match="stronger_than must be attack names"):
        type("Typo", (Attack,), {"stronger_than": ("pgd10", 3), "eps": 0.1})
    with pytest.raises(BenchError, match="in_default must be True or False"):
        type("Typo", (Attack,), {"in_default": "yes", "eps": 0.1})

