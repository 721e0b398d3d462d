"""Meta-device initialisation: build the model without memory, shard it, then materialise only this rank's shards.

A model that does not fit one device is built under ``torch.device("meta")`` (shapes only), parallelised
(TP, FSDP: parameters become DTensors whose *local* shards are small), then :func:`materialize` allocates
the local shards on the device and fills them with the model's own initialisation rule
(:func:`mmgrow.models.unified.initialise_own`, e.g. ``N(0, init_std)`` weights, zero biases, unit norms).

**Random streams.** Each rank draws only its own shards, so the random numbers must be chosen so that

* ranks holding *replicas* of the same shard (the ``tp`` ranks of a parameter that is not
  tensor-parallel, every rank of a tiny unsharded buffer) draw the *same* values, and
* ranks holding *different* shards draw *different* values (equal shards would make rows of a weight
  matrix identical: a symmetry training never breaks).

So module ``i`` (in ``model.modules()`` order) is initialised under ``torch.manual_seed`` of
``hash(seed, i, shard coordinates)``, where the coordinates are this rank's index on every mesh axis
its parameters are *sharded* on (``Shard`` placements), and nothing else. The values therefore differ
from a single-device build with the same seed -- same distribution, other draws -- and do not depend on
anything but the seed and the layout.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _shard_coordinates(module: nn.Module, recurse: bool) -> tuple[tuple[str, int], ...]:
    """``((axis name, local rank), ...)`` over the mesh axes any of ``module``'s parameters is sharded on."""
    from torch.distributed.tensor import DTensor

    coords: set[tuple[str, int]] = set()
    for p in module.parameters(recurse=recurse):
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            for axis, placement in enumerate(p.placements):
                # any split counts (FSDP over a TP-split weight uses a strided shard, not a plain Shard)
                if not (placement.is_replicate() or placement.is_partial()):
                    coords.add((mesh.mesh_dim_names[axis], mesh.get_local_rank(axis)))
    return tuple(sorted(coords))


def _seed(seed: int, index: int, coords: tuple[tuple[str, int], ...]) -> int:
    digest = hashlib.sha256(repr((seed, index, coords)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def _local_parameters(module: nn.Module, recurse: bool) -> Iterator[None]:
    """Within the block, ``module``'s DTensor parameters are replaced by their local shards (same storage),
    so the init rule's random ops draw from the seed set here. DTensor's own random ops would not: on a
    CPU mesh they are not coordinated and draw the same numbers for every shard (measured)."""
    from torch.distributed.tensor import DTensor

    owners = list(module.modules()) if recurse else [module]
    swapped = []
    for owner in owners:
        for name, p in list(owner._parameters.items()):
            if isinstance(p, DTensor):
                owner._parameters[name] = nn.Parameter(p.to_local(), requires_grad=p.requires_grad)
                swapped.append((owner, name, p))
    try:
        yield
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p


def has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, *, seed: int = 0, init_std: float | None = None) -> int:
    """Allocate ``model``'s (local shards of) parameters on ``device`` and initialise them with standard
    deviation ``init_std`` (default: ``model.init_std``); returns the number of modules initialised. Buffers are not supported (the unified model has none outside
    growth masks): a meta buffer raises ``ValueError``."""
    from mmgrow.models.unified import initialise_own

    meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
    if meta_buffers:
        raise ValueError(f"meta_init: buffers cannot be re-created after a meta build ({meta_buffers[:3]}); build this "
                         "model without meta_init")
    std = float(init_std if init_std is not None else model.init_std)
    model.to_empty(device=device)
    skip: set[int] = set()  # modules inside a subtree whose owner initialised it (init_weights)
    count = 0
    fork_devices: list[Any] = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        for index, module in enumerate(model.modules()):
            if id(module) in skip:
                continue
            owns_subtree = callable(getattr(module, "init_weights", None))
            if not owns_subtree and not any(True for _ in module.parameters(recurse=False)):
                continue
            torch.manual_seed(_seed(seed, index, _shard_coordinates(module, recurse=owns_subtree)))
            with _local_parameters(module, recurse=owns_subtree):
                if initialise_own(module, std):
                    skip.update(id(m) for m in module.modules())
            count += 1
    return count

