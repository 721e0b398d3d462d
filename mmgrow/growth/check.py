"""Measure what a growth step did to the function: run the model before and after on the same
random input and compare. Used by ``mmgrow grow`` (printed and stored) and by the tests.

The probe context is built from what the *grown* model reads: random conditioning tokens for every
cross-attention source (``ctx.condition`` / ``ctx.conditions[name]``) and a random ``ctx.timestep``
of the width the blocks' modulation reads, so a branch added by growth is exercised, not skipped.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from mmgrow.growth.base import backbone_of
from mmgrow.protocols import SeqContext


def probe_context(model: nn.Module, batch_size: int, seq_len: int, *, causal: bool = True, cond_len: int = 5,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> SeqContext:
    """A plain context with random conditions and timestep for everything ``model`` reads."""
    ctx = SeqContext.simple(batch_size, seq_len, causal=causal)
    sources: dict[str | None, int] = {}  # condition source -> width, first branch reading it wins
    timestep_width = None
    for block in backbone_of(model).blocks:
        for branch in block.cross_attentions:
            sources.setdefault(branch.source, branch.attention.cond_dim)
        if block.modulation is not None and timestep_width is None:
            timestep_width = block.modulation.timestep_width
    drawn = {}
    for source, width in sources.items():
        tokens = torch.randn(batch_size, cond_len, width, generator=generator, dtype=dtype)
        mask = torch.ones(batch_size, cond_len, dtype=torch.bool)
        mask[0, -1] = False  # one padded conditioning token: the mask path is exercised too
        drawn[source] = (tokens, mask)
    condition = drawn.pop(None, (None, None))
    timestep = None if timestep_width is None else torch.randn(batch_size, timestep_width, generator=generator,
                                                               dtype=dtype)
    return replace(ctx, condition=condition[0], condition_mask=condition[1], conditions=drawn or None,
                   timestep=timestep)


@torch.no_grad()
def output_change(before: nn.Module, after: nn.Module, *, batch_size: int = 2, seq_len: int = 32,
                  seed: int = 0) -> dict[str, float]:
    """``{"max_abs": max|y_after - y_before|, "relative": that / max|y_before|}`` for the final hidden
    states of two :class:`~mmgrow.models.unified.UnifiedModel` s (eval mode) on random tokens."""
    gen = torch.Generator().manual_seed(seed)
    total = after.token_space.total
    ids = torch.randint(0, total, (batch_size, seq_len), generator=gen)
    ctx = probe_context(after, batch_size, seq_len, generator=gen)
    outs: list[Tensor] = []
    for model in (before, after):
        was = model.training
        model.eval()
        outs.append(model(ids, ctx).hidden.float())
        model.train(was)
    diff = float((outs[1] - outs[0]).abs().max())
    scale = float(outs[0].abs().max())
    return {"max_abs": diff, "relative": diff / scale if scale > 0 else diff}
