"""``metrics.csv`` that keeps the rows of earlier runs in the same run directory.

Lightning's CSV logger deletes an existing ``metrics.csv`` when a new run starts in its directory, so a
resumed run lost the curve before the resume. :class:`RunCSVLogger` never deletes; at its first write
it decides, from the steps alone:

* the new rows continue the file (their first step is after the file's last step: a resumed run) ->
  **appended** to ``metrics.csv`` (one continuous curve; when the new rows bring new columns the file is
  rewritten once with the merged header, earlier rows left blank there);
* otherwise (a new run from step 0, or a resume from an earlier checkpoint than the file's last row) ->
  the old file is **kept as** ``metrics.<n>.csv`` (the first free ``n`` from 1) and a new
  ``metrics.csv`` starts.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def _last_step(path: str) -> tuple[list[str], int | None]:
    """Header and largest ``step`` of a metrics file (None when it has no step rows)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        steps = [int(float(r["step"])) for r in reader if r.get("step") not in (None, "")]
        return list(reader.fieldnames or []), max(steps, default=None)


def versioned_path(path: str) -> str:
    """``metrics.csv`` -> the first of ``metrics.1.csv``, ``metrics.2.csv`` ... that does not exist."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    return f"{stem}.{n}{ext}"


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer without the deletion; appends or versions at the first save (module docstring)."""

    def __init__(self, log_dir: str) -> None:
        self._decided = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        pass

    def save(self) -> None:
        if self.metrics and not self._decided:
            self._decided = True
            self._keep_earlier_rows()
        super().save()

    def _keep_earlier_rows(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        header, last = _last_step(path)
        first_new = min(int(m["step"]) for m in self.metrics)
        if last is not None and first_new > last and "step" in header:
            self.metrics_keys = header  # append under the same header (merged if new keys arrive)
        else:
            os.replace(path, versioned_path(path))


class RunCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` keeps earlier runs' rows."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
