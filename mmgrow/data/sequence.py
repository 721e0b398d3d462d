"""Segments -> one token sequence in the shared token space.

Each :class:`~mmgrow.protocols.Segment` is encoded by the codec of its modality (local ids, with
the codec's own special tokens such as ``bos``/``eos`` or ``bov``/``eof``/``eov``), shifted to
global ids by the :class:`~mmgrow.tokenspace.TokenSpace` offset of that modality, and concatenated.
For a text-to-video sample::

    segments:      [text "a red bar moves up" (input)] [video (target)]
    input_ids:     bos a _ r e d ... eos | bov c c ... c eof c ... c eov     (+ offset of each modality)
    modality_ids:  0   0 0 0 0 0 ... 0   | 1   1 ...                        (TokenSpace order)
    block_ids:     -1  ...           -1  | -1  0 0 ... 0 0   1 ... 1 1       (frames; bov none)
    loss_mask:     0   ...           0   | 1   1 ...                 1       (targets, bov included)
    positions:     0 1 2 ...                                      N-1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mmgrow.protocols import NO_BLOCK, Segment, Tokenizer
from mmgrow.tokenspace import TokenSpace

ROLES = ("input", "target")


@dataclass
class EncodedSequence:
    """One example as 1-D tensors of length ``N``.

    input_ids:    int64 ``[N]`` global ids (``TokenSpace.offset(modality) + local id``).
    modality_ids: int64 ``[N]`` index of the token's modality in the token space.
    block_ids:    int64 ``[N]`` bidirectional block id (unique within the sequence), ``-1`` = none.
    loss_mask:    float32 ``[N]`` 1 on every token of a ``target`` segment (its first token too,
                  e.g. ``bov``: the model learns to open the video after the caption), 0 on inputs.
    positions:    int64 ``[N]`` ``0 .. N-1``.
    """

    input_ids: Tensor
    modality_ids: Tensor
    block_ids: Tensor
    loss_mask: Tensor
    positions: Tensor

    def __post_init__(self) -> None:
        n = self.input_ids.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value.dim() != 1 or value.shape != n:
                raise ValueError(f"EncodedSequence.{f.name} has shape {tuple(value.shape)}, expected {tuple(n)}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class SequenceBuilder:
    """Encodes segments with per-modality codecs into an :class:`EncodedSequence`.

    Args:
        codecs: ``{modality: discrete Tokenizer}``; a segment's ``modality`` picks its codec.
        token_space: shared id space; default ``TokenSpace`` over ``{modality: codec.vocab_size}`` in
            the order of ``codecs``. A given space must hold every codec's modality with room for
            its vocabulary (a larger size reserves ids, as LWM's 8448-id vision space does).
    """

    def __init__(self, codecs: dict[str, Tokenizer], token_space: TokenSpace | None = None) -> None:
        if not isinstance(codecs, dict) or not codecs:
            raise ValueError(f"SequenceBuilder needs a non-empty dict modality -> Tokenizer, got {codecs!r}")
        for modality, codec in codecs.items():
            if not isinstance(codec, Tokenizer):
                raise TypeError(f"SequenceBuilder: codec for {modality!r} is a {type(codec).__name__}, "
                                "expected an mmgrow.protocols.Tokenizer")
            if codec.kind != "discrete":
                raise ValueError(f"SequenceBuilder: codec for {modality!r} ({type(codec).__name__}) is "
                                 f"{codec.kind!r}; only discrete codecs can be turned into token ids")
        if token_space is None:
            token_space = TokenSpace.from_dict({m: int(c.vocab_size) for m, c in codecs.items()})
        for modality, codec in codecs.items():
            if modality not in token_space.modalities:
                raise ValueError(f"SequenceBuilder: modality {modality!r} has a codec but is not in the token "
                                 f"space {token_space.modalities}")
            if token_space.size(modality) < codec.vocab_size:
                raise ValueError(f"SequenceBuilder: token space gives {modality!r} {token_space.size(modality)} "
                                 f"ids but its codec needs vocab_size={codec.vocab_size}")
        self.codecs = dict(codecs)
        self.token_space = token_space

    def encode_segment(self, segment: Segment) -> Tensor:
        """Local ids ``[n]`` of one segment, from its modality's codec."""
        codec = self.codecs.get(segment.modality)
        if codec is None:
            raise KeyError(f"SequenceBuilder: no codec for modality {segment.modality!r}; "
                           f"codecs are given for {sorted(self.codecs)}")
        ids = codec.encode(segment.raw)
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
            raise TypeError(f"SequenceBuilder: {type(codec).__name__}.encode must return a 1-D int64 tensor")
        return ids

    def build(self, segments: Sequence[Segment]) -> EncodedSequence:
        """Encode and concatenate ``segments`` (see the module docstring for the fields)."""
        if not segments:
            raise ValueError("SequenceBuilder.build: no segments to encode")
        parts: dict[str, list[Tensor]] = {"ids": [], "mod": [], "blk": [], "loss": []}
        next_block = 0
        for seg in segments:
            if not isinstance(seg, Segment):
                raise TypeError(f"SequenceBuilder.build expects Segments, got {type(seg).__name__}")
            if seg.role not in ROLES:
                raise ValueError(f"SequenceBuilder: segment role must be one of {ROLES}, got {seg.role!r}")
            local = self.encode_segment(seg)
            blocks = self.codecs[seg.modality].block_ids(local).to(torch.long)
            # Codecs number their blocks from 0; shift them so two videos never share a block.
            blocks = torch.where(blocks >= 0, blocks + next_block, torch.full_like(blocks, NO_BLOCK))
            if bool((blocks >= 0).any()):
                next_block = int(blocks.max()) + 1
            parts["ids"].append(self.token_space.to_global(local, seg.modality))
            parts["mod"].append(torch.full_like(local, self.token_space.index(seg.modality)))
            parts["blk"].append(blocks)
            parts["loss"].append(torch.full(local.shape, float(seg.role == "target"), dtype=torch.float32))
        input_ids = torch.cat(parts["ids"])
        return EncodedSequence(
            input_ids=input_ids,
            modality_ids=torch.cat(parts["mod"]),
            block_ids=torch.cat(parts["blk"]),
            loss_mask=torch.cat(parts["loss"]),
            positions=torch.arange(input_ids.shape[0], dtype=torch.long),
        )
