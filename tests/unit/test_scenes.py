"""``scenes``: images redrawn from their meta, gaps between objects, distinct pairs, reading-order
captions (golden strings), boxes, held-out pairs, determinism, conformance, errors."""

import pytest
import torch

from mmgrow.data.synthetic.scenes import HELDOUT_PAIRS, SceneDataset, box_of, scene_caption
from mmgrow.data.synthetic.shapes import SHAPES, position_words
from mmgrow.registry import load_plugin
from mmgrow.testing.conformance import run_checks
from mmgrow.tokenizers.pixels import DEFAULT_PALETTE


def cell_start(obj, grid):
    x0, y0 = obj["box"][0], obj["box"][1]
    return round(y0 * grid), round(x0 * grid)


def test_caption_golden_strings():
    a = {"shape": "square", "colour": "red", "position": "top left"}
    b = {"shape": "ring", "colour": "blue", "position": "bottom right"}
    c = {"shape": "bar", "colour": "green", "position": "centre"}
    assert scene_caption([a]) == "a red square at the top left"
    assert scene_caption([a, b]) == "a red square at the top left and a blue ring at the bottom right"
    assert scene_caption([a, c, b]) == ("a red square at the top left, a green bar at the centre and a blue ring "
                                        "at the bottom right")
    assert box_of("bar", (7, 2), 8) == [0.25, 0.875, 0.625, 1.0]


def test_images_are_exactly_their_meta():
    """Redraw every image from its meta alone; boxes, positions, reading order, pairs and caption agree."""
    ds = SceneDataset(num_samples=200, size=16, grid=8, seed=5)
    counts = set()
    for i in range(len(ds)):
        s = ds[i]
        objects = s.meta["objects"]
        assert s.meta["count"] == len(objects) and 1 <= len(objects) <= 3
        counts.add(len(objects))
        starts = [cell_start(o, 8) for o in objects]
        assert starts == sorted(starts), "objects must be in reading order"
        assert len({(o["shape"], o["colour"]) for o in objects}) == len(objects), "pairs must be distinct"
        cells = torch.zeros(8, 8, 3, dtype=torch.uint8)
        for o, (r, c) in zip(objects, starts):
            mask = torch.tensor([[ch == "#" for ch in row] for row in SHAPES[o["shape"]]])
            assert o["box"] == [c / 8, r / 8, (c + mask.shape[1]) / 8, (r + mask.shape[0]) / 8]
            assert o["position"] == position_words(o["shape"], (r, c), 8)
            cells[r:r + mask.shape[0], c:c + mask.shape[1]][mask] = torch.tensor(DEFAULT_PALETTE[o["colour"]],
                                                                                dtype=torch.uint8)
        image = s.media["image"]
        assert image.dtype == torch.uint8 and image.shape == (16, 16, 3)
        assert torch.equal(image, cells.repeat_interleave(2, 0).repeat_interleave(2, 1))
        # foreground cells = sum of mask sizes: nothing overlaps
        painted = int(image[::2, ::2].any(-1).sum())
        assert painted == sum(sum(row.count("#") for row in SHAPES[o["shape"]]) for o in objects)
        for j, p in enumerate(objects):  # a gap of one cell, also diagonally
            for q in objects[j + 1:]:
                (px0, py0, px1, py1), (qx0, qy0, qx1, qy1) = ([round(v * 8) for v in o["box"]] for o in (p, q))
                assert px1 + 1 <= qx0 or qx1 + 1 <= px0 or py1 + 1 <= qy0 or qy1 + 1 <= py0, (p, q)
        assert s.text == scene_caption(objects)
    assert counts == {1, 2, 3}


def test_heldout_pairs_only_in_the_heldout_split():
    held = set(HELDOUT_PAIRS)
    seen_pairs = set()
    for split in ("train", "val"):
        ds = SceneDataset(num_samples=300, size=8, split=split)
        for i in range(len(ds)):
            pairs = {(o["shape"], o["colour"]) for o in ds[i].meta["objects"]}
            assert not pairs & held, (split, i, pairs)
            seen_pairs |= pairs
    assert len(seen_pairs) == 4 * 6 - len(held)  # every seen pair occurs
    ds = SceneDataset(num_samples=40, size=8, split="heldout")
    for i in range(len(ds)):
        pairs = [(o["shape"], o["colour"]) for o in ds[i].meta["objects"]]
        assert [p for p in pairs if p in held] == [HELDOUT_PAIRS[i % len(HELDOUT_PAIRS)]]


def test_heldout_prompts_golden():
    prompts = SceneDataset(num_samples=1, split="heldout").heldout_prompts()
    assert [p[0] for p in prompts] == ["a red square at the centre", "a blue ring at the centre",
                                       "a yellow cross at the centre", "a magenta bar at the centre"]
    assert prompts[0][1] == {"objects": [{"shape": "square", "colour": "red", "box": [0.25, 0.25, 0.625, 0.625],
                                          "position": "centre"}], "count": 1}
    assert prompts[3][1]["objects"][0]["box"] == [0.25, 0.375, 0.625, 0.5]


def test_restricted_names_and_custom_heldout():
    ds = SceneDataset(num_samples=30, size=8, shapes=["square", "bar"], colours=["red", "green"],
                      heldout=[["bar", "green"]], max_objects=2)
    assert ds.heldout == (("bar", "green"),)
    for i in range(len(ds)):
        assert all((o["shape"], o["colour"]) != ("bar", "green") for o in ds[i].meta["objects"])
    h = SceneDataset(num_samples=3, size=8, shapes=["square", "bar"], colours=["red", "green"],
                     heldout=[["bar", "green"]], max_objects=2, split="heldout")
    assert all(("bar", "green") in [(o["shape"], o["colour"]) for o in h[i].meta["objects"]] for i in range(3))


def test_deterministic_per_seed_split_index():
    a, b = SceneDataset(num_samples=5, seed=1), SceneDataset(num_samples=5, seed=1)
    assert all(torch.equal(a[i].media["image"], b[i].media["image"]) and a[i].meta == b[i].meta for i in range(5))
    assert a[-1].text == a[4].text
    other = SceneDataset(num_samples=5, seed=2)
    val = SceneDataset(num_samples=5, seed=1, split="val")
    assert [a[i].text for i in range(5)] != [other[i].text for i in range(5)]
    assert [a[i].text for i in range(5)] != [val[i].text for i in range(5)]


def test_registered_and_conformant():
    assert load_plugin("datasets", "scenes") is SceneDataset
    results = run_checks("datasets", SceneDataset)
    assert len(results) == 5 and all(r.passed for r in results), [r for r in results if not r.passed]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"size": 30}, ValueError, "multiple of grid"),
    ({"grid": 2, "size": 8}, ValueError, "grid must be an int >= 3"),
    ({"max_objects": 5}, ValueError, "do not fit"),
    ({"min_objects": 3, "max_objects": 2}, ValueError, "max_objects must be an int >= 3"),
    ({"split": "test"}, ValueError, "unknown split"),
    ({"shapes": ["circle"]}, ValueError, "unknown"),
    ({"colours": ["black"]}, ValueError, "unknown"),
    ({"shapes": ["square"], "colours": ["red"], "split": "heldout"}, ValueError, "would never appear|no default"),
    ({"shapes": ["square"], "colours": ["green"], "max_objects": 2}, ValueError, "distinct seen"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        SceneDataset(num_samples=4, **kwargs)


def test_index_out_of_range():
    ds = SceneDataset(num_samples=3)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
