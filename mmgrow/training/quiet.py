"""Messages from inside dependencies that a user of ``mmgrow`` cannot act on, silenced by exact text.

Only these are filtered, each matched by its message (and, for warnings, the module it is attributed
to), so every other warning — e.g. a logging interval longer than the run — still reaches the user:

* Lightning's advertisements (``💡 Tip: For seamless cloud ...`` for litlogger / litmodels), logged at
  INFO by ``lightning.pytorch.utilities.rank_zero`` when a run has no LitLogger;
* torch's ``FutureWarning`` that ``isinstance(treespec, LeafSpec)`` is deprecated, raised by
  Lightning's own ``lightning.pytorch.utilities._pytree`` (a Lightning/torch version pairing, nothing
  in a recipe causes it).
"""

from __future__ import annotations

import logging
import warnings

ADVERTISEMENTS = ("💡 Tip: For seamless cloud",)
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"
DEPENDENCY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)
"""``(message regex, category, module regex)`` of each silenced warning."""


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTISEMENTS)


_FILTER = _DropAdvertisements()


def silence_dependency_noise() -> None:
    """Install the filters (idempotent: warnings' filters replace an identical entry, the log filter is one object)."""
    for message, category, module in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
