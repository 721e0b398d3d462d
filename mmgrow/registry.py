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

**Built-ins cannot be shadowed.** The host distribution is identified by what it installed, not by
its metadata name: it is the distribution that owns the running ``mmgrow`` package (its file list
holds this package's ``__init__.py``, or it is an editable install of a project holding an
``mmgrow`` package; see :func:`owns_mmgrow`). The names it declares are the built-ins. Another
distribution declaring a built-in name — whatever it calls itself, ``mmgrow`` included — is ignored
with a :class:`PluginShadowWarning` (the built-in wins; a conflict error would let any installed
package disable a built-in). The kill switch keeps the host's entries only, by the same test.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mmgrow.protocols import KINDS, PLUGIN_API

HOST_DISTRIBUTION = "mmgrow"
"""Metadata name of mmgrow's own distribution, for messages only: built-ins are recognised by
:func:`owns_mmgrow`, never by this name (any distribution can call itself ``mmgrow``)."""
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


class PluginShadowWarning(UserWarning):
    """A distribution other than mmgrow's own declares a built-in name; its entry is ignored."""


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
    builtin: bool = False  # declared by the distribution that owns the running mmgrow package

    @property
    def is_builtin(self) -> bool:
        return self.builtin


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


_PACKAGE_INIT = Path(__file__).resolve().with_name("__init__.py")


def owns_mmgrow(dist: metadata.Distribution) -> bool:
    """Whether ``dist`` installed the running ``mmgrow`` package (the host of the built-ins).

    True when its file list holds this package's ``__init__.py`` (a regular install), or when it is
    an editable install (``direct_url.json``) of a project directory holding an ``mmgrow`` package
    (a development checkout; tests may import a sibling checkout of the same project through
    ``PYTHONPATH``). Metadata alone, such as a ``Name: mmgrow`` line, never qualifies."""
    for f in dist.files or []:
        if f.name == "__init__.py" and f.parts[-2:-1] == ("mmgrow",):
            try:
                if Path(str(dist.locate_file(f))).resolve() == _PACKAGE_INIT:
                    return True
            except OSError:
                continue
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except (OSError, ValueError):
        return False
    if not (isinstance(direct, dict) and (direct.get("dir_info") or {}).get("editable")):
        return False
    url = urlparse(str(direct.get("url", "")))
    return url.scheme == "file" and (Path(unquote(url.path)) / "mmgrow" / "__init__.py").is_file()


def discover(refresh: bool = False) -> dict[str, dict[str, list[EntryInfo]]]:
    """``{kind: {name: [EntryInfo, ...]}}`` from installed metadata (cached; no plugin import).

    A name with more than one entry is a conflict, reported when it is used. Built-in names (those
    of the distribution that owns the mmgrow package) are never shared: another distribution's
    entry for one is dropped with a :class:`PluginShadowWarning` (silently when it names the same
    target, e.g. a second copy of mmgrow's own metadata).
    """
    global _discovered
    if _discovered is not None and not refresh:
        return _discovered
    only_host = not autoload_enabled()
    declared: list[tuple[EntryInfo, Any]] = []  # (entry, entry point) of every mmgrow.* group
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        host = owns_mmgrow(dist)
        if only_host and not host:
            continue
        for ep in dist.entry_points:
            kind = ep.group.split(".", 1)[1] if ep.group.startswith("mmgrow.") else None
            if kind in KINDS:
                declared.append(EntryInfo(kind, ep.name, ep.value, dist_name, dist.version or "?", host))
    builtins = {(e.kind, e.name): e for e in declared if e.builtin}
    found: dict[str, dict[str, list[EntryInfo]]] = {k: {} for k in KINDS}
    seen: set[tuple[str, str, str]] = set()
    for e in declared:
        key = (e.kind, e.name, e.dist)
        if key in seen:  # the same distribution visible twice on sys.path
            continue
        own = builtins.get((e.kind, e.name))
        if own is not None and not e.builtin:
            if e.value != own.value:
                warnings.warn(
                    f"ignoring {e.kind} plugin {e.name!r} ({e.value}) from distribution {e.dist} {e.version}: "
                    f"{e.name!r} is a built-in of mmgrow ({own.value}) and cannot be replaced; give the plugin "
                    "another name", PluginShadowWarning, stacklevel=2)
            continue
        seen.add(key)
        found[e.kind].setdefault(e.name, []).append(e)
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
    obj = load_entry(info)
    _loaded[(kind, name)] = obj
    return obj


def load_entry(info: EntryInfo) -> type:
    """Import ``info``'s target and check it: a subclass of the kind's base whose ``mmgrow_api``
    admits :data:`PLUGIN_API`. Every way of naming a plugin (name, ``kind:name``, import path)
    ends here, so the checks cannot be bypassed. Failures are :class:`PluginLoadError`."""
    hint = (f"run `mmgrow plugins check {info.name}` for details; reinstall or uninstall {info.dist}, "
            f"or set {AUTOLOAD_ENV}=1 to use mmgrow's own plugins only")
    module_name, _, attr = info.value.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as exc:
        raise PluginLoadError(info, f"{type(exc).__name__}: {exc}", hint) from exc
    base = base_class(info.kind)
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
    return obj


def entries_for_import_path(path: str) -> list[EntryInfo]:
    """Registered entries (any kind, any name) whose class is ``"package.module.Class"``; nothing imported."""
    out = []
    for kind in KINDS:
        for entries in [*discover()[kind].values(), [_local[kind][n] for n in _local[kind]]]:
            out += [e for e in entries if _dotted(e.value) == path]
    return out


def load_import_path(path: str) -> type | None:
    """The class at ``path`` through the registry's checks when it is a registered plugin's class
    (a :class:`PluginLoadError` when it fails them), else None (not a plugin; nothing imported)."""
    entries = entries_for_import_path(path)
    if not entries:
        return None
    info = entries[0]
    try:
        return load_plugin(info.kind, info.name)
    except PluginConflictError:  # the name is contested, but the class was named exactly
        return load_entry(info)


def _dotted(value: str) -> str:
    module_name, _, attr = value.partition(":")
    return f"{module_name}.{attr}" if attr else module_name


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
        "growth": p.GrowthStrategy, "objectives": p.Objective, "tasks": p.Task, "datasets": p.Dataset,
    }[kind]


def import_path(kind: str, name: str) -> str:
    """``"package.module.Class"`` of a registered plugin, without importing it (for class_path)."""
    return _dotted(entry(kind, name).value)


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
