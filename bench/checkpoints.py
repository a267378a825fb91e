"""Checkpoint files and the cached base models behind `ctx.base(recipe)`.

Files are written to a temporary name and renamed; a `<file>.sha256` beside each one is renamed first,
so a checkpoint that exists always has a digest to be checked against. The two renames happen under a
lock on the folder, and a reader that finds a pair that does not match reads it again under that lock:
concurrent writers never leave, and readers never see, a checkpoint with another one's digest. Loading
uses `torch.load(weights_only=True)`: a checkpoint can hold tensors and plain data, never code.

Two processes that need the same cached model train it once: the second waits on `<file>.lock`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process locking
    fcntl = None

from bench.config import derived_seed, model_identity, stable_hash, to_json
from bench.errors import BenchError, file_safe, os_reason
from bench.train import (Clean, PGDAdversarial, Schedule, TRADES, TrainSpec, accuracy, autocast_factory, fgsm_rs,
                         preset_spec, robust_accuracy, train)

RECIPES = ("standard", "pgd_at", "trades", "fgsm_rs")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# taken, shared or exclusive, around the renames and the re-read of a checkpoint and its digest
PAIR_LOCK = ".checkpoints.lock"


@contextlib.contextmanager
def _flock(lock: Path, exclusive: bool, on_wait: Callable[[], None] | None = None):
    """Hold an fcntl lock on the file `lock` (created if needed); without one where it cannot be created."""
    try:
        fh = open(lock, "a")
    except OSError:  # a read-only folder: nobody writes there either
        yield
        return
    with fh:
        if fcntl is not None:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fh, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, mode)
        yield  # closing the file releases the lock


def first_nonfinite(state_dict: dict) -> str | None:
    """The name of the first floating tensor holding NaN or inf, or None."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) \
                and not bool(torch.isfinite(value).all()):
            return name
    return None


def save(path: Path, state_dict: dict, meta: dict) -> None:
    path = Path(path)
    bad = first_nonfinite(state_dict)
    if bad is not None:  # it would be refused when read back: training diverged
        raise BenchError(f"{path.name}: the trained weights are not finite (e.g. {bad}); training diverged, "
                         f"nothing was cached")
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = Path(str(path) + ".sha256")
    tmps = []
    try:
        for target in (path, sidecar):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=target.name + ".", suffix=".tmp")
            os.close(fd)
            tmps.append(tmp)
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "meta": meta}, tmps[0])
        Path(tmps[1]).write_text(file_sha256(Path(tmps[0])) + "\n")
        with _flock(path.parent / PAIR_LOCK, exclusive=True):
            os.replace(tmps[1], sidecar)
            os.replace(tmps[0], path)
    finally:
        for tmp in tmps:
            Path(tmp).unlink(missing_ok=True)


def _read_pair(path: Path, sidecar: Path) -> tuple[bytes, str | None]:
    """The checkpoint's bytes and the digest its sidecar gives (None: no sidecar)."""
    expected = None
    if sidecar.is_file():  # bytes that are not text are no digest: the pair differs
        words = sidecar.read_bytes().decode("ascii", errors="replace").split()
        expected = words[0] if words else ""
    return path.read_bytes(), expected


def unusable_tensor(value: torch.Tensor) -> str | None:
    """Why a tensor read from a file cannot serve as weights or data, in words ('on the meta device (it holds
    no values)', 'a sparse tensor'), or None for a plain dense tensor."""
    if value.is_meta:
        return "on the meta device (it holds no values)"
    if getattr(value, "is_nested", False):
        return "a nested tensor"
    if value.layout != torch.strided:
        return f"a sparse tensor ({str(value.layout).replace('torch.', '')})"
    if value.is_quantized:
        return f"a quantized tensor ({str(value.dtype).replace('torch.', '')})"
    return None


# torch's refusal carries advice we never follow (weights_only=False would run the file's code; allowlisting
# its globals would too): only what the file holds is reported
_TORCH_ADVICE = re.compile(r"weights_only|safe_globals|trust|documentation|please|two options|if you|[(]\d[)]",
                           re.IGNORECASE)


