"""The Gated DeltaNet layer: inits, an independent float64 per-token re-implementation, kernels,
the conformance suite, errors, and the dispatch to FLA (a fake ``fla`` package on CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mmgrow.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetState
from mmgrow.ops import gated_delta_cuda
from mmgrow.protocols import PAD_SEGMENT, MixerCapabilityError, SeqContext
from mmgrow.testing.conformance import packed_context

SMALL = {"num_heads": 2, "head_dim": 4, "conv_kernel": 3, "chunk_size": 4}


def _layer(dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs) -> GatedDeltaNet:
    torch.manual_seed(seed)
    layer = GatedDeltaNet(dim=16, **{**SMALL, **kwargs}).to(dtype)
    layer.init_weights(0.3)  # large enough that every term matters
    return layer.eval()


def _randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def per_token_reference(m: GatedDeltaNet, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """The layer's equations evaluated token by token, head by head, from scratch (float64)."""
    B, T, D = x.shape
    H, K, V = m.num_heads, m.head_k_dim, m.head_v_dim
    eye = torch.eye(K, dtype=x.dtype)
    y = torch.zeros(B, T, D, dtype=x.dtype)

    def conv(lin: torch.nn.Linear, cv, b: int, t: int) -> torch.Tensor:
        taps = cv.weight.shape[1]  # weight [C, taps]; the last tap weighs the current token
        acc = torch.zeros(lin.weight.shape[0], dtype=x.dtype)
        for i in range(taps):
            s = t - taps + 1 + i
            if s >= 0 and seg[b, s] == seg[b, t]:
                acc = acc + cv.weight[:, i] * (lin.weight @ x[b, s])
        return acc * torch.sigmoid(acc)

    for b in range(B):
        S = torch.zeros(H, K, V, dtype=x.dtype)
        for t in range(T):
            if seg[b, t] == PAD_SEGMENT:
                continue
            if t == 0 or seg[b, t] != seg[b, t - 1]:
                S = torch.zeros(H, K, V, dtype=x.dtype)
            q = conv(m.q_proj, m.q_conv, b, t).view(H, K)
            k = conv(m.k_proj, m.k_conv, b, t).view(H, K)
            v = conv(m.v_proj, m.v_conv, b, t).view(H, V)
            z = (m.g_proj.weight @ x[b, t]).view(H, V)
            a = m.a_proj.weight @ x[b, t]
            bb = m.b_proj.weight @ x[b, t]
            heads = []
            for h in range(H):
                qh = q[h] / torch.sqrt(q[h] @ q[h] + 1e-6)
                kh = k[h] / torch.sqrt(k[h] @ k[h] + 1e-6)
                alpha = torch.exp(-torch.exp(m.A_log[h]) * torch.log1p(torch.exp(a[h] + m.dt_bias[h])))
                beta = (2.0 if m.allow_neg_eigval else 1.0) / (1.0 + torch.exp(-bb[h]))
                S[h] = alpha * (eye - beta * torch.outer(kh, kh)) @ S[h] + beta * torch.outer(kh, v[h])
                o = S[h].T @ qh / math.sqrt(K)
                normed = o / torch.sqrt((o * o).mean() + m.o_norm.eps)
                heads.append(normed * m.o_norm.weight[h * V:(h + 1) * V] * z[h] * torch.sigmoid(z[h]))
            y[b, t] = m.o_proj.weight @ torch.cat(heads)
    return y


# --------------------------------------------------------------------------------------------------


def test_init_ranges_and_default_sizes():
    torch.manual_seed(0)
    m = GatedDeltaNet(dim=64, num_heads=4, conv_kernel=4)
    assert (m.head_k_dim, m.head_v_dim) == (12, 24)  # 0.75 * 64 / 4, expand_v = 2
    m.init_weights(0.02)
    for lin in (m.q_proj, m.k_proj, m.v_proj, m.g_proj, m.o_proj):
        assert abs(float(lin.weight.detach().std()) - 0.02) < 0.004 and lin.bias is None
    bound = 1 / math.sqrt(4)
    assert all(bool(c.weight.abs().max() <= bound) and c.bias is None for c in (m.q_conv, m.k_conv, m.v_conv))
    assert torch.equal(m.o_norm.weight, torch.ones_like(m.o_norm.weight))
    assert m.residual_outputs() == [m.o_proj]


def test_gate_init_distributions():
    """exp(A_log) ~ U(1, 16); softplus(dt_bias) log-uniform in [1e-3, 1e-1]: 2048 heads of size 1."""
    torch.manual_seed(0)
    m = GatedDeltaNet(dim=8, num_heads=2048, head_dim=1, expand_v=1.0)
    A = torch.exp(m.A_log.detach().double())
    assert float(A.min()) >= 1 - 1e-6 and float(A.max()) <= 16 + 1e-5
    assert abs(float(A.mean()) - 8.5) < 0.4 and float(A.min()) < 1.1 and float(A.max()) > 15.9
    log_dt = torch.log(F.softplus(m.dt_bias.detach().double()))
    lo, hi = math.log(1e-3), math.log(1e-1)
    assert float(log_dt.min()) >= lo - 1e-4 and float(log_dt.max()) <= hi + 1e-4
    assert abs(float(log_dt.mean()) - (lo + hi) / 2) < 0.15


@pytest.mark.parametrize("kernel", ["chunked", "recurrent"])
@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_equals_independent_per_token_loop(kernel, allow_neg_eigval):
    m = _layer(kernel=kernel, allow_neg_eigval=allow_neg_eigval)
    T = 11
    x = _randn(2, T, 16)
    ctx = packed_context([[6, 3, 2], [4, 5]], T)  # row 1 ends in padding
    with torch.no_grad():
        y, _ = m(x, ctx)
        ref = per_token_reference(m, x, ctx.segment_ids)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    assert float(y.abs().max()) > 1e-3  # not vacuous
    assert bool((y[1, 9:] == 0).all())  # padding outputs 0


