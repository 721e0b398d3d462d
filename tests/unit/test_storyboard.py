"""Storyboards: parsing, the dataset's scene semantics read back from the pixels, and the task's
segments, markers and block ids through the real SequenceBuilder."""

import json

import pytest
import torch

from mmgrow.data.sequence import SequenceBuilder
from mmgrow.data.storyboard_task import StoryboardToVideo, storyboard_segments
from mmgrow.data.synthetic.shapes import HELDOUT_COMBOS, describe_video
from mmgrow.data.synthetic.storyboard import Scene, StoryboardDataset, parse_storyboard
from mmgrow.protocols import Sample
from mmgrow.tokenizers.pixels import PixelTokenizer
from mmgrow.tokenizers.text import ByteTokenizer

GRID = 8
# Written out independently of the library: (rows, cols) of each shape and the step of each motion.
EXTENT = {"square": (3, 3), "cross": (3, 3), "ring": (3, 3), "bar": (1, 3)}
STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def cells(video):
    return video[:, :: video.shape[1] // GRID, :: video.shape[2] // GRID]


def top_left(frame_cells):
    fg = (frame_cells != 0).any(-1)
    rows, cols = fg.any(1).nonzero()[:, 0], fg.any(0).nonzero()[:, 0]
    return int(rows[0]), int(cols[0])


def fits(shape, motion, start, frames):
    rows, cols = EXTENT[shape]
    d_r, d_c = STEP[motion]
    return all(0 <= start[0] + d_r * t <= GRID - rows and 0 <= start[1] + d_c * t <= GRID - cols
               for t in range(frames))


# ------------------------------------------------------------------------------------------------
# parse_storyboard
# ------------------------------------------------------------------------------------------------


def test_parse_storyboard_reads_user_json_and_defaults_the_flag():
    board = [{"text": "a red square moves left", "requires_scene_transition": True, "neg_text": "blurry"},
             {"text": "it turns around"}]
    for given in (board, json.dumps(board)):
        scenes = parse_storyboard(given)
        assert [s.text for s in scenes] == ["a red square moves left", "it turns around"]
        assert [s.requires_scene_transition for s in scenes] == [True, False]
        assert scenes[0].neg_text == "blurry" and scenes[1].neg_text is None
        assert [s.segments for s in scenes] == [1, 1] and scenes[0].shape is None
    assert parse_storyboard([s.to_dict() for s in scenes]) == scenes


@pytest.mark.parametrize("bad, error, match", [
    ({"text": "x"}, TypeError, "a storyboard is a list of scenes"),
    ([], ValueError, "no scenes"),
    ("[]", ValueError, "no scenes"),
    ("not json", ValueError, "not valid JSON"),
    (["a red square"], TypeError, "scene 0 must be a dict"),
    ([{"requires_scene_transition": True}], ValueError, "scene 0 has no 'text'"),
    ([{"text": "ok"}, {"text": ""}], ValueError, "scene 1: .*non-empty"),
    ([{"text": "   "}], ValueError, "non-empty"),
    ([{"text": "ok", "requires_scene_transition": "yes"}], TypeError, "must be a bool"),
    ([{"text": "ok", "requires_scene_transition": 1}], TypeError, "must be a bool"),
    ([{"text": "ok", "transition": True}], ValueError, r"unknown keys \['transition'\]"),
])
def test_parse_storyboard_errors(bad, error, match):
    with pytest.raises(error, match=match):
        parse_storyboard(bad)


# ------------------------------------------------------------------------------------------------
# StoryboardDataset
# ------------------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_seeded():
    a, b = StoryboardDataset(num_samples=8, seed=5), StoryboardDataset(num_samples=8, seed=5)
    later = [b[i] for i in reversed(range(8))][::-1]
    for x, y in zip([a[i] for i in range(8)], later):
        assert x.text == y.text and x.meta == y.meta and torch.equal(x.media["video"], y.media["video"])
    other = StoryboardDataset(num_samples=8, seed=6)
    assert any(a[i].meta != other[i].meta for i in range(8))
    with pytest.raises(IndexError, match="index 8 out of range"):
        a[8]


@pytest.mark.parametrize("split, segments_per_scene, segment_frames", [
    ("train", 1, 4), ("val", 2, 2), ("heldout", 1, 3), ("train", 3, 2)])
def test_pixels_follow_the_scene_semantics(split, segments_per_scene, segment_frames):
    ds = StoryboardDataset(num_samples=40, seed=1, split=split, scenes=(1, 4), segments_per_scene=segments_per_scene,
                           segment_frames=segment_frames)
    scene_frames = segments_per_scene * segment_frames
    counts, continuing, jumps = set(), 0, 0
    for i in range(len(ds)):
        sample = ds[i]
        scenes = sample.meta["scenes"]
        counts.add(len(scenes))
        assert sample.meta["segment_frames"] == segment_frames
        video = cells(sample.media["video"])
        assert video.shape == (len(scenes) * scene_frames, GRID, GRID, 3)
        assert sample.text == ". ".join(s["text"] for s in scenes)
        assert scenes[0]["requires_scene_transition"] is True
        for s, scene in enumerate(scenes):
            clip = video[s * scene_frames:(s + 1) * scene_frames]
            seen = describe_video(clip)  # an independent reader of the pixels
            assert seen == {k: scene[k] for k in ("colour", "shape", "motion")}
            assert scene["text"] == f"a {scene['colour']} {scene['shape']} moves {scene['motion']}"
            assert scene["segments"] == segments_per_scene
            assert top_left(clip[0]) == tuple(scene["start"])
            triple = (scene["shape"], scene["colour"], scene["motion"])
            assert (triple in HELDOUT_COMBOS) == (split == "heldout")
            if s == 0:
                continue
            prev = scenes[s - 1]
            same_object = (prev["shape"], prev["colour"]) == (scene["shape"], scene["colour"])
            assert same_object != scene["requires_scene_transition"]
            if same_object:
                continuing += 1
                end = top_left(video[s * scene_frames - 1])
                # Continues from where the object stopped whenever an allowed motion can go on from there.
                if tuple(scene["start"]) != end:
                    jumps += 1
                    allowed = [m for m in STEP if (scene["shape"], scene["colour"], m) in HELDOUT_COMBOS] \
                        if split == "heldout" else \
                        [m for m in STEP if (scene["shape"], scene["colour"], m) not in HELDOUT_COMBOS]
                    assert not any(fits(scene["shape"], m, end, scene_frames) for m in allowed)
    assert counts == {1, 2, 3, 4}
    assert continuing > 0
    if split != "heldout":
        assert jumps < continuing


def test_dataset_errors():
    with pytest.raises(ValueError, match="travels 7 cells"):
        StoryboardDataset(segments_per_scene=2, segment_frames=4)
    with pytest.raises(ValueError, match="scenes must satisfy"):
        StoryboardDataset(scenes=(0, 2))
    with pytest.raises(ValueError, match="scenes must be an int or a"):
        StoryboardDataset(scenes=(1, 2, 3))
    with pytest.raises(ValueError, match="transition_prob"):
        StoryboardDataset(transition_prob=1.5)
    with pytest.raises(ValueError, match="a transition needs a second object"):
        StoryboardDataset(shapes=["square"], colours=["red"], heldout=[])
    with pytest.raises(ValueError, match="unknown split"):
        StoryboardDataset(split="test")


def test_fixed_scene_count_and_no_transitions():
    ds = StoryboardDataset(num_samples=10, scenes=3, transition_prob=0.0)
    for i in range(len(ds)):
        flags = [s["requires_scene_transition"] for s in ds[i].meta["scenes"]]
        objects = {(s["shape"], s["colour"]) for s in ds[i].meta["scenes"]}
        assert flags == [True, False, False] and len(objects) == 1


# ------------------------------------------------------------------------------------------------
# StoryboardToVideo
# ------------------------------------------------------------------------------------------------

BOARD = [
    {"text": "a red square moves left", "requires_scene_transition": True, "segments": 2},
    {"text": "a red square moves up", "requires_scene_transition": False, "segments": 1},
    {"text": "a blue ring moves down", "requires_scene_transition": True, "segments": 1},
]
EXPECTED_TEXTS = [
    "<scene_start> a red square moves left",            # scene 0, first segment of a transition scene
    "a red square moves left",                          # scene 0 continues into scene 1: no end marker
    "a red square moves up <scene_end>",                # followed by a transition
    "<scene_start> a blue ring moves down <scene_end>",  # transition, and the last scene
]


def test_segments_markers_and_block_ids_through_the_builder():
    k = 2
    video = torch.randint(0, 256, (4 * k, 32, 32, 3), dtype=torch.uint8)
    sample = Sample(media={"video": video}, text="", meta={"scenes": BOARD, "segment_frames": k})
    segments = StoryboardToVideo().segments(sample)
    assert [(s.modality, s.role, s.block) for s in segments] == [
        (m, r, b) for b in range(4) for m, r in (("text", "input"), ("video", "target"))]
    assert [s.raw for s in segments[::2]] == EXPECTED_TEXTS
    for j, seg in enumerate(segments[1::2]):
        assert torch.equal(seg.raw, video[j * k:(j + 1) * k])

    text, pixels = ByteTokenizer(), PixelTokenizer(grid=8)
    encoded = SequenceBuilder({"text": text, "video": pixels}).build(segments)
    video_tokens = 1 + k * (8 * 8 + 1)  # bov, then per frame 64 cells and eof / eov
    blocks, loss = [], []
    for b, t in enumerate(EXPECTED_TEXTS):
        n_text = len(t.encode()) + 2  # bos ... eos
        blocks += [b] * (n_text + video_tokens)
        loss += [0.0] * n_text + [1.0] * video_tokens
    assert encoded.block_ids.tolist() == blocks
    assert encoded.loss_mask.tolist() == loss


def test_configurable_markers_and_placeholder_video():
    segments = storyboard_segments(BOARD, None, 3, video=None, frame_size=(16, 24), scene_start="[S]",
                                   scene_end="[E]")
    assert [s.raw for s in segments[::2]] == [t.replace("<scene_start>", "[S]").replace("<scene_end>", "[E]")
                                              for t in EXPECTED_TEXTS]
    for seg in segments[1::2]:
        assert seg.raw.dtype == torch.uint8 and seg.raw.shape == (3, 16, 24, 3) and not seg.raw.any()
    # A user prompt without segment counts: one int for every scene.
    user = [{"text": "a", "requires_scene_transition": True}, {"text": "b", "requires_scene_transition": True}]
    texts = [s.raw for s in storyboard_segments(user, 2, 4)[::2]]
    assert texts == ["<scene_start> a", "a <scene_end>", "<scene_start> b", "b <scene_end>"]
    with pytest.raises(ValueError, match="non-empty string"):
        StoryboardToVideo(scene_end="")


def test_task_on_dataset_samples_covers_the_whole_video():
    ds = StoryboardDataset(num_samples=6, seed=2, scenes=(2, 3), segments_per_scene=2, segment_frames=2)
    task = StoryboardToVideo()
    for i in range(len(ds)):
        sample = ds[i]
        segments = task.segments(sample)
        scenes = sample.meta["scenes"]
        assert len(segments) == 2 * 2 * len(scenes)
        assert torch.equal(torch.cat([s.raw for s in segments[1::2]]), sample.media["video"])
        starts = sum(s.raw.startswith("<scene_start> ") for s in segments[::2])
        ends = sum(s.raw.endswith(" <scene_end>") for s in segments[::2])
        flags = [s["requires_scene_transition"] for s in scenes]
        assert starts == sum(flags)
        assert ends == sum(flags[1:]) + 1


def test_task_errors():
    task = StoryboardToVideo()
    with pytest.raises(ValueError, match="no scenes"):
        storyboard_segments([], 1, 2)
    with pytest.raises(ValueError, match="non-empty"):
        task.segments(Sample(media={"video": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)}, text="",
                             meta={"scenes": [{"text": ""}], "segment_frames": 2}))
    with pytest.raises(KeyError, match="expected a storyboard sample"):
        task.segments(Sample(media={"video": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)}, text="a red bar"))
    with pytest.raises(ValueError, match="4 segments of 2 frames = 8 frames, but the video has 6"):
        storyboard_segments(BOARD, None, 2, video=torch.zeros(6, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2 segment counts for 3 scenes"):
        storyboard_segments(BOARD, [1, 1], 2)
    assert Scene("x").requires_scene_transition is False
