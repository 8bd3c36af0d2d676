"""Plots as inline SVG strings (matplotlib, Agg backend): line curves, grouped bars and heatmaps.

Output is deterministic for the same input and matplotlib version: a fixed `svg.hashsalt` (element ids), no date
in the metadata, text kept as SVG text (`svg.fonttype: none`) so the page is small and searchable. Each figure is
wrapped in <figure class="plot" data-series="N" data-points="M"> so a browser test can check that it has data.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

RC = {"svg.hashsalt": "patchlm-report", "svg.fonttype": "none", "font.size": 9, "axes.grid": True,
      "grid.alpha": 0.3, "figure.dpi": 72, "axes.spines.top": False, "axes.spines.right": False}
METADATA = {"Date": None, "Creator": "patchlm report"}
_XML_HEAD = re.compile(r"^.*?(?=<svg)", re.S)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_WIDTH = 6.4
_HEIGHT = 3.2


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _svg(fig, title: str, series: int, points: int) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=METADATA, bbox_inches="tight")
    plt.close(fig)
    svg = _METADATA.sub("", _XML_HEAD.sub("", buf.getvalue(), count=1), count=1)  # RDF namespaces, no use inline
    return (f'<figure class="plot" data-series="{series}" data-points="{points}">{svg}'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def line_plot(series: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str = "step",
              ylabel: str = "", logy: bool = False) -> str | None:
    """One line per named series of (x, y) points; None when no series has a finite point."""
    clean = {name: [(x, y) for x, y in pts if _finite(x) and _finite(y)] for name, pts in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return None
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(_WIDTH, _HEIGHT))
        for name, pts in clean.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, linewidth=1.4, label=name)
        if logy and all(y > 0 for pts in clean.values() for _, y in pts):
            ax.set_yscale("log")
        if all(float(x).is_integer() for pts in clean.values() for x, _ in pts):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole numbers
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if len(clean) > 1 or next(iter(clean)) != ylabel:
            ax.legend(fontsize=7, loc="best")
        return _svg(fig, title, len(clean), sum(len(v) for v in clean.values()))


def bar_plot(groups: Sequence[str], series: dict[str, Sequence[float | None]], title: str, ylabel: str = "",
             highlight: Sequence[int] = ()) -> str | None:
    """Grouped bars: one group per label in `groups`, one bar per named series (None/NaN: no bar).

    highlight: group indices drawn hatched (e.g. the layers a drop plan removes)."""
    names = [n for n, vals in series.items() if any(_finite(v) for v in vals)]
    if not groups or not names:
        return None
    n = len(names)
    width = 0.8 / n
    points = 0
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(max(_WIDTH, 0.35 * len(groups) * max(1, n / 2)), _HEIGHT))
        for k, name in enumerate(names):
            vals = list(series[name])
            xs = [i + (k - (n - 1) / 2) * width for i, v in enumerate(vals) if _finite(v)]
            ys = [v for v in vals if _finite(v)]
            bars = ax.bar(xs, ys, width=width * 0.95, label=name)
            points += len(ys)
            hl = set(highlight)
            for bar, i in zip(bars, [i for i, v in enumerate(vals) if _finite(v)]):
                if i in hl:
                    bar.set_hatch("///")
                    bar.set_edgecolor("black")
        ax.set_xticks(range(len(groups)))
        rotate = max(len(str(g)) for g in groups) > 6 or len(groups) > 12
        ax.set_xticklabels([str(g) for g in groups], rotation=60 if rotate else 0, ha="right" if rotate else "center",
                           fontsize=7)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if n > 1:
            ax.legend(fontsize=7, loc="best")
        return _svg(fig, title, n, points)


def heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str) -> str | None:
    """A square matrix (e.g. pairwise similarity of merge members) with its values written in the cells."""
    if not matrix or not labels or any(len(row) != len(matrix) for row in matrix):
        return None
    vals = [[float(v) if _finite(v) else float("nan") for v in row] for row in matrix]
    with plt.rc_context({**RC, "axes.grid": False}):
        size = max(3.2, 0.7 * len(labels) + 1.5)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        im = ax.imshow(vals, cmap="viridis")
        ax.set_xticks(range(len(labels)))
        ax.set_yticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
        for i, row in enumerate(vals):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.4g}", ha="center", va="center", fontsize=6, color="white")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title)
        return _svg(fig, title, 1, len(vals) * len(vals))
