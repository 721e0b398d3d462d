"""Moving shapes: an embedded, seeded text-video dataset (nothing downloaded).

Each sample is a short video of one coloured shape on a black background moving one grid cell per
frame in a straight line, with the caption ``"a <colour> <shape> moves <motion>"`` (``captions="short"``)
or an attribute-complete one (``captions="detailed"``, :func:`detailed_caption`)::

    a red square moves left, one cell per frame for 6 frames, starting at the top right of a black
    8 by 8 grid; the square is medium-sized, 3 cells wide and 3 cells tall

``shapes`` / ``colours`` / ``motions`` restrict what is drawn, so a curriculum can train a first
stage on some shapes and colours with short captions and a second stage on new ones with detailed
captions (both through ``MMDataModule(dataset_args={...})``).

Drawing happens on a coarse grid of ``grid x grid`` cells (``size / grid`` pixels each), every cell
one exact palette colour of :data:`mmgrow.tokenizers.pixels.DEFAULT_PALETTE`, so the pixel codec
with the same grid quantises the video *exactly* and the shapes stay distinguishable at 8 x 8.
Shapes, as cell masks (``#`` = filled)::

    square   cross    ring     bar
    ###      .#.      ###
    ###      ###      #.#      ###
    ###      .#.      ###

Held-out combinations (:data:`HELDOUT_COMBOS`) never occur in ``"train"`` / ``"val"``, while each of
their shapes, colours and motions does; ``split="heldout"`` yields only them (compositional
generalisation: "a red square moves left" after seeing red things, squares and leftward motion).
Samples are random access and deterministic per ``(seed, split, index)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import product
from typing import ClassVar

import torch
from torch import Tensor

from mmgrow.data.synthetic.combinations import choose_names, split_combinations
from mmgrow.protocols import Dataset, Sample
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE

SHAPES: dict[str, tuple[str, ...]] = {
    "square": ("###", "###", "###"),
    "cross": (".#.", "###", ".#."),
    "ring": ("###", "#.#", "###"),
    "bar": ("###",),
}
"""Shape masks in grid cells, row by row."""

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta")
"""Default shape colours (names of :data:`DEFAULT_PALETTE`)."""

MOTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
"""Motion name -> (row, column) step in cells per frame."""

BACKGROUND = "black"

HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("square", "red", "left"),
    ("cross", "blue", "up"),
    ("ring", "yellow", "right"),
    ("bar", "green", "down"),
    ("cross", "magenta", "left"),
    ("ring", "cyan", "down"),
)
"""(shape, colour, motion) triples that appear only in the ``"heldout"`` split."""

SPLITS = ("train", "val", "heldout")
CAPTION_STYLES = ("short", "detailed")


def caption(shape: str, colour: str, motion: str) -> str:
    """The caption of a combination: ``"a red square moves left"``."""
    return f"a {colour} {shape} moves {motion}"


def size_word(shape: str, grid: int) -> str:
    """How big ``shape`` looks on a ``grid``-cell frame, from its longer side ``e`` in cells:
    ``"small"`` when ``e <= grid / 4``, ``"medium-sized"`` when ``e <= grid / 2``, else ``"large"``."""
    extent = max(len(SHAPES[shape]), len(SHAPES[shape][0]))
    if 4 * extent <= grid:
        return "small"
    return "medium-sized" if 2 * extent <= grid else "large"


def position_words(shape: str, start: tuple[int, int], grid: int) -> str:
    """Where the shape's centre lies in the first frame, by thirds of the grid: ``"top left"``,
    ``"top"``, ``"centre"``, ``"bottom right"`` ... (``start`` = its top-left cell ``(row, col)``).

    The centre along an axis is at ``(2 * start + extent) / (2 * grid)`` of the frame; below 1/3 is
    top / left, above 2/3 is bottom / right (integer comparisons, so no rounding decides a word).
    """
    def third(first: int, extent: int, low: str, high: str) -> str:
        twice_centre = 2 * first + extent  # in half cells
        if 3 * twice_centre < 2 * grid:
            return low
        return high if 3 * twice_centre > 4 * grid else ""

    rows, cols = len(SHAPES[shape]), len(SHAPES[shape][0])
    words = [w for w in (third(start[0], rows, "top", "bottom"), third(start[1], cols, "left", "right")) if w]
    return " ".join(words) or "centre"


def detailed_caption(shape: str, colour: str, motion: str, start: tuple[int, int], frames: int, grid: int,
                     background: str = BACKGROUND) -> str:
    """The short caption followed by every other attribute of the video, deterministically:
    speed and number of frames, start position in words (:func:`position_words`), background and
    grid, size in words (:func:`size_word`) and in cells."""
    rows, cols = len(SHAPES[shape]), len(SHAPES[shape][0])
    plural = "frame" if frames == 1 else "frames"
    return (f"{caption(shape, colour, motion)}, one cell per frame for {frames} {plural}, starting at the "
            f"{position_words(shape, start, grid)} of a {background} {grid} by {grid} grid; the {shape} is "
            f"{size_word(shape, grid)}, {cols} cells wide and {rows} {'cell' if rows == 1 else 'cells'} tall")


class ShapesDataset(Dataset):
    """Random-access dataset of :class:`~mmgrow.protocols.Sample` s.

    ``ds[i].media["video"]`` is ``uint8 [frames, size, size, 3]``, ``ds[i].text`` the caption and
    ``ds[i].meta`` ``{"shape", "colour", "motion"}``.

    Args:
        num_samples: length of the dataset.
        frames: frames per video; the shape travels ``frames - 1`` cells, so it must fit:
            ``frames - 1 <= grid - extent`` along the motion axis (extent 3 for all shapes but the
            bar's height of 1).
        size: pixels per side; a multiple of ``grid``.
        grid: cells per side of the drawing grid (match the pixel codec's ``grid`` for exact codes).
        seed: base seed; samples depend on ``(seed, split, index)`` only.
        split: ``"train"`` / ``"val"`` (all combinations except the held-out ones, uniformly) or
            ``"heldout"`` (cycles through the held-out combinations).
        shapes, colours, motions: the names drawn, subsets of :data:`SHAPES`, the palette's colours
            (not the background) and :data:`MOTIONS`; None = all shapes and motions and the
            :data:`COLOURS`. An unknown name is an error listing the valid ones.
        heldout: held-out (shape, colour, motion) triples; default :data:`HELDOUT_COMBOS` restricted
            to the chosen shapes, colours and motions (may be empty: then give ``heldout`` to use
            ``split="heldout"``). Restricting never puts a held-out triple into train / val.
        random_start: draw the start cell at random within the range that keeps every frame inside
            the grid (default), or start at the centre of that range, so the caption alone
            determines the video (the quickstart uses this: a 3-minute CPU run can then learn to
            compose colour, shape and motion for unseen captions).
        captions: ``"short"`` (:func:`caption`) or ``"detailed"`` (:func:`detailed_caption`, which
            also names the start position, so it depends on the drawn start).
    """

    name: ClassVar[str] = "shapes"
    modalities: ClassVar[tuple[str, ...]] = ("video",)

    def __init__(
        self,
        num_samples: int = 1024,
        frames: int = 6,
        size: int = 32,
        grid: int = 8,
        seed: int = 0,
        split: str = "train",
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | None = None,
        motions: Sequence[str] | None = None,
        heldout: Sequence[Sequence[str]] | None = None,
        random_start: bool = True,
        captions: str = "short",
    ) -> None:
        for name, value, low in (("num_samples", num_samples, 0), ("frames", frames, 1), ("size", size, 1),
                                 ("grid", grid, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ShapesDataset: {name} must be an int >= {low}, got {value!r}")
        if size % grid:
            raise ValueError(f"ShapesDataset: size={size} must be a multiple of grid={grid}")
        if split not in SPLITS:
            raise ValueError(f"ShapesDataset: unknown split {split!r}; expected one of {SPLITS}")
        if captions not in CAPTION_STYLES:
            raise ValueError(f"ShapesDataset: unknown captions style {captions!r}; expected one of {CAPTION_STYLES}")
        self.captions = captions
        self.shapes = choose_names("ShapesDataset", "shapes", shapes, tuple(SHAPES))
        self.colours = choose_names("ShapesDataset", "colours", colours, COLOURS,
                                    allowed=tuple(c for c in DEFAULT_PALETTE if c != BACKGROUND))
        self.motions = choose_names("ShapesDataset", "motions", motions, tuple(MOTIONS))
        self.num_samples, self.frames, self.size, self.grid = num_samples, frames, size, grid
        self.seed, self.split = seed, split
        self.skipped: list[dict[str, str]] = []  # a generator never skips anything
        self.random_start = bool(random_start)
        self._check_fits()

        self.seen, self.heldout = split_combinations(
            "ShapesDataset", {"shapes": self.shapes, "colours": self.colours, "motions": self.motions},
            HELDOUT_COMBOS, heldout)
        if split == "heldout" and not self.heldout:
            raise ValueError(f"ShapesDataset: split='heldout' but no default held-out combination uses only "
                             f"shapes={list(self.shapes)}, colours={list(self.colours)}, motions={list(self.motions)}; "
                             "pass heldout=[[shape, colour, motion], ...] from those")

    def _check_fits(self) -> None:
        travel = self.frames - 1
        for shape, motion in product(self.shapes, self.motions):
            rows, cols = len(SHAPES[shape]), len(SHAPES[shape][0])
            extent = rows if MOTIONS[motion][0] else cols
            if travel > self.grid - extent:
                raise ValueError(f"ShapesDataset: a {shape} moving {motion} travels {travel} cells in {self.frames} "
                                 f"frames but only {self.grid - extent} fit in a {self.grid}-cell grid; "
                                 "use fewer frames or a larger grid")

    def __len__(self) -> int:
        return self.num_samples

    def caption_of(self, shape: str, colour: str, motion: str, start: tuple[int, int]) -> str:
        """The caption of a video in this dataset's ``captions`` style (``start`` = first top-left cell)."""
        if self.captions == "short":
            return caption(shape, colour, motion)
        return detailed_caption(shape, colour, motion, start, self.frames, self.grid)

    def heldout_captions(self) -> list[str]:
        """Captions of the held-out combinations, in :attr:`heldout` order. Detailed captions describe
        the centred start (the one ``random_start=False`` draws), so they are prompts for one video."""
        return [self.caption_of(*c, self.centred_start(c[0], c[2])) for c in self.heldout]

    def describe(self, frames: Tensor) -> dict[str, str | None]:
        """What a video shows, as ``{"colour", "shape", "motion"}`` (see :func:`describe_video`); used to
        score generated samples against their captions. Frames finer than the grid (``[F, size, size, 3]``,
        e.g. decoded from latents) are first read at grid resolution: each cell's mean colour snapped to
        the nearest palette colour (:meth:`PixelTokenizer.quantize`)."""
        if frames.dim() == 4 and frames.shape[1] > self.grid and frames.shape[1] % self.grid == 0 \
                and frames.shape[2] % self.grid == 0:
            from mmgrow.tokenizers.pixels import PixelTokenizer

            codec = PixelTokenizer(grid=self.grid)
            frames = codec.palette[codec.quantize(frames)]
        return describe_video(frames)

    def heldout_prompts(self) -> list[tuple[str, dict[str, str]]]:
        """``(caption, {"shape", "colour", "motion"})`` for each held-out combination."""
        return [(text, _meta(*c)) for text, c in zip(self.heldout_captions(), self.heldout)]

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"ShapesDataset index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        # A str seed is hashed with SHA-512 by `random`, so samples do not depend on PYTHONHASHSEED.
        rng = random.Random(f"shapes/{self.seed}/{self.split}/{index}")
        if self.split == "heldout":
            shape, colour, motion = self.heldout[index % len(self.heldout)]
        else:
            shape, colour, motion = rng.choice(self.seen)
        start = self.start_cell(shape, motion, rng)
        video = self.draw(shape, colour, motion, start)
        return Sample(media={"video": video}, text=self.caption_of(shape, colour, motion, start),
                      meta=_meta(shape, colour, motion))

    def _start_ranges(self, shape: str, motion: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """Inclusive (row, column) ranges of the first top-left cell that keep every frame inside the
        grid: ``r0 + d_row * t`` in ``[0, grid - rows]`` for all ``t < frames``."""
        rows, cols = len(SHAPES[shape]), len(SHAPES[shape][0])
        d_row, d_col = MOTIONS[motion]
        travel = self.frames - 1
        return ((max(0, -d_row * travel), self.grid - rows - max(0, d_row * travel)),
                (max(0, -d_col * travel), self.grid - cols - max(0, d_col * travel)))

    def centred_start(self, shape: str, motion: str) -> tuple[int, int]:
        """The centre of the allowed start range (what ``random_start=False`` uses)."""
        r_range, c_range = self._start_ranges(shape, motion)
        return sum(r_range) // 2, sum(c_range) // 2

    def start_cell(self, shape: str, motion: str, rng: random.Random) -> tuple[int, int]:
        """The first top-left cell ``(row, col)``: random within the allowed range, or centred."""
        if not self.random_start:  # the caption alone determines the video
            return self.centred_start(shape, motion)
        r_range, c_range = self._start_ranges(shape, motion)
        return rng.randint(*r_range), rng.randint(*c_range)

    def render(self, shape: str, colour: str, motion: str, rng: random.Random) -> Tensor:
        """``uint8 [frames, size, size, 3]``: the shape at a random (or, with ``random_start=False``,
        centred) start, stepping one cell per frame."""
        return self.draw(shape, colour, motion, self.start_cell(shape, motion, rng))

    def draw(self, shape: str, colour: str, motion: str, start: tuple[int, int]) -> Tensor:
        """``uint8 [frames, size, size, 3]``: the shape's top-left cell at ``start`` in frame 0,
        stepping one cell per frame in the direction of ``motion``."""
        mask = torch.tensor([[ch == "#" for ch in row] for row in SHAPES[shape]])
        rows, cols = mask.shape
        d_row, d_col = MOTIONS[motion]
        r0, c0 = start
        cells = torch.zeros(self.frames, self.grid, self.grid, 3, dtype=torch.uint8)
        cells[:] = torch.tensor(DEFAULT_PALETTE[BACKGROUND], dtype=torch.uint8)
        rgb = torch.tensor(DEFAULT_PALETTE[colour], dtype=torch.uint8)
        for t in range(self.frames):
            r, c = r0 + d_row * t, c0 + d_col * t
            cells[t, r:r + rows, c:c + cols][mask] = rgb
        px = self.size // self.grid
        return cells.repeat_interleave(px, dim=1).repeat_interleave(px, dim=2)


def _meta(shape: str, colour: str, motion: str) -> dict[str, str]:
    return {"shape": shape, "colour": colour, "motion": motion}


def describe_video(frames: Tensor) -> dict[str, str | None]:
    """Read a (generated) shapes video back into words: the inverse of :meth:`ShapesDataset.render`.

    ``frames``: ``uint8 [F, g, g, 3]`` at grid resolution (what the pixel codec decodes to). Returns
    ``{"colour", "shape", "motion"}``; each is None when the video does not show one clearly:
    colour = the most frequent non-background palette colour; shape = the most frequent exact match
    of a frame's cropped foreground against :data:`SHAPES`; motion = the direction of the larger
    displacement of the foreground's bounding box between the first and last non-empty frames.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"describe_video expects uint8 frames [F, g, g, 3], got {frames.dtype} {tuple(frames.shape)}")
    background = torch.tensor(DEFAULT_PALETTE[BACKGROUND], dtype=torch.uint8)
    foreground = (frames != background).any(-1)  # [F, g, g]
    colours: list[str] = []
    for name, rgb in DEFAULT_PALETTE.items():
        if name != BACKGROUND:
            colours += [name] * int((frames == torch.tensor(rgb, dtype=torch.uint8)).all(-1).sum())
    colour = max(set(colours), key=colours.count) if colours else None
    shapes, corners = [], []
    for fg in foreground:
        if not fg.any():
            continue
        rows, cols = fg.any(1).nonzero()[:, 0], fg.any(0).nonzero()[:, 0]
        crop = fg[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
        corners.append((int(rows[0]), int(cols[0])))
        for name, pattern in SHAPES.items():
            mask = torch.tensor([[ch == "#" for ch in row] for row in pattern])
            if mask.shape == crop.shape and torch.equal(mask, crop):
                shapes.append(name)
    shape = max(set(shapes), key=shapes.count) if shapes else None
    motion = None
    if len(corners) >= 2:
        d_row, d_col = corners[-1][0] - corners[0][0], corners[-1][1] - corners[0][1]
        if abs(d_row) > abs(d_col):
            motion = "down" if d_row > 0 else "up"
        elif abs(d_col) > abs(d_row):
            motion = "right" if d_col > 0 else "left"
    return {"colour": colour, "shape": shape, "motion": motion}
