"""Full (unsharded) tensors of a sharded model, gathered on rank 0.

Under FSDP2 / tensor parallelism every parameter is a DTensor holding this rank's shard; the run's
``model.safetensors``, sampling and evaluation on rank 0 need the whole tensors. Gathering is a
collective: every rank must call :func:`full_state_dict`, and only rank 0 keeps the result (on the CPU,
one tensor at a time, so the other ranks never hold a full copy).
"""

from __future__ import annotations

import torch
from torch import nn


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every DTensor gathered into a plain CPU tensor on rank 0 (``{}``
    elsewhere). Parameter names are those of the single-device model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
