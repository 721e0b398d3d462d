"""One hop of ring attention with a fused kernel that returns the log-sum-exp, or the tile kernels.

:func:`hop_forward` and :func:`hop_backward` are drop-in replacements of
:func:`~mmgrow.ops.blockwise.forward_tiles` and :func:`~mmgrow.ops.blockwise.backward_tiles`
(same arguments, same results, accumulation dtype): the ring transports (:mod:`mmgrow.ops.ring`,
the all-gather variant) call them once per (local queries, K/V shard) pair.

**Pieces.** A shard's tokens are runs of consecutive stream indices (one run in the contiguous
layout, two half-chunks in zigzag, as ring-flash-attention splits them). Each (query run, key run)
pair of the hop is classified from the :class:`~mmgrow.ops.token_meta.TokenMeta` facts and the
:class:`~mmgrow.protocols.MaskSpec` with the conservative tile test
:func:`~mmgrow.ops.token_meta.tile_visibility` applied to the whole runs:

* *invisible* (no pair can be visible): skipped;
* *full* (every pair visible: all keys before all queries under causality, or bidirectional, with
  one segment and no window or block in the way): the fused kernel without a mask;
* *causal*: the same index range on both sides, and the mask without its causality is full with no
  bidirectional block in either run: the fused kernel with ``is_causal`` (top-left aligned, exact
  because both runs start at the same stream index);
* anything else (windows, segment or block boundaries, partly overlapping runs): the tile kernels on
  that pair only.

Pieces of one query run are folded together with the log-sum-exp merge, so the hop's
``(out, lse)`` is exactly that of :func:`forward_tiles`.

**Backward with the final statistics.** The fused backward kernels take ``(dO, q, k, v, out, lse)``
and compute ``P = exp(scale q k^T - lse)`` and ``dS = P (dO v^T - rowsum(dO * out))``. Given the
*final* (whole-ring) ``lse`` and ``out`` they return exactly the terms of the hop's keys in the
whole-sequence gradient — what :func:`backward_tiles` computes from ``lse`` and
``delta = rowsum(dO * O) - d lse`` (the same argument torch's context parallelism relies on). The
kernels recompute ``rowsum(dO * out)`` themselves, so when ``delta`` carries a ``d lse`` term, or no
``out`` is passed, the ``out`` handed to them is one with the right row sums:
``out' = dO * delta / rowsum(dO^2)`` (rows with ``dO = 0`` and ``delta != 0`` fall back to tiles).

**Kernels.** CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``), run in
the accumulation dtype (float64 supported, which makes the fused path testable against the float64
oracle). CUDA (not run in this project's CI, which has no GPU):
``aten._scaled_dot_product_efficient_attention`` with ``compute_log_sumexp=True`` (+ ``_backward``)
in the input dtype (float16, bfloat16, float32), gradients summed per hop in float32. Grouped-query
attention expands K/V to the query heads for the kernel and sums ``dK, dV`` back per KV head.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from mmgrow.ops.blockwise import TilePlan, accumulation_dtype, backward_tiles, forward_tiles
from mmgrow.ops.token_meta import ChunkSummary, TokenMeta, tile_visibility
from mmgrow.protocols import NO_BLOCK, MaskSpec

Fused = bool | Literal["auto"]
_PIECES_ATTR = "_mmgrow_fused_pieces"  # cached on the TilePlan: the backward reuses the forward's pieces


@dataclass(frozen=True)
class Piece:
    """A (query run, key run) pair of one hop: ``kind`` is ``"full"``, ``"causal"`` or ``"tiles"``."""

    qs: slice
    ks: slice
    kind: str
    plan: TilePlan | None = None  # the sub-pair's tile plan ("tiles" only)


def fused_kernel_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """True when this module has a fused kernel with LSE for ``device``/``dtype``/``head_dim``."""
    if device.type == "cpu":
        return dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if device.type == "cuda":  # memory-efficient kernel: these dtypes, head dims multiple of 8 up to 128
        return dtype in (torch.float16, torch.bfloat16, torch.float32) and head_dim % 8 == 0 and head_dim <= 128
    return False


def _runs(index: Tensor) -> list[tuple[int, int]] | None:
    """Maximal runs ``[start, stop)`` of consecutive stream indices, or None when the rows of the batch
    disagree (then no piece can share one kernel call over the batch)."""
    if index.shape[0] > 1 and not bool((index == index[:1]).all()):
        return None
    row = index[0]
    if row.numel() == 0:
        return []
    breaks = (torch.nonzero(row.diff() != 1).flatten() + 1).tolist()
    return list(itertools.pairwise([0, *breaks, row.numel()]))


def _cut(a: int, b: int, size: int | None) -> list[tuple[int, int]]:
    """``[a, b)`` in consecutive parts of at most ``size`` tokens."""
    return [(a, b)] if size is None else [(x, min(b, x + size)) for x in range(a, b, size)]


def _split(piece: Piece, max_piece: int | None) -> list[Piece]:
    """``piece`` cut into parts of at most ``max_piece`` queries and keys: a full pair gives full parts; a
    causal pair (same index range on both sides) gives causal parts on its diagonal, full parts below
    it and none above; a tiles pair stays whole (its tile plan already bounds its buffers)."""
    if max_piece is None or piece.kind == "tiles":
        return [piece]
    qs, ks = _cut(piece.qs.start, piece.qs.stop, max_piece), _cut(piece.ks.start, piece.ks.stop, max_piece)
    parts = []
    for i, (qa, qb) in enumerate(qs):
        for j, (ka, kb) in enumerate(ks):
            if piece.kind == "full" or j < i:
                parts.append(Piece(slice(qa, qb), slice(ka, kb), "full"))
            elif j == i:
                parts.append(Piece(slice(qa, qb), slice(ka, kb), "causal"))
    return parts


def _no_blocks(meta: TokenMeta) -> bool:
    return meta.block_ids is None or bool((meta.block_ids == NO_BLOCK).all())


def _classify(q: TokenMeta, k: TokenMeta, spec: MaskSpec) -> str | None:
    """The kind of the (query run ``q``, key run ``k``) pair; None when invisible."""
    qs, ks = ChunkSummary.of(q, q.length), ChunkSummary.of(k, k.length)
    may, full = tile_visibility(qs, ks, spec)
    if not bool(may.any()):
        return None
    if bool(full.all()):
        return "full"
    same_range = q.length == k.length and bool((q.index[:, 0] == k.index[:, 0]).all())
    if spec.causal and same_range and _no_blocks(q) and _no_blocks(k):
        _, full_without_causality = tile_visibility(qs, ks, replace(spec, causal=False, local=False,
                                                                    shared_prefix=False))
        if bool(full_without_causality.all()):
            return "causal"
    return "tiles"


def hop_pieces(plan: TilePlan, max_piece: int | None = None) -> list[Piece] | None:
    """The visible pieces of the hop of ``plan`` (cached on it), or None when the hop has no run structure.

    ``max_piece`` cuts the runs into parts of at most that many tokens (the diagonal of a causal run
    becomes causal parts, the rest full or invisible parts): it bounds the kernel's per-call buffers
    (``dq, dk, dv`` of a piece) at the cost of more, smaller kernel calls.
    """
    cache = plan.__dict__.setdefault(_PIECES_ATTR, {})
    if max_piece in cache:
        return cache[max_piece]
    if None not in cache:  # classify the maximal runs once; the cut parts follow from their kinds
        q_runs, k_runs = _runs(plan.q_meta.index), _runs(plan.k_meta.index)
        pieces = None
        if q_runs is not None and k_runs is not None:
            pieces = []
            for qa, qb in q_runs:
                q = plan.q_meta.slice(qa, qb)
                for ka, kb in k_runs:
                    k = plan.k_meta.slice(ka, kb)
                    kind = _classify(q, k, plan.spec)
                    if kind is None:
                        continue
                    sub = TilePlan(q, k, plan.spec, plan.q_block, plan.k_block) if kind == "tiles" else None
                    if sub is not None and sub.tiles_needed == 0:
                        continue
                    pieces.append(Piece(slice(qa, qb), slice(ka, kb), kind, sub))
        cache[None] = pieces
    whole = cache[None]
    cache[max_piece] = None if whole is None else [part for p in whole for part in _split(p, max_piece)]
    return cache[max_piece]


def fused_pieces(q: Tensor, plan: TilePlan, fused: Fused, max_piece: int | None = None) -> list[Piece] | None:
    """The pieces :func:`hop_forward` runs for queries like ``q`` (device, dtype, head dim), or None when it runs
    the plain tile kernels on the whole hop."""
    if fused is False:
        return None
    if fused not in (True, "auto"):
        raise ValueError(f"ring hop: fused must be True, False or 'auto', got {fused!r}")
    if not fused_kernel_available(q.device, q.dtype, q.shape[-1]):
        if fused is True:
            raise ValueError(f"ring hop: fused=True but no fused kernel with LSE for device {q.device.type}, "
                             f"dtype {q.dtype}, head_dim {q.shape[-1]}; use fused='auto' or False")
        return None
    pieces = hop_pieces(plan, max_piece)
    if pieces is None or all(p.kind == "tiles" for p in pieces):
        return None  # nothing for the fused kernel: one tile pass over the whole hop
    return pieces


def _expand_kv(x: Tensor, heads: int) -> Tensor:
    """``[B, Hk, T, d] -> [B, H, T, d]``: query head ``h`` reads KV head ``h // g`` (as the tile kernels group)."""
    B, Hk, T, d = x.shape
    if Hk == heads:
        return x
    return x[:, :, None].expand(B, Hk, heads // Hk, T, d).reshape(B, heads, T, d)


def _sum_kv(dx: Tensor, kv_heads: int) -> Tensor:
    """Inverse of :func:`_expand_kv` for gradients: sum the query heads of each KV head."""
    B, H, T, d = dx.shape
    if H == kv_heads:
        return dx
    return dx.view(B, kv_heads, H // kv_heads, T, d).sum(dim=2)


def _kernel_dtype(q: Tensor) -> torch.dtype:
    """CPU runs in the accumulation dtype (exact float64); CUDA keeps the input dtype (its speed)."""
    return accumulation_dtype(q.dtype) if q.device.type == "cpu" else q.dtype


def _fused_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of ``q [B, H, Tq, hd]`` over ``k, v [B, H, Tk, hd]`` (heads already expanded)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]]  # the kernel pads the LSE to a multiple of 32 rows


