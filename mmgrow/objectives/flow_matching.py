"""Flow matching (rectified flow) on the continuous positions of a sequence, next-token prediction
on its discrete targets -- one objective for a DiT that may also read or write text (DESIGN.md §3.6).

Path and loss (Lipman et al. 2023; Liu et al. 2023, "rectified flow"). For a continuous target
position with clean latent ``x_1`` (``batch.latents``), noise ``x_0 ~ N(0, I)`` and the row's time
``t ~ p(t)`` on ``[0, 1]`` (``t = 0`` noise, ``t = 1`` data):

.. math::

    x_t = (1 - t)\\,x_0 + t\\,x_1, \\qquad v = x_1 - x_0, \\qquad
    L_m = \\frac{\\sum_{i \\in m} w_i \\,\\tfrac{1}{C_m}\\lVert \\hat v_\\theta(x_t, t, c)_i - v_i \\rVert^2}
               {\\sum_{i \\in m} w_i}

with ``w_i = loss_mask_i * example_weight_i``. The model sees ``x_t`` at target positions and the clean
latents at continuous *input* positions (e.g. conditioning frames), the embedded time in
``ctx.timestep`` (adaLN-Zero) and the caption embeddings in ``ctx.condition`` (cross-attention).
Discrete targets get the autoregressive cross-entropy ``L_d``; the total is the weighted mean over
the modalities present, ``L = sum_m lambda_m L_m / sum_m lambda_m`` (every ``lambda`` 1 by default,
as :class:`~mmgrow.objectives.autoregressive.AutoregressiveObjective`).

For a single data point the conditional velocity ``v`` equals the marginal one, ``(x_1 - x_t)/(1 - t)``,
so a model predicting it has loss and gradient exactly 0 (the test of this objective).

Condition dropout: while training, each row's condition is dropped with probability
``condition_dropout`` (its ``condition_mask`` set all False: cross-attention then adds only its constant output bias), which
teaches the same network the unconditional velocity that classifier-free guidance needs
(Ho & Salimans 2022): ``v = v_u + g (v_c - v_u)``. Captions written into the sequence as text tokens
are not dropped (guidance acts on the cross-attention condition only).

Masks: the sequence is causal, except inside bidirectional blocks (``block_ids``: a clip's latents
attend to each other both ways; text before them stays causal). ``causal=False`` makes the whole
sequence bidirectional (storyboards, where the text is input only); a discrete target that its
predicting position could see is an error, never a silent leak.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from mmgrow.batch import TokenBatch
from mmgrow.objectives.autoregressive import AutoregressiveObjective, next_token_targets, single_example_rows
from mmgrow.objectives.flow_sampler import integrate
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec, ModelOutput, Objective, SeqContext
from mmgrow.tokenspace import TokenSpace

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class FlowTargets:
    """The noise drawn for one step (all ``[B, T, C]`` unless noted).

    t:        ``[B]`` time of each row.
    inputs:   what the model reads as ``latents``: ``x_t`` at target positions, clean latents elsewhere.
    velocity: ``x_1 - x_0`` at target positions (0 elsewhere).
    mask:     ``[B, T]`` bool, the continuous target positions.
    continuous: the model's continuous modalities (their positions are never next-token targets).
    """

    t: Tensor
    inputs: Tensor
    velocity: Tensor
    mask: Tensor
    continuous: tuple[str, ...] = ()


class FlowMatchingObjective(Objective):
    """Velocity loss on continuous targets + next-token loss on discrete ones; Euler/Heun sampler with CFG.

    Args:
        modality_weights: relative weights ``lambda_m`` per modality (1 unless listed).
        condition_dropout: probability of dropping a row's condition while training (CFG).
        timestep_sampling: ``"uniform"`` (``t ~ U(0, 1)``) or ``"logit_normal"`` (``t = sigmoid(n)``,
            ``n ~ N(0, 1)``, Esser et al. 2024, more weight on intermediate times).
        causal: False for a fully bidirectional sequence (no discrete targets allowed then).
        token_space: as :class:`~mmgrow.objectives.autoregressive.AutoregressiveObjective` (the training
            module binds the model's).
    """

    supports_context_parallel = False
    samples_latents = True
    samples_tokens = False  # no token sampler: the sample writers skip discrete targets (e.g. captions)
    """:meth:`generate` samples the continuous positions of a batch (the ODE sampler)."""
    loss_is_nll_nats = False
    """The loss mixes a velocity MSE with cross-entropy: not a likelihood, so no bits per token are logged."""

    def __init__(self, modality_weights: dict[str, float] | None = None, *, condition_dropout: float = 0.1,
                 timestep_sampling: str = "uniform", causal: bool = True,
                 token_space: TokenSpace | Mapping[str, int] | None = None) -> None:
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"FlowMatchingObjective: condition_dropout must be in [0, 1), got {condition_dropout!r}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"FlowMatchingObjective: timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, "
                             f"got {timestep_sampling!r}")
        self.discrete = AutoregressiveObjective(modality_weights)  # validates the weights
        self.modality_weights = self.discrete.modality_weights
        self.condition_dropout = float(condition_dropout)
        self.timestep_sampling = timestep_sampling
        self.causal = bool(causal)
        if token_space is not None:
            self.bind(token_space)

    def bind(self, token_space: TokenSpace | Mapping[str, int]) -> FlowMatchingObjective:
        self.discrete.bind(token_space)
        return self

    @property
    def token_space(self) -> TokenSpace:
        return self.discrete.token_space

    # ------------------------------------------------------------------ inputs

    def context(self, batch: TokenBatch, **extra) -> SeqContext:
        """Causal (or, with ``causal=False``, bidirectional) mask with the batch's blocks; the batch's
        condition unless ``extra`` gives one; segment ids only for packed rows."""
        if batch.condition is not None:
            extra.setdefault("condition", batch.condition)
            extra.setdefault("condition_mask", batch.condition_mask)
        mask = extra.pop("mask", None) or MaskSpec(causal=self.causal)
        seg = batch.segment_ids
        blocks = batch.block_ids if bool((batch.block_ids != NO_BLOCK).any()) else None
        return SeqContext(positions=batch.positions, segment_ids=None if single_example_rows(seg) else seg,
                          block_ids=blocks, modality_ids=batch.modality_ids, mask=mask, **extra)

    def continuous_widths(self, model: nn.Module, batch: TokenBatch) -> Tensor:
        """``[B, T]`` int64 latent width of each position's modality (0 at discrete and padding tokens)."""
        widths = torch.zeros_like(batch.modality_ids)
        for m, width in getattr(model, "continuous", {}).items():
            widths = torch.where(batch.modality_ids == self.token_space.index(m), width, widths)
        return torch.where(batch.segment_ids == PAD_SEGMENT, 0, widths)

    def sample_time(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """``[B]`` times from :attr:`timestep_sampling`."""
        if self.timestep_sampling == "uniform":
            return torch.rand(batch_size, device=device, generator=generator)
        return torch.sigmoid(torch.randn(batch_size, device=device, generator=generator))

    def flow_targets(self, model: nn.Module, batch: TokenBatch, generator: torch.Generator | None = None) -> FlowTargets:
        """Draw ``t`` and ``x_0`` and build ``x_t`` and ``v`` (module docstring)."""
        widths = self.continuous_widths(model, batch)
        if batch.latents is None:
            if bool((widths > 0).any()):
                raise ValueError("FlowMatchingObjective: the batch holds continuous positions but no latents")
            empty = torch.zeros(*batch.input_ids.shape, 0, device=batch.input_ids.device)
            t = self.sample_time(batch.input_ids.shape[0], batch.input_ids.device, generator)
            return FlowTargets(t, empty, empty, torch.zeros_like(batch.input_ids, dtype=torch.bool),
                               tuple(getattr(model, "continuous", {})))
        x1 = batch.latents
        channels = torch.arange(x1.shape[-1], device=x1.device)
        mask = (widths > 0) & (batch.loss_mask > 0)
        live = (mask[..., None] & (channels < widths[..., None])).to(x1.dtype)  # [B, T, C]
        t = self.sample_time(x1.shape[0], x1.device, generator).to(x1.dtype)
        x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        tt = t[:, None, None]
        inputs = live * ((1 - tt) * x0 + tt * x1) + (1 - live) * x1
        return FlowTargets(t=t, inputs=inputs, velocity=live * (x1 - x0), mask=mask,
                           continuous=tuple(getattr(model, "continuous", {})))

    def drop_condition(self, batch: TokenBatch, generator: torch.Generator | None = None) -> TokenBatch:
        """``batch`` with each row's condition dropped (mask all False) with probability ``condition_dropout``."""
        if batch.condition is None or self.condition_dropout == 0.0:
            return batch
        B, S = batch.condition.shape[:2]
        mask = batch.condition_mask if batch.condition_mask is not None else \
            torch.ones(B, S, dtype=torch.bool, device=batch.condition.device)
        keep = torch.rand(B, device=mask.device, generator=generator) >= self.condition_dropout
        return replace(batch, condition_mask=mask & keep[:, None])

    # ------------------------------------------------------------------ step and loss

    def step(self, model: nn.Module, batch: TokenBatch,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Noise the continuous targets, embed the time, run the model, return :meth:`loss`."""
        if bool((batch.segment_ids > 0).any()):
            raise ValueError("FlowMatchingObjective: a row packs several examples (segment_ids > 0), but flow "
                             "matching draws one time t per row; train it without `packing` (one example per row)")
        if model.training:
            batch = self.drop_condition(batch, generator)
        flow = self.flow_targets(model, batch, generator)
        ctx = self.context(batch, timestep=self.embed_time(model, flow.t))
        out = model(batch.input_ids, ctx, latents=flow.inputs if batch.latents is not None else None)
        return self.loss(out, batch, flow)

    @staticmethod
    def embed_time(model: nn.Module, t: Tensor) -> Tensor | None:
        """``model.embed_timestep(t)`` when the model is modulated, else None (a plain model ignores time)."""
        return model.embed_timestep(t) if getattr(model, "timestep_embedding", None) is not None else None

    def loss(self, output: ModelOutput, batch: TokenBatch,
             flow: FlowTargets | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted mean of the velocity losses and the next-token loss (module docstring).

        ``flow`` is the noise the model's input was built from (:meth:`flow_targets`); :meth:`step`
        passes it. Metrics: ``loss``, per continuous modality ``loss_<m>`` / ``tokens_<m>``, and the
        autoregressive metrics of the discrete modalities.
        """
        if flow is None:
            raise ValueError("FlowMatchingObjective.loss needs the flow targets the model input was noised with; "
                             "call objective.step(model, batch), which draws them")
        space = self.token_space
        hidden = output.hidden
        numer, denom, metrics = [], [], {}
        weight = batch.loss_mask * batch.example_weight
        for m in space.modalities:
            index = space.index(m)
            sel = flow.mask & (batch.modality_ids == index)
            if not bool(sel.any()):
                continue
            pred = output.logits(hidden[sel], m).float()
            width = pred.shape[-1]
            err = ((pred - flow.velocity[sel][:, :width].float()) ** 2).mean(-1)
            w = weight[sel].float()
            metrics[f"tokens_{m}"] = torch.tensor(float(sel.sum()))
            if float(w.sum()) <= 0:
                continue
            loss_m = (w * err).sum() / w.sum()
            metrics[f"loss_{m}"] = loss_m.detach()
            lam = self.discrete.weight(m)
            if lam > 0:
                numer.append(lam * loss_m)
                denom.append(lam)
        targets = self.discrete_targets(batch, flow.continuous)
        ar_loss, ar_metrics = self.discrete.loss_on_targets(output, targets)
        metrics.update({k: v for k, v in ar_metrics.items() if k != "loss" and not _is_empty_count(k, v, metrics)})
        lam_d = self.present_discrete_weight(targets)
        total_w = sum(denom) + lam_d
        loss = (sum(numer) + lam_d * ar_loss) / total_w if total_w > 0 else ar_loss  # ar_loss keeps the graph
        if total_w > 0 and lam_d == 0:
            loss = loss + 0.0 * ar_loss  # every head stays in the graph (DDP)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def discrete_targets(self, batch: TokenBatch, continuous: tuple[str, ...]):
        """Next-token targets restricted to discrete modalities; an error when a target could be seen
        by the position that predicts it (same bidirectional block, or ``causal=False``)."""
        targets = next_token_targets(batch)
        valid = targets.valid
        for m in continuous:
            valid = valid & (targets.modality != self.token_space.index(m))
        if bool(valid.any()):
            blocks = batch.block_ids
            next_block = torch.cat([blocks[:, 1:], torch.full_like(blocks[:, :1], NO_BLOCK)], dim=1)
            leak = valid & (blocks == next_block) & (blocks != NO_BLOCK)
            if not self.causal or bool(leak.any()):
                raise ValueError("FlowMatchingObjective: a discrete target lies where the position predicting it can "
                                 "see it (inside a bidirectional block, or causal=False); make such text an input "
                                 "segment (no loss) or move it out of the block")
        targets.valid = valid
        return targets

    def present_discrete_weight(self, targets) -> float:
        """``sum lambda_d`` over the discrete modalities with weighted targets in this batch."""
        total = 0.0
        for index, m in enumerate(self.token_space.modalities):
            sel = targets.valid & (targets.modality == index)
            if bool(sel.any()) and float(targets.weight[sel].sum()) > 0:
                total += self.discrete.weight(m)
        return total

    # ------------------------------------------------------------------ sampler

    @torch.no_grad()
    def generate(self, model: nn.Module, batch: TokenBatch, *, steps: int = 25, solver: str = "euler",
                 guidance: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Integrate ``dx/dt = v(x, t)`` from noise (``t = 0``) to data (``t = 1``) at the continuous target
        positions of ``batch``; returns ``latents [B, T, C]`` (the batch's own at other positions).

        ``steps`` uniform steps of ``dt = 1/steps``. ``solver="euler"``: ``x += dt v(x, t)``;
        ``"heun"``: ``x' = x + dt v(x, t)``, ``x += dt (v(x, t) + v(x', t + dt)) / 2`` (two evaluations
        per step). With ``guidance != 1``: ``v = v_u + g (v_c - v_u)``, ``v_u`` with the condition
        dropped (needs ``batch.condition``); ``g = 1`` evaluates the conditional model only.
        Deterministic for a given ``generator``. Runs the model in eval mode, restored afterwards.
        """
        return integrate(self, model, batch, steps=steps, solver=solver, guidance=guidance, generator=generator)


def _is_empty_count(key: str, value: Tensor, metrics: dict[str, Tensor]) -> bool:
    """Drop the AR objective's ``tokens_<m> = 0`` for a modality this objective already counted."""
    return key in metrics and key.startswith("tokens_") and float(value) == 0.0

