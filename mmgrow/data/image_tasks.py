"""Image tasks in UnIVAL's unified format: ``[image (input)] [instruction (text, input)] [target]``.

They read ``scenes`` samples (:mod:`mmgrow.data.synthetic.scenes`): ``media["image"] uint8 [H, W, 3]``
and ``meta["objects"]``, a list of ``{"shape", "colour", "box": [x0, y0, x1, y1], "position"}`` in
reading order. Every task is scored (``scored = True``): the evaluation decodes the target greedily
after the image and the instruction and calls :meth:`score`.

=====================  ===============================================  ===================================
task                   instruction (``prompt_template``)                target
=====================  ===============================================  ===================================
``image_caption``      ``what does the image describe?``                the caption (:func:`scene_caption`)
``image_qa``           ``{question}`` (:data:`QUESTIONS`)               one answer phrase
``image_text_match``   ``does the image describe "{text}"?``            ``yes`` / ``no``
``grounding``          ``which region does the text "{text}" describe?``  a box (``location`` segment)
=====================  ===============================================  ===================================

**Stable choices.** Which question, which object, whether a match is positive: all come from
:func:`image_hash`, the first 8 bytes (big endian) of the SHA-256 of the sample's text, its meta
(``key=value`` lines, keys sorted) and the raw bytes of its image. The same sample gets the same
example in every process and worker (no ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from mmgrow.data.content_hash import content_hash as sample_hash
from mmgrow.data.synthetic.combinations import choose_names
from mmgrow.data.synthetic.scenes import scene_caption
from mmgrow.data.synthetic.shapes import COLOURS, SHAPES
from mmgrow.protocols import Sample, Segment, Task
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE

OBJECT_KEYS = ("shape", "colour", "box", "position")
"""Keys of every entry of ``meta["objects"]``."""

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Answers of the count question (a count above nine is written in digits)."""

QUESTIONS: dict[str, str] = {
    "count": "how many shapes are there?",
    "colour": "what colour is the {shape}?",
    "shape": "what shape is the {colour} one?",
    "position": "where is the {colour} {shape}?",
}
"""Question kind -> question template of :class:`ImageQA` (filled from one object's meta)."""

CAPTION_PROMPT = "what does the image describe?"
MATCH_PROMPT = 'does the image describe "{text}"?'
GROUNDING_PROMPT = 'which region does the text "{text}" describe?'

_PHRASE = re.compile(r"a (?P<colour>\S+) (?P<shape>\S+)(?: at the (?P<position>.+))?")
CAPTION_ATTRIBUTES = ("shape", "colour", "position")


def image_hash(sample: Sample) -> int:
    """The stable 64-bit hash behind every choice of these tasks (module docstring)."""
    return sample_hash(sample, "image")


