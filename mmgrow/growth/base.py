"""Shared pieces of the growth strategies: finding the blocks, zeroing residual outputs, telling
new parameters from old ones, and describing a strategy as ``class_path`` + ``init_args``.

New parameters are found by *identity*: the ids of every parameter tensor are recorded before a
strategy runs (:class:`NewParameters`), and any parameter whose tensor was not there before is new
— a copied block, an added branch, a widened projection. No strategy inspects state-dict key
strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmgrow.models.backbone import Backbone
from mmgrow.models.block import Block
from mmgrow.protocols import GrowthReport, GrowthStrategy
from mmgrow.trust import UntrustedClassError, trusted_class


class GrowthError(ValueError):
    """A growth strategy cannot be applied to this model or configuration."""


def backbone_of(model: nn.Module) -> Backbone:
    """The :class:`Backbone` of a :class:`~mmgrow.models.unified.UnifiedModel`, or ``model`` itself."""
    if isinstance(model, Backbone):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, Backbone):
        return backbone
    raise GrowthError(f"growth needs a UnifiedModel or a Backbone, got {type(model).__name__}")


def renumber_layers(backbone: Backbone) -> None:
    """Set every mixer's (and memory's) ``layer_idx`` to its block's new index after blocks moved."""
    for i, block in enumerate(backbone.blocks):
        block.mixer.layer_idx = i
        if block.memory is not None:
            block.memory.memory.layer_idx = i


@torch.no_grad()
def zero_residual_outputs(block: Block) -> list[nn.Linear]:
    """Zero the weight and bias of every projection that writes into the residual stream, so the
    block computes ``x -> x`` exactly (``x + 0 = x`` in every branch, whatever the modulation).

    Every branch must declare its outputs: a branch that declares none would keep writing into the
    residual stream, so it is an error rather than a silently inexact copy."""
    outputs = []
    for name, branch in block.branches().items():
        declared = branch.residual_outputs()
        if not declared:
            raise GrowthError(f"block branch {name!r} ({type(branch).__name__}) declares no residual_outputs(); "
                              "function-preserving growth must zero the projections that write into the residual "
                              "stream — implement residual_outputs() on it")
        outputs.extend(declared)
    zero_linears(outputs)
    return outputs


@torch.no_grad()
def zero_linears(linears: Sequence[nn.Linear]) -> None:
    """Zero the weight and bias of each linear layer."""
    for lin in linears:
        lin.weight.zero_()
        if lin.bias is not None:
            lin.bias.zero_()


class NewParameters:
    """Context manager: ``names`` lists the parameters whose tensors did not exist on entry."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: list[str] = []

    def __enter__(self) -> NewParameters:  # noqa: PYI034
        # Keep the old tensors alive: a replaced parameter freed mid-growth could hand its id to a new one.
        self._old = list(self.model.parameters())
        self._before = {id(p) for p in self._old}
        return self

    def __exit__(self, *exc: object) -> None:
        self.names = [n for n, p in self.model.named_parameters() if id(p) not in self._before]
        self._old = []


def check_layers(layers: Sequence[int] | None, depth: int, name: str) -> list[int]:
    """Block indices in ``[0, depth)`` (None = all; negative indices count from the end), sorted."""
    if layers is None:
        return list(range(depth))
    out = set()
    for i in layers:
        if not isinstance(i, int) or not -depth <= i < depth:
            raise GrowthError(f"{name}: layer {i!r} is not a block index of a {depth}-block model")
        out.add(i % depth)
    return sorted(out)


# ------------------------------------------------------------------------------------------------ specs


def spec_of(strategy: GrowthStrategy) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` that rebuilds ``strategy`` (stored in model.yaml)."""
    cls = type(strategy)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": strategy.init_args()}


def strategy_from_spec(spec: Any, key: str = "growth") -> GrowthStrategy:
    """A strategy from a spec (``class_path`` = import path or registered ``growth`` name), or as is.
    The class is checked before import (:mod:`mmgrow.trust`); ``key`` names the entry in errors."""
    if isinstance(spec, GrowthStrategy):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise GrowthError(f"a growth entry must be a GrowthStrategy or {{class_path, init_args}}, got {spec!r}")
    try:
        cls = trusted_class(str(spec["class_path"]), GrowthStrategy, f"{key}.class_path", ("growth",))
    except (ValueError, TypeError) as exc:
        raise GrowthError(str(exc)) from exc
    try:
        return cls(**dict(spec.get("init_args") or {}))
    except (GrowthError, UntrustedClassError) as exc:  # e.g. AddMemoryGrowth's memory spec: say where it sits
        raise GrowthError(f"{key}.init_args: {exc}") from exc
    except TypeError as exc:
        raise GrowthError(f"bad init_args for growth {spec['class_path']!r}: {exc}") from exc


def apply_growth(model: nn.Module, strategies: Sequence[Any], key: str = "growth") -> list[GrowthReport]:
    """Apply strategies (instances or specs) in order; one report each. ``key`` names the list in errors."""
    reports = []
    for i, spec in enumerate(strategies):
        strategy = strategy_from_spec(spec, f"{key}[{i}]")
        report = strategy.apply(model)
        if not isinstance(report, GrowthReport):
            raise GrowthError(f"{type(strategy).__name__}.apply returned {type(report).__name__}, expected a "
                              "GrowthReport")
        reports.append(report)
    return reports
