"""Sliding-window self-attention in ``O(T * W)`` time and memory, computed chunk by chunk.

The window rule (:class:`~mmgrow.protocols.MaskSpec`) lets query ``i`` see key ``j`` only when
``|positions[i] - positions[j]| < W``. When positions advance by at least one per token inside every
segment, a visible key is therefore fewer than ``W`` *places* away from its query, so cutting the
``T`` tokens into ``n = ceil(T / W)`` chunks of ``W`` and letting chunk ``c`` attend to chunks
``c - 1, c`` (and ``c + 1`` when later tokens can be visible: ``causal=False``, bidirectional
blocks, or stream indices that do not grow along the row) loses no visible pair:

.. math::

    S_c = \\text{scale}\\, Q_c\\, [K_{c-1}; K_c; K_{c+1}]^\\top \\ (\\text{masked} \\to -\\infty), \\quad
    \\text{lse}_c = \\log \\textstyle\\sum_j e^{S_c}, \\quad O_c = e^{S_c - \\text{lse}_c} [V_{c-1}; V_c; V_{c+1}]

All chunks are computed at once on ``[B, Hk, g, n, W, 2W | 3W]`` scores (a window of at least
``T`` is one unpadded chunk of ``T`` tokens). The mask of each chunk is
the exact rule (:func:`~mmgrow.ops.token_meta.tile_mask`) evaluated on the gathered per-token facts,
so segments, bidirectional blocks, local blocks and causality are honoured exactly; the keys of the
chunks before the first and after the last are padding (``PAD_SEGMENT``) and never visible. Rows
with no visible key give ``0`` and ``lse = -inf`` without NaN, forward and backward (as
:func:`~mmgrow.ops.attention_ref.dense_attention`). Autograd runs through these tensor ops, so the
backward keeps the ``O(T * W)`` probabilities.

**Which kernel** (:func:`windowed_attention`, what the ``sliding_window`` mixer calls): for windows of
at least :data:`TILED_FROM` tokens, the tiled kernel of :mod:`mmgrow.ops.blockwise` with tiles of
``min(W, 512)`` tokens, whose tile plan keeps exactly the diagonal tile and the ones the window
reaches — the same ``O(T * W)`` work, but a fixed working set (time linear in ``T``, no cache
blow-up) and a recomputing backward (memory ``O(T * tile)``); for smaller windows the vectorised
chunks of :func:`sliding_window_attention`, where a Python loop over many tiny tiles would cost more
than the arithmetic (measured in ``docs/benchmarks.md``).

**Fallback.** When positions do *not* advance by at least one per token within a segment (e.g.
all positions 0, or positions that repeat), a visible key may lie further than ``W`` places away;
then the call is handed to :func:`mmgrow.ops.blockwise.blockwise_attention`, exact for any facts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmgrow.ops.blockwise import DEFAULT_BLOCK, accumulation_dtype, blockwise_attention
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec

TILED_FROM = 128
"""Windows of at least this many tokens run on the tiled kernel (see the module docstring)."""


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, meta: TokenMeta, spec: MaskSpec, *,
                       scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Exact self-attention under ``spec`` (``spec.window`` required) in ``O(T * W)``: on CPU the tiled
    kernel for windows of :data:`TILED_FROM` tokens or more, the vectorised chunks below and on CUDA
    (where the mixers normally run FlexAttention instead). Same contract as
    :func:`sliding_window_attention`."""
    if spec.window is None:
        raise ValueError("windowed_attention: spec.window is None; expected a window")
    if spec.window >= TILED_FROM and not q.is_cuda:  # on a GPU, a few large kernels beat a loop of tiles
        tile = min(spec.window, DEFAULT_BLOCK)
        return blockwise_attention(q, k, v, meta, meta, spec, scale=scale, q_block=tile, k_block=tile)
    return sliding_window_attention(q, k, v, meta, spec, scale=scale)


