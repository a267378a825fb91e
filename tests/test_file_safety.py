"""Files bnbench reads never run code, and files it writes never poison later runs.

Data files: a restricted unpickler (no global beyond numpy's array pickling), checked contents.
Checkpoints: concurrent writers and readers never see a checkpoint with another one's digest, a cached model
is trained once however many runs need it at the same time, and non-finite weights are refused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from bench import data
from bench.errors import BenchError


def _cifar_copy(tmp_path, cifar10_dir, with_sums: bool):
    """A writable copy of the CIFAR-10 subset: the batches folder, and SHA256SUMS.tsv when asked."""
    root = tmp_path / "c10"
    shutil.copytree(cifar10_dir / "cifar-10-batches-py", root / "cifar-10-batches-py")
    if with_sums:
        shutil.copy(cifar10_dir / "SHA256SUMS.tsv", root / "SHA256SUMS.tsv")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def _replace_file(root, name: str, blob: bytes) -> None:
    """Put `blob` in place of a batch file, and its digest in SHA256SUMS.tsv if there is one: the checksums
    tell a damaged file, not a hostile one."""
    (root / "cifar-10-batches-py" / name).write_bytes(blob)
    sums = root / "SHA256SUMS.tsv"
    if sums.exists():
        lines = sums.read_text().splitlines()
        lines = [line if not line.startswith(name + "\t") else
                 "\t".join(line.split("\t")[:3] + [hashlib.sha256(blob).hexdigest()]) for line in lines]
        sums.write_text("\n".join(lines) + "\n")


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return builtins.exec, (self.code,)


def _test_batch(n: int = 4, **changes) -> dict:
    rng = np.random.default_rng(0)
    batch = {"batch_label": "testing batch 1 of 1", "labels": rng.integers(0, 10, n).tolist(),
             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    batch.update(changes)
    return batch


@pytest.mark.parametrize("with_sums", [False, True])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_a_crafted_data_file_is_refused_without_running_its_code(bench, tmp_path, cifar10_dir, with_sums, payload):
    root = _cifar_copy(tmp_path, cifar10_dir, with_sums)
    marker = tmp_path / "pwned"
    code = _System(f"touch {marker}") if payload == "os.system" else _Exec(f"open({str(marker)!r}, 'w').close()")
    # the payload sits where the images go: the file is otherwise a well-formed test batch
    _replace_file(root, "test_batch", pickle.dumps(_test_batch(batch_label=code)))
    res = bench("run", "--preset", "smoke", "--dataset", "cifar10", "--data-dir", root, "--defense", "standard",
                "--attacks", "fgsm", "--out", tmp_path / "results", "--quiet")
    assert res.code == 2, res.err
    assert not marker.exists()
    assert "test_batch is not a CIFAR data file (it references" in res.err
    assert ("system" if payload == "os.system" else "builtins.exec") in res.err
    assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err


def test_an_object_array_in_place_of_the_images_is_refused(tmp_path, cifar10_dir):
    root = _cifar_copy(tmp_path, cifar10_dir, with_sums=False)
    pixels = _test_batch()["data"].astype(object)  # holds Python objects, which could be anything
    _replace_file(root, "test_batch", pickle.dumps(_test_batch(data=pixels)))
    with pytest.raises(BenchError, match="test_batch is not in the CIFAR pickle layout .'data' is an array of "
                                         "object, expected a uint8 array"):
        data.load("cifar10", root)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batches_pickled_by_numpy_1_or_2_at_any_protocol_still_load(tmp_path, cifar10_dir, protocol):
    root = _cifar_copy(tmp_path, cifar10_dir, with_sums=False)
    batch = _test_batch(n=6)
    blob = pickle.dumps(batch, protocol=protocol)
    if protocol == 2:  # numpy 1 names its array pickling numpy.core, as the official files do
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    _replace_file(root, "test_batch", blob)
    ds = data.load("cifar10", root)
    assert len(ds.test) == 6 and ds.test.y.tolist() == batch["labels"]
    assert torch.equal(ds.test.x[0], torch.from_numpy(batch["data"][0].reshape(3, 32, 32)).float() / 255)


@pytest.mark.parametrize("case, changes, message", [
    ("no images", dict(data=np.zeros((0, 3072), np.uint8), labels=[]), "test_batch holds no images"),
    ("text labels", dict(labels=["cat", "dog", "cat", "dog"]), "'labels' is not a list of integers"),
    ("grey 32x32 images", dict(data=np.zeros((4, 1024), np.uint8)), "'data' has shape \\(4, 1024\\), expected"),
])
def test_a_test_batch_that_cannot_be_evaluated_is_refused_at_load(tmp_path, cifar10_dir, case, changes, message):
    root = _cifar_copy(tmp_path, cifar10_dir, with_sums=False)
    _replace_file(root, "test_batch", pickle.dumps(_test_batch(**changes)))
    with pytest.raises(BenchError, match=message):
        data.load("cifar10", root)


def test_more_test_images_than_the_test_set_holds_is_refused():
    assert len(data.load("digits", n_test=539).test) == 539
    # evaluating 539 images under the name n_test=600 would overstate the sample
    with pytest.raises(BenchError, match="n_test=600 but the digits test set has 539 images"):
        data.load("digits", n_test=600)
    with pytest.raises(BenchError, match="n_train must be >= 1"):
        data.load("digits", n_train=0)
