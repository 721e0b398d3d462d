"""ShortConvMixer against a float64 streaming reference, plus the mixer contract of mmgrow.

Run from this folder (``pytest``) or the repository root (``pytest plugins/mmgrow-example``);
the package does not need to be installed for these tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MixerCapabilityError, SeqContext
from torch.nn import functional as F

from mmgrow_example.short_conv import ShortConvMixer, ShortConvState

DIM = 6


def streaming_reference(mixer: ShortConvMixer, x: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """float64 reference: read each row left to right, keeping a FIFO of the last K conv inputs
    that is emptied whenever a new segment starts; padding tokens output 0.

    ``x [B, T, D]``, ``segment_ids [B, T]`` -> ``[B, T, D]``.
    """
    w_in, w_gate, w_out = (m.weight.detach().double() for m in (mixer.in_proj, mixer.gate_proj, mixer.out_proj))
    kernel = mixer.conv_weight.detach().double()  # [C, K], column j weighs the input j steps back
    x = x.detach().double()
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        fifo: list[torch.Tensor] = []  # most recent first
        current = None
        for t in range(x.shape[1]):
            seg = int(segment_ids[b, t])
            if seg != current:
                fifo, current = [], seg
            if seg == PAD_SEGMENT:
                continue
            fifo = ([x[b, t] @ w_in.T] + fifo)[: mixer.kernel_size]
            conv = sum(kernel[:, j] * u for j, u in enumerate(fifo))
            out[b, t] = (conv * F.silu(x[b, t] @ w_gate.T)) @ w_out.T
    return out


def packed_context() -> tuple[SeqContext, torch.Tensor]:
    """Two rows: three packed examples, and two examples followed by padding."""
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1, PAD_SEGMENT, PAD_SEGMENT]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4, 0, 0]])
    return SeqContext(positions=pos, segment_ids=seg), seg


def make_mixer(kernel_size: int = 4, dtype: torch.dtype = torch.float64) -> ShortConvMixer:
    torch.manual_seed(kernel_size)
    return ShortConvMixer(dim=DIM, kernel_size=kernel_size).to(dtype)


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
def test_packed_forward_matches_streaming_reference(kernel_size):
    mixer = make_mixer(kernel_size)
    ctx, seg = packed_context()
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    y, _ = mixer(x, ctx)
    torch.testing.assert_close(y, streaming_reference(mixer, x, seg), rtol=1e-12, atol=1e-12)
    assert torch.equal(y[1, 8:], torch.zeros(2, DIM, dtype=torch.float64)), "padding outputs 0"


def test_unpacked_forward_matches_reference_and_gradients():
    mixer = make_mixer(3)
    x = torch.randn(2, 7, DIM, dtype=torch.float64, requires_grad=True)
    y, _ = mixer(x, SeqContext.simple(2, 7))
    ref = streaming_reference(mixer, x, torch.zeros(2, 7, dtype=torch.long))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    # Gradients against autograd through a direct float64 re-implementation of the equation.
    grad_out = torch.randn_like(y)
    params = [x, mixer.conv_weight, mixer.in_proj.weight, mixer.gate_proj.weight, mixer.out_proj.weight]
    got = torch.autograd.grad((y * grad_out).sum(), params)
    u = x @ mixer.in_proj.weight.T
    shifted = [F.pad(u, (0, 0, j, 0))[:, :7] for j in range(3)]  # u_{t-j}, zero before the start
    conv = sum(mixer.conv_weight[:, j] * s for j, s in enumerate(shifted))
    direct = (conv * F.silu(x @ mixer.gate_proj.weight.T)) @ mixer.out_proj.weight.T
    want = torch.autograd.grad((direct * grad_out).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_packed_row_equals_segments_run_separately():
    mixer = make_mixer(4, torch.float32)
    ctx, seg = packed_context()
    x = torch.randn(2, 10, DIM)
    y, _ = mixer(x, ctx)
    for b in range(2):
        for s in seg[b].unique().tolist():
            if s == PAD_SEGMENT:
                continue
            idx = (seg[b] == s).nonzero().squeeze(1)
            alone, _ = mixer(x[b:b + 1, idx], SeqContext.simple(1, len(idx)))
            torch.testing.assert_close(y[b:b + 1, idx], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("split", [1, 3, 5, 6, 9])
def test_chunked_prefill_with_state_equals_one_pass(split):
    mixer = make_mixer(4)
    ctx, _ = packed_context()
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    full, _ = mixer(x, ctx)
    first, state = mixer(x[:, :split], ctx.slice(0, split))
    second, _ = mixer(x[:, split:], ctx.slice(split, 10), state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-12, atol=1e-12)


def test_token_by_token_decoding_equals_prefill():
    mixer = make_mixer(4)
    x = torch.randn(3, 8, DIM, dtype=torch.float64)
    ctx = SeqContext.simple(3, 8)
    prefill, final_state = mixer(x, ctx)
    state = mixer.init_state(3, "cpu", torch.float64)
    steps = []
    for t in range(8):
        y_t, state = mixer(x[:, t:t + 1], ctx.slice(t, t + 1), state)
        steps.append(y_t)
    torch.testing.assert_close(torch.cat(steps, 1), prefill, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.inputs, final_state.inputs, rtol=0, atol=0)


def test_no_future_leakage():
    mixer = make_mixer(4)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    y, _ = mixer(x, SeqContext.simple(2, 9))
    for t in range(8):
        perturbed = x.clone()
        perturbed[:, t + 1:] += torch.randn_like(perturbed[:, t + 1:])
        y_p, _ = mixer(perturbed, SeqContext.simple(2, 9))
        assert torch.equal(y_p[:, : t + 1], y[:, : t + 1]), f"output at <= {t} changed with future inputs"
        assert not torch.allclose(y_p[:, t + 1], y[:, t + 1]), "the current token must matter"


def test_unsupported_context_features_raise():
    mixer = make_mixer(4, torch.float32)
    x = torch.randn(1, 5, DIM)
    with pytest.raises(MixerCapabilityError, match="causal-only"):
        mixer(x, SeqContext.simple(1, 5, causal=False))
    with pytest.raises(MixerCapabilityError, match="window=3"):
        mixer(x, SeqContext.simple(1, 5, window=3))
    blocks = torch.tensor([[0, 0, NO_BLOCK, NO_BLOCK, NO_BLOCK]])
    with pytest.raises(MixerCapabilityError, match="block_ids"):
        mixer(x, SeqContext(positions=torch.arange(5)[None], block_ids=blocks))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"kernel_size must be a positive int, got 0"):
        ShortConvMixer(dim=DIM, kernel_size=0)
    mixer = make_mixer(4, torch.float32)
    wrong = mixer.init_state(2, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"state.inputs must be \[1, 3, 6\].*got \[2, 3, 6\]"):
        mixer(torch.randn(1, 5, DIM), SeqContext.simple(1, 5), wrong)
    with pytest.raises(ValueError, match=r"expected x of shape \[B, T, 6\]"):
        mixer(torch.randn(1, 5, DIM + 1), SeqContext.simple(1, 5))


def test_state_size_and_residual_outputs():
    mixer = make_mixer(4, torch.float32)
    assert mixer.state_size(10) == mixer.state_size(10_000) == 3 * DIM
    assert mixer.init_state(1, "cpu", torch.float32).inputs.numel() == mixer.state_size(10)
    assert mixer.residual_outputs() == [mixer.out_proj]
    with torch.no_grad():
        mixer.out_proj.weight.zero_()
    y, _ = mixer(torch.randn(2, 5, DIM), SeqContext.simple(2, 5))
    assert torch.equal(y, torch.zeros_like(y)), "zeroing residual_outputs() must silence the mixer"
    assert isinstance(mixer.init_state(1, "cpu", torch.float32), ShortConvState)


def test_own_conformance_checks_pass():
    checks = ShortConvMixer.conformance_checks()
    assert checks
    for check in checks:
        check()


def test_mmgrow_conformance_suite_passes():
    from mmgrow.testing.conformance import run_checks

    results = run_checks("mixers", ShortConvMixer)
    assert results
    failed = [f"{r.name}: {r.message}" for r in results if not r.passed]
    assert not failed, failed


def test_entry_point_declaration_resolves_to_the_mixer():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    target = meta["project"]["entry-points"]["mmgrow.mixers"]["short_conv"]
    module, _, attr = target.partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is ShortConvMixer
