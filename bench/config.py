"""Presets (numbers only: scale is a preset, not a code path), RunConfig, TOML files, stable hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import reprlib
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from bench.errors import BenchError, did_you_mean, unknown
from bench.params import Param, convert, exact_text, parse_assignments

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
    eps_l1: float | None = None
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
    # A plugin's own budgets are not fields: it scales them with `Param(per_preset=...)`.

    @property
    def epochs(self) -> dict[str, int]:
        return {"standard": self.epochs_standard, "pgd_at": self.epochs_pgd_at,
                "trades": self.epochs_trades, "fgsm_rs": self.epochs_fgsm_rs}


# The valid values of every field a user may set (`--set`, TOML `set`), as bench.params.Param bounds: low/high
# inclusive, above exclusive, choices. What depends on the dataset or on another field is checked by
# `concrete`: crop_pad below the image size, n_val_robust <= n_val, eps_l2 and eps_l1 within the image cube's
# diameter.
LIMITS: dict[str, dict] = {
    "n_train": dict(low=2), "n_val": dict(low=1),  # no validation images: no checkpoint can be selected
    "n_test": dict(low=1), "batch_size": dict(low=2),  # a training batch of one image is skipped (train-mode BN)
    "eval_batch_size": dict(low=1), "crop_pad": dict(low=0), "flip": {},
    "eps": dict(above=0, high=1), "eps_l2": dict(above=0), "eps_l1": dict(above=0), "alpha": dict(above=0, high=1), "pgd_steps": dict(low=1),
    "epochs_standard": dict(low=1), "epochs_pgd_at": dict(low=1), "epochs_trades": dict(low=1),
    "epochs_fgsm_rs": dict(low=1), "lr": dict(above=0), "lr_fgsm_rs": dict(above=0),
    "schedule": dict(choices=("step", "cosine")), "momentum": dict(low=0, high=1), "weight_decay": dict(low=0),
    "n_val_robust": dict(low=1), "ft_epochs": dict(low=1), "ft_lr": dict(above=0),
}
# Fields that name the preset and its defaults: chosen by their own options, so the stored run always says
# what ran (a `--set dataset=` would be stored while the data came from the preset's dataset).
NOT_SET = {"name": "--preset", "dataset": "--dataset (TOML: dataset = ...)",
           "arch": "--model or --arch (TOML: arch = ...)"}


PRESETS: dict[str, Preset] = {
    # smoke: tests. eps 0.1 instead of digits' 0.2 so a tiny CNN reaches non-trivial robustness in 10
    # epochs (83.6% clean / 53.1% PGD-10), which the fine-tuning defenses' tests need.
    "smoke": Preset("smoke", "digits", "tiny_cnn", n_train=600, n_val=100, n_test=128, batch_size=64,
                    eval_batch_size=64, eps=0.1, epochs_standard=10, epochs_pgd_at=10, epochs_trades=10,
                    epochs_fgsm_rs=10, lr=0.2, lr_fgsm_rs=0.2, schedule="cosine", n_val_robust=100,
                    ft_epochs=2, ft_lr=0.01),
    # quick: the first run on a laptop. lr 0.2 / batch 64 measured best for PGD-AT on digits
    # (96.9% clean / 66.4% PGD-10 at eps 0.2, vs 91.3 / 50.1 with lr 0.1 / batch 128). The first 300 test
    # images in one batch keep `--attacks all` near 2 minutes: Square's 5,000 queries per robust sample
    # (alone and inside AutoAttack) cost 45 s + 120 s on all 539 images in batches of 256.
    "quick": Preset("quick", "digits", "small_cnn", n_val=200, n_test=300, batch_size=64, eval_batch_size=512,
                    epochs_standard=15, epochs_pgd_at=30, epochs_trades=30, epochs_fgsm_rs=15,
                    lr=0.2, lr_fgsm_rs=0.2, schedule="cosine", n_val_robust=200, ft_epochs=5,
                    ft_lr=0.005),
    # mini: batch 64 doubles the optimizer steps of a 4,670-image epoch at the same compute: PGD-AT reached
    # 42.2% clean / 29.3% PGD-10 on the 1,017 test images vs 35.1 / 25.2 with batch 128 (13 min on 2 cores).
    "mini": Preset("mini", "cifar10", "resnet20", n_val=500, batch_size=64, eval_batch_size=256,
                   epochs_standard=15, epochs_pgd_at=15, epochs_trades=15, epochs_fgsm_rs=15,
                   lr=0.1, lr_fgsm_rs=0.2, schedule="cosine", n_val_robust=500, ft_epochs=5,
                   ft_lr=1e-3),
    # full-cpu: the complete CIFAR-10 training set on a 2-core CPU (cifar10-full, unpacked), where mini's
    # 4,670 images starve the model. fp32 ResNet-20, batch 128, measured per 50k-image epoch on such a
    # machine (no bf16 there), training steps alone: FGSM-RS 297 s, PGD-2 380 s, PGD-3 464 s, PGD-10 1,363 s.
    # PGD-AT with 2 steps of eps/2 from a random start (every example can reach the ball's surface), 6 epochs:
    # ~500 s per epoch with augmentation and validation, 50 min in all, 59.2% clean / 34.5% PGD-10 on the
    # first 2,000 test images (mini: 42.2 / 29.3). 1,000 training images are the validation split that
    # selects checkpoints and RiFT's modules.
    "full-cpu": Preset("full-cpu", "cifar10", "resnet20", n_val=1000, n_test=None, batch_size=128,
                       eval_batch_size=500, alpha=4 / 255, pgd_steps=2, epochs_standard=6, epochs_pgd_at=6,
                       epochs_trades=6, epochs_fgsm_rs=6, lr=0.1, lr_fgsm_rs=0.2, schedule="cosine",
                       n_val_robust=1000, ft_epochs=2, ft_lr=1e-3),
    "paper": Preset("paper", "cifar10", "resnet18", n_val=1000, n_test=None, batch_size=128,
                    eval_batch_size=256, epochs_standard=200, epochs_pgd_at=110, epochs_trades=110,
                    epochs_fgsm_rs=15, schedule="step", n_val_robust=1000, ft_epochs=10, ft_lr=1e-3),
}
DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS)
    return PRESETS[name]


def concrete(preset: Preset, spec) -> Preset:
    """Fill the threat model and augmentation left open with the dataset's standard values, and check the
    limits that depend on the dataset or on another field."""
    eps = preset.eps if preset.eps is not None else spec.eps
    out = replace(preset, eps=eps,
                  eps_l2=preset.eps_l2 if preset.eps_l2 is not None else spec.eps_l2,
                  eps_l1=preset.eps_l1 if preset.eps_l1 is not None else spec.eps_l1,
                  alpha=preset.alpha if preset.alpha is not None else eps / 4,
                  crop_pad=preset.crop_pad if preset.crop_pad is not None else spec.crop_pad,
                  flip=preset.flip if preset.flip is not None else spec.flip)
    if out.crop_pad >= spec.size:  # reflect padding needs a pad smaller than the image
        raise BenchError(f"crop_pad must be < {spec.size} (the image size of this dataset), got {out.crop_pad}")
    dims = spec.channels * spec.size * spec.size
    for name, diameter in (("eps_l2", math.sqrt(dims)), ("eps_l1", float(dims))):
        if getattr(out, name) > diameter:
            raise BenchError(f"{name} must be <= {diameter:.4g} (the {name[4:].upper()} diameter of this dataset's "
                             f"image cube: a larger ball holds every image), got {getattr(out, name)}")
    if out.n_val_robust > out.n_val:
        raise BenchError(f"n_val_robust ({out.n_val_robust}) must be <= n_val ({out.n_val}): only validation "
                         f"images are attacked to select checkpoints; set both")
    return out


def override_preset(preset: Preset, values: dict[str, Any],
                    plugin_params: dict[str, tuple[str, str, str]] | None = None) -> Preset:
    """Apply `--set key=value` / TOML `set` overrides, each converted to its field's type and checked
    against its declared range (LIMITS). `plugin_params` maps the parameter names of the run's plugins to
    (the plugin, the option that sets one, its TOML table), e.g. ("defense 'x'", "--param ", "params."), so
    that `--set` of a plugin's parameter says where it belongs."""
    names = [f.name for f in fields(Preset) if f.name not in NOT_SET]
    kinds = {f.name: f for f in fields(Preset)}
    changes = {}
    for key, raw in values.items():
        if key in NOT_SET:
            raise BenchError(f"'{key}' is not set with --set or [set]: use {NOT_SET[key]}")
        if key not in kinds and key in (plugin_params or {}):
            owner, option, table = plugin_params[key]
            raise BenchError(f"'{key}' is not a preset field but a parameter of {owner}: use {option}{key}={raw} "
                             f"(TOML: {table}{key} = ...)")
        if key not in kinds:
            raise BenchError(f"preset has no field {key!r}{did_you_mean(key, names)}")
        changes[key] = _coerce(key, raw, kinds[key])
    return replace(preset, **changes) if changes else preset


