"""Ring attention: exact attention over a sequence sharded on a context-parallel group (RingAttention, BPT).

Each of the ``W`` ranks holds ``T_local`` tokens: ``q [B, H, T_local, hd]``, ``k, v [B, Hk, T_local, hd]``
and their mask facts (:class:`~mmgrow.ops.token_meta.TokenMeta` with *global* stream indices). The
queries stay; the K/V shards travel round the ring (rank ``r`` sends to ``r + 1`` and receives from
``r - 1``), so at hop ``d`` rank ``r`` holds the shard of source ``s = (r - d) mod W``.

**Plan** (:mod:`mmgrow.ops.ring_plan`): the facts of all shards are all-gathered once; every rank
computes the same ``needed[r][s]`` matrix from conservative tile tests and the same
``n_hops = max (r - s) mod W`` over the needed pairs. Hops beyond ``n_hops`` are neither sent nor
computed (a window or non-crossing documents shorten the ring); a hop whose pair is not needed on
this rank computes nothing (its K/V still pass through for the ranks further on).

**Forward.** Hop ``d`` computes this shard's partial attention against source ``s``,
``(O_d, lse_d) = hop_forward(q, K_s, V_s)`` (:mod:`mmgrow.ops.ring_hop`: a fused SDPA kernel with
LSE on the parts of the hop a kernel can express, the tile kernels of :mod:`mmgrow.ops.blockwise`
elsewhere), and folds it into the running pair
with the log-sum-exp merge, in float32 (float64 for float64 inputs) whatever the input dtype:

.. math::

    m = \\max(\\text{lse}_a, \\text{lse}_b), \\quad w_x = e^{\\text{lse}_x - m}, \\quad
    \\text{lse} = m + \\log(w_a + w_b), \\quad O = \\frac{w_a O_a + w_b O_b}{w_a + w_b}

(``m`` replaced by 0 where both are ``-inf``: such rows keep ``O = 0``, ``lse = -inf``, no NaN).
The weights lie in ``[0, 1]``, so nothing overflows — this is the sigmoid form
``O = O_a - \\sigma(\\text{lse}_b - \\text{lse}_a)(O_a - O_b)`` written with a shared maximum.
Rows that see no key anywhere return ``O = 0``, ``lse = -inf``.

**Overlap.** The non-blocking transfer of the next hop's K/V (``dist.batch_isend_irecv``) is posted
*before* this hop's tiles are computed and waited for after, so communication hides behind compute
whenever a hop's compute outlasts one K/V transfer.

**Backward** (custom autograd): ``delta = rowsum(dO * O) - d lse`` once, then the hops again with
the *final* ``lse``: every hop adds ``hop_backward(q, K_s, V_s, dO, lse, delta)`` to the local ``dQ``
and to a float32 ``dK_s, dV_s`` accumulator that travels with ``K_s, V_s``. The accumulator
received from the previous rank is waited for only after this hop's own contribution is computed,
so both transfers overlap compute. After the last hop rank ``r`` holds the complete gradient of
source ``(r - n_hops) mod W`` (every rank that needed it has added its part) and sends it straight
home (one more ring step when ``n_hops = W - 1``).

**Memory.** Per rank: the hop kernels' buffers, two K/V buffers (current and in-flight) and, in the
backward, this hop's ``dK, dV`` plus the outgoing and the arriving float32 accumulators; the saved
tensors are ``q, k, v, O, lse`` of the local shard only. About 12 shard-sized tensors at the backward's
peak: 2.0x (P = 2) and 3.5x (P = 4) the single-process blockwise peak summed over ranks.

**Lean mode** (``lean=True``). No whole shard travels: at hop ``d`` every key chunk of
:data:`LEAN_CHUNK` tokens that rank ``r`` needs comes straight from its owner ``r - d`` (sent from the
owner's own K/V), and its partial ``dK, dV`` go straight back to the owner, which adds them into its
gradient: no travelling accumulators, no final trip home. A rank holds its outputs (``O, dQ, dK,
dV``) plus chunk-sized buffers: 0.9x (P = 2) and 1.07x (P = 4) the blockwise peak at T = 16K. The
next chunk is posted before the current one is computed (overlap one chunk ahead); the cost is many
small messages and kernel calls.

**Why float32 accumulators.** Partial outputs, LSEs and ``dK/dV`` summed over ``W`` hops in a low
precision (bf16) lose bits at every merge, so the error grows with the ring size and the backward
can be badly wrong while the forward looks fine. Keeping them in float32 makes the error that of a
single blockwise pass; results are cast to the input dtype once at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mmgrow.ops.blockwise import (
    DEFAULT_BLOCK,
    TilePlan,
    accumulation_dtype,
    blockwise_attention,
    output_delta,
)
from mmgrow.ops.ring_hop import Fused, fused_pieces, hop_backward, hop_forward
from mmgrow.ops.ring_plan import RingPlan
from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import ContextParallel, MaskSpec


@dataclass
class RingStats:
    """What one :func:`ring_attention` call did on this rank (filled in when passed in).

    hops_planned:   ``n_hops``, the ring distance the mask needs (same on every rank);
    hops_sent:      forward K/V transfers posted (``n_hops``: none beyond the plan);
    hops_computed:  forward hops whose tiles were computed here (hop 0 included);
    tiles_computed: forward ``q_block x k_block`` tiles computed here;
    tiles_skipped:  tiles of the whole local-queries x all-keys grid not computed (masked out, or
                    beyond the planned hops);
    backward_hops_sent: ring steps of ``(K, V, dK, dV)`` in the backward (``n_hops``), not counting
                    the final trip of the gradients to their owners;
    fused_calls:    forward fused-kernel calls (pieces of :mod:`mmgrow.ops.ring_hop`; 0 when every
                    hop ran the tile kernels).
    """

    hops_planned: int = 0
    hops_sent: int = 0
    hops_computed: int = 0
    tiles_computed: int = 0
    tiles_skipped: int = 0
    backward_hops_sent: int = 0
    fused_calls: int = 0


def _merge_weights(lse_a: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(w_a, w_b, lse)`` of the merge: ``O = w_a O_a + w_b O_b`` (weights in ``[0, 1]``, 0 for rows
    that see no key anywhere) and the merged LSE (``-inf`` there)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a = torch.exp(lse_a - m)
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    lse = m + torch.log(total)  # both -inf: log(0) = -inf, as it should
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return (w_a / safe)[..., None], (w_b / safe)[..., None], lse


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over keys ``A ∪ B`` from the results over ``A`` and over ``B`` (disjoint key sets).

    ``out_* [B, H, T, hd]``, ``lse_* [B, H, T]`` in the accumulation dtype; ``-inf`` LSEs (no key)
    are handled without NaN. See the module docstring for the equations.
    """
    w_a, w_b, lse = _merge_weights(lse_a, lse_b)
    return w_a * out_a + w_b * out_b, lse


