"""Runs in: a directory tree of run directories, or a CSV / JSONL table with one run per row.

Columns, all in plain units: ``params`` (N, non-embedding parameters), ``tokens`` (T, training tokens),
``lr`` (peak learning rate), ``batch_size`` (tokens per optimiser step), ``loss`` (final validation loss);
optional ``flops`` and ``name``. ``lr`` and ``batch_size`` go together: a table without them fits the loss
law only.

A **run directory** is any directory below RUNS holding ``summary.json`` (``mmgrow fit`` writes it): params =
``non_embedding_parameters``, tokens = ``tokens_seen``, lr = ``lr``, batch_size = ``batch_size_tokens``,
loss = ``final_val_loss``, flops = ``flops``. A sweep run also holds ``scaling.json`` whose ``budgets`` turn it
into one row per budget, the loss read from the ``val_history`` entry at exactly that many tokens (with a
constant learning rate that *is* the loss of a run of that budget). Kept out, each with a reason in
``excluded``: diverged runs (their diagnosis), directories with ``config.yaml`` or ``scaling.json`` but no
``summary.json`` (unfinished: resume them), budgets a run never validated at, non-finite losses.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmgrow.checks import read_optional_json
from mmgrow.scaling.units import UnitMismatchError, Units

REQUIRED = ("params", "tokens", "loss")
HYPERPARAMETERS = ("lr", "batch_size")
OPTIONAL = ("flops", "name")
COLUMNS = ("params", "tokens", "lr", "batch_size", "loss")


@dataclass
class RunTable:
    """One row per (run, budget). ``lr`` / ``batch_size`` are None for a loss-only table."""

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    lr: np.ndarray | None = None
    batch_size: np.ndarray | None = None
    flops: np.ndarray | None = None
    names: list[str] = field(default_factory=list)
    units: Units = field(default_factory=Units)
    excluded: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def has_hyperparameters(self) -> bool:
        return self.lr is not None and self.batch_size is not None

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, mask: np.ndarray) -> RunTable:
        """The rows a boolean mask or an index array selects (names follow the same rows)."""
        mask = np.asarray(mask)
        rows = np.flatnonzero(mask) if mask.dtype == bool else mask.astype(int)
        pick = (lambda a: None if a is None else a[rows])
        return RunTable(self.params[rows], self.tokens[rows], self.loss[rows], pick(self.lr), pick(self.batch_size),
                        pick(self.flops), [self.names[i] for i in rows], self.units, self.excluded,
                        self.warnings, self.source)


def load_runs(path: str | Path) -> RunTable:
    """The table of the module docstring from a directory tree, a ``.csv`` or a ``.jsonl`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"runs not found: {path} (expected a directory of run directories, a .csv or a .jsonl)")
    if path.is_dir():
        rows, excluded, schedules = _rows_from_tree(path)
        units = Units(lr_schedule=_one_schedule(schedules, excluded))
        return _build(rows, str(path), units, excluded, source_kind="run directories")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _build(_rows_from_csv(path), str(path), Units(), [], source_kind="rows")
    if suffix in (".jsonl", ".ndjson"):
        return _build(_rows_from_jsonl(path), str(path), Units(), [], source_kind="rows")
    raise ValueError(f"{path}: unknown table format {suffix!r}; expected a directory, .csv or .jsonl")


# ------------------------------------------------------------------ directory trees
def _rows_from_tree(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[str]]:
    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    schedules: list[str] = []
    summaries = sorted(root.rglob("summary.json"))
    summarised = {p.parent for p in summaries}
    for run in sorted({m.parent for m in (*root.rglob("config.yaml"), *root.rglob("scaling.json"))}):
        if run not in summarised and not any(parent in summarised for parent in run.parents) \
                and "eval" not in run.relative_to(root).parts:
            excluded.append({"run": _label(root, run), "reason": "incomplete: no summary.json (resume it)"})
    for summary_path in summaries:
        run = summary_path.parent
        if "eval" in run.relative_to(root).parts:  # validate/test records inside a run
            continue
        name = _label(root, run)
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            excluded.append({"run": name, "reason": f"unreadable summary.json ({exc})"})
            continue
        if summary.get("status") == "diverged":
            excluded.append({"run": name, "reason": f"{_diagnosis(summary.get('diverged') or {})}; kept out of the fits"})
            continue
        missing = [k for k in ("non_embedding_parameters", "tokens_seen", "final_val_loss") if summary.get(k) is None]
        if missing:
            excluded.append({"run": name, "reason": f"summary.json lacks {', '.join(missing)} (a run from before "
                                                    "mmgrow recorded them, or one without validation)"})
            continue
        schedules.append(str((summary.get("lr_schedule") or {}).get("kind", "unknown")))
        base = {"params": summary["non_embedding_parameters"], "lr": summary.get("lr"),
                "batch_size": summary.get("batch_size_tokens")}
        per_token = summary.get("flops_per_token")
        record = _read_scaling_record(run)
        if record is None or not record.get("budgets"):
            rows.append({**base, "name": name, "tokens": summary["tokens_seen"], "loss": summary["final_val_loss"],
                         "flops": summary.get("flops")})
            continue
        history = {int(h["tokens"]): h.get("loss") for h in summary.get("val_history") or [] if "tokens" in h}
        for budget in record["budgets"]:
            label = f"{name}@{budget}"
            if int(budget) not in history:
                excluded.append({"run": label, "reason": f"never validated at {budget} tokens (validated at "
                                                         f"{sorted(history)})"})
                continue
            rows.append({**base, "name": label, "tokens": int(budget), "loss": history[int(budget)],
                         "flops": None if per_token is None else per_token * int(budget)})
    if not rows and not excluded:
        raise ValueError(f"{root}: no runs found (no summary.json below it); point at a sweep's runs/ directory or "
                         "give a .csv / .jsonl table")
    return rows, excluded, schedules


def _diagnosis(d: dict[str, Any]) -> str:
    """The divergence guard's record (mmgrow.training.divergence.Divergence.record) in words."""
    if d.get("value") is None and d.get("parameter"):  # a non-finite gradient carries no loss value
        return f"diverged at step {d.get('step')} (gradient of {d['parameter']} is non-finite)"
    return f"diverged at step {d.get('step')} ({d.get('loss_name')} = {d.get('value')})"


def _label(root: Path, run: Path) -> str:
    rel = run.relative_to(root)
    return str(rel) if str(rel) != "." else run.name


def _read_scaling_record(run: Path) -> dict[str, Any] | None:
    record = read_optional_json(run / "scaling.json", "it is written by `mmgrow scaling sweep`; rerun the sweep")
    return record if isinstance(record, dict) else None


def _one_schedule(schedules: list[str], excluded: list) -> str:
    kinds = sorted(set(schedules))
    if len(kinds) == 1:
        return kinds[0]
    return "mixed" if kinds else "unknown"


# ------------------------------------------------------------------ files
_EXTRA = "\0extra"  # DictReader key for values beyond the header


def _rows_from_csv(path: Path) -> list[dict[str, Any]]:
    # utf-8-sig: spreadsheets ("CSV UTF-8") start the file with a byte-order mark that would glue onto "params".
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, restkey=_EXTRA)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty file; expected a header with columns {', '.join(COLUMNS)}")
        header = [h.strip() for h in reader.fieldnames]
        _check_header(path, header)
        rows = []
        for row in reader:
            if _EXTRA in row:  # more values than header columns: a shifted row would be read wrongly
                raise ValueError(f"{path}: line {reader.line_num} has {len(header) + len(row[_EXTRA])} values for "
                                 f"{len(header)} header columns ({', '.join(header)})")
            rows.append({k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()})
        return rows


def _rows_from_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise TypeError(f"{path}: line {i + 1} must be a JSON object with keys {', '.join(COLUMNS)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows; expected one JSON object per line with keys {', '.join(COLUMNS)}")
    keys = set().union(*rows)
    _check_header(path, sorted(keys))
    return rows


def _check_header(path: Path, header: list[str]) -> None:
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {', '.join(REQUIRED)} (+ lr and batch_size "
                         f"for hyperparameter laws; optional flops, name), got {header}")
    present = [c for c in HYPERPARAMETERS if c in header]
    if len(present) == 1:
        raise ValueError(f"{path}: has {present[0]!r} but not {({'lr', 'batch_size'} - set(present)).pop()!r}; give "
                         "both (hyperparameter laws) or neither (loss law only)")
    unknown = [c for c in header if c not in COLUMNS + OPTIONAL]
    if unknown:
        raise ValueError(f"{path}: unknown column(s) {unknown}; expected {', '.join(COLUMNS + OPTIONAL)}")


# ------------------------------------------------------------------ assembling
def _number(source: str, name: str, column: str, value: Any, required: bool) -> float:
    if value is None or value == "":
        if required:
            raise ValueError(f"{source}: {name}: column {column!r} is empty")
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name}: column {column!r} is {value!r}, not a number") from None


def _build(rows: list[dict[str, Any]], source: str, units: Units, excluded: list[dict[str, str]],
           source_kind: str) -> RunTable:
    warnings: list[str] = []
    kept: list[dict[str, float]] = []
    names: list[str] = []
    with_lr = [r for r in rows if r.get("lr") not in (None, "")]
    hyper = bool(with_lr)
    if hyper and len(with_lr) < len(rows):
        bad = next(r for r in rows if r.get("lr") in (None, ""))
        raise ValueError(f"{source}: {bad.get('name', 'a row')} has no lr/batch_size while others have them; give "
                         "them for every row (hyperparameter laws) or for none (loss law only)")
    for i, row in enumerate(rows):
        name = str(row.get("name") or f"row {i}")
        values = {c: _number(source, name, c, row.get(c), required=c in REQUIRED or (hyper and c in HYPERPARAMETERS))
                  for c in (*REQUIRED, *HYPERPARAMETERS, "flops")}
        if not math.isfinite(values["loss"]) or values["loss"] <= 0:
            excluded.append({"run": name, "reason": f"loss is {values['loss']!r}; kept out of the fits"})
            continue
        for c in ("params", "tokens", *(HYPERPARAMETERS if hyper else ())):
            if not math.isfinite(values[c]) or values[c] <= 0:
                raise ValueError(f"{source}: {name}: column {c!r} is {values[c]!r}; expected a positive number in "
                                 "plain units")
        kept.append(values)
        names.append(name)
    if not kept:
        reasons = "; ".join(f"{e['run']}: {e['reason']}" for e in excluded[:5])
        raise ValueError(f"{source}: no usable {source_kind} ({len(excluded)} excluded: {reasons})")
    arr = {c: np.array([v[c] for v in kept], dtype=float) for c in kept[0]}
    if np.all(arr["params"] < 1e3) and np.all(arr["tokens"] > 1e6):
        raise UnitMismatchError(f"{source}: params are all below 1000 while tokens exceed 1e6: params look like "
                                "billions (or millions); give plain parameter counts (e.g. 1.07e9, not 1.07)")
    if np.all(arr["tokens"] < 1e3) and np.all(arr["params"] > 1e6):
        raise UnitMismatchError(f"{source}: tokens are all below 1000 while params exceed 1e6: tokens look like "
                                "billions; give plain token counts (e.g. 4e9, not 4)")
    if len(set(arr["params"].tolist())) < 2:
        warnings.append("one model size: the N exponents of the laws cannot be fitted")
    if units.lr_schedule == "mixed":
        warnings.append("the runs used different learning-rate schedules; hyperparameter laws hold for one schedule")
    if excluded:
        warnings.append(f"{len(excluded)} run(s)/row(s) excluded (see 'excluded')")
    flops = arr["flops"] if np.all(np.isfinite(arr["flops"])) else None
    return RunTable(arr["params"], arr["tokens"], arr["loss"], arr["lr"] if hyper else None,
                    arr["batch_size"] if hyper else None, flops, names, units, excluded, warnings, source)