def positions_advance(meta: TokenMeta) -> Tensor:
    """0-d bool tensor: inside every segment, ``positions[t2] - positions[t1] >= t2 - t1`` for all
    places ``t1 < t2`` of one row (``positions - place`` never decreases). Padding is ignored.

    This is what makes a window of ``W`` positions a window of at most ``W`` places."""
    T = meta.positions.shape[1]
    drift = meta.positions - torch.arange(T, device=meta.positions.device)
    if meta.segment_ids is None:
        return (drift[:, 1:] >= drift[:, :-1]).all()
    # Gather each segment's tokens in place order (a stable sort by segment id), then compare neighbours
    # of one segment: this also covers segments whose tokens are not contiguous.
    seg, order = torch.sort(meta.segment_ids, dim=1, stable=True)
    drift = drift.gather(1, order)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != PAD_SEGMENT)
    return ((drift[:, 1:] >= drift[:, :-1]) | ~same).all()


def _later_keys_visible(meta: TokenMeta, spec: MaskSpec) -> Tensor:
    """0-d bool tensor: a key at a later place than its query can be visible (so chunk ``c + 1`` is needed)."""
    if not spec.causal:
        return torch.ones((), dtype=torch.bool, device=meta.index.device)
    index_not_growing = (meta.index[:, 1:] <= meta.index[:, :-1]).any()
    if meta.block_ids is None:
        return index_not_growing
    return index_not_growing | (meta.block_ids != NO_BLOCK).any()


def _pad_facts(meta: TokenMeta, length: int) -> TokenMeta:
    """Facts padded to ``length`` places; the added places are padding tokens (``PAD_SEGMENT``)."""
    B, T = meta.positions.shape
    extra = length - T
    device = meta.positions.device
    seg = meta.segment_ids if meta.segment_ids is not None else torch.zeros_like(meta.positions)

    def pad(x: Tensor, value: int) -> Tensor:
        return torch.cat((x, torch.full((B, extra), value, dtype=x.dtype, device=device)), dim=1)

    return TokenMeta(
        index=pad(meta.index, 0), positions=pad(meta.positions, 0), segment_ids=pad(seg, PAD_SEGMENT),
        block_ids=None if meta.block_ids is None else pad(meta.block_ids, NO_BLOCK),
    )


def _neighbour_chunks(x: Tensor, dim: int, fill: float, offsets: tuple[int, ...]) -> Tensor:
    """``x [..., n, W, ...]`` (chunks along ``dim``, chunk size right after it) -> for every chunk
    ``c`` the chunks ``c + o`` (``o`` in ``offsets``, each ``-1``, ``0`` or ``1``) concatenated
    along ``dim + 1``; the chunks before the first and after the last are filled with ``fill``."""
    n = x.shape[dim]
    edge = torch.full_like(x.narrow(dim, 0, 1), fill)
    shifted = {-1: lambda: torch.cat((edge, x.narrow(dim, 0, n - 1)), dim=dim), 0: lambda: x,
               1: lambda: torch.cat((x.narrow(dim, 1, n - 1), edge), dim=dim)}
    return torch.cat([shifted[o]() for o in offsets], dim=dim + 1)


