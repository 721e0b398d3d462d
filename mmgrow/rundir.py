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

**Temporary files** are named ``.<target name>.<host>.<pid>.<random>.tmp`` beside their target and removed
on any exit that runs Python code: an exception, ``KeyboardInterrupt``, a SIGTERM (made a ``SystemExit``
while the file is open, unless a handler such as Lightning's, which stops training between steps, is set).
After a ``kill -9`` the next atomic write into the same directory removes the temporary files of
processes of this host that no longer run; readers never look at them.

**The manifest** (``manifest.json``) makes a run directory consistent. Ordering rule: every save that
writes a file the manifest lists first removes ``manifest.json`` (:func:`begin_save`), then writes its
files (each atomically), and the manifest is written last (:func:`seal_run`), with the size and SHA-256
of each file and the save's status (``complete`` or ``diverged``) and step; a training run also removes
it when it starts. So the files named by a manifest always belong to one completed save; a directory of a training run (one holding
``config.yaml`` or ``checkpoints/``) without a manifest is a save that did not finish, and readers
(:func:`check_run`, called by every weights/config reader here) say so instead of loading it.
A weights folder that is not a run directory (e.g. ``pretrained/...``) needs no manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
import yaml
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.yaml"


class CheckpointError(ValueError):
    """A weights file or model config is missing, truncated, corrupted or does not fit the model."""


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _host() -> str:
    """This machine's name as it appears in temporary file names (pids only mean something on one host)."""
    import socket

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove this module's temporary files in ``directory`` whose writing process, on this host, no longer
    runs (left by a ``kill -9``); return them. Those of live processes or other hosts are left alone."""
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    host = _host()
    for entry in directory.iterdir():
        m = _TEMP.match(entry.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While a temporary file is open, a SIGTERM with the default action (die at once, no cleanup) becomes
    ``SystemExit``, so the temporary file is removed; a handler someone installed (Lightning's) is kept."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path`` for writing; on success it is flushed, fsynced and renamed to
    ``path`` (``os.replace``: readers see the old file or the new one, never a part); on any exception (and
    a SIGTERM, see :func:`_sigterm_as_exit`) the temporary file is removed. Stale temporary files of dead
    processes in the directory are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with _sigterm_as_exit():
        try:
            with open(tmp, "xb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)


def save_model(model: nn.Module, config: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/model.yaml``; return the weights path."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    begin_save(out_dir)
    # safetensors refuses shared storage; clone so tied or viewed tensors serialise independently.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / WEIGHTS_NAME, save(tensors, metadata={"format": "pt", "library": "mmgrow"}))
    atomic_write_bytes(out_dir / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False).encode())
    return out_dir / WEIGHTS_NAME


MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mmgrow-run/1"
SUMMARY_NAME = "summary.json"
LAST_CHECKPOINT = "checkpoints/last.ckpt"


def strict_json(value: Any) -> bytes:
    """``value`` as strict JSON (RFC 8259): NaN and infinities become ``null``, never bare ``NaN``."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=2, allow_nan=False).encode()


def begin_save(directory: str | Path) -> None:
    """Start a save of manifest-listed files: remove ``manifest.json`` so that, until :func:`seal_run`,
    the directory reads as incomplete rather than as a mix of two saves."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(directory) / MANIFEST_NAME)


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def seal_run(directory: str | Path, names: Iterable[str], status: str = "complete", step: int | None = None,
             **extra: Any) -> Path:
    """Write ``manifest.json`` last, naming ``names`` (those that exist) with size and SHA-256, the save's
    ``status`` and ``step``, and ``extra`` fields (e.g. the divergence diagnosis)."""
    directory = Path(directory)
    files = {n: _digest(directory / n) for n in names if (directory / n).is_file()}
    record = {"format": MANIFEST_FORMAT, "status": status, "global_step": step, "files": files, **extra}
    atomic_write_bytes(directory / MANIFEST_NAME, strict_json(record))
    return directory / MANIFEST_NAME


def is_run_directory(directory: str | Path) -> bool:
    """Whether ``directory`` was written by a training run (``config.yaml`` or ``checkpoints/`` in it)."""
    directory = Path(directory)
    return (directory / "config.yaml").is_file() or (directory / "checkpoints").is_dir()


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The run's ``manifest.json``, or None when there is none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from exc
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise CheckpointError(f"{path} is not an mmgrow run manifest (no 'files' mapping)")
    return record


def _resume_hint(directory: Path) -> str:
    last = directory / LAST_CHECKPOINT
    if last.exists():  # a file, or a sharded checkpoint directory
        return f"; its newest checkpoint is {last} (resume with --ckpt_path {last}, or load that file)"
    return "; it holds no checkpoint either"


def _inconsistent(directory: Path, name: str) -> CheckpointError:
    return CheckpointError(f"run directory {directory} is inconsistent: {name} does not match {MANIFEST_NAME} "
                           f"(a save was interrupted or the file was changed)" + _resume_hint(directory))


def check_run(directory: str | Path, needed: Iterable[str] = (WEIGHTS_NAME, CONFIG_NAME),
              verify: bool = True) -> dict[str, Any] | None:
    """Check that ``directory`` holds a completed save with the files in ``needed``; return its manifest
    (None for a weights folder that is not a run directory). Raise :class:`CheckpointError` saying why
    when the run is incomplete (its last save did not finish), diverged, or its files disagree with the
    manifest (sizes always; SHA-256 too when ``verify``)."""
    directory = Path(directory)
    record = read_manifest(directory)
    if record is None:
        if is_run_directory(directory):
            raise CheckpointError(f"run directory {directory} is incomplete: no {MANIFEST_NAME}, so its last save "
                                  f"did not finish (a run still in progress, or stopped or killed before the end of fit)"
                                  + _resume_hint(directory))
        return None
    files = record["files"]
    if record.get("status") == "diverged":
        missing = [n for n in needed if n not in files]
        if missing:
            info = record.get("diverged") or {}
            raise CheckpointError(
                f"run {directory} diverged at step {info.get('step')} ({info.get('loss_name')} non-finite) and "
                f"exported no {missing[0]}" + _resume_hint(directory).replace("newest", "last finite"))
    for name in needed:
        if name not in files:
            raise CheckpointError(f"run directory {directory} is incomplete: its last completed save has no {name}"
                                  + _resume_hint(directory))
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"run directory {directory} is incomplete: {name} is missing but listed in "
                                  f"{MANIFEST_NAME}" + _resume_hint(directory))
        if path.stat().st_size != info.get("bytes") or (verify and name in needed
                                                       and _digest(path)["sha256"] != info.get("sha256")):
            raise _inconsistent(directory, name)
    return record


def _resolve(path: str | Path) -> tuple[Path, Path, dict[str, Any] | None]:
    """Weights file, config file and the run's manifest (None outside run directories). A run's files
    are read only from a completed save: sizes are checked here, the weights' hash by :func:`read_weights`."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    record = check_run(weights.parent, verify=False) if weights.name == WEIGHTS_NAME else None
    if not weights.exists():
        raise CheckpointError(f"weights file not found: {weights} (expected a {WEIGHTS_NAME} file or a run "
                              "directory containing one)")
    return weights, weights.with_name(CONFIG_NAME), record


LIGHTNING_SUFFIX = ".ckpt"
CHECKPOINT_CONFIG_KEY = "mmgrow_model_config"
"""Key under which the training module stores ``model.yaml``'s content in a Lightning checkpoint."""


def check_checkpoint_file(path: str | Path, what: str = "checkpoint") -> Path:
    """Cheap structural check of a ``torch.save`` file (Lightning ``.ckpt``) before anything loads it:
    it exists, is not empty and is a complete zip archive with a pickle (a truncated copy loses the
    archive's directory at its end). Raises :class:`CheckpointError` naming the file."""
    import zipfile

    path = Path(path)
    from mmgrow.parallel.distributed_checkpoint import is_complete, settle

    settle(path)  # a sharded checkpoint whose replacement a crash interrupted
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if path.is_dir():
        if is_complete(path):  # a sharded (FSDP / tensor-parallel) checkpoint directory
            return path
        raise CheckpointError(f"{what} {path} is a directory but not a complete sharded checkpoint (no .metadata "
                              "or meta.pt: an interrupted save?); expected a Lightning .ckpt file or a sharded "
                              "checkpoint directory written by MeshParallelStrategy")
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
    weights, _, record = _resolve(path)
    data = weights.read_bytes()
    if record is not None and hashlib.sha256(data).hexdigest() != record["files"][WEIGHTS_NAME].get("sha256"):
        raise _inconsistent(weights.parent, WEIGHTS_NAME)
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


def non_finite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v.detach()).all())]


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the first tensor holding NaN or inf (a diverged run's weights)."""
    bad = non_finite_names(tensors)
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
    _, cfg_path, _ = _resolve(path)
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
