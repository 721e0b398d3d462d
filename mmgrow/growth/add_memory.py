"""``add_memory``: insert a gated memory branch (a TTT layer, or any mixer) into chosen blocks.

Each chosen block gains :class:`~mmgrow.models.gated_memory.GatedMemory`:
``x <- x + tanh(alpha) * memory(norm(x))`` (and the reversed pass when bidirectional). With
``gate_init = 0`` (default) the branch adds exactly 0, so the grown model is the old one bit for bit;
``gate_init = 0.1`` reproduces the one-minute-video insertion of TTT layers into a pretrained
diffusion transformer (the function moves a little from the first step, so the report says "none").

The memory's own weights get the model's usual initialisation (``N(0, init_std)`` linears, or the
layer's ``init_weights``), so a grown model trains as a model built with the memory would.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmgrow.growth.base import GrowthError, NewParameters, backbone_of, check_layers
from mmgrow.models.backbone import build_mixer
from mmgrow.models.factories import factory_from_spec
from mmgrow.models.gated_memory import GatedMemory
from mmgrow.protocols import GrowthReport, GrowthStrategy


def init_like_model(module: nn.Module, model: nn.Module) -> None:
    """Initialise a new branch by the model's rule, with its ``init_std`` (0.02 for a bare backbone)."""
    from mmgrow.models.unified import initialise

    initialise(module, getattr(model, "init_std", 0.02))


class AddMemoryGrowth(GrowthStrategy):
    """Add a gated memory branch to the chosen blocks.

    Args:
        memory: the memory, as ``{"class_path": ..., "init_args": {...}}`` (a registered name such as
            ``ttt_linear`` / ``ttt_mlp`` / ``mamba2``, or an import path).
        layers: block indices that get a branch (None = all; negative counts from the end).
        gate_init: initial ``alpha`` (0 = exact preservation; 0.1 = TTT-video).
        bidirectional: add the reversed pass (non-causal models only).
        modality_gates: one gate vector per modality (picked by ``ctx.modality_ids``).
    """

    preserves = "exact"

    def __init__(self, memory: dict[str, Any] | None = None, layers: list[int] | None = None, gate_init: float = 0.0,
                 bidirectional: bool = False, modality_gates: int = 1) -> None:
        self.memory = dict(memory) if memory is not None else {"class_path": "ttt_linear", "init_args": {}}
        self.layers = None if layers is None else list(layers)
        self.gate_init = float(gate_init)
        self.bidirectional = bidirectional
        self.modality_gates = modality_gates
        self._factory = factory_from_spec(self.memory, "memory")  # fails early on a bad class_path

    @classmethod
    def conformance_kwargs(cls) -> dict:
        return {"memory": {"class_path": "ttt_linear", "init_args": {"num_heads": 2, "mini_batch_size": 4}}}

    def apply(self, model: nn.Module) -> GrowthReport:
        backbone = backbone_of(model)
        chosen = check_layers(self.layers, len(backbone.blocks), "add_memory")
        taken = [i for i in chosen if backbone.blocks[i].memory is not None]
        if taken:
            raise GrowthError(f"add_memory: blocks {taken} already have a memory branch")
        with NewParameters(model) as new:
            for i in chosen:
                block = backbone.blocks[i]
                branch = GatedMemory(backbone.dim, build_mixer(self._factory, backbone.dim, i),
                                     gate_init=self.gate_init, bidirectional=self.bidirectional,
                                     modality_gates=self.modality_gates, norm_eps=block.norm1.eps)
                init_like_model(branch, model)
                ref = next(block.parameters())
                block.memory = branch.to(device=ref.device, dtype=ref.dtype)
        preserves = "exact" if self.gate_init == 0.0 else "none"
        return GrowthReport(new.names, preserves, f"add_memory: {self.memory['class_path']} in blocks {chosen}, "
                                                  f"gate_init={self.gate_init}")