def test_recurrent_and_chunked_kernels_agree_with_gradients():
    T = 23
    x = _randn(2, T, 16, seed=2)
    ctx = packed_context([[9, 14], [5, 6, 7]], T)
    results = []
    for kernel in ("recurrent", "chunked"):
        m = _layer(kernel=kernel, chunk_size=5)
        xi = x.clone().requires_grad_(True)
        y, state = m(xi, ctx, m.init_state(2, "cpu", torch.float64))
        loss = (y * _randn(*y.shape, seed=3)).sum() + (state.recurrent * _randn(*state.recurrent.shape, seed=4)).sum()
        grads = torch.autograd.grad(loss, [xi, *m.parameters()])
        results.append((y, state.recurrent, grads))
    (y0, s0, g0), (y1, s1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-12)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-12)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_empty_sequence_keeps_the_state():
    m = _layer()
    state = m.init_state(2, "cpu", torch.float64)
    _, state = m(_randn(2, 5, 16), SeqContext.simple(2, 5), state)
    y, new_state = m(_randn(2, 0, 16), SeqContext.simple(2, 0), state)
    assert y.shape == (2, 0, 16)
    assert torch.equal(new_state.recurrent, state.recurrent) and torch.equal(new_state.segment, state.segment)
    assert torch.equal(new_state.k_tail.inputs, state.k_tail.inputs)


def test_state_size_counts_the_state():
    m = _layer()
    s = m.init_state(1, "cpu", torch.float64)
    floats = s.recurrent.numel() + sum(t.inputs.numel() for t in (s.q_tail, s.k_tail, s.v_tail))
    assert m.state_size(10) == m.state_size(10_000) == floats


def test_half_precision_keeps_a_float32_state():
    m = _layer()
    x = _randn(1, 6, 16)
    with torch.no_grad():
        ref, _ = m(x, SeqContext.simple(1, 6))
        y, state = m.to(torch.bfloat16)(x.to(torch.bfloat16), SeqContext.simple(1, 6))
    assert y.dtype == torch.bfloat16 and state.recurrent.dtype == torch.float32
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 0.05  # bf16 weights and activations


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_heads": 5}, "not an int"),  # default head_dim 0.75 * 16 / 5 = 2.4
    ({"head_dim": 0}, "head_dim"),
    ({"expand_v": 1.3}, "expand_v"),
    ({"kernel": "triton"}, "kernel"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"num_heads": 0}, "num_heads"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"conv_kernel": 0}, "kernel_size"),
])
def test_bad_hparams_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedDeltaNet(dim=16, **kwargs)


def test_bad_state_raises():
    m = _layer()
    x, ctx = _randn(2, 3, 16), SeqContext.simple(2, 3)
    good = m.init_state(2, "cpu", torch.float64)
    with pytest.raises(TypeError, match="GatedDeltaNetState"):
        m(x, ctx, object())
    with pytest.raises(ValueError, match="recurrent"):
        m(x, ctx, m.init_state(1, "cpu", torch.float64))
    bad_tail = GatedDeltaNetState(good.recurrent, good.q_tail, good.v_tail, good.v_tail, good.segment)
    with pytest.raises(ValueError, match="k_tail"):
        m(x, ctx, bad_tail)
    with pytest.raises(ValueError, match="segment"):
        m(x, ctx, GatedDeltaNetState(good.recurrent, good.q_tail, good.k_tail, good.v_tail, good.segment[:1]))


# --------------------------------------------------------------------------------------------------
# dispatch to FLA, with a fake ``fla`` package computing FLA's documented layout with our op


def test_auto_dispatches_to_fla_when_it_can_honour_the_context(monkeypatch, fake_fla):
    calls = fake_fla
    monkeypatch.setattr(gated_delta_cuda, "fla_available", lambda device: True)  # "on CUDA"
    m = _layer(dtype=torch.float32, kernel="auto")
    chunked = _layer(dtype=torch.float32, kernel="chunked")
    T = 9

    def check(x, ctx, state=None, *, expect_call):
        before = len(calls)
        y, s = m(x, ctx, state)
        y_ref, s_ref = chunked(x, ctx, state)
        assert (len(calls) > before) == expect_call
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.recurrent, s_ref.recurrent, rtol=1e-5, atol=1e-5)
        return s, calls[-1]["cu_seqlens"] if expect_call else None

    x = _randn(2, T, 16, dtype=torch.float32)
    state, cu = check(x, SeqContext.simple(2, T), expect_call=True)
    assert cu is None
    check(x[:, :1], SeqContext.simple(2, 1), state, expect_call=False)  # T == 1: the recurrent step
    check(x, packed_context([[4, 5], [9]], T), expect_call=False)  # packed, batch 2: chunked fallback
    _, cu = check(x[:1], packed_context([[4, 3, 2]], T), expect_call=True)  # packed, batch 1: cu_seqlens
    assert cu.tolist() == [0, 4, 7, 9]
    _layer(dtype=torch.float64, kernel="auto")(x.double(), SeqContext.simple(2, T))
    assert len(calls) == 2  # float64 never goes to FLA

    m.kernel = "fla"
    with pytest.raises(MixerCapabilityError, match="batch"):
        m(x, packed_context([[4, 5], [9]], T))
    monkeypatch.setattr(gated_delta_cuda, "fla_available", lambda device: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        m(x, SeqContext.simple(2, T))
