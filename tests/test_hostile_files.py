"""Hostile files and addresses (issue 40): each is one line on stderr and exit 2 -- never a traceback, never a
number from a model that gave none -- and the line says what happened, not something that did not.

Covered: image headers claiming billions of pixels, .npy headers claiming terabytes, bf16/fp16 tensors, empty /
meta-device / sparse / foreign checkpoints, labels too large to be classes, paths too long for the system, Ray
addresses that are malformed or that nobody answers, read-only results asked for their state, 16-bit images,
models answering NaN (with and without the checks); and what the fuzzing found (tests/test_fuzzing.py): an
imagefolder `size` beyond the pixel limit or the machine's memory, a line break in any value an error message
quotes, a user's checkpoint folder written to; and the results folder's .npz files read unguarded."""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import struct
import sys
import tempfile
import textwrap
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data, models, readers
from bench.errors import BenchError
from bench.readers import MAX_PIXELS

from conftest import bench_subprocess, file_digest
from test_data_readers import make_imagefolder
from test_storage_safety import read_only

SMOKE = ["run", "--preset", "smoke", "--attacks", "fgsm", "--quiet"]


def one_line_exit_2(res, *needles: str) -> str:
    """The command refused with exactly one `bench: error:` line holding every needle; that line."""
    assert res.code == 2, (res.code, res.out[-2000:], res.err[-2000:])
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error: "), res.err[-3000:]
    assert "Traceback" not in res.err + res.out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# image and array headers that lie about their size


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header says width x height (its data is a stub)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("option", ["", "[size=8]"])
@pytest.mark.parametrize("side, pixels", [(30000, "900,000,000"), (10000, "100,000,000")])
def test_an_image_header_claiming_too_many_pixels_is_refused_unread(bench, tmp_path, option, side, pixels):
    """30000x30000 is over twice Pillow's own limit (it raises); 10000x10000 only over ours (it would warn)."""
    root = make_imagefolder(tmp_path / "images", 2, train=2, test=2, size=8)
    bomb = root / "test" / "c001" / "1.png"
    bomb.write_bytes(png_claiming(side, side))
    assert bomb.stat().st_size < 200
    res = bench(*SMOKE, "--defense", "standard", "--dataset", f"imagefolder{option}", "--data-dir", root,
                "--out", tmp_path / "out")
    one_line_exit_2(res, str(bomb), f"declares {pixels} pixels", f"limit of {MAX_PIXELS:,}", "decompression bomb")
    assert not (tmp_path / "out").exists()


def npy_header(shape: tuple, descr: str = "<f4") -> bytes:
    """The .npy header of an array of `shape`, and 16 bytes of data: nowhere near what it declares."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, shape)
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode() + b"\0" * 16


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_an_npy_header_claiming_terabytes_is_refused_before_allocating(bench, tmp_path, compression):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("x.npy", npy_header((100_000_000, 3, 64, 64)))
        archive.writestr("y.npy", npy_header((100_000_000,), "<i8"))
    start = time.perf_counter()
    res = bench(*SMOKE, "--defense", "standard", "--dataset", "tensors", "--data-dir", path, "--out", tmp_path / "out")
    one_line_exit_2(res, str(path), "'x' declares shape (100000000, 3, 64, 64) of float32 (4.9 TB) but holds 16 bytes",
                    "refused before allocating")
    assert time.perf_counter() - start < 30


def test_an_npz_that_unpacks_beyond_memory_is_refused(tmp_path, monkeypatch):
    """Headers that tell the truth, in a zip whose members unpack to more than the machine's memory."""
    from bench import readers

    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros((64, 1, 8, 8), np.uint8), y=np.arange(64) % 2)
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
    assert unpacked > path.stat().st_size  # (compressed)
    monkeypatch.setattr(readers, "_memory_bytes", lambda: unpacked - 1)
    with pytest.raises(BenchError, match=rf"unpacks to {readers._size(unpacked)}, more than this machine's "
                                         rf"{readers._size(unpacked - 1)} of memory; refused before allocating"):
        data.load("tensors", path)
    monkeypatch.setattr(readers, "_memory_bytes", lambda: unpacked)
    assert len(data.load("tensors", path).test) == 64


