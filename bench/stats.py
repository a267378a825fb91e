"""Honest statistics for accuracies measured on a finite test set.

- Wilson score interval for every accuracy (k correct of n).
- Exact (binomial) McNemar test for a paired difference: two defenses, or two attacks, on the same
  samples; only the discordant samples carry information.
- mean +- std over seeds.
- The worst case over a threat model's attacks, per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (Wilson 1927), as fractions. At k = 0 the lower bound is
    exactly 0 and at k = n the upper exactly 1 (the formula's centre - half cancels to rounding noise such as
    1.7e-18 there, which would print as such)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k <= 0 else max(0.0, centre - half)
    high = 1.0 if k >= n else min(1.0, centre + half)
    return (low, high)


def interval_text(low: float, high: float) -> str:
    """'[48.1, 56.5]': an interval of fractions in % as every table prints it."""
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def binom_two_sided_half(k: int, n: int) -> float:
    """Two-sided exact binomial p-value for k successes in n trials with p = 1/2."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    # sum_{i<=k} C(n,i) / 2^n, computed in log space so large n stays exact enough
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of two per-sample correctness vectors (a: the reference, b: the other)."""

    n: int
    a_only: int  # correct under a, wrong under b
    b_only: int  # wrong under a, correct under b
    delta: float  # accuracy(b) - accuracy(a), as a fraction
    p_value: float  # exact McNemar

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05


def mcnemar(a: np.ndarray, b: np.ndarray) -> Paired:
    """Exact McNemar test of b against a on the same samples."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same samples: {a.shape} vs {b.shape}")
    a_only = int((a & ~b).sum())
    b_only = int((~a & b).sum())
    n = int(a.size)
    delta = (b_only - a_only) / n if n else float("nan")
    return Paired(n, a_only, b_only, delta, binom_two_sided_half(a_only, a_only + b_only))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return (float("nan"), float("nan"))
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def robust_flags(clean: np.ndarray | None, attacked: np.ndarray) -> np.ndarray:
    """Per-sample robustness under one attack: right under the attack *and* on the clean image (the
    unperturbed image is inside every ball). A library attack on a batch-dependent defense can hand back a
    misclassified image unchanged that the rest of the perturbed batch then gets classified right; without
    the clean cell (a run whose clean cell is missing), the attack's own verdict."""
    return attacked if clean is None else attacked & clean


def robust_cells(cells: list[dict]) -> list[dict]:
    """One run's stored cells as accuracies: each attack cell's flags and count capped by the run's clean
    cell (robust_flags); what every reader of results (leaderboard, summary, report, checks) works on."""
    clean = next((c["flags"] for c in cells if c["attack"] == "clean"), None)
    out = []
    for c in cells:
        if c["attack"] != "clean":
            flags = robust_flags(clean, c["flags"])
            c = dict(c, flags=flags, correct=int(flags.sum()))
        out.append(c)
    return out


def worst_case(clean: np.ndarray | None, cells: Iterable[dict], threat: str,
               protocol: str | None = None) -> np.ndarray | None:
    """Per-sample correctness in the worst case over a threat model: a sample counts as robust only when
    it is classified right clean and under every attack cell (dict: threat, protocol, flags) of `threat`
    (under `protocol`, when given). None when no cell is of that threat model; without `clean` (a run whose
    clean cell is missing), over the attacks alone."""
    attacked = [c["flags"] for c in cells if c["threat"] == threat and (protocol is None or c["protocol"] == protocol)]
    if not attacked:
        return None
    flags = clean if clean is not None else True
    for f in attacked:
        flags = flags & f
    return flags
