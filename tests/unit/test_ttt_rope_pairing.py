"""RoPE pairing option: ``"interleaved"`` = ``"half"`` up to a per-head permutation, a hand-computed
rotation, and a TTT-Linear layer loaded from ttt-lm-pytorch's weight layout (built here, not downloaded)
reproducing a float64 reference of that layer written from its equations (mixers-and-ttt.md §2.1-2.2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from mmgrow.layers.rope import RotaryEmbedding
from mmgrow.layers.ttt import TTTLinear, from_ttt_lm_pytorch
from mmgrow.protocols import SeqContext

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_interleaved_equals_half_after_the_per_head_permutation() -> None:
    hd = 8
    q = torch.randn(2, 3, 5, hd, generator=gen(0), dtype=F64)
    k = torch.randn(2, 3, 5, hd, generator=gen(1), dtype=F64)
    positions = torch.tensor([[0, 1, 2, 7, 40], [3, 4, 5, 6, 1000]])
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])  # P: 2m -> m, 2m+1 -> m + hd/2
    qi, ki = RotaryEmbedding(hd, pairing="interleaved")(q, k, positions)
    qh, kh = RotaryEmbedding(hd, pairing="half")(q[..., perm], k[..., perm], positions)
    assert torch.equal(qi[..., perm], qh) and torch.equal(ki[..., perm], kh)
    assert (qi - RotaryEmbedding(hd)(q, k, positions)[0]).abs().max() > 0.1  # the two layouts differ


def test_hand_computed_rotation_of_both_pairings() -> None:
    """hd = 4, x = e_0 at position 1: pair 0 has omega_0 = 1, so e_0 -> cos 1 e_0 + sin 1 e_partner,
    the partner being coordinate 1 (interleaved) or 2 (half)."""
    x = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64).reshape(1, 1, 1, 4)
    pos = torch.tensor([[1]])
    c, s = math.cos(1.0), math.sin(1.0)
    yi, _ = RotaryEmbedding(4, pairing="interleaved")(x, x, pos)
    yh, _ = RotaryEmbedding(4, pairing="half")(x, x, pos)
    assert torch.allclose(yi.flatten(), torch.tensor([c, s, 0.0, 0.0], dtype=F64), atol=1e-15)
    assert torch.allclose(yh.flatten(), torch.tensor([c, 0.0, s, 0.0], dtype=F64), atol=1e-15)


def test_unknown_pairing_is_refused() -> None:
    with pytest.raises(ValueError, match="pairing"):
        RotaryEmbedding(8, pairing="zigzag")
    with pytest.raises(ValueError, match="rope_pairing"):
        TTTLinear(dim=16, num_heads=2, rope_pairing="zigzag")


# ---------------------------------------------------------------------------------------------------
# A float64 reference of ttt-lm-pytorch's TTT-Linear layer, per token, from the equations
# ---------------------------------------------------------------------------------------------------


def peer_layout_weights(D: int, H: int, b: int, seed: int) -> dict[str, Tensor]:
    """Random weights with ttt-lm-pytorch's parameter names and shapes (nn.Linear weights [out, in])."""
    d = D // H
    g = gen(seed)

    def r(*shape: int, scale: float) -> Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=F64)

    return {"q_proj.weight": r(D, D, scale=D ** -0.5), "k_proj.weight": r(D, D, scale=D ** -0.5),
            "v_proj.weight": r(D, D, scale=D ** -0.5), "o_proj.weight": r(D, D, scale=D ** -0.5),
            "W1": r(H, d, d, scale=0.3), "b1": r(H, 1, d, scale=0.1),
            "learnable_ttt_lr_weight": r(H, 1, D, scale=0.5), "learnable_ttt_lr_bias": r(H, 1, scale=0.5),
            "learnable_token_idx": r(b, scale=0.1), "ttt_norm_weight": 1.0 + r(H, d, scale=0.2),
            "ttt_norm_bias": r(H, d, scale=0.2), "post_norm.weight": 1.0 + r(D, scale=0.2),
            "post_norm.bias": r(D, scale=0.2)}