def _chunk_mask(meta: TokenMeta, spec: MaskSpec, chunk: int, offsets: tuple[int, ...]) -> Tensor:
    """``[B, n, chunk, len(offsets) * chunk]`` bool: the exact rule between each chunk's queries and its keys."""
    B, Tp = meta.positions.shape
    n = Tp // chunk
    pad_fill = {0: 0, 1: 0, 2: PAD_SEGMENT, 3: NO_BLOCK}  # index, positions, segments, blocks
    q_facts, k_facts = [], []
    for i, fact in enumerate(meta.tensors()):
        if fact is None:
            q_facts.append(None)
            k_facts.append(None)
            continue
        chunks = fact.view(B, n, chunk)
        q_facts.append(chunks.reshape(B * n, chunk))
        k_facts.append(_neighbour_chunks(chunks, 1, pad_fill[i], offsets).reshape(B * n, -1))
    mask = tile_mask(TokenMeta(*q_facts), TokenMeta(*k_facts), spec)
    return mask.view(B, n, chunk, -1)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, meta: TokenMeta, spec: MaskSpec, *,
                             scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Exact self-attention under a window mask in ``O(T * W)``: ``(out, lse)``.

    Args:
        q: ``[B, H, T, hd]`` queries; k, v: ``[B, Hk, T, hd]`` keys/values of the *same* ``T``
            tokens (``H`` a multiple of ``Hk``: grouped-query heads, K/V never repeated).
        meta: the facts of those tokens (:class:`TokenMeta`: stream index, positions, segments, blocks).
        spec: the mask rule; ``spec.window = W`` is required.
        scale: score scale, default ``1 / sqrt(hd)``.

    Returns:
        ``out [B, H, T, hd]`` in ``q``'s dtype and ``lse [B, H, T]`` in float32 (float64 for float64
        input); rows with no visible key give ``0`` and ``-inf``. Scores accumulate in float32 for
        low-precision inputs. When positions do not advance within a segment (see
        :func:`positions_advance`) the result comes from :func:`blockwise_attention` instead (exact,
        ``O(T * block)`` memory, time proportional to the tiles the mask does not empty).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"sliding_window_attention: expected q [B, H, T, hd], k and v [B, Hk, T, hd]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, hd = q.shape
    Hk = k.shape[1]
    if k.shape[2] != T or meta.length != T:
        raise ValueError(f"sliding_window_attention: self-attention needs as many keys and token facts as queries; "
                         f"got {T} queries, {k.shape[2]} keys, facts for {meta.length} tokens")
    if H % Hk != 0:
        raise ValueError(f"sliding_window_attention: query heads ({H}) must be a multiple of key/value heads ({Hk})")
    if spec.window is None:
        raise ValueError("sliding_window_attention: spec.window is None; expected a window (use "
                         "blockwise_attention or dense_attention without one)")
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    n = -(-T // spec.window)
    chunk = spec.window if n > 1 else T  # a window longer than the sequence: one chunk of T tokens, unpadded
    offsets: tuple[int, ...] = (0,)  # a single chunk holds every key
    if n > 1:
        advance, later = torch.stack((positions_advance(meta), _later_keys_visible(meta, spec))).tolist()  # 1 sync
        if not advance:
            return blockwise_attention(q, k, v, meta, meta, spec, scale=scale)
        offsets = (-1, 0, 1) if later else (-1, 0)
    Tp = n * chunk
    acc = accumulation_dtype(q.dtype)
    g = H // Hk

    def chunked(x: Tensor) -> Tensor:  # [B, h, T, d] -> [B, h, n, chunk, d] in the accumulation dtype
        x = x.to(acc)
        if Tp != T:
            x = torch.nn.functional.pad(x, (0, 0, 0, Tp - T))
        return x.reshape(x.shape[0], x.shape[1], n, chunk, x.shape[-1])

    qc = chunked(q).view(B, Hk, g, n, chunk, hd)
    kc = _neighbour_chunks(chunked(k), 2, 0.0, offsets)  # [B, Hk, n, (1|2|3) chunk, hd]
    vc = _neighbour_chunks(chunked(v), 2, 0.0, offsets)
    mask = _chunk_mask(_pad_facts(meta, Tp), spec, chunk, offsets)

    # scale folded into q (T*hd multiplications instead of T*2W)
    scores = torch.einsum("bkgnqd,bknjd->bkgnqj", qc * scale, kc)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    # Subtract a finite, detached row maximum (0 for empty rows): exp() never sees -inf - -inf, and the
    # denominator of an empty row is replaced by 1 so neither pass divides by 0.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))
    # normalise after the value product: one division per output element, not per score
    out = torch.einsum("bkgnqj,bknjd->bkgnqd", weights, vc) / safe_denom
    lse = torch.where(nonempty, torch.log(safe_denom) + row_max, torch.full_like(denom, float("-inf")))
    out = out.reshape(B, H, Tp, -1)[:, :, :T].to(q.dtype)
    return out, lse.reshape(B, H, Tp)[:, :, :T]

