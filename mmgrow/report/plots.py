"""The report's PNGs (matplotlib imported lazily, drawn on an explicit Agg canvas, written atomically).

Every function returns what it drew, so callers and tests can check the picture's content:
loss curves return their :class:`~mmgrow.report.curves.Curve` objects and the x-axis caption, bar charts
the ``{group: (mean, std)}`` bars.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mmgrow.evaluation.media import atomic_write
from mmgrow.report.aggregate import Stat
from mmgrow.report.collect import RunRecord
from mmgrow.report.curves import AXES, Curve, group_curve

LOSSES = ("train/loss", "val/loss")
MAX_PANELS = 24  # metrics.png: more panels than this are unreadable; the rest are named in the caption

_FALLBACK_TEXT = {"tokens": "(step + 1) × tokens_seen / global_step from summary.json (constant tokens per step)",
                  "time": "(step + 1) × wall_seconds / global_step from summary.json (constant time per step)"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")  # room for outside legends and labels
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: Path) -> None:
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))


def x_caption(axis: str, sources: set[str]) -> str:
    """Which x the curves used: the CSV column, the summary fallback, or both (for different runs)."""
    column = AXES[axis][0]
    texts = [f"`{column}` logged by the run" if s == column else _FALLBACK_TEXT[axis] for s in sorted(sources)]
    if not texts:
        return "no run had points to draw"
    return texts[0] if len(texts) == 1 else "mixed: " + "; ".join(texts) + " (different runs)"


def plot_losses(groups: dict[str, list[RunRecord]], axis: str, out_png: Path) -> dict[str, Any]:
    """Train and val loss per group against ``axis`` ("tokens" or "time"): the mean over seeds as a line (train
    solid, val dashed with markers) and the min-max over seeds as a band. Returns ``{"curves", "caption"}``."""
    rows_per_column = 28  # legend entries (one per group) per legend column, outside the axes on the right
    legend_columns = max(1, math.ceil((len(groups) + 2) / rows_per_column))
    fig = _figure(7.5 + 2.5 * legend_columns, 4.5 + (2.5 if len(groups) > 12 else 0.0))
    ax = fig.add_subplot()
    curves: list[Curve] = []
    sources: set[str] = set()
    colours = _colours(len(groups))
    for colour, (group, runs) in zip(colours, groups.items()):
        for metric in LOSSES:
            curve, used = group_curve(group, runs, metric, axis)
            if not curve.x:
                continue
            sources |= used
            curves.append(curve)
            val = metric.startswith("val")
            first = not any(c.group == group for c in curves[:-1])  # one legend entry per group (its colour)
            ax.plot(curve.x, curve.mean, color=colour, linestyle="--" if val else "-",
                    marker="o" if val else None, markersize=3, label=group if first else None)
            if curve.runs > 1:
                ax.fill_between(curve.x, curve.low, curve.high, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("tokens" if axis == "tokens" else "wall time (s)")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.plot([], [], color="black", linestyle="-", label="train loss (solid)")
        ax.plot([], [], color="black", linestyle="--", marker="o", markersize=3, label="val loss (dashed)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=legend_columns, frameon=False)
    else:
        ax.text(0.5, 0.5, "no loss curves (no metrics.csv with train/loss or val/loss)", ha="center",
                transform=ax.transAxes)
    _save(fig, out_png)
    return {"curves": curves, "caption": x_caption(axis, sources)}


def plot_bars(stats: dict[str, Stat], ylabel: str, out_png: Path) -> dict[str, tuple[float, float]]:
    """One bar per group (mean over seeds) with the sample std as an error bar; groups without a value are left
    out. Returns ``{group: (mean, std)}`` (std 0 for one seed)."""
    bars = {g: (s.mean, s.std or 0.0) for g, s in stats.items() if s.mean is not None and math.isfinite(s.mean)}
    fig = _figure(min(20.0, max(4.0, 1.0 + 0.6 * len(bars))), 4.5)
    ax = fig.add_subplot()
    _draw_bars(ax, bars)
    ax.set_ylabel(ylabel)
    _save(fig, out_png)
    return bars


def plot_panels(columns: dict[str, dict[str, Stat]], out_png: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """One panel of bars per column (``{column: {group: Stat}}``), at most :data:`MAX_PANELS`. Returns the
    bars of each panel drawn."""
    drawn = {}
    for column, stats in columns.items():
        bars = {g: (s.mean, s.std or 0.0) for g, s in stats.items() if s.mean is not None and math.isfinite(s.mean)}
        if bars:
            drawn[column] = bars
        if len(drawn) == MAX_PANELS:
            break
    n = max(1, len(drawn))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = _figure(4.0 * cols, 3.2 * rows)
    for i, (column, bars) in enumerate(drawn.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw_bars(ax, bars)
        ax.set_title(column, fontsize=8)
    _save(fig, out_png)
    return drawn


def _draw_bars(ax, bars: dict[str, tuple[float, float]]) -> None:
    names = list(bars)
    colours = _colours(len(names))
    ax.bar(range(len(names)), [bars[n][0] for n in names], yerr=[bars[n][1] for n in names], capsize=4,
           color=colours)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
