"""Scenes: an embedded, seeded still-image dataset of several shapes (nothing downloaded).

Each sample is one image ``uint8 [size, size, 3]``: a black background with ``min_objects ..
max_objects`` shapes of :data:`~mmgrow.data.synthetic.shapes.SHAPES` in colours of
:data:`~mmgrow.data.synthetic.shapes.COLOURS`, drawn on a ``grid x grid`` cell grid with exact
:data:`~mmgrow.tokenizers.pixels.DEFAULT_PALETTE` colours (so the ``image_pixels`` codec with the
same grid quantises it exactly). Rules of a scene:

* objects never overlap, and at least one empty cell separates their bounding boxes (also
  diagonally), so every object is a separate blob and its box is exact;
* the ``(shape, colour)`` pairs of one image are distinct, so "the red square" names one object;
* ``split="train"`` / ``"val"`` use only seen pairs; ``split="heldout"`` images hold one held-out
  pair (:data:`HELDOUT_PAIRS`, cycling with the index) and otherwise seen pairs.

The caption lists the objects in reading order (by the top-left cell of their bounding box,
row-major), each as ``a <colour> <shape> at the <position>`` (:func:`position_words`), joined
like English: ``"x"``, ``"x and y"``, ``"x, y and z"``::

    a red square at the top left and a blue ring at the bottom right

``meta``: ``{"objects": [{"shape", "colour", "box": [x0, y0, x1, y1], "position"}, ...], "count": n}``
in caption order; ``box`` holds floats in ``[0, 1]``, the pixel edges of the bounding box divided
by ``size`` (``x`` = column, ``y`` = row; ``x1``, ``y1`` are the far edges, exclusive).
Samples are random access and deterministic per ``(seed, split, index)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.checks import int_at_least, positive_int
from mmgrow.data.synthetic.combinations import choose_names, split_combinations
from mmgrow.data.synthetic.shapes import BACKGROUND, COLOURS, SHAPES, position_words
from mmgrow.protocols import DATASET_SPLITS, Dataset, Sample
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE

HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("square", "red"),
    ("ring", "blue"),
    ("cross", "yellow"),
    ("bar", "magenta"),
)
"""(shape, colour) pairs that appear only in the ``"heldout"`` split."""

MAX_EXTENT = max(max(len(m), len(m[0])) for m in SHAPES.values())
"""The longest side of any shape in cells (3)."""

PLACEMENT_TRIES = 100
"""Fresh attempts at placing a scene's objects before giving up (never reached for feasible grids)."""


def object_phrase(obj: dict[str, Any]) -> str:
    """``"a red square at the top left"`` for an object ``{"shape", "colour", "position"}``."""
    return f"a {obj['colour']} {obj['shape']} at the {obj['position']}"


