"""Test-time-training memory layers TTT-Linear and TTT-MLP (``memory: ttt_linear`` / ``ttt_mlp``).

The hidden state is the weights ``W`` of a per-head inner model (linear, or a 2-layer GELU MLP),
trained while the sequence is read by mini-batch gradient descent on a reconstruction loss
(:mod:`mmgrow.ops.ttt_inner`; dual form :mod:`mmgrow.ops.ttt_dual`, primal form and per-token
reference :mod:`mmgrow.ops.ttt_primal`, mini-batch alignment :mod:`mmgrow.ops.ttt_grid`):

.. math::

    q, k, v = x W_Q, x W_K, x W_V \\ (\\text{per head}); \\quad
    \\mathrm{lr}_s = \\mathrm{base\\_lr} \\cdot \\sigma(w_h \\cdot x_s + c_h) / d; \\quad
    \\ell_s(W) = \\tfrac12 \\lVert \\mathrm{LN}(f(k_s; W)) - y_s \\rVert^2

    W_t = W_i - \\mathrm{tok}_t \\sum_{s \\in M(t)} \\mathrm{lr}_s \\nabla \\ell_s(W_i), \\quad
    z_t = q_t + \\mathrm{LN}(f(q_t; W_t)), \\quad
    \\text{out} = \\mathrm{LayerNorm}(z) \\, W_O

where ``W_i`` are the weights at the end of the previous mini-batch (``b`` tokens, aligned by
position), ``W_0`` is learned, and the next mini-batch starts from its last token's ``W_t``.

**Flavours** (``flavour=`` picks a preset; every flag can be overridden, ``None`` = from the preset):

=====================  =============================================  ==========================================
flag                   ``"lm"``: Sun et al. 2024, arXiv 2407.04620     ``"video"``: Dalal et al. 2025, arXiv 2504.05298
=====================  =============================================  ==========================================
causal_in_minibatch    True: ``M(t) = {s <= t}`` (tril)                False: ``M(t)`` = the whole mini-batch
token_scale            ``"inverse_position"``: tok = max(0, 1/t' + d)  ``"uniform"``: tok = 1/b
rope                   True: RoPE on q, k at ``positions % b``          False (3-D RoPE lives outside the layer)
qk_l2norm              False                                          True: q, k L2-normalised per head
normalized_target      False: ``y = v - k``                           True: ``y = LN_affine(v - k)`` (below)
proj_bias              False                                          True (q, k, v, o projections)
mini_batch_size        16                                             16 (Linear) / 64 (MLP)
base_lr                1.0 (Linear) / 0.1 (MLP)                       1.0 (Linear) / 0.1 (MLP)
=====================  =============================================  ==========================================

``t'`` is the 1-based slot ``positions % b + 1`` and ``d`` (``token_offsets [b]``, init 0) is learned.
Our reading of ttt-video-dit's normalised target (``ln_reconstruction_target``): the op receives
``LN_affine(v - k) + k`` and subtracts ``k`` again, so the effective target is
``gamma * (u - mean u) / (std u + 1e-8) + beta`` with ``u = v - k`` (after the L2 norm), ``std`` the
unbiased standard deviation, and ``gamma``, ``beta`` the inner LayerNorm's own parameters (shared, not
separate ones). The inner LayerNorm keeps ``eps = 1e-6`` in both flavours.

**Causality.** The LM flavour is causal and refuses ``ctx.mask.causal=False``. The video flavour is
not causal inside a mini-batch: an instance refuses causal contexts (``causal_only`` is False and
:meth:`check_context` raises on ``causal=True``), and a carried state may only be continued at a
mini-batch boundary (a ``ValueError`` otherwise). Unlike ttt-video-dit (which requires ``T`` to be a
multiple of ``b``), a remainder is allowed: it is a shorter mini-batch, still with the scale ``1/b``.

**State** (:class:`TTTState`): ``W_i`` per inner layer, the accumulated ``sum lr_s grad l_s`` of a
partial mini-batch, the next expected position and the segment. Packed rows restart from ``W_0`` at
every segment, and wherever the positions do not follow on by one (a new example whose segment id
was not given, e.g. the right padding of a single-example row, for which objectives drop segment ids).

**RoPE pairing** (``rope_pairing``, LM flavour): ``"half"`` (default; rotates coordinates
``(i, i + d/2)`` of each head, every existing mmgrow checkpoint) or ``"interleaved"`` (rotates
``(2i, 2i + 1)``, the layout of ttt-lm-pytorch / ttt-lm-jax checkpoints). With ``"interleaved"`` their
weights load by renaming and reshaping only (``learnable_ttt_lr_weight [H, 1, D]`` -> ``lr_gate_weight
[H, D]``, ``learnable_ttt_lr_bias [H, 1]`` -> ``lr_gate_bias [H]``, ``learnable_token_idx`` ->
``token_offsets``, ``b1 [H, 1, d]`` -> ``b1 [H, d]``; q/k/v/o, ``W1``, ``ttt_norm_*``, ``post_norm``
unchanged). To move such weights to ``"half"`` instead, the *whole* per-head coordinate system must be
permuted by ``P: 2m -> m, 2m + 1 -> m + d/2`` (rows of q/k/v, columns of o_proj, rows and columns of
``W1``/``W2``'s ``d``-sided axes, ``b``, ``ttt_norm_*``, ``post_norm``): the target ``v - k`` couples
the coordinates of ``k`` and ``v``, so permuting q and k alone is not enough.

**Kernels**: ``"dual"`` (prefill/training), ``"primal"`` (explicit per-token weights) or ``"auto"``:
primal for ``T == 1`` decoding, dual otherwise; the dual form also continues a partial mini-batch of a
carried state, so chunked prefill never needs the primal form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmgrow.layers.rope import PAIRINGS, RotaryEmbedding
from mmgrow.ops.segments import last_segment, reset_mask
from mmgrow.ops.ttt_dual import ttt_dual, ttt_dual_flops
from mmgrow.ops.ttt_inner import InnerCarry, InnerParams, inner_shapes, normalized_target
from mmgrow.ops.ttt_primal import ttt_primal, ttt_reference
from mmgrow.protocols import PAD_SEGMENT, MemoryLayer, MixerCapabilityError, MixerState, SeqContext

KERNELS = ("auto", "dual", "primal")
TOKEN_SCALES = ("inverse_position", "uniform")
FLAVOURS: dict[str, dict[str, Any]] = {
    "lm": {"causal_in_minibatch": True, "token_scale": "inverse_position", "rope": True, "qk_l2norm": False,
           "normalized_target": False, "proj_bias": False},
    "video": {"causal_in_minibatch": False, "token_scale": "uniform", "rope": False, "qk_l2norm": True,
              "normalized_target": True, "proj_bias": True},
}
INIT_STD_INNER = 0.02  # W0 and the learning-rate gate, as in both TTT codebases


@dataclass
class TTTState(MixerState):
    """Decoding state of one TTT layer (``l`` = inner layer 1 or 2; layer 2 only for TTT-MLP).

    W{l}:     ``[B, H, d_in, d_out]`` weights ``W_i`` of the current mini-batch;
    b{l}:     ``[B, H, d_out]`` biases;
    acc_W{l}, acc_b{l}: ``sum_s lr_s grad l_s(W_i)`` over the tokens of the current mini-batch seen so
              far (zero at a mini-batch boundary, where ``W_{i+1}`` has been committed);
    next_position: ``[B]`` int64, position the next token of the segment must have (-1: any, nothing
              seen); ``next_position % b`` is the slot where the current mini-batch continues;
    segment:  ``[B]`` int64, segment of the last token seen.
    """

    W1: Tensor
    b1: Tensor
    acc_W1: Tensor
    acc_b1: Tensor
    next_position: Tensor
    segment: Tensor
    W2: Tensor | None = None
    b2: Tensor | None = None
    acc_W2: Tensor | None = None
    acc_b2: Tensor | None = None

    def carry(self, num_layers: int, dtype: torch.dtype) -> InnerCarry:
        def get(prefix: str) -> list[Tensor]:
            return [getattr(self, f"{prefix}{i + 1}").to(dtype) for i in range(num_layers)]

        return InnerCarry(get("W"), get("b"), get("acc_W"), get("acc_b"))

    @classmethod
    def from_carry(cls, carry: InnerCarry, next_position: Tensor, segment: Tensor) -> TTTState:
        kw: dict[str, Tensor] = {}
        for i in range(len(carry.weights)):
            kw |= {f"W{i + 1}": carry.weights[i], f"b{i + 1}": carry.biases[i],
                   f"acc_W{i + 1}": carry.acc_weights[i], f"acc_b{i + 1}": carry.acc_biases[i]}
        return cls(next_position=next_position, segment=segment, **kw)


class TTTLayer(MemoryLayer):
    """Shared body of :class:`TTTLinear` and :class:`TTTMLP`: ``x [B, T, D] -> y [B, T, D]``.

    Args:
        dim: model width ``D``; layer_idx: index in the backbone.
        num_heads: ``H``; the head dimension is ``d = D / H`` (even when RoPE is on).
        flavour: ``"lm"`` or ``"video"`` preset (see the module docstring); the flags below override it.
        mini_batch_size, base_lr, causal_in_minibatch, token_scale, rope, qk_l2norm, normalized_target,
        proj_bias: see the module docstring (``None`` = from the flavour and the inner model).
        rope_theta: RoPE base (LM flavour).
        rope_pairing: ``"half"`` or ``"interleaved"`` (see the module docstring).
        kernel: ``"auto"``, ``"dual"`` or ``"primal"``.
    """

    inner_kind: ClassVar[str] = "linear"
    default_mini_batch_size: ClassVar[dict[str, int]] = {"lm": 16, "video": 16}
    default_base_lr: ClassVar[dict[str, float]] = {"lm": 1.0, "video": 1.0}
    causal_only = True
    supports_state = True
    supports_segments = True

    def __init__(self, *, dim: int, layer_idx: int = 0, num_heads: int = 4, flavour: str = "lm",
                 mini_batch_size: int | None = None, base_lr: float | None = None,
                 causal_in_minibatch: bool | None = None, token_scale: str | None = None, rope: bool | None = None,
                 qk_l2norm: bool | None = None, normalized_target: bool | None = None, proj_bias: bool | None = None,
                 rope_theta: float = 10000.0, rope_pairing: str = "half", kernel: str = "auto") -> None:
        super().__init__(dim=dim, layer_idx=layer_idx)
        name = type(self).__name__
        if flavour not in FLAVOURS:
            raise ValueError(f"{name}: flavour must be one of {tuple(FLAVOURS)}, got {flavour!r}")
        if kernel not in KERNELS:
            raise ValueError(f"{name}: kernel must be one of {KERNELS}, got {kernel!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"{name}: num_heads must be a positive divisor of dim ({dim}), got {num_heads!r}")
        preset = FLAVOURS[flavour]
        flags = {"causal_in_minibatch": causal_in_minibatch, "token_scale": token_scale, "rope": rope,
                 "qk_l2norm": qk_l2norm, "normalized_target": normalized_target, "proj_bias": proj_bias}
        flags = {k: (preset[k] if v is None else v) for k, v in flags.items()}
        if flags["token_scale"] not in TOKEN_SCALES:
            raise ValueError(f"{name}: token_scale must be one of {TOKEN_SCALES}, got {flags['token_scale']!r}")
        mini_batch_size = self.default_mini_batch_size[flavour] if mini_batch_size is None else mini_batch_size
        if not isinstance(mini_batch_size, int) or isinstance(mini_batch_size, bool) or mini_batch_size < 1:
            raise ValueError(f"{name}: mini_batch_size must be a positive int, got {mini_batch_size!r}")
        self.base_lr = float(self.default_base_lr[flavour] if base_lr is None else base_lr)
        if self.base_lr < 0:
            raise ValueError(f"{name}: base_lr must be >= 0, got {self.base_lr}")
        self.flavour = flavour
        self.num_heads = num_heads
        self.head_dim = d = dim // num_heads
        self.mini_batch_size = mini_batch_size
        self.kernel = kernel
        self.causal_in_minibatch = bool(flags["causal_in_minibatch"])
        self.token_scale = flags["token_scale"]
        self.qk_l2norm = bool(flags["qk_l2norm"])
        self.normalized_target = bool(flags["normalized_target"])
        self.proj_bias = bool(flags["proj_bias"])
        if not self.causal_in_minibatch:
            self.causal_only = False  # instance-level: this flavour runs (only) in non-causal contexts

        self.q_proj = nn.Linear(dim, dim, bias=self.proj_bias)
        self.k_proj = nn.Linear(dim, dim, bias=self.proj_bias)
        self.v_proj = nn.Linear(dim, dim, bias=self.proj_bias)
        self.o_proj = nn.Linear(dim, dim, bias=self.proj_bias)
        if rope_pairing not in PAIRINGS:
            raise ValueError(f"{name}: rope_pairing must be one of {PAIRINGS}, got {rope_pairing!r}")
        self.rope_pairing = rope_pairing
        self.rope = RotaryEmbedding(d, theta=rope_theta, pairing=rope_pairing) if flags["rope"] else None
        self.lr_gate_weight = nn.Parameter(torch.empty(num_heads, dim))  # w_h: reads the layer input x
        self.lr_gate_bias = nn.Parameter(torch.empty(num_heads))  # c_h
        self.token_offsets = (nn.Parameter(torch.empty(mini_batch_size))  # delta per slot
                              if self.token_scale == "inverse_position" else None)
        self.ttt_norm_weight = nn.Parameter(torch.empty(num_heads, d))
        self.ttt_norm_bias = nn.Parameter(torch.empty(num_heads, d))
        self.inner_layers = len(inner_shapes(self.inner_kind, d))
        for i, (d_in, d_out) in enumerate(inner_shapes(self.inner_kind, d)):
            self.register_parameter(f"W{i + 1}", nn.Parameter(torch.empty(num_heads, d_in, d_out)))
            self.register_parameter(f"b{i + 1}", nn.Parameter(torch.empty(num_heads, d_out)))
        self.post_norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_ttt_parameters()

    def _init_ttt_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.lr_gate_weight, std=INIT_STD_INNER)
            nn.init.zeros_(self.lr_gate_bias)
            if self.token_offsets is not None:
                nn.init.zeros_(self.token_offsets)
            nn.init.ones_(self.ttt_norm_weight)
            nn.init.zeros_(self.ttt_norm_bias)
            for i in range(self.inner_layers):
                nn.init.normal_(getattr(self, f"W{i + 1}"), std=INIT_STD_INNER)
                nn.init.zeros_(getattr(self, f"b{i + 1}"))
            self.post_norm.reset_parameters()

    def init_weights(self, init_std: float) -> None:
        """Projections ~ N(0, init_std) (biases 0); W0, the lr gate, token offsets and norms as the papers."""
        with torch.no_grad():
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                nn.init.normal_(proj.weight, std=init_std)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        self._init_ttt_parameters()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, inner={self.inner_kind}, flavour={self.flavour}, "
                f"mini_batch_size={self.mini_batch_size}, base_lr={self.base_lr:g}, "
                f"causal_in_minibatch={self.causal_in_minibatch}, token_scale={self.token_scale}, "
                f"qk_l2norm={self.qk_l2norm}, normalized_target={self.normalized_target}, kernel={self.kernel}")

    # ---------------------------------------------------------------------------------------------

    def check_context(self, x: Tensor, ctx: SeqContext) -> None:
        super().check_context(x, ctx)
        if not self.causal_in_minibatch and ctx.mask.causal:
            raise MixerCapabilityError(
                f"{type(self).__name__} (causal_in_minibatch=False, the video flavour) lets every token of a "
                "mini-batch see the whole mini-batch, so it cannot honour a causal context (ctx.mask.causal=True)")

    def forward(self, x: Tensor, ctx: SeqContext, state: TTTState | None = None) -> tuple[Tensor, TTTState]:
        """``x [B, T, D]`` -> ``(y [B, T, D], state after the last token)``; padding tokens give 0."""
        use_primal = self.kernel == "primal" or (self.kernel == "auto" and x.shape[1] == 1)
        return self._run(x, ctx, state, ttt_primal if use_primal else ttt_dual)

    def reference_forward(self, x: Tensor, ctx: SeqContext, state: TTTState | None = None
                          ) -> tuple[Tensor, TTTState]:
        """:meth:`forward` with the per-token autograd loop (:func:`~mmgrow.ops.ttt_primal.ttt_reference`)."""
        return self._run(x, ctx, state, ttt_reference)

    def _run(self, x: Tensor, ctx: SeqContext, state: TTTState | None, op: Callable[..., tuple[Tensor, InnerCarry]]
             ) -> tuple[Tensor, TTTState]:
        self.check_context(x, ctx)
        B, T, D = x.shape
        if state is not None:
            self._check_state(state, B)
        seg = ctx.segment_ids if ctx.segment_ids is not None else torch.zeros_like(ctx.positions)
        valid = seg != PAD_SEGMENT
        previous = state.segment if state is not None else None
        reset = reset_mask(seg, previous, (B, T), x.device)
        positions = ctx.positions
        if T > 1:  # positions that restart start a new example too (e.g. right padding without segment ids)
            restart = torch.zeros_like(reset)
            restart[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
            reset = reset | (restart & valid)
        if state is not None:
            self._check_continuation(positions, reset, valid, state)
        q, k, target, lr, tok = self._inner_inputs(x, positions)
        carry = state.carry(self.inner_layers, q.dtype) if state is not None else None
        z, carry = op(q, k, target, lr, tok, self._inner_params(), mini_batch_size=self.mini_batch_size,
                      positions=positions, reset=reset, valid=valid, carry=carry, causal=self.causal_in_minibatch)
        y = self.o_proj(self.post_norm(z.transpose(1, 2).reshape(B, T, D))) * valid.unsqueeze(-1).to(x.dtype)
        next_position = torch.where(valid[:, -1], positions[:, -1] + 1, torch.full_like(positions[:, -1], -1))
        return y, TTTState.from_carry(carry, next_position, last_segment(ctx.segment_ids, previous, B, x.device))

    def _inner_inputs(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``q, k, target [B, H, T, d]``, ``lr [B, H, T]`` and ``tok [B, T]`` for the inner loop."""
        B, T, _ = x.shape
        H, d, b = self.num_heads, self.head_dim, self.mini_batch_size
        q, k, v = (proj(x).view(B, T, H, d).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_l2norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        slot = positions % b
        if self.rope is not None:
            q, k = self.rope(q, k, slot)  # positions restart every mini-batch (ttt-lm-pytorch)
        if self.normalized_target:
            target = normalized_target(v, k, self.ttt_norm_weight[None, :, None], self.ttt_norm_bias[None, :, None])
        else:
            target = v - k
        gate = torch.einsum("btc,hc->bht", x, self.lr_gate_weight) + self.lr_gate_bias[None, :, None]
        lr = self.base_lr * torch.sigmoid(gate) / d
        if self.token_offsets is not None:
            tok = (1.0 / (slot + 1).to(x.dtype) + self.token_offsets[slot]).clamp_min(0.0)
        else:
            tok = torch.full((B, T), 1.0 / b, dtype=x.dtype, device=x.device)
        return q, k, target, lr, tok

    def _inner_params(self) -> InnerParams:
        n = range(1, self.inner_layers + 1)
        return InnerParams([getattr(self, f"W{i}") for i in n], [getattr(self, f"b{i}") for i in n],
                           self.ttt_norm_weight, self.ttt_norm_bias)

    def _check_continuation(self, positions: Tensor, reset: Tensor, valid: Tensor, state: TTTState) -> None:
        """Rows whose first token continues the state's segment must continue its positions (and, without
        causality inside a mini-batch, start at a mini-batch boundary)."""
        name = type(self).__name__
        expected = state.next_position.to(positions.device)
        continuing = valid[:, 0] & ~reset[:, 0] & (expected >= 0)
        if bool((continuing & (positions[:, 0] != expected)).any()):
            raise ValueError(f"{name}: the state continues at positions {expected.tolist()} but the first tokens have "
                             f"positions {positions[:, 0].tolist()} (positions must increase by 1 inside a segment)")
        if not self.causal_in_minibatch and bool((continuing & (expected % self.mini_batch_size != 0)).any()):
            raise ValueError(f"{name}: with causal_in_minibatch=False (video flavour) a state can only be continued "
                             f"at a mini-batch boundary (position multiple of {self.mini_batch_size}); it stopped at "
                             f"positions {expected.tolist()}, inside a mini-batch whose outputs saw only its "
                             "first tokens")

    # ---------------------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> TTTState:
        """``W0`` tiled over the batch, nothing accumulated, any next position, segment 0."""
        carry = InnerCarry.initial(self._inner_params(), batch_size)

        def place(ts: list[Tensor]) -> list[Tensor]:
            return [t.to(device=device, dtype=dtype).clone() for t in ts]

        carry = InnerCarry(place(carry.weights), place(carry.biases), place(carry.acc_weights),
                           place(carry.acc_biases))
        return TTTState.from_carry(carry, torch.full((batch_size,), -1, dtype=torch.long, device=device),
                                   torch.zeros(batch_size, dtype=torch.long, device=device))

    def _check_state(self, state: TTTState, batch_size: int) -> None:
        name = type(self).__name__
        if not isinstance(state, TTTState):
            raise TypeError(f"{name}: expected a TTTState, got {type(state).__name__}")
        H = self.num_heads
        expected: dict[str, tuple[int, ...]] = {"next_position": (batch_size,), "segment": (batch_size,)}
        for i, (d_in, d_out) in enumerate(inner_shapes(self.inner_kind, self.head_dim)):
            for prefix in ("", "acc_"):
                expected[f"{prefix}W{i + 1}"] = (batch_size, H, d_in, d_out)
                expected[f"{prefix}b{i + 1}"] = (batch_size, H, d_out)
        for f in fields(state):
            value = getattr(state, f.name)
            want = expected.get(f.name)
            got = None if value is None else tuple(value.shape)
            if got != want:
                raise ValueError(f"{name}: state.{f.name} must be {'absent' if want is None else list(want)}, got "
                                 f"{'None' if got is None else list(got)}")

    def mixing_flops(self, seq_len: int) -> float:
        """The dual form's matmuls (the training kernel), :func:`~mmgrow.ops.ttt_dual.ttt_dual_flops`:
        ``(S'/S) H sum_l [2 b (d_in + d_out) + 6 d_in d_out (+ 2 d_in d_out for l > 0)]`` per token
        (TTT-Linear ``H (4 b d + 6 d^2)``, TTT-MLP ``H (20 b d + 56 d^2)``, ``d`` the head dim)."""
        return ttt_dual_flops(seq_len, self.num_heads, inner_shapes(self.inner_kind, self.head_dim),
                              self.mini_batch_size)

    def state_size(self, seq_len: int) -> int:
        """Weights, biases and their accumulators of every inner layer, plus position and segment."""
        H = self.num_heads
        per_layer = [H * (d_in * d_out + d_out) for d_in, d_out in inner_shapes(self.inner_kind, self.head_dim)]
        return 2 * sum(per_layer) + 2

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.o_proj]

    # ---------------------------------------------------------------------------------------------

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """dim 32 -> 4 heads of 8; mini-batches of 4, so a 10-token test crosses several."""
        return {"num_heads": 4, "mini_batch_size": 4}

    @classmethod
    def conformance_extremes(cls) -> dict[str, Callable[[TTTLayer], None]]:
        """Gate extremes: inner lr exactly 0 (W stays W0), lr gate saturated at 1 with a large base_lr,
        token scale exactly 0 through ``max(0, .)`` (W stays W0)."""
        def lr_zero(m: TTTLayer) -> None:
            with torch.no_grad():
                m.lr_gate_bias.fill_(-1e4)

        def lr_large(m: TTTLayer) -> None:
            with torch.no_grad():
                m.lr_gate_bias.fill_(40.0)
            m.base_lr = 10.0

        def tok_zero(m: TTTLayer) -> None:
            if m.token_offsets is not None:
                with torch.no_grad():
                    m.token_offsets.fill_(-1e4)

        return {"lr=0": lr_zero, "lr large": lr_large, "tok=0": tok_zero}


