"""Masks of masked structural growth (MSG, Yao et al. 2024, arXiv 2305.02869).

A structure added by growth (a block, FFN units, attention heads) has its output multiplied by a
mask ``m`` that a callback ramps from 0 to 1 (:class:`~mmgrow.training.growth_ramp.GrowthMaskRamp`).
At ``m = 0`` the new structure contributes exactly 0 whatever its weights, so growth preserves the
function bit for bit; as ``m`` rises the new weights take part smoothly.

:class:`GrowthMask` holds ``is_new [n]`` (which units are new) and the ramp value ``m`` as buffers,
so a checkpoint taken mid-ramp resumes at the same mask. It multiplies the last dimension of its
input by ``where(is_new, m, 1)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GrowthMask(nn.Module):
    """``x [..., n] -> x * where(is_new, value, 1)``; ``n = 1`` masks a whole branch (broadcast)."""

    def __init__(self, is_new: Tensor, value: float = 0.0) -> None:
        super().__init__()
        if is_new.dim() != 1 or is_new.dtype != torch.bool:
            raise ValueError(f"GrowthMask: is_new must be a 1-D bool tensor, got {is_new.dtype} {tuple(is_new.shape)}")
        self.register_buffer("is_new", is_new.clone())
        self.register_buffer("value", torch.tensor(float(value)))

    @classmethod
    def whole(cls, value: float = 0.0) -> GrowthMask:
        """A mask for one new structure (a block): one unit, new."""
        return cls(torch.ones(1, dtype=torch.bool), value)

    def extra_repr(self) -> str:
        return f"units={self.is_new.numel()}, new={int(self.is_new.sum())}, value={float(self.value):g}"

    def set_value(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"GrowthMask: value must be in [0, 1], got {value}")
        self.value.fill_(value)

    def factors(self, dtype: torch.dtype) -> Tensor:
        """``[n]`` multipliers: ``value`` on new units, 1 on old ones."""
        one = torch.ones((), dtype=dtype, device=self.value.device)
        return torch.where(self.is_new, self.value.to(dtype), one)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factors(x.dtype)
