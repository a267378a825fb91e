"""`bench.evaluate()`: evaluate a model object (or a named model and checkpoint) on data from Python, with no
defense to register. It is `bench run --defense as_is` underneath, the same preparation, cells, checks and
store, so the numbers are those `bench run` gives for the same inputs.

    report = bench.evaluate(model, "cifar10", data_dir="data/", attacks="all", threat="Linf:8/255")
    report.worst_case                # {threat: Accuracy}: .percent (as the tables), .value (a fraction), n
    report.to_frame()                # one row per cell, with 95% intervals
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError
from bench.stats import interval_text, wilson

WORST = "worst case"


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its 95% Wilson interval: `correct` of `n` images kept.

    `value`, `low` and `high` are fractions in [0, 1]; `percent` and `interval_percent` are the same in %, the
    figures every table prints (`str()` prints them as `bench run` does: "52.08% [38.3, 65.5] (n=48)")."""

    value: float  # a fraction in [0, 1], not %
    low: float  # fraction
    high: float  # fraction
    n: int
    correct: int
    incomplete: tuple[str, ...] = ()  # a worst case lacking requested cells overstates robustness

    @classmethod
    def of(cls, flags: np.ndarray, incomplete=()) -> "Accuracy":
        n, correct = int(flags.size), int(flags.sum())
        low, high = wilson(correct, n)
        return cls(correct / n if n else float("nan"), low, high, n, correct, tuple(incomplete))

    @property
    def percent(self) -> float:
        """The accuracy in %, as the tables print it."""
        return 100 * self.value

    @property
    def interval_percent(self) -> tuple[float, float]:
        """The 95% interval in %, as the tables print it."""
        return (100 * self.low, 100 * self.high)

    def __str__(self) -> str:
        text = f"{self.percent:.2f}% {interval_text(self.low, self.high)} (n={self.n})"
        return text + (f" ‡ incomplete: {', '.join(self.incomplete)}" if self.incomplete else "")

    def __repr__(self) -> str:
        low, high = self.interval_percent
        extra = f", incomplete={self.incomplete!r}" if self.incomplete else ""
        return (f"Accuracy(percent={self.percent:.2f}, interval_percent=({low:.1f}, {high:.1f}), "
                f"correct={self.correct}, n={self.n}{extra}; .value/.low/.high are fractions)")


