"""L-inf, L2 and L1 side by side: budgets per norm, a worst case per (norm, eps), and the RobustBench export
(one model_info record per threat model, eps as RobustBench writes it, declared forward passes, --meta)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import config, data, leaderboard
from bench.store import Store

ATTACKS = "pgd10,pgd10[norm=L2],apgd[norm=L1]"


@pytest.fixture
def l1_l2_run(bench, out_dir):
    """The undefended smoke model attacked under three threat models (digits: L-inf 0.1, L2 1, L1 2)."""
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", ATTACKS, "--out", out_dir,
                "--meta", "link=https://example.org/paper", "--meta", "authors=A. One, B. Two",
                "--meta", "reported:L2=70.1", "--quiet")
    assert res.code == 0, res.err
    return out_dir


def test_each_norm_has_its_own_budget_and_worst_case(l1_l2_run, bench):
    (run,) = Store(l1_l2_run).runs()
    cells = {c["attack"]: c for c in Store(l1_l2_run).cells(run["run_id"])}
    assert {k: (c["norm"], c["eps"], c["threat"]) for k, c in cells.items() if k != "clean"} == {
        "pgd10": ("Linf", 0.1, "Linf eps=0.1"), "pgd10[norm=L2]": ("L2", 1.0, "L2 eps=1"),
        "apgd[norm=L1]": ("L1", 2.0, "L1 eps=2")}
    assert all(c["extra"]["outside_budget"] == 0 for c in cells.values() if c["attack"] != "clean")
    assert cells["apgd[norm=L1]"]["extra"]["max_l1"] <= 2.0 * (1 + 1e-6)
    assert cells["pgd10[norm=L2]"]["extra"]["max_l2"] <= 1.0 + 1e-6
    # the undefended model falls under each budget (not vacuous), but not to the same accuracy everywhere
    assert all(c["correct"] < cells["clean"]["correct"] for k, c in cells.items() if k != "clean")

    dest = l1_l2_run.parent / "board"
    assert bench("leaderboard", "--out", l1_l2_run, "--dest", dest).code == 0
    text = (dest / "digits-tiny_cnn-smoke.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Rank"))
    assert "Worst L∞ ε=0.1" in header and "L2" not in header  # the main table's worst case: the preset's L-inf
    for title in ("L∞ ε=0.1, adaptive attacks", "L2 ε=1, adaptive attacks", "L1 ε=2, adaptive attacks"):
        assert f"### {title}" in text


def test_the_json_export_gives_one_robustbench_record_per_threat_model(l1_l2_run, bench):
    dest = l1_l2_run.parent / "board"
    assert bench("leaderboard", "--out", l1_l2_run, "--dest", dest, "--format", "json").code == 0
    records = json.loads((dest / "digits-tiny_cnn-smoke.json").read_text())["models"]
    by_norm = {r["threat_model"]: r for r in records}
    assert len(records) == 3 and set(by_norm) == {"Linf", "L2", "L1"}
    assert {n: r["eps"] for n, r in by_norm.items()} == {"Linf": "0.1", "L2": "1", "L1": "2"}
    for r in records:
        assert r["link"] == "https://example.org/paper" and r["authors"] == "A. One, B. Two"
        assert r["venue"] is None and r["footnote"] is None and r["additional_data"] is False
        assert r["number_forward_passes"] == 1 and r["autoattack_acc"] is None
    assert by_norm["L2"]["reported"] == "70.1" and by_norm["Linf"]["reported"] is None
    assert by_norm["L1"]["robust_acc"] == by_norm["L1"]["worst_case"]["L1 eps=2"] < by_norm["L1"]["clean_acc"]


def test_meta_is_kept_by_a_resumed_run_and_updated_without_a_new_run(l1_l2_run, bench):
    (before,) = Store(l1_l2_run).runs()
    assert bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", ATTACKS + ",fgsm",
                 "--out", l1_l2_run, "--quiet").code == 0  # evaluates fgsm: the run is stored again
    assert bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", ATTACKS, "--out", l1_l2_run,
                 "--meta", "venue=ICML 2099", "--quiet").code == 0  # nothing to evaluate
    (after,) = Store(l1_l2_run).runs()
    assert after["run_id"] == before["run_id"]  # --meta is not part of the run's identity
    assert after["info"]["bench"]["cached_files"] == before["info"]["bench"]["cached_files"]
    assert after["info"]["bench"]["train_data"] == before["info"]["bench"]["train_data"] != ""
    assert {k: v for k, v in after["info"]["bench"].items() if k not in ("cached_files", "train_data")} == {
        "forward_passes": 1, "meta": {
        "link": "https://example.org/paper", "authors": "A. One, B. Two", "reported:L2": "70.1",
        "venue": "ICML 2099"}}


@pytest.mark.parametrize("meta, message", [
    ("url=x", "--meta has no field 'url'"), ("reported:L3=1", "threat model must be one of Linf, L2, L1")])
def test_an_unknown_meta_field_is_one_line(bench, tmp_path, meta, message):
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "fgsm", "--meta", meta,
                "--out", tmp_path / "r", "--quiet")
    assert res.code == 2 and message in res.err and "Traceback" not in res.err


def test_declared_forward_passes_and_per_norm_autoattack_fill_the_record():
    flags = np.arange(100) < 40

    def cell(label, norm, eps):
        threat = f"{norm} eps={config.exact_text(eps)}"
        return {"attack": label, "name": label.split("[")[0], "threat": threat, "norm": norm, "eps": eps,
                "n": 100, "correct": 40, "flags": flags, "extra": {}, "protocol": "adaptive"}

    cells = {(lab, "adaptive"): cell(lab, norm, eps) for lab, norm, eps in (
        ("autoattack", "Linf", 8 / 255), ("autoattack[norm=L2]", "L2", 0.5), ("autoattack[norm=L1]", "L1", 12.0),
        ("autoattack[n_target_classes=3]", "Linf", 8 / 255))}
    run = {"run_id": "0123456789abcdef", "dataset": "cifar10", "arch": "resnet18", "preset": "paper", "seed": 0,
           "command": "bench run", "code_version": "test",
           "info": {"bench": {"forward_passes": 4, "meta": {"additional_data": "true", "footnote": "f"}}}}
    cfg = leaderboard.Config("norm_shaping", {}, [leaderboard.Run(run, np.ones(100, bool), cells, [])])
    threats = ["Linf eps=8/255", "L2 eps=0.5", "L1 eps=12"]
    labels = [label for label, _ in cells]
    records = leaderboard.model_infos(cfg, threats, labels)
    assert [(r["threat_model"], r["eps"], r["autoattack_acc"]) for r in records] == [
        ("Linf", "8/255", 40.0), ("L2", "0.5", 40.0), ("L1", "12", 40.0)]
    assert all(r["number_forward_passes"] == 4 and r["additional_data"] is True and r["footnote"] == "f"
               for r in records)
    # a label with other parameters than its threat model's is not the standard evaluation
    assert leaderboard.numbers(cfg, threats, ["autoattack[n_target_classes=3]"])["autoattack_acc"] is None


def test_the_l1_budget_is_a_preset_field_checked_against_the_image_cube():
    spec = data.DATASETS["digits"]
    preset = config.concrete(config.get_preset("smoke"), spec)
    assert preset.eps_l1 == spec.eps_l1 == 2.0 and data.DATASETS["cifar10"].eps_l1 == 12.0
    with pytest.raises(config.BenchError, match=r"eps_l1 must be <= 64 \(the L1 diameter"):
        config.concrete(config.override_preset(config.get_preset("smoke"), {"eps_l1": "65"}), spec)
    # at the dataset's standard the field stays out of the identity (run ids from before it existed hold)
    assert "eps_l1" not in config.preset_identity(preset, {"eps_l1": spec.eps_l1})
    changed = config.override_preset(preset, {"eps_l1": "3"})
    assert config.preset_identity(changed, {"eps_l1": spec.eps_l1})["eps_l1"] == 3.0
