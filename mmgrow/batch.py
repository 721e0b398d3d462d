"""The batch contract between data, model, objectives and the training loop."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from mmgrow.protocols import NO_BLOCK, PAD_SEGMENT, MaskSpec, SeqContext

PAD_VALUES: dict[str, float] = {"input_ids": 0, "modality_ids": 0, "positions": 0, "segment_ids": PAD_SEGMENT,
                                "block_ids": NO_BLOCK, "loss_mask": 0.0, "example_weight": 0.0}
"""Value of each :class:`TokenBatch` field at a padding token (what ``pad_collate`` and context-parallel
padding write): in no segment, no block, never a target."""


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
    """

    input_ids: Tensor
    modality_ids: Tensor
    positions: Tensor
    segment_ids: Tensor
    block_ids: Tensor
    loss_mask: Tensor
    example_weight: Tensor

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"TokenBatch.input_ids must be [B, T], got {shape}")
        for f in fields(self):
            v = getattr(self, f.name)
            if tuple(v.shape) != shape:
                raise ValueError(f"TokenBatch.{f.name} has shape {tuple(v.shape)}, expected {shape}")
        if self.input_ids.dtype != torch.long:
            raise TypeError(f"TokenBatch.input_ids must be int64, got {self.input_ids.dtype}")

    def to(self, device: torch.device | str) -> TokenBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def context(self, mask: MaskSpec | None = None, **extra) -> SeqContext:
        """The :class:`SeqContext` of this batch (segments, blocks and modalities as data)."""
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
