"""Every registered attack and every sanity check on any number of classes, channels and image size
(issue 15): 100 and 200 classes, 1 and 3 channels, 28 and 64 pixels -- and 2 classes, where an attack that
cannot run must say so up front (`Attack.validate`), never fail mid-run. A tiny random conv net and a
handful of images keep it fast; the labels are the net's own predictions, so every attack has work to do."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from bench import checks, registry
from bench.api import Defended
from bench.data import DatasetSpec, Split
from bench.errors import BenchError
from bench.evaluator import attack_cell
from bench.params import resolve_params

SHAPES = [(100, 3, 28), (200, 1, 64), (200, 3, 64), (2, 1, 28)]  # (classes, channels, pixels)
# small budgets through the parameters an attack declares, whatever its name
SMALL = {"steps": 2, "restarts": 1, "queries": 20, "apgd_iters": 3, "n_target_classes": 2}
N = 6


class TinyNet(nn.Module):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 5, stride=4, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.linear = nn.Linear(8 * 4, classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.conv(x)))
        return self.linear(nn.functional.adaptive_avg_pool2d(out, 2).flatten(1))


class FakeCtx:
    def __init__(self, split):
        self.data, self.seed = split, 0

    def generator(self, purpose):
        return torch.Generator().manual_seed(zlib.crc32(purpose.encode()))


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}cls-{s[1]}ch-{s[2]}px")
def case(request):
    classes, channels, size = request.param
    torch.manual_seed(classes + channels + size)
    model = TinyNet(channels, classes).eval()
    with torch.no_grad():  # BN statistics of the data, so logits are not degenerate
        model.bn.running_mean.zero_()
        model.bn.running_var.fill_(0.1)
    x = torch.rand(N, channels, size, size)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts classified right
    spec = DatasetSpec(channels, size, classes, mean=(0.5,) * channels, std=(0.25,) * channels)
    return spec, model, Split(x, y)


def _attacks():
    loaded, broken = registry.load_all("attack")
    assert not broken, broken
    return sorted(loaded)


@pytest.fixture
def short_autoattack(monkeypatch):
    """pyautoattack's stages at a few iterations and queries (it has no such parameters in the plugin): every
    stage still runs on the samples the earlier ones leave, at 100 and 200 classes."""
    from pyautoattack import AutoAttack as Reference

    original = Reference._set_version

    def shortened(self, version):
        original(self, version)
        for stage in (self.apgd, self.apgd_targeted, self.fab):
            stage.n_iter, stage.n_restarts = 3, 1
        self.apgd.eot_iter = min(self.apgd.eot_iter, 2)
        self.apgd_targeted.eot_iter = min(self.apgd_targeted.eot_iter, 2)
        self.square.n_queries = 20

    monkeypatch.setattr(Reference, "_set_version", shortened)


@pytest.mark.parametrize("name", _attacks())
def test_every_attack_runs_or_refuses_up_front(case, name, short_autoattack):
    spec, model, split = case
    cls = registry.load("attack", name)
    attack = cls(**resolve_params(name, cls.PARAMS, {k: v for k, v in SMALL.items() if k in cls.PARAMS}))
    try:
        attack.validate(spec)
    except BenchError as exc:  # a refusal names the data's limit, in one line
        assert spec.num_classes < 10, f"{name} refused {spec}: {exc}"
        assert "classes" in str(exc) and "\n" not in str(exc)
        return
    attack.setup(FakeCtx(split), Defended(model))
    cell = attack_cell(attack, Defended(model), split, batch_size=N, device=torch.device("cpu"))
    assert cell.flags.shape == (N,)
    assert cell.extra["outside_budget"] == 0 and cell.extra["nonfinite"] == 0 and not cell.extra["state_changed"]


def test_the_sanity_checks_hold_on_any_shape(case):
    spec, model, split = case
    results = {r.name: r for r in checks.probe(Defended(model), split.x, split.y, 8 / 255,
                                                torch.Generator().manual_seed(0))}
    assert list(results) == list(checks.PROBES)
    assert results["determinism"].status == "pass" and results["batch_dependence"].status == "pass"
    assert results["gradient_health"].status == "pass", results["gradient_health"].detail
    assert results["large_eps"].status == "pass", results["large_eps"].detail  # 64/255 fools a random net
    # the stored-cell checks (1, 2, 7-10) on cells of this shape
    cells = []
    for name in ("fgsm", "pgd10"):
        cls = registry.load("attack", name)
        attack = cls(**resolve_params(name, cls.PARAMS, {}))
        attack.setup(FakeCtx(split), Defended(model))
        res = attack_cell(attack, Defended(model), split, batch_size=N, device=torch.device("cpu"))
        cells.append({"attack": name, "name": name, "protocol": "adaptive", "threat": attack.threat,
                      "flags": res.flags, "n": N, "correct": int(res.flags.sum()), "extra": res.extra})
    clean = {"attack": "clean", "protocol": "-", "threat": "", "flags": np.ones(N, bool), "n": N, "correct": N,
             "extra": {}}
    stored = {r.name: r.status for r in checks.from_cells({"has_surrogate": False}, [clean] + cells)}
    assert stored["state_preserved"] == stored["budget"] == stored["worst_case"] == "pass"
    assert stored["budget_monotonicity"] in ("pass", "skip")
