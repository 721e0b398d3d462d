"""Dual form of mini-batch TTT (Sun et al. 2024, arXiv 2407.04620, Sec. 2.5): no per-token weights.

Inside mini-batch ``i`` every token takes its gradient at ``W_i``, and token ``t`` reads with
``W_t = W_i - tok_t (A + sum_{s in M(t)} lr_s dl_s/dW (W_i))`` where ``A`` is the gradient sum
already accumulated for this mini-batch by an earlier call (zero unless a call stopped mid
mini-batch), ``M(t) = {s <= t}`` (causal, the LM flavour) or the whole mini-batch (non-causal, the
video flavour). For one layer ``Z = X W + b`` with keys ``X_k [L, d_in]``, queries ``X_q``, the
gradients at the layer's output ``G [L, d_out]`` (:func:`~mmgrow.ops.ttt_inner.keys_forward_and_grads`)
and ``eta_{t,s} = tok_t lr_s``:

.. math::

    Z_q = X_q W_i + b_i - \\mathrm{tok} \\odot \\Big(X_q A_W + A_b
          + \\big(X_q X_k^\\top \\odot M\\big) (\\mathrm{lr} \\odot G) + M (\\mathrm{lr} \\odot G)\\Big)

with the mask ``M`` = lower-triangular ones (causal) or all ones, i.e. the paper's
``X_q W - (eta * tril(X_q X_k^T)) G + b - tril(eta) G`` with ``eta`` factorised into row and column
scales. Only ``L x L`` and ``L x d`` products: attention-like, no ``[L, d_in, d_out]`` tensors.
TTT-MLP applies this layer by layer: the keys' second-layer input is ``gelu(Z1)`` at ``W_i``, the
queries' is ``gelu`` of their first-layer dual output. The accumulators grow by
``X_k^T (lr * G)`` and ``sum_s lr_s G_s``; the scan (:mod:`mmgrow.ops.ttt_grid`) commits
``W_{i+1} = W_i - tok_last A`` when the mini-batch is complete.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmgrow.ops.ttt_grid import build_grid, fill_defaults, scan_minibatches
from mmgrow.ops.ttt_inner import (
    INNER_LN_EPS,
    InnerCarry,
    InnerParams,
    gelu_tanh,
    layer_grads,
)


def dual_prepare(qg: Tensor, kg: Tensor, tokg: Tensor, *, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """What the dual form can compute for all mini-batches at once, before the scan.

    Only the key-side forward and its gradients depend on ``W_i``; the first layer's query-key
    products do not, so ``tok_t M_ts (q_t . k_s + 1)`` (the ``+ 1`` carries the bias term
    ``M (lr G)``) is one batched matmul here instead of ``N`` small ones in the loop.

    Args:
        qg, kg: ``[B, H, N, L, d]`` grid of queries / keys; tokg: ``[B, 1, N, L]`` token scales.

    Returns:
        ``(scores [B, H, N, L, L], tok_mask [B, 1, N, L, L], keys_queries [B, H, N, 2L, d])``:
        the first layer's scaled scores, ``tok_t M_ts`` for the deeper layers, and keys and queries
        concatenated so one matmul per mini-batch gives both ``k W_i`` and ``q W_i``.
    """
    L = qg.shape[-2]
    index = torch.arange(L, device=qg.device)  # a comparison, not tril(): hoisted out of the loop anyway
    mask = (index[:, None] >= index[None, :]).to(qg.dtype) if causal else qg.new_ones(L, L)
    tok_mask = tokg.unsqueeze(-1) * mask  # [B, 1, N, L, L]
    scores = (qg @ kg.transpose(-1, -2) + 1.0) * tok_mask
    return scores, tok_mask, torch.cat([kg, qg], dim=-2)


def dual_step(q: Tensor, k: Tensor, target: Tensor, lr: Tensor, tok: Tensor, carry: InnerCarry, params: InnerParams,
              *, causal: bool, eps: float, inner_norm: bool, acc_zero: bool = False,
              pre: tuple[Tensor, ...] = ()) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One mini-batch in the dual form.

    Args:
        q, k, target: ``[B, H, L, d]``; lr: ``[B, H, L]`` (0 in empty cells); tok: ``[B, 1, L]``.
        carry: weights ``W_i`` and pending accumulators ``A`` (``[B, H, ...]``).
        acc_zero: the accumulators are known to be zero (skip the ``X_q A`` terms).
        pre: this mini-batch's slice of :func:`dual_prepare` (computed here when empty).

    Returns:
        ``(f(q; W_t) [B, H, L, d_out]`` before the output LayerNorm, ``d_acc_weights, d_acc_biases)``.
    """
    if not pre:
        pre = tuple(x.squeeze(2) for x in dual_prepare(q.unsqueeze(2), k.unsqueeze(2), tok.unsqueeze(2),
                                                        causal=causal))
    scores, tok_mask, keys_queries = pre
    L = q.shape[-2]
    gamma, beta = params.ln_weight[None, :, None], params.ln_bias[None, :, None]
    num_layers = len(carry.weights)
    both = keys_queries @ carry.weights[0] + carry.biases[0].unsqueeze(-2)  # [B, H, 2L, d_out]: keys, queries
    key_z, z = both[..., :L, :], both[..., L:, :]
    pre_acts, inputs = [key_z], [k]
    for i in range(1, num_layers):  # deeper layers (TTT-MLP): inputs gelu(Z) at W_i
        inputs.append(gelu_tanh(pre_acts[-1]))
        pre_acts.append(inputs[-1] @ carry.weights[i] + carry.biases[i].unsqueeze(-2))
    grads = layer_grads(pre_acts, target, carry.weights, gamma, beta, eps, inner_norm)
    row_scale = tok.unsqueeze(-1)  # [B, 1, L, 1]
    x_q = q
    d_acc_w, d_acc_b = [], []
    for i, (x_k, g) in enumerate(zip(inputs, grads, strict=True)):
        lg = lr.unsqueeze(-1) * g  # [B, H, L, d_out]
        if i == 0:
            z = z - scores @ lg
        else:
            z = x_q @ carry.weights[i] + carry.biases[i].unsqueeze(-2) - ((x_q @ x_k.transpose(-1, -2) + 1.0)
                                                                          * tok_mask) @ lg
        if not acc_zero:
            z = z - row_scale * (x_q @ carry.acc_weights[i] + carry.acc_biases[i].unsqueeze(-2))
        d_acc_w.append(x_k.transpose(-1, -2) @ lg)
        d_acc_b.append(lg.sum(dim=-2))
        x_q = gelu_tanh(z) if i < num_layers - 1 else z
    return x_q, d_acc_w, d_acc_b


