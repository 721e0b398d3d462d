"""Gated DeltaNet (``mixers: gated_deltanet``; Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464).

Per head ``h`` with key size ``K`` and value size ``V = expand_v * K``:

.. math::

    q, k, v = \\operatorname{silu}(\\operatorname{conv}(x W_q)), \\;
              \\operatorname{silu}(\\operatorname{conv}(x W_k)), \\;
              \\operatorname{silu}(\\operatorname{conv}(x W_v)); \\quad
    q, k \\leftarrow q / \\sqrt{\\lVert q \\rVert^2 + \\epsilon}, \\; k / \\sqrt{\\lVert k \\rVert^2 + \\epsilon}

    g_t = -e^{A_{\\log}} \\operatorname{softplus}(x_t W_a + b_{dt}), \\quad
    \\beta_t = \\sigma(x_t W_b) \\; (\\times 2 \\text{ with allow\\_neg\\_eigval})

    S_t = e^{g_t} (I - \\beta_t k_t k_t^\\top) S_{t-1} + \\beta_t k_t v_t^\\top, \\quad o_t = S_t^\\top q_t / \\sqrt{K}

    y = \\big(\\operatorname{RMSNorm}_V(o) \\odot \\operatorname{silu}(x W_g)\\big) W_o

The structure follows flash-linear-attention's ``GatedDeltaNet`` layer (short convolutions without
bias, L2-normalised q and k with ``epsilon = 1e-6`` added to the squared norm as FLA's ``l2norm``
does, the Mamba-2 style decay gate, a per-head gated RMSNorm with the norm before the gate). The
recurrence is :mod:`mmgrow.ops.gated_delta`; see there for the chunkwise algorithm.

**Initialisation.** ``A_log = log U(1, 16)`` (FLA draws ``U(0, 16)``, whose log is ``-inf`` at 0;
``[1, 16]`` is Mamba-2's ``A_init_range``); ``dt_bias = softplus^{-1}(dt)`` with ``dt``
log-uniform in ``[1e-3, 1e-1]`` (floored at ``1e-4``), Mamba-2's dt init; projections
``N(0, init_std)`` through :meth:`GatedDeltaNet.init_weights`.

**Packed rows and state.** A new segment resets the recurrent state to zero (``alpha = 0`` at its
first token) and the short convolutions stop at segment boundaries, so a packed row equals its
examples run alone; padding tokens (:data:`~mmgrow.protocols.PAD_SEGMENT`) output 0.
:class:`GatedDeltaNetState` carries the recurrent matrix, the three conv tails and the segment of the
last token, so chunked prefill and ``T == 1`` decoding reproduce one pass.

**Kernels** (``kernel``): ``"chunked"`` (:func:`~mmgrow.ops.gated_delta.gated_delta_chunked`),
``"recurrent"`` (the per-token loop; also :meth:`GatedDeltaNet.reference_forward`), ``"fla"``
(flash-linear-attention on CUDA, :mod:`mmgrow.ops.gated_delta_cuda`) and ``"auto"``: FLA for
``T > 1`` on CUDA when it imports, the dtype is not float64 and it can honour the resets (packed
rows need batch 1); else the recurrent step for ``T == 1`` (cheaper than any chunked launch) and
the chunked form otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmgrow.layers.norm import GatedRMSNorm
from mmgrow.layers.short_conv import ConvTail, ShortConvolution
from mmgrow.ops import gated_delta_cuda
from mmgrow.ops.gated_delta import gated_delta_chunked, gated_delta_chunked_flops, gated_delta_recurrent
from mmgrow.ops.segments import compute_dtype, last_segment, reset_mask
from mmgrow.protocols import PAD_SEGMENT, MixerCapabilityError, MixerState, SeqContext, SequenceMixer

KERNELS = ("auto", "chunked", "recurrent", "fla")
L2_NORM_EPS = 1e-6
"""Added to ``||q||^2`` and ``||k||^2`` before the inverse square root (FLA's ``l2norm`` eps)."""


@dataclass
class GatedDeltaNetState(MixerState):
    """Decoding state of one :class:`GatedDeltaNet` layer.

    recurrent: ``[B, H, K, V]`` the matrix state ``S`` (float32 for half-precision models);
    q_tail, k_tail: conv tails, inputs ``[B, conv_kernel-1, H*K]``; v_tail: ``[B, conv_kernel-1, H*V]``;
    segment:   ``[B]`` int64 segment id of the last token seen (0 for a fresh state).
    """

    recurrent: Tensor
    q_tail: ConvTail
    k_tail: ConvTail
    v_tail: ConvTail
    segment: Tensor


def _l2_normalise(x: Tensor) -> Tensor:
    """``x [..., K] / sqrt(||x||^2 + eps)`` in at least float32."""
    c = compute_dtype(x.dtype)
    xc = x.to(c)
    return (xc * torch.rsqrt(xc.pow(2).sum(dim=-1, keepdim=True) + L2_NORM_EPS)).to(x.dtype)


class GatedDeltaNet(SequenceMixer):
    """Gated delta rule token mixer: ``x [B, T, D] -> y [B, T, D]``.

    Args:
        dim: model width ``D``; layer_idx: index in the backbone.
        num_heads: heads ``H``.
        head_dim: key size ``K`` per head (default ``0.75 * D / H``, FLA's key width, must be an int).
        expand_v: value size ``V = expand_v * K`` (must be an int).
        conv_kernel: taps of the short convolutions on q, k, v.
        allow_neg_eigval: ``beta = 2 sigmoid(.)`` in ``(0, 2)`` instead of ``(0, 1)`` (eigenvalues of
            ``I - beta k k^T`` down to -1).
        chunk_size: tokens per chunk of the chunked form.
        norm_eps: epsilon of the output RMSNorm.
        kernel: ``"auto"``, ``"chunked"``, ``"recurrent"`` or ``"fla"`` (module docstring).
    """

    causal_only = True
    supports_state = True
    supports_segments = True

    def __init__(self, *, dim: int, layer_idx: int = 0, num_heads: int = 4, head_dim: int | None = None,
                 expand_v: float = 2.0, conv_kernel: int = 4, allow_neg_eigval: bool = False,
                 chunk_size: int = 64, norm_eps: float = 1e-5, kernel: str = "auto") -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        name = type(self).__name__
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"{name}: num_heads must be a positive int, got {num_heads!r}")
        if head_dim is None:
            if (3 * dim) % (4 * num_heads):
                raise ValueError(f"{name}: the default head_dim 0.75 * dim / num_heads = {0.75 * dim / num_heads:g} "
                                 f"is not an int (dim={dim}, num_heads={num_heads}); pass head_dim explicitly")
            head_dim = 3 * dim // (4 * num_heads)
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
            raise ValueError(f"{name}: head_dim must be a positive int, got {head_dim!r}")
        value_dim = head_dim * expand_v
        if expand_v <= 0 or not float(value_dim).is_integer():
            raise ValueError(f"{name}: expand_v * head_dim must be a positive int, got {expand_v} * {head_dim} = "
                             f"{value_dim}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
        if not norm_eps > 0:
            raise ValueError(f"{name}: norm_eps must be positive, got {norm_eps!r}")
        if kernel not in KERNELS:
            raise ValueError(f"{name}: kernel must be one of {KERNELS}, got {kernel!r}")
        self.num_heads = num_heads
        self.head_k_dim = head_dim
        self.head_v_dim = int(value_dim)
        self.allow_neg_eigval = bool(allow_neg_eigval)
        self.chunk_size = chunk_size
        self.kernel = kernel
        key_width, value_width = num_heads * head_dim, num_heads * self.head_v_dim

        self.q_proj = nn.Linear(dim, key_width, bias=False)
        self.k_proj = nn.Linear(dim, key_width, bias=False)
        self.v_proj = nn.Linear(dim, value_width, bias=False)
        self.a_proj = nn.Linear(dim, num_heads, bias=False)  # decay gate input
        self.b_proj = nn.Linear(dim, num_heads, bias=False)  # beta input
        self.g_proj = nn.Linear(dim, value_width, bias=False)  # output gate
        self.o_proj = nn.Linear(value_width, dim, bias=False)
        self.q_conv = ShortConvolution(key_width, conv_kernel, bias=False, activation=True)
        self.k_conv = ShortConvolution(key_width, conv_kernel, bias=False, activation=True)
        self.v_conv = ShortConvolution(value_width, conv_kernel, bias=False, activation=True)
        self.o_norm = GatedRMSNorm(value_width, group_size=self.head_v_dim, norm_before_gate=True, eps=norm_eps)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.reset_gate_parameters()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, head_k_dim={self.head_k_dim}, head_v_dim={self.head_v_dim}, "
                f"allow_neg_eigval={self.allow_neg_eigval}, chunk_size={self.chunk_size}, kernel={self.kernel!r}")

    # ---------------------------------------------------------------------------------------------
    # Initialisation

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        """``A_log = log U(1, 16)``; ``dt_bias = softplus^{-1}(dt)``, ``dt`` log-uniform in [1e-3, 1e-1]."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # log(e^dt - 1), stable for small dt

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        """Projections ``N(0, init_std)``; conv filters, norm gain and the gates keep their structured inits."""
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj, self.o_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=init_std)
        for conv in (self.q_conv, self.k_conv, self.v_conv):
            conv.reset_parameters()
        nn.init.ones_(self.o_norm.weight)
        self.reset_gate_parameters()

    # ---------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: Tensor, ctx: SeqContext, state: GatedDeltaNetState | None = None
                ) -> tuple[Tensor, GatedDeltaNetState]:
        """``x [B, T, D]`` -> ``(y [B, T, D], state after the last token)``; without ``state`` the
        sequence starts fresh."""
        return self._mix(x, ctx, state, self.kernel)

    def reference_forward(self, x: Tensor, ctx: SeqContext, state: GatedDeltaNetState | None = None
                          ) -> tuple[Tensor, GatedDeltaNetState]:
        """The same layer with the recurrence evaluated token by token (the float64 oracle)."""
        return self._mix(x, ctx, state, "recurrent")

    def _mix(self, x: Tensor, ctx: SeqContext, state: GatedDeltaNetState | None, kernel: str
             ) -> tuple[Tensor, GatedDeltaNetState]:
        self.check_context(x, ctx)
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        if state is not None:
            self._check_state(state, B)
        seg = ctx.segment_ids
        previous = state.segment if state is not None else None
        reset = reset_mask(seg, previous, (B, T), x.device)

        q, q_tail = self.q_conv(self.q_proj(x), seg, state.q_tail if state is not None else None)
        k, k_tail = self.k_conv(self.k_proj(x), seg, state.k_tail if state is not None else None)
        v, v_tail = self.v_conv(self.v_proj(x), seg, state.v_tail if state is not None else None)
        q = _l2_normalise(q.view(B, T, H, K))
        k = _l2_normalise(k.view(B, T, H, K))
        v = v.view(B, T, H, V)

        c = compute_dtype(x.dtype)  # gates in at least float32: exp(A_log) and softplus are sensitive
        g = -torch.exp(self.A_log.to(c)) * F.softplus(self.a_proj(x).to(c) + self.dt_bias.to(c))
        beta = torch.sigmoid(self.b_proj(x).to(c))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        initial = state.recurrent if state is not None else None
        o, recurrent = self._recurrence(kernel, q, k, v, g, beta, initial, reset)

        y = self.o_proj(self.o_norm(o.reshape(B, T, H * V), self.g_proj(x)))
        if seg is not None:  # padding outputs 0, as in attention
            y = y * (seg != PAD_SEGMENT)[..., None].to(y.dtype)
        new_state = GatedDeltaNetState(recurrent, q_tail, k_tail, v_tail, last_segment(seg, previous, B, x.device))
        return y, new_state

    def _recurrence(self, kernel: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                    initial: Tensor | None, reset: Tensor) -> tuple[Tensor, Tensor]:
        T = q.shape[1]
        if kernel == "auto":
            if (T > 1 and q.dtype != torch.float64 and gated_delta_cuda.fla_available(q.device)
                    and gated_delta_cuda.fla_honours_resets(reset)):
                kernel = "fla"
            else:
                kernel = "recurrent" if T == 1 else "chunked"
        if kernel == "recurrent":
            return gated_delta_recurrent(q, k, v, g, beta, initial_state=initial, reset=reset)
        if kernel == "chunked":
            return gated_delta_chunked(q, k, v, g, beta, chunk_size=self.chunk_size, initial_state=initial,
                                       reset=reset)
        if not gated_delta_cuda.fla_available(q.device):
            raise RuntimeError(f"{type(self).__name__}: kernel='fla' needs a CUDA device and flash-linear-attention "
                               f"(pip install flash-linear-attention); x is on {q.device}")
        if not gated_delta_cuda.fla_honours_resets(reset):
            raise MixerCapabilityError(f"{type(self).__name__}: kernel='fla' honours packed rows only with batch "
                                       "size 1 (cu_seqlens); use kernel='auto' or 'chunked'")
        return gated_delta_cuda.gated_delta_fla(q, k, v, g, beta, scale=None, chunk_size=self.chunk_size,
                                                initial_state=initial, reset=reset)

    # ---------------------------------------------------------------------------------------------
    # State

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> GatedDeltaNetState:
        """Zeros in segment 0; the recurrent matrix in float32 for half-precision ``dtype``."""
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        return GatedDeltaNetState(
            recurrent=torch.zeros(batch_size, H, K, V, device=device, dtype=compute_dtype(dtype)),
            q_tail=self.q_conv.init_tail(batch_size, device, dtype),
            k_tail=self.k_conv.init_tail(batch_size, device, dtype),
            v_tail=self.v_conv.init_tail(batch_size, device, dtype),
            segment=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def _check_state(self, state: GatedDeltaNetState, batch_size: int) -> None:
        name = type(self).__name__
        if not isinstance(state, GatedDeltaNetState):
            raise TypeError(f"{name}: expected a GatedDeltaNetState, got {type(state).__name__}")
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        expected = (batch_size, H, K, V)
        if tuple(state.recurrent.shape) != expected:
            raise ValueError(f"{name}: state.recurrent must be [B, H, K, V] = {list(expected)}, got "
                             f"{list(state.recurrent.shape)}")
        for field, conv in (("q_tail", self.q_conv), ("k_tail", self.k_conv), ("v_tail", self.v_conv)):
            tail = getattr(state, field)
            want = (batch_size, conv.kernel_size - 1, conv.channels)
            if (not isinstance(tail, ConvTail) or tuple(tail.inputs.shape) != want
                    or tuple(tail.segment_ids.shape) != want[:2]):
                got = (f"inputs {list(tail.inputs.shape)}, segment_ids {list(tail.segment_ids.shape)}"
                       if isinstance(tail, ConvTail) else type(tail).__name__)
                raise ValueError(f"{name}: state.{field} must be a ConvTail with inputs {list(want)} and segment_ids "
                                 f"{list(want[:2])}, got {got}")
        if tuple(state.segment.shape) != (batch_size,):
            raise ValueError(f"{name}: state.segment must be [B] = [{batch_size}], got {list(state.segment.shape)}")

    def mixing_flops(self, seq_len: int) -> float:
        """The chunkwise gated delta rule's matmuls and triangular solve,
        :func:`~mmgrow.ops.gated_delta.gated_delta_chunked_flops`:
        ``(S'/S) H [4 L K + 2 L V + 6 K V + (L - 1)(K + V)]`` per token, whatever the kernel."""
        return gated_delta_chunked_flops(seq_len, self.num_heads, self.head_k_dim, self.head_v_dim, self.chunk_size)

    def state_size(self, seq_len: int) -> int:
        """Floating-point state elements per example: ``H K V`` plus the conv tails, whatever ``seq_len``."""
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        return H * K * V + (self.q_conv.kernel_size - 1) * H * (2 * K + V)

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.o_proj]

    # ---------------------------------------------------------------------------------------------
    # Conformance

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """Small settings: 2 heads of 8 key / 16 value channels, chunks of 4 (10 tokens cross chunks)."""
        return {"num_heads": 2, "head_dim": 8, "chunk_size": 4}

    @classmethod
    def conformance_extremes(cls) -> dict[str, Callable[[GatedDeltaNet], None]]:
        """Parameter settings at the gates' extremes (applied in place, under no_grad).

        * ``alpha=1``: ``A_log = -1e4``, so ``exp(A_log)`` underflows to exactly 0 (float32 and 64) and
          ``g = 0`` with finite gradients (``A_log = -inf`` would give NaN gradients);
        * ``alpha->0``: ``exp(A_log) = 1e4`` and ``dt_bias = 10``: ``g`` below ``-1e4``, ``alpha`` underflows;
        * ``beta saturated``: ``b_proj`` weights x 1e4: ``beta`` is 0 or 1 (0 or 2 with
          ``beta saturated, neg eigval``, which also turns ``allow_neg_eigval`` on). ``b_proj`` has no
          bias, so the sign of ``x W_b`` (not a parameter) picks which end each token gets: exactly
          ``beta = 0`` or ``beta = 2`` on every token is not reachable through the parameters and is
          covered by the op tests instead.
        """
        def alpha_one(m: GatedDeltaNet) -> None:
            m.A_log.fill_(-1e4)

        def alpha_zero(m: GatedDeltaNet) -> None:
            m.A_log.fill_(math.log(1e4))
            m.dt_bias.fill_(10.0)

        def beta_saturated(m: GatedDeltaNet) -> None:
            m.b_proj.weight.mul_(1e4)

        def beta_saturated_neg(m: GatedDeltaNet) -> None:
            m.allow_neg_eigval = True
            m.b_proj.weight.mul_(1e4)

        return {"alpha=1": alpha_one, "alpha->0": alpha_zero, "beta saturated (0 or 1)": beta_saturated,
                "beta saturated with negative eigenvalues (0 or 2)": beta_saturated_neg}
