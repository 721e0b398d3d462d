"""The batch contract between data, model, objectives and the training loop."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec, SeqContext

PAD_VALUES: dict[str, float] = {"input_ids": 0, "modality_ids": 0, "positions": 0, "segment_ids": PAD_SEGMENT,
                                "block_ids": NO_BLOCK, "loss_mask": 0.0, "example_weight": 0.0}
"""Value of each per-token :class:`TokenBatch` field at a padding token (what ``pad_collate`` and
context-parallel padding write): in no segment, no block, never a target. The conditioning fields are
per row, not per token, and have no entry: padding the sequence leaves them as they are."""

PER_TOKEN_FIELDS: tuple[str, ...] = tuple(PAD_VALUES)
"""The ``[B, T]`` fields of :class:`TokenBatch` (every field but ``condition`` / ``condition_mask`` /
``latents``, which context-parallel sharding does not handle: objectives on latents do not declare
``supports_context_parallel``)."""


@dataclass
class TokenBatch:
    """A padded (optionally packed) batch of token sequences in one :class:`~mmgrow.tokenspace.TokenSpace`.

    Shapes ``[B, T]`` unless noted:
        input_ids:      int64 global token ids (padding id 0 where ``segment_ids == -1``).
        modality_ids:   int64 modality index of each token (TokenSpace order).
        positions:      int64 position within the packed example.
        segment_ids:    int64 example index within the row; ``-1`` = padding.
        block_ids:      int64 bidirectional block id (one per video frame), ``-1`` = none.
        loss_mask:      float, 1 where token ``t`` is a *target* (predicted from ``t-1``), else 0.
        example_weight: float, per-token weight of the example it belongs to (1 unless packing
                        re-weights examples); multiplies the loss.
        condition:      optional ``[B, S, C]`` float conditioning tokens of each row's example (e.g.
                        frozen text-encoder embeddings of its caption, read by cross-attention).
        condition_mask: optional ``[B, S]`` bool, True = a real conditioning token; only with
                        ``condition`` (None = every conditioning token is real).
        condition_segment_ids: optional ``[B, S]`` int64, which packed example (segment id) of the row
                        each conditioning token belongs to (``-1`` = none); only with ``condition``.
                        Cross-attention then lets a token see only its own example's condition
                        (:func:`mmgrow.data.collate.pack_collate_with_condition`).
        latents:        optional ``[B, T, C]`` float continuous values of the tokens of continuous
                        modalities (video latents of a DiT); zeros at discrete and padding tokens.

    Fields are iterated with :data:`PER_TOKEN_FIELDS` where a ``[B, T]`` tensor is expected (padding,
    sharding); ``condition`` and ``condition_mask`` may be None and are never sequence-padded.
    """

    input_ids: Tensor
    modality_ids: Tensor
    positions: Tensor
    segment_ids: Tensor
    block_ids: Tensor
    loss_mask: Tensor
    example_weight: Tensor
    condition: Tensor | None = None
    condition_mask: Tensor | None = None
    latents: Tensor | None = None
    condition_segment_ids: Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"TokenBatch.input_ids must be [B, T], got {shape}")
        for name in PER_TOKEN_FIELDS:
            v = getattr(self, name)
            if tuple(v.shape) != shape:
                raise ValueError(f"TokenBatch.{name} has shape {tuple(v.shape)}, expected {shape}")
        if self.input_ids.dtype != torch.long:
            raise TypeError(f"TokenBatch.input_ids must be int64, got {self.input_ids.dtype}")
        self._check_condition(shape[0])
        if self.latents is not None and (self.latents.dim() != 3 or tuple(self.latents.shape[:2]) != shape
                                         or not self.latents.is_floating_point()):
            raise ValueError(f"TokenBatch.latents must be float [B, T, C] with [B, T] = {shape}, got "
                             f"{self.latents.dtype} {tuple(self.latents.shape)}")

    def _check_condition(self, batch_size: int) -> None:
        cond, mask = self.condition, self.condition_mask
        if cond is None:
            if mask is not None or self.condition_segment_ids is not None:
                raise ValueError("TokenBatch.condition_mask / condition_segment_ids are set but condition is None; "
                                 "give the condition with them or none of them")
            return
        if cond.dim() != 3 or cond.shape[0] != batch_size:
            raise ValueError(f"TokenBatch.condition must be [B, S, C] with B = {batch_size}, got {tuple(cond.shape)}")
        if not cond.is_floating_point():
            raise TypeError(f"TokenBatch.condition must be floating point, got {cond.dtype}")
        if mask is not None:
            if tuple(mask.shape) != tuple(cond.shape[:2]):
                raise ValueError(f"TokenBatch.condition_mask has shape {tuple(mask.shape)}, expected "
                                 f"{tuple(cond.shape[:2])} ([B, S] of condition)")
            if mask.dtype != torch.bool:
                raise TypeError(f"TokenBatch.condition_mask must be bool, got {mask.dtype}")
        segments = self.condition_segment_ids
        if segments is not None and (tuple(segments.shape) != tuple(cond.shape[:2]) or segments.dtype != torch.long):
            raise ValueError(f"TokenBatch.condition_segment_ids must be int64 {list(cond.shape[:2])} ([B, S] of "
                             f"condition), got {segments.dtype} {tuple(segments.shape)}")

    def to(self, device: torch.device | str) -> TokenBatch:
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def context(self, mask: MaskSpec | None = None, **extra) -> SeqContext:
        """The :class:`SeqContext` of this batch (segments, blocks and modalities as data; the
        condition when the batch has one, unless ``extra`` gives another)."""
        if self.condition is not None:
            extra.setdefault("condition", self.condition)
            extra.setdefault("condition_mask", self.condition_mask)
            extra.setdefault("condition_segment_ids", self.condition_segment_ids)
        return SeqContext(positions=self.positions, segment_ids=self.segment_ids, block_ids=self.block_ids,
                          modality_ids=self.modality_ids, mask=mask or MaskSpec(), **extra)

    def token_count(self) -> Tensor:
        """Non-padding tokens as a 0-d tensor on the batch's device (no host sync: training loops
        accumulate it every step)."""
        return (self.segment_ids >= 0).sum()

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens (a host sync on accelerators; use :meth:`token_count` in hot loops)."""
        return int(self.token_count())


def _to(value: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if value is None else value.to(device)
