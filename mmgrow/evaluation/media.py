"""Pictures of generated media for run directories: animated GIFs and frame-grid PNGs (Pillow), and
MP4 videos (PyAV, the ``video`` extra: ``pip install mmgrow[video]``).

Frames are ``uint8 [F, H, W, 3]`` RGB arrays (numpy or torch). Tiny grids (an 8x8 pixel codec) are
upscaled by an integer ``scale`` with nearest-neighbour repetition so each cell stays a sharp square.
Every writer is atomic: it writes a temporary file in the target directory and ``os.replace`` s it, so
a reader (a report, a crashed run) never sees half a file.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

GRID_PAD = 4
"""Pixels of background between cells (and around the grid) in :func:`frames_grid_png`."""
CAPTION_CHARS = 28
"""Captions are wrapped to lines of at most this many characters."""
BACKGROUND = (255, 255, 255)


def as_frames(frames: Any, name: str = "frames") -> np.ndarray:
    """``uint8 [F, H, W, 3]`` numpy array from a numpy array or torch tensor; clear errors otherwise."""
    if hasattr(frames, "detach"):  # torch tensor, without importing torch here
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"{name} must have dtype uint8 (RGB values 0..255), got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[:3]) < 1:
        raise ValueError(f"{name} must have shape [F, H, W, 3] with F, H, W >= 1, got {tuple(frames.shape)}")
    return frames


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``[..., H, W, C]`` to ``[..., H*scale, W*scale, C]``."""
    _check_scale(scale)
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def _check_scale(scale: int) -> None:
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it to ``path``
    (:func:`mmgrow.rundir.atomic_file`: the temporary file is removed on failure). Writers pass the
    file format explicitly (the temporary name has no meaningful extension)."""
    from mmgrow.rundir import atomic_file

    path = Path(path)
    with atomic_file(path) as f:
        write(f)
    return path


# --------------------------------------------------------------------------------------------------
# GIF
# --------------------------------------------------------------------------------------------------


def _palette_frames(frames: np.ndarray) -> list:
    """``[F, H, W, 3]`` -> Pillow ``"P"`` images sharing one palette.

    Exact when the video has at most 256 distinct colours (always the case for small codec grids):
    the palette is the set of colours used. Otherwise the frames are quantised together to 256 colours.
    """
    from PIL import Image

    flat = frames.reshape(-1, 3)
    colours, index = np.unique(flat, axis=0, return_inverse=True)
    if len(colours) > 256:  # lossy fallback: one adaptive palette for the whole video (no dithering)
        tall = Image.fromarray(frames.reshape(-1, frames.shape[2], 3))
        quant = tall.quantize(colors=256, dither=Image.Dither.NONE)
        index = np.asarray(quant).reshape(-1)
        colours = np.asarray(quant.getpalette()[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
    index = index.reshape(frames.shape[:3]).astype(np.uint8)
    palette = colours.astype(np.uint8).reshape(-1).tolist()
    images = []
    for plane in index:
        im = Image.fromarray(plane)  # mode "L"; putpalette turns it into "P" with our colours
        im.putpalette(palette)
        images.append(im)
    return images


def write_gif(frames: Any, path: str | os.PathLike, fps: float = 4, scale: int = 8) -> Path:
    """Write ``uint8 [F, H, W, 3]`` frames as a looping GIF, each frame upscaled ``scale`` times.

    Colours are exact for videos with at most 256 distinct colours. Pillow merges identical
    consecutive frames into one longer frame (same playback); :func:`read_gif` with ``fps`` undoes it.
    Returns the path.
    """
    frames = upscale(as_frames(frames), scale)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    images = _palette_frames(frames)
    duration = 1000.0 / fps

    def write(f: Any) -> None:
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=duration,
                       loop=0, optimize=False, disposal=1)

    return atomic_write(path, write)


def read_gif(path: str | os.PathLike, *, fps: float | None = None) -> np.ndarray:
    """Frames of a GIF as ``uint8 [F, H, W, 3]`` (fully composited RGB).

    With ``fps`` (the rate it was written at) a stored frame shown for ``n`` frame periods -- identical
    frames merged by the writer -- is repeated ``n`` times, giving back the written frame count.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GIF at {path}")
    out = []
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            rgb = np.asarray(im.convert("RGB"))
            repeat = 1
            if fps is not None:
                repeat = max(1, round(im.info.get("duration", 0) * fps / 1000.0))
            out.extend([rgb] * repeat)
    return np.stack(out)


# --------------------------------------------------------------------------------------------------
# MP4
# --------------------------------------------------------------------------------------------------

MP4_ENCODERS = ("libx264", "mpeg4")
"""Video encoders :func:`write_mp4` tries, best first: H.264 where FFmpeg was built with x264 (PyAV's
wheels are), else FFmpeg's own MPEG-4 part 2 encoder, which every build has."""
MP4_QUALITY = {"libx264": {"crf": "12"}, "mpeg4": {"flags": "+qscale", "global_quality": str(2 * 118)}}
"""Encoder options for near-transparent quality (the videos are tiny, their size does not matter):
x264 constant quality 12; for mpeg4 a fixed quantiser 2 (``ffmpeg -q:v 2``: quality in lambda units,
``FF_QP2LAMBDA = 118`` per quantiser step) instead of its 200 kbit/s default bit rate."""


def _import_av() -> Any:
    from mmgrow.data.decode_video import import_av

    return import_av("writing MP4", ", or write a GIF with write_gif instead")


