"""Plugin registries: one per kind, filled from entry-point metadata, loaded lazily.

Two phases, as flake8 and npe2 do it:

1. **discover** reads entry-point metadata only (groups ``mmgrow.<kind>``), once per process, and
   never imports plugin code. mmgrow's built-ins are declared in its own ``pyproject.toml`` exactly
   like third-party plugins, so there is one discovery path.
2. **load** imports one entry on demand, wrapping any failure in :class:`PluginLoadError` (kind,
   name, distribution, version, cause and a hint), checks that the class subclasses the kind's base
   and that its ``mmgrow_api`` admits :data:`mmgrow.protocols.PLUGIN_API`.

The same name from two distributions is a :class:`PluginConflictError` naming both, raised when the
name is used (listing shows it as a status and never fails). ``MMGROW_DISABLE_PLUGIN_AUTOLOAD=1``
keeps only mmgrow's own entries; :func:`register` adds unpackaged ("local") plugins explicitly.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import os
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from mmgrow.protocols import KINDS, PLUGIN_API

HOST_DISTRIBUTION = "mmgrow"
AUTOLOAD_ENV = "MMGROW_DISABLE_PLUGIN_AUTOLOAD"


class PluginError(Exception):
    """Base of all registry errors."""


class UnknownKindError(PluginError, ValueError):
    pass


class UnknownPluginError(PluginError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class PluginConflictError(PluginError):
    pass


class PluginLoadError(PluginError, ImportError):
    """A plugin could not be imported or does not satisfy its kind's contract."""

    def __init__(self, entry: EntryInfo, cause: str, hint: str) -> None:
        self.entry = entry
        self.cause = cause
        self.hint = hint
        super().__init__(
            f"could not load {entry.kind} plugin {entry.name!r} ({entry.value}) from distribution "
            f"{entry.dist} {entry.version}: {cause}. Hint: {hint}"
        )


@dataclass(frozen=True)
class EntryInfo:
    """Metadata of one registered plugin; nothing imported."""

    kind: str
    name: str
    value: str  # "package.module:Class"
    dist: str
    version: str

    @property
    def is_builtin(self) -> bool:
        return self.dist == HOST_DISTRIBUTION


_discovered: dict[str, dict[str, list[EntryInfo]]] | None = None
_local: dict[str, dict[str, EntryInfo]] = {k: {} for k in KINDS}
_loaded: dict[tuple[str, str], type] = {}
_local_classes: dict[tuple[str, str], type] = {}  # registered as class objects: survive discover(refresh)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        extra = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownKindError(f"unknown plugin kind {kind!r}{extra} Expected one of: {', '.join(KINDS)}")


def autoload_enabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def discover(refresh: bool = False) -> dict[str, dict[str, list[EntryInfo]]]:
    """``{kind: {name: [EntryInfo, ...]}}`` from installed metadata (cached; no plugin import).

    A name with more than one entry is a conflict, reported when it is used.
    """
    global _discovered
    if _discovered is not None and not refresh:
        return _discovered
    found: dict[str, dict[str, list[EntryInfo]]] = {k: {} for k in KINDS}
    only_host = not autoload_enabled()
    seen: set[tuple[str, str, str]] = set()
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        if only_host and dist_name != HOST_DISTRIBUTION:
            continue
        for ep in dist.entry_points:
            if not ep.group.startswith("mmgrow."):
                continue
            kind = ep.group.split(".", 1)[1]
            if kind not in found:
                continue
            key = (kind, ep.name, dist_name)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            found[kind].setdefault(ep.name, []).append(
                EntryInfo(kind, ep.name, ep.value, dist_name, dist.version or "?")
            )
    _discovered = found
    _loaded.clear()
    _loaded.update(_local_classes)
    return found


def register(kind: str, name: str, target: str | type, *, dist: str = "local") -> None:
    """Register an unpackaged plugin (``"module:Class"`` or a class). Overrides nothing: a name
    already registered raises :class:`PluginConflictError`."""
    _check_kind(kind)
    if name in discover()[kind] or name in _local[kind]:
        owners = [e.dist for e in _entries(kind, name)]
        raise PluginConflictError(f"{kind} plugin {name!r} is already registered by {', '.join(owners)}")
    if isinstance(target, type):
        value = f"{target.__module__}:{target.__qualname__}"
        _loaded[(kind, name)] = _local_classes[(kind, name)] = target
    else:
        value = target
    _local[kind][name] = EntryInfo(kind, name, value, dist, "local")


def unregister(kind: str, name: str) -> None:
    """Remove a plugin added with :func:`register` (tests use this to clean up)."""
    _check_kind(kind)
    if name in _local[kind]:
        del _local[kind][name]
        _loaded.pop((kind, name), None)
        _local_classes.pop((kind, name), None)


