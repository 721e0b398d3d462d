"""The Mamba-2 layer: initialisation, a float64 per-token re-implementation written here from the
parameters alone, kernel agreement, state handling, hyperparameter and state validation, and the
conformance suite."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mmgrow.layers.mamba2 import Mamba2, Mamba2State
from mmgrow.layers.short_conv import ConvTail
from mmgrow.protocols import PAD_SEGMENT, SeqContext

F64_TOL = 1e-10


def _layer(dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> Mamba2:
    torch.manual_seed(seed)
    layer = Mamba2(dim=kw.pop("dim", 32), **{**Mamba2.conformance_kwargs(), **kw}).to(dtype)
    with torch.no_grad():  # a non-trivial norm gain, so the test sees it
        layer.norm.weight.uniform_(0.5, 1.5)
    return layer


def _packed_ctx() -> SeqContext:
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, PAD_SEGMENT], [0] * 10])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0], list(range(10))])
    return SeqContext(positions=pos, segment_ids=seg)


def _x(B: int = 2, T: int = 10, D: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_token_mamba2(m: Mamba2, x: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 token by token from the layer's parameters (no mmgrow op is used): in_proj, the causal
    depthwise conv within the segment, SiLU, softplus/clamped dt, the recurrence per head with group
    sharing, the D skip, the group-wise gated RMSNorm and out_proj. Returns ``(y, final ssm [B,H,N,P])``."""
    Bt, T, _ = x.shape
    H, P, G, N, K, d_inner = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_conv, m.d_inner
    C_ch = d_inner + 2 * G * N
    lo, hi = m.dt_limit
    rows, finals = [], []
    for b in range(Bt):
        state = [torch.zeros(N, P, dtype=x.dtype) for _ in range(H)]
        conv_inputs, outputs = [], []
        for t in range(T):
            proj = m.in_proj.weight @ x[b, t]
            if m.in_proj.bias is not None:
                proj = proj + m.in_proj.bias
            z, u, dt_raw = proj[:d_inner], proj[d_inner:d_inner + C_ch], proj[d_inner + C_ch:]
            conv_inputs.append(u)
            conv = m.conv.bias.clone() if m.conv.bias is not None else torch.zeros(C_ch, dtype=x.dtype)
            for i in range(K):  # weight[:, K-1] weighs the current token
                s = t - (K - 1) + i
                if s >= 0 and seg[b, s] == seg[b, t]:
                    conv = conv + m.conv.weight[:, i] * conv_inputs[s]
            v = F.silu(conv)
            xs, Bv, Cv = v[:d_inner].view(H, P), v[d_inner:d_inner + G * N].view(G, N), v[d_inner + G * N:].view(G, N)
            if t == 0 or seg[b, t] != seg[b, t - 1]:
                state = [torch.zeros(N, P, dtype=x.dtype) for _ in range(H)]
            y_heads = []
            for h in range(H):
                g = h // (H // G)
                dt = F.softplus(dt_raw[h] + m.dt_bias[h]).clamp(lo, hi)
                a = torch.exp(-dt * torch.exp(m.A_log[h]))
                state[h] = a * state[h] + dt * torch.outer(Bv[g], xs[h])
                y_heads.append(state[h].T @ Cv[g] + m.D[h] * xs[h])
            gated = (torch.cat(y_heads) * F.silu(z)).view(G, d_inner // G)
            normed = (gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(-1) * m.norm.weight
            out = m.out_proj.weight @ normed
            outputs.append(out + m.out_proj.bias if m.out_proj.bias is not None else out)
        rows.append(torch.stack(outputs))
        finals.append(torch.stack(state))
    return torch.stack(rows), torch.stack(finals)


def _grads(m: Mamba2, x: torch.Tensor, y: torch.Tensor, ssm: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + \
        (ssm * torch.randn(ssm.shape, generator=g, dtype=ssm.dtype)).sum()
    return list(torch.autograd.grad(loss, [x, *m.parameters()]))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["chunked", "recurrent", "auto"])
@pytest.mark.parametrize("hparams", [{}, {"ngroups": 1, "bias": True, "conv_bias": False, "d_conv": 3,
                                          "chunk_size": 3, "dt_limit": (0.02, 0.5)}])
def test_layer_equals_per_token_reimplementation(kernel: str, hparams: dict) -> None:
    m = _layer(kernel=kernel, **hparams)
    ctx = _packed_ctx()
    x = _x().requires_grad_(True)
    y, state = m(x, ctx)
    y_ref, ssm_ref = per_token_mamba2(m, x, ctx.segment_ids)
    assert _max_diff(y, y_ref) <= F64_TOL
    assert _max_diff(state.ssm, ssm_ref) <= F64_TOL
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, _grads(m, x, y, state.ssm), _grads(m, x, y_ref, ssm_ref), strict=True):
        assert _max_diff(a, b) <= F64_TOL, f"gradient of {name} differs by {_max_diff(a, b):.3g}"


def test_recurrent_and_chunked_kernels_agree_continuing_a_state() -> None:
    chunked, recurrent = _layer(kernel="chunked"), _layer(kernel="recurrent")
    ctx = _packed_ctx()
    x = _x(T=13, seed=3)
    with torch.no_grad():
        _, state = chunked(x[:, :3], SeqContext.simple(2, 3))
    x_rest = x[:, 3:].clone().requires_grad_(True)
    y_c, s_c = chunked(x_rest, ctx, state)
    y_r, s_r = recurrent(x_rest, ctx, state)
    assert _max_diff(y_c, y_r) <= F64_TOL and _max_diff(s_c.ssm, s_r.ssm) <= F64_TOL
    assert torch.equal(s_c.segment, s_r.segment) and torch.equal(s_c.conv.inputs, s_r.conv.inputs)
    for a, b in zip(_grads(chunked, x_rest, y_c, s_c.ssm), _grads(recurrent, x_rest, y_r, s_r.ssm), strict=True):
        assert _max_diff(a, b) <= F64_TOL


def test_unpacked_call_after_a_packed_one_starts_afresh() -> None:
    """A state ending in segment 1 is not continued by a row without segment ids (segment 0): both the
    conv window and the SSM state start over."""
    m = _layer()
    x = _x(T=8, seed=4)
    seg = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    _, state = m(x[:, :5], SeqContext(positions=torch.zeros(2, 5, dtype=torch.long), segment_ids=seg))
    y, _ = m(x[:, 5:], SeqContext.simple(2, 3), state)
    y_fresh, _ = m(x[:, 5:], SeqContext.simple(2, 3))
    y_continued, _ = m(x[:, :8], SeqContext.simple(2, 8))
    assert _max_diff(y[0], y_fresh[0]) <= F64_TOL  # row 0 ended in segment 1: reset
    assert _max_diff(y[1], y_continued[1, 5:]) <= F64_TOL  # row 1 stayed in segment 0: continued
    assert _max_diff(y[1], y_fresh[1]) > 1e-6
    # an id seen earlier in the tail is not continued either: tail segments [1, 1, 0], then segment 1
    ones = SeqContext(positions=torch.zeros(2, 2, dtype=torch.long), segment_ids=torch.ones(2, 2, dtype=torch.long))
    _, state = m(x[:, :2], ones)
    _, state = m(x[:, 2:3], SeqContext.simple(2, 1), state)
    y, _ = m(x[:, 3:5], ones, state)
    assert _max_diff(y, m(x[:, 3:5], ones)[0]) <= F64_TOL


# ------------------------------------------------------------------------------------------------
# Initialisation


def test_initial_ranges() -> None:
    torch.manual_seed(0)
    m = Mamba2(dim=256, headdim=8, d_state=4)  # 64 heads: enough draws to see both ends of the ranges
    dt = F.softplus(m.dt_bias.detach().double())
    assert float(dt.min()) >= 1e-3 * (1 - 1e-6) and float(dt.max()) <= 1e-1 * (1 + 1e-6)
    assert float(dt.max() / dt.min()) > 10  # log-uniform over two decades, not a constant
    A = -torch.exp(m.A_log.detach().double())
    assert float(A.min()) >= -16 - 1e-9 and float(A.max()) <= -1 + 1e-9 and float(A.max() - A.min()) > 5
    assert torch.equal(m.D, torch.ones(64))
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.A_log, m.dt_bias, m.D))
    assert not getattr(m.in_proj.weight, "_no_weight_decay", False)


