"""Image tasks: golden segments per task, the documented hash choices, 50/50 matching (chi-square),
every question kind, negatives change exactly one attribute, IoU and caption scores against hand
values, sequences built with the image / text / location codecs, errors."""

import hashlib

import pytest
import torch

from mmgrow.data.image_tasks import (
    Grounding,
    ImageCaption,
    ImageQA,
    ImageTextMatch,
    box_iou,
    caption_attributes,
    image_hash,
    parse_caption,
)
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.data.synthetic.scenes import SceneDataset, scene_object
from mmgrow.protocols import Sample
from mmgrow.registry import load_plugin
from mmgrow.testing.conformance import run_checks
from mmgrow.tokenizers.image_pixels import ImagePixelTokenizer
from mmgrow.tokenizers.locations import LocationTokenizer
from mmgrow.tokenizers.text import ByteTokenizer

DRAW = SceneDataset(num_samples=1, size=8, grid=8)
RED_SQUARE = ("square", "red", (0, 0))  # box [0, 0, 0.375, 0.375], "top left"
BLUE_RING = ("ring", "blue", (5, 5))  # box [0.625, 0.625, 1, 1], "bottom right"


def scene(objects, text="") -> Sample:
    """A scenes-style sample from ``(shape, colour, (row, col))`` triples (reading order)."""
    meta = [scene_object(shape, colour, start, 8) for shape, colour, start in objects]
    return Sample(media={"image": DRAW.draw(objects)}, text=text, meta={"objects": meta, "count": len(meta)})


def plain(segments):
    """Segments as comparable tuples (the image as a list of its pixels)."""
    return [(s.modality, s.raw.tolist() if isinstance(s.raw, torch.Tensor) else s.raw, s.role) for s in segments]


def expected(sample, *rest):
    return [("image", sample.media["image"].tolist(), "input"), *rest]


# --------------------------------------------------------------------------------------------------
# golden segments
# --------------------------------------------------------------------------------------------------


def test_caption_golden_segments():
    s = scene([RED_SQUARE, BLUE_RING])
    assert plain(ImageCaption().segments(s)) == expected(
        s, ("text", "what does the image describe?", "input"),
        ("text", "a red square at the top left and a blue ring at the bottom right", "target"))
    assert ImageCaption.prompt_template == "what does the image describe?"


@pytest.mark.parametrize("kind, question, answer", [
    ("count", "how many shapes are there?", "one"),
    ("colour", "what colour is the square?", "red"),
    ("shape", "what shape is the red one?", "square"),
    ("position", "where is the red square?", "top left"),
])
def test_qa_golden_segments_per_kind(kind, question, answer):
    s = scene([RED_SQUARE])
    assert plain(ImageQA(kinds=[kind]).segments(s)) == expected(s, ("text", question, "input"),
                                                                 ("text", answer, "target"))
    assert ImageQA.prompt_template == "{question}"


def test_match_golden_segments():
    # texts chosen so the hash is even (positive) / odd (negative: colour change; shape change)
    pos, neg_colour, neg_shape = (scene([RED_SQUARE], text) for text in ("v1", "v0", "v3"))
    task = ImageTextMatch()
    assert plain(task.segments(pos)) == expected(
        pos, ("text", 'does the image describe "a red square at the top left"?', "input"), ("text", "yes", "target"))
    assert plain(task.segments(neg_colour)) == expected(
        neg_colour, ("text", 'does the image describe "a yellow square at the top left"?', "input"),
        ("text", "no", "target"))
    assert plain(task.segments(neg_shape)) == expected(
        neg_shape, ("text", 'does the image describe "a red bar at the top left"?', "input"), ("text", "no", "target"))
    assert ImageTextMatch.prompt_template == 'does the image describe "{text}"?'


def test_grounding_golden_segments():
    s = scene([RED_SQUARE])
    assert plain(Grounding().segments(s)) == expected(
        s, ("text", 'which region does the text "a red square" describe?', "input"),
        ("location", [0.0, 0.0, 0.375, 0.375], "target"))
    assert Grounding.prompt_template == 'which region does the text "{text}" describe?'
    assert tuple(Grounding.modalities) == ("image", "text", "location")


# --------------------------------------------------------------------------------------------------
# the documented stable choices
# --------------------------------------------------------------------------------------------------


def test_hash_is_the_documented_sha256():
    ds = SceneDataset(num_samples=10, size=8, seed=2)
    for i in range(len(ds)):
        s = ds[i]
        h = hashlib.sha256(s.text.encode())
        for key in sorted(s.meta):
            h.update(f"\n{key}={s.meta[key]}".encode())
        h.update(s.media["image"].contiguous().numpy().tobytes())
        assert image_hash(s) == int.from_bytes(h.digest()[:8], "big") == image_hash(ds[i])
        obj = s.meta["objects"][image_hash(s) % len(s.meta["objects"])]
        assert Grounding().segments(s)[2].raw == obj["box"]


