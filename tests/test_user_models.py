"""Bring your own model: a model class defined only in a test package (tests/plugins/model_plugin), named by
import path or entry point, its checkpoint in every usual form, --normalize, as_is, and defenses on it."""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import PLUGINS, make_distribution

FACTORY = "bench_toy_models.nets:toy_net"
SMOKE = ["--preset", "smoke", "--attacks", "fgsm", "--set", "n_test=48", "--quiet"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The test model package installed as a distribution on sys.path (its entry points visible)."""
    path = str(make_distribution(PLUGINS / "model_plugin", tmp_path_factory.mktemp("site")))
    sys.path.insert(0, path)
    yield Path(path)
    sys.path.remove(path)
    for name in [m for m in sys.modules if m.startswith("bench_toy_models")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def trained(site):
    """The user's ToyNet, clean-trained briefly on digits (so accuracies are not trivial), and the data."""
    from bench import data, train
    from bench_toy_models.nets import toy_net

    ds = data.load("digits", n_train=600, n_val=100, n_test=48)
    torch.manual_seed(0)
    model = toy_net(10, ds.spec)
    train.train(model, ds.train, train.Clean(), train.TrainSpec(epochs=4, lr=0.2, batch_size=64),
                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    return model.eval(), ds


def accuracies(stdout: str) -> dict[str, float]:
    """attack -> accuracy %, from the summary table of `bench run`."""
    out = {}
    for line in stdout.splitlines():
        cols = re.split(r"\s{2,}", line.strip())
        if cols[0] in ("clean", "fgsm"):
            out[cols[0]] = float(cols[3])
    return out


def _one_line_error(res, *needles: str) -> None:
    assert res.code == 2, res.out + res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error:"), res.err
    assert "Traceback" not in res.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_every_checkpoint_form_gives_the_same_numbers(bench, trained, tmp_path):
    model, _ = trained
    state = model.state_dict()
    forms = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state, "opt": {}},
             "net": {"net": state, "acc": 0.5}, "dataparallel": {f"module.{k}": v for k, v in state.items()}}
    seen = {}
    for name, obj in forms.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        res = bench("run", "--model", FACTORY, "--checkpoint", path, *SMOKE, "--out", tmp_path / "out")
        assert res.code == 0, res.err
        assert "defense as_is" in res.out  # --model without --defense: evaluated as it is
        seen[name] = accuracies(res.out)
    assert set(seen["plain"]) == {"clean", "fgsm"}
    assert seen["plain"]["clean"] > 50  # the trained weights were loaded, not a random init
    assert all(acc == seen["plain"] for acc in seen.values()), seen
    # the entry-point name of the same factory gives the same numbers
    res = bench("run", "--model", "toy_net", "--checkpoint", tmp_path / "plain.pt", *SMOKE, "--out", tmp_path / "out")
    assert res.code == 0, res.err
    assert accuracies(res.out) == seen["plain"]
    # the leaderboard of these runs: titled by the model's name, in a file whose name is made safe
    res = bench("leaderboard", "--out", tmp_path / "out", "--dest", tmp_path / "lb")
    assert res.code == 0, res.err
    boards = sorted((tmp_path / "lb").glob("digits-*-smoke.md"))
    assert len(boards) == 2  # the import path and the entry-point name
    assert any(b.read_text().startswith(f"# digits / {FACTORY} / preset `smoke`") for b in boards)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(bench, site, tmp_path):
    from bench import data, models

    path = tmp_path / "tiny.pt"
    torch.save(models.build_model("tiny_cnn", data.DATASETS["digits"]).state_dict(), path)
    res = bench("run", "--model", FACTORY, "--checkpoint", path, *SMOKE, "--out", tmp_path / "out")
    _one_line_error(res, "does not fit", "missing (features.0.weight", "unexpected (conv1.weight", "and 9 more")
    # a checkpoint of the right keys but another width: shapes named
    from bench_toy_models.nets import ToyNet

    torch.save(ToyNet(1, 10, width=4).state_dict(), path)
    res = bench("run", "--model", FACTORY, "--checkpoint", path, *SMOKE, "--out", tmp_path / "out")
    _one_line_error(res, "of another shape (features.0.weight: (4, 1, 3, 3) vs (8, 1, 3, 3)")


def test_a_pickle_with_code_is_refused(bench, site, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Payload()}, path)
    res = bench("run", "--model", FACTORY, "--checkpoint", path, *SMOKE, "--out", tmp_path / "out")
    _one_line_error(res, "holds Python objects other than tensors", "never unpickled")
    assert not marker.exists()


