"""The progress bar of ``mmgrow`` runs: Lightning's rich bar, counting optimizer steps in step-based runs.

mmgrow recipes stop at ``trainer.max_steps`` (``max_epochs`` is then -1): Lightning's bar would title
each epoch ``Epoch 0/-2`` and restart at every epoch boundary (with tiny epochs it never holds the two
samples rich needs for a speed, so it shows ``0.00it/s``). In a step-based run this bar is one task for
the whole run, ``Step  N/max_steps``, advanced to ``trainer.global_step``; epoch-based runs keep
Lightning's display.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


def is_step_based(trainer: Any) -> bool:
    """The run stops at ``max_steps`` and has no epoch limit."""
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(RichProgressBar):
    """:class:`RichProgressBar` showing ``Step N/max_steps`` for step-based runs (see the module docstring)."""

    @property
    def total_train_batches(self) -> int | float:
        if is_step_based(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not is_step_based(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"  # padded like Lightning's, so lines do not flicker

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if is_step_based(trainer) and self.train_progress_bar_id is not None and self.progress is not None:
            return  # one task for the whole run: an epoch boundary neither resets nor retitles it
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not is_step_based(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        return None
