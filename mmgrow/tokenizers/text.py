"""Byte-level text codec: UTF-8 bytes are the tokens, plus a few special tokens.

No vocabulary to train or download, every string round-trips, and the vocabulary is tiny
(``256 + len(SPECIALS)``), which suits the CPU-sized models of the test suite and the embedded
datasets. Ids ``0..255`` are the byte values; the specials follow in :data:`SPECIALS` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgrow.protocols import Tokenizer, length_through_first

NUM_BYTES = 256
SPECIALS: tuple[str, ...] = ("bos", "eos", "pad")
"""Special tokens of the byte codec, in id order after the 256 byte values."""


class ByteTokenizer(Tokenizer):
    """Text <-> ``[N]`` int64 ids: UTF-8 bytes ``0..255``, then ``bos`` (256), ``eos`` (257), ``pad`` (258).

    ``encode("hi")`` -> ``[bos, 104, 105, eos]``. ``decode`` drops special tokens and replaces
    invalid UTF-8 (e.g. a multi-byte character cut in half by sampling) with U+FFFD.
    """

    modality: ClassVar[str] = "text"
    kind: ClassVar[str] = "discrete"

    def __init__(self) -> None:
        super().__init__()
        self.special_tokens: dict[str, int] = {name: NUM_BYTES + i for i, name in enumerate(SPECIALS)}
        self.vocab_size = NUM_BYTES + len(SPECIALS)

    @property
    def bos_id(self) -> int:
        return self.special_tokens["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["eos"]

    @property
    def pad_id(self) -> int:
        return self.special_tokens["pad"]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> Tensor:
        """``text`` -> ``[N]`` int64: ``[bos]? utf8_bytes(text) [eos]?``."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.long)

    def generation_prefix(self) -> Tensor:
        """A generated text starts after ``bos``."""
        return torch.tensor([self.bos_id], dtype=torch.long)

    def generation_length(self, tokens: Tensor) -> int:
        """Sampled text ends at (and includes) the first ``eos``."""
        return length_through_first(tokens, self.eos_id)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """``[N]`` ids -> str. Specials are dropped; invalid UTF-8 becomes U+FFFD."""
        values = _as_id_list(ids, "ByteTokenizer.decode")
        bad = [v for v in values if not 0 <= v < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        return bytes(v for v in values if v < NUM_BYTES).decode("utf-8", errors="replace")


def _as_id_list(ids: Any, where: str) -> list[int]:
    """A 1-D integer tensor or sequence of ints as a list of Python ints, with a named error otherwise."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(f"{where}: expected a 1-D tensor of ids [N], got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{where}: expected integer ids, got dtype {ids.dtype}")
        return [int(v) for v in ids.tolist()]
    if isinstance(ids, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            raise TypeError(f"{where}: expected a sequence of ints")
        return list(ids)
    raise TypeError(f"{where}: expected a 1-D int tensor or a list of ints, got {type(ids).__name__}")
