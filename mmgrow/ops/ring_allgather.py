"""All-gather K/V context parallelism: the "pass-KV all-gather" variant of ring attention (torch CP, llama3).

Same contract as :func:`mmgrow.ops.ring.ring_attention`: each of the ``W`` ranks of ``cp`` holds
``q [B, H, T_local, hd]``, ``k, v [B, Hk, T_local, hd]`` and the mask facts of its tokens (global
stream indices), and gets the exact attention of its queries over the keys of the whole group.
The transport differs: instead of ``n_hops`` dependent ring steps, K/V of every rank are gathered
in **one** collective, and the gradients of K/V go home in **one** reduce-scatter.

**Forward.** ``KV = all_gather(stack(k, v))`` into one ``[W, 2, B, Hk, T_local, hd]`` buffer (only
the ``Hk`` key/value heads travel: under grouped-query attention this is ``H / Hk`` times less than
the queries, the case this variant is for). The gather is posted asynchronously and the local
source (hop 0) is computed while it is in flight. Then this rank's queries attend to every source
``s`` the :class:`~mmgrow.ops.ring_plan.RingPlan` marks as needed (``needed[r][s]``; the others are
skipped without computing), each with the per-hop kernel :func:`~mmgrow.ops.ring_hop.hop_forward`,
merged in place with the log-sum-exp merge of :func:`~mmgrow.ops.ring.merge_into` in float32
(float64 for float64 inputs)::

    (O, lse) = merge_s (O_s, lse_s),   O_s, lse_s = attention(q, K_s, V_s) under the mask

**Backward.** ``delta = rowsum(dO * O) - d lse``; K/V are gathered again (not kept from the forward,
so nothing ``W``-sized lives between the passes), and for every needed source
:func:`~mmgrow.ops.ring_hop.hop_backward` adds its terms to the local ``dQ`` and to the slot ``s`` of
a float32 ``[W, 2, B, Hk, T_local, hd]`` gradient buffer. ``dist.reduce_scatter`` sums slot ``s`` of
every rank onto rank ``s``: each rank receives the complete ``dK, dV`` of its own shard. (gloo
supports ``reduce_scatter`` in the torch this project pins -- verified by the tests here -- so no
all-reduce fallback is needed: an all-reduce + slice would move about twice the bytes.)

**Cost per rank** (``S = 2 Hk T_local hd`` elements, one shard's K/V): forward ``(W - 1) S`` received
in one all-gather, backward ``(W - 1) S`` again plus ``(W - 1) S`` float32 gradient elements in the
reduce-scatter. The ring (:mod:`mmgrow.ops.ring`) moves ``n_hops S`` forward and
``n_hops (S + S_fp32) + S_fp32`` backward in ``n_hops`` dependent P2P steps. Memory: the gathered
``W S`` buffer (forward and backward) plus ``W S`` float32 gradients in the backward, against the
ring's two K/V buffers and three accumulators. :func:`~mmgrow.ops.ring_plan.choose_transport`
turns these into the rule of when to prefer which.

Counts go into the same :class:`~mmgrow.ops.ring.RingStats` as the ring: ``hops_planned`` is the
plan's ``n_hops`` (the ring distance the mask needs), ``hops_sent`` the K/V collectives of the
forward (1, or 0 when no rank needs another's keys), ``hops_computed`` the sources computed here,
``backward_hops_sent`` the collectives of the backward (all-gather + reduce-scatter: 2, or 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mmgrow.ops.blockwise import DEFAULT_BLOCK, TilePlan, accumulation_dtype
from mmgrow.ops.ring import RingStats, _overlap_piece, backward_inputs, check_shard_inputs, ring_attention
from mmgrow.ops.ring_hop import Fused, fused_pieces, hop_backward, hop_forward
from mmgrow.ops.ring_plan import RingPlan
from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import ContextParallel, MaskSpec


def _gather_kv(k: Tensor, v: Tensor, cp: ContextParallel, async_op: bool) -> tuple[Tensor, Any]:
    """Post the all-gather of ``stack(k, v)``: ``(buffer [W, 2, B, Hk, T_local, hd], work or None)``."""
    local = torch.stack([k, v]).contiguous()
    gathered = local.new_empty((cp.world_size, *local.shape))
    work = dist.all_gather(list(gathered.unbind(0)), local, group=cp.group, async_op=async_op)
    return gathered, work


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, spec, cp, scale, q_block, k_block, stats, plan_owner, fused):
        ctx.set_materialize_grads(False)  # an unused lse gives dlse None: the fused backward reads out as is
        plan = RingPlan.build(meta, spec, cp, q_block, k_block, owner=plan_owner)
        r = cp.rank
        tile_plans = {s: TilePlan(meta, plan.metas[s], spec, q_block, k_block)
                      for s in range(cp.world_size) if plan.needed[r][s]}
        communicate = plan.n_hops > 0  # same on every rank: all join the collective or none does
        gathered, work = _gather_kv(k, v, cp, async_op=True) if communicate else (None, None)
        acc = accumulation_dtype(q.dtype)
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        piece = _overlap_piece(q)
        if r in tile_plans:  # the local source while the gather is in flight
            hop_forward(q, k, v, tile_plans[r], scale, fused=fused, max_piece=piece, into=(out, lse))
        if work is not None:
            work.wait()
        for s, tiles in tile_plans.items():
            if s != r:
                hop_forward(q, gathered[s, 0], gathered[s, 1], tiles, scale, fused=fused, max_piece=piece,
                            into=(out, lse))
        del gathered
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.tile_plans, ctx.cp, ctx.scale, ctx.stats, ctx.fused = plan, tile_plans, cp, scale, stats, fused
        if stats is not None:
            computed = sum(t.tiles_needed for t in tile_plans.values())
            grid = cp.world_size * -(-q.shape[2] // q_block) * -(-k.shape[2] // k_block)
            stats.hops_planned, stats.hops_sent, stats.hops_computed = plan.n_hops, int(communicate), len(tile_plans)
            stats.tiles_computed, stats.tiles_skipped = computed, grid - computed
            stats.fused_calls = sum(sum(p.kind != "tiles" for p in fused_pieces(q, t, fused, piece) or ())
                                    for t in tile_plans.values())
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, dout, delta = backward_inputs(ctx, dout, dlse)
        cp, r = ctx.cp, ctx.cp.rank
        acc = accumulation_dtype(q.dtype)
        opts = {"out": out if dlse is None else None, "fused": ctx.fused, "max_piece": _overlap_piece(q)}
        communicate = ctx.plan.n_hops > 0
        gathered, work = _gather_kv(k, v, cp, async_op=True) if communicate else (None, None)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        # slot s: this rank's terms of source s's dK (0) and dV (1); slot r doubles as the local result
        grads = torch.zeros((cp.world_size if communicate else 1, 2, *k.shape), dtype=acc, device=k.device)
        mine = grads[r] if communicate else grads[0]
        if r in ctx.tile_plans:  # the local source while the gather is in flight
            hop_backward(q, k, v, dout, lse, delta, ctx.tile_plans[r], ctx.scale, dq_into=dq, dk_into=mine[0],
                         dv_into=mine[1], **opts)
        if work is not None:
            work.wait()
        for s, tiles in ctx.tile_plans.items():
            if s != r:
                hop_backward(q, gathered[s, 0], gathered[s, 1], dout, lse, delta, tiles, ctx.scale, dq_into=dq,
                             dk_into=grads[s, 0], dv_into=grads[s, 1], **opts)
        del gathered
        if communicate:  # slot s of every rank summed onto rank s
            mine = torch.empty_like(grads[0])
            dist.reduce_scatter(mine, list(grads.unbind(0)), group=cp.group)
        del grads
        if ctx.stats is not None:
            ctx.stats.backward_hops_sent = 2 if communicate else 0
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), *(None,) * 9


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, meta: TokenMeta, spec: MaskSpec, cp: ContextParallel | None,
                        *, scale: float | None = None, q_block: int = DEFAULT_BLOCK, k_block: int = DEFAULT_BLOCK,
                        stats: RingStats | None = None, plan_owner: Any | None = None,
                        fused: Fused = "auto") -> tuple[Tensor, Tensor]:
    """Exact masked attention of this rank's queries over the keys of every rank of ``cp``, K/V all-gathered.

    Arguments and results are those of :func:`mmgrow.ops.ring.ring_attention` (``q [B, H, T_local, hd]``,
    ``k, v [B, Hk, T_local, hd]``, ``meta`` with global stream indices; returns ``(out [B, H, T_local, hd]``
    in q's dtype, ``lse [B, H, T_local]`` in float32, float64 for float64 input)``), without ``lean``
    (nothing here travels in chunks). ``cp`` None or a world size of 1 is the single local hop, exactly
    :func:`ring_attention`'s. Every rank of ``cp`` must call it together (two collectives per call and
    step, plus the plan's all-gather of the token facts unless cached on ``plan_owner``).
    """
    if cp is None or cp.world_size == 1:
        return ring_attention(q, k, v, meta, spec, cp, scale=scale, q_block=q_block, k_block=k_block, stats=stats,
                              plan_owner=plan_owner, fused=fused)
    check_shard_inputs("allgather_attention", q, k, v, meta, q_block, k_block)
    if k.shape != v.shape:  # K and V travel packed in one buffer
        raise ValueError(f"allgather_attention: k and v must have the same shape, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _AllGatherAttention.apply(q, k, v, meta, spec, cp, scale, q_block, k_block, stats, plan_owner, fused)