def _field_kind(f: dataclasses.Field) -> type:
    text = str(f.type)
    for kind in (bool, int, float, str):
        if kind.__name__ in text:
            return kind
    return str


def _coerce(key: str, raw: Any, f: dataclasses.Field) -> Any:
    if raw is None or isinstance(raw, str) and raw.strip().lower() == "none":
        if "None" not in str(f.type):
            raise BenchError(f"preset field '{key}' cannot be none")
        return None
    return convert(key, Param(None, key, kind=_field_kind(f), **LIMITS[key]), raw, what="preset field")


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


def model_identity(arch: str, model_source: str = "", normalize: tuple | None = None) -> dict:
    """What names the network in a run's (and a cached base model's) identity: its model name and, only when
    they apply, its factory's source digest and the input normalisation put in front of it (so identities,
    and run ids, of runs with neither stay as they were)."""
    out: dict[str, Any] = {"arch": arch}
    if model_source:
        out["model_source"] = model_source
    if normalize is not None:
        out["normalize"] = [list(normalize[0]), list(normalize[1])]
    return out


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
    compile: bool = False  # torch.compile for training: how fast, not what (outside the identity, as the device)
    protocol: str = "adaptive"
    out: str = "results"
    base_checkpoints: tuple = ()  # (recipe, path, sha256)
    checks: bool = True
    data_fingerprint: str = ""
    command: str = ""
    save_adversarial: bool = False  # where results go, not what they are: outside the identity
    normalize: tuple | None = None  # (means, stds) put in front of the model (--normalize), or None
    model_source: str = ""  # sha256 of the model factory's source file, for a model from outside bnbench
    meta: tuple = ()  # sorted (field, value) pairs of --meta: stored with the run, not part of its identity
    standard: tuple = ()  # (field, value): the data's standard value of each of ADDED_FIELDS
    added_at_default: tuple = ()  # the defense's `added` parameters at their default: not in the identity

    def identity(self) -> dict:
        """What determines the defended model and its clean/attack results (not where they are stored)."""
        return {
            "defense": self.defense, "params": [list(p) for p in self.params if p[0] not in self.added_at_default],
            "preset": preset_identity(self.preset, dict(self.standard)), "dataset": self.dataset,
            **model_identity(self.arch, self.model_source, self.normalize),
            "seed": self.seed, "precision": self.precision, "data": self.data_fingerprint,
            "base_checkpoints": [[r, s] for r, _, s in self.base_checkpoints],
        }

    @property
    def run_id(self) -> str:
        return run_id_of(self.identity())


