"""Block-local attention: the layer against FullAttention's dense rule and the float64 oracle,
its block isolation, and the tiles its plan skips."""

from __future__ import annotations

import pytest
import torch

from mmgrow.layers.attention import FullAttention
from mmgrow.layers.local import LocalAttention
from mmgrow.layers.masks import mask_from_context
from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.blockwise import TilePlan
from mmgrow.ops.token_meta import TokenMeta
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec, SeqContext

DIM = 32
F64_TOL = 1e-10
PREFIX, BLOCK, NUM_BLOCKS = 3, 4, 4


def _video_row(B: int = 2, *, tail_text: int = 0) -> SeqContext:
    """``PREFIX`` text tokens, ``NUM_BLOCKS`` blocks of ``BLOCK`` tokens, then ``tail_text`` text tokens."""
    T = PREFIX + NUM_BLOCKS * BLOCK + tail_text
    blk = torch.full((T,), NO_BLOCK, dtype=torch.long)
    blk[PREFIX:PREFIX + NUM_BLOCKS * BLOCK] = torch.arange(NUM_BLOCKS * BLOCK) // BLOCK
    return SeqContext(positions=torch.arange(T).expand(B, T).contiguous(), block_ids=blk.expand(B, T).contiguous())


def _packed_rows() -> SeqContext:
    """Row 0: two examples (text + 2 blocks each) and padding; row 1: one example with trailing text."""
    T = 20
    pos = torch.zeros(2, T, dtype=torch.long)
    seg = torch.full((2, T), PAD_SEGMENT, dtype=torch.long)
    blk = torch.full((2, T), NO_BLOCK, dtype=torch.long)
    for b, layout in enumerate(([(2, [3, 3]), (1, [4, 3])], [(3, [5, 5, 4, 2])])):
        start = 0
        for s, (text, blocks) in enumerate(layout):
            length = text + sum(blocks)
            pos[b, start:start + length] = torch.arange(length)
            seg[b, start:start + length] = s
            blk[b, start + text:start + length] = torch.repeat_interleave(torch.arange(len(blocks)),
                                                                          torch.tensor(blocks))
            start += length
    blk[1, -2:] = NO_BLOCK  # text after the video
    return SeqContext(positions=pos, segment_ids=seg, block_ids=blk)


def _layers(shared_prefix: bool, seed: int = 0) -> tuple[LocalAttention, FullAttention]:
    torch.manual_seed(seed)
    local = LocalAttention(dim=DIM, num_heads=4, num_kv_heads=2, query_block=4, key_block=3,
                           shared_prefix=shared_prefix).double()
    full = FullAttention(dim=DIM, num_heads=4, num_kv_heads=2).double()
    full.load_state_dict(local.state_dict())
    return local, full


