"""The founding papers' defenses change exactly what they claim to change (smoke scale)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bench import data, layers, models, registry, state
from bench.api import Context
from bench.params import resolve_params
from conftest import make_ctx
from defenses.rift import choose_alpha


def defense(name: str, ctx: Context, **params):
    cls = registry.load("defense", name)
    return cls(**resolve_params(name, cls.PARAMS, params, ctx.preset))


@pytest.fixture
def ctx(out_dir):
    """Smoke context whose pgd_at/standard bases are the session's cached ones (same precision: fp32)."""
    return make_ctx(out_dir)


def param_diff(a: torch.nn.Module, b_state: dict) -> set[str]:
    return {n for n, q in a.named_parameters() if not torch.equal(q.detach(), b_state[n])}


def buffer_diff(a: torch.nn.Module, b_state: dict) -> set[str]:
    return {n for n, t in a.named_buffers() if n in b_state and not torch.equal(t, b_state[n])}


# ---------------------------------------------------------------------------------------------------- RiFT


def test_rift_changes_only_the_chosen_module_and_records_everything(ctx):
    base = ctx.base("pgd_at").state_dict()
    # alpha fixed to 1 so the defended model is theta_FT itself
    built = defense("rift", ctx, alpha_grid="1.0", tolerance=100, bn_stats="frozen").build(ctx)
    info = built.info
    (chosen,) = info["chosen"]
    assert chosen == info["candidates"][0]["module"]  # the lowest MRC
    assert param_diff(built.model, base) == layers.parameter_names(built.model, [chosen])
    assert buffer_diff(built.model, base) == set()  # bn_stats=frozen
    kinds = {row["kind"] for row in info["candidates"]}
    assert kinds == {"conv", "linear"}
    assert len(info["candidates"]) == len(layers.weight_modules(built.model))
    for row in info["candidates"]:
        assert row["mrc"] >= 0
        assert row["max_delta_ratio"] <= 0.1 + 1e-6
        assert row["pass_losses"][0] == pytest.approx(row["loss0"])
        assert row["loss_max"] == pytest.approx(max(row["pass_losses"]))
    mrcs = [row["mrc"] for row in info["candidates"]]
    assert mrcs == sorted(mrcs)
    assert [r["alpha"] for r in info["alpha_curve"]] == [1.0]
    assert set(info["seconds"]) == {"mrc", "finetune", "alpha_search"}


def test_rift_bn_stats_all_moves_every_bn_buffer(ctx):
    base = ctx.base("pgd_at").state_dict()
    built = defense("rift", ctx, alpha_grid="1.0", tolerance=100, bn_stats="all").build(ctx)
    moved = buffer_diff(built.model, base)
    assert {"bn1.running_mean", "bn2.running_var"} <= moved


def test_rift_alpha_obeys_the_tolerance_rule(ctx):
    built = defense("rift", ctx).build(ctx)
    info = built.info
    curve = info["alpha_curve"]
    assert [r["alpha"] for r in curve] == pytest.approx([i / 10 for i in range(11)])
    base = next(r for r in curve if r["alpha"] == 0.0)["robust"]
    ok = [r for r in curve if r["robust"] >= base - 0.001 - 1e-12]
    best_clean = max(r["clean"] for r in ok)
    chosen = next(r for r in curve if r["alpha"] == info["alpha"])
    assert chosen in ok and chosen["clean"] == best_clean
    # and the defended model is that alpha's model: its selection-split clean accuracy matches the curve
    from bench.train import accuracy

    assert accuracy(built.model, ctx.data.val, ctx.device, ctx.preset.eval_batch_size) == pytest.approx(chosen["clean"])


def test_choose_alpha_rule():
    curve = [{"alpha": 0.0, "clean": 0.80, "robust": 0.500}, {"alpha": 0.5, "clean": 0.84, "robust": 0.4995},
             {"alpha": 1.0, "clean": 0.90, "robust": 0.40}]
    assert choose_alpha(curve, 0.500, 0.001)[0] == 0.5
    assert choose_alpha(curve, 0.500, 0.0)[0] == 0.0
    assert choose_alpha(curve, 0.500, 0.2)[0] == 1.0


