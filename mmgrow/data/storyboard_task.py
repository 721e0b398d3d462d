"""``storyboard_to_video``: a whole multi-scene storyboard as one sequence of fixed-length segments.

TTT-video (``ttt-video-dit``) generates a long video as fixed-length segments, each conditioned on
its own text, with ``<scene_start>`` / ``<scene_end>`` inserted automatically from the storyboard's
``requires_scene_transition`` flags; attention is *local* to a segment while TTT memory layers run
over the whole sequence. At toy scale, segment ``k`` (``segment_frames`` frames) becomes::

    Segment("text", text_k, "input", block=k), Segment("video", frames_k, "target", block=k)

so its text and its frames form one bidirectional block (``local`` attention sees exactly that
group) and the sequence holds the storyboard in order. ``text_k`` is the scene's text with markers:

* ``"<scene_start> "`` before the first segment text of a scene whose flag is True;
* ``" <scene_end>"`` after the last segment text of a scene followed by a transition (the next
  scene's flag is True), and of the last scene.

Tokens of one block see each other both ways, so this layout suits objectives that predict a whole
segment at once (diffusion / flow matching); a next-token objective would see later frames of the
segment it predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.data.synthetic.storyboard import Scene, parse_storyboard
from mmgrow.protocols import Sample, Segment, Task

SCENE_START = "<scene_start>"
SCENE_END = "<scene_end>"


def segment_texts(scenes: Sequence[Scene], num_segments_per_scene: Sequence[int], scene_start: str = SCENE_START,
                  scene_end: str = SCENE_END) -> list[str]:
    """One text per segment, with the scene markers placed as the module docstring says."""
    texts = []
    for s, (scene, count) in enumerate(zip(scenes, num_segments_per_scene)):
        ends_shot = s == len(scenes) - 1 or scenes[s + 1].requires_scene_transition
        for j in range(count):
            text = scene.text
            if j == 0 and scene.requires_scene_transition:
                text = f"{scene_start} {text}"
            if j == count - 1 and ends_shot:
                text = f"{text} {scene_end}"
            texts.append(text)
    return texts


def storyboard_segments(scenes: Any, num_segments_per_scene: int | Sequence[int] | None, segment_frames: int,
                        video: Tensor | None = None, *, frame_size: int | tuple[int, int] = 32,
                        scene_start: str = SCENE_START, scene_end: str = SCENE_END) -> list[Segment]:
    """The segments of a storyboard, for training (``video`` given) or generation (``video=None``).

    Args:
        scenes: anything :func:`~mmgrow.data.synthetic.storyboard.parse_storyboard` reads (a user's
            JSON-like list, dataset metadata, :class:`Scene` s).
        num_segments_per_scene: segments per scene, one int for all or one per scene; None = each
            scene's own ``segments``.
        segment_frames: frames per segment ``k``.
        video: ``uint8 [S * k, H, W, 3]`` with ``S`` the total number of segments, or None for a
            placeholder of black frames ``[k, H, W, 3]`` per segment (``H, W`` from ``frame_size``),
            which a sampler overwrites.
        frame_size: ``H`` (square) or ``(H, W)`` of the placeholder.
        scene_start, scene_end: the marker strings.

    Returns ``[text_0, video_0, text_1, video_1, ...]`` with ``block = k`` on both segments of segment ``k``.
    """
    scenes = parse_storyboard(scenes)
    if num_segments_per_scene is None:
        counts = [s.segments for s in scenes]
    elif isinstance(num_segments_per_scene, int) and not isinstance(num_segments_per_scene, bool):
        counts = [num_segments_per_scene] * len(scenes)
    else:
        counts = list(num_segments_per_scene)
        if len(counts) != len(scenes):
            raise ValueError(f"storyboard_segments: {len(counts)} segment counts for {len(scenes)} scenes")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ValueError(f"storyboard_segments: segments per scene must be positive ints, got {counts}")
    if isinstance(segment_frames, bool) or not isinstance(segment_frames, int) or segment_frames < 1:
        raise ValueError(f"storyboard_segments: segment_frames must be a positive int, got {segment_frames!r}")
    total = sum(counts)
    if video is None:
        h, w = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
        clips = [torch.zeros(segment_frames, h, w, 3, dtype=torch.uint8) for _ in range(total)]
    else:
        if not isinstance(video, Tensor) or video.dim() != 4 or video.shape[-1] != 3:
            raise ValueError(f"storyboard_segments: video must be a tensor [F, H, W, 3], got "
                             f"{tuple(getattr(video, 'shape', ())) or type(video).__name__}")
        if video.shape[0] != total * segment_frames:
            raise ValueError(f"storyboard_segments: the storyboard has {total} segments of {segment_frames} frames "
                             f"= {total * segment_frames} frames, but the video has {video.shape[0]}")
        clips = list(video.split(segment_frames))
    texts = segment_texts(scenes, counts, scene_start, scene_end)
    segments = []
    for k, (text, clip) in enumerate(zip(texts, clips)):
        segments += [Segment("text", text, "input", block=k), Segment("video", clip, "target", block=k)]
    return segments


class StoryboardToVideo(Task):
    """A ``storyboards`` sample -> ``[text_k (input), video_k (target)]`` per segment ``k`` (module docstring).

    Args:
        scene_start, scene_end: the marker strings inserted into the segment texts.
    """

    name: ClassVar[str] = "storyboard_to_video"
    modalities: ClassVar[Sequence[str]] = ("text", "video")
    target_modalities: ClassVar[Sequence[str]] = ("video",)

    def __init__(self, scene_start: str = SCENE_START, scene_end: str = SCENE_END) -> None:
        for name, value in (("scene_start", scene_start), ("scene_end", scene_end)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"StoryboardToVideo: {name} must be a non-empty string, got {value!r}")
        self.scene_start, self.scene_end = scene_start, scene_end

    def segments(self, sample: Sample) -> list[Segment]:
        if not isinstance(sample, Sample):
            raise TypeError(f"{self.name}: expected an mmgrow.protocols.Sample, got {type(sample).__name__}")
        missing = [k for k in ("scenes", "segment_frames") if k not in sample.meta]
        if missing or "video" not in sample.media:
            raise KeyError(f"{self.name}: expected a storyboard sample (meta 'scenes' and 'segment_frames', media "
                           f"'video'); missing meta {missing}, media has {sorted(sample.media)}")
        return storyboard_segments(sample.meta["scenes"], None, sample.meta["segment_frames"], sample.media["video"],
                                   scene_start=self.scene_start, scene_end=self.scene_end)