def join_phrases(phrases: Sequence[str]) -> str:
    """English list: ``"x"``, ``"x and y"``, ``"x, y and z"``."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def scene_caption(objects: Sequence[dict[str, Any]]) -> str:
    """The caption of ``objects`` (already in reading order): their phrases joined."""
    return join_phrases([object_phrase(o) for o in objects])


def box_of(shape: str, start: tuple[int, int], grid: int) -> list[float]:
    """``[x0, y0, x1, y1]`` in ``[0, 1]`` of ``shape`` with its top-left cell at ``start = (row, col)``:
    cell edges over ``grid`` (equal to pixel edges over ``size`` as every cell is ``size / grid`` pixels)."""
    rows, cols = len(SHAPES[shape]), len(SHAPES[shape][0])
    r0, c0 = start
    return [c0 / grid, r0 / grid, (c0 + cols) / grid, (r0 + rows) / grid]


def scene_object(shape: str, colour: str, start: tuple[int, int], grid: int) -> dict[str, Any]:
    """The meta entry of one object (module docstring)."""
    return {"shape": shape, "colour": colour, "box": box_of(shape, start, grid),
            "position": position_words(shape, start, grid)}


class SceneDataset(Dataset):
    """Random-access dataset of still scenes (module docstring).

    ``ds[i].media["image"]`` is ``uint8 [size, size, 3]``, ``ds[i].text`` the caption and
    ``ds[i].meta`` ``{"objects", "count"}``.

    Args:
        num_samples: length of the dataset.
        seed: base seed; samples depend on ``(seed, split, index)`` only.
        split: ``"train"`` / ``"val"`` (seen pairs only) or ``"heldout"`` (one held-out pair each).
        size: pixels per side; a multiple of ``grid``.
        grid: cells per side of the drawing grid (match the pixel codec's ``grid`` for exact codes).
        min_objects, max_objects: objects per image, drawn uniformly in this range; at most as many
            as fit with gaps (``((grid + 1) // 4) ** 2`` 3x3 slots) and as there are seen pairs.
        shapes, colours: the names drawn (subsets of ``SHAPES`` and of the palette's colours other
            than the background); None = all shapes and :data:`COLOURS`.
        heldout: held-out ``(shape, colour)`` pairs; default :data:`HELDOUT_PAIRS` restricted to the
            chosen shapes and colours. Every chosen shape and colour must still occur in a seen pair.
    """

    name: ClassVar[str] = "scenes"
    modalities: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(
        self,
        num_samples: int = 1024,
        seed: int = 0,
        split: str = "train",
        size: int = 32,
        grid: int = 8,
        min_objects: int = 1,
        max_objects: int = 3,
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | None = None,
        heldout: Sequence[Sequence[str]] | None = None,
    ) -> None:
        int_at_least("SceneDataset", "num_samples", num_samples, 0)
        positive_int("SceneDataset", "size", size)
        int_at_least("SceneDataset", "grid", grid, MAX_EXTENT)
        positive_int("SceneDataset", "min_objects", min_objects)
        int_at_least("SceneDataset", "max_objects", max_objects, min_objects)
        if size % grid:
            raise ValueError(f"SceneDataset: size={size} must be a multiple of grid={grid}")
        if split not in DATASET_SPLITS:
            raise ValueError(f"SceneDataset: unknown split {split!r}; expected one of {DATASET_SPLITS}")
        # Objects need MAX_EXTENT cells plus one gap cell each way, so slots of MAX_EXTENT + 1 cells
        # tile the grid (the last slot needs no trailing gap): a packing that always exists.
        slots = ((grid + 1) // (MAX_EXTENT + 1)) ** 2
        if max_objects > slots:
            raise ValueError(f"SceneDataset: max_objects={max_objects} objects do not fit with gaps in a "
                             f"{grid}x{grid} grid (at most {slots}); use fewer objects or a larger grid")
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.size, self.grid, self.min_objects, self.max_objects = size, grid, min_objects, max_objects
        self.skipped: list[dict[str, str]] = []  # a generator never skips anything
        self.shapes = choose_names("SceneDataset", "shapes", shapes, tuple(SHAPES))
        self.colours = choose_names("SceneDataset", "colours", colours, COLOURS,
                                    allowed=tuple(c for c in DEFAULT_PALETTE if c != BACKGROUND))
        self.seen, self.heldout = split_combinations(
            "SceneDataset", {"shapes": self.shapes, "colours": self.colours}, HELDOUT_PAIRS, heldout)
        if split == "heldout" and not self.heldout:
            raise ValueError(f"SceneDataset: split='heldout' but no default held-out pair uses only "
                             f"shapes={list(self.shapes)}, colours={list(self.colours)}; pass "
                             "heldout=[[shape, colour], ...] from those")
        if max_objects - (split == "heldout") > len(self.seen):
            raise ValueError(f"SceneDataset: max_objects={max_objects} needs that many distinct seen (shape, colour) "
                             f"pairs, but only {len(self.seen)} exist; use fewer objects or more shapes/colours")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"SceneDataset index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        # A str seed is hashed with SHA-512 by `random`, so samples do not depend on PYTHONHASHSEED.
        rng = random.Random(f"scenes/{self.seed}/{self.split}/{index}")
        count = rng.randint(self.min_objects, self.max_objects)
        if self.split == "heldout":
            pairs = [self.heldout[index % len(self.heldout)], *rng.sample(self.seen, count - 1)]
        else:
            pairs = rng.sample(self.seen, count)
        starts = self.place([shape for shape, _ in pairs], rng)
        objects = sorted(((start, shape, colour) for (shape, colour), start in zip(pairs, starts)))
        image = self.draw([(shape, colour, start) for start, shape, colour in objects])
        meta_objects = [scene_object(shape, colour, start, self.grid) for start, shape, colour in objects]
        return Sample(media={"image": image}, text=scene_caption(meta_objects),
                      meta={"objects": meta_objects, "count": count})

    def place(self, shapes: Sequence[str], rng: random.Random) -> list[tuple[int, int]]:
        """Top-left cells ``(row, col)`` for ``shapes``, one after another, each uniform among the
        cells where its box, grown by one gap cell on every side, misses the earlier boxes. A dead end
        (no room left) starts over with fresh draws of the same ``rng`` (deterministic)."""
        for _ in range(PLACEMENT_TRIES):
            taken: list[tuple[int, int, int, int]] = []  # (r0, c0, r1, c1) exclusive ends
            starts: list[tuple[int, int]] = []
            for shape in shapes:
                rows, cols = len(SHAPES[shape]), len(SHAPES[shape][0])
                free = [(r, c) for r in range(self.grid - rows + 1) for c in range(self.grid - cols + 1)
                        if all(r + rows + 1 <= t0 or t1 + 1 <= r or c + cols + 1 <= u0 or u1 + 1 <= c
                               for t0, u0, t1, u1 in taken)]
                if not free:
                    break
                r, c = rng.choice(free)
                taken.append((r, c, r + rows, c + cols))
                starts.append((r, c))
            else:
                return starts
        raise RuntimeError(f"SceneDataset: could not place {list(shapes)} in a {self.grid}x{self.grid} grid "
                           f"in {PLACEMENT_TRIES} tries")

    def draw(self, objects: Sequence[tuple[str, str, tuple[int, int]]]) -> Tensor:
        """``uint8 [size, size, 3]``: each ``(shape, colour, (row, col))`` painted on the black grid, every
        cell ``size / grid`` pixels of one exact palette colour."""
        cells = torch.zeros(self.grid, self.grid, 3, dtype=torch.uint8)
        cells[:] = torch.tensor(DEFAULT_PALETTE[BACKGROUND], dtype=torch.uint8)
        for shape, colour, (r, c) in objects:
            mask = torch.tensor([[ch == "#" for ch in row] for row in SHAPES[shape]])
            cells[r:r + mask.shape[0], c:c + mask.shape[1]][mask] = torch.tensor(DEFAULT_PALETTE[colour],
                                                                                dtype=torch.uint8)
        px = self.size // self.grid
        return cells.repeat_interleave(px, dim=0).repeat_interleave(px, dim=1)

    def centred_start(self, shape: str) -> tuple[int, int]:
        """The top-left cell that centres ``shape`` (rounded towards the top left)."""
        return (self.grid - len(SHAPES[shape])) // 2, (self.grid - len(SHAPES[shape][0])) // 2

    def heldout_prompts(self) -> list[tuple[str, dict[str, Any]]]:
        """``(caption, meta)`` of a one-object scene per held-out pair, the object centred
        (``"a red square at the centre"``), in :attr:`heldout` order."""
        prompts = []
        for shape, colour in self.heldout:
            obj = scene_object(shape, colour, self.centred_start(shape), self.grid)
            prompts.append((scene_caption([obj]), {"objects": [obj], "count": 1}))
        return prompts
