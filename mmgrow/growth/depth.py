"""``insert_depth``: function-preserving depth growth (ModelGrow's block expansion; LLaMA-Pro).

Each new block is a copy of a neighbouring block with the output projection of every residual
branch — attention, memory, cross-attention, MLP; weights *and* biases — set to zero, so it computes
``x -> x + 0 = x`` exactly and the grown model is the old model bit for bit (dropout off). This holds
for adaLN blocks too: the modulated branches are multiplied by their gates *after* the zeroed
projection. (Zeroing the gates instead is not enough under adaLN-single, where a block's gate is its
table entry plus a shared projection, nor for an ungated cross-attention branch.)

Placement of ``count`` copies in an ``L``-block model:

- ``insert`` (default; ModelGrow's choice, LLaMA-Pro's scheme): the blocks are cut into ``count``
  groups of (nearly) equal size and the last block of each group gets a copy right after it —
  source ``s_i = ceil((i + 1) L / count) - 1``; 32 blocks + 8 copies = a copy after every 4th block.
- ``prefix``: copies of the first ``count`` blocks, placed before block 0 (cycling when ``count > L``).
- ``suffix``: copies of the last ``count`` blocks, placed after the last block.
- ``sources``: explicit block indices, each followed by its copy (overrides ``placement``).

Right after growth only the zeroed projections receive gradient (everything upstream in a new block
sits behind a zero matrix); the rest of the new block starts to learn from the second step.
"""

from __future__ import annotations

import copy
import math

from torch import nn

from mmgrow.growth.base import GrowthError, NewParameters, backbone_of, renumber_layers, zero_residual_outputs
from mmgrow.protocols import GrowthReport, GrowthStrategy

PLACEMENTS = ("insert", "prefix", "suffix")


def insert_sources(depth: int, count: int) -> list[int]:
    """Blocks that get a copy after them under ``insert`` placement: the last block of each of
    ``count`` nearly equal groups, ``ceil((i + 1) * depth / count) - 1``."""
    return [math.ceil((i + 1) * depth / count) - 1 for i in range(count)]


class InsertDepthGrowth(GrowthStrategy):
    """Add ``count`` identity-initialised copies of existing blocks (see the module docstring).

    Args:
        count: number of new blocks (>= 1).
        placement: ``"insert"`` (interleaved), ``"prefix"`` or ``"suffix"``.
        sources: explicit source blocks (each followed by its copy); overrides ``placement``.
    """

    preserves = "exact"

    def __init__(self, count: int = 1, placement: str = "insert", sources: list[int] | None = None) -> None:
        if not isinstance(count, int) or count < 1:
            raise GrowthError(f"insert_depth: count must be a positive int, got {count!r}")
        if placement not in PLACEMENTS:
            raise GrowthError(f"insert_depth: placement must be one of {PLACEMENTS}, got {placement!r}")
        if sources is not None and len(sources) != count:
            raise GrowthError(f"insert_depth: {len(sources)} sources given for count={count}; give one per new block")
        self.count = count
        self.placement = placement
        self.sources = None if sources is None else list(sources)

    @classmethod
    def conformance_kwargs(cls) -> dict:
        return {"count": 2}

    def plan(self, depth: int) -> list[tuple[int, bool]]:
        """The grown stack as ``(source block, is_copy)`` pairs in order."""
        if self.sources is not None:
            for s in self.sources:
                if not isinstance(s, int) or not -depth <= s < depth:
                    raise GrowthError(f"insert_depth: source {s!r} is not a block index of a {depth}-block model")
            after = [s % depth for s in self.sources]
        elif self.placement == "insert":
            after = insert_sources(depth, self.count)
        else:
            picks = [i % depth for i in range(self.count)] if self.placement == "prefix" else \
                [depth - 1 - ((self.count - 1 - i) % depth) for i in range(self.count)]
            copies = [(s, True) for s in picks]
            originals = [(i, False) for i in range(depth)]
            return copies + originals if self.placement == "prefix" else originals + copies
        out = []
        for i in range(depth):
            out.append((i, False))
            out.extend((i, True) for _ in range(after.count(i)))
        return out

    def apply(self, model: nn.Module) -> GrowthReport:
        backbone = backbone_of(model)
        old = list(backbone.blocks)
        with NewParameters(model) as new:
            grown = []
            for source, is_copy in self.plan(len(old)):
                if not is_copy:
                    grown.append(old[source])
                    continue
                block = copy.deepcopy(old[source])
                zero_residual_outputs(block)
                grown.append(block)
            backbone.blocks = nn.ModuleList(grown)
            renumber_layers(backbone)
        return GrowthReport(new.names, "exact", f"insert_depth: {len(old)} -> {len(grown)} blocks "
                                                f"({self.placement if self.sources is None else 'explicit sources'})")
