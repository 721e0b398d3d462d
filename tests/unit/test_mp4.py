"""write_mp4: read back with PyAV itself (frame count, size, timestamps, colours within a stated
tolerance of the lossy codecs), both encoders, even-size padding, and errors."""

from __future__ import annotations

import sys

import av  # the `video` extra, installed in the test environment
import numpy as np
import pytest

from mmgrow.evaluation.media import MP4_ENCODERS, even_size, upscale, write_mp4

# Lossy round trip (RGB -> YUV 4:2:0 -> quantised -> RGB), measured on these clips at quality settings
# MP4_QUALITY: per-frame mean colour within ~1.5-3 levels, cell centres within 4 (x264) / 12 (mpeg4)
# levels at scale 8. The bounds leave about 2x margin; a swapped channel order or a wrong frame order
# would be off by tens of levels.
MEAN_COLOUR_TOL = 5.0
CELL_CENTRE_TOL = 24.0


def palette_video(seed: int, frames: int = 5, height: int = 6, width: int = 4) -> np.ndarray:
    """``uint8 [F, H, W, 3]``: each frame mostly one colour of its own, with a few random cells."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (frames + 4, 3), dtype=np.uint8)
    index = np.repeat(np.arange(frames)[:, None, None], height, 1).repeat(width, 2)
    speckle = rng.random(index.shape) < 0.25
    index[speckle] = rng.integers(frames, frames + 4, int(speckle.sum()))
    return palette[index]


def read_back(path) -> tuple[np.ndarray, list[float], str]:
    """Decoded frames ``uint8 [F, H, W, 3]``, their presentation times in seconds and the codec name."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [(f.to_ndarray(format="rgb24"), float(f.time)) for f in container.decode(stream)]
        name = stream.codec_context.name
    return np.stack([f for f, _ in decoded]), [t for _, t in decoded], name


@pytest.mark.parametrize(("encoder", "codec_name"), [("libx264", "h264"), ("mpeg4", "mpeg4")])
def test_round_trip_frames_size_timing_and_colour(tmp_path, encoder, codec_name):
    video = palette_video(0)
    path = write_mp4(video, tmp_path / "sub" / "clip.mp4", fps=2.5, scale=8, codec=encoder)
    back, times, name = read_back(path)
    assert name == codec_name
    assert back.dtype == np.uint8 and back.shape == (5, 48, 32, 3)
    np.testing.assert_allclose(times, [i / 2.5 for i in range(5)], atol=1e-6)
    reference = upscale(video, 8).astype(np.float64)
    mean_error = np.abs(back.mean(axis=(1, 2)) - reference.mean(axis=(1, 2)))  # [F, 3]
    assert mean_error.max() <= MEAN_COLOUR_TOL
    centres = back[:, 4::8, 4::8].astype(np.float64)  # one pixel in the middle of each cell
    assert np.abs(centres - video).max() <= CELL_CENTRE_TOL
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary file left behind


def test_default_encoder_is_the_first_available(tmp_path):
    available = [e for e in MP4_ENCODERS if e in av.codecs_available]
    path = write_mp4(palette_video(1, frames=2), tmp_path / "clip.mp4")
    frames, times, name = read_back(path)
    assert name == {"libx264": "h264", "mpeg4": "mpeg4"}[available[0]]
    assert frames.shape == (2, 48, 32, 3)
    np.testing.assert_allclose(times, [0.0, 0.25], atol=1e-6)  # default fps 4


def test_odd_sizes_are_padded_with_the_edge(tmp_path):
    video = palette_video(2, frames=3, height=7, width=5)
    padded = even_size(upscale(video, 3))  # 21 x 15 -> 22 x 16
    up = upscale(video, 3)
    expected = np.concatenate([up, up[:, -1:]], axis=1)
    expected = np.concatenate([expected, expected[:, :, -1:]], axis=2)
    assert np.array_equal(padded, expected)
    assert np.array_equal(even_size(up[:, :20, :14]), up[:, :20, :14])  # even sizes stay as they are
    back, _, _ = read_back(write_mp4(video, tmp_path / "odd.mp4", scale=3))
    assert back.shape == (3, 22, 16, 3)
    mean_error = np.abs(back.mean(axis=(1, 2)) - expected.mean(axis=(1, 2)))
    assert mean_error.max() <= MEAN_COLOUR_TOL


def test_errors(tmp_path, monkeypatch):
    video = palette_video(3, frames=2)
    with pytest.raises(ValueError, match="fps must be a number > 0"):
        write_mp4(video, tmp_path / "a.mp4", fps=0)
    with pytest.raises(TypeError, match="dtype uint8"):
        write_mp4(video.astype(np.float32), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match=r"shape \[F, H, W, 3\]"):
        write_mp4(video[0], tmp_path / "a.mp4")
    with pytest.raises(RuntimeError, match="no video encoder among"):
        write_mp4(video, tmp_path / "a.mp4", codec="no_such_encoder")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ImportError, match=r"pip install mmgrow\[video\]"):
        write_mp4(video, tmp_path / "a.mp4")
