"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimiser state sharded.

Each block of the backbone is one FSDP unit and the whole model the root unit (torchtitan's and
Lightning's recipe): in the forward a block's parameters are all-gathered just before it runs and
freed after it (``reshard_after_forward``), in the backward gathered again and their gradients
reduce-scattered, so at any time a rank holds its ``1 / N`` shard of everything plus the full
parameters of about one block. The root unit (embeddings, heads, final norm) stays gathered from
forward to backward, which is what lets the objective call the output heads after ``forward``.

**Mixed precision** (:class:`torch.distributed.fsdp.MixedPrecisionPolicy`): ``param_dtype`` is the
dtype parameters are gathered and computed in (e.g. bfloat16), ``reduce_dtype`` the dtype gradients
are reduce-scattered in (float32 keeps the sum over ranks exact to float32); the sharded master
parameters and the optimiser state stay float32 either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(value: str | None, what: str) -> torch.dtype | None:
    """``"bfloat16"`` (or ``"bf16"``) -> ``torch.bfloat16``; None stays None."""
    if value is None:
        return None
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
    name = aliases.get(value, value)
    if name not in DTYPES:
        raise ValueError(f"{what} must be one of {sorted(DTYPES)} (or bf16/fp16/fp32), got {value!r}")
    return DTYPES[name]


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules wrapped before the root: every block of the backbone (``model.blocks``)."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if blocks is not None else []


def apply_fsdp(model: nn.Module, mesh: Any, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> int:
    """``fully_shard`` every block of ``model`` and then ``model`` itself over the 1-D ``mesh``.

    Returns the number of FSDP units (blocks + root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units = fsdp_units(model)
    for block in units:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root stays gathered until its backward: the objective calls the output heads *after* forward.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return len(units) + 1