def test_dt_floor_and_init_weights() -> None:
    torch.manual_seed(0)
    m = Mamba2(dim=64, headdim=8, d_state=4, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3, bias=True)
    assert torch.allclose(F.softplus(m.dt_bias.double()), torch.full((16,), 1e-3, dtype=torch.float64), rtol=1e-6)
    with torch.no_grad():
        m.D.zero_()
        m.A_log.zero_()
        m.norm.weight.zero_()
    m.init_weights(0.02)
    for proj in (m.in_proj, m.out_proj):
        w = proj.weight.detach()
        assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
        assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
    assert torch.equal(m.D, torch.ones(16)) and torch.equal(m.norm.weight, torch.ones(128))
    A = -torch.exp(m.A_log.detach())
    assert float(A.min()) >= -16 and float(A.max()) <= -1


# ------------------------------------------------------------------------------------------------
# State and hyperparameters


def test_state_shapes_and_size() -> None:
    m = _layer()  # dim 32 -> d_inner 64, 4 heads of 16, 2 groups, N 8, K 4
    state = m.init_state(3, "cpu", torch.float64)
    assert state.ssm.shape == (3, 4, 8, 16) and state.conv.inputs.shape == (3, 3, 64 + 2 * 2 * 8)
    assert torch.equal(state.segment, torch.zeros(3, dtype=torch.long))
    assert m.state_size(10) == m.state_size(10_000) == 4 * 8 * 16 + 3 * 96
    assert m.residual_outputs() == [m.out_proj]