def merge_into(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`merge_partials` writing into ``out_a`` and ``lse_a`` (views allowed; ``out_b`` is scaled in
    place): the forward keeps one running output buffer instead of allocating a merged one per hop."""
    w_a, w_b, lse = _merge_weights(lse_a, lse_b)
    out_a.mul_(w_a).add_(out_b.mul_(w_b))
    return out_a, lse_a.copy_(lse)


def _output_delta(out: Tensor, dout: Tensor, dlse: Tensor | None, rows: int = 1024) -> Tensor:
    """:func:`~mmgrow.ops.blockwise.output_delta` over blocks of ``rows`` tokens: no ``[T, hd]`` product
    buffer at the start of the backward."""
    delta = torch.empty(out.shape[:-1], dtype=accumulation_dtype(out.dtype), device=out.device)
    for a in range(0, out.shape[2], rows):
        delta[:, :, a:a + rows] = output_delta(out[:, :, a:a + rows], dout[:, :, a:a + rows], None)
    return delta if dlse is None else delta - dlse.to(delta.dtype)

def backward_inputs(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor, ...]:
    """What every ring-style backward starts from: the saved ``(q, k, v, out, lse)``, ``dout`` (zeros when
    the output was unused: ``set_materialize_grads(False)``) and ``delta = rowsum(dO * O) - d lse``."""
    q, k, v, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    return q, k, v, out, lse, dout, _output_delta(out, dout, dlse)


def check_shard_inputs(owner: str, q: Tensor, k: Tensor, v: Tensor, meta: TokenMeta, q_block: int, k_block: int) -> None:
    """``ValueError`` (naming ``owner``) unless ``q [B, H, T_local, hd]``, ``k, v [B, Hk, T_local, hd]`` and the
    token facts cover the same ``T_local`` tokens and the block sizes are positive."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"{owner}: expected q [B, H, T_local, hd], k and v [B, Hk, T_local, hd]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != k.shape[2] or meta.length != q.shape[2]:
        raise ValueError(f"{owner}: queries ({q.shape[2]}), keys ({k.shape[2]}) and token facts "
                         f"({meta.length}) must cover the same T_local tokens of this rank")
    if q_block < 1 or k_block < 1:
        raise ValueError(f"{owner}: block sizes must be positive, got {q_block}, {k_block}")



def _peer(cp: ContextParallel, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``cp.group`` (what ``P2POp`` addresses)."""
    if cp.group is None or cp.group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(cp.group, group_rank)


# Message tags: K/V, travelling gradients and gradients going home never match each other's receives,
# even where the two kinds are in flight between the same pair of ranks at once.
_TAG_KV, _TAG_GRAD, _TAG_HOME = 0, 1, 2


def _exchange(cp: ContextParallel, send: list[Tensor], recv: list[Tensor], to: int, frm: int, tag: int) -> list:
    """Post sends of ``send`` to group rank ``to`` and receives into ``recv`` from ``frm``; return the requests."""
    ops = [dist.P2POp(dist.isend, t, _peer(cp, to), cp.group, tag) for t in send]
    ops += [dist.P2POp(dist.irecv, t, _peer(cp, frm), cp.group, tag) for t in recv]
    return dist.batch_isend_irecv(ops)


def _wait(requests: list | None) -> None:
    for request in requests or ():
        request.wait()


# The lean mode moves K/V in chunks of this many tokens (and cuts the fused pieces to it): it bounds the
# transfer buffers and the kernels' per-call buffers to a few chunk-sized tensors per rank.
LEAN_CHUNK = 256


@dataclass
class _LeanStep:
    """One chunk of one hop of the lean transport: keys ``[a, b)`` of every shard."""

    a: int
    b: int
    send: bool                 # rank r + d needs this chunk of our keys
    recv: TilePlan | None      # our queries x this chunk of rank r - d's keys, when needed


def _lean_schedule(plan: RingPlan, spec: MaskSpec, q_block: int, k_block: int) -> dict[int, list[_LeanStep]]:
    """Per hop ``d = 1 .. n_hops``, the chunks sent to ``r + d`` and received from ``r - d``. Every rank
    derives both sides from the same gathered facts, so each send meets its receive."""
    r, W = plan.rank, plan.world_size
    length = plan.metas[r].length
    steps: dict[int, list[_LeanStep]] = {}
    for d in range(1, plan.n_hops + 1):
        src, dst = (r - d) % W, (r + d) % W
        steps[d] = []
        for a in range(0, length, LEAN_CHUNK):
            b = min(length, a + LEAN_CHUNK)
            send = plan.needed[dst][r] and TilePlan(plan.metas[dst], plan.metas[r].slice(a, b), spec, q_block,
                                                    k_block).tiles_needed > 0
            recv = None
            if plan.needed[r][src]:
                recv = TilePlan(plan.metas[r], plan.metas[src].slice(a, b), spec, q_block, k_block)
                recv = recv if recv.tiles_needed > 0 else None
            if send or recv is not None:
                steps[d].append(_LeanStep(a, b, send, recv))
    return steps


def _kv_chunk(cp: ContextParallel, x: Tensor, step: _LeanStep, d: int) -> tuple[list, Tensor | None]:
    """Post the exchange of one chunk of ``x`` (K or V) for hop ``d``: ours to ``r + d``, ``r - d``'s to us;
    return (requests, receive buffer or None)."""
    r, W = cp.rank, cp.world_size
    send = [x[:, :, step.a:step.b].contiguous()] if step.send else []
    shape = (*x.shape[:2], step.b - step.a, x.shape[-1])
    recv = [torch.empty(shape, dtype=x.dtype, device=x.device)] if step.recv is not None else []
    requests = _exchange(cp, send, recv, (r + d) % W, (r - d) % W, _TAG_KV)
    return requests, (recv[0] if recv else None)


class _LocalAttention(torch.autograd.Function):
    """One process (``W = 1``): the single hop over the local keys, fused where the mask allows."""

    @staticmethod
    def forward(ctx, q, k, v, tiles, scale, fused):
        ctx.set_materialize_grads(False)
        out, lse = hop_forward(q, k, v, tiles, scale, fused=fused, max_piece=_overlap_piece(q))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiles, ctx.scale, ctx.fused = tiles, scale, fused
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, dout, delta = backward_inputs(ctx, dout, dlse)
        dq, dk, dv = hop_backward(q, k, v, dout, lse, delta, ctx.tiles, ctx.scale, out=out if dlse is None else None,
                                  fused=ctx.fused, max_piece=_overlap_piece(q))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, spec, cp, scale, q_block, k_block, stats, plan_owner, fused, lean):
        ctx.set_materialize_grads(False)  # an unused lse gives dlse None: the fused backward reads out as is
        plan = RingPlan.build(meta, spec, cp, q_block, k_block, owner=plan_owner)
        acc = accumulation_dtype(q.dtype)
        tile_plans = {hop: TilePlan(meta, plan.metas[plan.source(hop)], spec, q_block, k_block)
                      for hop in range(plan.n_hops + 1) if plan.computes(hop)}
        if not lean:
            out, lse, sent = _forward_overlapped(q, k, v, plan, tile_plans, cp, scale, fused)
        else:
            ctx.schedule = _lean_schedule(plan, spec, q_block, k_block)
            out, lse, sent = _forward_lean(q, k, v, plan, tile_plans, cp, scale, fused, ctx.schedule)
        if out is None:  # no visible key on this rank at all
            out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=acc, device=q.device)
            lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.tile_plans, ctx.cp, ctx.scale, ctx.stats = plan, tile_plans, cp, scale, stats
        ctx.fused, ctx.lean = fused, lean
        if stats is not None:
            computed = sum(t.tiles_needed for t in tile_plans.values())
            grid = cp.world_size * -(-q.shape[2] // q_block) * -(-k.shape[2] // k_block)
            stats.hops_planned, stats.hops_sent, stats.hops_computed = plan.n_hops, sent, len(tile_plans)
            stats.tiles_computed, stats.tiles_skipped = computed, grid - computed
            stats.fused_calls = _count_fused(q, tile_plans, ctx.schedule if lean else None, fused)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, dout, delta = backward_inputs(ctx, dout, dlse)
        kernel_out = out if dlse is None else None  # with a d lse term the hop derives an out' from delta
        dq = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        run = _backward_lean if ctx.lean else _backward_overlapped
        dk, dv = run(ctx, q, k, v, dout, lse, delta, kernel_out, dq)
        if ctx.stats is not None:
            ctx.stats.backward_hops_sent = ctx.plan.n_hops
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *(None,) * 10


def _overlap_piece(x: Tensor) -> int | None:
    """Fused-piece cap of the overlapped ring: on CPU 1024 tokens bound the kernel's per-call buffers at
    no measurable speed cost; on GPUs the kernels want whole runs."""
    return 1024 if x.device.type == "cpu" else None


def _count_fused(q: Tensor, tile_plans: dict[int, TilePlan], schedule: dict | None, fused: Fused) -> int:
    """Fused-kernel calls of the forward (what :func:`hop_forward` runs for these plans)."""
    if schedule is None:
        plans = [(t, _overlap_piece(q)) for t in tile_plans.values()]
    else:
        plans = [(tile_plans[0], LEAN_CHUNK)] if 0 in tile_plans else []
        plans += [(s.recv, LEAN_CHUNK) for steps in schedule.values() for s in steps if s.recv is not None]
    return sum(sum(p.kind != "tiles" for p in fused_pieces(q, t, fused, m) or ()) for t, m in plans)


def _forward_overlapped(q, k, v, plan, tile_plans, cp, scale, fused):
    """Hops with the next K/V transfer in flight during this hop's compute (two K/V buffers)."""
    nxt, prv = (cp.rank + 1) % cp.world_size, (cp.rank - 1) % cp.world_size
    k_cur, v_cur = k.contiguous(), v.contiguous()
    out = lse = None
    sent = 0
    for hop in range(plan.n_hops + 1):
        pending = None
        if hop < plan.n_hops:  # post the next hop's transfer first: it runs while we compute
            k_nxt, v_nxt = torch.empty_like(k_cur), torch.empty_like(v_cur)
            pending = _exchange(cp, [k_cur, v_cur], [k_nxt, v_nxt], nxt, prv, _TAG_KV)
            sent += 1
        if hop in tile_plans:
            if out is None:
                out, lse = hop_forward(q, k_cur, v_cur, tile_plans[hop], scale, fused=fused, max_piece=_overlap_piece(q))
            else:
                hop_forward(q, k_cur, v_cur, tile_plans[hop], scale, fused=fused, max_piece=_overlap_piece(q),
                            into=(out, lse))
        _wait(pending)
        if pending is not None:
            k_cur, v_cur = k_nxt, v_nxt
            del k_nxt, v_nxt
    return out, lse, sent


def _lean_steps(schedule: dict[int, list[_LeanStep]]) -> list[tuple[int, _LeanStep]]:
    return [(d, step) for d, steps in schedule.items() for step in steps]


def _post_kv(cp: ContextParallel, k: Tensor, v: Tensor, steps: list, i: int) -> tuple | None:
    """Post the K and V chunk exchange of step ``i`` (None past the end): (requests, k chunk, v chunk)."""
    if i >= len(steps):
        return None
    d, step = steps[i]
    req_k, k_c = _kv_chunk(cp, k, step, d)
    req_v, v_c = _kv_chunk(cp, v, step, d)
    return req_k + req_v, k_c, v_c


def _forward_lean(q, k, v, plan, tile_plans, cp, scale, fused, schedule):
    """Hop 0 on the local shard, then for hop ``d`` each needed key chunk of rank ``r - d`` straight from
    its owner (which sends it from its own K/V: no rank keeps a copy of a whole shard). The next chunk's
    transfer is posted before this chunk is computed, so transfers overlap compute one chunk ahead."""
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    steps = _lean_steps(schedule)
    pending = _post_kv(cp, k, v, steps, 0)
    if 0 in tile_plans:
        hop_forward(q, k, v, tile_plans[0], scale, fused=fused, max_piece=LEAN_CHUNK, into=(out, lse))
    for i, (_, step) in enumerate(steps):
        requests, k_c, v_c = pending
        pending = _post_kv(cp, k, v, steps, i + 1)
        _wait(requests)
        if step.recv is not None:
            hop_forward(q, k_c, v_c, step.recv, scale, fused=fused, max_piece=LEAN_CHUNK, into=(out, lse))
        del k_c, v_c
    return out, lse, plan.n_hops


def _backward_overlapped(ctx, q, k, v, dout, lse, delta, kernel_out, dq):
    """``(dK, dV)`` of this rank's shard; K/V and the travelling ``dK, dV`` transfers overlap compute."""
    plan, cp, scale = ctx.plan, ctx.cp, ctx.scale
    nxt, prv = (cp.rank + 1) % cp.world_size, (cp.rank - 1) % cp.world_size
    acc = accumulation_dtype(q.dtype)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    dk_acc = dv_acc = None  # the travelling accumulator of the shard held at this hop
    grads_in = None          # (requests, dk buffer, dv buffer) of the accumulator arriving from prv
    for hop in range(plan.n_hops + 1):
        kv_pending = None
        if hop < plan.n_hops:
            k_nxt, v_nxt = torch.empty_like(k_cur), torch.empty_like(v_cur)
            kv_pending = _exchange(cp, [k_cur, v_cur], [k_nxt, v_nxt], nxt, prv, _TAG_KV)
        if hop in ctx.tile_plans:
            _, dk_h, dv_h = hop_backward(q, k_cur, v_cur, dout, lse, delta, ctx.tile_plans[hop], scale,
                                         dq_into=dq, out=kernel_out, fused=ctx.fused, max_piece=_overlap_piece(q))
        else:
            dk_h = dv_h = None
        # this hop's shard arrived with its accumulator from prv; wait only now, after computing
        if grads_in is None:
            dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device) if dk_h is None else dk_h
            dv_acc = torch.zeros(v.shape, dtype=acc, device=v.device) if dv_h is None else dv_h
        else:
            requests, dk_acc, dv_acc = grads_in
            _wait(requests)
            if dk_h is not None:
                dk_acc.add_(dk_h)  # in place: the received buffer is ours now
                dv_acc.add_(dv_h)
        dk_h = dv_h = grads_in = None
        if hop < plan.n_hops:
            dk_in, dv_in = torch.empty_like(dk_acc), torch.empty_like(dv_acc)
            grads_in = (_exchange(cp, [dk_acc, dv_acc], [dk_in, dv_in], nxt, prv, _TAG_GRAD), dk_in, dv_in)
            del dk_in, dv_in
        _wait(kv_pending)
        if kv_pending is not None:
            k_cur, v_cur = k_nxt, v_nxt
            del k_nxt, v_nxt
    k_cur = v_cur = None  # free the ring buffers before the receive buffers below
    if plan.n_hops > 0:  # the complete gradient of source (r - n_hops) goes home; ours comes from r + n_hops
        dk_own, dv_own = torch.empty_like(dk_acc), torch.empty_like(dv_acc)
        home, away = (cp.rank - plan.n_hops) % cp.world_size, (cp.rank + plan.n_hops) % cp.world_size
        _wait(_exchange(cp, [dk_acc, dv_acc], [dk_own, dv_own], home, away, _TAG_HOME))
        dk_acc, dv_acc = dk_own, dv_own
    return dk_acc, dv_acc


def _backward_lean(ctx, q, k, v, dout, lse, delta, kernel_out, dq):
    """``(dK, dV)`` of this rank's shard: hop 0 adds into them directly; for hop ``d`` each needed key
    chunk comes from its owner ``r - d`` (posted one chunk ahead), and its partial ``dK, dV`` go straight
    back to it while ours come back from ``r + d`` (added one chunk later, so that transfer overlaps too)."""
    cp, scale = ctx.cp, ctx.scale
    r, W = cp.rank, cp.world_size
    acc = accumulation_dtype(q.dtype)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    opts = {"out": kernel_out, "fused": ctx.fused, "max_piece": LEAN_CHUNK}
    steps = _lean_steps(ctx.schedule)
    pending = _post_kv(cp, k, v, steps, 0)
    if 0 in ctx.tile_plans:
        hop_backward(q, k, v, dout, lse, delta, ctx.tile_plans[0], scale, dq_into=dq, dk_into=dk, dv_into=dv, **opts)
    arriving = None  # (requests, receive buffers, step) of the previous chunk's partial gradients

    def land(arriving) -> None:
        if arriving is not None:
            requests, recv, step = arriving
            _wait(requests)
            if recv:
                dk[:, :, step.a:step.b] += recv[0]
                dv[:, :, step.a:step.b] += recv[1]

    for i, (d, step) in enumerate(steps):
        requests, k_c, v_c = pending
        pending = _post_kv(cp, k, v, steps, i + 1)
        _wait(requests)
        send = []
        if step.recv is not None:
            _, dk_c, dv_c = hop_backward(q, k_c, v_c, dout, lse, delta, step.recv, scale, dq_into=dq, **opts)
            send = [dk_c, dv_c]
        del k_c, v_c
        shape = (*k.shape[:2], step.b - step.a, k.shape[-1])
        recv = [torch.empty(shape, dtype=acc, device=k.device) for _ in range(2)] if step.send else []
        posted = (_exchange(cp, send, recv, (r - d) % W, (r + d) % W, _TAG_GRAD), recv, step)
        land(arriving)
        arriving = posted
        del send, recv, posted
    land(arriving)
    return dk, dv


def ring_attention(q: Tensor, k: Tensor, v: Tensor, meta: TokenMeta, spec: MaskSpec, cp: ContextParallel | None, *,
                   scale: float | None = None, q_block: int = DEFAULT_BLOCK, k_block: int = DEFAULT_BLOCK,
                   stats: RingStats | None = None, plan_owner: Any | None = None,
                   fused: Fused = "auto", lean: bool = False) -> tuple[Tensor, Tensor]:
    """Exact masked attention of this rank's queries over the keys of every rank of ``cp``.

    Args:
        q: ``[B, H, T_local, hd]`` this rank's queries; k, v: ``[B, Hk, T_local, hd]`` its keys and values
            (``H`` a multiple of ``Hk``). Every rank holds the same ``T_local``.
        meta: the mask facts of this rank's tokens with *global* stream indices
            (``TokenMeta.from_context(ctx)`` gives them when ``ctx.cp`` is set).
        spec: the mask rule.
        cp: the context-parallel group; ``None`` or a world size of 1 runs the single local hop (fused
            where the mask allows, else exactly :func:`~mmgrow.ops.blockwise.blockwise_attention`).
        scale: score scale, default ``1 / sqrt(hd)``.
        q_block, k_block: tile sizes of the local computation (and the granularity of the hop plan).
        stats: a :class:`RingStats` to fill in (forward counts; ``backward_hops_sent`` after backward).
        plan_owner: an object to cache the hop plan on (the batch's ``SeqContext``), so the layers of
            one batch all-gather the token facts once; see :meth:`RingPlan.build`. None: plan per call.
        fused: per-hop kernel (:mod:`mmgrow.ops.ring_hop`): ``"auto"`` runs the fused SDPA kernel with
            LSE on the pieces of a hop it can express (CPU flash, CUDA memory-efficient), tiles elsewhere;
            ``False`` forces the tile kernels; ``True`` raises where the device/dtype has no fused kernel.
        lean: ``False`` (default): whole K/V shards travel round the ring with the next hop's transfer
            and the travelling ``dK, dV`` in flight during each hop's compute (second K/V and ``dK, dV``
            buffers per rank). ``True``, the lean mode: at hop ``d`` each key chunk of
            :data:`LEAN_CHUNK` tokens comes straight from its owner ``r - d`` and its partial ``dK, dV``
            go straight back, so a rank holds only chunk-sized transfer buffers besides its outputs;
            transfers overlap compute one chunk ahead, with many small messages and kernel calls.

    Returns:
        ``(out [B, H, T_local, hd] in q's dtype, lse [B, H, T_local] in float32, float64 for float64
        input)``; rows with no visible key give ``0`` and ``-inf``. Both are differentiable; the
        gradients of ``k`` and ``v`` reach the rank that owns them.
    """
    check_shard_inputs("ring_attention", q, k, v, meta, q_block, k_block)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cp is None or cp.world_size == 1:
        tiles = TilePlan(meta, meta, spec, q_block, k_block)
        pieces = fused_pieces(q, tiles, fused, _overlap_piece(q))
        if stats is not None:
            stats.hops_planned = stats.hops_sent = stats.backward_hops_sent = 0
            stats.hops_computed = int(tiles.tiles_needed > 0)
            stats.tiles_computed, stats.tiles_skipped = tiles.tiles_needed, tiles.tiles_total - tiles.tiles_needed
            stats.fused_calls = sum(p.kind != "tiles" for p in pieces or ())
        if pieces is None:  # nothing for a fused kernel: exactly the blockwise kernel
            return blockwise_attention(q, k, v, meta, meta, spec, scale=scale, q_block=q_block, k_block=k_block)
        return _LocalAttention.apply(q, k, v, tiles, scale, fused)
    return _RingAttention.apply(q, k, v, meta, spec, cp, scale, q_block, k_block, stats, plan_owner, fused, lean)