def test_selection_val_never_reads_the_test_split(out_dir):
    guarded = make_ctx(out_dir, guard_test=True)
    built = defense("rift_bn", guarded, k=2).build(guarded)
    assert built.info["selection"] == "val" and len(built.info["chosen"]) == 2
    with pytest.raises(AssertionError, match="the test split was read"):
        defense("rift", guarded, selection="test").build(guarded)


def test_rift_bn_candidates_include_bn_and_top_k_trains_jointly(ctx):
    base = ctx.base("pgd_at").state_dict()
    built = defense("rift_bn", ctx, k=3, alpha_grid="1.0", tolerance=100, bn_stats="selected",
                    bn_perturb="gamma").build(ctx)
    info = built.info
    kinds = {row["kind"] for row in info["candidates"]}
    assert kinds == {"conv", "linear", "bn"} and "mrc_scale_note" in info
    assert info["chosen"] == [row["module"] for row in info["candidates"][:3]]
    assert all(row["perturb"] == "gamma" for row in info["candidates"] if row["kind"] == "bn")
    assert param_diff(built.model, base) <= layers.parameter_names(built.model, info["chosen"])
    chosen_bn = [m for m in info["chosen"] if m.startswith("bn")]
    moved = {n.rpartition(".")[0] for n in buffer_diff(built.model, base)}
    assert moved == set(chosen_bn)  # bn_stats=selected: only chosen BN layers re-estimate statistics


def test_rift_bn_perturbation_stays_in_the_relative_ball(ctx):
    built = defense("rift_bn", ctx, k=1, mrc_eps=0.05, mrc_passes=4).build(ctx)
    for row in built.info["candidates"]:
        assert row["max_delta_ratio"] <= 0.05 + 1e-6 and row["mrc"] >= 0


def test_mrc_is_memoised_across_rift_and_rift_bn(ctx):
    a = defense("rift", ctx).build(ctx).info["candidates"]
    b = defense("rift_bn", ctx, k=2).build(ctx).info["candidates"]
    conv_b = {r["module"]: r["mrc"] for r in b if r["kind"] != "bn"}
    assert {r["module"]: r["mrc"] for r in a} == conv_b
    assert len(list((ctx.cache_dir / "memo").glob("rift-mrc-*.json"))) == len(b)


def test_exact_module_path_conv1_is_not_layer1_0_conv1(tmp_path):
    torch.manual_seed(0)
    net = models.build_model("resnet20", data.DATASETS["digits"])
    path = tmp_path / "resnet20-random.pt"
    torch.save(net.state_dict(), path)
    ctx = make_ctx(tmp_path, arch="resnet20", base_checkpoints={"pgd_at": path},
                   sets={"ft_epochs": "1", "n_val": "40", "n_val_robust": "40"})
    built = defense("rift", ctx, modules="conv1", alpha_grid="1.0", tolerance=100, bn_stats="frozen",
                    mrc_passes=1, mrc_samples=16).build(ctx)
    assert built.info["chosen"] == ["conv1"]
    changed = param_diff(built.model, net.state_dict())
    assert changed == {"conv1.weight"}
    assert "layer1.0.conv1.weight" not in changed
    assert buffer_diff(built.model, net.state_dict()) == set()


# ---------------------------------------------------------------------------------------- layer-type FT


@pytest.mark.parametrize("name, frozen_kinds", [("ft_bn", {"conv", "linear"}), ("ft_conv", {"bn"}), ("ft_full", set())])
def test_layer_type_finetuning_leaves_frozen_groups_bit_identical(ctx, name, frozen_kinds):
    base_model = ctx.base("pgd_at")
    base = copy.deepcopy(base_model.state_dict())
    built = defense(name, ctx).build(ctx)
    changed = param_diff(built.model, base)
    for path, m in built.model.named_modules():
        own = layers.parameter_names(built.model, [path])
        if not own:
            continue
        if layers.module_kind(m) in frozen_kinds:
            assert not (own & changed), f"{name} changed frozen {path}"
        else:
            assert own & changed, f"{name} did not train {path}"
    bn_buffers_moved = buffer_diff(built.model, base)
    assert bool(bn_buffers_moved) == (name != "ft_conv")
    curve = built.info["curve"]
    assert [c["epoch"] for c in curve] == list(range(ctx.preset.ft_epochs + 1))
    assert all(0 <= c["clean"] <= 1 and 0 <= c["pgd10"] <= c["clean"] + 0.05 for c in curve)


