"""A catalogue of mask situations every attention backend is tested on (CPU suite and GPU checks).

Each case is the per-token facts of ``B = 2`` rows (:class:`~mmgrow.ops.token_meta.TokenMeta`) and a
:class:`~mmgrow.protocols.MaskSpec`: causal, bidirectional, windows, bidirectional blocks under a
causal mask, packed segments with padding (fully masked rows), local blocks with and without a
shared prefix, and mixes of them, at an odd length by default so no tile divides it.
"""

from __future__ import annotations

import itertools

import torch

from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec


def _packed(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: three documents then padding; row 1: one document then padding."""
    cuts = [0, T // 4, T // 4 + T // 3, T - 3, T]
    seg = torch.empty(2, T, dtype=torch.long)
    pos = torch.empty(2, T, dtype=torch.long)
    for d, (a, b) in enumerate(itertools.pairwise(cuts)):
        seg[0, a:b] = d
        pos[0, a:b] = torch.arange(b - a)
    seg[0, T - 3:] = PAD_SEGMENT
    seg[1] = 0
    seg[1, T - 5:] = PAD_SEGMENT
    pos[1] = torch.arange(T)
    return seg, pos


def _blocks(T: int, start: int, size: int) -> torch.Tensor:
    """Text prefix of ``start`` tokens (``NO_BLOCK``), then blocks of ``size`` tokens (a frame each)."""
    blk = torch.full((2, T), NO_BLOCK, dtype=torch.long)
    for i, a in enumerate(range(start, T, size)):
        blk[:, a:a + size] = i
    blk[1, T - 2:] = NO_BLOCK  # row 1 ends with two text tokens after the video
    return blk


def mask_cases(T: int = 37, window: int = 5) -> dict[str, tuple[TokenMeta, MaskSpec]]:
    """``{name: (facts, spec)}`` for ``B = 2`` rows of ``T`` tokens (``T >= 16``)."""
    if T < 16:
        raise ValueError(f"mask_cases needs T >= 16, got {T}")
    index = torch.arange(T).expand(2, T)
    seg, seg_pos = _packed(T)
    blk = _blocks(T, 3, 6)
    plain = TokenMeta(index, index)
    packed = TokenMeta(index, seg_pos, seg)
    framed = TokenMeta(index, index, None, blk)
    both = TokenMeta(index, seg_pos, seg, blk)
    return {
        "causal": (plain, MaskSpec(causal=True)),
        "bidirectional": (plain, MaskSpec(causal=False)),
        "causal window": (plain, MaskSpec(causal=True, window=window)),
        "symmetric window": (plain, MaskSpec(causal=False, window=window)),
        "window 1 (only itself)": (plain, MaskSpec(causal=True, window=1)),
        "segments + padding": (packed, MaskSpec(causal=True)),
        "bidirectional segments": (packed, MaskSpec(causal=False)),
        "segments + window": (packed, MaskSpec(causal=True, window=window)),
        "block-causal frames": (framed, MaskSpec(causal=True)),
        "blocks + segments + window": (both, MaskSpec(causal=True, window=window + 2)),
        "local blocks": (framed, MaskSpec(causal=True, local=True)),
        "local blocks + shared prefix": (framed, MaskSpec(causal=True, local=True, shared_prefix=True)),
        "bidirectional local + prefix": (framed, MaskSpec(causal=False, local=True, shared_prefix=True)),
    }
