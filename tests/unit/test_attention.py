"""FullAttention and masked SDPA against the dense float64 oracle, for every kind of mask."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from mmgrow.layers.attention import FullAttention, KVCache, masked_sdpa
from mmgrow.layers.masks import mask_from_context
from mmgrow.ops.attention_ref import dense_attention
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, ContextParallel, MaskSpec, MixerCapabilityError, SeqContext


def complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE reference (as in test_rope.py): halves (a, b) as a + ib times exp(i p theta^(-2m/hd))."""
    hd = x.shape[-1]
    a, b = x.double().chunk(2, dim=-1)
    angle = positions.double()[:, None, :, None] * theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    rotated = torch.complex(a, b) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((rotated.real, rotated.imag), dim=-1)

# --------------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------------


def test_dense_attention_matches_softmax_formula_with_gqa() -> None:
    torch.manual_seed(0)
    B, H, Hk, Tq, Tk, hd = 2, 6, 2, 4, 5, 3
    q, k, v = (torch.randn(B, h, t, hd, dtype=torch.float64) for h, t in ((H, Tq), (Hk, Tk), (Hk, Tk)))
    mask = torch.rand(B, Tq, Tk) < 0.7
    mask[..., 0] = True  # every row has a key here; empty rows are tested below
    out, lse = dense_attention(q, k, v, mask)
    for b in range(B):
        for h in range(H):
            kv_head = h // (H // Hk)  # query heads 0-2 share key head 0, 3-5 key head 1
            s = (q[b, h] @ k[b, kv_head].T) / math.sqrt(hd)
            s = s.masked_fill(~mask[b], float("-inf"))
            torch.testing.assert_close(out[b, h], torch.softmax(s, -1) @ v[b, kv_head])
            torch.testing.assert_close(lse[b, h], torch.logsumexp(s, -1))


def test_dense_attention_empty_rows_are_zero_without_nan_gradients() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[[True, False, False], [False, False, False], [True, True, True]]])
    out, lse = dense_attention(q, k, v, mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert bool(torch.isneginf(lse[:, :, 1]).all()) and bool(torch.isfinite(lse[:, :, [0, 2]]).all())
    (out.sum() + lse[:, :, [0, 2]].sum()).backward()
    for t in (q, k, v):
        assert bool(torch.isfinite(t.grad).all())
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))


def test_dense_attention_errors() -> None:
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        dense_attention(q, torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match=r"mask must be \[B, Tq, Tk\]"):
        dense_attention(q, q, q, torch.ones(1, 2, 3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# masked_sdpa vs the oracle: output and dQ / dK / dV
# --------------------------------------------------------------------------------------------------


def _contexts(T: int) -> dict[str, SeqContext]:
    pos = torch.arange(T).expand(2, T).contiguous()
    seg = torch.zeros(2, T, dtype=torch.long)
    seg[0, T // 2:] = 1
    seg[1, -2:] = PAD_SEGMENT  # padding: empty attention rows
    seg_pos = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)]).expand(2, T).clone()
    seg_pos[1] = torch.arange(T)
    blk = torch.full((2, T), NO_BLOCK, dtype=torch.long)
    blk[:, 1:4] = 0
    blk[:, 5:T - 1] = 1
    return {
        "causal": SeqContext(positions=pos),
        "bidirectional": SeqContext(positions=pos, mask=MaskSpec(causal=False)),
        "causal+window": SeqContext(positions=pos, mask=MaskSpec(causal=True, window=3)),
        "bidirectional+window": SeqContext(positions=pos, mask=MaskSpec(causal=False, window=2)),
        "blocks": SeqContext(positions=pos, block_ids=blk),
        "segments+padding": SeqContext(positions=seg_pos, segment_ids=seg),
        "segments+blocks+window": SeqContext(positions=seg_pos, segment_ids=seg, block_ids=blk,
                                             mask=MaskSpec(causal=True, window=3)),
        "bidirectional segments": SeqContext(positions=seg_pos, segment_ids=seg, mask=MaskSpec(causal=False)),
        "window 1 (only itself)": SeqContext(positions=pos, mask=MaskSpec(causal=True, window=1)),
    }


