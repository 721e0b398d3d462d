"""Location codec: a box as UnIVAL's quantised location tokens ``<bin_0> .. <bin_{B-1}>``.

UnIVAL (like OFA and Pix2Seq) writes a region as four discrete tokens in the shared vocabulary, one
per coordinate of ``[x0, y0, x1, y1]`` (normalised to ``[0, 1]`` by the image size). Each
coordinate ``v`` becomes the bin

    id = round(v * (B - 1))        (torch.round: halves to even)
    v^ = id / (B - 1)              (decode)

so ``|v^ - v| <= 1 / (2 (B - 1))``: half a bin width. The bins are this codec's own ids
``0 .. B-1`` (``vocab_size = B``, no special tokens); the token space gives them their global ids,
nothing else hard-codes them. A box is always exactly four tokens (``generation_length = 4``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.checks import int_at_least
from mmgrow.protocols import Tokenizer

BOX_LENGTH = 4
"""Tokens per box: ``x0, y0, x1, y1``."""


class LocationTokenizer(Tokenizer):
    """Box ``[x0, y0, x1, y1]`` in ``[0, 1]`` <-> ``[4]`` int64 bin ids (module docstring).

    Args:
        num_bins: ``B``, bins per coordinate (UnIVAL: 1000); at least 2 (both ends representable).
    """

    modality: ClassVar[str] = "location"
    kind: ClassVar[str] = "discrete"

    def __init__(self, num_bins: int = 1000) -> None:
        super().__init__()
        self.num_bins = int_at_least("LocationTokenizer", "num_bins", num_bins, 2)
        self.vocab_size = self.num_bins
        self.special_tokens: dict[str, int] = {}

    @property
    def bin_width(self) -> float:
        """Distance between neighbouring bin values, ``1 / (B - 1)``."""
        return 1.0 / (self.num_bins - 1)

    def encode(self, box: Any) -> Tensor:
        """``[x0, y0, x1, y1]`` (list, tuple, tensor or array of 4 finite numbers in ``[0, 1]`` with
        ``x0 <= x1`` and ``y0 <= y1``) -> ``[4]`` int64 ids ``round(v * (B - 1))``."""
        v = check_box(box, "LocationTokenizer.encode")
        return torch.round(v * (self.num_bins - 1)).to(torch.long)

    def decode(self, tokens: Tensor | Sequence[int]) -> Tensor:
        """``[4]`` ids in ``[0, B)`` -> ``float32 [4]`` box ``id / (B - 1)``."""
        ids = torch.as_tensor(tokens)
        if ids.dim() != 1 or ids.shape[0] != BOX_LENGTH or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"LocationTokenizer.decode expects {BOX_LENGTH} integer ids [x0, y0, x1, y1], got "
                             f"{ids.dtype} of shape {tuple(ids.shape)}")
        if bool(((ids < 0) | (ids >= self.num_bins)).any()):
            raise ValueError(f"LocationTokenizer.decode: ids {ids.tolist()} outside the bins [0, {self.num_bins})")
        return (ids.to(torch.float64) / (self.num_bins - 1)).to(torch.float32)

    def generation_length(self, tokens: Tensor) -> int:
        """A box is the first four sampled tokens."""
        return min(BOX_LENGTH, int(tokens.shape[0]))

    @classmethod
    def conformance_sample(cls) -> Tensor:
        """A box on bin centres of the default 1000 bins, so decode(encode(box)) returns it."""
        return torch.tensor([0, 250, 500, 999], dtype=torch.float64).div(999).to(torch.float32)


def check_box(box: Any, where: str) -> Tensor:
    """``box`` as ``float64 [4]`` after checking it is ``[x0, y0, x1, y1]`` of finite numbers in
    ``[0, 1]`` with ``x0 <= x1`` and ``y0 <= y1``; errors say which rule failed and for what value."""
    if isinstance(box, (str, bytes)):
        raise TypeError(f"{where} expects a box [x0, y0, x1, y1] of numbers, got the string {box!r}")
    try:
        v = torch.as_tensor(box, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where} expects a box [x0, y0, x1, y1] of numbers, got {box!r}") from None
    if v.dim() != 1 or v.shape[0] != BOX_LENGTH:
        raise ValueError(f"{where} expects a box of {BOX_LENGTH} numbers [x0, y0, x1, y1], got shape {tuple(v.shape)}")
    values = v.tolist()
    if not all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in values):
        raise ValueError(f"{where}: box {values} must hold finite coordinates in [0, 1] (normalised by image size)")
    if values[0] > values[2] or values[1] > values[3]:
        raise ValueError(f"{where}: box {values} must have x0 <= x1 and y0 <= y1 ([x0, y0, x1, y1])")
    return v
