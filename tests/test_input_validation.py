"""Every setting takes effect or is refused up front: one line, exit 2, nothing created, no training."""

from __future__ import annotations

import dataclasses

import pytest

from bench import config, data
from bench.errors import BenchError


def _refused(res, message: str, out=None) -> None:
    assert res.code == 2, (res.code, res.err[-2000:])
    assert message in res.err, res.err
    assert res.err.strip().count("\n") == 0 and res.err.strip().startswith("bench: error: "), res.err
    assert "Traceback" not in res.err
    if out is not None:
        assert not out.exists()  # refused before the results directory was made


# `bench run --preset smoke --defense standard --out OUT --quiet ARGS`: (ARGS, the error's words)
BAD_RUN = {
    "n_val zero": (["--set", "n_val=0"], "preset field 'n_val' must be >= 1, got 0"),
    "n_val_robust zero": (["--set", "n_val_robust=0"], "preset field 'n_val_robust' must be >= 1"),
    "n_val_robust above n_val": (["--set", "n_val=50"], "n_val_robust (100) must be <= n_val (50)"),
    "n_train leaves one image": (["--set", "n_train=101"], "1 training image(s) left after n_val=100"),
    "set dataset": (["--set", "dataset=cifar10"], "'dataset' is not set with --set or [set]: use --dataset"),
    "set arch": (["--set", "arch=small_cnn"], "use --model or --arch"),
    "set name": (["--set", "name=x"], "'name' is not set with --set or [set]: use --preset"),
    "epochs_pgd_at zero": (["--set", "epochs_pgd_at=0"], "preset field 'epochs_pgd_at' must be >= 1"),
    "epochs_standard zero": (["--set", "epochs_standard=0"], "preset field 'epochs_standard' must be >= 1"),
    "epochs_trades zero": (["--set", "epochs_trades=0"], "preset field 'epochs_trades' must be >= 1"),
    "epochs_fgsm_rs zero": (["--set", "epochs_fgsm_rs=0"], "preset field 'epochs_fgsm_rs' must be >= 1"),
    "ft_epochs zero": (["--set", "ft_epochs=0"], "preset field 'ft_epochs' must be >= 1"),
    "crop_pad beyond the image": (["--set", "crop_pad=100"], "crop_pad must be < 8"),
    "crop_pad negative": (["--set", "crop_pad=-1"], "preset field 'crop_pad' must be >= 0"),
    "batch_size one": (["--set", "batch_size=1"], "preset field 'batch_size' must be >= 2"),
    "momentum above one": (["--set", "momentum=2"], "preset field 'momentum' must be <= 1"),
    "weight_decay negative": (["--set", "weight_decay=-1"], "preset field 'weight_decay' must be >= 0"),
    "lr negative": (["--set", "lr=-0.1"], "preset field 'lr' must be > 0"),
    "alpha above one": (["--set", "alpha=3"], "preset field 'alpha' must be <= 1"),
    "eps_l2 beyond the image cube": (["--set", "eps_l2=100"], "eps_l2 must be <= 8"),
    "eps nan": (["--set", "eps=nan"], "preset field 'eps' must be finite"),
    "schedule": (["--set", "schedule=linear"], "preset field 'schedule' must be one of step, cosine"),
    "required field none": (["--set", "epochs_standard=none"], "preset field 'epochs_standard' cannot be none"),
    "seed beyond 64 bits": (["--seed", str(2**64)], "seed must be an integer in 0..2**63-1"),
    "seed beyond sqlite": (["--seed", str(2**63)], "seed must be an integer in 0..2**63-1"),
    "seeds beyond 64 bits": (["--seeds", f"0,{2**64}"], "each of --seeds must be an integer in 0..2**63-1"),
    "device cuda:x": (["--device", "cuda:x"], "device must be cpu, cuda, cuda:N or auto"),
    "device empty": (["--device", ""], "--device must not be empty"),
    "dataset empty": (["--dataset", ""], "--dataset must not be empty"),
    "arch empty": (["--arch", ""], "--model/--arch must not be empty"),
    "data-dir empty": (["--data-dir", ""], "--data-dir must not be empty"),
    "precision": (["--precision", "fp16"], "precision must be auto, bf16 or fp32"),
    "protocol": (["--protocol", "both"], "protocol must be adaptive, paper or paper:SURROGATE"),
    "attacks empty": (["--attacks", ""], "no attacks given"),
    "attack eps inf": (["--attacks", "pgd10[eps=inf]"], "parameter 'eps' must be finite"),
    "attack eps overflows": (["--attacks", "pgd10[eps=1e999]"], "parameter 'eps' must be finite"),
    "attack param empty": (["--attacks", "pgd10[steps=]"], "parameter 'steps' expects int"),
    "n_test beyond the data": (["--set", "n_test=100000"], "n_test=100000 but the digits test set has 539 images"),
    "n_train beyond the data": (["--set", "n_train=100000"], "n_train=100000 but the digits training set has 1258 images"),
    "config empty": (["--config", ""], "--config must not be empty"),
    "seeds empty": (["--seeds", ""], "--seeds expects comma-separated integers"),
    "base-checkpoint without a file": (["--base-checkpoint", "pgd_at="], "--checkpoint/--base-checkpoint 'pgd_at=' names no file"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN))
