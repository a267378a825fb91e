"""Files bnbench reads never run code, and files it writes never poison later runs.

Data files: a restricted unpickler (no global beyond numpy's array pickling), checked contents.
Checkpoints: concurrent writers and readers never see a checkpoint with another one's digest, a cached model
is trained once however many runs need it at the same time, and non-finite weights are refused.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from bench import checkpoints, data, models
from bench.errors import BenchError

from conftest import REPO


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


# ----------------------------------------------------------------------------------------------------
# checkpoints


def _hammer_saves(path, worker: int, rounds: int, start) -> None:
    start.wait()
    for i in range(rounds):
        checkpoints.save(path, {"w": torch.full((2000,), float(worker * 1000 + i))}, {"worker": worker, "i": i})


def test_concurrent_saves_never_leave_or_show_a_checkpoint_with_another_ones_digest(tmp_path):
    path = tmp_path / "cache" / "base" / "same.pt"
    checkpoints.save(path, {"w": torch.full((2000,), -1001.0)}, {"worker": -1, "i": -1})
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    writers = [ctx.Process(target=_hammer_saves, args=(path, w, 60, start)) for w in range(3)]
    for proc in writers:
        proc.start()
    start.set()
    loads, mismatches = 0, []
    while any(proc.is_alive() for proc in writers):
        try:
            ckpt = checkpoints.load(path, require_digest=True)
        except BenchError as exc:
            mismatches.append(str(exc))
            continue
        loads += 1
        meta = ckpt["meta"]  # the weights are the ones this metadata was saved with
        assert float(ckpt["state_dict"]["w"][0]) == meta["worker"] * 1000 + meta["i"]
    for proc in writers:
        proc.join()
        assert proc.exitcode == 0
    assert not mismatches, f"{len(mismatches)} of {loads + len(mismatches)} loads: {mismatches[0]}"
    final = checkpoints.load(path, require_digest=True)  # what every later run reads
    assert final["meta"]["i"] == 59
    assert loads > 0
    assert not list(path.parent.glob("*.tmp"))


_TRAIN_ONCE = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    sys.path.insert(0, str(Path({tests!r})))
    from conftest import make_ctx
    from bench import checkpoints, train

    role, work = sys.argv[1], Path(sys.argv[2])

    def cheap_train(model, *args, **kwargs):
        with open(work / "trainings", "a") as fh:
            fh.write(role + "\\n")
        if role == "first":  # keep training until the second process has asked for the same base
            deadline = time.time() + 60
            while not (work / "second-started").exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        return train.TrainResult(history=[{{"val_clean": 0.5, "val_robust": 0.25}}], best_epoch=1, seconds=0.0)

    checkpoints.train = cheap_train
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = make_ctx(work)
    if role == "second":
        (work / "second-started").touch()
    checkpoints.base_model(ctx, "pgd_at")
    print("done", role)
""")


def test_two_runs_needing_the_same_base_train_it_once(tmp_path):
    script = _TRAIN_ONCE.format(tests=str(REPO / "tests"))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def start(role):
        return subprocess.Popen([sys.executable, "-c", script, role, str(tmp_path)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("first")
    deadline = time.time() + 120
    while not (tmp_path / "trainings").exists():  # the first one is training
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = start("second")
    outs = {role: proc.communicate(timeout=180) for role, proc in (("first", first), ("second", second))}
    for role, proc in (("first", first), ("second", second)):
        assert proc.returncode == 0, outs[role][1]
    assert (tmp_path / "trainings").read_text().split() == ["first"]
    assert "waiting for another process training" in outs["second"][1]
    assert "cache hit" in outs["second"][1]


def _nonfinite_state(value: float) -> tuple[dict, str]:
    """A tiny_cnn state dict for digits whose first weight tensor is all `value`, and that tensor's name."""
    state = models.build_model("tiny_cnn", data.DATASETS["digits"]).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], value)
    return state, name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_user_checkpoint_with_non_finite_weights_is_refused(bench, tmp_path, value):
    state, name = _nonfinite_state(value)
    mine = tmp_path / "nan.pt"
    torch.save(state, mine)
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--base-checkpoint", mine,
                "--out", tmp_path / "results", "--quiet")
    assert res.code == 2, res.err
    assert f"checkpoint {mine} holds non-finite weights (NaN or inf in {name})" in res.err
    assert "Traceback" not in res.err


def test_non_finite_weights_are_never_cached(tmp_path):
    path = tmp_path / "diverged.pt"
    state, name = _nonfinite_state(float("nan"))
    with pytest.raises(BenchError, match=f"not finite \\(e.g. {name}\\); training diverged, nothing was cached"):
        checkpoints.save(path, state, {})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["meta not a dict", "numbers for weights", "text for weights", "numbered keys"])
def test_a_checkpoint_that_is_no_state_dict_is_a_user_error(tmp_path, case):
    model = models.build_model("tiny_cnn", data.DATASETS["digits"])
    state = model.state_dict()
    obj = {"meta not a dict": {"state_dict": state, "meta": [1]},
           "numbers for weights": {"state_dict": {k: 1 for k in state}},
           "text for weights": {"model": {k: "x" for k in state}},
           "numbered keys": {"state_dict": dict(enumerate(state.values()))}}[case]
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    if case == "meta not a dict":  # the weights are fine: only the metadata is ignored
        checkpoints.load_into(model, checkpoints.load(path, require_digest=False), str(path), arch="tiny_cnn",
                              dataset="digits")
        return
    with pytest.raises(BenchError, match="holds no state dict"):
        checkpoints.load(path, require_digest=False)


def test_checksum_files_that_are_not_text_are_user_errors(tmp_path, cifar10_dir):
    root = _cifar_copy(tmp_path, cifar10_dir, with_sums=True)
    (root / "SHA256SUMS.tsv").write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(BenchError, match="SHA256SUMS.tsv is not a text file of checksums"):
        data.load("cifar10", root)
    path = tmp_path / "cached.pt"
    checkpoints.save(path, models.build_model("tiny_cnn", data.DATASETS["digits"]).state_dict(), {})
    (tmp_path / "cached.pt.sha256").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(BenchError, match="cached.pt is corrupt: its sha256 differs from cached.pt.sha256"):
        checkpoints.load(path, require_digest=True)


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "{not json", "\udcff"])
def test_a_memo_file_of_another_shape_is_recomputed(tmp_path, content):
    from conftest import make_ctx

    ctx = make_ctx(tmp_path)
    assert checkpoints.memo(ctx, "probe", {"a": 1}, lambda: {"x": 1}) == {"x": 1}
    (path,) = (tmp_path / "cache" / "memo").glob("probe-*.json")
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert checkpoints.memo(ctx, "probe", {"a": 1}, lambda: {"x": 2}) == {"x": 2}
    assert checkpoints.memo(ctx, "probe", {"a": 1}, lambda: {"x": 3}) == {"x": 2}  # rewritten, read again
