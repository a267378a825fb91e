"""Plotting for leaderboards and report plugins: matplotlib (Agg) PNGs, readable without the text: named axes
with units, a legend entry for every mark, at most eight series per axes."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# eight hues a reader tells apart (no light/dark pairs of one hue), each series also gets its own marker and
# line style, so overlapping curves stay distinguishable in grey print too
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*"]
STYLES = ["-", "--", "-.", ":"]
MAX_SERIES = len(COLORS)  # per axes; more are split over several panels


def literal_text(draw):
    """Every label, title and legend entry `draw` writes shown as it is: names come from runs and plugins, and
    a '$' in one must not start matplotlib's math (a parse error would cost the leaderboard); a character no
    font has is drawn as a box without a warning per glyph."""
    @functools.wraps(draw)
    def wrapped(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
            return draw(*args, **kwargs)
    return wrapped


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def split_panels(panels: list[dict]) -> list[dict]:
    """Panels of at most MAX_SERIES series: a larger one becomes several, titled (1/2), (2/2)."""
    out = []
    for panel in panels:
        items = list(panel["series"].items())
        parts = [items[i:i + MAX_SERIES] for i in range(0, len(items), MAX_SERIES)] or [[]]
        for j, part in enumerate(parts):
            title = panel.get("title", "") + (f" ({j + 1}/{len(parts)})" if len(parts) > 1 else "")
            out.append({**panel, "series": dict(part), "title": title})
    return out


BAND_LABEL = "shaded: 95% interval"


@literal_text
def lines(path: Path, panels: list[dict], *, title: str = "", width: float = 5.0) -> Path:
    """Side-by-side panels; each {"title", "xlabel", "ylabel", "series": {label: (x, y) or (x, y, (low,
    high))}, optional "marks": {label: x}} draws each series with its own colour, marker and line style (its
    interval, where given, as a band of its colour), and each mark as a dashed vertical line; every one has a
    legend entry. A panel of more than MAX_SERIES series is split."""
    from matplotlib.patches import Patch

    panels = split_panels(panels)
    wide = max(len(p["series"]) for p in panels) > 4 or any(len(k) > 28 for p in panels for k in p["series"])
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + (2.4 if wide else 0), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        banded = False
        for i, (label, (x, y, *band)) in enumerate(panel["series"].items()):
            color = COLORS[i % len(COLORS)]
            ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], ms=5, lw=1.6, ls=STYLES[i % len(STYLES)],
                    color=color, label=label)
            if band:
                ax.fill_between(x, *band[0], color=color, alpha=0.15, lw=0)
                banded = True
        for label, x in panel.get("marks", {}).items():
            ax.axvline(x, ls=(0, (4, 3)), lw=1.2, color="black", label=label)
        handles = ax.get_legend_handles_labels()[0] + ([Patch(color="grey", alpha=0.3, label=BAND_LABEL)]
                                                       if banded else [])
        xs = [v for x, *_ in panel["series"].values() for v in x]
        if xs and all(float(v).is_integer() for v in xs):
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        if wide:
            ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(handles=handles, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path)


@literal_text
def bars(path: Path, labels: list[str], values: list[float], groups: list[str], marked: set[str], *,
         ylabel: str, title: str, xlabel: str = "", marked_label: str = "marked") -> Path:
    """Vertical bars coloured by group (e.g. conv / bn); marked ones outlined and starred, with a legend
    entry of their own."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import ScaledTranslation

    palette = {g: COLORS[i % len(COLORS)] for i, g in enumerate(dict.fromkeys(groups))}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(labels) + 2), 4.4))
    xs = np.arange(len(labels))
    for x, value, group, label in zip(xs, values, groups, labels):
        chosen = label in marked
        ax.bar(x, value, color=palette[group], edgecolor="black" if chosen else "none", lw=1.5 if chosen else 0)
        if chosen:  # the legend's own marker, just above the bar
            ax.plot([x], [value], ls="none", marker="*", ms=10, color="black", clip_on=False,
                    transform=ax.transData + ScaledTranslation(0, 7 / 72, fig.dpi_scale_trans))
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=c, label=g) for g, c in palette.items()]
    if marked & set(labels):
        handles.append(Line2D([], [], ls="none", marker="*", ms=10, mfc="black", mec="black", label=marked_label))
    ax.legend(handles=handles, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


@literal_text
def densities(path: Path, samples: dict[str, list[float]], *, xlabel: str, title: str) -> Path:
    """Gaussian kernel density estimates of several samples on one axis, each with its own colour and line
    style (curves that coincide stay visible as such)."""
    from scipy.stats import gaussian_kde

    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    values = [np.asarray(v, dtype=float) for v in samples.values()]
    low = min(float(np.percentile(v, 0.5)) for v in values)
    high = max(float(np.percentile(v, 99.5)) for v in values)
    grid = np.linspace(low, high, 300)
    for i, (label, v) in enumerate(zip(samples, values)):
        style = dict(color=COLORS[i % len(COLORS)], ls=STYLES[i % len(STYLES)])
        if np.ptp(v) == 0:
            ax.axvline(float(v[0]), label=f"{label} (all {v[0]:g})", **style)
            continue
        ax.plot(grid, gaussian_kde(v)(grid), lw=2.0, label=f"{label} (n={len(v)})", **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probability density")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def embed(path: Path, caption: str) -> list[str]:
    """Markdown lines that show the figure at `path` (written beside the leaderboard, under a safe name) with
    `caption`, plain text (escaped here, so a name in it is shown as it is)."""
    from bench.markdown_reader import escape

    return [f"![{escape(caption)}]({path.name})", ""]
