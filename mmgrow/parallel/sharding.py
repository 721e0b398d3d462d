"""Sequence sharding layouts for context parallelism, and their exact inverses.

A sequence of ``T`` tokens is split over the ``W`` ranks of a context-parallel group:

* ``contiguous``: rank ``r`` holds tokens ``[r*T/W, (r+1)*T/W)`` (``T`` divisible by ``W``);
* ``zigzag`` (= head-tail): the sequence is cut into ``2W`` equal chunks and rank ``r`` holds chunks
  ``r`` and ``2W-1-r`` (``T`` divisible by ``2W``). Under a causal mask every rank then does the
  same amount of work, where ``contiguous`` leaves the last rank with most of it.

Everything per token travels together: hidden states, positions, segment ids, block ids and
modality ids (:func:`shard_context`). The *stream index* of a local token (its place in the whole
sequence, which the causal rule compares) follows from the layout alone: :func:`shard_indices`.
A wrong inverse gives no shape error but a model that never converges, so :func:`unshard` is
tested as the exact inverse of :func:`shard` for every layout and world size.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from mmgrow.protocols import ContextParallel, SeqContext

LAYOUTS = ("contiguous", "zigzag")


def shard_multiple(world_size: int, layout: str) -> int:
    """The number every sharded sequence length must be a multiple of: ``W`` or ``2W``."""
    _check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def shard_indices(seq_len: int, world_size: int, rank: int, layout: str = "zigzag",
                  device: torch.device | str | None = None) -> Tensor:
    """``[T / W]`` int64: the stream indices (``0 .. T-1``) of the tokens rank ``rank`` holds, in order."""
    _check_layout(layout)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_indices: rank {rank} is not in a group of world_size {world_size}")
    multiple = shard_multiple(world_size, layout)
    if seq_len % multiple != 0:
        raise ValueError(f"shard_indices: sequence length {seq_len} is not divisible by {multiple} "
                         f"({layout} layout over {world_size} ranks); pad the batch to a multiple of {multiple} "
                         "(MMDataModule(pad_to_multiple=...) does this)")
    if layout == "contiguous":
        size = seq_len // world_size
        return torch.arange(rank * size, (rank + 1) * size, device=device)
    chunk = seq_len // (2 * world_size)
    head = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    tail_start = (2 * world_size - 1 - rank) * chunk
    tail = torch.arange(tail_start, tail_start + chunk, device=device)
    return torch.cat((head, tail))


def local_stream_index(cp: ContextParallel, local_len: int, device: torch.device | str | None = None) -> Tensor:
    """``[T_local]`` stream indices of this rank's tokens (the global sequence is ``W * T_local`` long)."""
    return shard_indices(local_len * cp.world_size, cp.world_size, cp.rank, cp.layout, device=device)


def shard(x: Tensor, world_size: int, rank: int, layout: str = "zigzag", dim: int = 1) -> Tensor:
    """This rank's slice of ``x`` along ``dim`` (the sequence dimension), in the given layout."""
    index = shard_indices(x.shape[dim], world_size, rank, layout, device=x.device)
    return x.index_select(dim, index)


def unshard_list(shards: list[Tensor] | tuple[Tensor, ...], layout: str = "zigzag", dim: int = 1) -> Tensor:
    """Reassemble the full sequence from every rank's shard (``shards[r]`` from rank ``r``)."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("unshard_list: no shards given")
    local = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"unshard_list: shards differ in shape: {[tuple(s.shape) for s in shards]}")
    seq_len = local * world_size
    order = torch.cat([shard_indices(seq_len, world_size, r, layout) for r in range(world_size)])
    gathered = torch.cat(list(shards), dim=dim)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq_len)
    return gathered.index_select(dim, inverse.to(gathered.device))


def unshard(x: Tensor, cp: ContextParallel, dim: int = 1) -> Tensor:
    """All-gather ``x`` over the context-parallel group and undo the layout (no gradient)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(cp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=cp.group)
    return unshard_list(parts, cp.layout, dim)


def shard_context(ctx: SeqContext, cp: ContextParallel) -> SeqContext:
    """The context of this rank's tokens: every per-token tensor sharded, ``cp`` attached.

    ``ctx`` describes the whole sequence (``[B, T]``); the result is ``[B, T / W]``. Conditioning
    tokens (``condition``) are not sequence-sharded: every rank keeps them whole.
    """
    kw = {}
    for name in SeqContext._PER_TOKEN:
        value = getattr(ctx, name)
        kw[name] = None if value is None else shard(value, cp.world_size, cp.rank, cp.layout, dim=1)
    return replace(ctx, cp=cp, **kw)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown context-parallel layout {layout!r}; expected one of {LAYOUTS}")