def test_normalize_is_the_same_as_normalising_by_hand(site):
    from bench import data, models

    spec = data.DATASETS["cifar10"]
    plain = models.build_model(FACTORY, spec)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    wrapped = models.build_model(FACTORY, spec, (mean, std))
    wrapped.load_state_dict(plain.state_dict())  # same keys: nothing of the normalisation is checkpoint state
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in plain.named_modules()]
    x = torch.rand(4, 3, 32, 32)
    by_hand = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    plain.eval(), wrapped.eval()
    with torch.no_grad():
        assert torch.allclose(wrapped(x), plain(by_hand), atol=1e-6)
        assert not torch.allclose(wrapped(x), plain(x), atol=1e-3)
        assert torch.allclose(copy.deepcopy(wrapped)(x), plain(by_hand), atol=1e-6)  # travels with deepcopy
    # a Sequential model (its children are its forward): normalisation still comes first, exactly once
    seq = models.build_model("bench_toy_models.nets:plain_mlp", spec)
    seq_n = models.build_model("bench_toy_models.nets:plain_mlp", spec, (mean, std))
    seq_n.load_state_dict(seq.state_dict())
    with torch.no_grad():
        assert torch.allclose(seq_n(x), seq(by_hand), atol=1e-6)


@pytest.mark.parametrize("value, channels, expected", [
    ("none", 3, None), ("0.5,0.25", 3, ((0.5,) * 3, (0.25,) * 3)),
    ("0.4914,0.4822,0.4465,0.2471,0.2435,0.2616", 3, ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))),
    ("cifar10", 3, ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))), ("0.3,0.38", 1, ((0.3,), (0.38,)))])
def test_normalize_forms(value, channels, expected):
    from bench import data, models

    assert models.parse_normalize(value, channels, data.DATASETS) == expected


@pytest.mark.parametrize("value, needle", [("0.5,0.25,0.1", "takes 2 values"), ("0.5,0", "every std must be > 0"),
                                          ("0.5,-1", "every std must be > 0"), ("a,b", "expects none"),
                                          ("cifar10", "3 channel(s), this one 1")])
def test_bad_normalize_is_one_line(bench, site, tmp_path, value, needle):
    res = bench("run", "--model", FACTORY, "--normalize", value, *SMOKE, "--out", tmp_path / "out")
    _one_line_error(res, needle)


def test_normalize_in_a_run_matches_normalising_the_images_by_hand(bench, trained, tmp_path):
    model, ds = trained
    path = tmp_path / "ck.pt"
    torch.save(model.state_dict(), path)
    res = bench("run", "--model", FACTORY, "--checkpoint", path, "--normalize", "0.3,0.4", *SMOKE,
                "--out", tmp_path / "out")
    assert res.code == 0, res.err
    with torch.no_grad():
        correct = (model((ds.test.x - 0.3) / 0.4).argmax(1) == ds.test.y).sum().item()
    assert accuracies(res.out)["clean"] == pytest.approx(100 * correct / len(ds.test.y), abs=0.006)
    plain = bench("run", "--model", FACTORY, "--checkpoint", path, *SMOKE, "--out", tmp_path / "out")
    assert plain.out.split("run ")[1][:10] != res.out.split("run ")[1][:10]  # another run, not a reuse


def test_run_identity_follows_the_model_source(site, tmp_path, monkeypatch):
    """Editing the model's code makes a new run id; the built-ins' identities carry no digest."""
    from bench import runner

    pkg = tmp_path / "mymodels"
    pkg.mkdir()
    source = (PLUGINS / "model_plugin" / "bench_toy_models" / "nets.py").read_text()
    (pkg / "edited_net.py").write_text(source)
    monkeypatch.syspath_prepend(str(pkg))

    def run_id(model: str) -> str:
        req = runner.Request(arch=model, preset="smoke", attacks="fgsm", out=str(tmp_path / "out"), device="cpu")
        return runner.prepare(req).config.run_id

    before = run_id("edited_net:toy_net")
    assert run_id("edited_net:toy_net") == before
    (pkg / "edited_net.py").write_text(source + "\n# a changed comment is a changed model file\n")
    assert run_id("edited_net:toy_net") != before
    req = runner.Request(defense="pgd_at", preset="smoke", attacks="fgsm", out=str(tmp_path / "out"), device="cpu")
    assert "model_source" not in runner.prepare(req).config.identity()


