"""Generic dataset readers, registered in the `bench.datasets` group like any loader: a folder of images per
class (`imagefolder`), a tensor file (`tensors`), and the Tiny ImageNet layout (`tinyimagenet`).

Options come in the dataset item, as attack parameters do: `--dataset "imagefolder[size=64;mode=L]"`.

Image folders are read in a fixed, class-interleaved order (the first image of every class, then the second
of every class, ...), so the first `n_train` / `n_test` images -- what the presets' caps keep -- cover the
classes evenly; only those are decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch

from bench.checkpoints import load_weights_only, unusable_tensor
from bench.data import DATASETS, MAX_CLASSES, DataRequest, DatasetSpec, LoadedData, _find_folder, tensors_from_arrays
from bench.errors import BenchError
from bench.params import Param

# what the `mode` option and the data decide: Pillow's mode for each channel count
MODES = {"L": 1, "RGB": 3}
GREY = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# integer modes of more than 8 bits (16-bit PNG and TIFF): scaled from 0..65535 to [0, 1], never clipped to 255
DEEP = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
DEEP_MAX = 65535
# The most pixels an image may declare. A header is checked before anything is decoded: a file of a few
# hundred bytes can claim 30000 x 30000 pixels, gigabytes once decoded (a decompression bomb).
MAX_SIDE = 8192
MAX_PIXELS = MAX_SIDE * MAX_SIDE


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - matplotlib depends on Pillow
        raise BenchError("reading image files needs Pillow: pip install pillow") from None
    return Image, UnidentifiedImageError


def _too_large(path: Path, where: str, pixels: int | None) -> BenchError:
    claimed = f"declares {pixels:,} pixels" if pixels else "declares more pixels than Pillow allows"
    return BenchError(f"{where}: {path} {claimed}, over the limit of {MAX_PIXELS:,} ({MAX_SIDE}x{MAX_SIDE}) an "
                      f"image may have; refused unread (a decompression bomb or a corrupt header)")


@contextlib.contextmanager
def _opened(path: Path, where: str, failure: str):
    """The image at `path`, its header read and its size checked against MAX_PIXELS before any pixel is
    decoded; a file Pillow cannot read is one BenchError ending `failure`'s words."""
    Image, Unidentified = _pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            im = Image.open(path)
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused while opening
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, where, int(found.group(1)) if found else None) from None
    except (Unidentified, OSError, ValueError) as exc:
        raise BenchError(f"{where}: {path} {failure} ({type(exc).__name__})") from None
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise _too_large(path, where, width * height)
        yield im


def _check_decoded_size(where: str, side: int, channels: int, count: int, option: str) -> None:
    """Before anything is decoded: one image of side x side must be within MAX_PIXELS, as a header must, and
    `count` of them as float32 (what the run holds them as) within this machine's memory. `option`: the
    dataset option that asked for `side` (`size=N`), named in the refusal; empty when the images have it."""
    what = f"{option} makes images of" if option else "the images are"
    pixels = side * side
    if pixels > MAX_PIXELS:
        count_text = f"{pixels:,}" if pixels < 10 ** 15 else f"about 10^{int(math.log10(pixels))}"  # (any int)
        raise BenchError(f"{where}: {what} {side}x{side} ({count_text} pixels), over the limit of {MAX_PIXELS:,} "
                         f"({MAX_SIDE}x{MAX_SIDE}) an image may have; refused before allocating")
    needed, memory = pixels * channels * count * 4, _memory_bytes()
    if memory is not None and needed > memory:
        raise BenchError(f"{where}: {what} {side}x{side}x{channels}: {count:,} of them take {_size(needed)} as "
                         f"float32, more than this machine's {_size(memory)} of memory; refused before allocating")


def _interleaved(per_class: list[list[Path]]) -> list[tuple[Path, int]]:
    """(file, label) with the classes interleaved: image i of every class before image i + 1 of any."""
    longest = max((len(files) for files in per_class), default=0)
    return [(files[i], label) for i in range(longest) for label, files in enumerate(per_class) if i < len(files)]


