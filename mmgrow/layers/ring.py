"""Ring attention (``mixers: ring``): blockwise attention over a sequence sharded on a context-parallel group.

Each rank of ``ctx.cp`` runs the layer on its own slice of the sequence: ``x [B, T_local, D]`` and a
context whose per-token tensors (positions, segment ids, block ids, modality ids) were sharded
with the same layout by :func:`mmgrow.parallel.sharding.shard_context`. Projections and RoPE are
per token, so they need nothing from other ranks (RoPE reads each token's own, unsharded-valued
position); only the attention core crosses ranks, through
:func:`mmgrow.ops.ring.ring_attention`: K/V shards travel round the ring, each rank's queries
attend to them tile by tile, and the hops the mask cannot use (a window, documents that stay on
one shard) are never sent.

**Layouts.** ``contiguous`` gives rank ``r`` the ``r``-th slice; under a causal mask its queries
see only earlier ranks' keys, so rank 0 computes one hop and the last rank ``W``. ``zigzag``
(the default of :class:`~mmgrow.protocols.ContextParallel`) gives rank ``r`` chunks ``r`` and
``2W-1-r`` of ``2W``, so every rank holds one early and one late chunk and does the same causal
work; the token facts carry the global stream index of each token, so the mask is the same rule
in either layout. ``T`` must be a multiple of ``W`` (contiguous) or ``2W`` (zigzag).

**Transports.** ``transport="ring"`` moves K/V shards round the ring
(:func:`~mmgrow.ops.ring.ring_attention`); ``"allgather"`` gathers all K/V once and reduce-scatters
their gradients (:func:`~mmgrow.ops.ring_allgather.allgather_attention`: one collective per pass,
useful with grouped-query attention when every hop is needed); ``"auto"`` lets the batch's hop plan
decide with :func:`~mmgrow.ops.ring_plan.choose_transport` (the same choice on every rank).

Without a context-parallel group (``ctx.cp`` None or a world size of 1) the layer computes what
:class:`~mmgrow.layers.blockwise.BlockwiseAttention` does, KV-cache decoding included; where that
would run the tile kernel (CPU, or ``kernel="native"``) it runs the single local hop of
:func:`~mmgrow.ops.ring.ring_attention` instead, which is the fused kernel with LSE where the mask
allows (``fused``) and exactly the tile kernel elsewhere.

**Decoding with the cache sharded over the group** (LWM's ring inference,
:mod:`mmgrow.ops.ring_decode`, driven by
:func:`mmgrow.parallel.context_decode.generate_context_parallel`). Which tokens arrive is told by
the context, which cached ones exist by the state:

* ``ctx.cp`` set (world size > 1): the incoming tokens are a **sharded prompt**. With an empty state
  (a plain :class:`~mmgrow.layers.attention.KVCache` from :meth:`init_state`, or an empty
  :class:`~mmgrow.ops.ring_decode.ShardedKVCache` from ``init_state(..., cp=cp)``) the layer runs the
  ring prefill as in training and returns a ``ShardedKVCache`` holding only this rank's shard;
* ``ctx.cp`` None and a ``ShardedKVCache`` state: the incoming tokens are **replicated** (the same on
  every rank, as for any unsharded model), their K/V go to one rank's slice and the queries attend
  to every rank's slice through one all-gather of partial results.

So a prompt no rank could hold is prefilled in shards, and every later token costs each rank
attention over its own ``~T / W`` slice. A sharded chunk on top of a non-empty cache (chunked
sharded prefill) is refused with :class:`~mmgrow.protocols.MixerCapabilityError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmgrow.layers.attention import KVCache
from mmgrow.layers.blockwise import BlockwiseAttention
from mmgrow.ops.ring import ring_attention
from mmgrow.ops.ring_allgather import allgather_attention
from mmgrow.ops.ring_decode import ShardedKVCache, sharded_decode_attention
from mmgrow.ops.ring_plan import TRANSPORTS, RingPlan, choose_transport
from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import ContextParallel, MixerCapabilityError, SeqContext


def _is_sharded(ctx: SeqContext) -> bool:
    return ctx.cp is not None and ctx.cp.world_size > 1


class RingAttention(BlockwiseAttention):
    """Multi-head attention over a context-parallel sharded sequence: ``x [B, T_local, D] -> y [B, T_local, D]``.

    Same arguments as :class:`~mmgrow.layers.blockwise.BlockwiseAttention`; ``query_block`` and
    ``key_block`` are the tiles of each hop's local computation and the granularity at which the
    ring decides which hops the mask needs. Besides:

    Args:
        transport: ``"ring"`` (K/V shards travel round the ring), ``"allgather"`` (K/V all-gathered once,
            gradients reduce-scattered) or ``"auto"`` (default: per batch, the rule of
            :func:`~mmgrow.ops.ring_plan.choose_transport`; always ``"ring"`` with ``lean=True``).
        lean: the ring's memory-lean mode (K/V in owner-direct chunks, see
            :func:`~mmgrow.ops.ring.ring_attention`); not combinable with ``transport="allgather"``.
        fused: the per-hop kernel: ``"auto"`` (fused SDPA kernel with LSE where the mask and device
            allow, tiles elsewhere), ``False`` (always the tile kernels), ``True`` (fused, raising where
            the device/dtype has none).
    """

    supports_context_parallel = True
    supports_sharded_decode = True
    """KV-cache decoding with the cache sharded over ``ctx.cp`` (see the module docstring)."""

    def __init__(self, *, dim: int, layer_idx: int = 0, transport: str = "auto", lean: bool = False,
                 fused: bool | str = "auto", **blockwise: Any) -> None:
        super().__init__(dim=dim, layer_idx=layer_idx, **blockwise)
        if transport not in ("auto", *TRANSPORTS):
            raise ValueError(f"{type(self).__name__}: transport must be one of 'auto', "
                             f"{', '.join(repr(t) for t in TRANSPORTS)}; got {transport!r}")
        if not isinstance(lean, bool):
            raise TypeError(f"{type(self).__name__}: lean must be True or False, got {lean!r}")
        if lean and transport == "allgather":
            raise ValueError(f"{type(self).__name__}: lean=True is a mode of the ring transport (chunked K/V); the "
                             "all-gather transport holds every rank's K/V at once -- use transport='ring' or 'auto' "
                             "with lean=True, or lean=False")
        if fused not in (True, False, "auto") or not isinstance(fused, (bool, str)):
            raise ValueError(f"{type(self).__name__}: fused must be True, False or 'auto', got {fused!r}")
        self.transport, self.lean, self.fused = transport, lean, fused

    def transport_for(self, q: Tensor, k: Tensor, ctx: SeqContext, meta: TokenMeta) -> str:
        """The transport of this call: the fixed one, or the plan's choice (plan cached on ``ctx``)."""
        if self.transport != "auto":
            return self.transport
        if self.lean:
            return "ring"
        plan = RingPlan.build(meta, ctx.mask, ctx.cp, self.query_block, self.key_block, owner=ctx)
        return choose_transport(plan, q.shape[1], k.shape[1], q.shape[2], ctx.cp.world_size)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, dropout_p: float) -> Tensor:
        opts = {"q_block": self.query_block, "k_block": self.key_block, "fused": self.fused}
        if not _is_sharded(ctx):
            if self.kernel_for(ctx, q, dropout_p) != "native":  # CUDA sdpa/flex: fused already
                return super().attend(q, k, v, ctx, dropout_p)
            # where the tile kernel would run: the single local hop, fused where the mask allows
            meta = TokenMeta.from_context(ctx)
            return ring_attention(q, k, v, meta, ctx.mask, None, **opts)[0]
        meta = TokenMeta.from_context(ctx)  # global stream indices from ctx.cp and its layout
        # the hop plan is cached on ctx: all layers of a batch share one all-gather of the token facts
        if self.transport_for(q, k, ctx, meta) == "allgather":
            return allgather_attention(q, k, v, meta, ctx.mask, ctx.cp, plan_owner=ctx, **opts)[0]
        return ring_attention(q, k, v, meta, ctx.mask, ctx.cp, plan_owner=ctx, lean=self.lean, **opts)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transport={self.transport!r}, lean={self.lean}, fused={self.fused!r}"

    def _attend_with_cache(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, state: KVCache | ShardedKVCache,
                           dropout_p: float) -> tuple[Tensor, KVCache | ShardedKVCache]:
        sharded_cache = isinstance(state, ShardedKVCache)
        if not (_is_sharded(ctx) or sharded_cache):
            return super()._attend_with_cache(q, k, v, ctx, state, dropout_p)
        # shape / dtype / device checks of the ordinary cache (a ShardedKVCache seen through the same fields)
        self._check_cache(KVCache(state.k, state.v, state.positions, state.segment_ids, state.block_ids)
                          if sharded_cache else state, k)
        if not _is_sharded(ctx):  # replicated new tokens; the cache is spread over state.cp
            queries = state.query_meta(ctx)
            state = state.append(k, v, queries)
            out, _ = sharded_decode_attention(q, queries, state, ctx.mask, q_block=self.query_block,
                                              k_block=self.key_block)
            return out, state
        # a sharded prompt: the ring prefill, and this rank's shard becomes its cache slice
        name = f"{type(self).__name__} (layer {self.layer_idx})"
        if state.seen != 0 or state.size != 0:
            raise MixerCapabilityError(f"{name}: a sharded chunk (ctx.cp world size {ctx.cp.world_size}) can only "
                                       f"prefill an empty cache, but this one has seen {state.seen} tokens; prefill "
                                       "the whole prompt in one sharded call, then decode replicated tokens with "
                                       "ctx.cp=None")
        if sharded_cache and state.cp.world_size != ctx.cp.world_size:
            raise ValueError(f"{name}: the cache was made for a group of {state.cp.world_size} ranks but ctx.cp has "
                             f"{ctx.cp.world_size}")
        out = self.attend(q, k, v, ctx, dropout_p)
        return out, ShardedKVCache.from_shard(k, v, TokenMeta.from_context(ctx), ctx.cp)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype,
                   cp: ContextParallel | None = None) -> KVCache | ShardedKVCache:
        """An empty KV cache; with a context-parallel ``cp`` (world size > 1) an empty
        :class:`~mmgrow.ops.ring_decode.ShardedKVCache` on that group. A plain empty cache works for a
        sharded prefill too (the layer turns it into a sharded one); ``cp`` makes the intent explicit."""
        if cp is None or cp.world_size == 1:
            return super().init_state(batch_size, device, dtype)
        return ShardedKVCache.empty(batch_size, self.num_kv_heads, self.head_dim, cp, device, dtype)
