"""Video decoding with PyAV: frames sampled at a target frame rate, resized and centre cropped.

Frame sampling. A clip of ``frames`` frames at ``fps`` frames per second starting at ``start``
seconds wants the picture on screen at the times ``t_j = start + j / fps``, ``j = 0 .. frames-1``.
For each ``t_j`` :func:`sample_times` picks the *last decoded frame whose presentation time is
<= t_j* (what a player shows at ``t_j``); a video shorter than the clip repeats its last frame.
So a 8 fps source sampled at 4 fps gives source frames 0, 2, 4, ...; at 16 fps it gives 0, 0, 1,
1, .... Frames are then brought to ``size x size`` by :func:`~mmgrow.data.decode_image.fit_square`.

``import av`` happens on first use, so importing this module needs no PyAV.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmgrow.data.decode_image import fit_square

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
TIME_EPS = 1e-6
"""Seconds of slack when comparing presentation times (container time bases round them)."""


def import_av(purpose: str = "decoding video or compressed audio", alternative: str = "") -> Any:
    """The ``av`` module, or an ImportError saying what needs it and how to install it."""
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"{purpose} needs PyAV, which is not installed; run `pip install mmgrow[video]` "
                          f"(or `pip install av`){alternative}") from exc
    return av


def sample_times(times: list[float], targets: list[float]) -> list[int]:
    """Index into ``times`` (ascending presentation times) of the frame on screen at each target time:
    the last ``i`` with ``times[i] <= t + TIME_EPS`` (0 before the first frame)."""
    return [max(0, bisect.bisect_right(times, t + TIME_EPS) - 1) for t in targets]


def _frame_time(frame: Any, index: int, rate: float) -> float:
    return float(frame.time) if frame.time is not None else index / rate


def video_duration(path: Path) -> float:
    """Duration in seconds from the container metadata (0.0 when it does not say)."""
    av = import_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return float(container.duration or 0) / 1e6


def probe_video(path: Path) -> None:
    """Raise when ``path`` cannot be opened, has no video stream or no decodable first frame."""
    av = import_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        for _ in container.decode(video=0):
            return
    raise ValueError("no decodable video frame")


def decode_video(path: Path, fps: float, frames: int, size: int, start: float = 0.0) -> Tensor:
    """``uint8 [frames, size, size, 3]``: the clip of ``frames`` frames at ``fps`` from ``start`` seconds.

    Streams the file once, up to the first frame after the last wanted time, and converts to RGB
    (and resizes) only the frames it picks, so a long high-resolution file costs decoding, not
    memory. Picks follow :func:`sample_times`. Raises when the file has no decodable frame.
    """
    av = import_av()
    targets = [start + j / fps for j in range(frames)]
    picked: list[np.ndarray] = []
    previous: Any = None  # the last decoded frame, and its RGB picture once converted
    previous_rgb: np.ndarray | None = None

    def rgb(frame: Any) -> np.ndarray:
        return fit_square(frame.to_ndarray(format="rgb24"), size)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        for i, frame in enumerate(container.decode(stream)):
            t = _frame_time(frame, i, rate)
            # every target before this frame's time shows the previous frame (the first frame if none)
            while len(picked) < frames and t > targets[len(picked)] + TIME_EPS:
                if previous is None:
                    previous, previous_rgb = frame, rgb(frame)
                if previous_rgb is None:
                    previous_rgb = rgb(previous)
                picked.append(previous_rgb)
            if len(picked) == frames:
                break
            previous, previous_rgb = frame, None
    if previous is None:
        raise ValueError("no decodable video frame")
    if len(picked) < frames:  # the video ends before the clip does: its last frame stays on screen
        last = previous_rgb if previous_rgb is not None else rgb(previous)
        picked += [last] * (frames - len(picked))
    return torch.from_numpy(np.stack(picked))
