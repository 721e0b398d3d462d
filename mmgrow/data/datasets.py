"""Datasets by name (``data.dataset`` in recipes), resolved through the plugin registry.

Datasets are the ``datasets`` plugin kind (entry-point group ``mmgrow.datasets``): mmgrow's own
``shapes``, ``storyboards``, ``tones`` and ``media_folder`` are declared in its ``pyproject.toml``
exactly like a third-party package's, and only the named one is imported. Every class subclasses
:class:`mmgrow.protocols.Dataset` and is built as ``cls(num_samples=..., seed=..., split=...,
**dataset_args)`` with ``split`` in ``train | val | heldout``.
"""

from __future__ import annotations

from mmgrow import registry


def dataset_class(name: str) -> type:
    """The dataset class registered as ``name``.

    An unknown name raises ``ValueError`` listing the registered datasets (and close matches); a
    plugin that cannot be loaded raises the registry's :class:`~mmgrow.registry.PluginLoadError`.
    """
    if name not in registry.available("datasets"):
        import difflib

        known = available_datasets()
        close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(known) or '(none)'}{hint}")
    return registry.load_plugin("datasets", name)


def available_datasets() -> list[str]:
    """Names of the registered datasets, naturally sorted."""
    return registry.available("datasets")
