"""A callback that stops a run the way a crash does, at a chosen step (tests of resume paths)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class CrashAtStep(pl.Callback):
    """Raise ``SystemExit(exit_code)`` at the start of the first training batch with ``global_step == step``:
    everything up to step ``step`` was trained (and checkpointed, if a checkpoint fell due), nothing after."""

    def __init__(self, step: int, exit_code: int = 17) -> None:
        self.step, self.exit_code = int(step), int(exit_code)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise SystemExit(self.exit_code)
