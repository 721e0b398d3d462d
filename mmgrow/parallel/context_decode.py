"""Generation at a context no rank holds alone: the prompt sharded over a context-parallel group.

:func:`generate_context_parallel` runs the objective's own sampler
(:meth:`~mmgrow.objectives.autoregressive.AutoregressiveObjective.generate`, its checks, constraint,
greedy / temperature / top-k logic unchanged) on a thin wrapper of the model,
:class:`ContextParallelDecoder`, which changes only what one model call means:

1. **prefill** (the first call, the whole prompt ``[B, T0]``): right-pad the prompt to a multiple of
   ``shard_multiple(W, layout)`` with padding tokens (``segment_ids = PAD_SEGMENT``: no real token
   ever sees them), shard ids, context and latents with :mod:`mmgrow.parallel.sharding`, run the
   model on this rank's shard (ring attention prefills and each ring layer keeps its shard's K/V:
   :class:`~mmgrow.ops.ring_decode.ShardedKVCache`), and broadcast the hidden state of the last real
   prompt token from the rank that holds it -- the sampler reads only that position;
2. **decode steps** (every later call, ``T = 1``): the new token is *replicated* (``ctx.cp`` stays
   None); it is first broadcast from group rank 0 so every rank decodes the same token even when
   sampling RNGs differ; each ring layer attends it to every rank's cache slice
   (:func:`~mmgrow.ops.ring_decode.sharded_decode_attention`) and every rank gets the same output.

The sampled tokens are broadcast from group rank 0 at the end, so every rank returns the same
``[B, max_new_tokens]``. Per-rank cache after ``n`` new tokens: ``~T0 / W + n / W`` tokens per layer
(new tokens go to the rank with the fewest cached ones).

Requirements: every mixer of the model declares ``supports_context_parallel`` and
``supports_sharded_decode`` (ring attention does; a recurrent mixer's state after a sharded prompt
would need a cross-rank scan, which none implements), checked up front with a named error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmgrow.parallel.sharding import shard, shard_context, shard_indices, shard_multiple
from mmgrow.protocols import (
    NO_BLOCK,
    PAD_SEGMENT,
    ContextParallel,
    MaskSpec,
    MixerCapabilityError,
    ModelOutput,
    SeqContext,
    SequenceMixer,
)


def require_sharded_decoding(model: nn.Module) -> None:
    """Raise :class:`MixerCapabilityError` naming every mixer of ``model`` that cannot decode with its
    cache sharded over a context-parallel group."""
    unsupported = sorted({f"{type(m).__name__} (layer {m.layer_idx})" for m in model.modules()
                          if isinstance(m, SequenceMixer) and not (
                              m.supports_context_parallel and getattr(m, "supports_sharded_decode", False))})
    if unsupported:
        raise MixerCapabilityError(
            "generation with the KV cache sharded over the context-parallel group needs mixers with "
            f"supports_context_parallel and supports_sharded_decode; these have not: {', '.join(unsupported)}; "
            "use `mixer: {class_path: ring}` (ring attention) for every layer, or generate without context "
            "parallelism (objective.generate)")


def _global_rank(cp: ContextParallel, group_rank: int) -> int:
    if cp.group is None or cp.group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(cp.group, group_rank)


def broadcast_from(x: Tensor, cp: ContextParallel, group_rank: int) -> Tensor:
    """``x`` as group rank ``group_rank`` holds it, on every rank of ``cp`` (same shape and dtype everywhere)."""
    x = x.contiguous().clone()
    dist.broadcast(x, src=_global_rank(cp, group_rank), group=cp.group)
    return x


class ContextParallelDecoder(nn.Module):
    """``model`` as the sampler sees it under context parallelism (see the module docstring).

    Args:
        model: a stateful model (``UnifiedModel``) whose mixers all support sharded decoding.
        cp: the context-parallel group (world size > 1).
        mask: replaces the context's mask in every call (e.g. ``MaskSpec(window=...)``); must be causal.
            None keeps the sampler's (plain causal).

    After a run, :attr:`last_hidden` holds the ``[B, D]`` hidden state the sampler read at every call
    (the same on every rank), from which the per-step logits follow, and :attr:`states` this rank's
    states after the last call.
    """

    def __init__(self, model: nn.Module, cp: ContextParallel, mask: MaskSpec | None = None) -> None:
        super().__init__()
        if mask is not None and not mask.causal:
            raise ValueError("ContextParallelDecoder: generation needs a causal mask, got MaskSpec(causal=False)")
        self.model = model
        self.cp = cp
        self.mask = mask
        self.prefilled = False
        self.last_hidden: list[Tensor] = []
        self.states: list | None = None

    @property
    def token_space(self) -> Any:
        return self.model.token_space

    @property
    def supports_state(self) -> bool:
        return bool(getattr(self.model, "supports_state", False))

    def init_states(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> list:
        return self.model.init_states(batch_size, device, dtype)

    def forward(self, input_ids: Tensor, ctx: SeqContext, states: list | None = None,
                latents: Tensor | None = None) -> ModelOutput:
        if self.mask is not None:
            ctx = replace(ctx, mask=self.mask)
        if states is None:
            raise ValueError("ContextParallelDecoder: every call needs the decoding states (a stateful model)")
        if not self.prefilled:
            out = self._prefill(input_ids, ctx, states, latents)
            self.prefilled = True
        else:
            if latents is not None:
                raise ValueError("ContextParallelDecoder: latents are read only by the prefill")
            input_ids = broadcast_from(input_ids, self.cp, 0)
            out = self.model(input_ids, ctx, states=states)
        self.last_hidden.append(out.hidden[:, -1])
        self.states = out.states
        return out

    def _prefill(self, input_ids: Tensor, ctx: SeqContext, states: list, latents: Tensor | None) -> ModelOutput:
        cp = self.cp
        B, T0 = input_ids.shape
        pad = -T0 % shard_multiple(cp.world_size, cp.layout)
        if pad:  # padding tokens after the prompt: in no segment, so no real token (prompt or new) sees them
            def extend(x: Tensor, value: Any) -> Tensor:
                return torch.cat((x, x.new_full((B, pad), value)), dim=1)

            seg = ctx.segment_ids if ctx.segment_ids is not None else torch.zeros_like(ctx.positions)
            last_pos = ctx.positions[:, -1:]
            positions = torch.cat((ctx.positions, last_pos + torch.arange(1, pad + 1, device=last_pos.device)), dim=1)
            ctx = replace(ctx, positions=positions, segment_ids=extend(seg, PAD_SEGMENT),
                          block_ids=None if ctx.block_ids is None else extend(ctx.block_ids, NO_BLOCK),
                          modality_ids=None if ctx.modality_ids is None else extend(ctx.modality_ids, 0))
            input_ids = extend(input_ids, 0)
            if latents is not None:
                latents = torch.cat((latents, latents.new_zeros(B, pad, latents.shape[2])), dim=1)
        T = T0 + pad
        local_ids = shard(input_ids, cp.world_size, cp.rank, cp.layout, dim=1)
        local_lat = None if latents is None else shard(latents, cp.world_size, cp.rank, cp.layout, dim=1)
        extra = {} if local_lat is None else {"latents": local_lat}
        out = self.model(local_ids, shard_context(ctx, cp), states=states, **extra)
        # the sampler reads the last real prompt token: find its rank and column, broadcast its hidden state
        owner = column = None
        for r in range(cp.world_size):
            hit = (shard_indices(T, cp.world_size, r, cp.layout) == T0 - 1).nonzero()
            if hit.numel():
                owner, column = r, int(hit[0, 0])
        h = out.hidden[:, column] if cp.rank == owner else out.hidden.new_empty(B, out.hidden.shape[-1])
        h = broadcast_from(h, cp, owner)
        return ModelOutput(hidden=h[:, None], logits=out.logits, states=out.states)


@dataclass
class ContextDecodeResult:
    """What :func:`generate_context_parallel` returns with ``return_details=True`` (the same tokens and
    logits on every rank): ``tokens [B, N]`` local ids, ``logits [B, N, V]`` of every step (before any
    constraint), ``states`` this rank's per-layer states after the last model call (its cache slices)."""

    tokens: Tensor
    logits: Tensor
    states: list | None


