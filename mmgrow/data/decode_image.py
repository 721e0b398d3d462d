"""Image decoding (Pillow) and the resize + centre crop shared with video frames.

:func:`fit_square` is how every frame of ``media_folder`` reaches ``size x size``: scale so the
*shorter* side is ``size`` (Pillow's bilinear filter, which widens its support when shrinking, so a
downscale averages instead of aliasing), then cut the centred ``size x size`` square. A frame that
already is ``size x size`` is returned unchanged (no resampling blur on exactly sized inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def fit_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``uint8 [size, size, 3]``: shorter side scaled to ``size``, centre cropped."""
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    from PIL import Image

    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(np.ascontiguousarray(rgb)).resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode fully now: a truncated file fails here, not later
        return img.convert("RGB")


def probe_image(path: Path) -> None:
    """Raise (any exception) when ``path`` is not a fully decodable image."""
    _open_rgb(path)


def decode_image(path: Path, size: int) -> Tensor:
    """The image at ``path`` as ``uint8 [size, size, 3]`` RGB (alpha dropped, grey expanded)."""
    return torch.from_numpy(fit_square(np.asarray(_open_rgb(path)), size).copy())
