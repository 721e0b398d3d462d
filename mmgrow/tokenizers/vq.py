"""Learned VQ video codec: a small per-frame conv autoencoder with a vector-quantised bottleneck.

LWM tokenises video with a per-frame VQGAN (arXiv 2402.08268, Sec. 3; 256x256 -> 16x16 codes from
8192). This is the same idea at toy scale, trained by mmgrow's own loop through :meth:`loss`::

    x = v / 127.5 - 1            z = Enc(x) [B, F', C, h, w]          (h = w = frame_size / 2**levels)
    k = argmin_i ||z - e_i||^2    x^ = Dec(e_k)
    loss = mean((x^ - x)^2) (or mean|x^ - x|)  +  VQ loss (commitment; codebook term without EMA)

Tokens follow the LWM serialisation (:class:`~mmgrow.tokenizers.frame_layout.FrameLayout`, as in
:class:`~mmgrow.tokenizers.pixels.PixelTokenizer`), one "frame" per *latent* frame (two raw frames
each with ``temporal_downsample``)::

    [bov] k(0, 0) .. k(0, h*w-1) eof  ...  k(F'-1, 0) .. k(F'-1, h*w-1) eov

Ids: codes ``0..K-1``, then ``bov = K``, ``eof = K+1``, ``eov = K+2``; ``vocab_size = K+3``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from mmgrow.tokenizers.frame_layout import SPECIALS, FrameLayout
from mmgrow.tokenizers.learned import LearnedCodec
from mmgrow.tokenizers.vector_quantizer import VectorQuantizer


class VQVideoTokenizer(LearnedCodec):
    """Video ``uint8 [F, H, W, 3]`` <-> ``[1 + F' * (h*w + 1)]`` int64 tokens of a learned codebook.

    Args:
        frame_size: ``H = W`` of the frames; a multiple of ``2**levels``.
        levels: spatial halvings of the encoder (``h = frame_size / 2**levels``).
        hidden: conv width of the autoencoder.
        num_codes: codebook size ``K``.
        code_dim: code width ``C``.
        temporal_downsample: merge frame pairs (``F' = F / 2``, ``F`` must be even).
        beta: commitment weight.
        ema_decay: EMA decay of the codebook, or None to learn it by gradients.
        dead_code_threshold: EMA usage fraction below which a code is restarted.
        recon_loss: ``"l2"`` (default: learns the rare coloured pixels faster on CPU-sized runs) or
            ``"l1"`` (:data:`~mmgrow.tokenizers.conv_autoencoder.RECONSTRUCTION_LOSSES`).
        checkpoint: a codec run directory (or ``model.safetensors``) to load, frozen.
    """

    modality: ClassVar[str] = "video"
    kind: ClassVar[str] = "discrete"
    raw_batch_dims: ClassVar[int] = 4

    def __init__(self, frame_size: int = 32, levels: int = 2, hidden: int = 32, num_codes: int = 256,
                 code_dim: int = 16, temporal_downsample: bool = False, beta: float = 0.25,
                 ema_decay: float | None = 0.99, dead_code_threshold: float = 1e-3, recon_loss: str = "l2",
                 checkpoint: str | None = None) -> None:
        super().__init__()
        check_frame_size(frame_size, levels, where="VQVideoTokenizer")
        if recon_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"VQVideoTokenizer: recon_loss must be one of {sorted(RECONSTRUCTION_LOSSES)}, "
                             f"got {recon_loss!r}")
        self.frame_size, self.levels, self.hidden = frame_size, levels, hidden
        self.num_codes, self.code_dim = num_codes, code_dim
        self.temporal_downsample = bool(temporal_downsample)
        self.beta, self.ema_decay, self.dead_code_threshold = beta, ema_decay, dead_code_threshold
        self.recon_loss = recon_loss
        self.autoencoder = ConvVideoAutoencoder(code_dim, levels, hidden, self.temporal_downsample)
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta=beta, ema_decay=ema_decay,
                                         dead_code_threshold=dead_code_threshold)
        self.special_tokens: dict[str, int] = {name: num_codes + i for i, name in enumerate(SPECIALS)}
        self.vocab_size = num_codes + len(SPECIALS)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    # ---------------------------------------------------------------------------------------------
    # sizes
    # ---------------------------------------------------------------------------------------------

    @property
    def latent_size(self) -> int:
        """``h = w = frame_size / 2**levels``."""
        return self.frame_size // self.autoencoder.downsample

    @property
    def codes_per_frame(self) -> int:
        """Codes of one latent frame, ``h * w``."""
        return self.latent_size ** 2

    @property
    def tokens_per_frame(self) -> int:
        """Tokens of one latent frame: its codes plus its ``eof`` / ``eov``."""
        return self.codes_per_frame + 1

    @property
    def frames_per_latent(self) -> int:
        """Raw frames per latent frame (2 with ``temporal_downsample``)."""
        return self.autoencoder.frames_per_latent

    def latent_frames(self, num_frames: int) -> int:
        """``F' = F / frames_per_latent``; an error when ``F`` does not divide."""
        return self.autoencoder.latent_frames(num_frames, "VQVideoTokenizer")

    def num_tokens(self, num_frames: int) -> int:
        """Length of an encoded video of ``num_frames`` raw frames: ``1 + F' * (h*w + 1)``."""
        return 1 + self.latent_frames(num_frames) * self.tokens_per_frame

    @property
    def frame_layout(self) -> FrameLayout:
        """LWM serialisation of ``h*w`` codes per latent frame (the specials follow the codebook)."""
        return FrameLayout(codes_per_frame=self.codes_per_frame, num_codes=self.num_codes,
                           bov=self.special_tokens["bov"], eof=self.special_tokens["eof"],
                           eov=self.special_tokens["eov"])

    # ---------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.quantizer.codebook.device

    def _unit(self, video: Tensor) -> Tensor:
        """``uint8 [B, F, H, W, 3]`` -> ``[B, F, 3, H, W]`` in ``[-1, 1]`` on the codec's device and dtype."""
        return video_to_unit(video.to(self._device())).to(self.quantizer.codebook.dtype)

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``uint8 [B, F, H, W, 3]`` -> (reconstruction + VQ loss, metrics recon/vq/perplexity/usage)."""
        video = check_video(batch, frame_size=self.frame_size, even_frames=self.temporal_downsample, batched=True,
                            where="VQVideoTokenizer.loss")
        x = self._unit(video)  # [B, F, 3, H, W]
        z = self.autoencoder.encode(x)  # [B, F', C, h, w]
        q = self.quantizer(z.movedim(2, -1))
        recon = RECONSTRUCTION_LOSSES[self.recon_loss](self.autoencoder.decode(q.quantized.movedim(-1, 2)), x)
        metrics = {"recon": recon.detach(), "vq": q.loss.detach(), "perplexity": q.perplexity, "usage": q.usage}
        return recon + q.loss, metrics

    @torch.no_grad()
    def reconstruct(self, batch: Tensor) -> Tensor:
        """``uint8 [B, F, H, W, 3]`` -> the decoded codes, same shape and dtype (no codebook updates)."""
        video = check_video(batch, frame_size=self.frame_size, even_frames=self.temporal_downsample, batched=True,
                            where="VQVideoTokenizer.reconstruct")
        codes = self._codes(video)
        return self._decode_codes(codes).to(batch.device)

    # ---------------------------------------------------------------------------------------------
    # encode / decode
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _codes(self, video: Tensor) -> Tensor:
        """``uint8 [B, F, H, W, 3]`` -> ``[B, F', h, w]`` int64 nearest codes (pure: no statistics change)."""
        z = self.autoencoder.encode(self._unit(video)).movedim(2, -1)  # [B, F', h, w, C]
        return self.quantizer.nearest(z.reshape(-1, self.code_dim)).reshape(z.shape[:-1])

    @torch.no_grad()
    def _decode_codes(self, codes: Tensor) -> Tensor:
        """``[B, F', h, w]`` int64 -> ``uint8 [B, F, H, W, 3]`` on the CPU."""
        z = self.quantizer.lookup(codes.to(self._device())).movedim(-1, 2)  # [B, F', C, h, w]
        return unit_to_video(self.autoencoder.decode(z)).cpu()

    def quantize(self, video: Any) -> Tensor:
        """``uint8 [F, H, W, 3]`` or ``[H, W, 3]`` -> ``[F', h, w]`` int64 codes."""
        v = check_video(video, frame_size=self.frame_size, even_frames=self.temporal_downsample, batched=False,
                        where="VQVideoTokenizer.encode")
        return self._codes(v)[0].cpu()

    def encode(self, video: Any) -> Tensor:
        """``uint8 [F, H, W, 3]`` or ``[H, W, 3]`` -> ``[1 + F' * (h*w + 1)]`` int64 (module doc layout)."""
        return self.frame_layout.serialize(self.quantize(video).reshape(-1, self.codes_per_frame))

    def decode(self, tokens: Tensor | Sequence[int]) -> Tensor:
        """``[N]`` tokens -> ``uint8 [F, H, W, 3]`` (``F = F' * frames_per_latent``).

        Robust to sampled output, like :meth:`PixelTokenizer.decode`: a leading ``bov`` is
        optional; latent frames end at ``eof`` / ``eov`` and decoding stops at the first ``eov``;
        trailing codes without an end token form a last frame; a frame with fewer than ``h*w``
        codes is padded with code 0, extra codes are dropped; a non-code id becomes code 0.
        ``decode(encode(v)) == reconstruct(v[None])[0]``.
        """
        codes = self.frame_layout.frames(tokens, where="VQVideoTokenizer.decode")  # [F', h*w]
        if not codes.shape[0]:  # nothing to run the decoder on
            return torch.zeros(0, self.frame_size, self.frame_size, 3, dtype=torch.uint8)
        return self._decode_codes(codes.reshape(1, -1, self.latent_size, self.latent_size))[0]

    # ---------------------------------------------------------------------------------------------
    # structure for the model and the sampler
    # ---------------------------------------------------------------------------------------------

    def generation_prefix(self) -> Tensor:
        """A generated video starts after ``bov``."""
        return self.frame_layout.generation_prefix()

    def generation_length(self, tokens: Tensor) -> int:
        """Sampled video ends at (and includes) the first ``eov``."""
        return self.frame_layout.generation_length(tokens)

    def block_ids(self, tokens: Tensor) -> Tensor:
        """``[N]`` int64: latent-frame index of each token (its ``eof`` / ``eov`` included),
        ``NO_BLOCK`` for ``bov`` and anything after the first ``eov``."""
        return self.frame_layout.block_ids(tokens, where="VQVideoTokenizer.block_ids")

    def generation_constraint(self, num_frames: int) -> Callable[[int], Tensor]:
        """Allowed next ids while generating a video of ``num_frames`` raw frames after its ``bov``.

        ``allowed(k) -> bool [vocab_size]`` for step ``k = 0 .. F'*(h*w+1)-1``: codes at code
        positions, only ``eof`` at the end of latent frames ``0..F'-2``, only ``eov`` at the end.
        """
        # errors name the raw frame count the caller asked for, not the latent one
        return self.frame_layout.generation_constraint(self.latent_frames(num_frames), self.vocab_size,
                                                       what=f"{num_frames}-frame")
