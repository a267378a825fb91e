"""Datasets as in-memory tensors in [0,1], a deterministic validation split, augmentation on tensors.

No torchvision: CIFAR is read from the standard `cifar-*-python` pickle layout, digits from scikit-learn.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError, did_you_mean, os_reason, unknown
from bench.params import Param, convert, exact_text, parse_item


@dataclass(frozen=True)
class DatasetSpec:
    """What a run needs to know of a dataset besides its images. The threat model and augmentation are the
    dataset's standard ones (a preset or `--set` may override them); a generic reader takes these defaults."""

    channels: int
    size: int  # images are size x size
    num_classes: int
    eps: float = 8 / 255  # standard L-inf budget on [0,1] images
    eps_l2: float = 0.5
    crop_pad: int = 0  # augmentation: random crop after this much reflect padding (0: none)
    flip: bool = False  # augmentation: random horizontal flip
    mean: tuple = ()  # per-channel normalisation constants of the built-in architectures' first layer
    std: tuple = ()
    # standard L1 budget: 12 on CIFAR (AutoAttack's L1 / APGD-L1, Croce & Hein 2021), an eighth of the L-inf
    # ball's L1 extent (3072 x 8/255 = 96). Digits take 2: two of the 64 pixels changed fully, about a sixth
    # of their L-inf ball's extent (64 x 0.2 = 12.8), their budgets being a little larger than CIFAR's
    # relative to the image in every norm (L2 1 vs 0.5).
    eps_l1: float = 12.0


# The standard specs of the built-in datasets (their loaders below use them). Which names exist is the
# `bench.datasets` entry-point group, not this table.
DATASETS = {
    # Digits are 8x8 with 17 grey levels: 8/255 is below one grey level, so the budget is 0.2.
    # Flipping a digit changes its meaning, and the digits are centred: a 1-px crop cost the quick
    # preset 6 points of clean accuracy (91 -> 97%), so neither is used.
    "digits": DatasetSpec(1, 8, 10, 0.2, 1.0, 0, False, (0.30,), (0.38,), eps_l1=2.0),
    "cifar10": DatasetSpec(3, 32, 10, 8 / 255, 0.5, 4, True, (0.4914, 0.4822, 0.4465),
                           (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetSpec(3, 32, 100, 8 / 255, 0.5, 4, True, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762)),
    # RiFT's third dataset: crop 4 and flip as in its training code; mean/std over all training pixels.
    "tinyimagenet": DatasetSpec(3, 64, 200, 8 / 255, 0.5, 4, True, (0.4802, 0.4481, 0.3975),
                                (0.2770, 0.2691, 0.2821)),
}

# The most classes a dataset may have: beyond any classification benchmark (ImageNet-21k has 21,843). A larger
# label is a corrupt or mislabelled file, not a class: the model's last layer would be built that wide.
MAX_CLASSES = 100_000

# Official archives. The URL table is module-level so tests can point it at local files.
ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    "tinyimagenet": ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                     "90528d7ca1a48142e341f4ef8d21d0de", "tiny-imagenet-200"),
}
CIFAR_FILES = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
                ["test_batch"], "labels"),
    "cifar100": (["train"], ["test"], "fine_labels"),
}


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "Split":
        return Split(self.x[idx], self.y[idx])

    def to(self, device) -> "Split":
        """The split resident on `device` (itself when already there): one host-to-device copy per run
        instead of one per batch."""
        device = torch.device(device)
        if self.x.device == device:
            return self
        return Split(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_single: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        # the order is drawn on the CPU generator wherever the images live: the same seed gives the same
        # batches on every device
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.x.device, non_blocking=True)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if drop_single and len(idx) < 2:  # train-mode BN cannot normalise one sample
                continue
            yield self.x[idx], self.y[idx]


class NoImages:
    """The training or validation split of evaluation-only data: any use of it is the user's error, named
    (a run that trains nothing never touches it)."""

    def __init__(self, dataset: str, which: str) -> None:
        self._message = (f"dataset '{dataset}' has no training images (evaluation-only data), but this run "
                         f"needs its {which} split: train or fine-tune nothing (evaluate a given model), or "
                         f"give training images")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise BenchError(self._message)

    def __len__(self) -> int:
        raise BenchError(self._message)

    def __iter__(self):
        raise BenchError(self._message)


