"""``video_qa``: golden question/answer per kind, the documented stable kind choice, equal shares, segments."""

import hashlib
import math

import pytest
import torch

from mmgrow.data.sequence import SequenceBuilder
from mmgrow.data.synthetic.shapes import ShapesDataset
from mmgrow.data.video_qa import QUESTIONS, VideoQA
from mmgrow.protocols import Sample
from mmgrow.tokenizers.pixels import PixelTokenizer
from mmgrow.tokenizers.text import ByteTokenizer


def red_square(frames: int = 6) -> Sample:
    video = torch.zeros(frames, 8, 8, 3, dtype=torch.uint8)
    return Sample(media={"video": video}, text="a red square moves left",
                  meta={"shape": "square", "colour": "red", "motion": "left"})


@pytest.mark.parametrize("kind, question, answer", [
    ("colour", "what colour is the shape?", "red"),
    ("direction", "which direction does the shape move?", "left"),
    ("shape", "what shape is it?", "square"),
    ("frames", "how many frames?", "6"),
])
def test_golden_question_and_answer_per_kind(kind, question, answer):
    segments = VideoQA(kinds=[kind]).segments(red_square())
    assert [(s.modality, s.role) for s in segments] == [("video", "input"), ("text", "input"), ("text", "target")]
    assert segments[1].raw == question and segments[2].raw == answer


def test_frames_answer_counts_the_video():
    assert VideoQA(kinds=["frames"]).segments(red_square(frames=11))[2].raw == "11"


def test_kind_is_the_documented_sha256_choice():
    ds = ShapesDataset(num_samples=12, frames=3, size=16, grid=8, seed=4)
    task = VideoQA()
    for i in range(len(ds)):
        s = ds[i]
        h = hashlib.sha256(s.text.encode())
        for key in sorted(s.meta):
            h.update(f"\n{key}={s.meta[key]}".encode())
        h.update(s.media["video"].contiguous().numpy().tobytes())
        expected = list(QUESTIONS)[int.from_bytes(h.digest()[:8], "big") % 4]
        assert task.kind_of(s) == expected == task.kind_of(ds[i])  # stable on a regenerated copy


def test_every_kind_appears_in_equal_shares():
    """Pearson chi-square over 400 random-start samples, 3 dof: 16.27 is the 0.999 quantile."""
    ds = ShapesDataset(num_samples=400, frames=3, size=16, grid=8, seed=1)
    task = VideoQA()
    counts = {k: 0 for k in QUESTIONS}
    for i in range(len(ds)):
        counts[task.kind_of(ds[i])] += 1
    expected = len(ds) / 4
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 16.27, counts


def test_restricted_kinds_and_errors():
    task = VideoQA(kinds=["shape", "colour"])
    ds = ShapesDataset(num_samples=20, frames=3, size=16, grid=8)
    assert {task.question_answer(ds[i])[0] for i in range(20)} == {"shape", "colour"}
    with pytest.raises(ValueError, match="kinds must be distinct names"):
        VideoQA(kinds=["size"])
    with pytest.raises(KeyError, match="media 'video'"):
        VideoQA().segments(Sample(media={}, text="x"))
    with pytest.raises(KeyError, match="needs meta 'colour'"):
        VideoQA(kinds=["colour"]).segments(Sample(media={"video": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)}))


def test_only_the_answer_is_a_loss_target():
    builder = SequenceBuilder({"text": ByteTokenizer(), "video": PixelTokenizer(grid=4)})
    segments = VideoQA(kinds=["colour"]).segments(red_square(frames=2))
    seq, spans = builder.build_with_spans(segments)
    assert seq.loss_mask.sum().item() == len("red") + 2  # bos r e d eos
    assert seq.loss_mask[spans[2]].eq(1).all() and seq.loss_mask[: spans[2].start].eq(0).all()
    assert not math.isnan(float(seq.loss_mask.sum()))


@pytest.fixture
def registered():
    """The tasks of this change under their entry-point names (registered locally until installed)."""
    from mmgrow import registry
    from mmgrow.data.needle_task import NeedleTask, TextNeedleTask

    added = []
    for name, cls in (("video_qa", VideoQA), ("needle", NeedleTask), ("needle_text", TextNeedleTask)):
        if name not in registry.available("tasks"):
            registry.register("tasks", name, cls)
            added.append(name)
    yield
    for name in added:
        registry.unregister("tasks", name)


def test_tasks_pass_conformance_and_batch_through_the_data_module(registered):
    from mmgrow.data.datamodule import MMDataModule
    from mmgrow.registry import load_plugin
    from mmgrow.testing.conformance import run_checks

    for name in ("video_qa", "needle", "needle_text"):
        assert all(r.passed for r in run_checks("tasks", load_plugin("tasks", name))), name
    dm = MMDataModule(tasks=["video_qa"], codec_args={"video": {"grid": 4}}, dataset_args={"frames": 2, "size": 16,
                      "grid": 4}, num_train=8, num_val=2, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    answers = {VideoQA().question_answer(dm.train_set[i])[2] for i in range(8)}
    text = ByteTokenizer()
    for ids, mask in zip(batch.input_ids, batch.loss_mask):
        target = ids[mask == 1] - dm.token_space.offset("text")  # the answer only: bos, its bytes, eos
        assert target[0] == text.bos_id and target[-1] == text.eos_id and text.decode(target) in answers
