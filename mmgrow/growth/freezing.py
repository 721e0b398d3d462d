"""Which parameters train after growth: ``all``, only the ``new`` ones, or those matching a pattern.

LLaMA-Pro trains only the added blocks and freezes the rest; whether ModelGrow freezes the original
blocks is not confirmed, so the policy is a choice of the recipe (``train_parameters``). Frozen
parameters get ``requires_grad = False``: the optimiser never sees them, so no update, weight decay
or momentum can move them (tested: their values are bit-identical after training steps).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from mmgrow.growth.base import GrowthError


def apply_freezing(model: nn.Module, train: str, new_parameters: Iterable[str] = ()) -> list[str]:
    """Set ``requires_grad`` by the policy and return the names of the frozen parameters.

    Args:
        model: the grown model.
        train: ``"all"`` (nothing frozen), ``"new"`` (only ``new_parameters`` train) or a regular
            expression; parameters whose name matches it (``re.search``) train, the rest are frozen.
        new_parameters: names of the parameters growth created (from the growth reports).
    """
    names = [n for n, _ in model.named_parameters()]
    if train == "all":
        keep = set(names)
    elif train == "new":
        keep = set(new_parameters)
        if not keep:
            raise GrowthError("train_parameters='new' but growth created no parameters; nothing would train")
    else:
        try:
            pattern = re.compile(train)
        except re.error as exc:
            raise GrowthError(f"train_parameters must be 'all', 'new' or a regular expression; {train!r}: {exc}") from exc
        keep = {n for n in names if pattern.search(n)}
        if not keep:
            raise GrowthError(f"train_parameters pattern {train!r} matches no parameter; e.g. {names[:3]}")
    frozen = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        if name not in keep:
            frozen.append(name)
    return frozen