def interleaved_rope(x: Tensor, slot: int, theta: float = 10000.0) -> Tensor:
    """One head vector ``x [d]``: pairs ``(2m, 2m+1)`` rotated by ``slot * theta^(-2m/d)``."""
    d = x.shape[-1]
    out = x.clone()
    for m in range(d // 2):
        a, c = x[2 * m], x[2 * m + 1]
        angle = slot * theta ** (-2.0 * m / d)
        out[2 * m] = a * math.cos(angle) - c * math.sin(angle)
        out[2 * m + 1] = a * math.sin(angle) + c * math.cos(angle)
    return out


def head_layer_norm(z: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-6) -> Tensor:
    mu = z.mean()
    var = ((z - mu) ** 2).mean()
    return gamma * (z - mu) / torch.sqrt(var + eps) + beta


def reference_ttt_linear(x: Tensor, w: dict[str, Tensor], H: int, b: int, base_lr: float = 1.0) -> Tensor:
    """``x [T, D]`` (T a multiple of b) -> ``[T, D]``: projections, interleaved RoPE at ``t % b``, per
    mini-batch every token's gradient of ``0.5 ||LN(k W + b) - (v - k)||^2`` at ``W_i`` (autograd), token
    ``t``'s weights ``W_i - tok_t sum_{s<=t} eta_s grad_s`` with ``tok_t = max(0, 1/(t+1) + delta_t)`` and
    ``eta_s = base_lr sigmoid(w_h . x_s + c_h) / d``, output ``q + LN(q W_t + b_t)``; the next mini-batch
    starts from the last token's weights; then post-norm LayerNorm(D) and o_proj."""
    T, D = x.shape
    d = D // H
    q_all, k_all, v_all = (x @ w[f"{n}_proj.weight"].T for n in "qkv")
    out = torch.zeros(T, D, dtype=F64)
    for h in range(H):
        W, bias = w["W1"][h].clone(), w["b1"][h, 0].clone()
        gamma, beta = w["ttt_norm_weight"][h], w["ttt_norm_bias"][h]
        cols = slice(h * d, (h + 1) * d)
        for start in range(0, T, b):
            grads_w, grads_b = [], []
            for s in range(start, start + b):
                k = interleaved_rope(k_all[s, cols], s % b)
                target = v_all[s, cols] - k
                Wp, bp = W.clone().requires_grad_(True), bias.clone().requires_grad_(True)
                loss = 0.5 * ((head_layer_norm(k @ Wp + bp, gamma, beta) - target) ** 2).sum()
                gw, gb = torch.autograd.grad(loss, [Wp, bp])
                eta = base_lr * torch.sigmoid(x[s] @ w["learnable_ttt_lr_weight"][h, 0]
                                              + w["learnable_ttt_lr_bias"][h, 0]) / d
                grads_w.append(eta * gw)
                grads_b.append(eta * gb)
                t = s - start
                tok = max(0.0, 1.0 / (t + 1) + float(w["learnable_token_idx"][t]))
                W_t = W - tok * sum(grads_w)
                b_t = bias - tok * sum(grads_b)
                q = interleaved_rope(q_all[s, cols], s % b)
                out[s, cols] = q + head_layer_norm(q @ W_t + b_t, gamma, beta)
            W, bias = W_t, b_t
    return F.layer_norm(out, (D,), w["post_norm.weight"], w["post_norm.bias"], eps=1e-6) @ w["o_proj.weight"].T


def test_ttt_linear_with_ttt_lm_pytorch_weights_matches_its_reference() -> None:
    D, H, b, T = 16, 2, 4, 12
    weights = peer_layout_weights(D, H, b, seed=3)
    x = torch.randn(1, T, D, generator=gen(4), dtype=F64)
    expected = reference_ttt_linear(x[0], weights, H, b)

    def ours(pairing: str) -> Tensor:
        layer = TTTLinear(dim=D, num_heads=H, mini_batch_size=b, rope_pairing=pairing).to(F64)
        layer.load_state_dict(from_ttt_lm_pytorch(weights, H))
        with torch.no_grad():
            return layer(x, SeqContext.simple(1, T))[0][0]

    rel = ((ours("interleaved") - expected).norm() / expected.norm()).item()
    assert rel <= 1e-10
    rel_half = ((ours("half") - expected).norm() / expected.norm()).item()
    assert rel_half > 1e-3  # the default pairing does not reproduce their layout


def test_converter_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="conv_q.weight"):
        from_ttt_lm_pytorch({"conv_q.weight": torch.zeros(1)}, 2)
