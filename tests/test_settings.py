"""One declaration per run setting (config.SETTINGS) drives every surface that takes it: `bench run` /
`bench check` options, `bench run --config` keys, sweep keys, and a sweep job's equivalent command."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from bench import cli, config, runner, sweep

# A non-default value of every setting, as the command line gives it, as a TOML line, and as it is requested.
SAMPLES = {
    "defense": (["--defense", "standard"], 'defense = "standard"', "standard"),
    "params": (["--param", "k=2"], 'params = { k = "2" }', {"k": "2"}),
    "preset": (["--preset", "smoke"], 'preset = "smoke"', "smoke"),
    "dataset": (["--dataset", "digits"], 'dataset = "digits"', "digits"),
    "data_dir": (["--data-dir", "/d"], 'data_dir = "/d"', "/d"),
    "arch": (["--arch", "tiny_cnn"], 'arch = "tiny_cnn"', "tiny_cnn"),
    "normalize": (["--normalize", "0.5,0.25"], 'normalize = "0.5,0.25"', "0.5,0.25"),
    "device": (["--device", "cpu"], 'device = "cpu"', "cpu"),
    "seed": (["--seed", "3"], "seed = 3", 3),
    "out": (["--out", "/o"], 'out = "/o"', "/o"),
    "precision": (["--precision", "fp32"], 'precision = "fp32"', "fp32"),
    "sets": (["--set", "n_test=5"], 'set = { n_test = "5" }', {"n_test": "5"}),
    "meta": (["--meta", "venue=ICTAI 2022"], 'meta = { venue = "ICTAI 2022" }', {"venue": "ICTAI 2022"}),
    "base_checkpoints": (["--base-checkpoint", "trades=/b.pt"], 'base_checkpoint = { trades = "/b.pt" }',
                         {"trades": "/b.pt"}),
    "quiet": (["--quiet"], None, True),
    "attacks": (["--attacks", "fgsm"], 'attacks = "fgsm"', "fgsm"),
    "attack_params": (["--attack-param", "fgsm.eps=0.1"], 'attack_params = { fgsm = { eps = "0.1" } }',
                      {"fgsm": {"eps": "0.1"}}),
    "protocol": (["--protocol", "paper"], 'protocol = "paper"', "paper"),
    "threat": (["--threat", "Linf:0.1"], 'threat = "Linf:0.1"', "Linf:0.1"),
    "save_adversarial": (["--save-adversarial"], "save_adversarial = true", True),
    "checks": (["--no-checks"], "checks = false", False),
    "compile": (["--compile"], "compile = true", True),
}
CELL = '\n[[cells]]\ndefense = "standard"\n'


class Captured(Exception):
    def __init__(self, request):
        self.request = request


@pytest.fixture
def requested(monkeypatch):
    """The Request a `bench` command line builds, taken where `runner.prepare` would start the work."""

    def capture(req):
        raise Captured(req)

    monkeypatch.setattr(runner, "prepare", capture)

    def call(*args) -> runner.Request:
        with pytest.raises(Captured) as got:
            cli.main([str(a) for a in args])
        return got.value.request

    return call


def _toml(tmp_path, text: str):
    path = tmp_path / "file.toml"
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize("setting", config.SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_taken_by_the_cli_a_config_file_and_a_sweep_as_declared(setting, requested, bench,
                                                                                 tmp_path):
    assert setting.name in SAMPLES, f"give the new setting '{setting.name}' a sample value in SAMPLES"
    args, line, value = SAMPLES[setting.name]
    assert value != setting.default
    for command in setting.commands:
        assert getattr(requested(command, *args), setting.name) == value
    for command in {"run", "check"} - set(setting.commands):
        res = bench(command, *args)
        assert res.code == 2 and "No such option" in res.err
    if setting.kind is None:  # not a TOML setting: a file naming it is refused
        line = f"{setting.name} = true"
        res = bench("run", "--config", _toml(tmp_path, line))
        assert res.code == 2 and f"unknown key '{setting.name}'" in res.err
    else:
        assert getattr(requested("run", "--config", _toml(tmp_path, line)), setting.name) == value
    for where in ("top", "cell"):
        cell = "\n[[cells]]\n" + line if setting.name == "defense" else CELL + line
        text = line + CELL if where == "top" else cell
        if where in setting.sweep:
            (job,) = sweep.jobs(_toml(tmp_path, text))
            assert getattr(job.request, setting.name) == value
        else:
            with pytest.raises(config.BenchError, match=f"unknown key '{setting.toml_key}'"):
                sweep.jobs(_toml(tmp_path, text))


def test_no_surface_takes_an_undeclared_setting(bench, tmp_path):
    """Every option, TOML key, sweep key and Request field is a declared setting (or one of the few
    inputs that are not settings: --config, --seeds, --n, a sweep's axes and grid)."""
    on = lambda command: {s.name for s in config.SETTINGS if command in s.commands and s.flags}  # noqa: E731
    assert {p.name for p in cli.run_cmd.params} == on("run") | {"config_file", "seeds"}
    assert {p.name for p in cli.check_cmd.params} == on("check") | {"config_file", "n"}
    assert set(config.TOML_KEYS) == {s.toml_key for s in config.SETTINGS if s.kind is not None}
    at = lambda where: {s.toml_key for s in config.SETTINGS if where in s.sweep} | set(sweep.AXES)  # noqa: E731
    assert set(sweep.TOP_KEYS) == at("top") | {"cells"}
    assert set(sweep.CELL_KEYS) == at("cell") | {"grid"}
    assert [f.name for f in dataclasses.fields(runner.Request)] == [s.name for s in config.SETTINGS] + ["command"]
    assert runner.Request() == runner.Request(**{s.name: s.default for s in config.SETTINGS})
    # and an unknown one is refused by each
    res = bench("run", "--colour", "red")
    assert res.code == 2 and "No such option '--colour'" in res.err
    res = bench("run", "--config", _toml(tmp_path, 'colour = "red"'))
    assert res.code == 2 and "unknown key 'colour'" in res.err
    for text in ('colour = "red"' + CELL, CELL + 'colour = "red"'):
        res = bench("sweep", _toml(tmp_path, text), "--dry-run")
        assert res.code == 2 and "unknown key 'colour'" in res.err


def test_a_sweep_jobs_command_asks_for_exactly_its_request(requested, tmp_path):
    """The command stored with a sweep's run (and shown in leaderboards) gives back the job's every setting,
    device, precision and checks included (they were left out)."""
    top = [SAMPLES[s.name][1] for s in config.SETTINGS if "top" in s.sweep]
    cell = [SAMPLES[s.name][1] for s in config.SETTINGS if "cell" in s.sweep and "top" not in s.sweep]
    text = "\n".join(top + ["seeds = [4]", 'protocols = ["paper"]', "[[cells]]"] + cell + ['grid = { g = ["1"] }'])
    (job,) = sweep.jobs(_toml(tmp_path, text))
    args = shlex.split(job.request.command)
    assert args[:2] == ["bench", "run"]
    again = requested(*args[1:])
    differ = {s.name for s in config.SETTINGS if s.name != "quiet"
              and getattr(again, s.name) != getattr(job.request, s.name)}
    assert not differ, (job.request.command, differ)