class TTTLinear(TTTLayer):
    """TTT with a linear inner model ``f(x) = x W1 + b1`` per head (``d x d``)."""

    inner_kind: ClassVar[str] = "linear"
    default_mini_batch_size: ClassVar[dict[str, int]] = {"lm": 16, "video": 16}
    default_base_lr: ClassVar[dict[str, float]] = {"lm": 1.0, "video": 1.0}


class TTTMLP(TTTLayer):
    """TTT with a 2-layer MLP inner model ``f(x) = gelu(x W1 + b1) W2 + b2`` per head (``d -> 4d -> d``)."""

    inner_kind: ClassVar[str] = "mlp"
    default_mini_batch_size: ClassVar[dict[str, int]] = {"lm": 16, "video": 64}
    default_base_lr: ClassVar[dict[str, float]] = {"lm": 0.1, "video": 0.1}


def from_ttt_lm_pytorch(state_dict: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """A ttt-lm-pytorch ``TTTLinear`` / ``TTTMLP`` layer's state dict renamed and reshaped for ours.

    Load the result into a layer built with ``rope_pairing="interleaved"`` (their RoPE layout) and
    ``flavour="lm"``; no coordinate is permuted. Their ``q/k/v/o_proj.weight``, ``W1``/``W2``,
    ``ttt_norm_weight``/``ttt_norm_bias`` and ``post_norm.*`` keep their names; ``b1``/``b2``
    ``[H, 1, d]`` -> ``[H, d]``; ``learnable_ttt_lr_weight [H, 1, D]`` -> ``lr_gate_weight [H, D]``;
    ``learnable_ttt_lr_bias [H, 1]`` -> ``lr_gate_bias [H]``; ``learnable_token_idx [b]`` ->
    ``token_offsets``. Keys of the "Mamba backbone" options (``conv_q``, ``conv_k``, ``g_proj``) have
    no counterpart and raise.
    """
    renamed = {"learnable_ttt_lr_weight": "lr_gate_weight", "learnable_ttt_lr_bias": "lr_gate_bias",
               "learnable_token_idx": "token_offsets"}
    kept = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "W1", "W2", "b1", "b2",
            "ttt_norm_weight", "ttt_norm_bias", "post_norm.weight", "post_norm.bias")
    reshaped = {"b1": (num_heads, -1), "b2": (num_heads, -1), "learnable_ttt_lr_weight": (num_heads, -1),
                "learnable_ttt_lr_bias": (num_heads,)}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key not in kept and key not in renamed:
            raise ValueError(f"from_ttt_lm_pytorch: no counterpart for {key!r} (share_qk / use_gate layers are not "
                             f"supported); expected keys among {sorted((*kept, *renamed))}")
        shape = reshaped.get(key)
        out[renamed.get(key, key)] = value if shape is None else value.reshape(shape)
    return out
