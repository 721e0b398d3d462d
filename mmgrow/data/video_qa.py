"""``video_qa``: questions about a shapes video, answered in one word.

A ``shapes`` sample (``media["video"] uint8 [F, H, W, 3]``, ``meta`` ``{"shape", "colour", "motion"}``)
becomes::

    [video (input)] [question (text, input)] [answer (text, target)]

with one question of these kinds (:data:`QUESTIONS`):

=============  ========================================  ==========================
kind           question                                  answer
=============  ========================================  ==========================
``colour``     ``what colour is the shape?``             ``meta["colour"]`` (``red``)
``direction``  ``which direction does the shape move?``  ``meta["motion"]`` (``left``)
``shape``      ``what shape is it?``                     ``meta["shape"]`` (``ring``)
``frames``     ``how many frames?``                      ``F`` in digits (``6``)
=============  ========================================  ==========================

**Which kind.** A sample's kind is ``kinds[h % len(kinds)]`` with ``h`` the first 8 bytes (big
endian) of the SHA-256 of its caption, its meta (``key=value`` lines, sorted) and the raw bytes of
its video: the same sample always gets the same question, in every process and worker
(no ``PYTHONHASHSEED``), and over a dataset whose videos differ (random start cells) every kind
appears in about equal shares. When a video is fully determined by its meta (``random_start:
false``) each combination always gets the same kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from mmgrow.data.content_hash import content_hash as sample_hash
from mmgrow.data.synthetic.combinations import choose_names
from mmgrow.protocols import Sample, Segment, Task

QUESTIONS: dict[str, str] = {
    "colour": "what colour is the shape?",
    "direction": "which direction does the shape move?",
    "shape": "what shape is it?",
    "frames": "how many frames?",
}
"""Question kind -> question text."""

_META_KEY = {"colour": "colour", "direction": "motion", "shape": "shape"}


def content_hash(sample: Sample) -> int:
    """The stable 64-bit hash that picks a sample's question kind (module docstring)."""
    return sample_hash(sample, "video")


def answer_of(kind: str, sample: Sample) -> str:
    """The answer to question ``kind`` about ``sample``."""
    if kind == "frames":
        return str(int(sample.media["video"].shape[0]))
    return str(sample.meta[_META_KEY[kind]])


class VideoQA(Task):
    """A shapes sample -> ``[video][question][answer target]`` (module docstring).

    Args:
        kinds: the question kinds asked, a non-empty subset of :data:`QUESTIONS` (default all four);
            the order matters for which sample gets which kind.
    """

    name: ClassVar[str] = "video_qa"
    modalities: ClassVar[Sequence[str]] = ("video", "text")
    target_modalities: ClassVar[Sequence[str]] = ("text",)
    prompt_template: ClassVar[str] = "{question}"
    scored: ClassVar[bool] = True

    def __init__(self, kinds: Sequence[str] | None = None) -> None:
        self.kinds = choose_names("VideoQA", "kinds", kinds, tuple(QUESTIONS))

    def kind_of(self, sample: Sample) -> str:
        """The question kind asked about ``sample``."""
        return self.kinds[content_hash(sample) % len(self.kinds)]

    def question_answer(self, sample: Sample) -> tuple[str, str, str]:
        """``(kind, question, answer)`` for ``sample``."""
        if not isinstance(sample, Sample):
            raise TypeError(f"{self.name}: expected an mmgrow.protocols.Sample, got {type(sample).__name__}")
        video = sample.media.get("video")
        if video is None or len(getattr(video, "shape", ())) != 4:
            raise KeyError(f"{self.name}: expected a video sample (media 'video' uint8 [F, H, W, 3]); media has "
                           f"{sorted(sample.media)}")
        kind = self.kind_of(sample)
        if kind != "frames" and _META_KEY[kind] not in sample.meta:
            raise KeyError(f"{self.name}: a {kind!r} question needs meta {_META_KEY[kind]!r} (a shapes sample); "
                           f"the sample's meta has {sorted(sample.meta)}")
        return kind, QUESTIONS[kind], answer_of(kind, sample)

    def segments(self, sample: Sample) -> list[Segment]:
        _, question, answer = self.question_answer(sample)
        return [Segment("video", sample.media["video"], "input"), Segment("text", question, "input"),
                Segment("text", answer, "target")]
