"""SwiGLU feed-forward (Shazeer 2020, arXiv 2002.05202), the MLP of LLaMA-style blocks.

.. math::  \\operatorname{MLP}(x) = W_{down} \\big( \\operatorname{SiLU}(W_{gate} x) \\odot W_{up} x \\big)

**Blockwise feed-forward** (``chunk``, the Blockwise Parallel Transformer's second half): the MLP
acts on each token alone, so it can run over ``chunk`` tokens at a time. With gradients enabled each
chunk is recomputed in the backward pass (activation checkpointing), so the ``[T, hidden]``
intermediates never exist at once: activation memory ``O(chunk * hidden)`` instead of ``O(T * hidden)``,
for one extra MLP forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int = 8) -> int:
    """Hidden size ``ceil(mlp_ratio * dim)`` rounded up to a multiple of ``multiple_of``.

    The default ratio 8/3 keeps a SwiGLU (three matrices) at the parameter count of a 4x GELU MLP
    (two matrices); rounding to a multiple of 8 keeps matmuls aligned for tensor cores.
    """
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
    hidden = math.ceil(mlp_ratio * dim - 1e-9)  # 8/3 * 96 must give 256, not 257 from rounding noise
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLU(nn.Module):
    """``x [..., D] -> [..., D]`` through a gated hidden layer of size ``hidden``."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, chunk: int | None = None) -> None:
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"SwiGLU: chunk must be a positive number of tokens or None, got {chunk}")
        self.dim = dim
        self.hidden = hidden
        self.chunk = chunk
        self.w_gate = nn.Linear(dim, hidden, bias=bias)
        self.w_up = nn.Linear(dim, hidden, bias=bias)
        self.w_down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., T, D] -> [..., T, D]``; chunked over ``T`` when :attr:`chunk` is set."""
        if self.chunk is None or x.dim() < 2 or x.shape[-2] <= self.chunk:
            return self._mlp(x)
        pieces = x.split(self.chunk, dim=-2)
        if torch.is_grad_enabled() and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return torch.cat([checkpoint(self._mlp, p, use_reentrant=False) for p in pieces], dim=-2)
        return torch.cat([self._mlp(p) for p in pieces], dim=-2)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    def residual_outputs(self) -> list[nn.Linear]:
        """The projection writing into the residual stream (zeroed by function-preserving growth)."""
        return [self.w_down]
