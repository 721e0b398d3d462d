"""Markdown tables of the report: one row per group (mean ± spread over seeds) and one row per run."""

from __future__ import annotations

from collections.abc import Sequence

from mmgrow.report.aggregate import MISSING, Stat, format_number, format_stat
from mmgrow.report.metrics import FIXED


def header(column: str) -> str:
    """A fixed column's short label, an evaluation column's dotted key."""
    return FIXED[column].label if column in FIXED else column


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def group_table(groups: dict[str, dict], columns: Sequence[str]) -> str:
    """``groups``: name -> ``{"n": int, "not_averaged": str, "stats": {column: Stat}}``."""
    head = ["variant", "n", "not averaged", *(header(c) for c in columns)]
    rows = [[name, str(g["n"]), g["not_averaged"] or "",
             *(format_stat(g["stats"].get(c, Stat(None, None, 0))) for c in columns)] for name, g in groups.items()]
    return markdown(head, rows)


def run_table(runs: Sequence[dict], columns: Sequence[str]) -> str:
    """``runs``: ``{"name", "group", "seed", "status", "device", "values": {column: float}}`` each."""
    head = ["run", "variant", "seed", "status", "device", *(header(c) for c in columns)]
    rows = [[r["name"], r["group"], MISSING if r["seed"] is None else str(r["seed"]), r["status"],
             r.get("device") or MISSING, *(format_number(r["values"].get(c)) for c in columns)] for r in runs]
    return markdown(head, rows)