@dataclass
class Dataset:
    name: str  # the label the run stores: registered name and options, e.g. imagefolder[size=64]
    spec: DatasetSpec
    train: Split | NoImages
    val: Split | NoImages
    test: Split
    fingerprint: str  # everything a run reads, test images included
    train_fingerprint: str = ""  # train and validation only: what a base model's training reads

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def has_train(self) -> bool:
        return isinstance(self.train, Split)


# ----------------------------------------------------------------------------------------------------
# what a loader gets and returns


@dataclass(frozen=True)
class DataRequest:
    """What a dataset loader (an entry point of the `bench.datasets` group) is called with."""

    name: str  # the registered name
    data_dir: Path | None  # --data-dir, as given (None when not given)
    options: dict  # the options of `name[key=value;...]`, converted by the loader's `options` declarations
    n_train: int | None = None  # at most this many training images are used (None: all). A hint: a loader
    n_test: int | None = None  # may read only its first ones, in the order it always returns them


@dataclass
class LoadedData:
    """What a dataset loader returns. Images (N, C, H, W) float in [0,1] or uint8 0..255; labels integers in
    0..num_classes-1. `load` checks all of it, caps it, carves the validation split and fingerprints it."""

    spec: DatasetSpec  # mean/std may be left () to be computed from the training images
    test: tuple  # (x, y)
    digest: str  # a hash of the content (and of whatever else decides it, e.g. options): the fingerprint's base
    train: tuple | None = None  # None: evaluation-only data
    val: tuple | None = None  # the data's own validation split; None: carved from train (deterministically)


# Datasets given as tensors in this process (the Python API): name -> what their loader returns.
_IN_MEMORY: dict[str, LoadedData] = {}


# ----------------------------------------------------------------------------------------------------
# loading


@dataclass(frozen=True)
class Source:
    """A dataset item resolved: its loader, options and the label a run stores (name[key=value;...] with the
    options sorted and written exactly, so the same data always gets the same label)."""

    name: str
    options: dict
    label: str
    loader: Callable[[DataRequest], LoadedData]


def names() -> list[str]:
    """Every dataset name this process can load: the registered loaders and the tensors given in-process."""
    from bench import registry

    return sorted(set(registry.names("dataset")) | set(_IN_MEMORY))


def resolve(item: str) -> Source:
    """'imagefolder[size=64]' -> its loader and converted options; unknown names and options are user errors."""
    from bench import registry

    name, given = parse_item(item, "dataset")
    if name in _IN_MEMORY:
        loader = functools.partial(_in_memory, _IN_MEMORY[name])
        declared: dict[str, Param] = {}
    else:
        if name not in registry.providers("dataset"):
            raise unknown("dataset", name, names())
        loader = registry.load("dataset", name)
        declared = getattr(loader, "options", None) or {}
    for key in given:
        if key not in declared:
            raise BenchError(f"dataset '{name}' has no option '{key}'{did_you_mean(key, declared)}; "
                             f"its options: {', '.join(sorted(declared)) or 'none'}")
    options = {k: convert(k, declared[k], v, f"dataset '{name}' option") for k, v in given.items()}
    label = name
    if options:
        label += "[" + ";".join(f"{k}={_option_text(options[k])}" for k in sorted(options)) + "]"
    return Source(name, options, label, loader)


def _option_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(exact_text(v) for v in value)
    return exact_text(value)


