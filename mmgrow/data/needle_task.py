"""``needle`` / ``needle_text``: a needle sample (:mod:`mmgrow.data.synthetic.needle`) -> retrieval segments.

::

    [haystack (input)] [question (text, input)] [answer (text, target)]

The haystack is a text segment (``meta["haystack"]``) for a text needle and a video segment
(``media["video"]``) for a video needle. Only the answer is predicted: the loss, and the
evaluation's exact match, see nothing but the retrieved item.

``needle`` declares both modalities, so its run needs a text and a video codec; ``needle_text``
handles text needles only and needs only a text codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from mmgrow.protocols import Sample, Segment, Task


class NeedleTask(Task):
    """A needle sample -> ``[haystack][question][answer target]`` (module docstring)."""

    name: ClassVar[str] = "needle"
    modalities: ClassVar[Sequence[str]] = ("text", "video")
    target_modalities: ClassVar[Sequence[str]] = ("text",)
    kinds: ClassVar[Sequence[str]] = ("text", "video")
    """Needle kinds this task turns into segments."""

    def segments(self, sample: Sample) -> list[Segment]:
        if not isinstance(sample, Sample):
            raise TypeError(f"{self.name}: expected an mmgrow.protocols.Sample, got {type(sample).__name__}")
        missing = [k for k in ("kind", "question", "answer") if k not in sample.meta]
        if missing:
            raise KeyError(f"{self.name}: expected a needle sample (meta 'kind', 'question', 'answer'); "
                           f"missing meta {missing}")
        kind = sample.meta["kind"]
        if kind not in self.kinds:
            raise ValueError(f"{self.name}: handles needle kinds {list(self.kinds)}, got a {kind!r} needle"
                             + ("; use the task 'needle'" if kind == "video" else ""))
        if kind == "text":
            if not isinstance(sample.meta.get("haystack"), str):
                raise KeyError(f"{self.name}: a text needle sample needs meta 'haystack' (str)")
            haystack = Segment("text", sample.meta["haystack"], "input")
        else:
            if "video" not in sample.media:
                raise KeyError(f"{self.name}: a video needle sample needs media 'video' (it has {sorted(sample.media)})")
            haystack = Segment("video", sample.media["video"], "input")
        return [haystack, Segment("text", sample.meta["question"], "input"),
                Segment("text", sample.meta["answer"], "target")]

    def condition_text(self, sample: Sample, segments: list[Segment]) -> str | None:
        """The question (never the haystack: a text encoder would see the needle's answer)."""
        return sample.meta.get("question")


class TextNeedleTask(NeedleTask):
    """:class:`NeedleTask` for text needles only: needs only a text codec."""

    name: ClassVar[str] = "needle_text"
    modalities: ClassVar[Sequence[str]] = ("text",)
    kinds: ClassVar[Sequence[str]] = ("text",)
