"""Sliding-window attention: the chunked op and the layer against the dense float64 oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmgrow.layers.attention import FullAttention, KVCache
from mmgrow.layers.sliding_window import SlidingWindowAttention
from mmgrow.ops import sliding_window as sw_ops
from mmgrow.ops.attention_ref import dense_attention
from mmgrow.ops.sliding_window import positions_advance, sliding_window_attention
from mmgrow.ops.token_meta import TokenMeta, tile_mask
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec, SeqContext

F64_TOL = 1e-10


def _qkv(B: int, H: int, Hk: int, T: int, hd: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, hd, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
            for h in (H, Hk, Hk)]


def _arange_meta(B: int, T: int, **facts) -> TokenMeta:
    index = torch.arange(T).expand(B, T)
    return TokenMeta(index=facts.pop("index", index), positions=facts.pop("positions", index), **facts)


def _packed_meta(rows: list[list[int]], T: int, block: int | None = None) -> TokenMeta:
    """Rows of segments (lengths; a negative length is that many padding tokens), positions restarting
    per segment, then padding to ``T``; with ``block``, each segment is one loose token + blocks."""
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    seg = torch.full((len(rows), T), PAD_SEGMENT, dtype=torch.long)
    blk = torch.full((len(rows), T), NO_BLOCK, dtype=torch.long)
    for b, lengths in enumerate(rows):
        start = 0
        for s, length in enumerate(lengths):
            if length > 0:
                pos[b, start:start + length] = torch.arange(length)
                seg[b, start:start + length] = s
                if block:
                    blk[b, start + 1:start + length] = 10 * s + torch.arange(length - 1) // block
            start += abs(length)
    return _arange_meta(len(rows), T, positions=pos, segment_ids=seg, block_ids=blk if block else None)


def _loss(out: torch.Tensor, lse: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """A random linear function of out and of the finite LSE entries (so d lse is checked too)."""
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    w_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.dtype)
    finite = torch.isfinite(lse)
    return (out * w_out).sum() + torch.where(finite, lse, torch.zeros_like(lse)).mul(w_lse).sum()


def _op_and_oracle(q, k, v, meta: TokenMeta, spec: MaskSpec):
    """``[out, lse, dq, dk, dv]`` of the op (in the inputs' dtype) and of the float64 dense oracle."""
    results = []
    for run, dtype in ((lambda a, b, c: sliding_window_attention(a, b, c, meta, spec), q.dtype),
                       (lambda a, b, c: dense_attention(a, b, c, tile_mask(meta, meta, spec)), torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, lse = run(*leaves)
        _loss(out.double(), lse.double()).backward()
        results.append([out.detach().double(), lse.detach().double(), *(t.grad.double() for t in leaves)])
    return results


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "empty rows (lse = -inf) differ"
    both_inf = torch.isneginf(a) & torch.isneginf(b)
    return float(torch.where(both_inf, torch.zeros_like(a), a - b).abs().max())


def _assert_matches_oracle(q, k, v, meta: TokenMeta, spec: MaskSpec, rel_tol: float | None = None) -> None:
    """float64: every error <= 1e-10; otherwise error <= rel_tol * (largest oracle magnitude)."""
    got, want = _op_and_oracle(q, k, v, meta, spec)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert not bool(torch.isnan(a).any()), f"{name} has NaN ({spec})"
        tol = F64_TOL if rel_tol is None else rel_tol * float(b[torch.isfinite(b)].abs().max())
        err = _max_err(a, b)
        assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} ({spec})"


# --------------------------------------------------------------------------------------------------
# The op against the oracle
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("causal", "window", "T"), list(itertools.product((True, False), (1, 2, 5, 16), (11, 23, 37))))
def test_op_matches_oracle_plain_gqa(causal: bool, window: int, T: int) -> None:
    q, k, v = _qkv(2, 4, 2, T, seed=window + T)
    _assert_matches_oracle(q, k, v, _arange_meta(2, T), MaskSpec(causal=causal, window=window))


@pytest.mark.parametrize(("causal", "window"), [(True, 4), (False, 4), (True, 1), (False, 7)])
def test_op_matches_oracle_packed_rows_with_padding(causal: bool, window: int) -> None:
    # row 0: segments 9, 6, 2 padding, a segment of 5, 3 padding; row 1: 13 + 10 tokens, 2 padding
    meta = _packed_meta([[9, 6, -2, 5], [13, 10]], 25)
    q, k, v = _qkv(2, 4, 1, 25, seed=3)
    _assert_matches_oracle(q, k, v, meta, MaskSpec(causal=causal, window=window))
    out, lse = sliding_window_attention(q, k, v, meta, MaskSpec(causal=causal, window=window))
    pad = meta.segment_ids == PAD_SEGMENT  # [B, T]
    assert int(pad.sum()) == 7
    assert torch.equal(out.permute(0, 2, 1, 3)[pad], torch.zeros_like(out.permute(0, 2, 1, 3)[pad]))
    assert bool(torch.isneginf(lse.permute(0, 2, 1)[pad]).all())
    assert bool(torch.isfinite(lse.permute(0, 2, 1)[~pad]).all())


@pytest.mark.parametrize(("window", "block"), [(2, 3), (3, 7), (5, 4)])
def test_op_matches_oracle_causal_with_bidirectional_blocks(window: int, block: int) -> None:
    # blocks longer than the window stay limited by it; a block key after its query is visible
    meta = _packed_meta([[14, 9], [23]], 23, block=block)
    q, k, v = _qkv(2, 6, 2, 23, seed=window)
    spec = MaskSpec(causal=True, window=window)
    assert bool(tile_mask(meta, meta, spec).triu(1).any()), "the case must hold visible later keys"
    _assert_matches_oracle(q, k, v, meta, spec)
    for local_spec in (MaskSpec(causal=True, window=window, local=True, shared_prefix=True),
                       MaskSpec(causal=False, window=window, local=True)):
        _assert_matches_oracle(q, k, v, meta, local_spec)


def test_op_matches_oracle_when_stream_index_is_not_increasing() -> None:
    # e.g. a zigzag shard: places and positions advance, causality follows a permuted stream index
    T = 19
    index = torch.randperm(T, generator=torch.Generator().manual_seed(0))[None]
    meta = _arange_meta(1, T, index=index)
    q, k, v = _qkv(1, 2, 2, T, seed=9)
    spec = MaskSpec(causal=True, window=4)
    assert bool(tile_mask(meta, meta, spec).triu(1).any())
    _assert_matches_oracle(q, k, v, meta, spec)


def test_op_float32_within_relative_tolerance_of_float64_oracle() -> None:
    meta = _packed_meta([[17, 12, -3], [32]], 32, block=5)
    q, k, v = _qkv(2, 4, 2, 32, dtype=torch.float32, seed=11)
    for spec in (MaskSpec(causal=True, window=6), MaskSpec(causal=False, window=3)):
        _assert_matches_oracle(q, k, v, meta, spec, rel_tol=1e-5)
        out, lse = sliding_window_attention(q, k, v, meta, spec)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_op_bfloat16_accumulates_in_float32() -> None:
    meta = _arange_meta(1, 21)
    q, k, v = (t.detach() for t in _qkv(1, 2, 1, 21, dtype=torch.bfloat16, seed=2))
    spec = MaskSpec(causal=True, window=5)
    out, lse = sliding_window_attention(q, k, v, meta, spec)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want_out, want_lse = dense_attention(q.double(), k.double(), v.double(), tile_mask(meta, meta, spec))
    assert float((lse.double() - want_lse).abs().max()) < 1e-5  # float32 accumulation of bf16 inputs
    assert float((out.double() - want_out).abs().max()) < 2e-2  # bf16 output rounding


def test_op_fallback_when_positions_do_not_advance(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_blockwise(*args, **kwargs):
        calls.append(1)
        return sw_ops.__dict__["_real_blockwise"](*args, **kwargs)

    monkeypatch.setitem(sw_ops.__dict__, "_real_blockwise", sw_ops.blockwise_attention)
    monkeypatch.setattr(sw_ops, "blockwise_attention", counting_blockwise)
    T = 17
    q, k, v = _qkv(2, 2, 1, T, seed=4)
    # every position 0: a window of 2 sees the whole row, far beyond 2 places
    same_pos = _arange_meta(2, T, positions=torch.zeros(2, T, dtype=torch.long))
    repeated = _arange_meta(2, T, positions=(torch.arange(T) // 3).expand(2, T))
    for meta, window in ((same_pos, 2), (repeated, 3)):
        for causal in (True, False):
            spec = MaskSpec(causal=causal, window=window)
            before = len(calls)
            _assert_matches_oracle(q, k, v, meta, spec)
            assert len(calls) == before + 1, "the blockwise fallback was not taken"
    _assert_matches_oracle(q, k, v, _arange_meta(2, T), MaskSpec(window=2))
    assert len(calls) == 4, "the chunked path must not fall back when positions advance"


def test_positions_advance_per_segment_and_across_interleaved_segments() -> None:
    restart = _packed_meta([[5, 4, -2]], 11)
    assert bool(positions_advance(restart))
    gaps = _arange_meta(1, 6, positions=torch.tensor([[0, 2, 3, 7, 8, 20]]))
    assert bool(positions_advance(gaps))
    # segment 0 at places 0 and 2 with positions 0 and 1: one position apart, two places apart
    interleaved = TokenMeta(torch.arange(4)[None], torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 0, 1]]))
    assert not bool(positions_advance(interleaved))
    q, k, v = _qkv(1, 2, 2, 4, seed=6)
    _assert_matches_oracle(q, k, v, interleaved, MaskSpec(causal=True, window=2))


def test_op_rejects_bad_input() -> None:
    q, k, v = _qkv(1, 2, 1, 6)
    meta = _arange_meta(1, 6)
    with pytest.raises(ValueError, match="spec.window is None"):
        sliding_window_attention(q, k, v, meta, MaskSpec())
    with pytest.raises(ValueError, match="as many keys"):
        sliding_window_attention(q, k[:, :, :5], v[:, :, :5], meta, MaskSpec(window=2))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sliding_window_attention(q[:, :1], k.expand(1, 2, 6, 8), v.expand(1, 2, 6, 8), meta, MaskSpec(window=2))


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------

DIM = 32


def _layers(window: int, seed: int = 0) -> tuple[SlidingWindowAttention, FullAttention]:
    torch.manual_seed(seed)
    swa = SlidingWindowAttention(dim=DIM, num_heads=4, num_kv_heads=2, window=window).double()
    full = FullAttention(dim=DIM, num_heads=4, num_kv_heads=2).double()
    full.load_state_dict(swa.state_dict())
    return swa, full


def _x(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ctx_from_meta(meta: TokenMeta, causal: bool = True, window: int | None = None) -> SeqContext:
    return SeqContext(positions=meta.positions.contiguous(), segment_ids=meta.segment_ids, block_ids=meta.block_ids,
                      mask=MaskSpec(causal=causal, window=window))


@pytest.mark.parametrize(("causal", "blocks", "ctx_window"), [(True, False, None), (False, False, None),
                                                             (True, True, None), (True, False, 2)])
def test_layer_equals_full_attention_with_context_window(causal: bool, blocks: bool, ctx_window: int | None) -> None:
    W = 4
    swa, full = _layers(W)
    meta = _packed_meta([[11, 8, -2], [21]], 21, block=3 if blocks else None)
    ctx = _ctx_from_meta(meta, causal, ctx_window)
    full_ctx = _ctx_from_meta(meta, causal, min(W, ctx_window or W))
    x1 = _x(2, 21).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, _ = swa(x1, ctx)
    y2, _ = full(x2, full_ctx)
    assert float((y1 - y2).detach().abs().max()) <= F64_TOL
    w = _x(2, 21, seed=7)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    assert float((x1.grad - x2.grad).abs().max()) <= F64_TOL
    full_params = dict(full.named_parameters())
    for name, p in swa.named_parameters():
        assert float((p.grad - full_params[name].grad).abs().max()) <= F64_TOL, name
    assert float(y1.detach().abs().max()) > 0.1


def _run_chunks(layer: SlidingWindowAttention, x: torch.Tensor, ctx: SeqContext, bounds: list[int]):
    state = layer.init_state(x.shape[0], x.device, x.dtype)
    ys, sizes = [], []
    for start, end in itertools.pairwise(bounds):
        y, state = layer(x[:, start:end], ctx.slice(start, end), state)
        assert isinstance(state, KVCache)
        sizes.append(state.size)
        assert state.seen == end
        ys.append(y)
    return torch.cat(ys, dim=1), sizes, state


@pytest.mark.parametrize("packed", [False, True])
def test_rolling_cache_decode_and_chunked_prefill_equal_one_prefill(packed: bool) -> None:
    W, T = 3, 11
    swa, _ = _layers(W, seed=2)
    meta = _packed_meta([[6, 5], [4, 7]], T) if packed else _arange_meta(2, T, positions=torch.arange(5, 5 + T)[None]
                                                                                                    .expand(2, T))
    ctx = _ctx_from_meta(meta)
    x = _x(2, T, seed=3)
    y_full, _ = swa(x, ctx)
    for bounds in (list(range(T + 1)), [0, 7, T], [0, 2, 9, T], [0, 4, 5, T]):
        y, sizes, state = _run_chunks(swa, x, ctx, bounds)
        assert float((y - y_full).detach().abs().max()) <= F64_TOL, f"chunks {bounds}"
        assert max(sizes) <= W - 1, f"cache grew to {max(sizes)} > window - 1"
        # the cache holds exactly the last window - 1 tokens' keys, at their stream positions
        assert torch.equal(state.positions, meta.positions[:, T - (W - 1):])
    assert swa.state_size(T) == 2 * 2 * 8 * (W - 1) and swa.state_size(1) == 2 * 2 * 8


def test_rolling_cache_rejects_positions_that_do_not_advance() -> None:
    swa, _ = _layers(2)
    ctx = SeqContext(positions=torch.zeros(1, 4, dtype=torch.long))
    state = swa.init_state(1, "cpu", torch.float64)
    with pytest.raises(ValueError, match="positions must advance"):
        for t in range(4):
            _, state = swa(_x(1, 1, seed=t), ctx.slice(t, t + 1), state)


def test_layer_constructor_errors_and_context() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be a positive int"):
            SlidingWindowAttention(dim=DIM, window=bad)
    with pytest.raises(ValueError, match="dropout"):
        SlidingWindowAttention(dim=DIM, window=4, dropout=0.1)
    swa = SlidingWindowAttention(dim=DIM, window=4)
    assert swa.layer_context(SeqContext.simple(1, 3)).mask.window == 4
    assert swa.layer_context(SeqContext.simple(1, 3, window=2)).mask.window == 2
    assert swa.layer_context(SeqContext.simple(1, 3, window=9, causal=False)).mask == MaskSpec(causal=False, window=4)


@pytest.mark.parametrize(("window", "causal"), [(128, True), (160, False), (700, True)])
def test_windowed_attention_tiles_large_windows_and_matches_oracle(window: int, causal: bool) -> None:
    """Windows of TILED_FROM tokens or more take the tiled kernel (tiles of min(W, 512)); exact."""
    assert window >= sw_ops.TILED_FROM
    T = 300 if window < 512 else 1100
    meta = _packed_meta([[T // 2, T // 3, -(T - T // 2 - T // 3)], [T]], T)
    spec = MaskSpec(causal=causal, window=window)
    q, k, v = _qkv(2, 4, 2, T, seed=3)
    out, lse = sw_ops.windowed_attention(q, k, v, meta, spec)
    ref_out, ref_lse = dense_attention(q, k, v, tile_mask(meta, meta, spec))
    assert _max_err(out, ref_out) <= 1e-10
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and _max_err(lse[finite], ref_lse[finite]) <= 1e-10
    grads = torch.autograd.grad(_loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(_loss(ref_out, ref_lse), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert _max_err(a, b) <= 1e-10


def test_layer_with_a_large_window_equals_full_attention() -> None:
    W, T = 130, 300
    swa, full = _layers(W)
    meta = _packed_meta([[170, 120, -10], [300]], T)
    x1 = _x(2, T).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, _ = swa(x1, _ctx_from_meta(meta))
    y2, _ = full(x2, _ctx_from_meta(meta, window=W))
    assert float((y1 - y2).detach().abs().max()) <= 1e-12
    g = _x(2, T, seed=9)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert float((x1.grad - x2.grad).abs().max()) <= 1e-12
    for a, b in zip(swa.parameters(), full.parameters()):
        assert float((a.grad - b.grad).abs().max()) <= 1e-11