@pytest.mark.parametrize("model, needle", [
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz: ModuleNotFoundError"),
    ("bench_toy_models.nets:toy_nett", "has no attribute 'toy_nett' (did you mean 'toy_net'?)"),
    ("bench_toy_models.nets:wrong_classes", "must return logits of shape (batch, 10)"),
    ("path/to/file.py:f", "is not an import path"),
    ("resnet2O", "did you mean 'resnet20'"),
    ("toy_broken", "could not load model 'toy_broken'"),
])
def test_bad_model_names_are_one_line(bench, site, tmp_path, model, needle):
    res = bench("run", "--model", model, *SMOKE, "--out", tmp_path / "out")
    _one_line_error(res, needle)


def test_as_is_without_checkpoint(bench, site, tmp_path):
    # a built-in's weights would be random: refused
    res = bench("run", "--model", "tiny_cnn", *SMOKE, "--out", tmp_path / "out")
    _one_line_error(res, "as_is", "weights are random")
    # a user factory may load its own weights: evaluated, with a warning
    res = bench("run", "--model", FACTORY, *SMOKE, "--out", tmp_path / "out")
    assert res.code == 0, res.err
    assert "no --checkpoint given" in res.err
    # several checkpoints: the recipe parameter chooses
    path = tmp_path / "ck.pt"
    from bench import data, models

    torch.save(models.build_model(FACTORY, data.DATASETS["digits"]).state_dict(), path)
    args = ["run", "--model", FACTORY, "--checkpoint", path, "--checkpoint", f"trades={path}", *SMOKE,
            "--out", tmp_path / "out"]
    _one_line_error(bench(*args), "2 checkpoints given", "--param recipe=NAME")
    assert bench(*args, "--param", "recipe=trades").code == 0
    # without --model, --defense is still required
    _one_line_error(bench("run", *SMOKE, "--out", tmp_path / "out"), "no defense given")


def test_ft_bn_starts_from_the_user_checkpoint(bench, trained, tmp_path):
    """`--defense ft_bn --model ... --checkpoint ...`: its base (epoch 0 of the curve) is the user's model."""
    from bench import train
    from bench.store import Store

    model, ds = trained
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    res = bench("run", "--defense", "ft_bn", "--model", FACTORY, "--checkpoint", path, *SMOKE,
                "--out", tmp_path / "out")
    assert res.code == 0, res.err
    store = Store(tmp_path / "out")
    try:
        run = next(r for r in store.runs() if r["defense"] == "ft_bn")
    finally:
        store.close()
    assert run["arch"] == FACTORY
    assert run["info"]["curve"][0]["clean"] == pytest.approx(train.accuracy(model, ds.val, torch.device("cpu")))


def test_ft_bn_on_a_model_without_bn(bench, site, tmp_path):
    """A user model may lack what a defense needs: one line naming it (exit 2), not a torch error."""
    from bench import data, models

    path = tmp_path / "mlp.pt"
    torch.save(models.build_model("bench_toy_models.nets:plain_mlp", data.DATASETS["digits"]).state_dict(), path)
    res = bench("run", "--defense", "ft_bn", "--model", "bench_toy_models.nets:plain_mlp", "--checkpoint", path,
                *SMOKE, "--out", tmp_path / "out")
    _one_line_error(res, "ft_bn needs batch-norm layers")


def test_bench_list_shows_models(bench, site):
    res = bench("list")
    assert res.code == 0
    models_section = res.out.split("Models:")[1]
    for name in ("tiny_cnn", "resnet20", "wrn34_10", "toy_net"):
        assert re.search(rf"^\s+{name}\s+\S", models_section, re.M), name
    assert re.search(r"toy_broken\s+BROKEN", models_section)
    assert "as_is" in res.out.split("Attacks:")[0]


def test_register_instance(site):
    from bench import data, models
    from bench_toy_models.nets import ToyNet

    spec = data.DATASETS["digits"]
    torch.manual_seed(0)
    a = ToyNet(1, 10)
    name = models.register_instance(a)
    assert name.startswith("bench_toy_models.nets.ToyNet@")
    assert models.register_instance(copy.deepcopy(a)) == name  # same class and weights, same name
    b = ToyNet(1, 10)
    assert models.register_instance(b) != name
    built = models.build_model(name, spec)
    assert built is not a and torch.equal(built.head.weight, a.head.weight)
    with torch.no_grad():
        a.head.weight.add_(1.0)  # the name stands for the weights it was registered with
    assert not torch.equal(models.build_model(name, spec).head.weight, a.head.weight)
