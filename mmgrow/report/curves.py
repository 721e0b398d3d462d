"""Loss curves of a group of runs against tokens or wall time, averaged over seeds.

Each run's ``metrics.csv`` (Lightning's CSV logger: one row per logging call, blank cells for metrics not logged
that row) gives ``(step, loss)`` points. The x axis of a point:

* **tokens**: the row's ``perf/tokens_seen`` when the CSV has that column (a row without it, a validation row,
  is interpolated linearly in step between the rows that have it), else ``(step + 1) * tokens_seen /
  global_step`` from ``summary.json`` (a constant number of tokens per optimizer step);
* **time**: ``perf/elapsed_s`` likewise, else ``(step + 1) * wall_seconds / global_step``.

Lightning's CSV ``step`` counts from 0: the row logged after the first optimizer step has ``step`` 0, and the
validation after ``global_step`` updates is logged at ``step = global_step - 1``; hence ``step + 1`` above.

Seeds of a group are aligned by **step** (same recipe, same schedule): at every step that at least one seed
logged, the curve holds the mean x, the mean loss and the min and max loss over the seeds that logged it.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmgrow.report.collect import RunRecord

AXES = {"tokens": ("perf/tokens_seen", "tokens_seen"), "time": ("perf/elapsed_s", "wall_seconds")}
"""axis -> (metrics.csv column, summary.json total used by the fallback)."""


@dataclass
class Curve:
    """One metric of one group: ``x``, ``mean`` loss, ``low``/``high`` (min/max over seeds) per aligned step."""

    group: str
    metric: str
    steps: list[int] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    runs: int = 0


def read_csv_columns(path: Path) -> dict[str, list[float | None]]:
    """``{column: [value or None per row]}`` of a metrics.csv (rows without a step are dropped). Cached per file
    version (path, size, mtime): each plot reads every run's CSV for two metrics."""
    stat = path.stat()
    return _read_csv_columns(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_csv_columns(path: str, size: int, mtime_ns: int) -> dict[str, list[float | None]]:
    with Path(path).open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step") not in ("", None)]
    columns = list(rows[0]) if rows else []
    return {c: [None if r.get(c) in ("", None) else float(r[c]) for r in rows] for c in columns}


def run_points(run: RunRecord, metric: str, axis: str) -> tuple[list[tuple[int, float, float]], str | None]:
    """``([(step, x, loss)...], source)`` of one run; ``source`` is the CSV column or ``"fallback"``, None when
    the run has no such points (no CSV, no column, or no way to place them on the axis)."""
    path = run.path / "metrics.csv"
    if not path.is_file():
        return [], None
    cols = read_csv_columns(path)
    if metric not in cols:
        return [], None
    column, total_key = AXES[axis]
    steps = np.array(cols["step"], dtype=float)
    logged = [(int(s), v) for s, v in zip(steps, cols[metric]) if v is not None]
    known = [(s, v) for s, v in zip(steps, cols.get(column, [])) if v is not None]
    if known:
        ks, kv = np.array(known).T
        order = np.argsort(ks, kind="stable")
        xs = np.interp([s for s, _ in logged], ks[order], kv[order])
        return [(s, float(x), v) for (s, v), x in zip(logged, xs)], column
    total, global_step = run.summary.get(total_key), run.summary.get("global_step")
    if not isinstance(total, (int, float)) or not isinstance(global_step, (int, float)) or global_step <= 0:
        return [], None
    return [(s, (s + 1) * total / global_step, v) for s, v in logged], "fallback"


def group_curve(group: str, runs: list[RunRecord], metric: str, axis: str) -> tuple[Curve, set[str]]:
    """The seed-averaged :class:`Curve` of ``runs`` and the x sources used (see :func:`run_points`)."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    sources: set[str] = set()
    used = 0
    for run in runs:
        points, source = run_points(run, metric, axis)
        if not points:
            continue
        used += 1
        sources.add(source)
        for step, x, y in points:
            by_step.setdefault(step, []).append((x, y))
    curve = Curve(group, metric, runs=used)
    for step in sorted(by_step):
        xs, ys = zip(*by_step[step])
        curve.steps.append(step)
        curve.x.append(float(np.mean(xs)))
        curve.mean.append(float(np.mean(ys)))
        curve.low.append(float(min(ys)))
        curve.high.append(float(max(ys)))
    return curve, sources
