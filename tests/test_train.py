"""The shared training loop: parameter subsets, frozen BN statistics, selection, divergence, precision."""

from __future__ import annotations

import copy

import pytest
import torch

from bench import data, models, train
from bench.errors import BenchError

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", n_train=300, n_val=50, n_test=64)


def fresh(seed=0):
    torch.manual_seed(seed)
    return models.build_model("tiny_cnn", data.DATASETS["digits"])


def spec(epochs=1, lr=0.05, **kw):
    return train.TrainSpec(epochs=epochs, lr=lr, batch_size=64, **kw)


def test_only_the_chosen_parameters_change(digits):
    model = fresh()
    before = copy.deepcopy(model.state_dict())
    train.train(model, digits.train, train.Clean(), spec(), device=DEVICE, trainable=model.conv2.parameters(),
                generator=torch.Generator().manual_seed(0))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "conv2.weight" in changed
    # everything else that is a parameter is bit-identical; BN buffers move (all BN in train mode)
    params = {n for n, _ in model.named_parameters()}
    assert changed & params == {"conv2.weight"}
    assert "bn1.running_mean" in changed
    assert all(p.requires_grad for p in model.parameters())  # flags restored after training


def test_frozen_stats_keep_bn_buffers(digits):
    model = fresh()
    before = copy.deepcopy(model.state_dict())
    train.train(model, digits.train, train.Clean(), spec(), device=DEVICE, trainable=model.linear.parameters(),
                frozen_stats=[model.bn1, model.bn2], generator=torch.Generator().manual_seed(0))
    after = model.state_dict()
    for k in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.num_batches_tracked"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["linear.weight"], after["linear.weight"])


def test_training_learns_and_keeps_the_selected_epoch(digits):
    model = fresh()
    snapshots = []

    def evaluate(m):
        snapshots.append(copy.deepcopy(m.state_dict()))
        # a metric that is best at epoch 2, whatever the weights do
        return {"score": [0.1, 0.9, 0.5, 0.2, 0.3, 0.4, 0.5, 0.6][len(snapshots) - 1],
                "val_clean": train.accuracy(m, digits.val, DEVICE)}

    res = train.train(model, digits.train, train.Clean(), spec(epochs=8, lr=0.2, select="score"), device=DEVICE,
                      evaluate=evaluate, generator=torch.Generator().manual_seed(0))
    assert res.best_epoch == 2 and len(res.history) == 8
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())
    assert res.history[-1]["val_clean"] > 0.5  # it does learn digits
    assert not model.training


def test_nan_loss_aborts_with_a_clear_error(digits):
    model = fresh()
    with pytest.raises(BenchError, match="training diverged .* lower the learning rate"):
        train.train(model, digits.train, train.Clean(), spec(epochs=2, lr=1e12), device=DEVICE,
                    generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("objective", [
    train.PGDAdversarial(0.1, 0.025, 3), train.TRADES(0.1, 0.02, 3), train.fgsm_rs(0.1)])
def test_adversarial_objectives_train_and_restore_modes(digits, objective):
    model = fresh()
    objective.generator = torch.Generator().manual_seed(0)
    model.train()
    model.bn1.eval()  # a mixed mode must survive the eval-mode crafting of PGD-AT / TRADES
    x, y = digits.train.x[:32], digits.train.y[:32]
    loss, logits = objective.loss(model, x, y, train.autocast_factory("fp32", DEVICE))
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (32, 10)
    assert model.training and not model.bn1.training and model.bn2.training
    loss.backward()
    assert model.conv1.weight.grad is not None


def test_schedules():
    assert train.Schedule("cosine").factor(0.0) == 1.0 and train.Schedule("cosine").factor(0.5) == pytest.approx(0.5)
    step = train.Schedule("step", milestones=(0.5, 0.75))
    assert [step.factor(p) for p in (0.1, 0.6, 0.8)] == pytest.approx([1.0, 0.1, 0.01])
    assert train.Schedule("cyclic").factor(0.5) == 1.0 and train.Schedule("cyclic").factor(0.0) == 0.0


def test_precision_resolution():
    assert train.resolve_precision("fp32", DEVICE) == "fp32"
    assert train.resolve_precision("auto", DEVICE) in ("bf16", "fp32")
    with pytest.raises(BenchError):
        train.resolve_precision("fp8", DEVICE)
