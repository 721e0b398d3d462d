"""The ``media_folder`` dataset: bad files, decoded shapes, frame sampling, resampling, manifests, splits."""

from __future__ import annotations

import json
import logging
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgrow.data.decode_audio import decode_audio, resample
from mmgrow.data.decode_video import decode_video, sample_times
from mmgrow.data.make_example_media import write_wav
from mmgrow.data.media_folder import MediaFileError, MediaFolderDataset, split_of
from mmgrow.evaluation.media import write_mp4

pytest.importorskip("av")


def grey_video(path: Path, values: list[int], fps: float, side: int = 16) -> Path:
    """An MP4 whose frame k is a uniform grey of level ``values[k]``."""
    frames = torch.tensor(values, dtype=torch.uint8)[:, None, None, None].expand(-1, side, side, 3).contiguous()
    return write_mp4(frames, path, fps=fps, scale=1)


@pytest.fixture(scope="module")
def good_mp4(tmp_path_factory) -> bytes:
    return grey_video(tmp_path_factory.mktemp("v") / "good.mp4", [40, 80, 120, 160], fps=4).read_bytes()


def make_bad(folder: Path, kind: str, good: bytes) -> tuple[str, str]:
    """Write one bad file of ``kind``; returns (file name, a word its skip reason must contain)."""
    if kind == "empty":
        (folder / "empty.mp4").write_bytes(b"")
        return "empty.mp4", "empty file"
    if kind == "truncated_mp4":
        (folder / "cut.mp4").write_bytes(good[: len(good) // 2])
        return "cut.mp4", "not a decodable video"
    if kind == "garbage_mp4":
        (folder / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
        return "noise.mp4", "not a decodable video"
    if kind == "unsupported":
        (folder / "notes.xyz").write_bytes(b"hello")
        return "notes.xyz", "unsupported extension '.xyz'"
    if kind == "fake_png":
        (folder / "fake.png").write_text("this is not a picture")
        return "fake.png", "not a decodable image"
    if kind == "silent_wav":
        write_wav(folder / "silent.wav", np.zeros(0), 8000)
        return "silent.wav", "no audio frames"
    raise AssertionError(kind)


BAD_KINDS = ("empty", "truncated_mp4", "garbage_mp4", "unsupported", "fake_png", "silent_wav")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_is_skipped_with_its_reason_or_raises_naming_it(tmp_path, good_mp4, kind):
    (tmp_path / "good.mp4").write_bytes(good_mp4)
    name, reason = make_bad(tmp_path, kind, good_mp4)
    ds = MediaFolderDataset(root=tmp_path, val_fraction=0.0, frames=2, size=8)
    assert [item.listed for item in ds.items] == ["good.mp4"]
    assert len(ds.skipped) == 1 and ds.skipped[0]["path"] == str(tmp_path / name)
    assert reason in ds.skipped[0]["reason"], ds.skipped[0]["reason"]
    assert ds[0].media["video"].shape == (2, 8, 8, 3)
    with pytest.raises(MediaFileError, match=name.replace(".", r"\.")):
        MediaFolderDataset(root=tmp_path, val_fraction=0.0, on_error="raise")


def test_decode_failure_in_getitem_substitutes_next_sample_or_raises(tmp_path, good_mp4, caplog):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / name).write_bytes(good_mp4)
    (tmp_path / "b.txt").write_text("caption of b")
    ds = MediaFolderDataset(root=tmp_path, val_fraction=0.0, frames=2, size=8)
    strict = MediaFolderDataset(root=tmp_path, val_fraction=0.0, frames=2, size=8, on_error="raise")
    (tmp_path / "b.mp4").write_bytes(b"\x00" * 100)  # damaged after the probe
    with caplog.at_level(logging.WARNING, logger="mmgrow.data.media_folder"):
        sample = ds[1]
    assert sample.meta["path"] == "c.mp4" and sample.text == "c"  # the next one, deterministically
    assert "b.mp4" in caplog.text
    with pytest.raises(MediaFileError, match=r"cannot decode .*b\.mp4"):
        strict[1]


def test_decoded_shapes_dtypes_and_centre_crop(tmp_path):
    from PIL import Image

    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :32, 0] = 255  # left half red
    wide[:, 32:, 2] = 255  # right half blue
    Image.fromarray(wide).save(tmp_path / "wide.png")
    grey_video(tmp_path / "clip.mp4", [10, 20, 30, 40, 50, 60], fps=4, side=20)
    write_wav(tmp_path / "tone.wav", 0.5 * np.sin(np.linspace(0, 100, 4000)), 8000)
    ds = MediaFolderDataset(root=tmp_path, val_fraction=0.0, frames=3, size=16, seconds=0.75, sample_rate=4000,
                            image_frames=3)
    by_kind = {s.meta["kind"]: s for s in (ds[i] for i in range(len(ds)))}
    video, image, audio = by_kind["video"].media, by_kind["image"].media, by_kind["audio"].media
    assert video["video"].shape == (3, 16, 16, 3) and video["video"].dtype == torch.uint8
    assert image["image"].shape == (16, 16, 3) and image["image"].dtype == torch.uint8
    assert torch.equal(image["video"], image["image"][None].expand(3, -1, -1, -1))
    # 64 x 32 -> 32 x 16 (shorter side 16) -> centre 16 columns = scaled columns 8..23: both halves survive
    assert image["image"][8, 2].tolist() == [255, 0, 0] and image["image"][8, 13].tolist() == [0, 0, 255]
    assert audio["audio"].shape == (3000,) and audio["audio"].dtype == torch.float32  # 0.75 s at 4 kHz
    assert audio["audio"][2000:].abs().max() == 0  # the 0.5 s file is padded with silence
    assert by_kind["audio"].text == "tone" and by_kind["video"].text == "clip"  # stem captions


@pytest.mark.parametrize(("fps", "frames", "expected"), [
    (4.0, 5, [0, 2, 4, 6, 8]),             # half the source rate: every other frame
    (16.0, 6, [0, 0, 1, 1, 2, 2]),         # twice the source rate: each frame twice
    (2.0, 5, [0, 4, 8, 11, 11]),           # past the end: the last frame repeats
])
def test_fps_sampling_picks_the_frame_on_screen(tmp_path, fps, frames, expected):
    path = grey_video(tmp_path / "count.mp4", [20 * k for k in range(12)], fps=8)
    clip = decode_video(path, fps=fps, frames=frames, size=16)
    levels = clip.double().mean(dim=(1, 2, 3))
    assert torch.round(levels / 20).long().tolist() == expected, levels.tolist()


def test_clip_from_an_offset(tmp_path):
    path = grey_video(tmp_path / "count.mp4", [20 * k for k in range(12)], fps=8)
    # times 0.35, 0.6, 0.85 s = source frames 2.8, 4.8, 6.8: the frame on screen, not the nearest one
    clip = decode_video(path, fps=4, frames=3, size=16, start=0.35)
    assert torch.round(clip.double().mean(dim=(1, 2, 3)) / 20).long().tolist() == [2, 4, 6]


def test_random_offsets_are_seeded_and_inside_the_video(tmp_path):
    grey_video(tmp_path / "count.mp4", [20 * k for k in range(12)], fps=8)  # 1.5 s
    args = {"root": tmp_path, "val_fraction": 0.0, "fps": 4, "frames": 3, "size": 16, "random_offset": True}

    def first_frame(seed: int) -> int:
        return round(float(MediaFolderDataset(seed=seed, **args)[0].media["video"][0].double().mean()) / 20)

    first, again = [first_frame(s) for s in range(6)], [first_frame(s) for s in range(6)]
    assert first == again and len(set(first)) > 1  # seeded, and not always the start
    assert all(0 <= f <= 6 for f in first)  # a 0.75 s clip starts within the first 0.75 s of 1.5 s


def test_sample_times_rule():
    times = [0.0, 0.125, 0.25, 0.375]
    assert sample_times(times, [0.0, 0.1, 0.125, 0.2499999999, 0.5, -1.0]) == [0, 0, 1, 2, 3, 0]


def test_resampling_keeps_a_sines_frequency():
    rng_phase = 0.3
    for n, rate_in, rate_out in ((999, 44100, 8000), (1001, 8000, 4000), (800, 8000, 16000), (4410, 44100, 16000)):
        t_in = np.arange(n, dtype=np.float64) / rate_in
        y = resample(torch.from_numpy(np.sin(2 * math.pi * 440 * t_in + rng_phase)), rate_in, rate_out)
        assert y.shape == (round(n * rate_out / rate_in),)
        t_out = np.arange(y.shape[0]) / rate_out
        reference = np.sin(2 * math.pi * 440 * t_out + rng_phase)
        q = y.shape[0] // 4
        assert np.abs(y.numpy()[q:-q] - reference[q:-q]).max() < 2e-3, (n, rate_in, rate_out)
    # above the new Nyquist frequency is removed, not aliased
    t = np.arange(8000) / 8000
    assert resample(torch.from_numpy(np.sin(2 * math.pi * 3000 * t)), 8000, 4000).abs().max() < 1e-9


def test_wav_decoding_mixes_to_mono_and_resamples(tmp_path):
    rate, n = 16000, 8000
    t = np.arange(n) / rate
    left, right = 0.6 * np.sin(2 * math.pi * 300 * t), 0.2 * np.sin(2 * math.pi * 300 * t)
    pcm = np.round(np.stack([left, right], 1) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "st.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    out = decode_audio(tmp_path / "st.wav", sample_rate=8000, seconds=0.5).double().numpy()
    t8 = np.arange(4000) / 8000
    reference = 0.4 * np.sin(2 * math.pi * 300 * t8)
    assert np.abs(out[500:-500] - reference[500:-500]).max() < 1e-3


def test_manifest_rows_fields_and_errors(tmp_path, good_mp4):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "x_y.mp4").write_bytes(good_mp4)
    rows = [{"path": "media/x_y.mp4", "caption": "a clip", "question": "what?", "answer": "grey"},
            {"path": "media/x_y.mp4"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = MediaFolderDataset(root=manifest, val_fraction=0.0, frames=2, size=8)
    assert (ds[0].text, ds[0].meta["question"], ds[0].meta["answer"]) == ("a clip", "what?", "grey")
    assert ds[1].text == "x y" and "question" not in ds[1].meta
    manifest.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"caption": "no path"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl line 2 needs a non-empty string field 'path'"):
        MediaFolderDataset(root=manifest)
    manifest.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"line 1 is not valid JSON"):
        MediaFolderDataset(root=manifest)


def test_splits_are_stable_disjoint_and_capped(tmp_path, good_mp4):
    names = [f"clip_{i:02d}.mp4" for i in range(20)]
    for name in names:
        (tmp_path / name).write_bytes(good_mp4)
    train = MediaFolderDataset(root=tmp_path, split="train", val_fraction=0.3)
    val = MediaFolderDataset(root=tmp_path, split="val", val_fraction=0.3)
    held = MediaFolderDataset(root=tmp_path, split="heldout", val_fraction=0.3)
    got_train, got_val = [i.listed for i in train.items], [i.listed for i in val.items]
    assert sorted(got_train + got_val) == names and not set(got_train) & set(got_val)
    assert got_val == [i.listed for i in held.items] == [n for n in names if split_of(n, 0.3) == "val"]
    assert 0 < len(got_val) < 20
    capped = MediaFolderDataset(num_samples=3, root=tmp_path, split="train", val_fraction=0.3)
    assert [i.listed for i in capped.items] == got_train[:3]


def test_an_empty_folder_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no usable train sample"):
        MediaFolderDataset(root=tmp_path)
    with pytest.raises(ValueError, match="dataset_args.root is required"):
        MediaFolderDataset()
    with pytest.raises(ValueError, match="on_error must be one of"):
        MediaFolderDataset(root=tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="neither a folder nor a .jsonl manifest"):
        MediaFolderDataset(root=tmp_path / "missing")


def test_decoding_in_dataloader_workers_gives_the_same_samples(tmp_path, good_mp4):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(good_mp4)
    ds = MediaFolderDataset(root=tmp_path, val_fraction=0.0, frames=2, size=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, collate_fn=lambda s: s)
    for i, sample in enumerate(loader):
        assert sample.meta == ds[i].meta and torch.equal(sample.media["video"], ds[i].media["video"])
