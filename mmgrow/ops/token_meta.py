"""Masks as data: the per-token facts an attention mask is computed from, and cheap tile tests.

A backend never receives a ``[T, T]`` mask. It receives, for its queries and for its keys, a
:class:`TokenMeta` (stream index, position, segment id, block id per token) plus the
:class:`~mmgrow.protocols.MaskSpec`, and evaluates the rule of :mod:`mmgrow.layers.masks` only on
the ``[bq, bk]`` tiles it computes. Because the facts are per token, they can be sliced into
blocks, sharded over ranks and sent around a ring like the keys themselves.

:func:`tile_visibility` decides from per-chunk summaries (min/max of each fact) which tiles can
hold a visible pair. It is conservative: *skip* is only answered when no pair of the tile can be
visible, so skipping never changes the result; *full* is only answered when every pair is visible,
so the mask can be left out of that tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmgrow.layers.masks import attention_mask
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec, SeqContext

_BIG = 2**62


@dataclass
class TokenMeta:
    """Per-token mask facts of ``B`` rows of ``T`` tokens (all ``[B, T]`` int64).

    index:       place of the token in the whole stream (what causality compares; global under
                 sequence sharding, offset by the cache under decoding);
    positions:   position within the packed example (what the window compares);
    segment_ids: packed-example ids (:data:`PAD_SEGMENT` = padding) or None (one segment);
    block_ids:   bidirectional-block ids (:data:`NO_BLOCK` = none) or None (no blocks).
    """

    index: Tensor
    positions: Tensor
    segment_ids: Tensor | None = None
    block_ids: Tensor | None = None

    @classmethod
    def from_context(cls, ctx: SeqContext, index: Tensor | None = None) -> TokenMeta:
        """The facts of the tokens of ``ctx``; the stream index defaults to ``0 .. T-1``, or to this
        rank's indices of the whole sequence when ``ctx.cp`` shards it."""
        B, T = ctx.positions.shape
        device = ctx.positions.device
        if index is None:
            if ctx.cp is not None and ctx.cp.world_size > 1:
                from mmgrow.parallel.sharding import local_stream_index

                index = local_stream_index(ctx.cp, T, device=device)
            else:
                index = torch.arange(T, device=device)
        if index.dim() == 1:
            index = index.expand(B, T)
        return cls(index, ctx.positions, ctx.segment_ids, ctx.block_ids)

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def slice(self, start: int, end: int) -> TokenMeta:
        """The facts of tokens ``[start, end)``."""
        return TokenMeta(*(None if t is None else t[:, start:end] for t in self.tensors()))

    def tensors(self) -> tuple[Tensor | None, ...]:
        return (self.index, self.positions, self.segment_ids, self.block_ids)


def tile_mask(q: TokenMeta, k: TokenMeta, spec: MaskSpec) -> Tensor:
    """``[B, Tq, Tk]`` bool: the exact mask between the queries ``q`` and the keys ``k``."""
    return attention_mask(q.positions, k.positions, spec, q.segment_ids, k.segment_ids,
                          q.block_ids, k.block_ids, q.index, k.index)


@dataclass
class ChunkSummary:
    """Min/max of every fact over consecutive chunks of ``chunk`` tokens: tensors ``[B, n]``."""

    index_min: Tensor
    index_max: Tensor
    pos_min: Tensor
    pos_max: Tensor
    seg_min: Tensor | None      # over non-padding tokens (+BIG when all padding)
    seg_max: Tensor | None
    seg_has_pad: Tensor | None
    block_min: Tensor | None    # over tokens inside a block (+BIG when none)
    block_max: Tensor | None
    has_noblock: Tensor | None  # some token outside every block

    @classmethod
    def of(cls, meta: TokenMeta, chunk: int) -> ChunkSummary:
        return cls(*_minmax(meta.index, chunk), *_minmax(meta.positions, chunk),
                   *_masked_minmax(meta.segment_ids, chunk, PAD_SEGMENT),
                   *_masked_minmax(meta.block_ids, chunk, NO_BLOCK))


def tile_visibility(q: ChunkSummary, k: ChunkSummary, spec: MaskSpec) -> tuple[Tensor, Tensor]:
    """``(may, full)``, each ``[nq, nk]`` bool over all rows: ``may`` is False only for tiles with no
    visible pair (safe to skip); ``full`` is True only for tiles where every pair is visible."""
    def qk(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:  # [B, nq, 1], [B, 1, nk]
        return a[:, :, None], b[:, None, :]

    qi_min, ki_min = qk(q.index_min, k.index_min)
    qi_max, ki_max = qk(q.index_max, k.index_max)
    may = torch.ones_like(qi_min == ki_min)
    full = torch.ones_like(may)
    if q.seg_min is not None:
        qs_min, ks_min = qk(q.seg_min, k.seg_min)
        qs_max, ks_max = qk(q.seg_max, k.seg_max)
        may = may & (qs_min <= ks_max) & (ks_min <= qs_max)
        qpad, kpad = qk(q.seg_has_pad, k.seg_has_pad)
        full = full & (qs_min == qs_max) & (qs_max == ks_min) & (ks_min == ks_max) & ~qpad & ~kpad
    blocks_meet = None
    if q.block_min is not None:
        qb_min, kb_min = qk(q.block_min, k.block_min)
        qb_max, kb_max = qk(q.block_max, k.block_max)
        blocks_meet = (qb_min <= kb_max) & (kb_min <= qb_max)
    if spec.causal:
        before = ki_min <= qi_max
        may = may & (before if blocks_meet is None else before | blocks_meet)
        full = full & (ki_max <= qi_min)
    if spec.window is not None:
        qp_min, kp_min = qk(q.pos_min, k.pos_min)
        qp_max, kp_max = qk(q.pos_max, k.pos_max)
        may = may & (kp_min - qp_max < spec.window) & (qp_min - kp_max < spec.window)
        full = full & (qp_max - kp_min < spec.window) & (kp_max - qp_min < spec.window)
    if spec.local and blocks_meet is not None:
        q_free, k_free = qk(q.has_noblock, k.has_noblock)
        reach = blocks_meet | q_free
        if spec.shared_prefix:
            reach = reach | k_free
        may = may & reach
        full = torch.zeros_like(full)  # local tiles always get their exact mask
    return may.any(dim=0), full.all(dim=0)


def _pad_to_chunks(x: Tensor, chunk: int) -> Tensor:
    """``[B, T]`` -> ``[B, n, chunk]``, the last chunk filled with copies of the last token
    (copies change no min or max)."""
    B, T = x.shape
    n = -(-T // chunk)
    if n * chunk != T:
        x = torch.cat((x, x[:, -1:].expand(B, n * chunk - T)), dim=1)
    return x.view(B, n, chunk)


def _minmax(x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    c = _pad_to_chunks(x, chunk)
    return c.amin(-1), c.amax(-1)


def _masked_minmax(x: Tensor | None, chunk: int, ignore: int) -> tuple[Tensor | None, ...]:
    if x is None:
        return None, None, None
    c = _pad_to_chunks(x, chunk)
    skip = c == ignore
    lo = torch.where(skip, torch.full_like(c, _BIG), c).amin(-1)
    hi = torch.where(skip, torch.full_like(c, -_BIG), c).amax(-1)
    return lo, hi, skip.any(-1)
