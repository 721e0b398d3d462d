"""Assemble and write the report: ``OUT/report.md``, ``OUT/report.json`` (same numbers) and ``OUT/report/*.png``.

Decisions:

* Only **complete** runs are averaged. Diverged, partial (no ``summary.json``) and unreadable runs appear in the
  per-run table with their status and are counted in the group's "not averaged" cell; a group with no complete
  run shows ``—`` everywhere. Plots and the Elo use complete runs only.
* A column appears when at least one run has it; ``--metrics`` patterns (``fnmatch``, e.g. ``heldout.probe.*``)
  restrict the columns, and a pattern that matches no column is an error naming the available ones.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Any

from mmgrow.report.aggregate import mean_spread
from mmgrow.report.collect import RunRecord, collect_runs
from mmgrow.report.metrics import FIXED, run_values

PLOTS_DIR = "report"
DEFINITION = ("Each cell is mean ± s over the n complete runs (seeds) of the variant, s the sample standard "
              "deviation sqrt(Σ(x − mean)² / (n − 1)) to 2 significant digits; with n = 1 the value alone. "
              "Diverged, partial (no summary.json) and unreadable runs are not averaged: they are counted under "
              "\"not averaged\" and listed in the per-run table. — = not recorded.")


def select_columns(available: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    if not patterns:
        return list(available)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(c, p) for c in available):
            raise ValueError(f"--metrics {p!r} matches no column; the runs have: {', '.join(available)}")
    return [c for c in available if any(fnmatch.fnmatchcase(c, p) for p in patterns)]


def build(dirs: Sequence[str | os.PathLike], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """The report's content: ``columns`` (selected), ``available`` (all), ``groups`` (name -> n, not_averaged,
    runs, seeds, stats of every available column), ``runs`` (one dict per run with its values of the selected
    columns) and ``_records`` (group -> :class:`RunRecord` list, not serialised)."""
    runs = collect_runs(list(dirs))
    values = {r.path: run_values(r) if r.summary else {} for r in runs}
    present = {c for v in values.values() for c in v}
    available = [c for c in FIXED if c in present] + sorted(present - set(FIXED))
    columns = select_columns(available, metrics)
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    group_rows = {}
    for name, members in groups.items():
        done = [r for r in members if r.complete]
        left = _count_statuses([r for r in members if not r.complete])
        group_rows[name] = {
            "n": len(done), "not_averaged": left, "runs": [r.name for r in members],
            "seeds": [r.seed for r in done],
            "stats": {c: mean_spread([values[r.path][c] for r in done if c in values[r.path]]) for c in available}}
    run_rows = [{"name": r.name, "path": str(r.path), "group": r.group, "seed": r.seed, "status": r.status,
                 "device": r.summary.get("device"), "values": {c: values[r.path][c] for c in columns
                                                               if c in values[r.path]}} for r in runs]
    return {"sources": [str(d) for d in dirs], "definition": DEFINITION, "columns": columns, "available": available,
            "groups": group_rows, "runs": run_rows, "_records": groups}


def _count_statuses(runs: list[RunRecord]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        kind = "unreadable" if r.status.startswith("unreadable") else r.status
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())
