"""Encoded sequences -> one right-padded :class:`~mmgrow.batch.TokenBatch` (one example per row).

Padding tokens: ``input_ids = 0``, ``modality_ids = 0``, ``positions = 0``, ``segment_ids = -1``
(:data:`~mmgrow.protocols.PAD_SEGMENT`: they see nothing and nothing sees them),
``block_ids = -1``, ``loss_mask = 0``, ``example_weight = 0``. Real tokens have ``segment_ids = 0``
and ``example_weight = 1``. Packing several examples per row is a separate step (``packing.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmgrow.batch import PAD_VALUES, TokenBatch
from mmgrow.data.sequence import EncodedSequence


def pad_collate(seqs: Sequence[EncodedSequence], seq_len: int | None = None, truncate: bool = False) -> TokenBatch:
    """``B`` sequences -> ``TokenBatch`` of shape ``[B, T]``.

    ``T = seq_len``, or the longest sequence when ``seq_len`` is None. A sequence longer than
    ``seq_len`` is an error (silently cutting a video would drop its ``eov``) unless
    ``truncate=True``, which keeps its first ``seq_len`` tokens.
    """
    if not seqs:
        raise ValueError("pad_collate: got an empty list of sequences")
    for s in seqs:
        if not isinstance(s, EncodedSequence):
            raise TypeError(f"pad_collate expects EncodedSequence items, got {type(s).__name__}")
    longest = max(len(s) for s in seqs)
    if seq_len is None:
        seq_len = longest
    elif isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"pad_collate: seq_len must be a positive int or None, got {seq_len!r}")
    elif longest > seq_len and not truncate:
        raise ValueError(f"pad_collate: a sequence of length {longest} does not fit seq_len={seq_len}; "
                         "raise seq_len, use seq_len=None (pad to the longest) or truncate=True")

    shape = (len(seqs), seq_len)
    out = {name: torch.full(shape, value, dtype=torch.float32 if isinstance(value, float) else torch.long)
           for name, value in PAD_VALUES.items()}
    for row, s in enumerate(seqs):
        n = min(len(s), seq_len)
        out["input_ids"][row, :n] = s.input_ids[:n]
        out["modality_ids"][row, :n] = s.modality_ids[:n]
        out["positions"][row, :n] = s.positions[:n]
        out["segment_ids"][row, :n] = 0
        out["block_ids"][row, :n] = s.block_ids[:n]
        out["loss_mask"][row, :n] = s.loss_mask[:n]
        out["example_weight"][row, :n] = 1.0
    return TokenBatch(**out)
