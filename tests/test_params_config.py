"""Plugin parameters and presets: conversion, ranges, did-you-mean, preset scaling, stable hashing."""

from __future__ import annotations

import dataclasses

import pytest

from bench import config
from bench.errors import BenchError
from bench.params import Param, exact_text, resolve_params

SPECS = {
    "eps": Param(8 / 255, "budget", above=0, high=1, preset="eps"),
    "steps": Param(10, "steps", low=1),
    "grid": Param((0.0, 0.5, 1.0), "grid", kind=tuple),
    "extra": Param((), "extras", kind=tuple, item=str, choices=("logits", "conv1")),
    "mode": Param("all", "mode", choices=("all", "selected", "frozen")),
    "flag": Param(False, "flag"),
}


def test_strings_convert_to_declared_types():
    got = resolve_params("x", SPECS, {"eps": "8/255", "steps": "3", "grid": "0,0.25", "extra": "logits,conv1",
                                      "mode": "frozen", "flag": "yes"})
    assert got == {"eps": pytest.approx(8 / 255), "steps": 3, "grid": (0.0, 0.25), "extra": ("logits", "conv1"),
                   "mode": "frozen", "flag": True}


def test_defaults_and_preset_scaling():
    preset = config.concrete(config.get_preset("smoke"), __import__("bench.data").data.DATASETS["digits"])
    got = resolve_params("x", SPECS, {}, preset)
    assert got["eps"] == pytest.approx(0.1)  # the smoke preset's budget, not the paper default
    assert got["steps"] == 10 and got["mode"] == "all"
    assert resolve_params("x", SPECS, {})["eps"] == pytest.approx(8 / 255)


@pytest.mark.parametrize("given, message", [
    ({"eps": "0"}, "must be > 0"),
    ({"eps": "-0.1"}, "must be > 0"),
    ({"eps": "2"}, "must be <= 1"),
    ({"steps": "0"}, "must be >= 1"),
    ({"steps": "2.5"}, "expects int"),
    ({"eps": "abc"}, "expects float"),
    ({"eps": "nan"}, "must be finite"),
    ({"mode": "selcted"}, "did you mean 'selected'"),
    ({"extra": "logits,conv2"}, "must be one of"),
    ({"flag": "maybe"}, "expects bool"),
    ({"stpes": "3"}, "did you mean 'steps'"),
])
def test_bad_values_are_user_errors(given, message):
    with pytest.raises(BenchError, match=message):
        resolve_params("thing", SPECS, given)


def test_preset_overrides_are_typed_and_checked():
    p = config.get_preset("quick")
    assert config.override_preset(p, {"n_test": "100", "eps": "16/255"}).n_test == 100
    with pytest.raises(BenchError, match="did you mean 'n_test'"):
        config.override_preset(p, {"n_tset": "3"})
    with pytest.raises(BenchError, match="preset field 'eps' must be > 0"):
        config.override_preset(p, {"eps": "0"})
    with pytest.raises(BenchError, match="unknown preset 'quik' \\(did you mean 'quick'"):
        config.get_preset("quik")


def test_run_id_is_stable_and_ignores_where_results_go():
    preset = config.get_preset("smoke")
    a = config.RunConfig("pgd_at", (), (), preset, "digits", "tiny_cnn", out="/a", device="cpu")
    b = dataclasses.replace(a, out="/b", device="cuda", attacks=(config.AttackSpec("fgsm"),))
    c = dataclasses.replace(a, seed=1)
    d = dataclasses.replace(a, preset=dataclasses.replace(preset, epochs_pgd_at=3))
    assert a.run_id == b.run_id
    assert len({a.run_id, c.run_id, d.run_id}) == 3


def test_cell_keys_and_threats_are_exact():
    from bench.params import convert
    from bench.registry import load
    from bench.runner import Request, prepare

    def labels(attacks):
        prep = prepare(Request(defense="standard", attacks=attacks, preset="smoke", device="cpu", out="unused"))
        return [(spec.label, attack.threat) for spec, attack in prep.attacks]

    (a, a_threat), (b, b_threat) = labels("pgd10[eps=0.05],pgd10[eps=0.050004]")
    assert a == "pgd10[eps=0.05]" and b == "pgd10[eps=0.050004]"  # 4 significant digits would merge them
    assert a_threat == "Linf eps=0.05" and b_threat == "Linf eps=0.050004"  # two worst cases, not one
    assert labels("pgd10") == [("pgd10", "Linf eps=0.1")]  # the default budget: the name alone
    # readable where exact: a budget on the 8-bit grid reads k/255, and every text reads back to its value
    for eps, text in ((8 / 255, "8/255"), (16 / 255, "16/255"), (0.2, "0.2"), (0.1, "0.1"), (1 / 7, repr(1 / 7))):
        assert exact_text(eps) == text
        assert convert("eps", Param(0.1, "eps"), text) == eps
        assert load("attack", "pgd10")(eps=eps).threat == f"Linf eps={text}"
    assert config.AttackSpec("pgd10", (("eps", 4 / 255), ("steps", 20))).label == "pgd10[eps=4/255,steps=20]"


