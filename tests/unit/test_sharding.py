"""Sequence sharding layouts: exact inverses, the token -> rank maps they promise, clear errors."""

from __future__ import annotations

import pytest
import torch

from mmgrow.layers.masks import mask_from_context
from mmgrow.parallel.sharding import (
    LAYOUTS,
    local_stream_index,
    shard,
    shard_context,
    shard_indices,
    shard_multiple,
    unshard_list,
)
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, ContextParallel, MaskSpec, SeqContext

WORLD_SIZES = (1, 2, 3, 4)


def _expected_owner_chunks(world_size: int, rank: int, layout: str) -> list[int]:
    """Which of the ``W`` (contiguous) or ``2W`` (zigzag) equal chunks rank ``rank`` holds, in order."""
    return [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_unshard_list_inverts_shard(world_size: int, layout: str) -> None:
    T = 2 * world_size * 3
    x = torch.randn(2, T, 5, generator=torch.Generator().manual_seed(world_size))
    shards = [shard(x, world_size, r, layout) for r in range(world_size)]
    assert all(s.shape == (2, T // world_size, 5) for s in shards)
    assert torch.equal(unshard_list(shards, layout), x)
    # another sequence dimension ([B, H, T, hd] attention tensors)
    y = torch.randn(2, 3, T, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(unshard_list([shard(y, world_size, r, layout, dim=2) for r in range(world_size)], layout, dim=2),
                       y)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_each_rank_holds_the_chunks_its_layout_names(world_size: int, layout: str) -> None:
    T = 2 * world_size * 4
    n_chunks = world_size if layout == "contiguous" else 2 * world_size
    size = T // n_chunks
    x = torch.arange(T)[None]
    seen = []
    for r in range(world_size):
        expected = torch.cat([torch.arange(c * size, (c + 1) * size) for c in _expected_owner_chunks(world_size, r,
                                                                                                      layout)])
        assert torch.equal(shard_indices(T, world_size, r, layout), expected)
        assert torch.equal(shard(x, world_size, r, layout)[0], expected)  # a token's value is its stream index
        cp = ContextParallel(group=None, rank=r, world_size=world_size, layout=layout)
        assert torch.equal(local_stream_index(cp, T // world_size), expected)
        seen.append(expected)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(T)), "every token on exactly one rank"


@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_zigzag_balances_causal_work_and_contiguous_does_not(world_size: int) -> None:
    T = 2 * world_size * 4
    causal = torch.ones(T, T).tril()

    def work(layout: str) -> list[int]:  # visible (query, key) pairs of each rank's queries
        return [int(causal[shard_indices(T, world_size, r, layout)].sum()) for r in range(world_size)]

    assert len(set(work("zigzag"))) == 1
    contiguous = work("contiguous")
    assert contiguous == sorted(contiguous) and contiguous[0] < contiguous[-1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lengths_that_do_not_divide_raise_naming_the_multiple(layout: str) -> None:
    world_size = 3
    multiple = shard_multiple(world_size, layout)
    assert multiple == (3 if layout == "contiguous" else 6)
    bad = multiple * 2 + 1
    with pytest.raises(ValueError, match=rf"length {bad} is not divisible by {multiple}"):
        shard(torch.zeros(1, bad), world_size, 0, layout)
    with pytest.raises(ValueError, match=rf"not divisible by {multiple}"):
        shard_indices(bad, world_size, 1, layout)
    if layout == "zigzag":  # divisible by W but not by 2W
        with pytest.raises(ValueError, match="not divisible by 6"):
            shard(torch.zeros(1, 9), world_size, 0, layout)


def test_bad_layouts_ranks_and_shard_lists_raise() -> None:
    with pytest.raises(ValueError, match="unknown context-parallel layout 'stripe'"):
        shard_indices(8, 2, 0, "stripe")
    with pytest.raises(ValueError, match="rank 2 is not in a group of world_size 2"):
        shard_indices(8, 2, 2, "contiguous")
    with pytest.raises(ValueError, match="no shards"):
        unshard_list([], "zigzag")
    with pytest.raises(ValueError, match="differ in shape"):
        unshard_list([torch.zeros(1, 4), torch.zeros(1, 2)], "contiguous")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_context_shards_every_per_token_tensor_alike(layout: str) -> None:
    world_size, T = 2, 12
    seg = torch.tensor([[0] * 5 + [1] * 5 + [PAD_SEGMENT] * 2, [0] * 12])
    pos = torch.cat([torch.arange(5), torch.arange(5), torch.zeros(2, dtype=torch.long)]).expand(2, T).contiguous()
    blk = torch.full((2, T), NO_BLOCK).index_fill(1, torch.arange(3, 8), 4)
    mod = torch.arange(2 * T).view(2, T) % 3
    condition = torch.randn(2, 3, 6)
    ctx = SeqContext(positions=pos, segment_ids=seg, block_ids=blk, modality_ids=mod, condition=condition,
                     mask=MaskSpec(causal=True, window=4))
    shards = []
    for r in range(world_size):
        cp = ContextParallel(group=None, rank=r, world_size=world_size, layout=layout)
        local = shard_context(ctx, cp)
        idx = shard_indices(T, world_size, r, layout)
        for name in ("positions", "segment_ids", "block_ids", "modality_ids"):
            assert torch.equal(getattr(local, name), getattr(ctx, name)[:, idx]), name
        assert local.cp is cp and local.mask == ctx.mask
        assert local.condition is condition, "conditioning tokens are not sequence-sharded"
        shards.append(local)
    for name in ("positions", "segment_ids", "block_ids", "modality_ids"):
        assert torch.equal(unshard_list([getattr(s, name) for s in shards], layout), getattr(ctx, name)), name
    # None stays None
    plain = shard_context(SeqContext.simple(1, T), ContextParallel(group=None, rank=1, world_size=2, layout=layout))
    assert plain.segment_ids is None and plain.block_ids is None and plain.modality_ids is None
    assert torch.equal(plain.positions[0], shard_indices(T, 2, 1, layout))


def test_the_mask_of_a_shard_is_a_slice_of_the_whole_mask() -> None:
    """Facts travel with their tokens: the mask among rank r's tokens is the whole mask restricted to them."""
    T, world_size = 16, 2
    ctx = SeqContext(positions=torch.arange(T)[None], segment_ids=(torch.arange(T)[None] >= 9).long(),
                     block_ids=torch.where(torch.arange(T) % 5 < 3, torch.arange(T) // 5, NO_BLOCK)[None],
                     mask=MaskSpec(causal=False, window=6))
    whole = mask_from_context(ctx)
    for r in range(world_size):
        local = shard_context(ctx, ContextParallel(group=None, rank=r, world_size=world_size, layout="zigzag"))
        idx = shard_indices(T, world_size, r, "zigzag")
        assert torch.equal(mask_from_context(local), whole[:, idx][:, :, idx])
