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

Without a context-parallel group (``ctx.cp`` None or a world size of 1) the layer is exactly
:class:`~mmgrow.layers.blockwise.BlockwiseAttention`, KV-cache decoding included. Decoding with a
KV cache on a sharded sequence is not supported.
"""

from __future__ import annotations

from torch import Tensor

from mmgrow.layers.attention import KVCache
from mmgrow.layers.blockwise import BlockwiseAttention
from mmgrow.ops.ring import ring_attention
from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import MixerCapabilityError, SeqContext


def _is_sharded(ctx: SeqContext) -> bool:
    return ctx.cp is not None and ctx.cp.world_size > 1


class RingAttention(BlockwiseAttention):
    """Multi-head attention over a context-parallel sharded sequence: ``x [B, T_local, D] -> y [B, T_local, D]``.

    Same arguments as :class:`~mmgrow.layers.blockwise.BlockwiseAttention`; ``query_block`` and
    ``key_block`` are the tiles of each hop's local computation and the granularity at which the
    ring decides which hops the mask needs.
    """

    supports_context_parallel = True

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, dropout_p: float) -> Tensor:
        if not _is_sharded(ctx):
            return super().attend(q, k, v, ctx, dropout_p)
        meta = TokenMeta.from_context(ctx)  # global stream indices from ctx.cp and its layout
        # the hop plan is cached on ctx: all layers of a batch share one all-gather of the token facts
        out, _ = ring_attention(q, k, v, meta, ctx.mask, ctx.cp, q_block=self.query_block, k_block=self.key_block,
                                plan_owner=ctx)
        return out

    def _attend_with_cache(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, state: KVCache,
                           dropout_p: float) -> tuple[Tensor, KVCache]:
        if _is_sharded(ctx):
            raise MixerCapabilityError(f"{type(self).__name__}: KV-cache decoding on a context-parallel sharded "
                                       f"sequence (world size {ctx.cp.world_size}) is not supported; decode "
                                       "without ctx.cp")
        return super()._attend_with_cache(q, k, v, ctx, state, dropout_p)
