"""The ramp of masked structural growth (MSG, Yao et al. 2024): every
:class:`~mmgrow.models.growth_mask.GrowthMask` of the model goes linearly from 0 to 1.

.. math::  m(\\text{step}) = \\operatorname{clamp}\\big((\\text{step} - \\text{start\\_step}) / \\text{steps},\\, 0,\\, 1\\big)

At ``m = 0`` the grown model computes the base model's function and new parameters get zero
gradients (see :mod:`mmgrow.growth.msg`); from ``start_step + 1`` they train, and after
``start_step + steps`` the new structures are fully part of the model. The mask values are buffers,
so a checkpoint holds them; the callback recomputes them from ``global_step`` anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from torch import nn

from mmgrow.models.growth_mask import GrowthMask


def set_growth_masks(model: nn.Module, value: float) -> int:
    """Set every :class:`GrowthMask` in ``model`` to ``value`` (in ``[0, 1]``); returns how many."""
    masks = [m for m in model.modules() if isinstance(m, GrowthMask)]
    for mask in masks:
        mask.set_value(value)
    return len(masks)


class GrowthMaskRamp(pl.Callback):
    """Before every training batch, set the masks of ``pl_module.model`` to
    ``clamp((global_step - start_step) / steps, 0, 1)``.

    Args:
        steps: optimizer steps from mask 0 to mask 1 (MSG's ``ramp_steps``).
        start_step: the ``global_step`` at which the ramp starts (the step the grown stage begins).
    """

    def __init__(self, steps: int, start_step: int = 0) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"GrowthMaskRamp: steps must be a positive int, got {steps!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"GrowthMaskRamp: start_step must be an int >= 0, got {start_step!r}")
        self.steps = steps
        self.start_step = start_step

    @classmethod
    def from_strategies(cls, strategies: Iterable[Any], start_step: int = 0) -> GrowthMaskRamp | None:
        """A ramp over the longest ``ramp_steps`` of the given growth strategies (those that have
        one, e.g. :class:`~mmgrow.growth.msg.MaskedGrowth`), or None when none has."""
        steps = [s.ramp_steps for s in strategies if isinstance(getattr(s, "ramp_steps", None), int)]
        return cls(max(steps), start_step) if steps else None

    def value_at(self, step: int) -> float:
        return min(max((step - self.start_step) / self.steps, 0.0), 1.0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        set_growth_masks(pl_module.model, self.value_at(trainer.global_step))
