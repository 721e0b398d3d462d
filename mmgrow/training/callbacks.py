"""Callbacks that make every run leave evidence: weights, a summary, samples and a loss plot.

All of them write into the run directory (``trainer.default_root_dir``) and only on global rank 0.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from mmgrow.protocols import SequenceMixer
from mmgrow.rundir import atomic_write_bytes, save_model

log = logging.getLogger(__name__)


def run_dir(trainer: pl.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory when on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class ExportWeights(pl.Callback):
    """At the end of ``fit``: ``model.safetensors`` + ``model.yaml`` (atomic writes)."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            path = save_model(pl_module.model, pl_module.model_config(), run_dir(trainer))
            log.info("weights written to %s", path)


class RunSummary(pl.Callback):
    """Measures training throughput and writes ``summary.json`` at the end of ``fit``.

    ``tokens_per_s`` counts non-padding tokens of training batches over the training loop's wall
    time from the end of the first batch to the end of the last (data loading, forward, backward and
    optimizer included; the first batch, validation, epoch boundaries and sampling excluded).
    Under data parallelism tokens are summed over ranks and seconds averaged, so it is the global
    rate. ``tokens_seen`` is summed over ranks too; it survives a resume through the checkpoint,
    which holds rank 0's own count for every rank to restore, so after resuming a multi-rank run
    it is approximate (exact when the ranks saw equally many tokens).
    """

    def __init__(self) -> None:
        self.train_time = 0.0
        self.tokens = 0
        self.fit_start = 0.0
        self.max_seq_len = 0
        self._last: float | None = None
        self._batch_start = 0.0
        self._seen_first = False

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

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not training time

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._last = None

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The run's numbers; collective under data parallelism (call it on every rank)."""
        strategy = trainer.strategy
        total_tokens = strategy.reduce(torch.tensor(float(pl_module.tokens_seen), device=pl_module.device),
                                       reduce_op="sum")
        timed_tokens = strategy.reduce(torch.as_tensor(self.tokens, device=pl_module.device).float(), reduce_op="sum")
        seconds = strategy.reduce(torch.tensor(self.train_time, device=pl_module.device), reduce_op="mean")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        model = pl_module.model
        # State after the longest training row: what decoding that row would hold per example.
        seq_len = self.max_seq_len
        state = sum(m.state_size(seq_len) for m in model.modules() if isinstance(m, SequenceMixer))
        return {
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
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = self.summary(trainer, pl_module)  # every rank: it reduces over them
        if trainer.is_global_zero:
            atomic_write_bytes(run_dir(trainer) / "summary.json", json.dumps(summary, indent=2).encode())


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
