"""RoPE: complex-number reference, the relative-position property, theta changes, angle precision."""

from __future__ import annotations

import pytest
import torch

from mmgrow.layers.attention import FullAttention
from mmgrow.layers.rope import RotaryEmbedding


def complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Reference: halves (a, b) as z = a + ib, multiplied by exp(i * p * theta^(-2m/hd)), complex128."""
    hd = x.shape[-1]
    a, b = x.double().chunk(2, dim=-1)
    z = torch.complex(a, b)
    m = torch.arange(hd // 2, dtype=torch.float64)
    angle = positions.double()[:, None, :, None] * theta ** (-2.0 * m / hd)
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((rotated.real, rotated.imag), dim=-1)


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_matches_complex_reference_float64(theta: float) -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, theta=theta)
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 1, 5, 8, dtype=torch.float64)
    positions = torch.randint(0, 5000, (2, 5))
    q_rot, k_rot = rope(q, k, positions)
    torch.testing.assert_close(q_rot, complex_rope(q, positions, theta), rtol=0, atol=1e-12)
    torch.testing.assert_close(k_rot, complex_rope(k, positions, theta), rtol=0, atol=1e-12)


def test_dot_product_depends_only_on_position_difference() -> None:
    torch.manual_seed(1)
    rope = RotaryEmbedding(16)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(p_q: int, p_k: int) -> float:
        q_rot, _ = rope(q, q, torch.tensor([[p_q]]))
        _, k_rot = rope(k, k, torch.tensor([[p_k]]))
        return float((q_rot * k_rot).sum())

    for p_q, p_k in [(3, 1), (10, 0), (7, 7), (0, 5)]:
        for shift in (1, 37, 1000):
            assert score(p_q + shift, p_k + shift) == pytest.approx(score(p_q, p_k), abs=1e-10)
    # ... and it does depend on the difference (so the check above is not vacuous)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3


def test_norm_preserved_and_position_zero_is_identity() -> None:
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    out, _ = rope(x, x, torch.tensor([[0, 1, 2, 3]]))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])


def test_half_precision_uses_float32_angles() -> None:
    """At positions around 3000, bf16 angles would be off by radians; float32 angles keep the
    rotated bf16 vector within bf16 rounding of the exact rotation."""
    torch.manual_seed(2)
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 1, 6, 8).to(torch.bfloat16)
    positions = torch.tensor([[3001, 3003, 3005, 3007, 3011, 3013]])
    out, _ = rope(x, x, positions)
    assert out.dtype == torch.bfloat16
    err = (out.double() - complex_rope(x.double(), positions, 10000.0)).abs().max()
    assert err < 0.05, f"bf16 RoPE off by {float(err)}"


def test_theta_is_changeable_and_not_persistent() -> None:
    torch.manual_seed(3)
    attn = FullAttention(dim=16, num_heads=2).double()
    assert not any("rope" in key for key in attn.state_dict())
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    from mmgrow.protocols import SeqContext

    ctx = SeqContext.simple(1, 6, offset=50)
    before, _ = attn(x, ctx)
    attn.rope_theta = 1e6
    assert attn.rope.theta == 1e6
    after, _ = attn(x, ctx)
    assert (before - after).abs().max() > 1e-6
    with pytest.raises(ValueError, match="rope_theta must be positive"):
        attn.rope_theta = 0


def test_errors() -> None:
    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryEmbedding(7)
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"positions must be \[B, T\] = \(1, 4\)"):
        rope(x, x, torch.zeros(1, 3, dtype=torch.long))
