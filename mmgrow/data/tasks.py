"""Built-in tasks: a :class:`~mmgrow.protocols.Sample` -> ordered input / target segments.

``text_to_video``: the caption conditions, the video is predicted (``[text input][video target]``).
``video_to_text``: captioning, the reverse (``[video input][text target]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from mmgrow.protocols import Sample, Segment, Task


def _video_of(sample: Sample, task: str):
    if not isinstance(sample, Sample):
        raise TypeError(f"{task}: expected an mmgrow.protocols.Sample, got {type(sample).__name__}")
    if "video" not in sample.media:
        raise KeyError(f"{task}: sample has no 'video' media (it has {sorted(sample.media)})")
    return sample.media["video"]


class TextToVideo(Task):
    """``[Segment("text", caption, "input"), Segment("video", video, "target")]``."""

    name: ClassVar[str] = "text_to_video"
    modalities: ClassVar[Sequence[str]] = ("text", "video")
    target_modalities: ClassVar[Sequence[str]] = ("video",)

    def segments(self, sample: Sample) -> list[Segment]:
        video = _video_of(sample, self.name)
        return [Segment("text", sample.text, "input"), Segment("video", video, "target")]


class VideoToText(Task):
    """``[Segment("video", video, "input"), Segment("text", caption, "target")]``."""

    name: ClassVar[str] = "video_to_text"
    modalities: ClassVar[Sequence[str]] = ("video", "text")
    target_modalities: ClassVar[Sequence[str]] = ("text",)

    def segments(self, sample: Sample) -> list[Segment]:
        video = _video_of(sample, self.name)
        return [Segment("video", video, "input"), Segment("text", sample.text, "target")]