def test_matching_is_50_50():
    """Pearson chi-square over 10k scenes, 1 dof: 10.83 is the 0.999 quantile (p > 0.001)."""
    ds = SceneDataset(num_samples=10_000, size=8, seed=11)
    task = ImageTextMatch()
    yes = sum(task.text_answer(ds[i])[1] == "yes" for i in range(len(ds)))
    no = len(ds) - yes
    chi2 = (yes - 5000) ** 2 / 5000 + (no - 5000) ** 2 / 5000
    assert chi2 < 10.83, (yes, no)
    assert 4800 < yes < 5200


def test_negatives_change_exactly_one_attribute():
    ds = SceneDataset(num_samples=300, size=8, seed=3)
    task = ImageTextMatch()
    changed_keys = set()
    for i in range(len(ds)):
        s = ds[i]
        text, answer = task.text_answer(s)
        if answer == "yes":
            assert text == s.text
            continue
        assert text != s.text
        parsed = parse_caption(text)
        diffs = [(j, k) for j, o in enumerate(s.meta["objects"]) for k in ("shape", "colour", "position")
                 if parsed[j][k] != o[k]]
        assert len(parsed) == len(s.meta["objects"]) and len(diffs) == 1, (s.text, text)
        changed_keys.add(diffs[0][1])
    assert changed_keys == {"shape", "colour"}


def test_every_question_kind_appears_and_answers_are_true():
    ds = SceneDataset(num_samples=400, size=8, seed=7)
    task = ImageQA()
    kinds = {}
    for i in range(len(ds)):
        s = ds[i]
        objects = s.meta["objects"]
        kind, question, answer = task.question_answer(s)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "count":
            assert answer == ["one", "two", "three"][len(objects) - 1]
        elif kind == "colour":
            (obj,) = [o for o in objects if question == f"what colour is the {o['shape']}?"]  # unique
            assert answer == obj["colour"]
        elif kind == "shape":
            (obj,) = [o for o in objects if question == f"what shape is the {o['colour']} one?"]
            assert answer == obj["shape"]
        else:
            (obj,) = [o for o in objects if question == f"where is the {o['colour']} {o['shape']}?"]
            assert answer == obj["position"]
    assert set(kinds) == {"count", "colour", "shape", "position"} and min(kinds.values()) > 60, kinds


def test_qa_falls_back_when_a_question_would_be_ambiguous():
    two_squares = scene([("square", "red", (0, 0)), ("square", "blue", (4, 4))])
    assert ImageQA(kinds=["colour", "shape"]).question_answer(two_squares)[0] == "shape"
    assert ImageQA(kinds=["shape", "colour"]).question_answer(two_squares)[0] == "shape"
    with pytest.raises(ValueError, match="unambiguously"):
        ImageQA(kinds=["colour"]).question_answer(two_squares)


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, iou", [
    ([0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75], 0.0625 / 0.4375),
    ([0, 0, 1, 1], [0, 0, 0.5, 0.5], 0.25),
    ([0, 0, 1, 1], [0, 0, 0.5, 1], 0.5),
    ([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], 1.0),
    ([0, 0, 0.2, 0.2], [0.5, 0.5, 1, 1], 0.0),
    ([0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], 0.0),  # touching edges
    ([0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3], 0.0),  # empty union
])
def test_iou_hand_values(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou, abs=1e-12)
    assert box_iou(b, a) == pytest.approx(iou, abs=1e-12)


def test_grounding_score():
    s = scene([RED_SQUARE])
    target = Grounding().segments(s)[-1]  # box [0, 0, 0.375, 0.375]
    assert Grounding().score(torch.tensor([0.0, 0.0, 0.375, 0.375]), s, target) == {"iou": 1.0, "accuracy": 1.0}
    half = Grounding().score([0.0, 0.0, 0.375, 0.75], s, target)
    assert half == {"iou": pytest.approx(0.5), "accuracy": 1.0}
    third = Grounding().score([0.0, 0.0, 0.375, 1.0], s, target)
    assert third == {"iou": pytest.approx(0.375), "accuracy": 0.0}
    for bad in ([0.1, 0.2], "box", [float("nan")] * 4, None):
        assert Grounding().score(bad, s, target) == {"iou": 0.0, "accuracy": 0.0}
    codec = LocationTokenizer(num_bins=100)  # decoded tokens of the target: within half a bin per side
    assert Grounding().score(codec.decode(codec.encode(target.raw)), s, target)["iou"] > 0.97


