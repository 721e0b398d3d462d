"""Dense softmax attention: the float64-capable oracle every attention backend is tested against.

.. math::

    s_{ij} = \\text{scale} \\cdot q_i \\cdot k_j \\quad (j \\text{ visible}), \\qquad
    \\text{lse}_i = \\log \\sum_j e^{s_{ij}}, \\qquad
    o_i = \\sum_j e^{s_{ij} - \\text{lse}_i} \\, v_j

A query row with no visible key has ``o_i = 0`` and ``lse_i = -inf``; forward *and* backward stay
free of NaN (the usual ``softmax`` of an all ``-inf`` row is ``0/0``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain softmax attention with a boolean mask and grouped-query heads.

    Args:
        q: ``[B, H, Tq, hd]`` queries.
        k: ``[B, Hk, Tk, hd]`` keys; ``H`` must be a multiple of ``Hk`` (query head ``h`` uses key
            head ``h // (H // Hk)``, as in GQA).
        v: ``[B, Hk, Tk, hd_v]`` values.
        mask: ``[B, Tq, Tk]`` bool, True = key visible, or None (everything visible).
        scale: score scale, default ``1 / sqrt(hd)``.

    Returns:
        ``(out [B, H, Tq, hd_v], lse [B, H, Tq])`` in the dtype of ``q``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"dense_attention: q, k, v must be [B, H, T, hd], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, hd = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    if H % Hk != 0:
        raise ValueError(f"dense_attention: query heads ({H}) must be a multiple of key/value heads ({Hk})")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"dense_attention: v {tuple(v.shape)} does not match k {tuple(k.shape)} in [B, Hk, Tk]")
    if mask is not None and tuple(mask.shape) != (B, Tq, Tk):
        raise ValueError(f"dense_attention: mask must be [B, Tq, Tk] = {(B, Tq, Tk)}, got {tuple(mask.shape)}")
    scale = 1.0 / math.sqrt(hd) if scale is None else scale

    group = H // Hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))

    # Subtract a finite row maximum (0 for empty rows, detached: it cancels mathematically), so
    # exp() never sees -inf - -inf; then divide by a denominator that is never 0.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # masked entries are exactly 0
    denom = weights.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))
    out = torch.matmul(weights / safe_denom, v)
    lse = torch.where(nonempty, torch.log(safe_denom) + row_max, torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1)
