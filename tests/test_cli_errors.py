"""A user's mistake: one clear line on stderr, exit code 2, no traceback, stored results unchanged."""

from __future__ import annotations

import torch
import pytest

from bench import data, models
from conftest import bench_subprocess, file_digest


@pytest.fixture(scope="module")
def populated(tmp_path_factory, smoke_cache):
    """A results directory with one finished run whose database every bad command must leave alone."""
    import shutil

    from bench.cli import main

    out = tmp_path_factory.mktemp("populated")
    shutil.copytree(smoke_cache / "cache", out / "cache")
    main(["run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--out", str(out), "--quiet"])
    return out


def _corrupt_data_dir(tmp_path):
    folder = tmp_path / "bad" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (folder / name).write_bytes(b"\x80\x04garbage")
    return folder.parent


def _foreign_checkpoint(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(models.build_model("small_cnn", data.DATASETS["digits"]).state_dict(), path)
    return path


def _garbage_checkpoint(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    return path


def _under_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return blocker / "results"


CASES = {
    "unknown defense": (lambda t: ["--defense", "pgd_att"], "unknown defense 'pgd_att' (did you mean 'pgd_at'?)"),
    "unknown attack": (lambda t: ["--defense", "pgd_at", "--attacks", "pgd10,fgsn"],
                       "unknown attack 'fgsn' (did you mean 'fgsm'?)"),
    "unknown dataset": (lambda t: ["--defense", "pgd_at", "--dataset", "cifar1O"],
                        "unknown dataset 'cifar1O' (did you mean 'cifar10'?)"),
    "unknown preset": (lambda t: ["--defense", "pgd_at", "--preset", "smok"],
                       "unknown preset 'smok' (did you mean 'smoke'?)"),
    "unknown param": (lambda t: ["--defense", "pgd_at", "--param", "epochs=3"], "has no parameter 'epochs'"),
    "malformed param": (lambda t: ["--defense", "pgd_at", "--param", "epochs"], "malformed --param 'epochs'"),
    "eps zero": (lambda t: ["--defense", "pgd_at", "--set", "eps=0"], "preset field 'eps' must be > 0"),
    "attack eps negative": (lambda t: ["--defense", "pgd_at", "--attacks", "pgd10", "--attack-param",
                                       "pgd10.eps=-0.1"], "parameter 'eps' must be > 0"),
    "missing data dir": (lambda t: ["--defense", "pgd_at", "--dataset", "cifar10", "--data-dir", t / "nowhere"],
                         "does not exist"),
    "corrupt data dir": (lambda t: ["--defense", "pgd_at", "--dataset", "cifar10", "--data-dir",
                                    _corrupt_data_dir(t)], "is corrupt or not in the CIFAR pickle layout"),
    "corrupt checkpoint": (lambda t: ["--defense", "pgd_at", "--base-checkpoint", _garbage_checkpoint(t)],
                           "is corrupt or not a PyTorch file"),
    "mismatched checkpoint": (lambda t: ["--defense", "pgd_at", "--base-checkpoint", _foreign_checkpoint(t)],
                              "does not fit tiny_cnn"),
    "missing checkpoint": (lambda t: ["--defense", "pgd_at", "--base-checkpoint", t / "none.pt"], "does not exist"),
    "bad seed": (lambda t: ["--defense", "pgd_at", "--seed", "x"], "seed must be an integer"),
    "bad device": (lambda t: ["--defense", "pgd_at", "--device", "tpu"], "device must be cpu, cuda, cuda:N or auto"),
    "missing config": (lambda t: ["--defense", "pgd_at", "--config", t / "none.toml"], "config file not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_results_intact(case, bench, populated, tmp_path):
    make_args, message = CASES[case]
    db = populated / "results.sqlite"
    before = file_digest(db)
    args = ["run", "--preset", "smoke", "--out", populated, "--quiet", *make_args(tmp_path)]
    res = bench(*args)
    assert res.code == 2, res.err
    assert message in res.err
    assert res.err.count("\n") == 1 and res.err.startswith("bench: error: ")
    assert "Traceback" not in res.err
    assert file_digest(db) == before


def test_unwritable_output_directory(bench, tmp_path):
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--out", _under_a_file(tmp_path), "--quiet")
    assert res.code == 2 and "is not writable" in res.err and res.err.count("\n") == 1


def test_console_script_prints_no_traceback(tmp_path):
    res = bench_subprocess("run", "--preset", "smoke", "--defense", "nope", "--out", tmp_path / "r")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "Traceback" not in res.stderr and "unknown defense 'nope'" in res.stderr
    assert not (tmp_path / "r" / "results.sqlite").exists()


def test_unknown_option_is_one_line_too(bench):
    res = bench("run", "--defens", "pgd_at")
    assert res.code == 2 and res.err.count("\n") == 1 and "--defens" in res.err


def test_leaderboard_without_results(bench, tmp_path):
    res = bench("leaderboard", "--out", tmp_path / "empty", "--dest", tmp_path / "lb")
    assert res.code == 2 and "no results in" in res.err