# Preset fields added after results were stored. At the dataset's standard value a run's identity leaves them
# out, so that a run keeps the id (and the cached trainings) it had before the field existed; set to another
# value, they are part of it.
ADDED_FIELDS = ("eps_l1",)


def preset_identity(preset: Preset, standard: dict) -> dict:
    """The preset as a run's identity holds it: `standard` gives the data's standard value of each added
    field (RunConfig.standard), at which the field is left out."""
    out = dataclasses.asdict(preset)
    for name in ADDED_FIELDS:
        if name in standard and out[name] == standard[name]:
            del out[name]
    return out


def run_id_of(identity: dict) -> str:
    """A run's id from its identity (`RunConfig.identity()`, as stored in runs.config): the one place it is
    computed, so a results-database migration that rewrites stored identities gives the ids runs get."""
    return stable_hash(identity)


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


def derived_seed(*parts: Any) -> int:
    """A 32-bit seed for torch.manual_seed from the run seed and a purpose (e.g. `seed, "defense", name`):
    each random stream reproducible on its own, whatever ran before it."""
    return int(stable_hash(list(parts))[:8], 16)


def to_json(obj: Any) -> Any:
    """`json.dumps(default=to_json)`: numpy and torch values as plain numbers and lists, sets and tuples as
    lists, anything else as its text."""
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


