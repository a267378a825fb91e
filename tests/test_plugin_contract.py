"""The plugin contract as the README states it: every documented way of writing a plugin works, and every
way of getting it wrong is one clear error (BenchError, exit 2), never an AttributeError traceback."""

from __future__ import annotations

import math

import pytest

from bench.api import Attack, Defended, Defense, Param
from bench.params import resolve_params
from bench.errors import BenchError
from conftest import PLUGINS, make_distribution


def build(cls, **given):
    """What the runner does: complete the given parameters from the class's declarations, construct."""
    return cls(**resolve_params(cls.__name__, cls.PARAMS, given))


class _Step(Attack):
    def perturb(self, model, x, y):
        return x.clone()


# ------------------------------------------------------------------------------------ attack: eps, norm


class ClassAttributes(_Step):
    norm = "L2"
    eps = 0.5


class AssignsAfterSuper(_Step):
    norm = "L2"

    def __init__(self, eps=8 / 255, **kw):
        super().__init__(**kw)
        self.eps = eps


class AssignsBeforeSuper(_Step):
    def __init__(self, eps=0.25, steps=3):
        self.eps = eps
        self.steps = steps
        super().__init__()


class NoSuperCall(_Step):
    def __init__(self, eps=0.2, norm="L2"):
        self.eps = eps
        self.norm = norm


class ClassAttributeAndInit(_Step):
    eps = 0.3

    def __init__(self, steps=3):  # takes no eps: the parameter is not passed to it
        super().__init__()
        self.steps = steps


class Declared(_Step):
    PARAMS = {"eps": Param(0.1, "budget", above=0), "steps": Param(5, "steps", low=1)}


@pytest.mark.parametrize("cls, norm, eps", [
    (ClassAttributes, "L2", 0.5), (AssignsAfterSuper, "L2", 8 / 255), (AssignsBeforeSuper, "Linf", 0.25),
    (NoSuperCall, "L2", 0.2), (ClassAttributeAndInit, "Linf", 0.3), (Declared, "Linf", 0.1)])
def test_every_documented_form_of_eps_and_norm_works(cls, norm, eps):
    attack = build(cls)
    assert (attack.norm, attack.eps) == (norm, pytest.approx(eps))
    assert attack.params["eps"] == pytest.approx(eps)  # what the runner stores with the cell
    assert attack.threat.startswith(f"{norm} eps=")
    # and the budget is a parameter like any other: --attack-param NAME.eps=... / NAME[eps=...]
    changed = build(cls, eps="1/255")
    assert changed.eps == pytest.approx(1 / 255) and changed.params["eps"] == pytest.approx(1 / 255)


def test_keyword_arguments_of_init_are_parameters():
    attack = build(AssignsBeforeSuper, steps="7")
    assert attack.steps == 7 and attack.params["steps"] == 7
    with pytest.raises(BenchError, match="has no parameter 'stepz'.*did you mean 'steps'"):
        build(AssignsBeforeSuper, stepz=7)


class DerivedEps(_Step):
    PARAMS = {"radius": Param(4.0, "budget in 1/255 steps")}

    @property
    def eps(self):
        return self.params.radius / 255


def test_an_eps_property_of_the_plugins_own_is_checked_too():
    assert build(DerivedEps).eps == pytest.approx(4 / 255)
    with pytest.raises(BenchError, match="eps must be a finite number > 0, got -0.0"):
        build(DerivedEps, radius=-1)


def test_eps_assigned_later_updates_the_stored_parameters():
    attack = build(Declared)
    attack.eps = 0.3
    assert attack.params["eps"] == 0.3 and attack.params.eps == 0.3


class NoEps(_Step):
    pass


class NegativeEps(_Step):
    eps = -0.1


class NanEps(_Step):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.eps = math.nan


class TextEps(_Step):
    def __init__(self):
        super().__init__()
        self.eps = "8/255"


class UnknownNorm(_Step):
    norm = "L0"
    eps = 0.1