class Report:
    """What `bench.evaluate` measured: per-attack and worst-case accuracies with intervals, per-sample
    flags, the sanity checks, failures, and where the adversarial examples are (when kept)."""

    def __init__(self, *, run_id: str, rows: list[dict], flags: dict[str, np.ndarray], checks: list[dict],
                 failures: list, out: str | None, adversarial: dict[str, Any]) -> None:
        self.run_id = run_id
        self.rows = rows  # as `bench run` prints them: clean, each attack, each worst case
        self.flags = flags  # label -> per-sample correctness (clean, attacks, "worst:<threat>")
        self.checks = checks  # the stored sanity checks: name, status, detail
        self.failures = failures  # plugins that raised (runner.Failure); their cells are missing
        self.out = out  # the results directory, None when nothing was kept
        self.adversarial = adversarial  # label -> path of its .npz (out given) or the arrays (no out)

    @property
    def clean(self) -> Accuracy:
        return Accuracy.of(self.flags["clean"])

    @property
    def attacks(self) -> dict[str, Accuracy]:
        """Accuracy under each attack that ran, by its label."""
        return {r["attack"]: Accuracy.of(self.flags[r["attack"]]) for r in self.rows
                if r["attack"] not in ("clean", WORST) and r["attack"] in self.flags}

    @property
    def worst_case(self) -> dict[str, Accuracy]:
        """Per threat model ("Linf eps=8/255"): a sample counts as robust only if every attack of that threat
        model left it correct."""
        return {r["threat"]: Accuracy.of(self.flags[f"worst:{r['threat']}"], r.get("incomplete", ()))
                for r in self.rows if r["attack"] == WORST and f"worst:{r['threat']}" in self.flags}

    def _cells(self):
        """(row, its Accuracy or None where nothing was measured) per row: clean, each attack, each worst case."""
        for r in self.rows:
            key = f"worst:{r['threat']}" if r["attack"] == WORST else r["attack"]
            yield r, Accuracy.of(self.flags[key]) if key in self.flags else None

    def to_frame(self):
        """One row per cell (clean, each attack, each worst case): accuracy and its interval in %, n,
        seconds, and what a cell lacks."""
        import pandas as pd

        records = []
        for r, acc in self._cells():
            records.append({"cell": r["attack"], "protocol": r["protocol"], "threat": r["threat"],
                            "n": acc.n if acc else 0, "correct": acc.correct if acc else None,
                            "accuracy": acc.percent if acc else float("nan"),
                            "ci_low": acc.interval_percent[0] if acc else float("nan"),
                            "ci_high": acc.interval_percent[1] if acc else float("nan"),
                            "seconds": r.get("seconds", float("nan")),
                            "status": r.get("status", "done"), "incomplete": ", ".join(r.get("incomplete", []))})
        return pd.DataFrame.from_records(records)

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = [[r["attack"], r["threat"], f"{acc.percent:.2f}" if acc else "—",  # as `bench run` prints them
                 interval_text(acc.low, acc.high) if acc else "", acc.n if acc else 0, r.get("status", "done")]
                for r, acc in self._cells()]
        lines = [tabulate(rows, headers=["cell", "threat", "accuracy %", "95% CI", "n", "status"],
                          disable_numparse=True)]
        lines += [f"check {c['name']}: {c['status']}: {c['detail']}" for c in self.checks
                  if c["status"] in ("warn", "fail")]
        lines += [f.line() for f in self.failures]
        return "\n".join(lines)

    def __repr__(self) -> str:
        worst = ", ".join(f"{t}: {a.percent:.2f}%" for t, a in self.worst_case.items())
        return f"<Report run {self.run_id[:10]}: clean {self.clean.percent:.2f}%; worst case {worst or '-'}>"


def evaluate(model: torch.nn.Module | str, data: Any, attacks: str = "all", threat: str | None = "Linf:8/255", *,
             device: str = "auto", out: str | Path | None = None, checkpoint: str | Path | None = None,
             normalize: str | None = None, data_dir: str | Path | None = None, preset: str = "paper",
             seed: int = 0, checks: bool = True, save_adversarial: bool = False,
             attack_params: dict[str, dict] | None = None, sets: dict[str, Any] | None = None,
             quiet: bool = True) -> Report:
    """Evaluate `model` on `data` with `attacks` under `threat`, as `bench run --defense as_is` would.

    - model: an `nn.Module` taking images in [0,1] (its weights as they are), or a model name / import path
      `pkg.module:factory` with `checkpoint` (a state-dict file).
    - data: a dataset name (`cifar10`, with `data_dir`), a folder of class folders (imagefolder), an .npz or
      .pt file with x, y, or a tuple `(x, y)` of tensors / arrays (images N,C,H,W in [0,1]).
    - attacks: names, `all` or `default`, as `--attacks`; threat: `NORM:EPS` (`Linf:8/255`, `L2:0.5`, `L1:12`;
      None: each attack's own norm at the data's standard budgets).
    - out: a results directory: stores and resumes like the CLI (a second call skips finished cells). None:
      a temporary one, removed afterwards (the adversarial examples, if kept, are returned as arrays).
    - preset: the budgets (`paper`: every test image, the papers' batch size); `sets` overrides its numbers
      as `--set` does.
    """
    from bench import data as data_mod, models, runner

    req = runner.Request(defense="as_is", attacks=attacks, threat=threat, preset=preset, seed=seed,
                         device=device, checks=checks, quiet=quiet, save_adversarial=save_adversarial,
                         attack_params={k: dict(v) for k, v in (attack_params or {}).items()},
                         sets=dict(sets or {}))
    req.arch = models.register_instance(model) if isinstance(model, torch.nn.Module) else _text(model, "model")
    if checkpoint is not None:
        req.base_checkpoints = {"pgd_at": str(checkpoint)}
    if normalize is not None:
        req.normalize = normalize
    req.dataset, req.data_dir = _dataset(data, data_dir, data_mod)
    req.command = f"bench.evaluate({_describe(model)}, {_describe(data)}, attacks={attacks!r}, threat={threat!r})"
    temporary = tempfile.TemporaryDirectory(prefix="bench-evaluate-") if out is None else None
    req.out = str(out) if out is not None else temporary.name
    logger = logging.getLogger("bench")
    level = logger.level
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        prep = runner.prepare(req)
        result = runner.execute(prep, quiet=quiet)
        return _report(prep, result, keep_out=out is not None)
    finally:
        logger.setLevel(level)  # the caller's logging is theirs
        if temporary is not None:
            temporary.cleanup()


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BenchError(f"{what} must be an nn.Module or a name, got {type(value).__name__}")
    return value


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.nn.Module):
        return type(obj).__name__ + "()"
    if isinstance(obj, tuple):
        return "(x, y)"
    return repr(str(obj))


