"""Small convolutional video autoencoder shared by the learned video codecs (``vq``, ``latent``).

Frames are coded independently by a 2-D conv net (as LWM's per-frame VQGAN, at toy scale)::

    encoder  [B, F, 3, H, W] -> conv3x3 -> L x (stride-2 conv4x4, residual block) -> [temporal pair merge]
             -> GroupNorm, SiLU, conv1x1 -> [B, F', C, H / 2^L, W / 2^L]
    decoder  [B, F', C, h, w] -> conv3x3 -> [temporal pair split] -> residual block
             -> L x (nearest x2, conv3x3, residual block but after the last) -> GroupNorm, SiLU, conv3x3
             -> [B, F, 3, H, W]

Residual blocks run below full resolution only: on a CPU the full-resolution convolutions dominate.

Residual block: ``x + conv(SiLU(GN(conv(SiLU(GN(x))))))``. With ``temporal_downsample`` consecutive
frame pairs ``(2t, 2t+1)`` are merged by a learned 1x1 conv over their concatenated features
(a stride-2, kernel-2 convolution over time; ``F' = F / 2``) and split back by its transpose.
Pixels enter as floats in ``[-1, 1]`` (:func:`video_to_unit`) and leave through :func:`unit_to_video`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 when the channels allow it (a common small-net choice), else a divisor."""
    return math.gcd(channels, 8)


