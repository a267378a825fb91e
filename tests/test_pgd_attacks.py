"""PGD and the first attacks: budgets, best iterate, strength on an undefended model, untouched state."""

from __future__ import annotations

import pytest
import torch

from bench import state
from bench.projected_gradient import ce_loss, cw_loss, pgd
from bench.registry import load

DEVICE = torch.device("cpu")


@pytest.fixture
def trained(undefended):
    model, ds = undefended
    return model, ds.test


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.5)])
def test_pgd_stays_in_budget_and_box(trained, norm, eps):
    model, test = trained
    x, y = test.x, test.y
    x_adv = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=5, norm=norm, generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_best_iterate_is_never_worse_than_the_last(trained):
    model, test = trained
    x, y = test.x, test.y
    kw = dict(eps=0.1, alpha=0.05, steps=10, generator=None)
    best = pgd(model, x, y, track_best=True, **{**kw, "generator": torch.Generator().manual_seed(3)})
    last = pgd(model, x, y, track_best=False, **{**kw, "generator": torch.Generator().manual_seed(3)})
    with torch.no_grad():
        wrong_best = model(best).argmax(1) != y
        wrong_last = model(last).argmax(1) != y
    assert bool((wrong_best | ~wrong_last).all())  # every sample the last iterate fools, the best one fools
    assert int(wrong_best.sum()) >= int(wrong_last.sum())


def test_cw_loss_is_the_clamped_margin():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(cw_loss(50.0)(logits, y), torch.tensor([-54.0, -48.0]))
    assert torch.allclose(cw_loss(0.0)(logits, y), torch.tensor([-4.0, 0.0]))
    assert ce_loss(logits, y).shape == (2,)


@pytest.mark.parametrize("name", ["pgd10", "fgsm"])
def test_attack_drives_undefended_model_near_zero_at_large_eps(trained, name):
    model, test = trained
    attack = load("attack", name)(eps=0.3)
    x_adv = attack.perturb(model, test.x, test.y)
    with torch.no_grad():
        acc = (model(x_adv).argmax(1) == test.y).float().mean().item()
    assert acc <= 0.05, f"{name} left {acc:.1%} accuracy at eps 0.3"
    assert float((x_adv - test.x).abs().max()) <= 0.3 + 1e-6


class MixedModes(torch.nn.Module):
    """A model whose second BN stays in train mode: forwards update its running statistics."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("name", ["pgd10", "fgsm"])
def test_attacks_leave_parameters_buffers_and_mixed_modes_untouched(trained, name):
    import copy

    model = copy.deepcopy(trained[0])
    model.eval()
    model.bn2.train()  # mixed: eval overall, one BN in batch-statistics mode with buffer updates
    x, y = trained[1].x[:32], trained[1].y[:32]
    before_digest, before_modes = state.digest(model), state.modes(model)
    attack = load("attack", name)(eps=0.1)
    with torch.no_grad():
        model(x)  # this forward itself moves bn2's buffers...
    before_digest = state.digest(model)  # ...so take the digest after it
    attack.perturb(model, x, y)
    assert state.modes(model) == before_modes
    assert state.digest(model) == before_digest


def test_torchattacks_attacks_the_mixed_mode_function():
    """torchattacks calls .eval(); the wrapper must still run the model in its own (mixed) modes."""
    from attacks import torchattacks_adapter as ta

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(1)
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            seen.append(self.bn.training)
            return self.lin(self.bn(x).flatten(1))

    probe = Probe()
    probe.eval()
    probe.bn.train()
    lib = ta.torchattacks()
    ta.run(lambda m: lib.FGSM(m, eps=0.1), probe, torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,)))
    assert seen and all(seen), "a forward ran with the BN layer switched to eval mode"
    assert probe.bn.training and not probe.training
