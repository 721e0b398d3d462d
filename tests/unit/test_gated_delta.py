"""The gated delta rule ops: chunked WY form == per-token recurrence (float64, forward and backward),
resets, state carrying, gate extremes, float32 accuracy, a hand-computed case, and the FLA adapter
exercised on CPU through a fake ``fla`` package."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from torch.nn import functional as F

from mmgrow.ops import gated_delta_cuda
from mmgrow.ops.gated_delta import gated_delta_chunked, gated_delta_recurrent

F64_TOL = 1e-10
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def _inputs(B: int, T: int, H: int, K: int, V: int, *, seed: int = 0, dtype: torch.dtype = torch.float64,
            beta_max: float = 1.0, g_min: float = -1.0) -> dict[str, torch.Tensor]:
    """Random op inputs (L2-normalised keys, g in [g_min, 0], beta in [0, beta_max], a random state)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    raw = {"q": randn(B, T, H, K), "k": F.normalize(randn(B, T, H, K), dim=-1), "v": randn(B, T, H, V),
           "g": g_min * rand(B, T, H), "beta": beta_max * rand(B, T, H), "initial_state": randn(B, H, K, V)}
    return {n: t.to(dtype).requires_grad_(True) for n, t in raw.items()}


def _random_resets(B: int, T: int, seed: int) -> torch.Tensor:
    """Random resets plus one at t = 0 (row 0) and two consecutive ones (row 0, t = 2, 3)."""
    reset = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.2
    reset[0, : min(T, 1)] = True
    reset[0, 2:4] = True
    return reset


def _run(fn, inputs: dict[str, torch.Tensor], reset: torch.Tensor | None, **kwargs):
    """Outputs, final state, and gradients of a random projection of both w.r.t. every input."""
    o, state = fn(*(inputs[n] for n in NAMES[:5]), initial_state=inputs["initial_state"], reset=reset, **kwargs)
    gen = torch.Generator().manual_seed(99)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
        (state * torch.randn(state.shape, generator=gen, dtype=state.dtype)).sum()
    grads = torch.autograd.grad(loss, [inputs[n] for n in NAMES], allow_unused=True)
    grads = [torch.zeros_like(inputs[n]) if gr is None else gr for n, gr in zip(NAMES, grads, strict=True)]
    return o, state, dict(zip(NAMES, grads, strict=True))


def _assert_chunked_equals_recurrent(inputs, reset, chunk_size, tol=F64_TOL, **kwargs) -> float:
    o_ref, s_ref, g_ref = _run(gated_delta_recurrent, inputs, reset, **kwargs)
    o, s, gr = _run(gated_delta_chunked, inputs, reset, chunk_size=chunk_size, **kwargs)
    worst = 0.0
    for what, a, b in [("o", o, o_ref), ("final state", s, s_ref), *((f"d{n}", gr[n], g_ref[n]) for n in NAMES)]:
        assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert bool(torch.isfinite(a).all()), f"{what} is not finite"
        diff = float((a - b).detach().abs().max()) if a.numel() else 0.0
        assert diff <= tol, f"{what}: chunked differs from recurrent by {diff:.3g} (chunk_size={chunk_size})"
        worst = max(worst, diff)
    return worst


# --------------------------------------------------------------------------------------------------
# chunked == recurrent


@pytest.mark.parametrize(("T", "chunk_size", "K", "V"), [
    (10, 4, 5, 7),   # T not a multiple of the chunk, K != V
    (3, 16, 4, 4),   # T < chunk
    (37, 16, 6, 3),
    (64, 64, 8, 8),  # exactly one chunk
    (21, 3, 4, 5),
    (9, 1, 3, 2),    # chunk of one token
    (1, 3, 4, 6),    # the decode step
    (0, 4, 4, 6),    # empty
])
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_equals_recurrent_float64(T, chunk_size, K, V, with_resets):
    inputs = _inputs(2, T, 2, K, V, seed=T + chunk_size)
    reset = _random_resets(2, T, seed=T) if with_resets else None
    _assert_chunked_equals_recurrent(inputs, reset, chunk_size)


def test_default_chunk_and_scale_long_row():
    inputs = _inputs(1, 150, 2, 8, 8, seed=3)
    _assert_chunked_equals_recurrent(inputs, _random_resets(1, 150, seed=4), 64, scale=0.3)


