"""The model side of curriculum stages: RoPE theta and learning-rate scale per stage, logged and exported.

The data module owns the schedule (``trainer.datamodule.curriculum``, a
:class:`~mmgrow.data.curriculum.CurriculumSchedule`) and applies a stage's batch size, mixture and length
to the batches it makes. This callback applies the rest, for the stage of ``trainer.global_step`` (the
number of optimizer steps done, so the same stage as the data side's ``stage_at(batch // accumulate)``):

* ``rope_theta``: set on every :class:`~mmgrow.layers.rope.RotaryEmbedding` of the model (the
  ``extend_context`` growth strategy, :class:`~mmgrow.growth.context.ExtendContextGrowth`). Theta is a
  plain attribute, not in the state dict, so it is re-applied from ``global_step`` at the start of every
  fit / validate / test and at every training batch: a run resumed with ``--ckpt_path`` or a checkpoint
  evaluated mid-curriculum gets its stage's theta. ``None`` leaves the model's own value.
* ``lr_scale``: for the optimizer steps of the stage the optimizer uses ``lr = scheduler lr * lr_scale``.
  The scale is applied just before ``optimizer.step()`` and the scheduler's value restored just after
  (an optimizer step post-hook), so the scheduler (which runs after the step) never sees a scaled lr:
  ``LambdaLR`` recomputes from ``base_lrs`` anyway, and chainable schedulers are not compounded.
* logs ``curriculum/stage``, ``curriculum/rope_theta`` (0 = the model's own), ``curriculum/lr_scale``,
  ``curriculum/length`` (0 = unset) and ``curriculum/batch_size`` every training step, and prints one
  line when a stage begins (rank 0).

Export: when training ends, the final stage's theta is recorded in the model's growth history as an
``extend_context`` entry, so ``model.yaml`` (written by ``ExportWeights`` at the end of fit) rebuilds the
model with the final theta (``load_model`` replays growth), and a next stage's ``init_from`` does too.

Without a curriculum (no ``curriculum`` attribute, None, or one stage that sets neither theta nor an
lr scale) the callback does nothing.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from mmgrow.data.curriculum import CurriculumSchedule, Stage
from mmgrow.growth.base import GrowthError, backbone_of, spec_of
from mmgrow.growth.context import ExtendContextGrowth
from mmgrow.layers.rope import RotaryEmbedding


def set_rope_theta(model: Any, theta: float) -> int:
    """Set ``theta`` on every RotaryEmbedding of ``model`` (all blocks); returns how many were set.

    Uses :class:`ExtendContextGrowth` on the backbone's blocks when the model has one (the same code path
    as the growth step that ``model.yaml`` replays), otherwise every RotaryEmbedding submodule."""
    try:
        backbone_of(model)
    except GrowthError:  # not a model with a backbone (e.g. a bare mixer in a test): every RoPE module
        ropes = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
        for rope in ropes:
            rope.theta = float(theta)
        return len(ropes)
    ExtendContextGrowth(rope_theta=theta).apply(model)
    return sum(isinstance(m, RotaryEmbedding) for m in model.modules())


def rope_thetas(model: Any) -> list[float]:
    """The ``theta`` of every RotaryEmbedding in ``model`` (module order)."""
    return [m.theta for m in model.modules() if isinstance(m, RotaryEmbedding)]


class Curriculum(pl.Callback):
    """Applies the model side of ``trainer.datamodule.curriculum`` (module docstring)."""

    def __init__(self) -> None:
        self._stage: Stage | None = None
        self._hooks: list[Any] = []
        self._saved: dict[int, list[float]] = {}  # id(optimizer) -> the scheduler's lrs while scaled
        self._recorded: dict[str, Any] | None = None
        self._checkpoint_step: int | None = None  # global_step of a checkpoint loaded for validate/test/predict

    # -- the schedule and the stage of a step ---------------------------------------------------------
    @staticmethod
    def schedule(trainer: pl.Trainer) -> CurriculumSchedule | None:
        """The data module's schedule, or None when there is nothing for the model side to do."""
        schedule = getattr(getattr(trainer, "datamodule", None), "curriculum", None)
        if schedule is None:
            return None
        if not isinstance(schedule, CurriculumSchedule):
            raise TypeError(f"Curriculum: trainer.datamodule.curriculum must be a CurriculumSchedule, got "
                            f"{type(schedule).__name__}")
        if len(schedule) == 1 and schedule.stages[0].rope_theta is None and schedule.stages[0].lr_scale == 1.0:
            return None  # the default single stage: nothing to apply, nothing to log
        return schedule

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Stage | None:
        schedule = self.schedule(trainer)
        if schedule is None:
            return None
        stage = schedule.stage_at(self._step(trainer))
        model = getattr(pl_module, "model", None) or pl_module
        if stage.rope_theta is not None and any(t != stage.rope_theta for t in rope_thetas(model)):
            set_rope_theta(model, stage.rope_theta)
        if self._stage is None or stage.index != self._stage.index:  # one line on rank 0 (Lightning's logger)
            end = "end of training" if stage.end is None else f"step {stage.end}"
            theta = "model's own" if stage.rope_theta is None else f"{stage.rope_theta:g}"
            rank_zero_info(f"curriculum: stage {stage.index} ({stage.name}) from step {self._step(trainer)} until {end}: "
                           f"length {stage.length}, batch size {stage.batch_size}, rope theta {theta}, "
                           f"lr scale {stage.lr_scale:g}")
        self._stage = stage
        return stage

    def _step(self, trainer: pl.Trainer) -> int:
        # validate/test/predict --ckpt_path load only the weights (trainer.global_step stays 0): use the
        # checkpoint's own step, so a mid-curriculum checkpoint is evaluated with its stage's theta.
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting and self._checkpoint_step is not None:
            return self._checkpoint_step
        return int(trainer.global_step)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        step = checkpoint.get("global_step")
        self._checkpoint_step = int(step) if isinstance(step, int) else None

    # -- re-applied from global_step wherever the model runs -------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage = None
        self._apply(trainer, pl_module)
        # A --ckpt_path's global_step is restored only after on_fit_start: the stage line is printed from
        # on_train_start, with the stage the run really continues in.
        self._stage = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # global_step is restored from a --ckpt_path checkpoint only after on_fit_start: apply again here.
        self._apply(trainer, pl_module)
        if self.schedule(trainer) is not None:
            self._hooks = [opt.register_step_post_hook(self._restore_lr) for opt in trainer.optimizers]

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        stage = self._apply(trainer, pl_module)
        if stage is None:
            return
        values = {"curriculum/stage": float(stage.index), "curriculum/rope_theta": float(stage.rope_theta or 0.0),
                  "curriculum/lr_scale": float(stage.lr_scale), "curriculum/length": float(stage.length or 0),
                  "curriculum/batch_size": float(stage.batch_size)}
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    # -- learning-rate scale: around each optimizer step ------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        stage = self._stage
        if stage is None or stage.lr_scale == 1.0 or not self._hooks:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the optimizer
        if id(optimizer) in self._saved:  # already scaled for this step (never scale twice)
            return
        self._saved[id(optimizer)] = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * stage.lr_scale

    def _restore_lr(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        saved = self._saved.pop(id(optimizer), None)
        if saved is not None:
            for g, lr in zip(optimizer.param_groups, saved, strict=True):
                g["lr"] = lr

    # -- export: the final theta as growth history ------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        # on_train_end runs before every on_fit_end hook, so ExportWeights' model.yaml sees the entry.
        stage = self._stage
        growth = getattr(pl_module, "growth_stage", None)
        if stage is None or stage.rope_theta is None or growth is None:
            return
        entry = spec_of(ExtendContextGrowth(rope_theta=stage.rope_theta))
        if self._recorded is not None and self._recorded in growth.history:  # a second fit() of the same module
            growth.history.remove(self._recorded)
        growth.history.append(entry)
        self._recorded = entry
