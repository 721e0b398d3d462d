"""ODE samplers of flow matching: Euler and Heun steps with classifier-free guidance.

``x`` starts as Gaussian noise at the continuous target positions (``t = 0``) and is integrated to
``t = 1`` along the model's velocity ``v(x, t, c)``; every other position keeps its clean value and is
re-read at every evaluation (conditioning frames, text tokens).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmgrow.batch import TokenBatch

if TYPE_CHECKING:
    from mmgrow.objectives.flow_matching import FlowMatchingObjective

SOLVERS = ("euler", "heun")


def velocity(objective: FlowMatchingObjective, model: nn.Module, batch: TokenBatch, x: Tensor, t: float,
             guidance: float) -> Tensor:
    """``[B, T, C]`` guided velocity at latents ``x`` and time ``t``: ``v_c`` when ``guidance == 1``, else
    ``v_u + g (v_c - v_u)`` with ``v_u`` from the batch with its condition dropped."""
    time = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
    timestep = objective.embed_time(model, time)

    def predict(b: TokenBatch) -> Tensor:
        out = model(b.input_ids, objective.context(b, timestep=timestep), latents=x)
        v = torch.zeros_like(x)
        for m, width in model.continuous.items():
            sel = b.modality_ids == objective.token_space.index(m)
            if bool(sel.any()):
                v[sel] = torch.nn.functional.pad(out.logits(out.hidden[sel], m).to(x.dtype), (0, x.shape[-1] - width))
        return v

    v_c = predict(batch)
    if guidance == 1.0:
        return v_c
    unconditional = replace(batch, condition_mask=torch.zeros(batch.condition.shape[:2], dtype=torch.bool,
                                                              device=batch.condition.device))
    v_u = predict(unconditional)
    return v_u + guidance * (v_c - v_u)


def integrate(objective: FlowMatchingObjective, model: nn.Module, batch: TokenBatch, *, steps: int, solver: str,
              guidance: float, generator: torch.Generator | None) -> Tensor:
    """See :meth:`FlowMatchingObjective.generate`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"generate: steps must be a positive int, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"generate: solver must be one of {SOLVERS}, got {solver!r}")
    if guidance != 1.0 and batch.condition is None:
        raise ValueError(f"generate: guidance={guidance} needs a condition to drop (batch.condition is None); "
                         "use guidance=1 for a model without a text condition")
    if batch.latents is None:
        raise ValueError("generate: the batch holds no latents (no continuous positions to sample)")
    widths = objective.continuous_widths(model, batch)
    channels = torch.arange(batch.latents.shape[-1], device=batch.latents.device)
    live = (((widths > 0) & (batch.loss_mask > 0))[..., None] & (channels < widths[..., None])).to(batch.latents.dtype)
    if not bool(live.any()):
        raise ValueError("generate: no continuous target position (loss_mask > 0) to sample in the batch")
    noise = torch.randn(batch.latents.shape, device=batch.latents.device, dtype=batch.latents.dtype,
                        generator=generator)
    x = live * noise + (1 - live) * batch.latents
    was_training = model.training
    model.eval()
    try:
        dt = 1.0 / steps
        for i in range(steps):
            t = i * dt
            v = velocity(objective, model, batch, x, t, guidance)
            if solver == "euler":
                x = x + dt * live * v
            else:
                x_next = x + dt * live * v
                v_next = velocity(objective, model, batch, x_next, t + dt, guidance)
                x = x + dt * live * 0.5 * (v + v_next)
    finally:
        model.train(was_training)
    return x
