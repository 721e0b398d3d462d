"""``extend_context``: a new RoPE base for progressive context extension (LWM).

LWM trains in stages of growing context (32K -> 128K -> 256K -> 512K -> 1M tokens) and raises the
RoPE base ``theta`` with each stage (1M -> 10M -> 25M -> 50M) so that the lowest frequencies still
turn less than once over the longer context. This strategy sets ``theta`` on every
:class:`~mmgrow.layers.rope.RotaryEmbedding` of the chosen blocks (by module type: any mixer that
uses the shared RoPE module follows). Mixers without RoPE (Mamba-2, Gated DeltaNet) are untouched.

A new ``theta`` changes every rotation angle, so the function changes even within the old length
(``preserves = "none"``); the next stage's training adapts the model. Data-side length changes
(the next stage's ``seq_len``) belong to the recipe.
"""

from __future__ import annotations

from torch import nn

from mmgrow.growth.base import GrowthError, backbone_of, check_layers
from mmgrow.layers.rope import RotaryEmbedding
from mmgrow.protocols import GrowthReport, GrowthStrategy


class ExtendContextGrowth(GrowthStrategy):
    """Set the RoPE base of the chosen blocks to ``rope_theta``.

    Args:
        rope_theta: the new base (> 0).
        layers: blocks to change (None = all).
    """

    preserves = "none"

    def __init__(self, rope_theta: float = 1.0e6, layers: list[int] | None = None) -> None:
        if not rope_theta > 0:
            raise GrowthError(f"extend_context: rope_theta must be positive, got {rope_theta!r}")
        self.rope_theta = float(rope_theta)
        self.layers = None if layers is None else list(layers)

    @classmethod
    def conformance_kwargs(cls) -> dict:
        return {"rope_theta": 5.0e5}

    def apply(self, model: nn.Module) -> GrowthReport:
        backbone = backbone_of(model)
        changed = []
        for i in check_layers(self.layers, len(backbone.blocks), "extend_context"):
            ropes = [m for m in backbone.blocks[i].modules() if isinstance(m, RotaryEmbedding)]
            for rope in ropes:
                old, rope.theta = rope.theta, self.rope_theta
            if ropes:
                changed.append(f"{i}: {old:g} -> {self.rope_theta:g}")
        note = "; ".join(changed) if changed else "no RoPE in the chosen blocks (nothing changed)"
        return GrowthReport([], "none" if changed else "exact", f"extend_context: {note}")
