"""Encoded sequences -> one right-padded :class:`~mmgrow.batch.TokenBatch` (one example per row).

Padding tokens: ``input_ids = 0``, ``modality_ids = 0``, ``positions = 0``, ``segment_ids = -1``
(:data:`~mmgrow.protocols.PAD_SEGMENT`: they see nothing and nothing sees them),
``block_ids = -1``, ``loss_mask = 0``, ``example_weight = 0``. Real tokens have ``segment_ids = 0``
and ``example_weight = 1`` (or ``1 / n_e`` with ``weighting="example"``). Packing several examples
per row is :mod:`mmgrow.data.packing`.

Conditioning (:func:`attach_condition`, :func:`pad_collate_with_condition`): each row may carry the
embeddings of its example's caption, from a frozen :class:`ConditionEncoder`, as
``TokenBatch.condition [B, S, C]`` + ``condition_mask [B, S]``. In a packed row
(:func:`pack_collate_with_condition`) each example brings its own caption's tokens and
``condition_segment_ids [B, S]`` ties them to its segment, so cross-attention lets a token see only its
own example's condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mmgrow.batch import PAD_VALUES, TokenBatch
from mmgrow.data.packing import PackingConfig, example_weight, pack_masked
from mmgrow.data.sequence import EncodedSequence


@runtime_checkable
class ConditionEncoder(Protocol):
    """What conditions a batch: ``encode(texts) -> (embeddings float [B, S, C], mask bool [B, S])``
    with ``C == latent_dim`` (e.g. :class:`~mmgrow.tokenizers.text_encoder.FrozenTextEncoder`).
    It should be deterministic and cache repeated texts: it runs on every batch. (``Any`` in the
    signature: jsonargparse accepts a ``class_path`` only when its annotations match exactly.)"""

    latent_dim: int

    def encode(self, texts: Any) -> Any: ...


@dataclass(frozen=True)
class ConditionedSequence:
    """One example with the text that conditions it (None: the row gets no condition, e.g. when
    the caption is the example's target and conditioning on it would leak the answer)."""

    sequence: EncodedSequence
    text: str | None


def pad_collate(seqs: Sequence[EncodedSequence], seq_len: int | None = None, truncate: bool = False,
                weighting: str = "token") -> TokenBatch:
    """``B`` sequences -> ``TokenBatch`` of shape ``[B, T]``.

    ``weighting``: ``example_weight`` of each row's tokens, ``"token"`` (1) or ``"example"`` (``1 / n_e``,
    as :mod:`mmgrow.data.packing` weights packed examples, so padded and packed losses agree).

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
        out["example_weight"][row, :n] = example_weight(s, weighting)
    widths = {s.latents.shape[1] for s in seqs if s.latents is not None}
    if widths:
        if len(widths) > 1 or any(s.latents is None for s in seqs):
            raise ValueError(f"pad_collate: sequences disagree on latents (widths {sorted(widths)}, some without "
                             "any); build every sequence with the same SequenceBuilder")
        latents = torch.zeros(*shape, widths.pop())
        for row, s in enumerate(seqs):
            n = min(len(s), seq_len)
            latents[row, :n] = s.latents[:n]
        out["latents"] = latents
    return TokenBatch(**out)


def encode_checked(encoder: ConditionEncoder, texts: Sequence[str], owner: str) -> tuple[Tensor, Tensor]:
    """``encoder.encode(texts)`` checked: embeddings ``[len(texts), S, latent_dim]`` and a bool mask ``[len, S]``."""
    emb, mask = encoder.encode(list(texts))
    name, dim, n = type(encoder).__name__, int(encoder.latent_dim), len(texts)
    if not isinstance(emb, Tensor) or emb.dim() != 3 or emb.shape[0] != n or emb.shape[2] != dim:
        raise ValueError(f"{owner}: {name}.encode must return embeddings [{n}, S, {dim}] "
                         f"(latent_dim={dim}), got {tuple(getattr(emb, 'shape', ()))}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(emb.shape[:2]):
        raise ValueError(f"{owner}: {name}.encode must return a bool mask {list(emb.shape[:2])}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    return emb, mask


def attach_condition(batch: TokenBatch, texts: Sequence[str | None], encoder: ConditionEncoder) -> TokenBatch:
    """``batch`` with ``condition [B, S, C]`` / ``condition_mask [B, S]`` = ``encoder.encode`` of each row's text.

    ``texts[b]`` conditions row ``b``; a None row gets zeros and an all-False mask (cross-attention
    then adds nothing to it). ``S`` is the longest encoded text of the batch (at least 1). Raises
    when a row packs several examples (``segment_ids > 0``): one row, one condition.
    """
    B = batch.input_ids.shape[0]
    if len(texts) != B:
        raise ValueError(f"attach_condition: got {len(texts)} texts for a batch of {B} rows; expected one per row")
    if bool((batch.segment_ids > 0).any()):
        raise ValueError("attach_condition: a row packs several examples (segment_ids > 0) and would get one "
                         "condition for all of them; use pack_collate_with_condition for packed rows")
    dim = int(encoder.latent_dim)
    rows = [b for b, t in enumerate(texts) if t is not None]
    if not rows:
        return replace(batch, condition=torch.zeros(B, 1, dim), condition_mask=torch.zeros(B, 1, dtype=torch.bool))
    emb, mask = encode_checked(encoder, [texts[b] for b in rows], "attach_condition")
    condition = emb.new_zeros(B, emb.shape[1], dim)
    condition_mask = torch.zeros(B, emb.shape[1], dtype=torch.bool)
    index = torch.tensor(rows, dtype=torch.long)
    condition[index], condition_mask[index] = emb, mask
    return replace(batch, condition=condition, condition_mask=condition_mask)


def pad_collate_with_condition(items: Sequence[ConditionedSequence], encoder: ConditionEncoder,
                               seq_len: int | None = None, truncate: bool = False) -> TokenBatch:
    """:func:`pad_collate` of the sequences, then :func:`attach_condition` of their texts."""
    for item in items:
        if not isinstance(item, ConditionedSequence):
            raise TypeError(f"pad_collate_with_condition expects ConditionedSequence items, got {type(item).__name__}")
    batch = pad_collate([item.sequence for item in items], seq_len=seq_len, truncate=truncate)
    return attach_condition(batch, [item.text for item in items], encoder)


def pack_collate_with_condition(items: Sequence[ConditionedSequence], config: PackingConfig,
                                encoder: ConditionEncoder) -> TokenBatch:
    """:func:`~mmgrow.data.packing.pack_collate` of the sequences, each example with its own condition.

    Row ``b``'s condition is the concatenation of the encoded texts of its examples (in segment order,
    each cut to its own valid tokens), ``condition_mask [B, S]`` marks them and
    ``condition_segment_ids [B, S]`` says which example (segment id) each belongs to, so cross-attention
    lets a token see only its own example's condition; an example whose text is None gets none (its
    tokens get what they get alone without a condition: the output bias only). ``S`` is the longest row's total (at least 1). Naive
    packing has no examples to tell apart: it is refused here.
    """
    for item in items:
        if not isinstance(item, ConditionedSequence):
            raise TypeError(f"pack_collate_with_condition expects ConditionedSequence items, got {type(item).__name__}")
    if config.mode != "masked":
        raise ValueError("packing: mode 'naive' cuts examples apart, so per-example conditions cannot follow them; "
                         "use mode: masked with a condition_encoder")
    batch, rows = pack_masked([item.sequence for item in items], config)
    dim = int(encoder.latent_dim)
    texts = [item.text for item in items]
    present = [i for i, t in enumerate(texts) if t is not None]
    per_item: dict[int, Tensor] = {}
    if present:
        emb, mask = encode_checked(encoder, [texts[i] for i in present], "pack_collate_with_condition")
        for j, i in enumerate(present):
            per_item[i] = emb[j][mask[j]]  # [S_i, C]: this example's valid conditioning tokens
    lengths = [sum(per_item[i].shape[0] for i in members if i in per_item) for members in rows]
    S = max(max(lengths), 1)
    condition = torch.zeros(len(rows), S, dim)
    condition_mask = torch.zeros(len(rows), S, dtype=torch.bool)
    condition_segments = torch.full((len(rows), S), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members):
            if i not in per_item:
                continue
            n = per_item[i].shape[0]
            condition[r, start:start + n] = per_item[i].to(condition.dtype)
            condition_mask[r, start:start + n] = True
            condition_segments[r, start:start + n] = segment
            start += n
    return replace(batch, condition=condition, condition_mask=condition_mask,
                   condition_segment_ids=condition_segments)
