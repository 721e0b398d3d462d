"""Learned continuous video codec: conv autoencoder latents, normalised and patchified for a DiT.

The diffusion line (TTT video DiT, ModelGrow, the scaling laws) models video in the latent space
of an autoencoder; this is that autoencoder at toy scale, without quantisation::

    x = v / 127.5 - 1                        z = Enc(x)   [B, F', C, h, w]   (h = frame_size / 2**levels)
    loss = mean((Dec(z) - x)^2) (or mean|Dec(z) - x|)  +  latent_penalty * mean(z^2)

The small L2 penalty keeps the latent scale bounded (a KL-free bottleneck). For the model, latents
are normalised per channel with running statistics estimated while training and kept in the
state_dict, then cut into ``patch x patch`` patches (:func:`~mmgrow.tokenizers.patchify.patchify`)::

    encode:  u = (z - mu_c) / sigma_c  ->  patchify(u, p)   [F' * (h/p) * (w/p), C * p * p]
    decode:  unpatchify -> z = u * sigma_c + mu_c -> Dec(z) -> uint8 frames

Running statistics (per latent channel ``c``, over batch, frames and positions): at training step
``t = 0, 1, ...`` with batch mean ``m`` and variance ``s^2``,
``mu <- (1 - a) mu + a m``, ``var <- (1 - a) var + a s^2`` with ``a = max(stats_momentum, 1 / (t + 1))``
(a running average over the first steps, an EMA afterwards, so no bias from the initial values).
All latents of a clip form one bidirectional block (a DiT attends over the whole clip).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.tokenizers.conv_autoencoder import (
    RECONSTRUCTION_LOSSES,
    ConvVideoAutoencoder,
    check_frame_size,
    check_video,
    unit_to_video,
    video_to_unit,
)
from mmgrow.tokenizers.learned import LearnedCodec
from mmgrow.tokenizers.patchify import patchify, unpatchify

STD_FLOOR = 1e-5
"""Added to the running variance before the square root (a constant latent channel stays finite)."""


class LatentVideoCodec(LearnedCodec):
    """Video ``uint8 [F, H, W, 3]`` <-> normalised latents ``float32 [N, latent_dim]``.

    Args:
        frame_size: ``H = W`` of the frames; a multiple of ``2**levels * patch``.
        levels: spatial halvings of the encoder.
        hidden: conv width of the autoencoder.
        latent_channels: ``C``; ``latent_dim = C * patch**2``.
        patch: patch size ``p`` on the latent grid.
        temporal_downsample: merge frame pairs (``F' = F / 2``, ``F`` must be even).
        latent_penalty: weight of ``mean(z^2)`` in the loss.
        stats_momentum: EMA momentum of the normalisation statistics (module doc).
        recon_loss: ``"l2"`` (default: learns the rare coloured pixels faster on CPU-sized runs) or
            ``"l1"`` (:data:`~mmgrow.tokenizers.conv_autoencoder.RECONSTRUCTION_LOSSES`).
        checkpoint: a codec run directory (or ``model.safetensors``) to load, frozen.

    Defaults fit the shapes dataset: 32x32 frames -> 8x8x4 latents -> 16 latents of width 16 per frame.
    """

    modality: ClassVar[str] = "video"
    kind: ClassVar[str] = "continuous"
    raw_batch_dims: ClassVar[int] = 4

    def __init__(self, frame_size: int = 32, levels: int = 2, hidden: int = 32, latent_channels: int = 4,
                 patch: int = 2, temporal_downsample: bool = False, latent_penalty: float = 1e-3,
                 stats_momentum: float = 0.1, recon_loss: str = "l2", checkpoint: str | None = None) -> None:
        super().__init__()
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"LatentVideoCodec: patch must be a positive int, got {patch!r}")
        check_frame_size(frame_size, levels, multiple=patch, where="LatentVideoCodec")
        if recon_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"LatentVideoCodec: recon_loss must be one of {sorted(RECONSTRUCTION_LOSSES)}, "
                             f"got {recon_loss!r}")
        if not 0.0 < stats_momentum <= 1.0 or latent_penalty < 0:
            raise ValueError(f"LatentVideoCodec: expected 0 < stats_momentum <= 1 and latent_penalty >= 0, got "
                             f"stats_momentum={stats_momentum}, latent_penalty={latent_penalty}")
        self.frame_size, self.levels, self.hidden = frame_size, levels, hidden
        self.latent_channels, self.patch = latent_channels, patch
        self.temporal_downsample = bool(temporal_downsample)
        self.latent_penalty, self.stats_momentum, self.recon_loss = latent_penalty, stats_momentum, recon_loss
        self.autoencoder = ConvVideoAutoencoder(latent_channels, levels, hidden, self.temporal_downsample)
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_var", torch.ones(latent_channels))
        self.register_buffer("stats_steps", torch.zeros((), dtype=torch.long))
        self.latent_dim = latent_channels * patch * patch
        self.special_tokens: dict[str, int] = {}
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    # ---------------------------------------------------------------------------------------------
    # sizes
    # ---------------------------------------------------------------------------------------------

    @property
    def latent_size(self) -> int:
        """Side of the latent grid, ``frame_size / 2**levels``."""
        return self.frame_size // self.autoencoder.downsample

    @property
    def latents_per_frame(self) -> int:
        """Patch vectors per latent frame, ``(latent_size / patch)**2``."""
        return (self.latent_size // self.patch) ** 2

    @property
    def frames_per_latent(self) -> int:
        """Raw frames per latent frame (2 with ``temporal_downsample``)."""
        return self.autoencoder.frames_per_latent

    @property
    def latent_std(self) -> Tensor:
        """``[C]`` running standard deviation ``sqrt(var + STD_FLOOR)``."""
        return torch.sqrt(self.latent_var + STD_FLOOR)

    def num_latents(self, num_frames: int) -> int:
        """Latent vectors of a ``num_frames`` video: ``F' * latents_per_frame``."""
        return self.autoencoder.latent_frames(num_frames, "LatentVideoCodec") * self.latents_per_frame

    # ---------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.latent_mean.device

    def _unit(self, video: Tensor) -> Tensor:
        """``uint8 [B, F, H, W, 3]`` -> ``[B, F, 3, H, W]`` in ``[-1, 1]`` on the codec's device and dtype."""
        return video_to_unit(video.to(self._device())).to(self.latent_mean.dtype)

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``uint8 [B, F, H, W, 3]`` -> (reconstruction + latent penalty, metrics recon/latent_l2/latent_std)."""
        video = check_video(batch, frame_size=self.frame_size, even_frames=self.temporal_downsample, batched=True,
                            where="LatentVideoCodec.loss")
        x = self._unit(video)  # [B, F, 3, H, W]
        z = self.autoencoder.encode(x)  # [B, F', C, h, w]
        if self.training:
            self._update_statistics(z.detach())
        recon = RECONSTRUCTION_LOSSES[self.recon_loss](self.autoencoder.decode(z), x)
        latent_l2 = z.pow(2).mean()
        metrics = {"recon": recon.detach(), "latent_l2": latent_l2.detach(),
                   "latent_std": z.detach().transpose(0, 2).reshape(self.latent_channels, -1).std(-1).mean()}
        return recon + self.latent_penalty * latent_l2, metrics

    @torch.no_grad()
    def _update_statistics(self, z: Tensor) -> None:
        """Running per-channel mean / variance of ``z [B, F', C, h, w]`` (module doc)."""
        per_channel = z.transpose(0, 2).reshape(self.latent_channels, -1).to(self.latent_mean.dtype)
        a = max(self.stats_momentum, 1.0 / (int(self.stats_steps) + 1))
        self.latent_mean.mul_(1.0 - a).add_(per_channel.mean(-1), alpha=a)
        self.latent_var.mul_(1.0 - a).add_(per_channel.var(-1, unbiased=False), alpha=a)
        self.stats_steps.add_(1)

    @torch.no_grad()
    def reconstruct(self, batch: Tensor) -> Tensor:
        """``uint8 [B, F, H, W, 3]`` -> decoded latents, same shape and dtype (no statistics change)."""
        video = check_video(batch, frame_size=self.frame_size, even_frames=self.temporal_downsample, batched=True,
                            where="LatentVideoCodec.reconstruct")
        z = self.autoencoder.encode(self._unit(video))
        return unit_to_video(self.autoencoder.decode(z)).to(batch.device)

    # ---------------------------------------------------------------------------------------------
    # encode / decode
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: Any) -> Tensor:
        """``uint8 [F, H, W, 3]`` or ``[H, W, 3]`` -> normalised ``float32 [F' * latents_per_frame, latent_dim]``
        on the CPU (rows in (latent frame, patch row, patch column) order)."""
        v = check_video(video, frame_size=self.frame_size, even_frames=self.temporal_downsample, batched=False,
                        where="LatentVideoCodec.encode")
        z = self.autoencoder.encode(self._unit(v))[0]  # [F', C, h, w]
        u = (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]
        return patchify(u, self.patch).float().cpu()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised ``[N, latent_dim]`` latents (``N`` a multiple of ``latents_per_frame``) ->
        ``uint8 [F, H, W, 3]`` on the CPU."""
        if not isinstance(latents, Tensor) or not latents.is_floating_point():
            raise TypeError(f"LatentVideoCodec.decode expects a float tensor [N, {self.latent_dim}], got "
                            f"{type(latents).__name__}{'' if not isinstance(latents, Tensor) else ' ' + str(latents.dtype)}")
        if latents.dim() != 2 or latents.shape[1] != self.latent_dim or latents.shape[0] % self.latents_per_frame:
            raise ValueError(f"LatentVideoCodec.decode expects [F' * {self.latents_per_frame}, {self.latent_dim}] "
                             f"latents ({self.latents_per_frame} per latent frame), got {tuple(latents.shape)}")
        if latents.shape[0] == 0:
            return torch.zeros(0, self.frame_size, self.frame_size, 3, dtype=torch.uint8)
        u = unpatchify(latents.to(self._device(), self.latent_mean.dtype), self.patch, self.latent_channels,
                       self.latent_size, self.latent_size)  # [F', C, h, w]
        z = u * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        return unit_to_video(self.autoencoder.decode(z[None]))[0].cpu()

    def block_ids(self, tokens: Tensor) -> Tensor:
        """``[N]`` zeros: every latent of the clip is in one bidirectional block."""
        if not isinstance(tokens, Tensor) or tokens.dim() < 1:
            raise ValueError("LatentVideoCodec.block_ids expects latents [N, latent_dim]")
        return torch.zeros(tokens.shape[0], dtype=torch.long)
