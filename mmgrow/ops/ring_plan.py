"""The hop plan of ring attention: which K/V shards each rank's queries can see, hence how far K/V travel.

Every rank of a context-parallel group of ``W`` ranks holds ``T_local`` tokens. The ring moves the
K/V shard of rank ``s`` to rank ``s + 1``, ``s + 2``, ... so at hop ``d`` rank ``r`` holds the shard
of source ``s = (r - d) mod W``. The plan decides, once per call and identically on every rank:

* ``needed[r][s]``: can some query of rank ``r`` see some key of rank ``s``? It is answered from the
  per-token mask facts (:class:`~mmgrow.ops.token_meta.TokenMeta`) of all ranks, all-gathered once
  (small int tensors: stream index, position, segment id, block id), with the conservative tile
  test :func:`~mmgrow.ops.token_meta.tile_visibility` at the granularity of the attention tiles
  (``q_block x k_block``), so "not needed" is exact: skipping such a pair never changes the result;
* ``n_hops = max {(r - s) mod W : needed[r][s]}``: hops beyond it are neither sent nor computed.
  A sliding window of ``w`` positions over contiguous shards needs ``ceil((w - 1) / T_local)``
  hops, documents that never cross a shard boundary need none, plain causal attention ``W - 1``.

All ranks compute the same matrix from the same gathered facts, so they agree on ``n_hops`` and on
every transfer: no rank waits for a message that is never sent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from mmgrow.ops.token_meta import ChunkSummary, TokenMeta, tile_visibility
from mmgrow.protocols import ContextParallel, MaskSpec

PLAN_CACHE_ATTR = "_mmgrow_ring_plans"


@dataclass
class RingPlan:
    """The agreed schedule of one ring-attention call, seen from ``rank``.

    metas:  the token facts of every rank's shard (``metas[s]`` = keys of source ``s``), each ``[B, T_local]``;
    needed: ``W x W`` bools, ``needed[r][s]`` = queries of rank ``r`` may see keys of rank ``s``;
    n_hops: hops ``1 .. n_hops`` move K/V (hop 0 is the local shard).
    """

    rank: int
    world_size: int
    metas: list[TokenMeta]
    needed: list[list[bool]]
    n_hops: int

    def source(self, hop: int) -> int:
        """The rank whose K/V this rank holds at ``hop``."""
        return (self.rank - hop) % self.world_size

    def computes(self, hop: int) -> bool:
        """True when this rank's queries may see the keys it holds at ``hop``."""
        return self.needed[self.rank][self.source(hop)]

    @classmethod
    def build(cls, meta: TokenMeta, spec: MaskSpec, cp: ContextParallel, q_block: int, k_block: int,
              owner: Any | None = None) -> RingPlan:
        """All-gather the facts over ``cp.group`` (one collective) and plan the hops.

        With an ``owner`` (the batch's :class:`~mmgrow.protocols.SeqContext`) the plan is cached on
        it per ``(spec, blocks, group)``, so the layers of one batch share one all-gather. Every rank
        must then pass the same owners in the same order (as layers running in lockstep do): a rank
        that misses the cache where another hits it would wait in the all-gather alone.
        """
        cache = None if owner is None else owner.__dict__.setdefault(PLAN_CACHE_ATTR, {})
        key = (spec, q_block, k_block, meta.length, id(cp.group), cp.rank, cp.world_size)
        if cache is not None and key in cache:
            return cache[key]
        metas = gather_token_meta(meta, cp)
        needed = visibility_matrix(metas, spec, q_block, k_block)
        plan = cls(cp.rank, cp.world_size, metas, needed, ring_hops(needed))
        if cache is not None:
            cache[key] = plan
        return plan


