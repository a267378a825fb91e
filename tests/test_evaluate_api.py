"""`bench.evaluate()`: a model object from Python, no registered defense, the same numbers as `bench run`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bench as bnbench
from bench.store import Store
from test_user_models import FACTORY, site, trained  # noqa: F401 - fixtures: the test package's model, trained

ARGS = dict(attacks="fgsm,pgd10", threat="Linf:0.1", preset="smoke", sets={"n_test": 48}, device="cpu")


def stored_flags(out) -> dict[str, np.ndarray]:
    store = Store(out, create=False)
    try:
        (run,) = store.runs()
        return {c["attack"]: c["flags"] for c in store.cells(run["run_id"])}
    finally:
        store.close()


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):  # noqa: F811
    model, _ = trained
    return bnbench.evaluate(model, "digits", out=tmp_path_factory.mktemp("api"), **ARGS)


def test_python_gives_the_numbers_of_the_cli(report, trained, bench, tmp_path):  # noqa: F811
    model, _ = trained
    torch.save(model.state_dict(), tmp_path / "net.pt")
    res = bench("run", "--model", FACTORY, "--checkpoint", tmp_path / "net.pt", "--dataset", "digits", "--preset",
                "smoke", "--attacks", "fgsm,pgd10", "--threat", "Linf:0.1", "--set", "n_test=48", "--out",
                tmp_path / "cli", "--quiet")
    assert res.code == 0, res.err
    cli = stored_flags(tmp_path / "cli")
    assert set(cli) == {"clean", "fgsm", "pgd10"}
    for label, flags in cli.items():
        assert report.flags[label].tolist() == flags.tolist(), label
    # and the model named with its checkpoint, from Python, gives them too
    named = bnbench.evaluate(FACTORY, "digits", checkpoint=tmp_path / "net.pt", **ARGS)
    assert {k: v.tolist() for k, v in named.flags.items()} == {k: v.tolist() for k, v in report.flags.items()}


def test_report_has_accuracies_with_intervals_flags_and_checks(report):
    clean, attacks, worst = report.clean, report.attacks, report.worst_case
    assert clean.n == 48 and 0.5 < clean.value <= 1  # a trained model
    assert set(attacks) == {"fgsm", "pgd10"} and list(worst) == ["Linf eps=0.1"]
    for acc in [clean, *attacks.values(), *worst.values()]:
        assert acc.low <= acc.value <= acc.high and acc.n == 48
    # a sample is robust in the worst case only if every attack left it correct
    expected = report.flags["clean"] & report.flags["fgsm"] & report.flags["pgd10"]
    assert report.flags["worst:Linf eps=0.1"].tolist() == expected.tolist()
    assert worst["Linf eps=0.1"].value <= min(a.value for a in attacks.values())
    frame = report.to_frame()
    assert list(frame["cell"]) == ["clean", "fgsm", "pgd10", "worst case"]
    assert frame.loc[frame["cell"] == "pgd10", "accuracy"].item() == pytest.approx(100 * attacks["pgd10"].value)
    assert {c["name"] for c in report.checks} >= {"determinism", "batch_dependence", "gradient_health"}
    assert "worst case" in str(report) and "Linf eps=0.1" in repr(report)


def test_out_resumes_without_recomputing(report, trained):  # noqa: F811
    model, _ = trained
    store = Store(report.out, create=False)
    try:
        before = {c["attack"]: c["seconds"] for c in store.cells()}
    finally:
        store.close()
    again = bnbench.evaluate(model, "digits", out=report.out, **ARGS)
    assert again.run_id == report.run_id
    store = Store(report.out, create=False)
    try:
        assert {c["attack"]: c["seconds"] for c in store.cells()} == before  # nothing ran again
    finally:
        store.close()


def test_tensors_in_memory_give_the_numbers_of_the_dataset(report, trained):  # noqa: F811
    model, ds = trained
    test = ds.test  # the same 48 digits test images the preset evaluates
    from_tensors = bnbench.evaluate(model, (test.x, test.y), **ARGS)
    for label in ("clean", "fgsm", "pgd10"):
        assert from_tensors.flags[label].tolist() == report.flags[label].tolist(), label


def test_adversarial_examples_come_back_without_out(trained):  # noqa: F811
    model, ds = trained
    rep = bnbench.evaluate(model, "digits", save_adversarial=True, checks=False, **{**ARGS, "attacks": "fgsm"})
    assert rep.out is None and set(rep.adversarial) == {"fgsm"}
    kept = rep.adversarial["fgsm"]
    x_adv = torch.from_numpy(kept["x_adv"])
    assert x_adv.shape == (48, 1, 8, 8) and float((x_adv - ds.test.x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == ds.test.y).tolist() == rep.flags["fgsm"].tolist()


def test_a_mistake_is_one_bench_error(trained):  # noqa: F811
    model, _ = trained
    with pytest.raises(bnbench.evaluation.BenchError, match="threat must be NORM:EPS"):
        bnbench.evaluate(model, "digits", threat="8/255")
    with pytest.raises(bnbench.evaluation.BenchError, match="data as a tuple must be"):
        bnbench.evaluate(model, (1, 2, 3))
