"""Opt-in ``torch.compile`` of each block (``model.compile_blocks``).

Blocks rather than the whole model: every block of a backbone has the same code, so one compiled graph
serves them all (compile time does not grow with depth), the graph breaks that the unified model's
Python-side routing (modalities, heads, packing) would cause stay outside, and FSDP's per-block hooks
wrap compiled blocks (torchtitan compiles per block for these reasons). ``nn.Module.compile`` compiles
in place, so parameter names and checkpoints are unchanged.

The recipe value is ``false`` (default: eager), ``true`` (``torch.compile`` defaults: the inductor
backend, which needs a C++ compiler on CPU and Triton on GPU) or a mapping of ``torch.compile`` keyword
arguments, e.g. ``{backend: aot_eager}`` (traced and differentiated ahead of time but run with eager
kernels: no compiler needed) or ``{mode: max-autotune, dynamic: false}``::

    model:
      compile_blocks: {backend: inductor, mode: max-autotune-no-cudagraphs}

Compilation happens lazily at the first forward of each block (the first training step is slow).
Attention kernels that branch in Python per tile (ring, blockwise) compile with graph breaks: correct,
but less gain than full attention (SDPA), whose block compiles to one graph.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def compile_options(value: bool | dict[str, Any] | None, owner: str = "compile_blocks") -> dict[str, Any] | None:
    """The recipe's ``compile_blocks`` value -> ``torch.compile`` keyword arguments, or None for eager.

    ``False``/``None`` -> None; ``True`` -> ``{}`` (torch's defaults); a dict is checked against
    ``torch.compile``'s keyword parameters so a typo fails before training, not at the first step."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{owner} must be true/false or a mapping of torch.compile keyword arguments, "
                        f"got {type(value).__name__}: {value!r}")
    import torch

    allowed = {name for name, p in inspect.signature(torch.compile).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{owner}: unknown torch.compile argument(s) {unknown}; expected some of {sorted(allowed)}")
    return dict(value)


def compile_blocks(model: nn.Module, **options: Any) -> int:
    """``block.compile(**options)`` for every block of ``model.blocks``; returns how many."""
    blocks = list(getattr(model, "blocks", []))
    for block in blocks:
        block.compile(**options)
    return len(blocks)
