"""LWM's frame serialisation of discrete video codes (arXiv 2402.08268, Sec. 3), shared by the video codecs.

A video of ``F`` frames with ``n`` codes each (ids ``0..num_codes-1``) becomes one token sequence:
each frame's codes, ``eof`` after every frame, ``eov`` instead of the last ``eof``, and the whole
video introduced by ``bov`` (LWM's ``<vision>``)::

    bov  c(0,0) .. c(0,n-1) eof  c(1,0) .. c(1,n-1) eof  ...  c(F-1,0) .. c(F-1,n-1) eov

``N = 1 + F * (n + 1)`` tokens. The codec decides what a code is (a palette colour for
:class:`~mmgrow.tokenizers.pixels.PixelTokenizer`, a codebook entry for
:class:`~mmgrow.tokenizers.vq.VQVideoTokenizer`) and which ids the specials get; the layout only
moves ids between ``[F, n]`` codes and ``[N]`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmgrow.protocols import NO_BLOCK, length_through_first

SPECIALS: tuple[str, ...] = ("bov", "eof", "eov")
"""Special tokens of the layout, in the id order the codecs give them after their codes."""


@dataclass(frozen=True)
class FrameLayout:
    """``[F, n]`` code ids <-> ``[1 + F*(n+1)]`` int64 tokens (layout in the module doc).

    Args:
        codes_per_frame: ``n``, codes of one frame.
        num_codes: ids ``0..num_codes-1`` are codes; any other id in a frame decodes as code 0.
        bov, eof, eov: ids of the specials (outside ``0..num_codes-1``).
    """

    codes_per_frame: int
    num_codes: int
    bov: int
    eof: int
    eov: int

    @property
    def tokens_per_frame(self) -> int:
        """``n`` codes plus the frame's ``eof`` / ``eov``."""
        return self.codes_per_frame + 1

    def serialize(self, ids: Tensor) -> Tensor:
        """``[F, n]`` int code ids (``F >= 1``) -> ``[1 + F*(n+1)]`` int64 tokens."""
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] != self.codes_per_frame:
            raise ValueError(f"FrameLayout.serialize: expected code ids [F >= 1, {self.codes_per_frame}], "
                             f"got shape {tuple(ids.shape)}")
        ends = torch.full((ids.shape[0], 1), self.eof, dtype=torch.long, device=ids.device)
        ends[-1] = self.eov
        body = torch.cat([ids.long(), ends], dim=1).reshape(-1)
        return torch.cat([torch.tensor([self.bov], dtype=torch.long, device=ids.device), body])

    def frames(self, tokens: Tensor | Sequence[int], where: str = "FrameLayout.frames") -> Tensor:
        """``[N]`` tokens -> ``[F, n]`` int64 codes on the CPU (``[0, n]`` when there is no frame).

        Robust to sampled output: a leading ``bov`` is optional; frames end at ``eof`` / ``eov``
        and decoding stops at the first ``eov``; trailing codes without an end token form a last
        frame; a frame with fewer than ``n`` codes is padded with code 0, extra codes are dropped;
        a non-code id (a stray ``bov``, an out-of-range id) becomes code 0.
        ``frames(serialize(ids)) == ids`` for valid codes. ``where`` names the caller in errors.
        """
        ids = token_ids(tokens, where)
        if ids.numel() and int(ids[0]) == self.bov:
            ids = ids[1:]
        stop = (ids == self.eov).nonzero()
        if stop.numel():
            ids = ids[: int(stop[0]) + 1]
        frames: list[Tensor] = []
        start = 0
        for end in ((ids == self.eof) | (ids == self.eov)).nonzero().flatten().tolist() + [ids.numel()]:
            codes = ids[start:end]
            if end < ids.numel() or codes.numel():  # a frame closed by eof/eov, or a non-empty tail
                frames.append(self._frame(codes))
            start = end + 1
        if not frames:
            return torch.zeros(0, self.codes_per_frame, dtype=torch.long)
        return torch.stack(frames)

    def _frame(self, codes: Tensor) -> Tensor:
        """Up to ``n`` ids -> ``[n]`` codes (non-code and missing ids -> code 0)."""
        out = torch.zeros(self.codes_per_frame, dtype=torch.long)
        codes = codes[: self.codes_per_frame]
        valid = (codes >= 0) & (codes < self.num_codes)
        out[: codes.numel()] = torch.where(valid, codes, torch.zeros_like(codes))
        return out

    def block_ids(self, tokens: Tensor | Sequence[int], where: str = "FrameLayout.block_ids") -> Tensor:
        """``[N]`` tokens -> ``[N]`` int64: frame index of each token (its ``eof`` / ``eov`` included),
        :data:`~mmgrow.protocols.NO_BLOCK` for ``bov`` and for anything after the first ``eov``.
        Tokens of one frame attend bidirectionally. ``where`` names the caller in errors."""
        ids = token_ids(tokens, where)
        is_eov = (ids == self.eov).long()
        is_end = ((ids == self.eof) | (ids == self.eov)).long()
        frame = torch.cumsum(is_end, 0) - is_end  # ends seen strictly before each token
        after_eov = (torch.cumsum(is_eov, 0) - is_eov) > 0
        return torch.where((ids == self.bov) | after_eov, torch.full_like(frame, NO_BLOCK), frame)

    def generation_prefix(self) -> Tensor:
        """``[1]`` int64: a generated video starts after ``bov``."""
        return torch.tensor([self.bov], dtype=torch.long)

    def generation_length(self, tokens: Tensor) -> int:
        """``[N]`` sampled tokens -> their video's length: up to and including the first ``eov``
        (all ``N`` when there is none)."""
        return length_through_first(tokens, self.eov)

    def generation_constraint(self, frames: int, vocab_size: int, what: str | None = None) -> Callable[[int], Tensor]:
        """Allowed next ids while generating ``frames`` frames after ``bov``.

        ``allowed(k) -> bool [vocab_size]`` for step ``k = 0 .. frames*(n+1)-1``: the codes at code
        positions, only ``eof`` at the end of frames ``0..frames-2``, only ``eov`` at the very end.
        ``what`` describes the video in the out-of-range error (default ``"<frames>-frame"``; a
        codec that merges raw frames names its raw frame count there).
        """
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"FrameLayout.generation_constraint: frames must be a positive int, got {frames!r}")
        what = f"{frames}-frame" if what is None else what
        codes = torch.zeros(vocab_size, dtype=torch.bool)
        codes[: self.num_codes] = True
        only_eof = torch.zeros(vocab_size, dtype=torch.bool)
        only_eof[self.eof] = True
        only_eov = torch.zeros(vocab_size, dtype=torch.bool)
        only_eov[self.eov] = True
        tpf, total = self.tokens_per_frame, frames * self.tokens_per_frame

        def allowed(step: int) -> Tensor:
            if not 0 <= step < total:
                raise IndexError(f"generation step {step} is outside a {what} video (steps 0..{total - 1} after bov)")
            if step % tpf < self.codes_per_frame:
                return codes.clone()
            return (only_eov if step == total - 1 else only_eof).clone()

        return allowed


def token_ids(tokens: Any, where: str) -> Tensor:
    """A 1-D int tensor or list of ints -> ``[N]`` int64 CPU tensor, with an error named by ``where``."""
    if isinstance(tokens, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in tokens):
            raise TypeError(f"{where}: expected a sequence of ints")
        return torch.tensor(tokens, dtype=torch.long)
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{where}: expected a 1-D int tensor or a list of ints, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"{where}: expected a 1-D tensor of tokens [N], got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{where}: expected integer tokens, got dtype {tokens.dtype}")
    return tokens.long().cpu()
