"""The numbers of one run, flattened to dotted column names.

Fixed columns (:data:`FIXED`, read from ``summary.json``): parameters, tokens, final losses, validation bits per
token, tokens/s, peak memory in MiB (``peak_memory_bytes / 2**20``: peak RSS of the process on CPU, max allocated
on CUDA), recurrent state size per example and FLOPs per token.

Evaluation columns, every scalar the run recorded:

* ``summary.json`` ``metrics`` keys starting ``val/`` or ``test/`` (as they are; ``val/loss`` is left out: it is
  ``final_val_loss``);
* ``samples/heldout.json``: ``heldout.match_rate.<attribute>`` and ``heldout.probe.<...>`` (text alignment per
  attribute and ``all``, scene consistency ``within_scene/transitions/alignment/score``, ``frechet_distance``);
* ``summary.json`` ``tasks`` (``{split: {source: {metric: value}}}``): ``tasks.<split>.<source>.<metric>``
  (the ``samples`` count is left out);
* ``eval/<kind>-<N>/<file>.json`` scalars: ``eval.<kind>.<file>.<key...>``, from the highest ``N`` of each kind
  (the latest evaluation; numbering differs between runs, the kind does not).

Booleans, strings, lists and ``null`` are not numbers and are skipped, and so are the :data:`BOOKKEEPING` counts.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgrow.report.collect import RunRecord

MIB = 2 ** 20


@dataclass(frozen=True)
class FixedColumn:
    """A column read from ``summary.json``: ``path`` is the key chain, ``scale`` divides the value."""

    label: str  # the table header
    path: tuple[str, ...]
    scale: float = 1.0
    scale_text: str = ""  # ``scale`` as written in the column legend

    def read(self, summary: dict[str, Any]) -> Any:
        value: Any = summary
        for key in self.path:
            value = value.get(key) if isinstance(value, dict) else None
        return value / self.scale if _is_number(value) else None

    @property
    def source(self) -> str:
        """Where the value comes from, in words (for the report's column legend)."""
        text = "".join(f"[{k}]" if "/" in k else ("." if i else "") + k for i, k in enumerate(self.path))
        return text + (f" / {self.scale_text}" if self.scale_text else "")


FIXED: dict[str, FixedColumn] = {
    "non_embedding_parameters": FixedColumn("non-emb. params", ("non_embedding_parameters",)),
    "parameters": FixedColumn("params", ("parameters",)),
    "tokens_seen": FixedColumn("tokens", ("tokens_seen",)),
    "final_train_loss": FixedColumn("train loss", ("final_train_loss",)),
    "final_val_loss": FixedColumn("val loss", ("final_val_loss",)),
    "val/bits_per_token": FixedColumn("val bits/token", ("metrics", "val/bits_per_token")),
    "tokens_per_s": FixedColumn("tokens/s", ("tokens_per_s",)),
    "peak_memory_mib": FixedColumn("peak mem (MiB)", ("peak_memory_bytes",), MIB, "2^20"),
    "state_size_per_example": FixedColumn("state/example", ("state_size_per_example",)),
    "flops_per_token": FixedColumn("FLOPs/token", ("flops_per_token",)),
}
"""Column key -> its definition, in table order."""

_SKIPPED_SUMMARY_METRICS = {"val/loss", "val/bits_per_token"}  # the first is final_val_loss, the second FIXED
BOOKKEEPING = ("*/tokens_*", "heldout.probe.frechet_clips", "heldout.probe.frechet_features")
"""Recorded counts that describe how a metric was made, not how good a run is (tokens per modality in a
validation batch, the clip and feature counts behind the Fréchet distance): left out of the columns."""
_EVAL_DIR = re.compile(r"^(?P<kind>.+)-(?P<n>\d+)$")


def run_values(run: RunRecord) -> dict[str, float]:
    """``{column: value}`` of :data:`FIXED` and the evaluation columns the run has (absent ones are missing)."""
    values = {key: column.read(run.summary) for key, column in FIXED.items()}
    values = {key: float(v) for key, v in values.items() if v is not None}
    values.update(evaluation_values(run))
    return values


def evaluation_values(run: RunRecord) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (run.summary.get("metrics") or {}).items():
        if key.startswith(("val/", "test/")) and key not in _SKIPPED_SUMMARY_METRICS:
            _put(out, key, value)
    heldout = _json(run.path / "samples" / "heldout.json")
    if isinstance(heldout, dict):
        flatten(out, "heldout.match_rate", heldout.get("match_rate"))
        flatten(out, "heldout.probe", heldout.get("probe"))
    for split, sources in (run.summary.get("tasks") or {}).items():
        for source, metrics in (sources or {}).items():
            if isinstance(metrics, dict):
                flatten(out, f"tasks.{split}.{source}", {k: v for k, v in metrics.items() if k != "samples"})
    for kind, directory in _latest_eval_dirs(run.path / "eval").items():
        for file in sorted(directory.glob("*.json")):
            flatten(out, f"eval.{kind}.{file.stem}", _json(file))
    return {k: v for k, v in out.items() if not any(fnmatch.fnmatchcase(k, p) for p in BOOKKEEPING)}


def flatten(out: dict[str, float], prefix: str, value: Any) -> None:
    """Put every numeric leaf (NaN included) of nested dicts into ``out`` under ``prefix.key.subkey``."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(out, f"{prefix}.{k}", v)
    else:
        _put(out, prefix, value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _put(out: dict[str, float], key: str, value: Any) -> None:
    if _is_number(value):
        out[key] = float(value)


def _latest_eval_dirs(eval_root: Path) -> dict[str, Path]:
    latest: dict[str, tuple[int, Path]] = {}
    if not eval_root.is_dir():
        return {}
    for d in eval_root.iterdir():
        m = _EVAL_DIR.match(d.name)
        if d.is_dir() and m and int(m["n"]) >= latest.get(m["kind"], (-1, d))[0]:
            latest[m["kind"]] = (int(m["n"]), d)
    return {kind: d for kind, (_, d) in sorted(latest.items())}


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # an unreadable evaluation file gives no columns; the run itself is still reported


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
