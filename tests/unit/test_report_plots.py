"""``mmgrow report`` plots: the files are real PNGs and hold the hand-computed curves and bars."""

from __future__ import annotations

import pytest
from report_fixtures import ablation_tree

from mmgrow.report.write import write_report

PNGS = ("loss_vs_tokens.png", "loss_vs_time.png", "throughput.png", "memory.png", "metrics.png")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = ablation_tree(tmp_path_factory.mktemp("abl"))
    return root, write_report([root], out=root / "out")


def test_pngs_exist_open_and_are_embedded(report):
    from PIL import Image

    root, _ = report
    md = (root / "out" / "report.md").read_text()
    for name in PNGS:
        path = root / "out" / "report" / name
        assert path.stat().st_size > 8_000, name  # a drawn figure, not an empty canvas
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 300
        assert f"(report/{name})" in md


def test_loss_vs_tokens_curves_are_seed_means_with_min_max_band(report):
    _, rep = report
    data = rep["plot_data"]["loss_vs_tokens.png"]
    curves = {(c.group, c.metric): c for c in data["curves"]}
    assert len(curves) == 4  # 2 variants x (train, val); the diverged mamba run is not drawn
    ttt = curves[("ttt", "train/loss")]
    # seed 0 train 3, 2 and seed 1 train 5, 4 at perf/tokens_seen 10, 20
    assert (ttt.x, ttt.mean, ttt.low, ttt.high, ttt.runs) == ([10, 20], [4, 3], [3, 2], [5, 4], 2)
    # the val row has no perf/tokens_seen cell: interpolated at its step (1) -> 20 tokens
    assert curves[("ttt", "val/loss")].x == [20] and curves[("ttt", "val/loss")].mean == pytest.approx([1.1])
    # mamba has no perf column: x = (step + 1) * tokens_seen / global_step = (step + 1) * 40 / 2, steps 0 and 1
    mamba = curves[("mamba", "train/loss")]
    assert mamba.x == [20, 40] and mamba.mean == pytest.approx([2.7, 1.7])
    assert data["caption"].startswith("mixed:") and "perf/tokens_seen" in data["caption"]


def test_loss_vs_time_uses_wall_seconds_fallback(report):
    _, rep = report
    data = rep["plot_data"]["loss_vs_time.png"]
    ttt = next(c for c in data["curves"] if c.group == "ttt" and c.metric == "train/loss")
    assert ttt.x == [4.0, 8.0]  # (step + 1) * wall_seconds (8) / global_step (2), steps 0 and 1
    assert "wall_seconds / global_step" in data["caption"] and "mixed" not in data["caption"]
    assert "wall_seconds / global_step" in rep["plots"]["loss_vs_time.png"]


def test_bars_hold_means_and_sample_std(report):
    _, rep = report
    tps = rep["plot_data"]["throughput.png"]
    assert tps["ttt"] == pytest.approx((200.0, 141.4213562373095))
    assert tps["mamba"] == pytest.approx((60.0, 14.142135623730951))
    assert rep["plot_data"]["memory.png"]["mamba"] == pytest.approx((300.0, 0.0))
    assert "peak resident set size" in rep["plots"]["memory.png"]
    panels = rep["plot_data"]["metrics.png"]
    assert panels["heldout.probe.text_alignment.all"]["mamba"] == pytest.approx((0.5, 0.3535533905932738))
