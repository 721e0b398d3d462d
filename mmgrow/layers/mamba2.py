"""The Mamba-2 mixer (``mixers: mamba2``): Dao & Gu, "Transformers are SSMs", arXiv 2405.21060.

.. math::

    [z, u, B, C, \\delta] = x W_{in}, \\qquad [x', B', C'] = \\operatorname{silu}(\\operatorname{conv}_K([u, B, C]))

    \\Delta_t = \\operatorname{clamp}(\\operatorname{softplus}(\\delta_t + b_\\Delta), \\text{dt\\_limit}), \\quad
    A = -\\exp(A_{\\log}), \\quad a_t = \\exp(\\Delta_t A)

    S_t = a_t S_{t-1} + \\Delta_t B'_t x'^{\\top}_t, \\qquad y_t = S_t^\\top C'_t + D \\odot x'_t

    \\text{out} = \\operatorname{RMSNorm}_g(y \\odot \\operatorname{silu}(z)) W_{out}

per head (``H = expand * dim / headdim`` heads of ``P = headdim`` channels, state ``S [N, P]`` with
``N = d_state``); ``B`` and ``C`` have ``ngroups`` groups shared by ``H / ngroups`` heads each. The
short convolution (:class:`~mmgrow.layers.short_conv.ShortConvolution`, kernel ``d_conv``, bias, SiLU)
runs over the ``x‖B‖C`` channels in Mamba's order, and the gated RMSNorm normalises each of the
``ngroups`` channel groups on its own. The SSD maths lives in :mod:`mmgrow.ops.ssd`.

**Kernels** (``kernel``): ``"chunked"`` (:func:`~mmgrow.ops.ssd.ssd_chunked`, pure PyTorch),
``"recurrent"`` (:func:`~mmgrow.ops.ssd.ssd_recurrent`, token by token), ``"mamba_ssm"`` (the
fused Triton kernel through :mod:`mmgrow.ops.ssd_cuda`; CUDA and mamba-ssm required), or ``"auto"``:
mamba-ssm on CUDA when it imports (it honours every reset, see :mod:`mmgrow.ops.ssd_cuda`) and the
input is not float64, else chunked for ``T > 1`` and the recurrent step for ``T == 1`` (decoding).
The default ``chunk_size`` is 64 rather than Mamba's 256: the chunked PyTorch form is about twice as
fast with 64 on CPU (T = 4096, 8 heads of 64, N = 64: 0.20 s vs 0.44 s on 2 cores); the Triton kernel
is fine with either.

**Packed rows and state.** A token whose segment differs from the previous token's (or, for the
first token, from the carried state's ``segment``) starts from a zero SSM state and an empty conv
window, so a packed row equals its segments run alone; chunked prefill and ``T == 1`` decoding with
the returned :class:`Mamba2State` reproduce one pass. Padding (``PAD_SEGMENT``) is a segment of its
own: its outputs are finite and ignored, and it never leaks into real tokens.

**Initialisation** (Mamba-2's): ``dt_bias`` = inverse softplus of ``dt ~ logU[dt_min, dt_max]``
floored at ``dt_init_floor``; ``A_log = log U[A_init_range]``; ``D = 1``; these three are marked
``_no_weight_decay = True`` (being 1-D they are also outside the decay group of
``mmgrow.training.module``, which decays only ``dim >= 2`` weights). :meth:`Mamba2.init_weights`
sets both projections to ``N(0, init_std)`` with zero biases; the output projection is *not* scaled
down by depth (the layer does not know the depth; the model treats every residual output alike).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmgrow.layers.norm import GatedRMSNorm
from mmgrow.layers.short_conv import ConvTail, ShortConvolution
from mmgrow.ops import ssd_cuda
from mmgrow.ops.segments import compute_dtype, last_segment, reset_mask
from mmgrow.ops.ssd import ssd_chunked, ssd_chunked_flops, ssd_recurrent
from mmgrow.protocols import MixerCapabilityError, MixerState, SeqContext, SequenceMixer

KERNELS = ("auto", "chunked", "recurrent", "mamba_ssm")

SSDFunction = Callable[..., tuple[Tensor, Tensor]]


@dataclass
class Mamba2State(MixerState):
    """The decoding state of one :class:`Mamba2` layer.

    ssm:     ``[B, H, N, P]`` the SSM state (key side ``N = d_state`` first, value side ``P = headdim``);
    conv:    the short convolution's :class:`~mmgrow.layers.short_conv.ConvTail` (``[B, K-1, C]``
             inputs and their segment ids, ``C = expand * dim + 2 * ngroups * d_state``);
    segment: ``[B]`` int64, the segment of the last token seen (0 for a fresh state).
    """

    ssm: Tensor
    conv: ConvTail
    segment: Tensor


class Mamba2(SequenceMixer):
    """Mamba-2 SSD mixer: ``x [B, T, D] -> y [B, T, D]`` (module docstring for the equations).

    Args:
        dim: model width ``D``; layer_idx: index of the layer in the backbone.
        d_state: ``N``, the state size per head (key side).
        d_conv: ``K``, the short convolution's kernel size.
        expand: ``d_inner = expand * dim`` (must be an integer).
        headdim: ``P``, channels per head; must divide ``d_inner``.
        ngroups: groups of ``B``/``C`` (and of the gated norm); must divide the number of heads.
        chunk_size: ``Q`` of the chunked algorithm (64: faster than 256 on CPU, see above).
        dt_min, dt_max, dt_init_floor: the log-uniform initial range of ``dt`` and its floor.
        dt_limit: ``(low, high)`` clamp of ``dt`` after the softplus; None = none (Mamba's ``(0, inf)``,
            spelled None so that recipes and saved configs hold no infinity).
        A_init_range: ``(low, high)`` of the uniform init of ``-A``; ``0 < low <= high``.
        conv_bias: bias in the short convolution; bias: biases in ``in_proj`` / ``out_proj``.
        norm_eps: epsilon of the gated RMSNorm.
        kernel: ``"auto"``, ``"chunked"``, ``"recurrent"`` or ``"mamba_ssm"`` (module docstring).
    """

    mmgrow_api = ">=1,<2"
    causal_only = True
    supports_state = True
    supports_segments = True

    def __init__(self, *, dim: int, layer_idx: int = 0, d_state: int = 128, d_conv: int = 4, expand: float = 2,
                 headdim: int = 64, ngroups: int = 1, chunk_size: int = 64, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_init_floor: float = 1e-4, dt_limit: Sequence[float] | None = None,
                 A_init_range: Sequence[float] = (1.0, 16.0), conv_bias: bool = True, bias: bool = False,
                 norm_eps: float = 1e-5, kernel: str = "auto") -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        name = type(self).__name__
        for arg, value in (("d_state", d_state), ("d_conv", d_conv), ("headdim", headdim), ("ngroups", ngroups),
                           ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand <= 0 \
                or not float(expand * dim).is_integer():
            raise ValueError(f"{name}: expand * dim must be a positive integer, got expand={expand!r}, dim={dim}")
        d_inner = int(expand * dim)
        if d_inner % headdim:
            raise ValueError(f"{name}: d_inner = expand * dim = {d_inner} is not divisible by headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"{name}: the number of heads ({nheads} = {d_inner} / headdim {headdim}) is not "
                             f"divisible by ngroups={ngroups}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"{name}: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init_floor < 0:
            raise ValueError(f"{name}: dt_init_floor must be >= 0, got {dt_init_floor}")
        dt_limit = (0.0, math.inf) if dt_limit is None else tuple(float(v) for v in dt_limit)
        if len(dt_limit) != 2 or not 0.0 <= dt_limit[0] < dt_limit[1]:
            raise ValueError(f"{name}: dt_limit must be (low, high) with 0 <= low < high, got {dt_limit}")
        A_init_range = tuple(float(v) for v in A_init_range)
        if len(A_init_range) != 2 or not 0.0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"{name}: A_init_range must be (low, high) with 0 < low <= high, got {A_init_range}")
        if not norm_eps > 0:
            raise ValueError(f"{name}: norm_eps must be positive, got {norm_eps}")
        if kernel not in KERNELS:
            raise ValueError(f"{name}: kernel must be one of {KERNELS}, got {kernel!r}")

        self.d_state, self.d_conv, self.headdim, self.ngroups = d_state, d_conv, headdim, ngroups
        self.d_inner, self.nheads, self.chunk_size = d_inner, nheads, chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_limit, self.A_init_range = dt_limit, A_init_range
        self.kernel = kernel
        self.conv_channels = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(dim, d_inner + self.conv_channels + nheads, bias=bias)  # z, x, B, C, dt
        self.conv = ShortConvolution(self.conv_channels, d_conv, bias=conv_bias, activation=True)
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // ngroups, norm_before_gate=False, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self._init_ssm_parameters()

    # ---------------------------------------------------------------------------------------------
    # Initialisation

    @torch.no_grad()
    def _init_ssm_parameters(self) -> None:
        """Mamba-2's init of ``dt_bias``, ``A_log`` and ``D`` (module docstring)."""
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.nheads) * (hi - lo) + lo).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*self.A_init_range)))
        self.D.fill_(1.0)

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        """Projections ~ ``N(0, init_std)`` with zero biases (``out_proj`` not depth-scaled), the conv's
        default init, norm gain 1, and the structured SSM parameters."""
        for proj in (self.in_proj, self.out_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=init_std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.conv.reset_parameters()
        nn.init.ones_(self.norm.weight)
        self._init_ssm_parameters()

    # ---------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: Tensor, ctx: SeqContext, state: Mamba2State | None = None) -> tuple[Tensor, Mamba2State]:
        """``x [B, T, D]`` -> ``(y [B, T, D], state after the last token)``; without ``state`` the rows
        start fresh. Runs the SSD on the kernel :meth:`kernel_for` picks."""
        self.check_context(x, ctx)
        return self._mix(x, ctx, state, self._ssd_function(self.kernel_for(x)))

    def reference_forward(self, x: Tensor, ctx: SeqContext, state: Mamba2State | None = None
                          ) -> tuple[Tensor, Mamba2State]:
        """:meth:`forward` with the SSD evaluated token by token (:func:`~mmgrow.ops.ssd.ssd_recurrent`):
        the float64 oracle of the conformance suite."""
        self.check_context(x, ctx)
        return self._mix(x, ctx, state, ssd_recurrent)

    def kernel_for(self, x: Tensor) -> str:
        """The SSD kernel a call on ``x [B, T, D]`` runs (see the module docstring)."""
        T = x.shape[1]
        if self.kernel == "mamba_ssm":
            if x.dtype == torch.float64 or not ssd_cuda.mamba_ssm_available(x.device):
                raise MixerCapabilityError(f"{type(self).__name__} (layer {self.layer_idx}): kernel='mamba_ssm' "
                                           "needs a CUDA device, a non-float64 input and an importable mamba-ssm; "
                                           "use kernel='auto'")
            return "mamba_ssm" if T > 0 else "chunked"
        if self.kernel != "auto":
            return self.kernel
        if T > 1 and x.dtype != torch.float64 and ssd_cuda.mamba_ssm_available(x.device):
            return "mamba_ssm"
        return "chunked" if T > 1 else "recurrent"

    def _ssd_function(self, kernel: str) -> SSDFunction:
        if kernel == "chunked":
            return partial(ssd_chunked, chunk_size=self.chunk_size)
        if kernel == "mamba_ssm":
            return partial(ssd_cuda.ssd_mamba_ssm, chunk_size=self.chunk_size)
        return ssd_recurrent

    def _mix(self, x: Tensor, ctx: SeqContext, state: Mamba2State | None, ssd: SSDFunction
             ) -> tuple[Tensor, Mamba2State]:
        Bt, T, _ = x.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        if state is not None:
            self._check_state(state, x)
        previous = state.segment if state is not None else None
        segments = ctx.segment_ids
        if segments is None and state is not None:  # an unpacked row is segment 0, for the conv as for the SSM
            segments = torch.zeros(Bt, T, dtype=torch.long, device=x.device)
        # Without a state or segments nothing can reset (the state starts at zero anyway).
        reset = None if segments is None else reset_mask(segments, previous, (Bt, T), x.device)

        z, xbc, dt_raw = self.in_proj(x).split([self.d_inner, self.conv_channels, H], dim=-1)
        xbc, tail = self.conv(xbc, segments, state.conv if state is not None else None)
        xs, B, C = xbc.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.reshape(Bt, T, H, P)
        compute = compute_dtype(x.dtype)
        dt = F.softplus(dt_raw.to(compute) + self.dt_bias.to(compute))
        if self.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*self.dt_limit)
        A = -torch.exp(self.A_log.to(compute))
        y, ssm = ssd(xs, dt, A, B.reshape(Bt, T, G, N), C.reshape(Bt, T, G, N),
                     initial_state=state.ssm if state is not None else None, reset=reset)
        y = y + self.D.to(y.dtype)[:, None] * xs
        out = self.out_proj(self.norm(y.reshape(Bt, T, self.d_inner), z))
        return out, Mamba2State(ssm=ssm, conv=tail, segment=last_segment(ctx.segment_ids, previous, Bt, x.device))

    # ---------------------------------------------------------------------------------------------
    # State

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> Mamba2State:
        """Zero SSM state and conv tail, in segment 0 (so a state filled in by hand continues a row)."""
        return Mamba2State(
            ssm=torch.zeros(batch_size, self.nheads, self.d_state, self.headdim, device=device, dtype=dtype),
            conv=self.conv.init_tail(batch_size, device, dtype),
            segment=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def _check_state(self, state: Mamba2State, x: Tensor) -> None:
        name = f"{type(self).__name__} (layer {self.layer_idx})"
        if not isinstance(state, Mamba2State) or not isinstance(getattr(state, "conv", None), ConvTail):
            raise TypeError(f"{name}: expected a Mamba2State (with a ConvTail), got {type(state).__name__}")
        Bt, K1 = x.shape[0], self.d_conv - 1
        expected = {"ssm": (Bt, self.nheads, self.d_state, self.headdim), "conv.inputs": (Bt, K1, self.conv_channels),
                    "conv.segment_ids": (Bt, K1), "segment": (Bt,)}
        actual = {"ssm": state.ssm, "conv.inputs": state.conv.inputs, "conv.segment_ids": state.conv.segment_ids,
                  "segment": state.segment}
        for field, shape in expected.items():
            tensor = actual[field]
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
                got = list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"{name}: state.{field} must be {list(shape)}, got {got}; build it with "
                                 "init_state(batch_size, ...)")
            if tensor.device != x.device:
                raise ValueError(f"{name}: state.{field} is on {tensor.device} but x is on {x.device}")

    def mixing_flops(self, seq_len: int) -> float:
        """The chunked SSD's matmuls, :func:`~mmgrow.ops.ssd.ssd_chunked_flops`:
        ``(S'/S) [H (2 Q P + 4 N P) + G 2 Q N]`` per token (``Q = min(chunk_size, S)``); the algorithm's count
        whatever the kernel (the Triton kernel runs the same chunked algorithm)."""
        return ssd_chunked_flops(seq_len, self.nheads, self.headdim, self.d_state, self.ngroups, self.chunk_size)

    def state_size(self, seq_len: int) -> int:
        """``H * N * P`` SSM entries plus the ``(K - 1) * C`` conv tail, whatever the length."""
        return self.nheads * self.d_state * self.headdim + (self.d_conv - 1) * self.conv_channels

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.out_proj]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, layer_idx={self.layer_idx}, d_inner={self.d_inner}, heads={self.nheads}, "
                f"headdim={self.headdim}, d_state={self.d_state}, ngroups={self.ngroups}, d_conv={self.d_conv}, "
                f"chunk_size={self.chunk_size}, kernel={self.kernel!r}")

    # ---------------------------------------------------------------------------------------------
    # Conformance

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """Small settings: 4 heads of 16 in 2 groups (dim 32), N = 8, chunks of 4 (10 tokens cross chunks)."""
        return {"d_state": 8, "headdim": 16, "expand": 2, "ngroups": 2, "chunk_size": 4}

    @classmethod
    def conformance_extremes(cls) -> dict[str, Callable[[Mamba2], None]]:
        """Gate extremes: decay exactly 1, decay underflowing to 0, and vanishing step sizes."""

        @torch.no_grad()
        def alpha_one(m: Mamba2) -> None:  # A = -exp(-1e4) = -0.0, so a = exp(dt * A) = 1 exactly
            m.A_log.fill_(-1e4)

        @torch.no_grad()
        def alpha_zero(m: Mamba2) -> None:  # dt ~ 20, A = -1e3: dt * A ~ -2e4, exp underflows to 0
            m.A_log.fill_(math.log(1e3))
            m.dt_bias.fill_(20.0)

        @torch.no_grad()
        def dt_tiny(m: Mamba2) -> None:  # dt = softplus(~-30) ~ 1e-13: decay ~ 1, writes ~ 0
            m.dt_bias.fill_(-30.0)

        return {"alpha=1": alpha_one, "alpha->0": alpha_zero, "dt tiny": dt_tiny}