def generate_context_parallel(model: nn.Module, objective: Any, prompt_ids: Tensor, cp: ContextParallel | None, *,
                              modality: str, max_new_tokens: int, mask: MaskSpec | None = None,
                              return_details: bool = False, **generate_kwargs: Any) -> Tensor | ContextDecodeResult:
    """Sample ``max_new_tokens`` tokens of ``modality`` after ``prompt_ids``, the prompt sharded over ``cp``.

    Collective: every rank of ``cp`` calls it with the same ``prompt_ids [B, T0]`` (global ids) and
    arguments; all get the same ``[B, max_new_tokens]`` int64 local ids back (group rank 0's samples,
    so sampling needs no synchronised RNG). ``generate_kwargs`` go to ``objective.generate``
    (``greedy``, ``temperature``, ``top_k``, ``constraint``, ``generator``, ``modality_ids``,
    ``condition``, ``latents`` ...). ``mask`` replaces the plain causal mask (e.g. a window).
    ``return_details=True`` returns a :class:`ContextDecodeResult` (tokens, per-step logits, states).
    ``cp`` None or of world size 1: plain ``objective.generate``.
    """
    if cp is None or cp.world_size == 1:
        if mask is not None or return_details:
            raise ValueError("generate_context_parallel: mask= and return_details= need a context-parallel group "
                             "(world size > 1)")
        return objective.generate(model, prompt_ids, modality=modality, max_new_tokens=max_new_tokens,
                                  **generate_kwargs)
    require_sharded_decoding(model)
    if not getattr(model, "supports_state", False):
        raise MixerCapabilityError(f"generate_context_parallel: {type(model).__name__} cannot decode with states "
                                   "(supports_state is False)")
    decoder = ContextParallelDecoder(model, cp, mask)
    tokens = objective.generate(decoder, prompt_ids, modality=modality, max_new_tokens=max_new_tokens,
                                **generate_kwargs)
    tokens = broadcast_from(tokens, cp, 0)
    if not return_details:
        return tokens
    with torch.no_grad():
        steps = [model.logits(h, modality) for h in decoder.last_hidden]
    logits = torch.stack(steps, dim=1) if steps else torch.zeros(tokens.shape[0], 0, 0)
    return ContextDecodeResult(tokens, logits, decoder.states)
