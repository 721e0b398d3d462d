"""Find run directories below the given paths and read what each one recorded.

A **run directory** holds ``summary.json`` (``mmgrow fit`` wrote it at the end) or ``config.yaml`` together with
``metrics.csv`` (a run that started but has not finished). Directories below a run's ``eval/`` (records of
``mmgrow validate/test/evaluate``) and directories nested inside another run are not runs of their own.

**Status** of a run: ``complete`` or ``diverged`` (``summary.json`` ``status``; a ``manifest.json`` saying
``diverged`` wins), ``partial`` (no ``summary.json``: still running, interrupted or crashed), or
``unreadable: <why>`` (``summary.json`` that is not a JSON object).

**Group** (the table's row): the ``variant`` of ``ablation_run.json`` (written by ``mmgrow ablate``) when the run
has one, else the run's own path relative to the common root of all runs found. **Seed**: ``ablation_run.json``
``seed``, else ``config.yaml`` ``seed_everything`` (None when neither says).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ABLATION_RECORD = "ablation_run.json"
SUMMARY = "summary.json"


@dataclass
class RunRecord:
    """One run directory as read from disk (nothing computed yet)."""

    path: Path
    name: str = ""  # path relative to the common root of all runs
    group: str = ""
    seed: int | None = None
    status: str = "partial"
    summary: dict[str, Any] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def is_run_dir(path: Path) -> bool:
    return (path / SUMMARY).is_file() or ((path / "config.yaml").is_file() and (path / "metrics.csv").is_file())


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories at or below ``root`` (sorted), leaving out ``eval/`` records and runs nested in runs."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"report: {root} does not exist; expected a run directory or a directory of them")
    if not root.is_dir():
        raise NotADirectoryError(f"report: {root} is a file; expected a run directory or a directory of them")
    if is_run_dir(root):
        return [root]
    candidates = {p.parent for name in (SUMMARY, "metrics.csv") for p in root.rglob(name)}
    runs = sorted(c for c in candidates if is_run_dir(c) and "eval" not in c.relative_to(root).parts)
    kept: list[Path] = []
    for run in runs:  # sorted: a parent comes before the directories inside it
        if not any(k in run.parents for k in kept):
            kept.append(run)
    return kept


def collect_runs(dirs: list[str | os.PathLike]) -> list[RunRecord]:
    """Every run below ``dirs`` with its status, group and seed. Raises when a path is missing or none holds runs."""
    if not dirs:
        raise ValueError("report: no directory given; expected one or more run directories or directories of them")
    resolved: list[Path] = []
    for d in dirs:
        runs = find_run_dirs(Path(d))
        if not runs:
            raise ValueError(f"report: no runs found below {d} (no directory with summary.json, or with config.yaml "
                             "and metrics.csv)")
        # a run reached through two DIRs (or a symlink) is reported once
        resolved.extend(r for r in (p.resolve() for p in runs) if r not in resolved)
    root = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    records = [read_run(path, root) for path in resolved]
    return records


def read_run(path: Path, root: Path) -> RunRecord:
    """The :class:`RunRecord` of one run directory; ``root`` names it (its path relative to ``root``)."""
    rel = path.relative_to(root) if path != root else Path(path.name)
    record = RunRecord(path=path, name=str(rel) if str(rel) != "." else path.name)
    record.ablation = _read_ablation(path)
    record.status, record.summary = _read_status(path)
    record.group = str(record.ablation["variant"]) if record.ablation else record.name
    record.seed = _seed(path, record.ablation)
    return record


def _read_ablation(path: Path) -> dict[str, Any] | None:
    file = path / ABLATION_RECORD
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # an unreadable record: the run is grouped by its path instead
    return value if isinstance(value, dict) and value.get("variant") is not None else None


def _read_status(path: Path) -> tuple[str, dict[str, Any]]:
    file = path / SUMMARY
    if not file.is_file():
        return "partial", {}
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable: {' '.join(str(exc).split())}", {}
    if not isinstance(summary, dict):
        return f"unreadable: summary.json holds a {type(summary).__name__}, not an object", {}
    status = str(summary.get("status") or "complete")
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("status") == "diverged":
                status = "diverged"
        except (OSError, ValueError, AttributeError):
            pass  # the summary decides; a broken manifest does not hide the run
    return status, summary


def _seed(path: Path, ablation: dict[str, Any] | None) -> int | None:
    if ablation is not None and ablation.get("seed") is not None:
        return int(ablation["seed"])
    config = path / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        value = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("seed_everything")
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
