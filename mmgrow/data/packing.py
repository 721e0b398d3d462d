"""Sequence packing: whole examples in fixed-length rows (LWM's masked packing), or the naive cut.

``packing: {length: L, mode: masked, algorithm: first_fit, weighting: example}`` in a recipe's data
section. A batch of examples (:class:`~mmgrow.data.sequence.EncodedSequence`) becomes as many rows of
exactly ``L`` tokens as the examples need.

**masked** (default). Every example lies whole in one row (an example longer than ``L`` is an
error). Per token of a row holding examples ``e = 0 .. k-1``:

* ``segment_ids = e`` (``-1`` on padding): attention, SSM states and convolutions never cross an
  example boundary, and no target is predicted from the previous example (mixers with
  ``supports_segments``);
* ``positions`` restart at 0 with every example (RoPE sees each example as if it were alone);
* ``block_ids`` are shifted so that no two examples of the row share a block;
* ``modality_ids``, ``loss_mask`` and ``latents`` are copied;
* ``example_weight = w_e``, the same for every token of example ``e``.

So a packed row computes, for every example, exactly what the example computes alone (the tests
check it for every mixer and memory layer with ``supports_segments``, forward and backward).

**Weighting.** The autoregressive loss is, per modality ``m``, the ratio
``L_m = sum_t w_t CE_t / sum_t w_t`` with ``w_t = loss_mask_t * example_weight_t``. With

* ``weighting: token``: ``w_e = 1`` -- every target token counts once, so a 2000-token video
  outweighs a 3-token answer 700 to 1;
* ``weighting: example`` (default): ``w_e = 1 / n_e`` with ``n_e`` the number of targets the loss
  counts in example ``e`` (tokens with ``loss_mask > 0`` at positions ``>= 1``: the first token of an
  example is never predicted). Every example then contributes the mean CE of its own targets with the
  same weight: for one target modality ``L_m = (1/E) sum_e mean_{t in e} CE_t`` (LWM: "the packed
  batch is equivalent to unpacked-with-padding", per example, so long videos do not swamp short
  answers). The per-modality weights of the objective apply on top (LWM's ``0.5 (vision + text)``).

:func:`~mmgrow.data.collate.pad_collate` takes the same ``weighting``, so the packed loss equals the
padded (one example per row) loss with the same weights, to rounding.

**naive** (the ablation baseline, LWM's "no_pad"): the examples are concatenated in order into one
stream that is cut every ``L`` tokens (an example may straddle two rows, the last row is padded).
Every real token has ``segment_ids = 0`` (no segment mask: tokens attend across example boundaries,
and an example's first token is predicted from the previous example's last), ``positions`` run
``0 .. L-1`` within the row, and ``example_weight = 1`` (per-token loss).

**Algorithms** (masked mode): ``first_fit`` puts each example, in order, into the first row that has
room, opening a new row when none has; ``greedy`` ("next fit", as LWM's and most loaders' streaming
packers) fills the current row in order and closes it when the next example does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmgrow.batch import PAD_VALUES, TokenBatch
from mmgrow.data.sequence import EncodedSequence

MODES = ("masked", "naive")
ALGORITHMS = ("first_fit", "greedy")
WEIGHTINGS = ("example", "token")


@dataclass(frozen=True)
class PackingConfig:
    """How a batch is packed (module docstring).

    length: tokens per row (``L``); mode: ``masked | naive``; algorithm: ``first_fit | greedy``;
    weighting: ``example | token`` (masked mode; naive mode is always per token).
    """

    length: int
    mode: str = "masked"
    algorithm: str = "first_fit"
    weighting: str = "example"

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 2:
            raise ValueError(f"packing: length must be an int >= 2, got {self.length!r}")
        for field, value, allowed in (("mode", self.mode, MODES), ("algorithm", self.algorithm, ALGORITHMS),
                                      ("weighting", self.weighting, WEIGHTINGS)):
            if value not in allowed:
                raise ValueError(f"packing: {field} must be one of {list(allowed)}, got {value!r}")

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | PackingConfig | None) -> PackingConfig | None:
        """The YAML mapping ``{length: L, mode: ..., algorithm: ..., weighting: ...}`` (None = no packing)."""
        if value is None or isinstance(value, PackingConfig):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"packing must be a mapping like {{length: 2048, mode: masked}} or null, got {value!r}")
        unknown = sorted(set(value) - {"length", "mode", "algorithm", "weighting"})
        if unknown:
            raise ValueError(f"packing: unknown keys {unknown}; expected length, mode, algorithm, weighting")
        if "length" not in value:
            raise ValueError("packing: `length` (tokens per row) is required, e.g. packing: {length: 2048}")
        return cls(**dict(value))

    def with_length(self, length: int) -> PackingConfig:
        """This configuration with another row length (a curriculum stage's)."""
        return PackingConfig(length=length, mode=self.mode, algorithm=self.algorithm, weighting=self.weighting)


def pack_rows(lengths: Sequence[int], length: int, algorithm: str = "first_fit") -> list[list[int]]:
    """Example indices per row: every example once, each row's total ``<= length``, examples in input
    order within a row (module docstring: the algorithms). An example longer than ``length`` is an error."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"pack_rows: algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > length:
            raise ValueError(f"packing: an example of {n} tokens does not fit a row of length {length}; raise "
                             "packing.length (or the stage's length) or shorten the examples")
        if algorithm == "greedy":
            target = len(rows) - 1 if rows and room[-1] >= n else None
        else:
            target = next((r for r, free in enumerate(room) if free >= n), None)
        if target is None:
            rows.append([])
            room.append(length)
            target = len(rows) - 1
        rows[target].append(i)
        room[target] -= n
    return rows


def counted_targets(seq: EncodedSequence) -> int:
    """Targets of ``seq`` that the loss counts: ``loss_mask > 0`` at positions ``>= 1``."""
    return int((seq.loss_mask[1:] > 0).sum())


def example_weight(seq: EncodedSequence, weighting: str) -> float:
    """``w_e`` of one example: 1 (``token``) or ``1 / n_e`` (``example``; 1 when it has no target)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    if weighting == "token":
        return 1.0
    return 1.0 / max(counted_targets(seq), 1)


def _empty(rows: int, length: int, width: int) -> dict[str, torch.Tensor]:
    out = {name: torch.full((rows, length), value, dtype=torch.float32 if isinstance(value, float) else torch.long)
           for name, value in PAD_VALUES.items()}
    if width:
        out["latents"] = torch.zeros(rows, length, width)
    return out


def _latent_width(seqs: Sequence[EncodedSequence]) -> int:
    widths = {s.latents.shape[1] for s in seqs if s.latents is not None}
    if len(widths) > 1 or (widths and any(s.latents is None for s in seqs)):
        raise ValueError(f"packing: sequences disagree on latents (widths {sorted(widths)}, some without any); "
                         "build every sequence with the same SequenceBuilder")
    return widths.pop() if widths else 0


def pack_masked(seqs: Sequence[EncodedSequence], config: PackingConfig) -> tuple[TokenBatch, list[list[int]]]:
    """Masked packing of ``seqs`` -> (batch ``[R, L]``, example indices per row)."""
    rows = pack_rows([len(s) for s in seqs], config.length, config.algorithm)
    width = _latent_width(seqs)
    out = _empty(len(rows), config.length, width)
    for r, members in enumerate(rows):
        start, next_block = 0, 0
        for segment, i in enumerate(members):
            s = seqs[i]
            span = slice(start, start + len(s))
            out["input_ids"][r, span] = s.input_ids
            out["modality_ids"][r, span] = s.modality_ids
            out["positions"][r, span] = torch.arange(len(s))
            out["segment_ids"][r, span] = segment
            blocks = s.block_ids
            out["block_ids"][r, span] = torch.where(blocks >= 0, blocks + next_block, blocks)
            if bool((blocks >= 0).any()):
                next_block += int(blocks.max()) + 1
            out["loss_mask"][r, span] = s.loss_mask
            out["example_weight"][r, span] = example_weight(s, config.weighting)
            if width:
                out["latents"][r, span] = s.latents
            start += len(s)
    return TokenBatch(**out), rows


def pack_naive(seqs: Sequence[EncodedSequence], config: PackingConfig) -> TokenBatch:
    """Naive packing: concatenate, cut every ``L`` tokens (module docstring)."""
    L = config.length
    width = _latent_width(seqs)
    stream = {name: torch.cat([getattr(s, name) for s in seqs]) for name in
              ("input_ids", "modality_ids", "loss_mask", "block_ids")}
    if width:
        stream["latents"] = torch.cat([s.latents for s in seqs])
    # Blocks unique along the stream: each example's blocks after the previous example's.
    offset, shifted = 0, []
    for s in seqs:
        b = s.block_ids
        shifted.append(torch.where(b >= 0, b + offset, b))
        if bool((b >= 0).any()):
            offset += int(b.max()) + 1
    stream["block_ids"] = torch.cat(shifted)
    total = int(stream["input_ids"].shape[0])
    rows = -(-total // L)
    out = _empty(rows, L, width)
    for r in range(rows):
        span = slice(r * L, min((r + 1) * L, total))
        n = span.stop - span.start
        for name in stream:
            out[name][r, :n] = stream[name][span]
        out["positions"][r, :n] = torch.arange(n)
        out["segment_ids"][r, :n] = 0
        out["example_weight"][r, :n] = 1.0
    return TokenBatch(**out)


def pack_collate(items: Sequence[Any], config: PackingConfig, encoder: Any = None) -> TokenBatch:
    """``items`` -> packed ``TokenBatch [R, config.length]`` (module docstring).

    ``items`` are :class:`~mmgrow.data.sequence.EncodedSequence` s, or, with a condition ``encoder``,
    :class:`~mmgrow.data.collate.ConditionedSequence` s, which
    :func:`~mmgrow.data.collate.pack_collate_with_condition` packs with one condition per example.
    """
    if not items:
        raise ValueError("pack_collate: got an empty list of sequences")
    if encoder is not None:
        from mmgrow.data.collate import pack_collate_with_condition  # collate imports this module

        return pack_collate_with_condition(items, config, encoder)
    for s in items:
        if not isinstance(s, EncodedSequence):
            raise TypeError(f"pack_collate expects EncodedSequence items (ConditionedSequence ones with an encoder), "
                            f"got {type(s).__name__}")
    if config.mode == "naive":
        return pack_naive(items, config)
    return pack_masked(items, config)[0]