def _dataset(data: Any, data_dir, data_mod) -> tuple[str, str | None]:
    """(dataset name, data_dir) for the run: a name as given, a folder or file by its reader, tensors
    registered in this process."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise BenchError(f"data as a tuple must be (x, y), got {len(data)} items")
        return data_mod.register_tensors(*data), None
    if isinstance(data, Path) or (isinstance(data, str) and ("/" in data or Path(data).exists())):
        path = Path(data)
        if data_dir is not None:
            raise BenchError("data is a path: data_dir is not needed")
        if path.is_dir():
            return "imagefolder", str(path)
        if path.suffix in (".npz", ".pt"):
            return "tensors", str(path)
        raise BenchError(f"data {path} is neither a folder of class folders nor an .npz/.pt file")
    return _text(data, "data"), None if data_dir is None else str(data_dir)


def _report(prep, result: dict, keep_out: bool) -> Report:
    from bench import runner
    from bench.stats import robust_cells, worst_case
    from bench.store import Store

    cfg = prep.config
    store = Store(cfg.out, create=False)
    try:
        cells = {c["attack"]: c for c in robust_cells(store.cells(cfg.run_id))}
    finally:
        store.close()
    flags = {label: c["flags"] for label, c in cells.items()}
    clean = flags.get(runner.CLEAN)
    for r in result["rows"]:
        if r["attack"] == WORST and r["n"]:
            attacked = [c for label, c in cells.items() if label != runner.CLEAN and c["threat"] == r["threat"]
                        and c["protocol"] == r["protocol"]]
            flags[f"worst:{r['threat']}"] = worst_case(clean, attacked, r["threat"], r["protocol"])
    adversarial = {}
    if cfg.save_adversarial:
        for r in result["rows"]:
            path = runner.adversarial_path(Path(cfg.out), cfg.run_id, r["attack"], r["protocol"])
            if path.is_file():
                if keep_out:
                    adversarial[r["attack"]] = path
                else:
                    adversarial[r["attack"]] = _adversarial_arrays(path)
    return Report(run_id=cfg.run_id, rows=result["rows"], flags=flags, checks=result["checks"],
                  failures=result["failures"], out=cfg.out if keep_out else None, adversarial=adversarial)


# what a cell's saved .npz holds for the Report: the images, labels, the attack's per-sample verdicts
# (`correct`) and the clean cell's (`clean_correct`), in the same order
ADVERSARIAL_KEYS = ("x_adv", "y", "correct", "clean_correct")


def _adversarial_arrays(path: Path) -> dict[str, np.ndarray]:
    """A cell's saved arrays (ADVERSARIAL_KEYS), read as every .npz is: headers checked, never a pickle."""
    from bench.readers import read_npz

    where = f"adversarial images {path}"
    arrays = read_npz(path, where)
    missing = [k for k in ADVERSARIAL_KEYS if k not in arrays]
    if missing:
        raise BenchError(f"{where} holds no {', '.join(missing)}; delete it and re-run to save it again")
    return {k: arrays[k] for k in ADVERSARIAL_KEYS}


__all__ = ["evaluate", "Report", "Accuracy"]
