"""``stack``: G_stack (Du et al. 2024, arXiv 2405.15319) — the whole block stack repeated ``g`` times.

Blocks ``[0 .. L-1]`` become ``[0 .. L-1, 0 .. L-1, ...]`` (``g`` times, each copy independent). The
stacked network computes a *different* function (``preserves = "none"``): the second copy of the
stack reads the first one's output instead of the embeddings. Training recovers from the jump; the
training module logs it (``growth/loss_before``, ``growth/loss_after``) on the first batch.

**When to grow** (:func:`gstack_growth_tokens`): the paper fits the number of tokens ``d`` to train
the small model before stacking as

.. math::  \\log_{10} d = 0.88 \\log_{10} N + \\frac{163.27}{\\log_{10} C} - 5.74

with ``N`` the *target* (grown) model's parameters and ``C`` its total training FLOPs (``6 N D``);
the authors recommend ``g = 4``. For ``N = 7e9``, ``C = 6 \\cdot 7e9 \\cdot 2e12`` this gives
``d ≈ 11.1e9`` tokens, the value in the authors' README table.
"""

from __future__ import annotations

import copy
import math

from torch import nn

from mmgrow.growth.base import GrowthError, NewParameters, backbone_of, renumber_layers
from mmgrow.protocols import GrowthReport, GrowthStrategy


def gstack_growth_tokens(params: float, flops: float) -> float:
    """Tokens ``d`` to train the small model before G_stack growth, for a grown model of ``params``
    parameters trained with ``flops`` FLOPs in total (``6 N D``); see the module docstring."""
    if params <= 0 or flops <= 10:
        raise ValueError(f"gstack_growth_tokens: need params > 0 and flops > 10, got {params}, {flops}")
    return 10 ** (0.88 * math.log10(params) + 163.27 / math.log10(flops) - 5.74)


class StackGrowth(GrowthStrategy):
    """Repeat the whole stack ``factor`` times (G_stack's depth-wise G_direct operator).

    Args:
        factor: growth factor ``g >= 2`` (the paper recommends 4).
    """

    preserves = "none"

    def __init__(self, factor: int = 2) -> None:
        if not isinstance(factor, int) or factor < 2:
            raise GrowthError(f"stack: factor must be an int >= 2, got {factor!r}")
        self.factor = factor

    @classmethod
    def conformance_kwargs(cls) -> dict:
        return {"factor": 2}

    def apply(self, model: nn.Module) -> GrowthReport:
        backbone = backbone_of(model)
        old = list(backbone.blocks)
        with NewParameters(model) as new:
            grown = old + [copy.deepcopy(block) for _ in range(self.factor - 1) for block in old]
            backbone.blocks = nn.ModuleList(grown)
            renumber_layers(backbone)
        return GrowthReport(new.names, "none", f"stack: {len(old)} -> {len(grown)} blocks (x{self.factor}); "
                                               "not function-preserving")