def test_trained_defense_serves_any_number_of_test_images_unless_it_read_them(out_dir):
    def built(n_test: int, curve_split: str):
        ctx = make_ctx(out_dir, sets={"n_test": str(n_test)})
        return defense("ft_bn", ctx, epochs=1, curve_split=curve_split).build(ctx)

    def cached() -> set[Path]:
        return set((out_dir / "cache" / "defense").glob("ft_bn-*.pt"))

    before = cached()
    first = built(128, "val")
    (trained,) = cached() - before
    mtime = trained.stat().st_mtime_ns
    second = built(32, "val")  # fewer test images evaluated: the fine-tuning never read them
    assert cached() - before == {trained} and trained.stat().st_mtime_ns == mtime
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    # curves on the test split: the test images are part of what was cached, so other ones train anew
    built(128, "test")
    built(32, "test")
    assert len(cached() - before) == 3


# ---------------------------------------------------------------------------------------- fragile features


def test_bn_stats_changes_only_running_statistics(ctx):
    base = copy.deepcopy(ctx.base("standard").state_dict())
    built = defense("bn_stats", ctx).build(ctx)
    assert param_diff(built.model, base) == set()
    moved = buffer_diff(built.model, base)
    assert {"bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"} <= moved
    assert all(m.momentum == 0.1 for _, m in layers.bn_modules(built.model))


def test_bn_params_trains_only_bn_affine_and_statistics(ctx):
    base = copy.deepcopy(ctx.base("standard").state_dict())
    built = defense("bn_params", ctx, epochs=2).build(ctx)
    assert param_diff(built.model, base) == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    assert buffer_diff(built.model, base)
    with_extra = defense("bn_params", ctx, epochs=2, extra="logits,conv1").build(ctx)
    assert param_diff(with_extra.model, base) == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias",
                                                  "linear.weight", "linear.bias", "conv1.weight"}


def test_adv_bn_only_keeps_the_random_conv_weights(ctx):
    d = defense("adv_bn_only", ctx, epochs=2)
    init = copy.deepcopy(d.initial(ctx).state_dict())
    built = d.build(ctx)
    changed = param_diff(built.model, init)
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    assert torch.equal(built.model.conv1.weight, init["conv1.weight"])


# ---------------------------------------------------------------------------------------- norm shaping


@pytest.fixture
def shaped(ctx):
    return defense("norm_shaping", ctx, epochs=2).build(ctx)


def test_norm_shaping_predictions_depend_on_the_shaping_samples(shaped, ctx):
    model = shaped.model
    assert shaped.batch_dependent and shaped.surrogate is not None
    x = ctx.data.val.x[:16]
    other = ctx.data.train.x[-len(model.shaping):].flip(0)
    with torch.no_grad():
        a, b = model(x), model.with_shaping(other)(x)
        alone = model(x[:1])
    assert not torch.allclose(a, b, atol=1e-4)  # same test samples, other shaping samples
    assert not torch.allclose(a[:1], alone, atol=1e-4)  # the rest of the batch matters too


def test_norm_shaping_inference_leaves_bn_buffers_unchanged(shaped, ctx):
    before = state.digest(shaped.model)
    with torch.no_grad():
        shaped.model(ctx.data.val.x[:32])
    x = ctx.data.val.x[:8].clone().requires_grad_(True)
    shaped.model(x).sum().backward()
    assert state.digest(shaped.model) == before
    assert not shaped.model.training and not any(m.training for m in shaped.model.modules())


