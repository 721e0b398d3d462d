"""Activation checkpointing per block: keep only each block's input, recompute its insides in backward.

Activation memory of the backbone drops from ``depth x`` (everything a block saves) to ``depth x`` one
``[B, T, D]`` input plus one block's worth at a time, for one extra forward of every block. The flag
lives on :class:`~mmgrow.models.block.Block` (``activation_checkpointing``), so state-dict names do not
change (no wrapper module) and the block decides how it recomputes (non-reentrant
``torch.utils.checkpoint``, which supports keyword arguments, non-tensor outputs and FSDP2).
"""

from __future__ import annotations

from torch import nn


def checkpoint_blocks(model: nn.Module) -> int:
    """Turn on activation checkpointing in every block of ``model``; returns how many blocks."""
    blocks = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
    for block in blocks:
        block.activation_checkpointing = True
    return len(blocks)
