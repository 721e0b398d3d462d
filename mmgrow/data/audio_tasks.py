"""Audio tasks: ``audio_caption`` and ``audio_qa`` over a ``tones`` sample, answered in text.

Both put the clip first, then the instruction, then the text target (UnIVAL's unified format)::

    [audio (input)] [instruction (text, input)] [target (text, target)]

==================  ====================================  ================================================
task                instruction (``prompt_template``)     target
==================  ====================================  ================================================
``audio_caption``   ``what does the audio describe?``     the caption (``a low sine tone rising``)
``audio_qa``        ``{question}``: one of the sample's   its one-word answer (``low``, ``sawtooth``,
                    ``meta["questions"]``                 ``steady``, ``three`` ...)
==================  ====================================  ================================================

The questions are the tones generator's (:data:`mmgrow.data.synthetic.tones.QUESTIONS`: pitch,
waveform, pattern, and beeps for the beeps pattern).

**Which question.** ``audio_qa`` asks ``questions[h % len(questions)]`` of the sample's questions
(those of the chosen ``kinds``, in the sample's order) with ``h`` the first 8 bytes (big endian) of
the SHA-256 of its caption, its meta (``key=value`` lines, sorted by key) and the raw float32 bytes of
its audio, the scheme :mod:`mmgrow.data.video_qa` uses for video: the same sample always gets the same
question in every process and worker, and over clips that differ every question appears in about
equal shares (a beeps clip has four questions, the others three).

**Scores** (both ``scored``): ``accuracy`` is the exact match of the stripped prediction with the
target. ``audio_caption`` adds ``attributes``: the fraction of (pitch, waveform, pattern) that the
prediction states correctly, read slot by slot with the caption grammar
(:func:`~mmgrow.data.synthetic.tones.parse_caption`) against the generator's ground truth
(``meta["pitch"]``, ``["waveform"]``, ``["pattern"]``; from the target caption when the meta lacks
them; left out when neither gives all three).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from mmgrow.data.content_hash import content_hash as sample_hash
from mmgrow.data.synthetic.combinations import choose_names
from mmgrow.data.synthetic.tones import QUESTIONS, parse_caption
from mmgrow.protocols import Sample, Segment, Task

ATTRIBUTES: tuple[str, ...] = ("pitch", "waveform", "pattern")
"""The caption attributes ``audio_caption`` scores."""


def content_hash(sample: Sample) -> int:
    """The stable 64-bit hash that picks a sample's question (module docstring)."""
    return sample_hash(sample, "audio")


def audio_of(sample: Any, task: str):
    """The sample's ``media["audio"]`` (1-D), or a named error."""
    if not isinstance(sample, Sample):
        raise TypeError(f"{task}: expected an mmgrow.protocols.Sample, got {type(sample).__name__}")
    audio = sample.media.get("audio")
    if audio is None or len(getattr(audio, "shape", ())) != 1:
        got = f"shape {tuple(audio.shape)}" if hasattr(audio, "shape") else f"media {sorted(sample.media)}"
        raise KeyError(f"{task}: expected an audio sample (media 'audio' float32 [N]); got {got}")
    return audio


class AudioCaption(Task):
    """A tones sample -> ``[audio][what does the audio describe?][caption target]`` (module docstring)."""

    name: ClassVar[str] = "audio_caption"
    modalities: ClassVar[Sequence[str]] = ("audio", "text")
    target_modalities: ClassVar[Sequence[str]] = ("text",)
    prompt_template: ClassVar[str] = "what does the audio describe?"
    scored: ClassVar[bool] = True

    def segments(self, sample: Sample) -> list[Segment]:
        audio = audio_of(sample, self.name)
        if not isinstance(sample.text, str) or not sample.text.strip():
            raise ValueError(f"{self.name}: the sample's caption is empty; audio captioning needs a caption target")
        return [Segment("audio", audio, "input"), Segment("text", self.prompt_template, "input"),
                Segment("text", sample.text, "target")]

    def score(self, prediction: Any, sample: Sample, target: Segment) -> dict[str, float]:
        """``{"accuracy": exact match, "attributes": share of ATTRIBUTES stated correctly}`` (module docstring)."""
        scores = super().score(prediction, sample, target)
        truth = {k: sample.meta.get(k) for k in ATTRIBUTES}
        if any(v is None for v in truth.values()):
            truth = parse_caption(target.raw)
        if all(v is not None for v in truth.values()):
            said = parse_caption(str(prediction))
            scores["attributes"] = sum(said[k] == truth[k] for k in ATTRIBUTES) / len(ATTRIBUTES)
        return scores


class AudioQA(Task):
    """A tones sample -> ``[audio][question][answer target]`` (module docstring).

    Args:
        kinds: the question kinds asked, a non-empty subset of :data:`~mmgrow.data.synthetic.tones.QUESTIONS`
            (default all); a sample with none of them (``kinds=["beeps"]`` on a steady tone) is an error,
            so restrict the dataset's patterns to match.
    """

    name: ClassVar[str] = "audio_qa"
    modalities: ClassVar[Sequence[str]] = ("audio", "text")
    target_modalities: ClassVar[Sequence[str]] = ("text",)
    prompt_template: ClassVar[str] = "{question}"
    scored: ClassVar[bool] = True

    def __init__(self, kinds: Sequence[str] | None = None) -> None:
        self.kinds = choose_names("AudioQA", "kinds", kinds, tuple(QUESTIONS))

    def question_answer(self, sample: Sample) -> tuple[str, str, str]:
        """``(kind, question, answer)`` asked about ``sample``."""
        audio_of(sample, self.name)
        entries = sample.meta.get("questions")
        if not isinstance(entries, (list, tuple)) or not entries:
            raise KeyError(f"{self.name}: the sample has no meta 'questions' (a list of {{kind, question, answer}}, "
                           f"as tones samples carry); its meta has {sorted(sample.meta)}")
        for entry in entries:
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("kind", "question",
                                                                                              "answer")):
                raise ValueError(f"{self.name}: every meta 'questions' entry must be a dict of str kind, question and "
                                 f"answer; got {entry!r}")
        asked = [e for e in entries if e["kind"] in self.kinds]
        if not asked:
            raise ValueError(f"{self.name}: the sample has questions of kinds {[e['kind'] for e in entries]} but the "
                             f"task asks only {list(self.kinds)}")
        entry = asked[content_hash(sample) % len(asked)]
        return entry["kind"], entry["question"], entry["answer"]

    def segments(self, sample: Sample) -> list[Segment]:
        _, question, answer = self.question_answer(sample)
        return [Segment("audio", sample.media["audio"], "input"),
                Segment("text", self.prompt_template.format(question=question), "input"),
                Segment("text", answer, "target")]