# ----------------------------------------------------------------------------------------------------------
# tensors of other kinds


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """A user's model module on sys.path: a finite linear model, one that answers NaN always, and one that
    answers NaN only on batches of more than the two images bnbench's probe gives it."""
    folder = tmp_path_factory.mktemp("user_models")
    (folder / "hostile_models.py").write_text(textwrap.dedent('''
        import torch
        import torch.nn as nn


        class Linear(nn.Module):
            def __init__(self, spec, num_classes, nan_from_batch=None):
                super().__init__()
                self.linear = nn.Linear(spec.channels * spec.size * spec.size, num_classes)
                self.nan_from_batch = nan_from_batch

            def forward(self, x):
                out = self.linear(x.flatten(1))
                if self.nan_from_batch is not None and len(x) >= self.nan_from_batch:
                    out = out * float("nan")
                return out


        def finite(num_classes, spec):
            return Linear(spec, num_classes)


        def nan_always(num_classes, spec):
            return Linear(spec, num_classes, nan_from_batch=0)


        def nan_on_real_batches(num_classes, spec):
            return Linear(spec, num_classes, nan_from_batch=3)
    '''))
    sys.path.insert(0, str(folder))
    yield "hostile_models"
    sys.path.remove(str(folder))
    sys.modules.pop("hostile_models", None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_are_read_as_float32(bench, tmp_path, user_models, dtype):
    x = torch.rand(24, 1, 8, 8)
    path = tmp_path / "half.pt"
    torch.save({"x": x.to(dtype), "y": torch.arange(24) % 3}, path)
    loaded = data.load("tensors", path)
    assert loaded.test.x.dtype == torch.float32
    assert torch.equal(loaded.test.x, x.to(dtype).float())  # the stored values, exactly
    res = bench(*SMOKE, "--model", f"{user_models}:finite", "--dataset", "tensors", "--data-dir", path,
                "--set", "n_test=none", "--no-checks", "--out", tmp_path / "out")
    assert res.code == 0, res.err[-3000:]
    assert "Traceback" not in res.err


@pytest.mark.parametrize("case", ["meta device", "sparse"])
@pytest.mark.parametrize("use", ["checkpoint", "tensors file"])
def test_tensors_without_usable_values_are_named(bench, tmp_path, case, use):
    if use == "checkpoint":
        state = models.build_model("tiny_cnn", data.DATASETS["digits"]).state_dict()
        key, args = "conv1.weight", ["--model", "tiny_cnn", "--checkpoint"]
    else:
        state = {"x": torch.rand(8, 1, 8, 8), "y": torch.arange(8) % 2}
        key, args = "x", ["--defense", "standard", "--dataset", "tensors", "--data-dir"]
    state[key] = state[key].to("meta") if case == "meta device" else state[key].to_sparse()
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    res = bench(*SMOKE, *args, path, "--out", tmp_path / "out")
    one_line_exit_2(res, str(path), f"'{key}' is", "meta device" if case == "meta device" else "sparse tensor")


class Foreign:  # a class of this test module: torch.load(weights_only=True) refuses it
    pass


@pytest.mark.parametrize("use", ["checkpoint", "tensors file"])
def test_a_refused_pt_file_names_what_it_holds_without_torchs_advice(bench, tmp_path, use):
    """torch's message advises weights_only=False or allowlisting the global: both would run the file's code."""
    path = tmp_path / "foreign.pt"
    torch.save({"x": torch.rand(4, 1, 8, 8), "y": torch.arange(4), "extra": Foreign()}, path)
    args = (["--model", "tiny_cnn", "--checkpoint", path] if use == "checkpoint" else
            ["--defense", "standard", "--dataset", "tensors", "--data-dir", path])
    line = one_line_exit_2(bench(*SMOKE, *args, "--out", tmp_path / "out"), str(path),
                           f"it references {__name__}.Foreign", "never unpickled")
    for advice in ("weights_only", "safe_globals", "trust"):
        assert advice not in line


def test_complex_weights_for_a_real_model_are_refused_not_cast(bench, tmp_path):
    """Found by the fuzzing: load_state_dict keeps the real part of a complex tensor with only a warning."""
    state = models.build_model("tiny_cnn", data.DATASETS["digits"]).state_dict()
    state["conv1.weight"] = state["conv1.weight"] + 1j
    path = tmp_path / "complex.pt"
    torch.save(state, path)
    one_line_exit_2(bench(*SMOKE, "--model", "tiny_cnn", "--checkpoint", path, "--out", tmp_path / "out"),
                    f"checkpoint {path} does not fit tiny_cnn: 1 complex where the model's are real "
                    f"(conv1.weight: complex64 vs float32)")
    assert not (tmp_path / "out").exists()


def test_an_empty_checkpoint_is_named_empty(bench, tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    one_line_exit_2(bench(*SMOKE, "--model", "tiny_cnn", "--checkpoint", path, "--out", tmp_path / "out"),
                    f"checkpoint {path} is empty (0 bytes)")


def test_a_checkpoint_path_that_is_a_folder_is_named_a_folder(bench, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    line = one_line_exit_2(bench(*SMOKE, "--model", "tiny_cnn", "--checkpoint", folder, "--out", tmp_path / "out"),
                           f"checkpoint {folder} is a directory, not a checkpoint file")
    assert "does not exist" not in line


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_a_label_too_large_to_be_a_class_is_named_as_the_datas_fault(bench, tmp_path, suffix):
    x, y = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32), np.array([2 ** 40] + [0, 1] * 3 + [1])
    path = tmp_path / f"labels{suffix}"
    if suffix == ".pt":
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    else:
        np.savez(path, x=x, y=y)
    line = one_line_exit_2(bench(*SMOKE, "--defense", "standard", "--dataset", "tensors", "--data-dir", path,
                                 "--set", "n_test=none", "--out", tmp_path / "out"),
                           str(path), "'y' holds the label 1099511627776", "at most 100,000 classes")
    assert "could not be built" not in line and "model" not in line


# ----------------------------------------------------------------------------------------------------------
# paths the system cannot take: said as such, not as "finished cells are stored" when nothing ran


TOO_LONG = "a" * 300  # one name beyond any file system's 255 bytes


def refused_as_too_long(res) -> None:
    line = one_line_exit_2(res, "file name too long")
    assert "finished cells" not in line and "re-run" not in line


@pytest.mark.parametrize("dataset", ["imagefolder", "tensors", "cifar10"])
def test_a_data_dir_too_long_for_the_system_says_so_and_nothing_else(bench, tmp_path, dataset):
    refused_as_too_long(bench(*SMOKE, "--defense", "standard", "--dataset", dataset, "--data-dir",
                              tmp_path / TOO_LONG, "--out", tmp_path / "out"))


def test_a_checkpoint_path_too_long_for_the_system_says_so_and_nothing_else(bench, tmp_path):
    refused_as_too_long(bench(*SMOKE, "--model", "tiny_cnn", "--checkpoint", tmp_path / f"{TOO_LONG}.pt",
                              "--out", tmp_path / "out"))


def test_a_dest_too_long_for_the_system_says_so_and_leaves_the_results_alone(bench, tmp_path, out_dir):
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "fgsm", "--out", out_dir, "--quiet")
    assert res.code == 0, res.err
    before = file_digest(out_dir / "results.sqlite")
    refused_as_too_long(bench("leaderboard", "--out", out_dir, "--dest", tmp_path / TOO_LONG))
    assert file_digest(out_dir / "results.sqlite") == before


def test_an_os_error_says_cells_are_stored_only_once_cells_were_computed(bench, tmp_path, out_dir, monkeypatch):
    from bench import leaderboard, runner

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "somewhere"))

    monkeypatch.setattr(leaderboard, "write", full)
    assert bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "fgsm", "--out", out_dir,
                 "--quiet").code == 0
    line = one_line_exit_2(bench("leaderboard", "--out", out_dir, "--dest", tmp_path / "lb"), "disk full")
    assert "finished cells" not in line
    monkeypatch.setattr(runner, "execute", full)
    one_line_exit_2(bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "fgsm", "--out", out_dir,
                          "--quiet"), "disk full", "finished cells are stored")


