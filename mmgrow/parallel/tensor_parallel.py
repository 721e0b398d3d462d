"""Tensor parallelism (Megatron-style) on the ``tp`` axis, declared by the layers that support it.

A layer opts in with a ``tensor_parallel_plan(tp)`` method returning ``{child name: "colwise" | "rowwise"}``
(a capability: this module never looks at class names). ``colwise`` splits a linear layer's *output*
features over the ``tp`` ranks (each rank computes ``x W_r^T`` for its rows ``W_r``); ``rowwise`` splits
its *input* features and all-reduces the partial products:

.. math::  y = \\sum_r h_r W_{down, r}^\\top, \\qquad h_r = \\operatorname{SiLU}(x W_{gate,r}^\\top) \\odot x W_{up,r}^\\top

so a column-split pair followed by a row-split projection needs one all-reduce in the forward (and one
in the backward, for the gradient of the replicated input). Attention splits whole heads (``q, k, v``
colwise, ``out`` rowwise): each rank attends with ``H / tp`` query and ``Hk / tp`` key/value heads, so
the attention core itself -- ring attention over the ``cp`` axis included -- runs unchanged on fewer
heads. Layers without a plan (norms, embeddings, recurrent mixers) stay replicated on the ``tp`` ranks
and compute the same thing on each; their gradients are identical there, so nothing needs reducing.

The DTensor styles keep the layer's inputs and outputs plain (replicated) tensors, so the rest of the
model does not know it is split. After :func:`apply_tensor_parallel`, a planned layer's
``tensor_parallel_size`` attribute is ``tp`` (its ``forward`` reads local head counts from it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

STYLES = ("colwise", "rowwise")


def planned_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every submodule that declares ``tensor_parallel_plan``."""
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "tensor_parallel_plan", None))]


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> list[str]:
    """Split every planned layer of ``model`` over the 1-D mesh ``tp_mesh``; returns the layers split.

    Raises ``ValueError`` when a plan names an unknown style or a child that is not an ``nn.Linear``,
    and whatever the layer's own plan raises (e.g. heads not divisible by ``tp``)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    done = []
    for name, layer in planned_layers(model):
        plan = layer.tensor_parallel_plan(tp)
        for child, style in plan.items():
            if style not in STYLES:
                raise ValueError(f"{type(layer).__name__}.tensor_parallel_plan: unknown style {style!r} for "
                                 f"{child!r}; expected one of {STYLES}")
            if not isinstance(getattr(layer, child, None), nn.Linear):
                raise TypeError(f"{type(layer).__name__}.tensor_parallel_plan names {child!r}, which is not an "
                                 "nn.Linear child of the layer")
        if tp > 1:
            parallelize_module(layer, tp_mesh, {child: styles[style]() for child, style in plan.items()})
        layer.tensor_parallel_size = tp
        done.append(name)
    return done