def _x(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _with_mask(ctx: SeqContext, **mask) -> SeqContext:
    return SeqContext(positions=ctx.positions, segment_ids=ctx.segment_ids, block_ids=ctx.block_ids,
                      mask=MaskSpec(**mask))


def _oracle(layer: LocalAttention, x: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
    """The layer's maths spelled out: projections, RoPE, dense float64 attention under the local rule."""
    B, T, _ = x.shape
    q = layer.q_proj(x).view(B, T, layer.num_heads, layer.head_dim).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
    q, k = layer.rope(q, k, ctx.positions)
    out, _ = dense_attention(q, k, v, mask_from_context(layer.layer_context(ctx)))
    return layer.out_proj(out.transpose(1, 2).reshape(B, T, -1))


CASES = [("video", shared, causal, window) for shared in (True, False)
         for causal, window in ((True, None), (False, None), (True, 3))]
CASES += [("packed", True, True, None), ("packed", False, False, None), ("packed", True, True, 3)]


@pytest.mark.parametrize(("rows", "shared_prefix", "causal", "window"), CASES)
def test_local_equals_full_attention_with_local_mask_and_oracle(rows: str, shared_prefix: bool, causal: bool,
                                                                window: int | None) -> None:
    local, full = _layers(shared_prefix)
    base = _video_row(tail_text=2) if rows == "video" else _packed_rows()
    ctx = _with_mask(base, causal=causal, window=window)
    full_ctx = _with_mask(base, causal=causal, window=window, local=True, shared_prefix=shared_prefix)
    x1 = _x(2, base.seq_len).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, _ = local(x1, ctx)
    y2, _ = full(x2, full_ctx)
    assert float((y1 - y2).detach().abs().max()) <= F64_TOL
    assert float((y1 - _oracle(local, x1, ctx)).detach().abs().max()) <= F64_TOL
    w = _x(2, base.seq_len, seed=9)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    assert float((x1.grad - x2.grad).abs().max()) <= F64_TOL
    full_params = dict(full.named_parameters())
    for name, p in local.named_parameters():
        assert float((p.grad - full_params[name].grad).abs().max()) <= F64_TOL, name
    # the local rule differs from the plain one here, so the comparison above is not vacuous
    y_plain, _ = full(x1, ctx)
    assert float((y_plain - y1).detach().abs().max()) > 1e-3


def _block_slice(b: int) -> slice:
    return slice(PREFIX + b * BLOCK, PREFIX + (b + 1) * BLOCK)


@pytest.mark.parametrize("causal", [True, False])
def test_blocks_are_isolated_except_through_the_prefix(causal: bool) -> None:
    ctx = _with_mask(_video_row(), causal=causal)
    T = ctx.seq_len
    x = _x(2, T)
    for shared_prefix in (True, False):
        local, _ = _layers(shared_prefix)
        y = local(x, ctx)[0].detach()
        # a change inside block 1 moves block 1 only among the blocks; the text queries (outside every
        # block, normal rule) see it only when the context is bidirectional
        x_block = x.clone()
        x_block[:, _block_slice(1)] += _x(2, BLOCK, seed=4)
        y_block = local(x_block, ctx)[0].detach()
        for b in range(NUM_BLOCKS):
            diff = float((y_block[:, _block_slice(b)] - y[:, _block_slice(b)]).abs().max())
            assert (diff > 1e-6) if b == 1 else (diff <= 1e-12), f"block {b} moved by {diff:.3g}"
        prefix_diff = float((y_block[:, :PREFIX] - y[:, :PREFIX]).abs().max())
        assert (prefix_diff > 1e-6) if not causal else (prefix_diff <= 1e-12)
        # a change of one prefix token reaches every block exactly when the prefix is shared
        x_prefix = x.clone()
        x_prefix[:, 1] += _x(2, 1, seed=5)[:, 0]
        y_prefix = local(x_prefix, ctx)[0].detach()
        for b in range(NUM_BLOCKS):
            diff = float((y_prefix[:, _block_slice(b)] - y[:, _block_slice(b)]).abs().max())
            assert (diff > 1e-6) if shared_prefix else (diff <= 1e-12), \
                f"shared_prefix={shared_prefix}: block {b} moved by {diff:.3g}"


def test_tile_plan_skips_tiles_between_blocks() -> None:
    tile = 4
    # 4 blocks of 8 tokens, no prefix: each block's 2 query tiles meet only its own 2 key tiles
    blocks = (torch.arange(32) // 8)[None]
    meta = TokenMeta(torch.arange(32)[None], torch.arange(32)[None], None, blocks)
    for causal in (True, False):
        plan = TilePlan(meta, meta, MaskSpec(causal=causal, local=True), tile, tile)
        assert plan.tiles_total == 64 and plan.tiles_needed == 4 * 2 * 2
    # with a 4-token shared prefix in front: 8 block query tiles x (own 2 + prefix 1), plus the prefix tile
    blk = torch.cat((torch.full((1, 4), NO_BLOCK), blocks), dim=1)
    meta = TokenMeta(torch.arange(36)[None], torch.arange(36)[None], None, blk)
    plan = TilePlan(meta, meta, MaskSpec(causal=True, local=True, shared_prefix=True), tile, tile)
    assert plan.tiles_total == 81 and plan.tiles_needed == 8 * 3 + 1
    plain = TilePlan(meta, meta, MaskSpec(causal=True), tile, tile)
    assert plain.tiles_needed == 9 * 10 // 2 + NUM_BLOCKS > plan.tiles_needed  # + the tile above each block's diagonal


def test_layer_context_and_errors() -> None:
    ctx = SeqContext.simple(1, 4, causal=False, window=5)
    for shared in (True, False):
        layer = LocalAttention(dim=DIM, shared_prefix=shared)
        assert layer.layer_context(ctx).mask == MaskSpec(causal=False, window=5, local=True, shared_prefix=shared)
    with pytest.raises(TypeError, match="shared_prefix must be a bool"):
        LocalAttention(dim=DIM, shared_prefix="yes")
    with pytest.raises(ValueError, match="dropout"):
        LocalAttention(dim=DIM, dropout=0.1)
