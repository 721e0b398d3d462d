"""Inner models of the TTT memory layers and the closed-form gradient of their reconstruction loss.

Test-time training (Sun et al. 2024, arXiv 2407.04620): the hidden state of a TTT layer is the weight
set ``W`` of a small per-head inner model ``f(.; W)``, trained online on a self-supervised loss. Per
head, with head dimension ``d``:

* **TTT-Linear**: ``f(x) = x W1 + b1`` with ``W1 [d, d]``, ``b1 [d]``;
* **TTT-MLP**: ``f(x) = gelu(x W1 + b1) W2 + b2`` with ``W1 [d, 4d]``, ``W2 [4d, d]`` and the tanh
  approximation of GELU.

Row vectors left-multiply the weights, so a weight is stored ``[d_in, d_out]`` (key side first). The
reconstruction loss of token ``s`` (key ``k_s``, target ``y_s``) and the output for a query ``q`` are

.. math::

    \\ell_s(W) = \\tfrac12 \\lVert \\mathrm{LN}(f(k_s; W)) - y_s \\rVert^2, \\qquad
    o = q + \\mathrm{LN}(f(q; W))

with a per-head LayerNorm ``LN(z) = gamma * (z - mean z) / sqrt(var z + eps) + beta`` (biased
variance, ``eps = 1e-6``). Gradients w.r.t. every layer follow from ``G = dl/dZ`` at the layer's
output ``Z = X W + b``: ``dl/dW = X^T G`` and ``dl/db = G``. For the last layer ``G`` is the closed form

.. math::

    g = (\\mathrm{LN}(z) - y) \\odot \\gamma, \\quad
    \\frac{\\partial \\ell}{\\partial z} = \\frac{1}{\\sigma}\\Big(g - \\overline{g}
    - \\hat z\\, \\overline{g \\odot \\hat z}\\Big), \\quad \\hat z = (z - \\bar z)/\\sigma

(bars are means over the head dimension), and through the MLP ``G1 = (G2 W2^T) * gelu'(Z1)`` with the
analytic derivative of the tanh-GELU. No autograd runs inside the inner loop; the outer loss
differentiates through these formulas with ordinary autograd.

Everything here works on any leading shape ``[..., L, d]`` with weights ``[..., d_in, d_out]`` and
biases ``[..., d_out]`` broadcasting against it; LayerNorm parameters come pre-shaped to broadcast
against ``z`` (e.g. ``[1, H, 1, d]`` for ``z [B, H, L, d]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

INNER_KINDS = ("linear", "mlp")
INNER_LN_EPS = 1e-6
MLP_EXPANSION = 4
TARGET_STD_EPS = 1e-8
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def inner_shapes(kind: str, head_dim: int) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of each inner layer: one ``d x d`` layer (linear) or ``d x 4d``, ``4d x d`` (mlp)."""
    if kind == "linear":
        return [(head_dim, head_dim)]
    if kind == "mlp":
        hidden = MLP_EXPANSION * head_dim
        return [(head_dim, hidden), (hidden, head_dim)]
    raise ValueError(f"unknown TTT inner model {kind!r}; expected one of {INNER_KINDS}")


@dataclass
class InnerParams:
    """The learned (outer-loop) parameters of the inner model of ``H`` heads.

    weights:   per inner layer, the initial weights ``W0 [H, d_in, d_out]``;
    biases:    per inner layer, the initial biases ``b0 [H, d_out]``;
    ln_weight: ``gamma [H, d]`` of the per-head LayerNorm; ln_bias: ``beta [H, d]``.
    """

    weights: list[Tensor]
    biases: list[Tensor]
    ln_weight: Tensor
    ln_bias: Tensor


@dataclass
class InnerCarry:
    """What the mini-batch scan carries from one mini-batch to the next, per row and head.

    weights / biases: the weights ``W_i [B, H, d_in, d_out]`` / ``b_i [B, H, d_out]`` at which the
        tokens of the current mini-batch take their gradients;
    acc_weights / acc_biases: ``sum_s lr_s dl_s/dW (W_i)`` over the tokens of the current mini-batch
        seen so far (zero at a mini-batch boundary). Token ``t`` of the mini-batch uses
        ``W_i - tok_t * acc``; the mini-batch commits ``W_{i+1} = W_i - tok_last * acc``.
    """

    weights: list[Tensor]
    biases: list[Tensor]
    acc_weights: list[Tensor]
    acc_biases: list[Tensor]

    @classmethod
    def initial(cls, params: InnerParams, batch_size: int) -> InnerCarry:
        """``W0`` tiled over the batch, nothing accumulated."""
        weights = [w.unsqueeze(0).expand(batch_size, *w.shape) for w in params.weights]
        biases = [b.unsqueeze(0).expand(batch_size, *b.shape) for b in params.biases]
        return cls(weights, biases, [torch.zeros_like(w) for w in weights], [torch.zeros_like(b) for b in biases])

    def reset_rows(self, rows: Tensor, params: InnerParams) -> InnerCarry:
        """Rows ``rows [B]`` (bool) start over from ``W0`` with nothing accumulated."""
        def pick(fresh: Tensor, old: Tensor) -> Tensor:
            mask = rows.reshape(-1, *([1] * (old.dim() - 1)))
            return torch.where(mask, fresh.unsqueeze(0).to(old.dtype), old)

        def zero(old: Tensor) -> Tensor:
            return old.masked_fill(rows.reshape(-1, *([1] * (old.dim() - 1))), 0.0)

        return InnerCarry([pick(w, o) for w, o in zip(params.weights, self.weights, strict=True)],
                          [pick(b, o) for b, o in zip(params.biases, self.biases, strict=True)],
                          [zero(a) for a in self.acc_weights], [zero(a) for a in self.acc_biases])


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def gelu_tanh(x: Tensor) -> Tensor:
    """``0.5 x (1 + tanh(c (x + a x^3)))`` with ``c = sqrt(2/pi)``, ``a = 0.044715``."""
    return F.gelu(x, approximate="tanh")


