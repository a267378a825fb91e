"""Statistics against known values, and every sanity check against a toy built to fail it."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from scipy import stats as sps

from bench import checks, data
from bench.api import Defended
from bench.params import resolve_params
from bench.evaluator import attack_cell
from bench.registry import load
from bench.stats import interval_text, mcnemar, mean_std, wilson, worst_case
from conftest import PLUGINS, bench_subprocess, make_distribution

DEVICE = torch.device("cpu")


@pytest.mark.parametrize("k, n", [(0, 10), (81, 263), (500, 1017), (1017, 1017), (3, 7)])
def test_wilson_matches_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


@given(n=st.integers(1, 10**7), share=st.floats(0, 1))
def test_wilson_bounds_at_0_and_100_are_exact_and_print_as_such(n, share):
    """At k = 0 the formula's lower bound cancels to rounding noise (6.9e-18 at n = 48) and at k = n the upper
    to 0.9999999999999999: both are exact, and every interval prints as the tables print it."""
    from bench.leaderboard import accuracy_text

    k = round(share * n)
    low, high = wilson(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert (low == 0.0) == (k == 0) and (high == 1.0) == (k == n)
    text = interval_text(low, high)
    assert re.fullmatch(r"\[\d{1,3}\.\d, \d{1,3}\.\d\]", text), text  # never 1.7e-18, -0.0 or 100.00000001
    assert text.startswith("[0.0, ") == (k == 0 or 100 * low < 0.05)
    assert text.endswith(", 100.0]") == (k == n or 100 * high >= 99.95)
    if n <= 10**5:  # (the leaderboard's cell text, from per-sample flags)
        flags = np.zeros(n, bool)
        flags[:k] = True
        assert accuracy_text({0: flags})[0] == f"{100 * k / n:.1f} {text}"


@pytest.mark.parametrize("k, n", [(0, 3), (0, 48), (10, 10), (48, 48), (0, 1), (1, 1)])
def test_wilson_at_0_and_100_where_the_formula_leaves_noise(k, n):
    low, high = wilson(k, n)
    assert (low, high)[k == n] == (0.0, 1.0)[k == n]  # was 5.6e-17, 6.9e-18, 0.9999999999999999, ...
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_known_value():
    # Wilson (1927) / Newcombe (1998) example: 81 of 263 -> (0.2553, 0.3662)
    low, high = wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (5, 0), (12, 20), (40, 18), (300, 260)])
def test_mcnemar_exact_matches_the_binomial_test(a_only, b_only):
    both, neither = 50, 30
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, dtype=bool)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, dtype=bool)
    test = mcnemar(a, b)
    expected = 1.0 if a_only + b_only == 0 else sps.binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert test.p_value == pytest.approx(expected, rel=1e-9)
    assert test.delta == pytest.approx((b_only - a_only) / len(a))


def test_mean_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([0.4, 0.6]) == pytest.approx((0.5, np.std([0.4, 0.6], ddof=1)))


def test_delta_over_several_seeds_pools_the_test_and_shows_each_seed():
    from bench.leaderboard import delta_text

    base = {0: np.array([1] * 50 + [0] * 50, bool), 1: np.array([1] * 60 + [0] * 40, bool)}
    mine = {0: np.array([1] * 58 + [0] * 42, bool), 1: np.array([1] * 59 + [0] * 41, bool)}
    pooled = mcnemar(np.concatenate([base[0], base[1]]), np.concatenate([mine[0], mine[1]]))
    text = delta_text(mine, base)
    assert text.startswith(f"{100 * pooled.delta:+.1f} (")
    assert text.endswith("; seeds +8.0, -1.0)")  # one seed's gain and the other's loss, not only their mean
    assert delta_text({0: mine[0]}, base) == "+8.0 (p=0.0078)"  # one common seed: no per-seed list
    assert delta_text(base, base) == "+0.0 (identical)"


# ---------------------------------------------------------------------------------------- model probes


@pytest.fixture
def net(undefended):
    model, ds = undefended
    return model, ds.test.x[:64], ds.test.y[:64]


class Noisy(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x + 0.05 * torch.randn_like(x))


class Rounded(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class BatchStats(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        from bench import layers

        with layers.batch_statistics(self.net):
            return self.net(x)


def test_determinism_flags_undeclared_randomness(net):
    model, x, _ = net
    assert checks.determinism(model, x, declared=False).status == "pass"
    noisy = checks.determinism(Noisy(model), x, declared=False)
    assert noisy.status == "warn" and "treated as randomized" in noisy.detail and noisy.found_randomness
    declared = checks.determinism(Noisy(model), x, declared=True)
    assert declared.status == "pass" and not declared.found_randomness
    identical = checks.determinism(model, x, declared=True)  # a warning that finds no randomness
    assert identical.status == "warn" and not identical.found_randomness
    # a resumed run reads its probes back from the checks table: the finding survives the round trip
    for result in (noisy, declared, identical):
        row = dict(zip(("name", "status", "detail", "flag"), result.row()))
        assert checks.CheckResult.from_row(row) == result


def test_batch_dependence_must_be_declared(net):
    model, x, _ = net
    assert checks.batch_dependence(model, x, declared=False, randomized=False).status == "pass"
    undeclared = checks.batch_dependence(BatchStats(model), x, declared=False, randomized=False)
    assert undeclared.status == "fail" and undeclared.flag == "⚠ batch-dependent: adaptive attack required"
    assert checks.batch_dependence(BatchStats(model), x, declared=True, randomized=False).status == "pass"


def test_rounding_masks_gradients_and_survives_a_huge_budget(net):
    model, x, y = net
    assert checks.gradient_health(model, x, y).status == "pass"
    masked = checks.gradient_health(Rounded(model), x, y)
    assert masked.status == "fail" and masked.flag == "⚠ gradient masking"
    assert checks.large_eps(model, x, y, 0.1).status == "pass"
    assert checks.large_eps(Rounded(model), x, y, 0.1).status == "fail"


# ---------------------------------------------------------------------------------------- cell checks


def _attack(name, **params):
    cls = load("attack", name)
    return cls(**resolve_params(name, cls.PARAMS, params))


def test_state_and_budget_violations_are_caught_and_undone(net):
    model, x, y = net
    split = data.Split(x, y)

    class MovesStatistics(type(_attack("fgsm"))):
        name = "moves_stats"

        def perturb(self, m, xb, yb):
            m.train()
            with torch.no_grad():
                m(xb)  # BN running statistics move, and the modes stay changed
            return xb

    class Outside(type(_attack("fgsm"))):
        name = "outside"

        def perturb(self, m, xb, yb):
            return (xb + 2 * self.eps).clamp(0, 1)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad_state = attack_cell(MovesStatistics(eps=0.1), Defended(model), split, batch_size=32, device=DEVICE)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
    bad_budget = attack_cell(Outside(eps=0.1), Defended(model), split, batch_size=32, device=DEVICE)
    good = attack_cell(_attack("fgsm", eps=0.1), Defended(model), split, batch_size=32, device=DEVICE)

    def cell(name, res):
        return {"attack": name, "extra": res.extra, "threat": "Linf eps=0.1", "n": len(res.flags),
                "correct": int(res.flags.sum()), "flags": res.flags}

    assert checks.state_preserved([cell("fgsm", good)]).status == "pass"
    assert checks.state_preserved([cell("moves_stats", bad_state)]).status == "fail"
    assert checks.budget([cell("fgsm", good)]).status == "pass"
    failed = checks.budget([cell("outside", bad_budget)])
    assert failed.status == "fail" and "outside" in failed.detail


def _cell(name, flags, threat="Linf eps=0.1"):
    flags = np.asarray(flags, dtype=bool)
    return {"attack": name, "threat": threat, "n": flags.size, "correct": int(flags.sum()), "flags": flags,
            "extra": {}}


def test_budget_monotonicity_beyond_noise():
    rng = np.random.default_rng(0)
    base = rng.random(500) < 0.5
    weaker = base | (rng.random(500) < 0.1)  # fgsm leaves a little more
    ok = {"fgsm": _cell("fgsm", weaker), "pgd10": _cell("pgd10", base), "pgd50": _cell("pgd50", base & (rng.random(500) < 0.97))}
    assert checks.budget_monotonicity(ok).status == "pass"
    broken = dict(ok, pgd50=_cell("pgd50", base | (rng.random(500) < 0.3)))  # 50 steps leave far more
    result = checks.budget_monotonicity(broken)
    assert result.status == "fail" and "pgd50 leaves more accuracy than pgd10" in result.detail
    noise = dict(ok, pgd50=_cell("pgd50", base | (np.arange(500) == 7)))  # one sample: inside the noise
    assert checks.budget_monotonicity(noise).status == "pass"


def test_blackbox_must_not_beat_whitebox():
    flags = np.arange(1000) < 400
    assert checks.blackbox_whitebox({"pgd10": _cell("pgd10", flags), "square": _cell("square", flags)}).status == "pass"
    better = np.arange(1000) < 396  # 0.4 pt below the white-box attack
    assert checks.blackbox_whitebox({"pgd10": _cell("pgd10", flags), "square": _cell("square", better)}).status == "fail"
    slight = np.arange(1000) < 399  # 0.1 pt: within the tolerance
    assert checks.blackbox_whitebox({"pgd10": _cell("pgd10", flags), "square": _cell("square", slight)}).status == "pass"


def test_worst_case_consistency():
    clean = np.ones(10, dtype=bool)
    a, b = _cell("pgd10", np.arange(10) < 6), _cell("fgsm", np.arange(10) < 8)
    assert checks.worst_case(clean, [a, b]).status == "pass"
    corrupt = dict(b, correct=3)  # a stored count that disagrees with the stored flags
    assert checks.worst_case(clean, [a, corrupt]).status == "fail"


def test_worst_case_is_clean_and_every_attack_of_the_threat_model():
    clean = np.array([1, 1, 1, 1, 0], bool)
    cells = [dict(_cell("pgd10", [1, 0, 1, 1, 1]), protocol="adaptive"),
             dict(_cell("fgsm", [1, 1, 0, 1, 1]), protocol="adaptive"),
             dict(_cell("pgd10", [0, 1, 1, 1, 1]), protocol="paper"),
             dict(_cell("pgd10[eps=0.2]", [1, 1, 1, 0, 1], threat="Linf eps=0.2"), protocol="adaptive")]
    assert worst_case(clean, cells, "Linf eps=0.1", "adaptive").tolist() == [1, 0, 0, 1, 0]
    assert worst_case(clean, cells, "Linf eps=0.1", "paper").tolist() == [0, 1, 1, 1, 0]
    assert worst_case(clean, cells, "Linf eps=0.1").tolist() == [0, 0, 0, 1, 0]  # both protocols
    assert worst_case(clean, cells, "Linf eps=0.2", "adaptive").tolist() == [1, 1, 1, 0, 0]
    assert worst_case(None, cells, "Linf eps=0.2", "adaptive").tolist() == [1, 1, 1, 0, 1]  # attacks alone
    assert worst_case(clean, cells, "L2 eps=0.5") is None
    assert clean.tolist() == [1, 1, 1, 1, 0]  # the inputs are not changed in place


def test_protocol_gap_marks_the_paper_number_overestimated_naming_each_surrogate():
    adaptive = {"pgd10": _cell("pgd10", np.arange(1000) < 500)}
    paper = {"pgd10": _cell("pgd10", np.arange(1000) < 810)}
    same = {"pgd10": _cell("pgd10", np.arange(1000) < 503)}
    result = checks.protocol_gap(adaptive, {"paper": paper}, has_surrogate=True, default_surrogate="eval")
    assert result.status == "warn" and result.flag == "⚠ paper protocol overestimates (eval +31 pt)"
    # each surrogate on its own: the one within noise is not named, every one beyond it is
    result = checks.protocol_gap(adaptive, {"paper": same, "paper:test_batch": paper,
                                            "paper:init_stats": {"pgd10": _cell("pgd10", np.arange(1000) < 600)}},
                                 has_surrogate=True, default_surrogate="eval")
    assert result.flag == "⚠ paper protocol overestimates (test_batch +31 pt, init_stats +10 pt)"
    assert "pgd10 on eval: paper 50.3% vs adaptive 50.0%" in result.detail
    assert checks.protocol_gap(adaptive, {"paper": same}, has_surrogate=True).status == "pass"
    assert checks.protocol_gap(adaptive, {"paper": paper}, has_surrogate=False).status == "skip"
    assert checks.protocol_gap(adaptive, {"paper:x": {"fgsm": paper["pgd10"]}}, has_surrogate=True).status == "skip"



def test_protocol_gap_warns_when_a_transfer_beats_the_adaptive_attack():
    adaptive = {"pgd10": _cell("pgd10", np.arange(1000) < 200)}
    stronger = {"pgd10": _cell("pgd10", np.arange(1000) < 170)}  # 3 pt below, p < 0.05
    result = checks.protocol_gap(adaptive, {"paper": stronger}, has_surrogate=True, default_surrogate="eval")
    assert result.status == "warn" and result.flag == "⚠ adaptive attack weaker than its transfer from eval (−3 pt)"
    over = {"pgd10": _cell("pgd10", np.arange(1000) < 600)}
    both = checks.protocol_gap(adaptive, {"paper": stronger, "paper:init_stats": over}, has_surrogate=True,
                               default_surrogate="eval")
    assert both.flag == ("⚠ paper protocol overestimates (init_stats +40 pt); adaptive attack weaker than its "
                         "transfer from eval (−3 pt)")


def test_a_defense_worst_case_counts_what_its_surrogate_attacks_fooled():
    """Paper-protocol images are scored on the defense: a sample they fool is not robust, so the adaptive
    (the defense's) worst case spans every protocol, while a paper protocol's worst case stays its own."""
    from bench.leaderboard import Config, Run, main_table

    clean = np.ones(6, bool)
    cells = {("pgd10", "adaptive"): {"protocol": "adaptive", "threat": "Linf eps=0.1",
                                     "flags": np.array([1, 1, 1, 1, 0, 0], bool)},
             ("pgd10", "paper"): {"protocol": "paper", "threat": "Linf eps=0.1",
                                  "flags": np.array([0, 1, 1, 1, 1, 0], bool)}}
    run = {"run_id": "shaped0000", "seed": 0, "batch_dependent": 1, "info": {}, "config": {}}
    missing = [{"attack": "fgsm", "protocol": "paper", "threat": "Linf eps=0.1", "error": None}]
    cfg = Config("norm_shaping", {}, [Run(run, clean, cells, [], missing)])
    assert cfg.flags("worst:Linf eps=0.1")[0].tolist() == [0, 1, 1, 1, 0, 0]
    assert cfg.flags("worst:Linf eps=0.1", "paper")[0].tolist() == [0, 1, 1, 1, 1, 0]
    row = main_table([cfg]).frame.iloc[0]
    worst = next(v for k, v in row.items() if str(k).startswith("Worst"))
    # 3 of 6, and a missing paper cell leaves the defense's worst case incomplete
    assert worst.startswith("50.0 [") and "‡" in worst


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture
def plugin_env(tmp_path):
    site = make_distribution(PLUGINS / "toy_plugin", tmp_path / "site")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_bench_check_catches_gradient_masking(plugin_env, out_dir):
    res = bench_subprocess("check", "--preset", "smoke", "--defense", "toy_masked", "--out", out_dir, "--n", "64",
                           "--quiet", env=plugin_env)
    assert res.returncode == 1, res.stdout + res.stderr
    rows = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln and ln.split()[0] in checks.ORDER}
    assert " fail " in rows["gradient_health"] and " fail " in rows["large_eps"]
    assert " fail " in rows["blackbox_whitebox"]  # Square beats the zero-gradient white-box attacks
    clean = bench_subprocess("check", "--preset", "smoke", "--defense", "standard", "--out", out_dir, "--n", "64",
                             "--quiet")
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_run_flags_undeclared_batch_dependence_in_the_leaderboard(plugin_env, out_dir, tmp_path):
    res = bench_subprocess("run", "--preset", "smoke", "--defense", "toy_batchdep", "--attacks", "pgd10",
                           "--out", out_dir, "--quiet", env=plugin_env)
    assert res.returncode == 0, res.stderr
    assert "check batch_dependence: fail" in res.stdout
    lb = bench_subprocess("leaderboard", "--out", out_dir, "--dest", tmp_path / "lb")
    assert lb.returncode == 0, lb.stderr
    text = (tmp_path / "lb" / "digits-tiny_cnn-smoke.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("|") and "toy_batchdep" in ln)
    assert "[⚠ batch-dependent: adaptive attack required](#checks-toy-batchdep-" in row
    assert '<a id="checks-toy-batchdep-' in text


def test_undeclared_randomness_switches_to_randomized_evaluation(plugin_env, out_dir):
    """toy_random adds input noise without declaring randomized=True: the determinism probe catches it."""
    from bench.store import Store

    def run_toy_random(attacks: str) -> tuple[dict, dict]:
        res = bench_subprocess("run", "--preset", "smoke", "--defense", "toy_random", "--attacks", attacks,
                               "--set", "n_test=32", "--out", out_dir, "--quiet", env=plugin_env)
        assert res.returncode == 0, res.stderr
        (run,) = Store(out_dir, create=False).runs()
        return run, {c["attack"]: c for c in Store(out_dir, create=False).cells()}

    run, cells = run_toy_random("pgd10")
    assert run["randomized"] == 1
    assert cells["clean"]["extra"]["repeats"] == 10 and "acc_std" in cells["pgd10"]["extra"]
    # resumed with one more attack: the stored probes are reused, and say the defense is randomized
    run, cells = run_toy_random("pgd10,fgsm")
    assert run["randomized"] == 1
    assert "acc_std" in cells["fgsm"]["extra"]


def test_seeds_repeat_the_cell_and_report_mean_and_std(bench, out_dir, tmp_path):
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "fgsm", "--seeds", "0,1",
                "--set", "epochs_standard=3", "--out", out_dir, "--quiet")
    assert res.code == 0, res.err
    assert "mean ± std over 2 seeds" in res.out
    from bench.store import Store

    runs = Store(out_dir, create=False).runs()
    assert sorted(r["seed"] for r in runs if r["defense"] == "standard") == [0, 1]
    lb = bench("leaderboard", "--out", out_dir, "--dest", tmp_path / "lb")
    assert lb.code == 0, lb.err
    text = (tmp_path / "lb" / "digits-tiny_cnn-smoke.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| ") and "standard" in ln)
    assert "±" in row and "0,1" in row
