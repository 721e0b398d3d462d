"""Needle retrieval: a long haystack with one marked item at a chosen depth, and a question about it.

LWM probes long context by hiding one fact in a long document and asking for it at the end. This
generator makes such examples at any size, deterministically per ``(seed, split, index)``:

* ``kind="text"``: ``length`` characters of filler words (lower-case letters and spaces, no digits)
  with the needle ``"the code is NN."`` (``NN`` a 2-digit number, 10..99) inside; question
  ``"what is the code?"``, answer ``"NN"``.
* ``kind="video"``: ``length`` frames, each a grey shape (:data:`~mmgrow.data.synthetic.shapes.SHAPES`)
  at a random cell on black; one frame, the needle, shows its shape in a colour instead; question
  ``"what colour was the marked shape?"``, answer the colour's name (``"red"`` ...).

**Depth.** With ``needle_len`` the needle's size in the haystack's unit (15 characters for text, one
frame for video), the needle starts at index::

    offset = round(depth * (length - needle_len))          # Python's round: halves go to even

so ``depth=0`` puts it first and ``depth=1`` makes it end exactly at the haystack's end. The filler
is cut to size, so the needle may split a filler word (the offset is exact, not word-aligned).
``depth=None`` draws the depth uniformly from ``[0, 1]`` per sample; ``meta["depth"]`` always holds
the depth used and ``meta["offset"]`` the start index.

Sample fields: ``media`` is ``{"video": uint8 [length, size, size, 3]}`` for video and empty for text;
``text`` the question; ``meta`` ``{"haystack"`` (text kind only), ``"question"``, ``"answer"``,
``"depth"``, ``"length"``, ``"offset"``, ``"needle"``, ``"kind"}``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.checks import finite_number, int_at_least
from mmgrow.data.synthetic.combinations import choose_names
from mmgrow.data.synthetic.shapes import COLOURS, SHAPES
from mmgrow.protocols import Dataset, Sample
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE

KINDS = ("text", "video")
SPLITS = ("train", "val", "heldout")

FILLER_WORDS: tuple[str, ...] = (
    "the", "grass", "is", "green", "sky", "blue", "sun", "warm", "river", "flows", "slowly", "past", "old",
    "stone", "bridge", "birds", "sing", "morning", "wind", "moves", "trees", "quiet", "village", "road",
    "leads", "over", "hill", "clouds", "drift", "across", "field", "farmer", "walks", "home", "evening",
    "light", "fades", "water", "cold", "clear", "deep", "lake", "boat", "rests", "near", "shore",
)
"""Filler vocabulary: letters only (no digit can be mistaken for the code) and no word ``code``, so
the phrase ``"the code is"`` occurs exactly once in a haystack."""

QUESTIONS = {"text": "what is the code?", "video": "what colour was the marked shape?"}
BACKGROUND, HAYSTACK_COLOUR = "black", "grey"


def text_needle(code: int) -> str:
    """The marked item of a text haystack: ``"the code is 47."`` (15 characters)."""
    return f"the code is {code}."


TEXT_NEEDLE_LEN = len(text_needle(10))
VIDEO_NEEDLE_LEN = 1


def needle_offset(depth: float, length: int, needle_len: int) -> int:
    """Start index of the needle: ``round(depth * (length - needle_len))`` (module docstring)."""
    return round(depth * (length - needle_len))


class NeedleDataset(Dataset):
    """Random-access needle-in-a-haystack samples (module docstring).

    Args:
        num_samples: length of the dataset.
        kind: ``"text"`` (haystack of characters) or ``"video"`` (haystack of frames).
        length: haystack size in characters (text, ``>= 15``) or frames (video, ``>= 1``).
        depth: where the needle sits, a number in ``[0, 1]``, or None for a uniform random depth per sample.
        size, grid: frame side in pixels and drawing grid in cells (video; ``size`` a multiple of
            ``grid``, and ``grid >= 3`` so every shape fits). Match the pixel codec's ``grid``.
        colours: the needle colours drawn (video; palette names other than black and grey); default
            the shapes dataset's :data:`~mmgrow.data.synthetic.shapes.COLOURS`.
        seed, split: samples depend on ``(seed, split, index)`` only; ``split`` in ``train | val | heldout``.
    """

    name: ClassVar[str] = "needle"
    modalities: ClassVar[Sequence[str]] = ("text", "video")

    def __init__(self, num_samples: int = 256, kind: str = "text", length: int = 256, depth: float | None = None,
                 size: int = 32, grid: int = 8, colours: Sequence[str] | None = None, seed: int = 0,
                 split: str = "train") -> None:
        owner = "NeedleDataset"
        int_at_least(owner, "num_samples", num_samples, 0)
        if kind not in KINDS:
            raise ValueError(f"{owner}: kind must be one of {KINDS}, got {kind!r}")
        if split not in SPLITS:
            raise ValueError(f"{owner}: unknown split {split!r}; expected one of {SPLITS}")
        self.needle_len = TEXT_NEEDLE_LEN if kind == "text" else VIDEO_NEEDLE_LEN
        unit = "characters" if kind == "text" else "frames"
        if isinstance(length, bool) or not isinstance(length, int) or length < self.needle_len:
            raise ValueError(f"{owner}: length must be an int >= {self.needle_len} ({unit}: the {kind} needle alone "
                             f"takes {self.needle_len}), got {length!r}")
        if depth is not None:
            depth = finite_number(owner, "depth", depth, low=0, high=1)
        int_at_least(owner, "grid", grid, 3)
        int_at_least(owner, "size", size, 1)
        if size % grid:
            raise ValueError(f"{owner}: size={size} must be a multiple of grid={grid}")
        allowed = tuple(c for c in DEFAULT_PALETTE if c not in (BACKGROUND, HAYSTACK_COLOUR))
        self.colours = choose_names(owner, "colours", colours, COLOURS, allowed=allowed)
        self.num_samples, self.kind, self.length, self.depth = num_samples, kind, length, depth
        self.size, self.grid, self.seed, self.split = size, grid, seed, split
        self.skipped: list[Any] = []  # the dataset contract: generated samples are never skipped

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"NeedleDataset index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        # A str seed is hashed with SHA-512 by `random`: samples do not depend on PYTHONHASHSEED.
        rng = random.Random(f"needle/{self.kind}/{self.seed}/{self.split}/{index}")
        depth = rng.random() if self.depth is None else self.depth
        offset = needle_offset(depth, self.length, self.needle_len)
        meta: dict[str, Any] = {"kind": self.kind, "question": QUESTIONS[self.kind], "depth": depth,
                                "length": self.length, "offset": offset}
        if self.kind == "text":
            code = rng.randint(10, 99)
            filler = filler_text(self.length - self.needle_len, rng)
            needle = text_needle(code)
            meta.update(haystack=filler[:offset] + needle + filler[offset:], needle=needle, answer=str(code))
            return Sample(media={}, text=meta["question"], meta=meta)
        colour = rng.choice(self.colours)
        meta.update(needle=colour, answer=colour)
        return Sample(media={"video": self.draw(offset, colour, rng)}, text=meta["question"], meta=meta)

    def draw(self, offset: int, colour: str, rng: random.Random) -> Tensor:
        """``uint8 [length, size, size, 3]``: a random shape at a random cell per frame, grey except at
        frame ``offset`` (drawn in ``colour``)."""
        cells = torch.zeros(self.length, self.grid, self.grid, 3, dtype=torch.uint8)
        cells[:] = torch.tensor(DEFAULT_PALETTE[BACKGROUND], dtype=torch.uint8)
        for t in range(self.length):
            pattern = SHAPES[rng.choice(tuple(SHAPES))]
            mask = torch.tensor([[ch == "#" for ch in row] for row in pattern])
            rows, cols = mask.shape
            r, c = rng.randint(0, self.grid - rows), rng.randint(0, self.grid - cols)
            rgb = torch.tensor(DEFAULT_PALETTE[colour if t == offset else HAYSTACK_COLOUR], dtype=torch.uint8)
            cells[t, r:r + rows, c:c + cols][mask] = rgb
        px = self.size // self.grid
        return cells.repeat_interleave(px, dim=1).repeat_interleave(px, dim=2)


def filler_text(length: int, rng: random.Random) -> str:
    """Exactly ``length`` characters of space-separated :data:`FILLER_WORDS` (the last word cut)."""
    words: list[str] = []
    total = 0
    while total - 1 < length:  # the joined text has `total - 1` characters
        word = rng.choice(FILLER_WORDS)
        words.append(word)
        total += len(word) + 1
    return " ".join(words)[:length]