def test_bad_setting_is_refused_before_any_work(case, bench, tmp_path):
    args, message = BAD_RUN[case]
    out = tmp_path / "results"
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--out", out, "--quiet", *args)
    _refused(res, message, out)


def test_set_name_suggests_nothing_forbidden(bench, tmp_path):
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--out", tmp_path / "r", "--set", "nme=x")
    _refused(res, "preset has no field 'nme'")
    assert "did you mean 'name'" not in res.err


def test_out_empty_is_refused(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(bench("run", "--preset", "smoke", "--defense", "standard", "--out", "", "--quiet"),
             "--out must not be empty")
    assert list(tmp_path.iterdir()) == []


def test_check_n_zero_is_refused(bench, tmp_path):
    out = tmp_path / "results"
    _refused(bench("check", "--preset", "smoke", "--defense", "standard", "--out", out, "--n", "0", "--quiet"),
             "--n must be >= 1, got 0", out)


def test_ctrl_c_says_how_to_resume(bench, tmp_path, monkeypatch):
    from bench import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "execute", interrupted)
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--out", tmp_path / "r", "--quiet")
    assert res.code == 130
    assert res.err.strip() == "bench: interrupted; finished cells are stored, re-run the command to resume"


# ----------------------------------------------------------------------------------------------------
# TOML files of the wrong shape: `bench run --config FILE` and `bench sweep FILE`

RUN_TOML = {
    "defense number": ('defense = 5', "'defense' must be a non-empty string, got 5"),
    "seed boolean": ('defense = "standard"\nseed = true', "'seed' must be an integer, got True"),
    "seed beyond 64 bits": (f'defense = "standard"\nseed = {2**64}', "seed must be an integer in 0..2**63-1"),
    "checks string": ('defense = "standard"\nchecks = "no"', "'checks' must be true or false, got 'no'"),
    "set number": ('defense = "standard"\nset = 3', "'set' must be a table of values"),
    "set table in table": ('defense = "standard"\nset = { n_test = { a = 1 } }', "'set' must be a table of values"),
    "params number": ('defense = "standard"\nparams = 3', "'params' must be a table of values"),
    "attacks number": ('defense = "standard"\nattacks = 5', "'attacks' must be a string or a list of strings"),
    "attacks numbers": ('defense = "standard"\nattacks = [1, 2]', "'attacks' must be a string or a list of strings"),
    "attack_params flat": ('defense = "standard"\nattack_params = { pgd10 = 3 }', "'attack_params' must be a table"),
    "base_checkpoint number": ('defense = "standard"\nbase_checkpoint = 3', "'base_checkpoint' must be a path"),
    "device number": ('defense = "standard"\ndevice = 0', "'device' must be a non-empty string"),
    "out empty": ('defense = "standard"\nout = ""', "'out' must be a non-empty string"),
    "date as dataset": ('defense = "standard"\ndataset = 1979-05-27', "'dataset' must be a non-empty string"),
    "infinite int field": ('defense = "standard"\nset = { pgd_steps = inf }', "preset field 'pgd_steps' expects int"),
    "set dataset": ('defense = "standard"\nset = { dataset = "cifar10" }', "use --dataset"),
    "unknown key": ('defense = "standard"\nsed = 1', "unknown key 'sed' (did you mean 'seed'?)"),
}
CELL = '\n[[cells]]\ndefense = "standard"\n'
SWEEP_TOML = {
    "cells numbers": ('cells = [1, 2]', "'cells' must be a list of tables"),
    "cells table": ('cells = { defense = "standard" }', "'cells' must be a list of tables"),
    "seeds strings": ('seeds = ["a"]' + CELL, "'seeds' must be an integer or a list of integers"),
    "seeds boolean": ('seeds = [true]' + CELL, "'seeds' must be an integer or a list of integers"),
    "seed beyond 64 bits": (f'seeds = [{2**64}]' + CELL, "each of seeds must be an integer in 0..2**63-1"),
    "seeds empty": ('seeds = []' + CELL, "cell 1: seeds is an empty list"),
    "checks string": ('checks = "no"' + CELL, "'checks' must be true or false"),
    "set number": ('set = 3' + CELL, "'set' must be a table of values"),
    "attacks numbers": ('attacks = [1]' + CELL, "'attacks' must be a string or a list of strings"),
    "out number": ('out = 3' + CELL, "'out' must be a non-empty string"),
    "protocols number": ('protocols = 1' + CELL, "'protocols' must be a string or a list of strings"),
    "cell defense number": ('[[cells]]\ndefense = 5', "cell 1: 'defense' must be a non-empty string"),
    "cell params number": ('[[cells]]\ndefense = "standard"\nparams = 3', "cell 1: 'params' must be a table"),
    "cell grid number": ('[[cells]]\ndefense = "rift"\ngrid = 3', "cell 1: 'grid' must be a table of lists of values"),
    "cell grid empty": ('[[cells]]\ndefense = "rift"\ngrid = { k = [] }', "cell 1: grid.k is an empty list"),
    "cell set dataset": ('[[cells]]\ndefense = "standard"\nset = { dataset = "cifar10" }', "use --dataset"),
}


