"""Rotary position embedding (RoPE, Su et al. 2021, arXiv 2104.09864) from ``ctx.positions``.

Each head vector ``x [hd]`` is read as ``hd/2`` complex numbers ``z_m = a_m + i b_m``,
``m = 0 .. hd/2 - 1``, and rotated by the token's position ``p``:

.. math::

    z_m \\leftarrow z_m \\, e^{i p \\omega_m}, \\qquad \\omega_m = \\theta^{-2m / hd}

so ``<RoPE(q, p), RoPE(k, p')>`` depends on ``p - p'`` only. Which coordinates form a pair is the
``pairing``:

* ``"half"`` (default): ``(a_m, b_m) = (x[m], x[m + hd/2])``, the "rotate_half" layout of GPT-NeoX and
  Hugging Face ``transformers`` (and of every mmgrow checkpoint);
* ``"interleaved"``: ``(a_m, b_m) = (x[2m], x[2m + 1])``, the layout of the original RoFormer / Meta
  LLaMA checkpoints, EasyLM / ttt-lm-jax and ttt-lm-pytorch (which permutes to half, rotates, and
  permutes back: ``permute_qk`` / ``undo_permute_qk``).

The two are the same map up to a fixed permutation of each head's coordinates, ``P: x[2m] -> x[m],
x[2m + 1] -> x[m + hd/2]``: ``RoPE_interleaved(x) = P^-1 RoPE_half(P x)``. Converting weights between
layouts therefore means permuting the rows of every projection that feeds q and k (and everything that
shares their coordinates; for TTT that is the whole per-head coordinate system, see
:mod:`mmgrow.layers.ttt`). Positions come from the context (they
restart per packed example and continue across a KV cache), never from the tensor index.

``theta`` is a plain attribute, recomputed into frequencies on every call (``hd/2`` numbers), so
progressive context extension can raise it between stages (LWM: 1M -> 10M -> 25M -> 50M) without a
stale buffer in a checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PAIRINGS = ("half", "interleaved")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``q [B, H, T, hd]`` and ``k [B, Hk, T, hd]`` at ``positions [B, T]``.

    The angles ``p * omega`` are computed in float32 (float64 when the inputs are float64, so the
    float64 oracle tests stay exact), never in bf16/fp16: half precision cannot even represent
    positions above 256 (bf16) exactly.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, pairing: str = "half") -> None:
        super().__init__()
        if pairing not in PAIRINGS:
            raise ValueError(f"RotaryEmbedding: pairing must be one of {PAIRINGS}, got {pairing!r}")
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        if theta <= 0:
            raise ValueError(f"RotaryEmbedding: theta must be positive, got {theta}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.pairing = pairing

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}, pairing={self.pairing}"

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of the angles, each ``[B, 1, T, hd/2]`` in ``dtype``."""
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        m = torch.arange(self.head_dim // 2, device=positions.device, dtype=angle_dtype)
        omega = self.theta ** (-2.0 * m / self.head_dim)
        angles = positions.to(angle_dtype)[:, None, :, None] * omega  # [B, 1, T, hd/2]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x [B, H, T, hd]`` rotated: ``(a, b) -> (a cos - b sin, a sin + b cos)`` per pair."""
        if self.pairing == "interleaved":
            pairs = x.unflatten(-1, (self.head_dim // 2, 2))
            a, b = pairs[..., 0], pairs[..., 1]
            return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding: expected head_dim {self.head_dim}, got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}")
        if positions.shape != (q.shape[0], q.shape[2]):
            raise ValueError(f"RotaryEmbedding: positions must be [B, T] = {(q.shape[0], q.shape[2])}, "
                             f"got {tuple(positions.shape)}")
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
