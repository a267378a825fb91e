"""Fuzzing (issue 40): hypothesis generates what a user or a file hands bnbench -- parameter values, attack
specs, --threat, --normalize, --set/--param/--attack-param, dataset options, TOML run and sweep files, image
folders, .npz/.pt tensors files, checkpoints, results databases with mutated rows -- and every example must
keep the contract: `bench` exits 0 with its results, or exits 2 with exactly one stderr line starting
`bench: error:`; never a traceback, never exit 1 from an uncaught exception; and what the command only reads
keeps its bytes (the TOML file, the image tree, the tensors file, the checkpoint and its folder, the results
database, the sources of a merge, and its target when it fails).

Nothing trains. `bench run` is called in-process and stopped where the work would start: `runner.execute` is
replaced by a stop that exits STOPPED once the run is prepared, i.e. once every parser, reader and check has
accepted it. A few examples (test_generated_runs_run_to_the_end) run whole: `as_is` with a checkpoint evaluates
without training. The generators are type-aware (mostly well-formed values carrying hostile text, numbers and
structure), so that examples get past the first check and reach the readers.

Budgets (hypothesis profiles in tests/conftest.py; each test takes a share of max_examples, `examples`):
    pytest tests/test_fuzzing.py                      # ci: 1,423 examples, derandomized, 1-2 minutes
    BENCH_FUZZ=release pytest tests/test_fuzzing.py   # release: 25 times as many (35,575), fresh each run:
                                                      # about an hour on 2 cores
A release failure prints a @reproduce_failure line and its seed (rerun with --hypothesis-seed=N). Add
--hypothesis-show-statistics to see what the inputs reached (each exit, and the kinds of error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import re
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, example, given, settings, strategies as st
from hypothesis.control import currently_in_test_context

from bench import config, models, registry, runner
from bench.config import Preset
from bench.store import DB_NAME, Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STOPPED = 100  # the exit of the stand-in for runner.execute: the run was accepted, the work would start now

# `bench` reads capsys before and after each call and the patches hold for the whole test, so the
# function-scoped fixtures are safe to share between examples
FUZZ = dict(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.filter_too_much],
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])  # (no explain: minutes)


def examples(ci: int) -> int:
    """A test's budget: `ci` examples under the ci profile (max_examples 100), scaled with the profile."""
    return max(1, round(ci * settings.default.max_examples / 100))


def fuzz(ci: int):
    return settings(max_examples=examples(ci), **FUZZ)


# ----------------------------------------------------------------------------------------------------
# the contract


def _kind(err: str) -> str:
    """An error's kind, for hypothesis' statistics: its words without quoted values, paths and numbers."""
    text = err.removeprefix("bench: error: ")
    text = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|\d+", "_", text)
    return " ".join(text.split()[:8])


def _event(text: str) -> None:
    if currently_in_test_context():  # (the example tests check the contract too)
        event(text)


def check(res, *, success=(0,)):
    """Exit 2 with one line `bench: error: ...`, or one of `success`; never a traceback."""
    both = res.out + res.err
    assert "Traceback" not in both, both[-4000:]
    if res.code == 2:
        assert res.err.startswith("bench: error: "), res.err[-4000:]
        # one line: no line break of any kind (a carriage return or U+2028 splits it as well as a newline)
        assert res.err.endswith("\n") and len(res.err.splitlines()) == 1, f"not one line: {res.err!r}"
        _event("exit 2: " + _kind(res.err))
    else:
        assert res.code in success, (res.code, both[-4000:])
        _event(f"exit {res.code}")
    return res


def _stop(prep, *, quiet=False, store=None):
    cfg = prep.config
    # what the run would store must serialize exactly: no NaN or infinity in its identity
    json.dumps(cfg.identity(), allow_nan=False, default=str)
    for path in (cfg.out, cfg.data_dir, *(p for _, p, _ in cfg.base_checkpoints)):
        if path is not None:  # the work would open these: a path the OS refuses to look up must not get here
            with contextlib.suppress(OSError):
                os.stat(path)
    raise SystemExit(STOPPED)


@pytest.fixture
def prepared(bench, monkeypatch, tmp_path):
    """`bench run --preset smoke --quiet --out OUT ARGS...` stopped where the work would start, in a
    scratch working directory; it asserts the contract and that nothing was written to OUT."""
    monkeypatch.setattr(runner, "execute", _stop)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"

    def call(*args):
        before = tree_digest(tmp_path)
        res = check(bench("run", "--preset", "smoke", "--quiet", "--out", out, *args), success=(STOPPED,))
        assert tree_digest(tmp_path) == before and not out.exists()  # nothing written, in OUT or here
        return res

    return call


def tree_digest(root: Path) -> dict:
    """Every file, link and folder under `root` with its bytes' digest (or link target)."""
    out = {}
    for path in sorted(Path(root).rglob("*")) + [Path(root)]:
        if path.is_symlink():
            out[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[str(path)] = "dir"
    return out


def file_state(path: Path):
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# ----------------------------------------------------------------------------------------------------
# text a user types


ARG = st.characters(codec="utf-8", exclude_characters="\0")  # what argv can hold: any character but NUL


def text(max_size: int = 10):
    return st.text(ARG, max_size=max_size)


def mostly(usual, other, odds: int = 4):
    """`usual`, but one time in `odds` `other`."""
    return st.integers(1, odds).flatmap(lambda i: usual if i > 1 else other)


# numbers as a user writes them, right and wrong
NUMBER_WORDS = ["8/255", "0.5", "1e-300", "1e309", "-1e309", "-0", "0", "nan", "inf", "-inf", "NaN", "1/0",
                "0/0", "1e999/1", "1/1e-999", "2**3", "", " ", "1,2", "1;2", "True", "none", "None", "1_0", "0x1f",
                "٣", "１", "1.5e+2", ".5", "5.", "+3", "3 ", " 3", "1e3", "9" * 40, "-9" * 20, "1" + "0" * 400,
                "0." + "0" * 300 + "1", "4/255/2", "/255", "8/", "3.0", "2e0"]
number = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(0, 1).map(str),
    st.tuples(st.integers(-300, 300), st.integers(-300, 300)).map("{0[0]}/{0[1]}".format),
    st.sampled_from(NUMBER_WORDS),
)
WORDS = ["Linf", "L2", "L1", "linf", "true", "false", "yes", "off", "none", "ce", "dlr", "val", "test", "last", "best",
         "exact", "auto", "nchw", "nhwc", "RGB", "L", "step", "cosine", "pgd", "affine", "all", "pgd_at", "standard"]
plausible = st.one_of(st.floats(1e-4, 1).map(repr), st.integers(1, 50).map(str),
                      st.integers(1, 255).map("{}/255".format), st.sampled_from(WORDS))  # what a parameter takes
value = st.one_of(plausible, plausible, number, text())

ATTACKS = registry.names("attack")
DEFENSES = registry.names("defense")
ATTACK_PARAMS = {n: sorted(registry.load("attack", n).PARAMS) for n in ATTACKS}
DEFENSE_PARAMS = {n: sorted(registry.load("defense", n).PARAMS) for n in DEFENSES}
PRESET_FIELDS = [f.name for f in dataclasses.fields(Preset)]
PLUGIN_PARAMS = sorted({p for ps in [*ATTACK_PARAMS.values(), *DEFENSE_PARAMS.values()] for p in ps})