def scene_objects(sample: Sample, task: str) -> list[dict[str, Any]]:
    """``meta["objects"]`` of an image sample, after checking the image and every object's keys."""
    if not isinstance(sample, Sample):
        raise TypeError(f"{task}: expected an mmgrow.protocols.Sample, got {type(sample).__name__}")
    image = sample.media.get("image")
    if image is None or len(getattr(image, "shape", ())) != 3:
        raise KeyError(f"{task}: expected an image sample (media 'image' uint8 [H, W, 3], e.g. the scenes dataset); "
                       f"media has {sorted(sample.media)}")
    objects = sample.meta.get("objects")
    if not isinstance(objects, list) or not objects:
        raise KeyError(f"{task}: expected meta 'objects' (a non-empty list of {{shape, colour, box, position}}, as "
                       f"scenes samples carry); the sample's meta has {sorted(sample.meta)}")
    for i, obj in enumerate(objects):
        missing = [k for k in OBJECT_KEYS if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise KeyError(f"{task}: meta objects[{i}] lacks {missing}; expected keys {list(OBJECT_KEYS)}")
    return objects


def _image(sample: Sample) -> Segment:
    return Segment("image", sample.media["image"], "input")


# --------------------------------------------------------------------------------------------------
# captioning
# --------------------------------------------------------------------------------------------------


def parse_caption(text: str) -> list[dict[str, str] | None]:
    """A caption -> one entry per object phrase: ``{"colour", "shape"[, "position"]}`` or None.

    The text is split at ``", "`` and ``" and "``; each piece that reads ``a <colour> <shape>`` with an
    optional `` at the <position>`` gives the words found (any words: a wrong colour is still stated);
    a piece that does not read so states nothing (None)."""
    phrases = re.split(r", | and ", str(text).strip())
    parsed: list[dict[str, str] | None] = []
    for phrase in phrases:
        m = _PHRASE.fullmatch(phrase.strip())
        parsed.append(None if m is None else {k: v for k, v in m.groupdict().items() if v is not None})
    return parsed


def caption_attributes(prediction: str, objects: Sequence[dict[str, Any]]) -> float:
    """Fraction of the true objects' attributes the ``prediction`` states correctly:

    ``sum_i sum_a [parsed_i[a] == objects_i[a]] / (3 * len(objects))`` over ``a`` in shape, colour,
    position and ``i`` over the true objects in reading order, with ``parsed_i`` the prediction's
    ``i``-th phrase (:func:`parse_caption`; missing or unreadable phrases state nothing). Phrases
    beyond the true objects do not count here (exact-match ``accuracy`` penalises them)."""
    parsed = parse_caption(prediction)
    correct = 0
    for i, obj in enumerate(objects):
        stated = parsed[i] if i < len(parsed) else None
        if stated is not None:
            correct += sum(stated.get(a) == obj[a] for a in CAPTION_ATTRIBUTES)
    return correct / (len(CAPTION_ATTRIBUTES) * len(objects))


class ImageCaption(Task):
    """A scene -> ``[image] ["what does the image describe?"] [caption target]``.

    The caption is :func:`~mmgrow.data.synthetic.scenes.scene_caption` of ``meta["objects"]`` (the
    scenes dataset's own caption). :meth:`score`: ``{"accuracy": exact match, "attributes":
    caption_attributes(prediction, objects)}``.
    """

    name: ClassVar[str] = "image_caption"
    modalities: ClassVar[Sequence[str]] = ("image", "text")
    target_modalities: ClassVar[Sequence[str]] = ("text",)
    prompt_template: ClassVar[str] = CAPTION_PROMPT
    scored: ClassVar[bool] = True

    def segments(self, sample: Sample) -> list[Segment]:
        objects = scene_objects(sample, self.name)
        return [_image(sample), Segment("text", self.prompt_template, "input"),
                Segment("text", scene_caption(objects), "target")]

    def score(self, prediction: Any, sample: Sample, target: Segment) -> dict[str, float]:
        text = str(prediction).strip()
        return {"accuracy": float(text == target.raw),
                "attributes": caption_attributes(text, scene_objects(sample, self.name))}


# --------------------------------------------------------------------------------------------------
# question answering
# --------------------------------------------------------------------------------------------------


def count_word(n: int) -> str:
    """``"one"``, ``"two"``, ... (:data:`NUMBER_WORDS`), digits above nine."""
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def askable(kind: str, objects: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects a ``kind`` question can be asked about without ambiguity: ``colour`` needs its
    shape unique in the image, ``shape`` its colour unique; ``position`` any object; ``count``
    asks about the image (returns all objects)."""
    if kind == "colour" or kind == "shape":
        key = "shape" if kind == "colour" else "colour"  # the attribute that names the object
        return [o for o in objects if sum(p[key] == o[key] for p in objects) == 1]
    return list(objects)


class ImageQA(Task):
    """A scene -> ``[image] [question] [answer target]`` (:data:`QUESTIONS`).

    Answers: ``count`` -> :func:`count_word` of the number of objects; ``colour`` -> the colour
    (``red``); ``shape`` -> the shape (``ring``); ``position`` -> the position words (``top left``).

    **Which question.** With ``h = image_hash(sample)`` and ``K = len(kinds)``: the kinds are tried
    in the order ``kinds[h % K], kinds[(h + 1) % K], ...``; the first with an askable object
    (:func:`askable`) is asked, about ``candidates[(h // K) % len(candidates)]``. With at most three
    objects a ``colour`` or a ``shape`` question is always askable (three objects cannot repeat
    both every shape and every colour with distinct pairs); ``count`` and ``position`` always are.

    Args:
        kinds: the question kinds asked, a non-empty subset of :data:`QUESTIONS` (default all four,
            in that order; the order matters for which sample gets which kind).
    """

    name: ClassVar[str] = "image_qa"
    modalities: ClassVar[Sequence[str]] = ("image", "text")
    target_modalities: ClassVar[Sequence[str]] = ("text",)
    prompt_template: ClassVar[str] = "{question}"
    scored: ClassVar[bool] = True

    def __init__(self, kinds: Sequence[str] | None = None) -> None:
        self.kinds = choose_names("ImageQA", "kinds", kinds, tuple(QUESTIONS))

    def question_answer(self, sample: Sample) -> tuple[str, str, str]:
        """``(kind, question, answer)`` for ``sample`` (class docstring)."""
        objects = scene_objects(sample, self.name)
        h, k = image_hash(sample), len(self.kinds)
        for step in range(k):
            kind = self.kinds[(h + step) % k]
            candidates = askable(kind, objects)
            if candidates:
                obj = candidates[(h // k) % len(candidates)]
                answer = count_word(len(objects)) if kind == "count" else str(obj[kind])
                return kind, QUESTIONS[kind].format(shape=obj["shape"], colour=obj["colour"]), answer
        raise ValueError(f"{self.name}: none of the kinds {list(self.kinds)} can be asked unambiguously about "
                         f"{scene_caption(objects)!r}; add 'count' or 'position' to kinds")

    def segments(self, sample: Sample) -> list[Segment]:
        _, question, answer = self.question_answer(sample)
        return [_image(sample), Segment("text", question, "input"), Segment("text", answer, "target")]


# --------------------------------------------------------------------------------------------------
# image-text matching
# --------------------------------------------------------------------------------------------------


class ImageTextMatch(Task):
    """A scene -> ``[image] ['does the image describe "<text>"?'] ["yes" / "no" target]``.

    With ``h = image_hash(sample)``: the example is positive (``text`` = the caption, answer ``yes``)
    when ``h`` is even, else negative (answer ``no``): the caption with one object changed, rebuilt
    with :func:`~mmgrow.data.synthetic.scenes.scene_caption` (its position words kept). The object
    is ``objects[(h >> 1) % n]``; its colour changes when bit 8 of ``h`` is 0, else its shape; the
    new value is ``options[(h >> 16) % len(options)]`` with ``options`` the task's ``colours`` /
    ``shapes`` other than the current one. The caption pins every object by its position in
    reading order, so a changed attribute is never true of the image.

    Args:
        shapes, colours: values a negative may use (default all shapes and the scenes colours).
    """

    name: ClassVar[str] = "image_text_match"
    modalities: ClassVar[Sequence[str]] = ("image", "text")
    target_modalities: ClassVar[Sequence[str]] = ("text",)
    prompt_template: ClassVar[str] = MATCH_PROMPT
    scored: ClassVar[bool] = True

    def __init__(self, shapes: Sequence[str] | None = None, colours: Sequence[str] | None = None) -> None:
        self.shapes = choose_names("ImageTextMatch", "shapes", shapes, tuple(SHAPES))
        self.colours = choose_names("ImageTextMatch", "colours", colours, COLOURS,
                                    allowed=tuple(c for c in DEFAULT_PALETTE if c != "black"))
        if len(self.shapes) < 2 or len(self.colours) < 2:
            raise ValueError(f"ImageTextMatch: negatives need at least two shapes and two colours, got "
                             f"shapes={list(self.shapes)}, colours={list(self.colours)}")

    def text_answer(self, sample: Sample) -> tuple[str, str]:
        """``(text, "yes" / "no")`` for ``sample`` (class docstring)."""
        objects = scene_objects(sample, self.name)
        h = image_hash(sample)
        if h % 2 == 0:
            return scene_caption(objects), "yes"
        i = (h >> 1) % len(objects)
        key, values = ("colour", self.colours) if (h >> 8) % 2 == 0 else ("shape", self.shapes)
        options = [v for v in values if v != objects[i][key]]
        changed = [dict(o) for o in objects]
        changed[i][key] = options[(h >> 16) % len(options)]
        return scene_caption(changed), "no"

    def segments(self, sample: Sample) -> list[Segment]:
        text, answer = self.text_answer(sample)
        return [_image(sample), Segment("text", self.prompt_template.format(text=text), "input"),
                Segment("text", answer, "target")]


# --------------------------------------------------------------------------------------------------
# grounding
# --------------------------------------------------------------------------------------------------


def box_iou(a: Any, b: Any) -> float:
    """Intersection over union of boxes ``[x0, y0, x1, y1]`` (float64):

    ``I = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))``,
    ``IoU = I / (area(a) + area(b) - I)`` with ``area = max(0, x1 - x0) * max(0, y1 - y0)``; 0 when
    the union is empty."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0) - inter
    return inter / union if union > 0 else 0.0


class Grounding(Task):
    """A scene -> ``[image] ['which region does the text "a <colour> <shape>" describe?'] [box target]``.

    The object is ``objects[h % n]`` (``h = image_hash(sample)``; its ``(shape, colour)`` is unique in a
    scene); the target is ``Segment("location", box)`` with ``box = [x0, y0, x1, y1]`` in ``[0, 1]``,
    encoded by the ``locations`` codec as four bin tokens. :meth:`score`: ``{"iou": box_iou(pred,
    box), "accuracy": 1.0 if iou >= 0.5 else 0.0}``; a prediction that is not four finite numbers
    scores 0.
    """

    name: ClassVar[str] = "grounding"
    modalities: ClassVar[Sequence[str]] = ("image", "text", "location")
    target_modalities: ClassVar[Sequence[str]] = ("location",)
    prompt_template: ClassVar[str] = GROUNDING_PROMPT
    scored: ClassVar[bool] = True

    def referent(self, sample: Sample) -> dict[str, Any]:
        """The object the example asks for."""
        objects = scene_objects(sample, self.name)
        return objects[image_hash(sample) % len(objects)]

    def segments(self, sample: Sample) -> list[Segment]:
        obj = self.referent(sample)
        text = f"a {obj['colour']} {obj['shape']}"
        return [_image(sample), Segment("text", self.prompt_template.format(text=text), "input"),
                Segment("location", [float(v) for v in obj["box"]], "target")]

    def score(self, prediction: Any, sample: Sample, target: Segment) -> dict[str, float]:
        try:
            box = [float(v) for v in prediction]
        except (TypeError, ValueError):
            box = []
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            return {"iou": 0.0, "accuracy": 0.0}
        iou = box_iou(box, target.raw)
        return {"iou": iou, "accuracy": float(iou >= 0.5)}