def _fused_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward of one piece given the *final* ``out`` and ``lse`` rows of its queries."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.contiguous(), 0.0, causal, scale=scale)
    Tq = q.shape[2]
    pad = -Tq % 32  # the kernel reads the LSE in the padded layout its forward returns
    lse = torch.nn.functional.pad(lse.float(), (0, pad)).contiguous()
    empty = torch.empty(0, device=q.device, dtype=torch.int64)  # RNG state: unused without dropout
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), None, out.contiguous(), lse, empty,
        empty, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


def hop_forward(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float, *,
                fused: Fused = "auto", max_piece: int | None = None,
                into: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Attention of ``q [B, H, Tq, hd]`` over ``k, v [B, Hk, Tk, hd]`` under ``plan``: ``(out [B, H, Tq, hd],
    lse [B, H, Tq])`` in the accumulation dtype, equal to :func:`forward_tiles` (rows seeing no key: 0, -inf).

    ``fused``: ``"auto"`` runs the fused kernel on the pieces it can express when the device/dtype has
    one; ``True`` also, but raises when there is none; ``False`` always runs the tile kernels.
    ``max_piece``: see :func:`hop_pieces`. ``into``: a running ``(out, lse)`` pair (accumulation dtype) to
    merge this hop into in place and return, instead of new buffers (no query-sized temporary per hop).
    """
    from mmgrow.ops.ring import merge_into  # the ring imports this module

    pieces = fused_pieces(q, plan, fused, max_piece)
    if pieces is None:
        o, l = forward_tiles(q, k, v, plan, scale)
        return (o, l) if into is None else merge_into(*into, o, l)
    acc, kdt, H = accumulation_dtype(q.dtype), _kernel_dtype(q), q.shape[1]
    if into is None:
        out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=acc)
        lse = q.new_full(q.shape[:-1], float("-inf"), dtype=acc)
    else:
        out, lse = into
    for p in pieces:
        qp = q[:, :, p.qs]
        if p.kind == "tiles":
            o, l = forward_tiles(qp, k[:, :, p.ks], v[:, :, p.ks], p.plan, scale)
        else:
            o, l = _fused_forward(qp.to(kdt), _expand_kv(k[:, :, p.ks].to(kdt), H), _expand_kv(v[:, :, p.ks].to(kdt), H),
                                  p.kind == "causal", scale)
            o, l = o.to(acc), l.to(acc)
        # always a merge: pieces of one query row may cover different query ranges (a tiles pair is not
        # cut), and merging into the initial 0 / -inf rows is exact (weight 0 on them)
        merge_into(out[:, :, p.qs], lse[:, :, p.qs], o, l)
    return out, lse


def _kernel_out(dout: Tensor, delta: Tensor) -> Tensor | None:
    """An ``out'`` with ``rowsum(dout * out') = delta`` (see the module docstring), or None when a row
    with ``dout = 0`` needs ``delta != 0``."""
    norm = (dout * dout).sum(dim=-1)
    if bool(((norm == 0) & (delta != 0)).any()):
        return None
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return dout * (delta / safe)[..., None]


def hop_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, plan: TilePlan,
                 scale: float, *, dq_into: Tensor | None = None, out: Tensor | None = None,
                 fused: Fused = "auto", max_piece: int | None = None, dk_into: Tensor | None = None,
                 dv_into: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the hop of ``plan`` given the *final* ``lse`` and ``delta`` rows: ``(dq, dk, dv)`` in the
    accumulation dtype, equal to :func:`backward_tiles` (``dq_into``: added into that buffer and returned).

    ``out``: the final output ``[B, H, Tq, hd]`` when ``delta = rowsum(dout * out)`` exactly (no ``d lse``
    term); the fused kernel then reads it as is. Without it one with the same row sums is derived from
    ``delta``. ``dk_into``, ``dv_into``: like ``dq_into`` for the key and value gradients (accumulation
    dtype, shaped like ``k``, ``v``): the lean ring adds each hop into its travelling accumulators.
    """
    pieces = fused_pieces(q, plan, fused, max_piece)
    kout = None
    if pieces is not None:
        kout = out if out is not None else _kernel_out(dout.to(accumulation_dtype(q.dtype)),
                                                       delta.to(accumulation_dtype(q.dtype)))
    if pieces is None or kout is None:
        dq, dk, dv = backward_tiles(q, k, v, dout, lse, delta, plan, scale, dq_into=dq_into)
        return dq, _add_into(dk_into, dk), _add_into(dv_into, dv)
    acc, kdt, H, Hk = accumulation_dtype(q.dtype), _kernel_dtype(q), q.shape[1], k.shape[1]
    dq = dq_into if dq_into is not None else torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = dk_into if dk_into is not None else torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = dv_into if dv_into is not None else torch.zeros(v.shape, dtype=acc, device=v.device)
    for p in pieces:
        qp, kp, vp = q[:, :, p.qs], k[:, :, p.ks], v[:, :, p.ks]
        if p.kind == "tiles":
            dq_p, dk_p, dv_p = backward_tiles(qp, kp, vp, dout[:, :, p.qs], lse[:, :, p.qs], delta[:, :, p.qs],
                                              p.plan, scale)
        else:
            dq_p, dk_p, dv_p = _fused_backward(dout[:, :, p.qs].to(kdt), qp.to(kdt), _expand_kv(kp.to(kdt), H),
                                               _expand_kv(vp.to(kdt), H), kout[:, :, p.qs].to(kdt),
                                               lse[:, :, p.qs].to(acc if kdt == acc else torch.float32),
                                               p.kind == "causal", scale)
            dk_p, dv_p = _sum_kv(dk_p.to(acc), Hk), _sum_kv(dv_p.to(acc), Hk)
        dq[:, :, p.qs] += dq_p
        dk[:, :, p.ks] += dk_p
        dv[:, :, p.ks] += dv_p
        del dq_p, dk_p, dv_p  # before the next piece's buffers exist
    return dq, dk, dv


def _add_into(into: Tensor | None, x: Tensor) -> Tensor:
    return x if into is None else into.add_(x)
