"""GIF / PNG writers and the metrics plot."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrow.evaluation.media import GRID_PAD, atomic_write, frames_grid_png, read_gif, upscale, write_gif
from mmgrow.evaluation.plots import plot_metrics, read_metrics


def random_video(seed: int, frames: int = 4, size: int = 8, colours: int = 12) -> np.ndarray:
    """Frames drawn from a small palette (like a codec's output), consecutive frames distinct."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    return palette[rng.integers(0, colours, (frames, size, size))]


def test_upscale_is_kron_with_ones():
    video = random_video(0, frames=2, size=3)
    expected = np.stack([np.kron(f, np.ones((4, 4, 1), dtype=np.uint8)) for f in video])
    assert np.array_equal(upscale(video, 4), expected)


def test_gif_round_trip_is_exact(tmp_path):
    video = random_video(1)
    path = write_gif(video, tmp_path / "sub" / "clip.gif", fps=4, scale=8)
    back = read_gif(path)
    assert back.dtype == np.uint8 and back.shape == (4, 64, 64, 3)
    assert np.array_equal(back, upscale(video, 8))
    assert np.array_equal(back[:, ::8, ::8], video)  # downsampling recovers the cells
    with Image.open(path) as im:
        assert im.info["duration"] == 250 and im.info["loop"] == 0
    assert [p.name for p in path.parent.iterdir()] == ["clip.gif"]  # no temporary file left behind


def test_gif_accepts_torch_and_restores_merged_identical_frames(tmp_path):
    video = random_video(2, frames=5)
    video[2] = video[1]
    video[3] = video[1]  # Pillow stores frames 1..3 as one frame shown three times as long
    path = write_gif(torch.from_numpy(video), tmp_path / "clip.gif", fps=5, scale=2)
    assert read_gif(path).shape[0] == 3
    assert np.array_equal(read_gif(path, fps=5), upscale(video, 2))


def test_gif_with_many_colours_is_written_lossily(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)  # 768 pixels, > 256 colours
    back = read_gif(write_gif(video, tmp_path / "noisy.gif", scale=1))
    assert back.shape == video.shape
    # one shared 256-colour palette: close on average, not exact
    assert np.abs(back.astype(int) - video.astype(int)).mean() < 24


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_gif(random_video(3), tmp_path / "clip.gif", scale=1)

    def crash_midway(f):
        f.write(b"GIF89a partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash_midway)
    assert np.array_equal(read_gif(path), random_video(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]


def test_media_bad_inputs(tmp_path):
    video = random_video(4)
    with pytest.raises(TypeError, match="must have dtype uint8"):
        write_gif(video.astype(np.int64), tmp_path / "a.gif")
    with pytest.raises(ValueError, match=r"must have shape \[F, H, W, 3\]"):
        write_gif(video[0], tmp_path / "a.gif")
    with pytest.raises(ValueError, match=r"must have shape \[F, H, W, 3\]"):
        write_gif(video[..., :2], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="scale must be a positive int"):
        write_gif(video, tmp_path / "a.gif", scale=0)
    with pytest.raises(ValueError, match="fps must be > 0"):
        write_gif(video, tmp_path / "a.gif", fps=0)
    with pytest.raises(FileNotFoundError, match="no GIF"):
        read_gif(tmp_path / "missing.gif")
    with pytest.raises(ValueError, match="got 2 videos but 1 captions"):
        frames_grid_png([video, video], ["one"], tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"videos\[1\] has frames of 4x4, expected 8x8"):
        frames_grid_png([video, video[:, :4, :4]], ["a", "b"], tmp_path / "g.png")
    with pytest.raises(TypeError, match=r"videos\[0\] must have dtype uint8"):
        frames_grid_png([video.astype(np.float64)], ["a"], tmp_path / "g.png")
    with pytest.raises(TypeError, match="captions must be a list"):
        frames_grid_png([video], "a", tmp_path / "g.png")
    assert not any(tmp_path.iterdir())


def test_frames_grid_png_places_every_frame(tmp_path):
    videos = [random_video(5, frames=4), random_video(6, frames=2)]
    captions = ["a red square moves from the left edge to the right edge", "blue"]
    path = tmp_path / "grid.png"
    layout = frames_grid_png(videos, captions, path, scale=3)
    assert path.stat().st_size > 0
    image = np.asarray(Image.open(path).convert("RGB"))
    assert (image.shape[1], image.shape[0]) == layout.size
    cell = 8 * 3
    assert layout.size[0] == layout.caption_width + GRID_PAD + 4 * (cell + GRID_PAD)
    for row, video in enumerate(videos):
        for col, frame in enumerate(video):
            x, y = layout.cell_origin(row, col)
            assert np.array_equal(image[y:y + cell, x:x + cell], upscale(frame[None], 3)[0])
        x, y = layout.cell_origin(row, len(video) - 1)
        assert layout.row_tops[row] == y
    # the short second row leaves its missing cells blank, and a caption was drawn (dark pixels)
    x, y = layout.cell_origin(1, 2)
    assert np.all(image[y:y + cell, x:x + cell] == 255)
    caption_area = image[:, : layout.caption_width]
    assert (caption_area < 128).any()


def write_csv(path, rows):
    header = ["epoch", "step", "train/loss", "val/loss", "lr"]
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_plot_metrics_from_lightning_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    rows = [[0, 0, 5.0, None, 0.1], [0, 9, 4.0, None, 0.1], [0, 9, None, 4.5, None],
            [1, 19, 3.0, None, 0.1], [1, 19, None, 3.25, None]]
    write_csv(csv_path, rows)
    out = tmp_path / "plots" / "loss.png"
    series = plot_metrics(csv_path, out)
    assert series == {"train/loss": ([0, 9, 19], [5.0, 4.0, 3.0]), "val/loss": ([9, 19], [4.5, 3.25])}
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (600, 400)
    assert sorted(p.name for p in out.parent.iterdir()) == ["loss.png"]
    assert read_metrics(csv_path, ["lr", "missing"]) == {"lr": ([0, 9, 19], [0.1, 0.1, 0.1])}
    only_train = plot_metrics(csv_path, tmp_path / "train.png", keys="train/loss", log_y=True)
    assert list(only_train) == ["train/loss"]


def test_plot_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics CSV not found"):
        plot_metrics(tmp_path / "nope.csv", tmp_path / "x.png")
    csv_path = tmp_path / "metrics.csv"
    write_csv(csv_path, [[0, 0, None, None, 0.1]])
    with pytest.raises(ValueError, match=r"none of the keys \['train/loss', 'val/loss'\] has values"):
        plot_metrics(csv_path, tmp_path / "x.png")
    with pytest.raises(ValueError, match="its columns are"):
        plot_metrics(csv_path, tmp_path / "x.png", keys=("acc",))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="has no 'step' column"):
        plot_metrics(bad, tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")
