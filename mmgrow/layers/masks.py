"""Boolean attention masks built from the :class:`~mmgrow.protocols.MaskSpec` rule.

With query ``i`` and key ``j`` of one row, key ``j`` is visible when all three hold:

* segments:  ``seg_q[i] == seg_k[j]`` and neither is ``PAD_SEGMENT``;
* causality (``causal=True`` only): ``index_k[j] <= index_q[i]`` *or*
  ``block_q[i] == block_k[j] != NO_BLOCK`` (same bidirectional block);
* window (``window=W`` only): ``|pos_q[i] - pos_k[j]| < W``;
* local blocks (``local=True`` only): a query in a block sees its own block, and the ``NO_BLOCK``
  keys the causality rule allows when ``shared_prefix``; queries outside every block are unaffected.

Indices are the tokens' places in the whole stream a layer has seen: for a prefill both are
``arange(T)``; with a KV cache holding ``S`` tokens the cached keys are ``0 .. S-1`` and the new
queries ``S .. S+T-1``. Positions (restarting per packed example) are what the window compares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec, SeqContext


def _as_rows(value: Tensor | None, batch: int, length: int, name: str, device: torch.device) -> Tensor | None:
    """``[T]`` or ``[B, T]`` -> ``[B, T]`` (None stays None); a wrong shape is a named error."""
    if value is None:
        return None
    value = torch.as_tensor(value, device=device)
    if value.dim() == 1:
        value = value.expand(batch, -1)
    if tuple(value.shape) != (batch, length):
        raise ValueError(f"attention_mask: {name} must be [{length}] or [{batch}, {length}], got {tuple(value.shape)}")
    return value


def attention_mask(
    q_pos: Tensor, k_pos: Tensor, spec: MaskSpec,
    q_seg: Tensor | None = None, k_seg: Tensor | None = None,
    q_block: Tensor | None = None, k_block: Tensor | None = None,
    q_index: Tensor | None = None, k_index: Tensor | None = None,
) -> Tensor:
    """``[B, Tq, Tk]`` bool mask (True = key visible) for queries at ``q_*`` and keys at ``k_*``.

    Args:
        q_pos, k_pos: ``[B, Tq]`` / ``[B, Tk]`` int positions (used by the window).
        spec: causality and window.
        q_seg, k_seg: ``[B, Tq]`` / ``[B, Tk]`` segment ids, both or neither (None = one segment).
        q_block, k_block: ``[B, Tq]`` / ``[B, Tk]`` block ids, both or neither (None = no blocks).
        q_index, k_index: ``[Tq]`` / ``[Tk]`` (or ``[B, T]``) stream indices for causality. Default
            ``arange``, which is only meaningful when queries and keys are the same tokens, so they
            are required when ``Tq != Tk`` and the mask is causal.
    """
    if q_pos.dim() != 2 or k_pos.dim() != 2 or q_pos.shape[0] != k_pos.shape[0]:
        raise ValueError(f"attention_mask: q_pos and k_pos must be [B, Tq] and [B, Tk], got "
                         f"{tuple(q_pos.shape)} and {tuple(k_pos.shape)}")
    B, Tq = q_pos.shape
    Tk = k_pos.shape[1]
    device = q_pos.device
    for a, b, what in ((q_seg, k_seg, "segment ids"), (q_block, k_block, "block ids")):
        if (a is None) != (b is None):
            raise ValueError(f"attention_mask: give {what} for both queries and keys or for neither")

    mask = torch.ones(B, Tq, Tk, dtype=torch.bool, device=device)
    if q_seg is not None:
        q_seg = _as_rows(q_seg, B, Tq, "q_seg", device)
        k_seg = _as_rows(k_seg, B, Tk, "k_seg", device)
        same = q_seg[:, :, None] == k_seg[:, None, :]
        mask &= same & (q_seg != PAD_SEGMENT)[:, :, None] & (k_seg != PAD_SEGMENT)[:, None, :]

    needs_blocks = spec.causal or spec.local
    if needs_blocks and q_block is not None:
        q_block = _as_rows(q_block, B, Tq, "q_block", device)
        k_block = _as_rows(k_block, B, Tk, "k_block", device)
        same_block = (q_block[:, :, None] == k_block[:, None, :]) & (q_block != NO_BLOCK)[:, :, None]
    else:
        same_block = None

    if spec.causal:
        if q_index is None and k_index is None:
            if Tq != Tk:
                raise ValueError(f"attention_mask: a causal mask with Tq={Tq} != Tk={Tk} needs q_index and k_index "
                                 "(stream indices of queries and keys, e.g. from a KV cache)")
            q_index = k_index = torch.arange(Tq, device=device)
        elif q_index is None or k_index is None:
            raise ValueError("attention_mask: give q_index and k_index together")
        q_index = _as_rows(q_index, B, Tq, "q_index", device)
        k_index = _as_rows(k_index, B, Tk, "k_index", device)
        allowed = k_index[:, None, :] <= q_index[:, :, None]
        if same_block is not None:
            allowed |= same_block
        mask &= allowed

    if spec.local and same_block is not None:
        # A query inside a block keeps only its own block (+ the prefix keys the rules above allow).
        in_block = (q_block != NO_BLOCK)[:, :, None]
        keep = same_block
        if spec.shared_prefix:
            keep = keep | (k_block == NO_BLOCK)[:, None, :]
        mask &= ~in_block | keep

    if spec.window is not None:
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs()
        mask &= distance < spec.window
    return mask


def mask_from_context(ctx: SeqContext) -> Tensor:
    """``[B, T, T]`` self-attention mask of one prefill over ``ctx`` (queries = keys = its tokens)."""
    return attention_mask(ctx.positions, ctx.positions, ctx.mask, ctx.segment_ids, ctx.segment_ids,
                          ctx.block_ids, ctx.block_ids)
