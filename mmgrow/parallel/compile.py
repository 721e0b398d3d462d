"""Opt-in ``torch.compile`` of each block (``model.compile_blocks: true``).

Blocks rather than the whole model: every block of a backbone has the same code, so one compiled graph
serves them all (compile time does not grow with depth), the graph breaks that the unified model's
Python-side routing (modalities, heads, packing) would cause stay outside, and FSDP's per-block hooks
wrap compiled blocks (torchtitan compiles per block for these reasons). ``nn.Module.compile`` compiles
in place, so parameter names and checkpoints are unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def compile_blocks(model: nn.Module, **options: Any) -> int:
    """``block.compile(**options)`` for every block of ``model.blocks``; returns how many."""
    blocks = list(getattr(model, "blocks", []))
    for block in blocks:
        block.compile(**options)
    return len(blocks)