MAX_TOML_BYTES = 16 * 2**20  # a run or sweep file is a few kB; more is not one (/dev/zero would fill the memory)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as fh:  # (a pipe, as from `--config <(...)`, is read like a file)
            data = fh.read(MAX_TOML_BYTES + 1)
    except FileNotFoundError:
        raise BenchError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise BenchError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise BenchError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # a path holding a NUL character
        raise BenchError(f"config file {str(path)!r} cannot be opened: {exc}") from None
    if len(data) > MAX_TOML_BYTES:
        raise BenchError(f"config file {path} is larger than {MAX_TOML_BYTES // 2**20} MiB: not a settings file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BenchError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise BenchError(f"config file {path} nests arrays or tables too deeply to be a settings file") from None


MAX_SEED = 2**63 - 1  # seeds are stored as SQLite integers (signed 64-bit)


def validate_seed(value: Any, what: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise BenchError(f"{what} must be an integer in 0..2**63-1, got {value!r}")
    return value


# The declared type of every key of a TOML file: (what an error calls it, the test a value passes).
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool))


def _list_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(test(i) for i in v)


def _table_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(test(i) for i in v.values())


def _either(*tests: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: any(t(v) for t in tests)


_name = lambda v: isinstance(v, str) and bool(v.strip())  # noqa: E731
NAME = ("a non-empty string", _name)
BOOL = ("true or false", lambda v: isinstance(v, bool))
SEED = ("an integer", _is_int)
NAMES = ("a string or a list of strings", _either(_name, _list_of(_name)))
SEEDS = ("an integer or a list of integers", _either(_is_int, _list_of(_is_int)))
_value = _either(_is_scalar, _list_of(_is_scalar))  # a tuple parameter takes a list
VALUES = ("a table of values (a value: string, number, boolean or a list of them)", _table_of(_value))
GRID = ("a table of lists of values (grid = { k = [1, 2] })", _table_of(_either(_value, _list_of(_value))))
SETS = ("a table of values (string, number or boolean)", _table_of(_is_scalar))
ATTACK_PARAMS = ("a table of tables of values (attack_params.pgd10 = { steps = 20 })",
                 _table_of(_table_of(_value)))
CHECKPOINTS = ("a path or a table of recipe = path", _either(_name, _table_of(_name)))
CELLS = ("a list of tables ([[cells]])", _list_of(lambda v: isinstance(v, dict)))


# ----------------------------------------------------------------------------------------------------
# Run settings, each declared once (SETTINGS, below).


# The model-card fields of the RobustBench export a run's --meta gives: they describe the defense, not what
# ran, so they are not part of the run's identity. `reported:L2` applies to the L2 record only.
META_FIELDS = ("link", "authors", "venue", "reported", "footnote", "additional_data")
# The key of a stored run's info that holds what the harness records beside the defense's own info: the
# defense's declared forward passes per prediction, its declared surrogates, the cached files and --meta.
RUN_INFO = "bench"


def harness_info(run: dict | None) -> dict:
    """What the harness recorded under RUN_INFO in a stored run's info ({} when absent or malformed)."""
    info = run.get("info") if isinstance(run, dict) else None
    recorded = info.get(RUN_INFO) if isinstance(info, dict) else None
    return recorded if isinstance(recorded, dict) else {}


def default_surrogate(run: dict | None) -> str:
    """The name a stored run's defense declares for its default surrogate ('' when it names none)."""
    declared = harness_info(run).get("surrogates")
    return next(iter(declared), "") if isinstance(declared, dict) else ""


def validate_meta(meta: dict) -> tuple:
    """--meta's pairs, sorted, each field known (and its norm, given as FIELD:NORM)."""
    from bench.composition import NORMS

    for key in meta:
        name, colon, norm = key.partition(":")
        if name not in META_FIELDS:
            raise BenchError(f"--meta has no field {name!r}{did_you_mean(name, META_FIELDS)}; "
                             f"its fields: {', '.join(META_FIELDS)}")
        if colon and norm not in NORMS:
            raise BenchError(f"--meta {key!r}: the threat model must be one of {', '.join(NORMS)}, got {norm!r}")
        if name == "link" and not re.match(r"https?://[^\s/]", str(meta[key]), re.IGNORECASE):
            raise BenchError(f"--meta {key} must be an http:// or https:// address, got {str(meta[key])!r}")
    return tuple(sorted((k, str(v)) for k, v in meta.items()))


def parse_attack_params(items, flag: str = "--attack-param") -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in parse_assignments(items, flag).items():
        name, dot, param = key.partition(".")
        if not dot or not param:
            raise BenchError(f"malformed {flag} {f'{key}={value}'!r}: expected attack.key=value")
        out.setdefault(name, {})[param] = value
    return out


def _text(value: str, flag: str) -> str:
    if not value.strip():  # `--dataset ""` must not mean the preset's
        raise BenchError(f"{flag} must not be empty")
    return value


def _any_text(value: str, flag: str) -> str:
    return value


def _integer(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BenchError(f"{flag.lstrip('-')} must be an integer, got {value!r}") from None


def _checkpoints(items, flag: str) -> dict[str, str]:
    """['[RECIPE=]PATH', ...] -> {recipe: path} (recipe default pgd_at)."""
    out = {}
    for item in items:
        recipe, sep, path = item.partition("=")
        if not sep:
            recipe, path = "pgd_at", item
        if not path.strip():
            raise BenchError(f"{flag} {item!r} names no file")
        out[recipe.strip()] = path.strip()
    return out


def _copy(value: Any) -> Any:
    """A TOML value as a setting's value: tables copied (one level deep), so no request shares them."""
    if isinstance(value, dict):
        return {k: dict(v) if isinstance(v, dict) else v for k, v in value.items()}
    return value


# The preset field holding the budget of each norm: `--threat NORM:EPS` sets it.
NORM_BUDGET = {"Linf": "eps", "L2": "eps_l2", "L1": "eps_l1"}


def parse_threat(text: str) -> tuple[str, float]:
    """'Linf:8/255' -> ('Linf', 0.0313...); 'L2:0.5' -> ('L2', 0.5). Norm names are matched case-blind."""
    norm, sep, budget = str(text).partition(":")
    names = {n.lower(): n for n in NORM_BUDGET}
    if not sep or norm.strip().lower() not in names:
        raise BenchError(f"threat must be NORM:EPS with NORM one of {', '.join(NORM_BUDGET)} (e.g. Linf:8/255), "
                         f"got {str(text)!r}")
    norm = names[norm.strip().lower()]
    eps = convert(norm, Param(None, "budget", kind=float, above=0, high=1 if norm == "Linf" else None),
                  budget.strip(), what="threat budget")
    return norm, eps


RUN_ONLY, RUN_AND_CHECK = ("run",), ("run", "check")  # the commands that take a setting's option


@dataclass(frozen=True)
class Setting:
    """One run setting, declared once: from it come its `runner.Request` field and default, its option of
    `bench run` (and `bench check`), its key in `bench run --config FILE` and in sweep files, and its place
    in a sweep job's equivalent command. A new setting is one entry in SETTINGS, then its use in
    `runner.prepare`."""

    name: str  # the Request field, and the click option's destination
    kind: tuple | None  # (what an error calls it, the test a TOML value passes); None: not in TOML files
    default: Any  # a table default ({}) is copied for each request
    flags: tuple[str, ...] = ()  # the CLI option ("--data-dir") and its aliases or short form; (): not on the CLI
    help: str = ""
    commands: tuple[str, ...] = RUN_ONLY
    show_default: bool = False  # help ends with "[default: ...]"
    metavar: str | None = None
    read: Callable[[Any, str], Any] = _text  # (the option's value, its flag) -> the setting's value
    multiple: bool = False  # the option may repeat; `read` gets every value
    switch: bool = False  # an option without a value: giving it sets the opposite of the default
    key: str = ""  # the TOML key, when it differs from the name
    from_toml: Callable[[Any], Any] = _copy  # a validated TOML value -> the setting's value
    sweep: tuple[str, ...] = ()  # where a sweep file takes it: "top" (for every cell), "cell" (a [[cells]] table)
    pinned: bool = False  # named in a sweep job's command even at its default (so the command keeps its
    #                       meaning if the default changes)

    @property
    def toml_key(self) -> str:
        return self.key or self.name

    @property
    def help_text(self) -> str:
        return self.help + (f" [default: {self.default}]" if self.show_default else "")

    def option_value(self, given: Any) -> tuple[bool, Any]:
        """(whether the option was given, the setting's value) from click's value for the option."""
        if self.switch:
            return bool(given), not self.default
        if given is None or given == ():
            return False, None
        return True, self.read(given, "/".join(self.flags))  # aliases (--model/--arch) are named together


TOP, CELL = ("top",), ("cell",)
TOP_AND_CELL = ("top", "cell")
# The order is that of the options in `--help` (RUN_AND_CHECK ones first) and in a sweep job's command.
SETTINGS: tuple[Setting, ...] = (
    Setting("defense", NAME, None, ("--defense",), "Defense name (see `bench list`).", RUN_AND_CHECK, sweep=CELL),
    Setting("params", VALUES, {}, ("--param",), "Defense parameter.", RUN_AND_CHECK, metavar="KEY=VALUE",
            read=parse_assignments, multiple=True, sweep=CELL),
    Setting("attacks", NAMES, "default", ("--attacks",),
            "Comma-separated attack names (name[key=value;...] for parameters), 'all' (the whole suite) or "
            "'default' (the attacks that declare in_default; `bench list` marks them).", show_default=True,
            read=_any_text, sweep=TOP_AND_CELL, pinned=True),  # empty: prepare says "no attacks given"
    Setting("attack_params", ATTACK_PARAMS, {}, ("--attack-param",), "Attack parameter, e.g. fgsm.eps=16/255.",
            metavar="ATTACK.KEY=VALUE", read=parse_attack_params, multiple=True),
    Setting("threat", NAME, None, ("--threat",),
            "Threat model of every attack, NORM:EPS (Linf:8/255, L2:0.5, L1:12): the preset's budget of that norm, "
            "and each attack run under that norm; attacks of 'all'/'default' that cannot are left out "
            "(default: each attack's own norm at the preset's budgets).", metavar="NORM:EPS",
            sweep=TOP_AND_CELL),
    Setting("preset", NAME, DEFAULT_PRESET, ("--preset",), f"Scale: {', '.join(PRESETS)}.", RUN_AND_CHECK,
            show_default=True, sweep=TOP_AND_CELL, pinned=True),
    Setting("dataset", NAME, None, ("--dataset",), "A registered dataset (see `bench list`), options as "
            "name[key=value;...], e.g. imagefolder[size=64] (default: the preset's).", RUN_AND_CHECK,
            sweep=TOP_AND_CELL),
    Setting("data_dir", NAME, None, ("--data-dir",), "Where the data is: a directory holding cifar-*-python/ or "
            "tiny-imagenet-200/ (empty: download), an image folder with train/ and test/, or a .npz/.pt file.",
            RUN_AND_CHECK, sweep=TOP_AND_CELL),
    # --model and --arch are one setting (TOML key `arch`): a model is named as an architecture is
    Setting("arch", NAME, None, ("--model", "--arch"),
            "Model: a name from `bench list` or your factory as pkg.module:function (default: the preset's "
            "architecture). Without --defense, the model is evaluated as it is (defense as_is).", RUN_AND_CHECK,
            metavar="NAME|PKG.MODULE:FACTORY", sweep=TOP_AND_CELL),
    Setting("normalize", NAME, None, ("--normalize",),
            "Input normalisation put in front of the model, for one trained on normalised inputs (attacks stay "
            "in [0,1]): none, MEAN,STD for every channel, C means then C stds, or a dataset name.",
            RUN_AND_CHECK, metavar="MEAN,STD", sweep=TOP_AND_CELL),
    Setting("device", NAME, "auto", ("--device",), "cpu, cuda or auto.", RUN_AND_CHECK, show_default=True,
            sweep=TOP),
    Setting("seed", SEED, 0, ("--seed",), "Run seed.", RUN_AND_CHECK, show_default=True,
            read=_integer),  # a sweep's `seeds` (sweep.AXES) sets it
    Setting("protocol", NAME, "adaptive", ("--protocol",),
            "adaptive (attack the defended model), paper (attack its surrogate) or paper:NAME (another "
            "surrogate the defense declares; `bench list`)."),  # sweeps: `protocols`
    Setting("out", NAME, "results", ("--out",), "Results directory (database and cached models).", RUN_AND_CHECK,
            show_default=True, sweep=TOP),
    Setting("precision", NAME, "auto", ("--precision",),
            "Training precision: auto, bf16 or fp32 (evaluation is fp32).", RUN_AND_CHECK, show_default=True,
            sweep=TOP),
    Setting("compile", BOOL, False, ("--compile",),
            "Compile training forwards and backwards with torch.compile (opt-in: it pays on long GPU trainings; "
            "the first epoch waits for the compiler). Evaluation is never compiled.", switch=True, sweep=TOP),
    Setting("sets", SETS, {}, ("--set",), "Override a preset number.", RUN_AND_CHECK, metavar="FIELD=VALUE",
            read=parse_assignments, multiple=True, key="set", sweep=TOP_AND_CELL),
    Setting("base_checkpoints", CHECKPOINTS, {}, ("--checkpoint", "--base-checkpoint"),
            "Weights for the model: the base model of RECIPE instead of training one (default pgd_at), or what "
            "as_is evaluates. A state dict, alone or under state_dict/model/net.", RUN_AND_CHECK,
            metavar="[RECIPE=]PATH", read=_checkpoints, multiple=True, key="base_checkpoint",
            from_toml=lambda v: {"pgd_at": v} if isinstance(v, str) else dict(v)),
    Setting("quiet", None, False, ("--quiet", "-q"), "No progress bars or progress messages.", RUN_AND_CHECK,
            switch=True),
    Setting("checks", BOOL, True, ("--no-checks",), "Skip the sanity checks.", switch=True, sweep=TOP),
    Setting("save_adversarial", BOOL, False, ("--save-adversarial",),
            "Keep each attacked cell's adversarial examples (compressed .npz under OUT/adversarial/).", switch=True,
            sweep=TOP),
    Setting("meta", SETS, {}, ("--meta",), "A field of the RobustBench export (link, authors, venue, reported, "
            "footnote, additional_data; FIELD:NORM for one threat model), stored with the run, not part of its "
            "identity.", metavar="FIELD=VALUE", read=parse_assignments, multiple=True),
)
SETTING = {s.name: s for s in SETTINGS}
TOML_KEYS = {s.toml_key: s.kind for s in SETTINGS if s.kind is not None}


def toml_settings(table: dict) -> dict[str, Any]:
    """The settings a validated TOML table gives, by Request field name."""
    return {s.name: s.from_toml(table[s.toml_key]) for s in SETTINGS if s.kind is not None and s.toml_key in table}


def merge_setting(old: Any, new: Any) -> Any:
    """A command-line value over a TOML one: a table is updated key by key (attack_params attack by attack),
    anything else replaced."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    out = _copy(old)
    for k, v in new.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate_toml(table: dict, kinds: dict[str, tuple], where: str) -> None:
    """Every key known and of its declared type: a wrong value is one clear error, never a crash later."""
    for key, value in table.items():
        if key not in kinds:
            raise BenchError(f"{where}: unknown key {key!r}{did_you_mean(key, kinds)}")
        if key != "cells" and _holds_nul(value):  # (cells are tables validated one by one)
            raise BenchError(f"{where}: '{key}' holds a NUL character (\\u0000), which no name, path or value "
                             f"can hold")
        text, test = kinds[key]
        if not test(value):
            shown = _SHOWN.repr(value)  # (reprlib: a few levels of a value tomllib may nest hundreds deep)
            raise BenchError(f"{where}: '{key}' must be {text}, got "
                             f"{shown if len(shown) <= 60 else shown[:57] + '...'}")


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 60, 60


def _holds_nul(value: Any) -> bool:
    """Whether a TOML value holds a string (a key or a value, at any depth) with a NUL character: TOML
    allows "\\u0000", but no path can hold one (the OS refuses it) and no name or parameter means it.
    Iterative: tomllib hands over lists nested hundreds deep, deeper than a recursion may go."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str) and "\0" in item:
            return True
        if isinstance(item, dict):
            todo += [*item, *item.values()]
        elif isinstance(item, list):
            todo += item
    return False


def validate_toml_keys(conf: dict, path: str) -> None:
    validate_toml(conf, TOML_KEYS, f"config file {path}")
