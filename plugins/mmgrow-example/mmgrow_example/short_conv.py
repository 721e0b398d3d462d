"""A gated causal short convolution token mixer (``mixers: short_conv``).

.. math::

    u = x W_u, \\quad g = x W_g, \\quad
    c_t = \\sum_{j=0}^{K-1} w_j \\odot u_{t-j} \\, [\\mathrm{seg}_{t-j} = \\mathrm{seg}_t \\ne \\mathrm{PAD}], \\quad
    y_t = (c_t \\odot \\operatorname{silu}(g_t)) W_o

``w`` is a depthwise kernel ``[C, K]`` (one filter of length ``K`` per channel, ``w[:, 0]`` weighs
the current token). The Iverson bracket stops the convolution at packed-segment boundaries, so a
packed row gives the same outputs as its segments run separately; padding tokens see nothing and
output 0. The mixer is causal by construction (only ``u_{t-j}`` with ``j >= 0`` enters), so it
declares ``causal_only`` and refuses non-causal contexts.

**State.** The only memory is the convolution tail: the last ``K - 1`` inputs ``u`` and their
segment ids (:class:`ShortConvState`). Chunked prefill and ``T == 1`` decoding with the returned
state reproduce one full pass exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from mmgrow.protocols import PAD_SEGMENT, MixerState, SeqContext, SequenceMixer
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class ShortConvState(MixerState):
    """The convolution tail of one :class:`ShortConvMixer` layer.

    inputs:      ``[B, K-1, C]`` the last ``K - 1`` conv inputs ``u``, oldest first (zeros before
                 the first token);
    segment_ids: ``[B, K-1]`` int64 their segment ids (:data:`PAD_SEGMENT` for empty slots, so
                 nothing before the first token is ever mixed in).
    """

    inputs: Tensor
    segment_ids: Tensor


class ShortConvMixer(SequenceMixer):
    """Gated depthwise causal convolution: ``x [B, T, D] -> y [B, T, D]``.

    Args:
        dim: model width ``D`` (also the number of conv channels ``C``).
        layer_idx: index of the layer in the backbone.
        kernel_size: ``K``, how many tokens (the current one included) each output sees.
    """

    mmgrow_api = ">=1,<2"
    causal_only = True
    supports_state = True
    supports_segments = True
    supports_blocks = False
    supports_window = False
    supports_context_parallel = False

    def __init__(self, *, dim: int, layer_idx: int = 0, kernel_size: int = 4) -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1:
            raise ValueError(f"{type(self).__name__}: kernel_size must be a positive int, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.in_proj = nn.Linear(dim, dim, bias=False)
        self.gate_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        # Same scale as nn.Conv1d's default init for a depthwise filter (fan-in = K).
        bound = 1.0 / math.sqrt(kernel_size)
        self.conv_weight = nn.Parameter(torch.empty(dim, kernel_size).uniform_(-bound, bound))

    # ---------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, ctx: SeqContext, state: ShortConvState | None = None
                ) -> tuple[Tensor, ShortConvState]:
        """``x [B, T, D]`` -> ``(y [B, T, D], state after the last token)``.

        Without ``state`` the sequence starts fresh; the returned state continues it.
        """
        self.check_context(x, ctx)
        B, T, _ = x.shape
        K = self.kernel_size
        u = self.in_proj(x)  # [B, T, C]
        gate = F.silu(self.gate_proj(x))
        seg = ctx.segment_ids if ctx.segment_ids is not None else torch.zeros(B, T, dtype=torch.long, device=x.device)
        if state is None:
            state = self.init_state(B, x.device, u.dtype)
        self._check_state(state, B)

        # Prepend the tail so u_{t-j} is a plain slice for every shift j (K is small: a loop over
        # shifts is clearer than conv1d and lets each shift carry its own segment mask).
        ext_u = torch.cat([state.inputs.to(u.dtype), u], dim=1)  # [B, K-1+T, C]
        ext_seg = torch.cat([state.segment_ids.to(seg.device), seg], dim=1)  # [B, K-1+T]
        live = seg != PAD_SEGMENT  # [B, T]
        conv = torch.zeros_like(u)
        for j in range(K):
            start = K - 1 - j
            same_segment = (ext_seg[:, start:start + T] == seg) & live  # [B, T]
            conv = conv + self.conv_weight[:, j] * ext_u[:, start:start + T] * same_segment[..., None].to(u.dtype)
        y = self.out_proj(conv * gate)
        new_state = ShortConvState(inputs=ext_u[:, ext_u.shape[1] - (K - 1):],
                                   segment_ids=ext_seg[:, ext_seg.shape[1] - (K - 1):])
        return y, new_state

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> ShortConvState:
        K1 = self.kernel_size - 1
        return ShortConvState(
            inputs=torch.zeros(batch_size, K1, self.dim, device=device, dtype=dtype),
            segment_ids=torch.full((batch_size, K1), PAD_SEGMENT, dtype=torch.long, device=device),
        )

    def _check_state(self, state: ShortConvState, batch_size: int) -> None:
        expected = (batch_size, self.kernel_size - 1, self.dim)
        if not isinstance(state, ShortConvState):
            raise TypeError(f"{type(self).__name__}: expected a ShortConvState, got {type(state).__name__}")
        if tuple(state.inputs.shape) != expected or tuple(state.segment_ids.shape) != expected[:2]:
            raise ValueError(f"{type(self).__name__}: state.inputs must be {list(expected)} and state.segment_ids "
                             f"{list(expected[:2])}, got {list(state.inputs.shape)} and "
                             f"{list(state.segment_ids.shape)}")

    def state_size(self, seq_len: int) -> int:
        """``(K - 1) * C`` conv inputs, whatever the sequence length."""
        return (self.kernel_size - 1) * self.dim

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.out_proj]

    # ---------------------------------------------------------------------------------------------

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """Small settings for the conformance suite."""
        return {"kernel_size": 3}

    @classmethod
    def conformance_checks(cls) -> list[Callable[[], None]]:
        """Self-check run by ``mmgrow plugins check short_conv``: the vectorised forward equals a
        float64 per-token loop on a packed row with padding."""
        return [check_matches_per_token_loop]


def per_token_loop(mixer: ShortConvMixer, x: Tensor, segment_ids: Tensor) -> Tensor:
    """Reference: the equation above evaluated token by token (``x [B, T, D]``, ``segment_ids [B, T]``)."""
    u = mixer.in_proj(x)
    gate = F.silu(mixer.gate_proj(x))
    conv = torch.zeros_like(u)
    B, T, _ = x.shape
    for b in range(B):
        for t in range(T):
            if segment_ids[b, t] == PAD_SEGMENT:
                continue
            for j in range(min(mixer.kernel_size, t + 1)):
                if segment_ids[b, t - j] == segment_ids[b, t]:
                    conv[b, t] += mixer.conv_weight[:, j] * u[b, t - j]
    return mixer.out_proj(conv * gate)


def check_matches_per_token_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    mixer = ShortConvMixer(dim=6, kernel_size=3).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64, generator=gen)
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, PAD_SEGMENT, PAD_SEGMENT]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 0, 1, 2, 3, 4, 0, 0]])
    with torch.no_grad():
        y, _ = mixer(x, SeqContext(positions=pos, segment_ids=seg))
        ref = per_token_loop(mixer, x, seg)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
