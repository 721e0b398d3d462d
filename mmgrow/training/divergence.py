"""Divergence guard: a non-finite loss or gradient stops the run before it touches the weights.

:class:`DivergenceGuard` is on in every ``mmgrow fit`` run (a recipe configures it by listing it in
``trainer.callbacks`` with ``init_args``, or turns it off with ``enabled: false``). It works with any
LightningModule under automatic optimisation (the token model and :class:`CodecModule` alike):

* ``on_before_backward`` looks at the training loss (one host sync per step) and remembers the last
  finite value; a non-finite one is recorded, with the logged per-part losses (``train/loss_video``
  ...) that are non-finite too;
* ``on_before_optimizer_step`` -- after backward, *before* gradient clipping (clipping a NaN norm
  spreads the NaN into every parameter) and before ``optimizer.step`` -- checks the total gradient norm
  and raises :class:`DivergenceError` when the loss was non-finite or a gradient is, naming the first
  parameter whose gradient is not finite. The optimizer and the LR scheduler never see that step, so the
  weights, ``checkpoints/last.ckpt`` (written only after completed steps) and everything exported keep
  the last finite state. Under data parallelism gradients are all-reduced before this hook, so every
  rank sees the same non-finite norm and stops at the same step. Under fp16 mixed precision the
  gradient check is skipped (the GradScaler skips overflowing steps by design); the loss check stays.

``mmgrow fit`` turns the error into a one-line diagnosis and exit status 3
(:data:`DIVERGED_EXIT_CODE`); :class:`~mmgrow.training.callbacks.RunSummary` records it in
``summary.json`` (``"status": "diverged"``) and seals the run directory with that status.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch

DIVERGED_EXIT_CODE = 3


@dataclass
class Divergence:
    """What went non-finite, where: the diagnosis carried by :class:`DivergenceError`."""

    step: int  # the optimizer step that was about to be taken (0-based; = global_step)
    loss_name: str  # the first non-finite quantity: a logged loss name, or "gradient"
    value: float | None  # its value (nan / inf); None for a gradient
    last_finite_loss: float | None  # the last finite training loss before it
    parameter: str | None = None  # the first parameter whose gradient is non-finite, if any
    non_finite_parts: tuple[str, ...] = ()  # other logged training losses that are non-finite

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = None if self.value is None else repr(self.value)  # "nan" / "inf": JSON has neither
        out["non_finite_parts"] = list(self.non_finite_parts)
        return out


HINT = "lower the learning rate (--model.lr), enable or tighten gradient clipping (--trainer.gradient_clip_val), " \
       "lengthen warm-up, or check the data for extreme values"


class DivergenceError(RuntimeError):
    """Training diverged: a non-finite loss or gradient. ``divergence`` holds the diagnosis."""

    def __init__(self, divergence: Divergence) -> None:
        self.divergence = d = divergence
        what = f"{d.loss_name} = {d.value}" if d.value is not None else f"gradient of {d.parameter} is non-finite"
        if d.value is not None and d.parameter:
            what += f" (first non-finite gradient: {d.parameter})"
        parts = f"; also non-finite: {', '.join(d.non_finite_parts)}" if d.non_finite_parts else ""
        last = "none (the first step)" if d.last_finite_loss is None else f"{d.last_finite_loss:.6g}"
        super().__init__(f"training diverged at step {d.step}: {what}{parts}; last finite training loss: {last}. "
                         f"The update was not applied: weights and checkpoints keep the last finite state. "
                         f"Hint: {HINT}")


class DivergenceGuard(pl.Callback):
    """Stop training at the first non-finite loss or gradient (see the module docstring).

    Args:
        enabled: False turns the guard off (a recipe that wants NaNs to pass, e.g. to study them).
        check_gradients: also check gradients (one norm per step); the loss check alone misses a step
            whose loss is finite but whose backward overflows.
    """

    def __init__(self, enabled: bool = True, check_gradients: bool = True) -> None:
        self.enabled = enabled
        self.check_gradients = check_gradients
        self.last_finite_loss: float | None = None
        self._bad_loss: tuple[str, float] | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        value = float(loss.detach())
        if math.isfinite(value):
            self.last_finite_loss = value
        elif self._bad_loss is None:  # kept until the optimizer step (several under gradient accumulation)
            self._bad_loss = ("train/loss", value)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.enabled:
            return
        # fp16 mixed precision: the GradScaler expects overflowing gradients now and then and skips
        # those steps itself, so only the loss is checked there.
        scaled = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None
        bad_param = self._first_non_finite_gradient(pl_module) if self.check_gradients and not scaled else None
        if self._bad_loss is None and bad_param is None:
            return
        name, value = self._bad_loss or ("gradient", None)
        parts = tuple(sorted(k for k, v in trainer.callback_metrics.items()
                             if k.startswith("train/") and k != name and torch.is_tensor(v) and v.numel() == 1
                             and not torch.isfinite(v).item()))
        self._bad_loss = None
        raise DivergenceError(Divergence(step=int(trainer.global_step), loss_name=name, value=value,
                                         last_finite_loss=self.last_finite_loss, parameter=bad_param,
                                         non_finite_parts=parts))

    @staticmethod
    def _first_non_finite_gradient(pl_module: pl.LightningModule) -> str | None:
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return None
        from mmgrow.parallel.grad_norm import per_parameter_norms

        # one kernel per dtype/device group; sharded (DTensor) gradients give their full norms, the same on
        # every rank, so every rank stops (or not) together
        norms = per_parameter_norms([g.detach() for _, g in named])
        finite = torch.stack([torch.isfinite(n).to(norms[0].device) for n in norms])
        if finite.all().item():  # the one host sync of the check
            return None
        return named[int((~finite).nonzero()[0])][0]

    def state_dict(self) -> dict[str, Any]:
        return {"last_finite_loss": self.last_finite_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_finite_loss = state_dict.get("last_finite_loss")
