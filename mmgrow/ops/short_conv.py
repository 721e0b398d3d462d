"""Short causal depthwise convolution with a carried tail and segment resets.

.. math::  y_t = b + \\sum_{i=0}^{K-1} w_{:, i} \\odot u_{t-K+1+i} \\,[\\mathrm{seg}_{t-K+1+i} = \\mathrm{seg}_t]

``w [C, K]`` follows ``nn.Conv1d``'s depthwise layout (``w[:, K-1]`` weighs the current token), so
weights load from and into Mamba / causal-conv1d checkpoints unchanged. Inputs before the first token
come from the ``tail`` (the last ``K - 1`` inputs of the previous call, zeros for a fresh sequence);
the bracket stops the convolution at packed-segment boundaries, including boundaries inside the tail
(a segment "starts" wherever the id differs from the previous token's, exactly where the recurrent
mixers reset their state).
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_depthwise_conv(u: Tensor, weight: Tensor, bias: Tensor | None, tail: Tensor, tail_segments: Tensor,
                          segments: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``u [B, T, C]`` -> ``(y [B, T, C], new tail [B, K-1, C], new tail segments [B, K-1])``.

    Args:
        weight: ``[C, K]``; bias: ``[C]`` or None.
        tail: ``[B, K-1, C]`` previous inputs, oldest first; tail_segments: ``[B, K-1]`` their segment ids.
        segments: ``[B, T]`` segment ids or None (one segment, id 0). A token sees the inputs back to the
            latest segment start (a change of id between neighbours, the tail included).
    """
    B, T, C = u.shape
    K = weight.shape[1]
    if weight.shape[0] != C or tail.shape != (B, K - 1, C) or tail_segments.shape != (B, K - 1):
        raise ValueError(f"causal_depthwise_conv: u {tuple(u.shape)}, weight {tuple(weight.shape)}, tail "
                         f"{tuple(tail.shape)}, tail_segments {tuple(tail_segments.shape)}; expected weight [C, K], "
                         "tail [B, K-1, C] and tail_segments [B, K-1]")
    ext = torch.cat([tail.to(u.dtype), u], dim=1)  # [B, K-1+T, C]
    if segments is None:  # an unpacked row is segment 0 (as for the recurrences' resets)
        segments = torch.zeros(B, T, dtype=torch.long, device=u.device)
    ext_seg = torch.cat([tail_segments.to(segments.device), segments], dim=1)
    # Token t sees input s when no segment starts in (s, t]: compare run counters, not ids, so an
    # old segment in the tail with the same id as the new token (ids restart per call) stays hidden.
    starts = torch.zeros_like(ext_seg)
    starts[:, 1:] = (ext_seg[:, 1:] != ext_seg[:, :-1]).long()
    run = torch.cumsum(starts, dim=1)
    current = run[:, K - 1:]
    # K is small (4): one masked slice per tap is as fast as conv1d on CPU and handles the bracket.
    y = torch.zeros_like(u)
    for i in range(K):
        same = (run[:, i:i + T] == current)[..., None].to(u.dtype)
        y = y + weight[:, i].to(u.dtype) * ext[:, i:i + T] * same
    if bias is not None:
        y = y + bias.to(u.dtype)
    new_tail = ext[:, ext.shape[1] - (K - 1):]
    return y, new_tail, ext_seg[:, ext_seg.shape[1] - (K - 1):]


def causal_conv_reference(u: Tensor, weight: Tensor, bias: Tensor | None, segments: Tensor) -> Tensor:
    """Per-token loop of the equation above from a fresh (zero) tail: the float64 test oracle."""
    B, T, _C = u.shape
    K = weight.shape[1]
    y = torch.zeros_like(u)
    for b in range(B):
        for t in range(T):
            for i in range(K):
                s = t - K + 1 + i
                if s >= 0 and segments[b, s] == segments[b, t]:
                    y[b, t] = y[b, t] + weight[:, i] * u[b, s]
            if bias is not None:
                y[b, t] = y[b, t] + bias
    return y
