"""`Context`: what a defense sees of its run (data, device, seed, preset, cached base models and training
results, progress, log). The runner builds one per run; plugins receive it in `Defense.build`."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from bench import checkpoints, models
from bench.config import model_identity, training_scope
from bench.errors import BenchError
from bench.train import to_device


class Context:
    """What a defense sees of the run: data, device, seed, preset budgets, base models, progress, log."""

    def __init__(self, *, data, arch: str, device: torch.device, seed: int, preset, cache_dir: Path,
                 precision: str = "fp32", quiet: bool = False, base_checkpoints: dict | None = None,
                 log: logging.Logger | None = None, scope: dict | None = None, normalize: tuple | None = None,
                 model_source: str = "", compile: bool = False) -> None:
        self.data = data
        self.arch = arch  # the model name: a built-in architecture, an entry point or pkg.module:factory
        self.normalize = normalize  # (means, stds) in front of the model (--normalize), or None
        self.model_source = model_source
        self.device = torch.device(device)
        self.seed = seed
        self.preset = preset
        self.cache_dir = Path(cache_dir)
        self.precision = precision
        self.compile = compile  # --compile: base training through torch.compile
        self.quiet = quiet
        self.base_checkpoints = dict(base_checkpoints or {})
        self.log = log or logging.getLogger("bench")
        # What every cached training result of this run depends on besides the defense's own parameters:
        # not the test images, unless the defense reads them (split("test")).
        if scope is None:
            scope = training_scope({
                **model_identity(arch, model_source, normalize), "seed": seed, "precision": precision,
                "preset": dataclasses.asdict(preset) if dataclasses.is_dataclass(preset) else str(preset),
                "base_checkpoints": sorted(self.base_checkpoints.items())}, getattr(data, "train_fingerprint", ""))
        self.scope = scope
        # every cached model and memo this run built on (file name -> sha256): shards of a sweep that trained
        # the same base differently are told apart when their databases are merged
        self.cached_files: dict[str, str] = {}

    def split(self, which: str):
        """The split a defense selects or monitors on: "val" or "test". Reading the test split puts the
        test images into the scope of this run's later caches, so a result selected on them never serves
        a run with other test images. (A plugin that reads `data.test` directly must do the same.)"""
        if which == "test":
            self.scope = {**self.scope, "test_data": getattr(self.data, "fingerprint", "")}
            return self.data.test
        if which == "val":
            return self.data.val
        raise BenchError(f"split must be 'val' or 'test', got '{which}'")

    def build_model(self) -> torch.nn.Module:
        """A fresh network of the run's model (`--model`, with `--normalize` in front) for its data, on the
        run's device. Untrained: for the trained one, `base(recipe)`."""
        return to_device(models.build_model(self.arch, self.data.spec, self.normalize), self.device)

    def base(self, recipe: str = "pgd_at") -> torch.nn.Module:
        """The cached base model trained with `recipe` (trained on first use), in eval mode."""
        return checkpoints.base_model(self, recipe)

    def cached_model(self, kind: str, identity: dict, model: torch.nn.Module,
                     train: Callable[[], dict]) -> dict:
        """Run `train()` (which trains `model` in place and returns JSON-able info) unless the cache holds
        its result for `identity` within this run's scope (data, preset, seed, ... -- every setting but the
        number of test images); on a hit, load the weights and return the info.
        A defense that trains uses this so sweeps and resumed runs never train the same thing twice."""
        return checkpoints.cached_model(self, kind, identity, model, train)

    def memo(self, kind: str, identity: dict, compute: Callable[[], Any]) -> Any:
        """JSON-able `compute()` cached for `identity` within this run's scope (e.g. RiFT's MRC values,
        shared by every top-k run)."""
        return checkpoints.memo(self, kind, identity, compute)

    def progress(self, iterable: Iterable, desc: str, total: int | None = None, leave: bool = False):
        return tqdm(iterable, desc=desc, total=total, disable=self.quiet, leave=leave,
                    dynamic_ncols=True, mininterval=0.5)

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator seeded from the run seed and a purpose, so each random stream is reproducible
        on its own (adding an attack never shifts another one's random start)."""
        digest = hashlib.sha256(f"{self.seed}:{purpose}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
