"""Built-in tasks: a :class:`~mmgrow.protocols.Sample` -> ordered input / target segments.

``text_to_video``: the caption conditions, the video is predicted (``[text input][video target]``).
``video_to_text``: captioning, the reverse (``[video input][text target]``).
``conditioned_video``: the DiT setup: the sequence is the video alone (``[video target]``) and the caption
conditions it only through the data module's ``condition_encoder`` (cross-attention), so classifier-free
guidance can drop it.
``text_lm``: plain language modelling on the sample's text (``[text target]``, no instruction), scored
by its loss only.
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


class ConditionedVideo(Task):
    """``[Segment("video", video, "target")]``; the caption is the condition (:meth:`condition_text`)."""

    name: ClassVar[str] = "conditioned_video"
    modalities: ClassVar[Sequence[str]] = ("video",)
    target_modalities: ClassVar[Sequence[str]] = ("video",)

    def segments(self, sample: Sample) -> list[Segment]:
        return [Segment("video", _video_of(sample, self.name), "target")]

    def condition_text(self, sample: Sample, segments: list[Segment]) -> str | None:
        if not isinstance(sample.text, str) or not sample.text.strip():
            raise ValueError(f"{self.name}: the sample's caption is empty; a conditioned video needs a caption")
        return sample.text


class TextLM(Task):
    """``[Segment("text", sample.text, "target")]``: next-token prediction over the whole text.

    No instruction (``prompt_template`` is empty) and no decoded metric (``scored`` is False): the
    task is evaluated by its loss. An empty or non-string text is an error (nothing to model).
    """

    name: ClassVar[str] = "text_lm"
    modalities: ClassVar[Sequence[str]] = ("text",)
    target_modalities: ClassVar[Sequence[str]] = ("text",)
    prompt_template: ClassVar[str] = ""
    scored: ClassVar[bool] = False

    def segments(self, sample: Sample) -> list[Segment]:
        if not isinstance(sample, Sample):
            raise TypeError(f"{self.name}: expected an mmgrow.protocols.Sample, got {type(sample).__name__}")
        if not isinstance(sample.text, str) or not sample.text.strip():
            raise ValueError(f"{self.name}: the sample's text is empty ({sample.text!r}); language modelling needs "
                             "a non-empty text")
        return [Segment("text", sample.text, "target")]
