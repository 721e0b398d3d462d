"""Root-mean-square layer norm (Zhang & Sennrich 2019, arXiv 1910.07467).

.. math::  y = \\frac{x}{\\sqrt{\\operatorname{mean}(x^2) + \\epsilon}} \\odot g

Our own ten lines rather than timm's ``RmsNorm``: timm's fits functionally, but importing it costs
seconds per process (``mmgrow.layers`` is imported whenever a model is built) and would buy nothing.
The statistics are computed in at least float32, so a bf16/fp16 model normalises as precisely as a
float32 one; float64 stays float64 for the oracle tests.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``x [..., D] -> y [..., D]`` with a learned gain ``weight [D]`` initialised to ones."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps:g}"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm: expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        compute = x if x.dtype == torch.float64 else x.float()
        y = compute * torch.rsqrt(compute.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(compute.dtype)).to(x.dtype)