def load(name: str, data_dir: str | os.PathLike | None = None, *, n_train: int | None = None,
         n_val: int = 0, n_test: int | None = None) -> Dataset:
    """Load a dataset by name (`name[key=value;...]` for a loader's options), carve `n_val` validation images
    from train (deterministically), keep the first `n_test` test images. Evaluation-only data (no training
    images) ignores n_train and n_val; its train and val splits refuse any use."""
    for key, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and value < 1:
            raise BenchError(f"{key} must be >= 1 (or none for all images), got {value}")
    source = resolve(name)
    root = None if data_dir is None else Path(data_dir).expanduser()
    try:
        raw = source.loader(DataRequest(source.name, root, dict(source.options), n_train, n_test))
    except OSError as exc:  # a path that cannot be used (too long, unreadable): nothing has run yet
        where = exc.filename if exc.filename is not None else root
        raise BenchError(f"dataset '{source.label}': {where}: {os_reason(exc)} (nothing has run)") from None
    if not isinstance(raw, LoadedData):
        raise BenchError(f"dataset '{source.name}': its loader returned {type(raw).__name__}, not LoadedData")
    label = source.label
    xte, yte = _checked(label, "test", raw.test)
    train = None if raw.train is None else _checked(label, "training", raw.train)
    val = None if raw.val is None or train is None else _checked(label, "validation", raw.val)
    spec = _complete_spec(label, raw.spec, [s for s in (train, val, (xte, yte)) if s is not None], train)
    for split_name, split in (("training", train), ("validation", val), ("test", (xte, yte))):
        if split is not None:
            _check_against(label, split_name, split, spec)
    if len(yte) == 0:
        raise BenchError(f"{label}: the test split holds no images")
    # a cap beyond the data would be stored as if it had taken effect
    caps = [("n_test", n_test, len(yte), "test")] + ([("n_train", n_train, len(train[1]), "training")] if train else [])
    for key, value, have, split_name in caps:
        if value is not None and value > have:
            raise BenchError(f"{key}={value} but the {label} {split_name} set has {have} images "
                             f"(--set {key}=none takes them all)")
    test = Split(xte, yte)
    if n_test is not None:
        test = test.subset(slice(0, n_test))
    fp = hashlib.sha256(f"{raw.digest}:{n_train}:{n_val}:{len(test)}".encode()).hexdigest()[:16]
    train_fp = hashlib.sha256(f"{raw.digest}:{n_train}:{n_val}".encode()).hexdigest()[:16]
    if train is None:
        return Dataset(label, spec, NoImages(label, "training"), NoImages(label, "validation"), test, fp, train_fp)
    xtr, ytr = train
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    if val is not None:  # the data's own validation split: its first n_val images
        if n_val > len(val[1]):
            raise BenchError(f"n_val={n_val} but the {label} validation set has {len(val[1])} images")
        if len(ytr) < 2:
            raise BenchError(f"{label}: {len(ytr)} training image(s); training needs at least 2")
        return Dataset(label, spec, Split(xtr, ytr), Split(val[0][:n_val], val[1][:n_val]), test, fp, train_fp)
    if len(ytr) - n_val < 2:  # training skips a batch of one image (train-mode BN): nothing would be learnt
        raise BenchError(f"{label}: {max(len(ytr) - n_val, 0)} training image(s) left after n_val={n_val} "
                         f"(of {len(ytr)}); lower n_val or raise n_train")
    # The validation split never depends on the run seed: every run of a leaderboard shares it.
    perm = torch.from_numpy(np.random.default_rng(12345).permutation(len(ytr)))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    whole = Split(xtr, ytr)
    return Dataset(label, spec, whole.subset(train_idx), whole.subset(val_idx), test, fp, train_fp)


