"""Bring your own data: the `bench.datasets` entry points, the generic readers (imagefolder, tensors,
tinyimagenet) on fake data built here, in-memory tensors, and their errors. Nothing downloads."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data
from bench.errors import BenchError


def write_image(path: Path, size: int | tuple, mode: str = "RGB", seed: int = 0, fmt: str | None = None) -> None:
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, format=fmt)


def make_imagefolder(root: Path, classes: int, *, train: int = 2, test: int = 1, size: int = 64,
                     mode: str = "RGB", ext: str = "png") -> Path:
    """root/train/cNNN/i.png and root/test/cNNN/i.png (train=0: test/ alone)."""
    for c in range(classes):
        for split, count in (("train", train), ("test", test)):
            for i in range(count):
                write_image(root / split / f"c{c:03d}" / f"{i}.{ext}", size, mode, seed=c * 100 + i + (split == "test") * 7)
    return root


@pytest.fixture(scope="module")
def folder200(tmp_path_factory) -> Path:
    """200 classes, 64x64 RGB, 3 training and 1 test image each."""
    return make_imagefolder(tmp_path_factory.mktemp("if200"), 200, train=3, test=1)


def test_datasets_are_entry_points_and_bench_list_shows_them(bench):
    from bench import registry

    assert {"digits", "cifar10", "cifar100", "imagefolder", "tensors", "tinyimagenet"} <= set(registry.names("dataset"))
    res = bench("list")
    assert res.code == 0
    section = res.out.split("Datasets:")[1]
    for name in ("digits", "cifar100", "imagefolder", "tensors", "tinyimagenet"):
        assert f"\n  {name} " in section
    verbose = bench("list", "--verbose").out.split("Datasets:")[1]
    assert "size: resize every image" in verbose and "layout: image layout" in verbose


def test_imagefolder_200_classes_64px_loads_class_interleaved(folder200):
    ds = data.load("imagefolder", folder200, n_val=100, n_test=200)
    assert ds.name == "imagefolder" and ds.num_classes == 200
    assert ds.spec.channels == 3 and ds.spec.size == 64
    assert (len(ds.train), len(ds.val), len(ds.test)) == (500, 100, 200)
    assert ds.train.x.shape[1:] == (3, 64, 64) and ds.train.x.dtype == torch.float32
    assert 0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1
    # class folders sorted -> labels; the first images cover every class (the caps keep a balanced prefix)
    assert ds.test.y[:200].tolist() == list(range(200))
    capped = data.load("imagefolder", folder200, n_train=400, n_val=0, n_test=50)
    assert sorted(set(capped.train.y.tolist())) == list(range(200)) and capped.test.y.tolist() == list(range(50))
    # the pixels are the file's
    first = np.asarray(Image.open(folder200 / "test" / "c000" / "0.png").convert("RGB"))
    assert torch.equal(ds.test.x[0], torch.from_numpy(first.transpose(2, 0, 1).copy()).float() / 255)
    # generic readers' defaults: 8/255, L2 0.5, no augmentation, mean/std from the training images
    assert (ds.spec.eps, ds.spec.eps_l2, ds.spec.crop_pad, ds.spec.flip) == (8 / 255, 0.5, 0, False)
    every = torch.cat([ds.train.x, ds.val.x])
    assert ds.spec.mean == pytest.approx(tuple(every.mean((0, 2, 3)).tolist()), abs=1e-4)
    again = data.load("imagefolder", folder200, n_val=100, n_test=200)
    assert again.fingerprint == ds.fingerprint and torch.equal(again.val.x, ds.val.x)


def test_imagefolder_grey_resize_and_mode_options(tmp_path):
    root = make_imagefolder(tmp_path / "grey", 3, train=2, test=2, size=32, mode="L")
    grey = data.load("imagefolder", root, n_val=1)
    assert grey.spec.channels == 1 and grey.spec.size == 32 and grey.num_classes == 3
    small = data.load("imagefolder[size=28]", root, n_val=1)
    assert small.name == "imagefolder[size=28]" and small.test.x.shape[1:] == (1, 28, 28)
    assert small.fingerprint != grey.fingerprint
    rgb = data.load("imagefolder[mode=RGB;size=028]", root, n_val=1)  # options are written back exactly, sorted
    assert rgb.name == "imagefolder[mode=RGB;size=28]" and rgb.test.x.shape[1:] == (3, 28, 28)
    # mixed sizes are fine once a size is given
    write_image(root / "train" / "c001" / "big.png", (40, 30), "L")
    assert data.load("imagefolder[size=28]", root, n_val=1).train.x.shape[1:] == (1, 28, 28)
    with pytest.raises(BenchError, match=r"big.png is 40x30 but .* is 32x32; give the size .*imagefolder\[size=32\]"):
        data.load("imagefolder", root, n_val=1)
    with pytest.raises(BenchError, match="has no option 'sise' \\(did you mean 'size'\\?\\)"):
        data.load("imagefolder[sise=28]", root)
    with pytest.raises(BenchError, match="mode' must be one of auto, L, RGB"):
        data.load("imagefolder[mode=CMYK]", root)


def test_imagefolder_errors_name_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "bad", 2, train=2, test=1, size=16)
    (root / "train" / "c001" / "notes.txt").write_text("not an image")
    with pytest.raises(BenchError, match=r"notes.txt is not an image Pillow can read"):
        data.load("imagefolder", root, n_val=1)
    (root / "train" / "c001" / "notes.txt").unlink()
    (root / "train" / "c001" / ".DS_Store").write_bytes(b"\0\1")  # hidden files are never data
    assert len(data.load("imagefolder", root, n_val=1).train) == 3
    write_image(root / "train" / "c002" / "0.png", 16)
    with pytest.raises(BenchError, match=r"train/ and test/ must hold the same class folders; only in train/: c002"):
        data.load("imagefolder", root, n_val=1)
    (root / "test" / "c002").mkdir()
    with pytest.raises(BenchError, match=r"class folder .*test/c002 holds no images"):
        data.load("imagefolder", root, n_val=1)
    with pytest.raises(BenchError, match="holds no test/ folder"):
        data.load("imagefolder", tmp_path / "bad" / "train")
    with pytest.raises(BenchError, match="imagefolder needs --data-dir"):
        data.load("imagefolder", None)
    with pytest.raises(BenchError, match="does not exist"):
        data.load("imagefolder", tmp_path / "nope")


def test_evaluation_only_folder_refuses_training_with_one_line(tmp_path):
    root = make_imagefolder(tmp_path / "eval", 4, train=0, test=3, size=8)
    ds = data.load("imagefolder", root, n_train=600, n_val=100)  # the presets' caps do not apply
    assert not ds.has_train and len(ds.test) == 12 and ds.num_classes == 4
    with pytest.raises(BenchError, match="has no training images \\(evaluation-only data\\).*training split"):
        len(ds.train)
    with pytest.raises(BenchError, match="validation split"):
        ds.val.x


def test_tinyimagenet_layout(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (folder).mkdir()
    (folder / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # any order: labels follow sorted wnids
    lines = []
    for i, w in enumerate(wnids):
        write_image(folder / "train" / w / "images" / f"{w}_0.JPEG", 64, "L" if i == 3 else "RGB", seed=i, fmt="JPEG")
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
        name = f"val_{i}.JPEG"
        write_image(folder / "val" / "images" / name, 64, seed=1000 + i, fmt="JPEG")
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(reversed(lines)) + "\n")
    ds = data.load("tinyimagenet", tmp_path, n_val=50)
    assert ds.num_classes == 200 and ds.spec == data.DATASETS["tinyimagenet"]
    assert ds.test.x.shape == (200, 3, 64, 64) and ds.test.y.tolist() == list(range(200))
    assert len(ds.train) + len(ds.val) == 200
    assert data.load("tinyimagenet", folder, n_val=50).fingerprint == ds.fingerprint  # the folder itself
    # evaluation only: no train/ folder
    renamed = folder / "train"
    renamed.rename(tmp_path / "train-away")
    assert not data.load("tinyimagenet", folder).has_train
    write_image(folder / "val" / "images" / "val_7.JPEG", 32, fmt="JPEG")
    with pytest.raises(BenchError, match="val_7.JPEG is 32x32; Tiny ImageNet images are 64x64"):
        data.load("tinyimagenet", folder)


def test_tinyimagenet_download_is_the_official_zip_checked_by_md5(tmp_path, monkeypatch):
    src = tmp_path / "src"
    folder = src / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids))
    write_image(folder / "val" / "images" / "val_0.JPEG", 64, fmt="JPEG")
    (folder / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[5]}\t0\t0\t1\t1\n")
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(src).as_posix())
        zf.writestr("../escape.txt", "x")  # never extracted outside the target
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    target = tmp_path / "empty"
    target.mkdir()
    monkeypatch.setitem(data.ARCHIVES, "tinyimagenet", (archive.as_uri(), md5, "tiny-imagenet-200"))
    ds = data.load("tinyimagenet", target)
    assert ds.test.y.tolist() == [5] and not ds.has_train
    assert not (tmp_path / "escape.txt").exists() and not list(target.glob("*.part"))
    monkeypatch.setitem(data.ARCHIVES, "tinyimagenet", (archive.as_uri(), "0" * 32, "tiny-imagenet-200"))
    (tmp_path / "empty2").mkdir()
    with pytest.raises(BenchError, match="md5"):
        data.load("tinyimagenet", tmp_path / "empty2")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_tensors_npz_nhwc_uint8_and_pt_nchw_float(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (20, 28, 28, 3), dtype=np.uint8)  # NHWC
    x_test = rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 100, 20), np.arange(6) * 10
    path = _npz(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = data.load("tensors[num_classes=100]", path, n_val=4)
    assert ds.num_classes == 100 and ds.spec.channels == 3 and ds.spec.size == 28
    assert torch.equal(ds.test.x[2], torch.from_numpy(x_test[2].transpose(2, 0, 1).copy()).float() / 255)
    assert (len(ds.train), len(ds.val)) == (16, 4) and ds.test.y.tolist() == y_test.tolist()
    # eval-only .pt, NCHW float, grey
    x = torch.rand(5, 1, 64, 64)
    torch.save({"x": x, "y": torch.tensor([0, 199, 3, 4, 5])}, tmp_path / "e.pt")
    ev = data.load("tensors", tmp_path / "e.pt")
    assert ev.num_classes == 200 and ev.spec.channels == 1 and ev.spec.size == 64 and not ev.has_train
    assert torch.equal(ev.test.x, x)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((3, 8, 8, 3)), "y": np.array([0, 1, -1])}, "negative label -1"),
    ({"x": np.full((3, 3, 8, 8), 2.0), "y": np.arange(3)}, r"range over \[2, 2\], expected \[0, 1\]"),
    ({"x": np.zeros((3, 3, 8, 8), np.int64), "y": np.arange(3)}, "is int64, expected uint8"),
    ({"x": np.zeros((3, 3, 8, 8)), "y": np.arange(4)}, "3 images in 'x' but 4 labels"),
    ({"x": np.zeros((3, 3, 8, 6)), "y": np.arange(3)}, "images must be square"),
    ({"x": np.zeros((3, 1, 3, 8, 8)), "y": np.arange(3)}, r"expected \(N, C, H, W\), \(N, H, W, C\) or \(N, H, W\)"),
    ({"x": np.zeros((3, 3, 8, 8)), "y": np.array([0.0, 1.0, 1.0])}, "1-D array of integer labels"),
    ({"images": np.zeros((3, 3, 8, 8))}, "expected x and y"),
    ({"x_test": np.zeros((3, 3, 8, 8)), "y_test": np.arange(3), "x_train": np.zeros((3, 3, 8, 8))},
     "x_train without y_train"),
])
def test_tensors_bad_inputs_are_one_line(tmp_path, arrays, message):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BenchError, match=message):
        data.load("tensors", path)


def test_tensors_refuse_pickles_and_out_of_range_labels(tmp_path):
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, {"b": 2}]
    path = tmp_path / "pickled.npz"
    np.savez(path, x=objects, y=np.arange(2))  # savez pickles object arrays; loading them is refused
    with pytest.raises(BenchError, match="pickled Python objects .* never loaded"):
        data.load("tensors", path)
    torch.save({"x": torch.rand(2, 3, 8, 8), "y": torch.arange(2), "why": Path("x")}, tmp_path / "obj.pt")
    with pytest.raises(BenchError, match=r"references pathlib[\w.]*Path\), which are never unpickled"):
        data.load("tensors", tmp_path / "obj.pt")
    ok = _npz(tmp_path / "ok.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.array([0, 1, 2, 10]))
    with pytest.raises(BenchError, match="label 10 is outside 0..9 \\(num_classes=10\\)"):
        data.load("tensors[num_classes=10]", ok)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(BenchError, match="expected an .npz or .pt file"):
        data.load("tensors", tmp_path / "x.csv")
    (tmp_path / "broken.npz").write_bytes(b"PK not really")
    with pytest.raises(BenchError, match="not a readable .npz file"):
        data.load("tensors", tmp_path / "broken.npz")


def test_register_tensors_names_by_content():
    x = torch.rand(6, 3, 28, 28)
    y = torch.tensor([0, 1, 2, 3, 4, 99])
    name = data.register_tensors(x, y, name_hint="my set!")
    assert name.startswith("my-set-") and len(name) == len("my-set-") + 12
    assert data.register_tensors(x.clone(), y.clone(), name_hint="my set!") == name
    other = data.register_tensors(x.flip(0), y, name_hint="my set!")
    assert other != name
    ds = data.load(name, n_test=4)
    assert ds.name == name and ds.num_classes == 100 and torch.equal(ds.test.x, x[:4]) and not ds.has_train
    assert data.load(name).fingerprint == data.load(name).fingerprint != data.load(other).fingerprint
    assert name in data.names()
    with pytest.raises(BenchError, match=r"range over"):
        data.register_tensors(x * 3, y)
    trained = data.register_tensors(x, y, train=(x.repeat(2, 1, 1, 1), torch.arange(12) % 100), mean=(0.5,) * 3,
                                    std=(0.25,) * 3)
    both = data.load(trained, n_val=2)
    assert both.has_train and len(both.train) == 10 and both.spec.mean == (0.5, 0.5, 0.5)


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(BenchError, match="unknown dataset 'imagefoldr' \\(did you mean 'imagefolder'\\?\\)"):
        data.load("imagefoldr")
    with pytest.raises(BenchError, match="malformed dataset"):
        data.load("imagefolder[size=3")


def test_cli_run_on_a_200_class_64px_imagefolder(bench, folder200, tmp_path):
    """pgd_at trains a tiny base on the fake 200-class data and is attacked, end to end."""
    out = tmp_path / "results"
    args = ["run", "--preset", "smoke", "--dataset", "imagefolder[size=64]", "--data-dir", folder200, "--defense", "pgd_at",
            "--attacks", "fgsm,pgd10[steps=2]", "--out", out, "--quiet", "--device", "cpu"]
    # small budgets: a 64-pixel batch costs 0.2-0.6 s forward and backward on a shared CPU core
    for value in ("n_train=120", "n_val=20", "n_val_robust=10", "n_test=32", "epochs_pgd_at=1", "pgd_steps=1",
                  "batch_size=50", "eval_batch_size=16"):
        args += ["--set", value]
    res = bench(*args)
    assert res.code == 0, res.err
    assert "clean" in res.out and "pgd10[steps=2]" in res.out
    from bench.store import Store

    store = Store(out)
    try:
        (run,) = store.runs()
        assert run["dataset"] == "imagefolder[size=64]"
        cells = {c["attack"]: c for c in store.cells(run["run_id"])}
        assert cells["clean"]["n"] == 32 and cells["fgsm"]["n"] == 32 and "pgd10[steps=2]" in cells
    finally:
        store.close()
    # a label with options names a leaderboard file like any dataset
    board = bench("leaderboard", "--out", out, "--dest", tmp_path / "boards")
    assert board.code == 0, board.err
    text = (tmp_path / "boards" / "imagefolder.size-64-tiny_cnn-smoke.md").read_text()
    assert "pgd_at" in text


def test_cli_evaluation_only_data_with_a_training_defense_is_one_line(bench, tmp_path):
    root = make_imagefolder(tmp_path / "eval", 3, train=0, test=2, size=8)
    res = bench("run", "--preset", "smoke", "--dataset", "imagefolder", "--data-dir", root, "--defense", "pgd_at",
                "--attacks", "fgsm", "--out", tmp_path / "r", "--quiet", "--device", "cpu", "--set", "n_test=none")
    assert res.code == 2
    assert "has no training images (evaluation-only data)" in res.err and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1