def gelu_tanh_derivative(x: Tensor) -> Tensor:
    """Exact derivative of :func:`gelu_tanh`:
    ``0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 a x^2)``, ``u = c (x + a x^3)``."""
    th = torch.tanh(_GELU_C * (x + _GELU_A * x * x * x))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)


def layer_norm(z: Tensor, gamma: Tensor, beta: Tensor, eps: float = INNER_LN_EPS) -> Tensor:
    """Per-head LayerNorm over the last dimension (biased variance); ``gamma``/``beta`` broadcast to ``z``."""
    mean = z.mean(dim=-1, keepdim=True)
    centred = z - mean
    var = (centred * centred).mean(dim=-1, keepdim=True)
    return gamma * centred * torch.rsqrt(var + eps) + beta


def ln_l2_grad(z: Tensor, target: Tensor, gamma: Tensor, beta: Tensor, eps: float = INNER_LN_EPS) -> Tensor:
    """Closed-form ``d/dz 0.5 ||LN(z) - target||^2`` (per row of ``z [..., d]``); see the module docstring."""
    # written with few, fused ops: it runs once per mini-batch inside the sequential scan, where the
    # per-op overhead (not the arithmetic) is the cost
    var, mean = torch.var_mean(z, dim=-1, keepdim=True, correction=0)
    inv_std = (var + eps).rsqrt()
    z_hat = (z - mean) * inv_std
    g = torch.addcmul(beta - target, gamma, z_hat) * gamma
    centred_g = g - g.mean(dim=-1, keepdim=True)
    return inv_std * torch.addcmul(centred_g, z_hat, (g * z_hat).mean(dim=-1, keepdim=True), value=-1.0)


def normalized_target(v: Tensor, k: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """TTT-video's reconstruction target ``gamma * (u - mean u) / (std u + 1e-8) + beta``, ``u = v - k``.

    ``std`` is the unbiased standard deviation over the head dimension and ``gamma``/``beta`` are the
    inner LayerNorm's own parameters, as in ttt-video-dit's ``ln_reconstruction_target`` (which adds
    ``k`` back to ``v`` only for the op to subtract it again).
    """
    u = v - k
    return gamma * (u - u.mean(dim=-1, keepdim=True)) / (u.std(dim=-1, keepdim=True) + TARGET_STD_EPS) + beta


# --------------------------------------------------------------------------------------------------
# Forward / gradients of the inner model
# --------------------------------------------------------------------------------------------------


def inner_forward(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    """``f(x; W)`` for ``x [..., L, d]``: layers ``X W + b`` with tanh-GELU between them."""
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if i > 0:
            x = gelu_tanh(x)
        x = x @ w + b.unsqueeze(-2)
    return x


def keys_forward_and_grads(k: Tensor, target: Tensor, weights: list[Tensor], biases: list[Tensor], gamma: Tensor,
                           beta: Tensor, eps: float = INNER_LN_EPS, inner_norm: bool = True
                           ) -> tuple[list[Tensor], list[Tensor]]:
    """The keys' pass through ``f(.; W)`` and the loss gradients at every layer's output.

    Args:
        k, target: ``[..., L, d]``; weights ``[..., d_in, d_out]``; biases ``[..., d_out]``.
        inner_norm: False drops the LayerNorm from the loss (``l = 0.5 ||f(k) - y||^2``), for the
            linear-attention equivalence.

    Returns:
        ``(inputs, grads)``: per layer its input ``X_l [..., L, d_in]`` (``k``, then ``gelu(Z1)``) and
        ``G_l = dl/dZ_l [..., L, d_out]``.
    """
    inputs, pre_acts = [], []
    x = k
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if i > 0:
            x = gelu_tanh(pre_acts[-1])
        inputs.append(x)
        pre_acts.append(x @ w + b.unsqueeze(-2))
    return inputs, layer_grads(pre_acts, target, weights, gamma, beta, eps, inner_norm)


def layer_grads(pre_acts: list[Tensor], target: Tensor, weights: list[Tensor], gamma: Tensor, beta: Tensor,
                eps: float = INNER_LN_EPS, inner_norm: bool = True) -> list[Tensor]:
    """``G_l = dl/dZ_l`` for every layer from the keys' pre-activations ``Z_l [..., L, d_out]``:
    the closed-form LN + L2 gradient at the last layer, then ``G_{l-1} = (G_l W_l^T) * gelu'(Z_{l-1})``."""
    grad = ln_l2_grad(pre_acts[-1], target, gamma, beta, eps) if inner_norm else pre_acts[-1] - target
    grads = [grad]
    for i in range(len(weights) - 1, 0, -1):
        grad = (grad @ weights[i].transpose(-1, -2)) * gelu_tanh_derivative(pre_acts[i - 1])
        grads.insert(0, grad)
    return grads


def inner_output(q: Tensor, z: Tensor, gamma: Tensor, beta: Tensor, eps: float = INNER_LN_EPS,
                 inner_norm: bool = True) -> Tensor:
    """The TTT output ``q + LN(z)`` for the inner model's output ``z`` (``q + z`` without the norm)."""
    return q + (layer_norm(z, gamma, beta, eps) if inner_norm else z)
