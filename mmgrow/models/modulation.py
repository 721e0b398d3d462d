"""adaLN modulation of a diffusion block's branches from the timestep embedding.

Each modulated branch ``f`` (the mixer, the MLP) of a block becomes

.. math::

    x \\leftarrow x + g \\odot f\\big(\\operatorname{norm}(x) \\odot (1 + s) + b\\big)

with a shift ``b``, scale ``s`` and gate ``g`` per branch and per channel, computed from the
conditioning vector ``ctx.timestep``. Two schemes differ in where those numbers come from — which
matters for function-preserving growth:

- :class:`AdaLNZero` (DiT, Peebles & Xie 2023): each block owns ``Linear(SiLU(t)) -> [3 K, D]``,
  zero-initialised, so every gate is 0 and the block is the identity at initialisation. Zeroing this
  linear (weight and bias) zeroes the block's gates.
- :class:`AdaLNSingle` (PixArt-α, Open-Sora STDiT3): one projection of ``t`` is shared by all blocks
  (computed once by the model and passed as ``ctx.timestep [B, 3 K D]``); each block adds its own
  learned table ``[3 K, D]``. Zeroing a block's table does **not** zero its gates — they still get
  the shared projection — which is why growth zeroes output projections, not gates.

``K`` is the number of modulated branches (2: mixer and MLP). Output layout: ``[B, K, 3, D]`` with
``[:, k, 0] = shift``, ``[:, k, 1] = scale``, ``[:, k, 2] = gate`` of branch ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmgrow.protocols import SeqContext

BRANCHES = 2
"""Modulated branches per block: 0 = the mixer, 1 = the MLP."""


def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``h [B, T, D] * (1 + scale [B, D]) + shift [B, D]``."""
    return h * (1 + scale[:, None, :]) + shift[:, None, :]


def _timestep(ctx: SeqContext, name: str, width: int) -> Tensor:
    t = ctx.timestep
    if t is None:
        raise ValueError(f"{name}: the block is modulated but ctx.timestep is None; pass the timestep embedding "
                         f"[B, {width}]")
    if t.dim() != 2 or t.shape[1] != width or t.shape[0] != ctx.batch_size:
        raise ValueError(f"{name}: ctx.timestep must be [B={ctx.batch_size}, {width}], got {tuple(t.shape)}")
    return t


class AdaLNZero(nn.Module):
    """Per-block ``SiLU -> Linear(cond_dim, 3 K D)``, zero-initialised: ``ctx -> [B, K, 3, D]``."""

    def __init__(self, dim: int, cond_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.cond_dim = cond_dim
        self.proj = nn.Linear(cond_dim, BRANCHES * 3 * dim)
        self.init_weights()

    def init_weights(self, init_std: float | None = None) -> None:
        """Zero weight and bias: every gate, shift and scale is 0 at initialisation."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @property
    def timestep_width(self) -> int:
        """Width of the ``ctx.timestep`` this module reads."""
        return self.cond_dim

    def forward(self, ctx: SeqContext) -> Tensor:
        t = _timestep(ctx, "AdaLNZero", self.cond_dim)
        return self.proj(F.silu(t)).view(-1, BRANCHES, 3, self.dim)

    def gate_parameters(self) -> list[Tensor]:
        """The tensors that produce this block's gates (rows of the projection)."""
        return [self.proj.weight.view(BRANCHES, 3, self.dim, -1)[:, 2], self.proj.bias.view(BRANCHES, 3, self.dim)[:, 2]]


class AdaLNSingle(nn.Module):
    """Per-block table ``[K, 3, D]`` added to the shared projection ``ctx.timestep [B, 3 K D]``."""

    def __init__(self, dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.table = nn.Parameter(torch.empty(BRANCHES, 3, dim))
        self.init_weights()

    def init_weights(self, init_std: float | None = None) -> None:
        """``N(0, 1/D)`` as PixArt-α's ``scale_shift_table`` (``randn / sqrt(D)``)."""
        with torch.no_grad():
            self.table.normal_(0.0, self.dim ** -0.5)

    @property
    def timestep_width(self) -> int:
        """Width of the shared projection in ``ctx.timestep``: ``3 K D``."""
        return BRANCHES * 3 * self.dim

    def forward(self, ctx: SeqContext) -> Tensor:
        t = _timestep(ctx, "AdaLNSingle", self.timestep_width)
        return t.view(-1, BRANCHES, 3, self.dim) + self.table.to(t.dtype)

    def gate_parameters(self) -> list[Tensor]:
        return [self.table[:, 2]]


MODULATIONS: dict[str, type[nn.Module]] = {"adaln_zero": AdaLNZero, "adaln_single": AdaLNSingle}


@dataclass
class ModulationConfig:
    """A model's modulation (``model.modulation`` in recipes).

    kind: ``"adaln_zero"`` (per-block projection of ``ctx.timestep [B, cond_dim]``) or
        ``"adaln_single"`` (per-block table added to the shared ``ctx.timestep [B, 6 D]``).
    cond_dim: width of ``ctx.timestep`` for ``adaln_zero`` (ignored by ``adaln_single``).
    """

    kind: str = "adaln_zero"
    cond_dim: int = 256

    def build(self, dim: int) -> nn.Module:
        if self.kind not in MODULATIONS:
            raise ValueError(f"ModulationConfig: kind must be one of {sorted(MODULATIONS)}, got {self.kind!r}")
        return MODULATIONS[self.kind](dim, self.cond_dim)
