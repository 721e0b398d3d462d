"""Cross-attention from the sequence to conditioning tokens (text-encoder or LLM embeddings).

.. math::

    q = x W_q + b_q, \\quad k = \\operatorname{norm}(c) W_k + b_k, \\quad v = \\operatorname{norm}(c) W_v + b_v,
    \\quad y = \\operatorname{softmax}\\!\\big(q k^\\top / \\sqrt{hd} + \\log M\\big) \\, v \\, W_o + b_o

``x [B, T, D]`` are the (normed) hidden states, ``c [B, S, C]`` the conditioning tokens in their own
width ``C`` (the key/value projections are the connector from the encoder's width to the model's),
``M [B, S]`` marks valid conditioning tokens. No positions: the condition is a set seen whole by
every token. A row whose condition is entirely masked out gets attention output 0, so the layer
returns the output projection's bias ``b_o`` alone -- the same constant for every unconditioned
token, on every backend (the unconditional branch of classifier-free guidance).

Biases are on by default, as in the DiT / PixArt / Open-Sora blocks this layer mirrors; function-
preserving growth must zero the output projection's weight *and* bias (:meth:`residual_outputs`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmgrow.layers.attention import masked_sdpa
from mmgrow.layers.norm import RMSNorm


class CrossAttention(nn.Module):
    """``x [B, T, D], condition [B, S, C], mask [B, S] | [B, T, S] | None -> y [B, T, D]``.

    A ``[B, T, S]`` mask gives each token its own set of conditioning tokens (packed rows: a token
    sees only its own example's condition); a token with none gets the bias ``b_o`` alone.

    Args:
        dim: model width ``D``.
        cond_dim: width ``C`` of the conditioning tokens.
        num_heads: attention heads ``H`` (``head_dim = D // H``).
        bias: biases on all four projections.
        condition_norm: RMSNorm on the conditioning tokens before the key/value projections (LLM
            hidden states can be large; a frozen encoder's scale is not the model's business).
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int = 4, bias: bool = True,
                 condition_norm: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"CrossAttention: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if cond_dim < 1:
            raise ValueError(f"CrossAttention: cond_dim must be positive, got {cond_dim}")
        self.dim = dim
        self.cond_dim = cond_dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.condition_norm = RMSNorm(cond_dim) if condition_norm else None
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(cond_dim, dim, bias=bias)
        self.v_proj = nn.Linear(cond_dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, cond_dim={self.cond_dim}, num_heads={self.num_heads}"

    def forward(self, x: Tensor, condition: Tensor, mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        if condition.dim() != 3 or condition.shape[0] != B or condition.shape[2] != self.cond_dim:
            raise ValueError(f"CrossAttention: condition must be [B={B}, S, C={self.cond_dim}], got "
                             f"{tuple(condition.shape)}")
        S = condition.shape[1]
        if mask is not None and (mask.shape not in ((B, S), (B, T, S)) or mask.dtype != torch.bool):
            raise ValueError(f"CrossAttention: condition mask must be bool [B={B}, S={S}] (or per token "
                             f"[B, T={T}, S]), got {mask.dtype} {tuple(mask.shape)}")
        c = condition.to(x.dtype)
        if self.condition_norm is not None:
            c = self.condition_norm(c)
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)
        k = self.k_proj(c).view(B, S, H, hd).transpose(1, 2)
        v = self.v_proj(c).view(B, S, H, hd).transpose(1, 2)
        attn_mask = None if mask is None else mask if mask.dim() == 3 else mask[:, None, :].expand(B, T, S)
        out = masked_sdpa(q, k, v, attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.dim))

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.out_proj]
