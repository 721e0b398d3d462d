"""Mamba-2's state-space duality (SSD) recurrence: a per-token reference and the chunked algorithm.

Dao & Gu, "Transformers are SSMs" (Mamba-2), arXiv 2405.21060, §6 ("SSD algorithm"). Per head ``h``
(scalar decay, state ``S_t`` of shape ``[N, P]``: the state dimension N plays the key, the head
dimension P the value)::

    a_t = exp(dt_t · A_h)                              (A_h < 0, dt_t > 0: 0 < a_t <= 1)
    S_t = a_t S_{t-1} + dt_t · B_t x_tᵀ                 (B_t [N], x_t [P])
    y_t = S_tᵀ C_t                                      (C_t [N]; the D·x skip is the layer's)

``B`` and ``C`` have ``G`` groups, each shared by ``H / G`` consecutive heads (as keys in GQA).
A ``reset`` at token ``t`` zeroes the state before that token's write (``a_t = 0``, a log-decay of
``-inf`` via :func:`mmgrow.ops.segments.apply_resets`), which is how packed rows stay apart.

**Chunked form** (:func:`ssd_chunked`). With chunks of ``Q`` tokens and ``L = exp(segsum(log a))``
(``L[i, j]`` = decay from token ``j`` to token ``i`` of one chunk, 0 above the diagonal), the output
of token ``i`` of chunk ``c`` is::

    y_i = Σ_{j<=i} (C_i · B_j) L[i, j] dt_j x_j          (1) intra-chunk, a masked "attention"
        + exp(Σ_{k<=i} log a_k) · S_{c-1}ᵀ C_i          (4) the state entering the chunk
    S_c = exp(Σ_k log a_k) S_{c-1} + Σ_j L[Q-1, j] dt_j B_j x_jᵀ     (2) chunk states, (3) the scan

Steps (1), (2) and (4) are batched matmuls over all chunks at once; (3) is a short sequential scan
over the ``T / Q`` chunks (not the quadratic-in-chunks form of the paper's minimal listing). All
decays come from :func:`~mmgrow.ops.segments.segsum` or plain prefix sums of log-decays, never
from differences of prefix sums, so resets (``-inf``) and long chunks stay exact and NaN-free.
A sequence whose length is not a multiple of ``Q`` is padded with ``dt = 0`` tokens (decay 1, no
write), which changes neither the outputs nor the final state.

Precision: float16/bfloat16 inputs are computed in float32, float64 stays float64. Outputs come
back in ``x``'s dtype, the final state in the initial state's dtype (``x``'s when none is given).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from mmgrow.ops.segments import apply_resets, check_state_and_reset, compute_dtype, decay, segsum


def check_ssd_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None,
                     reset: Tensor | None) -> tuple[int, int, int, int, int, int]:
    """Validate the shapes of an SSD call; returns ``(Bt, T, H, P, G, N)``."""
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be [Bt, T, H, P], got shape {tuple(x.shape)}")
    Bt, T, H, P = x.shape
    if B.dim() != 4 or B.shape[:2] != (Bt, T):
        raise ValueError(f"ssd: B must be [Bt={Bt}, T={T}, G, N], got shape {tuple(B.shape)}")
    G, N = B.shape[2], B.shape[3]
    if C.shape != B.shape:
        raise ValueError(f"ssd: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if G < 1 or H % G:
        raise ValueError(f"ssd: the {H} heads must split evenly into the G={G} groups of B and C")
    if dt.shape != (Bt, T, H):
        raise ValueError(f"ssd: dt must be [Bt, T, H] = {[Bt, T, H]}, got {list(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"ssd: A must be [H] = [{H}], got {list(A.shape)}")
    check_state_and_reset("ssd", initial_state, (Bt, H, N, P), reset, Bt, T)
    return Bt, T, H, P, G, N


def ssd_recurrent(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
                  reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (the float64 test oracle, and the ``T == 1`` decode step).

    Args:
        x: ``[Bt, T, H, P]`` values; dt: ``[Bt, T, H]`` positive step sizes (softplus'd, limited);
        A: ``[H]`` negative decay rates; B, C: ``[Bt, T, G, N]`` input / output projections.
        initial_state: ``[Bt, H, N, P]`` or None (zeros).
        reset: ``[Bt, T]`` bool or None; True zeroes the state before that token's write.

    Returns:
        ``(y [Bt, T, H, P], final_state [Bt, H, N, P])``.
    """
    Bt, T, H, P, G, N = check_ssd_inputs(x, dt, A, B, C, initial_state, reset)
    compute = compute_dtype(x.dtype)
    state_dtype = initial_state.dtype if initial_state is not None else x.dtype
    x_, dt_, A_ = x.to(compute), dt.to(compute), A.to(compute)
    B_h = B.to(compute).repeat_interleave(H // G, dim=2)  # [Bt, T, H, N]: head h reads group h // (H/G)
    C_h = C.to(compute).repeat_interleave(H // G, dim=2)
    h = initial_state.to(compute) if initial_state is not None else x_.new_zeros(Bt, H, N, P)
    ys = []
    for t in range(T):
        a = decay(dt_[:, t] * A_)  # [Bt, H]
        if reset is not None:  # where, not a product: the old state gets exactly no weight and no gradient
            a = torch.where(reset[:, t, None], torch.zeros_like(a), a)
        write = (dt_[:, t, :, None] * B_h[:, t])[..., None] * x_[:, t, :, None, :]  # [Bt, H, N, P]
        h = a[..., None, None] * h + write
        ys.append(torch.einsum("bhnp,bhn->bhp", h, C_h[:, t]))
    y = torch.stack(ys, dim=1) if ys else x_.new_zeros(Bt, 0, H, P)
    return y.to(x.dtype), h.to(state_dtype)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int = 64,
                initial_state: Tensor | None = None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The SSD chunked algorithm (module docstring): same arguments and results as :func:`ssd_recurrent`.

    ``chunk_size`` is ``Q``; a sequence shorter than ``Q`` is one chunk of its own length, and longer
    ones are padded internally with ``dt = 0`` tokens to a multiple of ``Q``.
    """
    Bt, T, H, P, G, N = check_ssd_inputs(x, dt, A, B, C, initial_state, reset)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"ssd_chunked: chunk_size must be a positive int, got {chunk_size!r}")
    compute = compute_dtype(x.dtype)
    state_dtype = initial_state.dtype if initial_state is not None else x.dtype
    h = initial_state.to(compute) if initial_state is not None else x.new_zeros(Bt, H, N, P, dtype=compute)
    if T == 0:
        return x.new_zeros(Bt, 0, H, P), h.to(state_dtype)

    Q = min(chunk_size, T)
    n_chunks = -(-T // Q)
    pad = n_chunks * Q - T
    R = H // G
    x_, dt_, B_, C_ = x.to(compute), dt.to(compute), B.to(compute), C.to(compute)
    log_a = apply_resets(dt_ * A.to(compute), reset)  # [Bt, T, H]
    if pad:  # dt = 0 tokens: log-decay 0 (decay 1) and a zero write
        x_, B_, C_ = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x_, B_, C_))
        dt_, log_a = (F.pad(t, (0, 0, 0, pad)) for t in (dt_, log_a))

    # Heads-first chunk layouts; heads split as (G groups, R heads per group) so B and C broadcast over R.
    xc = x_.view(Bt, n_chunks, Q, G, R, P).permute(0, 3, 4, 1, 2, 5)  # [Bt, G, R, nC, Q, P]
    dtc = dt_.view(Bt, n_chunks, Q, G, R).permute(0, 3, 4, 1, 2)  # [Bt, G, R, nC, Q]
    lac = log_a.view(Bt, n_chunks, Q, G, R).permute(0, 3, 4, 1, 2)  # [Bt, G, R, nC, Q]
    Bc = B_.view(Bt, n_chunks, Q, G, N).permute(0, 3, 1, 2, 4).unsqueeze(2)  # [Bt, G, 1, nC, Q, N]
    Cc = C_.view(Bt, n_chunks, Q, G, N).permute(0, 3, 1, 2, 4).unsqueeze(2)

    decay_within = segsum(lac)  # [Bt, G, R, nC, Q, Q]: log-decay from token j to token i of a chunk

    # (1) intra-chunk: y_i = sum_{j<=i} (C_i . B_j) L[i, j] dt_j x_j
    scores = (Cc @ Bc.transpose(-1, -2)) * decay(decay_within) * dtc[..., None, :]
    y = scores @ xc  # [Bt, G, R, nC, Q, P]

    # (2) each chunk's own contribution to its end state: sum_j L[Q-1, j] dt_j B_j x_j^T
    to_end = decay(decay_within[..., -1, :]) * dtc  # [Bt, G, R, nC, Q]
    chunk_states = Bc.transpose(-1, -2) @ (to_end[..., None] * xc)  # [Bt, G, R, nC, N, P]

    # (3) sequential scan of the states entering each chunk (nC small steps)
    chunk_decay = decay(lac.sum(dim=-1))[..., None, None]  # [Bt, G, R, nC, 1, 1]
    h = h.view(Bt, G, R, N, P)
    entering = []
    for c in range(n_chunks):
        entering.append(h)
        h = chunk_decay[:, :, :, c] * h + chunk_states[:, :, :, c]
    entering_states = torch.stack(entering, dim=3)  # [Bt, G, R, nC, N, P]

    # (4) the entering state read out at every token, decayed from the chunk start to the token
    from_start = decay(torch.cumsum(lac, dim=-1))  # [Bt, G, R, nC, Q]
    y = y + (Cc @ entering_states) * from_start[..., None]

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(Bt, n_chunks * Q, H, P)[:, :T]
    return y.to(x.dtype), h.reshape(Bt, H, N, P).to(state_dtype)


def ssd_chunked_flops(seq_len: int, heads: int, head_dim: int, d_state: int, groups: int, chunk_size: int) -> float:
    """Forward FLOPs per token of :func:`ssd_chunked`'s matmuls (a multiply-add = 2 FLOPs) for one row.

    With ``Q = min(chunk_size, S)``, ``S' = ceil(S / Q) Q`` (the padded length), ``H`` heads of ``P`` channels,
    ``G`` groups of ``B``/``C`` with ``N`` states, per chunk:

    * ``C B^T`` (once per group, broadcast over its heads): ``G 2 Q^2 N``;
    * ``scores @ x`` (1): ``H 2 Q^2 P``;  chunk states ``B^T (decay x)`` (2): ``H 2 N Q P``;
    * entering-state read-out ``C S_{c-1}`` (4): ``H 2 Q N P``.

    Per token: ``(S'/S) [H (2 Q P + 4 N P) + G 2 Q N]``. The scan (3) and the decays are elementwise (not
    counted); the causal mask inside a chunk is applied after full ``Q x Q`` products, so nothing is halved.
    """
    if seq_len < 1:
        raise ValueError(f"ssd_chunked_flops: seq_len must be >= 1, got {seq_len}")
    Q = min(chunk_size, seq_len)
    padded = -(-seq_len // Q) * Q
    per_token = heads * (2 * Q * head_dim + 4 * d_state * head_dim) + groups * 2 * Q * d_state
    return float(per_token) * padded / seq_len