def test_gradcheck_chunked_tiny():
    inputs = _inputs(1, 5, 1, 3, 2, seed=5, g_min=-0.5)
    reset = torch.tensor([[False, False, False, True, False]])  # inside the second chunk

    def fn(q, k, v, g, beta, h0):
        return gated_delta_chunked(q, k, v, g, beta, chunk_size=2, initial_state=h0, reset=reset)

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in NAMES), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# the equation itself


def test_two_tokens_match_the_equation():
    """S_1, S_2 written out from S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""
    inputs = _inputs(1, 2, 1, 3, 2, seed=6, g_min=-0.8)
    q, k, v, g, beta, S0 = (inputs[n].detach()[0] for n in NAMES)
    q, k, v, g, beta, S0 = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S0[0]  # one head
    eye = torch.eye(3, dtype=torch.float64)
    S1 = torch.exp(g[0]) * (eye - beta[0] * torch.outer(k[0], k[0])) @ S0 + beta[0] * torch.outer(k[0], v[0])
    S2 = torch.exp(g[1]) * (eye - beta[1] * torch.outer(k[1], k[1])) @ S1 + beta[1] * torch.outer(k[1], v[1])
    scale = 3 ** -0.5
    expected_o = torch.stack([S1.T @ (scale * q[0]), S2.T @ (scale * q[1])])
    for fn, kw in [(gated_delta_recurrent, {}), (gated_delta_chunked, {"chunk_size": 2}),
                   (gated_delta_chunked, {"chunk_size": 1})]:
        o, S = fn(*(inputs[n].detach() for n in NAMES[:5]), initial_state=inputs["initial_state"].detach(), **kw)
        torch.testing.assert_close(o[0, :, 0], expected_o, rtol=0, atol=1e-14)
        torch.testing.assert_close(S[0, 0], S2, rtol=0, atol=1e-14)


def test_reset_equals_separate_runs():
    B, T = 2, 13
    inputs = {n: t.detach() for n, t in _inputs(B, T, 2, 4, 5, seed=7).items()}
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, [0, 5, 6, 11]] = True  # t = 0, consecutive, near the end
    reset[1, [3, 8]] = True
    for fn, kw in [(gated_delta_recurrent, {}), (gated_delta_chunked, {"chunk_size": 4})]:
        o, S = fn(*(inputs[n] for n in NAMES[:5]), initial_state=inputs["initial_state"], reset=reset, **kw)
        for b in range(B):
            bounds = [0, *[t for t in range(1, T) if reset[b, t]], T]
            for start, end in itertools.pairwise(bounds):
                piece = [inputs[n][b:b + 1, start:end] for n in NAMES[:5]]
                h0 = None if reset[b, start] else inputs["initial_state"][b:b + 1]
                o_alone, S_alone = fn(*piece, initial_state=h0, **kw)
                if fn is gated_delta_recurrent:  # the same operations in the same order: bit for bit
                    assert torch.equal(o[b:b + 1, start:end], o_alone), f"row {b} tokens {start}..{end - 1}"
                else:
                    torch.testing.assert_close(o[b:b + 1, start:end], o_alone, rtol=0, atol=1e-12)
            torch.testing.assert_close(S[b:b + 1], S_alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cuts", [[0, 5, 13], [0, 1, 2, 9, 13], [0, 8, 13]])
def test_split_and_carry_equals_one_pass(cuts):
    T = 13
    inputs = {n: t.detach() for n, t in _inputs(2, T, 2, 4, 5, seed=8).items()}
    reset = _random_resets(2, T, seed=9)
    for fn, kw in [(gated_delta_recurrent, {}), (gated_delta_chunked, {"chunk_size": 4})]:
        o_full, S_full = fn(*(inputs[n] for n in NAMES[:5]), initial_state=inputs["initial_state"], reset=reset, **kw)
        S, pieces = inputs["initial_state"], []
        for start, end in itertools.pairwise(cuts):
            o, S = fn(*(inputs[n][:, start:end] for n in NAMES[:5]), initial_state=S, reset=reset[:, start:end], **kw)
            pieces.append(o)
        if fn is gated_delta_recurrent:
            assert torch.equal(torch.cat(pieces, dim=1), o_full) and torch.equal(S, S_full)
        else:
            torch.testing.assert_close(torch.cat(pieces, dim=1), o_full, rtol=0, atol=1e-12)
            torch.testing.assert_close(S, S_full, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# gate extremes


@pytest.mark.parametrize("extreme", ["alpha=1", "alpha->0", "beta=0", "beta=2"])
def test_gate_extremes_exact(extreme):
    B, T, H, K, V = 2, 11, 2, 4, 3
    inputs = _inputs(B, T, H, K, V, seed=10)
    with torch.no_grad():
        if extreme == "alpha=1":
            inputs["g"].zero_()
        elif extreme == "alpha->0":
            inputs["g"].fill_(-1e4)
        elif extreme == "beta=0":
            inputs["beta"].zero_()
        else:
            inputs["beta"].fill_(2.0)
    _assert_chunked_equals_recurrent(inputs, None, 4)  # also: everything finite, forward and backward
    q, k, v, g, beta, S0 = (inputs[n].detach() for n in NAMES)
    o, S = gated_delta_chunked(q, k, v, g, beta, chunk_size=4, initial_state=S0)
    scale = K ** -0.5
    if extreme == "alpha->0":  # the state is only the current write: S_t = beta_t k_t v_t^T
        expected = (beta * scale * (q * k).sum(-1))[..., None] * v
        torch.testing.assert_close(o, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(S, beta[:, -1, :, None, None] * k[:, -1, :, :, None] * v[:, -1, :, None, :],
                                   rtol=0, atol=1e-12)
    elif extreme == "beta=0":  # no writes: S_t = e^{sum g} S_0
        decay = torch.exp(torch.cumsum(g, dim=1))  # [B, T, H]
        torch.testing.assert_close(o, decay[..., None] * torch.einsum("bthk,bhkv->bthv", q * scale, S0),
                                   rtol=0, atol=1e-12)
    elif extreme == "beta=2":  # with unit keys and no decay, I - 2 k k^T is a reflection: norms are kept
        o, S = gated_delta_chunked(q, k, torch.zeros_like(v), torch.zeros_like(g), beta, chunk_size=4,
                                   initial_state=S0)
        torch.testing.assert_close(torch.linalg.matrix_norm(S), torch.linalg.matrix_norm(S0), rtol=0, atol=1e-12)
    else:  # alpha = 1 and beta = 0: the state never changes
        o, S = gated_delta_chunked(q, k, v, g, torch.zeros_like(beta), chunk_size=4, initial_state=S0)
        assert torch.equal(S, S0)


# --------------------------------------------------------------------------------------------------
# precision


def test_float32_chunked_close_to_float64_recurrent():
    """Relative RMS error of float32 chunks (L = 64) against the float64 recurrence, over 512 tokens
    with unit keys: observed 1.5e-7 (outputs) and 1.1e-7 (state), as the float32 recurrence itself; bound 1e-5."""
    inputs = {n: t.detach() for n, t in _inputs(1, 512, 2, 32, 32, seed=11, g_min=-0.2).items()}
    o_ref, S_ref = gated_delta_recurrent(*(inputs[n] for n in NAMES[:5]), initial_state=inputs["initial_state"])
    o, S = gated_delta_chunked(*(inputs[n].float() for n in NAMES[:5]), initial_state=inputs["initial_state"].float())
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    for what, a, b in [("o", o, o_ref), ("state", S, S_ref)]:
        rel = float((a.double() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())
        assert rel < 1e-5, f"{what}: float32 relative RMS error {rel:.3g}"


def test_half_inputs_computed_in_float32():
    inputs = {n: t.detach() for n, t in _inputs(1, 40, 2, 8, 8, seed=12).items()}
    half = {n: t.to(torch.bfloat16) for n, t in inputs.items()}
    o, S = gated_delta_chunked(*(half[n] for n in NAMES[:5]), chunk_size=16, initial_state=half["initial_state"])
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    # the same (rounded) inputs in float64: only the float32 arithmetic and the bf16 output rounding differ
    o_ref, S_ref = gated_delta_recurrent(*(half[n].double() for n in NAMES[:5]),
                                         initial_state=half["initial_state"].double())
    torch.testing.assert_close(S.double(), S_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-2, atol=1e-2)


def test_bad_arguments_raise():
    inp = {n: t.detach() for n, t in _inputs(1, 4, 2, 3, 3).items()}
    args = [inp[n] for n in NAMES[:5]]
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_chunked(*args, chunk_size=0)
    with pytest.raises(ValueError, match=r"g and beta"):
        gated_delta_chunked(*args[:3], args[3][..., :1], args[4])
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_recurrent(*args, initial_state=torch.zeros(1, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="reset"):
        gated_delta_recurrent(*args, reset=torch.zeros(1, 4))  # not bool
    with pytest.raises(ValueError, match=r"q, k"):
        gated_delta_chunked(args[0], args[1][..., :2], *args[2:])


# --------------------------------------------------------------------------------------------------
# the FLA adapter, with a fake ``fla`` package whose kernel is our chunked op in FLA's layout


def test_fla_availability_needs_cuda_and_the_import(monkeypatch, request):
    monkeypatch.setitem(sys.modules, "fla", None)  # import fla -> ImportError
    assert gated_delta_cuda._chunk_kernel() is None
    assert not gated_delta_cuda.fla_available("cuda")
    request.getfixturevalue("fake_fla")
    assert gated_delta_cuda._chunk_kernel() is sys.modules["fla.ops.gated_delta_rule"].chunk_gated_delta_rule
    assert not gated_delta_cuda.fla_available("cpu")  # importable, but not on CUDA


def test_fla_honours_resets():
    none = torch.zeros(2, 6, dtype=torch.bool)
    at_start = none.clone()
    at_start[1, 0] = True
    inside = none.clone()
    inside[0, 3] = True
    assert gated_delta_cuda.fla_honours_resets(None)
    assert gated_delta_cuda.fla_honours_resets(none) and gated_delta_cuda.fla_honours_resets(at_start)
    assert not gated_delta_cuda.fla_honours_resets(inside)
    assert gated_delta_cuda.fla_honours_resets(inside[:1])  # batch 1: cu_seqlens


@pytest.mark.parametrize("case", ["no resets", "resets at t=0", "batch 1, resets inside"])
def test_fla_adapter_converts_at_the_boundary(monkeypatch, case, fake_fla):
    calls = fake_fla
    B = 1 if case == "batch 1, resets inside" else 2
    T = 11
    inputs = {n: t.detach().float() for n, t in _inputs(B, T, 2, 4, 5, seed=13).items()}
    reset = torch.zeros(B, T, dtype=torch.bool)
    if case == "resets at t=0":
        reset[1, 0] = True
    elif case == "batch 1, resets inside":
        reset[0, [3, 4, 9]] = True
    args = [inputs[n] for n in NAMES[:5]]
    o, S = gated_delta_cuda.gated_delta_fla(*args, scale=None, chunk_size=4, initial_state=inputs["initial_state"],
                                           reset=reset)
    o_ref, S_ref = gated_delta_chunked(*args, chunk_size=4, initial_state=inputs["initial_state"], reset=reset)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and calls[0]["g_dtype"] == torch.float32 and calls[0]["l2norm"] is False
    if case == "batch 1, resets inside":
        assert calls[0]["cu_seqlens"].tolist() == [0, 3, 4, 9, T]
        assert calls[0]["initial_state"].shape[0] == 4
    else:
        assert calls[0]["cu_seqlens"] is None


def test_fla_adapter_refuses_what_it_cannot_honour(monkeypatch, fake_fla):
    inputs = {n: t.detach().float() for n, t in _inputs(2, 6, 1, 3, 3, seed=14).items()}
    reset = torch.zeros(2, 6, dtype=torch.bool)
    reset[1, 2] = True
    with pytest.raises(ValueError, match="batch size 1"):
        gated_delta_cuda.gated_delta_fla(*(inputs[n] for n in NAMES[:5]), scale=None, reset=reset)
    monkeypatch.setitem(sys.modules, "fla", None)
    monkeypatch.delitem(sys.modules, "fla.ops.gated_delta_rule")
    with pytest.raises(RuntimeError, match="not importable"):
        gated_delta_cuda.gated_delta_fla(*(inputs[n] for n in NAMES[:5]), scale=None)
