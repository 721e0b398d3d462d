"""Multi-scene storyboards: the TTT-video storyboard format at toy scale, drawn with moving shapes.

A storyboard is a list of scenes (TTT-video, ``ttt-video-dit``: a JSON list whose items have
``text``, ``requires_scene_transition`` and optional ``neg_text``). Every scene is cut into
fixed-length *segments* of ``segment_frames`` frames (TTT-video: 3 s each, one text paragraph per
segment); here a scene is a shapes clip (:class:`~mmgrow.data.synthetic.shapes.ShapesDataset`)
of ``segments_per_scene * segment_frames`` frames and every segment of it repeats the scene text.

Scene semantics (what the pixels show, so a probe can check a generated storyboard):

* inside a scene the object keeps its shape and colour and moves one cell per frame in one
  direction (the scene's ``motion``);
* ``requires_scene_transition=True``: a *different object* appears (its (shape, colour) pair
  differs from the previous scene's) at a random start cell; scene 0 always has the flag;
* ``requires_scene_transition=False``: the *same object* continues (same shape and colour). Its
  first frame shows it where the previous scene's last frame left it, and its motion is drawn
  among the directions in which it can move on from there, so it continues without a jump (the
  reverse direction always qualifies when scenes have equal lengths). If the split allows no such direction (the held-out split, whose
  combinations fix the motion per object), the motion is kept and the start is the allowed start
  cell nearest to the previous end (the object jumps back by the fewest cells).

Splits follow the shapes dataset: every scene of a ``"train"`` / ``"val"`` storyboard shows a seen
(shape, colour, motion) combination, every scene of a ``"heldout"`` one a held-out combination.
Samples are deterministic per ``(seed, split, index)``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from mmgrow.data.synthetic.shapes import MOTIONS, ShapesDataset
from mmgrow.protocols import Dataset, Sample

SCENE_KEYS = ("text", "requires_scene_transition", "neg_text", "shape", "colour", "motion", "segments", "start")
"""Keys a storyboard item may have: the TTT-video ones, then what the dataset records."""

TEXT_SEPARATOR = ". "
"""Joins the scene texts into ``Sample.text``."""


@dataclass(frozen=True)
class Scene:
    """One scene of a storyboard.

    text: what the scene shows (non-empty); every segment of the scene is conditioned on it.
    requires_scene_transition: True when the scene starts a new shot (a different object here).
    neg_text: optional negative prompt (TTT-video), kept but unused by the toy models.
    shape, colour, motion, start: what the scene draws (known for dataset scenes, None for prompts).
    segments: number of fixed-length segments the scene spans.
    """

    text: str
    requires_scene_transition: bool = False
    neg_text: str | None = None
    shape: str | None = None
    colour: str | None = None
    motion: str | None = None
    segments: int = 1
    start: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"Scene: text must be a non-empty string, got {self.text!r}")
        if not isinstance(self.requires_scene_transition, bool):
            raise TypeError("Scene: requires_scene_transition must be a bool (true / false), got "
                            f"{self.requires_scene_transition!r}")
        if self.neg_text is not None and not isinstance(self.neg_text, str):
            raise TypeError(f"Scene: neg_text must be a string or absent, got {self.neg_text!r}")
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(f"Scene: segments must be a positive int, got {self.segments!r}")
        if self.start is not None:
            object.__setattr__(self, "start", tuple(int(v) for v in self.start))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-like item of this scene (``start`` as a list); :func:`parse_storyboard` reads it back."""
        item = asdict(self)
        item["start"] = None if self.start is None else list(self.start)
        return item


