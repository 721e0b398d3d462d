"""FlexAttention (``torch.nn.attention.flex_attention``) driven by the mmgrow mask rule, for CUDA.

The :class:`~mmgrow.protocols.MaskSpec` rule becomes a ``mask_mod`` that reads the per-token facts
(:class:`~mmgrow.ops.token_meta.TokenMeta`: stream index, position, segment, block) by index, so
packed documents, windows, bidirectional frames and local blocks all run in one fused kernel that
skips the tiles the mask empties. The ``BlockMask`` is built once per context and reused by every
layer that attends under it (building it evaluates the rule at every point, far more than one
layer's attention costs at long lengths).

FlexAttention needs ``torch.compile`` to be fast and has no CPU backward in the torch versions we
support, so :func:`flex_usable` only accepts CUDA tensors; everything else runs the SDPA or the
blockwise paths. Checked against the float64 oracle on a GPU by ``benchmarks/gpu_attention.py``
(``docs/attention.md`` has the numbers and the device).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec

_CACHE_ATTR = "_mmgrow_flex_block_masks"


def flex_available() -> bool:
    """FlexAttention importable (torch >= 2.5) and a CUDA device present."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def flex_usable(q: Tensor, dropout_p: float) -> bool:
    """Whether this call can go to FlexAttention: CUDA input, no attention dropout."""
    return q.is_cuda and dropout_p == 0.0 and flex_available()


def mask_mod_for(q: TokenMeta, k: TokenMeta, spec: MaskSpec):
    """``mask_mod(b, h, q_idx, kv_idx) -> bool`` implementing the rule of :mod:`mmgrow.layers.masks`.

    Every feature is always evaluated, from tensors (absent segments are all 0, absent blocks all
    ``NO_BLOCK``, an absent window is huge, the spec's switches are 0-d bool tensors): the function's
    code and the kinds of its captured values never change, so ``torch.compile`` builds one kernel
    per shape instead of one per mask kind (and never hits its recompilation limit).
    """
    def fill(x: Tensor | None, like: Tensor, value: int) -> Tensor:
        return torch.full_like(like, value) if x is None else x

    device = q.positions.device
    seg_q, seg_k = fill(q.segment_ids, q.positions, 0), fill(k.segment_ids, k.positions, 0)
    blk_q, blk_k = fill(q.block_ids, q.positions, NO_BLOCK), fill(k.block_ids, k.positions, NO_BLOCK)
    idx_q, idx_k, pos_q, pos_k = q.index, k.index, q.positions, k.positions
    causal = torch.tensor(spec.causal, device=device)
    window = torch.tensor(spec.window if spec.window is not None else 2**62, device=device)
    local = torch.tensor(spec.local and q.block_ids is not None, device=device)
    shared = torch.tensor(spec.shared_prefix, device=device)

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        sq, sk = seg_q[b, qi], seg_k[b, ki]
        bq, bk = blk_q[b, qi], blk_k[b, ki]
        same_block = (bq == bk) & (bq != NO_BLOCK)
        segments_ok = (sq == sk) & (sq != PAD_SEGMENT) & (sk != PAD_SEGMENT)
        causal_ok = ~causal | (idx_k[b, ki] <= idx_q[b, qi]) | same_block
        window_ok = (pos_q[b, qi] - pos_k[b, ki]).abs() < window
        local_ok = ~local | (bq == NO_BLOCK) | same_block | (shared & (bk == NO_BLOCK))
        return segments_ok & causal_ok & window_ok & local_ok

    return mask_mod


def block_mask_for(q: TokenMeta, k: TokenMeta, spec: MaskSpec, owner: Any | None = None) -> Any:
    """The ``BlockMask`` of the rule, cached on ``owner`` (e.g. the :class:`SeqContext`) per spec."""
    from torch.nn.attention.flex_attention import create_block_mask

    cache = None if owner is None else owner.__dict__.setdefault(_CACHE_ATTR, {})
    key = (spec, q.length, k.length)
    if cache is not None and key in cache:
        return cache[key]
    B = q.positions.shape[0]
    block_mask = create_block_mask(mask_mod_for(q, k, spec), B, None, q.length, k.length,
                                   device=q.positions.device)
    if cache is not None:
        cache[key] = block_mask
    return block_mask


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_masked_attention(q: Tensor, k: Tensor, v: Tensor, q_meta: TokenMeta, k_meta: TokenMeta, spec: MaskSpec,
                          *, scale: float | None = None, owner: Any | None = None) -> tuple[Tensor, Tensor]:
    """``q [B, H, Tq, hd]``, ``k, v [B, Hk, Tk, hd]`` -> ``(out [B, H, Tq, hd], lse [B, H, Tq] float32)``.

    Rows with no visible key give output 0 (FlexAttention's convention) and LSE ``-inf``.
    """
    block_mask = block_mask_for(q_meta, k_meta, spec, owner)
    out, lse = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale,
                                enable_gqa=q.shape[1] != k.shape[1], return_lse=True)
    return out, lse