def ttt_dual(q: Tensor, k: Tensor, target: Tensor, lr: Tensor, token_scale: Tensor, params: InnerParams, *,
             mini_batch_size: int, positions: Tensor | None = None, reset: Tensor | None = None,
             valid: Tensor | None = None, carry: InnerCarry | None = None, causal: bool = True,
             eps: float = INNER_LN_EPS, inner_norm: bool = True) -> tuple[Tensor, InnerCarry]:
    """Mini-batch TTT in the dual form: ``z_t = q_t + LN(f(q_t; W_t))``.

    The inner model (linear or MLP) is given by ``params`` (one or two layers).

    Args:
        q, k, target: ``[B, H, T, d]`` queries, keys and reconstruction targets (``v - k`` for the LM).
        lr: ``[B, H, T]`` per-token inner learning rates ``lr_s``.
        token_scale: ``[B, T]`` (or ``[T]``) per-token scale ``tok_t`` (``max(0, 1/t' + delta)`` or ``1/b``).
        params: initial weights ``W0`` (used at resets and when ``carry`` is None) and the inner LayerNorm.
        mini_batch_size: ``b``; mini-batches are aligned by ``positions`` (slot ``positions % b``).
        positions: ``[B, T]`` int64 (default ``0 .. T-1``); must increase by 1 inside a segment.
        reset: ``[B, T]`` bool, the token starts a new segment from ``W0`` (default: none).
        valid: ``[B, T]`` bool, False for padding (output 0, no update); default all valid.
        carry: the state to continue (``W_i`` and a partial mini-batch's accumulators); None = ``W0``.
        causal: causal inside a mini-batch (LM) or not (video: every token sees the whole mini-batch).
        eps: inner LayerNorm epsilon. inner_norm: False drops the inner LayerNorm (loss and output).

    Returns:
        ``(z [B, H, T, d], carry after the last token)``.
    """
    positions, reset, valid, token_scale, carry = fill_defaults(q, positions, reset, valid, token_scale, carry, params)
    grid = build_grid(positions, mini_batch_size, reset, valid)
    return scan_minibatches(dual_step, grid, q, k, target, lr, token_scale, params, carry, causal=causal, eps=eps,
                            inner_norm=inner_norm, prepare=dual_prepare)



def ttt_dual_flops(seq_len: int, heads: int, layer_shapes: list[tuple[int, int]], mini_batch_size: int) -> float:
    """Forward FLOPs per token of :func:`ttt_dual` (a multiply-add = 2 FLOPs) for one row starting fresh.

    Per mini-batch of ``b`` tokens, head, and inner layer ``l`` of shape ``d_in x d_out`` (the matmuls of
    :func:`dual_prepare` and :func:`dual_step` with zero pending accumulators, the steady state of a scan):

    * keys' forward ``X_k W_l`` and, for ``l = 0``, the queries' ``X_q W_0`` in the same matmul; for ``l > 0``
      the queries' ``X_q W_l`` is separate: ``2 x 2 b d_in d_out`` either way;
    * query-key products ``X_q X_k^T`` (for ``l = 0`` in :func:`dual_prepare`): ``2 b^2 d_in``;
    * the dual correction ``(..) @ (lr ⊙ G)``: ``2 b^2 d_out``;  the accumulator ``X_k^T (lr ⊙ G)``: ``2 b d_in d_out``;
    * for ``l > 0``, the gradient sent to the layer below, ``G_l W_l^T``: ``2 b d_in d_out``.

    Per token, with ``S' = ceil(S / b) b`` (positions ``0 .. S-1``; the last mini-batch is padded):

        ``(S'/S) H sum_l [2 b (d_in + d_out) + 6 d_in d_out + (2 d_in d_out if l > 0)]``

    (TTT-Linear, ``d x d``: ``H (4 b d + 6 d^2)``; TTT-MLP, ``d x 4d, 4d x d``: ``H (20 b d + 56 d^2)``).
    LayerNorms, GELUs and the weight commits are elementwise and not counted.
    """
    if seq_len < 1:
        raise ValueError(f"ttt_dual_flops: seq_len must be >= 1, got {seq_len}")
    b = mini_batch_size
    padded = -(-seq_len // b) * b
    per_token = sum(2 * b * (d_in + d_out) + 6 * d_in * d_out + (2 * d_in * d_out if i > 0 else 0)
                    for i, (d_in, d_out) in enumerate(layer_shapes))
    return float(heads * per_token) * padded / seq_len
