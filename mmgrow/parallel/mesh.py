"""One named device mesh ``("dp", "cp", "tp")`` for every way mmgrow splits a run over processes.

``world_size = dp * cp * tp`` processes are laid out row-major, ``tp`` fastest: global rank ``g`` sits at

.. math::  (d, c, t) = (g \\,//\\, (cp \\cdot tp),\\; (g \\,//\\, tp) \\bmod cp,\\; g \\bmod tp)

so the ranks of one tensor-parallel group are consecutive (on GPUs: inside one node, where the
per-layer all-reduces of tensor parallelism need NVLink), the context-parallel ring comes next
(one K/V transfer per hop, overlapped with compute) and data parallelism is outermost (one gradient
reduction per step, the most latency-tolerant traffic). torchtitan orders its axes the same way.

What each axis does (:mod:`mmgrow.parallel.model_parallel`):

* ``dp``: different batches; the data sampler shards over ``dp`` only;
* ``cp``: the same batch, each rank holding a slice of every sequence (:mod:`mmgrow.parallel.context_batch`);
* ``tp``: the same tokens, each rank holding a slice of the attention heads and MLP hidden units
  (:mod:`mmgrow.parallel.tensor_parallel`).

FSDP shards parameters over the *flattened* ``dp x cp`` sub-mesh (named ``"dp_cp"``): the context-parallel
ranks of one batch compute gradients of the same parameters from different tokens, so their gradients
must be reduced together with the data-parallel ones -- exactly what sharding over ``dp x cp`` does
(torchtitan shards over ``dp_shard x cp`` for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AXES = ("dp", "cp", "tp")
FSDP_AXIS = "dp_cp"


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the three axes; their product is the world size."""

    dp: int = 1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in AXES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims: {name} must be a positive int, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @classmethod
    def resolve(cls, world_size: int, *, dp: int | str = "auto", cp: int = 1, tp: int = 1) -> ParallelDims:
        """Sizes for ``world_size`` processes; ``dp="auto"`` takes what ``cp * tp`` leaves."""
        for name, value in (("context_parallel", cp), ("tensor_parallel", tp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        inner = cp * tp
        if dp == "auto":
            if world_size % inner != 0:
                raise ValueError(f"the world size {world_size} is not divisible by context_parallel x tensor_parallel "
                                 f"= {cp} x {tp} = {inner}; use a number of processes that is a multiple of {inner}")
            dp = world_size // inner
        if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
            raise ValueError(f"data_parallel must be a positive int or 'auto', got {dp!r}")
        if dp * inner != world_size:
            raise ValueError(f"data_parallel x context_parallel x tensor_parallel = {dp} x {cp} x {tp} = {dp * inner} "
                             f"must equal the world size {world_size} (processes x nodes)")
        return cls(dp=dp, cp=cp, tp=tp)

    def coordinates(self, global_rank: int) -> tuple[int, int, int]:
        """``(d, c, t)`` of ``global_rank`` in the row-major layout of the module docstring."""
        if not 0 <= global_rank < self.world_size:
            raise ValueError(f"rank {global_rank} is outside a world of {self.world_size}")
        return global_rank // (self.cp * self.tp), (global_rank // self.tp) % self.cp, global_rank % self.tp


def build_device_mesh(dims: ParallelDims, device_type: str) -> tuple[Any, Any]:
    """``(mesh, fsdp_mesh)``: the ``("dp", "cp", "tp")`` :class:`~torch.distributed.device_mesh.DeviceMesh`
    of the current process group and its flattened 1-D ``"dp_cp"`` axis FSDP shards over (kept by the
    caller: torch deprecates slicing flattened axes out of the root mesh). Every rank must call it, in
    the same order of collective calls (it creates the sub-groups)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.get_world_size() != dims.world_size:
        raise ValueError(f"build_device_mesh: {dims} needs {dims.world_size} processes, the process group has "
                         f"{dist.get_world_size()}")
    mesh = init_device_mesh(device_type, (dims.dp, dims.cp, dims.tp), mesh_dim_names=AXES)
    fsdp_mesh = mesh["dp", "cp"]._flatten(FSDP_AXIS)
    expected = dims.coordinates(dist.get_rank())
    got = tuple(mesh.get_local_rank(a) for a in AXES)
    if got != expected:  # the data sampler and the sharding helpers rely on this layout
        raise RuntimeError(f"build_device_mesh: rank {dist.get_rank()} landed at {dict(zip(AXES, got))}, expected the "
                           f"row-major {dict(zip(AXES, expected))}")
    return mesh, fsdp_mesh
