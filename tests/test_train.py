"""The shared training loop: parameter subsets, frozen BN statistics, selection, divergence, precision."""

from __future__ import annotations

import copy
import dataclasses

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


def test_reading_the_loss_back_less_often_changes_nothing_but_when_a_divergence_is_seen(digits):
    # the GPU path reads the loss every SYNC_EVERY steps: same weights and history, bit for bit
    runs = []
    for every in (1, 7):
        model = fresh()
        res = train.train(model, digits.train, train.PGDAdversarial(0.1, 0.025, 2), spec(epochs=2, lr=0.1),
                          device=DEVICE, generator=torch.Generator().manual_seed(0), sync_every=every)
        runs.append((model.state_dict(), res.history))
    (w1, h1), (w7, h7) = runs
    assert all(torch.equal(w1[k], w7[k]) for k in w1)
    assert [{k: v for k, v in r.items()} for r in h1] == h7
    with pytest.raises(BenchError, match=r"training diverged \(a non-finite loss at epoch 1, steps 0-[1-4],"):
        train.train(fresh(), digits.train, train.Clean(), spec(epochs=2, lr=1e12), device=DEVICE,
                    generator=torch.Generator().manual_seed(0), sync_every=5)


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


# ----------------------------------------------------------------------------------------------------
# the training spec of each recipe and defense, from its preset


class _Captured(Exception):
    pass


def _presets():
    """smoke, mini, and mini with every training field the specs read set apart from its default."""
    from bench import config

    smoke = config.concrete(config.get_preset("smoke"), data.DATASETS["digits"])
    mini = config.concrete(config.get_preset("mini"), data.DATASETS["cifar10"])
    odd = dataclasses.replace(mini, batch_size=96, schedule="step", momentum=0.8, weight_decay=1e-4, crop_pad=2,
                              flip=False, lr=0.05, lr_fgsm_rs=0.3, epochs_standard=7, epochs_pgd_at=6,
                              epochs_trades=5, epochs_fgsm_rs=3, ft_epochs=4, ft_lr=0.002)
    return {"smoke": smoke, "mini": mini, "odd": odd}


def _fake_ctx(preset):
    from types import SimpleNamespace

    spec_ = data.DATASETS["digits"]
    model = fresh()
    return SimpleNamespace(preset=preset, seed=0, arch="tiny_cnn", device=DEVICE, precision="fp32",
                           data=SimpleNamespace(spec=spec_, train=None, val=SimpleNamespace(subset=lambda s: None)),
                           base=lambda recipe: model, build_model=fresh, split=lambda name: None, progress=None,
                           generator=lambda purpose: torch.Generator(),
                           cached_model=lambda kind, identity, model, run: run())


def _spec_of(monkeypatch, module, build) -> train.TrainSpec:
    """The TrainSpec `build()` hands to `module.train` (which is stopped there)."""
    def stop(model, split, objective, spec, **kw):
        raise _Captured(spec)

    monkeypatch.setattr(module, "train", stop)
    for name in ("accuracy", "robust_accuracy"):  # per-epoch curves computed before training starts
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: 0.0)
    with pytest.raises(_Captured) as exc:
        build()
    return exc.value.args[0]


def _defense(name, preset):
    from bench import registry
    from bench.params import resolve_params

    cls = registry.load("defense", name)
    return cls(**resolve_params(name, cls.PARAMS, {}, preset))


