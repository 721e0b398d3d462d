"""Shared pieces of the recurrent mixers: segment resets, stable segment sums, the short causal
convolution with its tail, the gated RMSNorm and the time reversal of contexts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from mmgrow.layers.norm import GatedRMSNorm
from mmgrow.layers.reverse import reverse_context, reverse_positions
from mmgrow.layers.short_conv import ShortConvolution
from mmgrow.ops.segments import NOTHING_SEEN, apply_resets, last_segment, reset_mask, segsum
from mmgrow.ops.short_conv import causal_conv_reference
from mmgrow.protocols import PAD_SEGMENT, SeqContext


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_reset_mask_marks_segment_starts_and_the_carried_segment() -> None:
    seg = torch.tensor([[0, 0, 1, 1, PAD_SEGMENT], [3, 3, 3, 4, 4]])
    fresh = reset_mask(seg, None, (2, 5), torch.device("cpu"))
    assert fresh.tolist() == [[True, False, True, False, True], [True, False, False, True, False]]
    carried = reset_mask(seg, torch.tensor([0, 2]), (2, 5), torch.device("cpu"))
    assert carried[:, 0].tolist() == [False, True]
    assert reset_mask(None, torch.tensor([0, NOTHING_SEEN]), (2, 3), torch.device("cpu")).tolist() == \
        [[False, False, False], [True, False, False]]
    assert last_segment(seg, None, 2, torch.device("cpu")).tolist() == [PAD_SEGMENT, 4]
    assert last_segment(None, torch.tensor([5, 6]), 2, torch.device("cpu")).tolist() == [0, 0]


def test_segsum_is_the_decay_between_tokens_even_with_resets() -> None:
    a = -torch.rand(3, 7, dtype=torch.float64, generator=_gen())
    reset = torch.zeros(3, 7, dtype=torch.bool)
    reset[0, 3] = reset[1, 0] = reset[2, 4] = reset[2, 5] = True
    log_decay = apply_resets(a, reset)
    decay = segsum(log_decay).exp()
    for b in range(3):
        for i in range(7):
            for j in range(7):
                expected = 0.0
                if j <= i:
                    expected = float(torch.prod(torch.exp(log_decay[b, j + 1:i + 1])))
                assert abs(float(decay[b, i, j]) - expected) <= 1e-15
    # Gradients through -inf entries stay finite (no -inf - -inf anywhere).
    a.requires_grad_(True)
    segsum(apply_resets(a, reset)).exp().sum().backward()
    assert bool(torch.isfinite(a.grad).all())


def _conv_case(seed: int = 0):
    conv = ShortConvolution(6, kernel_size=4).double()
    u = torch.randn(2, 13, 6, dtype=torch.float64, generator=_gen(seed))
    seg = torch.tensor([[0] * 5 + [1] * 2 + [2] * 6, [0] * 11 + [PAD_SEGMENT] * 2])
    return conv, u, seg


def test_short_conv_equals_the_per_token_loop_and_stops_at_segments() -> None:
    conv, u, seg = _conv_case()
    y, _ = conv(u, seg)
    torch.testing.assert_close(y, F.silu(causal_conv_reference(u, conv.weight, conv.bias, seg)), rtol=0, atol=1e-14)
    y_plain, _ = conv(u, None)
    zeros = torch.zeros(2, 13, dtype=torch.long)
    torch.testing.assert_close(y_plain, F.silu(causal_conv_reference(u, conv.weight, conv.bias, zeros)),
                               rtol=0, atol=1e-14)
    assert not torch.allclose(y, y_plain)  # the segments really cut the filter


@pytest.mark.parametrize("cuts", [[0, 1, 2, 3, 13], [0, 6, 7, 13], list(range(14))])
def test_short_conv_tail_continues_across_calls(cuts: list[int]) -> None:
    conv, u, seg = _conv_case(1)
    y_full, tail_full = conv(u, seg)
    tail = conv.init_tail(2, "cpu", torch.float64)
    outs = []
    for a, b in itertools.pairwise(cuts):
        out, tail = conv(u[:, a:b], seg[:, a:b], tail)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), y_full, rtol=0, atol=1e-14)
    assert torch.equal(tail.inputs, tail_full.inputs) and torch.equal(tail.segment_ids, tail_full.segment_ids)


def test_short_conv_rejects_mismatched_tail() -> None:
    conv, u, seg = _conv_case()
    bad = conv.init_tail(2, "cpu", torch.float64)
    bad.inputs = bad.inputs[:, :2]
    with pytest.raises(ValueError, match="tail"):
        conv(u, seg, bad)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_matches_its_formula_per_group(norm_before_gate: bool) -> None:
    norm = GatedRMSNorm(8, group_size=4, norm_before_gate=norm_before_gate, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8, dtype=torch.float64, generator=_gen(2)) + 0.5)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=_gen(3))
    z = torch.randn(3, 5, 8, dtype=torch.float64, generator=_gen(4))
    y = norm(x, z)
    expected = torch.empty_like(x)
    for g in range(2):
        sl = slice(4 * g, 4 * g + 4)
        h = x[..., sl] if norm_before_gate else x[..., sl] * F.silu(z[..., sl])
        h = h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + 1e-6)
        expected[..., sl] = h * F.silu(z[..., sl]) if norm_before_gate else h
    torch.testing.assert_close(y, expected * norm.weight, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(8, group_size=3)


def test_reverse_context_recounts_positions_per_segment() -> None:
    pos = torch.tensor([[3, 4, 5, 0, 1, 0]])
    seg = torch.tensor([[0, 0, 0, 1, 1, PAD_SEGMENT]])
    ctx = SeqContext(positions=pos, segment_ids=seg, modality_ids=torch.tensor([[0, 1, 2, 3, 4, 5]]))
    rev = reverse_context(ctx)
    assert rev.positions.tolist() == [[0, 0, 1, 3, 4, 5]]
    assert rev.segment_ids.tolist() == [[PAD_SEGMENT, 1, 1, 0, 0, 0]]
    assert rev.modality_ids.tolist() == [[5, 4, 3, 2, 1, 0]]
    assert torch.equal(reverse_positions(rev.positions, rev.segment_ids).flip(1), pos)  # an involution


def test_short_conv_hides_an_older_segment_with_the_same_id_in_the_tail() -> None:
    """Segment ids restart per call: a tail [0, 1, 1] followed by segment 0 must see nothing of it."""
    conv = ShortConvolution(3, kernel_size=4).double()
    u = torch.randn(1, 3, 3, dtype=torch.float64, generator=_gen(5))
    _, tail = conv(u, torch.tensor([[0, 1, 1]]), conv.init_tail(1, "cpu", torch.float64))
    x = torch.randn(1, 2, 3, dtype=torch.float64, generator=_gen(6))
    continued, _ = conv(x, torch.tensor([[0, 0]]), tail)
    fresh, _ = conv(x, torch.tensor([[0, 0]]))
    torch.testing.assert_close(continued, fresh, rtol=0, atol=0)
    unpacked, _ = conv(x, None, tail)  # an unpacked call is segment 0: also a new segment here
    torch.testing.assert_close(unpacked, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_flushes_subnormals_and_keeps_normal_values(dtype: torch.dtype) -> None:
    from mmgrow.ops.segments import decay

    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([0.0, -1.0, math.log(tiny) + 1e-3, math.log(tiny) - 1.0, float("-inf")], dtype=dtype)
    out = decay(x)
    assert torch.equal(out[:3], torch.exp(x[:3])) and bool((out[:3] >= tiny).all())
    assert torch.equal(out[3:], torch.zeros(2, dtype=dtype))  # exp would give a subnormal, then 0
    assert float(torch.exp(x[3])) > 0.0  # ... and plain exp really is subnormal there (the test bites)
