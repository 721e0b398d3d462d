"""Trusted loading: which classes a file may make mmgrow import and call.

A run directory is data, but its files name classes: ``config.yaml`` (``class_path`` + ``init_args``
for the data module, the condition encoder, the objective, callbacks ...) and ``model.yaml`` (mixer,
memory and growth specs). Importing a module runs its code, and calling a class path with
``init_args`` calls anything (``subprocess.check_call`` with ``args: [...]`` runs a command). So a
dotted path read from a file is checked **before** it is imported, and the object **after**:

* before import, the path must be trusted (:func:`is_trusted_path`): a registered plugin's class
  (built-in or from an installed distribution: the user installed it), anything inside the
  ``mmgrow`` package, a class in one of :data:`SAFE_NAMESPACES` (Lightning callbacks, loggers,
  strategies ..., ``torch.optim``: what saved configs hold), or a module the user lists in the
  environment variable ``MMGROW_TRUSTED_MODULES`` (comma separated, e.g. ``mylab.models,mylab.data``);
* after import, it must be a class (never a function: a function is "called" with file-controlled
  arguments) subclassing the expected base, and a registered plugin's class goes through the
  registry's checks (base of its kind, ``mmgrow_api``), whichever way it was named.

A refusal is an :class:`UntrustedClassError` naming the file key, the value, what is trusted and
how to allow it. Registry names (``full``) are resolved by the callers through the registry.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from typing import Any

from mmgrow import registry

TRUST_ENV = "MMGROW_TRUSTED_MODULES"

SAFE_NAMESPACES: tuple[str, ...] = (
    "torch.optim",
    "lightning.pytorch.accelerators",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.plugins",
    "lightning.pytorch.profilers",
    "lightning.pytorch.strategies",
)
"""Library namespaces whose classes a saved ``config.yaml`` may name (optimizers, schedulers,
callbacks, loggers, strategies): installed library code, constructed from plain values."""

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class UntrustedClassError(ValueError):
    """A file names a class mmgrow will not import or call (not trusted, not a class, wrong base)."""


def trusted_modules() -> tuple[str, ...]:
    """Module prefixes from ``MMGROW_TRUSTED_MODULES`` (comma separated)."""
    return tuple(m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip())


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def is_trusted_path(path: str) -> bool:
    """Whether the dotted ``path`` ("package.module.Class") may be imported; imports nothing."""
    module = path.rpartition(".")[0]
    if not module:
        return False
    if registry.entries_for_import_path(path):
        return True
    return _within(module, ("mmgrow", *SAFE_NAMESPACES, *trusted_modules()))


def _refusal(key: str, path: str, expected: str) -> UntrustedClassError:
    return UntrustedClassError(
        f"{key}: refusing to import {path!r} (expected {expected}; trusted are registered plugins, mmgrow itself and "
        f"the namespaces in mmgrow.trust.SAFE_NAMESPACES). If you trust this code, set "
        f"{TRUST_ENV}={path.rpartition('.')[0]} (docs/training.md, 'Trust model')")


def trusted_class(path: str, base: type = object, key: str = "class_path",
                  kinds: tuple[str, ...] | None = None) -> type:
    """The class named by ``path`` if trusted (checked before import) and a subclass of ``base``.

    ``path`` is a dotted import path, or a name registered in one of ``kinds`` (default: every kind),
    bare or as ``kind:name``.
    ``key`` names where it was read (``"config.yaml: data.condition_encoder.class_path"``) for the
    errors. A registered plugin's class, however named, goes through the registry's checks (kind
    base, ``mmgrow_api``; a :class:`~mmgrow.registry.PluginLoadError` when it fails them)."""
    path = str(path)
    expected = f"a subclass of {base.__module__}.{base.__qualname__}" if base is not object else "a class"
    if "." not in path:
        cls = _registered(path, kinds or registry.KINDS, key, expected)
    elif not _DOTTED.fullmatch(path):
        raise UntrustedClassError(f"{key}: {path!r} is not a dotted import path ('package.module.Class')")
    else:
        cls = registry.load_import_path(path)
    if cls is None:
        if not is_trusted_path(path):
            raise _refusal(key, path, expected)
        module_name, _, attr = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UntrustedClassError(f"{key}: cannot import {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{key}: {path!r} is not {expected}")
    return cls


def _registered(name: str, kinds: tuple[str, ...], key: str, expected: str) -> type:
    kind, sep, bare = name.partition(":")  # "mixers:full", as in recipes
    if sep and kind in kinds:
        return registry.load_plugin(kind, bare)
    found = [k for k in kinds if k in registry.find_kinds(name)]
    if not found:
        listed = " or ".join(k.removesuffix("s") for k in kinds)
        raise UntrustedClassError(f"{key}: {name!r} is neither a dotted import path ('package.module.Class') nor a "
                                  f"registered {listed} name (see `mmgrow plugins list`); expected {expected}")
    return registry.load_plugin(found[0], name)


def check_config(node: Any, source: str, key: str = "") -> None:
    """Refuse, before anything is imported, a config that names an untrusted import path.

    Checked: every ``class_path`` value, and every other string value shaped like a dotted import
    path whose top-level module exists (jsonargparse imports such strings for class and callable
    arguments, e.g. ``optimizer: torch.optim.Adam`` or a ``Callable`` hook). File names such as
    ``model.yaml`` pass: no module ``model`` is importable. Registered plugin classes are loaded
    through the registry's checks. ``source`` names the file in errors."""
    if isinstance(node, dict):
        for k, v in node.items():
            child = f"{key}.{k}" if key else str(k)
            if k == "class_path" and isinstance(v, str) and "." in v:
                _check_path(v, f"{source}: {child}")
            else:
                check_config(v, source, child)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_config(v, source, f"{key}[{i}]")
    elif isinstance(node, str) and _DOTTED.fullmatch(node) and _top_level_exists(node):
        _check_path(node, f"{source}: {key}")


def _check_path(path: str, key: str) -> None:
    if registry.load_import_path(path) is None and not is_trusted_path(path):
        raise _refusal(key, path, "a class")


def _top_level_exists(path: str) -> bool:
    try:  # a top-level name is only located, never imported
        return importlib.util.find_spec(path.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False