def _checked(label: str, split: str, pair) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's (x, y) as float32 (N, C, H, W) in [0,1] and int64 labels, or one clear line saying what is
    wrong with it."""
    try:
        x, y = pair
    except (TypeError, ValueError):
        raise BenchError(f"{label}: the {split} split is not a pair (images, labels)") from None
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if x.dim() != 4 or x.shape[2] != x.shape[3]:
        raise BenchError(f"{label}: {split} images have shape {tuple(x.shape)}, expected (N, C, size, size)")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise BenchError(f"{label}: {split} images hold NaN or infinite values")
        if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
            raise BenchError(f"{label}: {split} images range over [{float(x.min()):.4g}, {float(x.max()):.4g}], "
                             f"expected [0, 1] (or uint8 0..255)")
    else:
        raise BenchError(f"{label}: {split} images are {x.dtype}, expected uint8 (0..255) or float in [0, 1]")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise BenchError(f"{label}: {split} labels must be a 1-D array of integers, got {y.dtype} of shape "
                         f"{tuple(y.shape)}")
    if len(y) != len(x):
        raise BenchError(f"{label}: {len(x)} {split} images but {len(y)} labels")
    return x.contiguous(), y.long()


def _check_against(label: str, split: str, pair, spec: DatasetSpec) -> None:
    x, y = pair
    if tuple(x.shape[1:]) != (spec.channels, spec.size, spec.size):
        raise BenchError(f"{label}: {split} images are {tuple(x.shape[1:])}, but the dataset's images are "
                         f"{(spec.channels, spec.size, spec.size)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise BenchError(f"{label}: {split} label {bad} is outside 0..{spec.num_classes - 1} "
                         f"({spec.num_classes} classes)")


def _complete_spec(label: str, spec: DatasetSpec, splits: list, train) -> DatasetSpec:
    """The spec with mean/std computed from the training images (the test images of evaluation-only data)
    when the loader left them open, and its numbers checked."""
    if not isinstance(spec, DatasetSpec):
        raise BenchError(f"{label}: its loader gave a {type(spec).__name__} as spec, not a DatasetSpec")
    for key in ("channels", "size", "num_classes"):
        if not isinstance(getattr(spec, key), int) or getattr(spec, key) < 1:
            raise BenchError(f"{label}: spec {key} must be a positive integer, got {getattr(spec, key)!r}")
    if spec.num_classes < 2:
        raise BenchError(f"{label}: {spec.num_classes} class; classification needs at least 2")
    if spec.num_classes > MAX_CLASSES:  # the model's last layer would be built that wide
        raise BenchError(f"{label}: {spec.num_classes:,} classes; at most {MAX_CLASSES:,} are supported")
    if not spec.mean or not spec.std:
        x = (train or splits[0])[0]
        if len(x) == 0:
            raise BenchError(f"{label}: no images to compute the normalisation constants from")
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        mean = tuple(round(float(v), 4) for v in flat.mean(1))
        std = tuple(round(max(float(v), 1e-3), 4) for v in flat.std(1))  # a constant channel: no division by 0
        spec = dataclasses.replace(spec, mean=spec.mean or mean, std=spec.std or std)
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels or min(spec.std) <= 0:
        raise BenchError(f"{label}: mean {spec.mean} and std {spec.std} must give one value per channel "
                         f"({spec.channels}), std > 0")
    return spec


def _in_memory(raw: LoadedData, request: DataRequest) -> LoadedData:
    return raw


def register_tensors(x, y, *, name_hint: str = "tensors", num_classes: int | None = None, train=None,
                     mean=None, std=None) -> str:
    """Make in-memory tensors a dataset of this process and return its name, which `load` (and so a run,
    `bench.evaluate`, ...) then accepts wherever a dataset name goes.

    `x`: test images, (N, C, H, W) or (N, H, W, C) (a channel count of 1 or 3 tells which), or (N, H, W)
    for grey images; uint8 0..255 or float in [0, 1]; numpy arrays or torch tensors. `y`: integer labels.
    `train`: optional (x_train, y_train) in the same form; without it the data is evaluation-only.
    `num_classes`: default the largest label + 1. `mean`/`std`: the normalisation constants of the built-in
    architectures (default: computed from the training images, else the test images).
    The name is `<name_hint>-<12 hex digits of the content's hash>`: the same tensors give the same name
    and fingerprint (so a stored run resumes), different ones never share a name.
    """
    hint = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name_hint)).strip("-.") or "tensors"
    arrays = {"x": x, "y": y}
    if train is not None:
        try:
            arrays["x_train"], arrays["y_train"] = train
        except (TypeError, ValueError):
            raise BenchError("register_tensors: train must be a pair (x_train, y_train)") from None
    arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in arrays.items()}
    options = {"num_classes": num_classes, "mean": tuple(mean or ()), "std": tuple(std or ())}
    where = f"tensors '{hint}'"
    raw = tensors_from_arrays(arrays, where, layout="auto", **options)
    for split in ("test", "train", "val"):  # pixel ranges now, not when a run first loads them
        if getattr(raw, split) is not None:
            _checked(where, split, getattr(raw, split))
    name = f"{hint}-{raw.digest[:12]}"
    _IN_MEMORY[name] = raw
    return name


def tensors_from_arrays(arrays: dict, where: str, *, layout: str = "auto", num_classes: int | None = None,
                        mean: tuple = (), std: tuple = ()) -> LoadedData:
    """x, y (evaluation data) or x_train, y_train, x_test, y_test (with optional x_val, y_val) as a dataset:
    NCHW or NHWC (or NHW, grey), uint8 0..255 or float in [0, 1]. Used by the `tensors` reader and by
    `register_tensors`."""
    keys = set(arrays)
    if {"x", "y"} <= keys and not keys & {"x_test", "y_test"}:
        pairs = {"test": ("x", "y"), "train": ("x_train", "y_train"), "val": ("x_val", "y_val")}
    elif {"x_test", "y_test"} <= keys:
        pairs = {"test": ("x_test", "y_test"), "train": ("x_train", "y_train"), "val": ("x_val", "y_val")}
    else:
        raise BenchError(f"{where} holds {', '.join(sorted(keys)) or 'nothing'}; expected x and y (evaluation "
                         f"data) or x_train, y_train, x_test and y_test")
    for split, (kx, ky) in pairs.items():
        if (kx in keys) != (ky in keys):
            raise BenchError(f"{where} holds {kx if kx in keys else ky} without {ky if kx in keys else kx}")
    splits, digest = {}, hashlib.sha256(f"{layout}:{num_classes}:{mean}:{std}".encode())
    for split, (kx, ky) in pairs.items():
        if kx not in keys:
            continue
        x = _nchw(np.asarray(arrays[kx]), f"{where}: '{kx}'", layout)
        y = np.asarray(arrays[ky])
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise BenchError(f"{where}: '{ky}' must be a 1-D array of integer labels, got {y.dtype} of shape "
                             f"{y.shape}")
        if len(y) != len(x):
            raise BenchError(f"{where}: {len(x)} images in '{kx}' but {len(y)} labels in '{ky}'")
        if len(y) and y.min() < 0:
            raise BenchError(f"{where}: '{ky}' holds the negative label {int(y.min())}; labels are 0..classes-1")
        if len(y) and int(y.max()) >= MAX_CLASSES:  # (before the cast to int64, which would wrap a uint64)
            raise BenchError(f"{where}: '{ky}' holds the label {int(y.max())}; labels are class numbers "
                             f"0..classes-1, and at most {MAX_CLASSES:,} classes are supported (a corrupt or "
                             f"mislabelled file?)")
        x = np.ascontiguousarray(x)
        for part in (split, x.dtype.str, x.shape, x.tobytes(), y.astype(np.int64).tobytes()):
            digest.update(str(part).encode() if not isinstance(part, bytes) else part)
        splits[split] = (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    shapes = {tuple(x.shape[1:]) for x, _ in splits.values()}
    if len(shapes) > 1:
        raise BenchError(f"{where}: the splits' images differ in shape ({', '.join(map(str, sorted(shapes)))})")
    top = max(int(y.max()) for _, y in splits.values() if len(y)) + 1 if any(len(y) for _, y in splits.values()) else 0
    classes = num_classes if num_classes is not None else top
    if top > classes:
        raise BenchError(f"{where}: label {top - 1} is outside 0..{classes - 1} (num_classes={classes})")
    if classes < 2:
        raise BenchError(f"{where}: the labels show {classes} class(es); give num_classes (at least 2)")
    c, h, _ = shapes.pop()
    spec = DatasetSpec(c, h, classes, mean=tuple(mean), std=tuple(std))
    return LoadedData(spec, splits["test"], digest.hexdigest(), splits.get("train"), splits.get("val"))


def _nchw(x: np.ndarray, what: str, layout: str) -> np.ndarray:
    """Images as (N, C, H, W), from NCHW, NHWC or NHW (grey); a square image size is required."""
    if x.dtype.kind not in "uif" or (x.dtype.kind in "iu" and x.dtype != np.uint8):
        if x.dtype.kind == "O":
            raise BenchError(f"{what} holds Python objects, not numbers")
        raise BenchError(f"{what} is {x.dtype}, expected uint8 (0..255) or float in [0, 1]")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise BenchError(f"{what} has shape {x.shape}, expected (N, C, H, W), (N, H, W, C) or (N, H, W)")
    elif layout == "nhwc" or (layout == "auto" and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3)):
        x = x.transpose(0, 3, 1, 2)
    if x.shape[2] != x.shape[3]:
        raise BenchError(f"{what} has shape {x.shape}: images must be square (C, size, size)")
    if x.shape[1] > 4 and layout == "auto":
        raise BenchError(f"{what} has shape {x.shape}: neither NCHW nor NHWC with 1 or 3 channels "
                         f"(give layout=nchw or layout=nhwc)")
    return x


def _to_split(x: np.ndarray, y) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy(np.ascontiguousarray(x)).float()
    return xt, torch.as_tensor(np.asarray(y), dtype=torch.long)


def load_digits(request: DataRequest) -> LoadedData:
    """scikit-learn's 8x8 handwritten digits, 10 classes (built in: no download, no --data-dir)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    # The scikit-learn convention: first 70% train, the rest test, in the file's order (no RNG).
    cut = int(round(0.7 * len(y)))
    digest = hashlib.sha256(bunch.data.tobytes() + bunch.target.tobytes()).hexdigest()
    return LoadedData(DATASETS["digits"], _to_split(x[cut:], y[cut:]), digest, _to_split(x[:cut], y[:cut]))


