"""Gradient norms over parameters that live on different device meshes (FSDP x tensor parallelism).

With tensor parallelism some parameters are DTensors on the 2-D ``(dp_cp, tp)`` mesh and the rest on the
1-D ``dp_cp`` mesh; torch's ``clip_grad_norm_`` stacks all per-parameter norms into one tensor and refuses
operands on different meshes. Here the norms are taken per mesh (each a full, replicated value: a
DTensor norm reduces over the shards) and combined as plain numbers:

.. math::  \\lVert g \\rVert_2 = \\Big( \\sum_{\\text{mesh } m} \\lVert g_m \\rVert_2^2 \\Big)^{1/2}

A parameter replicated on the ``tp`` ranks (not tensor-parallel) lives on the ``dp_cp`` mesh only and is
counted once, as in a single process. Every rank gets the same total, so every rank takes the same
decision (clip, or stop on a non-finite gradient).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def _by_mesh(grads: list[Tensor]) -> dict[object, list[Tensor]]:
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    return groups


def per_parameter_norms(grads: list[Tensor]) -> list[Tensor]:
    """The 2-norm of each gradient in ``grads`` as a plain 0-d tensor (full norms of DTensors), in order."""
    from torch.distributed.tensor import DTensor

    index = {id(g): i for i, g in enumerate(grads)}
    out: list[Tensor | None] = [None] * len(grads)
    for group in _by_mesh(grads).values():
        for g, n in zip(group, torch._foreach_norm(group)):
            out[index[id(g)]] = n.full_tensor() if isinstance(n, DTensor) else n
    return out  # type: ignore[return-value]


def total_norm(grads: list[Tensor]) -> Tensor:
    """``sqrt(sum of squared per-parameter norms)`` in float32 (float64 for float64 gradients)."""
    norms = per_parameter_norms(grads)
    if not norms:
        return torch.zeros(())
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    device = norms[0].device
    return torch.stack([n.to(device=device, dtype=dtype) for n in norms]).square().sum().sqrt()


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale every gradient by ``min(1, max_norm / (||g|| + 1e-6))`` (torch's rule); returns ``||g||``."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    norm = total_norm(grads)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(dtype=g.dtype))  # a plain 0-d factor scales DTensor shards locally
    return norm