def mp4_encoder(av: Any, codec: str | None = None) -> str:
    """The encoder to use: ``codec`` if given (it must exist), else the first of :data:`MP4_ENCODERS` this
    FFmpeg build has."""
    candidates = MP4_ENCODERS if codec is None else (codec,)
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
        except av.codec.codec.UnknownCodecError:
            continue
        return name
    raise RuntimeError(f"write_mp4: no video encoder among {list(candidates)} in this FFmpeg build "
                       f"(PyAV {av.__version__}); install PyAV's wheel (`pip install mmgrow[video]`), which has both")


def even_size(frames: np.ndarray) -> np.ndarray:
    """Pad ``[F, H, W, 3]`` to even ``H`` and ``W`` by repeating the last row / column.

    yuv420p stores colour once per 2x2 pixel block, so encoders need even sizes; repeating the edge
    (not adding black) keeps the added pixels the colour of their neighbours.
    """
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_mp4(frames: Any, path: str | os.PathLike, fps: float = 4, scale: int = 8, *,
              codec: str | None = None) -> Path:
    """Write ``uint8 [F, H, W, 3]`` RGB frames as an MP4 (yuv420p), each frame upscaled ``scale`` times.

    The encoder is ``codec`` or the first available of :data:`MP4_ENCODERS`. Odd upscaled sizes are
    padded by one edge row / column (:func:`even_size`), so the file is ``H*scale`` (rounded up to even)
    by ``W*scale`` (likewise). Lossy: RGB -> YUV 4:2:0 halves the colour resolution and the encoder
    quantises, so read-back pixels differ by a few levels and colours bleed at sharp edges, more with
    a small ``scale`` (an upscale of 8 or more keeps cell interiors close to their colour). ``fps`` may
    be fractional (kept as an exact fraction). Returns the path. Needs PyAV (``pip install mmgrow[video]``).
    """
    frames = even_size(upscale(as_frames(frames), scale))
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be a number > 0, got {fps!r}")
    av = _import_av()
    encoder = mp4_encoder(av, codec)
    rate = Fraction(fps).limit_denominator(1001)
    height, width = frames.shape[1:3]

    def write(f: Any) -> None:
        with av.open(f, mode="w", format="mp4") as container:
            stream = container.add_stream(encoder, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = dict(MP4_QUALITY.get(encoder, {}))
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = i  # in 1/rate units: stream time base is set from the rate by the encoder
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush frames the encoder still holds (B-frames)

    return atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# Frame grid PNG
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridLayout:
    """Geometry of a frame grid: image ``size`` ``(width, height)`` and top-left corners of the cells."""

    size: tuple[int, int]
    caption_width: int
    row_tops: tuple[int, ...]
    cell_width: int

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """``(x, y)`` of the top-left pixel of frame ``col`` of video ``row``."""
        return self.caption_width + GRID_PAD + col * (self.cell_width + GRID_PAD), self.row_tops[row]


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def _printable(text: str, font: Any) -> str:
    """The bitmap fallback font only knows latin-1; replace what it cannot draw."""
    from PIL import ImageFont

    if isinstance(font, ImageFont.ImageFont):
        return text.encode("latin-1", "replace").decode("latin-1")
    return text


def frames_grid_png(videos: Sequence[Any], captions: Sequence[str], path: str | os.PathLike,
                    scale: int = 8) -> GridLayout:
    """One PNG: a row per video (frames left to right, upscaled ``scale`` times), its caption on the left.

    ``videos``: list of ``uint8 [F_i, H, W, 3]`` (frame counts may differ, frame size may not);
    ``captions``: one string per video (wrapped to :data:`CAPTION_CHARS` characters per line).
    Returns the :class:`GridLayout` (where each frame was drawn).
    """
    from PIL import Image, ImageDraw

    _check_scale(scale)
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, one per video, not a single string")
    if len(videos) == 0:
        raise ValueError("frames_grid_png needs at least one video")
    if len(videos) != len(captions):
        raise ValueError(f"got {len(videos)} videos but {len(captions)} captions; expected one caption per video")
    clips = [upscale(as_frames(v, f"videos[{i}]"), scale) for i, v in enumerate(videos)]
    frame_shape = clips[0].shape[1:]
    for i, clip in enumerate(clips):
        if clip.shape[1:] != frame_shape:
            raise ValueError(f"videos[{i}] has frames of {clip.shape[1] // scale}x{clip.shape[2] // scale}, expected "
                             f"{frame_shape[0] // scale}x{frame_shape[1] // scale} like videos[0]")

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = ["\n".join(textwrap.wrap(_printable(str(c), font), CAPTION_CHARS)) or " " for c in captions]
    boxes = [probe.multiline_textbbox((0, 0), t, font=font) for t in texts]
    caption_width = GRID_PAD + max(b[2] for b in boxes)
    cell_h, cell_w = frame_shape[0], frame_shape[1]
    row_heights = [max(cell_h, b[3]) for b in boxes]
    row_tops, y = [], GRID_PAD
    for h in row_heights:
        row_tops.append(y)
        y += h + GRID_PAD
    max_frames = max(len(c) for c in clips)
    layout = GridLayout(size=(caption_width + GRID_PAD + max_frames * (cell_w + GRID_PAD), y),
                        caption_width=caption_width, row_tops=tuple(row_tops), cell_width=cell_w)

    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, (clip, text) in enumerate(zip(clips, texts)):
        draw.multiline_text((GRID_PAD, row_tops[row]), text, fill=(0, 0, 0), font=font)
        for col, frame in enumerate(clip):
            canvas.paste(Image.fromarray(frame), layout.cell_origin(row, col))
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
    return layout
