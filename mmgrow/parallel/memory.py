"""Per-rank training-state memory of a layout: what to expect before launching a run.

For ``N`` parameters of which a fraction ``f_tp`` is tensor-parallel (attention projections and MLP
weights), on a ``(dp, cp, tp)`` mesh (:mod:`mmgrow.parallel.mesh`), with ``S = dp * cp`` the FSDP
sharding degree, each rank holds

.. math::

    N_{rank} = \\frac{N f_{tp}}{tp \\cdot S} + \\frac{N (1 - f_{tp})}{S} \\quad\\text{(FSDP)}, \\qquad
    N_{rank} = \\frac{N f_{tp}}{tp} + N (1 - f_{tp}) \\quad\\text{(DDP: } S = 1\\text{)}

parameters (rounded up per tensor: FSDP pads dim 0 to a multiple of ``S``), and as many gradient
entries; AdamW adds two float32 moments per parameter. Bytes per rank:

.. math::  M = N_{rank} (b_{param} + b_{grad} + 8) \\; + \\; \\text{one gathered block (FSDP, transient)}

This is the *state*; activations come on top and scale with tokens per rank (``T / cp`` per sequence)
and are cut by activation checkpointing -- ``benchmarks/fsdp_memory.py`` measures both for a given
model. The estimate is exact for the states of the largest rank (FSDP gives rank r rows [r c, (r+1) c) of each
tensor, c = ceil(rows / S); the last rank may hold fewer): tests and the benchmark check it against the bytes held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from mmgrow.parallel.mesh import ParallelDims
from mmgrow.parallel.tensor_parallel import planned_layers

ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq in float32


@dataclass(frozen=True)
class StateMemory:
    """Bytes per rank of parameters, gradients and optimiser state, and (approximately) the largest
    transient gather: one block's parameters, all-gathered while it runs."""

    parameters: int
    gradients: int
    optimizer: int
    gathered_block: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    def as_mib(self) -> dict[str, float]:
        return {k: round(v / 2**20, 3) for k, v in (("parameters", self.parameters), ("gradients", self.gradients),
                                                   ("optimizer", self.optimizer), ("total", self.total),
                                                   ("gathered_block", self.gathered_block))}


def _tensor_parallel_styles(model: nn.Module, tp: int) -> dict[str, str]:
    """``{parameter name: "colwise" | "rowwise"}`` for every parameter a layer's plan splits."""
    styles = {}
    for prefix, layer in planned_layers(model):
        for child, style in layer.tensor_parallel_plan(tp).items():
            for n, _ in getattr(layer, child).named_parameters():
                styles[f"{prefix}.{child}.{n}" if prefix else f"{child}.{n}"] = style
    return styles


def estimate_state_memory(model: nn.Module, dims: ParallelDims, *, fsdp: bool = True, param_bytes: int = 4,
                          grad_bytes: int = 4) -> StateMemory:
    """Per-rank bytes of the training state of ``model`` (a single-device, unsharded model) on ``dims``.

    Tensor-parallel parameters are those the layers' ``tensor_parallel_plan`` names (split over ``tp``
    along their first dimension for colwise layers, second for rowwise: either way ``1 / tp`` of them);
    FSDP then splits every parameter's first dimension over ``S = dp * cp``, padded to a multiple of ``S``."""
    styles = _tensor_parallel_styles(model, dims.tp) if dims.tp > 1 else {}
    shard = dims.dp * dims.cp if fsdp else 1
    local = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = list(p.shape) or [1]
        style = styles.get(name)
        if style == "colwise":  # output features: weight rows and bias
            shape[0] //= dims.tp
        elif style == "rowwise" and len(shape) >= 2:  # input features; a rowwise bias stays whole
            shape[1] //= dims.tp
        shape[0] = math.ceil(shape[0] / shard)  # FSDP's padded dim-0 chunk
        local += math.prod(shape)
    blocks = list(getattr(model, "blocks", []))
    block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    # approximate: the norms of a block are not tensor-parallel, but they are tiny
    gathered = block * param_bytes // dims.tp if fsdp and shard > 1 else 0
    return StateMemory(parameters=local * param_bytes, gradients=local * grad_bytes,
                       optimizer=local * ADAMW_STATE_BYTES, gathered_block=gathered)

