"""``media_folder``: a dataset of the user's own videos, images and audio files.

``root`` is either

* a **folder**: every file below it (recursively, hidden files and folders excluded) whose extension
  names a media kind (:data:`KIND_OF_EXTENSION`) is a sample. Its caption is the text of a sidecar
  ``<stem>.txt`` next to it when there is one, else the file stem with ``_`` and ``-`` read as spaces
  (``red_square_left.mp4`` -> ``"red square left"``). ``.txt``, ``.json``, ``.jsonl``, ``.md`` and
  ``.csv`` files are not samples; any other extension is skipped as unsupported;
* a **JSONL manifest** (a ``.jsonl`` file): one JSON object per line, ``path`` (relative to the
  manifest's folder, or absolute) required, ``caption`` optional (default: the stem rule above),
  ``question`` / ``answer`` optional (kept in ``sample.meta``). Blank lines are ignored; a line that
  is not an object with a string ``path`` is an error naming the line.

What a sample holds (``Sample.media``):

* video: ``"video"``: ``uint8 [frames, size, size, 3]``, sampled at ``fps`` (see
  :mod:`mmgrow.data.decode_video`), from the start of the file, or in the train split with
  ``random_offset=True`` from an offset drawn per ``(seed, index)`` within the file's duration;
* image: ``"image"``: ``uint8 [size, size, 3]`` *and* ``"video"``: the same picture as a still
  video of ``image_frames`` identical frames ``[image_frames, size, size, 3]`` (default 1), so video
  tasks and the ``pixels`` codec take images unchanged; set ``image_frames`` to ``frames`` when
  images and videos are mixed, so every clip has the same length (what sample writers assume);
* audio: ``"audio"``: ``float32 [round(seconds * sample_rate)]`` in ``[-1, 1]``, mono, resampled
  (see :mod:`mmgrow.data.decode_audio`), cut or zero-padded.

``text`` is the caption; ``meta`` has ``path`` (as listed), ``kind`` and, from a manifest,
``question`` / ``answer``. ``kinds`` restricts which media kinds are used (other files are ignored,
not skipped), e.g. ``[video, image]`` for a text-to-video recipe.

Splits are deterministic and stable when files are added: a file is in ``val`` when the SHA-1 of
its listed path, read as a number in ``[0, 1)``, is below ``val_fraction``, else in ``train``.
``heldout`` is the ``val`` files (a folder has no held-out combinations). ``num_samples`` caps a
split (the first usable ones in path order; files past the cap are not probed); the folder may hold fewer.

Bad files. At construction every file of the split is probed cheaply (opened, header and first
frame decoded): empty, unreadable, truncated or undecodable files, files without the expected
stream and unsupported extensions are, with ``on_error="skip"``, left out and listed in
:attr:`skipped` (``{"path", "reason"}``, reported in the run's ``summary.json``); with
``on_error="raise"`` the first one raises :class:`MediaFileError` naming it. Full decoding happens
in ``__getitem__``, i.e. in DataLoader workers; if it fails there (a file damaged after the probe,
or past its first frame), ``skip`` logs a warning naming the file and returns the next valid
sample instead (deterministically: index ``i+1``, ``i+2`` ...), ``raise`` raises naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from mmgrow.checks import finite_number, int_at_least, positive_int
from mmgrow.data.decode_audio import AUDIO_EXTENSIONS, decode_audio, probe_audio
from mmgrow.data.decode_image import IMAGE_EXTENSIONS, decode_image, probe_image
from mmgrow.data.decode_video import VIDEO_EXTENSIONS, decode_video, probe_video, video_duration
from mmgrow.protocols import DATASET_SPLITS, Dataset, Sample

log = logging.getLogger(__name__)

MEDIA_KINDS = ("video", "image", "audio")
KIND_OF_EXTENSION: dict[str, str] = {
    **{e: "video" for e in VIDEO_EXTENSIONS}, **{e: "image" for e in IMAGE_EXTENSIONS},
    **{e: "audio" for e in AUDIO_EXTENSIONS},
}
NOT_MEDIA = (".txt", ".json", ".jsonl", ".md", ".csv")
"""Extensions a folder may hold next to its media without them being reported as unsupported."""
ON_ERROR = ("skip", "raise")


class MediaFileError(ValueError):
    """A media file that cannot be used (``on_error="raise"``); the message names the file."""


@dataclass(frozen=True)
class MediaItem:
    """One listed file: its path, kind (None = unsupported extension) and text fields."""

    path: Path
    listed: str  # the path as listed (relative to the folder / as written in the manifest)
    kind: str | None
    caption: str
    question: str | None = None
    answer: str | None = None


def stem_caption(path: Path) -> str:
    """``red_square-left.mp4`` -> ``"red square left"``."""
    return " ".join(path.stem.replace("_", " ").replace("-", " ").split())


def split_of(listed: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` from the SHA-1 of the listed path (stable across runs and machines)."""
    u = int.from_bytes(hashlib.sha1(listed.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    return "val" if u < val_fraction else "train"


def list_folder(root: Path) -> list[MediaItem]:
    """Every non-hidden file below ``root`` except :data:`NOT_MEDIA`, in path order."""
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() in NOT_MEDIA:
            continue
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else stem_caption(path)
        items.append(MediaItem(path, rel.as_posix(), KIND_OF_EXTENSION.get(path.suffix.lower()), caption))
    return items


def read_manifest(manifest: Path) -> list[MediaItem]:
    """The rows of a JSONL manifest (see the module doc); a malformed line raises naming it."""
    items = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"media_folder: manifest {manifest} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
            raise ValueError(f"{where} needs a non-empty string field 'path', got {line.strip()[:120]!r}")
        for key in ("caption", "question", "answer"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {row[key]!r}")
        path = Path(row["path"])
        path = path if path.is_absolute() else manifest.parent / path
        items.append(MediaItem(path, row["path"], KIND_OF_EXTENSION.get(path.suffix.lower()),
                               row.get("caption") or stem_caption(path), row.get("question"), row.get("answer")))
    return items


class MediaFolderDataset(Dataset):
    """Samples from a folder or JSONL manifest of media files (see the module doc).

    Args:
        num_samples: at most this many samples per split (the first ones in path order).
        seed: seeds the train split's clip offsets (``random_offset``).
        split: ``train`` | ``val`` | ``heldout`` (= the ``val`` files).
        root: the folder or the ``.jsonl`` manifest.
        kinds: media kinds used, a subset of ``video``, ``image``, ``audio``; other files are ignored.
        fps, frames, size: video frame rate, clip length and frame side (images: ``size`` only).
        random_offset: train clips start at a seeded random offset instead of 0.
        sample_rate, seconds: audio rate in Hz and clip duration.
        val_fraction: expected share of files in ``val`` (and ``heldout``), in ``[0, 1)``.
        on_error: ``skip`` (count and report bad files) or ``raise``.
        image_frames: frames of the still video an image also becomes (``media["video"]``).
    """

    name: ClassVar[str] = "media_folder"
    modalities: ClassVar[tuple[str, ...]] = ("video", "image", "audio")

    def __init__(self, num_samples: int = 1_000_000, seed: int = 0, split: str = "train", *,
                 root: str | Path | None = None, kinds: Sequence[str] = MEDIA_KINDS, fps: float = 4.0,
                 frames: int = 8, size: int = 32, random_offset: bool = False, sample_rate: int = 8000,
                 seconds: float = 1.0, val_fraction: float = 0.2, on_error: str = "skip",
                 image_frames: int = 1) -> None:
        super().__init__(int_at_least("media_folder", "num_samples", num_samples, 0), seed, split)
        if split not in DATASET_SPLITS:
            raise ValueError(f"media_folder: unknown split {split!r}; expected one of {DATASET_SPLITS}")
        if on_error not in ON_ERROR:
            raise ValueError(f"media_folder: on_error must be one of {ON_ERROR}, got {on_error!r}")
        if isinstance(kinds, str) or not kinds or not set(kinds) <= set(MEDIA_KINDS):
            raise ValueError(f"media_folder: kinds must be a non-empty list from {MEDIA_KINDS}, got {kinds!r}")
        if root is None:
            raise ValueError("media_folder: dataset_args.root is required: a folder of media files or a .jsonl manifest")
        self.root = Path(root).expanduser()
        self.kinds = tuple(kinds)
        self.fps = finite_number("media_folder", "fps", fps, low=0, low_open=True)
        self.frames = positive_int("media_folder", "frames", frames)
        self.size = positive_int("media_folder", "size", size)
        self.image_frames = positive_int("media_folder", "image_frames", image_frames)
        self.sample_rate = positive_int("media_folder", "sample_rate", sample_rate)
        self.seconds = finite_number("media_folder", "seconds", seconds, low=0, low_open=True)
        self.val_fraction = finite_number("media_folder", "val_fraction", val_fraction, low=0, high=1)
        if self.val_fraction >= 1:
            raise ValueError(f"media_folder: val_fraction must be < 1 (train would be empty), got {val_fraction!r}")
        self.random_offset, self.on_error = bool(random_offset), on_error

        if self.root.is_file() and self.root.suffix.lower() == ".jsonl":
            listed = read_manifest(self.root)
        elif self.root.is_dir():
            listed = list_folder(self.root)
        else:
            raise ValueError(f"media_folder: root {str(self.root)!r} is neither a folder nor a .jsonl manifest")
        want = "val" if split in ("val", "heldout") else "train"
        self.items: list[MediaItem] = []
        for item in listed:
            if len(self.items) == num_samples:
                break  # files past the cap are neither probed nor reported
            mine = (item.kind is None or item.kind in self.kinds) and split_of(item.listed, self.val_fraction) == want
            if mine and self._usable(item):
                self.items.append(item)
        if split == "train" and not self.items:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in self.skipped[:5]) or "no media files of kinds " \
                f"{list(self.kinds)} were found"
            raise ValueError(f"media_folder: no usable {split} sample in {self.root} ({reasons})")

    # ---------------------------------------------------------------------------------------- probing

    def _usable(self, item: MediaItem) -> bool:
        """Probe ``item``; a bad one is recorded in :attr:`skipped` (or raised) and gives False."""
        reason = probe_reason(item)
        if reason is None:
            return True
        if self.on_error == "raise":
            raise MediaFileError(f"media_folder: {item.path}: {reason} (set on_error: skip to leave such files out)")
        self.skipped.append({"path": str(item.path), "reason": reason})
        return False

    # --------------------------------------------------------------------------------------- decoding

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        n = len(self.items)
        if not -n <= index < n:
            raise IndexError(f"media_folder index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            item = self.items[(index + step) % n]
            try:
                return self._decode(item, (index + step) % n)
            except Exception as exc:  # any decoder failure is a bad file
                if self.on_error == "raise":
                    raise MediaFileError(f"media_folder: cannot decode {item.path}: {type(exc).__name__}: {exc}") \
                        from exc
                log.warning("media_folder: cannot decode %s (%s: %s); using the next sample instead",
                            item.path, type(exc).__name__, exc)
        raise MediaFileError(f"media_folder: no file of split {self.split!r} in {self.root} could be decoded")

    def _decode(self, item: MediaItem, index: int) -> Sample:
        meta: dict[str, Any] = {"path": item.listed, "kind": item.kind}
        meta.update({k: v for k, v in (("question", item.question), ("answer", item.answer)) if v is not None})
        media: dict[str, Tensor]
        if item.kind == "video":
            media = {"video": decode_video(item.path, self.fps, self.frames, self.size, self._offset(item, index))}
        elif item.kind == "image":
            image = decode_image(item.path, self.size)
            media = {"image": image, "video": image[None].expand(self.image_frames, -1, -1, -1).contiguous()}
        else:
            media = {"audio": decode_audio(item.path, self.sample_rate, self.seconds)}
        return Sample(media=media, text=item.caption, meta=meta)

    def heldout_prompts(self) -> list[tuple[str, dict[str, str]]]:
        """``(caption, {})`` of the held-out (= val) files, without decoding them: prompts for sample
        writers (a folder has no attributes to score a generated sample against)."""
        held = self if self.split != "train" else MediaFolderDataset(
            self.num_samples, self.seed, "heldout", root=self.root, kinds=self.kinds, fps=self.fps,
            frames=self.frames, size=self.size, sample_rate=self.sample_rate, seconds=self.seconds,
            val_fraction=self.val_fraction, on_error="skip", image_frames=self.image_frames)
        return [(item.caption, {}) for item in held.items]

    def _offset(self, item: MediaItem, index: int) -> float:
        """Start of the clip in seconds: 0, or in train with ``random_offset`` a draw in
        ``[0, duration - frames / fps]`` seeded by ``(seed, index)`` (0 when the video is shorter)."""
        if not (self.random_offset and self.split == "train"):
            return 0.0
        room = video_duration(item.path) - self.frames / self.fps
        return random.Random(f"media_folder/{self.seed}/{index}").uniform(0.0, room) if room > 0 else 0.0

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """A generated example folder (see :mod:`mmgrow.data.make_example_media`) for ``plugins check``."""
        from mmgrow.data.make_example_media import example_folder

        return {"root": str(example_folder()), "frames": 4, "seconds": 0.25, "val_fraction": 0.3}


PROBES: dict[str, Callable[[Path], None]] = {"video": probe_video, "image": probe_image, "audio": probe_audio}


def probe_reason(item: MediaItem) -> str | None:
    """Why ``item`` cannot be used, or None when its cheap probe passes."""
    if item.kind is None:
        return f"unsupported extension {item.path.suffix or '(none)'!r}; supported: {', '.join(KIND_OF_EXTENSION)}"
    try:
        size = item.path.stat().st_size
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        PROBES[item.kind](item.path)
    except ImportError as exc:
        raise MediaFileError(f"media_folder: {item.path}: {exc}") from exc  # a missing library is never a bad file
    except Exception as exc:  # noqa: BLE001 - every decoder error is a reason to report
        return f"not a decodable {item.kind} file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return None
