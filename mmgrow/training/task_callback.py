"""``TaskEvaluation``: per-task metrics at the end of ``fit``, into ``summary.json`` and ``tasks.md``.

Always on in ``mmgrow fit`` (a no-op when no source's task is ``scored``). On global rank 0, after the
training loop and before the run summary is written, it scores every scored source on the first
``num_samples`` items of each split in ``splits`` (:func:`mmgrow.evaluation.tasks.evaluate_tasks`):
the evaluation split (``val``) and the held-out combinations (``heldout``). The results go to
``summary.json`` under ``"tasks"`` (``{split: {source: {"task", "samples", metric: value}}}``), to
``tasks.json`` and to the Markdown table ``tasks.md`` in the run directory, and to the loggers as
``tasks/<split>/<source>/<metric>``. To change the settings, list it in the recipe::

    trainer:
      callbacks:
        - class_path: mmgrow.training.task_callback.TaskEvaluation
          init_args: {num_samples: 64, splits: [val, heldout]}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from mmgrow.checks import positive_int
from mmgrow.rundir import atomic_write_bytes
from mmgrow.training.rank_zero import model_on_rank_zero

log = logging.getLogger(__name__)

TABLE_NAME = "tasks.md"
RESULTS_NAME = "tasks.json"


class TaskEvaluation(pl.Callback):
    """Per-task evaluation after training (module docstring).

    Args:
        num_samples: items scored per source and split.
        splits: data-module splits to score (``train``, ``val``, ``heldout``).
    """

    def __init__(self, num_samples: int = 32, splits: Sequence[str] = ("val", "heldout")) -> None:
        self.num_samples = positive_int("TaskEvaluation", "num_samples", num_samples)
        if isinstance(splits, str) or not splits or any(s not in ("train", "val", "heldout") for s in splits):
            raise ValueError(f"TaskEvaluation: splits must be a non-empty list among train, val, heldout; got {splits!r}")
        self.splits = list(splits)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        scored = [t for t in getattr(dm, "tasks", []) if getattr(t, "scored", False)]
        if scored:
            model = model_on_rank_zero(pl_module)  # every rank: a gather under FSDP / tensor parallelism
        if not trainer.is_global_zero or not scored or not getattr(pl_module.objective, "samples_tokens", True):
            return
        from mmgrow.evaluation.tasks import evaluate_tasks, tasks_table

        results = {split: evaluate_tasks(model, pl_module.objective, dm, split, self.num_samples)
                   for split in self.splits}
        pl_module.task_results = results  # RunSummary puts it into summary.json
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / RESULTS_NAME, json.dumps(results, indent=2).encode())
        atomic_write_bytes(root / TABLE_NAME, tasks_table(results).encode())
        flat = {f"tasks/{split}/{source}/{k}": float(v) for split, per in results.items()
                for source, r in per.items() for k, v in r.items() if k not in ("task", "samples")}
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
        log.info("per-task evaluation written to %s", root / TABLE_NAME)
