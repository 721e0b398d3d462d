"""The short causal convolution that Mamba-2 and Gated DeltaNet put before their recurrences.

A depthwise ``nn.Conv1d``-shaped filter (kernel ``K``, default 4) with optional bias and SiLU. Its
decoding state is the conv tail: the last ``K - 1`` inputs and their segment ids (:class:`ConvTail`),
so chunked prefill and ``T == 1`` decoding reproduce one pass exactly, and packed rows never mix.
The maths is :func:`mmgrow.ops.short_conv.causal_depthwise_conv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmgrow.ops.short_conv import causal_depthwise_conv


@dataclass
class ConvTail:
    """inputs: ``[B, K-1, C]`` the last inputs, oldest first; segment_ids: ``[B, K-1]`` int64."""

    inputs: Tensor
    segment_ids: Tensor


class ShortConvolution(nn.Module):
    """``u [B, T, C] -> (act(conv(u)) [B, T, C], ConvTail)``; weight ``[C, K]``, bias ``[C]`` or None."""

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = True, activation: bool = True) -> None:
        super().__init__()
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1:
            raise ValueError(f"ShortConvolution: kernel_size must be a positive int, got {kernel_size!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv1d``'s default for a depthwise filter: U(-1/sqrt(K), 1/sqrt(K)) (fan-in = K)."""
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}, silu={self.activation}"

    def init_tail(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> ConvTail:
        """Zeros in segment 0 (a fresh sequence starts after zero inputs, as with left zero-padding)."""
        K1 = self.kernel_size - 1
        return ConvTail(torch.zeros(batch_size, K1, self.channels, device=device, dtype=dtype),
                        torch.zeros(batch_size, K1, dtype=torch.long, device=device))

    def forward(self, u: Tensor, segment_ids: Tensor | None, tail: ConvTail | None = None) -> tuple[Tensor, ConvTail]:
        if tail is None:  # zeros: whichever segment they are taken for, they add nothing
            tail = self.init_tail(u.shape[0], u.device, u.dtype)
        y, inputs, segs = causal_depthwise_conv(u, self.weight, self.bias, tail.inputs, tail.segment_ids, segment_ids)
        if self.activation:
            y = F.silu(y)
        return y, ConvTail(inputs, segs)
