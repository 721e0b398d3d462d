"""Start a training stage from a checkpoint, grown: ``init_from`` + ``growth`` + ``train_parameters``.

The order (DESIGN.md §3.5, reference/growth.md §7: grow *between* stages, never a live wrapped model):

1. the recipe's model section builds the **base** architecture — the checkpoint's, before any
   growth; it must match the ``model.yaml`` next to the checkpoint (:func:`check_same_base`);
2. growth the checkpoint itself went through (its ``model.yaml: growth``) is replayed, so the
   structure fits its weights, and the weights are loaded;
3. this stage's strategies are applied in order, each returning a :class:`GrowthReport`;
4. the freezing policy picks what trains.

The grown model's ``model.yaml`` stores the base config plus the whole growth history, and
:func:`~mmgrow.training.export.load_model` rebuilds it the same way.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mmgrow.growth.base import apply_growth, spec_of, strategy_from_spec
from mmgrow.growth.freezing import apply_freezing
from mmgrow.protocols import GrowthReport
from mmgrow.rundir import CheckpointError, has_model_config, load_weights_into, read_model_config

log = logging.getLogger(__name__)

ARCHITECTURE_KEYS = ("token_space", "dim", "depth", "mlp_ratio", "cross_attention", "modulation")
"""Config keys that must agree between a recipe and the checkpoint it starts from (mixer and memory
classes are compared by ``class_path``; their other arguments are checked by the weight shapes)."""


def _class_paths(spec: Any) -> Any:
    if isinstance(spec, list):
        return [_class_paths(s) for s in spec]
    return spec.get("class_path") if isinstance(spec, dict) else spec


def check_same_base(recipe: dict[str, Any], checkpoint: dict[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` naming every architecture key where ``recipe`` and the
    checkpoint's ``model.yaml`` (without its growth) disagree."""
    diffs = []
    for key in ARCHITECTURE_KEYS:
        if recipe.get(key) != checkpoint.get(key):
            diffs.append(f"{key}: checkpoint {checkpoint.get(key)!r} vs config {recipe.get(key)!r}")
    for key in ("mixer", "memory"):
        if _class_paths(recipe.get(key)) != _class_paths(checkpoint.get(key)):
            diffs.append(f"{key}: checkpoint {_class_paths(checkpoint.get(key))!r} vs config "
                         f"{_class_paths(recipe.get(key))!r}")
    if diffs:
        raise CheckpointError(f"init_from {source} does not match the model config: " + "; ".join(diffs) +
                              ". The recipe's model section must describe the checkpoint's architecture before growth "
                              "(its model.yaml); this stage's changes go in `growth`.")


@dataclass
class GrowthStage:
    """What :func:`prepare_stage` did: the growth history now in the model, this stage's reports,
    the frozen parameter names, and a copy of the model before this stage's growth (or None)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    reports: list[GrowthReport] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    before: nn.Module | None = None

    @property
    def new_parameters(self) -> list[str]:
        return [n for r in self.reports for n in r.new_parameters]


def prepare_stage(model: nn.Module, base_config: dict[str, Any], init_from: str | None, growth: list[Any],
                  train_parameters: str = "all", keep_before: bool = False) -> GrowthStage:
    """Load ``init_from`` (replaying its growth), apply ``growth``, freeze by ``train_parameters``."""
    stage = GrowthStage()
    if init_from is not None:
        if has_model_config(init_from):
            checkpoint = read_model_config(init_from)
            check_same_base(base_config, checkpoint, str(init_from))
            stage.history = list(checkpoint.get("growth") or [])
            # the checkpoint's files are data: only trusted growth classes are imported (mmgrow.trust)
            apply_growth(model, stage.history, f"init_from {init_from}: growth")
        load_weights_into(model, init_from)
    strategies = [strategy_from_spec(s) for s in growth]
    if strategies and keep_before:
        stage.before = copy.deepcopy(model)
    stage.reports = apply_growth(model, strategies)
    stage.history += [spec_of(s) for s in strategies]
    for report in stage.reports:
        log.info("growth (%s): %s; %d new parameter tensors", report.preserves, report.notes,
                 len(report.new_parameters))
    stage.frozen = apply_freezing(model, train_parameters, stage.new_parameters)
    return stage
