"""`bench.evaluate()`: a model object from Python, no registered defense, the same numbers as `bench run`."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy import stats as sps

import bench as bnbench
from bench.store import Store
from test_user_models import FACTORY, site, trained  # noqa: F401 - fixtures: the test package's model, trained

ARGS = dict(attacks="fgsm,pgd10", threat="Linf:0.1", preset="smoke", sets={"n_test": 48}, device="cpu")
E_NOTATION = re.compile(r"\d[eE][-+]\d")  # 1.7e-18: rounding noise printed as a number (a digest has no sign)


def summary_table(stdout: str) -> dict[str, dict[str, str]]:
    """`bench run`'s summary table: first column -> {header: cell as printed}, columns cut where tabulate's
    dashes line puts them (a cell may be empty)."""
    lines = stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+( +-+)+", line.strip()))
    spans = [m.span() for m in re.finditer(r"-+", lines[rule])]
    cut = lambda line: [line[a:b].strip() for a, b in spans]  # noqa: E731
    headers = cut(lines[rule - 1].ljust(spans[-1][1]))
    rows = {}
    for line in lines[rule + 1:]:
        if not line.strip() or len(line) < spans[1][0]:
            break
        cells = cut(line.ljust(spans[-1][1]))
        rows[cells[0]] = dict(zip(headers, cells))
    return rows


class BrightnessNet(torch.nn.Module):
    """Class 1 for bright images, 0 for dark ones (`sign` -1: the other way round, always wrong): on images
    of brightness 0.1 and 0.9 no L-inf perturbation of 0.1 changes its answer, so its accuracies are exactly
    100% (or 0%), clean and under attack."""

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(100.0 * sign))

    def forward(self, x):
        brightness = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-brightness, brightness], 1) * self.scale


def brightness_net(num_classes, spec):
    """BrightnessNet as a model factory, for `bench run --model test_evaluate_api:brightness_net`."""
    return BrightnessNet()


def brightness_data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of brightness 0.1 (class 0) and 0.9 (class 1). At n = 48 the Wilson formula's bound at 0 comes
    out 6.9e-18 and at 100 0.9999999999999999, unless wilson() makes them exact."""
    y = torch.arange(n) % 2
    return (0.1 + 0.8 * y.float()).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous(), y


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
    # and the API's accuracies in % are the table's figures, as are their intervals and the Report's own table
    table = summary_table(res.out)
    ours = {"clean": report.clean, **report.attacks, "worst case": report.worst_case["Linf eps=0.1"]}
    assert set(table) == set(ours)
    own = summary_table(str(report))
    for label, acc in ours.items():
        assert float(table[label]["accuracy %"]) == round(acc.percent, 2), label
        assert table[label]["95% CI"] == str(acc).split("% ")[1].split(" (n=")[0], label
        assert own[label]["accuracy %"] == f"{acc.percent:.2f}" and own[label]["95% CI"] == table[label]["95% CI"]
        assert str(acc).startswith(f"{acc.percent:.2f}% [")
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
    # the unit is in the names: .value is a fraction, .percent is in %, and the repr says so
    assert clean.percent == 100 * clean.value == pytest.approx(100 * clean.correct / clean.n) and clean.value < 1
    assert clean.interval_percent == (100 * clean.low, 100 * clean.high)
    assert f"percent={clean.percent:.2f}" in repr(clean) and "fractions" in repr(clean)


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
        clean = model(ds.test.x).argmax(1) == ds.test.y
    # beside the attack's verdicts, the clean ones (the clean cell's, per sample in the same order): a sample
    # is robust where both hold
    assert kept["clean_correct"].dtype == bool and kept["clean_correct"].tolist() == rep.flags["clean"].tolist()
    assert kept["clean_correct"].tolist() == clean.tolist()
    assert kept["correct"].tolist() == rep.flags["fgsm"].tolist()  # (as the cell stored it)
    assert (kept["clean_correct"] & ~kept["correct"]).any()  # the attack fooled some: two different arrays


@pytest.mark.parametrize("sign, percent", [(1.0, 100.0), (-1.0, 0.0)])
def test_accuracies_of_0_and_100_print_intervals_to_0_0_and_100_0(sign, percent, bench, tmp_path):
    """Everywhere an interval is shown (the API's Accuracy and Report, bench run's summary, the leaderboard's
    tables and records), a bound at 0 or 100 reads 0.0 / 100.0, not rounding noise such as 1.7e-18."""
    x, y = brightness_data()
    ci = sps.binomtest(int(percent / 100 * len(y)), len(y)).proportion_ci(method="wilson")
    other = f"{100 * (ci.high if percent == 0 else ci.low):.1f}"  # the bound away from 0 / 100
    interval = f"[0.0, {other}]" if percent == 0 else f"[{other}, 100.0]"
    args = dict(attacks="fgsm", threat="Linf:0.1", preset="smoke", sets={"n_test": 48}, device="cpu", checks=False)
    rep = bnbench.evaluate(BrightnessNet(sign), (x, y), **args)
    for acc in (rep.clean, rep.attacks["fgsm"], rep.worst_case["Linf eps=0.1"]):
        assert acc.percent == percent and (acc.low, acc.high)[percent == 100] == percent / 100
        assert str(acc) == f"{percent:.2f}% {interval} (n=48)"
        assert not E_NOTATION.search(repr(acc)) and interval.replace("[", "(").replace("]", ")") in repr(acc)
    frame = rep.to_frame()
    assert set(frame["ci_high" if percent == 100 else "ci_low"]) == {percent}
    assert all(row["95% CI"] == interval for row in summary_table(str(rep)).values())
    # the CLI's summary and the leaderboard, from a stored run of the same model and data
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    torch.save(BrightnessNet(sign).state_dict(), tmp_path / "net.pt")
    res = bench("run", "--model", "test_evaluate_api:brightness_net", "--checkpoint", tmp_path / "net.pt",
                "--dataset", "tensors", "--data-dir", tmp_path / "data.npz", "--preset", "smoke", "--set",
                "n_test=48", "--attacks", "fgsm", "--threat", "Linf:0.1", "--out", tmp_path / "out", "--quiet",
                "--no-checks")
    assert res.code == 0, res.err
    assert {row["95% CI"] for row in summary_table(res.out).values()} == {interval}
    assert bench("leaderboard", "--out", tmp_path / "out", "--dest", tmp_path / "board").code == 0
    (page,) = (tmp_path / "board").glob("*.md")
    assert f"{percent:.1f} {interval}" in page.read_text() and not E_NOTATION.search(page.read_text())
    assert bench("leaderboard", "--out", tmp_path / "out", "--dest", tmp_path / "board", "--format", "csv").code == 0
    import pandas as pd

    records = pd.read_csv(next((tmp_path / "board").glob("*.csv")))
    assert set(records["ci_high" if percent == 100 else "ci_low"]) == {percent}


def test_a_mistake_is_one_bench_error(trained):  # noqa: F811
    model, _ = trained
    with pytest.raises(bnbench.evaluation.BenchError, match="threat must be NORM:EPS"):
        bnbench.evaluate(model, "digits", threat="8/255")
    with pytest.raises(bnbench.evaluation.BenchError, match="data as a tuple must be"):
        bnbench.evaluate(model, (1, 2, 3))
