"""Crash-safe checkpoints: periodic step checkpoints and an atomic, same-directory checkpoint writer.

:class:`StepCheckpoint` is the checkpoint callback every run gets (``mmgrow fit`` adds it unless the
recipe lists a ``ModelCheckpoint`` of its own). It keeps one file, ``checkpoints/last.ckpt``, so
``last.ckpt`` is by construction the newest checkpoint, and writes it every ``every_n_train_steps``
optimizer steps and at every epoch end (including the one ``max_steps`` cuts short, so the final
state is always saved). The default interval, 100 steps, bounds the work a crash loses to 100 steps
(the quickstart's 250 steps are saved at steps 100, 200 and 250) for a write of the model and
optimizer state each time; a recipe overrides it::

    trainer:
      callbacks:
        - class_path: mmgrow.training.checkpointing.StepCheckpoint
          init_args: {every_n_train_steps: 500}

:class:`AtomicCheckpointIO` replaces Lightning's writer, which streams the checkpoint into a file in
the *system* temporary directory (fsspec's local transaction, ``tempfile.mkstemp()``) and then moves it
with ``shutil.move`` -- a copy when ``/tmp`` is another file system, so neither atomic nor cleaned up
after a kill. Here the file is written beside its target with :func:`mmgrow.rundir.atomic_file`.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from mmgrow.rundir import atomic_file

DEFAULT_EVERY_N_TRAIN_STEPS = 100


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, then ``os.replace`` (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        import torch

        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as fh:
            torch.save(checkpoint, fh)


class StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps and at every epoch end.

    Args:
        every_n_train_steps: interval in optimizer steps (default 100); 0 saves at epoch ends only.
        dirpath: where ``last.ckpt`` goes (default ``<default_root_dir>/checkpoints``).
    """

    def __init__(self, every_n_train_steps: int = DEFAULT_EVERY_N_TRAIN_STEPS, dirpath: str | None = None) -> None:
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 0:
            raise ValueError(f"StepCheckpoint: every_n_train_steps must be an int >= 0, got {every_n_train_steps!r}")
        # save_top_k=0: no second, step-named copy, so last.ckpt cannot lag one. No version counter: a
        # new run in an old directory overwrites last.ckpt instead of writing last-v1.ckpt beside it.
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         save_on_train_epoch_end=True, enable_version_counter=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