def gather_token_meta(meta: TokenMeta, cp: ContextParallel) -> list[TokenMeta]:
    """Every rank's :class:`TokenMeta` (``[B, T_local]`` each), in rank order, from one all-gather.

    The facts are stacked into one ``[F, B, T_local]`` int64 tensor so the plan costs a single
    collective. Raises when the stream indices are not globally distinct (a shard's facts built
    without ``ctx.cp``, i.e. with local indices ``0 .. T_local-1`` on every rank, would silently turn
    causality wrong).
    """
    import torch.distributed as dist

    present = [t is not None for t in meta.tensors()]
    local = torch.stack([t.to(torch.long) for t in meta.tensors() if t is not None])
    parts = [torch.empty_like(local) for _ in range(cp.world_size)]
    dist.all_gather(parts, local.contiguous(), group=cp.group)
    metas = []
    for part in parts:
        rows = iter(part.unbind(0))
        metas.append(TokenMeta(*(next(rows) if has else None for has in present)))
    index = torch.cat([m.index for m in metas], dim=1)
    if bool((index.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("ring attention: two ranks hold tokens with the same stream index; meta.index must hold "
                         "global stream indices (build it with TokenMeta.from_context(ctx) where ctx.cp is set, "
                         "e.g. from mmgrow.parallel.sharding.shard_context)")
    return metas


def visibility_matrix(metas: list[TokenMeta], spec: MaskSpec, q_block: int, k_block: int) -> list[list[bool]]:
    """``needed[r][s]``: some ``q_block x k_block`` tile of (queries of ``r``, keys of ``s``) may hold a visible pair.

    One :func:`tile_visibility` call over the chunk summaries of all ranks side by side, so it is the
    same answer a :class:`~mmgrow.ops.blockwise.TilePlan` of that pair would give: a pair is needed
    exactly when its tile plan computes at least one tile.
    """
    W = len(metas)
    q_sum = _concat_summaries([ChunkSummary.of(m, q_block) for m in metas])
    k_sum = _concat_summaries([ChunkSummary.of(m, k_block) for m in metas])
    may, _ = tile_visibility(q_sum, k_sum, spec)  # [W * nq, W * nk]
    return may.view(W, may.shape[0] // W, W, may.shape[1] // W).any(dim=3).any(dim=1).tolist()


def ring_hops(needed: list[list[bool]]) -> int:
    """``max (r - s) mod W`` over the needed pairs (0 when only local keys are visible)."""
    W = len(needed)
    return max((((r - s) % W) for r in range(W) for s in range(W) if needed[r][s]), default=0)


def _concat_summaries(parts: list[ChunkSummary]) -> ChunkSummary:
    """Summaries of several shards side by side along the chunk axis (``[B, sum n]`` per field)."""
    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values, dim=1)

    return ChunkSummary(*(cat(f.name) for f in fields(ChunkSummary)))


TRANSPORTS = ("ring", "allgather")


@dataclass(frozen=True)
class TransportCost:
    """Elements one rank moves and holds per attention call under a transport (multiply by ``head_dim``
    and the element size for bytes). ``S = 2 Hk T_local`` is one shard's K/V per head-dim unit.

    sent_forward:   K/V elements received in the forward;
    sent_backward:  K/V plus gradient elements received in the backward (gradients in float32);
    collectives:    dependent communication steps (forward + backward): each pays a latency and a sync;
    kv_held:        K/V elements held at once in the forward beyond the rank's own shard.
    """

    sent_forward: int
    sent_backward: int
    collectives: int
    kv_held: int


def transport_cost(plan: RingPlan, kv_heads: int, local_len: int) -> dict[str, TransportCost]:
    """The costs of both transports for ``plan`` (see :func:`choose_transport`).

    ring: ``n_hops`` steps of ``S`` forward; backward ``n_hops`` steps of ``S`` K/V and ``S`` gradients
    plus the trip home (``S``); two K/V buffers. allgather: ``(W - 1) S`` in one all-gather each pass,
    ``(W - 1) S`` gradients in one reduce-scatter; the whole ``W S`` gathered buffer.
    """
    S, W, n = 2 * kv_heads * local_len, plan.world_size, plan.n_hops
    home = 1 if n > 0 else 0
    ring = TransportCost(n * S, n * 2 * S + home * S, 2 * n + home, 2 * S if n > 0 else 0)
    comm = 1 if n > 0 else 0  # no rank needs another's keys: the all-gather variant sends nothing either
    gather = TransportCost(comm * (W - 1) * S, comm * 2 * (W - 1) * S, 3 * comm, comm * W * S)
    return {"ring": ring, "allgather": gather}


def choose_transport(plan: RingPlan, q_heads: int, kv_heads: int, local_len: int, world_size: int) -> str:
    """``"ring"`` or ``"allgather"`` for one attention call; the same answer on every rank.

    Derived from :func:`transport_cost` (``S`` = one shard's K/V, ``Q = H T_local hd`` = one shard's
    queries, ``g = H / Hk`` the grouped-query ratio):

    1. **Bytes.** The ring moves ``n_hops S`` per pass, the all-gather always ``(W - 1) S``. When the mask
       needs fewer than ``W - 1`` hops (a window, documents that stay near their shard) the ring moves
       strictly less, so it wins: ``n_hops < W - 1 -> "ring"``.
    2. **Latency.** At ``n_hops = W - 1`` both move the same K/V bytes (the all-gather saves the ring's
       final trip of the gradients home), but the ring pays ``2 n_hops + 1`` dependent steps per
       training step against 3 collectives. For ``W = 2`` both are one step each way, so the ring (the
       default, with its transfers overlapped hop by hop) is kept: ``W <= 2 -> "ring"``.
    3. **Memory.** The all-gather holds all ``W S = 2 W Q / g`` K/V elements at once (and as many
       float32 gradients in the backward), the ring two buffers (``4 Q / g``). Allowing the gathered
       K/V to be at most ``2 Q`` -- the size of the rank's own ``q`` and ``out``, so the all-gather never
       more than doubles the activations of the call -- gives ``W <= g``: the all-gather only pays off
       with few KV heads (GQA), which is exactly where torch CP and the llama3 recipe use it.

    So: ``"allgather"`` iff ``n_hops == W - 1``, ``W >= 3`` and ``H / Hk >= W``; else ``"ring"``. Every input
    is agreed by all ranks (the plan is built from all-gathered facts; heads and ``T_local`` are the
    same everywhere), so no rank can pick a different transport and wait in a collective alone.
    """
    if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"choose_transport: q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    if world_size != plan.world_size:
        raise ValueError(f"choose_transport: world_size {world_size} differs from the plan's {plan.world_size}")
    cost = transport_cost(plan, kv_heads, local_len)
    same_bytes = cost["allgather"].sent_forward <= cost["ring"].sent_forward  # i.e. n_hops == W - 1 (and > 0)
    fewer_steps = cost["allgather"].collectives < cost["ring"].collectives and world_size >= 3
    fits = world_size * kv_heads <= q_heads  # W S <= 2 Q
    return "allgather" if plan.n_hops > 0 and same_bytes and fewer_steps and fits else "ring"