@pytest.mark.parametrize("T", [7, 13])
@pytest.mark.parametrize("name", list(_contexts(7)))
def test_masked_sdpa_matches_oracle_with_gradients(name: str, T: int) -> None:
    torch.manual_seed(T)
    ctx = _contexts(T)[name]
    mask = mask_from_context(ctx)
    H, Hk, hd = 4, 2, 8

    def inputs():
        torch.manual_seed(5)
        return [torch.randn(2, h, T, hd, dtype=torch.float64, requires_grad=True) for h in (H, Hk, Hk)]

    grad_out = torch.randn(2, H, T, hd, dtype=torch.float64)
    q1, k1, v1 = inputs()
    out = masked_sdpa(q1, k1, v1, mask)
    (out * grad_out).sum().backward()
    q2, k2, v2 = inputs()
    ref, _ = dense_attention(q2, k2, v2, mask)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, want, what in ((q1, q2, "dQ"), (k1, k2, "dK"), (v1, v2, "dV")):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-12, msg=what)


def test_empty_rows_are_zero_even_when_sdpa_gives_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a backend that returns NaN for all-False rows (several torch versions do)."""
    def naive_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return torch.softmax(s.masked_fill(~attn_mask, float("-inf")), dim=-1) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[[True, False, False], [False, False, False], [True, True, False]]])
    assert bool(naive_sdpa(q, k, v, mask[:, None]).isnan().any())  # the simulated backend really NaNs
    out = masked_sdpa(q, k, v, mask)
    ref, _ = dense_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))


# --------------------------------------------------------------------------------------------------
# FullAttention end to end vs  projections -> complex RoPE -> oracle -> output projection
# --------------------------------------------------------------------------------------------------


def reference_forward(attn: FullAttention, x: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
    B, T, _ = x.shape
    q = (x @ attn.q_proj.weight.T).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    theta = attn.rope.theta
    q, k = complex_rope(q, ctx.positions, theta), complex_rope(k, ctx.positions, theta)
    out, _ = dense_attention(q, k, v, mask_from_context(ctx))
    return out.transpose(1, 2).reshape(B, T, -1) @ attn.out_proj.weight.T


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("name", list(_contexts(7)))
def test_full_attention_matches_reference(name: str, heads: tuple[int, int]) -> None:
    torch.manual_seed(3)
    T = 9
    ctx = _contexts(T)[name]
    attn = FullAttention(dim=32, num_heads=heads[0], num_kv_heads=heads[1]).double()
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, T, 32, dtype=torch.float64)
    y, state = attn(x, ctx)
    assert state is None
    (y * grad_y).sum().backward()
    got_grads = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    x.grad = None
    attn.zero_grad()
    ref = reference_forward(attn, x, ctx)
    (ref * grad_y).sum().backward()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for got, want in zip(got_grads, [x.grad] + [p.grad for p in attn.parameters()]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    assert bool(torch.isfinite(y).all())


def test_padding_tokens_output_exactly_zero() -> None:
    ctx = _contexts(7)["segments+padding"]
    attn = FullAttention(dim=16, num_heads=2).double()
    y, _ = attn(torch.randn(2, 7, 16, dtype=torch.float64), ctx)
    assert torch.equal(y[1, -2:], torch.zeros_like(y[1, -2:]))


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


# Blocks are [1, 4) and [5, 8): chunk bounds must not cut them (a block's later tokens cannot be seen
# before they exist), so token-by-token decoding runs only without blocks.
CHUNKINGS = {"1-3-5": [0, 1, 4, 9], "5-4": [0, 5, 9], "steps": list(range(10))}
CACHE_CASES = [(name, chunks) for name in ("causal", "causal+window", "segments+padding") for chunks in CHUNKINGS]
CACHE_CASES += [(name, chunks) for name in ("blocks", "segments+blocks+window") for chunks in ("1-3-5", "5-4")]


@pytest.mark.parametrize(("name", "chunking"), CACHE_CASES)
def test_kv_cache_chunks_equal_full_pass(name: str, chunking: str) -> None:
    bounds = CHUNKINGS[chunking]
    torch.manual_seed(4)
    T = 9
    ctx = _contexts(T)[name]
    attn = FullAttention(dim=32, num_heads=4, num_kv_heads=2).double()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    y_full, _ = attn(x, ctx)
    state = attn.init_state(2, "cpu", torch.float64)
    assert state.size == 0 and state.seen == 0
    ys = []
    for start, end in itertools.pairwise(bounds):
        y, state = attn(x[:, start:end], ctx.slice(start, end), state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, rtol=0, atol=1e-12)
    assert isinstance(state, KVCache) and state.seen == T and state.k.shape == (2, 2, T, 8)
    assert torch.equal(state.positions, ctx.positions)
    assert attn.state_size(T) == (state.k.numel() + state.v.numel()) // 2


def test_cache_keys_are_stored_after_rope() -> None:
    attn = FullAttention(dim=16, num_heads=2).double()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    ctx = SeqContext.simple(1, 3, offset=10)
    _, state = attn(x, ctx, attn.init_state(1, "cpu", torch.float64))
    k = attn.k_proj(x).view(1, 3, 2, 8).transpose(1, 2)
    torch.testing.assert_close(state.k, complex_rope(k, ctx.positions, attn.rope.theta), rtol=0, atol=1e-12)


def test_cache_errors() -> None:
    attn = FullAttention(dim=16, num_heads=2)
    x = torch.randn(2, 1, 16)
    ctx = SeqContext.simple(2, 1)
    with pytest.raises(ValueError, match=r"KV cache has shape \(3, 2, 0, 8\), expected \[2, 2, S, 8\]"):
        attn(x, ctx, attn.init_state(3, "cpu", torch.float32))
    with pytest.raises(ValueError, match="KV cache is torch.float64"):
        attn(x, ctx, attn.init_state(2, "cpu", torch.float64))
    with pytest.raises(TypeError, match="expected a KVCache state"):
        attn(x, ctx, object())


# --------------------------------------------------------------------------------------------------
# Construction, capabilities, misc
# --------------------------------------------------------------------------------------------------


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a positive multiple of num_kv_heads \(3\)"):
        FullAttention(dim=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"dim \(30\) is not divisible by num_heads \(4\)"):
        FullAttention(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        FullAttention(dim=30, num_heads=2, head_dim=15)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        FullAttention(dim=0)


def test_explicit_head_dim_and_bias() -> None:
    attn = FullAttention(dim=12, num_heads=3, head_dim=6, qkv_bias=True)
    assert attn.q_proj.out_features == 18 and attn.q_proj.bias is not None and attn.out_proj.bias is None
    y, _ = attn(torch.randn(1, 5, 12), SeqContext.simple(1, 5))
    assert y.shape == (1, 5, 12)
    assert attn.residual_outputs() == [attn.out_proj]


def test_context_parallel_is_refused() -> None:
    attn = FullAttention(dim=16, num_heads=2)
    ctx = SeqContext(positions=torch.arange(4)[None], cp=ContextParallel(group=None, rank=0, world_size=2))
    with pytest.raises(MixerCapabilityError, match="does not support context parallelism"):
        attn(torch.randn(1, 4, 16), ctx)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(6)
    attn = FullAttention(dim=16, num_heads=2, dropout=0.5)
    x = torch.randn(1, 8, 16)
    ctx = SeqContext.simple(1, 8)
    attn.eval()
    y_eval, _ = attn(x, ctx)
    torch.testing.assert_close(attn(x, ctx)[0], y_eval)
    attn.train()
    assert (attn(x, ctx)[0] - y_eval).abs().max() > 1e-4
