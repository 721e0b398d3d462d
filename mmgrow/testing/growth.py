"""Small models and inputs for growth tests (shared by mmgrow's tests and plugin authors' tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmgrow.models.unified import UnifiedModel
from mmgrow.protocols import SeqContext


def tiny_model(mixer: Callable, dtype: torch.dtype = torch.float32, depth: int = 2, seed: int = 0,
               dim: int = 32, vocab: int = 50) -> UnifiedModel:
    """A seeded, eval-mode text-only :class:`UnifiedModel` of width ``dim`` built from ``mixer``."""
    torch.manual_seed(seed)
    return UnifiedModel(token_space={"text": vocab}, dim=dim, depth=depth, mixer=mixer).eval().to(dtype)


def token_inputs(batch_size: int, seq_len: int, vocab: int = 50, seed: int = 1) -> tuple[torch.Tensor, SeqContext]:
    """Seeded random ids ``[B, T]`` and a plain causal context."""
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    return ids, SeqContext.simple(batch_size, seq_len)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: the measure of the growth tolerances."""
    return float(((a - b).abs().max() / b.abs().max()).detach())
