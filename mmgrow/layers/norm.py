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


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of channels, gated by ``silu(z)``: ``x, z [..., D] -> y [..., D]``.

    .. math::
        y = \\operatorname{RMSNorm}_g(x \\odot \\operatorname{silu}(z)) \\quad\\text{(Mamba-2, default)}, \\qquad
        y = \\operatorname{RMSNorm}_g(x) \\odot \\operatorname{silu}(z) \\quad\\text{(norm\\_before\\_gate, FLA's GDN)}

    ``RMSNorm_g`` normalises each group of ``group_size`` channels on its own (one group per head, so
    the output does not depend on how many heads there are) and multiplies by a learned gain ``[D]``.
    """

    def __init__(self, dim: int, group_size: int | None = None, norm_before_gate: bool = False,
                 eps: float = 1e-6) -> None:
        super().__init__()
        group_size = dim if group_size is None else group_size
        if group_size < 1 or dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size {group_size} must divide dim {dim}")
        self.dim = dim
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self) -> str:
        return f"{self.dim}, group_size={self.group_size}, norm_before_gate={self.norm_before_gate}, eps={self.eps:g}"

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if x.shape[-1] != self.dim or z.shape != x.shape:
            raise ValueError(f"GatedRMSNorm: expected x and z of shape [..., {self.dim}], got {tuple(x.shape)} "
                             f"and {tuple(z.shape)}")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        h, gate = x.to(compute), torch.nn.functional.silu(z.to(compute))
        if not self.norm_before_gate:
            h = h * gate
        groups = h.unflatten(-1, (self.dim // self.group_size, self.group_size))
        h = (groups * torch.rsqrt(groups.pow(2).mean(dim=-1, keepdim=True) + self.eps)).flatten(-2)
        if self.norm_before_gate:
            h = h * gate
        return (h * self.weight.to(compute)).to(x.dtype)