def test_empty_string_and_infinite_int_are_user_errors():
    from bench.params import convert

    with pytest.raises(BenchError, match="parameter 'tag' expects a non-empty str"):
        convert("tag", Param("x", "tag"), " ")  # `--param tag=`
    with pytest.raises(BenchError, match="parameter 'steps' expects int"):
        convert("steps", Param(10, "steps"), float("inf"))  # TOML `steps = inf`
    assert convert("extra", SPECS["extra"], "") == ()  # an empty tuple is a value


def test_a_plugin_scales_its_own_parameter_per_preset_without_the_core():
    """A toy defense declares its own value per preset: smoke and quick resolve different values, a preset it
    does not name takes the default, a value given wins, and bench/config.py knows nothing of it."""
    from bench.api import Defense

    class Scaled(Defense):
        PARAMS = {"samples": Param(1000, "images scored", low=1, per_preset={"smoke": 64, "quick": "200"}),
                  # per_preset is the plugin's word, above the shared preset field it otherwise follows
                  "epochs": Param(10, "epochs", low=1, preset="ft_epochs", per_preset={"quick": 7})}

    smoke, quick, mini = (config.get_preset(n) for n in ("smoke", "quick", "mini"))

    def resolved(preset, **given):
        return Scaled(**resolve_params("defense 'scaled'", Scaled.PARAMS, given, preset)).params

    assert resolved(smoke).samples == 64 and resolved(quick).samples == 200  # declared text is converted
    assert resolved(mini).samples == 1000  # not named: the default
    assert resolved(smoke, samples="16").samples == resolved(quick, samples=16).samples == 16
    assert resolved(quick).epochs == 7 and resolved(smoke).epochs == smoke.ft_epochs == 2
    assert "samples" not in {f.name for f in dataclasses.fields(config.Preset)}
    assert "scaled per preset: smoke 64, quick '200'" in Scaled.PARAMS["samples"].describe()
    with pytest.raises(TypeError):  # a declaration cannot be changed after the class is made
        Scaled.PARAMS["samples"].per_preset["mini"] = 5


def test_a_bad_per_preset_value_names_the_plugin_whichever_preset_runs():
    specs = {"n": Param(10, "n", low=1, per_preset={"smoke": 2, "paper": 0})}
    with pytest.raises(BenchError, match="defense 'toy' declares an invalid value for preset 'paper': "
                                         "parameter 'n' must be >= 1, got 0"):
        resolve_params("defense 'toy'", specs, {}, config.get_preset("smoke"))


def test_rift_scales_its_mrc_budget_itself_and_set_of_it_says_use_param(bench, tmp_path):
    from bench.runner import Request, prepare

    def params(preset, **given):
        prep = prepare(Request(defense="rift", attacks="fgsm", preset=preset, params=given, device="cpu",
                               out=str(tmp_path / "r")))
        return dict(prep.config.params)

    assert [(params(p)["mrc_samples"], params(p)["mrc_passes"]) for p in ("smoke", "quick")] == [(64, 3), (200, 10)]
    assert params("smoke", mrc_samples="16")["mrc_samples"] == 16
    assert [f for f in ("mrc_samples", "mrc_passes") if hasattr(config.get_preset("smoke"), f)] == []

    res = bench("run", "--preset", "smoke", "--defense", "rift", "--set", "mrc_samples=16", "--out", tmp_path / "r")
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert "'mrc_samples' is not a preset field but a parameter of defense 'rift': use --param mrc_samples=16" \
        in res.err
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "pgd10", "--set", "steps=20",
                "--out", tmp_path / "r")
    assert res.code == 2 and "parameter of attack 'pgd10': use --attack-param pgd10.steps=20" in res.err, res.err
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--set", "mrc_samples=16", "--out", tmp_path / "r")
    assert res.code == 2 and "preset has no field 'mrc_samples'" in res.err, res.err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_a_parameter_added_later_keeps_stored_run_ids_at_its_default(tmp_path, monkeypatch):
    from bench import registry
    from bench.runner import Request, prepare

    rift = registry.load("defense", "rift")

    def run_id(**given):
        return prepare(Request(defense="rift", attacks="fgsm", preset="smoke", params=given, device="cpu",
                               out=str(tmp_path / "r"))).config.run_id

    with_default, given_default, other = run_id(), run_id(mrc_ascent="sgd"), run_id(mrc_ascent="normalized")
    before = {k: v for k, v in rift.PARAMS.items() if k != "mrc_ascent"}
    monkeypatch.setattr(rift, "PARAMS", before)  # the plugin as it was before the parameter existed
    assert with_default == given_default == run_id()
    assert other != with_default  # set to another value, the parameter is part of the identity
    monkeypatch.setattr(rift, "PARAMS", {**before, "mrc_ascent": dataclasses.replace(
        registry.load("defense", "rift_bn").PARAMS["mrc_ascent"], added=False)})
    assert run_id() != with_default  # without `added`, a new parameter would have orphaned every stored run
