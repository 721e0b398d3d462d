"""Blockwise attention (op and mixer) against the dense float64 oracle, for every kind of mask."""

from __future__ import annotations

import pytest
import torch

from mmgrow.layers.attention import FullAttention
from mmgrow.layers.blockwise import BlockwiseAttention
from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.blockwise import TilePlan, blockwise_attention
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.protocols import MaskSpec, SeqContext
from mmgrow.testing.mask_cases import mask_cases

CASES = mask_cases(T=37, window=5)


def _qkv(T: int, dtype: torch.dtype, H: int = 4, Hk: int = 2, hd: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, T, hd, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                 for h in (H, Hk, Hk))


def _loss(out: torch.Tensor, lse: torch.Tensor, g_out: torch.Tensor, g_lse: torch.Tensor) -> torch.Tensor:
    """A scalar that weighs out and the finite LSEs (-inf rows have no gradient to compare)."""
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * g_out).sum() + (lse * g_lse).sum()


def _reference(q, k, v, meta, spec):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = dense_attention(qd, kd, vd, tile_mask(meta, meta, spec))
    return out, lse, (qd, kd, vd)


@pytest.mark.parametrize("blocks", [(8, 5), (37, 37), (1, 64)], ids=["8x5", "one tile", "1x64"])
@pytest.mark.parametrize("case", CASES)
def test_blockwise_equals_float64_oracle(case: str, blocks: tuple[int, int]) -> None:
    meta, spec = CASES[case]
    q, k, v = _qkv(37, torch.float64)
    out, lse = blockwise_attention(q, k, v, meta, meta, spec, q_block=blocks[0], k_block=blocks[1])
    ref_out, ref_lse, ref_in = _reference(q, k, v, meta, spec)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))  # the same rows are empty
    assert (out - ref_out).abs().max() <= 1e-10
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= 1e-10
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad(_loss(out, lse, g_out, g_lse), (q, k, v))
    ref_grads = torch.autograd.grad(_loss(ref_out, ref_lse, g_out, g_lse), ref_in)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert (a - b).abs().max() <= 1e-10, f"d{name}"


@pytest.mark.parametrize("case", ["causal", "segments + padding", "blocks + segments + window", "local blocks"])
def test_blockwise_float32_within_1e5_relative(case: str) -> None:
    meta, spec = CASES[case]
    q, k, v = _qkv(37, torch.float32, seed=1)
    out, lse = blockwise_attention(q, k, v, meta, meta, spec, q_block=8, k_block=8)
    ref_out, _, ref_in = _reference(q, k, v, meta, spec)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * g.double()).sum(), ref_in)
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_blockwise_bfloat16_follows_the_flash_attn_rule() -> None:
    """bf16 inputs: error vs float64 at most 2x (out) / 3x (grads) that of naive bf16 attention."""
    meta, spec = CASES["segments + window"]
    q, k, v = _qkv(37, torch.bfloat16, hd=16, seed=2)
    out, _ = blockwise_attention(q, k, v, meta, meta, spec, q_block=8, k_block=8)
    naive_in = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    naive, _ = dense_attention(*naive_in, tile_mask(meta, meta, spec))
    ref, _, ref_in = _reference(q, k, v, meta, spec)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= 2 * (naive.double() - ref).abs().max()
    g = torch.randn_like(ref)
    mine = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    low = torch.autograd.grad((naive.double() * g).sum(), naive_in)
    exact = torch.autograd.grad((ref * g).sum(), ref_in)
    for a, b, c in zip(mine, low, exact):
        assert (a.double() - c).abs().max() <= 3 * (b.double() - c).abs().max()


def test_tiles_the_mask_empties_are_skipped() -> None:
    T = 64
    index = torch.arange(T).expand(1, T)
    meta = TokenMeta(index, index)
    causal = TilePlan(meta, meta, MaskSpec(causal=True), 8, 8)
    assert causal.tiles_total == 64 and causal.tiles_needed == 36  # the 8 diagonal + 28 below
    window = TilePlan(meta, meta, MaskSpec(causal=True, window=8), 8, 8)
    assert window.tiles_needed == 8 + 7  # the diagonal and the tile just left of it
    seg = (torch.arange(T) // 16).expand(1, T)
    docs = TilePlan(TokenMeta(index, index % 16, seg), TokenMeta(index, index % 16, seg), MaskSpec(causal=False), 8, 8)
    assert docs.tiles_needed == 4 * 4  # four documents of 2x2 tiles each


def test_blockwise_rejects_mismatched_facts() -> None:
    q, k, v = _qkv(37, torch.float64)
    meta, spec = CASES["causal"]
    with pytest.raises(ValueError, match="token facts cover 36 queries"):
        blockwise_attention(q, k, v, meta.slice(0, 36), meta, spec)


def test_blockwise_mixer_equals_full_attention_forward_and_backward() -> None:
    torch.manual_seed(3)
    meta, spec = CASES["blocks + segments + window"]
    ctx = SeqContext(positions=meta.positions, segment_ids=meta.segment_ids, block_ids=meta.block_ids, mask=spec)
    full = FullAttention(dim=32, num_heads=4, num_kv_heads=2).double()
    tiled = BlockwiseAttention(dim=32, num_heads=4, num_kv_heads=2, query_block=8, key_block=4).double()
    tiled.load_state_dict(full.state_dict())
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    y_full, _ = full(x, ctx)
    y_tiled, _ = tiled(x, ctx)
    assert (y_full - y_tiled).abs().max() <= 1e-12
    g = torch.randn_like(y_full)
    (y_full * g).sum().backward()
    (y_tiled * g).sum().backward()
    for (name, a), b in zip(full.named_parameters(), tiled.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-11, name


def test_blockwise_mixer_refuses_dropout() -> None:
    with pytest.raises(ValueError, match="dropout is not supported"):
        BlockwiseAttention(dim=16, num_heads=2, dropout=0.1)


def test_blockwise_feed_forward_equals_whole_sequence_mlp_and_gradients() -> None:
    from mmgrow.layers.mlp import SwiGLU

    torch.manual_seed(4)
    whole = SwiGLU(16, 40).double()
    chunked = SwiGLU(16, 40, chunk=5).double()
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 23, 16, dtype=torch.float64, requires_grad=True)
    y_whole, y_chunk = whole(x), chunked(x)
    assert (y_whole - y_chunk).abs().max() <= 1e-14
    g = torch.randn_like(y_whole)
    gx_whole, *gw_whole = torch.autograd.grad((y_whole * g).sum(), (x, *whole.parameters()))
    gx_chunk, *gw_chunk = torch.autograd.grad((y_chunk * g).sum(), (x, *chunked.parameters()))
    assert (gx_whole - gx_chunk).abs().max() <= 1e-13
    for a, b in zip(gw_whole, gw_chunk):
        assert (a - b).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="chunk must be a positive"):
        SwiGLU(16, 40, chunk=0)


def test_module_builds_and_exports_blockwise_feed_forward() -> None:
    from mmgrow.training.module import MMGrowModule

    module = MMGrowModule(vocab={"text": 11}, dim=16, depth=2, mlp_chunk=4)
    module.configure_model()
    assert [block.mlp.chunk for block in module.model.backbone.blocks] == [4, 4]
    assert module.model_config()["mlp_chunk"] == 4  # model.yaml rebuilds the same model
