"""Latent grids <-> sequences of patch vectors (the DiT input layout).

``patchify`` cuts every ``[C, h, w]`` frame into ``p x p`` patches and flattens them::

    out[(f * (h/p) + i) * (w/p) + j, (c * p + u) * p + v] = x[f, c, i*p + u, j*p + v]

i.e. patches in row-major (frame, row, column) order, and inside a patch channel-major
(channel, row, column). ``unpatchify`` is its exact inverse.
"""

from __future__ import annotations

from torch import Tensor


def _check_patch(p: int, h: int, w: int, where: str) -> None:
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"{where}: patch size must be a positive int, got {p!r}")
    if h % p or w % p:
        raise ValueError(f"{where}: latent grid {h}x{w} is not divisible by patch size {p}; expected h and w to "
                         f"be multiples of {p}")


def patchify(x: Tensor, p: int) -> Tensor:
    """``[..., F, C, h, w]`` -> ``[..., F * (h/p) * (w/p), C * p * p]`` (layout above; leading batch
    dims, if any, are kept: ``[F, C, h, w] -> [N, D]``, ``[B, F, C, h, w] -> [B, N, D]``)."""
    if x.dim() < 4:
        raise ValueError(f"patchify: expected [..., F, C, h, w], got shape {tuple(x.shape)}")
    *lead, f, c, h, w = x.shape
    _check_patch(p, h, w, "patchify")
    x = x.reshape(*lead, f, c, h // p, p, w // p, p)  # [..., F, C, h/p, p(u), w/p, p(v)]
    n = len(lead)
    x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5)  # [..., F, h/p, w/p, C, u, v]
    return x.reshape(*lead, f * (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, p: int, channels: int, height: int, width: int) -> Tensor:
    """``[..., N, C * p * p]`` -> ``[..., F, C, height, width]`` with ``F = N / ((height/p) * (width/p))``."""
    _check_patch(p, height, width, "unpatchify")
    per_frame = (height // p) * (width // p)
    if tokens.dim() < 2 or tokens.shape[-1] != channels * p * p or tokens.shape[-2] % per_frame:
        raise ValueError(f"unpatchify: expected [..., F * {per_frame}, {channels * p * p}] patch vectors for "
                         f"{channels}x{height}x{width} frames and patch {p}, got shape {tuple(tokens.shape)}")
    *lead, num, _ = tokens.shape
    f = num // per_frame
    x = tokens.reshape(*lead, f, height // p, width // p, channels, p, p)
    n = len(lead)
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5)  # [..., F, C, h/p, u, w/p, v]
    return x.reshape(*lead, f, channels, height, width)