@st.composite
def attack_item(draw):
    """One item of --attacks: name[key=value;...], mostly well formed, with hostile names, keys and values."""
    name = draw(mostly(st.sampled_from(ATTACKS), text(8), odds=8))
    keys = st.sampled_from(ATTACK_PARAMS.get(name) or PLUGIN_PARAMS)
    pairs = draw(st.lists(st.tuples(mostly(keys, text(5), odds=8), st.sampled_from(["="] * 12 + ["", "=="]), value),
                          max_size=3))
    item = name
    if pairs or draw(st.booleans()):
        item += "[" + draw(st.sampled_from([";"] * 4 + [",", "; "])).join("".join(p) for p in pairs) + "]"
    noise = draw(st.sampled_from(["none"] * 15 + ["unclosed", "closed twice", "opened twice", "suffix", "spaces"]))
    if noise == "unclosed":
        item = item.rstrip("]")
    elif noise == "closed twice":
        item += "]"
    elif noise == "opened twice":
        item = item.replace("[", "[[", 1)
    elif noise == "suffix":
        item += draw(text(3))
    elif noise == "spaces":
        item = f" {item} "
    return item


attacks_arg = st.one_of(
    st.lists(attack_item(), min_size=1, max_size=3).map(",".join),
    st.lists(attack_item(), min_size=1, max_size=3).map(lambda items: ",".join(["default"] + items)),
    st.sampled_from(["default", "all", ",", "", "default,default", "fgsm,,pgd10", "[", "]", "[]"]),
    text(),
)

NORM_WORDS = ["Linf", "L2", "L1", "linf", "LINF", "l2", " L1 ", "L∞", "Linfinity", "", "inf", "2", "L0"]
threat_arg = st.one_of(
    st.tuples(mostly(st.sampled_from(NORM_WORDS[:3]), st.sampled_from(NORM_WORDS)),
              st.sampled_from([":"] * 12 + ["=", "::", "", ": "]), mostly(plausible, number, odds=2)).map("".join),
    text(),
)

DATASET_NAMES = ["digits", "imagefolder", "tensors"]  # never one that downloads
normalize_arg = st.one_of(
    st.sampled_from(["none", "None", "NONE", "", " ", "digits", "cifar10", "cifar100", "tinyimagenet", "imagenet"]),
    st.lists(number, max_size=7).map(",".join),
    st.lists(st.floats(-2, 2).map(str), min_size=2, max_size=6).map(",".join),
    text(),
)


def assignment(keys):
    return st.tuples(mostly(keys, text(6)), st.sampled_from(["="] * 6 + ["", " = "]), value).map("".join)


OPTION_VALUES = {  # the dataset options' values: sizes small, or beyond the limit (none that takes gigabytes)
    "size": st.one_of(st.integers(-3, 300).map(str), st.sampled_from(["", "8.0", "1e2", "none", "+8", "08", "0x10",
                                                                      "100000", "9" * 40])),
    "mode": st.sampled_from(["auto", "L", "RGB", "rgb", "RGBA", "I;16", "", "P"]),
    "layout": st.sampled_from(["auto", "nchw", "nhwc", "NCHW", "", "nhw"]),
    "num_classes": st.one_of(st.integers(-2, 40).map(str), st.sampled_from(["", "1e3", "none", "2.5"])),
    "mean": st.lists(number, max_size=4).map(",".join),
    "std": st.lists(number, max_size=4).map(",".join),
}


@st.composite
def dataset_item(draw):
    name = draw(mostly(st.sampled_from(DATASET_NAMES), text(8)))
    keys = list(OPTION_VALUES) if name in ("imagefolder", "tensors") else PRESET_FIELDS[:3]
    pairs = draw(st.lists(st.sampled_from(keys).flatmap(lambda k: st.tuples(st.just(k), OPTION_VALUES.get(k, value)))
                          | st.tuples(text(5), value), max_size=3))
    if not pairs and draw(st.booleans()):
        return name
    return name + "[" + ";".join(f"{k}={v}" for k, v in pairs) + "]" + draw(st.sampled_from([""] * 8 + ["]", "x"]))


# ----------------------------------------------------------------------------------------------------
# files the tests read data and weights from


