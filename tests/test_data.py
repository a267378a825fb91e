"""Datasets: digits, the CIFAR pickle layout (any batch size, str or bytes keys), download, augmentation."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from bench import data
from bench.errors import BenchError


def test_digits_split_is_deterministic_disjoint_and_in_unit_range():
    a = data.load("digits", n_val=200)
    b = data.load("digits", n_val=200)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.test.y, b.test.y)
    assert (len(a.train), len(a.val), len(a.test)) == (1058 - 0, 200, 539)
    assert a.train.x.shape[1:] == (1, 8, 8) and 0 <= a.train.x.min() and a.train.x.max() <= 1
    rows = {tuple(r) for r in a.train.x.flatten(1).numpy().round(4).tolist()}
    # a validation image is never also a training image (a few digits are pixel-identical duplicates)
    dup = sum(tuple(r) in rows for r in a.val.x.flatten(1).numpy().round(4).tolist())
    assert dup <= 2
    assert a.fingerprint == b.fingerprint
    assert data.load("digits", n_val=100).fingerprint != a.fingerprint


def test_cifar10_subset_loads_with_counts_and_checksums(cifar10_dir):
    ds = data.load("cifar10", cifar10_dir, n_val=500, n_test=100)
    assert len(ds.train) + len(ds.val) == 5170 and len(ds.val) == 500
    assert len(ds.test) == 100 and ds.train.x.shape[1:] == (3, 32, 32)
    assert ds.train.x.dtype == torch.float32 and float(ds.train.x.max()) <= 1.0
    assert set(ds.train.y.tolist()) == set(range(10))
    # also accepted: the cifar-10-batches-py folder itself
    same = data.load("cifar10", cifar10_dir / "cifar-10-batches-py", n_val=500, n_test=100)
    assert torch.equal(same.test.x, ds.test.x)


def test_cifar100_subset_uses_fine_labels(cifar100_dir):
    ds = data.load("cifar100", cifar100_dir, n_val=50)
    assert ds.num_classes == 100 and len(ds.train) + len(ds.val) == 486 and len(ds.test) == 916
    assert int(ds.test.y.max()) < 100 and len(set(ds.test.y.tolist())) > 50


def _write_batch(path, n, keys_as_bytes, seed):
    rng = np.random.default_rng(seed)
    d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist(),
         "batch_label": "x"}
    if keys_as_bytes:
        d = {k.encode(): v for k, v in d.items()}
    path.write_bytes(pickle.dumps(d))
    return d


@pytest.mark.parametrize("keys_as_bytes", [False, True])
def test_any_batch_size_and_str_or_bytes_keys(tmp_path, keys_as_bytes):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    sizes = [3, 5, 7, 2, 4]
    for i, n in enumerate(sizes, start=1):
        _write_batch(folder / f"data_batch_{i}", n, keys_as_bytes, i)
    written = _write_batch(folder / "test_batch", 6, keys_as_bytes, 9)
    ds = data.load("cifar10", tmp_path, n_val=2)
    assert len(ds.train) + len(ds.val) == sum(sizes) and len(ds.test) == 6
    raw = written[b"data" if keys_as_bytes else "data"]
    assert torch.allclose(ds.test.x[0], torch.from_numpy(raw[0].reshape(3, 32, 32)).float() / 255)


def test_corrupt_and_missing_files_are_user_errors(tmp_path, cifar10_dir):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10_dir / "cifar-10-batches-py", folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(BenchError, match="data_batch_3 is corrupt"):
        data.load("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(BenchError, match="data_batch_3 is missing"):
        data.load("cifar10", tmp_path)
    with pytest.raises(BenchError, match="does not exist"):
        data.load("cifar10", tmp_path / "nope")
    with pytest.raises(BenchError, match="needs --data-dir"):
        data.load("cifar10", None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    with pytest.raises(BenchError, match="holds no cifar-10-batches-py"):
        data.load("cifar10", tmp_path / "other")


def test_sha256sums_catch_a_flipped_byte(tmp_path, cifar10_dir):
    shutil.copytree(cifar10_dir, tmp_path / "c10")
    path = tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_2"
    path.chmod(0o644)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF  # a pixel, so the pickle still loads: only the checksum can tell
    path.write_bytes(bytes(blob))
    with pytest.raises(BenchError, match="data_batch_2 is corrupt \\(sha256"):
        data.load("cifar10", tmp_path / "c10")


def _archive(cifar10_dir, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(cifar10_dir / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_into_an_empty_directory_checks_md5(tmp_path, cifar10_dir, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = _archive(cifar10_dir, archive)
    target = tmp_path / "empty"
    target.mkdir()
    monkeypatch.setitem(data.ARCHIVES, "cifar10", (archive.as_uri(), md5, "cifar-10-batches-py"))
    ds = data.load("cifar10", target, n_val=500)
    assert len(ds.train) + len(ds.val) == 5170
    assert not list(target.glob("*.part"))

    bad = tmp_path / "empty2"
    bad.mkdir()
    monkeypatch.setitem(data.ARCHIVES, "cifar10", (archive.as_uri(), "0" * 32, "cifar-10-batches-py"))
    with pytest.raises(BenchError, match="md5"):
        data.load("cifar10", bad)
    assert not (bad / "cifar-10-batches-py").exists() and not list(bad.iterdir())


def test_no_network_gives_a_clear_message(tmp_path, monkeypatch):
    target = tmp_path / "empty"
    target.mkdir()
    monkeypatch.setitem(data.ARCHIVES, "cifar10", ("http://127.0.0.1:9/cifar-10-python.tar.gz", "0" * 32,
                                                  "cifar-10-batches-py"))
    with pytest.raises(BenchError, match="could not be downloaded .* put cifar-10-batches-py/ there by hand"):
        data.load("cifar10", target)


def test_augmentation_crops_and_flips_per_sample():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    flipped = data.augment(x, 0, True, g)
    for i in range(2):  # each sample is either itself or its mirror image
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    cropped = data.augment(x, 2, False, torch.Generator().manual_seed(1))
    assert cropped.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):  # each crop is an 8x8 window of the reflect-padded image
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(cropped[i], w) for w in windows)
    shifts = [not torch.equal(data.augment(x, 2, False, torch.Generator().manual_seed(s)), x) for s in range(5)]
    assert any(shifts)