@pytest.mark.parametrize("cls, message", [
    (NoEps, "declares no eps"), (NegativeEps, "eps must be a finite number > 0, got -0.1"),
    (NanEps, "eps must be a finite number > 0, got nan"), (TextEps, "eps must be a finite number > 0"),
    (UnknownNorm, "norm must be Linf, L2, L1, got 'L0'")])
def test_a_bad_budget_is_one_clear_error(cls, message):
    with pytest.raises(BenchError, match=message):
        build(cls)


def test_a_negative_eps_given_on_the_command_line_is_refused():
    with pytest.raises(BenchError, match="eps must be a finite number > 0"):
        build(ClassAttributes, eps="-1")


class OddStepsOnly(_Step):
    """Refuses a parameter combination in validate_params, as the README says."""

    eps = 0.1
    PARAMS = {"steps": Param(3, "steps", low=1)}

    def validate_params(self):
        if self.params["steps"] % 2 == 0:
            raise BenchError("OddStepsOnly: steps must be odd")


class OddStepsOnlyOldName(_Step):
    """The same, written against the hook's former name `check()`."""

    eps = 0.1
    PARAMS = {"steps": Param(3, "steps", low=1)}

    def check(self):
        if self.params["steps"] % 2 == 0:
            raise BenchError("OddStepsOnly: steps must be odd")


@pytest.mark.parametrize("cls", [OddStepsOnly, OddStepsOnlyOldName])
def test_validate_params_refuses_a_combination_before_any_work(cls):
    assert build(cls, steps=3).params["steps"] == 3
    with pytest.raises(BenchError, match="steps must be odd"):
        build(cls, steps=4)


class Crashes(_Step):
    eps = 0.1

    def __init__(self, **kw):
        super().__init__(**kw)
        raise ValueError("no GPU")


def test_a_plugin_whose_init_raises_is_named_in_a_bench_error():
    with pytest.raises(BenchError, match="Crashes could not be created: ValueError: no GPU"):
        build(Crashes)


# ------------------------------------------------------------------------------------ defenses


class Bare(Defense):
    def build(self, ctx):
        return Defended(model=ctx.base("standard"))


class WithKeywords(Defense):
    def __init__(self, temperature=1.0, layers=("conv1",)):
        super().__init__()
        self.temperature = temperature
        self.layers = layers

    def build(self, ctx):
        return Defended(model=ctx.base("standard"))


class WithoutSuper(Defense):
    def __init__(self, temperature=2.0):
        self.temperature = temperature

    def build(self, ctx):
        return Defended(model=ctx.base("standard"))


def test_defense_without_params_table_or_super_call_works():
    assert build(Bare).params == {}
    d = build(WithKeywords, temperature="0.5", layers="conv1,fc")
    assert (d.temperature, d.layers) == (0.5, ("conv1", "fc"))
    assert d.params == {"temperature": 0.5, "layers": ("conv1", "fc")}  # the run is keyed by these
    d = build(WithoutSuper)
    assert d.temperature == 2.0 and d.params == {"temperature": 2.0} and "WithoutSuper" in repr(d)


# ------------------------------------------------------------------------------------ a third-party package


@pytest.fixture
def minimal_plugin(tmp_path, monkeypatch):
    """tests/plugins/minimal_plugin (written from the README alone) installed as a distribution."""
    monkeypatch.syspath_prepend(str(make_distribution(PLUGINS / "minimal_plugin", tmp_path / "site")))


