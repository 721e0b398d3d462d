"""Mixer factories <-> plain config, so a trained model can be rebuilt from ``model.yaml``.

A recipe's ``mixer:`` entry (``class_path`` + ``init_args``) becomes, through jsonargparse, a
``functools.partial`` that the backbone calls as ``factory(dim=..., layer_idx=...)``. To export a
model we need the reverse: the class path and the keyword arguments. This module does both ways
without a name switchboard: any trusted :class:`~mmgrow.protocols.SequenceMixer` subclass works (a
registered plugin, a class of mmgrow, or a module listed in ``MMGROW_TRUSTED_MODULES``; see
:mod:`mmgrow.trust`).
"""

from __future__ import annotations

import functools
from typing import Any

from mmgrow.protocols import SequenceMixer
from mmgrow.trust import trusted_class


def factory_from_spec(spec: Any, key: str = "mixer") -> Any:
    """``{"class_path": ..., "init_args": {...}}`` (or a list of them) -> factory (or list); ``key``
    names the spec's place (``"model.yaml: mixer"``) in errors."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return [factory_from_spec(s, f"{key}[{i}]") for i, s in enumerate(spec)]
    if isinstance(spec, dict) and "class_path" in spec:
        cls = trusted_class(spec["class_path"], SequenceMixer, f"{key}.class_path", ("mixers", "memory"))
        return functools.partial(cls, **dict(spec.get("init_args") or {}))
    if callable(spec):
        return spec
    raise TypeError(f"mixer spec must be a dict with class_path/init_args, a list of them or a callable, got {spec!r}")


def spec_from_factory(factory: Any) -> Any:
    """Inverse of :func:`factory_from_spec` for classes, partials and jsonargparse partials."""
    if factory is None:
        return None
    if isinstance(factory, (list, tuple)):
        return [spec_from_factory(f) for f in factory]
    if isinstance(factory, dict) and "class_path" in factory:
        return {"class_path": factory["class_path"], "init_args": dict(factory.get("init_args") or {})}
    if isinstance(factory, type):
        return {"class_path": f"{factory.__module__}.{factory.__qualname__}", "init_args": {}}
    if isinstance(factory, functools.partial):
        # jsonargparse: partial(call_without_instantiate_context, ClassInstantiator, cls, **init_args)
        candidates = [factory.func, *factory.args]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, SequenceMixer)), None)
        if cls is not None:
            return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(factory.keywords)}
    raise TypeError(f"cannot describe mixer factory {factory!r} as class_path/init_args; "
                    "pass a SequenceMixer class, a functools.partial of one, or a class_path dict")
