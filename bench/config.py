"""Presets (numbers only: scale is a preset, not a code path), RunConfig, TOML files, stable hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from bench.errors import BenchError, did_you_mean, unknown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Preset:
    """Every budget of a run. Threat-model fields left at None take the dataset's standard values."""

    name: str
    dataset: str
    arch: str
    # data
    n_train: int | None = None  # cap on training images before the validation split (None: all)
    n_val: int = 500  # validation images carved deterministically from train
    n_test: int | None = None  # the first n test images are evaluated (None: all)
    batch_size: int = 128
    eval_batch_size: int = 256  # also the inference composition size of batch-dependent defenses
    crop_pad: int | None = None  # augmentation; None: the dataset's standard
    flip: bool | None = None
    # threat model
    eps: float | None = None  # L-inf budget
    eps_l2: float | None = None
    alpha: float | None = None  # PGD step; None: eps / 4 (2/255 at 8/255)
    pgd_steps: int = 10  # PGD steps of adversarial training and validation
    # base training (ctx.base)
    epochs_standard: int = 200
    epochs_pgd_at: int = 110
    epochs_trades: int = 110
    epochs_fgsm_rs: int = 15
    lr: float = 0.1
    lr_fgsm_rs: float = 0.2
    schedule: str = "step"  # step: x0.1 at 100/110 and 105/110 of training (Madry/RiFT); or cosine
    momentum: float = 0.9
    weight_decay: float = 5e-4
    n_val_robust: int = 500  # validation images attacked to pick the best robust checkpoint
    # fine-tuning defenses
    ft_epochs: int = 10
    ft_lr: float = 1e-3
    mrc_samples: int = 1000  # size of RiFT's fixed adversarial set
    mrc_passes: int = 10

    @property
    def epochs(self) -> dict[str, int]:
        return {"standard": self.epochs_standard, "pgd_at": self.epochs_pgd_at,
                "trades": self.epochs_trades, "fgsm_rs": self.epochs_fgsm_rs}


PRESETS: dict[str, Preset] = {
    # smoke: tests. eps 0.1 instead of digits' 0.2 so a tiny CNN reaches non-trivial robustness in 10
    # epochs (83.6% clean / 53.1% PGD-10), which the fine-tuning defenses' tests need.
    "smoke": Preset("smoke", "digits", "tiny_cnn", n_train=600, n_val=100, n_test=128, batch_size=64,
                    eval_batch_size=64, eps=0.1, epochs_standard=10, epochs_pgd_at=10, epochs_trades=10,
                    epochs_fgsm_rs=10, lr=0.2, lr_fgsm_rs=0.2, schedule="cosine", n_val_robust=100,
                    ft_epochs=2, ft_lr=0.01, mrc_samples=64, mrc_passes=3),
    # quick: the first run on a laptop. lr 0.2 / batch 64 measured best for PGD-AT on digits
    # (96.9% clean / 66.4% PGD-10 at eps 0.2, vs 91.3 / 50.1 with lr 0.1 / batch 128). The first 300 test
    # images in one batch keep `--attacks all` near 2 minutes: Square's 5,000 queries per robust sample
    # (alone and inside AutoAttack) cost 45 s + 120 s on all 539 images in batches of 256.
    "quick": Preset("quick", "digits", "small_cnn", n_val=200, n_test=300, batch_size=64, eval_batch_size=512,
                    epochs_standard=15, epochs_pgd_at=30, epochs_trades=30, epochs_fgsm_rs=15,
                    lr=0.2, lr_fgsm_rs=0.2, schedule="cosine", n_val_robust=200, ft_epochs=5,
                    ft_lr=0.005, mrc_samples=200, mrc_passes=10),
    # mini: batch 64 doubles the optimizer steps of a 4,670-image epoch at the same compute: PGD-AT reached
    # 42.2% clean / 29.3% PGD-10 on the 1,017 test images vs 35.1 / 25.2 with batch 128 (13 min on 2 cores).
    "mini": Preset("mini", "cifar10", "resnet20", n_val=500, batch_size=64, eval_batch_size=256,
                   epochs_standard=15, epochs_pgd_at=15, epochs_trades=15, epochs_fgsm_rs=15,
                   lr=0.1, lr_fgsm_rs=0.2, schedule="cosine", n_val_robust=500, ft_epochs=5,
                   ft_lr=1e-3, mrc_samples=500, mrc_passes=10),
    "paper": Preset("paper", "cifar10", "resnet18", n_val=1000, n_test=None, batch_size=128,
                    eval_batch_size=256, epochs_standard=200, epochs_pgd_at=110, epochs_trades=110,
                    epochs_fgsm_rs=15, schedule="step", n_val_robust=1000, ft_epochs=10, ft_lr=1e-3,
                    mrc_samples=1000, mrc_passes=10),
}
DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS)
    return PRESETS[name]


