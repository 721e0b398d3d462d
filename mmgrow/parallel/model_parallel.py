"""FSDP2, tensor parallelism and context parallelism on one named mesh, through Lightning's ``ModelParallelStrategy``.

:class:`MeshParallelStrategy` builds the ``("dp", "cp", "tp")`` mesh of :mod:`mmgrow.parallel.mesh` and
hands the training module a :class:`~mmgrow.parallel.parallelize.ParallelPlan`; the module's
``configure_model`` builds the single-device model and applies it (TP -> activation checkpointing ->
compile -> FSDP over ``dp x cp``). What each axis changes:

* **data** shards over ``dp`` only (:attr:`MeshParallelStrategy.distributed_sampler_kwargs`): the
  ``cp x tp`` ranks of one data-parallel rank load the same batch;
* **context parallelism** (``cp > 1``): each rank keeps its slice of every sequence, ring attention
  passes keys and values round the ``cp`` group (:mod:`mmgrow.parallel.context_batch`), exactly as
  under :class:`~mmgrow.parallel.strategy.ContextParallelStrategy` -- now with sharded parameters;
* **tensor parallelism** (``tp > 1``): attention heads and MLP hidden units split over ``tp``;
* **gradients** are reduce-scattered over ``dp x cp`` by FSDP (an average over those ranks, which the
  context-parallel loss's reduction makes right: see :mod:`mmgrow.objectives.autoregressive`).

Recipe (``recipes/distributed/fsdp_cpu.yaml``)::

    trainer:
      devices: 4
      strategy:
        class_path: mmgrow.parallel.model_parallel.MeshParallelStrategy
        init_args: {context_parallel: 2, tensor_parallel: 1, param_dtype: bfloat16}   # dp = 4 / 2 = 2

or ``--trainer.strategy fsdp2`` (FSDP over all processes, registered in Lightning's ``StrategyRegistry``).

**Checkpoints.** ``save_distributed_checkpoint=True`` (default) writes ``last.ckpt`` as a directory of
per-rank shards (``torch.distributed.checkpoint``) that resumes on the same or another layout; the
usual ``model.safetensors`` is gathered on rank 0 at the end of ``fit``.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from mmgrow.parallel.faults import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    apply_collective_timeout,
    collective_timeout,
    startup_timeout,
)
from mmgrow.parallel.fsdp import parse_dtype
from mmgrow.parallel.mesh import ParallelDims, build_device_mesh
from mmgrow.parallel.parallelize import ParallelPlan
from mmgrow.parallel.sharding import LAYOUTS
from mmgrow.protocols import ContextParallel


class MeshParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2/TP strategy with mmgrow's ``("dp", "cp", "tp")`` mesh.

    Args:
        data_parallel: ``dp``; ``"auto"`` = world size / (cp * tp).
        context_parallel: ``cp``, processes sharing one sequence (ring attention between them).
        tensor_parallel: ``tp``, processes sharing one layer's heads / hidden units.
        layout: how sequences are cut over ``cp`` (``zigzag`` balances causal work, or ``contiguous``).
        fsdp: shard parameters, gradients and optimiser state over ``dp x cp`` (FSDP2). False keeps full
            replicas (TP and CP still apply; gradients are then not reduced over ``dp`` -- only valid
            when ``dp * cp == 1``).
        param_dtype: FSDP mixed precision: the dtype parameters are gathered and computed in
            (``bfloat16``; None = the parameters' own dtype).
        reduce_dtype: the dtype gradients are reduced in (``float32`` by default; None = param_dtype).
        reshard_after_forward: free gathered block parameters after each block's forward (ZeRO-3; more
            communication, less memory) or keep them until the backward (ZeRO-2-like).
        meta_init: build the model on the meta device and materialise only this rank's shards
            (for models that do not fit one device); see :mod:`mmgrow.parallel.meta_init`.
        save_distributed_checkpoint: ``last.ckpt`` as a directory of per-rank shards (True) or one file
            gathered on rank 0 (False).
        collective_timeout_s: how long a collective may wait for the other ranks before it fails.
        process_group_backend: ``gloo`` / ``nccl``; None picks by device.
    """

    def __init__(self, data_parallel: int | Literal["auto"] = "auto", context_parallel: int = 1,
                 tensor_parallel: int = 1, layout: str = "zigzag", fsdp: bool = True,
                 param_dtype: str | None = None, reduce_dtype: str | None = "float32",
                 reshard_after_forward: bool = True, meta_init: bool = False,
                 save_distributed_checkpoint: bool = True,
                 collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
                 process_group_backend: str | None = None) -> None:
        name = type(self).__name__
        for arg, value in (("context_parallel", context_parallel), ("tensor_parallel", tensor_parallel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if data_parallel != "auto" and (isinstance(data_parallel, bool) or not isinstance(data_parallel, int)
                                        or data_parallel < 1):
            raise ValueError(f"{name}: data_parallel must be a positive int or 'auto', got {data_parallel!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"{name}: layout must be one of {LAYOUTS}, got {layout!r}")
        collective_timeout(collective_timeout_s, name)  # validates (mmgrow.parallel.faults)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend,
                         timeout=startup_timeout(collective_timeout_s))  # lowered once the mesh exists
        self.data_parallel_arg = data_parallel
        self.context_parallel = context_parallel
        self.tensor_parallel = tensor_parallel
        self.layout = layout
        self.fsdp = bool(fsdp)
        self.param_dtype = parse_dtype(param_dtype, f"{name}: param_dtype")
        self.reduce_dtype = parse_dtype(reduce_dtype, f"{name}: reduce_dtype")
        self.reshard_after_forward = bool(reshard_after_forward)
        self.meta_init = bool(meta_init)
        self.collective_timeout_s = float(collective_timeout_s)
        self.dims: ParallelDims | None = None
        self._handle: ContextParallel | None = None
        self._fsdp_mesh: Any = None

    # ------------------------------------------------------------------ sizes

    def _resolve_dims(self) -> ParallelDims:
        try:
            return ParallelDims.resolve(self.num_nodes * self.num_processes, dp=self.data_parallel_arg,
                                        cp=self.context_parallel, tp=self.tensor_parallel)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err} ({self.num_nodes} node(s) x {self.num_processes} "
                             "device(s))") from None

    def _configure_launcher(self) -> None:
        self._resolve_dims()  # fail in the launching process, before any spawn
        super()._configure_launcher()

    # ------------------------------------------------------------------ Lightning hooks

    def setup_environment(self) -> None:
        """The process group, then the named mesh (every rank builds every sub-group) and the cp handle."""
        self._setup_distributed()
        self.dims = self._resolve_dims()
        if not self.fsdp and self.dims.dp * self.dims.cp > 1:
            raise ValueError(f"{type(self).__name__}: fsdp=False keeps full replicas whose gradients nothing reduces "
                             f"over dp x cp = {self.dims.dp * self.dims.cp} ranks; use fsdp=True (or ddp / "
                             "context_parallel strategies for replicated training)")
        self._device_mesh, self._fsdp_mesh = build_device_mesh(self.dims, self.root_device.type)
        self.lightning_module._device_mesh = self._device_mesh
        apply_collective_timeout(self.collective_timeout_s, [self._device_mesh.get_group(a) for a in ("dp", "cp", "tp")]
                                 + [self._fsdp_mesh.get_group()])
        if self.dims.cp > 1:
            mesh = self._device_mesh
            self._handle = ContextParallel(group=mesh.get_group("cp"), rank=mesh.get_local_rank("cp"),
                                           world_size=self.dims.cp, layout=self.layout)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Shard the data over ``dp`` only: the ``cp x tp`` ranks of one data-parallel rank see the same batches."""
        mesh = self.device_mesh
        return {"num_replicas": mesh["dp"].size(), "rank": mesh.get_local_rank("dp")}

    @property
    def context_parallel_handle(self) -> ContextParallel | None:
        """The group of this rank's context-parallel axis (None when ``cp == 1`` or before setup)."""
        return self._handle

    @property
    def shards_parameters(self) -> bool:
        """True: parameters are DTensors; gathering them (export, sampling) is a collective of every rank."""
        return True

    @property
    def counts_tokens(self) -> bool:
        """Whether this rank's tokens count towards ``tokens_seen`` (summed over ranks): the ``tp`` ranks of
        a group all see the same tokens, so only ``tp`` rank 0 counts them."""
        return self._device_mesh is None or self._device_mesh.get_local_rank("tp") == 0

    def parallel_plan(self) -> ParallelPlan:
        """What the training module's ``configure_model`` applies to the model it builds."""
        return ParallelPlan(mesh=self.device_mesh, fsdp_mesh=self._fsdp_mesh, fsdp=self.fsdp, param_dtype=self.param_dtype,
                            reduce_dtype=self.reduce_dtype, reshard_after_forward=self.reshard_after_forward)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Sharded checkpoints are written beside the target and swapped in atomically
        (:mod:`mmgrow.parallel.distributed_checkpoint`); a gathered single file goes through the
        trainer's checkpoint writer as usual."""
        if not self._save_distributed_checkpoint or storage_options is not None or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        import shutil
        from pathlib import Path

        from mmgrow.parallel.distributed_checkpoint import PARTIAL, replace_directory, settle, sibling

        path = Path(self.broadcast(str(filepath)))
        partial = sibling(path, PARTIAL)
        if self.global_rank == 0:
            settle(path)
            if partial.exists():  # a crashed save's leftovers
                shutil.rmtree(partial)
        self.barrier()
        super().save_checkpoint(checkpoint, partial)
        self.barrier()  # every shard and meta.pt written
        if self.global_rank == 0:
            replace_directory(partial, path)
        self.barrier()
        return None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.global_rank == 0:
            from mmgrow.parallel.distributed_checkpoint import settle

            settle(checkpoint_path)
        self.barrier()
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def teardown(self) -> None:
        self._handle = None
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """``"fsdp2"``: FSDP2 over every process (dp = world size)."""
        if "fsdp2" not in strategy_registry:
            strategy_registry.register("fsdp2", cls, description="FSDP2 over all processes on mmgrow's (dp, cp, tp) "
                                       "mesh (mmgrow)")


MeshParallelStrategy.register_strategies(StrategyRegistry)