def test_empty_input_keeps_the_state() -> None:
    m = _layer()
    x = _x(T=5)
    _, state = m(x, SeqContext.simple(2, 5))
    y, same = m(x[:, :0], SeqContext.simple(2, 0), state)
    assert y.shape == (2, 0, 32)
    assert torch.equal(same.ssm, state.ssm) and torch.equal(same.conv.inputs, state.conv.inputs)
    assert m.kernel_for(x) == "chunked" and m.kernel_for(x[:, :1]) == "recurrent"  # CPU: no mamba-ssm


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"headdim": 48}, "not divisible by headdim"),
    ({"ngroups": 3}, "not divisible by ngroups"),
    ({"kernel": "triton"}, "kernel must be one of"),
    ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min <= dt_max"),
    ({"A_init_range": (0.0, 16.0)}, "A_init_range"),
    ({"dt_limit": (0.5, 0.1)}, "dt_limit"),
    ({"d_state": 0}, "d_state must be a positive int"),
    ({"chunk_size": 2.5}, "chunk_size must be a positive int"),
    ({"expand": 1.01}, "expand \\* dim must be a positive integer"),
    ({"norm_eps": 0.0}, "norm_eps"),
])
def test_bad_hparams_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Mamba2(dim=32, **{**Mamba2.conformance_kwargs(), **kwargs})


def test_bad_state_raises() -> None:
    m = _layer()
    x, ctx = _x(), SeqContext.simple(2, 10)
    good = m.init_state(2, "cpu", torch.float64)
    with pytest.raises(TypeError, match="Mamba2State"):
        m(x, ctx, good.conv)
    with pytest.raises(ValueError, match="state.ssm must be"):
        m(x, ctx, Mamba2State(good.ssm.transpose(-1, -2), good.conv, good.segment))
    with pytest.raises(ValueError, match="state.ssm must be"):
        m(x, ctx, m.init_state(3, "cpu", torch.float64))
    with pytest.raises(ValueError, match="state.conv.inputs must be"):
        m(x, ctx, Mamba2State(good.ssm, ConvTail(good.conv.inputs[:, :2], good.conv.segment_ids), good.segment))
    with pytest.raises(ValueError, match="state.segment must be"):
        m(x, ctx, Mamba2State(good.ssm, good.conv, good.segment[:1]))


def test_extremes_are_applied() -> None:
    """The conformance extremes really reach the gate values they are named after."""
    extremes = Mamba2.conformance_extremes()
    m = _layer()
    extremes["alpha=1"](m)
    assert torch.equal(torch.exp(0.1 * -torch.exp(m.A_log)), torch.ones(4, dtype=torch.float64))
    m = _layer()
    extremes["alpha->0"](m)
    dt = F.softplus(m.dt_bias - 10)  # even with a very negative projected dt_raw
    assert torch.equal(torch.exp(dt * -torch.exp(m.A_log)), torch.zeros(4, dtype=torch.float64))
    m = _layer()
    extremes["dt tiny"](m)
    assert float(F.softplus(m.dt_bias.detach() + 5).max()) < 1e-9
    assert math.isfinite(float(m(_x(), SeqContext.simple(2, 10))[0].detach().abs().max()))