def concrete(preset: Preset, spec) -> Preset:
    """Fill the threat model and augmentation left open with the dataset's standard values."""
    eps = preset.eps if preset.eps is not None else spec.eps
    return replace(preset, eps=eps,
                   eps_l2=preset.eps_l2 if preset.eps_l2 is not None else spec.eps_l2,
                   alpha=preset.alpha if preset.alpha is not None else eps / 4,
                   crop_pad=preset.crop_pad if preset.crop_pad is not None else spec.crop_pad,
                   flip=preset.flip if preset.flip is not None else spec.flip)


def override_preset(preset: Preset, values: dict[str, Any]) -> Preset:
    """Apply `--set key=value` / TOML [preset] overrides with type checks."""
    kinds = {f.name: f for f in fields(Preset)}
    changes = {}
    for key, raw in values.items():
        if key not in kinds or key == "name":
            raise BenchError(f"preset has no field '{key}'{did_you_mean(key, kinds)}")
        current = getattr(preset, key)
        kind = type(current) if current is not None else _field_kind(kinds[key])
        changes[key] = _coerce(key, raw, kind)
    return replace(preset, **changes) if changes else preset


def _field_kind(f: dataclasses.Field) -> type:
    text = str(f.type)
    for kind in (bool, int, float, str):
        if kind.__name__ in text:
            return kind
    return str


def _coerce(key: str, raw: Any, kind: type) -> Any:
    from bench.api import Param, convert

    if isinstance(raw, str) and raw.strip().lower() == "none":
        return None
    low = 0 if kind in (int, float) else None
    value = convert(key, Param(None, key, kind=kind, low=low), raw)
    if key in ("eps", "eps_l2", "alpha", "lr", "lr_fgsm_rs", "ft_lr") and value is not None and value <= 0:
        raise BenchError(f"{key} must be > 0, got {value}")
    if key in ("batch_size", "eval_batch_size", "pgd_steps", "n_test", "mrc_samples", "mrc_passes") \
            and value is not None and value < 1:
        raise BenchError(f"{key} must be >= 1, got {value}")
    if key == "eps" and value is not None and value > 1:
        raise BenchError(f"eps must be <= 1 on [0,1] images, got {value}")
    if key == "schedule" and value not in ("step", "cosine"):
        raise BenchError(f"schedule must be step or cosine, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackSpec:
    name: str
    params: tuple = ()  # sorted (key, value) pairs given by the user

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return self.name + "[" + ",".join(f"{k}={exact_text(v)}" for k, v in self.params) + "]"


def exact_text(value: Any) -> str:
    """Text that reads back as exactly `value`: cells are keyed by it and worst cases grouped by it, so two
    budgets that differ in any digit never share a result. A float is written k/255 when it is exactly that
    and shorter (8/255, not 0.03137254901960784), else as Python's shortest round-trip repr (0.050004)."""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    text = repr(value)
    k = round(value * 255)
    if k and k / 255 == value and len(f"{k}/255") < len(text):
        return f"{k}/255"
    return text


@dataclass(frozen=True)
class RunConfig:
    defense: str
    params: tuple  # sorted (key, value) pairs, resolved with defaults
    attacks: tuple[AttackSpec, ...]
    preset: Preset
    dataset: str
    arch: str
    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    precision: str = "fp32"  # resolved: bf16 or fp32 (training only; evaluation is always fp32)
    protocol: str = "adaptive"
    out: str = "results"
    base_checkpoints: tuple = ()  # (recipe, path, sha256)
    checks: bool = True
    data_fingerprint: str = ""
    command: str = ""

    def identity(self) -> dict:
        """What determines the defended model and its clean/attack results (not where they are stored)."""
        return {
            "defense": self.defense, "params": [list(p) for p in self.params],
            "preset": dataclasses.asdict(self.preset), "dataset": self.dataset, "arch": self.arch,
            "seed": self.seed, "precision": self.precision, "data": self.data_fingerprint,
            "base_checkpoints": [[r, s] for r, _, s in self.base_checkpoints],
        }

    @property
    def run_id(self) -> str:
        return stable_hash(self.identity())


def training_scope(identity: dict, train_fingerprint: str) -> dict:
    """What a defense's cached training results (weights, memos) depend on besides its own parameters: a
    run's identity without the test images, so evaluating more or fewer of them reuses the training. A
    defense that selects on the test split puts it back (`Context.split`)."""
    scope = {k: v for k, v in identity.items() if k not in ("defense", "params")}
    if isinstance(scope.get("preset"), dict):
        scope["preset"] = {k: v for k, v in scope["preset"].items() if k != "n_test"}
    scope["data"] = train_fingerprint
    return scope


def stable_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise BenchError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"config file {path} is not valid TOML: {exc}") from None


TOML_KEYS = {"defense", "params", "attacks", "attack_params", "preset", "dataset", "data_dir", "arch",
             "device", "seed", "out", "precision", "protocol", "set", "base_checkpoint", "checks"}


def check_toml_keys(conf: dict, path: str) -> None:
    for key in conf:
        if key not in TOML_KEYS:
            raise BenchError(f"config file {path}: unknown key '{key}'{did_you_mean(key, TOML_KEYS)}")
