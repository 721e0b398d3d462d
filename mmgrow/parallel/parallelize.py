"""Turn one single-device model into its parallel form, in torchtitan's order:
tensor parallelism -> activation checkpointing -> ``torch.compile`` -> FSDP.

* **TP first**: ``parallelize_module`` replaces the planned linear layers' weights by DTensors on the
  ``tp`` axis; FSDP then shards those DTensors again over ``dp x cp`` (2-D parameters).
* **Activation checkpointing** before compile and FSDP, so each block's recompute sits inside the block
  that FSDP gathers and the compiled region.
* **compile** per block, before FSDP: FSDP's hooks stay outside the compiled graphs (torchtitan,
  Lightning docs), and state-dict names do not change (``nn.Module.compile`` compiles in place).
* **FSDP last**, per block and at the root (:mod:`mmgrow.parallel.fsdp`).

The model code knows none of this: it stays the single-device code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmgrow.parallel.fsdp import apply_fsdp
from mmgrow.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelPlan:
    """What :func:`parallelize` applies. ``mesh``: the ``("dp", "cp", "tp")`` mesh, ``fsdp_mesh`` its
    flattened ``dp x cp`` axis (:func:`mmgrow.parallel.mesh.build_device_mesh`); None: no sharding (DDP
    or one process), only activation checkpointing and compile."""

    mesh: Any = None
    fsdp_mesh: Any = None
    fsdp: bool = True
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    # False (eager), True (torch.compile defaults) or torch.compile kwargs (mmgrow.parallel.compile)
    compile_blocks: bool | dict[str, Any] = False


def parallelize(model: nn.Module, plan: ParallelPlan) -> dict[str, Any]:
    """Apply ``plan`` to ``model`` in place; returns what was done (for logs and summary.json)."""
    from mmgrow.parallel.activation_checkpoint import checkpoint_blocks
    from mmgrow.parallel.compile import compile_blocks, compile_options

    done: dict[str, Any] = {}
    if plan.mesh is not None and plan.mesh["tp"].size() > 1:
        done["tensor_parallel_layers"] = len(apply_tensor_parallel(model, plan.mesh["tp"]))
    if plan.activation_checkpointing:
        done["checkpointed_blocks"] = checkpoint_blocks(model)
    options = compile_options(plan.compile_blocks)
    if options is not None:
        done["compiled_blocks"] = compile_blocks(model, **options)
    if plan.mesh is not None and plan.fsdp:
        done["fsdp_units"] = apply_fsdp(model, plan.fsdp_mesh, param_dtype=plan.param_dtype,
                                        reduce_dtype=plan.reduce_dtype,
                                        reshard_after_forward=plan.reshard_after_forward)
    return done