def load_cifar10(request: DataRequest) -> LoadedData:
    """CIFAR-10, 32x32 RGB, 10 classes: --data-dir holds cifar-10-batches-py/ (empty: download it)."""
    return _load_cifar("cifar10", request.data_dir)


def load_cifar100(request: DataRequest) -> LoadedData:
    """CIFAR-100 (fine labels), 32x32 RGB, 100 classes: --data-dir holds cifar-100-python/ (empty: download)."""
    return _load_cifar("cifar100", request.data_dir)


def _find_folder(name: str, data_dir, marker: str = "") -> Path:
    """The dataset's standard folder: --data-dir itself (named like it, or holding `marker`), the folder
    inside it, or -- when --data-dir is an empty directory -- the official archive downloaded there."""
    url, md5, folder_name = ARCHIVES[name]
    if data_dir is None:
        raise BenchError(f"{name} needs --data-dir DIR: a directory holding {folder_name}/ "
                         f"(or an empty directory to download the official archive into)")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise BenchError(f"data directory {root} does not exist (create it empty to download {name})")
    if not root.is_dir():
        raise BenchError(f"data directory {root} is not a directory")
    if root.name == folder_name or (marker and (root / marker).is_file()):
        return root
    if (root / folder_name).is_dir():
        return root / folder_name
    if any(root.iterdir()):
        raise BenchError(f"data directory {root} holds no {folder_name}/ folder (expected the standard "
                         f"{name} layout)")
    download(name, root)
    return root / folder_name


