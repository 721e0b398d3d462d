"""Needle data: well-formed at any length and depth (the needle exactly once, at the documented offset,
the answer recoverable from the haystack), deterministic, clear errors for impossible settings; the task's
segments."""

import re

import pytest
import torch

from mmgrow.data.needle_task import NeedleTask, TextNeedleTask
from mmgrow.data.sequence import SequenceBuilder
from mmgrow.data.synthetic.needle import NeedleDataset
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE, PixelTokenizer
from mmgrow.tokenizers.text import ByteTokenizer

DEPTHS = [0.0, 0.37, 1.0, None]


@pytest.mark.parametrize("length", [15, 16, 17, 100, 1001, 5000])
@pytest.mark.parametrize("depth", DEPTHS)
def test_text_needle_is_well_formed(length, depth):
    ds = NeedleDataset(num_samples=3, kind="text", length=length, depth=depth, seed=2)
    for i in range(len(ds)):
        s = ds[i]
        hay, meta = s.meta["haystack"], s.meta
        used = depth if depth is not None else meta["depth"]
        assert 0 <= used <= 1 and meta["length"] == length and len(hay) == length
        offset = round(used * (length - 15))
        assert meta["offset"] == offset and hay.find("the code is") == offset
        assert hay.count("the code is") == 1
        assert hay[offset:offset + 15] == f"the code is {meta['answer']}."
        assert re.findall(r"\d+", hay) == [meta["answer"]] and 10 <= int(meta["answer"]) <= 99
        assert meta["question"] == s.text == "what is the code?"
        if depth == 1.0:
            assert hay.endswith(meta["needle"])


@pytest.mark.parametrize("length", [1, 2, 16, 300])
@pytest.mark.parametrize("depth", DEPTHS)
def test_video_needle_is_well_formed(length, depth):
    ds = NeedleDataset(num_samples=2, kind="video", length=length, depth=depth, size=16, grid=8, seed=5)
    grey, black = torch.tensor(DEFAULT_PALETTE["grey"]), torch.tensor(DEFAULT_PALETTE["black"])
    for i in range(len(ds)):
        s = ds[i]
        video = s.media["video"]
        assert video.shape == (length, 16, 16, 3) and video.dtype == torch.uint8
        used = depth if depth is not None else s.meta["depth"]
        offset = round(used * (length - 1))
        coloured = ((video != grey).any(-1) & (video != black).any(-1)).flatten(1).any(1)  # [F]
        assert coloured.nonzero().flatten().tolist() == [offset] == [s.meta["offset"]]
        pixels = video[offset][coloured[offset] & (video[offset] != black).any(-1)]
        names = {n for n, rgb in DEFAULT_PALETTE.items() for p in pixels if tuple(p.tolist()) == rgb}
        assert names == {s.meta["answer"]}
        assert (video != black).any(-1).flatten(1).any(1).all()  # every frame holds a shape


def test_deterministic_per_seed_split_index():
    a = NeedleDataset(num_samples=4, kind="text", length=200, seed=1)
    b = NeedleDataset(num_samples=4, kind="text", length=200, seed=1)
    val = NeedleDataset(num_samples=4, kind="text", length=200, seed=1, split="val")
    assert [a[i].meta for i in range(4)] == [b[i].meta for i in range(4)]
    assert [a[i].meta["haystack"] for i in range(4)] != [val[i].meta["haystack"] for i in range(4)]
    v1 = NeedleDataset(num_samples=2, kind="video", length=5, seed=1)
    v2 = NeedleDataset(num_samples=2, kind="video", length=5, seed=1)
    assert torch.equal(v1[1].media["video"], v2[1].media["video"])


@pytest.mark.parametrize("args, message", [
    ({"kind": "text", "length": 14}, "length must be an int >= 15"),
    ({"kind": "video", "length": 0}, "length must be an int >= 1"),
    ({"depth": 1.5}, r"depth must be a finite number in \[0, 1\]"),
    ({"depth": float("nan")}, "depth must be a finite number"),
    ({"depth": -0.1}, "depth must be"),
    ({"kind": "audio"}, "kind must be one of"),
    ({"kind": "video", "size": 30, "grid": 8}, "multiple of grid"),
    ({"kind": "video", "colours": ["grey"]}, "colours must be distinct names"),
    ({"split": "test"}, "unknown split"),
])
def test_impossible_settings_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        NeedleDataset(num_samples=1, **args)


def test_needle_task_segments_and_loss_mask():
    builder = SequenceBuilder({"text": ByteTokenizer(), "video": PixelTokenizer(grid=4)})
    text = NeedleDataset(num_samples=1, kind="text", length=40, depth=0.5)[0]
    video = NeedleDataset(num_samples=1, kind="video", length=3, size=16, grid=4)[0]
    for sample, first in ((text, "text"), (video, "video")):
        segments = NeedleTask().segments(sample)
        assert [(s.modality, s.role) for s in segments] == [(first, "input"), ("text", "input"), ("text", "target")]
        assert segments[1].raw == sample.meta["question"] and segments[2].raw == sample.meta["answer"]
        seq = builder.build(segments)
        assert seq.loss_mask.sum().item() == len(sample.meta["answer"]) + 2
    assert TextNeedleTask().segments(text)[0].raw == text.meta["haystack"]
    assert NeedleTask().condition_text(text, []) == "what is the code?"
    with pytest.raises(ValueError, match="use the task 'needle'"):
        TextNeedleTask().segments(video)
