"""Rebuild a trained model from a run directory: :func:`load_model`.

File I/O (weights, ``model.yaml``, checkpoints) lives in :mod:`mmgrow.rundir`; this module only adds
what needs the model and growth layers above it. The names below are re-exported for code written
against earlier versions.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmgrow.rundir import (  # noqa: F401 - re-exported
    CHECKPOINT_CONFIG_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write_bytes,
    has_model_config,
    is_lightning_checkpoint,
    load_weights_into,
    read_model_config,
    read_weights,
    save_model,
)


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the model described by ``model.yaml`` and load ``model.safetensors`` into it.

    A grown model's ``model.yaml`` holds the base config plus ``growth`` (the strategies applied, in
    order): the base is built, the growth replayed for its structure, then the weights loaded."""
    # Class paths come from a file: only trusted classes are imported (mmgrow.trust), before anything is built.
    source = Path(path).name if is_lightning_checkpoint(path) else CONFIG_NAME
    model = build_model(read_model_config(path), source)
    load_weights_into(model, path)
    return model


def build_model(config: dict, source: str = CONFIG_NAME) -> nn.Module:
    """The (randomly initialised) model a ``model.yaml`` config describes, growth replayed for its structure;
    ``source`` names the config in errors."""
    from mmgrow.growth.base import apply_growth, strategy_from_spec
    from mmgrow.models.factories import factory_from_spec
    from mmgrow.models.unified import UnifiedModel

    cfg = dict(config)
    cfg["mixer"] = factory_from_spec(cfg.get("mixer"), f"{source}: mixer")
    if cfg.get("memory") is not None:
        cfg["memory"] = factory_from_spec(cfg["memory"], f"{source}: memory")
    growth = cfg.pop("growth", None) or []
    strategies = [strategy_from_spec(s, f"{source}: growth[{i}]") for i, s in enumerate(growth)]
    model = UnifiedModel(**cfg)
    apply_growth(model, strategies)
    return model
