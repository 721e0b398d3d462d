"""Embedded datasets by name (``data.dataset`` in recipes): deterministic generators, nothing downloaded.

Datasets are not a plugin kind yet; :data:`DATASETS` maps each name to the import path of its class,
imported on first use so that naming one dataset never imports the others. Every class is built as
``cls(num_samples=..., seed=..., split=..., **dataset_args)`` with ``split`` in ``train | val |
heldout`` and returns :class:`~mmgrow.protocols.Sample` s.
"""

from __future__ import annotations

import importlib

DATASETS: dict[str, str] = {
    "shapes": "mmgrow.data.synthetic.shapes:ShapesDataset",
    "storyboards": "mmgrow.data.synthetic.storyboard:StoryboardDataset",
    "tones": "mmgrow.data.synthetic.tones:ToneDataset",
}


def dataset_class(name: str) -> type:
    """The dataset class registered as ``name`` (a ``ValueError`` listing the known names otherwise)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    module, _, attr = DATASETS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
