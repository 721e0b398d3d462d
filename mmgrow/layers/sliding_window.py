"""Sliding-window attention (``mixers: sliding_window``): each token sees the last ``window`` positions.

The projections, RoPE and grouped-query heads are those of
:class:`~mmgrow.layers.attention.FullAttention`; the layer narrows the context's mask to its own
window (``|positions[i] - positions[j]| < window``, the tighter of the layer's and the context's)
and computes a prefill with :func:`mmgrow.ops.sliding_window.windowed_attention` in ``O(T * window)``
time (window tiles of the blockwise kernel for windows of 128 tokens or more, vectorised chunks below). Segments, blocks and causality of the context still apply.

**Decoding** keeps a rolling KV window: a future query at position ``p`` can only see keys at
positions ``> p - window``, i.e. (positions advancing by one per token) the last ``window - 1``
tokens, so the cache never holds more, however long the stream. The cache is a plain
:class:`~mmgrow.layers.attention.KVCache` whose ``seen`` counts every token of the stream, so the
cached keys keep their stream indices ``seen - size .. seen - 1``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from mmgrow.layers.attention import FullAttention, KVCache, masked_sdpa
from mmgrow.ops.sliding_window import positions_advance, windowed_attention
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.protocols import SeqContext


class SlidingWindowAttention(FullAttention):
    """Multi-head attention over a sliding window of positions: ``x [B, T, D] -> y [B, T, D]``.

    .. math::

        y_i = W_o \\sum_{j \\in \\mathcal{V}(i)} \\operatorname{softmax}_j(q_i \\cdot k_j / \\sqrt{hd})\\, v_j,
        \\quad \\mathcal{V}(i) = \\{ j \\text{ visible under the context's rule} :
        |p_i - p_j| < \\min(\\text{window}, \\text{ctx window}) \\}

    Args (besides those of :class:`FullAttention`, except ``dropout``, which must stay 0):
        window: tokens each query sees, itself included (a positive int; Mistral-style SWA).

    Decoding state: :class:`~mmgrow.layers.attention.KVCache` holding at most ``window - 1`` tokens.
    It is exact when positions advance by at least one per token within each segment and every
    segment's tokens are contiguous in the stream; a chunk whose positions break this raises.
    """

    supports_window = True

    def __init__(self, *, dim: int, layer_idx: int = 0, window: int = 512, **attention: Any) -> None:
        name = type(self).__name__
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{name}: window must be a positive int (tokens each query sees), got {window!r}")
        if attention.get("dropout", 0.0):
            raise ValueError(f"{name}: attention dropout is not supported by the chunked window kernel; "
                             "use dropout=0.0")
        super().__init__(dim=dim, layer_idx=layer_idx, **attention)
        self.window = window

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """GQA and a window (3) shorter than the conformance sequences (7-12 tokens), so chunks,
        their neighbours and the rolling cache's eviction are all exercised."""
        return {"num_heads": 4, "num_kv_heads": 2, "window": 3}

    def layer_context(self, ctx: SeqContext) -> SeqContext:
        """``ctx`` with ``mask.window = min(window, ctx.mask.window)``."""
        window = self.window if ctx.mask.window is None else min(self.window, ctx.mask.window)
        return replace(ctx, mask=replace(ctx.mask, window=window))

    def native_attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, dropout_p: float) -> Tensor:
        """The chunked ``O(T * window)`` kernel (the CPU path, or ``kernel="native"``)."""
        out, _ = windowed_attention(q, k, v, TokenMeta.from_context(ctx), ctx.mask)
        return out

    # ---------------------------------------------------------------------------------------------

    def _attend_with_cache(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, state: KVCache,
                           dropout_p: float) -> tuple[Tensor, KVCache]:
        """Attend ``T`` new tokens to the rolling cache + themselves, then keep the last ``window - 1``.

        A chunk no longer than the window uses one dense ``[T, S + T]`` mask (``S < window``); a
        longer chunk runs the chunked kernel over cache + chunk (zero queries stand in for the
        cached tokens, whose rows are dropped), so the cost stays ``O(T * window)`` either way."""
        self._check_cache(state, k)
        B, T = ctx.positions.shape
        S = state.size
        k_all, v_all, meta, queries = state.append(k, v, ctx)
        keep = min(S + T, self.window - 1)
        if keep < S + T and not bool(positions_advance(meta)):
            raise ValueError(f"{type(self).__name__} (layer {self.layer_idx}): positions must advance by at least "
                             "one per token within each segment for the rolling KV window to drop old keys; got "
                             f"positions {meta.positions.tolist()} for segments {meta.segment_ids.tolist()}")
        if T <= ctx.mask.window:
            out = masked_sdpa(q, k_all, v_all, tile_mask(queries, meta, ctx.mask))
        else:
            q_all = torch.cat((q.new_zeros(B, q.shape[1], S, q.shape[3]), q), dim=2)
            out = windowed_attention(q_all, k_all, v_all, meta, ctx.mask)[0][:, :, S:]
        first = S + T - keep
        new_state = KVCache(k_all[:, :, first:], v_all[:, :, first:], meta.positions[:, first:],
                            meta.segment_ids[:, first:], meta.block_ids[:, first:], state.seen + T)
        return out, new_state

    def mixing_flops(self, seq_len: int) -> float:
        """``2 min(W, S) d_attn`` per token: full attention's term with the context cut to the window."""
        return 2.0 * min(self.window, seq_len) * self.num_heads * self.head_dim

    def state_size(self, seq_len: int) -> int:
        """Elements of K and V cached per example after ``seq_len`` tokens:
        ``2 * Hk * hd * min(seq_len, window - 1)`` (bounded, unlike full attention)."""
        return 2 * self.num_kv_heads * self.head_dim * min(seq_len, self.window - 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"