def _file(tmp_path, case: str, text: str):
    if case == "a directory":
        path = tmp_path / "conf.toml"
        path.mkdir()
        return path
    path = tmp_path / "conf.toml"
    path.write_bytes(text if isinstance(text, bytes) else ('preset = "smoke"\n' + text + "\n").encode())
    return path


FILE_FAULTS = {"a directory": (None, "is a directory"),
               "non-UTF-8 bytes": (b'defense = "caf\xe9"\n', "is not UTF-8 text")}


@pytest.mark.parametrize("case", sorted({**RUN_TOML, **FILE_FAULTS}))
def test_bad_run_config_file(case, bench, tmp_path):
    text, message = {**RUN_TOML, **FILE_FAULTS}[case]
    out = tmp_path / "results"
    _refused(bench("run", "--config", _file(tmp_path, case, text), "--out", out, "--quiet"), message, out)


@pytest.mark.parametrize("case", sorted({**SWEEP_TOML, **FILE_FAULTS}))
def test_bad_sweep_file(case, bench, tmp_path):
    text, message = {**SWEEP_TOML, **FILE_FAULTS}[case]
    out = tmp_path / "results"
    _refused(bench("sweep", _file(tmp_path, case, text), "--out", out, "--dry-run"), message, out)


# ----------------------------------------------------------------------------------------------------
# the declared ranges


def test_every_preset_field_has_a_declared_range_and_the_presets_respect_them():
    names = {f.name for f in dataclasses.fields(config.Preset)}
    assert set(config.LIMITS) | set(config.NOT_SET) == names and not set(config.LIMITS) & set(config.NOT_SET)
    for preset in config.PRESETS.values():
        values = {k: getattr(preset, k) for k in config.LIMITS}
        assert config.override_preset(preset, values) == preset
        config.concrete(preset, data.DATASETS[preset.dataset])


def test_optional_fields_take_none_as_the_dataset_standard():
    preset = config.override_preset(config.get_preset("smoke"), {"crop_pad": "none", "eps": "none"})
    done = config.concrete(preset, data.DATASETS["digits"])
    assert done.eps == data.DATASETS["digits"].eps and done.crop_pad == data.DATASETS["digits"].crop_pad
    with pytest.raises(BenchError, match="cannot be none"):
        config.override_preset(preset, {"n_val": None})


def test_seed_bound():
    assert config.validate_seed(2**63 - 1) == 2**63 - 1
    for bad in (2**63, -1, True, 1.0, "3"):
        with pytest.raises(BenchError, match="0..2\\*\\*63-1"):
            config.validate_seed(bad)


def test_sigint_during_training_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import REPO

    # Ctrl-C's default disposition in the child: a suite started as a background job inherits SIGINT ignored,
    # and Python then never raises KeyboardInterrupt (the run would finish, exit 0)
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", "--preset", "smoke", "--defense", "standard",
                             "--out", str(tmp_path / "r")], stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:
            if "base standard: training" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    assert rest.strip().splitlines()[-1] == \
        "bench: interrupted; finished cells are stored, re-run the command to resume"
    assert "Traceback" not in rest