@pytest.mark.parametrize("preset_name", ["smoke", "mini", "odd"])
def test_every_training_spec_is_the_one_its_recipe_always_had(preset_name, monkeypatch):
    """The specs as written out field by field before one function built them all: same values and types
    (the base identity hashes them, so a changed type would retrain every cached base model)."""
    import defenses.fragile_features as ff
    import defenses.layer_finetune as lf
    import defenses.norm_shaping as ns
    import defenses.rift as rift
    from bench import checkpoints

    p = _presets()[preset_name]
    ctx = _fake_ctx(p)
    TrainSpec, Schedule = train.TrainSpec, train.Schedule
    aug = dict(crop_pad=p.crop_pad, flip=p.flip, batch_size=p.batch_size, momentum=p.momentum,
               weight_decay=p.weight_decay)
    old_base = {
        "standard": TrainSpec(p.epochs_standard, p.lr, schedule=Schedule(p.schedule), select="val_clean", **aug),
        "pgd_at": TrainSpec(p.epochs_pgd_at, p.lr, schedule=Schedule(p.schedule), select="val_robust", **aug),
        "trades": TrainSpec(p.epochs_trades, p.lr, schedule=Schedule(p.schedule), select="val_robust", **aug),
        "fgsm_rs": TrainSpec(p.epochs_fgsm_rs, p.lr_fgsm_rs, schedule=Schedule("cyclic"), select="val_robust",
                             **aug),
    }
    for recipe, old in old_base.items():
        assert repr(checkpoints.recipe_plan(recipe, ctx)[1]) == repr(old), recipe

    def old_finetune(params, select):
        return TrainSpec(epochs=params.epochs, lr=params.lr, batch_size=params.batch_size,
                         schedule=Schedule("step", milestones=(0.5,)), momentum=p.momentum,
                         weight_decay=p.weight_decay, crop_pad=p.crop_pad, flip=p.flip, select=select)

    for name in ("rift", "rift_bn"):
        d = _defense(name, p)
        model = fresh()
        got = _spec_of(monkeypatch, rift, lambda: d.finetune(ctx, model, ["conv1"], None))
        assert repr(got) == repr(old_finetune(d.params, "sel_clean")), name
    for name in ("ft_bn", "ft_conv", "ft_full"):
        for keep, select in (("last", "last"), ("best_clean", "clean")):
            d = _defense(name, p)
            d.params.keep = keep
            got = _spec_of(monkeypatch, lf, lambda: d.build(ctx))
            assert repr(got) == repr(old_finetune(d.params, select)), (name, keep)

    def old_own(params, select):
        return TrainSpec(params.epochs, params.lr, batch_size=p.batch_size, schedule=Schedule(p.schedule),
                         momentum=p.momentum, weight_decay=p.weight_decay, crop_pad=p.crop_pad, flip=p.flip,
                         select=select)

    for name, module, select in (("bn_params", ff, "val_robust"), ("adv_bn_only", ff, "val_robust"),
                                 ("norm_shaping", ns, "last")):
        d = _defense(name, p)
        got = _spec_of(monkeypatch, module, lambda: d.build(ctx))
        assert repr(got) == repr(old_own(d.params, select)), name


def test_a_gpu_run_keeps_fp32_ieee_and_autotunes():
    # PyTorch's default runs fp32 convolutions on a GPU in TF32 (10-bit mantissa): reported attacks are fp32
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision, torch.backends.cudnn.benchmark
    try:
        conv.fp32_precision = "tf32"
        train.configure_backends(torch.device("cpu"))  # the CPU: nothing to change
        assert conv.fp32_precision == "tf32"
        train.configure_backends(torch.device("cuda"))  # flags only: no GPU is touched
        assert (conv.fp32_precision, matmul.fp32_precision, torch.backends.cudnn.benchmark) == ("ieee", "ieee", True)
    finally:
        conv.fp32_precision, matmul.fp32_precision, torch.backends.cudnn.benchmark = saved


def test_models_run_channels_last_with_the_same_function(digits):
    contiguous = models.build_model("resnet20", data.DATASETS["cifar10"])
    model = train.to_device(copy.deepcopy(contiguous), DEVICE)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()
    x = torch.rand(8, 3, 32, 32)
    out = model.eval()(x)
    # the activations follow the weights' memory order; the values are the same up to summation order
    assert torch.allclose(out, contiguous.eval()(x), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), contiguous.state_dict().values()))

