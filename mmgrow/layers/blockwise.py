"""Blockwise attention (``mixers: blockwise``): exact attention in ``O(T * block)`` memory.

The projections, RoPE, grouped-query heads and KV-cache decoding are those of
:class:`~mmgrow.layers.attention.FullAttention`; only a prefill's core differs: it runs
:func:`mmgrow.ops.blockwise.blockwise_attention` (query x key tiles, online softmax, tiles the mask
empties skipped, a custom backward that recomputes each tile from the saved log-sum-exp), so neither
pass ever holds a ``[T, T]`` score or mask tensor. This is the Blockwise Parallel Transformer's
attention; its blockwise feed-forward is the block's ``mlp_chunk`` option
(:class:`~mmgrow.models.block.Block`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mmgrow.layers.attention import FullAttention
from mmgrow.ops.blockwise import DEFAULT_BLOCK, blockwise_attention
from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import SeqContext


class BlockwiseAttention(FullAttention):
    """Multi-head attention computed tile by tile: ``x [B, T, D] -> y [B, T, D]``.

    Args (besides those of :class:`FullAttention`):
        query_block: queries per tile.
        key_block: keys per tile. Larger tiles are faster and use more memory (``B*H*qb*kb``
            scores live at a time).
    """

    def __init__(self, *, dim: int, layer_idx: int = 0, query_block: int = DEFAULT_BLOCK,
                 key_block: int = DEFAULT_BLOCK, **attention: Any) -> None:
        if attention.get("dropout", 0.0):
            raise ValueError(f"{type(self).__name__}: attention dropout is not supported (the backward pass "
                             "recomputes the probabilities); use dropout=0.0")
        super().__init__(dim=dim, layer_idx=layer_idx, **attention)
        if query_block < 1 or key_block < 1:
            raise ValueError(f"{type(self).__name__}: query_block and key_block must be positive, got "
                             f"{query_block}, {key_block}")
        self.query_block = query_block
        self.key_block = key_block

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """GQA and tiles smaller than the conformance sequences, so tiling and skipping are exercised."""
        return {"num_heads": 4, "num_kv_heads": 2, "query_block": 4, "key_block": 3}

    def native_attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: SeqContext, dropout_p: float) -> Tensor:
        """The tiled kernel (the CPU path, or ``kernel="native"``)."""
        meta = TokenMeta.from_context(ctx)
        out, _ = blockwise_attention(q, k, v, meta, meta, ctx.mask, q_block=self.query_block, k_block=self.key_block)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, query_block={self.query_block}, key_block={self.key_block}"
