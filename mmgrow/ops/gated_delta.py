"""The gated delta rule (Gated DeltaNet; Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464).

Per head, with a state ``S`` of shape ``[K, V]`` (key side first), keys ``k_t`` and queries ``q_t``
in ``R^K``, values ``v_t`` in ``R^V``, a log-decay ``g_t <= 0`` (``alpha_t = exp(g_t)``) and a
write strength ``beta_t``:

.. math::

    S_t = \\alpha_t (I - \\beta_t k_t k_t^\\top) S_{t-1} + \\beta_t k_t v_t^\\top, \\qquad
    o_t = S_t^\\top (s\\, q_t), \\quad s = K^{-1/2} \\text{ by default}.

A reset at ``t`` (a new packed example starts) zeroes the state before token ``t``'s update, i.e.
``alpha_t = 0`` (``g_t = -inf``, :func:`mmgrow.ops.segments.apply_resets`).

**Delta form.** With the decayed state ``D_t = alpha_t S_{t-1}`` the update is
``S_t = D_t + k_t u_t^T`` with ``u_t = beta_t (v_t - D_t^T k_t)``: one SGD step on
``1/2 ||D^T k_t - v_t||^2`` (this is what :func:`gated_delta_recurrent` evaluates, token by token).

**Chunkwise form** (:func:`gated_delta_chunked`). Take a chunk of ``L`` tokens ``i = 1..L`` entered
with state ``S_0``; let ``gamma_i = g_1 + ... + g_i`` and ``Gamma_ij = exp(gamma_i - gamma_j)`` for
``j <= i`` (0 above the diagonal), all read off one :func:`~mmgrow.ops.segments.segsum` of
``[0, g_1, ..., g_L]``: entry ``[i, 0]`` is ``gamma_i``, ``[i, j]`` is ``log Gamma_ij``, the last row
``[L, j]`` is the decay from ``j`` to the chunk end and ``[L, 0]`` is ``gamma_L`` (no difference of
cumulative sums, so resets (``-inf``) never produce ``-inf - (-inf)``). Unrolling the delta form,

    (1) ``S_i = e^{gamma_i} S_0 + sum_{j<=i} Gamma_ij k_j u_j^T``, hence
        ``D_i = e^{gamma_i} S_0 + sum_{j<i} Gamma_ij k_j u_j^T`` and
    (2) ``u_i + beta_i sum_{j<i} Gamma_ij (k_i . k_j) u_j = beta_i v_i - beta_i e^{gamma_i} k_i^T S_0``.

With ``A = strictly_lower(diag(beta) (K K^T ⊙ Gamma))`` (the UT transform) and ``U'`` the rows ``u_i``,
(2) reads ``(I + A) U' = diag(beta) V - diag(beta) (K ⊙ e^gamma) S_0``, so with ``T = (I + A)^{-1} diag(beta)``,
``W = T (K ⊙ e^gamma)`` and ``U = T V`` (one unit-lower-triangular solve for both):

    ``v_new = U' = U - W S_0``,
    ``O = (Q ⊙ e^gamma) S_0 + (Q K^T ⊙ Gamma) v_new``                      from (1) with ``j <= i``,
    ``S_L = e^{gamma_L} S_0 + (K ⊙ e^{gamma_L - gamma})^T v_new``            (1) at ``i = L``.

Everything except the ``S_0``-dependent terms is computed for all chunks at once; only
``S_0 -> S_L`` runs sequentially over chunks (two small matmuls per chunk), and the outputs are one
batched matmul against the stacked chunk-start states afterwards. A length that is not a multiple of
the chunk is padded with ``g = 0, beta = 0`` (and zero ``q, k, v``) tokens, which leave the state
unchanged exactly (``alpha = 1``, no write) and whose outputs are dropped.

Half-precision inputs are computed in float32 (the returned state stays float32); float32 and
float64 are computed in their own dtype, so float64 is a true oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from mmgrow.ops.segments import apply_resets, check_state_and_reset, compute_dtype, decay, segsum


def _check(name: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
           reset: Tensor | None) -> tuple[int, int, int, int, int]:
    """Validate shapes; return ``(B, T, H, K, V)``."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: expected q, k [B, T, H, K] and v [B, T, H, V], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"{name}: expected g and beta of shape [B, T, H] = {[B, T, H]}, got g {tuple(g.shape)}, "
                         f"beta {tuple(beta.shape)}")
    check_state_and_reset(name, initial_state, (B, H, K, V), reset, B, T)
    return B, T, H, K, V