def parse_storyboard(obj: Any) -> list[Scene]:
    """A storyboard -> scenes.

    ``obj``: a list (or its JSON text) of items ``{"text": str, "requires_scene_transition": bool,
    "neg_text": str (optional)}`` — what a user writes — or of dicts with the further keys of
    :data:`SCENE_KEYS` (dataset metadata), or of :class:`Scene` s. A missing flag means False.
    Errors name the scene index and what was expected.
    """
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as exc:
            raise ValueError(f"parse_storyboard: the string is not valid JSON: {exc}") from exc
    if not isinstance(obj, (list, tuple)):
        raise TypeError(f"parse_storyboard: a storyboard is a list of scenes, got {type(obj).__name__}")
    if not obj:
        raise ValueError("parse_storyboard: the storyboard has no scenes; expected at least one "
                         '{"text": ..., "requires_scene_transition": ...}')
    scenes = []
    for i, item in enumerate(obj):
        if isinstance(item, Scene):
            scenes.append(item)
            continue
        if not isinstance(item, dict):
            raise TypeError(f"parse_storyboard: scene {i} must be a dict with a 'text', got {type(item).__name__}")
        unknown = sorted(set(item) - set(SCENE_KEYS))
        if unknown:
            raise ValueError(f"parse_storyboard: scene {i} has unknown keys {unknown}; allowed: {list(SCENE_KEYS)}")
        if "text" not in item:
            raise ValueError(f"parse_storyboard: scene {i} has no 'text'")
        try:
            scenes.append(Scene(**{k: v for k, v in item.items() if not (k == "segments" and v is None)}))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"parse_storyboard: scene {i}: {exc}") from exc
    return scenes


