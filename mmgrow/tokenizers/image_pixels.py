"""Single-frame image codecs: the discrete video codecs applied to one still image.

An image ``uint8 [H, W, 3]`` is tokenised as the one-frame video ``image[None]``, so it keeps the
video codecs' LWM layout, ids and blocks (``G*G`` / ``h*w`` codes, then ``eov``)::

    [bov] c(0) .. c(n-1) eov                                  (n + 2 tokens; one bidirectional block)

:class:`SingleFrame` is the adapter (a mixin placed before the video codec in the bases), giving

* :class:`ImagePixelTokenizer` -- :class:`~mmgrow.tokenizers.pixels.PixelTokenizer` on one frame
  (registered as ``image_pixels``; decodes to ``uint8 [G, G, 3]``, one pixel per cell);
* :class:`ImageVQTokenizer` -- :class:`~mmgrow.tokenizers.vq.VQVideoTokenizer` on one frame, without
  temporal downsampling (decodes to ``uint8 [frame_size, frame_size, 3]``; trains on ``[B, H, W, 3]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.tokenizers.pixels import DEFAULT_PALETTE, PixelTokenizer
from mmgrow.tokenizers.vq import VQVideoTokenizer


def one_image(image: Any, where: str) -> Tensor:
    """``image`` (tensor or numpy) checked to be ``[H, W, 3]``; pixel dtype and size are the codec's to check."""
    if type(image).__module__ == "numpy":
        image = torch.from_numpy(image)
    if not isinstance(image, Tensor):
        raise TypeError(f"{where} expects a uint8 tensor image [H, W, 3], got {type(image).__name__}")
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"{where} expects one RGB image of shape [H, W, 3], got {tuple(image.shape)} "
                         "(a video [F, H, W, 3] needs the video codec)")
    return image


class SingleFrame:
    """Adapter of a frame-layout video codec to still images (mix in before the video codec).

    ``encode(image [H, W, 3]) = VideoCodec.encode(image[None])``; ``decode(tokens)`` is the first
    decoded frame (the background, all zeros, when the tokens hold none); ``block_ids``,
    ``generation_prefix`` and ``generation_length`` are the video codec's, unchanged.
    """

    modality: ClassVar[str] = "image"

    def encode(self, image: Any) -> Tensor:
        """``uint8 [H, W, 3]`` -> the one-frame video's tokens ``[bov, codes.., eov]``."""
        return super().encode(one_image(image, f"{type(self).__name__}.encode")[None])  # type: ignore[misc]

    def decode(self, tokens: Tensor | Sequence[int]) -> Tensor:
        """Tokens -> ``uint8 [h, w, 3]``: frame 0 of the video codec's decode (robust to sampled output:
        later frames are dropped, no frame gives an all-background image)."""
        frames = super().decode(tokens)  # type: ignore[misc]  # [F, h, w, 3]
        return frames[0] if frames.shape[0] else torch.zeros(frames.shape[1:], dtype=frames.dtype)

    def num_tokens(self, num_frames: int = 1) -> int:
        """Tokens of one encoded image (``num_frames`` must be 1)."""
        return super().num_tokens(self._one_frame(num_frames))  # type: ignore[misc]

    def generation_constraint(self, num_frames: int = 1) -> Callable[[int], Tensor]:
        """The video codec's constraint for a one-frame video: codes, then ``eov``."""
        return super().generation_constraint(self._one_frame(num_frames))  # type: ignore[misc]

    def _one_frame(self, num_frames: int) -> int:
        if num_frames != 1:
            raise ValueError(f"{type(self).__name__} encodes one image (one frame); got num_frames={num_frames!r}")
        return 1


class ImagePixelTokenizer(SingleFrame, PixelTokenizer):
    """Image ``uint8 [H, W, 3]`` <-> ``[G*G + 2]`` palette tokens (arguments of :class:`PixelTokenizer`)."""

    modality: ClassVar[str] = "image"

    @classmethod
    def conformance_sample(cls) -> Tensor:
        """An 8 x 8 image (the default grid) of palette colours: the codec decodes it back exactly."""
        palette = torch.tensor(list(DEFAULT_PALETTE.values()), dtype=torch.uint8)
        return palette[torch.arange(64) % palette.shape[0]].reshape(8, 8, 3)


class ImageVQTokenizer(SingleFrame, VQVideoTokenizer):
    """Image ``uint8 [frame_size, frame_size, 3]`` <-> ``[h*w + 2]`` learned codes (arguments of
    :class:`VQVideoTokenizer` without ``temporal_downsample``). Trains on image batches ``[B, H, W, 3]``."""

    modality: ClassVar[str] = "image"
    raw_batch_dims: ClassVar[int] = 3

    def __init__(self, frame_size: int = 32, levels: int = 2, hidden: int = 32, num_codes: int = 256,
                 code_dim: int = 16, beta: float = 0.25, ema_decay: float | None = 0.99,
                 dead_code_threshold: float = 1e-3, recon_loss: str = "l2", checkpoint: str | None = None) -> None:
        super().__init__(frame_size=frame_size, levels=levels, hidden=hidden, num_codes=num_codes, code_dim=code_dim,
                         temporal_downsample=False, beta=beta, ema_decay=ema_decay,
                         dead_code_threshold=dead_code_threshold, recon_loss=recon_loss, checkpoint=checkpoint)

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``uint8 [B, H, W, 3]`` -> the video codec's loss on one-frame videos ``[B, 1, H, W, 3]``."""
        return super().loss(self._batch(batch, "loss")[:, None])

    def reconstruct(self, batch: Tensor) -> Tensor:
        """``uint8 [B, H, W, 3]`` -> decoded codes, same shape (no codebook updates)."""
        return super().reconstruct(self._batch(batch, "reconstruct")[:, None])[:, 0]

    def _batch(self, batch: Any, what: str) -> Tensor:
        if not isinstance(batch, Tensor) or batch.dim() != 4 or batch.shape[-1] != 3:
            raise ValueError(f"ImageVQTokenizer.{what} expects a batch of images [B, H, W, 3], got "
                             f"{tuple(getattr(batch, 'shape', ())) or type(batch).__name__}")
        return batch