def _entries(kind: str, name: str) -> list[EntryInfo]:
    out = list(discover()[kind].get(name, []))
    if name in _local[kind]:
        out.append(_local[kind][name])
    return out


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def available(kind: str, pattern: str = "*") -> list[str]:
    """Registered names of ``kind`` matching the ``fnmatch`` pattern, naturally sorted."""
    _check_kind(kind)
    names = set(discover()[kind]) | set(_local[kind])
    return sorted((n for n in names if fnmatch.fnmatch(n, pattern)), key=_natural_key)


def entry(kind: str, name: str) -> EntryInfo:
    """The single :class:`EntryInfo` for ``name``; unknown or conflicting names raise."""
    _check_kind(kind)
    entries = _entries(kind, name)
    if not entries:
        names = available(kind)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listed = ", ".join(names) if names else "(none)"
        raise UnknownPluginError(f"unknown {kind} plugin {name!r}.{hint} Registered {kind}: {listed}")
    if len(entries) > 1:
        who = " and ".join(f"{e.dist} {e.version} ({e.value})" for e in entries)
        raise PluginConflictError(
            f"{kind} plugin {name!r} is registered by more than one distribution: {who}. "
            "Uninstall one of them, or set MMGROW_DISABLE_PLUGIN_AUTOLOAD=1 to use mmgrow's own plugins only."
        )
    return entries[0]


def api_compatible(spec: str, version: str = PLUGIN_API) -> bool:
    """Whether ``version`` satisfies the PEP 440 specifier ``spec`` (e.g. ``">=1,<2"``)."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


def load_plugin(kind: str, name: str) -> type:
    """Import and return the class registered as ``name`` for ``kind`` (cached)."""
    info = entry(kind, name)
    if (kind, name) in _loaded:
        return _loaded[(kind, name)]
    hint = (f"run `mmgrow plugins check {name}` for details; reinstall or uninstall {info.dist}, "
            f"or set {AUTOLOAD_ENV}=1 to use mmgrow's own plugins only")
    module_name, _, attr = info.value.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as exc:
        raise PluginLoadError(info, f"{type(exc).__name__}: {exc}", hint) from exc
    base = base_class(kind)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise PluginLoadError(info, f"{info.value} is not a subclass of {base.__module__}.{base.__name__}", hint)
    spec = getattr(obj, "mmgrow_api", None)
    try:
        ok = spec is not None and api_compatible(spec)
    except Exception as exc:
        raise PluginLoadError(info, f"invalid mmgrow_api specifier {spec!r} ({exc})", hint) from exc
    if not ok:
        raise PluginLoadError(
            info, f"plugin targets mmgrow plugin API {spec!r} but this mmgrow implements {PLUGIN_API}",
            f"install a version of {info.dist} built for mmgrow plugin API {PLUGIN_API}",
        )
    _loaded[(kind, name)] = obj
    return obj


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Instantiate plugin ``name`` of ``kind`` with keyword arguments (``None`` values dropped, so
    an unset CLI option cannot break a plugin that does not take it)."""
    cls = load_plugin(kind, name)
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def base_class(kind: str) -> type:
    from mmgrow import protocols as p

    _check_kind(kind)
    return {
        "tokenizers": p.Tokenizer, "mixers": p.SequenceMixer, "memory": p.MemoryLayer,
        "growth": p.GrowthStrategy, "objectives": p.Objective, "tasks": p.Task,
    }[kind]


def import_path(kind: str, name: str) -> str:
    """``"package.module.Class"`` of a registered plugin, without importing it (for class_path)."""
    module_name, _, attr = entry(kind, name).value.partition(":")
    return f"{module_name}.{attr}" if attr else module_name


def status(kind: str, name: str) -> str:
    """``"ok"`` or a one-line reason the plugin cannot be used. Never raises."""
    try:
        load_plugin(kind, name)
        return "ok"
    except PluginConflictError:
        return "conflict: " + ", ".join(e.dist for e in _entries(kind, name))
    except PluginLoadError as exc:
        return f"error: {exc.cause}"
    except Exception as exc:  # noqa: BLE001 - listing never crashes
        return f"error: {type(exc).__name__}: {exc}"


def plugin_rows(kinds: tuple[str, ...] = KINDS, load: bool = True, pattern: str = "*") -> list[dict[str, str]]:
    """One row per (kind, name, distribution) for ``mmgrow plugins list``; never raises. Only names
    matching ``pattern`` are imported (when ``load``)."""
    rows = []
    for kind in kinds:
        for name in available(kind, pattern):
            st = status(kind, name) if load else "not loaded"
            for e in _entries(kind, name):
                rows.append({"kind": kind, "name": name, "distribution": e.dist, "version": e.version,
                             "target": e.value, "status": st})
    return rows


def find_kinds(name: str) -> list[str]:
    """Kinds in which ``name`` is registered (used to resolve short names in recipes)."""
    return [k for k in KINDS if name in discover()[k] or name in _local[k]]
