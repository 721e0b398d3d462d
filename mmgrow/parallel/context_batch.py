"""One training batch as one rank of a context-parallel group sees it, and the loss it computes.

Under context parallelism the ``W`` ranks of a group receive the *same* batch (the data shards over
the data-parallel axis only) and each keeps its slice of every row (:mod:`mmgrow.parallel.sharding`).
What happens each step, in this order, and why:

1. **pad** the rows to a multiple of ``shard_multiple(W, layout)`` with padding tokens
   (``segment_ids = PAD_SEGMENT``, ``loss_mask = example_weight = 0``, as :func:`~mmgrow.data.collate.pad_collate`
   writes them). They are appended after every real token, so under the causal mask no real token
   sees them, and they are never targets: no real output and no loss term changes;
2. build the **context and the targets from the whole padded batch**: the objective's
   ``targets(batch)`` are per predicting position (the next token's id sits at the position that
   predicts it), so they stay right after the sequence is cut -- the next token of a shard's last
   token lives on another rank;
3. **shard** input ids, context (:func:`~mmgrow.parallel.sharding.shard_context`, which attaches the
   handle the mixers read) and targets for this rank;
4. run the model on the shard and the objective's ``loss_on_targets(output, targets, cp)``, which
   reduces its sums over the group (every rank gets the loss of the whole sequence; see
   :mod:`mmgrow.objectives.autoregressive` for why the gradients are then right under DDP).

Objectives opt in with ``supports_context_parallel = True`` and those two methods; mixers with their
``supports_context_parallel`` attribute. Both are checked here with errors that say what to use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from mmgrow.batch import PAD_VALUES, PER_TOKEN_FIELDS, TokenBatch
from mmgrow.parallel.sharding import shard, shard_context, shard_multiple
from mmgrow.protocols import PAD_SEGMENT, ContextParallel, MixerCapabilityError, SeqContext, SequenceMixer


def pad_to_multiple(batch: TokenBatch, multiple: int) -> TokenBatch:
    """Right-pad every row of ``batch [B, T]`` with padding tokens to ``[B, ceil(T / multiple) * multiple]``."""
    if multiple < 1:
        raise ValueError(f"pad_to_multiple: multiple must be >= 1, got {multiple}")
    extra = -batch.input_ids.shape[1] % multiple
    if extra == 0:
        return batch
    padded = {}
    for name in PER_TOKEN_FIELDS:  # the condition [B, S, C] is per row, not per token: kept as is
        value: Tensor = getattr(batch, name)
        tail = value.new_full((value.shape[0], extra), PAD_VALUES[name])
        padded[name] = torch.cat([value, tail], dim=1)
    return replace(batch, **padded)


def shard_per_token(targets: Any, cp: ContextParallel) -> Any:
    """This rank's slice of every ``[B, T, ...]`` tensor field of the dataclass ``targets``."""
    if not is_dataclass(targets):
        raise TypeError(f"shard_per_token expects a dataclass of per-token tensors, got {type(targets).__name__}")
    return replace(targets, **{f.name: shard(getattr(targets, f.name), cp.world_size, cp.rank, cp.layout, dim=1)
                               for f in fields(targets) if isinstance(getattr(targets, f.name), Tensor)})


def require_context_parallel_mixers(model: nn.Module) -> None:
    """Raise :class:`MixerCapabilityError` naming every mixer of ``model`` that cannot run on a shard."""
    unsupported = sorted({f"{type(m).__name__} (layer {m.layer_idx})" for m in model.modules()
                          if isinstance(m, SequenceMixer) and not m.supports_context_parallel})
    if unsupported:
        raise MixerCapabilityError(
            f"context parallelism shards the sequence over ranks, but these mixers do not support it "
            f"(supports_context_parallel=False): {', '.join(unsupported)}; use a mixer that does, e.g. "
            "`mixer: {class_path: ring}` (ring attention), or set the strategy's context_parallel to 1")


def require_context_parallel_objective(objective: Any) -> None:
    """Raise ``TypeError`` unless ``objective`` declares ``supports_context_parallel``."""
    if not getattr(objective, "supports_context_parallel", False):
        raise TypeError(f"objective {type(objective).__name__} does not support context parallelism: it needs "
                        "supports_context_parallel = True, targets(batch) (per-position targets of the whole "
                        "sequence) and loss_on_targets(output, targets, cp) (sums reduced over cp.group)")


class _SumOverGroup(torch.autograd.Function):
    """``all_reduce(x, SUM)`` whose backward is again a sum over the group (the adjoint of "every
    rank gets the sum": each rank's input moves every rank's output)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _SumOverGroup.apply(grad, ctx.group), None


def sum_over_group(x: Tensor, group: Any) -> Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group``: ``y = sum_r x_r`` on every rank, and
    ``dL/dx_r = sum_r' dL_r'/dy`` -- the backward is a collective too, so every rank of the group must
    back-propagate through it (or none). Used for the numerators of a context-parallel loss."""
    return _SumOverGroup.apply(x, group)


@dataclass
class ContextShard:
    """What one rank of the group runs: ``input_ids [B, T_pad / W]``, the sharded context (``cp``
    attached), the sharded targets, and ``token_count`` (0-d: non-padding tokens of this shard, so
    that summing it over every rank counts each token of the batch once)."""

    input_ids: Tensor
    ctx: SeqContext
    targets: Any
    token_count: Tensor


def shard_batch(batch: TokenBatch, objective: Any, cp: ContextParallel) -> ContextShard:
    """Steps 1-3 of the module docstring for this rank (``cp.rank``) of the group."""
    padded = pad_to_multiple(batch, shard_multiple(cp.world_size, cp.layout))
    ctx = shard_context(objective.context(padded), cp)
    whole = objective.targets(padded)
    check = getattr(objective, "check_targets", None)
    if callable(check):  # on the whole batch, so every rank of the group raises together
        check(whole)
    targets = shard_per_token(whole, cp)
    segments = shard(padded.segment_ids, cp.world_size, cp.rank, cp.layout, dim=1)
    return ContextShard(input_ids=shard(padded.input_ids, cp.world_size, cp.rank, cp.layout, dim=1), ctx=ctx,
                        targets=targets, token_count=(segments != PAD_SEGMENT).sum())


def context_parallel_loss(model: nn.Module, objective: Any, batch: TokenBatch, cp: ContextParallel
                          ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The whole step on this rank: ``(loss, metrics, token_count)``; loss and metrics are those of
    the whole batch (identical on every rank of the group), ``token_count`` is this shard's."""
    require_context_parallel_objective(objective)
    require_context_parallel_mixers(model)
    part = shard_batch(batch, objective, cp)
    output = model(part.input_ids, part.ctx)
    loss, metrics = objective.loss_on_targets(output, part.targets, cp)
    return loss, metrics, part.token_count