@pytest.mark.parametrize("prediction, accuracy, attributes", [
    ("a red square at the top left and a blue ring at the bottom right", 1.0, 1.0),
    (" a red square at the top left and a blue ring at the bottom right\n", 1.0, 1.0),
    ("a red square at the top left and a blue square at the bottom right", 0.0, 5 / 6),
    ("a red square at the top left", 0.0, 3 / 6),
    ("a red ring at the top", 0.0, 1 / 6),
    ("a red square and a blue ring", 0.0, 4 / 6),
    ("a blue ring at the bottom right", 0.0, 0.0),  # phrase 0 is compared with the red square
    ("a red square at the top left, a blue ring at the bottom right and a green bar at the top", 0.0, 1.0),
    ("red square top left", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_caption_scores_hand_made_predictions(prediction, accuracy, attributes):
    s = scene([RED_SQUARE, BLUE_RING])
    target = ImageCaption().segments(s)[-1]
    score = ImageCaption().score(prediction, s, target)
    assert score == {"accuracy": accuracy, "attributes": pytest.approx(attributes)}
    assert caption_attributes(prediction, s.meta["objects"]) == pytest.approx(attributes)


def test_default_exact_match_scores():
    s = scene([RED_SQUARE], "v1")
    for task in (ImageQA(kinds=["colour"]), ImageTextMatch()):
        target = task.segments(s)[-1]
        assert task.score(target.raw, s, target) == {"accuracy": 1.0}
        assert task.score("nope", s, target) == {"accuracy": 0.0}


# --------------------------------------------------------------------------------------------------
# sequences, registration, errors
# --------------------------------------------------------------------------------------------------


def test_sequence_builder_builds_every_task():
    codecs = {"image": ImagePixelTokenizer(grid=8), "text": ByteTokenizer(), "location": LocationTokenizer()}
    builder = SequenceBuilder(codecs)
    space = builder.token_space
    ds = SceneDataset(num_samples=6, size=16, grid=8, seed=1)
    for task in (ImageCaption(), ImageQA(), ImageTextMatch(), Grounding()):
        for i in range(len(ds)):
            segments = task.segments(ds[i])
            seq, spans = builder.build_with_spans(segments)
            image = seq.input_ids[spans[0]]
            assert torch.equal(image, space.to_global(codecs["image"].encode(ds[i].media["image"]), "image"))
            assert len(image) == 66 and seq.loss_mask[spans[0]].sum() == 0 and seq.loss_mask[spans[1]].sum() == 0
            target = segments[-1]
            assert seq.loss_mask[spans[2]].all() and seq.loss_mask.sum() == spans[2].stop - spans[2].start
            if task.name == "grounding":
                ids = seq.input_ids[spans[2]]
                assert torch.equal(ids - space.offset("location"), codecs["location"].encode(target.raw))
                assert (seq.modality_ids[spans[2]] == space.index("location")).all()
            else:
                assert spans[2].stop - spans[2].start == len(target.raw.encode()) + 2  # bos .. eos


def test_registered_and_conformant():
    for name, cls in (("image_caption", ImageCaption), ("image_qa", ImageQA),
                      ("image_text_match", ImageTextMatch), ("grounding", Grounding)):
        assert load_plugin("tasks", name) is cls and cls.name == name and cls.scored
        results = run_checks("tasks", cls)
        assert all(r.passed for r in results), [r for r in results if not r.passed]


@pytest.mark.parametrize("task", [ImageCaption(), ImageQA(), ImageTextMatch(), Grounding()])
def test_errors_name_what_is_missing(task):
    with pytest.raises(KeyError, match="media 'image'"):
        task.segments(Sample(media={"video": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)}))
    with pytest.raises(KeyError, match="meta 'objects'"):
        task.segments(Sample(media={"image": torch.zeros(8, 8, 3, dtype=torch.uint8)}, meta={"shape": "square"}))
    with pytest.raises(KeyError, match=r"objects\[0\] lacks \['box'\]"):
        task.segments(Sample(media={"image": torch.zeros(8, 8, 3, dtype=torch.uint8)},
                             meta={"objects": [{"shape": "square", "colour": "red", "position": "top"}]}))
    with pytest.raises(TypeError, match="Sample"):
        task.segments({"image": None})


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="kinds must be distinct names"):
        ImageQA(kinds=["size"])
    with pytest.raises(ValueError, match="two shapes and two colours"):
        ImageTextMatch(shapes=["square"])
