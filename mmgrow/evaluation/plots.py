"""Loss curves of a run from Lightning's ``CSVLogger`` ``metrics.csv`` (matplotlib, Agg canvas).

Lightning writes one row per logging call with columns ``epoch``, ``step`` and every metric name;
a row holds only the metrics logged at that call, so most cells are empty. matplotlib is imported
inside the functions (``import mmgrow`` stays light) and drawn on an explicit Agg canvas, never
through ``pyplot``, so plotting from a training process changes no global backend.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from mmgrow.evaluation.media import atomic_write

Series = dict[str, tuple[list[int], list[float]]]


def read_metrics(csv_path: str | os.PathLike, keys: Sequence[str]) -> Series:
    """``{key: (steps, values)}`` for the ``keys`` that are columns of the CSV, skipping empty cells.

    Keys that are not columns are left out; keys that are columns but never logged map to empty lists.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"metrics CSV not found: {csv_path}")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "step" not in columns:
            raise ValueError(f"{csv_path} has no 'step' column (columns: {columns}); expected a Lightning "
                             "CSVLogger metrics.csv")
        present = [k for k in keys if k in columns]
        series: Series = {k: ([], []) for k in present}
        for row in reader:
            step = row.get("step", "")
            if step in ("", None):
                continue
            for k in present:
                cell = row.get(k, "")
                if cell not in ("", None):
                    series[k][0].append(int(float(step)))
                    series[k][1].append(float(cell))
    return series


def plot_metrics(csv_path: str | os.PathLike, out_png: str | os.PathLike,
                 keys: Sequence[str] = ("train/loss", "val/loss"), *, log_y: bool = False) -> Series:
    """Draw ``keys`` against ``step`` from a Lightning ``metrics.csv`` into ``out_png`` (atomic write).

    Returns the plotted series (:func:`read_metrics`). Raises ``FileNotFoundError`` for a missing CSV
    and ``ValueError`` when none of ``keys`` has a logged value.
    """
    if isinstance(keys, str):
        keys = (keys,)
    series = {k: v for k, v in read_metrics(csv_path, keys).items() if v[0]}
    if not series:
        with Path(csv_path).open(newline="") as f:
            columns = next(csv.reader(f), [])
        raise ValueError(f"none of the keys {list(keys)} has values in {csv_path}; its columns are {columns}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, (steps, values) in series.items():
        # a metric logged a few times (validation) is invisible as a bare line: mark its points
        ax.plot(steps, values, label=key, marker="o" if len(steps) <= 50 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(series) if len(series) == 1 else "value")
    if log_y and all(v > 0 for _, vals in series.values() for v in vals if math.isfinite(v)):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda f: fig.savefig(f, format="png"))
    return series