def _images(n: int, channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small valid inputs: an image folder (2 classes, 8x8 grey), an RGB .npz, a tiny_cnn checkpoint for
    digits (random weights, seeded)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fuzz-files")
    tree = root / "tree"
    for seed, (split, n, c) in enumerate((s, n, c) for s, n in (("train", 5), ("test", 3)) for c in "ab"):
        (tree / split / c).mkdir(parents=True)
        for i, pixels in enumerate(_images(n, 1, seed)):
            Image.fromarray(pixels[0]).save(tree / split / c / f"{i}.png")
    rgb = root / "rgb.npz"
    y = np.arange(12) % 3
    np.savez(rgb, x_train=_images(12, 3, 1), y_train=y, x_test=_images(6, 3, 2), y_test=y[:6])
    torch.manual_seed(0)
    checkpoint = root / "tiny_cnn.pt"
    torch.save(models.build_model("tiny_cnn", _digits_spec()).state_dict(), checkpoint)
    return dict(tree=tree, rgb=rgb, checkpoint=checkpoint, root=root)


def _digits_spec():
    from bench import data

    return data.DATASETS["digits"]


SMALL_DATA = ["--set", "n_train=none", "--set", "n_val=2", "--set", "n_test=none", "--set", "n_val_robust=2"]


def _data_args(dataset: str, files: dict) -> list[str]:
    """--data-dir (and caps the small files allow) for a dataset item."""
    name = dataset.partition("[")[0].strip()
    if name == "imagefolder":
        return ["--data-dir", files["tree"], *SMALL_DATA]
    if name == "tensors":
        return ["--data-dir", files["rgb"], *SMALL_DATA]
    return []


# ----------------------------------------------------------------------------------------------------
# command-line values


@fuzz(100)
@example(attacks="cw_l2[c=1e307]", threat=None)  # (was: OverflowError in the label, a traceback)
@given(attacks=attacks_arg, threat=st.none() | threat_arg)
def test_attack_specs(attacks, threat, prepared):
    prepared("--defense", "standard", "--attacks", attacks, *(["--threat", threat] if threat is not None else []))


@fuzz(60)
@given(threat=threat_arg, attacks=st.sampled_from(["default", "fgsm", "pgd10", "pgd10,cw_l2", "deepfool", "all",
                                                   "apgd[loss=dlr]", "pgd10[norm=L2]", "square,fgsm"]))
def test_threat(threat, attacks, prepared):
    prepared("--defense", "standard", "--attacks", attacks, "--threat", threat)


@fuzz(80)
@given(normalize=normalize_arg, rgb=st.booleans(), model=st.booleans())
def test_normalize(normalize, rgb, model, prepared, files):
    data = ["--dataset", "tensors", "--data-dir", files["rgb"], *SMALL_DATA] if rgb else []
    # with a checkpoint the model is built (with the normalisation in front) and loaded before the work
    weights = ["--model", "tiny_cnn", "--checkpoint", files["checkpoint"]] if model and not rgb else \
        ["--defense", "standard"]
    prepared(*weights, "--attacks", "fgsm", "--normalize", normalize, *data)


@fuzz(150)
@given(defense=st.sampled_from(["standard", "ft_bn", "rift", "norm_shaping", "bn_stats", "adv_bn_only"]),
       attacks=st.sampled_from(["fgsm", "pgd10", "fgsm,pgd10", "deepfool", "apgd", "square"]), data=st.data())
def test_run_option_values(defense, attacks, data, prepared):
    """--set FIELD=VALUE, --param KEY=VALUE, --attack-param ATTACK.KEY=VALUE, --seed, --seeds, --meta."""
    args = []
    for value_ in data.draw(st.lists(assignment(st.sampled_from(PRESET_FIELDS + PLUGIN_PARAMS[:6])), max_size=3)):
        args += ["--set", value_]
    for value_ in data.draw(st.lists(assignment(st.sampled_from(DEFENSE_PARAMS[defense] or ["epochs"])), max_size=3)):
        args += ["--param", value_]
    names = attacks.split(",")
    attack_keys = st.sampled_from(names + ["pgd50", ""]).flatmap(
        lambda a: st.sampled_from(ATTACK_PARAMS.get(a) or ["eps"]).map(lambda k: f"{a}.{k}"))
    for value_ in data.draw(st.lists(assignment(attack_keys), max_size=2)):
        args += ["--attack-param", value_]
    extra = data.draw(st.sampled_from(["none", "seed", "seeds", "meta", "protocol", "device"]))
    if extra != "none":
        flag = {"seed": "--seed", "seeds": "--seeds", "meta": "--meta", "protocol": "--protocol",
                "device": "--device"}[extra]
        args += [flag, data.draw({"seed": number, "seeds": st.lists(number, max_size=3).map(",".join),
                                  "meta": assignment(st.sampled_from(list(config.META_FIELDS) + ["reported:L2"])),
                                  "protocol": st.sampled_from(["adaptive", "paper", "paper:x", "Adaptive"]) | text(),
                                  "device": st.sampled_from(["cpu", "auto", "cuda:x", "cpu:0"]) | text()}[extra])]
    prepared("--defense", defense, "--attacks", attacks, *args)


@fuzz(100)
@given(dataset=dataset_item())
def test_dataset_options(dataset, prepared, files):
    before = {k: tree_digest(files[k]) if k == "tree" else file_state(files[k]) for k in ("tree", "rgb")}
    prepared("--defense", "standard", "--attacks", "fgsm", "--dataset", dataset, *_data_args(dataset, files))
    assert before == {k: tree_digest(files[k]) if k == "tree" else file_state(files[k]) for k in ("tree", "rgb")}


def test_imagefolder_size_beyond_the_pixel_limit_is_one_line(prepared, files):
    """`size` is the side every image is resized to: one so large that the images cannot be held is
    refused in a line before anything is allocated (was: numpy's MemoryError, or the machine's memory filled)."""
    for size in ("10000000", "9" * 40):
        res = prepared("--defense", "standard", "--attacks", "fgsm", "--dataset", f"imagefolder[size={size}]",
                       "--data-dir", files["tree"], *SMALL_DATA)
        assert res.code == 2 and "size" in res.err, res.err


# ----------------------------------------------------------------------------------------------------
# TOML run and sweep files


def _toml_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(i) for i in v) + "]"
    return "{" + ", ".join(f"{_toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_document(table: dict) -> str:
    """`table` as TOML; a list of tables under `cells` as [[cells]] (as sweep files write them)."""
    cells = table.get("cells")
    tables = isinstance(cells, list) and cells and all(isinstance(c, dict) for c in cells)
    lines = [f"{_toml_string(k)} = {toml_value(v)}" for k, v in table.items() if not (k == "cells" and tables)]
    for cell in cells if tables else ():
        lines += ["[[cells]]"] + [f"{_toml_string(k)} = {toml_value(v)}" for k, v in cell.items()]
    return "\n".join(lines) + "\n"


TOML_TEXT = st.text(st.characters(codec="utf-8"), max_size=10)  # a file can hold NUL ("\u0000")
toml_scalar = st.one_of(TOML_TEXT, st.sampled_from(WORDS), st.integers(-2**70, 2**70), st.floats(),
                        st.booleans(), st.dates(), st.times(), st.datetimes())
toml_any = st.recursive(toml_scalar | st.builds(list) | st.builds(dict),
                        lambda inner: st.lists(inner, min_size=1, max_size=3)
                        | st.dictionaries(TOML_TEXT, inner, min_size=1, max_size=3), max_leaves=6)
plain = st.one_of(value, st.integers(-2**64, 2**64), st.floats(), st.booleans())  # a parameter's value


PARAM_KINDS = [(int, float), (float, float), (bool, float), (str, float), (tuple, int), (tuple, float), (tuple, str)]


@fuzz(500)
@example(kind=(float, float), bounds={}, raw="1e307")  # (was: OverflowError writing its exact text)
@given(kind=st.sampled_from(PARAM_KINDS), bounds=st.sampled_from([{}, {"low": 1}, {"above": 0, "high": 1}]),
       raw=st.one_of(value, st.lists(value, max_size=3).map(",".join), toml_scalar,
                     st.lists(toml_scalar | plain, max_size=3)))
def test_parameter_values(kind, bounds, raw):
    """What every parameter, preset field, dataset option and budget goes through (params.convert), given
    command-line text or TOML values: a value of the declared type in its range, whose exact text reads back
    as the same value; or one BenchError line. (was: a TOML [true, 2.5] became the tuple of ints (1, 2))"""
    from bench.errors import BenchError
    from bench.params import Param, convert, exact_text

    kind, item = kind
    numeric = bounds if (kind in (int, float) or item in (int, float)) and kind is not bool else {}
    spec = Param(None if kind is str else kind(), "p", kind=kind, item=item, **numeric)
    try:
        out = convert("p", spec, raw)
    except BenchError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        _event(f"{kind.__name__}: refused")
        return
    _event(f"{kind.__name__}: accepted")
    given = [r for r in raw if not (isinstance(r, str) and not r.strip())] if kind is tuple and \
        isinstance(raw, list) else [raw]
    for r, v in zip(given, out if kind is tuple else (out,)):  # a number given as a number is taken as it is
        if isinstance(r, (int, float)) and type(v) in (int, float):  # (an int for a float: its nearest float)
            assert not isinstance(r, bool) and (float(r) if type(v) is float else r) == v, (raw, out)
    for v in out if kind is tuple else (out,):
        assert type(v) is (item if kind is tuple else kind), (raw, out)
        if type(v) in (int, float):  # (an int may be of any size: 10**400 is one)
            assert type(v) is int or math.isfinite(v)
            assert numeric.get("low", -math.inf) <= v <= numeric.get("high", math.inf)
            assert v > numeric.get("above", -math.inf)
    if kind is tuple and item is not str:
        assert convert("p", spec, ",".join(exact_text(v) for v in out)) == out
    elif kind in (int, float):
        assert convert("p", spec, exact_text(out)) == out


def _setting_values(files: dict) -> dict:
    """Per TOML key of a run (config.SETTINGS), sweep axis and grid: (values it takes, hostile values)."""
    paths = st.sampled_from([str(files["tree"]), str(files["rgb"]), str(files["checkpoint"]), str(files["root"])])
    good_attacks = st.sampled_from(["fgsm", "pgd10", "default", "fgsm,deepfool[steps=2]", "pgd10[eps=4/255;steps=3]"])
    return {
        "defense": (st.sampled_from(["standard", "ft_bn", "rift", "pgd_at", "bn_stats"]),
                    st.sampled_from(["as_is", "Standard", ""]) | text(8)),
        "params": (st.just({}), st.dictionaries(st.sampled_from(PLUGIN_PARAMS) | TOML_TEXT,
                                                 plain | st.lists(plain, max_size=3), max_size=3)),
        "attacks": (good_attacks | st.lists(good_attacks, min_size=1, max_size=2),
                    attacks_arg | st.lists(attack_item(), max_size=3)),
        "attack_params": (st.sampled_from([{}, {"fgsm": {"eps": 0.05}}]),
                          st.dictionaries(st.sampled_from(ATTACKS[:4]) | TOML_TEXT,
                                          st.dictionaries(st.sampled_from(["eps", "steps", "norm"]) | TOML_TEXT, plain,
                                                          max_size=2), max_size=2)),
        "threat": (st.sampled_from(["Linf:0.05", "linf:8/255", "L2:0.5"]), threat_arg),
        "preset": (st.sampled_from(["smoke", "quick"]), st.sampled_from(["Smoke", "", "mini "]) | text(6)),
        "dataset": (st.sampled_from(["digits", "tensors", "imagefolder[size=8]", "imagefolder"]), dataset_item()),
        "data_dir": (paths, text()),  # (mostly set with its dataset, below)
        "arch": (st.sampled_from(["tiny_cnn", "small_cnn"]),
                 st.sampled_from(["math:sqrt", "no.such:thing", "tiny_cnn:x", "resnet20"]) | text(8)),
        "normalize": (st.sampled_from(["none", "0.5,0.25", "digits"]), normalize_arg),
        "device": (st.sampled_from(["cpu", "auto"]), st.sampled_from(["cuda", "cuda:1", "tpu"]) | text(4)),
        "seed": (st.integers(0, 10), st.integers(-2, 2**64)),
        "protocol": (st.just("adaptive"), st.sampled_from(["paper", "paper:x"]) | text(6)),
        "out": (st.sampled_from(["results", "r/s"]), st.sampled_from([".", "/", "~"]) | text()),
        "precision": (st.sampled_from(["auto", "fp32"]), st.sampled_from(["bf16", "fp16", "FP32"]) | text(4)),
        "compile": (st.booleans(), toml_scalar), "checks": (st.booleans(), toml_scalar),
        "save_adversarial": (st.booleans(), toml_scalar),
        "set": (st.sampled_from([{}, {"n_test": 32}, {"eps": 0.05, "pgd_steps": 2}]),
                st.dictionaries(st.sampled_from(PRESET_FIELDS) | TOML_TEXT,
                                st.one_of(value, st.integers(-5, 700), st.floats(), st.booleans()), max_size=3)),
        "base_checkpoint": (st.just(str(files["checkpoint"])),
                            paths | text() | st.dictionaries(st.sampled_from(["pgd_at", "standard", "x"]), paths,
                                                             max_size=2)),
        "meta": (st.sampled_from([{}, {"authors": "A. B."}, {"link": "https://example.org/p", "reported:L2": "40"}]),
                 st.dictionaries(st.sampled_from(list(config.META_FIELDS) + ["reported:L2", "link:Linf"]) | TOML_TEXT,
                                 st.one_of(TOML_TEXT, st.sampled_from(["https://example.org/p", "javascript:x"]),
                                           st.integers(), st.floats()), max_size=2)),
        "seeds": (st.sampled_from([0, [0, 1], [3]]), st.integers(-1, 3) | st.lists(st.integers(-1, 3), max_size=2)),
        "protocols": (st.sampled_from(["adaptive", ["adaptive"]]),
                      st.sampled_from(["paper", "Adaptive"]) | st.lists(st.sampled_from(["adaptive", "paper:x"]),
                                                                       max_size=2)),
        "grid": (st.sampled_from([{}, {"epochs": [1, 2]}, {"lr": 0.01}]),
                 st.dictionaries(st.sampled_from(PLUGIN_PARAMS) | TOML_TEXT, st.lists(plain, max_size=2) | plain,
                                 max_size=2)),
    }


DATA_DIRS = {"tensors": "rgb", "imagefolder": "tree"}


def table_of(keys, values, files, *, required=("defense",), odds: int = 5):
    """A TOML table over `keys`: the required ones mostly present; each value of its kind mostly (hostile one
    time in `odds`, a third of those any TOML value); a dataset with the data it needs mostly; an unknown
    key one time in 4 * `odds`."""
    @st.composite
    def build(draw):
        chosen = draw(st.lists(st.sampled_from(sorted(keys)), max_size=5, unique=True))
        chosen += [k for k in required if k not in chosen and draw(st.integers(0, 5))]
        out = {}
        for key in chosen:
            good, hostile = values[key]
            out[key] = draw(mostly(good, mostly(hostile, toml_any, odds=3), odds=odds))
        dataset = out.get("dataset")
        if isinstance(dataset, str) and "data_dir" in keys and "data_dir" not in out and draw(st.integers(0, 5)):
            where = DATA_DIRS.get(dataset.partition("[")[0])
            if where:
                out["data_dir"] = str(files[where])
                if "set" in keys and "set" not in out:  # its few images
                    out["set"] = {"n_train": "none", "n_val": 2, "n_test": "none", "n_val_robust": 2}
        if not draw(st.integers(0, 4 * odds - 1)):
            out[draw(TOML_TEXT)] = draw(toml_any)
        return out
    return build()


def mutated_bytes(data: bytes):
    """`data` as it is, or cut, with bytes flipped, inserted or removed (a damaged or foreign file)."""
    @st.composite
    def build(draw):
        how = draw(st.sampled_from(["same"] * 15 + ["cut", "flip", "insert", "delete", "random"]))
        if how == "same" or (not data and how != "random"):
            return data
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if how == "cut":
            return data[:i]
        if how == "flip":
            return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        if how == "insert":
            return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
        if how == "delete":
            return data[:i] + data[i + draw(st.integers(1, 8)):]
        return draw(st.binary(max_size=200))
    return build()


def _write_toml(draw, table: dict, where: Path) -> bytes:
    document = toml_document(table)
    assert tomllib.loads(document) == table or _has_nan(table), document  # (the writer above is right)
    if not draw(st.integers(0, 19)):  # arrays or inline tables nested deeper than any parser's stack
        depth = draw(st.integers(1, 3000))
        nested = "[" * depth + "]" * depth if draw(st.booleans()) else "{a=" * depth + "1" + "}" * depth
        document = f"{_toml_string(draw(st.sampled_from(['attacks', 'params', 'x'])))} = {nested}\n" + document
    data = draw(mutated_bytes(document.encode()))
    where.write_bytes(data)
    return data


def _has_nan(v) -> bool:
    if isinstance(v, float):
        return math.isnan(v)
    if isinstance(v, dict):
        return any(_has_nan(x) for x in v.values())
    return isinstance(v, list) and any(_has_nan(x) for x in v)


@fuzz(80)
@given(data=st.data())
def test_toml_run_files(data, bench, files, tmp_path, monkeypatch):
    """`bench run --config FILE`, the file's settings alone (its out, preset, ...), stopped before the work:
    nothing is written, in the working directory or anywhere it names."""
    monkeypatch.setattr(runner, "execute", _stop)
    monkeypatch.chdir(tmp_path)
    table = data.draw(table_of(config.TOML_KEYS, _setting_values(files), files))
    table.setdefault("preset", "smoke")
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        path = Path(scratch) / "run.toml"
        written = _write_toml(data.draw, table, path)
        before = tree_digest(tmp_path), tree_digest(files["root"])
        check(bench("run", "--config", path, "--quiet"), success=(STOPPED,))
        assert (tree_digest(tmp_path), tree_digest(files["root"])) == before


def _jobs_expected(table: dict) -> int:
    """How many runs a sweep file asks for (what `--dry-run` must list): per cell, the product of its grid's
    lists times its seeds times its protocols."""
    def many(v):
        return len(v) if isinstance(v, list) else 1

    total = 0
    for cell in table["cells"]:
        merged = {**table, **cell}
        n = many(merged.get("seeds", 0)) * many(merged.get("protocols", "adaptive"))
        for v in cell.get("grid", {}).values():
            n *= many(v)
        total += n
    return total


@fuzz(70)
@given(data=st.data(), command=st.sampled_from(["--dry-run"] * 3 + ["--status"]),
       shard=st.none() | st.none() | st.sampled_from(["1/2", "2/2", "0/1", "3/2", "1/0", "a/b", "1"]))
def test_sweep_files(data, command, shard, bench, files, tmp_path, monkeypatch):
    """`bench sweep FILE --dry-run` (which prepares every job) and `--status`: nothing written; a dry run of an
    intact file lists every run the file asks for."""
    from bench.sweep import CELL_KEYS, TOP_KEYS

    monkeypatch.chdir(tmp_path)
    values = _setting_values(files)
    # a sweep file has more keys than a run file: fewer hostile values each, for as many valid files
    top = data.draw(table_of(set(TOP_KEYS) - {"cells"}, values, files, required=(), odds=12))
    top.setdefault("preset", "smoke")
    at_least = 1 if data.draw(st.integers(0, 5)) else 0  # (no cells one time in six)
    cells = data.draw(st.lists(table_of(set(CELL_KEYS), values, files, odds=12), min_size=at_least, max_size=3))
    table = {**top, "cells": cells} if cells or data.draw(st.booleans()) else top
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        path = Path(scratch) / "sweep.toml"
        written = _write_toml(data.draw, table, path)
        before = tree_digest(tmp_path), tree_digest(files["root"])
        res = check(bench("sweep", path, command, *(["--shard", shard] if shard else [])))
        # neither a dry run nor --status writes anything
        assert (tree_digest(tmp_path), tree_digest(files["root"])) == before
    if res.code == 0 and command == "--dry-run" and shard is None and written == toml_document(table).encode():
        assert res.out.count("bench run") == _jobs_expected(table), res.out


def _deepest_list_parsed() -> int:
    """How deep tomllib parses nested arrays from this depth of the stack."""
    low, high = 1, 5000
    while low < high:
        mid = (low + high + 1) // 2
        try:
            tomllib.loads("x = " + "[" * mid + "]" * mid)
            low = mid
        except RecursionError:
            high = mid - 1
    return low


@pytest.mark.parametrize("document, message", [
    # (was: a traceback "embedded null byte" once the run opened the folder)
    ('defense = "standard"\nout = "results\\u0000/x"\n', "'out' holds a NUL character"),
    ('defense = "standard"\nset = { "\\u0000" = 1 }\n', "'set' holds a NUL character"),
    # (was: RecursionError, in tomllib beyond ~500 levels, below that in the checks of the values)
    ('defense = "standard"\nattacks = ' + "[" * 5000 + "]" * 5000 + "\n", "nests arrays or tables too deeply"),
    ('defense = "standard"\nset = { k = ' + "{a=" * 900 + "1" + "}" * 900 + " }\n", "too deeply"),
    # as deep as tomllib parses here ({deep}), less what `bench` adds to the stack: a recursion over it overflowed
    ('defense = "standard"\nattacks = {deep}\n', "'attacks' must be a string or a list"),
    ('defense = "standard"\nset = {{ k = {deep} }}\n', "'set' must be a table of values"),
])
def test_toml_files_that_no_parser_should_take_are_one_line(document, message, bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "{deep}" in document:
        depth = _deepest_list_parsed() - 60
        document = document.format(deep="[" * depth + "]" * depth)
    path = tmp_path / "run.toml"
    path.write_text(document)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('preset = "smoke"\n' + document.removeprefix('defense = "standard"\n') +
                     '[[cells]]\ndefense = "standard"\n')
    for args in (["run", "--config", path, "--preset", "smoke", "--quiet"], ["sweep", sweep, "--dry-run"]):
        res = check(bench(*args))
        assert res.code == 2 and message in res.err, res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml", "sweep.toml"]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_config_file_that_never_ends_is_one_line(bench):
    """(was: MemoryError, after filling the memory) a run or sweep file is read up to 16 MiB."""
    for args in (["run", "--config", "/dev/zero"], ["sweep", "/dev/zero", "--dry-run"]):
        res = check(bench(*args))
        assert res.code == 2 and "larger than 16 MiB" in res.err, res.err


def test_a_sweep_grid_too_large_to_run_is_one_line(bench, tmp_path, monkeypatch):
    """A grid of 20^5 runs (a typo away from a real one) is refused in a line before it is expanded (it
    was: every job built in memory first, gigabytes and minutes, then the OOM killer)."""
    monkeypatch.chdir(tmp_path)
    made = []

    def counted(*args, **kwargs):
        made.append(1)
        assert len(made) <= 10_000, "the sweep expanded its grid before refusing it"
        return request(*args, **kwargs)

    request = runner.Request
    monkeypatch.setattr(runner, "Request", counted)
    values = "[" + ", ".join(str(v) for v in range(1, 21)) + "]"
    path = tmp_path / "sweep.toml"
    path.write_text('preset = "smoke"\n[[cells]]\ndefense = "rift"\ngrid = { '
                    + ", ".join(f"{k} = {values}" for k in ("epochs", "batch_size", "mrc_passes", "mrc_samples",
                                                             "mrc_batch")) + " }\n")
    res = check(bench("sweep", path, "--dry-run"))
    assert res.code == 2 and len(made) <= 10_000, res.err


# ----------------------------------------------------------------------------------------------------
# image folders


MODES = ["L", "RGB", "RGBA", "P", "1", "I;16", "I", "F", "LA", "CMYK"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp"}
file_name = st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and len(n.encode()) <= 200)


def _image_bytes(mode: str, fmt: str, size: tuple[int, int], seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":  # 16-bit grey, the whole range
        image = Image.fromarray(rng.integers(0, 2**16, (h, w)).astype(np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(-2**31, 2**31 - 1, (h, w)).astype(np.int32))
    elif mode == "F":  # beyond [0, 255] both ways
        image = Image.fromarray((rng.random((h, w)) * 300 - 20).astype(np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    for attempt in (lambda b: image.save(b, fmt), lambda b: image.save(b, "PNG"),
                    lambda b: image.convert("RGB").save(b, "PNG")):  # a mode the format cannot hold
        buffer = io.BytesIO()
        try:
            attempt(buffer)
            return buffer.getvalue()
        except (OSError, ValueError, KeyError):
            continue
    raise AssertionError(f"cannot save a {mode} image")


SPOILS = ["junk file", "empty file", "cut image", "other size", "other mode", "hidden file", "nested image",
          "symlink", "stray file", "class missing", "class empty", "odd name", "no test split"]


@st.composite
def image_tree(draw):
    """{relative path: bytes, or a Path for a symlink's target}: a valid folder (test/, mostly train/, some
    val/; the same classes in each; images of one mode, size and format), then spoiled 0-3 times."""
    mode, fmt = draw(st.sampled_from(MODES)), draw(mostly(st.just("PNG"), st.sampled_from(sorted(FORMATS))))
    side = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**16))
    classes = draw(mostly(st.just(["a", "b"]), st.lists(file_name.filter(lambda n: not n.startswith(".")),
                                                        min_size=1, max_size=3, unique=True)))
    splits = ["test"] + (["train"] if draw(st.integers(0, 3)) else []) + \
        (["val"] if not draw(st.integers(0, 5)) else [])
    files = {}
    for split in splits:
        for c in classes:
            for i in range(draw(st.integers(1, 3)) + (split == "train")):
                files[f"{split}/{c}/{i}{FORMATS[fmt]}"] = _image_bytes(mode, fmt, (side, side), seed + len(files))
    for spoil in draw(mostly(st.lists(st.sampled_from(SPOILS), max_size=3), st.just([]), odds=3)):
        event(f"image folder: {spoil}")
        split, c = draw(st.sampled_from(splits)), draw(st.sampled_from(classes))
        where = f"{split}/{c}/{draw(st.integers(0, 99))}"
        if spoil == "junk file":
            files[where + draw(st.sampled_from([".png", ".jpg", ""]))] = draw(st.binary(min_size=1, max_size=64))
        elif spoil == "empty file":
            files[where + ".png"] = b""
        elif spoil == "cut image":
            image = _image_bytes(mode, fmt, (side, side), seed)
            files[where + FORMATS[fmt]] = image[:draw(st.integers(1, len(image) - 1))]
        elif spoil == "other size":
            files[where + ".png"] = _image_bytes(mode, "PNG", (draw(st.integers(1, 12)), draw(st.integers(1, 12))),
                                                 seed)
        elif spoil == "other mode":
            files[where + ".png"] = _image_bytes(draw(st.sampled_from(MODES)), "PNG", (side, side), seed)
        elif spoil == "hidden file":
            files[f"{split}/{c}/.{draw(file_name)}"] = draw(st.binary(max_size=16))
        elif spoil == "nested image":
            folder = draw(file_name.filter(lambda n: not n.startswith(".")))
            files[f"{split}/{c}/{folder}/x.png"] = _image_bytes(mode, "PNG", (side, side), seed)
        elif spoil == "symlink":
            files[where + ".png"] = Path(draw(st.sampled_from(["/etc/hostname", "/nonexistent", "..", ".", "0.png"])))
        elif spoil == "stray file":
            files[f"{split}/{draw(file_name)}"] = b"not a class\n"
        elif spoil == "class missing":
            files = {k: v for k, v in files.items() if not k.startswith(f"{split}/{c}/")}
        elif spoil == "class empty":
            files = {k: v for k, v in files.items() if not k.startswith(f"{split}/{c}/")}
            files[f"{split}/{c}/"] = None
        elif spoil == "odd name":
            files[f"{split}/{c}/{draw(file_name)}"] = _image_bytes(mode, fmt, (side, side), seed)
        elif spoil == "no test split":
            files = {k: v for k, v in files.items() if not k.startswith("test/")}
    return files


def _write_tree(root: Path, files: dict) -> None:
    root.mkdir()
    for relpath, content in files.items():
        path = root / relpath
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if content is None:
                path.mkdir(exist_ok=True)
            elif isinstance(content, Path):
                path.symlink_to(content)
            else:
                path.write_bytes(content)
        except OSError:  # (a folder where a file was drawn before it, or the other way round)
            continue


@fuzz(70)
@given(tree=image_tree(), options=st.sampled_from(["", "", "[size=8]", "[mode=RGB]", "[mode=L;size=4]", "[size=5]"]))
def test_image_folders(tree, options, prepared, tmp_path):
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        root = Path(scratch) / "data"
        _write_tree(root, tree)
        before = tree_digest(root)
        prepared("--defense", "standard", "--attacks", "fgsm", "--dataset", f"imagefolder{options}",
                 "--data-dir", root, "--set", "n_train=none", "--set", "n_val=1", "--set", "n_test=none",
                 "--set", "n_val_robust=1")
        assert tree_digest(root) == before


# ----------------------------------------------------------------------------------------------------
# tensors files


X_DTYPES = ["float64", "float16", "int64", "int16", "bool", "complex64", "uint16", "bfloat16", "int8"]
Y_DTYPES = ["int32", "uint8", "float32", "bool", "int8", "uint64", "int16"]
TENSOR_SPOILS = ["x dtype", "y dtype", "range", "nan", "inf", "negative label", "label beyond", "huge label",
                 "labels 2-D", "labels count", "shape", "ambiguous layout", "not square", "no y", "extra key",
                 "empty split", "channels"]


@st.composite
def tensors_content(draw):
    """({key: array}, bf16): x, y or x_train, y_train, x_test, y_test (+ x_val, y_val), valid (uint8 or float
    in [0, 1], NCHW or NHWC, labels 0..classes-1), then spoiled 0-3 times; bf16: the .pt file stores the
    float images as bfloat16."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels, side, nhwc = draw(st.sampled_from([1, 3])), draw(st.integers(2, 6)), draw(st.booleans())
    uint8 = draw(st.booleans())
    classes = draw(st.integers(2, 4))
    splits = draw(st.sampled_from([["x"], ["x_train", "x_test"], ["x_train", "x_test", "x_val"]]))
    out = {}
    for key in splits:
        n = draw(st.integers(3, 6))
        x = rng.random((n, side, side, channels) if nhwc else (n, channels, side, side))
        out[key] = (x * 255).astype(np.uint8) if uint8 else x.astype(np.float32)
        out["y" + key[1:]] = rng.integers(0, classes, n)
    bf16 = False
    for spoil in draw(mostly(st.lists(st.sampled_from(TENSOR_SPOILS + ["bf16"]), max_size=3), st.just([]), odds=2)):
        event(f"tensors: {spoil}")
        try:  # (a spoil that does not apply to what an earlier one left is skipped)
            bf16 = _spoil_arrays(draw, rng, out, spoil, splits, classes, nhwc, side) or bf16
        except (IndexError, TypeError, ValueError):
            continue
    return out, bf16


def _spoil_arrays(draw, rng, out: dict, spoil: str, splits: list, classes: int, nhwc: bool, side: int) -> bool:
    """Apply one of TENSOR_SPOILS to `out` in place; True for "bf16" (the .pt file stores images as bf16)."""
    key = draw(st.sampled_from(splits))
    label = "y" + key[1:]
    x = out[key]
    if spoil == "x dtype":
        with np.errstate(invalid="ignore"):  # (NaN cast to an integer type: whatever it becomes)
            out[key] = x.astype(draw(st.sampled_from(X_DTYPES)).replace("bfloat16", "float32"))
    elif spoil == "y dtype" and label in out:
        out[label] = out[label].astype(draw(st.sampled_from(Y_DTYPES)))
    elif spoil in ("range", "nan", "inf"):
        x = np.real(x).astype(np.float32) * (3 if spoil == "range" else 1)
        if x.size and spoil != "range":
            x.flat[draw(st.integers(0, x.size - 1))] = np.nan if spoil == "nan" else -np.inf
        out[key] = x
    elif spoil in ("negative label", "label beyond", "huge label") and label in out and len(out[label]):
        out[label] = out[label].astype(np.int64)  # (a copy that holds 2**40)
        out[label][0] = {"negative label": -1, "label beyond": classes + 3, "huge label": 2**40}[spoil]
    elif spoil == "labels 2-D" and label in out:
        out[label] = out[label].reshape(-1, 1)
    elif spoil == "labels count" and label in out:
        out[label] = out[label][:draw(st.integers(0, len(out[label])))]
    elif spoil == "shape":
        out[key] = rng.random(tuple(draw(st.lists(st.integers(0, 5), max_size=5)))).astype(np.float32)
    elif spoil == "ambiguous layout":
        out[key] = rng.random((len(x), 3, 3, 3)).astype(np.float32)
    elif spoil == "not square":
        out[key] = x[..., :-1] if not nhwc else x[:, :, :-1]
    elif spoil == "no y":
        out.pop(label, None)
    elif spoil == "extra key":
        out[draw(st.sampled_from(["z", "x", "y_test", "x_val", "meta"]))] = rng.random((2, 2))
    elif spoil == "empty split":
        out[key], out[label] = x[:0], out.get(label, np.zeros(0, np.int64))[:0]
    elif spoil == "channels":
        c = draw(st.sampled_from([2, 4, 5, 7]))
        out[key] = rng.random((len(x), c, side, side)).astype(np.float32)
    elif spoil == "bf16":
        return True
    return False


def _pt_bytes(arrays: dict, bf16: bool, wrap: str) -> bytes:
    tensors = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v.astype(np.int32) if v.dtype in (np.uint16, np.uint64) else v))
        tensors[k] = t.to(torch.bfloat16) if bf16 and t.is_floating_point() and k.startswith("x") else t
    obj = {"dict": tensors, "list": list(tensors.values()), "nested": {"data": tensors},
           "numbers": {k: 1 for k in tensors}, "tensor": next(iter(tensors.values()), torch.zeros(1))}[wrap]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@fuzz(100)
@given(content=tensors_content(),
       suffix=mostly(st.sampled_from([".npz", ".pt"]), st.sampled_from([".pth", ".npy", ".PT"])),
       compressed=st.booleans(), wrap=mostly(st.just("dict"), st.sampled_from(["list", "nested", "numbers", "tensor"])),
       options=st.sampled_from(["", "", "[layout=nhwc]", "[layout=nchw]", "[num_classes=3]", "[num_classes=2]"]),
       data=st.data())
def test_tensors_files(content, suffix, compressed, wrap, options, data, prepared, tmp_path):
    arrays, bf16 = content
    if suffix in (".npz", ".npy"):
        buffer = io.BytesIO()
        (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
        raw = buffer.getvalue()
    else:
        raw = _pt_bytes(arrays, bf16, wrap)
    raw = data.draw(mutated_bytes(raw))
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        path = Path(scratch) / f"data{suffix}"
        path.write_bytes(raw)
        prepared("--defense", "standard", "--attacks", "fgsm", "--dataset", f"tensors{options}", "--data-dir", path,
                 "--set", "n_train=none", "--set", "n_val=1", "--set", "n_test=none", "--set", "n_val_robust=1")
        assert path.read_bytes() == raw


# ----------------------------------------------------------------------------------------------------
# checkpoints


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8,
           torch.bool, torch.complex64]


def _spoiled(draw, t: torch.Tensor):
    how = draw(st.sampled_from(["dtype", "shape", "non-finite", "meta", "sparse", "scalar", "empty", "transposed",
                                "channels last", "as it is"]))
    event(f"checkpoint tensor: {how}")
    try:
        return _spoil(draw, t, how)
    except (RuntimeError, NotImplementedError):  # a spoil torch cannot apply to this one (meta, then sparse)
        return t


def _spoil(draw, t: torch.Tensor, how: str):
    if how == "dtype":
        return t.to(draw(st.sampled_from(_DTYPES)))
    if how == "shape":
        return torch.zeros(draw(st.lists(st.integers(0, 5), max_size=4)))
    if how == "non-finite" and t.is_floating_point() and t.numel():
        t = t.clone().contiguous()
        t.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return t
    if how == "meta":
        return torch.empty(t.shape, device="meta")
    if how == "sparse" and t.dim():
        return t.float().to_sparse()
    if how == "scalar":
        return torch.tensor(draw(st.floats()))
    if how == "empty":
        return torch.empty(0)
    if how == "transposed" and t.dim() == 2:
        return t.t()
    if how == "channels last" and t.dim() == 4:
        return t.to(memory_format=torch.channels_last)
    return t


@st.composite
def checkpoint_bytes(draw):
    """A tiny_cnn state dict for digits, then spoiled: tensors of another dtype, shape or layout, non-finite,
    on the meta device, sparse; keys dropped, added, renamed, prefixed; other containers and values; the
    file's bytes damaged."""
    torch.manual_seed(draw(st.integers(0, 3)))
    state = dict(models.build_model("tiny_cnn", _digits_spec()).state_dict())
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(state))) if state else None
        how = draw(st.sampled_from(["tensor", "tensor", "drop", "add", "rename", "not a tensor", "prefix"]))
        if key is None:
            break
        event(f"checkpoint: {how}")
        if how == "tensor" and isinstance(state[key], torch.Tensor):
            state[key] = _spoiled(draw, state[key])
        elif how == "drop":
            del state[key]
        elif how == "add":
            state[draw(mostly(st.sampled_from(["extra.weight", "module.x"]), text(8)))] = torch.zeros(2)
        elif how == "rename":
            state[draw(text(8))] = state.pop(key)
        elif how == "not a tensor":
            state[key] = draw(st.none() | st.integers() | st.floats() | text() | st.lists(st.integers(), max_size=2))
        elif how == "prefix":
            state = {draw(st.sampled_from(["module.", "_orig_mod.", "model."])) + k: v for k, v in state.items()}
    meta = draw(st.fixed_dictionaries({"arch": st.sampled_from(["tiny_cnn", "resnet18"]) | text(4),
                                       "dataset": st.sampled_from(["digits", "cifar10"]) | text(4)})
                | st.none() | st.integers() | st.lists(st.integers(), max_size=2))
    wrap = draw(st.sampled_from(["bare"] * 3 + ["state_dict", "model", "net", "ours", "list", "tensor", "none",
                                                "nested", "int keys"]))
    obj = {"bare": state, "state_dict": {"state_dict": state}, "model": {"model": state}, "net": {"net": state},
           "ours": {"state_dict": state, "meta": meta}, "list": list(state.values()),
           "tensor": torch.zeros(3), "none": None, "nested": {"checkpoint": {"state_dict": state}},
           "int keys": {i: v for i, v in enumerate(state.values())}}[wrap]
    event(f"checkpoint: {wrap}")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return draw(mutated_bytes(buffer.getvalue()))


@fuzz(60)
@given(blob=checkpoint_bytes(), sidecar=st.sampled_from(["none"] * 6 + ["right"] * 3 + ["wrong", "junk", "empty"]),
       form=st.sampled_from(["as_is", "base", "recipe"]), data=st.data())
def test_checkpoints(blob, sidecar, form, data, prepared, tmp_path):
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        path = Path(scratch) / "weights.pt"
        path.write_bytes(blob)
        side = Path(str(path) + ".sha256")
        if sidecar != "none":
            side.write_bytes({"right": hashlib.sha256(blob).hexdigest().encode() + b"\n", "wrong": b"0" * 64,
                              "junk": data.draw(st.binary(max_size=40)), "empty": b""}[sidecar])
        before = tree_digest(Path(scratch))
        args = {"as_is": ["--model", "tiny_cnn", "--checkpoint", path],
                "base": ["--defense", "ft_bn", "--base-checkpoint", path],
                "recipe": ["--defense", "pgd_at", "--base-checkpoint", f"pgd_at={path}"]}[form]
        prepared(*args, "--attacks", "fgsm")
        assert tree_digest(Path(scratch)) == before  # (was: a .checkpoints.lock beside a refused checkpoint)


@pytest.mark.parametrize("sidecar", [b"0" * 64 + b"\n", b"not a digest", b""])
def test_a_checkpoint_with_a_wrong_sidecar_leaves_its_folder_alone(sidecar, prepared, files, tmp_path):
    """A --checkpoint whose .sha256 disagrees is refused in a line, naming the sidecar, and nothing is
    written beside it (it was: a .checkpoints.lock file appeared in the user's folder)."""
    folder = tmp_path / "zoo"
    folder.mkdir()
    shutil.copy(files["checkpoint"], folder / "w.pt")
    (folder / "w.pt.sha256").write_bytes(sidecar)
    before = tree_digest(folder)
    res = prepared("--model", "tiny_cnn", "--checkpoint", folder / "w.pt", "--attacks", "fgsm")
    assert res.code == 2 and "w.pt.sha256" in res.err, res.err
    assert tree_digest(folder) == before


# ----------------------------------------------------------------------------------------------------
# results databases


@pytest.fixture(scope="module")
def databases(files, tmp_path_factory):
    """Two small valid results directories, made without training: `as_is` runs of a random-weight tiny_cnn
    (clean, fgsm, pgd10 with checks and --meta; two seeds of fgsm alone), plus one failure row; and the
    command of the first (less its --out), which resumes it."""
    from bench.cli import main

    root = tmp_path_factory.mktemp("fuzz-databases")
    first, second = root / "first", root / "second"
    common = ["run", "--preset", "smoke", "--model", "tiny_cnn", "--checkpoint", str(files["checkpoint"]), "--quiet",
              "--set", "n_test=32"]
    rerun = [*common, "--attacks", "fgsm,pgd10[steps=2]", "--meta", "authors=A. B.", "--meta",
             "link=https://example.org/paper"]
    for args in ([*rerun, "--out", str(first)],
                 [*common, "--attacks", "fgsm", "--seeds", "1,2", "--no-checks", "--out", str(second)]):
        main(args)  # (exit 0: it returns)
    store = Store(first)
    try:
        store.put_failure("0" * 64, cell="build", protocol="-", plugin="defense 'x'", error="RuntimeError: boom",
                          defense="x")
    finally:
        store.close()
    return dict(first=first, second=second, rerun=rerun)


def _columns(db: Path) -> dict[str, list[str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}


json_any = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | text(8)
                        | st.builds(list) | st.builds(dict),
                        lambda inner: st.lists(inner, min_size=1, max_size=3)
                        | st.dictionaries(text(6), inner, min_size=1, max_size=3), max_leaves=8)


def _replace_inside(draw, stored):
    """The stored JSON with one value somewhere inside replaced by random JSON (or random JSON when the
    stored value is not JSON)."""
    try:
        obj = json.loads(stored) if isinstance(stored, str) else None
    except ValueError:
        obj = None
    if not isinstance(obj, (dict, list)) or not obj:
        return draw(json_any)
    node = obj
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        node[key] = draw(json_any)
        return obj


@st.composite
def row_mutation(draw, columns: dict):
    """(table, column, row offset, how, value) for one stored field."""
    table = draw(st.sampled_from(["runs", "runs", "cells", "cells", "checks", "requests", "failures"]))
    column = draw(st.sampled_from(columns[table]))
    how = draw(st.sampled_from(["inside json", "inside json", "json", "text", "integer", "real", "blob", "names"]))
    return table, column, draw(st.integers(0, 5)), how


def _mutate(db: Path, mutation, draw) -> str:
    table, column, offset, how = mutation
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(f"SELECT rowid, {column} FROM {table}").fetchall()
        assume(rows)
        rowid, stored = rows[offset % len(rows)]
        new = {"inside json": lambda: json.dumps(_replace_inside(draw, stored)),
               "json": lambda: json.dumps(draw(json_any)),
               "text": lambda: draw(st.text(st.characters(codec="utf-8"), max_size=20)),
               "integer": lambda: draw(st.integers(-2**63, 2**63 - 1)),
               "real": lambda: draw(st.floats(allow_nan=False)),
               "blob": lambda: draw(st.binary(max_size=20)),
               "names": lambda: draw(st.sampled_from(["", "x", "0" * 64, "../x", "a" * 65, "pgd10", "-"]))}[how]()
        try:
            conn.execute(f"UPDATE {table} SET {column}=? WHERE rowid=?", (new, rowid))
            conn.commit()
        except sqlite3.IntegrityError:  # NOT NULL, a primary key taken: not a database bnbench could meet
            assume(False)
    return f"{table}.{column} {how}"


@fuzz(50)
@given(data=st.data(), fmt=st.sampled_from(["md", "html", "latex", "csv", "json"]),
       target=st.sampled_from(["new", "populated"]), sources=st.sampled_from(["mutated", "valid then mutated"]),
       n=st.integers(1, 3))
def test_mutated_databases(data, fmt, target, sources, n, databases, bench, tmp_path):
    """A results database with mutated fields: `bench leaderboard` (every format) leaves it as it is; `bench
    merge` (of it alone, or after a valid one) into a new or a populated target leaves the sources as they are,
    and the target as it was when it fails; a merge that succeeds leaves a target whose leaderboard keeps the
    contract; and the command that made the database, run again on it, resumes or refuses in a line."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        scratch = Path(scratch)
        source = scratch / "source"
        shutil.copytree(databases["first"], source)
        db = source / DB_NAME
        columns = _columns(db)
        for _ in range(n):
            event("mutation: " + _mutate(db, data.draw(row_mutation(columns)), data.draw).split(" ", 1)[1])
        before = file_state(db)
        res = check(bench("leaderboard", "--out", source, "--dest", scratch / "lb", "--format", fmt))
        assert file_state(db) == before
        if res.code == 0:
            assert res.out.split() and all(Path(line).is_file() for line in res.out.split()), res.out
        into = scratch / "target"
        if target == "populated":
            shutil.copytree(databases["second"], into)
        valid = scratch / "valid"
        shutil.copytree(databases["first" if target == "populated" else "second"], valid)
        given = [source] if sources == "mutated" else [valid, source]
        target_before, valid_before = (tree_digest(into) if into.exists() else None), tree_digest(valid)
        res = check(bench("merge", *given, "--out", into))
        assert file_state(db) == before and tree_digest(valid) == valid_before
        if res.code == 2:
            assert (tree_digest(into) if into.exists() else None) == target_before or (
                target_before is None and not (into / DB_NAME).exists()), "a failed merge changed its target"
        else:
            assert res.out.startswith(f"merged {len(given)} database(s)"), res.out
            check(bench("leaderboard", "--out", into, "--dest", scratch / "lb2", "--format", fmt))
        check(bench(*databases["rerun"], "--out", source))


# ----------------------------------------------------------------------------------------------------
# a few runs to the end


@fuzz(3)
@given(attacks=st.lists(st.one_of(st.sampled_from(["fgsm", "pgd10[steps=1]", "fgsm[eps=8/255]", "deepfool[steps=2]"]),
                                  st.floats(0.001, 1).map(lambda e: f"fgsm[eps={e!r}]"),
                                  st.tuples(st.integers(1, 3), st.sampled_from(["4/255", "0.05", "1e-3", "0.1"]))
                                  .map("pgd10[steps={0[0]};eps={0[1]}]".format)), min_size=1, max_size=2),
       threat=st.none() | st.sampled_from(["Linf:0.05", "L2:0.5", "linf:8/255"]),
       normalize=st.sampled_from([None, "none", "0.5,0.25", "digits"]))
def test_generated_runs_run_to_the_end(attacks, threat, normalize, bench, files, tmp_path):
    """Valid generated inputs run whole (as_is evaluates a checkpoint: nothing trains): exit 0, and every
    attack asked for is in the summary; or a refusal in one line."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as out:
        res = check(bench("run", "--preset", "smoke", "--model", "tiny_cnn", "--checkpoint", files["checkpoint"],
                          "--attacks", ",".join(attacks), "--set", "n_test=16", "--no-checks", "--quiet", "--out", out,
                          *(["--threat", threat] if threat else []),
                          *(["--normalize", normalize] if normalize else [])))
        if res.code == 0:
            assert "worst case" in res.out and (Path(out) / DB_NAME).is_file(), res.out
            for item in attacks:
                assert item.partition("[")[0] in res.out, res.out