def test_minimal_plugin_runs_end_to_end(bench, out_dir, minimal_plugin):
    from bench.store import Store

    listed = bench("list", "--verbose")
    assert listed.code == 0, listed.err
    for text in ("minimal_defense", "temperature: keyword argument (default 2)", "minimal_attack",
                 "overshoot: keyword argument (default 1)", "minimal_sign", "eps: budget (default 0.05)"):
        assert text in listed.out

    res = bench("run", "--preset", "smoke", "--defense", "minimal_defense", "--attacks",
                "minimal_attack,minimal_sign,pgd10", "--out", out_dir, "--quiet")
    assert res.code == 0, res.err
    store = Store(out_dir, create=False)
    (run,) = store.runs()
    # the defense's info, and under the key "bench" what the harness records beside it
    assert run["params"] == {"temperature": 2.0}
    harness = run["info"]["bench"]
    assert run["info"] == {"temperature": 2.0, "bench": harness}
    assert harness["forward_passes"] == 1 and harness["meta"] == {}
    # the weights digest of the cached base the defense was built on (merge tells shards apart by it)
    (base,) = harness["cached_files"]
    assert "-pgd_at-" in base and len(harness["cached_files"][base]) == 64
    cells = {c["attack"]: c for c in store.cells(run["run_id"])}
    assert (cells["minimal_attack"]["norm"], cells["minimal_attack"]["eps"]) == ("L2", 0.5)
    assert cells["minimal_attack"]["threat"].startswith("L2 eps=0.5")
    assert cells["minimal_attack"]["params"] == {"eps": 0.5, "overshoot": 1.0}
    assert (cells["minimal_sign"]["norm"], cells["minimal_sign"]["eps"]) == ("Linf", 0.05)
    assert cells["minimal_sign"]["threat"] != cells["pgd10"]["threat"]  # pgd10 runs at the preset's 0.1
    assert cells["minimal_sign"]["extra"]["max_linf"] <= 0.05 + 1e-6
    assert cells["minimal_attack"]["extra"]["max_l2"] <= 0.5 + 1e-6
    checks = {c["name"]: c for c in store.checks(run["run_id"])}
    assert checks["budget"]["status"] == "pass"
    store.close()

    # Its parameters are set like a built-in's; an attack that leaves its own budget fails the check.
    res = bench("run", "--preset", "smoke", "--defense", "minimal_defense", "--param", "temperature=4",
                "--attacks", "minimal_attack[eps=0.25;overshoot=3]", "--out", out_dir, "--quiet")
    assert "check budget: fail" in res.out, res.err
    store = Store(out_dir, create=False)
    run = next(r for r in store.runs() if r["params"] == {"temperature": 4.0})
    (cell,) = [c for c in store.cells(run["run_id"]) if c["attack"] != "clean"]
    assert (cell["attack"], cell["eps"], cell["norm"]) == ("minimal_attack[eps=0.25,overshoot=3]", 0.25, "L2")
    assert cell["extra"]["outside_budget"] > 0
    checks = {c["name"]: c for c in store.checks(run["run_id"])}
    assert checks["budget"]["status"] == "fail" and "minimal_attack" in checks["budget"]["detail"]
    store.close()

    # The leaderboard reports each attack under its own threat model, and the failed check with its row.
    res = bench("leaderboard", "--out", out_dir, "--dest", out_dir.parent / "boards")
    assert res.code == 0, res.err
    (board,) = (out_dir.parent / "boards").glob("*.md")
    text = board.read_text()
    assert "### L2 ε=0.5, adaptive attacks" in text and "### L∞ ε=0.05, adaptive attacks" in text
    assert "### L2 ε=0.25, adaptive attacks" in text
    assert "outside the threat model" in text


BROKEN = '''
from bench.api import Attack, Param


class Base(Attack):
    def perturb(self, model, x, y):
        return x.clone()


class NoEps(Base):
    norm = "L2"


class NegativeEps(Base):
    eps = -0.1


class WrongNorm(Base):
    norm = "l2"
    eps = 0.5


class Crashes(Base):
    eps = 0.1

    def __init__(self):
        raise RuntimeError("needs a GPU")


class TypoPreset(Base):
    eps = 0.1
    PARAMS = {"steps": Param(5, "steps", low=1, per_preset={"smoke": 2, "quik": 3})}


class BadScale(Base):
    eps = 0.1
    PARAMS = {"steps": Param(5, "steps", low=1, per_preset={"paper": 0})}
'''