def test_norm_shaping_ratio_zero_equals_train_mode_bn(shaped, ctx):
    from defenses.norm_shaping import NormShapedModel

    zero = NormShapedModel(shaped.surrogate, shaped.model.shaping, 0)
    x = ctx.data.val.x[:24]
    reference = copy.deepcopy(shaped.surrogate).train()
    with torch.no_grad():
        assert torch.allclose(zero(x), reference(x), atol=1e-5)
        assert not torch.allclose(zero(x), shaped.surrogate(x), atol=1e-3)  # eval mode differs


def test_norm_shaping_surrogates_are_what_they_say(shaped, ctx):
    from defenses.norm_shaping import NormShaping

    assert sorted(shaped.surrogates) == sorted(list(NormShaping.SURROGATES)[1:])
    net, x = shaped.surrogate, ctx.data.val.x[:24]
    before = state.digest(net)
    train_mode = copy.deepcopy(net).train()
    test_batch, init_stats = shaped.surrogates["test_batch"], shaped.surrogates["init_stats"]
    assert test_batch.batch_dependent and not init_stats.batch_dependent
    never = copy.deepcopy(net)
    for _, bn in layers.bn_modules(never):
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    with torch.no_grad():
        # test_batch: the attacked batch's own statistics, nothing else in it (inference at 1:0)
        assert torch.allclose(test_batch.model(x), train_mode(x), atol=1e-5)
        # init_stats: eval mode with the statistics BN starts from; the trained statistics are not touched
        assert torch.allclose(init_stats.model(x), never(x), atol=1e-6)
        assert not torch.allclose(init_stats.model(x), net(x), atol=1e-3)
    assert state.digest(net) == before
    assert all(float(bn.running_var.mean()) != 1.0 for _, bn in layers.bn_modules(net))


def test_norm_shaping_shaping_samples_are_fixed_by_the_seed(ctx):
    a = defense("norm_shaping", ctx, epochs=2).build(ctx)
    b = defense("norm_shaping", ctx, epochs=2).build(ctx)  # cache hit for the weights
    assert torch.equal(a.model.shaping, b.model.shaping)
    assert len(a.model.shaping) == 3 * ctx.preset.eval_batch_size


# ---------------------------------------------------------------------------------------- end to end


ALL = ["rift", "rift_bn", "ft_bn", "ft_conv", "ft_full", "bn_stats", "bn_params", "adv_bn_only", "norm_shaping"]


def test_every_defense_runs_end_to_end_and_reaches_the_leaderboard(bench, out_dir, tmp_path):
    for name in ["pgd_at"] + ALL:
        res = bench("run", "--preset", "smoke", "--defense", name, "--attacks", "pgd10,fgsm", "--out", out_dir,
                    "--set", "epochs_pgd_at=3", "--quiet")
        assert res.code == 0, f"{name}: {res.err}"
    res = bench("leaderboard", "--out", out_dir, "--dest", tmp_path / "lb")
    assert res.code == 0
    table = "\n".join(Path(p).read_text() for p in res.out.split() if p.endswith(".md"))
    for name in ["pgd_at"] + ALL:
        assert f"| {name} " in table, name


def test_normalized_mrc_ascent_reaches_every_ball_and_is_memoised_apart(ctx):
    sgd = {r["module"]: r for r in defense("rift_bn", ctx, k=1, mrc_passes=8).build(ctx).info["candidates"]}
    built = defense("rift_bn", ctx, k=1, mrc_passes=8, mrc_ascent="normalized").build(ctx)
    normalized = {r["module"]: r for r in built.info["candidates"]}
    assert built.info["mrc_ascent"] == "normalized" and set(normalized) == set(sgd)
    for row in normalized.values():  # steps of a quarter radius reach the surface (to the turns between them)
        assert row["ascent"] == "normalized" and 0.099 <= row["max_delta_ratio"] <= 0.1 + 1e-6
        assert row["mrc"] >= 0
    assert all(r["ascent"] == "sgd" for r in sgd.values())
    assert any(normalized[m]["mrc"] != sgd[m]["mrc"] for m in sgd)  # computed anew, not the sgd memo