def load_weights_only(blob: bytes, what: str, hint: str) -> Any:
    """torch.load(weights_only=True) of `blob`, the bytes of the file `what` names: tensors and plain data,
    never code. An empty or corrupt file is one BenchError, and so is one holding other objects: it names the
    global the file references, then `hint` (what to save instead)."""
    if not blob:
        raise BenchError(f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # (its warnings about a file's pickle protocol are for torch's authors)
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses any object but tensors and plain data
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise BenchError(f"{what} holds Python objects other than tensors and plain data (it references "
                             f"{found.group(1)}), which are never unpickled (code could run); {hint}") from None
        raise _corrupt(what, "UnpicklingError", text) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for foreign or corrupt files
        raise _corrupt(what, type(exc).__name__, str(exc)) from None


def _corrupt(what: str, kind: str, text: str) -> BenchError:
    reason = _torch_reason(text)
    return BenchError(f"{what} is corrupt or not a PyTorch file ({kind}{': ' + reason if reason else ''})")


def _torch_reason(text: str) -> str:
    """torch's error message without its advice: the sentences that say what is wrong, on one line."""
    text = text.split("WeightsUnpickler error:", 1)[-1]
    sentences = re.split(r"(?<=[.!?])\s+|\n+", text)
    kept = [s.strip() for s in sentences if s.strip() and not _TORCH_ADVICE.search(s)]
    return textwrap.shorten(" ".join(kept), 200, placeholder=" ...")


def load(path: Path, *, require_digest: bool) -> dict:
    """{'state_dict': ..., 'meta': ...} from one of our files, or a bare/foreign state dict. `require_digest`:
    a file of bnbench's own cache (it must have its sidecar); else a user's file, whose folder is only read."""
    path = Path(path)
    try:
        if not path.is_file():
            raise BenchError(f"checkpoint {path} " + ("is a directory, not a checkpoint file" if path.is_dir() else
                                                      "is not a regular file" if path.exists() else "does not exist"))
        sidecar = Path(str(path) + ".sha256")
        blob, expected = _read_pair(path, sidecar)
        if require_digest and expected is not None and hashlib.sha256(blob).hexdigest() != expected:
            # our cache, maybe caught between a writer's two renames: read the pair again while no writer can
            # rename. Only there: taking the lock creates its file, and a user's checkpoint folder (a model
            # zoo, a read-only mount) is never written; no bnbench process renames files in it either.
            with _flock(path.parent / PAIR_LOCK, exclusive=False):
                blob, expected = _read_pair(path, sidecar)
    except OSError as exc:
        raise BenchError(f"checkpoint {path} cannot be read ({os_reason(exc)})") from None
    if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
        raise BenchError(f"checkpoint {path} is corrupt: its sha256 differs from {sidecar.name}")
    if expected is None and require_digest:
        raise BenchError(f"checkpoint {path} has no {sidecar.name}; delete it to retrain")
    # the bytes just checked, not the file again
    obj = load_weights_only(blob, f"checkpoint {path}", "save model.state_dict() instead")
    state, meta = None, {}
    if isinstance(obj, dict):
        # a training script's usual containers: {"state_dict": ...} (ours adds "meta"), {"model": ...},
        # {"net": ...}; else the dict is the state dict itself
        holder = next((k for k in STATE_KEYS if isinstance(obj.get(k), dict)), None)
        state = obj[holder] if holder else obj
        meta = obj.get("meta") if holder == "state_dict" else {}
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        found = f"; it holds the keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, dict) and obj else ""
        raise BenchError(f"checkpoint {path} holds no state dict (parameter names mapped to tensors, alone or "
                         f"under {', '.join(STATE_KEYS)}){found}")
    for name, value in state.items():
        problem = unusable_tensor(value)
        if problem:
            raise BenchError(f"checkpoint {path}: '{name}' is {problem}; save the weights of a model on the CPU "
                             f"or a GPU (model.state_dict()), dense")
    return {"state_dict": state, "meta": meta if isinstance(meta, dict) else {}}


STATE_KEYS = ("state_dict", "model", "net")  # where training scripts put the state dict in a checkpoint
# Prefixes wrappers add to every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@contextlib.contextmanager
def training_lock(path: Path, log, what: str):
    """Held from "is it cached?" to "cached": a second process needing the same file waits, then finds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _flock(Path(str(path) + ".lock"), exclusive=True,
                on_wait=lambda: log.info("%s: waiting for another process training %s", what, path.name)):
        yield


def load_into(model: nn.Module, ckpt: dict, source: str, *, arch: str, dataset: str) -> None:
    """Load a checkpoint (from `load`) into `model`, refusing one made for another model or dataset, one whose
    keys or shapes do not match (named: missing, unexpected, other shape), complex values for real weights
    (the imaginary part would be dropped) and non-finite weights."""
    meta = ckpt["meta"]
    for key, want in (("arch", arch), ("dataset", dataset)):
        if meta.get(key) not in (None, want):
            raise BenchError(f"checkpoint {source} is for {key} '{meta[key]}', this run uses '{want}'")
    state = dict(ckpt["state_dict"])
    for prefix in WRAPPER_PREFIXES:  # only when every key has it: a model may own a submodule called "module"
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    # load_state_dict would keep the real part and drop the imaginary one with no more than a warning
    complex_ = [k for k in own if k in state and state[k].is_complex() and not own[k].is_complex()]
    if missing or unexpected or shapes or complex_:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (" + _some(
                [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes], 3) + ")")
        if complex_:
            parts.append(f"{len(complex_)} complex where the model's are real (" + _some(
                [f"{k}: {_dtype(state[k])} vs {_dtype(own[k])}" for k in complex_], 3) + ")")
        raise BenchError(f"checkpoint {source} does not fit {arch}: " + "; ".join(parts))
    bad = first_nonfinite(state)
    if bad is not None:  # such a model answers at random, which would read as a defense's randomness
        raise BenchError(f"checkpoint {source} holds non-finite weights (NaN or inf in {bad})")
    model.load_state_dict(state)


def _dtype(value: torch.Tensor) -> str:
    return str(value.dtype).replace("torch.", "")


def _some(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", and {len(items) - n} more" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------------
# base models


def recipe_plan(recipe: str, ctx) -> tuple[Any, TrainSpec, str]:
    """Objective, budget and selection metric of a base recipe (METHODS.md, base training recipes)."""
    p = ctx.preset
    eps, alpha = p.eps, p.alpha
    gen = ctx.generator(f"base:{recipe}:attack")
    if recipe == "standard":
        return Clean(), preset_spec(p, epochs=p.epochs_standard, lr=p.lr, select="val_clean"), "val_clean"
    if recipe == "pgd_at":
        obj = PGDAdversarial(eps, alpha, p.pgd_steps, gen)
        return obj, preset_spec(p, epochs=p.epochs_pgd_at, lr=p.lr, select="val_robust"), "val_robust"
    if recipe == "trades":
        obj = TRADES(eps, TRADES.step_for(eps), p.pgd_steps, 6.0, gen)
        return obj, preset_spec(p, epochs=p.epochs_trades, lr=p.lr, select="val_robust"), "val_robust"
    if recipe == "fgsm_rs":
        obj = fgsm_rs(eps, gen)
        return obj, preset_spec(p, epochs=p.epochs_fgsm_rs, lr=p.lr_fgsm_rs, select="val_robust",
                                schedule=Schedule("cyclic")), "val_robust"
    raise BenchError(f"unknown base recipe '{recipe}'; choose from: {', '.join(RECIPES)}")


def base_identity(ctx, recipe: str) -> dict:
    obj, spec, select = recipe_plan(recipe, ctx)
    budget = {k: v for k, v in vars(spec).items() if k != "schedule"}
    budget["schedule"] = vars(spec.schedule)
    # the crafting mode is implied by the recipe name, which is part of the identity
    budget["objective"] = {k: v for k, v in vars(obj).items() if k not in ("generator", "craft_in_eval")}
    # training never reads the test split: evaluating more or fewer test images reuses the same base
    return {"dataset": ctx.data.name, "data": ctx.data.train_fingerprint,
            **model_identity(ctx.arch, getattr(ctx, "model_source", ""), getattr(ctx, "normalize", None)),
            "recipe": recipe,
            "budget": budget, "eps": ctx.preset.eps, "alpha": ctx.preset.alpha, "seed": ctx.seed,
            "precision": ctx.precision, "n_val_robust": ctx.preset.n_val_robust}


def base_path(ctx, recipe: str) -> Path:
    key = stable_hash(base_identity(ctx, recipe))[:16]
    return ctx.cache_dir / "base" / f"{ctx.data.name}-{file_safe(ctx.arch)}-{recipe}-s{ctx.seed}-{key}.pt"


def base_model(ctx, recipe: str) -> nn.Module:
    """The base model of `recipe`: a user checkpoint, the cache, or trained now and cached."""
    model = ctx.build_model()
    if recipe in ctx.base_checkpoints:
        path = ctx.base_checkpoints[recipe]
        load_into(model, load(path, require_digest=False), str(path), arch=ctx.arch, dataset=ctx.data.name)
        return model.eval()
    if recipe not in RECIPES:
        raise BenchError(f"unknown base recipe '{recipe}'; choose from: {', '.join(RECIPES)}")
    path = base_path(ctx, recipe)

    def cache_hit() -> nn.Module:
        ctx.log.info("base %s: cache hit %s", recipe, path.name)
        load_into(model, load(path, require_digest=True), str(path), arch=ctx.arch, dataset=ctx.data.name)
        return model.eval()

    model = _cached_once(path, ctx.log, f"base {recipe}", cache_hit, lambda: _train_base(ctx, recipe, path))
    _note(ctx, path, model)
    return model


def weights_sha256(model: nn.Module) -> str:
    """A digest of a model's weights alone (a checkpoint file also holds when and how fast it was trained)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _note(ctx, path: Path, model: nn.Module | None = None) -> None:
    """Record what a cached file the run used holds: its model's weights digest, or a memo's sha256."""
    if isinstance(getattr(ctx, "cached_files", None), dict):
        ctx.cached_files[path.name] = (weights_sha256(model) if model is not None
                                       else hashlib.sha256(path.read_bytes()).hexdigest())


class LocalCache:
    """The cache of one machine: the files under the cache folder, nothing beyond them. A sweep on a cluster
    (bench.cluster) installs a cache that also fetches files from, and publishes them to, the driver's."""

    def fetch(self, path: Path) -> bool:
        """Bring `path` here from elsewhere if it is cached there; whether it now exists."""
        return False

    @contextlib.contextmanager
    def producing(self, path: Path, log, what: str):
        """Held while this process computes `path`; elsewhere nobody computes it meanwhile. On leaving, the
        file may exist because another machine made it (it was fetched): then it is not computed again."""
        yield


shared = LocalCache()  # replaced by bench.cluster in a worker of a sweep on Ray


def use_shared_cache(cache: LocalCache) -> None:
    global shared
    shared = cache


def _cached_once(path: Path, log, what: str, cache_hit: Callable[[], Any], train_and_save: Callable[[], Any]):
    """cache_hit() if `path` is cached, else train_and_save(), which no other process runs meanwhile (on
    this machine: a file lock; on a cluster: the shared cache's claim)."""
    if not path.exists() and not shared.fetch(path):
        with training_lock(path, log, what):
            if not path.exists():  # a process we waited for may have cached it
                with shared.producing(path, log, what):
                    if not path.exists():  # or another machine did, and it was fetched
                        return train_and_save()
    return cache_hit()


def transfer_bytes(path: Path) -> tuple[bytes, str]:
    """A cached file's bytes and sha256 to send to another machine; a checkpoint's must match its sidecar."""
    path = Path(path)
    sidecar = Path(str(path) + ".sha256")
    if path.suffix == ".pt":
        with _flock(path.parent / PAIR_LOCK, exclusive=False):
            data, expected = _read_pair(path, sidecar)
        digest = hashlib.sha256(data).hexdigest()
        if expected != digest:
            raise BenchError(f"cached {path.name} does not match its sha256 sidecar; not sent")
        return data, digest
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def install_bytes(path: Path, data: bytes, digest: str) -> None:
    """Write a cached file received from another machine, after checking the sha256 it was sent with (a
    checkpoint gets its sidecar, written first, as `save` does)."""
    path = Path(path)
    if hashlib.sha256(data).hexdigest() != digest:
        raise BenchError(f"{path.name} arrived with another sha256 than it was sent with; not installed")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        with _flock(path.parent / PAIR_LOCK, exclusive=True):
            _write_atomic(Path(str(path) + ".sha256"), lambda tmp: Path(tmp).write_text(digest + "\n"))
            _write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))
    else:
        _write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def _train_base(ctx, recipe: str, path: Path) -> nn.Module:
    ctx.log.info("base %s: training (%s)", recipe, path.name)
    torch.manual_seed(derived_seed(ctx.seed, recipe, "init"))
    model = ctx.build_model()
    obj, spec, _ = recipe_plan(recipe, ctx)
    autocast = autocast_factory(ctx.precision, ctx.device)
    val_robust = ctx.data.val.subset(slice(0, ctx.preset.n_val_robust))

    def evaluate(m: nn.Module) -> dict:
        out = {"val_clean": accuracy(m, ctx.data.val, ctx.device, autocast=autocast)}
        if spec.select == "val_robust":
            out["val_robust"] = robust_accuracy(m, val_robust, ctx.device, eps=ctx.preset.eps, alpha=ctx.preset.alpha,
                                                steps=ctx.preset.pgd_steps, autocast=autocast,
                                                generator=ctx.generator("base:val-pgd"))
        return out

    result = train(model, ctx.data.train, obj, spec, device=ctx.device, precision=ctx.precision,
                   generator=ctx.generator(f"base:{recipe}:data"), evaluate=evaluate,
                   progress=ctx.progress, desc=f"base {recipe}", compile=ctx.compile)
    meta = {"arch": ctx.arch, "dataset": ctx.data.name, "recipe": recipe, "best_epoch": result.best_epoch,
            "seconds": result.seconds, "history": result.history, "created": time.time(),
            "identity": stable_hash(base_identity(ctx, recipe))}
    save(path, model.state_dict(), meta)
    best = result.history[result.best_epoch - 1]
    ctx.log.info("base %s: epoch %d kept (%s), %.0fs", recipe, result.best_epoch,
                 ", ".join(f"{k} {v:.3f}" for k, v in best.items() if k.startswith("val")), result.seconds)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# defense-level caches


