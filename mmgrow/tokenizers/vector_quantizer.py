"""Vector quantiser with EMA codebook, straight-through gradients and dead-code restarts.

Nearest code (VQ-VAE, van den Oord et al. 2017, arXiv 1711.00937, Eq. 1-3)::

    k(z)  = argmin_i ||z - e_i||^2
    q     = e_k(z),     output  sg(q) + (z - sg(z))           (straight-through: value q, dq/dz = I)
    loss  = beta * ||z - sg(q)||^2                            (commitment)
          + ||sg(z) - q||^2                                   (codebook term, only when ema_decay is None)

Both squared norms are means over all elements. With ``ema_decay = gamma`` the codebook is not
learned by gradients but by exponential moving averages (Sec. A.1 of the paper), here of batch
*fractions* so the statistics do not depend on the batch size. For a batch of ``M`` vectors::

    n_i = |{z : k(z) = i}| / M                  s_i = sum_{z : k(z) = i} z / M
    N_i <- gamma N_i + (1 - gamma) n_i           m_i <- gamma m_i + (1 - gamma) s_i
    N~_i = (N_i + eps) / (sum_j N_j + K eps) * sum_j N_j          (Laplace smoothing)
    e_i  = m_i / N~_i

``N_i`` (buffer ``cluster_size``) is the EMA usage fraction of code ``i`` (uniform use: ``1/K``).
A code whose ``N_i`` falls below ``dead_code_threshold`` is *dead*: it is restarted at a random
encoder output of the current batch (k-means++ seeding: rows far from every kept code are
likelier), with ``N_i`` reset to the uniform share ``sum_j N_j / K``
(and ``m_i = e_i N_i``). Without EMA the usage fractions are tracked the same way (decay
:data:`USAGE_DECAY`) only to find dead codes. The first training batch initialises the whole
codebook from random encoder outputs (data-dependent init; buffer ``initialised``).
Statistics and restarts change only in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

USAGE_DECAY = 0.99
"""Decay of the usage EMA that finds dead codes when the codebook is learned by gradients."""


@dataclass
class QuantizerOutput:
    """Result of :meth:`VectorQuantizer.forward` for ``z [..., C]``.

    quantized: ``[..., C]`` nearest codes, straight-through (gradient flows to ``z`` unchanged).
    codes: ``[...]`` int64 indices of the nearest codes.
    loss: 0-d commitment loss (+ codebook loss when the codebook is learned by gradients).
    perplexity: 0-d ``exp(-sum_i p_i log p_i)`` of the code distribution ``p`` in this batch.
    usage: 0-d fraction of the ``K`` codes used at least once in this batch.
    """

    quantized: Tensor
    codes: Tensor
    loss: Tensor
    perplexity: Tensor
    usage: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser of ``z [..., code_dim]`` onto ``num_codes`` codes (module doc).

    Args:
        num_codes: codebook size ``K``.
        code_dim: code width ``C``.
        beta: weight of the commitment loss.
        ema_decay: ``gamma`` of the EMA codebook update, or None to learn the codebook by gradients.
        dead_code_threshold: usage fraction below which a code is restarted (0 disables restarts).
        eps: Laplace smoothing constant.
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, ema_decay: float | None = 0.99,
                 dead_code_threshold: float = 1e-3, eps: float = 1e-5) -> None:
        super().__init__()
        for name, value in (("num_codes", num_codes), ("code_dim", code_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VectorQuantizer: {name} must be a positive int, got {value!r}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer: ema_decay must be in [0, 1) or None, got {ema_decay!r}")
        if beta < 0 or dead_code_threshold < 0 or eps <= 0:
            raise ValueError(f"VectorQuantizer: expected beta >= 0, dead_code_threshold >= 0 and eps > 0, got "
                             f"beta={beta}, dead_code_threshold={dead_code_threshold}, eps={eps}")
        self.num_codes, self.code_dim = num_codes, code_dim
        self.beta, self.ema_decay = beta, ema_decay
        self.dead_code_threshold, self.eps = dead_code_threshold, eps

        codebook = torch.randn(num_codes, code_dim)
        if ema_decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("embed_sum", codebook / num_codes)
        self.register_buffer("cluster_size", torch.full((num_codes,), 1.0 / num_codes))
        self.register_buffer("initialised", torch.tensor(False))

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay is not None

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, "
                f"ema_decay={self.ema_decay}, dead_code_threshold={self.dead_code_threshold}")

    # ---------------------------------------------------------------------------------------------

    def nearest(self, flat: Tensor) -> Tensor:
        """``[M, C]`` -> ``[M]`` int64: ``argmin_i ||z - e_i||^2`` (first minimum on ties).

        Expanded as ``||e_i||^2 - 2 z.e_i`` (``||z||^2`` is the same for every code), so memory is
        ``M x K``, not ``M x K x C``."""
        dtype = torch.promote_types(flat.dtype, torch.float32)  # bf16 distances would mis-rank codes
        e = self.codebook.detach().to(dtype)
        dist = (e * e).sum(-1) - 2.0 * flat.detach().to(dtype) @ e.t()
        return dist.argmin(dim=-1)

    def lookup(self, codes: Tensor) -> Tensor:
        """``[...]`` int64 code indices -> ``[..., C]`` codes."""
        if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
            raise TypeError(f"VectorQuantizer.lookup expects integer codes, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise IndexError(f"VectorQuantizer.lookup: codes must be in [0, {self.num_codes}), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes.long(), self.codebook)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """``z [..., C]`` float -> :class:`QuantizerOutput` (equations in the module doc)."""
        if z.dim() < 1 or z.shape[-1] != self.code_dim or not z.is_floating_point():
            raise ValueError(f"VectorQuantizer expects float z of shape [..., {self.code_dim}], got "
                             f"{tuple(z.shape)} {z.dtype}")
        flat = z.reshape(-1, self.code_dim)
        if self.training and not bool(self.initialised):
            self._restart(torch.ones(self.num_codes, dtype=torch.bool, device=z.device), flat)
            self.initialised.fill_(True)
        codes = self.nearest(flat)
        q = F.embedding(codes, self.codebook).to(z.dtype)  # codebook dtype may differ under autocast
        loss = self.beta * F.mse_loss(flat, q.detach())
        if not self.uses_ema:
            loss = loss + F.mse_loss(q, flat.detach())
        counts = torch.bincount(codes, minlength=self.num_codes).to(self.cluster_size.dtype)
        probs = counts / max(flat.shape[0], 1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-30))).sum())
        usage = (counts > 0).float().mean()
        if self.training:
            self._update_statistics(flat.detach(), codes, probs)
        quantized = q.detach() + (flat - flat.detach())  # value exactly q, gradient exactly identity
        return QuantizerOutput(quantized=quantized.reshape(z.shape), codes=codes.reshape(z.shape[:-1]),
                               loss=loss, perplexity=perplexity.detach(), usage=usage.detach())

    # ---------------------------------------------------------------------------------------------
    # training-time updates
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_statistics(self, flat: Tensor, codes: Tensor, probs: Tensor) -> None:
        """EMA of usage fractions (and, with EMA, of code sums and the codebook), then restarts."""
        gamma = self.ema_decay if self.uses_ema else USAGE_DECAY
        self.cluster_size.mul_(gamma).add_(probs.to(self.cluster_size.dtype), alpha=1.0 - gamma)
        if self.uses_ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat.to(self.embed_sum.dtype))
            self.embed_sum.mul_(gamma).add_(sums / flat.shape[0], alpha=1.0 - gamma)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            dead = self.cluster_size < self.dead_code_threshold
            if bool(dead.any()):
                self._restart(dead, flat)

    @torch.no_grad()
    def _restart(self, which: Tensor, flat: Tensor) -> None:
        """Move the codes ``which [K] bool`` onto rows of ``flat [M, C]`` chosen by k-means++ seeding
        (Arthur & Vassilvitskii 2007): each pick is a row drawn with probability proportional to its
        squared distance to the nearest kept or already picked code. Rare inputs that no code
        represents well (a small coloured object on a large background) thus get codes first, and
        no row is picked twice while unpicked rows are left."""
        n = int(which.sum())
        if n == 0 or flat.shape[0] == 0:
            return
        rows = flat.detach().to(self.codebook.dtype)
        kept = self.codebook.detach()[~which]
        if kept.shape[0]:
            dist = ((kept * kept).sum(-1) - 2.0 * rows @ kept.t()).amin(-1) + (rows * rows).sum(-1)
            dist = dist.clamp_min(0.0)
        else:
            dist = torch.full((rows.shape[0],), float("inf"), dtype=rows.dtype, device=rows.device)
        picks = []
        for _ in range(n):
            finite = torch.isfinite(dist).all() and float(dist.sum()) > 0
            probs = dist / dist.sum() if finite else torch.ones_like(dist)
            pick = int(torch.multinomial(probs, 1))
            picks.append(pick)
            dist = torch.minimum(dist, ((rows - rows[pick]) ** 2).sum(-1))
        self.codebook.data[which] = rows[torch.tensor(picks, device=rows.device)]
        share = self.cluster_size.sum() / self.num_codes
        self.cluster_size[which] = share
        if self.uses_ema:
            self.embed_sum[which] = self.codebook[which] * share
