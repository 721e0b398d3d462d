"""SwiGLU feed-forward (Shazeer 2020, arXiv 2002.05202), the MLP of LLaMA-style blocks.

.. math::  \\operatorname{MLP}(x) = W_{down} \\big( \\operatorname{SiLU}(W_{gate} x) \\odot W_{up} x \\big)

**Blockwise feed-forward** (``chunk``, the Blockwise Parallel Transformer's second half): the MLP
acts on each token alone, so it can run over ``chunk`` tokens at a time. With gradients enabled each
chunk is recomputed in the backward pass (activation checkpointing), so the ``[T, hidden]``
intermediates never exist at once: activation memory ``O(chunk * hidden)`` instead of ``O(T * hidden)``,
for one extra MLP forward.

**Width growth** (hooks for :mod:`mmgrow.growth`): :meth:`SwiGLU.duplicate_hidden` copies hidden
units (Net2Net: same incoming rows, outgoing columns divided by the replication count),
:meth:`SwiGLU.add_hidden` appends fresh ones for masked structural growth. ``hidden_mask`` (None by
default, then free) is a ``GrowthMask`` over the ``hidden`` units, applied to
``SiLU(W_gate x) * W_up x`` before ``W_down`` (in every chunk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmgrow.layers.unit_growth import extend_mask, normal_like, replica_noise, set_linear


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int = 8) -> int:
    """Hidden size ``ceil(mlp_ratio * dim)`` rounded up to a multiple of ``multiple_of``.

    The default ratio 8/3 keeps a SwiGLU (three matrices) at the parameter count of a 4x GELU MLP
    (two matrices); rounding to a multiple of 8 keeps matmuls aligned for tensor cores.
    """
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
    hidden = math.ceil(mlp_ratio * dim - 1e-9)  # 8/3 * 96 must give 256, not 257 from rounding noise
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLU(nn.Module):
    """``x [..., D] -> [..., D]`` through a gated hidden layer of size ``hidden``."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, chunk: int | None = None) -> None:
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"SwiGLU: chunk must be a positive number of tokens or None, got {chunk}")
        self.dim = dim
        self.hidden = hidden
        self.chunk = chunk
        self.w_gate = nn.Linear(dim, hidden, bias=bias)
        self.w_up = nn.Linear(dim, hidden, bias=bias)
        self.w_down = nn.Linear(hidden, dim, bias=bias)
        # Masked structural growth: a GrowthMask over the hidden units (None = no cost).
        self.hidden_mask: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., T, D] -> [..., T, D]``; chunked over ``T`` when :attr:`chunk` is set."""
        if self.chunk is None or x.dim() < 2 or x.shape[-2] <= self.chunk:
            return self._mlp(x)
        pieces = x.split(self.chunk, dim=-2)
        if torch.is_grad_enabled() and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return torch.cat([checkpoint(self._mlp, p, use_reentrant=False) for p in pieces], dim=-2)
        return torch.cat([self._mlp(p) for p in pieces], dim=-2)

    def _mlp(self, x: Tensor) -> Tensor:
        h = F.silu(self.w_gate(x)) * self.w_up(x)
        if self.hidden_mask is not None:
            h = self.hidden_mask(h)
        return self.w_down(h)

    def tensor_parallel_plan(self, tp: int) -> dict[str, str]:
        """Hidden units split over ``tp`` ranks: ``W_gate, W_up`` column-split, ``W_down`` row-split."""
        if self.hidden % tp != 0:
            raise ValueError(f"SwiGLU: tensor_parallel={tp} must divide the hidden size {self.hidden}")
        if self.hidden_mask is not None:
            raise ValueError("SwiGLU: a growth mask over hidden units cannot be tensor-parallel; finish the growth "
                             "ramp before splitting the MLP")
        return {"w_gate": "colwise", "w_up": "colwise", "w_down": "rowwise"}

    def residual_outputs(self) -> list[nn.Linear]:
        """The projection writing into the residual stream (zeroed by function-preserving growth)."""
        return [self.w_down]

    # --------------------------------------------------------------------------------------------- width growth

    @torch.no_grad()
    def duplicate_hidden(self, sources: Sequence[int] | Tensor, *, noise_std: float = 0.0,
                         generator: torch.Generator | None = None) -> None:
        """Net2WiderNet: append ``n = len(sources)`` hidden units, unit ``hidden + j`` a copy of unit
        ``sources[j]`` (its ``W_gate`` and ``W_up`` rows and biases).

        A copy has the same activation ``h_u = SiLU(g_u) u_u`` as its source, so dividing the
        ``W_down`` columns of a source and of every copy of it by its replication count
        ``c_u = 1 + #{j : sources[j] = u}`` keeps ``W_down h`` unchanged up to float rounding. With
        ``noise_std > 0`` replica ``i`` gets ``W_down[:, u] / c_u + eps_i``, ``eps ~ N(0, noise_std)``
        centred over the replicas (``sum_i eps_i = 0``): symmetry broken, sum unchanged. Noise is
        drawn in float32 on the CPU from ``generator`` (the global RNG when None). An attached
        :attr:`hidden_mask` grows with the units (a copy inherits its source's entry).
        """
        src = torch.as_tensor(sources, dtype=torch.long).cpu().reshape(-1)
        if src.numel() == 0:
            return
        if int(src.min()) < 0 or int(src.max()) >= self.hidden:
            raise ValueError(f"SwiGLU: source units must lie in [0, {self.hidden}), got {src.tolist()}")
        if noise_std < 0:
            raise ValueError(f"SwiGLU: noise_std must be >= 0, got {noise_std}")
        units = torch.cat((torch.arange(self.hidden), src))  # the source of every unit after growth
        counts = torch.bincount(units, minlength=self.hidden)  # replication count c_u
        for lin in (self.w_gate, self.w_up):
            idx = units.to(lin.weight.device)
            set_linear(lin, lin.weight[idx], None if lin.bias is None else lin.bias[idx])
        w = self.w_down.weight
        w_new = w[:, units.to(w.device)] / counts[units].to(device=w.device, dtype=w.dtype)
        if noise_std > 0:
            w_new = w_new + replica_noise(w_new.shape, units, counts, noise_std, w, generator)
        set_linear(self.w_down, w_new, None)
        if self.hidden_mask is not None:
            extend_mask(self.hidden_mask, self.hidden_mask.is_new[src.to(self.hidden_mask.is_new.device)])
        self.hidden += src.numel()

    @torch.no_grad()
    def add_hidden(self, count: int, *, init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Append ``count`` fresh hidden units: ``W_gate``, ``W_up`` rows and ``W_down`` columns
        ``~ N(0, init_std)`` (float32 on the CPU from ``generator``, the global RNG when None), new
        biases 0.

        On their own they change the function; masked structural growth puts them behind
        :attr:`hidden_mask` (value 0 on the new units), so ``W_down`` sees exactly 0 from them. An
        attached hidden_mask grows here, the new units marked new; attaching one is the caller's
        business.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"SwiGLU: count must be an int >= 0, got {count!r}")
        if count == 0:
            return
        for lin in (self.w_gate, self.w_up):
            weight = torch.cat((lin.weight, normal_like((count, self.dim), init_std, lin.weight, generator)))
            set_linear(lin, weight, None if lin.bias is None else torch.cat((lin.bias, lin.bias.new_zeros(count))))
        w = self.w_down.weight
        set_linear(self.w_down, torch.cat((w, normal_like((self.dim, count), init_std, w, generator)), dim=1), None)
        if self.hidden_mask is not None:
            extend_mask(self.hidden_mask, torch.ones(count, dtype=torch.bool))
        self.hidden += count