def download(name: str, root: Path) -> None:
    """Fetch the official archive (tar.gz or zip) into `root`, check its md5, and unpack its folder."""
    url, md5, folder_name = ARCHIVES[name]
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=30) as resp, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(resp, out, length=1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BenchError(f"{root} is empty and {name} could not be downloaded from {url} ({reason}); "
                             f"without network, put {folder_name}/ there by hand") from None
        md5sum = hashlib.md5()
        with open(tmp, "rb") as fh:  # Tiny ImageNet's archive is 248 MB: hashed in chunks
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                md5sum.update(chunk)
        if md5sum.hexdigest() != md5:
            raise BenchError(f"downloaded {name} archive has md5 {md5sum.hexdigest()}, expected {md5}; not unpacked")
        # only regular files inside the dataset's folder, never a path leaving `root`
        inside = lambda path: path.startswith(folder_name + "/") and ".." not in path.split("/")
        if url.endswith(".zip"):
            with zipfile.ZipFile(tmp) as archive:
                archive.extractall(root, members=[m for m in archive.namelist()
                                                  if inside(m) and not m.endswith("/")])
        else:
            with tarfile.open(tmp, "r:gz") as tar:
                tar.extractall(root, members=[m for m in tar.getmembers() if inside(m.name) and m.isfile()])
    finally:
        Path(tmp).unlink(missing_ok=True)


def _verify_sums(folder: Path) -> None:
    """Check files against a SHA256SUMS.tsv next to (or in) the folder, when one is there."""
    for sums in (folder / "SHA256SUMS.tsv", folder.parent / "SHA256SUMS.tsv"):
        if not sums.is_file():
            continue
        try:
            lines = sums.read_bytes().decode("utf-8").splitlines()[1:]
        except UnicodeDecodeError:
            raise BenchError(f"{sums} is not a text file of checksums") from None
        for line in lines:
            parts = line.split("\t")
            if len(parts) < 4 or not (folder / parts[0]).is_file():
                continue
            if hashlib.sha256((folder / parts[0]).read_bytes()).hexdigest() != parts[3]:
                raise BenchError(f"data file {folder / parts[0]} is corrupt (sha256 differs from {sums})")
        return


# The only globals the official CIFAR python files reference: numpy's array pickling, as numpy 1 (the
# official files) and numpy 2 write it. Any other global in a data file could run code while it is read.
_CIFAR_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class _ForeignGlobal(Exception):
    pass


def _latin1_bytes(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # how Python 3 writes bytes at pickle protocol 2 (a subset saved that way); no other codec is run
    if encoding != "latin1" or not isinstance(text, str):
        raise _ForeignGlobal(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1", errors)


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) not in _CIFAR_GLOBALS:
            raise _ForeignGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, label_key: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, size, size) uint8 and labels (N,) int64 of one batch file, checked."""
    if not path.is_file():
        raise BenchError(f"data file {path} is missing")
    try:
        with open(path, "rb") as fh:
            raw = _CifarUnpickler(fh, encoding="bytes").load()
    except _ForeignGlobal as exc:
        raise BenchError(f"data file {path} is not a CIFAR data file (it references {exc}, which the official "
                         f"files never do); it was not loaded") from None
    except Exception as exc:
        raise BenchError(f"data file {path} is corrupt or not in the CIFAR pickle layout "
                         f"({type(exc).__name__}: {exc})") from None

    def refuse(why: str) -> BenchError:
        return BenchError(f"data file {path} is not in the CIFAR pickle layout ({why})")

    if not isinstance(raw, dict):
        raise refuse(f"it holds a {type(raw).__name__}, not a dict")
    batch = {(k.decode(errors="replace") if isinstance(k, bytes) else k): v for k, v in raw.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise refuse(f"no '{key}' entry")
    data = batch["data"]
    # object arrays can carry arbitrary objects; the official files hold uint8 pixels only
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"an array of {data.dtype}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise refuse(f"'data' is {kind}, expected a uint8 array")
    if data.shape[1:] not in ((3 * size * size,), (3, size, size)):
        raise refuse(f"'data' has shape {data.shape}, expected (images, {3 * size * size}) for 3x{size}x{size} "
                     f"images")
    if len(data) == 0:
        raise BenchError(f"data file {path} holds no images")
    labels = batch[label_key]
    labels = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise refuse(f"'{label_key}' is not a list of integers")
    if len(labels) != len(data):
        raise BenchError(f"data file {path} is corrupt: {len(data)} images but {len(labels)} labels")
    return data.reshape(len(data), 3, size, size), labels.astype(np.int64)


def _load_cifar(name: str, data_dir) -> LoadedData:
    folder = _find_folder(name, data_dir)
    _verify_sums(folder)
    train_files, test_files, label_key = CIFAR_FILES[name]
    digest = hashlib.sha256()
    out = []
    for files in (train_files, test_files):
        parts = [_unpickle(folder / f, label_key, 32) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if y.min() < 0 or y.max() >= DATASETS[name].num_classes:
            raise BenchError(f"{folder}: labels outside 0..{DATASETS[name].num_classes - 1}")
        digest.update(x.tobytes())
        digest.update(y.tobytes())
        out.append(_to_split(x.astype(np.float32) / 255.0, y))
    return LoadedData(DATASETS[name], out[1], digest.hexdigest(), out[0])


# ----------------------------------------------------------------------------------------------------
# augmentation


def augment(x: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after reflect padding, and random horizontal flip, per sample, on a batch tensor, on the
    batch's device. The draws come from the CPU `generator` (a few bytes per image), so a seed augments
    alike on every device."""
    b, c, h, w = x.shape
    dev = x.device
    if crop_pad:
        padded = F.pad(x, (crop_pad,) * 4, mode="reflect")
        top = torch.randint(0, 2 * crop_pad + 1, (b,), generator=generator).to(dev, non_blocking=True)
        left = torch.randint(0, 2 * crop_pad + 1, (b,), generator=generator).to(dev, non_blocking=True)
        rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                   rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(dev, non_blocking=True)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x
