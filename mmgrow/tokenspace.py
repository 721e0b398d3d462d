"""One shared token space over several discrete codecs: global id = offset(modality) + local id.

The data side encodes each modality with its codec (local ids in ``[0, size)``) and shifts them by
the modality's offset; the model has one embedding table over all ``total`` ids and one output head
per modality that predicts *local* ids of that modality (LWM keeps text and vision heads apart the
same way). Order of modalities = order of offsets = index used in ``modality_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenSpace:
    """``sizes``: ``((modality, vocab_size), ...)`` in offset order."""

    sizes: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [m for m, _ in self.sizes]
        if not names:
            raise ValueError("TokenSpace needs at least one modality")
        if len(set(names)) != len(names):
            raise ValueError(f"TokenSpace modalities must be unique, got {names}")
        for m, n in self.sizes:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"TokenSpace: vocab size of {m!r} must be a positive int, got {n!r}")

    @classmethod
    def from_dict(cls, sizes: dict[str, int]) -> TokenSpace:
        return cls(tuple((str(k), int(v)) for k, v in sizes.items()))

    def to_dict(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def modalities(self) -> list[str]:
        return [m for m, _ in self.sizes]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.sizes)

    def index(self, modality: str) -> int:
        try:
            return self.modalities.index(modality)
        except ValueError:
            raise KeyError(f"modality {modality!r} is not in the token space {self.modalities}") from None

    def offset(self, modality: str) -> int:
        i = self.index(modality)
        return sum(n for _, n in self.sizes[:i])

    def size(self, modality: str) -> int:
        return self.sizes[self.index(modality)][1]

    def to_global(self, local_ids: Tensor, modality: str) -> Tensor:
        n = self.size(modality)
        if local_ids.numel() and (int(local_ids.min()) < 0 or int(local_ids.max()) >= n):
            raise ValueError(f"{modality} ids must lie in [0, {n}), got range "
                             f"[{int(local_ids.min())}, {int(local_ids.max())}]")
        return local_ids + self.offset(modality)

    def to_local(self, global_ids: Tensor, modality: str) -> Tensor:
        return global_ids - self.offset(modality)

    def modality_of(self, global_ids: Tensor) -> Tensor:
        """``[...]`` int64 modality index of each global id."""
        bounds = torch.tensor([n for _, n in self.sizes], device=global_ids.device).cumsum(0)
        return torch.bucketize(global_ids, bounds, right=True)
