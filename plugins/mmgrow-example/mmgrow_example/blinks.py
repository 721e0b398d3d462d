"""``blinks``: a template third-party dataset (plugin kind ``datasets``).

Each sample is a short black video, ``uint8 [frames, size, size, 3]``, in which a white square in
the centre is lit on some frames; the caption counts them: ``"the light blinks 3 times"``. Which
frames are lit is drawn from ``random.Random("blinks/<seed>/<split>/<index>")``, so a sample
depends only on ``(seed, split, index)`` (a string seed is hashed with SHA-512, never with
``PYTHONHASHSEED``). ``heldout`` samples have every frame lit, a count train and val never show.
"""

from __future__ import annotations

import random
from typing import ClassVar

import torch
from mmgrow.protocols import DATASET_SPLITS, Dataset, Sample


class BlinksDataset(Dataset):
    """``num_samples`` blinking-light videos; see the module doc.

    Args:
        num_samples, seed, split: the dataset contract (``split`` in train | val | heldout).
        frames: frames per video (>= 2).
        size: pixels per side; the light is the centred ``size // 2`` square.
    """

    name: ClassVar[str] = "blinks"
    modalities: ClassVar[tuple[str, ...]] = ("video",)

    def __init__(self, num_samples: int = 256, seed: int = 0, split: str = "train", frames: int = 4,
                 size: int = 8) -> None:
        super().__init__(num_samples, seed, split)
        if split not in DATASET_SPLITS:
            raise ValueError(f"blinks: unknown split {split!r}; expected one of {DATASET_SPLITS}")
        if frames < 2 or size < 2:
            raise ValueError(f"blinks: frames and size must be >= 2, got frames={frames}, size={size}")
        self.frames, self.size = frames, size

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"blinks index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        rng = random.Random(f"blinks/{self.seed}/{self.split}/{index}")
        lit = [True] * self.frames if self.split == "heldout" else [rng.random() < 0.5 for _ in range(self.frames - 1)] + [False]
        video = torch.zeros(self.frames, self.size, self.size, 3, dtype=torch.uint8)
        lo, hi = self.size // 4, self.size // 4 + self.size // 2
        for f, on in enumerate(lit):
            if on:
                video[f, lo:hi, lo:hi] = 255
        count = sum(lit)
        return Sample(media={"video": video}, text=f"the light blinks {count} times", meta={"count": count})

    def heldout_prompts(self) -> list[tuple[str, dict[str, int]]]:
        return [(f"the light blinks {self.frames} times", {"count": self.frames})]
