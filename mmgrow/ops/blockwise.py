"""Exact attention over query x key tiles with an online softmax (Blockwise Parallel Transformer).

Forward, for each query block ``Q_i`` and every key block ``K_j, V_j`` whose tile the mask does not
make empty (running max ``m``, normaliser ``l``, numerator ``a``, all in float32 or float64):

.. math::

    S = \\text{scale}\\, Q_i K_j^\\top \\ (\\text{masked} \\to -\\infty), \\quad
    m' = \\max(m, \\max_j S), \\quad l \\leftarrow e^{m - m'} l + \\textstyle\\sum_j e^{S - m'}, \\quad
    a \\leftarrow e^{m - m'} a + e^{S - m'} V_j

then ``O_i = a / l`` and ``lse_i = m + log l`` (``0`` and ``-inf`` for rows with no visible key).

Backward recomputes each tile from the saved ``lse`` (nothing of size ``T x T`` is kept):

.. math::

    P = e^{S - \\text{lse}}, \\quad dV_j \\mathrel{+}= P^\\top dO_i, \\quad
    dS = P \\circ (dO_i V_j^\\top - \\delta_i), \\quad dQ_i \\mathrel{+}= \\text{scale}\\, dS K_j, \\quad
    dK_j \\mathrel{+}= \\text{scale}\\, dS^\\top Q_i

with ``delta_i = rowsum(dO_i * O_i) - d lse_i`` (the last term makes the returned LSE differentiable).
Activation memory is ``O(T * block)`` in both passes. :func:`forward_tiles` and
:func:`backward_tiles` are also the local computation of the ring (:mod:`mmgrow.ops.ring`), which
calls them once per hop with the *global* ``lse`` and ``delta``.

Grouped-query attention: queries are laid out as ``[B, Hk, T, g, hd]`` (``g = H / Hk``), so keys and
values are never repeated and every tile product is one batched matmul.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmgrow.ops.token_meta import ChunkSummary, TokenMeta, tile_mask, tile_visibility
from mmgrow.protocols import MaskSpec

DEFAULT_BLOCK = 512


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: Tensor, num_kv_heads: int) -> Tensor:
    """``[B, H, T, ...] -> [B, Hk, T, g, ...]`` contiguous, so a slice of tokens is one contiguous
    ``[B, Hk, t*g, ...]`` matrix and every tile product is a plain batched matmul."""
    B, H, T = x.shape[:3]
    if H % num_kv_heads != 0:
        raise ValueError(f"blockwise attention: query heads ({H}) must be a multiple of key/value heads "
                         f"({num_kv_heads})")
    g = H // num_kv_heads
    return x.reshape(B, num_kv_heads, g, T, *x.shape[3:]).transpose(2, 3).contiguous()


def _ungrouped(x: Tensor) -> Tensor:
    """Inverse of :func:`_grouped`: ``[B, Hk, T, g, ...] -> [B, H, T, ...]``."""
    B, Hk, T, g = x.shape[:4]
    return x.transpose(2, 3).reshape(B, Hk * g, T, *x.shape[4:])


def _rows(x: Tensor) -> Tensor:
    """``[B, Hk, t, g, d] -> [B, Hk, t*g, d]`` (a view)."""
    return x.flatten(2, 3)


def _tile_scores(qb: Tensor, kb: Tensor, mask: Tensor | None, g: int, scale: float) -> Tensor:
    """``qb [B, Hk, bq, g, hd]`` x ``kb [B, Hk, bk, hd]`` -> scaled ``[B, Hk, bq*g, bk]``, masked
    entries ``-inf``. (The scale goes on the tile, not on a scaled copy of all queries.)"""
    s = torch.matmul(_rows(qb), kb.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        bq, bk = mask.shape[1:]
        s.view(*s.shape[:2], bq, g, bk).masked_fill_(~mask[:, None, :, None, :], float("-inf"))
    return s


class TilePlan:
    """Which ``(query block, key block)`` tiles to compute, and which of them need no mask."""

    def __init__(self, q_meta: TokenMeta, k_meta: TokenMeta, spec: MaskSpec, q_block: int, k_block: int) -> None:
        self.q_meta, self.k_meta, self.spec = q_meta, k_meta, spec
        self.q_block, self.k_block = q_block, k_block
        may, full = tile_visibility(ChunkSummary.of(q_meta, q_block), ChunkSummary.of(k_meta, k_block), spec)
        self.may = may.tolist()
        self.full = full.tolist()
        self.tiles_total = len(self.may) * (len(self.may[0]) if self.may else 0)

    def tiles(self):
        """Yield ``(q_slice, k_slice, mask or None)`` for every tile that may hold a visible pair."""
        Tq, Tk = self.q_meta.length, self.k_meta.length
        for i, row in enumerate(self.may):
            qs = slice(i * self.q_block, min(Tq, (i + 1) * self.q_block))
            for j, may in enumerate(row):
                if not may:
                    continue
                ks = slice(j * self.k_block, min(Tk, (j + 1) * self.k_block))
                mask = None if self.full[i][j] else tile_mask(self.q_meta.slice(qs.start, qs.stop),
                                                               self.k_meta.slice(ks.start, ks.stop), self.spec)
                yield qs, ks, mask

    @property
    def tiles_needed(self) -> int:
        return sum(sum(row) for row in self.may)


def forward_tiles(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float) -> tuple[Tensor, Tensor]:
    """Exact attention of ``q [B, H, Tq, hd]`` over ``k, v [B, Hk, Tk, hd]`` under ``plan``.

    Returns ``(out [B, H, Tq, hd_v], lse [B, H, Tq])``, both in the accumulation dtype.
    """
    acc = accumulation_dtype(q.dtype)
    B, H, Tq, _ = q.shape
    Hk = k.shape[1]
    g = H // Hk
    qg = _grouped(q.to(acc), Hk)                      # [B, Hk, Tq, g, hd]; no copy without GQA
    k, v = k.to(acc), v.to(acc)
    num = q.new_zeros((B, Hk, Tq, g, v.shape[-1]), dtype=acc)
    norm = q.new_zeros((B, Hk, Tq, g), dtype=acc)
    run_max = q.new_full((B, Hk, Tq, g), float("-inf"), dtype=acc)
    for qs, ks, mask in plan.tiles():
        s = _tile_scores(qg[:, :, qs], k[:, :, ks], mask, g, scale)  # [B, Hk, bq*g, bk]
        m_old = _rows(run_max[:, :, qs, :, None])[..., 0]              # [B, Hk, bq*g]
        m_new = torch.maximum(m_old, s.amax(dim=-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        rescale = torch.exp(m_old - m_safe)
        p = s.sub_(m_safe[..., None]).exp_()
        n = _rows(norm[:, :, qs, :, None])[..., 0]
        n.mul_(rescale).add_(p.sum(dim=-1))
        a = _rows(num[:, :, qs])
        a.mul_(rescale[..., None]).add_(torch.matmul(p, v[:, :, ks]))
        _rows(run_max[:, :, qs, :, None])[..., 0].copy_(m_new)
    nonempty = norm > 0
    safe_norm = torch.where(nonempty, norm, torch.ones_like(norm))
    out = num.div_(safe_norm[..., None])              # in place: no second [T, hd] buffer
    m_safe = torch.where(torch.isfinite(run_max), run_max, torch.zeros_like(run_max))
    lse = torch.where(nonempty, m_safe + torch.log(safe_norm), torch.full_like(norm, float("-inf")))
    return _ungrouped(out), _ungrouped(lse)


def backward_tiles(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, plan: TilePlan,
                   scale: float, *, dq_into: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the tiles of ``plan`` given the *final* ``lse`` and ``delta`` of each query row.

    ``dout [B, H, Tq, hd_v]``, ``lse, delta [B, H, Tq]``. Returns ``(dq, dk, dv)`` in the
    accumulation dtype, shaped like ``q``, ``k`` and ``v``. With ``dq_into`` (``[B, H, Tq, hd]``,
    accumulation dtype, contiguous) the query gradient is *added* to that buffer, which is returned
    as ``dq`` (the ring accumulates its hops without a buffer per hop).
    """
    acc = accumulation_dtype(q.dtype)
    Hk = k.shape[1]
    g = q.shape[1] // Hk
    qg = _grouped(q.to(acc), Hk)                      # no copies without GQA
    dog = _grouped(dout.to(acc), Hk)
    lse_g = _grouped(lse.to(acc), Hk)
    lse_g = torch.where(torch.isfinite(lse_g), lse_g, torch.full_like(lse_g, float("inf")))  # empty rows: P = 0
    delta_g = _grouped(delta.to(acc), Hk)
    k, v = k.to(acc), v.to(acc)
    in_place = dq_into is not None and g == 1         # [B, H, T, hd] is the grouped layout when g == 1
    dq = _grouped(dq_into, Hk) if in_place else torch.zeros_like(qg)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for qs, ks, mask in plan.tiles():
        p = _tile_scores(qg[:, :, qs], k[:, :, ks], mask, g, scale)
        p = p.sub_(_rows(lse_g[:, :, qs, :, None])).exp_()             # [B, Hk, bq*g, bk]
        do = _rows(dog[:, :, qs])                                        # [B, Hk, bq*g, hd]
        dv[:, :, ks] += torch.matmul(p.transpose(-1, -2), do)
        ds = torch.matmul(do, v[:, :, ks].transpose(-1, -2))
        ds.sub_(_rows(delta_g[:, :, qs, :, None])).mul_(p).mul_(scale)  # scale . dS: both products need it
        _rows(dq[:, :, qs]).add_(torch.matmul(ds, k[:, :, ks]))
        dk[:, :, ks] += torch.matmul(ds.transpose(-1, -2), _rows(qg[:, :, qs]))
    if in_place:
        return dq_into, dk, dv
    if dq_into is not None:
        return dq_into.add_(_ungrouped(dq)), dk, dv
    return _ungrouped(dq), dk, dv


