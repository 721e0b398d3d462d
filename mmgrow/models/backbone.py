"""A stack of :class:`~mmgrow.models.block.Block` s whose mixers come from factories.

``mixer`` is a :data:`~mmgrow.protocols.MixerFactory` (``factory(dim, layer_idx) -> SequenceMixer``,
e.g. a mixer class or the partial jsonargparse builds from ``class_path`` + ``init_args``), or a list
of factories cycled over the layers (hybrids: ``[GatedDeltaNet, GatedDeltaNet, SlidingWindow]``),
or None for :class:`~mmgrow.layers.attention.FullAttention` with 4 heads. ``memory`` is an optional
factory of a memory (a TTT layer, or any mixer) added as a gated branch to the blocks chosen by
``memory_placement`` (:class:`~mmgrow.models.gated_memory.MemoryPlacement`). ``cross_attention``
(:class:`~mmgrow.models.cross_condition.CrossAttentionConfig`) adds cross-attention branches on
``ctx.condition``; ``modulation`` (:class:`~mmgrow.models.modulation.ModulationConfig`) makes every
block a DiT block modulated by ``ctx.timestep``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import Tensor, nn

from mmgrow.layers.mlp import swiglu_hidden
from mmgrow.models.block import Block
from mmgrow.models.cross_condition import CrossAttentionConfig
from mmgrow.models.gated_memory import GatedMemory, MemoryPlacement
from mmgrow.models.modulation import ModulationConfig
from mmgrow.protocols import MixerFactory, MixerState, SeqContext, SequenceMixer


def _accepts_keywords(factory: MixerFactory) -> bool:
    """Whether ``factory(dim=..., layer_idx=...)`` is a valid call (classes, jsonargparse partials)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: call positionally
        return False
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return any(p.kind == p.VAR_KEYWORD for p in params) or {"dim", "layer_idx"} <= names


def build_mixer(factory: MixerFactory, dim: int, layer_idx: int) -> SequenceMixer:
    """Call ``factory`` for one layer and check that it gave a :class:`SequenceMixer` of width ``dim``.

    Mixers are built keyword-only, so the factory gets ``dim=`` and ``layer_idx=`` by name when it
    accepts them (a class, a ``functools.partial``, jsonargparse's factory), positionally otherwise.
    """
    if not callable(factory):
        raise TypeError(f"Backbone: mixer factory for layer {layer_idx} is not callable: {factory!r}")
    if _accepts_keywords(factory):
        mixer = factory(dim=dim, layer_idx=layer_idx)
    else:
        mixer = factory(dim, layer_idx)
    if not isinstance(mixer, SequenceMixer):
        raise TypeError(f"Backbone: mixer factory {factory!r} returned {type(mixer).__name__} for layer {layer_idx}; "
                        "expected a mmgrow.protocols.SequenceMixer instance")
    if mixer.dim != dim:
        raise ValueError(f"Backbone: layer {layer_idx} mixer {type(mixer).__name__} has dim {mixer.dim}, expected {dim}")
    return mixer


def _default_mixer(dim: int, layer_idx: int) -> SequenceMixer:
    from mmgrow.layers.attention import FullAttention

    return FullAttention(dim=dim, layer_idx=layer_idx, num_heads=4)


def as_config(value, cls: type, name: str):
    """``value`` as a ``cls`` dataclass: None stays None, a dict becomes ``cls(**value)``."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"Backbone: {name} must be a {cls.__name__} or a dict, got {type(value).__name__}")


def _memory_branch(factory: MixerFactory, placement: MemoryPlacement, dim: int, layer_idx: int,
                   norm_eps: float) -> GatedMemory:
    return GatedMemory(dim, build_mixer(factory, dim, layer_idx), gate_init=placement.gate_init,
                       bidirectional=placement.bidirectional, modality_gates=placement.modality_gates,
                       norm_eps=norm_eps)


class Backbone(nn.Module):
    """``depth`` blocks: ``x [B, T, D] -> (x [B, T, D], per-layer states or None)``."""

    def __init__(self, dim: int, depth: int, mixer: MixerFactory | Sequence[MixerFactory] | None = None,
                 mlp_ratio: float = 8 / 3, norm_eps: float = 1e-6, mlp_chunk: int | None = None,
                 memory: MixerFactory | None = None, memory_placement: MemoryPlacement | dict | None = None,
                 cross_attention: CrossAttentionConfig | dict | None = None,
                 modulation: ModulationConfig | dict | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"Backbone: depth must be >= 1, got {depth}")
        if mixer is None:
            factories: list[MixerFactory] = [_default_mixer]
        elif isinstance(mixer, (list, tuple)):
            if not mixer:
                raise ValueError("Backbone: the mixer list is empty; give at least one factory")
            factories = list(mixer)
        else:
            factories = [mixer]
        self.dim = dim
        self.mlp_hidden = swiglu_hidden(dim, mlp_ratio)
        placement = as_config(memory_placement, MemoryPlacement, "memory_placement") or MemoryPlacement()
        with_memory = placement.chosen(depth) if memory is not None else set()
        cross = as_config(cross_attention, CrossAttentionConfig, "cross_attention")
        with_cross = cross.chosen(depth) if cross is not None else set()
        modulation = as_config(modulation, ModulationConfig, "modulation")
        self.blocks = nn.ModuleList(
            Block(dim, build_mixer(factories[i % len(factories)], dim, i), self.mlp_hidden, norm_eps, mlp_chunk,
                  memory=_memory_branch(memory, placement, dim, i, norm_eps) if i in with_memory else None,
                  cross_attention=cross.build(dim, norm_eps) if i in with_cross else None,
                  modulation=modulation.build(dim) if modulation is not None else None)
            for i in range(depth)
        )

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def mixers(self) -> list[SequenceMixer]:
        return [block.mixer for block in self.blocks]

    def forward(self, x: Tensor, ctx: SeqContext, states: Sequence[MixerState] | None = None
                ) -> tuple[Tensor, list[MixerState] | None]:
        if states is not None and len(states) != len(self.blocks):
            raise ValueError(f"Backbone: got {len(states)} states for {len(self.blocks)} layers; "
                             "expected one per layer (see init_states)")
        new_states: list[MixerState] = []
        for i, block in enumerate(self.blocks):
            x, state = block(x, ctx, None if states is None else states[i])
            new_states.append(state)
        return x, (new_states if states is not None else None)

    def residual_outputs(self) -> list[nn.Linear]:
        return [lin for block in self.blocks for lin in block.residual_outputs()]
