"""Performance over time: tokens, training seconds, throughput and peak memory as ``metrics.csv`` columns.

On every training step the loggers write (``trainer.log_every_n_steps``), :class:`PerfLog` adds to the
same row as ``train/loss``:

* ``perf/tokens_seen`` -- non-padding training tokens seen so far, summed over data-parallel ranks
  (the count ``summary.json`` reports as ``tokens_seen``; kept across a resume);
* ``perf/elapsed_s`` -- training wall seconds since the start of the training loop, **validation
  excluded** (the sanity check and every validation loop run during training are subtracted; data
  loading, forward, backward, optimizer, checkpoint saving and the first step's warm-up are included).
  A resumed run continues from the seconds its checkpoint recorded. So variants validated equally often
  or not are compared on the time they spent training;
* ``perf/tokens_per_s`` -- tokens per training second over the last logging window (since the previous
  logged step; the first window starts at the start of the training loop, so it includes warm-up);
* ``perf/peak_memory_mb`` -- peak memory so far in MiB (``2**20`` bytes), the definition of
  ``summary.json``'s ``peak_memory_bytes`` (:func:`~mmgrow.training.callbacks.peak_memory_bytes`:
  CUDA's peak allocated bytes, else the process's peak resident set), of rank 0.

Cost: nothing on steps that are not logged; on a logged step one host read of the token counter and,
under data parallelism only, one all-reduce of one number (the tokens), like the loss logging itself.

:class:`~mmgrow.training.callbacks.RunSummary` (on in every ``mmgrow fit``) drives it through its own hooks and
keeps its clock in its checkpoint state. It is not a callback of its own on purpose: a callback returned by
``LightningModule.configure_callbacks`` would make Lightning reorder every callback of the run (checkpointing
last), and a second, recipe-listed copy would log the same columns twice.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mmgrow.training.callbacks import peak_memory_bytes

MIB = 2**20


class PerfLog:
    """Logs ``perf/tokens_seen``, ``perf/elapsed_s``, ``perf/tokens_per_s``, ``perf/peak_memory_mb`` (module
    docstring) on the training steps Lightning logs. Its methods are the Lightning hooks of the same names,
    called by the callback that owns it."""

    def __init__(self) -> None:
        self.elapsed_before = 0.0  # training seconds of the runs this one resumed
        self._start: float | None = None
        self._validation = 0.0  # validation seconds since _start
        self._validation_start: float | None = None
        self._window: tuple[float, float] = (0.0, 0.0)  # (tokens, elapsed seconds) at the last logged step

    def elapsed(self) -> float:
        """Training seconds so far (validation excluded), the resumed runs' included."""
        if self._start is None:
            return self.elapsed_before
        return self.elapsed_before + time.perf_counter() - self._start - self._validation

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start, self._validation = time.perf_counter(), 0.0
        self._window = (self._global_tokens(trainer, pl_module), self.elapsed_before)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        # the sanity check runs before on_train_start, which resets the sum: only in-training loops count
        if self._validation_start is not None:
            self._validation += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any) -> None:
        # The condition Lightning applies to this step's train/loss right after this hook: the perf columns
        # land in the same rows, and unlogged steps cost nothing. Every rank evaluates it alike.
        if not trainer._logger_connector.should_update_logs:
            return
        tokens, seconds = self._global_tokens(trainer, pl_module), self.elapsed()
        window_tokens, window_seconds = tokens - self._window[0], seconds - self._window[1]
        self._window = (tokens, seconds)
        values = {"perf/tokens_seen": tokens, "perf/elapsed_s": seconds,
                  "perf/peak_memory_mb": peak_memory_bytes(pl_module.device) / MIB}
        if window_seconds > 0:
            values["perf/tokens_per_s"] = window_tokens / window_seconds
        for name, value in values.items():
            # float64: a float32 token count is no longer exact beyond 2**24 tokens
            pl_module.log(name, torch.tensor(value, dtype=torch.float64), on_step=True, on_epoch=False,
                          sync_dist=False)

    @staticmethod
    def _global_tokens(trainer: Any, pl_module: Any) -> float:
        """``tokens_seen`` summed over ranks (a collective only when there are several)."""
        local = float(getattr(pl_module, "tokens_seen", 0))
        if trainer.world_size == 1:
            return local
        total = trainer.strategy.reduce(torch.tensor(local, device=pl_module.device), reduce_op="sum")
        return float(total)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed_before = float(state_dict.get("elapsed_s", 0.0))
