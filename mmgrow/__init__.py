"""mmgrow: composable layers, plugins and one training loop for long-context multimodal models.

The public API is small and lazy: importing ``mmgrow`` imports torch and the registry, never
lightning, timm, torchmetrics or transformers (each costs seconds) and never plugin code.

>>> import mmgrow
>>> mmgrow.available("mixers")            # doctest: +SKIP
['full']
>>> attn = mmgrow.create("mixers", "full", dim=64, num_heads=4)   # doctest: +SKIP
"""

from mmgrow.protocols import PLUGIN_API
from mmgrow.registry import (
    PluginConflictError,
    PluginError,
    PluginLoadError,
    UnknownPluginError,
    available,
    create,
    load_plugin,
    register,
)

__version__ = "0.1.0"

__all__ = [
    "PLUGIN_API",
    "PluginConflictError",
    "PluginError",
    "PluginLoadError",
    "UnknownPluginError",
    "__version__",
    "available",
    "create",
    "load_plugin",
    "register",
]
