"""ShapesDataset: determinism, held-out combinations, and captions that match the pixels."""

import pytest
import torch

from mmgrow.data.synthetic.shapes import HELDOUT_COMBOS, ShapesDataset
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE, PixelTokenizer

# Written out independently of the module: the cell pattern each shape name must show (1 = colour).
EXPECTED_CELLS = {
    "square": [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
    "cross": [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
    "ring": [[1, 1, 1], [1, 0, 1], [1, 1, 1]],
    "bar": [[1, 1, 1]],
}
STEP = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}


def cells_of(video: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """[F, H, W, 3] -> [F, G, G, 3] by taking one pixel per cell (cells are uniform, checked separately)."""
    px = video.shape[1] // grid
    return video[:, ::px, ::px]


def test_deterministic_and_random_access():
    a = ShapesDataset(num_samples=20, seed=3)
    b = ShapesDataset(num_samples=20, seed=3)
    later_first = [b[i] for i in reversed(range(20))][::-1]
    for x, y in zip([a[i] for i in range(20)], later_first):
        assert x.text == y.text and x.meta == y.meta and torch.equal(x.media["video"], y.media["video"])
    assert a[-1].text == a[19].text
    other_seed = ShapesDataset(num_samples=20, seed=4)
    val = ShapesDataset(num_samples=20, seed=3, split="val")
    assert any(not torch.equal(a[i].media["video"], other_seed[i].media["video"]) for i in range(20))
    assert any(not torch.equal(a[i].media["video"], val[i].media["video"]) for i in range(20))
    with pytest.raises(IndexError, match="index 20 out of range for 20 samples"):
        a[20]


def test_heldout_combinations_never_in_train_or_val_but_their_parts_are():
    heldout = set(HELDOUT_COMBOS)
    assert len(heldout) >= 4
    seen = set()
    for split in ("train", "val"):
        ds = ShapesDataset(num_samples=600, seed=0, split=split)
        for i in range(len(ds)):
            m = ds[i].meta
            seen.add((m["shape"], m["colour"], m["motion"]))
    assert not seen & heldout
    for axis in range(3):
        assert {c[axis] for c in heldout} <= {c[axis] for c in seen}
    # 600 + 600 draws from 90 combinations: every non-held-out one shows up
    assert len(seen) == 4 * 6 * 4 - len(heldout)

    ds = ShapesDataset(num_samples=2 * len(HELDOUT_COMBOS), split="heldout")
    got = [(ds[i].meta["shape"], ds[i].meta["colour"], ds[i].meta["motion"]) for i in range(len(ds))]
    assert set(got) == heldout
    assert ds.heldout_captions() == [f"a {c} {s} moves {m}" for s, c, m in HELDOUT_COMBOS]
    assert [p[0] for p in ds.heldout_prompts()] == ds.heldout_captions()
    assert [ds[i].text for i in range(len(HELDOUT_COMBOS))] == ds.heldout_captions()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_caption_matches_colour_shape_and_motion(split):
    ds = ShapesDataset(num_samples=40, seed=1, split=split)
    black = torch.tensor(DEFAULT_PALETTE["black"], dtype=torch.uint8)
    for i in range(len(ds)):
        s = ds[i]
        video, meta = s.media["video"], s.meta
        assert video.dtype == torch.uint8 and video.shape == (6, 32, 32, 3)
        assert s.text == f"a {meta['colour']} {meta['shape']} moves {meta['motion']}"
        colour = torch.tensor(DEFAULT_PALETTE[meta["colour"]], dtype=torch.uint8)
        is_colour = (video == colour).all(-1)
        assert (is_colour | (video == black).all(-1)).all(), "pixels must be the shape colour or the background"
        # each 4x4 pixel cell is uniform
        cells = cells_of(video)
        assert torch.equal(cells.repeat_interleave(4, 1).repeat_interleave(4, 2), video)
        expected = torch.tensor(EXPECTED_CELLS[meta["shape"]], dtype=torch.bool)
        centroids = []
        for t in range(6):
            on = (cells[t] == colour).all(-1)
            rows, cols = on.nonzero(as_tuple=True)
            crop = on[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert torch.equal(crop, expected), f"frame {t} of {s.text!r} does not show a {meta['shape']}"
            pix = is_colour[t].nonzero().to(torch.float64)
            centroids.append(pix.mean(0))
        steps = torch.stack(centroids).diff(dim=0)  # [F-1, 2] (row, col) in pixels
        expected_step = torch.tensor(STEP[meta["motion"]], dtype=torch.float64) * 4  # one cell per frame
        assert torch.allclose(steps, expected_step.expand_as(steps)), f"{s.text!r}: centroid steps {steps.tolist()}"


def test_videos_are_exact_under_the_pixel_codec():
    codec = PixelTokenizer(grid=8)
    ds = ShapesDataset(num_samples=5, seed=2)
    for i in range(len(ds)):
        video = ds[i].media["video"]
        assert torch.equal(codec.decode(codec.encode(video)), cells_of(video))


def test_options_and_errors():
    small = ShapesDataset(num_samples=30, frames=4, size=16, grid=8, shapes=["bar"], colours=["red", "white"],
                          motions=["up", "down"], heldout=[("bar", "red", "up")])
    assert small[0].media["video"].shape == (4, 16, 16, 3)
    assert {tuple(small[i].meta.values()) for i in range(30)} == {("bar", "red", "down"), ("bar", "white", "up"),
                                                                 ("bar", "white", "down")}
    with pytest.raises(ValueError, match="unknown split 'test'"):
        ShapesDataset(split="test")
    with pytest.raises(ValueError, match="travels 7 cells in 8 frames but only 5 fit"):
        ShapesDataset(frames=8)
    with pytest.raises(ValueError, match="size=30 must be a multiple of grid=8"):
        ShapesDataset(size=30)
    with pytest.raises(ValueError, match="colours must be distinct names"):
        ShapesDataset(colours=["red", "black"])
    with pytest.raises(ValueError, match=r"\['up'\] would never appear in training"):
        ShapesDataset(shapes=["bar"], colours=["red"], motions=["up", "down"], heldout=[("bar", "red", "up")])


def test_describe_video_reads_back_every_rendered_combination():
    from mmgrow.data.synthetic.shapes import describe_video
    from mmgrow.tokenizers.pixels import PixelTokenizer

    codec = PixelTokenizer(grid=8)
    for random_start in (True, False):
        ds = ShapesDataset(num_samples=200, frames=4, seed=3, random_start=random_start)
        for i in range(len(ds)):
            s = ds[i]
            frames = codec.decode(codec.encode(s.media["video"]))
            assert describe_video(frames) == s.meta, (i, s.text)


def test_describe_video_says_none_when_nothing_is_shown():
    from mmgrow.data.synthetic.shapes import describe_video

    empty = torch.zeros(3, 6, 6, 3, dtype=torch.uint8)
    assert describe_video(empty) == {"colour": None, "shape": None, "motion": None}
    still = ShapesDataset(num_samples=1, frames=1, grid=6, size=24)[0].media["video"][:, ::4, ::4]
    desc = describe_video(still.repeat(3, 1, 1, 1))
    assert desc["motion"] is None and desc["colour"] == still_colour(still)
    with pytest.raises(ValueError, match="uint8 frames"):
        describe_video(empty.float())


def still_colour(video):
    from mmgrow.tokenizers.pixels import DEFAULT_PALETTE

    rgb = [tuple(int(v) for v in p) for p in video.reshape(-1, 3)]
    names = {tuple(v): k for k, v in DEFAULT_PALETTE.items()}
    return next(names[p] for p in rgb if names[p] != "black")


def test_centred_start_is_deterministic_given_the_caption():
    ds = ShapesDataset(num_samples=300, frames=4, grid=6, size=24, random_start=False)
    by_caption = {}
    for i in range(len(ds)):
        s = ds[i]
        if s.text in by_caption:
            assert torch.equal(by_caption[s.text], s.media["video"])
        by_caption[s.text] = s.media["video"]
    assert len(by_caption) > 40


# ------------------------------------------------------------------ stage filters and detailed captions

STAGE2 = {"shapes": ["ring", "bar"], "colours": ["yellow", "cyan", "magenta"]}


def test_shape_and_colour_filters_are_honoured_and_heldout_stays_consistent():
    from mmgrow.data.synthetic.shapes import describe_video

    allowed = {(s, c, m) for s in STAGE2["shapes"] for c in STAGE2["colours"] for m in STEP}
    heldout = {("ring", "yellow", "right"), ("ring", "cyan", "down")}  # HELDOUT_COMBOS within the filters
    seen = set()
    for split in ("train", "val"):
        ds = ShapesDataset(num_samples=400, seed=0, split=split, **STAGE2)
        assert set(ds.heldout) == heldout
        for i in range(len(ds)):
            s = ds[i]
            seen.add((s.meta["shape"], s.meta["colour"], s.meta["motion"]))
            if i < 40:  # the pixels show what the metadata says
                assert describe_video(cells_of(s.media["video"])) == s.meta
    assert seen == allowed - heldout  # 800 draws over 22 combinations: each one shows up
    ds = ShapesDataset(num_samples=4, split="heldout", **STAGE2)
    assert {(ds[i].meta["shape"], ds[i].meta["colour"], ds[i].meta["motion"]) for i in range(4)} == heldout
    # colours outside the default six (any palette colour but the background) can be chosen too
    extra = ShapesDataset(num_samples=50, shapes=["bar"], colours=["white", "orange"], motions=["up", "down"],
                          heldout=[("bar", "white", "up")])
    assert {extra[i].meta["colour"] for i in range(50)} == {"white", "orange"}


def test_filter_and_caption_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"valid ones: square, cross, ring, bar; got \['hexagon'\] \(unknown: \['hexagon'\]\)"):
        ShapesDataset(shapes=["hexagon"])
    with pytest.raises(ValueError, match=r"colours must be distinct names from the valid ones: white, grey, red.*"
                                         r"\(unknown: \['black'\]\)"):
        ShapesDataset(colours=["red", "black"])
    with pytest.raises(ValueError, match=r"unknown captions style 'long'; expected one of \('short', 'detailed'\)"):
        ShapesDataset(captions="long")
    with pytest.raises(ValueError, match=r"no default held-out combination uses only shapes=\['bar'\].*pass heldout="):
        ShapesDataset(split="heldout", shapes=["bar"], colours=["white", "orange"])


def test_position_words_and_one_full_detailed_caption():
    from mmgrow.data.synthetic.shapes import detailed_caption, position_words

    assert position_words("square", (0, 0), 8) == "top left"
    assert position_words("square", (5, 5), 8) == "bottom right"
    assert position_words("square", (2, 2), 8) == "centre"
    assert position_words("square", (0, 2), 8) == "top"
    assert position_words("bar", (3, 0), 8) == "left"
    assert detailed_caption("bar", "red", "up", (3, 0), frames=4, grid=8) == (
        "a red bar moves up, one cell per frame for 4 frames, starting at the left of a black 8 by 8 grid; "
        "the bar is medium-sized, 3 cells wide and 1 cell tall")


def _words_of_position(video, grid):
    """Start position in words, read from the first frame's pixels: thirds of the grid around the
    centre of the shape's bounding box."""
    on = (cells_of(video, grid)[0] != 0).any(-1)
    rows, cols = on.any(1).nonzero()[:, 0], on.any(0).nonzero()[:, 0]
    centre_r = (int(rows[0]) + int(rows[-1]) + 1) / 2 / grid
    centre_c = (int(cols[0]) + int(cols[-1]) + 1) / 2 / grid
    v = "top" if centre_r < 1 / 3 else "bottom" if centre_r > 2 / 3 else ""
    h = "left" if centre_c < 1 / 3 else "right" if centre_c > 2 / 3 else ""
    return " ".join(w for w in (v, h) if w) or "centre"


@pytest.mark.parametrize("cfg, size_word", [({"frames": 6, "grid": 8, "size": 32}, "medium-sized"),
                                            ({"frames": 4, "grid": 12, "size": 24}, "small"),
                                            ({"frames": 2, "grid": 4, "size": 8}, "large")])
def test_detailed_captions_are_deterministic_and_name_every_attribute(cfg, size_word):
    detailed = ShapesDataset(num_samples=60, seed=5, captions="detailed", **cfg)
    again = ShapesDataset(num_samples=60, seed=5, captions="detailed", **cfg)
    short = ShapesDataset(num_samples=60, seed=5, **cfg)
    positions = set()
    for i in range(60):
        s, t = detailed[i], short[i]
        assert s.text == again[i].text and torch.equal(s.media["video"], t.media["video"]) and s.meta == t.meta
        shape, colour, motion = s.meta["shape"], s.meta["colour"], s.meta["motion"]
        h, w = len(EXPECTED_CELLS[shape]), len(EXPECTED_CELLS[shape][0])
        position = _words_of_position(s.media["video"], cfg["grid"])
        positions.add(position)
        assert s.text == (f"{t.text}, one cell per frame for {cfg['frames']} frames, starting at the {position} of a "
                          f"black {cfg['grid']} by {cfg['grid']} grid; the {shape} is {size_word}, {w} cells wide and "
                          f"{h} {'cell' if h == 1 else 'cells'} tall"), s.text
        assert t.text == f"a {colour} {shape} moves {motion}"  # "short" is today's caption exactly
    assert len(positions) >= 3  # random starts give several position words


def test_detailed_heldout_prompts_describe_the_centred_video():
    ds = ShapesDataset(num_samples=len(HELDOUT_COMBOS), split="heldout", captions="detailed", random_start=False)
    assert [ds[i].text for i in range(len(ds))] == ds.heldout_captions() == [p[0] for p in ds.heldout_prompts()]
    assert all(cap.startswith(f"a {c} {s} moves {m}, ") for cap, (s, c, m) in zip(ds.heldout_captions(), HELDOUT_COMBOS))


def test_describe_reads_pixel_resolution_frames_like_grid_frames():
    ds = ShapesDataset(num_samples=12, seed=3)
    for i in range(12):
        sample = ds[i]
        assert ds.describe(sample.media["video"]) == sample.meta  # 32 px frames, read back at the 8-cell grid
    noisy = (ds[0].media["video"].float() + 20 * torch.randn(ds[0].media["video"].shape)).clamp(0, 255).byte()
    assert ds.describe(noisy) == ds[0].meta  # cell means average the noise away
