"""A Lightning strategy with a context-parallel axis: DDP over ``dp``, the sequence sharded over ``cp``.

The ``world_size = dp * cp`` processes form a named device mesh ``("dp", "cp")`` (row-major: global
rank ``g`` sits at ``(g // cp, g % cp)``, so the ranks of one context-parallel group are
consecutive -- on GPUs, within one node when ``cp`` divides the devices per node). What changes
against plain DDP:

* **data** shards over ``dp`` only (:attr:`ContextParallelStrategy.distributed_sampler_kwargs`):
  the ``cp`` ranks of one data-parallel rank load the same batch, and each keeps its slice of the
  sequence (:mod:`mmgrow.parallel.context_batch`, called by the training module);
* the **mixers** receive the group through ``SeqContext.cp``
  (:attr:`ContextParallelStrategy.context_parallel_handle`);
* **gradients** are still averaged by DDP over all ``dp * cp`` ranks; the loss's reduction over
  ``cp`` makes that average right (:mod:`mmgrow.objectives.autoregressive`).

With ``context_parallel=1`` nothing is built: no mesh, no handle, the sampler of DDP -- it *is* DDP.

Recipes::

    trainer:
      devices: 8
      strategy:
        class_path: mmgrow.parallel.strategy.ContextParallelStrategy
        init_args: {context_parallel: 4, layout: zigzag}    # dp = 8 / 4 = 2

``collective_timeout_s`` (default :data:`~mmgrow.parallel.faults.DEFAULT_COLLECTIVE_TIMEOUT_S`, 600 s)
bounds every collective: a stalled or dead rank fails the run after that long with a message naming
it (:mod:`mmgrow.parallel.faults`), instead of torch's 30 minutes. With ``context_parallel=1`` this
strategy is plain DDP, so every multi-process recipe can set it.

or ``--trainer.strategy context_parallel`` (registered in Lightning's ``StrategyRegistry`` when this
module is imported, which the mmgrow CLI does): every process of a node in one group.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from mmgrow.parallel.faults import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    apply_collective_timeout,
    collective_timeout,
    startup_timeout,
    stop_launched_ranks,
)
from mmgrow.parallel.sharding import LAYOUTS
from mmgrow.protocols import ContextParallel


class ContextParallelStrategy(DDPStrategy):
    """DDP whose processes form a ``(dp, cp)`` mesh; the sequence is sharded over ``cp``.

    Args:
        context_parallel: size ``cp`` of each context-parallel group; the world size must be a
            multiple of it (``dp = world_size / cp``). ``None``: all processes of a node
            (``cp = devices``, ``dp = num_nodes``).
        layout: how a sequence is split over a group: ``"zigzag"`` (chunks ``r`` and ``2cp-1-r`` on
            rank ``r``: equal causal work per rank) or ``"contiguous"``.
        collective_timeout_s: seconds a collective may wait for the other ranks before the run fails
            with an error naming this value (DDP's ``timeout``); a positive finite number.
        **kwargs: everything else :class:`~lightning.pytorch.strategies.DDPStrategy` takes
            (``process_group_backend``, ``find_unused_parameters`` ...).
    """

    strategy_name = "context_parallel"

    def __init__(self, context_parallel: int | None = 1, layout: Literal["zigzag", "contiguous"] = "zigzag",
                 collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S, **kwargs: Any) -> None:
        if "timeout" in kwargs:
            raise ValueError("ContextParallelStrategy: give collective_timeout_s (seconds), not timeout")
        collective_timeout(collective_timeout_s, type(self).__name__)  # validates
        # the rendezvous waits longer (ranks start at different times); setup_distributed lowers it
        super().__init__(timeout=startup_timeout(collective_timeout_s), **kwargs)
        self.collective_timeout_s = float(collective_timeout_s)
        if context_parallel is not None and (isinstance(context_parallel, bool) or not isinstance(context_parallel, int)
                                             or context_parallel < 1):
            raise ValueError(f"ContextParallelStrategy: context_parallel must be a positive int or None (all "
                             f"processes of a node), got {context_parallel!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"ContextParallelStrategy: layout must be one of {LAYOUTS}, got {layout!r}")
        self._context_parallel = context_parallel
        self.layout = layout
        self.device_mesh: Any = None
        self._handle: ContextParallel | None = None

    # ------------------------------------------------------------------ sizes

    @property
    def context_parallel(self) -> int:
        """``cp``: processes per context-parallel group."""
        return self.num_processes if self._context_parallel is None else self._context_parallel

    @property
    def data_parallel(self) -> int:
        """``dp = world_size / cp``: how many different batches one step trains on."""
        return self.world_size // self.context_parallel

    def _check_sizes(self) -> None:
        world, cp = self.num_nodes * self.num_processes, self.context_parallel
        if cp < 1 or world % cp != 0:
            raise ValueError(f"ContextParallelStrategy: the world size {world} ({self.num_nodes} node(s) x "
                             f"{self.num_processes} device(s)) is not divisible by context_parallel={cp}; use "
                             f"devices * num_nodes = a multiple of {cp}, or a context_parallel that divides {world}")

    # ------------------------------------------------------------------ Lightning hooks

    def _configure_launcher(self) -> None:
        # Runs in the launching process once devices and nodes are known: fail before any spawn.
        self._check_sizes()
        super()._configure_launcher()

    def setup_distributed(self) -> None:
        """DDP's process group, then (``cp > 1``) the named ``("dp", "cp")`` mesh and the handle."""
        self._check_sizes()
        super().setup_distributed()
        cp = self.context_parallel
        if cp == 1:
            apply_collective_timeout(self.collective_timeout_s)
            return
        from torch.distributed.device_mesh import init_device_mesh

        # Every rank creates every sub-group, in the same order (init_device_mesh does so).
        self.device_mesh = init_device_mesh(self.root_device.type, (self.world_size // cp, cp),
                                            mesh_dim_names=("dp", "cp"))
        cp_rank = self.device_mesh.get_local_rank("cp")
        if cp_rank != self.global_rank % cp or self.device_mesh.get_local_rank("dp") != self.global_rank // cp:
            raise RuntimeError(f"ContextParallelStrategy: the device mesh put global rank {self.global_rank} at "
                               f"(dp={self.device_mesh.get_local_rank('dp')}, cp={cp_rank}), expected the row-major "
                               f"({self.global_rank // cp}, {self.global_rank % cp}) the data sampler assumes")
        self._handle = ContextParallel(group=self.device_mesh.get_group("cp"), rank=cp_rank, world_size=cp,
                                       layout=self.layout)
        apply_collective_timeout(self.collective_timeout_s, [self.device_mesh.get_group(d) for d in ("dp", "cp")])

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Shard the data over ``dp`` only: the ``cp`` ranks of one data-parallel rank see the same batches."""
        cp = self.context_parallel
        return {"num_replicas": (self.num_nodes * self.num_processes) // cp, "rank": self.global_rank // cp}

    @property
    def context_parallel_handle(self) -> ContextParallel | None:
        """The group of this rank's context-parallel axis (``None`` when ``cp == 1`` or before setup)."""
        return self._handle

    def on_exception(self, exception: BaseException) -> None:
        """Rank 0 failed (a collective timed out, say): kill the ranks it launched, which Lightning leaves
        running when the launching process itself fails -- a stopped rank would otherwise stay forever."""
        super().on_exception(exception)
        stop_launched_ranks()

    def teardown(self) -> None:
        self._handle = None
        self.device_mesh = None
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """``"context_parallel"``: every process of a node in one context-parallel group."""
        if "context_parallel" not in strategy_registry:
            strategy_registry.register("context_parallel", cls, description="DDP over nodes, the sequence sharded "
                                       "over the devices of each node (mmgrow)", context_parallel=None)


ContextParallelStrategy.register_strategies(StrategyRegistry)
