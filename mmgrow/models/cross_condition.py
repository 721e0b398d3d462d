"""The cross-attention branch of a block: the sequence reads conditioning tokens.

.. math::

    x \\leftarrow x + \\gamma \\odot \\operatorname{CrossAttn}(\\operatorname{norm}(x), c, M), \\qquad
    \\gamma = \\tanh(\\alpha) \\text{ (gated) or } 1 \\text{ (ungated, as in DiT / Open-Sora)}

``c, M`` come from the context: ``ctx.condition`` / ``ctx.condition_mask`` by default, or a named
entry of ``ctx.conditions`` (``source``) — ModelGrow's second, LLM-embedding condition next to the
original one. The Flamingo-style gate (``gated=True``, ``alpha`` per channel initialised to
``gate_init``) is the alternative to zeroing the output projection when a branch is added to a
trained model; an ungated branch must be zeroed (:meth:`residual_outputs`) to keep the function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmgrow.layers.cross_attention import CrossAttention
from mmgrow.layers.norm import RMSNorm
from mmgrow.protocols import SeqContext


@dataclass
class CrossAttentionConfig:
    """Cross-attention branches of a model (``model.cross_attention`` in recipes).

    cond_dim: width of the conditioning tokens. num_heads: heads. layers: block indices that get a
    branch (None = all; negative counts from the end). source: None = ``ctx.condition``, else a key
    of ``ctx.conditions``. gated / gate_init: tanh gate per channel. bias: projection biases.
    """

    cond_dim: int
    num_heads: int = 4
    layers: list[int] | None = None
    source: str | None = None
    gated: bool = False
    gate_init: float = 0.0
    bias: bool = True

    def chosen(self, depth: int) -> set[int]:
        from mmgrow.models.gated_memory import MemoryPlacement

        return MemoryPlacement(layers=self.layers).chosen(depth)

    def build(self, dim: int, norm_eps: float = 1e-6) -> CrossAttentionBranch:
        return CrossAttentionBranch(dim, CrossAttention(dim, self.cond_dim, self.num_heads, bias=self.bias),
                                    source=self.source, gated=self.gated, gate_init=self.gate_init, norm_eps=norm_eps)


class CrossAttentionBranch(nn.Module):
    """``x [B, T, D], ctx -> x + gamma * CrossAttn(norm(x), condition) [B, T, D]``."""

    def __init__(self, dim: int, attention: CrossAttention, source: str | None = None, gated: bool = False,
                 gate_init: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if attention.dim != dim:
            raise ValueError(f"CrossAttentionBranch: attention has dim {attention.dim}, expected {dim}")
        self.dim = dim
        self.source = source
        self.gate_init = float(gate_init)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.attention = attention
        self.gate = nn.Parameter(torch.full((dim,), self.gate_init)) if gated else None

    def extra_repr(self) -> str:
        return f"source={self.source!r}, gated={self.gate is not None}"

    def reset_gates(self) -> None:
        """The gate back to ``gate_init`` (the model's generic init must not touch it)."""
        if self.gate is not None:
            with torch.no_grad():
                self.gate.fill_(self.gate_init)

    def forward(self, x: Tensor, ctx: SeqContext) -> Tensor:
        condition, mask = ctx.condition_source(self.source)
        if ctx.condition_segment_ids is not None:
            if self.source is not None:  # its tokens carry no example ids: never let examples see each other's
                raise ValueError(f"CrossAttentionBranch(source={self.source!r}): the batch packs examples with "
                                 "per-example conditions (condition_segment_ids), but the named condition "
                                 f"{self.source!r} has no per-example ids; train it one example per row")
            mask = per_example_condition_mask(ctx, mask)
        out = self.attention(self.norm(x), condition, mask)
        if self.gate is not None:
            out = torch.tanh(self.gate).to(out.dtype) * out
        return out

    def residual_outputs(self) -> list[nn.Linear]:
        return self.attention.residual_outputs()


def per_example_condition_mask(ctx: SeqContext, mask: Tensor | None) -> Tensor:
    """``[B, T, S]`` bool: token ``t`` may see condition token ``s`` when both belong to the same packed
    example (``segment_ids[b, t] == condition_segment_ids[b, s]``, a missing ``segment_ids`` = segment 0)
    and ``mask[b, s]``. Under context parallelism ``segment_ids`` is this rank's shard and the condition
    is whole, so the comparison holds per shard."""
    cond_seg = ctx.condition_segment_ids
    seg = ctx.segment_ids if ctx.segment_ids is not None else torch.zeros_like(ctx.positions)
    same = (seg[:, :, None] == cond_seg[:, None, :]) & (cond_seg[:, None, :] >= 0)
    return same if mask is None else same & mask[:, None, :]
