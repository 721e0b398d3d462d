"""The model that end-of-fit work on rank 0 (export, samples, evaluations) runs.

Under DDP or context parallelism every rank holds the whole model and rank 0 can run it alone. Under
FSDP2 / tensor parallelism a forward pass is a collective (parameters are gathered from every rank),
so rank 0 alone would hang; :meth:`~mmgrow.training.module.MMGrowModule.inference_model` builds a plain
copy from the gathered weights instead. The gather is itself a collective, so callbacks call
:func:`model_on_rank_zero` on **every** rank before their ``if trainer.is_global_zero`` branch; later
calls at the same step reuse the copy.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def model_on_rank_zero(pl_module: Any) -> nn.Module:
    """``pl_module.inference_model()`` when the module has it (collective under sharding), else ``pl_module.model``."""
    make = getattr(pl_module, "inference_model", None)
    return make() if callable(make) else pl_module.model
