"""`--threat NORM:EPS` runs every attack under one threat model; `--save-adversarial` keeps what was attacked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import checkpoints, config, data as data_mod, models, runner
from bench.store import Store


@pytest.mark.parametrize("text,norm,eps", [("Linf:8/255", "Linf", 8 / 255), ("l2:0.5", "L2", 0.5), ("L1:12", "L1", 12.0)])
def test_parse_threat(text, norm, eps):
    assert config.parse_threat(text) == (norm, eps)


@pytest.mark.parametrize("text,words", [("Linf:2", "must be <= 1"), ("L3:1", "NORM:EPS"), ("L2", "NORM:EPS"),
                                        ("L2:-1", "must be > 0"), ("L2:x", "expects float")])
def test_bad_threat_is_one_line(bench, text, words):
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--threat", text)
    assert res.code == 2 and words in res.err and "Traceback" not in res.err and len(res.err.strip().splitlines()) == 1


def test_named_attack_of_another_norm_is_refused(bench, tmp_path):
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "deepfool", "--threat", "Linf:0.1",
                "--out", tmp_path)
    assert res.code == 2 and "attack 'deepfool' attacks under L2, not the threat model's Linf" in res.err
    assert not (tmp_path / "results.sqlite").exists()


def test_threat_conflicting_set_is_refused(bench):
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--threat", "Linf:0.05",
                "--set", "eps=0.1")
    assert res.code == 2 and "do not --set it as well" in res.err


def test_keywords_keep_only_attacks_of_the_threat_norm():
    req = runner.Request(defense="pgd_at", preset="smoke", attacks="all", threat="L2:0.3", device="cpu",
                         out="/tmp/never-written")
    prep = runner.prepare(req)
    norms = {attack.norm for _, attack in prep.attacks}
    assert norms == {"L2"}
    assert all(attack.eps == 0.3 for _, attack in prep.attacks)
    assert prep.config.preset.eps_l2 == 0.3
    everything = runner.prepare(runner.Request(defense="pgd_at", preset="smoke", attacks="all", device="cpu",
                                               out="/tmp/never-written"))
    assert len(everything.attacks) > len(prep.attacks)  # the L-inf attacks were left out


def test_threat_sets_the_budget_of_linf_attacks():
    prep = runner.prepare(runner.Request(defense="pgd_at", preset="smoke", attacks="fgsm,pgd10", threat="Linf:0.05",
                                         device="cpu", out="/tmp/never-written"))
    assert prep.config.preset.eps == 0.05
    assert [(spec.label, attack.eps) for spec, attack in prep.attacks] == [("fgsm", 0.05), ("pgd10", 0.05)]


def test_saved_adversarial_examples_are_those_scored(bench, out_dir):
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "deepfool", "--threat", "L2:0.3",
                "--set", "n_test=32", "--out", out_dir, "--quiet", "--save-adversarial")
    assert res.code == 0, res.err
    # a second invocation adds pgd10: its file takes the clean verdicts the first one stored (clean is skipped)
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "deepfool,pgd10", "--threat", "L2:0.3",
                "--set", "n_test=32", "--out", out_dir, "--quiet", "--save-adversarial")
    assert res.code == 0, res.err
    store = Store(out_dir, create=False)
    try:
        (run,) = store.runs()
        cells = {c["attack"]: c for c in store.cells(run["run_id"])}  # as stored: the attack's own verdicts
    finally:
        store.close()
    cell = cells["deepfool"]
    assert cell["eps"] == 0.3 and cell["threat"] == "L2 eps=0.3"  # the label stays "deepfool"
    # the kept images are those the verdict was taken on: within budget, and the model agrees with the flags
    saved = np.load(runner.adversarial_path(out_dir, run["run_id"], "deepfool", "adaptive"), allow_pickle=False)
    x_adv, y, correct, clean = (torch.from_numpy(saved[k]) for k in ("x_adv", "y", "correct", "clean_correct"))
    assert x_adv.shape == (32, 1, 8, 8) and correct.numpy().tolist() == cell["flags"].tolist()
    # the clean verdicts beside them, per sample in the same order, are the clean cell's stored flags
    assert clean.dtype == torch.bool and clean.numpy().tolist() == cells["clean"]["flags"].tolist()
    pgd = next(c for c in cells.values() if c["name"] == "pgd10")
    with np.load(runner.adversarial_path(out_dir, run["run_id"], pgd["attack"], pgd["protocol"]),
                 allow_pickle=False) as later:
        assert later["clean_correct"].tolist() == cells["clean"]["flags"].tolist()
        assert later["correct"].tolist() == pgd["flags"].tolist()
    test = data_mod.load("digits", n_train=600, n_val=100, n_test=32).test
    assert float((x_adv - test.x).flatten(1).norm(dim=1).max()) <= 0.3 + 1e-5
    assert float((x_adv - test.x).abs().max()) > 0  # something was attacked
    model = models.build_model("tiny_cnn", data_mod.DATASETS["digits"])
    base = next((out_dir / "cache" / "base").glob("digits-tiny_cnn-pgd_at-*.pt"))
    checkpoints.load_into(model, checkpoints.load(base, require_digest=True), str(base), arch="tiny_cnn",
                          dataset="digits")
    with torch.no_grad():
        assert (model.eval()(x_adv).argmax(1) == y).tolist() == correct.tolist()
        assert (model(test.x).argmax(1) == y).tolist() == clean.tolist()  # and on the clean images
    assert (clean & ~correct).any()  # some images the attack fooled: the two verdicts are not one array twice
