"""Shared fixtures: the CLI run in-process, the CIFAR subset, a session cache of smoke base models."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dataclasses

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"

# Hypothesis budgets (tests/test_fuzzing.py). `ci`, the default: derandomized, so every run tries the same
# inputs, no example database. `release` (BENCH_FUZZ=release): 25 times the examples, drawn afresh each time
# (a failure prints the seed and a @reproduce_failure line to replay it). A test sizes its own budget as a
# share of max_examples (test_fuzzing.examples).
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass
else:
    _hypothesis_settings.register_profile("ci", max_examples=100, derandomize=True, database=None, deadline=None,
                                          print_blob=True)
    _hypothesis_settings.register_profile("release", max_examples=2500, deadline=None, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("BENCH_FUZZ", "ci"))


def data_root() -> Path:
    """BENCH_DATA_DIR, else ../shared/data beside the repository (CI always has it)."""
    return Path(os.environ.get("BENCH_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    path = data_root() / "cifar10-mini"
    if not (path / "cifar-10-batches-py").is_dir():
        pytest.fail(f"CIFAR-10 subset not found at {path}; set BENCH_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def cifar100_dir() -> Path:
    path = data_root() / "cifar100-mini"
    if not (path / "cifar-100-python").is_dir():
        pytest.fail(f"CIFAR-100 subset not found at {path}; set BENCH_DATA_DIR")
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def bench(capsys):
    """Run `bench ARGS...` in-process through the console entry point; returns exit code and output."""
    from bench.cli import main

    def call(*args: str) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


def bench_subprocess(*args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "bench.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=kw.get("cwd", REPO))


@pytest.fixture(scope="session")
def undefended():
    """A clean-trained (undefended) tiny CNN on digits, in eval mode, and its dataset (128 test images)."""
    from bench import data, models, train

    ds = data.load("digits", n_train=900, n_val=50, n_test=128)
    torch.manual_seed(0)
    model = models.build_model("tiny_cnn", ds.spec)
    train.train(model, ds.train, train.Clean(), train.TrainSpec(epochs=15, lr=0.2, batch_size=64),
                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert train.accuracy(model, ds.test, torch.device("cpu")) > 0.85
    return model.eval(), ds


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory) -> Path:
    """A results directory holding the smoke base models (standard, pgd_at) trained once per session."""
    from bench.cli import main

    out = tmp_path_factory.mktemp("smoke-cache")
    for defense in ("standard", "pgd_at"):
        try:
            main(["run", "--preset", "smoke", "--defense", defense, "--attacks", "fgsm", "--out", str(out),
                  "--quiet"])
        except SystemExit as exc:  # pragma: no cover
            raise AssertionError(f"smoke {defense} run failed with exit {exc.code}")
    return out


@pytest.fixture
def out_dir(tmp_path, smoke_cache) -> Path:
    """A fresh results directory with the session's cached smoke base models (no results yet)."""
    out = tmp_path / "results"
    shutil.copytree(smoke_cache / "cache", out / "cache")
    return out


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_distribution(src: Path, dest: Path) -> Path:
    """Make the package under `src` (with its own pyproject.toml) importable from `dest` as an installed
    distribution: the package folder plus a .dist-info with METADATA and entry_points.txt."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    meta = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    dest.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir() and (child / "__init__.py").exists():
            shutil.copytree(child, dest / child.name, dirs_exist_ok=True)
    info = dest / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = []
    for group, eps in meta.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in eps.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return dest


class ForbiddenSplit:
    """Stands in for the test split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read (.{name}) before the final evaluation")

    def __len__(self):
        raise AssertionError("the test split was read (len) before the final evaluation")


def make_ctx(cache_root: Path, *, arch: str = "tiny_cnn", sets: dict | None = None, guard_test: bool = False,
             base_checkpoints: dict | None = None):
    """A smoke-preset Context on digits (fp32) whose caches live under `cache_root/cache`."""
    from bench import config, data
    from bench.api import Context

    preset = config.concrete(config.override_preset(config.get_preset("smoke"), sets or {}),
                             data.DATASETS["digits"])
    ds = data.load("digits", n_train=preset.n_train, n_val=preset.n_val, n_test=preset.n_test)
    if guard_test:
        ds = dataclasses.replace(ds, test=ForbiddenSplit())
    return Context(data=ds, arch=arch, device=torch.device("cpu"), seed=0, preset=preset,
                   cache_dir=cache_root / "cache", precision="fp32", quiet=True,
                   base_checkpoints=base_checkpoints)
