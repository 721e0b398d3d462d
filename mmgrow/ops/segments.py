"""Segment resets and decay sums shared by the recurrent mixers (Mamba-2, Gated DeltaNet, TTT).

Packed rows (``ctx.segment_ids``) hold several examples one after another. A recurrent mixer honours
them by **resetting its state** where a new example starts: at token ``t`` when
``segment_ids[t] != segment_ids[t - 1]`` (and at ``t = 0`` when the first token's segment differs from
the segment the carried state belongs to). Every recurrent op takes that as a boolean ``reset [B, T]``.

For decaying recurrences ``h_t = a_t h_{t-1} + (\\text{write}_t)`` a reset is exactly ``a_t = 0``, i.e. a
log-decay of ``-inf`` at ``t``. :func:`segsum` then gives the decay between any two tokens of a
chunk without ever subtracting two cumulative sums (``-inf - (-inf)`` would be NaN, and differences of
large cumulative sums lose precision: the "stable segment sum" of Mamba-2's minimal SSD).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NOTHING_SEEN = -2
"""Segment id that no token has (real segments are >= 0, padding is :data:`PAD_SEGMENT` = -1): what
"the previous token" is when no state is carried, so the first token always starts afresh.

A state made by ``init_state`` claims segment 0 instead, so an initial state placed in it (to
continue a sequence) is used by a row whose first segment id is 0, as unpacked rows are."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrent ops compute in: float64 stays float64 (the oracle), everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reset_mask(segment_ids: Tensor | None, previous_segment: Tensor | None, shape: tuple[int, int],
               device: torch.device) -> Tensor:
    """``[B, T]`` bool: True where token ``t`` does not continue the segment of token ``t - 1``.

    Args:
        segment_ids: ``[B, T]`` int64 or None (one segment, id 0, per row).
        previous_segment: ``[B]`` int64, the segment of the last token the carried state saw
            (0 for a state from ``init_state``), or None (no state: nothing to continue).
        shape: ``(B, T)``.
    """
    B, T = shape
    seg = segment_ids if segment_ids is not None else torch.zeros(B, T, dtype=torch.long, device=device)
    before = previous_segment if previous_segment is not None else torch.full((B,), NOTHING_SEEN, device=device)
    previous = torch.cat([before.to(device=device, dtype=seg.dtype)[:, None], seg[:, :-1]], dim=1)
    return seg != previous


def last_segment(segment_ids: Tensor | None, previous_segment: Tensor | None, batch_size: int,
                 device: torch.device) -> Tensor:
    """``[B]`` segment id of the last token of a call (what the next call's state continues)."""
    if segment_ids is None:  # a row without segment ids is one segment, id 0
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    if segment_ids.shape[1] == 0:
        return previous_segment.clone() if previous_segment is not None else \
            torch.full((batch_size,), NOTHING_SEEN, dtype=torch.long, device=device)
    return segment_ids[:, -1].clone()


def apply_resets(log_decay: Tensor, reset: Tensor | None) -> Tensor:
    """``log_decay [B, T, ...]`` with ``-inf`` where ``reset [B, T]``: the state is multiplied by 0 there."""
    if reset is None:
        return log_decay
    mask = reset.reshape(*reset.shape, *([1] * (log_decay.dim() - 2)))
    return log_decay.masked_fill(mask, float("-inf"))


def segsum(log_decay: Tensor) -> Tensor:
    """Stable segment sums: ``[..., L] -> [..., L, L]`` with
    ``out[..., i, j] = sum_{k=j+1}^{i} log_decay[..., k]`` for ``j <= i`` (0 on the diagonal) and
    ``-inf`` above it, so ``exp(out)`` is the decay from token ``j`` to token ``i``.

    Built from a masked cumulative sum over a repeated matrix rather than from differences of one
    cumulative sum: no ``-inf - (-inf)`` at resets and no cancellation in long chunks.
    """
    L = log_decay.shape[-1]
    # rep[..., i, j] = log_decay[..., i] for every j; keep i > j and sum down i.
    rep = log_decay[..., None].expand(*log_decay.shape, L)
    strictly_lower = torch.ones(L, L, dtype=torch.bool, device=log_decay.device).tril(-1)
    summed = torch.cumsum(rep.masked_fill(~strictly_lower, 0.0), dim=-2)
    lower = torch.ones(L, L, dtype=torch.bool, device=log_decay.device).tril()
    return summed.masked_fill(~lower, float("-inf"))


def decay(log_decay: Tensor) -> Tensor:
    """``exp(log_decay)`` with results below the dtype's smallest normal number set to exactly 0.

    Long chunks of strong decay produce subnormal floats (``exp(x)`` for ``x`` below about -87 in
    float32), and CPU arithmetic on subnormals is many times slower; the values themselves are below
    the precision of every term they are added to. Flushing them (as GPUs do by default) changes no
    result that float32 (or, below ``exp(-708)``, float64) can represent next to a normal number.
    """
    floor = math.log(torch.finfo(log_decay.dtype).tiny)
    return torch.exp(log_decay.masked_fill(log_decay < floor, float("-inf")))


def check_state_and_reset(name: str, initial_state: Tensor | None, state_shape: tuple[int, ...],
                          reset: Tensor | None, batch_size: int, seq_len: int) -> None:
    """The shared argument checks of the recurrent ops: ``initial_state`` of ``state_shape`` (or None)
    and ``reset`` a bool ``[B, T]`` tensor (or None); a ``ValueError`` naming what differs otherwise."""
    if initial_state is not None and tuple(initial_state.shape) != tuple(state_shape):
        raise ValueError(f"{name}: initial_state must be {list(state_shape)}, got {list(initial_state.shape)}")
    if reset is not None and (tuple(reset.shape) != (batch_size, seq_len) or reset.dtype != torch.bool):
        raise ValueError(f"{name}: reset must be a bool tensor [B, T] = {[batch_size, seq_len]}, got {reset.dtype} "
                         f"{list(reset.shape)}")
