"""Block-local attention (``mixers: local``): TTT-video's "local attention over 3-second segments".

Each token of a bidirectional block (``ctx.block_ids[t] != NO_BLOCK``) attends only to its own
block, in both directions, plus (``shared_prefix=True``) the tokens outside every block
(``NO_BLOCK``: the text, a prefix frame) that causality allows, so every segment sees the prompt.
Tokens outside every block follow the context's normal rule (causal: everything before them).
Segments (packed rows) and a window in the context still apply. In mask terms the layer sets
``MaskSpec(local=True, shared_prefix=...)`` on the context (:mod:`mmgrow.layers.masks`).

**Cost.** The prefill is :class:`~mmgrow.layers.blockwise.BlockwiseAttention`'s tiled kernel, whose
tile plan (:func:`~mmgrow.ops.token_meta.tile_visibility`) skips every tile that pairs one block's
queries with another block's keys. A block query tile therefore visits its own block's tiles and
the prefix tiles: ``O(T * (block length + prefix length))`` instead of ``O(T^2)`` (with tiles
aligned to the blocks; a tile straddling two blocks is computed for both). Queries outside every
block still cost what the causal rule gives them.

**Building block ids.** One id per segment of the video, ``NO_BLOCK`` for the text, e.g. for a row
``[text (P tokens)] [frames, F tokens each]`` and ``f`` frames per 3-second segment::

    block_ids[:P] = NO_BLOCK
    block_ids[P:] = torch.arange(T - P) // (F * f)   # segment k of the video = block k

In packed rows, ids need not be unique across examples (segments already separate them), but they
must differ between neighbouring video segments of one example.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmgrow.layers.blockwise import BlockwiseAttention
from mmgrow.protocols import SeqContext


class LocalAttention(BlockwiseAttention):
    """Block-diagonal, bidirectional attention with an optional shared prefix: ``x [B, T, D] -> y [B, T, D]``.

    .. math::

        y_i = W_o \\sum_{j \\in \\mathcal{V}(i)} \\operatorname{softmax}_j(q_i \\cdot k_j / \\sqrt{hd})\\, v_j,
        \\quad \\mathcal{V}(i) = \\{ j : b_j = b_i \\} \\cup \\{ j : b_j = \\text{NO\\_BLOCK},\\ j \\text{ allowed by causality} \\}
        \\ \\text{for } b_i \\ne \\text{NO\\_BLOCK}

    (the second set only with ``shared_prefix``; segments and windows of the context narrow both).

    Args (besides those of :class:`~mmgrow.layers.blockwise.BlockwiseAttention`):
        shared_prefix: block queries also see the tokens outside every block (the text).
    """

    def __init__(self, *, dim: int, layer_idx: int = 0, shared_prefix: bool = True, **blockwise: Any) -> None:
        if not isinstance(shared_prefix, bool):
            raise TypeError(f"{type(self).__name__}: shared_prefix must be a bool, got {shared_prefix!r}")
        super().__init__(dim=dim, layer_idx=layer_idx, **blockwise)
        self.shared_prefix = shared_prefix

    def mixing_flops(self, seq_len: int) -> float | None:
        """Unknown (None): a query sees its own block plus the prefix, and the block length comes with the data
        (``ctx.block_ids``), not with the layer, so no per-layer count exists before a batch is seen."""
        return None

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """GQA and tiles (4 queries x 3 keys) smaller than the conformance sequences and its 3-token blocks."""
        return {"num_heads": 4, "num_kv_heads": 2, "query_block": 4, "key_block": 3}

    def layer_context(self, ctx: SeqContext) -> SeqContext:
        """``ctx`` with ``mask.local = True`` and ``mask.shared_prefix = shared_prefix``."""
        return replace(ctx, mask=replace(ctx.mask, local=True, shared_prefix=self.shared_prefix))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_prefix={self.shared_prefix}"
