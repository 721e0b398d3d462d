"""Run-directory I/O, the one home for it: weights, model configs, checkpoints, written atomically.

Everything that reads or writes the files of a run directory or a weights folder goes through
this module: ``model.safetensors`` + ``model.yaml``, the ``model.*`` entries of a Lightning ``.ckpt``,
``summary.json`` and other small records. It sits at the bottom of the layering (beside
:mod:`mmgrow.registry`; it imports only torch, yaml and safetensors), so codecs, probes and the
training loop share one set of guarantees.

``model.yaml`` holds everything needed to rebuild the :class:`~mmgrow.models.unified.UnifiedModel`
(token space, sizes, mixer ``class_path`` + ``init_args``, and for a grown model the growth
history); ``model.safetensors`` holds the tensors.
Both are written to a temporary file in the same directory and moved into place with
``os.replace``, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.yaml"


class CheckpointError(ValueError):
    """A weights file or model config is missing, truncated, corrupted or does not fit the model."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: nn.Module, config: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/model.yaml``; return the weights path."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    # safetensors refuses shared storage; clone so tied or viewed tensors serialise independently.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / WEIGHTS_NAME, save(tensors, metadata={"format": "pt", "library": "mmgrow"}))
    atomic_write_bytes(out_dir / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False).encode())
    return out_dir / WEIGHTS_NAME


def _resolve(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.exists():
        raise CheckpointError(f"weights file not found: {weights} (expected a {WEIGHTS_NAME} file or a run "
                              "directory containing one)")
    return weights, weights.with_name(CONFIG_NAME)


LIGHTNING_SUFFIX = ".ckpt"
CHECKPOINT_CONFIG_KEY = "mmgrow_model_config"
"""Key under which the training module stores ``model.yaml``'s content in a Lightning checkpoint."""


def check_checkpoint_file(path: str | Path, what: str = "checkpoint") -> Path:
    """Cheap structural check of a ``torch.save`` file (Lightning ``.ckpt``) before anything loads it:
    it exists, is not empty and is a complete zip archive with a pickle (a truncated copy loses the
    archive's directory at its end). Raises :class:`CheckpointError` naming the file."""
    import zipfile

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file (expected a Lightning .ckpt file)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted save or copy?")
    try:
        with zipfile.ZipFile(path) as archive:
            complete = any(n.endswith("data.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        complete = False
    if not complete:
        raise CheckpointError(f"{what} {path} is not a readable Lightning checkpoint ({size} bytes, not a complete torch.save "
                              "archive): truncated or corrupted?")
    return path


def _lightning_checkpoint(path: Path) -> dict[str, Any]:
    check_checkpoint_file(path)
    try:  # tensors and plain containers only: no code from the file runs
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable Lightning checkpoint (truncated or corrupted?): "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc


def is_lightning_checkpoint(path: str | Path) -> bool:
    return Path(path).suffix == LIGHTNING_SUFFIX and Path(path).is_file()


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of the model: from ``model.safetensors`` (a file or a run directory), or the
    ``model.*`` entries of a Lightning ``.ckpt``; format errors become :class:`CheckpointError`."""
    from safetensors.torch import load

    if is_lightning_checkpoint(path):
        state = _lightning_checkpoint(Path(path)).get("state_dict", {})
        tensors = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if not tensors:
            raise CheckpointError(f"{path} holds no model weights (no 'state_dict' entries under 'model.')")
        return tensors
    weights, _ = _resolve(path)
    data = weights.read_bytes()
    try:
        return load(data)
    except Exception as exc:
        raise CheckpointError(f"{weights} is not a valid safetensors file (truncated or corrupted?): {exc}") from exc


def load_weights_into(model: nn.Module, path: str | Path) -> None:
    """Copy weights into ``model``; every key must exist with the same shape, in both directions."""
    tensors = read_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5]))
        raise CheckpointError(f"weights in {path} do not fit the model: " + "; ".join(parts))
    check_finite(tensors, path)
    model.load_state_dict(tensors)


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the first tensor holding NaN or inf (a diverged run's weights)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"weights in {source} hold NaN or inf values in tensor {bad[0]!r}{more}: the run that "
                              "wrote them diverged; start from an earlier checkpoint")


def has_model_config(path: str | Path) -> bool:
    """Whether ``path`` comes with a model config (``model.yaml``, or the key in a Lightning checkpoint)."""
    if is_lightning_checkpoint(path):
        return CHECKPOINT_CONFIG_KEY in _lightning_checkpoint(Path(path))
    path = Path(path)
    return ((path if path.is_dir() else path.parent) / CONFIG_NAME).exists()


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The model config next to the weights (``model.yaml``) or inside a Lightning checkpoint."""
    if is_lightning_checkpoint(path):
        cfg = _lightning_checkpoint(Path(path)).get(CHECKPOINT_CONFIG_KEY)
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path} has no {CHECKPOINT_CONFIG_KEY!r} entry (written by an older mmgrow?); "
                                  f"use the run's {WEIGHTS_NAME} instead")
        return cfg
    _, cfg_path = _resolve(path)
    if not cfg_path.exists():
        raise CheckpointError(f"model config not found: {cfg_path} (written next to {WEIGHTS_NAME} by mmgrow)")
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not UTF-8 text: byte at offset {exc.start} ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{cfg_path} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict) or "token_space" not in cfg:
        raise CheckpointError(f"{cfg_path} does not describe an mmgrow model (no 'token_space' key)")
    return cfg
