"""Tensor surgery shared by the layers' width-growth hooks (attention heads, MLP hidden units).

Growth gives a projection *new* parameter tensors rather than resizing in place, so the growth
reports (which find new parameters by tensor identity) list every widened projection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def set_linear(lin: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    """Give ``lin`` new parameter tensors (new identities: growth reports them as new parameters),
    keeping ``requires_grad``; ``bias`` None leaves the bias as it is."""
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=lin.weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = weight.shape


def normal_like(shape: tuple[int, ...], std: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``N(0, std)`` drawn in float32 on the CPU (the same numbers for every dtype and device), as ``like``."""
    return (torch.randn(shape, generator=generator) * std).to(device=like.device, dtype=like.dtype)


def replica_noise(shape: torch.Size, groups: Tensor, counts: Tensor, std: float, like: Tensor,
                   generator: torch.Generator | None) -> Tensor:
    """``[D, U, ...]`` noise centred over the replicas of each source unit (dim 1): ``groups [U]``
    names each unit's source, ``counts`` the replicas per source; a unit without copies gets 0."""
    eps = normal_like(tuple(shape), std, like, generator)
    idx = groups.to(like.device)
    mean = eps.new_zeros((shape[0], counts.numel(), *shape[2:])).index_add_(1, idx, eps)
    mean = mean / counts.to(device=like.device, dtype=like.dtype).view(1, -1, *([1] * (len(shape) - 2)))
    return eps - mean[:, idx]


def extend_mask(mask: nn.Module, tail: Tensor) -> None:
    """Append ``tail [n]`` to a growth mask's ``is_new`` buffer (the layer does not build masks)."""
    mask.is_new = torch.cat((mask.is_new, tail.to(mask.is_new.device)))
