"""Datasets as in-memory tensors in [0,1], a deterministic validation split, augmentation on tensors.

No torchvision: CIFAR is read from the standard `cifar-*-python` pickle layout, digits from scikit-learn.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError, unknown


@dataclass(frozen=True)
class DatasetSpec:
    channels: int
    size: int
    num_classes: int
    eps: float  # standard L-inf budget on [0,1] images
    eps_l2: float
    crop_pad: int
    flip: bool
    mean: tuple
    std: tuple
    # standard L1 budget: 12 on CIFAR (AutoAttack's L1 / APGD-L1, Croce & Hein 2021), an eighth of the L-inf
    # ball's L1 extent (3072 x 8/255 = 96). Digits take 2: two of the 64 pixels changed fully, about a sixth
    # of their L-inf ball's extent (64 x 0.2 = 12.8), their budgets being a little larger than CIFAR's
    # relative to the image in every norm (L2 1 vs 0.5).
    eps_l1: float = 12.0


DATASETS = {
    # Digits are 8x8 with 17 grey levels: 8/255 is below one grey level, so the budget is 0.2.
    # Flipping a digit changes its meaning, and the digits are centred: a 1-px crop cost the quick
    # preset 6 points of clean accuracy (91 -> 97%), so neither is used.
    "digits": DatasetSpec(1, 8, 10, 0.2, 1.0, 0, False, (0.30,), (0.38,), eps_l1=2.0),
    "cifar10": DatasetSpec(3, 32, 10, 8 / 255, 0.5, 4, True, (0.4914, 0.4822, 0.4465),
                           (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetSpec(3, 32, 100, 8 / 255, 0.5, 4, True, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762)),
}

# Official archives (Krizhevsky). The URL table is module-level so tests can point it at local files.
ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
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

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_single: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if drop_single and len(idx) < 2:  # train-mode BN cannot normalise one sample
                continue
            yield self.x[idx], self.y[idx]


@dataclass
class Dataset:
    name: str
    spec: DatasetSpec
    train: Split
    val: Split
    test: Split
    fingerprint: str  # everything a run reads, test images included
    train_fingerprint: str = ""  # train and validation only: what a base model's training reads

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes


# ----------------------------------------------------------------------------------------------------
# loading


def load(name: str, data_dir: str | os.PathLike | None = None, *, n_train: int | None = None,
         n_val: int = 0, n_test: int | None = None) -> Dataset:
    """Load a dataset, carve `n_val` validation images from train (deterministically), keep the first
    `n_test` test images."""
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    for key, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and value < 1:
            raise BenchError(f"{key} must be >= 1 (or none for all images), got {value}")
    if name == "digits":
        (xtr, ytr), (xte, yte), digest = _load_digits()
    else:
        (xtr, ytr), (xte, yte), digest = _load_cifar(name, data_dir)
    # a cap beyond the data would be stored as if it had taken effect
    for key, value, have, split in (("n_train", n_train, len(ytr), "training"), ("n_test", n_test, len(yte), "test")):
        if value is not None and value > have:
            raise BenchError(f"{key}={value} but the {name} {split} set has {have} images "
                             f"(--set {key}=none takes them all)")
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    if len(ytr) - n_val < 2:  # training skips a batch of one image (train-mode BN): nothing would be learnt
        raise BenchError(f"{name}: {max(len(ytr) - n_val, 0)} training image(s) left after n_val={n_val} "
                         f"(of {len(ytr)}); lower n_val or raise n_train")
    # The validation split never depends on the run seed: every run of a leaderboard shares it.
    perm = torch.from_numpy(np.random.default_rng(12345).permutation(len(ytr)))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    train = Split(xtr, ytr)
    test = Split(xte, yte)
    if n_test is not None:
        test = test.subset(slice(0, n_test))
    fp = hashlib.sha256(f"{digest}:{n_train}:{n_val}:{len(test)}".encode()).hexdigest()[:16]
    train_fp = hashlib.sha256(f"{digest}:{n_train}:{n_val}".encode()).hexdigest()[:16]
    return Dataset(name, DATASETS[name], train.subset(train_idx), train.subset(val_idx), test, fp, train_fp)


def _to_split(x: np.ndarray, y) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy(np.ascontiguousarray(x)).float()
    return xt, torch.as_tensor(np.asarray(y), dtype=torch.long)


def _load_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    # The scikit-learn convention: first 70% train, the rest test, in the file's order (no RNG).
    cut = int(round(0.7 * len(y)))
    digest = hashlib.sha256(bunch.data.tobytes() + bunch.target.tobytes()).hexdigest()
    return _to_split(x[:cut], y[:cut]), _to_split(x[cut:], y[cut:]), digest


def _find_folder(name: str, data_dir) -> Path:
    url, md5, folder_name = ARCHIVES[name]
    if data_dir is None:
        raise BenchError(f"{name} needs --data-dir DIR: a directory holding {folder_name}/ "
                         f"(or an empty directory to download the official archive into)")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise BenchError(f"data directory {root} does not exist (create it empty to download {name})")
    if not root.is_dir():
        raise BenchError(f"data directory {root} is not a directory")
    if root.name == folder_name:
        return root
    if (root / folder_name).is_dir():
        return root / folder_name
    if any(root.iterdir()):
        raise BenchError(f"data directory {root} holds no {folder_name}/ folder (expected the standard "
                         f"{name} python layout)")
    download(name, root)
    return root / folder_name


def download(name: str, root: Path) -> None:
    """Fetch the official archive into `root`, check its md5, and unpack it."""
    url, md5, folder_name = ARCHIVES[name]
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".tar.gz.part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=30) as resp, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(resp, out, length=1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BenchError(f"{root} is empty and {name} could not be downloaded from {url} ({reason}); "
                             f"without network, put {folder_name}/ there by hand") from None
        digest = hashlib.md5(Path(tmp).read_bytes()).hexdigest()
        if digest != md5:
            raise BenchError(f"downloaded {name} archive has md5 {digest}, expected {md5}; not unpacked")
        with tarfile.open(tmp, "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(folder_name + "/") and m.isfile() and ".." not in m.name]
            tar.extractall(root, members=members)
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


def _load_cifar(name: str, data_dir):
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
    return out[0], out[1], digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# augmentation


def augment(x: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after reflect padding, and random horizontal flip, per sample, on a batch tensor."""
    b, c, h, w = x.shape
    if crop_pad:
        padded = F.pad(x, (crop_pad,) * 4, mode="reflect")
        top = torch.randint(0, 2 * crop_pad + 1, (b,), generator=generator)
        left = torch.randint(0, 2 * crop_pad + 1, (b,), generator=generator)
        rows = (top[:, None] + torch.arange(h))[:, None, :, None]
        cols = (left[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x