def gated_delta_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
                          initial_state: Tensor | None = None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token: the reference (float64 oracle) and the decoding step.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-decay (``<= 0``); beta: ``[B, T, H]`` write strength.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or None (zeros).
        reset: ``[B, T]`` bool or None; True zeroes the state before that token's update.

    Returns:
        ``o [B, T, H, V]`` (dtype of ``q``) and the final state ``[B, H, K, V]`` (compute dtype).
    """
    B, T, H, K, V = _check("gated_delta_recurrent", q, k, v, g, beta, initial_state, reset)
    c = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    alpha = decay(apply_resets(g.to(c), reset))  # [B, T, H]; exactly 0 at resets
    S = initial_state.to(c) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=c)
    outputs = []
    for t in range(T):
        k_t, v_t, b_t = k[:, t].to(c), v[:, t].to(c), beta[:, t].to(c)
        S = alpha[:, t, :, None, None] * S
        prediction = torch.einsum("bhk,bhkv->bhv", k_t, S)
        update = b_t[..., None] * (v_t - prediction)  # the delta of one SGD step, [B, H, V]
        S = S + k_t[..., :, None] * update[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(c) * scale, S))
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, V, dtype=c)
    return o.to(q.dtype), S if T else S.clone()


def _to_chunks(x: Tensor, n_chunks: int, chunk_size: int) -> Tensor:
    """``[B, T_pad, H, ...] -> [B, H, N, L, ...]``."""
    x = x.transpose(1, 2)
    return x.reshape(*x.shape[:2], n_chunks, chunk_size, *x.shape[3:])


def gated_delta_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
                        chunk_size: int = 64, initial_state: Tensor | None = None,
                        reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule in chunkwise WY / UT-transform form (module docstring); same maths,
    arguments and results as :func:`gated_delta_recurrent`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g, beta: ``[B, T, H]`` (g before beta, as in
            :func:`gated_delta_recurrent`).
        chunk_size: tokens per chunk ``L`` (any positive int; 64 is a good CPU and GPU choice).
        initial_state: ``[B, H, K, V]`` or None; reset: ``[B, T]`` bool or None.

    Returns:
        ``o [B, T, H, V]`` (dtype of ``q``) and the final state ``[B, H, K, V]`` (compute dtype).
    """
    B, T, H, K, V = _check("gated_delta_chunked", q, k, v, g, beta, initial_state, reset)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"gated_delta_chunked: chunk_size must be a positive int, got {chunk_size!r}")
    c = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    S = initial_state.to(c) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=c)
    if T == 0:
        return q.new_zeros(B, 0, H, V), S.clone()

    L = chunk_size
    N = -(-T // L)
    pad = N * L - T
    # Padding tokens: g = 0 (alpha = 1) and beta = 0 (no write) leave the state exactly as it is.
    qc, kc, vc = (_to_chunks(F.pad(x, (0, 0, 0, 0, 0, pad)), N, L) for x in (q.to(c) * scale, k.to(c), v.to(c)))
    log_decay = apply_resets(g.to(c), reset)
    gc, bc = (_to_chunks(F.pad(x.to(c), (0, 0, 0, pad)), N, L) for x in (log_decay, beta))  # [B, H, N, L]

    sums = segsum(F.pad(gc, (1, 0)))  # [B, H, N, L+1, L+1]; index 0 = "before the chunk"
    gamma_decay = decay(sums[..., 1:, 1:])  # Gamma_ij, 0 above the diagonal
    from_start = decay(sums[..., 1:, 0])  # e^{gamma_i}, [B, H, N, L]
    to_end = decay(sums[..., -1, 1:])  # e^{gamma_L - gamma_j}, [B, H, N, L]
    chunk_decay = decay(sums[..., -1, 0])  # e^{gamma_L}, [B, H, N]

    # UT transform: (I + A) [W | U] = diag(beta) [K ⊙ e^gamma | V]; the solver reads only the strict
    # lower triangle of A and takes the unit diagonal as given.
    A = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * gamma_decay).tril(-1)
    rhs = bc[..., None] * torch.cat([kc * from_start[..., None], vc], dim=-1)
    W, U = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([K, V], dim=-1)

    keys_to_end = kc * to_end[..., None]  # [B, H, N, L, K]
    starts, new_values = [], []
    for n in range(N):  # the only sequential part: S_0 -> S_L per chunk
        starts.append(S)
        v_new = U[:, :, n] - W[:, :, n] @ S
        new_values.append(v_new)
        S = chunk_decay[:, :, n, None, None] * S + keys_to_end[:, :, n].transpose(-1, -2) @ v_new
    start_states = torch.stack(starts, dim=2)  # [B, H, N, K, V]
    v_new = torch.stack(new_values, dim=2)  # [B, H, N, L, V]

    intra = (qc @ kc.transpose(-1, -2)) * gamma_decay  # causal (diagonal included) via Gamma
    o = (qc * from_start[..., None]) @ start_states + intra @ v_new  # [B, H, N, L, V]
    o = o.reshape(B, H, N * L, V)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), S


def gated_delta_chunked_flops(seq_len: int, heads: int, key_dim: int, value_dim: int, chunk_size: int) -> float:
    """Forward FLOPs per token of :func:`gated_delta_chunked` (a multiply-add = 2 FLOPs) for one row.

    Per chunk of ``L = chunk_size`` tokens and head (``K`` key, ``V`` value channels): ``K K^T`` and
    ``Q K^T``: ``2 x 2 L^2 K``; ``intra @ v_new``: ``2 L^2 V``; ``W S_0``, ``(K ⊙ decay)^T v_new`` and
    ``(Q ⊙ e^gamma) S_0``: ``3 x 2 L K V``; the unit-lower-triangular solve for ``[W | U]``:
    ``L (L - 1) (K + V)`` (forward substitution, ``L (L - 1) / 2`` multiply-adds per right-hand side).
    Per token, with ``S' = ceil(S / L) L`` (the padded length; ``L`` is not shortened for short rows):

        ``(S'/S) H [4 L K + 2 L V + 6 K V + (L - 1)(K + V)]``.
    """
    if seq_len < 1:
        raise ValueError(f"gated_delta_chunked_flops: seq_len must be >= 1, got {seq_len}")
    L, K, V = chunk_size, key_dim, value_dim
    padded = -(-seq_len // L) * L
    per_token = heads * (4 * L * K + 2 * L * V + 6 * K * V + (L - 1) * (K + V))
    return float(per_token) * padded / seq_len
