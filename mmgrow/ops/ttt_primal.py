"""Primal form of mini-batch TTT and the per-token autograd reference (Sun et al. 2024, arXiv 2407.04620).

**Primal form.** The same maths as :mod:`mmgrow.ops.ttt_dual`, written with explicit per-token
effective weights: for every layer, the per-token gradients ``lr_s X_s^T G_s [L, d_in, d_out]`` are
summed cumulatively over the mini-batch (causal) or in full (non-causal), and

.. math::

    W_t = W_i - \\mathrm{tok}_t \\Big(A + \\sum_{s \\in M(t)} \\mathrm{lr}_s X_s^\\top G_s\\Big), \\qquad
    Z_t = X_{q,t} W_t + b_t.

It costs ``L d_in d_out`` memory per mini-batch (the dual form avoids that) and is what decoding
uses: one token is a one-column mini-batch continuing the pending accumulator ``A`` of the carry.

**Reference** (:func:`ttt_reference`): the float64 oracle. A plain loop over rows and tokens; each
token's gradient ``dl_s/dW (W_i)`` comes from :func:`torch.autograd.grad` through the LayerNorm and the
GELU (``create_graph=True``, so the outer gradients flow through it), independent of the closed-form
gradients used by the primal and dual forms.
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
    inner_forward,
    inner_output,
    keys_forward_and_grads,
    layer_norm,
)


def primal_step(q: Tensor, k: Tensor, target: Tensor, lr: Tensor, tok: Tensor, carry: InnerCarry,
                params: InnerParams, *, causal: bool, eps: float, inner_norm: bool, acc_zero: bool = False,
                pre: tuple[Tensor, ...] = ()) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One mini-batch in the primal form; same arguments and results as
    :func:`~mmgrow.ops.ttt_dual.dual_step`."""
    gamma, beta = params.ln_weight[None, :, None], params.ln_bias[None, :, None]
    inputs, grads = keys_forward_and_grads(k, target, carry.weights, carry.biases, gamma, beta, eps, inner_norm)
    x_q = q
    d_acc_w, d_acc_b = [], []
    num_layers = len(inputs)
    for i, (x_k, g) in enumerate(zip(inputs, grads, strict=True)):
        lg = lr.unsqueeze(-1) * g  # [B, H, L, d_out]
        per_token_w = x_k.unsqueeze(-1) * lg.unsqueeze(-2)  # [B, H, L, d_in, d_out]
        if causal:
            seen_w, seen_b = per_token_w.cumsum(dim=2), lg.cumsum(dim=2)
        else:
            seen_w = per_token_w.sum(dim=2, keepdim=True).expand_as(per_token_w)
            seen_b = lg.sum(dim=2, keepdim=True).expand_as(lg)
        if not acc_zero:
            seen_w = carry.acc_weights[i].unsqueeze(2) + seen_w
            seen_b = carry.acc_biases[i].unsqueeze(2) + seen_b
        w_eff = carry.weights[i].unsqueeze(2) - tok[..., None, None] * seen_w
        b_eff = carry.biases[i].unsqueeze(2) - tok.unsqueeze(-1) * seen_b
        z = (x_q.unsqueeze(-2) @ w_eff).squeeze(-2) + b_eff
        d_acc_w.append(per_token_w.sum(dim=2))
        d_acc_b.append(lg.sum(dim=2))
        x_q = gelu_tanh(z) if i < num_layers - 1 else z
    return x_q, d_acc_w, d_acc_b


def ttt_primal(q: Tensor, k: Tensor, target: Tensor, lr: Tensor, token_scale: Tensor, params: InnerParams, *,
               mini_batch_size: int, positions: Tensor | None = None, reset: Tensor | None = None,
               valid: Tensor | None = None, carry: InnerCarry | None = None, causal: bool = True,
               eps: float = INNER_LN_EPS, inner_norm: bool = True) -> tuple[Tensor, InnerCarry]:
    """Mini-batch TTT in the primal form; arguments and results as :func:`~mmgrow.ops.ttt_dual.ttt_dual`."""
    positions, reset, valid, token_scale, carry = fill_defaults(q, positions, reset, valid, token_scale, carry, params)
    grid = build_grid(positions, mini_batch_size, reset, valid)
    return scan_minibatches(primal_step, grid, q, k, target, lr, token_scale, params, carry, causal=causal, eps=eps,
                            inner_norm=inner_norm)


# --------------------------------------------------------------------------------------------------
# Per-token reference
# --------------------------------------------------------------------------------------------------


