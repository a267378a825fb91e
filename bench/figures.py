"""Plotting for leaderboards and report plugins: matplotlib (Agg) PNGs, small and readable."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines(path: Path, panels: list[dict], *, title: str = "", width: float = 5.0) -> Path:
    """One or more side-by-side panels; each {"title", "xlabel", "ylabel", "series": {label: (x, y)},
    optional "marks": {label: x}} draws lines with markers (and dashed vertical marks, in the legend).
    Many series get a legend outside the axes and a 20-colour palette with varied markers."""
    many = max(len(p["series"]) for p in panels) > 6
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + (2.6 if many else 0), 3.6), squeeze=False)
    palette = plt.get_cmap("tab20").colors if many else COLORS
    markers = "osD^v<>pX*"
    for ax, panel in zip(axes[0], panels):
        for i, (label, (x, y)) in enumerate(panel["series"].items()):
            ax.plot(x, y, marker=markers[i % len(markers)] if many else "o", ms=3.5, lw=1.6,
                    color=palette[i % len(palette)], label=label)
        for label, x in panel.get("marks", {}).items():
            ax.axvline(x, ls="--", lw=1, color="grey", label=label)
        xs = [v for x, _ in panel["series"].values() for v in x]
        if xs and all(float(v).is_integer() for v in xs):
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if many:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path)


def bars(path: Path, labels: list[str], values: list[float], groups: list[str], marked: set[str], *,
         ylabel: str, title: str) -> Path:
    """Vertical bars coloured by group (e.g. conv / bn), marked ones outlined and starred."""
    palette = {g: COLORS[i % len(COLORS)] for i, g in enumerate(dict.fromkeys(groups))}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(labels) + 2), 4.2))
    xs = np.arange(len(labels))
    for x, value, group, label in zip(xs, values, groups, labels):
        chosen = label in marked
        ax.bar(x, value, color=palette[group], edgecolor="black" if chosen else "none", lw=1.5 if chosen else 0)
        if chosen:
            ax.annotate("*", (x, value), ha="center", va="bottom", fontsize=14)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    ax.legend(handles, list(palette), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def densities(path: Path, samples: dict[str, list[float]], *, xlabel: str, title: str) -> Path:
    """Gaussian kernel density estimates of several samples on one axis."""
    from scipy.stats import gaussian_kde

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    values = [np.asarray(v, dtype=float) for v in samples.values()]
    low = min(float(np.percentile(v, 0.5)) for v in values)
    high = max(float(np.percentile(v, 99.5)) for v in values)
    grid = np.linspace(low, high, 300)
    for i, (label, v) in enumerate(zip(samples, values)):
        if np.ptp(v) == 0:
            ax.axvline(float(v[0]), color=COLORS[i % len(COLORS)], label=label)
            continue
        ax.plot(grid, gaussian_kde(v)(grid), lw=1.8, color=COLORS[i % len(COLORS)], label=f"{label} (n={len(v)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def embed(path: Path, caption: str) -> list[str]:
    """Markdown lines that show the figure at `path` (written beside the leaderboard) with `caption`."""
    return [f"![{caption}]({path.name})", ""]