# ----------------------------------------------------------------------------------------------------------
# Ray addresses

SWEEP = 'preset = "smoke"\nattacks = ["fgsm"]\n\n[[cells]]\ndefense = "standard"\n'


@pytest.mark.parametrize("address", ["not a host", "127.0.0.1", "127.0.0.1:99999", "http://10.0.0.5:6379",
                                     "ray://", ":6379", "host:port"])
def test_a_malformed_ray_address_is_one_line_before_anything_runs(bench, tmp_path, address):
    pytest.importorskip("ray")
    grid = tmp_path / "grid.toml"
    grid.write_text(SWEEP)
    res = bench("sweep", grid, "--executor", "ray", "--address", address, "--out", tmp_path / "out", "-q")
    one_line_exit_2(res, f"--address {address!r} is not a Ray address", "HOST:PORT", "ray://HOST:PORT", "auto")
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: nobody listens there


@pytest.mark.parametrize("form", ["host:port", "auto"])
def test_a_ray_address_nobody_answers_is_one_line_in_seconds(tmp_path, form):
    """Ray itself retries for many minutes (over 500 s), printing warnings. A real process: no traceback, and no
    Ray started (its temporary folder, our own, holds no session afterwards)."""
    pytest.importorskip("ray")
    from ray._private.services import find_gcs_addresses

    if form == "auto" and find_gcs_addresses():  # Ray's `auto` joins any cluster running here before its record
        pytest.skip("a Ray cluster runs on this machine: --address auto would join it")
    grid = tmp_path / "grid.toml"
    grid.write_text(SWEEP)
    port = _closed_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        if form == "auto":  # what a dead `ray start --head` leaves: the address of a cluster long gone
            (ray_tmp / "ray").mkdir()
            (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        address = "auto" if form == "auto" else f"127.0.0.1:{port}"
        start = time.perf_counter()
        res = bench_subprocess("sweep", grid, "--executor", "ray", "--address", address, "--out", tmp_path / "out",
                               "-q", env={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "",
                                          "RAY_USAGE_STATS_ENABLED": "0"}, timeout=120)
        seconds = time.perf_counter() - start
        sessions = [p.name for p in (ray_tmp / "ray").glob("session*")] if (ray_tmp / "ray").exists() else []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error: ") and "Traceback" not in res.stderr, res.stderr
    assert f"--address {address}: no Ray cluster can be reached at" in lines[0] and f":{port}" in lines[0]
    assert "connection refused" in lines[0]
    assert seconds < 60, seconds  # the process's start-up (torch) under load; the check itself takes milliseconds
    assert not sessions and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# read-only results, 16-bit images, NaN logits


def test_sweep_status_reads_read_only_results_as_the_leaderboard_does(bench, tmp_path, out_dir):
    grid = tmp_path / "grid.toml"
    grid.write_text(SWEEP)
    assert bench("sweep", grid, "--out", out_dir, "-q").code == 0
    db = out_dir / "results.sqlite"
    before = file_digest(db)
    for target in (db, out_dir):
        with read_only(target):
            status = bench("sweep", grid, "--out", out_dir, "--status")
            board = bench("leaderboard", "--out", out_dir, "--dest", tmp_path / "lb")
        assert board.code == 0, board.err
        assert status.code == 0, status.err
        assert "1 jobs: 1 done, 0 partial, 0 failed, 0 not started" in status.out
    assert file_digest(db) == before


def write_deep(path: Path, values: np.ndarray, dtype=np.uint16) -> None:
    """A grey image of more than 8 bits: uint16 is Pillow's mode I;16 (16-bit PNG), int32 its mode I."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(dtype))
    assert image.mode == ("I;16" if dtype == np.uint16 else "I")
    image.save(path)


def test_16_bit_images_are_scaled_to_0_1_not_clipped(tmp_path):
    root = tmp_path / "deep"
    levels = {"train": (1000, 60000), "test": (30000, 65535)}
    for split, (a, b) in levels.items():
        for label, level in enumerate((a, b)):
            write_deep(root / split / f"c{label}" / "0.png", np.full((8, 8), level))
            write_deep(root / split / f"c{label}" / "1.png", np.full((8, 8), level // 2))
    loaded = data.load("imagefolder", root)
    assert loaded.spec.channels == 1 and loaded.test.x.dtype == torch.float32
    found = {round(float(v) * 65535) for split in (loaded.train, loaded.test) for v in split.x.flatten()}
    assert found == {1000, 500, 60000, 30000, 15000, 65535, 32767}  # every level kept, none clipped
    # an 8-bit image beside them, read before or after them, keeps its 256 levels on the same [0, 1] scale
    eight = root / "test" / "c0" / "2.png"
    Image.fromarray(np.full((8, 8), 51, np.uint8)).save(eight)
    sixteen = root / "test" / "c0" / "0.png"
    for mode in ("L", "RGB"):
        for order in ([(sixteen, 0), (eight, 0)], [(eight, 0), (sixteen, 0)]):
            x, _ = readers.read_images(order, "test", mode=mode, side=8)
            assert x.dtype == np.float32 and x.shape == (2, len(mode), 8, 8)
            levels = [{round(float(v), 6) for v in image.flatten()} for image in x]
            assert levels == [{round(30000 / 65535 if path == sixteen else 51 / 255, 6)} for path, _ in order]
    mixed = data.load("imagefolder[mode=RGB]", root)
    found = {round(float(v), 6) for v in mixed.test.x.flatten()}
    assert found == {round(v, 6) for v in (30000 / 65535, 15000 / 65535, 1.0, 32767 / 65535, 51 / 255)}


def test_32_bit_integer_images_beyond_16_bits_are_refused_not_clipped(bench, tmp_path):
    root = make_imagefolder(tmp_path / "deep", 2, train=2, test=2, size=8, mode="L")
    bad = root / "test" / "c000" / "9.tif"
    write_deep(bad, np.full((8, 8), 70000), np.int32)
    res = bench(*SMOKE, "--defense", "standard", "--dataset", "imagefolder", "--data-dir", root,
                "--out", tmp_path / "out")
    one_line_exit_2(res, str(bad), "I pixels over 70000..70000", "0..65535")


def test_a_model_answering_nan_is_refused_before_anything_runs(bench, tmp_path, user_models):
    res = bench(*SMOKE, "--model", f"{user_models}:nan_always", "--out", tmp_path / "out")
    one_line_exit_2(res, f"model '{user_models}:nan_always' returns non-finite logits (NaN or inf)")
    assert not (tmp_path / "out").exists()


def test_a_model_answering_nan_on_real_batches_fails_its_cell_instead_of_scoring_class_0(bench, tmp_path,
                                                                                         user_models):
    """It passes the two-image probe; on the test images its argmax would be class 0 everywhere, an accuracy of
    every image labelled 0. The clean cell fails, named; nothing is scored."""
    from bench.store import Store

    out = tmp_path / "out"
    res = bench(*SMOKE, "--model", f"{user_models}:nan_on_real_batches", "--no-checks", "--out", out)
    assert res.code == 1, res.err[-3000:]
    assert "Traceback" not in res.err
    failed = [line for line in res.err.splitlines() if "failed: NonFiniteLogits" in line]
    assert len(failed) == 1 and "non-finite logits (NaN or inf) for 64 of 64 images" in failed[0]
    store = Store(out, create=False)
    try:
        assert store.cells() == []
        assert [f["cell"] for f in store.failures()] == ["clean"]
    finally:
        store.close()


def test_a_model_answering_nan_on_real_batches_fails_at_the_checks_without_misleading_them(bench, tmp_path,
                                                                                          user_models):
    """With checks on, the probes meet the NaN first: NaN differs from itself (would read as randomness), has
    class 0 as argmax (as a model surviving a huge budget) and no gradient (as gradient masking). The probes
    refuse it as the cells do, NonFiniteLogits named; no check line, nothing scored. `bench check` alike."""
    from bench import runner
    from bench.store import Store

    out = tmp_path / "out"
    model = f"{user_models}:nan_on_real_batches"
    res = bench(*SMOKE, "--model", model, "--out", out)
    assert res.code == 1, res.err[-3000:]
    assert "Traceback" not in res.out + res.err
    failed = [line for line in res.err.splitlines() if "failed: NonFiniteLogits" in line]
    assert len(failed) == 1 and "for 64 of 64 images of the first test batch (check determinism)" in failed[0]
    for misleading in ("treated as randomized", "max |logit difference| nan", "accuracy on", "gradient masking"):
        assert misleading not in res.out + res.err, misleading
    assert not [line for line in (res.out + res.err).splitlines() if line.startswith("check ")]  # no check judged
    store = Store(out, create=False)
    try:
        assert store.cells() == [] and store.runs() == []
        assert [f["cell"] for f in store.failures()] == [runner.BUILD]
    finally:
        store.close()
    res = bench("check", "--preset", "smoke", "--quiet", "--model", model, "--out", tmp_path / "checked")
    assert res.code == 1 and "Traceback" not in res.out + res.err, res.err[-3000:]
    lines = [line for line in res.err.splitlines() if line.startswith("bench: ")]
    assert len(lines) == 1 and "failed: NonFiniteLogits" in lines[0] and "(check determinism)" in lines[0]


# ----------------------------------------------------------------------------------------------------------
# found by the fuzzing (tests/test_fuzzing.py): F1 image sizes, F2 newlines in messages, F3 foreign folders


@pytest.mark.parametrize("size, pixels", [("10000000", "100,000,000,000,000"), ("8193", "67,125,249"),
                                          ("9" * 40, "about 10^80")])
def test_an_imagefolder_size_over_the_pixel_limit_is_refused_before_allocating(bench, tmp_path, monkeypatch,
                                                                                size, pixels):
    """F1: the side every image is resized to meets the limit an image header meets."""
    def decoded(*args, **kwargs):
        raise AssertionError("images decoded")

    monkeypatch.setattr(readers, "read_images", decoded)
    root = make_imagefolder(tmp_path / "images", 2, train=1, test=1, size=8, mode="L")
    res = bench(*SMOKE, "--defense", "standard", "--dataset", f"imagefolder[size={size}]", "--data-dir", root,
                "--out", tmp_path / "out")
    one_line_exit_2(res, f"imagefolder: size={size} makes images of {size}x{size} ({pixels} pixels)",
                    f"over the limit of {MAX_PIXELS:,}", "refused before allocating")
    assert not (tmp_path / "out").exists()


def test_imagefolder_images_beyond_the_machines_memory_are_refused_before_allocating(tmp_path, monkeypatch):
    """F1: 2 classes x (2 train + 2 test) RGB images at size=64 take 8 x 64 x 64 x 3 x 4 bytes as float32."""
    root = make_imagefolder(tmp_path / "images", 2, train=2, test=2, size=8)
    needed = 8 * 64 * 64 * 3 * 4
    read_images = readers.read_images
    monkeypatch.setattr(readers, "read_images", lambda *a, **k: pytest.fail("images decoded"))
    monkeypatch.setattr(readers, "_memory_bytes", lambda: needed - 1)
    with pytest.raises(BenchError, match=rf"imagefolder: size=64 makes images of 64x64x3: 8 of them take "
                                         rf"{readers._size(needed)} as float32, more than this machine's "
                                         rf"{readers._size(needed - 1)} of memory; refused before allocating"):
        data.load("imagefolder[size=64]", root)
    monkeypatch.setattr(readers, "read_images", read_images)
    monkeypatch.setattr(readers, "_memory_bytes", lambda: needed)
    loaded = data.load("imagefolder[size=64]", root)
    assert loaded.spec.size == 64 and len(loaded.test) == 4


def test_one_line_shows_line_breaks_and_control_characters_escaped():
    from bench.errors import one_line
    from bench.runner import Failure

    given = "a\nb\r\nc\x0bd\x85e\u2028f\x1b[1Ag\th é"
    assert one_line(given) == r"a\nb\r\nc\x0bd\x85e\u2028f\x1b[1Ag" + "\th é"
    assert one_line(one_line(given)) == one_line(given)  # what is already one line is left as it is
    line = Failure("sweep job 'standard p=x\ny'", "build", "-", "RayError: worker died\nTraceback ...").line()
    assert line == r"bench: sweep job 'standard p=x\ny' failed: RayError: worker died\nTraceback ..."


@pytest.mark.parametrize("source", ["BenchError", "click usage", "OSError"])
def test_a_newline_in_what_the_user_gave_stays_on_the_one_error_line(bench, tmp_path, monkeypatch, source):
    """F2: the message still quotes the value as given, its line break shown as \\n (not joined, not split)."""
    from bench import runner

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out\nbench: error: forged"))

    if source == "BenchError":
        args, shown = ["--defense", "stand\nard"], r"unknown defense 'stand\nard'"
    elif source == "click usage":
        args, shown = ["--defense", "standard", "--no\u2028such"], r"--no\u2028such"
    else:
        monkeypatch.setattr(runner, "execute", full)
        args, shown = ["--defense", "standard"], r"disk full (" + str(tmp_path) + r"/out\nbench: error: forged)"
    one_line_exit_2(bench(*SMOKE, *args, "--out", tmp_path / "out"), shown)


@pytest.mark.parametrize("folder", ["writable", "read-only"])
def test_a_users_checkpoint_with_a_wrong_digest_leaves_its_folder_unwritten(bench, tmp_path, folder):
    """F3: the re-read under a lock (a writer caught between two renames) is for bnbench's own cache; a
    user's folder gets no lock file, and a read-only one still hears about the digest, not a permission."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    path = zoo / "w.pt"
    torch.save(models.build_model("tiny_cnn", data.DATASETS["digits"]).state_dict(), path)
    Path(f"{path}.sha256").write_text("0" * 64 + "\n")
    before = {p.name: file_digest(p) for p in zoo.iterdir()}
    with read_only(zoo) if folder == "read-only" else contextlib.nullcontext():
        res = bench(*SMOKE, "--model", "tiny_cnn", "--checkpoint", path, "--out", tmp_path / "out")
    one_line_exit_2(res, f"checkpoint {path} is corrupt: its sha256 differs from w.pt.sha256")
    assert {p.name: file_digest(p) for p in zoo.iterdir()} == before


# ----------------------------------------------------------------------------------------------------------
# .npz files of the results folder: read as the user's data is (headers checked before allocating)


def npz_claiming_terabytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x_adv.npy", npy_header((100_000_000, 3, 64, 64)))
    return buffer.getvalue()


def test_crafted_images_claiming_terabytes_are_crafted_again_not_allocated(tmp_path, caplog):
    from types import SimpleNamespace

    from bench.crafted import CraftedCache

    files = {}
    store = SimpleNamespace(read_file=files.get, write_file=files.__setitem__)
    target = SimpleNamespace(model=torch.nn.Linear(2, 2), batch_dependent=False, randomized=False)
    test = data.Split(torch.rand(4, 1, 8, 8), torch.arange(4) % 2)
    cache = CraftedCache(store, target, "paper", 0, 4, test, torch.device("cpu"))
    x_adv = torch.rand(4, 1, 8, 8)
    cache.save("good", x_adv, {"steps": 3}, False, 1.5, "r" * 64)
    found = cache.load("good", test)  # (the round trip: bytes read through the guarded reader)
    assert torch.equal(found.x_adv, x_adv) and found.extra == {"steps": 3} and found.run_id == "r" * 64
    files[cache._relpath("bomb")] = npz_claiming_terabytes()
    with caplog.at_level("WARNING", logger="bench"):
        assert cache.load("bomb", test) is None
    assert "'x_adv' declares shape (100000000, 3, 64, 64)" in caplog.text and "crafting them again" in caplog.text


def test_saved_adversarial_images_are_read_through_the_guarded_reader(tmp_path):
    from bench.evaluation import ADVERSARIAL_KEYS, _adversarial_arrays

    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(npz_claiming_terabytes())
    with pytest.raises(BenchError, match=r"adversarial images .*bomb.npz: 'x_adv' declares shape .* refused before"):
        _adversarial_arrays(bomb)
    arrays = {key: np.full(2, i) for i, key in enumerate(ADVERSARIAL_KEYS)}
    partial = tmp_path / "partial.npz"
    np.savez(partial, **{key: value for key, value in arrays.items() if key != "y"})
    with pytest.raises(BenchError, match="partial.npz holds no y; delete it"):
        _adversarial_arrays(partial)
    whole = tmp_path / "whole.npz"
    np.savez_compressed(whole, **arrays, attack=np.array("fgsm"))
    read = _adversarial_arrays(whole)
    assert sorted(read) == sorted(ADVERSARIAL_KEYS) and all(np.array_equal(read[k], arrays[k]) for k in arrays)