def _scoped_key(ctx, kind: str, identity: dict) -> str:
    return stable_hash({"kind": kind, "identity": identity, "scope": ctx.scope})[:20]


def cached_model(ctx, kind: str, identity: dict, model: nn.Module, train_fn) -> dict:
    path = ctx.cache_dir / "defense" / f"{kind}-{_scoped_key(ctx, kind, identity)}.pt"

    def cache_hit() -> dict:
        ckpt = load(path, require_digest=True)
        load_into(model, ckpt, str(path), arch=ctx.arch, dataset=ctx.data.name)
        ctx.log.info("%s: cache hit %s", kind, path.name)
        return json.loads(ckpt["meta"]["info"])

    def train_and_save() -> dict:
        info = train_fn()
        # info goes in as JSON text: weights_only loading accepts plain containers, and JSON keeps it so
        save(path, model.state_dict(), {"arch": ctx.arch, "dataset": ctx.data.name, "kind": kind,
                                        "info": json.dumps(info, default=to_json)})
        return json.loads(json.dumps(info, default=to_json))

    info = _cached_once(path, ctx.log, kind, cache_hit, train_and_save)
    _note(ctx, path, model)
    return info


def memo(ctx, kind: str, identity: dict, compute):
    path = ctx.cache_dir / "memo" / f"{kind}-{_scoped_key(ctx, kind, identity)}.json"
    if path.exists() or shared.fetch(path):
        try:
            value = json.loads(path.read_text())["value"]
            _note(ctx, path)
            return value
        except (ValueError, KeyError, TypeError):  # not JSON, or JSON of another shape
            ctx.log.warning("%s: unreadable cache file %s, recomputing", kind, path.name)
            path.unlink(missing_ok=True)
    with shared.producing(path, ctx.log, kind):
        if not path.exists():  # (else another machine computed it meanwhile)
            value = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"kind": kind, "identity": identity, "value": value}, default=to_json)
            _write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    _note(ctx, path)
    return json.loads(path.read_text())["value"]


