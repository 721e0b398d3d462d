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

Continuous codecs (``kind == "continuous"``, e.g. the ``latent`` video codec of a DiT) encode an
item to latents ``[n, C]`` instead of ids. Their modality takes one id in the token space (the
*latent slot*, local id 0): every latent position carries that id in ``input_ids`` -- its embedding
is the modality's learned type embedding -- and its vector in ``latents [N, C_max]`` (zeros at
discrete tokens; ``C_max`` = the widest continuous codec). So text tokens and video latents share
one sequence, one mask and one backbone (DESIGN.md §3.6).

Segments with the same ``Segment.block`` form one bidirectional block together (their codecs' own
blocks are replaced): a storyboard segment's text and video frames, seen as a unit by ``local``
attention.
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
    latents:      float32 ``[N, C]`` continuous values (zeros at discrete tokens), or None when no
                  segment is continuous.
    """

    input_ids: Tensor
    modality_ids: Tensor
    block_ids: Tensor
    loss_mask: Tensor
    positions: Tensor
    latents: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.input_ids.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "latents":
                if value is not None and (value.dim() != 2 or value.shape[:1] != n or not value.is_floating_point()):
                    raise ValueError(f"EncodedSequence.latents must be float [{n[0]}, C], got "
                                     f"{value.dtype} {tuple(value.shape)}")
                continue
            if value.dim() != 1 or value.shape != n:
                raise ValueError(f"EncodedSequence.{f.name} has shape {tuple(value.shape)}, expected {tuple(n)}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class SequenceBuilder:
    """Encodes segments with per-modality codecs into an :class:`EncodedSequence`.

    Args:
        codecs: ``{modality: Tokenizer}``; a segment's ``modality`` picks its codec. Discrete codecs
            give ids, continuous ones latents (module docstring).
        token_space: shared id space; default ``TokenSpace`` over ``{modality: codec.vocab_size}``
            (1 for a continuous codec: its latent slot) in the order of ``codecs``. A given space
            must hold every codec's modality with room for its vocabulary (a larger size reserves
            ids, as LWM's 8448-id vision space does).
    """

    def __init__(self, codecs: dict[str, Tokenizer], token_space: TokenSpace | None = None) -> None:
        if not isinstance(codecs, dict) or not codecs:
            raise ValueError(f"SequenceBuilder needs a non-empty dict modality -> Tokenizer, got {codecs!r}")
        for modality, codec in codecs.items():
            if not isinstance(codec, Tokenizer):
                raise TypeError(f"SequenceBuilder: codec for {modality!r} is a {type(codec).__name__}, "
                                "expected an mmgrow.protocols.Tokenizer")
            if codec.kind not in ("discrete", "continuous"):
                raise ValueError(f"SequenceBuilder: codec for {modality!r} ({type(codec).__name__}) has kind "
                                 f"{codec.kind!r}; expected 'discrete' or 'continuous'")
            if codec.kind == "continuous" and (not isinstance(codec.latent_dim, int) or codec.latent_dim < 1):
                raise ValueError(f"SequenceBuilder: continuous codec for {modality!r} ({type(codec).__name__}) "
                                 f"must declare a positive latent_dim, got {codec.latent_dim!r}")
        self.continuous: dict[str, int] = {m: int(c.latent_dim) for m, c in codecs.items() if c.kind == "continuous"}
        """``{modality: latent_dim}`` of the continuous codecs (the model's latent adapters)."""
        if token_space is None:
            token_space = TokenSpace.from_dict({m: 1 if m in self.continuous else int(c.vocab_size)
                                                for m, c in codecs.items()})
        for modality, codec in codecs.items():
            if modality not in token_space.modalities:
                raise ValueError(f"SequenceBuilder: modality {modality!r} has a codec but is not in the token "
                                 f"space {token_space.modalities}")
            if modality not in self.continuous and token_space.size(modality) < codec.vocab_size:
                raise ValueError(f"SequenceBuilder: token space gives {modality!r} {token_space.size(modality)} "
                                 f"ids but its codec needs vocab_size={codec.vocab_size}")
        self.codecs = dict(codecs)
        self.token_space = token_space

    @property
    def latent_dim(self) -> int:
        """Width ``C_max`` of :attr:`EncodedSequence.latents` (0 without continuous codecs)."""
        return max(self.continuous.values(), default=0)

    def encode_segment(self, segment: Segment) -> Tensor:
        """Local ids ``[n]`` (discrete codec) or latents ``[n, C]`` (continuous codec) of one segment."""
        codec = self.codecs.get(segment.modality)
        if codec is None:
            raise KeyError(f"SequenceBuilder: no codec for modality {segment.modality!r}; "
                           f"codecs are given for {sorted(self.codecs)}")
        out = codec.encode(segment.raw)
        name = type(codec).__name__
        if segment.modality in self.continuous:
            dim = self.continuous[segment.modality]
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != dim or not out.is_floating_point():
                raise TypeError(f"SequenceBuilder: {name}.encode must return float latents [n, {dim}] "
                                f"(latent_dim={dim}), got {getattr(out, 'dtype', type(out).__name__)} "
                                f"{tuple(getattr(out, 'shape', ()))}")
            return out
        if not isinstance(out, Tensor) or out.dim() != 1 or out.dtype != torch.long:
            raise TypeError(f"SequenceBuilder: {name}.encode must return a 1-D int64 tensor")
        return out

    def build(self, segments: Sequence[Segment]) -> EncodedSequence:
        """Encode and concatenate ``segments`` (see the module docstring for the fields)."""
        return self.build_with_spans(segments)[0]

    def build_with_spans(self, segments: Sequence[Segment]) -> tuple[EncodedSequence, list[slice]]:
        """:meth:`build`, plus where each segment's tokens lie in the sequence (``seq[span]``)."""
        if not segments:
            raise ValueError("SequenceBuilder.build: no segments to encode")
        parts: dict[str, list[Tensor]] = {"ids": [], "mod": [], "blk": [], "loss": [], "lat": []}
        next_block = 0
        grouped: dict[int, int] = {}  # Segment.block -> block id in this sequence
        width = self.latent_dim
        for seg in segments:
            if not isinstance(seg, Segment):
                raise TypeError(f"SequenceBuilder.build expects Segments, got {type(seg).__name__}")
            if seg.role not in ROLES:
                raise ValueError(f"SequenceBuilder: segment role must be one of {ROLES}, got {seg.role!r}")
            if seg.block is not None and (isinstance(seg.block, bool) or not isinstance(seg.block, int)):
                raise TypeError(f"SequenceBuilder: Segment.block must be an int or None, got {seg.block!r}")
            encoded = self.encode_segment(seg)
            n = encoded.shape[0]
            if seg.modality in self.continuous:
                local = torch.zeros(n, dtype=torch.long)  # the latent slot
                latents = torch.zeros(n, width, dtype=torch.float32)
                latents[:, : encoded.shape[1]] = encoded.float()
            else:
                local, latents = encoded, torch.zeros(n, width, dtype=torch.float32)
            if seg.block is not None:
                if seg.block not in grouped:
                    grouped[seg.block], next_block = next_block, next_block + 1
                blocks = torch.full((n,), grouped[seg.block], dtype=torch.long)
            else:
                blocks = self.codecs[seg.modality].block_ids(encoded).to(torch.long)
                # Codecs number their blocks from 0; shift them so two videos never share a block.
                blocks = torch.where(blocks >= 0, blocks + next_block, torch.full_like(blocks, NO_BLOCK))
                if bool((blocks >= 0).any()):
                    next_block = int(blocks.max()) + 1
            parts["ids"].append(self.token_space.to_global(local, seg.modality))
            parts["mod"].append(torch.full_like(local, self.token_space.index(seg.modality)))
            parts["blk"].append(blocks)
            parts["loss"].append(torch.full((n,), float(seg.role == "target"), dtype=torch.float32))
            parts["lat"].append(latents)
        input_ids = torch.cat(parts["ids"])
        ends = torch.tensor([p.shape[0] for p in parts["ids"]]).cumsum(0).tolist()
        spans = [slice(end - p.shape[0], end) for end, p in zip(ends, parts["ids"])]
        return EncodedSequence(
            input_ids=input_ids,
            modality_ids=torch.cat(parts["mod"]),
            block_ids=torch.cat(parts["blk"]),
            loss_mask=torch.cat(parts["loss"]),
            positions=torch.arange(input_ids.shape[0], dtype=torch.long),
            latents=torch.cat(parts["lat"]) if width else None,
        ), spans
