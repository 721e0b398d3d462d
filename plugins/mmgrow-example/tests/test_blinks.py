"""BlinksDataset: its captions count what the video shows, and mmgrow's dataset conformance suite passes."""

from __future__ import annotations

import pytest
from mmgrow.testing.conformance import run_checks

from mmgrow_example.blinks import BlinksDataset


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_caption_counts_the_lit_frames(split):
    ds = BlinksDataset(num_samples=12, split=split, frames=5, size=8)
    for i in range(len(ds)):
        s = ds[i]
        lit = int((s.media["video"].flatten(1).amax(1) == 255).sum())  # frames with the light on
        assert s.text == f"the light blinks {lit} times" and s.meta["count"] == lit
        assert (lit == 5) == (split == "heldout")  # only held-out videos light every frame


def test_conformance_suite_passes():
    results = run_checks("datasets", BlinksDataset)
    assert [r.name for r in results if not r.passed] == [], [r.message for r in results if not r.passed]
    assert "dataset_deterministic" in {r.name for r in results}
