"""``add_text_condition``: ModelGrow's language enhancement — an extra cross-attention per block on
embeddings from a (frozen) text encoder or LLM.

Each chosen block gains a :class:`~mmgrow.models.cross_condition.CrossAttentionBranch` whose key and
value projections read the encoder's tokens ``c [B, S, C]`` in the encoder's width (the projection
from the text space into the model), placed before the MLP. To keep the grown model exactly the old
one at step 0 the branch's output projection (weight and bias) is zeroed — or, with ``gated=True``,
a Flamingo-style ``tanh(alpha)`` gate starts at ``alpha = 0`` (the projection then keeps its random
init). Which LLM, which layers and whether ModelGrow gates the branch are not confirmed (see
``docs/growth.md``); they are options here, not claims.

The branch reads ``ctx.condition`` (``source=None``) or ``ctx.conditions[source]`` when the model
already uses ``ctx.condition`` for another encoder (the two-condition design). In training the data
module's ``condition_encoder`` supplies the embeddings.
"""

from __future__ import annotations

from torch import nn

from mmgrow.growth.add_memory import init_like_model
from mmgrow.growth.base import GrowthError, NewParameters, backbone_of, check_layers, zero_linears
from mmgrow.models.cross_condition import CrossAttentionConfig
from mmgrow.protocols import GrowthReport, GrowthStrategy


class AddTextConditionGrowth(GrowthStrategy):
    """Add a zero-initialised (or tanh-gated) cross-attention branch on text embeddings.

    Args:
        cond_dim: width ``C`` of the text embeddings (384 for the MiniLM of the ``text`` extra).
        num_heads: heads of the new cross-attention (``dim % num_heads == 0``).
        layers: blocks that get a branch (None = all; negative counts from the end).
        source: None = ``ctx.condition``; else the key of ``ctx.conditions`` to read.
        gated: tanh gate (``alpha = 0``) instead of a zeroed output projection.
        bias: biases on the new projections.
    """

    preserves = "exact"

    def __init__(self, cond_dim: int = 384, num_heads: int = 4, layers: list[int] | None = None,
                 source: str | None = None, gated: bool = False, bias: bool = True) -> None:
        if not isinstance(cond_dim, int) or cond_dim < 1:
            raise GrowthError(f"add_text_condition: cond_dim must be a positive int, got {cond_dim!r}")
        self.cond_dim = cond_dim
        self.num_heads = num_heads
        self.layers = None if layers is None else list(layers)
        self.source = source
        self.gated = gated
        self.bias = bias

    @classmethod
    def conformance_kwargs(cls) -> dict:
        return {"cond_dim": 12, "num_heads": 2, "source": "llm"}

    def apply(self, model: nn.Module) -> GrowthReport:
        backbone = backbone_of(model)
        chosen = check_layers(self.layers, len(backbone.blocks), "add_text_condition")
        taken = [i for i in chosen if any(b.source == self.source for b in backbone.blocks[i].cross_attentions)]
        if taken:
            raise GrowthError(f"add_text_condition: blocks {taken} already read source={self.source!r} through a "
                              "cross-attention branch; give the new condition its own source name")
        config = CrossAttentionConfig(cond_dim=self.cond_dim, num_heads=self.num_heads, source=self.source,
                                      gated=self.gated, gate_init=0.0, bias=self.bias)
        with NewParameters(model) as new:
            for i in chosen:
                block = backbone.blocks[i]
                branch = config.build(backbone.dim, block.norm1.eps)
                init_like_model(branch, model)
                if not self.gated:
                    zero_linears(branch.residual_outputs())
                ref = next(block.parameters())
                block.cross_attentions.append(branch.to(device=ref.device, dtype=ref.dtype))
        how = "tanh gate at 0" if self.gated else "zeroed output projection"
        return GrowthReport(new.names, "exact", f"add_text_condition: cross-attention on {self.source or 'condition'} "
                                                f"(C={self.cond_dim}) in blocks {chosen}, {how}")
