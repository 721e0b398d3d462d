"""Time reversal of a row and its :class:`~mmgrow.protocols.SeqContext`, for bidirectional scans.

A causal scan run over the reversed row sees, at each token, everything that comes *after* it. For
packed rows, reversing the whole row reverses the order of the segments too; that is harmless
because every segment is processed on its own (recurrent mixers reset at segment boundaries). The
positions are re-counted so that each reversed segment again counts up by one from where the
original segment started: ``p' = first + last - p`` for a segment holding positions
``first .. last``. A mixer that aligns work to positions (TTT mini-batches) therefore starts its
reversed pass at the reversed segment's first token, as the TTT-video model does.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from mmgrow.protocols import SeqContext


def reverse_positions(positions: Tensor, segment_ids: Tensor | None) -> Tensor:
    """``positions [B, T]`` -> the positions of the time-reversed row, in the *original* token order
    (flip the result along T to get the reversed row's positions)."""
    B, T = positions.shape
    if T == 0:
        return positions.clone()
    seg = segment_ids if segment_ids is not None else torch.zeros_like(positions)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    run = torch.cumsum(starts.long(), dim=1) - 1  # [B, T] index of each token's segment run
    big = torch.iinfo(positions.dtype).max
    first = torch.full((B, T), big, dtype=positions.dtype, device=positions.device)
    first = first.scatter_reduce(1, run, positions, reduce="amin")
    last = torch.full((B, T), -big, dtype=positions.dtype, device=positions.device)
    last = last.scatter_reduce(1, run, positions, reduce="amax")
    return first.gather(1, run) + last.gather(1, run) - positions


def reverse_context(ctx: SeqContext) -> SeqContext:
    """The context of the row flipped along time: every per-token field flipped, positions re-counted."""
    flipped = {}
    for name in SeqContext._PER_TOKEN:
        value = getattr(ctx, name)
        flipped[name] = value.flip(1) if value is not None else None
    flipped["positions"] = reverse_positions(ctx.positions, ctx.segment_ids).flip(1)
    return replace(ctx, **flipped)


def reverse_time(x: Tensor) -> Tensor:
    """``x [B, T, ...]`` flipped along T."""
    return x.flip(1)
