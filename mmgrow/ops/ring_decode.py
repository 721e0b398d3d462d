"""Decoding with the KV cache sharded over a context-parallel group (LWM's ring inference).

After a sharded prefill (:func:`mmgrow.ops.ring.ring_attention` over the prompt split by
:mod:`mmgrow.parallel.sharding`) rank ``r`` of the ``W`` ranks keeps only its own shard's keys and
values: a :class:`ShardedKVCache` with ``S_r ~ T / W`` tokens and their mask facts (global stream
index, position, segment id, block id). No rank ever holds the whole context.

**A decode step.** The ``T`` new tokens (usually ``T = 1``) are *replicated*: every rank runs the
same projections on the same inputs, so every rank holds the same queries ``q [B, H, T, hd]`` and
new keys/values. The new keys/values are appended to **one** rank's slice
(:meth:`ShardedKVCache.append`); then every rank attends the queries to its local slice only,
under the exact mask computed from the token facts (causal, window, segments, blocks), giving a
partial result over a disjoint key set ``K_r`` in float32 (float64 for float64 inputs):

.. math::

    O_r = \\operatorname{softmax}(q K_r^\\top s) V_r, \\qquad \\text{lse}_r = \\log \\sum_{j \\in K_r} e^{s\\, q k_j}

One ``all_gather`` of ``(O_r, lse_r)`` (``W (hd + 1)`` numbers per query and head) and the
log-sum-exp rule give attention over the union of the slices, i.e. over the whole context:

.. math::

    m = \\max_r \\text{lse}_r, \\quad w_r = e^{\\text{lse}_r - m}, \\quad
    O = \\frac{\\sum_r w_r O_r}{\\sum_r w_r}, \\quad \\text{lse} = m + \\log \\sum_r w_r

(``m`` replaced by 0 where every ``lse_r = -inf``; such rows give ``O = 0``). Every rank merges the
same gathered numbers in the same rank order, so the output is bitwise identical on every rank and
the replicated tokens stay replicated through the rest of the model.

**Where new tokens go.** To the rank holding the fewest cached tokens, ties to the lowest rank.
Every rank keeps the per-rank counts (:attr:`ShardedKVCache.sizes`) and updates them identically,
so the choice needs no communication and is the same everywhere. It keeps the slices balanced
(largest minus smallest ``<= max(1, T)`` once balanced), which is the point of the feature: the
largest slice bounds the per-rank memory. Round-robin would be as balanced after an even prefill
but not after one that left the slices uneven (padding dropped from the last ranks of a
contiguous layout, see :meth:`ShardedKVCache.from_shard`).

**Cost per step and layer**: the local attention over ``S_r`` keys (``O(T * S_r)``) and one
all-gather of ``W * B * H * T * (hd + 1)`` numbers; nothing of size ``S`` moves. Decoding is
inference only: no gradient flows through :func:`sharded_decode_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mmgrow.ops.blockwise import DEFAULT_BLOCK, TilePlan, accumulation_dtype, forward_tiles
from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, ContextParallel, MaskSpec, MixerState, SeqContext


@dataclass
class ShardedKVCache(MixerState):
    """This rank's slice of a KV cache spread over the context-parallel group ``cp``.

    k, v:        ``[B, Hk, S_r, hd]`` this rank's cached keys (after RoPE) and values;
    index:       ``[B, S_r]`` int64 global stream indices of those tokens (not contiguous: a zigzag
                 shard holds two chunks, and decoded tokens land between other ranks' ones);
    positions:   ``[B, S_r]`` int64 positions (what the window compares);
    segment_ids: ``[B, S_r]`` int64 (0 where the context had none);
    block_ids:   ``[B, S_r]`` int64 (``NO_BLOCK`` where the context had none);
    sizes:       cached tokens on every rank of the group, ``sizes[cp.rank] == S_r`` (the same tuple
                 on every rank: it decides where new tokens go without communication);
    seen:        tokens of the whole stream so far; the next token gets stream index ``seen``;
    cp:          the group the slices live on.
    """

    k: Tensor
    v: Tensor
    index: Tensor
    positions: Tensor
    segment_ids: Tensor
    block_ids: Tensor
    sizes: tuple[int, ...]
    seen: int
    cp: ContextParallel

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, batch_size: int, num_kv_heads: int, head_dim: int, cp: ContextParallel,
              device: torch.device | str, dtype: torch.dtype) -> ShardedKVCache:
        """Nothing cached yet (``S_r = 0`` on every rank)."""
        kv = torch.empty(batch_size, num_kv_heads, 0, head_dim, device=device, dtype=dtype)
        ids = torch.empty(batch_size, 0, device=device, dtype=torch.long)
        return cls(kv, kv.clone(), ids, ids.clone(), ids.clone(), ids.clone(), (0,) * cp.world_size, 0, cp)

    @classmethod
    def from_shard(cls, k: Tensor, v: Tensor, meta: TokenMeta, cp: ContextParallel) -> ShardedKVCache:
        """The cache after a sharded prefill: this rank's ``k, v [B, Hk, T_local, hd]`` and facts
        ``meta`` (global stream indices). Collective: one all-gather of the slice sizes.

        Columns that are padding in every row (``segment_ids == PAD_SEGMENT``, as context-parallel
        padding writes them) are dropped: no query ever sees a padding key, so keeping them would
        cost memory and change nothing. The stream still counts them (``seen = W * T_local``), so
        later tokens keep their order with respect to every cached one.
        """
        B, T_local = meta.positions.shape
        seg = meta.segment_ids if meta.segment_ids is not None else torch.zeros_like(meta.positions)
        blk = meta.block_ids if meta.block_ids is not None else torch.full_like(meta.positions, NO_BLOCK)
        index = meta.index.expand(B, T_local)
        keep = (seg != PAD_SEGMENT).any(dim=0)  # [T_local]
        if not bool(keep.all()):
            cols = keep.nonzero().squeeze(1)
            k, v = k.index_select(2, cols), v.index_select(2, cols)
            index, pos, seg, blk = (t.index_select(1, cols) for t in (index, meta.positions, seg, blk))
        else:
            pos = meta.positions
        sizes = gather_sizes(k.shape[2], cp, k.device)
        return cls(k.contiguous(), v.contiguous(), index.contiguous(), pos.contiguous(), seg.contiguous(),
                   blk.contiguous(), sizes, T_local * cp.world_size, cp)

    # ------------------------------------------------------------------------------------ facts

    @property
    def size(self) -> int:
        """Tokens cached on this rank, ``S_r``."""
        return self.k.shape[2]

    @property
    def total(self) -> int:
        """Tokens cached over the whole group, ``sum_r S_r``."""
        return sum(self.sizes)

    @property
    def meta(self) -> TokenMeta:
        """The mask facts of this rank's cached keys."""
        return TokenMeta(self.index, self.positions, self.segment_ids, self.block_ids)

    def next_owner(self) -> int:
        """The group rank new tokens are appended to: fewest cached tokens, ties to the lowest rank
        (the same answer on every rank, since ``sizes`` is)."""
        return min(range(len(self.sizes)), key=lambda r: (self.sizes[r], r))

    def query_meta(self, ctx: SeqContext) -> TokenMeta:
        """Facts of ``T`` replicated new tokens under ``ctx``: stream indices ``seen .. seen+T-1``;
        absent segment / block ids become 0 / ``NO_BLOCK``, as the cache stores them."""
        B, T = ctx.positions.shape
        seg = ctx.segment_ids if ctx.segment_ids is not None else torch.zeros_like(ctx.positions)
        blk = ctx.block_ids if ctx.block_ids is not None else torch.full_like(ctx.positions, NO_BLOCK)
        index = torch.arange(self.seen, self.seen + T, device=ctx.positions.device).expand(B, T)
        return TokenMeta(index, ctx.positions, seg, blk)

    def check(self, where: str) -> None:
        """A named error when the slice and the replicated bookkeeping disagree (cache size mismatch)."""
        cp = self.cp
        if len(self.sizes) != cp.world_size:
            raise ValueError(f"{where}: ShardedKVCache records sizes for {len(self.sizes)} ranks, but its group has "
                             f"world size {cp.world_size}")
        if self.sizes[cp.rank] != self.size:
            raise ValueError(f"{where}: cache size mismatch on rank {cp.rank}: it holds {self.size} tokens but the "
                             f"group's bookkeeping says {self.sizes[cp.rank]} (sizes {list(self.sizes)}); the ranks "
                             "no longer decode in step -- every rank must run every step with the same tokens")
        if self.v.shape[2] != self.size or any(t.shape != (self.k.shape[0], self.size) for t in
                                               (self.index, self.positions, self.segment_ids, self.block_ids)):
            raise ValueError(f"{where}: cache size mismatch: k {tuple(self.k.shape)}, v {tuple(self.v.shape)}, "
                             f"index {tuple(self.index.shape)}, positions {tuple(self.positions.shape)}; expected "
                             f"[B, Hk, S, hd] and [B, S] with the same S")
        if self.total > self.seen:
            raise ValueError(f"{where}: cache size mismatch: {self.total} tokens cached over the group but only "
                             f"{self.seen} seen")

    # ------------------------------------------------------------------------------------ update

    def append(self, k: Tensor, v: Tensor, queries: TokenMeta) -> ShardedKVCache:
        """The cache after ``T`` replicated new tokens ``k, v [B, Hk, T, hd]`` with facts ``queries``:
        stored on :meth:`next_owner` only; every rank updates ``sizes`` and ``seen`` alike."""
        T = k.shape[2]
        owner = self.next_owner()
        sizes = tuple(s + T if r == owner else s for r, s in enumerate(self.sizes))
        if owner != self.cp.rank:
            return ShardedKVCache(self.k, self.v, self.index, self.positions, self.segment_ids, self.block_ids,
                                  sizes, self.seen + T, self.cp)
        cat = [torch.cat((a, b), dim=d) for a, b, d in
               ((self.k, k, 2), (self.v, v, 2), (self.index, queries.index, 1),
                (self.positions, queries.positions, 1), (self.segment_ids, queries.segment_ids, 1),
                (self.block_ids, queries.block_ids, 1))]
        return ShardedKVCache(*cat, sizes, self.seen + T, self.cp)


def gather_sizes(local: int, cp: ContextParallel, device: torch.device | str) -> tuple[int, ...]:
    """Every rank's ``local`` count, in group-rank order (one all-gather of one int64 per rank)."""
    mine = torch.tensor([local], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(cp.world_size)]
    dist.all_gather(parts, mine, group=cp.group)
    return tuple(int(p) for p in parts)


def merge_over_ranks(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of ``W`` disjoint key sets from the per-set results.

    ``outs [W, B, H, T, hd]``, ``lses [W, B, H, T]`` (accumulation dtype) -> ``(out [B, H, T, hd],
    lse [B, H, T])``; rows with no key anywhere give ``0`` and ``-inf`` without NaN. The sum runs
    over ``W`` in order, so identical inputs give bitwise identical results on every rank."""
    m = lses.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)                    # [W, B, H, T], in [0, 1]; 0 for empty partials
    total = w.sum(dim=0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (w[..., None] * outs).sum(dim=0) / safe[..., None]
    return out, m + torch.log(total)


@torch.no_grad()
def sharded_decode_attention(q: Tensor, queries: TokenMeta, cache: ShardedKVCache, spec: MaskSpec, *,
                             scale: float | None = None, q_block: int = DEFAULT_BLOCK,
                             k_block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """Exact attention of replicated queries over a KV cache sharded on ``cache.cp``.

    Args:
        q: ``[B, H, T, hd]`` the new tokens' queries, the same on every rank (``H`` a multiple of ``Hk``).
        queries: their facts (:meth:`ShardedKVCache.query_meta`).
        cache: this rank's slice, the new tokens' keys already appended (:meth:`ShardedKVCache.append`),
            so every key of the context is in exactly one rank's slice.
        spec: the mask rule.
        scale: score scale, default ``1 / sqrt(hd)``.
        q_block, k_block: tiles of the local computation (tiles the mask empties are skipped).

    Returns:
        ``(out [B, H, T, hd] in q's dtype, lse [B, H, T] in float32, float64 for float64 input)``, the
        same on every rank. Collective: every rank of ``cache.cp`` must call it.
    """
    if q.dim() != 4 or q.shape[0] != cache.k.shape[0] or q.shape[1] % cache.k.shape[1] != 0:
        raise ValueError(f"sharded_decode_attention: expected q [B, H, T, hd] with B = {cache.k.shape[0]} and H a "
                         f"multiple of Hk = {cache.k.shape[1]}, got {tuple(q.shape)}")
    if queries.length != q.shape[2]:
        raise ValueError(f"sharded_decode_attention: token facts cover {queries.length} queries, q has {q.shape[2]}")
    cache.check("sharded_decode_attention")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    B, H, T, _ = q.shape
    hd_v = cache.v.shape[-1]
    if cache.size > 0:
        out, lse = forward_tiles(q, cache.k, cache.v, TilePlan(queries, cache.meta, spec, q_block, k_block), scale)
    else:  # this rank holds nothing yet: an empty partial (weight 0 in the merge)
        out = q.new_zeros((B, H, T, hd_v), dtype=acc)
        lse = q.new_full((B, H, T), float("-inf"), dtype=acc)
    # one all-gather of (O_r, lse_r) packed together
    packed = torch.cat((out, lse[..., None]), dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(cache.cp.world_size)]
    dist.all_gather(parts, packed, group=cache.cp.group)
    gathered = torch.stack(parts)
    merged, merged_lse = merge_over_ranks(gathered[..., :hd_v], gathered[..., hd_v])
    return merged.to(q.dtype), merged_lse
