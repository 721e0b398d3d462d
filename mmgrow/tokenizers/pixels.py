"""Deterministic pixel-grid video codec: one palette-colour token per grid cell, no training.

A frame ``[H, W, 3]`` is cut into ``grid x grid`` cells of ``(H/grid) x (W/grid)`` pixels; each cell
is the area average of its pixels, quantised to the nearest palette colour (squared RGB distance,
ties to the lower id). It plays the role of LWM's per-frame VQGAN at toy scale, with the same
serialisation (LWM, arXiv 2402.08268, Sec. 3; :class:`~mmgrow.tokenizers.frame_layout.FrameLayout`):
frame tokens, ``eof`` after each frame, ``eov`` instead of the last ``eof``, the whole video
introduced by ``bov`` (LWM's ``<vision>``)::

    [bov] c(0,0) .. c(0,G*G-1) eof  c(1,0) .. c(1,G*G-1) eof  ...  c(F-1,0) .. c(F-1,G*G-1) eov

Ids: palette colours ``0..P-1``, then ``bov = P``, ``eof = P+1``, ``eov = P+2``; ``vocab_size = P+3``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.protocols import Tokenizer
from mmgrow.tokenizers.frame_layout import SPECIALS, FrameLayout

DEFAULT_PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "orange": (255, 128, 0),
    "purple": (128, 0, 255),
    "brown": (128, 64, 0),
}
"""The default palette, in id order (``black`` = 0 is the background colour used by ``decode``)."""


class PixelTokenizer(Tokenizer):
    """Video ``uint8 [F, H, W, 3]`` (or one image ``[H, W, 3]``) <-> ``[1 + F*(G*G+1)]`` int64 tokens.

    Args:
        grid: cells per side ``G``; ``H`` and ``W`` must be multiples of it.
        palette: RGB triples (ints in ``0..255``, distinct), or None for :data:`DEFAULT_PALETTE`.
            ``palette[0]`` is the background colour that ``decode`` writes where a cell is missing.
    """

    modality: ClassVar[str] = "video"
    kind: ClassVar[str] = "discrete"

    def __init__(self, grid: int = 8, palette: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"PixelTokenizer: grid must be a positive int, got {grid!r}")
        self.grid = grid
        self.palette = _check_palette(list(DEFAULT_PALETTE.values()) if palette is None else palette)
        self.palette_names: list[str] | None = list(DEFAULT_PALETTE) if palette is None else None
        num_colours = self.palette.shape[0]
        self.special_tokens: dict[str, int] = {name: num_colours + i for i, name in enumerate(SPECIALS)}
        self.vocab_size = num_colours + len(SPECIALS)

    # ---------------------------------------------------------------------------------------------
    # sizes and ids
    # ---------------------------------------------------------------------------------------------

    @property
    def num_colours(self) -> int:
        return int(self.palette.shape[0])

    @property
    def cells_per_frame(self) -> int:
        return self.grid * self.grid

    @property
    def tokens_per_frame(self) -> int:
        """``G*G`` cell tokens plus the frame's ``eof`` / ``eov``."""
        return self.cells_per_frame + 1

    def num_tokens(self, num_frames: int) -> int:
        """Length of an encoded video of ``num_frames`` frames: ``1 + F * (G*G + 1)``."""
        return 1 + num_frames * self.tokens_per_frame

    @property
    def frame_layout(self) -> FrameLayout:
        """LWM serialisation of ``G*G`` palette ids per frame (the specials follow the palette)."""
        return FrameLayout(codes_per_frame=self.cells_per_frame, num_codes=self.num_colours,
                           bov=self.special_tokens["bov"], eof=self.special_tokens["eof"],
                           eov=self.special_tokens["eov"])

    def colour_id(self, name: str) -> int:
        """Palette id of a named colour (default palette only)."""
        if self.palette_names is None:
            raise ValueError("PixelTokenizer.colour_id: this codec has a custom palette without colour names")
        if name not in self.palette_names:
            raise KeyError(f"unknown colour {name!r}; palette colours: {', '.join(self.palette_names)}")
        return self.palette_names.index(name)

    # ---------------------------------------------------------------------------------------------
    # encode / decode
    # ---------------------------------------------------------------------------------------------

    def quantize(self, video: Any) -> Tensor:
        """``uint8 [F, H, W, 3]`` or ``[H, W, 3]`` -> ``[F, G, G]`` int64 palette ids.

        ``cell[f, i, j] = mean(video[f, i*h:(i+1)*h, j*w:(j+1)*w])`` (float64, ``h = H/G``, ``w = W/G``),
        ``id = argmin_p ||cell - palette[p]||^2`` (first minimum on ties).
        """
        v = self._check_video(video)
        f, h, w, _ = v.shape
        g = self.grid
        cells = v.to(torch.float64).reshape(f, g, h // g, g, w // g, 3).mean(dim=(2, 4))  # [F, G, G, 3]
        dist = ((cells[..., None, :] - self.palette.to(torch.float64)) ** 2).sum(-1)  # [F, G, G, P]
        return dist.argmin(dim=-1)

    def encode(self, video: Any) -> Tensor:
        """``uint8 [F, H, W, 3]`` or ``[H, W, 3]`` -> ``[1 + F*(G*G+1)]`` int64 (layout in the module doc)."""
        return self.frame_layout.serialize(self.quantize(video).reshape(-1, self.cells_per_frame))

    def decode(self, tokens: Tensor | Sequence[int]) -> Tensor:
        """``[N]`` tokens -> ``uint8 [F, G, G, 3]`` frames (one pixel per cell).

        Robust to sampled output: a leading ``bov`` is optional; frames end at ``eof`` / ``eov``
        and decoding stops at the first ``eov``; trailing cells without an end token form a last
        frame; a frame with fewer than ``G*G`` cells is padded, extra cells are dropped; a cell
        holding a non-palette id gets the background ``palette[0]``.
        ``decode(encode(v)) == palette[quantize(v)]`` exactly.
        """
        ids = self.frame_layout.frames(tokens, where="PixelTokenizer.decode")  # [F, G*G]
        return self.palette[ids.reshape(ids.shape[0], self.grid, self.grid)]

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
        """``[N]`` int64: frame index of each token (its ``eof`` / ``eov`` included), ``NO_BLOCK`` for
        ``bov`` and for anything after the first ``eov``. Tokens of one frame attend bidirectionally."""
        return self.frame_layout.block_ids(tokens, where="PixelTokenizer.block_ids")

    def generation_constraint(self, num_frames: int) -> Callable[[int], Tensor]:
        """Allowed next ids while generating a ``num_frames`` video after its ``bov``.

        ``allowed(k) -> bool [vocab_size]`` for generation step ``k = 0 .. F*(G*G+1)-1``: palette ids
        at cell positions, only ``eof`` at the end of frames ``0..F-2``, only ``eov`` at the very end.
        """
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"generation_constraint: num_frames must be a positive int, got {num_frames!r}")
        return self.frame_layout.generation_constraint(num_frames, self.vocab_size)

    # ---------------------------------------------------------------------------------------------
    # validation
    # ---------------------------------------------------------------------------------------------

    def _check_video(self, video: Any) -> Tensor:
        if not isinstance(video, Tensor):
            if type(video).__module__ == "numpy":
                video = torch.from_numpy(video)
            else:
                raise TypeError(f"PixelTokenizer expects a uint8 tensor [F, H, W, 3] or [H, W, 3], "
                                f"got {type(video).__name__}")
        if video.dtype != torch.uint8:
            raise TypeError(f"PixelTokenizer expects dtype uint8 pixels, got {video.dtype}")
        if video.dim() == 3:
            video = video[None]
        if video.dim() != 4 or video.shape[-1] != 3:
            raise ValueError(f"PixelTokenizer expects shape [F, H, W, 3] or [H, W, 3], got {tuple(video.shape)}")
        f, h, w, _ = video.shape
        if f < 1 or h < 1 or w < 1:
            raise ValueError(f"PixelTokenizer: empty video of shape {tuple(video.shape)}")
        if h % self.grid or w % self.grid:
            raise ValueError(f"PixelTokenizer: frame size {h}x{w} is not divisible by grid={self.grid}; "
                             f"expected H and W to be multiples of {self.grid}")
        return video.cpu()  # the palette lives on the CPU, like the data pipeline


def _check_palette(palette: Sequence[Sequence[int]]) -> Tensor:
    """RGB triples -> ``uint8 [P, 3]``, with named errors for bad entries."""
    try:
        rows = [tuple(c) for c in palette]
    except TypeError:
        raise TypeError(f"PixelTokenizer: palette must be a list of RGB triples, got {palette!r}") from None
    if not rows:
        raise ValueError("PixelTokenizer: palette must hold at least one colour")
    for c in rows:
        if len(c) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c):
            raise ValueError(f"PixelTokenizer: palette colour {c!r} is not an RGB triple of ints in 0..255")
    if len(set(rows)) != len(rows):
        raise ValueError(f"PixelTokenizer: palette colours must be distinct, got {rows}")
    return torch.tensor(rows, dtype=torch.uint8)