def _headers(items: list[tuple[Path, int]], where: str) -> list[tuple[str, tuple[int, int]]]:
    """Mode and size of every image, from its header only; a file that is not an image is named."""
    out = []
    for path, _ in items:
        with _opened(path, where, "is not an image Pillow can read") as im:
            out.append((im.mode, im.size))
    return out


def _pixels(im, mode: str, side: int, what: str) -> np.ndarray:
    """One image as (C, side, side): uint8 0..255, or float32 in [0, 1] for a 16-bit one (its 65536 levels
    kept, not clipped to 255)."""
    Image, _ = _pillow()
    if im.mode in DEEP:
        grey = im.convert("F")  # exact for 16-bit values
        low, high = grey.getextrema()
        if low < 0 or high > DEEP_MAX:  # (mode I is 32-bit: only 16-bit values have a known full scale)
            raise BenchError(f"{what} has {im.mode} pixels over {low:g}..{high:g}; integer images of more than "
                             f"8 bits are read as 16-bit, 0..{DEEP_MAX}")
        if grey.size != (side, side):
            grey = grey.resize((side, side), Image.BILINEAR)
        values = np.asarray(grey, dtype=np.float32) / DEEP_MAX
        return np.repeat(values[None], MODES[mode], axis=0)
    im = im.convert(mode)
    if im.size != (side, side):
        im = im.resize((side, side), Image.BILINEAR)
    pixels = np.asarray(im, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def read_images(items: list[tuple[Path, int]], where: str, *, mode: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode `items` into (N, C, side, side) (resized where an image differs) and int64 labels: uint8, or
    float32 in [0, 1] when any image has 16-bit pixels."""
    _, Unidentified = _pillow()
    x = np.empty((len(items), MODES[mode], side, side), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        with _opened(path, where, "could not be decoded") as im:
            try:
                pixels = _pixels(im, mode, side, f"{where}: {path}")
            except (Unidentified, OSError, ValueError) as exc:
                raise BenchError(f"{where}: {path} could not be decoded ({type(exc).__name__}: {exc})") from None
        if pixels.dtype == np.float32 and x.dtype == np.uint8:  # the first 16-bit image: all as float in [0, 1]
            x = x.astype(np.float32) / 255.0
        x[i] = pixels if pixels.dtype == x.dtype else pixels.astype(np.float32) / 255.0
    return x, np.array([label for _, label in items], dtype=np.int64)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")  # .DS_Store, ._x.jpg, editor files: never data


def _class_files(split_dir: Path, where: str) -> dict[str, list[Path]]:
    classes = {}
    for entry in sorted(split_dir.iterdir()):
        if _hidden(entry):
            continue
        if not entry.is_dir():
            raise BenchError(f"{where}: {entry} is a file; {split_dir} must hold one folder per class")
        classes[entry.name] = sorted(p for p in entry.rglob("*") if p.is_file() and not _hidden(p))
    if not classes:
        raise BenchError(f"{where}: {split_dir} holds no class folders")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise BenchError(f"{where}: class folder {split_dir / empty[0]} holds no images")
    return classes


def _digest(parts: dict[str, tuple[np.ndarray, np.ndarray]], *extra: str) -> str:
    h = hashlib.sha256("\n".join(extra).encode())
    for split in sorted(parts):
        x, y = parts[split]
        h.update(f"{split}:{x.shape}".encode())
        h.update(x.tobytes())
        h.update(y.tobytes())
    return h.hexdigest()


def _normalisation(options: dict) -> tuple[tuple, tuple]:
    return tuple(options.get("mean") or ()), tuple(options.get("std") or ())


SIZE = Param(None, "resize every image to size x size (none: every image must already have one square size)",
             kind=int, low=1)
MEAN = Param((), "per-channel normalisation mean of the built-in architectures (empty: from the training images)")
STD = Param((), "per-channel normalisation std (empty: from the training images)")


def imagefolder(request: DataRequest) -> LoadedData:
    """Images in a folder per class: --data-dir holds train/<class>/* and test/<class>/* (test/ alone: evaluation only)."""
    where = "imagefolder"
    root = _directory(request, where, "train/<class>/*.png and test/<class>/*.png")
    size, mode = request.options.get("size"), request.options.get("mode", "auto")
    splits = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "test" not in splits:
        raise BenchError(f"{where}: {root} holds no test/ folder (train/<class>/... and test/<class>/...; "
                         f"test/ alone for evaluation-only data)")
    files = {name: _class_files(path, where) for name, path in splits.items()}
    classes = list(files["test"])
    for name in ("train", "val"):
        if name in files and list(files[name]) != classes:
            only_here = sorted(set(files[name]) - set(classes))
            only_test = sorted(set(classes) - set(files[name]))
            raise BenchError(f"{where}: {name}/ and test/ must hold the same class folders; "
                             + "; ".join(f"only in {n}/: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                                         for n, v in ((name, only_here), ("test", only_test)) if v))
    caps = {"train": request.n_train, "test": request.n_test}
    order = {name: _interleaved([per_class[c] for c in classes]) for name, per_class in files.items()}
    order = {name: items[:caps[name]] if caps.get(name) else items for name, items in order.items()}
    headers = {name: _headers(items, where) for name, items in order.items()}
    every = [(path, h) for name in order for (path, _), h in zip(order[name], headers[name])]
    if mode == "auto":  # one mode for every split, decided by all the images read
        mode = "L" if all(m in GREY for _, (m, _) in every) else "RGB"
    if size is None:  # no resizing: every image has the first one's size, which must be square
        ref_path, (_, ref) = every[0]
        for path, (_, dims) in every:
            if dims != ref:
                raise BenchError(f"{where}: {path} is {dims[0]}x{dims[1]} but {ref_path} is {ref[0]}x{ref[1]}; "
                                 f"give the size to resize every image to, e.g. --dataset '{where}[size={ref[1]}]'")
        if ref[0] != ref[1]:
            raise BenchError(f"{where}: the images are {ref[0]}x{ref[1]}; only square images are used as they "
                             f"are: give the size to resize them to, e.g. --dataset '{where}[size={min(ref)}]'")
    side = size if size is not None else every[0][1][1][0]
    _check_decoded_size(where, side, MODES[mode], len(every), f"size={size}" if size is not None else "")
    parts = {name: read_images(items, where, mode=mode, side=side) for name, items in order.items()}
    x_test = parts["test"][0]
    mean, std = _normalisation(request.options)
    spec = DatasetSpec(x_test.shape[1], x_test.shape[2], len(classes), mean=mean, std=std)
    digest = _digest(parts, f"imagefolder:{mode}:{size}", *classes)
    return LoadedData(spec, parts["test"], digest, parts.get("train"), parts.get("val"))


imagefolder.options = {
    "size": SIZE,
    "mode": Param("auto", "colour mode: L (grey, 1 channel), RGB (3 channels) or auto (grey when every image is)",
                  choices=("auto", "L", "RGB")),
    "mean": MEAN, "std": STD,
}


def _directory(request: DataRequest, where: str, layout: str) -> Path:
    if request.data_dir is None:
        raise BenchError(f"{where} needs --data-dir DIR holding {layout}")
    root = Path(request.data_dir)
    if not root.is_dir():
        raise BenchError(f"{where}: data directory {root} {'is not a directory' if root.exists() else 'does not exist'}")
    return root


def tensors(request: DataRequest) -> LoadedData:
    """Arrays in one .npz or .pt file (--data-dir FILE): x, y (evaluation only) or x_train, y_train, x_test, y_test."""
    where = "tensors"
    if request.data_dir is None:
        raise BenchError(f"{where} needs --data-dir FILE: an .npz or .pt file holding x and y (or x_train, "
                         f"y_train, x_test, y_test)")
    path = Path(request.data_dir)
    if not path.is_file():
        raise BenchError(f"{where}: {path} {'is not a file' if path.exists() else 'does not exist'} (--data-dir "
                         f"names the .npz or .pt file itself)")
    where = f"tensors file {path}"
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = read_npz(path, where)
    elif suffix in (".pt", ".pth"):
        arrays = _pt(path, where)
    else:
        raise BenchError(f"{where}: expected an .npz or .pt file, got '{suffix or path.name}'")
    opts = request.options
    return tensors_from_arrays(arrays, where, layout=opts.get("layout", "auto"), num_classes=opts.get("num_classes"),
                               mean=tuple(opts.get("mean") or ()), std=tuple(opts.get("std") or ()))


tensors.options = {
    "layout": Param("auto", "image layout: nchw, nhwc, or auto (the axis of size 1 or 3 is the channels)",
                    choices=("auto", "nchw", "nhwc")),
    "num_classes": Param(None, "number of classes (none: the largest label + 1)", kind=int, low=2, high=MAX_CLASSES),
    "mean": MEAN, "std": STD,
}


def read_npz(source: Path | IO[bytes], where: str) -> dict[str, np.ndarray]:
    """Every array of the .npz file `source` (a path, or a binary file object such as io.BytesIO), refused in
    one BenchError beginning with `where` (what the file is, to the user) when it is not an .npz of plain
    arrays, or when its headers claim more than the file holds or the machine's memory: nothing is allocated
    before they are checked. Used for every .npz bnbench reads, the user's data and its own results folder's."""
    if not zipfile.is_zipfile(source):  # np.load would take it for a pickle (and refuse it as one)
        raise BenchError(f"{where} is not a readable .npz file (not a zip archive of .npy arrays)")
    try:
        _check_npz_sizes(source, where)
        if not isinstance(source, (str, os.PathLike)):
            source.seek(0)  # (np.load reads from where the zip reader left it)
        with np.load(source, allow_pickle=False) as archive:  # pickled objects could run code: never loaded
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise BenchError(f"{where} holds pickled Python objects (an object array), which are never loaded; "
                             f"save plain numeric arrays") from None
        raise BenchError(f"{where} is not a readable .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        # (a corrupt compressed member, an unknown compression method, an encrypted member)
        raise BenchError(f"{where} is not a readable .npz file ({type(exc).__name__}: {exc})") from None


def _memory_bytes() -> int | None:
    """This machine's physical memory, where the system tells it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def _npy_header(fh) -> tuple[tuple, np.dtype]:
    """Shape and dtype from the header of the .npy stream `fh` (left at the start of the data)."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(fh)
    else:  # 3.0 (utf-8 field names): only numpy's internal reader knows it
        shape, _, dtype = fmt._read_array_header(fh, version)
    return shape, dtype


def _check_npz_sizes(source: Path | IO[bytes], where: str) -> None:
    """Before anything is allocated: each array's header (shape x item size) must fit in the bytes its member
    holds -- an .npz is a zip, maybe compressed, so the member's uncompressed size from the zip directory --
    and all members together in this machine's memory. A header of a few bytes can claim terabytes."""
    with zipfile.ZipFile(source) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        for info in members:
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-len(".npy")]
            with archive.open(info) as fh:
                shape, dtype = _npy_header(fh)
                holds = info.file_size - fh.tell()
            if any(d < 0 for d in shape):
                raise BenchError(f"{where}: '{name}' declares the shape {shape}, with a negative size")
            if dtype.hasobject:  # refused by np.load, unallocated: no size to check
                continue
            declared = math.prod(shape) * dtype.itemsize
            if declared > holds:
                raise BenchError(f"{where}: '{name}' declares shape {shape} of {dtype} ({_size(declared)}) but "
                                 f"holds {_size(holds)}; refused before allocating (a corrupt or crafted header)")
    total, memory = sum(info.file_size for info in members), _memory_bytes()
    if memory is not None and total > memory:
        raise BenchError(f"{where} unpacks to {_size(total)}, more than this machine's {_size(memory)} of memory; "
                         f"refused before allocating")


def _size(n: int) -> str:
    for unit, scale in (("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("kB", 10 ** 3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _pt(path: Path, where: str) -> dict:
    obj = load_weights_only(path.read_bytes(), where, "save a dict of plain tensors (x, y or x_train, y_train, "
                                                      "x_test, y_test)")
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise BenchError(f"{where} holds a {type(obj).__name__}; expected a dict of tensors (x, y or x_train, "
                         f"y_train, x_test, y_test)")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise BenchError(f"{where}: '{key}' is a {type(value).__name__}, not a tensor")
        problem = unusable_tensor(value)
        if problem:
            raise BenchError(f"{where}: '{key}' is {problem}; save a dense tensor with its values")
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()  # bf16, fp16, fp8: numpy holds some of them, or none; float32 holds them all
        try:
            out[key] = value.detach().cpu().numpy()
        except (TypeError, RuntimeError) as exc:  # a dtype numpy has no counterpart for (complex32, uint16...)
            raise BenchError(f"{where}: '{key}' is a tensor of {value.dtype}, which cannot be read as numbers "
                             f"here ({exc}); save it as uint8 or float32") from None
    return out


def tinyimagenet(request: DataRequest) -> LoadedData:
    """Tiny ImageNet, 64x64 RGB, 200 classes: --data-dir holds tiny-imagenet-200/ (empty: download); val is the test split."""
    folder = _find_folder("tinyimagenet", request.data_dir, marker="wnids.txt")
    where = f"tinyimagenet ({folder})"
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise BenchError(f"{where}: wnids.txt is missing (expected the standard tiny-imagenet-200 layout)")
    wnids = sorted(set(wnids_file.read_text().split()))
    spec = DATASETS["tinyimagenet"]
    if len(wnids) != spec.num_classes:
        raise BenchError(f"{where}: wnids.txt lists {len(wnids)} classes, expected {spec.num_classes}")
    label = {w: i for i, w in enumerate(wnids)}
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise BenchError(f"{where}: val/val_annotations.txt is missing (the test split's labels)")
    val_classes: list[list[Path]] = [[] for _ in wnids]
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in label:
            raise BenchError(f"{where}: val/val_annotations.txt line {number} names no class of wnids.txt")
        image = folder / "val" / "images" / fields[0]
        if not image.is_file():
            raise BenchError(f"{where}: {image} (val_annotations.txt line {number}) is missing")
        val_classes[label[fields[1]]].append(image)
    orders = {"test": _interleaved([sorted(files) for files in val_classes])}
    if (folder / "train").is_dir():
        train_classes = []
        for wnid in wnids:
            images = folder / "train" / wnid / "images"
            files = sorted(p for p in images.glob("*") if p.is_file() and not _hidden(p)) if images.is_dir() else []
            if not files:
                raise BenchError(f"{where}: {images} holds no images")
            train_classes.append(files)
        orders["train"] = _interleaved(train_classes)
    caps = {"train": request.n_train, "test": request.n_test}
    orders = {name: items[:caps[name]] if caps[name] else items for name, items in orders.items()}
    _check_decoded_size(where, spec.size, 3, sum(map(len, orders.values())), "")
    parts = {}
    for name, items in orders.items():
        for (path, _), (_, dims) in zip(items, _headers(items, where)):
            if dims != (spec.size, spec.size):
                raise BenchError(f"{where}: {path} is {dims[0]}x{dims[1]}; Tiny ImageNet images are "
                                 f"{spec.size}x{spec.size}")
        parts[name] = read_images(items, where, mode="RGB", side=spec.size)  # a few are grey: read as RGB
    return LoadedData(spec, parts["test"], _digest(parts, "tinyimagenet", *wnids), parts.get("train"))

