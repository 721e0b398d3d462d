"""Write the tiny example folder of the ``media_folder`` dataset (``examples/media_folder/``).

``python -m mmgrow.data.make_example_media DIR`` writes, deterministically (the same pictures and
sounds every time; MP4 bytes depend on the installed encoder):

* :data:`VIDEOS`: 6-frame 32 x 32 MP4s at 4 fps of the embedded ``shapes`` generator (centred
  start), named ``<colour>_<shape>_<motion>.mp4``, each with its caption in a sidecar ``.txt``;
* :data:`IMAGES`: PNGs of a shape's first frame (``.txt`` captions too);
* :data:`TONES`: 0.25 s, 8 kHz, 16-bit mono WAVs of the ``tones`` generator, captioned by their stem;
* ``manifest.jsonl``: one row per file with ``path`` and ``caption``, and for videos a ``question``
  / ``answer`` pair ("what colour is the shape?" / "red").

Needs PyAV (MP4) and Pillow (PNG).
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

VIDEOS: tuple[tuple[str, str, str], ...] = (
    ("square", "red", "right"), ("cross", "green", "down"), ("ring", "blue", "left"),
    ("bar", "yellow", "up"), ("square", "cyan", "down"), ("cross", "magenta", "right"),
)
"""(shape, colour, motion) of each example video."""
IMAGES: tuple[tuple[str, str], ...] = (("ring", "red"), ("square", "blue"))
"""(shape, colour) of each example image."""
TONES: tuple[tuple[str, str, str], ...] = (("low", "sine", "steady"), ("high", "square", "rising"))
"""(pitch, waveform, pattern) of each example sound."""
FPS, FRAMES, SIZE, GRID = 4, 6, 32, 8
SAMPLE_RATE, SECONDS = 8000, 0.25


def write_example_media(out: str | Path) -> list[Path]:
    """Write the example folder into ``out`` (created if needed); returns the files written."""
    from mmgrow.data.synthetic.shapes import ShapesDataset, caption
    from mmgrow.data.synthetic.tones import PITCHES, ToneDataset
    from mmgrow.data.synthetic.tones import caption as tone_caption
    from mmgrow.evaluation.media import write_mp4

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = ShapesDataset(num_samples=1, frames=FRAMES, size=SIZE, grid=GRID, random_start=False)
    written: list[Path] = []
    rows: list[dict[str, str]] = []

    def text_file(path: Path, text: str) -> None:
        path.write_text(text + "\n", encoding="utf-8")
        written.append(path)

    for shape, colour, motion in VIDEOS:
        video = shapes.draw(shape, colour, motion, shapes.centred_start(shape, motion))
        name = f"{colour}_{shape}_{motion}.mp4"
        written.append(write_mp4(video, out / name, fps=FPS, scale=1))
        text_file(out / f"{colour}_{shape}_{motion}.txt", caption(shape, colour, motion))
        rows.append({"path": name, "caption": caption(shape, colour, motion),
                     "question": "what colour is the shape?", "answer": colour})
    for shape, colour in IMAGES:
        from PIL import Image

        frame = shapes.draw(shape, colour, "right", shapes.centred_start(shape, "right"))[0]
        name = f"{colour}_{shape}.png"
        Image.fromarray(frame.numpy()).save(out / name)
        written.append(out / name)
        text_file(out / f"{colour}_{shape}.txt", f"a {colour} {shape}")
        rows.append({"path": name, "caption": f"a {colour} {shape}"})
    tones = ToneDataset(num_samples=1, seconds=SECONDS, sample_rate=SAMPLE_RATE)
    for pitch, waveform, pattern in TONES:
        audio = tones.synthesize(waveform, pattern, PITCHES[pitch])
        name = f"{pitch}_{waveform}_{pattern}.wav"
        write_wav(out / name, audio.numpy(), SAMPLE_RATE)
        written.append(out / name)
        rows.append({"path": name, "caption": tone_caption(pitch, waveform, pattern)})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return [*written, manifest]


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """``samples`` in [-1, 1] as 16-bit mono PCM."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


@functools.lru_cache(maxsize=1)
def example_folder() -> Path:
    """A freshly written example folder in a temporary directory (once per process; conformance checks)."""
    path = Path(tempfile.mkdtemp(prefix="mmgrow-media-folder-"))
    write_example_media(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m mmgrow.data.make_example_media DIR", file=sys.stderr)
        return 2
    files = write_example_media(args[0])
    print(f"wrote {len(files)} files ({sum(f.stat().st_size for f in files)} bytes) to {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
