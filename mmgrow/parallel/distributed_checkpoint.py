"""Crash-safe sharded checkpoints: ``last.ckpt`` as a directory of per-rank shards, replaced atomically.

Under FSDP2 / tensor parallelism each rank writes only its own shards (``torch.distributed.checkpoint``:
``__<rank>_0.distcp`` files and a ``.metadata`` index written by the coordinator once every shard is
down) and rank 0 adds ``meta.pt`` (step, loops, callbacks, mmgrow's token count). A directory cannot be
overwritten in one ``os.replace``, so a save goes

1. into ``last.ckpt.partial`` (a leftover from a crashed save is removed first),
2. ``last.ckpt`` -> ``last.ckpt.old``, ``last.ckpt.partial`` -> ``last.ckpt`` (two renames on rank 0),
3. ``last.ckpt.old`` removed.

A crash in 1 leaves the previous ``last.ckpt`` untouched; a crash between the renames of 2 leaves no
``last.ckpt`` but a complete ``.partial`` (or the ``.old`` one), which :func:`settle` renames back
before anything reads or writes the checkpoint -- so a resume always finds the newest complete one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PARTIAL, OLD = ".partial", ".old"
METADATA, META = ".metadata", "meta.pt"


def is_complete(directory: str | Path) -> bool:
    """A sharded checkpoint directory whose index and Lightning metadata were both written (both come last)."""
    d = Path(directory)
    return d.is_dir() and (d / METADATA).is_file() and (d / META).is_file()


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def settle(path: str | Path) -> Path:
    """Finish an interrupted replacement of the checkpoint directory ``path`` (see module docstring); a
    no-op when ``path`` exists. Returns ``path``."""
    path = Path(path)
    if path.exists():
        return path
    for source in (sibling(path, PARTIAL), sibling(path, OLD)):  # the newest complete one wins
        if is_complete(source):
            os.rename(source, path)
            break
    return path


def replace_directory(new: Path, path: Path) -> None:
    """Make the complete directory ``new`` the checkpoint ``path`` (step 2-3 of the module docstring)."""
    old = sibling(path, OLD)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)
