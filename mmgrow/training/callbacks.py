"""Callbacks that make every run leave evidence: weights, a summary, samples and a loss plot.

All of them write into the run directory (``trainer.default_root_dir``) and only on global rank 0.
The run's record -- ``model.safetensors``, ``model.yaml``, ``summary.json`` -- follows the ordering
rule of :mod:`mmgrow.rundir`: each writer removes ``manifest.json`` first, and :class:`ExportWeights`
writes it last, once every end-of-fit hook has run (``status: complete``); a diverged run is sealed
by :class:`RunSummary` with ``status: diverged`` and no weights.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from mmgrow.protocols import SequenceMixer
from mmgrow.rundir import (
    CONFIG_NAME,
    SUMMARY_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write_bytes,
    begin_save,
    non_finite_names,
    save_model,
    seal_run,
    strict_json,
)
from mmgrow.training.rank_zero import model_on_rank_zero

log = logging.getLogger(__name__)


def run_dir(trainer: pl.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory when on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def state_size_per_example(model: torch.nn.Module, seq_len: int) -> int:
    """Numbers a decoder keeps per example after ``seq_len`` tokens: the sum of ``state_size(seq_len)`` over
    every :class:`~mmgrow.protocols.SequenceMixer` of ``model`` (the block mixers and the memory branches a
    growth step added), each counted once."""
    return int(sum(m.state_size(seq_len) for m in model.modules() if isinstance(m, SequenceMixer)))


class ExportWeights(pl.Callback):
    """At the end of ``fit``: ``model.safetensors`` + ``model.yaml`` (atomic writes), refused when a
    parameter is not finite; then, after every end-of-fit hook (``teardown``), ``manifest.json``.
    At the start of ``fit`` the directory's manifest is removed: until this run's record is sealed the
    directory reads as incomplete, not as an earlier run's record beside this run's ``config.yaml``."""

    def __init__(self) -> None:
        self._exported = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exported = False
        if trainer.is_global_zero:  # the directory now holds a run in progress (its config.yaml is new)
            begin_save(run_dir(trainer))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = model_on_rank_zero(pl_module)  # every rank: a gather under FSDP / tensor parallelism
        if trainer.is_global_zero:
            bad = non_finite_names(dict(model.named_parameters()))
            if bad:
                raise CheckpointError(f"refusing to export non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): "
                                      "training diverged; enable the DivergenceGuard callback to stop at the first "
                                      "non-finite loss and keep the last finite checkpoint")
            path = save_model(model, pl_module.model_config(), run_dir(trainer))
            self._exported = True
            log.info("weights written to %s", path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls teardown hooks after all on_fit_end hooks and only when fit ended normally.
        if stage == "fit" and self._exported and trainer.is_global_zero:
            seal_run(run_dir(trainer), (WEIGHTS_NAME, CONFIG_NAME, SUMMARY_NAME), status="complete",
                     step=int(trainer.global_step))
            self._exported = False


def skipped_media(trainer: pl.Trainer) -> dict[str, Any]:
    """``{"data": {"skipped": [{"path", "reason"} ...], "skipped_count": n}}`` when the data module
    reports the inputs its datasets left out (``skipped_files()``), else ``{}``."""
    report = getattr(getattr(trainer, "datamodule", None), "skipped_files", None)
    if not callable(report):
        return {}
    skipped = [dict(s) for s in report()]
    return {"data": {"skipped": skipped, "skipped_count": len(skipped)}}


class RunSummary(pl.Callback):
    """Measures training throughput and writes ``summary.json`` at the end of ``fit``.

    ``tokens_per_s`` counts non-padding tokens of training batches over the training loop's wall
    time from the end of the first batch to the end of the last (data loading, forward, backward and
    optimizer included; the first batch, validation, epoch boundaries and sampling excluded).
    Under data parallelism tokens are summed over ranks and seconds averaged, so it is the global
    rate. ``tokens_seen`` is summed over ranks too; it survives a resume through the checkpoint,
    which holds rank 0's own count for every rank to restore, so after resuming a multi-rank run
    it is approximate (exact when the ranks saw equally many tokens).

    ``val_history`` lists every validation of the run (``step``, ``tokens``: ``tokens_seen`` then, ``loss``:
    ``val/loss``), kept across resumes: with a constant learning rate the loss after ``T`` tokens of a longer
    run is the loss of a ``T``-token run, which is how a scaling sweep reads several budgets from one run.
    The fields a scaling-law fit reads (non-embedding parameters, tokens per step, learning rate, FLOPs) come
    from :func:`~mmgrow.training.scaling_record.scaling_fields`.

    It also writes the performance columns of ``metrics.csv`` on every logged training step
    (``perf/tokens_seen``, ``perf/elapsed_s``, ``perf/tokens_per_s``, ``perf/peak_memory_mb``:
    :class:`~mmgrow.training.perf_log.PerfLog`).
    """

    def __init__(self) -> None:
        self.val_history: list[dict[str, Any]] = []
        self.train_time = 0.0
        self.tokens = 0
        self.fit_start = 0.0
        self.max_seq_len = 0
        self._last: float | None = None
        self._batch_start = 0.0
        self._seen_first = False
        from mmgrow.training.perf_log import PerfLog

        self.perf = PerfLog()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.perf.on_train_start(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._seen_first:  # the first batch of the run (warm-up, lazy init) is not timed
            # Since the previous batch ended (data loading included), or since this batch started
            # when validation or an epoch boundary came in between.
            self.train_time += now - (self._last if self._last is not None else self._batch_start)
            # this rank's share: its shard's tokens under context parallelism, the batch's otherwise
            step_tokens = getattr(pl_module, "last_step_tokens", None)
            self.tokens = self.tokens + (batch.token_count() if step_tokens is None else step_tokens)
        self._seen_first = True
        self._last = now
        input_ids = getattr(batch, "input_ids", None)  # token batches; a codec trains on raw media
        if input_ids is not None:
            self.max_seq_len = max(self.max_seq_len, int(input_ids.shape[1]))
        self.perf.on_train_batch_end(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not training time
        self.perf.on_validation_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._last = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.perf.on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or not hasattr(pl_module, "tokens_seen"):
            return
        loss = trainer.callback_metrics.get("val/loss")
        tokens = trainer.strategy.reduce(torch.tensor(float(pl_module.tokens_seen), device=pl_module.device),
                                         reduce_op="sum")  # every rank is here: validation ends on all of them
        step = int(trainer.global_step)
        self.val_history = [h for h in self.val_history if h["step"] != step]  # a re-validation replaces it
        self.val_history.append({"step": step, "tokens": int(tokens),
                                 "loss": float(loss) if torch.is_tensor(loss) else None})

    def state_dict(self) -> dict[str, Any]:
        return {"val_history": list(self.val_history), "perf": self.perf.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_history = list(state_dict.get("val_history", []))
        self.perf.load_state_dict(state_dict.get("perf", {}))  # absent from checkpoints of older runs

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, collective: bool = True) -> dict[str, Any]:
        """The run's numbers; collective under data parallelism (call it on every rank) unless ``collective``
        is False (this rank's numbers: after an exception the ranks may not all be here)."""
        def reduce(t: torch.Tensor, reduce_op: str) -> torch.Tensor:
            return trainer.strategy.reduce(t, reduce_op=reduce_op) if collective else t

        total_tokens = reduce(torch.tensor(float(pl_module.tokens_seen), device=pl_module.device), reduce_op="sum")
        timed_tokens = reduce(torch.as_tensor(self.tokens, device=pl_module.device).float(), reduce_op="sum")
        seconds = reduce(torch.tensor(self.train_time, device=pl_module.device), reduce_op="mean")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        model = pl_module.model
        # State after the longest training row: what decoding that row would hold per example.
        seq_len = self.max_seq_len
        state = state_size_per_example(model, seq_len)
        from mmgrow.training.scaling_record import scaling_fields

        return {
            "status": "complete",
            "final_train_loss": metrics.get("train/loss"),
            "final_val_loss": metrics.get("val/loss"),
            "metrics": metrics,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_seen": int(total_tokens),
            "timed_train_tokens": int(timed_tokens),
            "tokens_per_s": float(timed_tokens) / float(seconds) if float(seconds) > 0 else None,
            "timed_train_seconds": float(seconds),
            "wall_seconds": time.perf_counter() - self.fit_start,
            "global_step": int(trainer.global_step),
            "world_size": int(trainer.world_size),
            "peak_memory_bytes": peak_memory_bytes(pl_module.device),
            "state_size_per_example": int(state),
            "seq_len": int(seq_len),
            "device": str(pl_module.device),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "growth": getattr(pl_module, "growth_summary", None),
            "tasks": getattr(pl_module, "task_results", None),
            **scaling_fields(model, pl_module.hparams, int(total_tokens), int(trainer.global_step), int(seq_len),
                             trainer.max_steps),
            "val_history": list(self.val_history),
            **skipped_media(trainer),
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = self.summary(trainer, pl_module)  # every rank: it reduces over them
        if trainer.is_global_zero:
            begin_save(run_dir(trainer))
            atomic_write_bytes(run_dir(trainer) / SUMMARY_NAME, strict_json(summary))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A diverged run: ``summary.json`` with ``"status": "diverged"`` and the diagnosis, and the run
        sealed with that status (no weights: the last finite state is ``checkpoints/last.ckpt``)."""
        from mmgrow.training.divergence import DivergenceError

        if not isinstance(exception, DivergenceError) or not trainer.is_global_zero:
            return
        summary = self.summary(trainer, pl_module, collective=False)
        diverged = exception.divergence.record()
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") if ckpt is not None else ""
        saved_step = getattr(ckpt, "_last_global_step_saved", None) if last else None
        last_checkpoint = {"path": last, "step": saved_step} if last and Path(last).is_file() else None
        summary.update(status="diverged", diverged=diverged, last_checkpoint=last_checkpoint)
        root = run_dir(trainer)
        begin_save(root)
        atomic_write_bytes(root / SUMMARY_NAME, strict_json(summary))
        seal_run(root, (SUMMARY_NAME,), status="diverged", step=int(trainer.global_step), diverged=diverged,
                 last_checkpoint=last_checkpoint)


class PlotMetrics(pl.Callback):
    """At the end of ``fit``: ``plots/loss.png`` from the CSV logger's ``metrics.csv``."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import CSVLogger

        from mmgrow.evaluation.plots import plot_metrics

        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                lg.save()
                csv = Path(lg.log_dir) / "metrics.csv"
                if csv.exists():
                    # log scale: losses fall by orders of magnitude and the tail is what matters
                    plot_metrics(csv, run_dir(trainer) / "plots" / "loss.png", keys=("train/loss", "val/loss"),
                                 log_y=True)
                return