class StoryboardDataset(Dataset):
    """Random-access dataset of multi-scene storyboard :class:`~mmgrow.protocols.Sample` s.

    ``ds[i].media["video"]``: ``uint8 [F_total, size, size, 3]``, the scenes one after the other
    (``F_total = num_scenes * segments_per_scene * segment_frames``); ``ds[i].text``: the scene texts
    joined by :data:`TEXT_SEPARATOR`; ``ds[i].meta``: ``{"scenes": [Scene.to_dict() ...],
    "segment_frames": k}`` (each scene dict has ``text``, ``requires_scene_transition``, ``shape``,
    ``colour``, ``motion``, ``segments``, ``start``).

    Args:
        num_samples, seed, split: as :class:`ShapesDataset` (``split`` in train | val | heldout).
        scenes: number of scenes, an int or an inclusive ``(low, high)`` range drawn uniformly.
        segments_per_scene: segments per scene; a scene's ``segments_per_scene * segment_frames - 1``
            cells of travel must fit in the grid (an error says when they do not).
        segment_frames: frames per segment ``k``.
        size, grid, shapes, colours, motions, heldout, captions: passed to :class:`ShapesDataset`
            (scene texts are its captions of the scene's clip).
        transition_prob: probability that a scene after the first requires a transition.
    """

    name: ClassVar[str] = "storyboards"
    modalities: ClassVar[tuple[str, ...]] = ("video",)

    def __init__(
        self,
        num_samples: int = 1024,
        seed: int = 0,
        split: str = "train",
        scenes: int | Sequence[int] = (1, 3),
        segments_per_scene: int = 1,
        segment_frames: int = 4,
        size: int = 32,
        grid: int = 8,
        transition_prob: float = 0.5,
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | None = None,
        motions: Sequence[str] | None = None,
        heldout: Sequence[Sequence[str]] | None = None,
        captions: str = "short",
    ) -> None:
        self.scene_range = _scene_range(scenes)
        for name, value in (("segments_per_scene", segments_per_scene), ("segment_frames", segment_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StoryboardDataset: {name} must be a positive int, got {value!r}")
        if isinstance(transition_prob, bool) or not 0.0 <= float(transition_prob) <= 1.0:
            raise ValueError(f"StoryboardDataset: transition_prob must lie in [0, 1], got {transition_prob!r}")
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.skipped: list[dict[str, str]] = []  # a generator never skips anything
        self.scenes, self.segments_per_scene, self.segment_frames = scenes, segments_per_scene, segment_frames
        self.transition_prob = float(transition_prob)
        # One shapes clip per scene: it validates names, split, sizes and that a scene's travel fits.
        self.clips = ShapesDataset(num_samples=num_samples, frames=segments_per_scene * segment_frames, size=size,
                                   grid=grid, seed=seed, split=split, shapes=shapes, colours=colours,
                                   motions=motions, heldout=heldout, captions=captions)
        self.combos = self.clips.heldout if split == "heldout" else self.clips.seen
        """The (shape, colour, motion) triples scenes of this split may show."""
        if self.scene_range[1] > 1 and self.transition_prob > 0 and len({c[:2] for c in self.combos}) < 2:
            raise ValueError(f"StoryboardDataset: a transition needs a second object but split {split!r} offers only "
                             f"the (shape, colour) pair {self.combos[0][:2]}; allow more shapes or colours")

    @property
    def scene_frames(self) -> int:
        return self.segments_per_scene * self.segment_frames

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"StoryboardDataset index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        rng = random.Random(f"storyboards/{self.seed}/{self.split}/{index}")
        scenes = self.draw_scenes(rng.randint(*self.scene_range), rng)
        video = torch.cat([self.clips.draw(s.shape, s.colour, s.motion, s.start) for s in scenes])
        return Sample(media={"video": video}, text=TEXT_SEPARATOR.join(s.text for s in scenes),
                      meta={"scenes": [s.to_dict() for s in scenes], "segment_frames": self.segment_frames})

    def draw_scenes(self, num_scenes: int, rng: random.Random) -> list[Scene]:
        """``num_scenes`` scenes following the module's semantics, drawn with ``rng``."""
        scenes: list[Scene] = []
        for i in range(num_scenes):
            transition = i == 0 or rng.random() < self.transition_prob
            if transition:
                previous = None if i == 0 else (scenes[-1].shape, scenes[-1].colour)
                shape, colour, motion = rng.choice([c for c in self.combos if c[:2] != previous])
                start = self.clips.start_cell(shape, motion, rng)
            else:
                shape, colour, motion, start = self._continue(scenes[-1], rng)
            text = self.clips.caption_of(shape, colour, motion, start)
            scenes.append(Scene(text, transition, shape=shape, colour=colour, motion=motion,
                                segments=self.segments_per_scene, start=start))
        return scenes

    def _continue(self, previous: Scene, rng: random.Random) -> tuple[str, str, str, tuple[int, int]]:
        """The same object as ``previous``, continuing from its last cell (module docstring)."""
        shape, colour = previous.shape, previous.colour
        d_row, d_col = MOTIONS[previous.motion]
        travel = self.scene_frames - 1
        end = (previous.start[0] + d_row * travel, previous.start[1] + d_col * travel)
        allowed = [m for m in MOTIONS if (shape, colour, m) in self.combos]
        # ShapesDataset's own ranges, so "fits" means exactly what its draw accepts.
        ranges = {m: self.clips._start_ranges(shape, m) for m in allowed}
        fitting = [m for m in allowed if all(lo <= v <= hi for v, (lo, hi) in zip(end, ranges[m]))]
        if fitting:
            return shape, colour, rng.choice(fitting), end
        motion = rng.choice(allowed)
        nearest = tuple(min(max(v, lo), hi) for v, (lo, hi) in zip(end, ranges[motion]))
        return shape, colour, motion, nearest


def _scene_range(scenes: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(scenes, int) and not isinstance(scenes, bool):
        low = high = scenes
    elif isinstance(scenes, (list, tuple)) and len(scenes) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in scenes):
        low, high = scenes
    else:
        raise ValueError(f"StoryboardDataset: scenes must be an int or a (low, high) pair of ints, got {scenes!r}")
    if not 1 <= low <= high:
        raise ValueError(f"StoryboardDataset: scenes must satisfy 1 <= low <= high, got {scenes!r}")
    return int(low), int(high)


