"""Cross-attention on conditioning tokens and adaLN modulation, against float64 references written
out from their equations, forward and backward; their errors; their place in the block."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mmgrow.layers.attention import FullAttention
from mmgrow.layers.cross_attention import CrossAttention
from mmgrow.models.backbone import Backbone
from mmgrow.models.modulation import AdaLNSingle, AdaLNZero, ModulationConfig
from mmgrow.protocols import SeqContext

ATTN = functools.partial(FullAttention, num_heads=4)


def _reference_cross(layer: CrossAttention, x, c, mask):
    """softmax(q k^T / sqrt(hd) + log M) v W_o + b_o, head by head, with plain tensor ops."""
    if layer.condition_norm is not None:
        c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + layer.condition_norm.eps) * layer.condition_norm.weight
    q, k, v = layer.q_proj(x), layer.k_proj(c), layer.v_proj(c)
    H, hd = layer.num_heads, layer.head_dim
    outs = []
    for h in range(H):
        s = slice(h * hd, (h + 1) * hd)
        scores = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd)  # [B, T, S]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no valid token -> 0
        outs.append(p @ v[..., s])
    return layer.out_proj(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("with_mask", [False, True])
def test_cross_attention_matches_reference_forward_and_backward(with_mask):
    torch.manual_seed(0)
    layer = CrossAttention(32, cond_dim=12, num_heads=4).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool) if with_mask else None
    y = layer(x, c, mask)
    ref = _reference_cross(layer, x, c, mask)
    if with_mask:  # the row with no caption token adds nothing (only the output bias remains)
        assert torch.equal(y[2], layer.out_proj.bias.expand(7, -1))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), (x, c, *layer.parameters()))
    ref_grads = torch.autograd.grad((ref * w).sum(), (x, c, *layer.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_cross_attention_errors_name_the_problem():
    layer = CrossAttention(32, cond_dim=12, num_heads=4)
    with pytest.raises(ValueError, match=r"condition must be \[B=2, S, C=12\]"):
        layer(torch.randn(2, 3, 32), torch.randn(2, 4, 10))
    with pytest.raises(ValueError, match="condition mask must be bool"):
        layer(torch.randn(2, 3, 32), torch.randn(2, 4, 12), torch.ones(2, 4))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CrossAttention(30, cond_dim=12, num_heads=4)


@pytest.mark.parametrize("kind", ["adaln_zero", "adaln_single"])
def test_modulated_block_matches_its_equation(kind):
    """x1 = x + g1 * mixer(norm1(x) (1 + s1) + b1); x2 = x1 + g2 * mlp(norm2(x1) (1 + s2) + b2)."""
    torch.manual_seed(0)
    bb = Backbone(32, 1, ATTN, modulation={"kind": kind, "cond_dim": 16}).double().eval()
    block = bb.blocks[0]
    with torch.no_grad():
        for p in block.modulation.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    width = block.modulation.timestep_width
    ctx = SeqContext.simple(2, 6, causal=False)
    ctx.timestep = torch.randn(2, width, dtype=torch.float64)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    if kind == "adaln_zero":
        mod = block.modulation.proj(torch.nn.functional.silu(ctx.timestep)).view(2, 2, 3, 32)
    else:
        mod = ctx.timestep.view(2, 2, 3, 32) + block.modulation.table
    (b1, s1, g1), (b2, s2, g2) = mod[:, 0].unbind(1), mod[:, 1].unbind(1)
    h = block.norm1(x) * (1 + s1[:, None]) + b1[:, None]
    x1 = x + g1[:, None] * block.mixer(h, ctx)[0]
    h = block.norm2(x1) * (1 + s2[:, None]) + b2[:, None]
    expected = x1 + g2[:, None] * block.mlp(h)
    torch.testing.assert_close(block(x, ctx)[0], expected, rtol=1e-13, atol=1e-13)


def test_modulation_errors():
    ctx = SeqContext.simple(2, 4, causal=False)
    with pytest.raises(ValueError, match="ctx.timestep is None"):
        AdaLNZero(8, 16)(ctx)
    ctx.timestep = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"ctx.timestep must be \[B=2, 48\]"):
        AdaLNSingle(8)(ctx)
    with pytest.raises(ValueError, match="kind must be one of"):
        ModulationConfig(kind="film").build(8)


def test_cross_attention_layers_and_sources_from_config():
    bb = Backbone(32, 3, ATTN, cross_attention={"cond_dim": 8, "num_heads": 2, "layers": [-1], "source": "llm",
                                                "gated": True})
    assert [len(b.cross_attentions) for b in bb.blocks] == [0, 0, 1]
    branch = bb.blocks[2].cross_attentions[0]
    assert branch.source == "llm" and torch.equal(branch.gate, torch.zeros(32))
    ctx = SeqContext.simple(1, 4)
    with pytest.raises(ValueError, match="has no entry 'llm'"):
        bb(torch.randn(1, 4, 32), ctx)
    ctx.conditions = {"llm": (torch.randn(1, 3, 8), None)}
    x = torch.randn(1, 4, 32)
    ref = Backbone(32, 3, ATTN)
    ref.load_state_dict(bb.state_dict(), strict=False)
    assert torch.equal(bb(x, ctx)[0], ref(x, ctx)[0])  # gate tanh(0) = 0: the branch adds exactly 0
