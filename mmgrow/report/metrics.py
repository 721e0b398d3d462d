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

Booleans, strings, lists and ``null`` are not numbers and are skipped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from mmgrow.report.collect import RunRecord

MIB = 2 ** 20

FIXED: dict[str, str] = {
    "non_embedding_parameters": "non-emb. params",
    "parameters": "params",
    "tokens_seen": "tokens",
    "final_train_loss": "train loss",
    "final_val_loss": "val loss",
    "val/bits_per_token": "val bits/token",
    "tokens_per_s": "tokens/s",
    "peak_memory_mib": "peak mem (MiB)",
    "state_size_per_example": "state/example",
    "flops_per_token": "FLOPs/token",
}
"""Column key -> table header, in table order."""

_SKIPPED_SUMMARY_METRICS = {"val/loss", "val/bits_per_token"}  # the first is final_val_loss, the second FIXED
_EVAL_DIR = re.compile(r"^(?P<kind>.+)-(?P<n>\d+)$")


def run_values(run: RunRecord) -> dict[str, float]:
    """``{column: value}`` of :data:`FIXED` and the evaluation columns the run has (absent ones are missing)."""
    values = _fixed(run.summary)
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
    return out


def flatten(out: dict[str, float], prefix: str, value: Any) -> None:
    """Put every numeric leaf (NaN included) of nested dicts into ``out`` under ``prefix.key.subkey``."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(out, f"{prefix}.{k}", v)
    else:
        _put(out, prefix, value)


def _put(out: dict[str, float], key: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out[key] = float(value)


def _fixed(summary: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in FIXED:
        if key == "peak_memory_mib":
            raw = summary.get("peak_memory_bytes")
            _put(out, key, raw / MIB if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None)
        elif key == "val/bits_per_token":
            _put(out, key, (summary.get("metrics") or {}).get(key))
        else:
            _put(out, key, summary.get(key))
    return out


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