def output_delta(out: Tensor, dout: Tensor, dlse: Tensor | None) -> Tensor:
    """``delta = rowsum(dO * O) - d lse`` in the accumulation dtype: ``[B, H, T]``."""
    acc = accumulation_dtype(out.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)
    return delta if dlse is None else delta - dlse.to(acc)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out, lse = forward_tiles(q, k, v, plan, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        delta = output_delta(out, dout, dlse)
        dq, dk, dv = backward_tiles(q, k, v, dout, lse, delta, ctx.plan, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, q_meta: TokenMeta, k_meta: TokenMeta, spec: MaskSpec,
                        *, scale: float | None = None, q_block: int = DEFAULT_BLOCK,
                        k_block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """Exact masked attention in ``O(T * block)`` memory, forward and backward.

    Args:
        q: ``[B, H, Tq, hd]``; k, v: ``[B, Hk, Tk, hd]`` (``H`` a multiple of ``Hk``).
        q_meta, k_meta: the mask facts of the queries and keys (:class:`TokenMeta`).
        spec: the mask rule.
        scale: score scale, default ``1 / sqrt(hd)``.
        q_block, k_block: tile sizes (tokens).

    Returns:
        ``(out [B, H, Tq, hd] in q's dtype, lse [B, H, Tq] in float32, float64 for float64 input)``;
        rows with no visible key give ``0`` and ``-inf``. Both are differentiable.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"blockwise_attention: expected q [B, H, Tq, hd], k and v [B, Hk, Tk, hd]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q_meta.length != q.shape[2] or k_meta.length != k.shape[2]:
        raise ValueError(f"blockwise_attention: token facts cover {q_meta.length} queries and {k_meta.length} keys, "
                         f"but q has {q.shape[2]} and k has {k.shape[2]} tokens")
    if q_block < 1 or k_block < 1:
        raise ValueError(f"blockwise_attention: block sizes must be positive, got {q_block}, {k_block}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    plan = TilePlan(q_meta, k_meta, spec, q_block, k_block)
    return _BlockwiseAttention.apply(q, k, v, plan, scale)
