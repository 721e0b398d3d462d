"""Diffusion-time conditioning of the unified model: the timestep embedding, the latent adapters and
the modulated final layer of a DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

Time runs over ``t in [0, 1]`` (flow matching: ``t = 0`` noise, ``t = 1`` data).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmgrow.models.modulation import modulate


def sinusoidal_features(t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """``t [B]`` -> ``[B, dim]``: ``[cos(s t w_0) .. cos(s t w_{h-1}), sin(s t w_0) .. sin(s t w_{h-1})]``
    with ``h = dim / 2`` and ``w_i = max_period^(-i / h)`` (the transformer's position features of
    ``s t``; ``s = 1000`` spreads ``[0, 1]`` over the frequencies as DDPM's integer steps did)."""
    if dim % 2:
        raise ValueError(f"sinusoidal_features: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``t [B]`` in ``[0, 1]`` -> ``[B, out_dim]``: ``Linear(SiLU(Linear(sinusoidal(t))))`` (DiT's
    ``TimestepEmbedder``), optionally followed by ``Linear(SiLU(.))`` to ``width`` when the blocks read a
    wider vector than ``out_dim`` (adaLN-single's shared ``[B, 6 D]`` projection)."""

    def __init__(self, out_dim: int, freq_dim: int = 256, width: int | None = None) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.shared = None if width in (None, out_dim) else nn.Sequential(nn.SiLU(), nn.Linear(out_dim, width))

    def forward(self, t: Tensor) -> Tensor:
        if t.dim() != 1:
            raise ValueError(f"TimestepEmbedding: expected timesteps t [B], got shape {tuple(t.shape)}")
        emb = self.mlp(sinusoidal_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))
        return emb if self.shared is None else self.shared(emb)


class LatentHead(nn.Linear):
    """``h [..., D] -> [..., C]``: the velocity (or noise) prediction of a continuous modality.
    Zero-initialised, as DiT's final linear layer, so an untrained model predicts 0."""

    def init_weights(self, init_std: float | None = None) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class FinalModulation(nn.Module):
    """DiT's final adaLN: ``h -> h (1 + s) + b`` with ``(b, s) = Linear(SiLU(ctx.timestep))``, zero-initialised
    (the identity at initialisation). ``h [B, T, D]``, ``timestep [B, W]``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 2 * dim)
        self.init_weights()

    def init_weights(self, init_std: float | None = None) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor, timestep: Tensor) -> Tensor:
        shift, scale = self.proj(F.silu(timestep)).to(h.dtype).chunk(2, dim=-1)
        return modulate(h, shift, scale)