class ResidualBlock(nn.Module):
    """``x + conv3x3(SiLU(GN(conv3x3(SiLU(GN(x))))))`` on ``[N, C, H, W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3 (avoids the checkerboard of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvVideoAutoencoder(nn.Module):
    """Per-frame conv encoder/decoder with optional temporal pair merging (module doc).

    Args:
        latent_channels: ``C`` of the latent grid (VQ code width, or continuous latent channels).
        levels: ``L`` spatial halvings (downsample factor ``2**L``).
        hidden: conv width.
        temporal_downsample: merge frame pairs (``F' = F / 2``; ``F`` must be even).
    """

    def __init__(self, latent_channels: int, levels: int = 2, hidden: int = 32,
                 temporal_downsample: bool = False) -> None:
        super().__init__()
        for name, value, low in (("latent_channels", latent_channels, 1), ("levels", levels, 0),
                                 ("hidden", hidden, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ConvVideoAutoencoder: {name} must be an int >= {low}, got {value!r}")
        self.latent_channels, self.levels, self.hidden = latent_channels, levels, hidden
        self.temporal_downsample = bool(temporal_downsample)
        down: list[nn.Module] = [nn.Conv2d(3, hidden, 3, padding=1)]
        for _ in range(levels):
            down += [nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), ResidualBlock(hidden)]
        self.encoder = nn.Sequential(*down)
        self.encoder_out = nn.Sequential(nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(),
                                         nn.Conv2d(hidden, latent_channels, 1))
        self.decoder_in = nn.Conv2d(latent_channels, hidden, 3, padding=1)
        up: list[nn.Module] = [ResidualBlock(hidden)]
        for level in range(levels):
            up += [Upsample(hidden)] + ([ResidualBlock(hidden)] if level < levels - 1 else [])
        up += [nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(), nn.Conv2d(hidden, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*up)
        if self.temporal_downsample:
            self.merge_pairs = nn.Conv2d(2 * hidden, hidden, 1)
            self.split_pairs = nn.Conv2d(hidden, 2 * hidden, 1)

    @property
    def downsample(self) -> int:
        return 2 ** self.levels

    @property
    def frames_per_latent(self) -> int:
        return 2 if self.temporal_downsample else 1

    def latent_frames(self, num_frames: int, where: str) -> int:
        """``F' = F / frames_per_latent`` for ``F = num_frames`` raw frames; a ``ValueError`` naming
        ``where`` when ``F`` is not a positive int or, with temporal downsampling, not even."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"{where}: num_frames must be a positive int, got {num_frames!r}")
        if num_frames % self.frames_per_latent:
            raise ValueError(f"{where}: {num_frames} frames, but temporal_downsample merges frame pairs; "
                             "expected an even frame count")
        return num_frames // self.frames_per_latent

    def encode(self, x: Tensor) -> Tensor:
        """``[B, F, 3, H, W]`` in ``[-1, 1]`` -> ``[B, F', C, H / 2^L, W / 2^L]``."""
        b, f = x.shape[:2]
        h = self.encoder(x.reshape(b * f, *x.shape[2:]))  # frames are independent here
        if self.temporal_downsample:
            if f % 2:
                raise ValueError(f"ConvVideoAutoencoder: temporal_downsample needs an even frame count, got {f}")
            h = self.merge_pairs(h.reshape(b * f // 2, 2 * self.hidden, *h.shape[2:]))
        z = self.encoder_out(h)
        return z.reshape(b, f // self.frames_per_latent, *z.shape[1:])

    def decode(self, z: Tensor) -> Tensor:
        """``[B, F', C, h, w]`` -> ``[B, F, 3, h 2^L, w 2^L]`` (unbounded floats; ~``[-1, 1]`` once trained)."""
        b, fl = z.shape[:2]
        h = self.decoder_in(z.reshape(b * fl, *z.shape[2:]))
        if self.temporal_downsample:
            h = self.split_pairs(h).reshape(b * fl * 2, self.hidden, *h.shape[2:])
        x = self.decoder(h)
        return x.reshape(b, fl * self.frames_per_latent, *x.shape[1:])


# --------------------------------------------------------------------------------------------------
# pixels <-> [-1, 1], with the checks every learned video codec shares
# --------------------------------------------------------------------------------------------------


RECONSTRUCTION_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": F.l1_loss, "l2": F.mse_loss}
"""Pixel reconstruction losses on ``[-1, 1]`` frames, by name (a codec's ``recon_loss`` argument)."""


def video_to_unit(video: Tensor) -> Tensor:
    """``uint8 [..., H, W, 3]`` -> ``float32 [..., 3, H, W]``, ``x = v / 127.5 - 1`` in ``[-1, 1]``."""
    return (video.to(torch.float32) / 127.5 - 1.0).movedim(-1, -3)


def unit_to_video(x: Tensor) -> Tensor:
    """``float [..., 3, H, W]`` -> ``uint8 [..., H, W, 3]``: ``round((clamp(x, -1, 1) + 1) * 127.5)``
    (the exact inverse of :func:`video_to_unit` on its outputs)."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def check_frame_size(frame_size: int, levels: int, multiple: int = 1, where: str = "codec") -> None:
    """Constructor check: ``frame_size`` divisible by ``2**levels * multiple`` (patch size ...)."""
    if isinstance(frame_size, bool) or not isinstance(frame_size, int) or frame_size < 1:
        raise ValueError(f"{where}: frame_size must be a positive int, got {frame_size!r}")
    need = 2 ** levels * multiple
    if frame_size % need:
        raise ValueError(f"{where}: frame_size={frame_size} is not divisible by {need} (2**levels={2 ** levels}"
                         + (f" times patch {multiple}" if multiple > 1 else "") + "); expected a multiple of it")


def check_video(video: Any, *, frame_size: int, even_frames: bool, batched: bool, where: str) -> Tensor:
    """Validate raw video pixels and return ``uint8 [B, F, H, W, 3]``.

    ``batched=False`` takes one item ``[F, H, W, 3]`` or one image ``[H, W, 3]`` (a batch of one is
    returned); ``batched=True`` takes ``[B, F, H, W, 3]``. ``H == W == frame_size`` is required and,
    with ``even_frames`` (temporal downsampling), an even ``F``.
    """
    if not isinstance(video, Tensor):
        if type(video).__module__ == "numpy":
            video = torch.from_numpy(video)
        else:
            raise TypeError(f"{where} expects a uint8 tensor of video pixels, got {type(video).__name__}")
    expected = "[B, F, H, W, 3]" if batched else "[F, H, W, 3] or [H, W, 3]"
    if video.dtype != torch.uint8:
        raise TypeError(f"{where} expects uint8 pixels {expected}, got dtype {video.dtype}")
    if not batched and video.dim() == 3:
        video = video[None]
    if video.dim() != (5 if batched else 4) or video.shape[-1] != 3:
        raise ValueError(f"{where} expects RGB video of shape {expected} (3 channels last), got {tuple(video.shape)}")
    if not batched:
        video = video[None]
    b, f, h, w, _ = video.shape
    if b < 1 or f < 1:
        raise ValueError(f"{where}: empty video batch of shape {tuple(video.shape)}")
    if h != frame_size or w != frame_size:
        raise ValueError(f"{where}: frames are {h}x{w} pixels, expected {frame_size}x{frame_size} (the codec's "
                         "frame_size)")
    if even_frames and f % 2:
        raise ValueError(f"{where}: {f} frames, but temporal_downsample merges frame pairs; expected an even "
                         "frame count")
    return video