@pytest.mark.parametrize("attack, message", [
    ("no_eps", "attack 'no_eps' declares no eps"),
    ("negative_eps", "attack 'negative_eps': eps must be a finite number > 0, got -0.1"),
    ("wrong_norm", "attack 'wrong_norm': attack norm must be Linf, L2, L1, got 'l2'"),
    ("crashes", "attack 'crashes' could not be created: RuntimeError: needs a GPU"),
    ("typo_preset", "parameter 'steps' declares a value for unknown preset 'quik' (did you mean 'quick'?)"),
    # a wrong value for another preset than the one running is still the plugin's mistake, named
    ("bad_scale", "attack 'bad_scale' declares an invalid value for preset 'paper': parameter 'steps' must be >= 1"),
    ("minimal_sign[eps=-1]", "attack 'minimal_sign': eps must be a finite number > 0, got -1.0"),
    ("minimal_attack[eps=inf]", "parameter 'eps' must be finite"),
])
def test_a_broken_plugin_is_one_clear_error_before_any_work(bench, tmp_path, minimal_plugin, attack, message):
    src = tmp_path / "src"
    (src / "bench_broken").mkdir(parents=True)
    (src / "bench_broken" / "__init__.py").write_text(BROKEN)
    (src / "pyproject.toml").write_text(
        '[project]\nname = "bench-broken"\nversion = "0.1.0"\n[project.entry-points."bench.attacks"]\n'
        'no_eps = "bench_broken:NoEps"\nnegative_eps = "bench_broken:NegativeEps"\n'
        'wrong_norm = "bench_broken:WrongNorm"\ncrashes = "bench_broken:Crashes"\n'
        'typo_preset = "bench_broken:TypoPreset"\nbad_scale = "bench_broken:BadScale"\n')
    sys_path = str(make_distribution(src, tmp_path / "broken-site"))
    import sys

    sys.path.insert(0, sys_path)
    try:
        res = bench("run", "--preset", "smoke", "--defense", "minimal_defense", "--attacks", attack,
                    "--out", tmp_path / "results", "--quiet")
    finally:
        sys.path.remove(sys_path)
    assert res.code == 2
    assert res.err.strip() == f"bench: error: {message}" or (message in res.err and res.err.count("\n") == 1)
    assert "Traceback" not in res.err
    assert not (tmp_path / "results" / "cache").exists()  # nothing was trained


# ---------------------------------------------------------------------------------------- surrogates


def test_surrogate_declarations_are_checked_when_the_class_is_defined():
    with pytest.raises(BenchError, match="SURROGATES must map names"):
        class Bad(Defense):  # noqa: F841 -- defining it is the test
            SURROGATES = {"Test-Batch": "an upper-case name with a dash"}

    class Good(Defense):
        SURROGATES = {"eval": "the default", "test_batch": "its batch's statistics"}

    assert list(Good.SURROGATES) == ["eval", "test_batch"]


def test_a_build_must_return_the_surrogates_its_class_declares():
    import torch.nn as nn

    from bench.api import Surrogate
    from bench.runner import _check_surrogates

    class Declares(Defense):
        SURROGATES = {"eval": "the default", "test_batch": "its batch's statistics"}

    net = nn.Linear(2, 2)
    _check_surrogates(Declares, Defended(net, surrogate=net, surrogates={"test_batch": Surrogate(net, True)}))
    _check_surrogates(Defense, Defended(net))  # declares none, returns none
    for wrong, message in [(Defended(net, surrogates={"test_batch": Surrogate(net)}), "returned no surrogate"),
                           (Defended(net, surrogate=net), r"surrogates \[\]; the class declares \['test_batch'\]"),
                           (Defended(net, surrogate=net, surrogates={"test_batch": net}), "not bench.api.Surrogate")]:
        with pytest.raises(TypeError, match=message):
            _check_surrogates(Declares, wrong)
    # attacked_under: the verdict is the defense's, the gradients the protocol's model's
    shaped = Defended(net, surrogate=nn.Identity(), surrogates={"test_batch": Surrogate(nn.Tanh(), True)})
    assert shaped.attacked_under("adaptive") is shaped
    assert isinstance(shaped.attacked_under("paper").model, nn.Identity)
    target = shaped.attacked_under("paper:test_batch")
    assert isinstance(target.model, nn.Tanh) and target.batch_dependent
    assert Defended(net).attacked_under("paper").model is net  # no surrogate: the paper protocol is the adaptive one