def _token_grads(k: Tensor, target: Tensor, weights: list[Tensor], biases: list[Tensor], gamma: Tensor,
                 beta: Tensor, eps: float, inner_norm: bool) -> list[Tensor]:
    """``dl/dW, dl/db`` of one token for all heads (``k, target [H, d]``) by autograd at ``W``.

    Differentiates w.r.t. a zero perturbation ``E`` of every weight (``W + E`` at ``E = 0``), so it
    works whether or not ``W`` itself requires grad, and keeps the graph for the outer gradients."""
    with torch.enable_grad():
        probes = [torch.zeros_like(p).requires_grad_(True) for p in [*weights, *biases]]
        n = len(weights)
        pred = inner_forward(k.unsqueeze(-2), [w + e for w, e in zip(weights, probes[:n], strict=True)],
                             [b + e for b, e in zip(biases, probes[n:], strict=True)]).squeeze(-2)
        out = layer_norm(pred, gamma, beta, eps) if inner_norm else pred
        loss = 0.5 * ((out - target) ** 2).sum()
        return list(torch.autograd.grad(loss, probes, create_graph=True))


def ttt_reference(q: Tensor, k: Tensor, target: Tensor, lr: Tensor, token_scale: Tensor, params: InnerParams, *,
                  mini_batch_size: int, positions: Tensor | None = None, reset: Tensor | None = None,
                  valid: Tensor | None = None, carry: InnerCarry | None = None, causal: bool = True,
                  eps: float = INNER_LN_EPS, inner_norm: bool = True) -> tuple[Tensor, InnerCarry]:
    """Per-token loop of mini-batch TTT; arguments and results as :func:`~mmgrow.ops.ttt_dual.ttt_dual`.

    For each row, token by token: restart from ``W0`` at a reset; add ``lr_t dl_t/dW (W_i)`` to the
    accumulator ``A``; read ``z_t = q_t + LN(f(q_t; W_i - tok_t A))`` (non-causal: once the whole
    mini-batch is accumulated); at slot ``b - 1`` commit ``W_{i+1} = W_i - tok_t A``, ``A = 0``.
    """
    positions, reset, valid, token_scale, carry = fill_defaults(q, positions, reset, valid, token_scale, carry, params)
    n = len(params.weights)
    rows_out, rows_state = [], []
    for row in range(q.shape[0]):
        start = [w[row] for w in carry.weights + carry.biases + carry.acc_weights + carry.acc_biases]
        out, state = _reference_row(q[row], k[row], target[row], lr[row], token_scale[row], params, start,
                                    positions[row].tolist(), reset[row].tolist(), valid[row].tolist(),
                                    mini_batch_size=mini_batch_size, causal=causal, eps=eps, inner_norm=inner_norm)
        rows_out.append(out)
        rows_state.append(state)
    stacked = [torch.stack([r[i] for r in rows_state]) for i in range(4 * n)]
    return torch.stack(rows_out), InnerCarry(stacked[:n], stacked[n:2 * n], stacked[2 * n:3 * n], stacked[3 * n:])


def _reference_row(q: Tensor, k: Tensor, target: Tensor, lr: Tensor, tok: Tensor, params: InnerParams,
                   start: list[Tensor], positions: list[int], reset: list[bool], valid: list[bool], *,
                   mini_batch_size: int, causal: bool, eps: float, inner_norm: bool
                   ) -> tuple[Tensor, list[Tensor]]:
    """One row: ``q, k, target [H, T, d]``, ``lr [H, T]``, ``tok [T]``, ``start`` = weights, biases and
    their accumulators ``[H, ...]``. Returns ``(z [H, T, d], final weights + biases + accumulators)``."""
    H, T, d = q.shape
    n = len(params.weights)
    gamma, beta = params.ln_weight, params.ln_bias
    state, acc = start[:2 * n], start[2 * n:]  # W_i then b_i; their accumulators
    outs = [q.new_zeros(H, d) for _ in range(T)]
    pending: list[int] = []  # non-causal: tokens waiting for the end of their mini-batch

    def read(t: int) -> Tensor:
        eff = [p - tok[t] * a for p, a in zip(state, acc, strict=True)]
        z = inner_forward(q[:, t].unsqueeze(-2), eff[:n], eff[n:]).squeeze(-2)
        return inner_output(q[:, t], z, gamma, beta, eps, inner_norm)

    def flush() -> None:
        for t in pending:
            outs[t] = read(t)
        pending.clear()

    for t in range(T):
        if not valid[t]:
            continue
        if reset[t]:
            flush()
            state = [*params.weights, *params.biases]
            acc = [torch.zeros_like(p) for p in state]
        grads = _token_grads(k[:, t], target[:, t], state[:n], state[n:], gamma, beta, eps, inner_norm)
        acc = [a + lr[:, t].reshape(H, *([1] * (a.dim() - 1))) * g for a, g in zip(acc, grads, strict=True)]
        if causal:
            outs[t] = read(t)
        else:
            pending.append(t)
        if positions[t] % mini_batch_size == mini_batch_size - 1:
            flush()
            state = [p - tok[t] * a for p, a in zip(state, acc, strict=True)]
            acc = [torch.zeros_like(a) for a in acc]
    flush()
    return torch.stack(outs, dim=1), state + acc
